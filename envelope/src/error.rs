//! Typed errors. Every message names what went wrong, where (file, key id, line) and what to do.
//! No message ever contains a cleartext value or key material.

use crate::keys::Thumbprint;
use std::path::PathBuf;

/// Problems loading or generating keys and certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is a PFX or an encrypted key and no passphrase was given.
    #[error("{}: needs a passphrase; pass --passphrase-file FILE or set NODESEAL_PFX_PASSPHRASE", path.display())]
    PassphraseRequired {
        /// The file.
        path: PathBuf,
    },
    /// The PFX's MAC did not verify with the passphrase given.
    #[error("{}: wrong passphrase for PFX (MAC verification failed); check the .pw file or --passphrase-file", path.display())]
    WrongPassphrase {
        /// The PFX.
        path: PathBuf,
    },
    /// Not RSA 2048/3072/4096.
    #[error("{}: unsupported key: {kind}; nodeseal supports RSA keys of 2048, 3072 or 4096 bits only", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// What was found, e.g. "EC key (prime256v1)" or "RSA 1024-bit key".
        kind: String,
    },
    /// The file holds no certificate (needed for the thumbprint).
    #[error("{}: no certificate found; a key needs its X.509 certificate (same file, or a sibling .crt/.cer/.pem) because nodeseal identifies keys by certificate thumbprint", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds several distinct certificates that could each be the key's.
    #[error("{}: {count} different end-entity certificates found; put one key and its certificate per file", path.display())]
    MultipleCertificates {
        /// The file.
        path: PathBuf,
        /// How many distinct certificates.
        count: usize,
    },
    /// The file holds no private key.
    #[error("{}: no private key found", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The certificate's public key is not the private key's.
    #[error("{}: the certificate (thumbprint {thumbprint}) does not match the private key", path.display())]
    CertificateMismatch {
        /// The file.
        path: PathBuf,
        /// The certificate's thumbprint.
        thumbprint: Thumbprint,
    },
    /// A thumbprint in a file name disagrees with the certificate inside.
    #[error("{}: file name says thumbprint {expected} but the certificate's is {actual}; rename the file or replace the certificate", path.display())]
    ThumbprintMismatch {
        /// The file.
        path: PathBuf,
        /// From the name.
        expected: Thumbprint,
        /// From the certificate.
        actual: Thumbprint,
    },
    /// Unparseable content.
    #[error("{}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, e.g. "not PEM, DER or PKCS#12".
        reason: String,
    },
    /// Not 40 hex digits.
    #[error("invalid thumbprint {0:?}: expected 40 hexadecimal digits (SHA-1 of the certificate)")]
    BadThumbprint(String),
    /// OpenSSL failed while generating or exporting.
    #[error("OpenSSL error while {during}: {source}")]
    Crypto {
        /// What we were doing.
        during: &'static str,
        /// OpenSSL's error stack.
        #[source]
        source: openssl::error::ErrorStack,
    },
}

/// Problems sealing, inspecting or opening tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a v1 token nor a legacy ciphertext, or structurally broken.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A v1 token whose version byte this build does not know.
    #[error("unsupported token version {0}; upgrade nodeseal")]
    UnsupportedVersion(u8),
    /// The token ends early.
    #[error("truncated token: {0}")]
    Truncated(String),
    /// AES-GCM authentication failed: the token was modified, or the wrapped key is not for us.
    #[error("token failed authentication (tampered with or corrupted)")]
    Tampered,
    /// Bound to another variable name.
    #[error("token is bound to {bound:?}, not {expected:?}")]
    NameMismatch {
        /// What the caller asked for.
        expected: String,
        /// What the token says.
        bound: String,
    },
    /// Past its not-after time.
    #[error("token expired at {not_after} (unix seconds); seal the value again")]
    Expired {
        /// Unix seconds.
        not_after: u64,
    },
    /// Bound to an audience the caller is not in (decided before any key was used).
    #[error("token is bound to the audience {}; the caller is not in it", fmt_selectors(.audience))]
    NotInAudience {
        /// The token's selectors, canonical order.
        audience: Vec<crate::audience::Selector>,
    },
    /// None of the recipients' keys is available.
    #[error("no available key for this token; it was sealed for {}", fmt_list(.recipients))]
    NoMatchingKey {
        /// Key ids named in the token.
        recipients: Vec<Thumbprint>,
    },
    /// Value over the format's limit.
    #[error("value is {len} bytes; the {format} format holds at most {max} bytes")]
    TooLarge {
        /// Value length.
        len: usize,
        /// The limit.
        max: usize,
        /// "v1" or "shipyard (RSA-4096)" etc.
        format: String,
    },
    /// Bad arguments to `seal` (no recipients, invalid name, ...).
    #[error("{0}")]
    Invalid(String),
    /// OpenSSL failed unexpectedly.
    #[error("OpenSSL error while {during}: {source}")]
    Crypto {
        /// What we were doing.
        during: &'static str,
        /// OpenSSL's error stack.
        #[source]
        source: openssl::error::ErrorStack,
    },
}

fn fmt_list(tps: &[Thumbprint]) -> String {
    tps.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_selectors(selectors: &[crate::audience::Selector]) -> String {
    selectors
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Problems parsing an env file. Never quotes a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvFileError {
    /// A line whose variable name is empty or has invalid characters.
    #[error("line {line}: invalid variable name; expected NAME=VALUE with NAME of letters, digits and '_'")]
    BadName {
        /// 1-based line number.
        line: usize,
    },
    /// The file is not UTF-8.
    #[error("line {line}: not valid UTF-8")]
    NotUtf8 {
        /// 1-based line number.
        line: usize,
    },
    /// The last line has no newline: the file may still be being written.
    #[error("last line is unterminated (file may be half-written)")]
    Unterminated,
}
