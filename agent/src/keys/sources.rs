//! Where keys come from: the configured sources plus the agent's own store, each known by what
//! it is (kind and directory) so a config reload that reorders or drops sources keeps every
//! key attributed to the right one.

use crate::config::{Config, KeySource, KeySourceKind};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A key source's identity: its layout and its directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SourceId {
    pub(crate) kind: KeySourceKind,
    pub(crate) path: PathBuf,
}

impl SourceId {
    pub(crate) fn of(source: &KeySource) -> Self {
        Self {
            kind: source.kind,
            path: source.path.clone(),
        }
    }
}

/// The agent's own store of ingested keys: a Batch-style drop only the agent can read.
pub(crate) fn store_source(config: &Config) -> KeySource {
    KeySource {
        kind: KeySourceKind::BatchCerts,
        path: config.key_store_dir(),
        ingest: Some(false),
        passphrase_file: None,
    }
}

/// All key sources in force: the configured ones, then the agent's own store.
pub(crate) fn key_sources(config: &Config) -> Vec<KeySource> {
    let mut sources = config.key_sources.clone();
    sources.push(store_source(config));
    sources
}

/// Make sure the key store directory exists, is ours and is private; refuse it otherwise,
/// because a store others can write could be fed keys, and one others can read leaks them.
pub(crate) fn check_store_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create key store {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot chmod 0700 {}", dir.display()))?;
    }
    let meta = fs::symlink_metadata(dir)
        .with_context(|| format!("cannot stat key store {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        bail!(
            "key store {} is not a directory; remove it and restart the agent",
            dir.display()
        );
    }
    if meta.uid() != me {
        bail!(
            "key store {} is owned by uid {}, not by the agent (uid {me}); fix with: chown {me} {}",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "key store {} has mode {:o}, readable or writable by others; fix with: chmod 700 {}",
            dir.display(),
            meta.mode() & 0o777,
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_dir_with_loose_permissions_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("keys");
        check_store_dir(&store).unwrap();
        assert_eq!(fs::metadata(&store).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
        let msg = format!("{:#}", check_store_dir(&store).unwrap_err());
        assert!(msg.contains("chmod 700"), "{msg}");
    }

    #[test]
    fn the_store_is_the_last_source_and_known_by_its_directory() {
        let config = Config::default();
        let sources = key_sources(&config);
        let store = SourceId::of(sources.last().unwrap());
        assert_eq!(store.path, config.key_store_dir());
        assert_eq!(store, SourceId::of(&store_source(&config)));
        assert!(!store_source(&config).ingest());
    }
}
