//! One env file as the agent reads it: opened without following a link at its last component,
//! its task and job derived from where it sits, each value classified as a v1 token, a legacy
//! Shipyard ciphertext or a plain value, and the caps ([`FileCaps`]) it is read under, with the
//! reason ([`OverCap`]) a file that breaks one is refused for.

use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::Thumbprint;

use std::sync::Arc;
use zeroize::Zeroizing;

/// How a variable's value is stored in its env file.
pub(crate) enum ValueKind {
    /// Served as it is; shared with the answers serving it, so a big value is not copied per
    /// request.
    Plain(Arc<Zeroizing<String>>),
    /// A v1 token and the key ids it names.
    V1 {
        /// The token text.
        token: String,
        /// Its recipients.
        recipients: Vec<Thumbprint>,
    },
    /// A Batch Shipyard ciphertext (standard base64 of RSA PKCS#1 v1.5).
    Shipyard {
        /// The base64 text.
        token: String,
        /// Decoded length (the modulus length of the key that can open it).
        len: usize,
    },
    /// Looks like a v1 token but does not parse: served as an error, never as plain text.
    Invalid(String),
}

/// The `limits` an env file is read under. Kept with each entry, so a reload that changes
/// them re-reads the files they were applied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileCaps {
    pub(crate) max_file_bytes: u64,
    pub(crate) max_vars: usize,
    pub(crate) max_value_bytes: usize,
    pub(crate) max_env_bytes_per_uid: u64,
    pub(crate) memory_budget_per_uid: usize,
}

impl FileCaps {
    pub(crate) fn from_limits(l: &crate::config::Limits) -> Self {
        Self {
            max_file_bytes: l.max_env_file_bytes,
            max_vars: l.max_vars_per_file,
            max_value_bytes: l.max_value_bytes,
            max_env_bytes_per_uid: l.max_env_bytes_per_uid,
            memory_budget_per_uid: l.memory_budget_per_uid,
        }
    }
}

/// Why an env file was refused: the cap it broke, named as the config spells it, so both the
/// log line and every caller asking for the task's values can tell the operator what to raise.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OverCap {
    #[error("the env file holds more than {max} bytes (limits.max_env_file_bytes)")]
    FileBytes { max: u64 },
    #[error("the env file has more than {max} variable lines (limits.max_vars_per_file)")]
    Vars { max: usize },
    #[error("the env file has more than {max} lines, blank and comment lines included ({LINES_PER_VAR} × limits.max_vars_per_file)")]
    Lines { max: usize },
    #[error("the value of {name} is {len} bytes, over {max} (limits.max_value_bytes)")]
    ValueBytes {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("uid {uid}'s env files would add up to {total} bytes, over {max} (limits.max_env_bytes_per_uid); it is read again once that uid's other files shrink")]
    EnvBytesPerUid {
        uid: u32,
        wanted: u64,
        total: u64,
        max: u64,
    },
    #[error("uid {uid}'s env files and cached values would hold {total} bytes of agent memory, over {max} (limits.memory_budget_per_uid); it is read again once that uid's other files shrink")]
    MemoryBudget {
        uid: u32,
        wanted: usize,
        total: usize,
        max: usize,
    },
}

impl OverCap {
    /// For a refusal by a per-uid total: the ledger it was charged on, and what this file needs
    /// there. Such a file may fit later without changing, when the uid's other files shrink.
    pub(crate) fn per_uid_need(&self) -> Option<(PerUid, usize)> {
        match self {
            Self::EnvBytesPerUid { wanted, .. } => Some((PerUid::EnvBytes, *wanted as usize)),
            Self::MemoryBudget { wanted, .. } => Some((PerUid::Memory, *wanted)),
            _ => None,
        }
    }
}

/// How a refusal names a variable: names have no cap of their own (only the file's size bounds
/// them), and a refused entry is charged to nobody yet is logged and answered, so only a
/// prefix is kept.
pub(crate) fn shown_name(name: &str) -> String {
    const SHOWN: usize = 64;
    match name.char_indices().nth(SHOWN) {
        None => name.to_owned(),
        Some((end, _)) => format!("{}... ({} bytes)", &name[..end], name.len()),
    }
}

/// Which per-uid account a refusal was about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PerUid {
    EnvBytes,
    Memory,
}

/// Lines of any kind a file may hold per variable it may hold: parsing keeps bookkeeping for
/// every line while it runs, so a file of millions of blank lines is refused before it is parsed
/// (a real env file has a few comments per variable at most).
pub(crate) const LINES_PER_VAR: usize = 4;

/// Every line of the file, blank and comment lines included.
pub(crate) fn lines_in(bytes: &[u8]) -> usize {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))
}

/// Lines that may hold a variable: not blank, not a `#` comment. An upper bound on what the
/// parser makes of the file, counted before parsing so that a file of millions of tiny
/// variables is refused before it costs a line's allocation each.
pub(crate) fn candidate_var_lines(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| {
            let start = line.iter().position(|b| !b.is_ascii_whitespace());
            start.is_some_and(|i| line[i] != b'#')
        })
        .count()
}

