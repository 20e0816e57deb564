//! Key and certificate loading, key policy (RSA 2048/3072/4096 only), thumbprints, generation and
//! PFX export.
//!
//! PKCS#12 files come in two encodings: OpenSSL 3's default (PBES2/PBKDF2/AES-256-CBC, SHA-256
//! MAC) and the legacy one (RC2-40 or 3DES, SHA-1 MAC) written by OpenSSL 1.x, Windows and Java.
//! OpenSSL 3 reads the latter only with its `legacy` provider loaded next to `default`;
//! [`ensure_providers`] does that once per process.

use crate::error::KeyError;
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::bn::{BigNum, MsbOption};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef, Private, Public};
use openssl::provider::Provider;
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectKeyIdentifier};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509Ref, X509};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;
use zeroize::Zeroizing;

/// SHA-1 over a certificate's DER: Batch's key identifier. Displayed as 40 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thumbprint(pub [u8; 20]);

impl Thumbprint {
    /// Parse 40 hex digits, any case.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let b = s.as_bytes();
        if b.len() != 40 {
            return Err(KeyError::BadThumbprint(s.to_owned()));
        }
        let mut out = [0u8; 20];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            match (hex_val(pair[0]), hex_val(pair[1])) {
                (Some(hi), Some(lo)) => out[i] = (hi << 4) | lo,
                _ => return Err(KeyError::BadThumbprint(s.to_owned())),
            }
        }
        Ok(Thumbprint(out))
    }
    /// SHA-1 of the certificate's DER.
    pub fn of_certificate(cert: &X509) -> Self {
        let der = cert.to_der().unwrap_or_default();
        let digest = openssl::sha::sha1(&der);
        Thumbprint(digest)
    }
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
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
    providers();
}

struct Providers {
    // Held (never dropped) so the providers stay loaded for the life of the process.
    _default: Option<Provider>,
    legacy: Option<Provider>,
}

fn providers() -> &'static Providers {
    static PROVIDERS: OnceLock<Providers> = OnceLock::new();
    PROVIDERS.get_or_init(|| {
        // `default` must be loaded explicitly: loading any provider disables the implicit
        // fallback to it.
        let default = Provider::try_load(None, "default", true).ok();
        let legacy = Provider::try_load(None, "legacy", true).ok();
        // try_load can leave errors queued even on success; they must not leak into later calls.
        let _ = ErrorStack::get();
        Providers {
            _default: default,
            legacy,
        }
    })
}

/// Whether OpenSSL's legacy provider (needed for RC2/3DES PFX files) could be loaded.
pub fn legacy_provider_available() -> bool {
    providers().legacy.is_some()
}

/// Apply the key policy: RSA with a 2048, 3072 or 4096-bit modulus. `path` is only for messages.
pub fn check_policy<T: HasPublic>(key: &PKeyRef<T>, path: &Path) -> Result<(), KeyError> {
    let kind = match key.id() {
        Id::RSA => match key.bits() {
            2048 | 3072 | 4096 => return Ok(()),
            bits => format!("RSA {bits}-bit key"),
        },
        Id::EC => {
            let curve = key
                .ec_key()
                .ok()
                .and_then(|ec| ec.group().curve_name())
                .and_then(|nid| nid.short_name().ok().map(str::to_owned))
                .unwrap_or_else(|| "unnamed curve".to_owned());
            format!("EC key ({curve})")
        }
        Id::DSA => format!("DSA {}-bit key", key.bits()),
        Id::ED25519 => "Ed25519 key".to_owned(),
        Id::ED448 => "Ed448 key".to_owned(),
        Id::X25519 => "X25519 key".to_owned(),
        Id::X448 => "X448 key".to_owned(),
        Id::DH => "DH key".to_owned(),
        Id::RSA_PSS => "RSA-PSS key (only plain RSA keys can decrypt)".to_owned(),
        other => format!("key type {}", other.as_raw()),
    };
    Err(KeyError::UnsupportedKey {
        path: path.to_owned(),
        kind,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })
}

