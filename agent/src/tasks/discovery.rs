//! Finding env files: the layout walk ([`super::layout`]) from a root or from one directory
//! the watcher named, each file found read into the index and every file the index knew below
//! that directory but the walk did not find forgotten.

use super::envfile::{Classifier, FileCaps};
use super::index::{Clock, FileUpdate, Tasks};
use super::layout::Walker;
use super::pace::Pace;
use crate::config::Config;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What one rescan did.
#[derive(Default)]
pub(crate) struct Rescan {
    /// Env files still being written: retry after they settle.
    pub(crate) unsettled: Vec<PathBuf>,
    /// Layout directories seen below the target (to be watched).
    pub(crate) dirs: BTreeSet<PathBuf>,
    /// The target could not be reached: nothing below it is known any more.
    pub(crate) gone: bool,
}

/// Env files refused, with the reason last logged: each is logged once per new reason, not on
/// every periodic rescan.
#[derive(Default)]
pub(crate) struct Refusals {
    logged: HashMap<PathBuf, String>,
}

/// The env root `path` lies under.
pub(crate) fn root_of<'c>(config: &'c Config, path: &Path) -> Option<&'c Path> {
    config
        .env_roots
        .iter()
        .find(|r| path.starts_with(r))
        .map(PathBuf::as_path)
}

/// Walk `target` (an env root or a layout directory below one) and bring the index in line
/// with what is there.
pub(crate) fn rescan(
    tasks: &Tasks,
    config: &Config,
    target: &Path,
    refusals: &mut Refusals,
    pace: &Pace<'_>,
    clock: Clock<'_>,
) -> Rescan {
    let mut out = Rescan::default();
    let Some(root) = root_of(config, target) else {
        return out;
    };
    let walker = Walker {
        layout: config.task_layout,
        env_file_names: &config.env_file_names,
        agent_uid: nix::unistd::geteuid().as_raw(),
    };
    let classifier = Classifier {
        legacy_names: &config.legacy_names,
        legacy_by_length: config.legacy_by_length,
    };
    let caps = FileCaps::from_limits(&config.limits);
    let mut seen = HashSet::new();
    match walker.walk(root, target) {
        Ok(walk) => {
            out.dirs.extend(walk.dirs);
            for (path, reason) in walk.refused {
                if refusals.logged.get(&path) != Some(&reason) {
                    let message = crate::logging::about_file("env file refused", &path, &reason);
                    tracing::warn!(path = %path.display(), %reason, message = %message);
                    refusals.logged.insert(path, reason);
                }
            }
            // Quiet owners' files first: a file whose owner keeps changing it waits, not theirs.
            let mut files: Vec<_> = walk
                .files
                .into_iter()
                .map(|f| {
                    let pressure = f
                        .file
                        .metadata()
                        .map_or(0, |m| tasks.read_pressure(m.uid(), pace));
                    (pressure, f)
                })
                .collect();
            files.sort_by_key(|(pressure, _)| *pressure);
            for (_, found) in files {
                let path = found.path.clone();
                refusals.logged.remove(&path);
                match tasks.update_file(found, &classifier, &caps, pace, clock) {
                    FileUpdate::Loaded { vars } => {
                        tracing::info!(path = %path.display(), vars, "env file loaded")
                    }
                    FileUpdate::Removed => {
                        tracing::info!(path = %path.display(), "env file gone; its values are forgotten")
                    }
                    FileUpdate::Unsettled => {
                        tracing::debug!(path = %path.display(), "env file still being written");
                        out.unsettled.push(path.clone());
                    }
                    FileUpdate::Deferred => {
                        tracing::debug!(path = %path.display(), "env file changed; its owner's reads are over limits.env_read_bytes_per_sec_per_uid, read later");
                        out.unsettled.push(path.clone());
                    }
                    FileUpdate::Invalid(reason) => {
                        let message =
                            crate::logging::about_file("env file skipped", &path, &reason);
                        tracing::warn!(path = %path.display(), %reason, message = %message)
                    }
                    FileUpdate::Refused(reason) => {
                        tracing::warn!(path = %path.display(), reason = %reason, "env file refused: over a limit; its task answers with the reason")
                    }
                    FileUpdate::Unchanged => {}
                }
                seen.insert(path);
            }
        }
        Err(reason) => {
            tracing::debug!(path = %target.display(), %reason, "layout directory not reachable");
            out.gone = true;
        }
    }
    for path in tasks.paths_under(target) {
        // Unsettled files stay as they were until they settle.
        if !seen.contains(&path) {
            tasks.remove(&path);
            tracing::info!(path = %path.display(), "env file gone; its values are forgotten");
        }
    }
    out
}