/// The rules that classify values, taken from the config.
pub(crate) struct Classifier<'a> {
    /// Names whose values may be Shipyard ciphertexts.
    pub legacy_names: &'a [String],
    /// Also any value whose decoded length is an RSA modulus length nodeseal accepts.
    pub legacy_by_length: bool,
}

/// Modulus lengths of the RSA keys nodeseal accepts (2048, 3072, 4096 bits). Legacy detection
/// by length uses these rather than the keys loaded right now: otherwise a ciphertext whose key
/// is briefly missing would be reclassified as a plain value and served as it is.
const RSA_MODULUS_LENGTHS: [usize; 3] = [256, 384, 512];

impl Classifier<'_> {
    /// Classify one value.
    pub(crate) fn classify(&self, name: &str, value: &str) -> ValueKind {
        match token::detect(value) {
            Some(Format::V1) => match token::inspect(value) {
                Ok(info) => ValueKind::V1 {
                    token: value.to_owned(),
                    recipients: info.recipients,
                },
                Err(e) => ValueKind::Invalid(e.to_string()),
            },
            Some(Format::Shipyard) => {
                let len = nodeseal_envelope::legacy::decode(value).map_or(0, |d| d.len());
                let by_name = self.legacy_names.iter().any(|n| n == name);
                let by_length = self.legacy_by_length && RSA_MODULUS_LENGTHS.contains(&len);
                if by_name || by_length {
                    ValueKind::Shipyard {
                        token: value.to_owned(),
                        len,
                    }
                } else {
                    ValueKind::Plain(Arc::new(Zeroizing::new(value.to_owned())))
                }
            }
            _ => ValueKind::Plain(Arc::new(Zeroizing::new(value.to_owned()))),
        }
    }
}

/// Why an env file could not be read.
pub(crate) enum Unreadable {
    Over(OverCap),
    Io(std::io::Error),
}

/// Read an env file the layout walk opened (never by path: the walk decided which inode),
/// refusing one over `max` bytes.
pub(crate) fn read_env_file(
    file: &mut std::fs::File,
    meta: &std::fs::Metadata,
    max: u64,
) -> Result<Zeroizing<Vec<u8>>, Unreadable> {
    use std::io::Read;
    let over = || Unreadable::Over(OverCap::FileBytes { max });
    if meta.len() > max {
        return Err(over());
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    // `take`: a file growing while read still stops at the limit.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(Unreadable::Io)?;
    if bytes.len() as u64 > max {
        return Err(over());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_counted_for_the_line_cap() {
        assert_eq!(lines_in(b""), 0);
        assert_eq!(lines_in(b"\n"), 1);
        assert_eq!(lines_in(b"A=1"), 1);
        assert_eq!(lines_in(b"A=1\n\n# c\nB=2"), 4);
        assert_eq!(lines_in(b"A=1\r\n\r\n"), 2);
    }

    #[test]
    fn candidate_lines_bound_the_variables_and_skip_blanks_and_comments() {
        let text = b"A=1\n\n  \n# c\n   # c\nB=2\r\nBARE\n\tC=\nD=x";
        assert_eq!(candidate_var_lines(text), 5);
        let parsed = nodeseal_envelope::envfile::EnvFile::parse_bytes(text).unwrap();
        assert!(parsed.vars().count() <= candidate_var_lines(text));
        assert_eq!(candidate_var_lines(b""), 0);
    }

    #[test]
    fn a_refusal_keeps_only_a_prefix_of_a_long_name() {
        assert_eq!(shown_name("SHORT"), "SHORT");
        let exact = "N".repeat(64);
        assert_eq!(shown_name(&exact), exact);
        let long = shown_name(&"N".repeat(12 << 20));
        assert_eq!(long, format!("{}... (12582912 bytes)", "N".repeat(64)));
    }

    #[test]
    fn every_refusal_names_its_cap() {
        for (r, cap) in [
            (OverCap::FileBytes { max: 1 }, "limits.max_env_file_bytes"),
            (OverCap::Vars { max: 1 }, "limits.max_vars_per_file"),
            (OverCap::Lines { max: 4 }, "limits.max_vars_per_file"),
            (
                OverCap::ValueBytes {
                    name: "A".into(),
                    len: 2,
                    max: 1,
                },
                "limits.max_value_bytes",
            ),
            (
                OverCap::EnvBytesPerUid {
                    uid: 5,
                    wanted: 2,
                    total: 2,
                    max: 1,
                },
                "limits.max_env_bytes_per_uid",
            ),
            (
                OverCap::MemoryBudget {
                    uid: 5,
                    wanted: 2,
                    total: 2,
                    max: 1,
                },
                "limits.memory_budget_per_uid",
            ),
        ] {
            assert!(r.to_string().contains(cap), "{r}");
        }
    }
}
