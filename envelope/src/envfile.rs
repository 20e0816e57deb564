//! Env files as Docker's `--env-file` reads them: `NAME=VALUE` per line, value verbatim (no
//! quote or escape processing), `#` comment lines, blank lines, and a bare `NAME` (meaning "take
//! it from the host environment"). Parsing keeps every line so a file can be rewritten with only
//! chosen values changed.

use crate::error::EnvFileError;
use zeroize::Zeroizing;

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
}

/// A parsed env file.
pub struct EnvFile {
    /// Lines in order.
    pub lines: Vec<Line>,
    /// Whether the text ended with a newline (or was empty).
    pub terminated: bool,
    /// Whether every line ended with CRLF; [`EnvFile::render`] then writes CRLF back.
    pub crlf: bool,
}

/// Whether `name` is a valid variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_name(name: &str) -> bool {
    let mut b = name.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

impl EnvFile {
    /// Parse text. Leading whitespace before a name is ignored (as Docker does, and dropped on
    /// [`render`](Self::render)); a name must match `[A-Za-z_][A-Za-z0-9_]*` (Docker accepts
    /// more, but such names cannot be used from a shell); the value is everything after the
    /// first `=`, verbatim. A `\r` before each `\n` is stripped (CRLF files).
    pub fn parse(text: &str) -> Result<Self, EnvFileError> {
        Self::parse_keeping(text, true)
    }

    /// Like [`parse_bytes`](Self::parse_bytes), but keeps only the `Var` and `NameOnly` lines
    /// (same grammar, same errors and line numbers, same `terminated` and `crlf`): for a reader
    /// that serves values and never renders the file back, so that blank and comment lines,
    /// however many, cost nothing once parsed.
    pub fn parse_bytes_vars_only(bytes: &[u8]) -> Result<Self, EnvFileError> {
        Self::from_utf8(bytes).and_then(|text| Self::parse_keeping(text, false))
    }

    fn parse_keeping(text: &str, keep_other: bool) -> Result<Self, EnvFileError> {
        let terminated = text.is_empty() || text.ends_with('\n');
        // Pieces are walked twice instead of collected: a file of millions of empty lines must
        // not cost a slice per line before a single one is looked at.
        let newline_count = text.bytes().filter(|&b| b == b'\n').count();
        let pieces = if terminated {
            // split leaves an empty piece after the final newline.
            newline_count
        } else {
            newline_count + 1
        };
        let crlf = newline_count > 0
            && text
                .split('\n')
                .take(newline_count)
                .all(|l| l.ends_with('\r'));
        let mut lines = Vec::with_capacity(if keep_other { pieces } else { 0 });
        for (i, l) in text.split('\n').take(pieces).enumerate() {
            let has_newline = i < newline_count;
            let l = if crlf && has_newline {
                &l[..l.len() - 1]
            } else {
                l
            };
            let trimmed = l.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                if keep_other {
                    lines.push(Line::Other(l.to_owned()));
                }
                continue;
            }
            // In mixed-ending files a trailing \r still is not part of a name or value.
            let stripped = trimmed.strip_suffix('\r').unwrap_or(trimmed);
            match stripped.split_once('=') {
                Some((name, value)) => {
                    if !is_valid_name(name) {
                        return Err(EnvFileError::BadName { line: i + 1 });
                    }
                    lines.push(Line::Var {
                        name: name.to_owned(),
                        value: Zeroizing::new(value.to_owned()),
                    });
                }
                None => {
                    if !is_valid_name(stripped) {
                        return Err(EnvFileError::BadName { line: i + 1 });
                    }
                    lines.push(Line::NameOnly(stripped.to_owned()));
                }
            }
        }
        Ok(EnvFile {
            lines,
            terminated,
            crlf,
        })
    }

    fn from_utf8(bytes: &[u8]) -> Result<&str, EnvFileError> {
        std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            EnvFileError::NotUtf8 { line }
        })
    }
    /// Parse bytes, refusing non-UTF-8 with the line number.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, EnvFileError> {
        Self::from_utf8(bytes).and_then(Self::parse)
    }
    /// `(name, value)` of every `Var` line in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            _ => None,
        })
    }
    /// Render back to text: each line followed by `\n` (`\r\n` for CRLF files), except the last
    /// when the parsed text was unterminated.
    pub fn render(&self) -> Zeroizing<String> {
        let eol = if self.crlf { "\r\n" } else { "\n" };
        let mut out = Zeroizing::new(String::new());
        let n = self.lines.len();
        for (i, l) in self.lines.iter().enumerate() {
            match l {
                Line::Other(s) | Line::NameOnly(s) => out.push_str(s),
                Line::Var { name, value } => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(value);
                }
            }
            if i + 1 < n || self.terminated {
                out.push_str(eol);
            }
        }
        out
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

    #[test]
    fn bad_names_and_bytes() {
        for (text, line) in [
            ("A B=1\n", 1),
            ("OK=1\n1X=2\n", 2),
            ("=v\n", 1),
            ("A-B\n", 1),
            ("a.b=1\n", 1),
        ] {
            assert_eq!(
                EnvFile::parse(text).err(),
                Some(EnvFileError::BadName { line }),
                "{text}"
            );
        }
        assert_eq!(
            EnvFile::parse_bytes(b"A=1\n# ok\nB=\xff\xfe\n").err(),
            Some(EnvFileError::NotUtf8 { line: 3 })
        );
        let e = EnvFile::parse("A=1\nB C=2\n").err().unwrap().to_string();
        assert!(e.contains("line 2"), "{e}");
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

    proptest! {
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
