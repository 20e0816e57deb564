//! Batch Shipyard's legacy format: standard padded base64 of RSA PKCS#1 v1.5 encryption of the
//! UTF-8 value, no prefix, no key id. Byte-compatible with `openssl rsautl -encrypt -pubin`.

use crate::error::TokenError;
use crate::keys::KeyPair;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use openssl::bn::BigNum;
use openssl::encrypt::Encrypter;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Padding;
use openssl::sha::Sha256;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};
use zeroize::Zeroizing;

/// Largest value for a modulus of `modulus_len` bytes (PKCS#1 v1.5: k - 11).
pub fn max_value_len(modulus_len: usize) -> usize {
    modulus_len.saturating_sub(11)
}

/// Encrypt `value` for `public_key`; refuses values over [`max_value_len`] with the limit named.
pub fn seal(value: &[u8], public_key: &PKey<Public>) -> Result<String, TokenError> {
    let k = public_key.size();
    let max = max_value_len(k);
    if value.len() > max {
        return Err(TokenError::TooLarge {
            len: value.len(),
            max,
            format: format!("shipyard (RSA-{})", public_key.bits()),
        });
    }
    let crypto = |source| TokenError::Crypto {
        during: "encrypting a Shipyard value",
        source,
    };
    let mut enc = Encrypter::new(public_key).map_err(crypto)?;
    enc.set_rsa_padding(Padding::PKCS1).map_err(crypto)?;
    let mut out = vec![0u8; enc.encrypt_len(value).map_err(crypto)?];
    let n = enc.encrypt(value, &mut out).map_err(crypto)?;
    out.truncate(n);
    Ok(STANDARD.encode(out))
}

/// Decode the base64; `None` if it is not standard padded base64.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

/// Decrypt with `key`. The decoded length must equal the key's modulus length.
///
/// **Implicit rejection.** A ciphertext whose PKCS#1 v1.5 padding is invalid does *not* produce
/// an error: it yields a deterministic pseudo-random "synthetic" message (see
/// [`decrypt_implicit_rejection`]). Only publicly checkable structure is reported as an error
/// (bad base64, wrong length for the key, ciphertext not below the modulus). This removes the
/// Bleichenbacher/Marvin padding oracle, and it has one consequence for callers:
///
/// - **A wrong key is not detected.** Opening with a key the value was not sealed for returns
///   garbage, never `Err`. Callers holding several keys of the same size must not "try keys until
///   one succeeds" — the first one always "succeeds". Choose the key by configuration (the one
///   certificate a legacy pool was given), never by trial decryption.
pub fn open(token: &str, key: &KeyPair) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    let ct = decode(token).ok_or_else(|| {
        TokenError::Malformed(
            "not standard padded base64 (a Batch Shipyard value is one line of base64 with '=' \
             padding)"
                .to_owned(),
        )
    })?;
    if ct.len() != key.modulus_len() {
        return Err(TokenError::Malformed(format!(
            "decoded length is {} bytes but key {} has a {}-byte modulus: sealed for another key \
             size, or damaged",
            ct.len(),
            key.thumbprint(),
            key.modulus_len()
        )));
    }
    decrypt_implicit_rejection(&ct, key.private_key())
}

