//! Logs through `tracing`: to journald when systemd connected our stderr to the journal (so
//! every field becomes a journal field: `journalctl -u nodeseal-agent OUTCOME=forbidden`),
//! otherwise to stderr. The level comes from `RUST_LOG`, else the config.
//!
//! # Log lines cannot be forged
//!
//! Field values are attacker-controlled all over the agent (directory and env-file names, request
//! ops and JSON field names, serde error text quoting them), so the text (stderr) log formats
//! every field, the event message and span fields included, through one formatter,
//! [`EscapingFields`], instead of at each call site:
//!
//! - control characters (C0 with `\n`, `\r`, `\t`, ESC; DEL; C1 `U+0080`–`U+009F`), every
//!   whitespace but the plain space (`U+2028`/`U+2029` line and paragraph separators, NBSP, ...)
//!   and invisible format characters (bidi embeddings and overrides `U+202A`–`U+202E` and
//!   isolates `U+2066`–`U+2069`, zero-width characters, BOM) become visible escapes (`\n`,
//!   `\x1b`, `\u{2028}`), so an event is exactly one line and no value moves the terminal;
//! - a value that is empty, was escaped, or holds a space, `"`, `\`, `=`, `{` or `}` is written
//!   quoted (`name="a b"`) with `"` and `\` backslash-escaped and `=` written as `\x3d`: in a
//!   text log line every `=` separates a real field name from its value, so
//!   `grep host_root=true` matches only real fields. The message is quoted the same way except
//!   that spaces and braces alone do not quote it (it is prose).
//!
//! Plain values (`outcome=ok`, `peer_uid=1000`, `key_id=<hex>`, paths of plain names) are written
//! as they are, so greps on them keep working.
//!
//! journald needs none of this: its native protocol carries each field length-prefixed, so a
//! value with a newline stays one field and `journalctl FIELD=value` cannot be fooled, and field
//! names are the code's own (`tracing` names are `'static`). The one free-text field, `MESSAGE`,
//! is a string literal at every agent call site (attacker data goes into fields, never into the
//! format string; `messages_are_literals` below checks it), and `journalctl` indents the
//! continuation lines of a multi-line `MESSAGE` and shows one with other control characters as a
//! blob unless `--all` is given.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::Subscriber;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call once per process.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("nodeseal_agent={level},warn")));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if under_journal {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(
                    // No `F_` prefix: operators filter on `OUTCOME=`, `PEER_UID=`, ...
                    journald
                        .with_field_prefix(None)
                        .with_syslog_identifier("nodeseal-agent".into()),
                )
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text_layer(
            std::io::stderr,
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ))
        .try_init();
}

/// The text log layer: tracing's full format (timestamp, level, spans), every field through
/// [`EscapingFields`]. `ansi` only colours the level and timestamp; values never carry escapes.
fn text_layer<S, W>(
    writer: W,
    ansi: bool,
) -> tracing_subscriber::fmt::Layer<S, EscapingFields, Format, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(EscapingFields)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false)
}

/// Formats event and span fields so that attacker-controlled values can neither end the line
/// nor pose as another field (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EscapingFields;

impl<'writer> FormatFields<'writer> for EscapingFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_, '_> {
    fn put(&mut self, field: &Field, value: &str) {
        let name = field.name();
        // tracing-log's metadata of `log` records (the format shows it in the line prefix).
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        self.result = self.write(name, value);
    }

    fn write(&mut self, name: &str, value: &str) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if name == "message" {
            return write_escaped(self.writer, value, true);
        }
        // Names are the code's own, but a string-literal name may hold anything.
        for c in name.chars() {
            let ok = c.is_ascii_alphanumeric() || c == '_' || c == '.';
            self.writer.write_char(if ok { c } else { '_' })?;
        }
        self.writer.write_char('=')?;
        write_escaped(self.writer, value, false)
    }
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(e) = source {
            text.push_str(": ");
            text.push_str(&e.to_string());
            source = e.source();
        }
        self.put(field, &text);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields arrive here too (their Debug is the Display), as does the message.
        self.put(field, &format!("{value:?}"));
    }
}

