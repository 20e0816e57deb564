//! Key and certificate loading, key policy (RSA 2048/3072/4096 only), thumbprints, generation and
//! PFX export.
//!
//! PKCS#12 files come in two encodings: OpenSSL 3's default (PBES2/PBKDF2/AES-256-CBC, SHA-256
//! MAC) and the legacy one (RC2-40 or 3DES, SHA-1 MAC) written by OpenSSL 1.x, Windows and Java.
//! OpenSSL 3 reads the latter only with its `legacy` provider loaded next to `default`;
//! [`ensure_providers`] does that once per process.

use crate::error::KeyError;
use openssl::pkey::{PKey, Private, Public};
use openssl::x509::X509;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// SHA-1 over a certificate's DER: Batch's key identifier. Displayed as 40 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thumbprint(pub [u8; 20]);

impl Thumbprint {
    /// Parse 40 hex digits, any case.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        todo!("{s}")
    }
    /// SHA-1 of the certificate's DER.
    pub fn of_certificate(cert: &X509) -> Self {
        todo!("{cert:?}")
    }
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        todo!()
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({})", self.to_hex())
    }
}
impl FromStr for Thumbprint {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_hex(s)
    }
}

/// Load OpenSSL's `default` and `legacy` providers once for the process (idempotent, thread-safe).
/// Missing `legacy` is not fatal: legacy PFX files then fail with a clear `Malformed` error that
/// says the legacy provider is unavailable.
pub fn ensure_providers() {
    todo!()
}

/// Whom to seal for: a certificate's public key and thumbprint.
#[derive(Clone)]
pub struct Recipient {
    /// Certificate thumbprint (the key id written into tokens).
    pub thumbprint: Thumbprint,
    /// RSA public key, already checked against the key policy.
    pub public_key: PKey<Public>,
    /// The certificate.
    pub certificate: X509,
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.thumbprint)
    }
}

impl Recipient {
    /// From a certificate; applies the key policy (`path` is only for messages).
    pub fn from_certificate(cert: X509, path: &Path) -> Result<Self, KeyError> {
        todo!("{cert:?} {path:?}")
    }
    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        todo!()
    }
    /// Load a recipient from a file: certificate PEM or DER, or a PFX (needs `passphrase`).
    /// A bare public-key PEM has no thumbprint and is refused with a message saying to use the
    /// certificate (`.crt`) instead (only `--format shipyard` can use a bare key; see
    /// [`load_public_key`]).
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        todo!("{path:?} {:?}", passphrase.is_some())
    }
}

/// Load an RSA public key for the legacy format: a `BEGIN PUBLIC KEY` PEM, a certificate (PEM or
/// DER), or a PFX (needs `passphrase`). Applies the key policy.
pub fn load_public_key(path: &Path, passphrase: Option<&[u8]>) -> Result<PKey<Public>, KeyError> {
    todo!("{path:?} {:?}", passphrase.is_some())
}

/// An RSA private key with its certificate. `Debug` shows the thumbprint only.
pub struct KeyPair {
    thumbprint: Thumbprint,
    key: PKey<Private>,
    certificate: X509,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({})", self.thumbprint)
    }
}

impl KeyPair {
    /// Check policy (RSA 2048/3072/4096) and that `certificate` matches `key`.
    pub fn new(key: PKey<Private>, certificate: X509, path: &Path) -> Result<Self, KeyError> {
        todo!("{:?} {certificate:?} {path:?}", key.bits())
    }
    /// Generate a new RSA key and a self-signed certificate (`CN=<subject>` or a full
    /// `/CN=.../O=...` string), valid from now for `days`.
    pub fn generate(bits: u32, days: u32, subject: &str) -> Result<Self, KeyError> {
        todo!("{bits} {days} {subject}")
    }
    /// Parse a PKCS#12 file. Accepts both encodings, duplicate copies of the one certificate, and
    /// CA certificates in the chain; refuses none or several end-entity certificates.
    pub fn from_pkcs12(der: &[u8], passphrase: &[u8], path: &Path) -> Result<Self, KeyError> {
        todo!("{} {} {path:?}", der.len(), passphrase.len())
    }
    /// Parse a PEM private key (PKCS#1 `RSA PRIVATE KEY` or PKCS#8 `PRIVATE KEY`; encrypted
    /// PKCS#8 with `passphrase`). The certificate is taken from `cert_pem` if given, else from
    /// the same PEM (the first certificate whose key matches; a Key Vault file carries the chain).
    pub fn from_pem(
        key_pem: &[u8],
        cert_pem: Option<&[u8]>,
        passphrase: Option<&[u8]>,
        path: &Path,
    ) -> Result<Self, KeyError> {
        todo!("{} {:?} {:?} {path:?}", key_pem.len(), cert_pem.map(|c| c.len()), passphrase.is_some())
    }
    /// Load from a file, choosing by content: PKCS#12 (needs `passphrase`), or PEM key with the
    /// certificate in the same file or a sibling with the same stem and `.crt`, `.cer` or `.pem`.
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        todo!("{path:?} {:?}", passphrase.is_some())
    }
    /// Export as PKCS#12. `legacy` selects 3DES/SHA-1 MAC (for old Windows/Java consumers);
    /// otherwise AES-256-CBC/PBKDF2/SHA-256 MAC.
    pub fn to_pkcs12(&self, passphrase: &[u8], legacy: bool) -> Result<Vec<u8>, KeyError> {
        todo!("{} {legacy}", passphrase.len())
    }
    /// Certificate thumbprint.
    pub fn thumbprint(&self) -> Thumbprint {
        self.thumbprint
    }
    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        self.key.bits()
    }
    /// Modulus size in bytes (= RSA ciphertext length).
    pub fn modulus_len(&self) -> usize {
        (self.bits() as usize).div_ceil(8)
    }
    /// The certificate.
    pub fn certificate(&self) -> &X509 {
        &self.certificate
    }
    /// The certificate's notAfter as unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        todo!()
    }
    /// The public half, for sealing.
    pub fn recipient(&self) -> Recipient {
        todo!()
    }
    /// The private key (crate-internal use by the token and legacy modules).
    pub(crate) fn private_key(&self) -> &PKey<Private> {
        &self.key
    }
}