fn malformed(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Malformed {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn crypto(during: &'static str) -> impl FnOnce(ErrorStack) -> KeyError {
    move |source| KeyError::Crypto { during, source }
}

/// One `-----BEGIN <label>-----` ... `-----END <label>-----` block of a PEM file.
struct PemBlock<'a> {
    label: &'a str,
    text: &'a [u8],
}

/// Split PEM text into blocks. Parsing each block on its own keeps an encrypted key or an
/// unknown block type from breaking certificate parsing (and vice versa).
fn pem_blocks(data: &[u8]) -> Vec<PemBlock<'_>> {
    let Ok(text) = std::str::from_utf8(data) else {
        // Private keys are ASCII; a non-UTF-8 file is not PEM.
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = 0;
    while let Some(b) = text[rest..].find("-----BEGIN ") {
        let begin = rest + b;
        let label_start = begin + "-----BEGIN ".len();
        let Some(l) = text[label_start..].find("-----") else {
            break;
        };
        let label = &text[label_start..label_start + l];
        let end_marker = format!("-----END {label}-----");
        let Some(e) = text[label_start..].find(&end_marker) else {
            break;
        };
        let end = label_start + e + end_marker.len();
        out.push(PemBlock {
            label,
            text: &data[begin..end],
        });
        rest = end;
    }
    out
}

fn is_pem(data: &[u8]) -> bool {
    data.windows(11).any(|w| w == b"-----BEGIN ")
}

fn is_private_key_label(label: &str) -> bool {
    label.ends_with("PRIVATE KEY")
}

fn is_cert_label(label: &str) -> bool {
    matches!(
        label,
        "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE"
    )
}

/// Every certificate in a PEM or DER certificate file.
fn certs_from(data: &[u8], path: &Path) -> Result<Vec<X509>, KeyError> {
    if is_pem(data) {
        pem_blocks(data)
            .iter()
            .filter(|b| is_cert_label(b.label))
            .map(|b| {
                X509::from_pem(b.text)
                    .map_err(|e| malformed(path, format!("unreadable certificate PEM block: {e}")))
            })
            .collect()
    } else {
        Ok(X509::from_der(data).map(|c| vec![c]).unwrap_or_default())
    }
}

fn passphrase_str<'a>(passphrase: &'a [u8], path: &Path) -> Result<&'a str, KeyError> {
    // OpenSSL takes the passphrase as a C string; UTF-8 is what every PFX writer uses.
    match std::str::from_utf8(passphrase) {
        Ok(s) if !s.contains('\0') => Ok(s),
        _ => Err(malformed(
            path,
            "the passphrase is not UTF-8 text without NUL bytes",
        )),
    }
}

fn looks_like_pkcs12(data: &[u8]) -> bool {
    // A DER SEQUENCE whose parse as PKCS#12 succeeds; cheap to try.
    data.first() == Some(&0x30) && Pkcs12::from_der(data).is_ok()
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
        let public_key = cert
            .public_key()
            .map_err(|e| malformed(path, format!("certificate public key unreadable: {e}")))?;
        check_policy(&public_key, path)?;
        Ok(Recipient {
            thumbprint: Thumbprint::of_certificate(&cert),
            public_key,
            certificate: cert,
        })
    }
    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        self.public_key.bits()
    }
    /// Load a recipient from a file: certificate PEM or DER, or a PFX (needs `passphrase`).
    /// A bare public-key PEM has no thumbprint and is refused with a message saying to use the
    /// certificate (`.crt`) instead (only `--format shipyard` can use a bare key; see
    /// [`load_public_key`]).
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        let data = read_file(path)?;
        if is_pem(&data) {
            let blocks = pem_blocks(&data);
            if blocks.iter().any(|b| is_private_key_label(b.label)) {
                // A key + chain file (Key Vault style): the certificate matching the key is ours.
                return Ok(KeyPair::from_pem(&data, None, passphrase, path)?.recipient());
            }
            let mut certs = certs_from(&data, path)?;
            dedup_certs(&mut certs);
            return match certs.len() {
                1 => Recipient::from_certificate(certs.remove(0), path),
                0 if blocks.iter().any(|b| b.label.ends_with("PUBLIC KEY")) => Err(malformed(
                    path,
                    "a bare public key has no certificate thumbprint to seal for; use the \
                     certificate (.crt) instead (only --format shipyard accepts a public key)",
                )),
                0 => Err(KeyError::NoCertificate {
                    path: path.to_owned(),
                }),
                count => Err(KeyError::MultipleCertificates {
                    path: path.to_owned(),
                    count,
                }),
            };
        }
        if let Ok(cert) = X509::from_der(&data) {
            return Recipient::from_certificate(cert, path);
        }
        if looks_like_pkcs12(&data) {
            let pass = passphrase.ok_or_else(|| KeyError::PassphraseRequired {
                path: path.to_owned(),
            })?;
            return Ok(KeyPair::from_pkcs12(&data, pass, path)?.recipient());
        }
        Err(malformed(
            path,
            "not a certificate (PEM or DER) nor a PKCS#12 (.pfx) file",
        ))
    }
}

