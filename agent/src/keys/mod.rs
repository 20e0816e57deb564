//! Private keys: the in-memory [`store`], where keys come from ([`sources`]), copying readable
//! ones into the agent's own store ([`ingest`]), withdrawn keys ([`revocation`]) and expiry
//! warnings ([`expiry`]); which source files are trusted and how they are read ([`trust`]).
//! Mutated only by the lifecycle task; read by request handlers.

pub(crate) mod expiry;
pub(crate) mod ingest;
pub(crate) mod revocation;
pub(crate) mod sources;
pub(crate) mod store;
pub(crate) mod trust;

pub(crate) use sources::{check_store_dir, key_sources};
pub(crate) use store::{Changes, KeyStore};
