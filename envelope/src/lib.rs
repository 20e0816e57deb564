//! nodeseal's shared core: the v1 token format, Batch Shipyard's legacy format, RSA key loading
//! and policy, and the env-file parser. Used by the agent and by the `nodeseal` CLI; never by the
//! thin client (which must not link OpenSSL).
//!
//! Secrets: private keys live in OpenSSL's `PKey` (freed with `BN_clear_free`), content keys and
//! cleartext values in `Zeroizing` buffers; no type here derives `Debug` over secret material.
#![forbid(unsafe_code)]

pub mod audience;
pub mod envfile;
pub mod error;
pub mod keys;
pub mod legacy;
pub mod token;

pub use audience::Selector;
pub use error::{EnvFileError, KeyError, TokenError};
pub use keys::{KeyPair, Recipient, Thumbprint};
pub use token::{Format, Opened, PreparedV1, SealOptions, TokenInfo};

#[cfg(test)]
pub(crate) mod testutil {
    use crate::keys::KeyPair;
    use std::path::Path;
    use std::sync::OnceLock;

    /// A generated RSA-2048 pair, shared by the tests of one process (generation is slow).
    pub(crate) fn key_a() -> &'static KeyPair {
        static K: OnceLock<KeyPair> = OnceLock::new();
        K.get_or_init(|| KeyPair::generate(2048, 30, "test-a").unwrap())
    }

    /// A second, unrelated pair.
    pub(crate) fn key_b() -> &'static KeyPair {
        static K: OnceLock<KeyPair> = OnceLock::new();
        K.get_or_init(|| KeyPair::generate(2048, 30, "/CN=test-b/O=nodeseal tests").unwrap())
    }

    /// Path of the committed test-vector key (TEST ONLY).
    pub(crate) fn vector_key_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/v1-testkey.pem")
    }

    pub(crate) fn vector_key() -> KeyPair {
        KeyPair::load(&vector_key_path(), None).unwrap()
    }
}
