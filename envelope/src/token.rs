//! Token format v1 (see `docs/format.md`), plus format detection and inspection for both formats.

use crate::audience::{self, Selector};
use crate::error::TokenError;
use crate::keys::{KeyPair, Recipient, Thumbprint};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::hash::MessageDigest;
use openssl::rand::rand_bytes;
use openssl::rsa::Padding;
use openssl::symm::{Cipher, Crypter, Mode};
use std::time::SystemTime;
use zeroize::Zeroizing;

/// Every v1 token starts with this.
pub const V1_PREFIX: &str = "nodeseal.v1.";
/// Largest value a v1 token holds.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most recipients in one token.
pub const MAX_RECIPIENTS: usize = 16;

/// Which format a string is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// `nodeseal.v1.` token.
    V1,
    /// Batch Shipyard: base64 of raw RSA PKCS#1 v1.5.
    Shipyard,
}

/// Options for [`seal`].
#[derive(Clone, Debug, Default)]
pub struct SealOptions {
    /// Variable name the value is bound to (`[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes).
    pub name: Option<String>,
    /// Unix seconds after which the token must not be opened.
    pub not_after: Option<u64>,
    /// Who on the node may open it (see [`crate::audience`]); empty = anyone the agent's other
    /// rules allow. Put in canonical order (and deduplicated) when sealing.
    pub audience: Vec<Selector>,
}

/// What can be learnt from a token without a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Which format.
    pub format: Format,
    /// Key ids (v1 only; empty for Shipyard, which carries none).
    pub recipients: Vec<Thumbprint>,
    /// Bound name (v1 only).
    pub name: Option<String>,
    /// Unix seconds (v1 only).
    pub not_after: Option<u64>,
    /// Audience in canonical order (v1 only; empty = unbound).
    pub audience: Vec<Selector>,
    /// Length of the token string.
    pub token_len: usize,
    /// Length of the encrypted value in bytes (v1: AES-GCM ciphertext without tag = value length;
    /// Shipyard: RSA ciphertext length = modulus size).
    pub ciphertext_len: usize,
}

/// A successfully opened token.
pub struct Opened {
    /// Cleartext value, wiped on drop.
    pub value: Zeroizing<Vec<u8>>,
    /// The key that opened it.
    pub key: Thumbprint,
    /// Bound name, if any.
    pub name: Option<String>,
    /// Expiry, if any.
    pub not_after: Option<u64>,
    /// Audience in canonical order (empty = unbound); the caller's `audience_ok` accepted it.
    pub audience: Vec<Selector>,
}

/// Length of the AES-256-GCM content key.
pub const CONTENT_KEY_BYTES: usize = 32;
/// Length of the AES-GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Length of the AES-GCM tag.
pub const TAG_BYTES: usize = 16;
const VERSION: u8 = 1;
const FLAG_NAME: u8 = 0b001;
const FLAG_NOT_AFTER: u8 = 0b010;
const FLAG_AUDIENCE: u8 = 0b100;

/// Whether `name` is a valid variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
pub fn is_valid_name(name: &str) -> bool {
    crate::envfile::is_valid_name(name) && name.len() <= 255
}

/// Seal `value` for every recipient. Fresh content key and nonce each call.
pub fn seal(
    value: &[u8],
    recipients: &[Recipient],
    opts: &SealOptions,
) -> Result<String, TokenError> {
    let recipients = dedup_recipients(recipients);
    validate(value, recipients.len(), opts)?;
    let mut content_key = Zeroizing::new([0u8; CONTENT_KEY_BYTES]);
    rand_bytes(&mut content_key[..]).map_err(crypto("generating a content key"))?;
    let mut nonce = [0u8; NONCE_BYTES];
    rand_bytes(&mut nonce).map_err(crypto("generating a nonce"))?;
    let mut wrapped = Vec::with_capacity(recipients.len());
    for r in &recipients {
        wrapped.push((r.thumbprint, wrap_key(&content_key[..], r)?));
    }
    seal_with(value, &content_key, &nonce, &wrapped, opts)
}

fn dedup_recipients(recipients: &[Recipient]) -> Vec<&Recipient> {
    let mut out: Vec<&Recipient> = Vec::with_capacity(recipients.len());
    for r in recipients {
        if !out.iter().any(|o| o.thumbprint == r.thumbprint) {
            out.push(r);
        }
    }
    out
}

fn validate(value: &[u8], recipients: usize, opts: &SealOptions) -> Result<(), TokenError> {
    if recipients == 0 {
        return Err(TokenError::Invalid(
            "no recipients: give at least one certificate to seal for".to_owned(),
        ));
    }
    if recipients > MAX_RECIPIENTS {
        return Err(TokenError::Invalid(format!(
            "{recipients} recipients; a token holds at most {MAX_RECIPIENTS}"
        )));
    }
    if let Some(name) = &opts.name {
        if !is_valid_name(name) {
            return Err(TokenError::Invalid(format!(
                "invalid variable name {name:?}: expected letters, digits and '_', not starting \
                 with a digit, at most 255 bytes"
            )));
        }
    }
    if !opts.audience.is_empty() {
        audience::canonicalize(&opts.audience)?;
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(TokenError::TooLarge {
            len: value.len(),
            max: MAX_VALUE_BYTES,
            format: "v1".to_owned(),
        });
    }
    Ok(())
}

/// RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) of the content key for one recipient.
fn wrap_key(content_key: &[u8], r: &Recipient) -> Result<Vec<u8>, TokenError> {
    let mut enc = Encrypter::new(&r.public_key).map_err(crypto("wrapping the content key"))?;
    let setup = (|| {
        enc.set_rsa_padding(Padding::PKCS1_OAEP)?;
        enc.set_rsa_oaep_md(MessageDigest::sha256())?;
        enc.set_rsa_mgf1_md(MessageDigest::sha256())
    })();
    setup.map_err(crypto("wrapping the content key"))?;
    let len = enc
        .encrypt_len(content_key)
        .map_err(crypto("wrapping the content key"))?;
    let mut out = vec![0u8; len];
    let n = enc
        .encrypt(content_key, &mut out)
        .map_err(crypto("wrapping the content key"))?;
    out.truncate(n);
    Ok(out)
}

/// Unwrap a content key with `key`; `None` on any failure (wrong key or modified bytes alike).
fn unwrap_key(wrapped: &[u8], key: &KeyPair) -> Option<Zeroizing<Vec<u8>>> {
    if wrapped.len() != key.modulus_len() {
        return None;
    }
    let mut dec = Decrypter::new(key.private_key()).ok()?;
    dec.set_rsa_padding(Padding::PKCS1_OAEP).ok()?;
    dec.set_rsa_oaep_md(MessageDigest::sha256()).ok()?;
    dec.set_rsa_mgf1_md(MessageDigest::sha256()).ok()?;
    let len = dec.decrypt_len(wrapped).ok()?;
    let mut out = Zeroizing::new(vec![0u8; len]);
    let result = dec.decrypt(wrapped, &mut out);
    // A failed decrypt queues OpenSSL errors that would otherwise surface in unrelated calls.
    let _ = openssl::error::ErrorStack::get();
    let n = result.ok()?;
    out.truncate(n);
    (n == CONTENT_KEY_BYTES).then_some(out)
}