/// Characters that are written as escapes: they could break the line, move the terminal or
/// make the text read differently from its bytes.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// `value` made safe to put inside a journal `MESSAGE` (which nothing escapes) and unchanged by
/// the text log's message formatting: every character [`needs_escape`] would escape, and `"`,
/// `\\` and `=`, becomes `<U+XXXX>`. The exact value stays in its own structured field.
pub(crate) fn for_message(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if needs_escape(c) || matches!(c, '"' | '\\' | '=' | '<' | '>') {
            out.push_str(&format!("<U+{:04X}>", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// A `MESSAGE` naming a file and why: `"<what> <path>: <reason>"`, both made safe with
/// [`for_message`] (the exact values stay in the `path` and `reason` fields).
pub(crate) fn about_file(what: &str, path: &std::path::Path, reason: &dyn fmt::Display) -> String {
    format!(
        "{what} {}: {}",
        for_message(&path.display().to_string()),
        for_message(&reason.to_string())
    )
}

/// Write `value` bare when it is plain, else quoted with escapes. A space or brace (which
/// closes a span's fields) quotes a field value but not the message (`prose`).
fn write_escaped(w: &mut impl fmt::Write, value: &str, prose: bool) -> fmt::Result {
    let plain = !value.is_empty()
        && value.chars().all(|c| {
            !needs_escape(c)
                && !matches!(c, '"' | '\\' | '=')
                && (prose || !matches!(c, ' ' | '{' | '}'))
        });
    if plain {
        return w.write_str(value);
    }
    w.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '=' => w.write_str("\\x3d")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if needs_escape(c) && c.is_ascii() => write!(w, "\\x{:02x}", u32::from(c))?,
            c if needs_escape(c) => write!(w, "\\u{{{:x}}}", u32::from(c))?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// What an attacker puts in a name: a fake audit line for a host-root request, a
    /// clear-screen, and a few invisible characters.
    const FORGED: &str =
        "\n2026-12-01T00:00:00Z  INFO request op=status peer_uid=0 host_root=true outcome=ok\n";
    const HOSTILE: &[&str] = &[
        FORGED,
        "\x1b[2J\x1b[1;1H",
        "a\rb",
        "tab\there",
        "del\x7f",
        "c1\u{85}\u{9b}31m",
        "ls\u{2028}ps\u{2029}",
        "bidi\u{202e}txt.exe\u{2066}\u{2069}",
        "x host_root=true outcome=ok",
        "quote\" peer_uid=0 \"",
        "back\\slash\\n",
        "",
    ];

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// Run `f` under the agent's text layer (with ANSI colours on, the harder case) and return
    /// what it wrote.
    fn capture(f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(text_layer(buf.clone(), true));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// Strip the ANSI colouring the format itself puts around timestamp and level.
    fn strip_format_colours(line: &str) -> String {
        let mut out = String::new();
        let mut rest = line;
        while let Some(i) = rest.find("\x1b[") {
            out.push_str(&rest[..i]);
            let tail = &rest[i + 2..];
            let end = tail.find('m').expect("an SGR sequence");
            assert!(
                tail[..end].chars().all(|c| c.is_ascii_digit() || c == ';'),
                "an escape that is not colour: {line:?}"
            );
            rest = &tail[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The prefix of every real line: `2026-05-01T12:00:00.123456Z  INFO ` (RFC 3339, UTC).
    fn has_real_prefix(line: &str) -> bool {
        let b = line.as_bytes();
        b.len() > 34
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[10] == b'T'
            && b[26] == b'Z'
            && [" TRACE ", " DEBUG ", "  INFO ", "  WARN ", " ERROR "]
                .iter()
                .any(|l| line[27..].starts_with(l))
    }

    fn check_lines(out: &str, events: usize) -> Vec<String> {
        assert!(out.ends_with('\n'), "{out:?}");
        let lines: Vec<String> = out.lines().map(strip_format_colours).collect();
        assert_eq!(lines.len(), events, "one line per event: {out:?}");
        for line in &lines {
            assert!(
                has_real_prefix(line),
                "a line without the real prefix: {line:?}"
            );
            assert!(
                !line.chars().any(needs_escape),
                "a raw control or invisible character: {line:?}"
            );
            assert!(!line.contains("host_root=true"), "forged field: {line:?}");
            assert!(!line.contains("peer_uid=0"), "forged field: {line:?}");
            assert!(!line.contains("op=status"), "forged field: {line:?}");
        }
        lines
    }

    #[test]
    fn hostile_values_stay_on_one_line_and_in_their_field() {
        let out = capture(|| {
            for h in HOSTILE {
                let owned = h.to_string();
                let path = std::path::PathBuf::from(format!("/env/{h}/wd"));
                tracing::warn!(path = %path.display(), "bad task dir");
                tracing::warn!(op = %owned, error = ?owned, name = *h, "request");
                tracing::info!("{h}");
                tracing::info!(message = %owned, ok = true);
                let err = io::Error::new(io::ErrorKind::InvalidData, owned.clone());
                tracing::error!(error = &err as &(dyn std::error::Error + 'static), "scan");
                let span = tracing::info_span!("task", dir = %owned, later = tracing::field::Empty);
                span.record("later", h);
                span.in_scope(|| tracing::info!(outcome = "ok", "inside"));
            }
        });
        check_lines(&out, HOSTILE.len() * 6);
    }

    #[test]
    fn plain_values_are_bare_and_others_quoted() {
        let out = capture(|| {
            tracing::info!(
                op = "get",
                peer_uid = 1000_u32,
                host_root = false,
                key_id = "0a1b2c3d",
                path = "/work/items/job/job-1/task/wd/.shipyard.envlist",
                outcome = "ok",
                "request"
            );
            tracing::warn!(
                name = "a b",
                q = "say \"hi\"",
                eq = "k=v",
                bs = "c:\\x",
                brace = "a}b",
                empty = "",
                nl = "a\nb",
                esc = "\x1b[2J",
                ls = "a\u{2028}b",
                c1 = "\u{9b}",
                "checked: it is \"quoted\" = yes"
            );
        });
        let lines = check_lines(&out, 2);
        assert!(
            lines[0].ends_with(
                " request op=get peer_uid=1000 host_root=false key_id=0a1b2c3d \
                 path=/work/items/job/job-1/task/wd/.shipyard.envlist outcome=ok"
            ),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with(
                r#" "checked: it is \"quoted\" \x3d yes" name="a b" q="say \"hi\"" eq="k\x3dv" bs="c:\\x" brace="a}b" empty="" nl="a\nb" esc="\x1b[2J" ls="a\u{2028}b" c1="\u{9b}""#
            ),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn prose_messages_stay_bare() {
        let out = capture(|| tracing::info!(days_left = 4_i64, "expires within 30 days"));
        let lines = check_lines(&out, 1);
        assert!(
            lines[0].ends_with("  INFO expires within 30 days days_left=4"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn message_parts_are_plain_in_both_logs() {
        for hostile in HOSTILE
            .iter()
            .copied()
            .chain(["a=b", "q\"x\\y", "<U+000A>"])
        {
            let shown = for_message(hostile);
            assert!(!shown.chars().any(needs_escape), "{hostile:?} -> {shown:?}");
            let mut text = String::new();
            write_escaped(&mut text, &format!("get {shown}: ok"), true).unwrap();
            assert_eq!(
                text,
                format!("get {shown}: ok"),
                "the text log would re-escape it"
            );
        }
        assert_eq!(for_message("job-1/task.2"), "job-1/task.2");
        assert_ne!(
            for_message("<U+000A>"),
            for_message("\n"),
            "escapes must not be forgeable"
        );
    }

    #[test]
    fn every_escaped_character_is_listed() {
        for c in [
            '\n', '\r', '\t', '\x1b', '\x7f', '\u{80}', '\u{9f}', '\u{2028}', '\u{2029}',
        ]
        .into_iter()
        .chain('\u{202a}'..='\u{202e}')
        .chain('\u{2066}'..='\u{2069}')
        {
            assert!(needs_escape(c), "{c:?}");
            let mut s = String::new();
            write_escaped(&mut s, &c.to_string(), false).unwrap();
            assert!(s.starts_with("\"\\") && s.is_ascii(), "{c:?} became {s:?}");
        }
        for c in ['a', 'Z', '0', '/', '.', '-', '_', ':', 'é', '€', ' '] {
            assert!(!needs_escape(c), "{c:?}");
        }
    }

    /// The journal's `MESSAGE` is not escaped, so every agent message must be a string literal
    /// without interpolated data (the data goes into fields). Checks each `tracing` macro call in
    /// the agent's sources: no string literal in it may hold a `{`.
    #[test]
    fn messages_are_literals() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("logging.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for mac in ["trace!(", "debug!(", "info!(", "warn!(", "error!("] {
                for (at, _) in text.match_indices(mac) {
                    checked += 1;
                    for lit in top_level_literals(&text[at + mac.len()..]) {
                        assert!(
                            !lit.contains('{'),
                            "{}: a {mac} message interpolates data ({lit:?}); put it in a field",
                            path.display()
                        );
                    }
                }
            }
        }
        assert!(checked > 20, "found only {checked} log macros");
    }

    /// The string literals directly in a macro call's arguments (not those of a nested call such
    /// as a field's `format!`), up to the `)` closing it.
    fn top_level_literals(s: &str) -> Vec<&str> {
        let (mut depth, mut start, mut escaped) = (1, None, false);
        let mut found = Vec::new();
        for (i, c) in s.char_indices() {
            match (start, c) {
                (Some(_), _) if escaped => escaped = false,
                (Some(_), '\\') => escaped = true,
                (Some(from), '"') => {
                    if depth == 1 {
                        found.push(&s[from..i]);
                    }
                    start = None;
                }
                (Some(_), _) => {}
                (None, '"') => start = Some(i + 1),
                (None, '(' | '[' | '{') => depth += 1,
                (None, ')' | ']' | '}') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        found
    }
}