fn dedup_certs(certs: &mut Vec<X509>) {
    let mut seen = Vec::new();
    certs.retain(|c| {
        let t = Thumbprint::of_certificate(c);
        if seen.contains(&t) {
            false
        } else {
            seen.push(t);
            true
        }
    });
}

/// Load an RSA public key for the legacy format: a `BEGIN PUBLIC KEY` PEM, a certificate (PEM or
/// DER), or a PFX (needs `passphrase`). Applies the key policy.
pub fn load_public_key(path: &Path, passphrase: Option<&[u8]>) -> Result<PKey<Public>, KeyError> {
    let data = read_file(path)?;
    if is_pem(&data) {
        let blocks = pem_blocks(&data);
        let has_cert_or_key = blocks
            .iter()
            .any(|b| is_cert_label(b.label) || is_private_key_label(b.label));
        if !has_cert_or_key {
            if let Some(b) = blocks.iter().find(|b| b.label == "PUBLIC KEY") {
                let key = PKey::public_key_from_pem(b.text)
                    .map_err(|e| malformed(path, format!("unreadable public key: {e}")))?;
                check_policy(&key, path)?;
                return Ok(key);
            }
            if let Some(b) = blocks.iter().find(|b| b.label == "RSA PUBLIC KEY") {
                let rsa = Rsa::public_key_from_pem_pkcs1(b.text)
                    .map_err(|e| malformed(path, format!("unreadable RSA public key: {e}")))?;
                let key = PKey::from_rsa(rsa).map_err(crypto("loading an RSA public key"))?;
                check_policy(&key, path)?;
                return Ok(key);
            }
        }
    }
    Ok(Recipient::load(path, passphrase)?.public_key)
}