/// RSAES-PKCS1-v1_5 decryption with implicit rejection, following
/// draft-irtf-cfrg-rsa-guidance ("Implicit rejection") exactly as OpenSSL >= 3.2 implements it
/// (`crypto/rsa/rsa_ossl.c` `derive_kdk`, `crypto/rsa/rsa_pk1.c` `ossl_rsa_prf` and
/// `ossl_rsa_padding_check_PKCS1_type_2`), so a value opened here and by OpenSSL 3.2+ is the same
/// bytes — valid or not. The machine's OpenSSL is 3.0, which would report padding errors, so
/// the padding is removed here from a raw (`RSA_NO_PADDING`) private-key operation:
///
/// 1. `em = c^d mod n`, `k` bytes (OpenSSL blinds the exponentiation).
/// 2. `KDK = HMAC-SHA256(key = SHA-256(d as k big-endian bytes), msg = c)`.
/// 3. `synthetic = PRF(KDK, "message", 8k bits)`; 128 candidate lengths from
///    `PRF(KDK, "length", 4096 bits)`, each 16-bit big-endian value masked to the bit width of
///    `k - 10`; the last candidate below `k - 10` wins (0 if none: probability 2^-128).
///    `PRF(key, label, bits)` is the concatenation over `i = 0, 1, ...` of
///    `HMAC-SHA256(key, be16(i) || label || be16(bits))`, truncated to `bits / 8` bytes.
/// 4. Check `em = 00 02 PS 00 M` with `|PS| >= 8` in constant time (every byte examined, `subtle`
///    selects, no branch on secret data) and return `M`, or the last `synthetic_length` bytes of
///    `synthetic` if the check failed.
///
/// The length of the result is not a padding signal: synthetic messages have random lengths
/// too. `Err` only for public problems: `ct` not `k` bytes, or not below the modulus.
pub fn decrypt_implicit_rejection(
    ct: &[u8],
    key: &PKey<Private>,
) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    let crypto = |source| TokenError::Crypto {
        during: "decrypting a Shipyard value",
        source,
    };
    let rsa = key.rsa().map_err(crypto)?;
    let k = rsa.size() as usize;
    if ct.len() != k {
        return Err(TokenError::Malformed(format!(
            "RSA ciphertext is {} bytes; this key needs exactly {k}",
            ct.len()
        )));
    }
    // Public: the modulus and the ciphertext are both known to everyone.
    let c = BigNum::from_slice(ct).map_err(crypto)?;
    if c.ucmp(rsa.n()) != std::cmp::Ordering::Less {
        return Err(TokenError::Malformed(
            "RSA ciphertext is not smaller than the key's modulus: not sealed for this key, or \
             damaged"
                .to_owned(),
        ));
    }
    let mut em = Zeroizing::new(vec![0u8; k]);
    let n = rsa.private_decrypt(ct, &mut em, Padding::NONE);
    // Leave no queued errors behind for unrelated OpenSSL calls to report.
    let _ = openssl::error::ErrorStack::get();
    if n.map_err(crypto)? != k {
        return Err(TokenError::Crypto {
            during: "decrypting a Shipyard value (short raw RSA output)",
            source: openssl::error::ErrorStack::get(),
        });
    }
    let d = Zeroizing::new(rsa.d().to_vec_padded(k as i32).map_err(crypto)?);
    let d_hash = Zeroizing::new(sha256(&d));
    let kdk = Zeroizing::new(hmac_sha256(&d_hash[..], &[ct]));
    Ok(unpad_implicit(&em, &kdk))
}

/// Step 3 and 4 of [`decrypt_implicit_rejection`] on the raw RSA output `em` (`k` bytes).
fn unpad_implicit(em: &[u8], kdk: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    const LEN_CANDIDATES: usize = 128;
    let k = em.len();
    let synthetic = prf(kdk, b"message", k);
    let lengths = prf(kdk, b"length", LEN_CANDIDATES * 2);
    // Largest message a k-byte block can carry: k minus 00 02, 8 bytes of PS.
    let max_sep_offset = (k - 10) as u32;
    let mut len_mask = max_sep_offset;
    len_mask |= len_mask >> 1;
    len_mask |= len_mask >> 2;
    len_mask |= len_mask >> 4;
    len_mask |= len_mask >> 8;
    let mut synthetic_len = 0u32;
    for pair in lengths.chunks_exact(2) {
        let candidate = u32::from(u16::from_be_bytes([pair[0], pair[1]])) & len_mask;
        let fits = max_sep_offset.ct_gt(&candidate);
        synthetic_len = u32::conditional_select(&synthetic_len, &candidate, fits);
    }
    let synth_index = k as u32 - synthetic_len;

    let mut good = em[0].ct_eq(&0) & em[1].ct_eq(&2);
    let mut found_zero = Choice::from(0);
    let mut zero_index = 0u32;
    for (i, &b) in em.iter().enumerate().skip(2) {
        let is_zero = b.ct_eq(&0);
        zero_index = u32::conditional_select(&zero_index, &(i as u32), !found_zero & is_zero);
        found_zero |= is_zero;
    }
    // PS starts at index 2 and needs 8 bytes, so the separator is at index 10 or later; a
    // missing separator leaves zero_index at 0, which fails this too.
    good &= zero_index.ct_gt(&9);
    let msg_index = u32::conditional_select(&synth_index, &(zero_index + 1), good) as usize;
    // Read both buffers at every position so the cache footprint does not depend on `good`.
    let mut out = Zeroizing::new(Vec::with_capacity(k));
    for i in msg_index..k {
        out.push(u8::conditional_select(&synthetic[i], &em[i], good));
    }
    out
}

