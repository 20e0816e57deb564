//! Ingest: keys from sources task users can read (Batch certificate drops) are copied into the
//! agent's root-only store as PKCS#12 under a fresh random passphrase, then the readable
//! originals are deleted. Only keys that passed the key source rules ([`super::trust`]: no
//! links, regular files, owned by root, writable by no one else) are loaded, so only those are
//! ever ingested; the rules are checked once more right before the copy.

use super::sources::{check_store_dir, store_source, SourceId};
use super::store::KeyStore;
use super::trust::{self, DirProbe, Probe};
use crate::config::{Config, KeySource};
use crate::fsutil::atomic_write;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Ingest every loaded key of a source with `ingest` on. Returns the sources that lost files
/// (to be rescanned).
pub(crate) fn ingest(keys: &KeyStore, config: &Config, sources: &[KeySource]) -> Vec<SourceId> {
    let store = store_source(config);
    let store_id = SourceId::of(&store);
    let ingest_dirs: Vec<SourceId> = sources
        .iter()
        .filter(|s| s.ingest() && s.path != store.path)
        .map(SourceId::of)
        .collect();
    if ingest_dirs.is_empty() {
        return Vec::new();
    }
    let mut emptied: Vec<SourceId> = Vec::new();
    let mut store_checked = false;
    for entry in keys.loaded_entries() {
        let Some(source) = ingest_dirs
            .iter()
            .find(|s| entry.origin.parent() == Some(s.path.as_path()))
        else {
            continue;
        };
        // Only keys that passed the source rules were loaded; check again that they still
        // hold (a chmod since the scan), so nothing planted is ever copied into the store.
        if let Err(reason) = still_trusted(&entry.origin) {
            tracing::warn!(key_id = %entry.pair.thumbprint(), path = %entry.origin.display(), %reason, "not ingested: its source is no longer trusted");
            continue;
        }
        if !store_checked {
            if let Err(e) = check_store_dir(&store.path) {
                tracing::error!(error = %format!("{e:#}"), "key store unusable; keys are served from memory but not ingested");
                return emptied;
            }
            store_checked = true;
        }
        let tp = entry.pair.thumbprint();
        let pfx_path = store.path.join(format!("sha1-{tp}.pfx"));
        let pw_path = store.path.join(format!("sha1-{tp}.pfx.pw"));
        if !pfx_path.exists() {
            if let Err(e) = write_store_copy(&entry.pair, &pfx_path, &pw_path) {
                tracing::error!(key_id = %tp, path = %entry.origin.display(), error = %format!("{e:#}"), "ingest failed; original left in place");
                continue;
            }
            keys.adopt(&store_id, &pfx_path, &pw_path, entry.pair.clone());
        }
        // Say only what happened: on a read-only certs dir (the systemd start race,
        // crate::start_race) the copy is made but the readable original stays.
        if remove_originals(&entry.origin) {
            tracing::info!(key_id = %tp, from = %entry.origin.display(), to = %pfx_path.display(), "key ingested; readable original removed");
        } else {
            tracing::warn!(key_id = %tp, from = %entry.origin.display(), to = %pfx_path.display(), "key ingested but the readable original is still there; task users may read it");
        }
        if !emptied.contains(source) {
            emptied.push(source.clone());
        }
    }
    emptied
}

fn write_store_copy(
    pair: &nodeseal_envelope::KeyPair,
    pfx_path: &Path,
    pw_path: &Path,
) -> Result<()> {
    let mut raw = zeroize::Zeroizing::new([0u8; 24]);
    openssl::rand::rand_bytes(raw.as_mut()).context("cannot draw a random passphrase")?;
    let passphrase =
        zeroize::Zeroizing::new(raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let pfx = pair
        .to_pkcs12(passphrase.as_bytes(), false)
        .context("cannot export the key as PKCS#12")?;
    // Passphrase first: a PFX without its .pw is merely pending, a .pw alone is ignored.
    atomic_write(pw_path, passphrase.as_bytes(), 0o600)?;
    atomic_write(pfx_path, &pfx, 0o600)?;
    Ok(())
}

/// The key file, its `.pw` and their directory still pass the key source rules.
fn still_trusted(origin: &Path) -> Result<(), String> {
    let dir = origin.parent().unwrap_or(Path::new("/"));
    match trust::probe_dir(dir) {
        DirProbe::Trusted => {}
        DirProbe::Missing => return Err(format!("{} is gone", dir.display())),
        DirProbe::Refused(reason, _) => return Err(reason),
    }
    for f in [
        origin.to_path_buf(),
        PathBuf::from(format!("{}.pw", origin.display())),
    ] {
        match trust::probe(&f) {
            Probe::Open(_) => {}
            Probe::Missing => return Err(format!("{} is gone", f.display())),
            Probe::Refused(reason, _) => return Err(reason),
        }
    }
    Ok(())
}

/// Remove the PFX and its `.pw`. True when neither is left.
fn remove_originals(origin: &Path) -> bool {
    let pw = PathBuf::from(format!("{}.pw", origin.display()));
    let mut all_gone = true;
    for f in [origin.to_path_buf(), pw] {
        match fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                all_gone = false;
                tracing::warn!(path = %f.display(), error = %e, "cannot remove ingested original; task users may still read it")
            }
        }
    }
    all_gone
}
