//! Env files as Docker's `--env-file` reads them: `NAME=VALUE` per line, value verbatim (no
//! quote or escape processing), `#` comment lines, blank lines, and a bare `NAME` (meaning "take
//! it from the host environment"). Parsing keeps every line so a file can be rewritten with only
//! chosen values changed.
//!
//! Docker's rule (docker/cli `pkg/kvfile`, earlier `opts/file.go`): a UTF-8 byte-order mark on
//! the first line is dropped; leading whitespace is dropped; blank and `#` lines are ignored;
//! the name is everything before the first `=` and may hold any character but space and tab
//! (`my-var`, `a.b`, `1ABC`, `NÄME` are all accepted); the value is the rest, verbatim; a `\r`
//! before the `\n` is not part of it. Docker refuses the whole file for an empty name, a name
//! with whitespace or a line that is not UTF-8. Here such a line is only skipped, with its
//! reason, and every other line still counts: one line never hides the rest. Exported bash
//! functions as `env` prints them (`BASH_FUNC_name%%=() {  …`, body lines, a closing `}`) are
//! skipped whole: they are not values, and their body lines are not variables.

use crate::error::EnvFileError;
use std::fmt;
use zeroize::Zeroizing;

/// Why a line is skipped: nothing on it is served, and it is rewritten as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Skip {
    /// The line is not UTF-8 text.
    NotUtf8,
    /// `=` with nothing before it.
    NoName,
    /// The name holds a space or tab (Docker refuses the whole file for this).
    Whitespace,
    /// The name holds a control character (NUL, escape, ...), which no environment can carry
    /// safely, or a byte-order mark not at the start of the file.
    ControlChar,
    /// The first line of an exported bash function.
    BashFunction,
    /// A body line of the exported bash function that starts on line `header` (1-based).
    BashFunctionBody {
        /// Line number of the function's first line.
        header: usize,
    },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotUtf8 => f.write_str("not UTF-8 text"),
            Skip::NoName => f.write_str("no variable name before '='"),
            Skip::Whitespace => f.write_str("the variable name contains whitespace"),
            Skip::ControlChar => f.write_str(
                "the variable name contains a control character or a stray byte-order mark",
            ),
            Skip::BashFunction => {
                f.write_str("an exported bash function (as `env` prints it), not a value")
            }
            Skip::BashFunctionBody { header } => {
                write!(f, "body of the exported bash function on line {header}")
            }
        }
    }
}

/// One line of an env file.
#[non_exhaustive]
pub enum Line {
    /// Blank or `#` comment line, kept verbatim.
    Other(String),
    /// `NAME=VALUE`. The value is wiped on drop.
    Var {
        /// Variable name.
        name: String,
        /// Value, verbatim.
        value: Zeroizing<String>,
    },
    /// A bare `NAME`.
    NameOnly(String),
    /// A line that cannot be served: kept byte for byte (it may hold a secret, so it is wiped
    /// on drop), with its reason.
    Skipped {
        /// The line as it was, without its line ending.
        raw: Zeroizing<Vec<u8>>,
        /// The variable name, where the line has a usable one (exported functions).
        name: Option<String>,
        /// Why.
        reason: Skip,
    },
}

