//! The systemd start race. The unit lists the task roots as `ReadWritePaths=-/mnt/batch/tasks …`;
//! systemd skips a `-` path that does not exist when the service starts, and a directory created
//! there later (a custom image with the agent preinstalled, a wiped resource disk) stays
//! read-only in the service's mount namespace for the service's life: originals of ingested keys
//! cannot be removed and no per-task socket can be bound. Nothing inside the namespace can fix
//! that, but a restart can: systemd then finds the path and makes it writable.
//!
//! So the agent remembers which configured roots (env roots, ingesting key sources) were absent
//! when it started, and when one of them appears read-only it asks to be restarted (the unit has
//! `Restart=on-failure`). A root that already existed at start is never a reason to exit, so a
//! root that is read-only for another reason cannot cause a restart loop; that case is logged
//! once at start.

use crate::config::Config;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the roots that were missing at start are looked at (a `stat` and a `statvfs` each).
const POLL: Duration = Duration::from_secs(2);

/// The directories the agent must be able to write: it binds per-task sockets below the env
/// roots and removes ingested originals from ingesting key sources.
fn writable_roots(config: &Config) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = config.env_roots.clone();
    roots.extend(
        config
            .key_sources
            .iter()
            .filter(|s| s.ingest())
            .map(|s| s.path.clone()),
    );
    roots.sort();
    roots.dedup();
    roots
}

/// What a root looks like from inside this process's mount namespace.
#[derive(Debug, PartialEq, Eq)]
enum RootState {
    Missing,
    Writable,
    ReadOnly,
}

fn probe(path: &Path) -> RootState {
    // statvfs reports the flags of the mount the path is on, so a read-only bind mount (what
    // ProtectSystem=strict makes of `/`) shows as ST_RDONLY although the file system is rw.
    match nix::sys::statvfs::statvfs(path) {
        Err(_) => RootState::Missing,
        Ok(st) if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) => RootState::ReadOnly,
        Ok(_) => RootState::Writable,
    }
}

/// The roots that were missing at start, to be watched. Logs the roots that exist but are
/// read-only (an operator has to add them to `ReadWritePaths=`; restarting would not help).
pub(crate) fn missing_at_start(config: &Config) -> Vec<PathBuf> {
    let mut missing = Vec::new();
    for root in writable_roots(config) {
        match probe(&root) {
            RootState::Missing => missing.push(root),
            RootState::ReadOnly => tracing::error!(
                path = %root.display(),
                "a configured root is read-only for the agent: no per-task sockets or key ingest there; add it to ReadWritePaths= of nodeseal-agent.service (systemctl edit nodeseal-agent)"
            ),
            RootState::Writable => {}
        }
    }
    missing
}

/// Resolves with the root when one of `missing` appears read-only; never resolves otherwise.
/// Roots that appear writable (no sandbox, or a mount propagated in) are dropped from the watch.
pub(crate) async fn appeared_read_only(mut missing: Vec<PathBuf>) -> PathBuf {
    if missing.is_empty() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let mut found = None;
        missing.retain(|root| match probe(root) {
            RootState::Missing => true,
            RootState::Writable => false,
            RootState::ReadOnly => {
                found.get_or_insert_with(|| root.clone());
                false
            }
        });
        if let Some(root) = found {
            tracing::error!(
                path = %root.display(),
                "a configured root appeared after the agent started and is read-only in its sandbox (systemd ReadWritePaths= skipped it while it was missing); exiting so that systemd restarts the agent with it writable"
            );
            return root;
        }
        if missing.is_empty() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("nodeseal-start-race-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn probe_tells_missing_from_writable() {
        let dir = scratch("probe");
        assert_eq!(probe(&dir), RootState::Writable);
        assert_eq!(probe(&dir.join("absent")), RootState::Missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_root_that_appears_writable_stops_being_watched() {
        let dir = scratch("appears");
        let root = dir.join("tasks");
        let watch = tokio::spawn(appeared_read_only(vec![root.clone()]));
        tokio::time::sleep(POLL * 2).await;
        std::fs::create_dir(&root).unwrap();
        tokio::time::sleep(POLL * 3).await;
        assert!(
            !watch.is_finished(),
            "a writable root must not ask for a restart"
        );
        watch.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
