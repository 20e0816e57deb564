//! Keys and env files over time: initial load, rescans, ingest into the root-only store,
//! revocation and restore, and the atomic writes that make all of it survive a crash.

use crate::config::{Config, KeySource, KeySourceKind};
use crate::keystore::{self, Changes};
use crate::service::Agent;
use crate::tasks::{Classifier, FileUpdate};
use anyhow::{bail, Context, Result};
use nodeseal_envelope::Thumbprint;
use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File in the state dir listing thumbprints revoked by command (survives restarts).
const REVOKED_BY_COMMAND: &str = "revoked-by-command";
/// How deep below an env root task env files may sit (`<sched>/<job>/job-1/<task>/wd/file`
/// is 6).
const MAX_ENV_DEPTH: usize = 8;

/// All key sources in force: the configured ones, then the agent's own store.
pub fn key_sources(config: &Config) -> Vec<KeySource> {
    let mut sources = config.key_sources.clone();
    sources.push(KeySource {
        kind: KeySourceKind::BatchCerts,
        path: config.key_store_dir(),
        ingest: Some(false),
        passphrase_file: None,
    });
    sources
}

/// Write `bytes` to `path` atomically: a temp file in the same directory with `mode`, fsync,
/// rename over the target, fsync the directory. A crash leaves either the old or the new file.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".nodeseal-")
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

