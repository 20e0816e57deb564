//! Batch Shipyard's legacy format: standard padded base64 of RSA PKCS#1 v1.5 encryption of the
//! UTF-8 value, no prefix, no key id. Byte-compatible with `openssl rsautl -encrypt -pubin`.

use crate::error::TokenError;
use crate::keys::KeyPair;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::pkey::{PKey, Public};
use openssl::rsa::Padding;
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
    decrypt_pkcs1(&ct, key).ok_or(TokenError::Tampered)
}

/// The one place PKCS#1 v1.5 decryption happens, so that it can be swapped for an
/// implicit-rejection implementation without touching the callers.
fn decrypt_pkcs1(ct: &[u8], key: &KeyPair) -> Option<Zeroizing<Vec<u8>>> {
    let mut dec = Decrypter::new(key.private_key()).ok()?;
    dec.set_rsa_padding(Padding::PKCS1).ok()?;
    let mut out = Zeroizing::new(vec![0u8; dec.decrypt_len(ct).ok()?]);
    let result = dec.decrypt(ct, &mut out);
    // Don't leave padding errors queued for unrelated OpenSSL calls to report.
    let _ = openssl::error::ErrorStack::get();
    let n = result.ok()?;
    out.truncate(n);
    Some(out)
}

#[cfg(test)]
mod tests {
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
        // Wrong key: PKCS#1 v1.5 padding check fails (or, with negligible probability, yields
        // garbage), never the value.
        match open(&t, key_b()) {
            Err(TokenError::Tampered) => {}
            Ok(v) => assert_ne!(&v[..], b"v"),
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
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 128]);
        assert!(matches!(
            open(&short, key_a()),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(decode("YQ=="), Some(b"a".to_vec()));
        assert_eq!(decode("YQ"), None);
    }
}