/// An RSA private key with its certificate. `Debug` shows the thumbprint only.
pub struct KeyPair {
    thumbprint: Thumbprint,
    key: PKey<Private>,
    public_key: PKey<Public>,
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
        check_policy(&key, path)?;
        let thumbprint = Thumbprint::of_certificate(&certificate);
        let public_key = match certificate.public_key() {
            Ok(p) if p.public_eq(&key) => p,
            _ => {
                return Err(KeyError::CertificateMismatch {
                    path: path.to_owned(),
                    thumbprint,
                })
            }
        };
        Ok(KeyPair {
            thumbprint,
            key,
            public_key,
            certificate,
        })
    }

    /// Generate a new RSA key and a self-signed certificate (`CN=<subject>` or a full
    /// `/CN=.../O=...` string), valid from now for `days`.
    pub fn generate(bits: u32, days: u32, subject: &str) -> Result<Self, KeyError> {
        let here = Path::new("(new key)");
        if !matches!(bits, 2048 | 3072 | 4096) {
            return Err(KeyError::UnsupportedKey {
                path: here.to_owned(),
                kind: format!("RSA {bits}-bit key"),
            });
        }
        let rsa = Rsa::generate(bits).map_err(crypto("generating an RSA key"))?;
        let key = PKey::from_rsa(rsa).map_err(crypto("generating an RSA key"))?;
        let name = build_name(subject)?;
        let c = crypto("building the certificate");
        let mut b = X509Builder::new().map_err(crypto("building the certificate"))?;
        let mut serial = BigNum::new().map_err(crypto("building the certificate"))?;
        serial
            .rand(127, MsbOption::MAYBE_ZERO, false)
            .map_err(crypto("building the certificate"))?;
        let serial = serial
            .to_asn1_integer()
            .map_err(crypto("building the certificate"))?;
        let not_before = Asn1Time::days_from_now(0).map_err(crypto("building the certificate"))?;
        let not_after =
            Asn1Time::days_from_now(days).map_err(crypto("building the certificate"))?;
        let built = (|| {
            b.set_version(2)?;
            b.set_serial_number(&serial)?;
            b.set_subject_name(&name)?;
            b.set_issuer_name(&name)?;
            b.set_pubkey(&key)?;
            b.set_not_before(&not_before)?;
            b.set_not_after(&not_after)?;
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_encipherment()
                    .data_encipherment()
                    .build()?,
            )?;
            let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
            b.append_extension(ski)?;
            b.sign(&key, MessageDigest::sha256())?;
            Ok(b.build())
        })();
        let certificate = built.map_err(c)?;
        KeyPair::new(key, certificate, here)
    }

    /// Parse a PKCS#12 file. Accepts both encodings, duplicate copies of the one certificate, and
    /// CA certificates in the chain; refuses none or several end-entity certificates.
    pub fn from_pkcs12(der: &[u8], passphrase: &[u8], path: &Path) -> Result<Self, KeyError> {
        ensure_providers();
        let pass = passphrase_str(passphrase, path)?;
        let p12 = Pkcs12::from_der(der)
            .map_err(|_| malformed(path, "not a PKCS#12 (.pfx) file (DER parse failed)"))?;
        let parsed = p12.parse2(pass).map_err(|e| pkcs12_error(e, path))?;
        let key = parsed.pkey.ok_or_else(|| KeyError::NoPrivateKey {
            path: path.to_owned(),
        })?;
        check_policy(&key, path)?;
        let mut certs: Vec<X509> = parsed.cert.into_iter().collect();
        if let Some(ca) = parsed.ca {
            certs.extend(ca);
        }
        let certificate = pick_certificate(certs, &key, path)?;
        KeyPair::new(key, certificate, path)
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
        let blocks = pem_blocks(key_pem);
        let mut key_blocks = blocks.iter().filter(|b| is_private_key_label(b.label));
        let block = key_blocks.next().ok_or_else(|| KeyError::NoPrivateKey {
            path: path.to_owned(),
        })?;
        if key_blocks.next().is_some() {
            return Err(malformed(
                path,
                "several private keys in one file; put one key per file",
            ));
        }
        let encrypted = block.label == "ENCRYPTED PRIVATE KEY"
            || block.text.windows(9).any(|w| w == b"ENCRYPTED");
        let key = match (encrypted, passphrase) {
            (true, None) => {
                return Err(KeyError::PassphraseRequired {
                    path: path.to_owned(),
                })
            }
            (true, Some(p)) => {
                PKey::private_key_from_pem_passphrase(block.text, p).map_err(|_| {
                    KeyError::WrongPassphrase {
                        path: path.to_owned(),
                    }
                })?
            }
            // The callback refuses to prompt: OpenSSL's default would read the terminal.
            (false, _) => PKey::private_key_from_pem_callback(block.text, |_| Ok(0))
                .map_err(|e| malformed(path, format!("unreadable private key: {e}")))?,
        };
        check_policy(&key, path)?;
        let certs = certs_from(cert_pem.unwrap_or(key_pem), path)?;
        let certificate = pick_certificate(certs, &key, path)?;
        KeyPair::new(key, certificate, path)
    }

    /// Load from a file, choosing by content: PKCS#12 (needs `passphrase`), or PEM key with the
    /// certificate in the same file or a sibling with the same stem and `.crt`, `.cer` or `.pem`.
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, KeyError> {
        let data = Zeroizing::new(read_file(path)?);
        let pair = if is_pem(&data) {
            let has_cert = pem_blocks(&data).iter().any(|b| is_cert_label(b.label));
            if has_cert {
                KeyPair::from_pem(&data, None, passphrase, path)?
            } else {
                let sibling = ["crt", "cer", "pem"]
                    .iter()
                    .map(|ext| path.with_extension(ext))
                    .find(|p| p != path && p.is_file())
                    .ok_or_else(|| KeyError::NoCertificate {
                        path: path.to_owned(),
                    })?;
                let cert_data = read_file(&sibling)?;
                let certs = certs_from(&cert_data, &sibling)?;
                if certs.is_empty() {
                    return Err(KeyError::NoCertificate { path: sibling });
                }
                // Re-encode DER certificates as PEM so from_pem sees one format.
                let mut pem = Vec::new();
                for c in &certs {
                    pem.extend(c.to_pem().map_err(crypto("re-encoding a certificate"))?);
                }
                KeyPair::from_pem(&data, Some(&pem), passphrase, path)?
            }
        } else if looks_like_pkcs12(&data) {
            let pass = passphrase.ok_or_else(|| KeyError::PassphraseRequired {
                path: path.to_owned(),
            })?;
            KeyPair::from_pkcs12(&data, pass, path)?
        } else {
            return Err(malformed(
                path,
                "not a PKCS#12 (.pfx) file nor a PEM private key",
            ));
        };
        if let Some(expected) = thumbprint_from_file_name(path) {
            if expected != pair.thumbprint {
                return Err(KeyError::ThumbprintMismatch {
                    path: path.to_owned(),
                    expected,
                    actual: pair.thumbprint,
                });
            }
        }
        Ok(pair)
    }

    /// Export as PKCS#12. `legacy` selects 3DES/SHA-1 MAC (for old Windows/Java consumers);
    /// otherwise AES-256-CBC/PBKDF2/SHA-256 MAC.
    pub fn to_pkcs12(&self, passphrase: &[u8], legacy: bool) -> Result<Vec<u8>, KeyError> {
        ensure_providers();
        let pass = passphrase_str(passphrase, Path::new("(new PFX)"))?;
        let mut b = Pkcs12::builder();
        b.pkey(&self.key).cert(&self.certificate);
        if legacy {
            b.key_algorithm(Nid::PBE_WITHSHA1AND3_KEY_TRIPLEDES_CBC)
                .cert_algorithm(Nid::PBE_WITHSHA1AND3_KEY_TRIPLEDES_CBC)
                .mac_md(MessageDigest::sha1());
        } else {
            b.key_algorithm(Nid::AES_256_CBC)
                .cert_algorithm(Nid::AES_256_CBC)
                .mac_md(MessageDigest::sha256());
        }
        let p12 = b.build2(pass).map_err(crypto("building the PFX"))?;
        p12.to_der().map_err(crypto("encoding the PFX"))
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
        asn1_to_unix(self.certificate.not_after()).unwrap_or(0)
    }
    /// The public half, for sealing.
    pub fn recipient(&self) -> Recipient {
        Recipient {
            thumbprint: self.thumbprint,
            public_key: self.public_key.clone(),
            certificate: self.certificate.clone(),
        }
    }
    /// The private key (crate-internal use by the token and legacy modules).
    pub(crate) fn private_key(&self) -> &PKey<Private> {
        &self.key
    }
    /// The private key as unencrypted PKCS#8 PEM, in wiped memory (for tests and tools that
    /// must hand the key to another program; never write it to disk unencrypted).
    pub fn private_key_pkcs8_pem(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.key
            .private_key_to_pem_pkcs8()
            .map(Zeroizing::new)
            .map_err(crypto("encoding the private key"))
    }
}