/// Deterministic sealing from a given content key, nonce and already-wrapped keys. For test
/// vectors and tests only: reusing a (key, nonce) pair destroys AES-GCM's security.
#[doc(hidden)]
pub fn seal_with(
    value: &[u8],
    content_key: &[u8; CONTENT_KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    wrapped: &[(Thumbprint, Vec<u8>)],
    opts: &SealOptions,
) -> Result<String, TokenError> {
    validate(value, wrapped.len(), opts)?;
    if let Some((i, (id, _))) = wrapped
        .iter()
        .enumerate()
        .find(|(i, (id, _))| wrapped[..*i].iter().any(|(o, _)| o == id))
    {
        return Err(TokenError::Invalid(format!(
            "recipient {} repeats key id {id}",
            i + 1
        )));
    }
    let mut body = Vec::with_capacity(64 + value.len() + wrapped.len() * 536);
    body.push(VERSION);
    let mut flags = 0;
    if opts.name.is_some() {
        flags |= FLAG_NAME;
    }
    if opts.not_after.is_some() {
        flags |= FLAG_NOT_AFTER;
    }
    if !opts.audience.is_empty() {
        flags |= FLAG_AUDIENCE;
    }
    body.push(flags);
    if let Some(name) = &opts.name {
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
    }
    if let Some(t) = opts.not_after {
        body.extend_from_slice(&t.to_be_bytes());
    }
    if !opts.audience.is_empty() {
        body.extend_from_slice(&audience::encode(&audience::canonicalize(&opts.audience)?)?);
    }
    body.extend_from_slice(nonce);
    body.push(wrapped.len() as u8);
    for (id, w) in wrapped {
        let len = u16::try_from(w.len()).map_err(|_| {
            TokenError::Invalid(format!("wrapped key for {id} is {} bytes", w.len()))
        })?;
        body.extend_from_slice(&id.0);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(w);
    }
    body.extend_from_slice(&(value.len() as u32).to_be_bytes());
    let aad_len = body.len();
    let mut crypter = Crypter::new(
        Cipher::aes_256_gcm(),
        Mode::Encrypt,
        content_key,
        Some(nonce),
    )
    .map_err(crypto("encrypting the value"))?;
    let sealed = (|| {
        crypter.aad_update(&body[..aad_len])?;
        let mut out = vec![0u8; value.len() + 16];
        let mut n = crypter.update(value, &mut out)?;
        n += crypter.finalize(&mut out[n..])?;
        out.truncate(n);
        let mut tag = [0u8; TAG_BYTES];
        crypter.get_tag(&mut tag)?;
        Ok((out, tag))
    })();
    let (ct, tag) = sealed.map_err(crypto("encrypting the value"))?;
    body.extend_from_slice(&ct);
    body.extend_from_slice(&tag);
    let mut token = String::with_capacity(V1_PREFIX.len() + body.len() * 4 / 3 + 4);
    token.push_str(V1_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&body, &mut token);
    Ok(token)
}

fn crypto(during: &'static str) -> impl FnOnce(openssl::error::ErrorStack) -> TokenError {
    move |source| TokenError::Crypto { during, source }
}

/// Detect the format: `nodeseal.v1.` prefix → V1; otherwise standard padded base64 whose decoded
/// length is 256, 384 or 512 bytes → Shipyard; otherwise `None` (a plain value).
pub fn detect(s: &str) -> Option<Format> {
    if s.starts_with(V1_PREFIX) {
        return Some(Format::V1);
    }
    // Only the three lengths can be base64 of a 256/384/512-byte ciphertext; checking first
    // avoids decoding every plain value.
    if !matches!(s.len(), 344 | 512 | 684) {
        return None;
    }
    match crate::legacy::decode(s) {
        Some(d) if matches!(d.len(), 256 | 384 | 512) => Some(Format::Shipyard),
        _ => None,
    }
}

/// A parsed (not yet authenticated) v1 body.
struct Parsed {
    body: Vec<u8>,
    name: Option<String>,
    not_after: Option<u64>,
    audience: Vec<Selector>,
    nonce: [u8; NONCE_BYTES],
    /// Key id and the range of its wrapped key in `body`.
    recipients: Vec<(Thumbprint, std::ops::Range<usize>)>,
    /// Everything before the ciphertext.
    aad_len: usize,
    ciphertext: std::ops::Range<usize>,
    tag: [u8; TAG_BYTES],
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TokenError> {
        if self.buf.len() - self.pos < n {
            return Err(TokenError::Truncated(format!(
                "body ends at byte {} while reading {what} ({n} bytes needed)",
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, TokenError> {
        Ok(self.take(1, what)?[0])
    }
}

fn decode_v1(token: &str) -> Result<Vec<u8>, TokenError> {
    let b64 = token
        .strip_prefix(V1_PREFIX)
        .ok_or_else(|| TokenError::Malformed(format!("does not start with {V1_PREFIX:?}")))?;
    URL_SAFE_NO_PAD.decode(b64).map_err(|e| {
        TokenError::Malformed(format!(
            "not unpadded base64url after the prefix ({e}); copy the whole token, one line, \
             unchanged"
        ))
    })
}

fn parse(token: &str) -> Result<Parsed, TokenError> {
    let body = decode_v1(token)?;
    let mut r = Reader { buf: &body, pos: 0 };
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(TokenError::UnsupportedVersion(version));
    }
    let flags = r.u8("flags")?;
    if flags & !(FLAG_NAME | FLAG_NOT_AFTER | FLAG_AUDIENCE) != 0 {
        return Err(TokenError::Malformed(format!(
            "unknown flag bits {flags:#04x}"
        )));
    }
    let name = if flags & FLAG_NAME != 0 {
        let len = r.u8("name length")? as usize;
        if len == 0 {
            return Err(TokenError::Malformed("empty bound name".to_owned()));
        }
        let raw = r.take(len, "name")?;
        match std::str::from_utf8(raw) {
            Ok(n) if is_valid_name(n) => Some(n.to_owned()),
            _ => {
                return Err(TokenError::Malformed(
                    "bound name is not a valid variable name".to_owned(),
                ))
            }
        }
    } else {
        None
    };
    let not_after = if flags & FLAG_NOT_AFTER != 0 {
        let b = r.take(8, "not_after")?;
        Some(u64::from_be_bytes(b.try_into().unwrap_or_default()))
    } else {
        None
    };
    let audience = if flags & FLAG_AUDIENCE != 0 {
        let (list, used) = audience::decode(&body[r.pos..])?;
        r.pos += used;
        list
    } else {
        Vec::new()
    };
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(r.take(NONCE_BYTES, "nonce")?);
    let count = r.u8("recipient count")? as usize;
    if count == 0 || count > MAX_RECIPIENTS {
        return Err(TokenError::Malformed(format!(
            "recipient count {count} (must be 1..={MAX_RECIPIENTS})"
        )));
    }
    let mut recipients = Vec::with_capacity(count);
    for i in 0..count {
        let mut id = [0u8; 20];
        id.copy_from_slice(r.take(20, &format!("key id of recipient {}", i + 1))?);
        let lb = r.take(2, &format!("wrapped key length of recipient {}", i + 1))?;
        let len = u16::from_be_bytes([lb[0], lb[1]]) as usize;
        let start = r.pos;
        r.take(len, &format!("wrapped key of recipient {}", i + 1))?;
        // One entry per key: otherwise a token could make the agent spend one RSA operation per
        // repetition of a key it holds.
        if recipients.iter().any(|(t, _): &(Thumbprint, _)| t.0 == id) {
            return Err(TokenError::Malformed(format!(
                "recipient {} repeats key id {}",
                i + 1,
                Thumbprint(id)
            )));
        }
        recipients.push((Thumbprint(id), start..start + len));
    }
    let lb = r.take(4, "ciphertext length")?;
    let ct_len = u32::from_be_bytes([lb[0], lb[1], lb[2], lb[3]]) as usize;
    if ct_len > MAX_VALUE_BYTES {
        return Err(TokenError::Malformed(format!(
            "ciphertext length {ct_len} exceeds the {MAX_VALUE_BYTES}-byte limit"
        )));
    }
    let aad_len = r.pos;
    r.take(ct_len, "ciphertext")?;
    let ciphertext = aad_len..aad_len + ct_len;
    let mut tag = [0u8; TAG_BYTES];
    tag.copy_from_slice(r.take(TAG_BYTES, "tag")?);
    if r.pos != body.len() {
        return Err(TokenError::Malformed(format!(
            "{} unexpected bytes after the tag",
            body.len() - r.pos
        )));
    }
    Ok(Parsed {
        body,
        name,
        not_after,
        audience,
        nonce,
        recipients,
        aad_len,
        ciphertext,
        tag,
    })
}

/// Parse without decrypting (either format).
pub fn inspect(token: &str) -> Result<TokenInfo, TokenError> {
    if token.starts_with(V1_PREFIX) {
        let p = parse(token)?;
        return Ok(TokenInfo {
            format: Format::V1,
            recipients: p.recipients.iter().map(|(t, _)| *t).collect(),
            name: p.name,
            not_after: p.not_after,
            audience: p.audience,
            token_len: token.len(),
            ciphertext_len: p.ciphertext.len(),
        });
    }
    match detect(token) {
        Some(Format::Shipyard) => Ok(TokenInfo {
            format: Format::Shipyard,
            recipients: Vec::new(),
            name: None,
            not_after: None,
            audience: Vec::new(),
            token_len: token.len(),
            ciphertext_len: crate::legacy::decode(token).map_or(0, |d| d.len()),
        }),
        _ => Err(TokenError::Malformed(format!(
            "neither a {V1_PREFIX} token nor Batch Shipyard base64 of a 2048/3072/4096-bit RSA \
             ciphertext ({} characters)",
            token.len()
        ))),
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check_claims(
    name: Option<&str>,
    not_after: Option<u64>,
    expected_name: Option<&str>,
    now: SystemTime,
) -> Result<(), TokenError> {
    if let (Some(bound), Some(expected)) = (name, expected_name) {
        if bound != expected {
            return Err(TokenError::NameMismatch {
                expected: expected.to_owned(),
                bound: bound.to_owned(),
            });
        }
    }
    if let Some(not_after) = not_after {
        if unix_seconds(now) > not_after {
            return Err(TokenError::Expired { not_after });
        }
    }
    Ok(())
}

/// An `audience_ok` for [`open_v1`] that admits only unbound tokens: for callers that cannot
/// tell who the value is for (fail closed).
pub fn unbound_only(audience: &[Selector]) -> bool {
    audience.is_empty()
}

/// An `audience_ok` for [`open_v1`] that admits every audience: only for a holder of the private
/// key opening for itself (the admin CLI), never for a caller acting for someone else.
pub fn any_audience(_: &[Selector]) -> bool {
    true
}

/// Open a v1 token with whichever recipient key `lookup` returns first (in token order).
/// `expected_name`: if the token is bound to a name, it must equal this (`None` = caller does
/// not care, e.g. the admin CLI without `--name`). Expiry is checked against `now`.
///
/// `audience_ok` decides whether the caller is in the token's audience: it is called exactly
/// once, before any RSA work, with the token's audience in canonical order (an empty slice for
/// an unbound token, so a caller that cannot match audiences passes [`unbound_only`]). If it
/// returns false the answer is `NotInAudience` and no key is touched.
///
/// Errors: `NoMatchingKey` if no recipient key is available, `Tampered` on authentication
/// failure, `NameMismatch`, `Expired`, `NotInAudience`, `Malformed`/`Truncated`/
/// `UnsupportedVersion`.
pub fn open_v1<K: std::ops::Deref<Target = KeyPair>>(
    token: &str,
    lookup: &dyn Fn(&Thumbprint) -> Option<K>,
    expected_name: Option<&str>,
    audience_ok: &dyn Fn(&[Selector]) -> bool,
    now: SystemTime,
) -> Result<Opened, TokenError> {
    let p = parse(token)?;
    // Checked before any RSA work so expired, misbound or foreign tokens cost nothing. The
    // header is not yet authenticated here, but a forged header can only produce an error:
    // success below requires GCM to authenticate these same bytes (audience included).
    check_claims(p.name.as_deref(), p.not_after, expected_name, now)?;
    if !audience_ok(&p.audience) {
        return Err(TokenError::NotInAudience {
            audience: p.audience,
        });
    }
    let mut any_key = false;
    for (id, range) in &p.recipients {
        let Some(key) = lookup(id) else { continue };
        any_key = true;
        let Some(content_key) = unwrap_key(&p.body[range.clone()], &key) else {
            continue;
        };
        let value = decrypt_value(&p, &content_key)?;
        check_claims(p.name.as_deref(), p.not_after, expected_name, now)?;
        return Ok(Opened {
            value,
            key: *id,
            name: p.name,
            not_after: p.not_after,
            audience: p.audience,
        });
    }
    if any_key {
        Err(TokenError::Tampered)
    } else {
        Err(TokenError::NoMatchingKey {
            recipients: p.recipients.iter().map(|(t, _)| *t).collect(),
        })
    }
}

fn decrypt_value(p: &Parsed, content_key: &[u8]) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    let ct = &p.body[p.ciphertext.clone()];
    let mut out = Zeroizing::new(vec![0u8; ct.len() + 16]);
    let result = (|| {
        let mut c = Crypter::new(
            Cipher::aes_256_gcm(),
            Mode::Decrypt,
            content_key,
            Some(&p.nonce),
        )?;
        c.aad_update(&p.body[..p.aad_len])?;
        let mut n = c.update(ct, &mut out)?;
        c.set_tag(&p.tag)?;
        n += c.finalize(&mut out[n..])?;
        Ok::<usize, openssl::error::ErrorStack>(n)
    })();
    match result {
        Ok(n) => {
            out.truncate(n);
            Ok(out)
        }
        Err(_) => {
            // Unauthenticated plaintext must not leave this function.
            out.iter_mut().for_each(|b| *b = 0);
            Err(TokenError::Tampered)
        }
    }
}

/// Test-vector support: the content key a recipient's wrapped key holds, in wiped memory.
#[doc(hidden)]
pub fn unwrap_content_key(token: &str, key: &KeyPair) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    let p = parse(token)?;
    p.recipients
        .iter()
        .filter(|(id, _)| *id == key.thumbprint())
        .find_map(|(_, range)| unwrap_key(&p.body[range.clone()], key))
        .ok_or(TokenError::Tampered)
}

/// Each recipient's key id and wrapped content key, in token order.
pub type WrappedKeys = Vec<(Thumbprint, Vec<u8>)>;

/// Test-vector support: the nonce and each recipient's wrapped key of a v1 token.
#[doc(hidden)]
pub fn wrapped_keys(token: &str) -> Result<([u8; NONCE_BYTES], WrappedKeys), TokenError> {
    let p = parse(token)?;
    let keys = p
        .recipients
        .iter()
        .map(|(id, r)| (*id, p.body[r.clone()].to_vec()))
        .collect();
    Ok((p.nonce, keys))
}

/// A v1 token parsed and its claims checked, for recipient keys that unwrap elsewhere (a Key
/// Vault key that never leaves the vault): the caller unwraps one recipient's content key
/// however it can, then opens the value with it. Local keys go through [`open_v1`]; this is the
/// same path split where the remote call goes.
pub struct PreparedV1 {
    p: Parsed,
}

impl PreparedV1 {
    /// Parse `token` and check its name binding, expiry and audience (as [`open_v1`] does,
    /// `audience_ok` once) before any key is asked.
    pub fn new(
        token: &str,
        expected_name: Option<&str>,
        audience_ok: &dyn Fn(&[Selector]) -> bool,
        now: SystemTime,
    ) -> Result<Self, TokenError> {
        let p = parse(token)?;
        check_claims(p.name.as_deref(), p.not_after, expected_name, now)?;
        if !audience_ok(&p.audience) {
            return Err(TokenError::NotInAudience {
                audience: p.audience,
            });
        }
        Ok(Self { p })
    }

    /// Each recipient's key id and wrapped content key, in token order.
    pub fn recipients(&self) -> impl Iterator<Item = (Thumbprint, &[u8])> + '_ {
        self.p
            .recipients
            .iter()
            .map(|(id, range)| (*id, &self.p.body[range.clone()]))
    }

    /// Open with the content key recipient `key` unwrapped; `Tampered` unless it authenticates
    /// the header and value. Claims are checked again against `now` (the unwrap took time).
    pub fn open_with(
        self,
        key: Thumbprint,
        content_key: &[u8],
        expected_name: Option<&str>,
        now: SystemTime,
    ) -> Result<Opened, TokenError> {
        if content_key.len() != CONTENT_KEY_BYTES {
            return Err(TokenError::Tampered);
        }
        let value = decrypt_value(&self.p, content_key)?;
        check_claims(self.p.name.as_deref(), self.p.not_after, expected_name, now)?;
        Ok(Opened {
            value,
            key,
            name: self.p.name,
            not_after: self.p.not_after,
            audience: self.p.audience,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{key_a, key_b, vector_key, vector_key_path};
    use std::time::{Duration, UNIX_EPOCH};

    fn lookup_a(id: &Thumbprint) -> Option<&'static KeyPair> {
        (*id == key_a().thumbprint()).then(key_a)
    }

    fn open_a(token: &str, name: Option<&str>) -> Result<Opened, TokenError> {
        open_v1(token, &lookup_a, name, &unbound_only, SystemTime::now())
    }

    fn body_of(token: &str) -> Vec<u8> {
        decode_v1(token).unwrap()
    }

    fn token_of(body: &[u8]) -> String {
        format!("{V1_PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
    }

    fn kind(e: &TokenError) -> &'static str {
        match e {
            TokenError::Malformed(_) => "Malformed",
            TokenError::UnsupportedVersion(_) => "UnsupportedVersion",
            TokenError::Truncated(_) => "Truncated",
            TokenError::Tampered => "Tampered",
            TokenError::NameMismatch { .. } => "NameMismatch",
            TokenError::Expired { .. } => "Expired",
            TokenError::NoMatchingKey { .. } => "NoMatchingKey",
            TokenError::NotInAudience { .. } => "NotInAudience",
            TokenError::TooLarge { .. } => "TooLarge",
            TokenError::Invalid(_) => "Invalid",
            TokenError::Crypto { .. } => "Crypto",
        }
    }

    fn err_kind(r: Result<Opened, TokenError>) -> &'static str {
        match r {
            Ok(_) => "Ok",
            Err(e) => kind(&e),
        }
    }

    #[test]
    fn round_trip_with_name_and_expiry() {
        let opts = SealOptions {
            name: Some("DB_PASSWORD".into()),
            not_after: Some(unix_seconds(SystemTime::now()) + 3600),
            ..Default::default()
        };
        let t = seal(b"hunter2", &[key_a().recipient()], &opts).unwrap();
        assert!(t.starts_with(V1_PREFIX));
        assert!(t
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)));
        let o = open_a(&t, Some("DB_PASSWORD")).unwrap();
        assert_eq!(&o.value[..], b"hunter2");
        assert_eq!(o.key, key_a().thumbprint());
        assert_eq!(o.name.as_deref(), Some("DB_PASSWORD"));
        assert_eq!(o.not_after, opts.not_after);
        // The caller that does not care about names may open it too.
        assert_eq!(&open_a(&t, None).unwrap().value[..], b"hunter2");
        // Fresh key and nonce each time.
        assert_ne!(t, seal(b"hunter2", &[key_a().recipient()], &opts).unwrap());
    }

    #[test]
    fn names_and_expiry_are_enforced() {
        let r = [key_a().recipient()];
        let bound = seal(
            b"v",
            &r,
            &SealOptions {
                name: Some("A".into()),
                not_after: None,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            open_a(&bound, Some("B")),
            Err(TokenError::NameMismatch { ref expected, ref bound }) if expected == "B" && bound == "A"
        ));
        let unbound = seal(b"v", &r, &SealOptions::default()).unwrap();
        assert_eq!(&open_a(&unbound, Some("ANY_NAME")).unwrap().value[..], b"v");

        let t = seal(
            b"v",
            &r,
            &SealOptions {
                name: None,
                not_after: Some(1_000_000),
                ..Default::default()
            },
        )
        .unwrap();
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert!(open_v1(&t, &lookup_a, None, &unbound_only, at(1_000_000)).is_ok());
        assert!(matches!(
            open_v1(&t, &lookup_a, None, &unbound_only, at(1_000_001)),
            Err(TokenError::Expired {
                not_after: 1_000_000
            })
        ));
    }

    #[test]
    fn seal_refuses_bad_arguments() {
        let r = key_a().recipient();
        assert_eq!(
            kind(&seal(b"v", &[], &SealOptions::default()).unwrap_err()),
            "Invalid"
        );
        for bad in ["", "1ABC", "A-B", "A B", "é", &"A".repeat(256)] {
            let o = SealOptions {
                name: Some(bad.to_string()),
                not_after: None,
                ..Default::default()
            };
            assert_eq!(
                kind(&seal(b"v", std::slice::from_ref(&r), &o).unwrap_err()),
                "Invalid",
                "{bad:?}"
            );
        }
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        assert!(matches!(
            seal(&big, std::slice::from_ref(&r), &SealOptions::default()),
            Err(TokenError::TooLarge { len, max: MAX_VALUE_BYTES, .. }) if len == MAX_VALUE_BYTES + 1
        ));
        let max = vec![b'x'; MAX_VALUE_BYTES];
        let t = seal(&max, std::slice::from_ref(&r), &SealOptions::default()).unwrap();
        assert_eq!(open_a(&t, None).unwrap().value.len(), MAX_VALUE_BYTES);
        // 17 distinct key ids (wrapped keys need not be real to be refused).
        let wrapped: Vec<_> = (0..17u8)
            .map(|i| (Thumbprint([i; 20]), vec![0u8; 256]))
            .collect();
        let e = seal_with(b"v", &[0; 32], &[0; 12], &wrapped, &SealOptions::default());
        assert_eq!(kind(&e.unwrap_err()), "Invalid");
    }

    #[test]
    fn two_recipients_either_opens_and_duplicates_collapse() {
        let t = seal(
            b"shared",
            &[
                key_a().recipient(),
                key_b().recipient(),
                key_a().recipient(),
            ],
            &SealOptions::default(),
        )
        .unwrap();
        let info = inspect(&t).unwrap();
        assert_eq!(
            info.recipients,
            vec![key_a().thumbprint(), key_b().thumbprint()]
        );
        let lookup_b = |id: &Thumbprint| (*id == key_b().thumbprint()).then(key_b);
        let o = open_v1(&t, &lookup_b, None, &unbound_only, SystemTime::now()).unwrap();
        assert_eq!(
            (&o.value[..], o.key),
            (&b"shared"[..], key_b().thumbprint())
        );
        // A lookup that returns the wrong key for the first id: the second recipient still works.
        let confused = |_: &Thumbprint| Some(key_b());
        let o = open_v1(&t, &confused, None, &unbound_only, SystemTime::now()).unwrap();
        assert_eq!(o.key, key_b().thumbprint());
    }

    #[test]
    fn wrong_key() {
        let t = seal(b"v", &[key_a().recipient()], &SealOptions::default()).unwrap();
        let none = |_: &Thumbprint| None::<&KeyPair>;
        match open_v1(&t, &none, None, &unbound_only, SystemTime::now()) {
            Err(TokenError::NoMatchingKey { recipients }) => {
                assert_eq!(recipients, vec![key_a().thumbprint()])
            }
            other => panic!("{}", err_kind(other)),
        }
        // A key registered under the right id but not the right key: indistinguishable from
        // tampering.
        let wrong = |_: &Thumbprint| Some(key_b());
        assert_eq!(
            err_kind(open_v1(&t, &wrong, None, &unbound_only, SystemTime::now())),
            "Tampered"
        );
    }

    #[test]
    fn truncated_at_every_length() {
        let t = seal(
            b"some value",
            &[key_a().recipient()],
            &SealOptions {
                name: Some("N".into()),
                not_after: Some(u64::MAX),
                ..Default::default()
            },
        )
        .unwrap();
        let body = body_of(&t);
        for n in 0..body.len() {
            let k = err_kind(open_a(&token_of(&body[..n]), None));
            assert_eq!(k, "Truncated", "cut at {n}");
        }
        // Trailing garbage is not allowed either.
        let mut long = body.clone();
        long.push(0);
        assert_eq!(err_kind(open_a(&token_of(&long), None)), "Malformed");
        // Truncating the string itself (not at a byte boundary) is a base64 error or Truncated.
        let k = err_kind(open_a(&t[..t.len() - 1], None));
        assert!(k == "Malformed" || k == "Truncated", "{k}");
    }

    #[test]
    fn re_encoded_tokens_are_refused() {
        // Find a token whose base64url uses '-' or '_' so standard base64 differs.
        let t = (0..50)
            .map(|_| seal(b"v", &[key_a().recipient()], &SealOptions::default()).unwrap())
            .find(|t| t[V1_PREFIX.len()..].contains(['-', '_']))
            .unwrap();
        let standard = t.replace('-', "+").replace('_', "/");
        assert_eq!(err_kind(open_a(&standard, None)), "Malformed");
        let padded = format!("{t}==");
        assert_eq!(err_kind(open_a(&padded, None)), "Malformed");
        assert_eq!(err_kind(open_a(&format!(" {t}"), None)), "Malformed");
        assert_eq!(err_kind(open_a(&format!("{t}\n"), None)), "Malformed");
        assert_eq!(
            err_kind(open_a(&t.replacen("v1", "v2", 1), None)),
            "Malformed"
        );
        assert_eq!(err_kind(open_a(&t, None)), "Ok");
    }

    #[test]
    fn every_bit_flip_region_fails() {
        let opts = SealOptions {
            name: Some("FLIP".into()),
            not_after: Some(u64::MAX - 1),
            ..Default::default()
        };
        let t = seal(b"value to protect", &[key_a().recipient()], &opts).unwrap();
        let body = body_of(&t);
        // Layout: version(1) flags(1) name_len(1) name(4) not_after(8) nonce(12) count(1)
        //         key_id(20) wrapped_len(2) wrapped(256) ct_len(4) ct(16) tag(16)
        let regions: &[(&str, std::ops::Range<usize>)] = &[
            ("version", 0..1),
            ("flags", 1..2),
            ("name", 2..7),
            ("not_after", 7..15),
            ("nonce", 15..27),
            ("count", 27..28),
            ("key id", 28..48),
            ("wrapped length", 48..50),
            ("wrapped key", 50..306),
            ("ciphertext length", 306..310),
            ("ciphertext", 310..326),
            ("tag", 326..342),
        ];
        assert_eq!(body.len(), 342);
        for (region, range) in regions {
            for i in range.clone() {
                for bit in [0u8, 7] {
                    let mut b = body.clone();
                    b[i] ^= 1 << bit;
                    let k = err_kind(open_a(&token_of(&b), Some("FLIP")));
                    let allowed: &[&str] = match *region {
                        "version" => &["UnsupportedVersion"],
                        "key id" => &["NoMatchingKey"],
                        "wrapped key" | "ciphertext" | "tag" | "nonce" => &["Tampered"],
                        // Length and header changes misparse; whatever the parse says, it fails.
                        _ => &[
                            "Malformed",
                            "Truncated",
                            "Tampered",
                            "NameMismatch",
                            "Expired",
                        ],
                    };
                    assert!(allowed.contains(&k), "{region} byte {i} bit {bit}: {k}");
                }
            }
        }
        // Header fields are authenticated: an expiry moved *later* must not open.
        let mut b = body.clone();
        b[14] ^= 1; // u64::MAX - 1 -> u64::MAX
        assert_eq!(err_kind(open_a(&token_of(&b), None)), "Tampered");
        // Removing the name binding (flags bit 0 and the name) must not open either.
        let mut unbound = vec![body[0], body[1] & !FLAG_NAME];
        unbound.extend_from_slice(&body[7..]);
        assert_eq!(
            err_kind(open_a(&token_of(&unbound), Some("OTHER"))),
            "Tampered"
        );
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn never_lookup(_: &Thumbprint) -> Option<&'static KeyPair> {
        panic!("a key was looked up for a token that must be refused before any RSA work")
    }

    #[test]
    fn audience_is_canonical_authenticated_and_decided_before_rsa() {
        let opts = SealOptions {
            name: Some("DB".into()),
            not_after: Some(u64::MAX),
            audience: vec![sel("job:b"), sel("uid:5"), sel("job:b"), sel("task:j/t")],
        };
        let t = seal(b"for job b", &[key_a().recipient()], &opts).unwrap();
        let canonical = vec![sel("uid:5"), sel("job:b"), sel("task:j/t")];
        assert_eq!(inspect(&t).unwrap().audience, canonical);
        assert_eq!(body_of(&t)[1], FLAG_NAME | FLAG_NOT_AFTER | FLAG_AUDIENCE);

        // Refused by the caller's decision without touching a key.
        match open_v1(
            &t,
            &never_lookup,
            Some("DB"),
            &unbound_only,
            SystemTime::now(),
        ) {
            Err(TokenError::NotInAudience { audience }) => assert_eq!(audience, canonical),
            other => panic!("{}", err_kind(other)),
        }
        // The decision sees the canonical list, exactly once.
        let calls = std::cell::Cell::new(0);
        let seen = std::cell::RefCell::new(Vec::new());
        let decide = |a: &[Selector]| {
            calls.set(calls.get() + 1);
            *seen.borrow_mut() = a.to_vec();
            a.contains(&sel("job:b"))
        };
        let o = open_v1(&t, &lookup_a, Some("DB"), &decide, SystemTime::now()).unwrap();
        assert_eq!((&o.value[..], &o.audience), (&b"for job b"[..], &canonical));
        assert_eq!((calls.get(), &*seen.borrow()), (1, &canonical));

        // An unbound token shows the decision an empty audience.
        let unbound = seal(b"v", &[key_a().recipient()], &SealOptions::default()).unwrap();
        assert!(inspect(&unbound).unwrap().audience.is_empty());
        assert_eq!(err_kind(open_a(&unbound, None)), "Ok");

        // Authenticated: removing the audience (bit 2 and its bytes) or changing it fails GCM.
        let body = body_of(&t);
        let aud_start = 2 + 1 + 2 + 8;
        let aud_len = audience::encode(&canonical).unwrap().len();
        let mut stripped = vec![body[0], body[1] & !FLAG_AUDIENCE];
        stripped.extend_from_slice(&body[2..aud_start]);
        stripped.extend_from_slice(&body[aud_start + aud_len..]);
        assert_eq!(
            err_kind(open_a(&token_of(&stripped), Some("DB"))),
            "Tampered"
        );
        let mut other_uid = body.clone();
        other_uid[aud_start + 1 + 4] ^= 0x01; // uid:5 -> uid:4, still canonical
        let other = token_of(&other_uid);
        assert_eq!(inspect(&other).unwrap().audience[0], sel("uid:4"));
        assert_eq!(
            err_kind(open_v1(
                &other,
                &lookup_a,
                None,
                &any_audience,
                SystemTime::now()
            )),
            "Tampered"
        );
    }

    #[test]
    fn broken_audiences_and_unknown_flags_are_malformed() {
        let opts = SealOptions {
            audience: vec![sel("uid:1")],
            ..Default::default()
        };
        let t = seal(b"v", &[key_a().recipient()], &opts).unwrap();
        let body = body_of(&t);
        let with_audience = |aud: &[u8]| {
            let mut b = body[..2].to_vec();
            b.extend_from_slice(aud);
            b.extend_from_slice(&body[2 + 6..]);
            token_of(&b)
        };
        let open_any = |t: &str| {
            err_kind(open_v1(
                t,
                &lookup_a,
                None,
                &any_audience,
                SystemTime::now(),
            ))
        };
        assert_eq!(open_any(&with_audience(&[1, 1, 0, 0, 0, 1])), "Ok");
        for (aud, what) in [
            (&[][..], "bit set, no audience bytes"),
            (&[0][..], "count 0"),
            (&[17][..], "count 17"),
            (&[1, 8, 0, 0, 0, 1][..], "unknown kind 8"),
            (&[2, 1, 0, 0, 0, 2, 1, 0, 0, 0, 1][..], "out of order"),
            (&[2, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1][..], "duplicate"),
            (&[1, 5, 1, b' '][..], "invalid job id"),
        ] {
            let k = err_kind(open_v1(
                &with_audience(aud),
                &never_lookup,
                None,
                &any_audience,
                SystemTime::now(),
            ));
            assert_eq!(k, "Malformed", "{what}");
        }
        for bit in 3..8 {
            let mut b = body.clone();
            b[1] |= 1 << bit;
            assert_eq!(
                err_kind(open_a(&token_of(&b), None)),
                "Malformed",
                "bit {bit}"
            );
        }
        let empty = SealOptions {
            audience: vec![Selector::Job("a b".into())],
            ..Default::default()
        };
        assert_eq!(
            kind(&seal(b"v", &[key_a().recipient()], &empty).unwrap_err()),
            "Invalid"
        );
    }

    #[test]
    fn duplicate_recipients_are_malformed_before_rsa() {
        let t = seal(b"v", &[key_a().recipient()], &SealOptions::default()).unwrap();
        let body = body_of(&t);
        // Layout: version flags nonce(12) count(1) entry(20 + 2 + 256) ...
        let entry = 15..15 + 20 + 2 + 256;
        let mut twice = body[..entry.start].to_vec();
        twice[14] = 2;
        twice.extend_from_slice(&body[entry.clone()]);
        twice.extend_from_slice(&body[entry.start..]);
        let twice = token_of(&twice);
        match open_v1(
            &twice,
            &never_lookup,
            None,
            &any_audience,
            SystemTime::now(),
        ) {
            Err(TokenError::Malformed(m)) => assert!(m.contains("repeats key id"), "{m}"),
            other => panic!("{}", err_kind(other)),
        }
        assert_eq!(kind(&inspect(&twice).unwrap_err()), "Malformed");
        let w = wrap_key(&[0; 32], &key_a().recipient()).unwrap();
        let dup = [(key_a().thumbprint(), w.clone()), (key_a().thumbprint(), w)];
        let e = seal_with(b"v", &[0; 32], &[0; 12], &dup, &SealOptions::default());
        assert_eq!(kind(&e.unwrap_err()), "Invalid");
    }

    #[test]
    fn detect_and_inspect() {
        let t = seal(
            b"abc",
            &[key_a().recipient()],
            &SealOptions {
                name: Some("X".into()),
                not_after: Some(42),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(detect(&t), Some(Format::V1));
        let i = inspect(&t).unwrap();
        assert_eq!(i.format, Format::V1);
        assert_eq!(
            (i.name.as_deref(), i.not_after, i.ciphertext_len),
            (Some("X"), Some(42), 3)
        );
        assert_eq!(i.token_len, t.len());
        let legacy = crate::legacy::seal(b"abc", &key_a().recipient().public_key).unwrap();
        assert_eq!(detect(&legacy), Some(Format::Shipyard));
        let li = inspect(&legacy).unwrap();
        assert_eq!(
            (li.format, li.ciphertext_len, li.recipients.len()),
            (Format::Shipyard, 256, 0)
        );
        for plain in ["", "hunter2", "dGVzdA==", &"QUFB".repeat(86)] {
            assert_eq!(detect(plain), None, "{plain}");
            assert!(inspect(plain).is_err());
        }
    }

    // ---- test vectors ----

    fn vectors_path() -> std::path::PathBuf {
        vector_key_path().with_file_name("v1.json")
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn audience_vectors_path() -> std::path::PathBuf {
        vector_key_path().with_file_name("v1-audience.json")
    }

    fn selectors_of(v: &serde_json::Value) -> Vec<Selector> {
        v.as_array().map_or_else(Vec::new, |a| {
            a.iter().map(|s| sel(s.as_str().unwrap())).collect()
        })
    }

    /// Opens every positive vector of `path` (and re-encodes it byte for byte from its listed
    /// inputs), and checks every negative one fails with its listed error.
    fn check_vector_file(path: &std::path::Path, min_positive: usize, min_negative: usize) {
        let key = vector_key();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            doc["thumbprint"].as_str().unwrap(),
            key.thumbprint().to_hex()
        );
        let lookup = |id: &Thumbprint| (*id == key.thumbprint()).then_some(&key);
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= min_positive);
        for v in vectors {
            let desc = v["description"].as_str().unwrap();
            let token = v["token"].as_str().unwrap();
            let name = v["name"].as_str();
            let not_after = v["not_after"].as_u64();
            let audience = selectors_of(&v["audience"]);
            let now = UNIX_EPOCH + Duration::from_secs(v["now"].as_u64().unwrap());
            let value = v["value"].as_str().unwrap();
            assert_eq!(
                hex(v["value_hex"].as_str().unwrap()),
                value.as_bytes(),
                "{desc}"
            );
            if audience.is_empty() {
                assert!(v["audience_hex"].is_null(), "{desc}");
            } else {
                // Listed in canonical order, with the encoding an independent encoder must get.
                assert_eq!(
                    audience::canonicalize(&audience).unwrap(),
                    audience,
                    "{desc}"
                );
                assert_eq!(
                    audience::encode(&audience).unwrap(),
                    hex(v["audience_hex"].as_str().unwrap()),
                    "{desc}"
                );
                assert_eq!(
                    err_kind(open_v1(token, &never_lookup, name, &unbound_only, now)),
                    "NotInAudience",
                    "{desc}"
                );
            }
            let o = open_v1(token, &lookup, name, &any_audience, now)
                .unwrap_or_else(|e| panic!("{desc}: {e}"));
            assert_eq!(&o.value[..], value.as_bytes(), "{desc}");
            assert_eq!(
                (o.name.as_deref(), o.not_after, &o.audience),
                (name, not_after, &audience),
                "{desc}"
            );
            assert_eq!(inspect(token).unwrap().audience, audience, "{desc}");
            let ck = hex(v["content_key"].as_str().unwrap());
            assert_eq!(
                &unwrap_content_key(token, &key).unwrap()[..],
                &ck[..],
                "{desc}"
            );
            // Re-encoding from the listed inputs reproduces the token byte for byte.
            let (nonce, wrapped) = wrapped_keys(token).unwrap();
            assert_eq!(nonce.to_vec(), hex(v["nonce"].as_str().unwrap()), "{desc}");
            let ids: Vec<String> = wrapped.iter().map(|(t, _)| t.to_hex()).collect();
            let listed: Vec<String> = v["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ids, listed, "{desc}");
            let opts = SealOptions {
                name: name.map(str::to_owned),
                not_after,
                audience,
            };
            let again = seal_with(
                value.as_bytes(),
                &ck.try_into().unwrap(),
                &nonce,
                &wrapped,
                &opts,
            )
            .unwrap();
            assert_eq!(again, token, "{desc}");
        }
        let negative = doc["negative"].as_array().unwrap();
        assert!(negative.len() >= min_negative);
        for v in negative {
            let desc = v["description"].as_str().unwrap();
            let now = UNIX_EPOCH + Duration::from_secs(v["now"].as_u64().unwrap());
            // Absent means the opener admits any audience (a decoder without a policy).
            let accept = v["accept_audience"].as_bool().unwrap_or(true);
            let decide = |_: &[Selector]| accept;
            let got = err_kind(open_v1(
                v["token"].as_str().unwrap(),
                &lookup,
                v["expected_name"].as_str(),
                &decide,
                now,
            ));
            assert_eq!(got, v["error"].as_str().unwrap(), "{desc}");
        }
    }

    #[test]
    fn committed_vectors() {
        check_vector_file(&vectors_path(), 5, 4);
    }

    #[test]
    fn committed_audience_vectors() {
        check_vector_file(&audience_vectors_path(), 10, 14);
    }

    /// Regenerates tests/vectors/v1.json. Run by hand only:
    /// `NODESEAL_WRITE_VECTORS=1 cargo test -p nodeseal-envelope -- --ignored write_vectors`
    #[test]
    #[ignore = "regenerates tests/vectors/v1.json: by hand, with NODESEAL_WRITE_VECTORS=1"]
    fn write_vectors() {
        if std::env::var_os("NODESEAL_WRITE_VECTORS").is_none() {
            return;
        }
        let key = vector_key();
        let r = key.recipient();
        let now: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
        let unknown = Thumbprint(
            *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x01\x23\x45\x67",
        );
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<u64>, bool);
        let cases: Vec<Case> = vec![
            ("unbound, no expiry", "hello, world", None, None, false),
            (
                "bound to DB_PASSWORD, expires 2100-01-01T00:00:00Z",
                "s3cr3t=with=equals",
                Some("DB_PASSWORD"),
                Some(4_102_444_800),
                false,
            ),
            (
                "two recipients, the first an unknown key id",
                "for two keys",
                Some("API_KEY"),
                None,
                true,
            ),
            ("empty value", "", None, None, false),
            (
                "non-ASCII UTF-8 value",
                "pässwörd ✓ 秘密 🔑",
                Some("UNICODE_1"),
                None,
                false,
            ),
        ];
        let mut vectors = Vec::new();
        let mut tokens = Vec::new();
        for (i, (desc, value, name, not_after, two)) in cases.into_iter().enumerate() {
            let ck: [u8; 32] = std::array::from_fn(|j| (i * 32 + j) as u8);
            let nonce: [u8; 12] = std::array::from_fn(|j| (0xa0 + i * 12 + j) as u8);
            let mut wrapped = Vec::new();
            if two {
                let fake: Vec<u8> = (0..256).map(|j| (j * 7 + 3) as u8).collect();
                wrapped.push((unknown, fake));
            }
            wrapped.push((r.thumbprint, wrap_key(&ck, &r).unwrap()));
            let opts = SealOptions {
                name: name.map(str::to_owned),
                not_after,
                ..Default::default()
            };
            let token = seal_with(value.as_bytes(), &ck, &nonce, &wrapped, &opts).unwrap();
            tokens.push((token.clone(), name, not_after));
            vectors.push(serde_json::json!({
                "description": desc,
                "token": token,
                "content_key": crate::keys::to_hex(&ck),
                "nonce": crate::keys::to_hex(&nonce),
                "recipients": wrapped.iter().map(|(t, _)| t.to_hex()).collect::<Vec<_>>(),
                "value": value,
                "value_hex": crate::keys::to_hex(value.as_bytes()),
                "name": name,
                "not_after": not_after,
                "now": now,
            }));
        }
        let flip = |t: &str, at_end: usize| {
            let mut b = body_of(t);
            let i = b.len() - at_end;
            b[i] ^= 0x01;
            token_of(&b)
        };
        let (t0, _, _) = &tokens[0];
        let (t1, _, _) = &tokens[1];
        let b0 = body_of(t0);
        let neg = |desc: &str,
                   token: String,
                   expected_name: Option<&str>,
                   now: u64,
                   error: &str| {
            serde_json::json!({"description": desc, "token": token, "expected_name": expected_name, "now": now, "error": error})
        };
        let mut v2 = b0.clone();
        v2[0] = 2;
        let mut only_unknown = body_of(&tokens[2].0);
        // Keep only the unknown recipient: rewrite the count and drop the second entry.
        let name_end = 2 + 1 + "API_KEY".len();
        let count_at = name_end + 12;
        only_unknown[count_at] = 1;
        let second = count_at + 1 + 20 + 2 + 256;
        only_unknown.drain(second..second + 20 + 2 + 256);
        let negative = vec![
            neg(
                "last ciphertext byte flipped",
                flip(t0, 17),
                None,
                now,
                "Tampered",
            ),
            neg("last tag byte flipped", flip(t0, 1), None, now, "Tampered"),
            neg(
                "wrapped key byte flipped",
                flip(t0, 16 + 12 + 4 + 100),
                None,
                now,
                "Tampered",
            ),
            neg(
                "truncated: tag missing its last 4 bytes",
                token_of(&b0[..b0.len() - 4]),
                None,
                now,
                "Truncated",
            ),
            neg(
                "bound to DB_PASSWORD, opened as OTHER",
                t1.clone(),
                Some("OTHER"),
                now,
                "NameMismatch",
            ),
            neg(
                "opened one second after not_after",
                t1.clone(),
                Some("DB_PASSWORD"),
                4_102_444_801,
                "Expired",
            ),
            neg(
                "version byte 2",
                token_of(&v2),
                None,
                now,
                "UnsupportedVersion",
            ),
            neg("padding added", format!("{t0}="), None, now, "Malformed"),
            neg(
                "only an unknown recipient",
                token_of(&only_unknown),
                None,
                now,
                "NoMatchingKey",
            ),
        ];
        let doc = serde_json::json!({
            "comment": "nodeseal token format v1 test vectors; see docs/format.md. The key in v1-testkey.pem is TEST ONLY.",
            "key": "v1-testkey.pem",
            "thumbprint": key.thumbprint().to_hex(),
            "vectors": vectors,
            "negative": negative,
        });
        std::fs::write(
            vectors_path(),
            serde_json::to_string_pretty(&doc).unwrap() + "\n",
        )
        .unwrap();
    }

    /// Writes tests/vectors/v1-audience.json (tokens with audiences, and broken ones). Run by
    /// hand only, like `write_vectors`; leaves v1.json alone:
    /// `NODESEAL_WRITE_VECTORS=1 cargo test -p nodeseal-envelope -- --ignored write_audience_vectors`
    #[test]
    #[ignore = "regenerates tests/vectors/v1-audience.json: by hand, with NODESEAL_WRITE_VECTORS=1"]
    fn write_audience_vectors() {
        if std::env::var_os("NODESEAL_WRITE_VECTORS").is_none() {
            return;
        }
        let key = vector_key();
        let r = key.recipient();
        let now: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
        let long_job = "J".repeat(audience::MAX_ID_LEN);
        let sixteen: Vec<String> = (0..16).map(|i| format!("uid:{}", 1000 + i)).collect();
        type Case = (
            String,
            &'static str,
            Option<&'static str>,
            Option<u64>,
            Vec<String>,
        );
        let one = |desc: &str, s: &str| -> Case {
            (
                desc.to_owned(),
                "for one selector",
                None,
                None,
                vec![s.to_owned()],
            )
        };
        let cases: Vec<Case> = vec![
            one("uid selector (largest uid)", "uid:4294967295"),
            one("user selector", "user:_azbatch"),
            one("gid selector (gid 0)", "gid:0"),
            one("group selector", "group:batch-users"),
            one("job selector (64-byte job id)", &format!("job:{long_job}")),
            one("task selector", "task:nightly_etl/task-7"),
            one("pool selector", "pool:gpu-pool"),
            (
                "one selector of every kind, in canonical order".to_owned(),
                "for many",
                None,
                None,
                [
                    "uid:1000",
                    "user:alice",
                    "gid:2000",
                    "group:devs",
                    "job:nightly",
                    "task:nightly/t1",
                    "pool:p1",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            (
                "name and expiry and two job selectors (shorter id sorts first)".to_owned(),
                "s3cr3t",
                Some("DB_PASSWORD"),
                Some(4_102_444_800),
                ["job:zz", "job:aaa"].map(str::to_owned).to_vec(),
            ),
            (
                "16 selectors (the most a token holds)".to_owned(),
                "for sixteen uids",
                Some("API_KEY"),
                None,
                sixteen,
            ),
        ];
        let mut vectors = Vec::new();
        let mut tokens = Vec::new();
        for (i, (desc, value, name, not_after, selectors)) in cases.into_iter().enumerate() {
            let ck: [u8; 32] = std::array::from_fn(|j| (0x80 + i * 32 + j) as u8);
            let nonce: [u8; 12] = std::array::from_fn(|j| (0x10 + i * 12 + j) as u8);
            let wrapped = vec![(r.thumbprint, wrap_key(&ck, &r).unwrap())];
            let list: Vec<Selector> = selectors.iter().map(|s| sel(s)).collect();
            let list = audience::canonicalize(&list).unwrap();
            let opts = SealOptions {
                name: name.map(str::to_owned),
                not_after,
                audience: list.clone(),
            };
            let token = seal_with(value.as_bytes(), &ck, &nonce, &wrapped, &opts).unwrap();
            tokens.push(token.clone());
            vectors.push(serde_json::json!({
                "description": desc,
                "token": token,
                "content_key": crate::keys::to_hex(&ck),
                "nonce": crate::keys::to_hex(&nonce),
                "recipients": [r.thumbprint.to_hex()],
                "value": value,
                "value_hex": crate::keys::to_hex(value.as_bytes()),
                "name": name,
                "not_after": not_after,
                "audience": list.iter().map(Selector::to_string).collect::<Vec<_>>(),
                "audience_hex": crate::keys::to_hex(&audience::encode(&list).unwrap()),
                "now": now,
            }));
        }
        // An unbound token to break: version, flags, nonce, ... (no name, no expiry).
        let plain_ck = [0x55u8; 32];
        let plain_nonce: [u8; 12] = std::array::from_fn(|j| (0xe0 + j) as u8);
        let plain_wrapped = vec![(r.thumbprint, wrap_key(&plain_ck, &r).unwrap())];
        let plain = seal_with(
            b"unbound",
            &plain_ck,
            &plain_nonce,
            &plain_wrapped,
            &SealOptions::default(),
        )
        .unwrap();
        let pb = body_of(&plain);
        // The same token with `aud` spliced in as its audience and flag bit 2 set. The AAD no
        // longer matches, but every such token must be refused before that matters.
        let with_audience = |aud: &[u8]| {
            let mut b = vec![pb[0], pb[1] | FLAG_AUDIENCE];
            b.extend_from_slice(aud);
            b.extend_from_slice(&pb[2..]);
            token_of(&b)
        };
        let id = |kind: u8, s: &[u8]| {
            let mut v = vec![kind, s.len() as u8];
            v.extend_from_slice(s);
            v
        };
        let list = |items: &[Vec<u8>]| {
            let mut v = vec![items.len() as u8];
            items.iter().for_each(|i| v.extend_from_slice(i));
            v
        };
        let uid = |n: u32| {
            let mut v = vec![1u8];
            v.extend_from_slice(&n.to_be_bytes());
            v
        };
        let neg =
            |desc: &str, token: String, expected_name: Option<&str>, accept: bool, error: &str| {
                serde_json::json!({
                    "description": desc,
                    "token": token,
                    "expected_name": expected_name,
                    "accept_audience": accept,
                    "now": now,
                    "error": error,
                })
            };
        // The "name and expiry" vector: flags 07, name, not_after, audience, nonce...
        let named = body_of(&tokens[8]);
        let aud_at = 2 + 1 + "DB_PASSWORD".len() + 8;
        let aud_len = hex(vectors[8]["audience_hex"].as_str().unwrap()).len();
        let mut stripped = vec![named[0], named[1] & !FLAG_AUDIENCE];
        stripped.extend_from_slice(&named[2..aud_at]);
        stripped.extend_from_slice(&named[aud_at + aud_len..]);
        let mut renamed = named.clone();
        renamed[aud_at + aud_len - 1] = b'b'; // job:aaa -> job:aab, still canonical
        let first = body_of(&tokens[0]); // uid:4294967295
        let mut changed_uid = first.clone();
        changed_uid[2 + 1 + 4] = 0xfe; // uid:4294967294
                                       // Duplicate recipient: the vector key listed twice.
        let entry_at = 2 + 12 + 1;
        let entry = entry_at..entry_at + 20 + 2 + 256;
        let mut twice = pb[..entry.start].to_vec();
        twice[entry_at - 1] = 2;
        twice.extend_from_slice(&pb[entry.clone()]);
        twice.extend_from_slice(&pb[entry.start..]);
        let mut bit3 = pb.clone();
        bit3[1] |= 0b1000;
        let negative = vec![
            neg(
                "flag bit 2 set, no audience bytes (the nonce is read as the audience)",
                with_audience(&[]),
                None,
                true,
                "Malformed",
            ),
            neg(
                "audience count 0",
                with_audience(&[0]),
                None,
                true,
                "Malformed",
            ),
            neg(
                "audience count 17",
                with_audience(&list(&(0..17).map(uid).collect::<Vec<_>>())),
                None,
                true,
                "Malformed",
            ),
            neg(
                "unknown selector kind 0",
                with_audience(&[1, 0, 0, 0, 0, 1]),
                None,
                true,
                "Malformed",
            ),
            neg(
                "unknown selector kind 8",
                with_audience(&list(&[id(8, b"x")])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "selectors out of canonical order (job before uid)",
                with_audience(&list(&[id(5, b"nightly"), uid(1000)])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "longer job id before shorter (order is by encoding, length byte first)",
                with_audience(&list(&[id(5, b"aaa"), id(5, b"zz")])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "duplicate selector",
                with_audience(&list(&[uid(1000), uid(1000)])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "invalid identifier: '/' in a job id",
                with_audience(&list(&[id(5, b"a/b")])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "invalid identifier: empty user name",
                with_audience(&list(&[id(2, b"")])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "invalid identifier: user name starting with '-'",
                with_audience(&list(&[id(2, b"-x")])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "invalid identifier: non-ASCII group name",
                with_audience(&list(&[id(4, "gr\u{fc}n".as_bytes())])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "invalid identifier: 65-byte pool id",
                with_audience(&list(&[id(7, &[b'p'; 65])])),
                None,
                true,
                "Malformed",
            ),
            neg(
                "task selector with only a job id (the nonce after it is read as the task id)",
                with_audience(&[1, 6, 1, b'j']),
                None,
                true,
                "Malformed",
            ),
            neg(
                "truncated inside the audience",
                token_of(&named[..aud_at + 3]),
                None,
                true,
                "Truncated",
            ),
            neg(
                "audience stripped: bit 2 cleared and its bytes removed",
                token_of(&stripped),
                Some("DB_PASSWORD"),
                true,
                "Tampered",
            ),
            neg(
                "audience changed (job:aaa to job:aab, still canonical)",
                token_of(&renamed),
                Some("DB_PASSWORD"),
                true,
                "Tampered",
            ),
            neg(
                "audience changed (uid 4294967295 to 4294967294)",
                token_of(&changed_uid),
                None,
                true,
                "Tampered",
            ),
            neg(
                "bound token, the opener does not admit its audience",
                tokens[1].clone(),
                None,
                false,
                "NotInAudience",
            ),
            neg(
                "bound token, wrong name: the name check comes first",
                tokens[8].clone(),
                Some("OTHER"),
                false,
                "NameMismatch",
            ),
            neg(
                "duplicate recipient: the same key id twice",
                token_of(&twice),
                None,
                true,
                "Malformed",
            ),
            neg(
                "unknown flag bit 3",
                token_of(&bit3),
                None,
                true,
                "Malformed",
            ),
        ];
        let doc = serde_json::json!({
            "comment": "nodeseal token format v1 test vectors for audiences (flags bit 2) and duplicate recipients; see docs/format.md. The key in v1-testkey.pem is TEST ONLY. accept_audience: what the opener's audience decision answers.",
            "key": "v1-testkey.pem",
            "thumbprint": key.thumbprint().to_hex(),
            "vectors": vectors,
            "negative": negative,
        });
        std::fs::write(
            audience_vectors_path(),
            serde_json::to_string_pretty(&doc).unwrap() + "\n",
        )
        .unwrap();
    }

    #[test]
    fn a_prepared_token_opens_with_the_content_key_its_recipient_unwraps_elsewhere() {
        let t = seal(b"remote", &[key_a().recipient()], &SealOptions::default()).unwrap();
        let prepared = PreparedV1::new(&t, None, &unbound_only, SystemTime::now()).unwrap();
        let (id, wrapped) = prepared.recipients().next().unwrap();
        assert_eq!(id, key_a().thumbprint());
        let content_key = unwrap_key(wrapped, key_a()).unwrap();
        let o = prepared
            .open_with(id, &content_key, None, SystemTime::now())
            .unwrap();
        assert_eq!(&o.value[..], b"remote");
        // A wrong content key (what a lying remote would return) never yields a value.
        let prepared = PreparedV1::new(&t, None, &unbound_only, SystemTime::now()).unwrap();
        assert!(matches!(
            prepared.open_with(id, &[7u8; CONTENT_KEY_BYTES], None, SystemTime::now()),
            Err(TokenError::Tampered)
        ));
    }
}