/// Make sure the key store directory exists, is ours and is private; refuse it otherwise,
/// because a store others can write could be fed keys, and one others can read leaks them.
pub fn check_store_dir(dir: &Path) -> Result<()> {
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

/// Rescan every key source (and the store), ingest where configured, reload the revocation
/// lists, and evict cached values of keys that went away.
pub fn rescan_keys(agent: &Agent) {
    rescan_keys_with(agent, true);
}

/// [`rescan_keys`], optionally without the ingest step. Start-up loads without it so READY does
/// not wait for the store's fsyncs; the ingest pass runs right after.
pub fn rescan_keys_with(agent: &Agent, do_ingest: bool) {
    let _serial = agent.key_scan.lock().unwrap_or_else(|e| e.into_inner());
    let config = agent.config();
    let sources = key_sources(&config);
    let mut changes = Changes::default();
    for (i, source) in sources.iter().enumerate() {
        merge(&mut changes, agent.keys.rescan_source(i, source));
    }
    merge(&mut changes, agent.keys.drop_sources_from(sources.len()));
    if do_ingest {
        let emptied = ingest(agent, &config, &sources);
        // The store copies were adopted as they were written; the originals are gone now.
        for i in emptied {
            merge(&mut changes, agent.keys.rescan_source(i, &sources[i]));
        }
    }
    merge(&mut changes, reload_revocations(agent, &config));
    report(agent, &changes);
}

/// Rescan only the sources whose directory is `dir`.
pub fn rescan_key_dir(agent: &Agent, dir: &Path) {
    let config = agent.config();
    let sources = key_sources(&config);
    if sources.iter().any(|s| s.path == dir) {
        rescan_keys(agent);
    }
}

fn merge(into: &mut Changes, from: Changes) {
    into.added.extend(from.added);
    into.removed.extend(from.removed);
}

fn report(agent: &Agent, changes: &Changes) {
    // A key that left and came back in one pass is net unchanged.
    let added: HashSet<_> = changes.added.iter().collect();
    let removed: HashSet<_> = changes.removed.iter().collect();
    for tp in removed.difference(&added) {
        let evicted = agent.tasks.evict_key(tp);
        tracing::warn!(key_id = %tp, evicted, "key no longer available; cached values evicted");
    }
    for tp in added.difference(&removed) {
        tracing::info!(key_id = %tp, "key available");
    }
}

/// Reload the revocation list file and the by-command list.
pub fn reload_revocations(agent: &Agent, config: &Config) -> Changes {
    let mut changes = Changes::default();
    let list = match &config.revocation_list {
        Some(path) => match fs::read_to_string(path) {
            Ok(text) => keystore::parse_revocation_list(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => {
                // Fail closed would revoke nothing we know of; keep the previous list instead.
                tracing::error!(path = %path.display(), error = %e, "cannot read revocation list; keeping the previous one");
                return changes;
            }
        },
        None => HashSet::new(),
    };
    merge(&mut changes, agent.keys.set_revocation_list(list));
    let by_command = config.state_dir.join(REVOKED_BY_COMMAND);
    if let Ok(text) = fs::read_to_string(&by_command) {
        for tp in keystore::parse_revocation_list(&text, &by_command) {
            merge(&mut changes, agent.keys.set_revoked_by_command(tp, true));
        }
    }
    changes
}

fn persist_revoked_by_command(agent: &Agent, config: &Config) -> Result<()> {
    let mut text =
        String::from("# thumbprints revoked with `nodeseal-agent revoke`; managed by the agent\n");
    for tp in agent.keys.revoked_by_command() {
        text.push_str(&tp.to_string());
        text.push('\n');
    }
    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state dir {}", config.state_dir.display()))?;
    atomic_write(
        &config.state_dir.join(REVOKED_BY_COMMAND),
        text.as_bytes(),
        0o600,
    )
}

/// Withdraw a key until restored; with `purge`, also delete its ingested copy.
pub fn revoke(agent: &Agent, tp: Thumbprint, purge: bool) -> Result<()> {
    let config = agent.config();
    let changes = agent.keys.set_revoked_by_command(tp, true);
    let evicted = agent.tasks.evict_key(&tp);
    tracing::warn!(key_id = %tp, evicted, purge, "key revoked by command");
    let persisted = persist_revoked_by_command(agent, &config);
    if purge {
        let store = config.key_store_dir();
        for name in [format!("sha1-{tp}.pfx"), format!("sha1-{tp}.pfx.pw")] {
            match fs::remove_file(store.join(&name)) {
                Ok(()) => tracing::warn!(key_id = %tp, file = %name, "ingested key purged"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot purge {}", store.join(&name).display()))
                }
            }
        }
        rescan_keys(agent);
    }
    report(agent, &changes);
    persisted.context("the key is revoked in memory, but the revocation could not be saved and will not survive a restart")
}

/// Undo a revocation by command (a revocation-list entry stays in force until removed).
pub fn restore(agent: &Agent, tp: Thumbprint) -> Result<()> {
    let config = agent.config();
    let changes = agent.keys.set_revoked_by_command(tp, false);
    tracing::info!(key_id = %tp, "key restored by command");
    report(agent, &changes);
    persist_revoked_by_command(agent, &config)
}

/// Copy keys from sources with `ingest` into the store as PKCS#12 under a fresh random
/// passphrase, then delete the readable originals. Returns the indexes of the sources that lost
/// files (to be rescanned).
fn ingest(agent: &Agent, config: &Config, sources: &[KeySource]) -> Vec<usize> {
    let store = config.key_store_dir();
    let store_index = sources.len() - 1;
    let ingest_dirs: Vec<(usize, &Path)> = sources
        .iter()
        .enumerate()
        .filter(|(_, s)| s.ingest() && s.path != store)
        .map(|(i, s)| (i, s.path.as_path()))
        .collect();
    if ingest_dirs.is_empty() {
        return Vec::new();
    }
    let mut emptied = Vec::new();
    let mut store_checked = false;
    for entry in agent.keys.loaded_entries() {
        let Some(&(index, _)) = ingest_dirs
            .iter()
            .find(|(_, d)| entry.origin.parent() == Some(*d))
        else {
            continue;
        };
        if !store_checked {
            if let Err(e) = check_store_dir(&store) {
                tracing::error!(error = %format!("{e:#}"), "key store unusable; keys are served from memory but not ingested");
                return emptied;
            }
            store_checked = true;
        }
        let tp = entry.pair.thumbprint();
        let pfx_path = store.join(format!("sha1-{tp}.pfx"));
        let pw_path = store.join(format!("sha1-{tp}.pfx.pw"));
        if !pfx_path.exists() {
            if let Err(e) = write_store_copy(&entry.pair, &pfx_path, &pw_path) {
                tracing::error!(key_id = %tp, path = %entry.origin.display(), error = %format!("{e:#}"), "ingest failed; original left in place");
                continue;
            }
            agent
                .keys
                .adopt(store_index, &pfx_path, &pw_path, entry.pair.clone());
        }
        remove_originals(&entry.origin);
        tracing::info!(key_id = %tp, from = %entry.origin.display(), to = %pfx_path.display(), "key ingested; readable original removed");
        if !emptied.contains(&index) {
            emptied.push(index);
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

fn remove_originals(origin: &Path) {
    let mut files = vec![origin.to_path_buf()];
    let pw = PathBuf::from(format!("{}.pw", origin.display()));
    files.push(pw);
    for f in files {
        match fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %f.display(), error = %e, "cannot remove ingested original; task users may still read it")
            }
        }
    }
}

/// Read every env file under the configured roots and forget the ones that are gone.
/// Returns files that are still being written (retry after they settle).
pub fn rescan_env(agent: &Agent) -> Vec<PathBuf> {
    let config = agent.config();
    let mut seen = HashSet::new();
    let mut unsettled = Vec::new();
    for root in &config.env_roots {
        let mut found = Vec::new();
        find_env_files(root, &config.env_file_names, 0, &mut found);
        for path in found {
            if let FileUpdate::Unsettled = update_env_file(agent, &path, root) {
                unsettled.push(path.clone());
            }
            seen.insert(path);
        }
    }
    for path in agent.tasks.paths() {
        if !seen.contains(&path) {
            agent.tasks.remove(&path);
            tracing::info!(path = %path.display(), "env file gone; its values are forgotten");
        }
    }
    unsettled
}

/// Scan one directory (created after start, or moved in) for env files.
pub fn scan_env_dir(agent: &Agent, dir: &Path) -> Vec<PathBuf> {
    let config = agent.config();
    let Some(root) = config.env_roots.iter().find(|r| dir.starts_with(r)) else {
        return Vec::new();
    };
    let depth = dir.strip_prefix(root).map_or(0, |r| r.components().count());
    let mut found = Vec::new();
    find_env_files(dir, &config.env_file_names, depth, &mut found);
    let mut unsettled = Vec::new();
    for path in found {
        if let FileUpdate::Unsettled = update_env_file(agent, &path, root) {
            unsettled.push(path);
        }
    }
    unsettled
}

/// (Re)read one env file and log what happened.
pub fn update_env_file(agent: &Agent, path: &Path, root: &Path) -> FileUpdate {
    let config = agent.config();
    let classifier = Classifier {
        legacy_names: &config.legacy_names,
        legacy_by_length: config.legacy_by_length,
    };
    let update = agent.tasks.update_file(path, root, &classifier);
    match &update {
        FileUpdate::Loaded { vars } => {
            tracing::info!(path = %path.display(), vars, "env file loaded")
        }
        FileUpdate::Removed => {
            tracing::info!(path = %path.display(), "env file gone; its values are forgotten")
        }
        FileUpdate::Unsettled => {
            tracing::debug!(path = %path.display(), "env file still being written")
        }
        FileUpdate::Invalid(reason) => {
            tracing::warn!(path = %path.display(), %reason, "env file skipped")
        }
        FileUpdate::Unchanged => {}
    }
    update
}

fn find_env_files(dir: &Path, names: &[String], depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_ENV_DEPTH {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        // file_type() does not follow symlinks: a task cannot point us at someone else's file.
        let Ok(ft) = entry.file_type() else { continue };
        let path = entry.path();
        if ft.is_dir() {
            find_env_files(&path, names, depth + 1, out);
        } else if ft.is_file() && names.iter().any(|n| entry.file_name() == n.as_str()) {
            out.push(path);
        }
    }
}

/// Warn about certificates that expired or expire within 30 days, at most once a day per key
/// (rescans run every minute; the journal should not).
pub fn warn_expiring(agent: &Agent) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut warned = agent
        .expiry_warned
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for e in agent.keys.loaded_entries() {
        let tp = e.pair.thumbprint();
        let left = e.pair.not_after_unix() - now;
        if left >= 30 * 86_400 {
            continue;
        }
        if warned
            .get(&tp)
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(86_400))
        {
            continue;
        }
        warned.insert(tp, std::time::Instant::now());
        if left < 0 {
            tracing::warn!(key_id = %tp, path = %e.origin.display(), "certificate has expired; its tokens still open, but rotate the key");
        } else {
            tracing::warn!(key_id = %tp, path = %e.origin.display(), days_left = left / 86_400, "certificate expires within 30 days; rotate the key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

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
}
