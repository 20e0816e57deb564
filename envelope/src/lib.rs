//! nodeseal's shared core: the v1 token format, Batch Shipyard's legacy format, RSA key loading
//! and policy, and the env-file parser. Used by the agent and by the `nodeseal` CLI; never by the
//! thin client (which must not link OpenSSL).
//!
//! Secrets: private keys live in OpenSSL's `PKey` (freed with `BN_clear_free`), content keys and
//! cleartext values in `Zeroizing` buffers; no type here derives `Debug` over secret material.
#![forbid(unsafe_code)]

pub mod envfile;
pub mod error;
pub mod keys;
pub mod legacy;
pub mod token;

pub use error::{EnvFileError, KeyError, TokenError};
pub use keys::{KeyPair, Recipient, Thumbprint};
pub use token::{Format, Opened, SealOptions, TokenInfo};
