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
}

impl EnvFile {
    /// Parse text. Leading whitespace before a name is ignored (as Docker does); a name must
    /// match `[A-Za-z_][A-Za-z0-9_.-]*`... 
    pub fn parse(text: &str) -> Result<Self, EnvFileError> {
        todo!("{}", text.len())
    }
    /// Parse bytes, refusing non-UTF-8 with the line number.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, EnvFileError> {
        todo!("{}", bytes.len())
    }
    /// `(name, value)` of every `Var` line in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var { name, value } => Some((name.as_str(), value.as_str())),
            _ => None,
        })
    }
    /// Render back to text (newline-terminated lines).
    pub fn render(&self) -> Zeroizing<String> {
        todo!()
    }
}
