//! One env file as the agent reads it: opened without following a link at its last component,
//! its task and job derived from where it sits, and each value classified as a v1 token, a
//! legacy Shipyard ciphertext or a plain value.

use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::Thumbprint;

use zeroize::Zeroizing;

/// How a variable's value is stored in its env file.
pub(crate) enum ValueKind {
    /// Served as it is.
    Plain(Zeroizing<String>),
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

/// Env files larger than this are refused: a task must not make the agent read gigabytes.
const MAX_ENV_FILE_BYTES: u64 = 16 * 1024 * 1024;

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
                    ValueKind::Plain(Zeroizing::new(value.to_owned()))
                }
            }
            _ => ValueKind::Plain(Zeroizing::new(value.to_owned())),
        }
    }
}

/// Read an env file the layout walk opened (never by path: the walk decided which inode),
/// refusing what is larger than an env file can be.
pub(crate) fn read_env_file(
    file: &mut std::fs::File,
    meta: &std::fs::Metadata,
) -> std::io::Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    if meta.len() > MAX_ENV_FILE_BYTES {
        return Err(std::io::Error::other("larger than an env file can be"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    // `take`: a file growing while read still stops at the limit.
    file.take(MAX_ENV_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ENV_FILE_BYTES {
        return Err(std::io::Error::other("larger than an env file can be"));
    }
    Ok(bytes)
}