/// A parsed env file.
pub struct EnvFile {
    /// Lines in order.
    pub lines: Vec<Line>,
    /// Whether the text ended with a newline (or was empty).
    pub terminated: bool,
    /// Whether every line ended with CRLF; [`EnvFile::render`] then writes CRLF back.
    pub crlf: bool,
    /// Whether the text began with a UTF-8 byte-order mark (written back by render).
    pub bom: bool,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Whether `name` is a portable shell variable name: `[A-Za-z_][A-Za-z0-9_]*`. Env files may
/// hold others (see the module docs); this is what token names and shell exports need.
pub fn is_valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// Why `name` (non-empty, before the first `=`) cannot be served, if it cannot.
fn name_problem(name: &str) -> Option<Skip> {
    if name.is_empty() {
        Some(Skip::NoName)
    } else if name.contains([' ', '\t']) {
        Some(Skip::Whitespace)
    } else if name.chars().any(|c| c.is_control() || c == '\u{feff}') {
        Some(Skip::ControlChar)
    } else {
        None
    }
}

/// Whether a `NAME=VALUE` line starts an exported bash function as `env` prints it.
fn is_bash_function(name: &str, value: &str) -> bool {
    name.starts_with("BASH_FUNC_") && value.starts_with("() {")
}

/// Whether a line is the closing brace `env` prints at the end of an exported function.
/// Whitespace around it does not matter, so a rendered file (which drops indentation before
/// names) parses into the same lines again.
fn is_function_end(raw: &[u8]) -> bool {
    // The same (Unicode) whitespace the parser trims before a name.
    std::str::from_utf8(raw).is_ok_and(|t| t.trim() == "}")
}

impl EnvFile {
    /// Parse text; see [`EnvFile::parse_bytes`].
    pub fn parse(text: &str) -> Result<Self, EnvFileError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// Parse bytes. Leading whitespace before a name is ignored (as Docker does, and dropped on
    /// [`render`](Self::render)); the value is everything after the first `=`, verbatim; a `\r`
    /// before each `\n` is stripped (CRLF files). Lines that cannot be served become
    /// [`Line::Skipped`]; parsing itself does not fail.
    /// Like [`parse_bytes`](Self::parse_bytes), for a reader that serves values and never
    /// renders the file back: blank and comment lines are dropped once parsed, so however many a
    /// file holds they cost nothing afterwards (callers bound the number of lines beforehand,
    /// since parsing keeps per-line bookkeeping while it runs).
    pub fn parse_bytes_vars_only(bytes: &[u8]) -> Result<Self, EnvFileError> {
        let mut parsed = Self::parse_bytes(bytes)?;
        parsed.lines.retain(|l| !matches!(l, Line::Other(_)));
        parsed.lines.shrink_to_fit();
        Ok(parsed)
    }

    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, EnvFileError> {
        let (bom, bytes) = match bytes.strip_prefix(BOM) {
            Some(rest) => (true, rest),
            None => (false, bytes),
        };
        let terminated = bytes.is_empty() || bytes.ends_with(b"\n");
        let mut raw: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        if terminated {
            // split leaves an empty piece after the final newline.
            raw.pop();
        }
        let newline_count = if terminated { raw.len() } else { raw.len() - 1 };
        let crlf = newline_count > 0 && raw[..newline_count].iter().all(|l| l.ends_with(b"\r"));
        let raw: Vec<&[u8]> = raw
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if crlf && i < newline_count {
                    &l[..l.len() - 1]
                } else {
                    l
                }
            })
            .collect();
        // For each line, the index of the next closing `}` line at or after it: one backward
        // pass, so finding every function's end stays linear in the file.
        let mut next_end = vec![None; raw.len() + 1];
        for i in (0..raw.len()).rev() {
            next_end[i] = if is_function_end(raw[i]) {
                Some(i)
            } else {
                next_end[i + 1]
            };
        }
        let mut lines = Vec::with_capacity(raw.len());
        let mut body_until: Option<(usize, usize)> = None; // (last body line, header line no.)
        for (i, l) in raw.iter().enumerate() {
            if let Some((last, header)) = body_until {
                if i <= last {
                    lines.push(skipped(l, None, Skip::BashFunctionBody { header }));
                    continue;
                }
                body_until = None;
            }
            let Ok(text) = std::str::from_utf8(l) else {
                lines.push(skipped(l, None, Skip::NotUtf8));
                continue;
            };
            let trimmed = text.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                lines.push(Line::Other(text.to_owned()));
                continue;
            }
            // In mixed-ending files a trailing \r still is not part of a name or value.
            let stripped = trimmed.strip_suffix('\r').unwrap_or(trimmed);
            let (name, value) = match stripped.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (stripped, None),
            };
            if let Some(why) = name_problem(name) {
                lines.push(skipped(l, None, why));
                continue;
            }
            match value {
                Some(value) if is_bash_function(name, value) => {
                    let complete = value.trim_end().ends_with('}');
                    if let (false, Some(end)) = (complete, next_end[i + 1]) {
                        body_until = Some((end, i + 1));
                    }
                    lines.push(skipped(l, Some(name), Skip::BashFunction));
                }
                Some(value) => lines.push(Line::Var {
                    name: name.to_owned(),
                    value: Zeroizing::new(value.to_owned()),
                }),
                None => lines.push(Line::NameOnly(name.to_owned())),
            }
        }
        Ok(EnvFile {
            lines,
            terminated,
            crlf,
            bom,
        })
    }

    /// `(name, value)` of every `Var` line in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            _ => None,
        })
    }

    /// `(line number, name, reason)` of every skipped line, 1-based, in order.
    pub fn skipped(&self) -> impl Iterator<Item = (usize, Option<&str>, &Skip)> {
        self.lines.iter().enumerate().filter_map(|(i, l)| match l {
            Line::Skipped { name, reason, .. } => Some((i + 1, name.as_deref(), reason)),
            _ => None,
        })
    }

    /// Render back to bytes: each line followed by `\n` (`\r\n` for CRLF files), except the
    /// last when the parsed text was unterminated; skipped lines byte for byte, and the
    /// byte-order mark if there was one.
    pub fn render_bytes(&self) -> Zeroizing<Vec<u8>> {
        let eol: &[u8] = if self.crlf { b"\r\n" } else { b"\n" };
        // Reserved once so that growing leaves no unwiped copy of a value behind.
        let size: usize = self
            .lines
            .iter()
            .map(|l| {
                eol.len()
                    + match l {
                        Line::Other(s) | Line::NameOnly(s) => s.len(),
                        Line::Var { name, value } => name.len() + 1 + value.len(),
                        Line::Skipped { raw, .. } => raw.len(),
                    }
            })
            .sum();
        let mut out = Zeroizing::new(Vec::with_capacity(size + BOM.len()));
        if self.bom {
            out.extend_from_slice(BOM);
        }
        let n = self.lines.len();
        for (i, l) in self.lines.iter().enumerate() {
            match l {
                Line::Other(s) | Line::NameOnly(s) => out.extend_from_slice(s.as_bytes()),
                Line::Var { name, value } => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    out.extend_from_slice(value.as_bytes());
                }
                Line::Skipped { raw, .. } => out.extend_from_slice(raw),
            }
            if i + 1 < n || self.terminated {
                out.extend_from_slice(eol);
            }
        }
        out
    }

    /// [`render_bytes`](Self::render_bytes) as text; a skipped line that is not UTF-8 comes out
    /// with replacement characters, so writers of files use `render_bytes`.
    pub fn render(&self) -> Zeroizing<String> {
        let bytes = self.render_bytes();
        Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn skipped(raw: &[u8], name: Option<&str>, reason: Skip) -> Line {
    Line::Skipped {
        raw: Zeroizing::new(raw.to_vec()),
        name: name.map(str::to_owned),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_docker_subset() {
        let text =
            "# comment\n\n  \nA=1\n  B=x=y \"q\" \nC=\nHOST_ONLY\n   # indented comment\n_x9=\n";
        let f = EnvFile::parse(text).unwrap();
        let vars: Vec<_> = f.vars().collect();
        assert_eq!(
            vars,
            vec![("A", "1"), ("B", "x=y \"q\" "), ("C", ""), ("_x9", "")]
        );
        assert!(matches!(f.lines[6], Line::NameOnly(ref n) if n == "HOST_ONLY"));
        assert!(f.terminated && !f.crlf);
        // Leading whitespace before a name is the only thing not reproduced.
        assert_eq!(&f.render()[..], text.replace("  B=", "B="));
    }

    #[test]
    fn crlf_and_unterminated() {
        let f = EnvFile::parse("A=1\r\n# c\r\nB=2\r\n").unwrap();
        assert!(f.crlf);
        assert_eq!(f.vars().collect::<Vec<_>>(), vec![("A", "1"), ("B", "2")]);
        assert_eq!(&f.render()[..], "A=1\r\n# c\r\nB=2\r\n");
        let u = EnvFile::parse("A=1\nB=2").unwrap();
        assert!(!u.terminated);
        assert_eq!(&u.render()[..], "A=1\nB=2");
        let e = EnvFile::parse("").unwrap();
        assert!(e.terminated && e.lines.is_empty());
        assert_eq!(&e.render()[..], "");
    }

    /// What Docker's `--env-file` does with a line (docker/cli `pkg/kvfile`, released rule: no
    /// quote processing).
    #[derive(Debug)]
    enum Docker {
        /// Sets NAME=VALUE.
        Sets(&'static str, &'static str),
        /// Bare name: taken from the host environment, omitted when unset.
        FromHost(&'static str),
        /// Blank or comment.
        Ignores,
        /// Refuses the whole file.
        RefusesFile,
    }

    /// What nodeseal does with the same line.
    #[derive(Debug, PartialEq)]
    enum Ours {
        Serves(String, String),
        NameOnly(String),
        Keeps,
        Skips(Skip),
    }

    fn ours(line: &Line) -> Ours {
        match line {
            Line::Var { name, value } => Ours::Serves(name.clone(), value.to_string()),
            Line::NameOnly(n) => Ours::NameOnly(n.clone()),
            Line::Other(_) => Ours::Keeps,
            Line::Skipped { reason, .. } => Ours::Skips(reason.clone()),
        }
    }

    /// The env-file cases next to what Docker accepts. Docker's column is its documented rule;
    /// ours is asserted. Where Docker sets a variable, so do we (one exception: exported bash
    /// functions, which are not values); where Docker refuses the whole file, we skip the line.
    #[test]
    fn env_file_cases_next_to_docker() {
        use Docker::*;
        let serves = |n: &str, v: &str| Ours::Serves(n.into(), v.into());
        let cases: Vec<(&str, &[u8], Docker, Ours)> = vec![
            ("plain", b"A=1", Sets("A", "1"), serves("A", "1")),
            (
                "value verbatim, quotes kept",
                b"Q=\"x y\" ",
                Sets("Q", "\"x y\" "),
                serves("Q", "\"x y\" "),
            ),
            (
                "first = splits",
                b"U=a=b",
                Sets("U", "a=b"),
                serves("U", "a=b"),
            ),
            ("empty value", b"E=", Sets("E", ""), serves("E", "")),
            (
                "leading whitespace",
                b"  \tL=1",
                Sets("L", "1"),
                serves("L", "1"),
            ),
            (
                "dash in name",
                b"my-var=1",
                Sets("my-var", "1"),
                serves("my-var", "1"),
            ),
            (
                "dot in name",
                b"a.b=2",
                Sets("a.b", "2"),
                serves("a.b", "2"),
            ),
            (
                "leading digit",
                b"1ABC=3",
                Sets("1ABC", "3"),
                serves("1ABC", "3"),
            ),
            (
                "non-ASCII name",
                "NÄME=4".as_bytes(),
                Sets("NÄME", "4"),
                serves("NÄME", "4"),
            ),
            (
                "bare name",
                b"HOST_ONLY",
                FromHost("HOST_ONLY"),
                Ours::NameOnly("HOST_ONLY".into()),
            ),
            ("comment", b"# x=1", Ignores, Ours::Keeps),
            ("blank", b"   ", Ignores, Ours::Keeps),
            (
                "space in name",
                b"A B=1",
                RefusesFile,
                Ours::Skips(Skip::Whitespace),
            ),
            ("no name", b"=v", RefusesFile, Ours::Skips(Skip::NoName)),
            (
                "not UTF-8",
                b"B=\xff\xfe",
                RefusesFile,
                Ours::Skips(Skip::NotUtf8),
            ),
            (
                "control char in name",
                b"A\x1bB=1",
                Sets("A\x1bB", "1"),
                Ours::Skips(Skip::ControlChar),
            ),
            (
                "byte-order mark after indentation",
                b"\t\xEF\xBB\xBFN=1",
                Sets("\u{feff}N", "1"),
                Ours::Skips(Skip::ControlChar),
            ),
            (
                "exported bash function",
                b"BASH_FUNC_module%%=() {  eval `modulecmd bash $*`",
                Sets("BASH_FUNC_module%%", "() {  eval `modulecmd bash $*`"),
                Ours::Skips(Skip::BashFunction),
            ),
        ];
        for (what, line, docker, expected) in cases {
            let mut text = line.to_vec();
            text.extend_from_slice(b"\nAFTER=ok\n");
            let f = EnvFile::parse_bytes(&text).unwrap();
            assert_eq!(f.lines.len(), 2, "{what}");
            assert_eq!(ours(&f.lines[0]), expected, "{what} (Docker: {docker:?})");
            // One line never hides the rest.
            assert_eq!(ours(&f.lines[1]), serves("AFTER", "ok"), "{what}");
            // Written back as it was (skipped lines included); only the whitespace before a
            // served name is dropped.
            if what != "leading whitespace" {
                assert_eq!(&f.render_bytes()[..], &text[..], "{what}");
            }
            match docker {
                Sets(n, v) if !matches!(expected, Ours::Skips(_)) => {
                    assert_eq!(expected, serves(n, v), "{what}: as Docker");
                }
                FromHost(n) => assert_eq!(expected, Ours::NameOnly(n.into()), "{what}"),
                Ignores => assert_eq!(expected, Ours::Keeps, "{what}"),
                RefusesFile => assert!(matches!(expected, Ours::Skips(_)), "{what}"),
                Sets(..) => {}
            }
        }
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_name() {
        let text = b"\xEF\xBB\xBFFIRST=1\r\nSECOND=2\r\n";
        let f = EnvFile::parse_bytes(text).unwrap();
        assert_eq!(
            f.vars().collect::<Vec<_>>(),
            [("FIRST", "1"), ("SECOND", "2")]
        );
        assert!(f.bom && f.crlf);
        assert_eq!(&f.render_bytes()[..], &text[..]);
    }

    #[test]
    fn exported_functions_are_skipped_with_their_body_as_env_prints_them() {
        // `env` output on an HPC image with environment modules, filtered as Shipyard does.
        let text = "A=1\nBASH_FUNC_module%%=() {  local x=1;\n  eval \"$(modulecmd bash \"$@\")\"\n y=2\n}\nB=2\nBASH_FUNC_ml%%=() { :; }\nC=3\n";
        let f = EnvFile::parse(text).unwrap();
        assert_eq!(
            f.vars().collect::<Vec<_>>(),
            [("A", "1"), ("B", "2"), ("C", "3")]
        );
        let skipped: Vec<_> = f
            .skipped()
            .map(|(n, name, why)| (n, name, why.clone()))
            .collect();
        assert_eq!(
            skipped,
            [
                (2, Some("BASH_FUNC_module%%"), Skip::BashFunction),
                (3, None, Skip::BashFunctionBody { header: 2 }),
                (4, None, Skip::BashFunctionBody { header: 2 }),
                (5, None, Skip::BashFunctionBody { header: 2 }),
                (7, Some("BASH_FUNC_ml%%"), Skip::BashFunction),
            ]
        );
        assert_eq!(&f.render()[..], text);
        // A function that never closes hides nothing after its first line.
        let f = EnvFile::parse("BASH_FUNC_f%%=() {  echo\nX=1\n").unwrap();
        assert_eq!(f.vars().collect::<Vec<_>>(), [("X", "1")]);
        assert!(f
            .skipped()
            .next()
            .unwrap()
            .2
            .to_string()
            .contains("bash function"));
    }

    #[test]
    fn skip_reasons_say_why() {
        let e = EnvFile::parse("A B=1\n").unwrap();
        let (line, _, why) = e.skipped().next().unwrap();
        assert_eq!(line, 1);
        assert!(why.to_string().contains("whitespace"), "{why}");
        assert_eq!(
            Skip::BashFunctionBody { header: 4 }.to_string(),
            "body of the exported bash function on line 4"
        );
    }

    fn valid_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "#[^\n\r]{0,20}",
            "[ \t]{1,3}#[^\n\r]{0,10}",
            ("[A-Za-z_][A-Za-z0-9_]{0,8}", "[^\n\r]{0,30}").prop_map(|(n, v)| format!("{n}={v}")),
            "[A-Za-z_][A-Za-z0-9_]{0,8}",
        ]
    }

    /// Lines that exercise skipping: functions, closing braces, odd names, raw bytes.
    fn odd_line() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            valid_line().prop_map(String::into_bytes),
            "BASH_FUNC_[a-z]{1,3}%%=\\(\\) \\{[a-z ;]{0,6}".prop_map(String::into_bytes),
            "[ \t\u{b}\u{a0}]{0,2}\\}[ ]{0,1}".prop_map(String::into_bytes),
            "[ ]{0,2}[a-z .\\-]{1,6}(=[a-z ]{0,4})?".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..6),
        ]
    }

    proptest! {
        /// What the fuzz target checks, on env-like lines: render is a normal form, keeping
        /// every variable and every skipped line.
        #[test]
        fn render_is_a_normal_form(lines in proptest::collection::vec(odd_line(), 0..14), bom in any::<bool>()) {
            let mut data = if bom { BOM.to_vec() } else { Vec::new() };
            for l in &lines {
                data.extend_from_slice(l);
                data.push(b'\n');
            }
            let f = EnvFile::parse_bytes(&data).unwrap();
            if f.vars().any(|(_, v)| v.ends_with('\r')) {
                return Ok(());
            }
            let rendered = f.render_bytes();
            let again = EnvFile::parse_bytes(&rendered).unwrap();
            prop_assert!(f.vars().eq(again.vars()));
            prop_assert!(f.skipped().eq(again.skipped()));
            prop_assert_eq!(&again.render_bytes()[..], &rendered[..]);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = EnvFile::parse_bytes(&bytes);
        }

        #[test]
        fn vars_only_agrees_with_the_full_parse(
            lines in proptest::collection::vec(valid_line(), 0..12),
            eols in proptest::collection::vec(prop_oneof![Just("\n"), Just("\r\n"), Just("\r\r\n")], 12),
            junk in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let mut bytes: Vec<u8> = lines.iter().zip(&eols).flat_map(|(l, e)| format!("{l}{e}").into_bytes()).collect();
            bytes.extend(junk);
            let full = EnvFile::parse_bytes(&bytes);
            let only = EnvFile::parse_bytes_vars_only(&bytes);
            match (full, only) {
                (Ok(f), Ok(o)) => {
                    prop_assert_eq!(f.vars().collect::<Vec<_>>(), o.vars().collect::<Vec<_>>());
                    prop_assert_eq!((f.terminated, f.crlf), (o.terminated, o.crlf));
                    let names = |e: &EnvFile| e.lines.iter().filter_map(|l| match l { Line::NameOnly(n) => Some(n.clone()), _ => None }).collect::<Vec<_>>();
                    prop_assert_eq!(names(&f), names(&o));
                    prop_assert!(o.lines.iter().all(|l| !matches!(l, Line::Other(_))));
                }
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "full {:?} vs vars-only {:?}", a.err(), b.err()),
            }
        }

        #[test]
        fn round_trip(lines in proptest::collection::vec(valid_line(), 0..12), crlf in any::<bool>()) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let text: String = lines.iter().map(|l| format!("{l}{eol}")).collect();
            let f = EnvFile::parse(&text).unwrap();
            prop_assert_eq!(&f.render()[..], &text[..]);
        }
    }
}
