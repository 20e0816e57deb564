//! Batch Shipyard's legacy format: standard padded base64 of RSA PKCS#1 v1.5 encryption of the
//! UTF-8 value, no prefix, no key id. Byte-compatible with `openssl rsautl -encrypt -pubin`.

use crate::error::TokenError;
use crate::keys::KeyPair;
use openssl::pkey::{PKey, Public};
use zeroize::Zeroizing;

/// Largest value for a modulus of `modulus_len` bytes (PKCS#1 v1.5: k - 11).
pub fn max_value_len(modulus_len: usize) -> usize {
    modulus_len.saturating_sub(11)
}

/// Encrypt `value` for `public_key`; refuses values over [`max_value_len`] with the limit named.
pub fn seal(value: &[u8], public_key: &PKey<Public>) -> Result<String, TokenError> {
    todo!("{} {}", value.len(), public_key.bits())
}

/// Decode the base64; `None` if it is not standard padded base64.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    todo!("{s}")
}

/// Decrypt with `key`. The decoded length must equal the key's modulus length.
pub fn open(token: &str, key: &KeyPair) -> Result<Zeroizing<Vec<u8>>, TokenError> {
    todo!("{token} {key:?}")
}
