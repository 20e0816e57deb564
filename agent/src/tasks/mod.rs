//! Tasks and their env files: the [`index`] of known files by path and by task directory with
//! their parsed, classified values and per-value cache; reading one file ([`envfile`]); when a
//! file still being written may be read ([`settle`]); how fast one uid's files are read
//! ([`pace`]); finding files under the env roots ([`discovery`]). Mutated only by the lifecycle
//! task; read by request handlers.

pub(crate) mod discovery;
pub(crate) mod envfile;
pub(crate) mod index;
pub(crate) mod layout;
pub(crate) mod pace;
pub(crate) mod settle;

pub(crate) use envfile::ValueKind;
pub(crate) use index::{Cached, EnvEntry, Tasks};
