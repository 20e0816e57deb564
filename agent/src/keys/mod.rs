//! Private keys: the in-memory [`store`], where keys come from ([`sources`]), copying readable
//! ones into the agent's own store ([`ingest`]), withdrawn keys ([`revocation`]) and expiry
//! warnings ([`expiry`]). Mutated only by the lifecycle task; read by request handlers.

pub(crate) mod expiry;
pub(crate) mod ingest;
pub mod revocation;
pub mod sources;
pub mod store;

pub use sources::{check_store_dir, key_sources};
pub use store::{Changes, KeyStore};