/// Seconds since the epoch of an ASN.1 time.
pub fn asn1_to_unix(t: &Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

fn cert_matches(cert: &X509Ref, key: &PKeyRef<Private>) -> bool {
    cert.public_key().map(|p| p.public_eq(key)).unwrap_or(false)
}

/// Of the certificates found next to a key, the end-entity certificate is the one whose public
/// key is the key's; the others are taken as its chain.
fn pick_certificate(
    certs: Vec<X509>,
    key: &PKeyRef<Private>,
    path: &Path,
) -> Result<X509, KeyError> {
    let first_thumbprint = certs.first().map(Thumbprint::of_certificate);
    let mut matching: Vec<X509> = certs.into_iter().filter(|c| cert_matches(c, key)).collect();
    dedup_certs(&mut matching);
    match (matching.len(), first_thumbprint) {
        (1, _) => Ok(matching.remove(0)),
        (0, Some(thumbprint)) => Err(KeyError::CertificateMismatch {
            path: path.to_owned(),
            thumbprint,
        }),
        (0, None) => Err(KeyError::NoCertificate {
            path: path.to_owned(),
        }),
        (count, _) => Err(KeyError::MultipleCertificates {
            path: path.to_owned(),
            count,
        }),
    }
}

fn pkcs12_error(e: ErrorStack, path: &Path) -> KeyError {
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("mac verify failure") || text.contains("mac_verify_failure") {
        return KeyError::WrongPassphrase {
            path: path.to_owned(),
        };
    }
    if !legacy_provider_available()
        && (text.contains("unsupported") || text.contains("rc2") || text.contains("des"))
    {
        return malformed(
            path,
            "the PFX uses legacy encryption (RC2/3DES) and OpenSSL's legacy provider could not \
             be loaded; install it (legacy.so under OpenSSL's modules directory) or re-export \
             the PFX with AES-256",
        );
    }
    malformed(path, format!("cannot decrypt PKCS#12 contents: {e}"))
}

/// `sha1-<thumbprint>.pfx` (Batch) or `<THUMBPRINT>.prv` (waagent): the thumbprint in the name.
fn thumbprint_from_file_name(path: &Path) -> Option<Thumbprint> {
    let stem = path.file_stem()?.to_str()?;
    let hex = stem.strip_prefix("sha1-").unwrap_or(stem);
    Thumbprint::from_hex(hex).ok()
}

fn build_name(subject: &str) -> Result<X509Name, KeyError> {
    let bad = |reason: String| KeyError::Malformed {
        path: "(subject)".into(),
        reason,
    };
    let mut b = X509NameBuilder::new().map_err(crypto("building the subject"))?;
    if let Some(rest) = subject.strip_prefix('/') {
        for part in rest.split('/').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("subject component {part:?} is not KEY=VALUE")))?;
            b.append_entry_by_text(k, v)
                .map_err(|e| bad(format!("subject component {part:?}: {e}")))?;
        }
    } else {
        if subject.is_empty() {
            return Err(bad("empty subject".to_owned()));
        }
        b.append_entry_by_text("CN", subject)
            .map_err(|e| bad(format!("subject {subject:?}: {e}")))?;
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{key_a, key_b, vector_key_path};
    use openssl::dsa::Dsa;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::stack::Stack;

    fn self_signed<T: HasPrivate>(key: &PKeyRef<T>, cn: &str, md: MessageDigest) -> X509 {
        let mut b = X509Builder::new().unwrap();
        let name = build_name(cn).unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(key, md).unwrap();
        b.build()
    }
    use openssl::pkey::HasPrivate;

    fn kind_of(e: KeyError) -> String {
        match e {
            KeyError::UnsupportedKey { kind, path } => {
                assert_eq!(path, Path::new("k.pem"));
                kind
            }
            other => panic!("expected UnsupportedKey, got {other}"),
        }
    }

    #[test]
    fn thumbprints() {
        let t = key_a().thumbprint();
        let hex = t.to_hex();
        assert_eq!(hex.len(), 40);
        assert_eq!(hex, hex.to_ascii_lowercase());
        assert_eq!(t.to_string(), hex);
        assert_eq!(Thumbprint::from_hex(&hex.to_ascii_uppercase()).unwrap(), t);
        assert_eq!(hex.parse::<Thumbprint>().unwrap(), t);
        let der_sha1 = openssl::sha::sha1(&key_a().certificate().to_der().unwrap());
        assert_eq!(t.0, der_sha1);
        for bad in [
            "",
            "abc",
            &hex[..39],
            &format!("{hex}0"),
            &hex.replacen(|_| true, "g", 1),
        ] {
            assert!(
                matches!(Thumbprint::from_hex(bad), Err(KeyError::BadThumbprint(_))),
                "{bad}"
            );
        }
        // The committed vector key's thumbprint, computed independently with `openssl x509
        // -fingerprint -sha1` when the key was made.
        let v = KeyPair::load(&vector_key_path(), None).unwrap();
        assert_eq!(
            v.thumbprint().to_hex(),
            "d9ee3738e54d05556d5af1dbd77be60825737330"
        );
    }

    #[test]
    fn unsupported_key_types_are_named() {
        let p = Path::new("k.pem");
        let ec = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let dsa = PKey::from_dsa(Dsa::generate(1024).unwrap()).unwrap();
        let ed = PKey::generate_ed25519().unwrap();
        let rsa1024 = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
        let cases = [
            (ec, "EC key (prime256v1)", MessageDigest::sha256()),
            (dsa, "DSA 1024-bit key", MessageDigest::sha256()),
            (ed, "Ed25519 key", MessageDigest::null()),
            (rsa1024, "RSA 1024-bit key", MessageDigest::sha256()),
        ];
        for (key, want, md) in cases {
            let cert = self_signed(&key, "x", md);
            assert_eq!(
                kind_of(KeyPair::new(key.clone(), cert.clone(), p).unwrap_err()),
                want
            );
            assert_eq!(
                kind_of(Recipient::from_certificate(cert.clone(), p).unwrap_err()),
                want
            );
            // Through a PFX too.
            let pfx = Pkcs12::builder()
                .pkey(&key)
                .cert(&cert)
                .build2("pw")
                .unwrap();
            assert_eq!(
                kind_of(KeyPair::from_pkcs12(&pfx.to_der().unwrap(), b"pw", p).unwrap_err()),
                want
            );
        }
        assert!(matches!(
            KeyPair::generate(1024, 1, "x"),
            Err(KeyError::UnsupportedKey { ref kind, .. }) if kind == "RSA 1024-bit key"
        ));
        let msg = KeyError::UnsupportedKey {
            path: p.into(),
            kind: "EC key (prime256v1)".into(),
        };
        assert!(msg.to_string().contains("k.pem"));
    }

    #[test]
    fn pkcs12_both_encodings_round_trip() {
        let k = key_a();
        for legacy in [false, true] {
            let der = k.to_pkcs12(b"correct horse", legacy).unwrap();
            let back = KeyPair::from_pkcs12(&der, b"correct horse", Path::new("a.pfx")).unwrap();
            assert_eq!(back.thumbprint(), k.thumbprint());
            assert!(back.private_key().public_eq(k.private_key()));
            match KeyPair::from_pkcs12(&der, b"wrong", Path::new("a.pfx")) {
                Err(KeyError::WrongPassphrase { path }) => assert_eq!(path, Path::new("a.pfx")),
                other => panic!("legacy={legacy}: {:?}", other.map(|k| k.thumbprint())),
            }
        }
        let generated = KeyPair::generate(2048, 10, "/CN=gen/O=nodeseal").unwrap();
        let days = (generated.not_after_unix()
            - std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64)
            / 86_400;
        assert!((9..=10).contains(&days), "{days}");
        assert_eq!(generated.bits(), 2048);
        assert_eq!(generated.modulus_len(), 256);
    }

    #[test]
    fn pkcs12_certificate_selection() {
        let k = key_a();
        let p = Path::new("x.pfx");
        let key = k.private_key();
        let build = |cert: Option<&X509>, ca: &[&X509]| {
            let mut b = Pkcs12::builder();
            b.pkey(key);
            if let Some(c) = cert {
                b.cert(c);
            }
            if !ca.is_empty() {
                let mut s = Stack::new().unwrap();
                for c in ca {
                    s.push((*c).clone()).unwrap();
                }
                b.ca(s);
            }
            b.build2("pw").unwrap().to_der().unwrap()
        };
        let own = k.certificate();
        let other_ca = key_b().certificate();
        // The same certificate twice, and an unrelated (CA) certificate: fine.
        let ok = KeyPair::from_pkcs12(&build(Some(own), &[own, other_ca]), b"pw", p).unwrap();
        assert_eq!(ok.thumbprint(), k.thumbprint());
        // Two different certificates for the key: ambiguous.
        let second = self_signed(
            key,
            "/CN=another cert for the same key",
            MessageDigest::sha256(),
        );
        assert!(matches!(
            KeyPair::from_pkcs12(&build(Some(own), &[&second]), b"pw", p),
            Err(KeyError::MultipleCertificates { count: 2, .. })
        ));
        // No certificate at all.
        assert!(matches!(
            KeyPair::from_pkcs12(&build(None, &[]), b"pw", p),
            Err(KeyError::NoCertificate { .. })
        ));
        // Only somebody else's certificate.
        match KeyPair::from_pkcs12(&build(None, &[other_ca]), b"pw", p) {
            Err(KeyError::CertificateMismatch { thumbprint, .. }) => {
                assert_eq!(thumbprint, key_b().thumbprint())
            }
            other => panic!("{:?}", other.map(|k| k.thumbprint())),
        }
        assert!(matches!(
            KeyPair::new(key_a().private_key().clone(), other_ca.clone(), p),
            Err(KeyError::CertificateMismatch { .. })
        ));
        assert!(matches!(
            KeyPair::from_pkcs12(b"not a pfx", b"pw", p),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn files_pem_sibling_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_a();
        let key_pem = k.private_key_pkcs8_pem().unwrap();
        let cert_pem = k.certificate().to_pem().unwrap();
        // Key with a sibling .crt (waagent layout, thumbprint uppercase in the name).
        let stem = k.thumbprint().to_hex().to_ascii_uppercase();
        let prv = dir.path().join(format!("{stem}.prv"));
        std::fs::write(&prv, &key_pem[..]).unwrap();
        assert!(matches!(
            KeyPair::load(&prv, None),
            Err(KeyError::NoCertificate { .. })
        ));
        std::fs::write(prv.with_extension("crt"), &cert_pem).unwrap();
        assert_eq!(
            KeyPair::load(&prv, None).unwrap().thumbprint(),
            k.thumbprint()
        );
        // A Batch-style name that lies about the thumbprint.
        let liar = dir
            .path()
            .join(format!("sha1-{}.pfx", key_b().thumbprint()));
        std::fs::write(&liar, k.to_pkcs12(b"pw", false).unwrap()).unwrap();
        assert!(matches!(
            KeyPair::load(&liar, Some(b"pw")),
            Err(KeyError::ThumbprintMismatch { .. })
        ));
        assert!(matches!(
            KeyPair::load(&liar, None),
            Err(KeyError::PassphraseRequired { .. })
        ));
        // Recipients from PEM, DER, PFX; bare public key refused for v1 but fine for Shipyard.
        let crt = dir.path().join("c.crt");
        std::fs::write(&crt, &cert_pem).unwrap();
        let der = dir.path().join("c.cer");
        std::fs::write(&der, k.certificate().to_der().unwrap()).unwrap();
        for f in [&crt, &der] {
            assert_eq!(Recipient::load(f, None).unwrap().thumbprint, k.thumbprint());
        }
        assert_eq!(
            Recipient::load(&liar, Some(b"pw")).unwrap().thumbprint,
            k.thumbprint()
        );
        let pubpem = dir.path().join("p.pem");
        std::fs::write(&pubpem, k.private_key().public_key_to_pem().unwrap()).unwrap();
        assert!(matches!(
            Recipient::load(&pubpem, None),
            Err(KeyError::Malformed { .. })
        ));
        assert!(load_public_key(&pubpem, None)
            .unwrap()
            .public_eq(k.private_key()));
        assert!(load_public_key(&crt, None)
            .unwrap()
            .public_eq(k.private_key()));
        assert!(matches!(
            Recipient::load(&dir.path().join("missing"), None),
            Err(KeyError::Io { .. })
        ));
        // Encrypted PKCS#8 PEM with its certificate in the same file.
        let enc = k
            .private_key()
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"pp")
            .unwrap();
        let both = [&enc[..], &cert_pem[..]].concat();
        let kv = dir.path().join("kv.pem");
        std::fs::write(&kv, &both).unwrap();
        assert!(matches!(
            KeyPair::load(&kv, None),
            Err(KeyError::PassphraseRequired { .. })
        ));
        assert!(matches!(
            KeyPair::load(&kv, Some(b"no")),
            Err(KeyError::WrongPassphrase { .. })
        ));
        assert_eq!(
            KeyPair::load(&kv, Some(b"pp")).unwrap().thumbprint(),
            k.thumbprint()
        );
    }
}