/// `PRF(key, label, 8 * len bits)` of draft-irtf-cfrg-rsa-guidance (OpenSSL `ossl_rsa_prf`).
fn prf(key: &[u8; 32], label: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    // len <= 512 for RSA-4096, so the bit length always fits the 16-bit field.
    let bits = u16::try_from(len * 8).unwrap_or(u16::MAX).to_be_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut iter: u16 = 0;
    while out.len() < len {
        let block = Zeroizing::new(hmac_sha256(key, &[&iter.to_be_bytes(), label, &bits]));
        out.extend_from_slice(&block[..]);
        iter = iter.wrapping_add(1);
    }
    out.truncate(len);
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finish()
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`, for a key of at most 64 bytes.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    debug_assert!(key.len() <= 64);
    let mut k0 = Zeroizing::new([0u8; 64]);
    k0[..key.len()].copy_from_slice(key);
    let mut pad = Zeroizing::new([0u8; 64]);
    for (p, k) in pad.iter_mut().zip(k0.iter()) {
        *p = k ^ 0x36;
    }
    let mut inner = Sha256::new();
    inner.update(&pad[..]);
    for part in parts {
        inner.update(part);
    }
    let inner = Zeroizing::new(inner.finish());
    for (p, k) in pad.iter_mut().zip(k0.iter()) {
        *p = k ^ 0x5c;
    }
    let mut outer = Sha256::new();
    outer.update(&pad[..]);
    outer.update(&inner[..]);
    outer.finish()
}

#[cfg(test)]
#[path = "legacy_vectors.rs"]
mod vectors;

#[cfg(test)]
mod tests {
    use super::vectors;
    use super::*;
    use crate::testutil::{key_a, key_b};

    #[test]
    fn round_trip_and_limits() {
        let pk = key_a().recipient().public_key;
        let t = seal("pässword".as_bytes(), &pk).unwrap();
        assert_eq!(t.len(), 344);
        assert_eq!(&open(&t, key_a()).unwrap()[..], "pässword".as_bytes());
        assert_eq!(max_value_len(256), 245);
        assert!(seal(&[b'x'; 245], &pk).is_ok());
        match seal(&[b'x'; 246], &pk) {
            Err(
                e @ TokenError::TooLarge {
                    len: 246, max: 245, ..
                },
            ) => {
                assert!(e.to_string().contains("245"), "{e}");
                assert!(e.to_string().contains("RSA-2048"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_inputs() {
        let t = seal(b"v", &key_a().recipient().public_key).unwrap();
        // Wrong key: implicit rejection yields a synthetic value, never the cleartext and never
        // a padding error; the only possible error is the public "not below the modulus" check.
        match open(&t, key_b()) {
            Ok(v) => assert_ne!(&v[..], b"v"),
            Err(TokenError::Malformed(m)) => assert!(m.contains("modulus"), "{m}"),
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(
            open("not base64!", key_a()),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            open(&t.replace('=', ""), key_a()),
            Err(TokenError::Malformed(_))
        ));
        let short = STANDARD.encode([1u8; 128]);
        assert!(matches!(
            open(&short, key_a()),
            Err(TokenError::Malformed(_))
        ));
        // All-0xff is above any 2048-bit modulus: a public, structural error.
        let big = STANDARD.encode([0xffu8; 256]);
        match open(&big, key_a()) {
            Err(TokenError::Malformed(m)) => assert!(m.contains("modulus"), "{m}"),
            Ok(_) => panic!("ciphertext >= n accepted"),
            Err(e) => panic!("{e}"),
        }
        assert_eq!(decode("YQ=="), Some(b"a".to_vec()));
        assert_eq!(decode("YQ"), None);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Appendix B.1 of draft-irtf-cfrg-rsa-guidance: valid ciphertexts give their message, and
    /// every invalid one gives exactly the synthetic message the draft (and OpenSSL 3.2+)
    /// computes. A slip in the KDK, PRF, length selection or padding check changes these bytes.
    #[test]
    fn draft_implicit_rejection_vectors() {
        let key = PKey::private_key_from_pem(vectors::KEY_2048.as_bytes()).unwrap();
        for (title, ct, want) in vectors::CASES_2048 {
            let got = decrypt_implicit_rejection(&hex(ct), &key)
                .unwrap_or_else(|e| panic!("{title}: {e}"));
            assert_eq!(&got[..], &hex(want)[..], "{title}");
        }
    }

    #[test]
    fn hmac_matches_openssl() {
        let key = [7u8; 32];
        let pkey = PKey::hmac(&key).unwrap();
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
        signer.update(b"abc").unwrap();
        signer.update(b"defg").unwrap();
        let want = signer.sign_to_vec().unwrap();
        assert_eq!(&hmac_sha256(&key, &[b"abc", b"defg"])[..], &want[..]);
    }

    /// Ciphertexts made by the `openssl` command line tool (what Batch Shipyard ran) decrypt to
    /// the value, including a 1-byte and a maximum-length one.
    #[test]
    fn opens_openssl_rsautl_ciphertexts() {
        let dir = tempfile::tempdir().unwrap();
        let pub_pem = dir.path().join("pub.pem");
        std::fs::write(
            &pub_pem,
            key_a().recipient().public_key.public_key_to_pem().unwrap(),
        )
        .unwrap();
        let max = "m".repeat(245);
        for value in ["x", "pässword with spaces", max.as_str()] {
            let mut child = std::process::Command::new("openssl")
                .args(["rsautl", "-encrypt", "-pubin", "-inkey"])
                .arg(&pub_pem)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("the openssl command is needed for this test");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(value.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let token = STANDARD.encode(&out.stdout);
            assert_eq!(&open(&token, key_a()).unwrap()[..], value.as_bytes());
        }
    }

    /// Encrypt a raw (unpadded) block with the public key: lets tests build any padding.
    fn raw_encrypt(block: &[u8], key: &KeyPair) -> String {
        let rsa = key.recipient().public_key.rsa().unwrap();
        let mut out = vec![0u8; rsa.size() as usize];
        rsa.public_encrypt(block, &mut out, Padding::NONE).unwrap();
        STANDARD.encode(out)
    }

    /// A block with valid padding except for `breakage`.
    fn block(breakage: usize, seed: u8) -> Vec<u8> {
        let mut b = vec![0u8; 256];
        b[1] = 2;
        for (i, x) in b.iter_mut().enumerate().skip(2) {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1;
        }
        b[200] = 0; // separator: 54-byte message
        match breakage {
            0 => {}
            1 => b[0] = 1,      // first byte not 00
            2 => b[1] = 1,      // block type not 02
            3 => b[5] = 0,      // separator inside the 8 PS bytes
            4 => b[200] = 0x55, // no separator at all
            _ => b[2] = 0,      // zero-length PS
        }
        b
    }

    #[test]
    fn bad_padding_is_deterministic_never_an_error() {
        let good = raw_encrypt(&block(0, 1), key_a());
        assert_eq!(&open(&good, key_a()).unwrap()[..], &block(0, 1)[201..]);
        let mut outputs = Vec::new();
        for breakage in 1..=5 {
            for seed in [1u8, 2] {
                let t = raw_encrypt(&block(breakage, seed), key_a());
                let first = open(&t, key_a()).unwrap_or_else(|e| panic!("{breakage}: {e}"));
                let again = open(&t, key_a()).unwrap();
                assert_eq!(&first[..], &again[..], "same ciphertext, same output");
                assert!(first.len() <= 256 - 10, "{}", first.len());
                outputs.push(first.to_vec());
            }
        }
        for i in 0..outputs.len() {
            for j in i + 1..outputs.len() {
                assert_ne!(outputs[i], outputs[j], "cases {i} and {j} collide");
            }
        }
        // Another key's synthetic value for the same bytes differs: the KDK depends on d.
        let t = raw_encrypt(&block(1, 1), key_a());
        if let Ok(other) = open(&t, key_b()) {
            assert_ne!(&other[..], &outputs[0][..]);
        }
    }
}
