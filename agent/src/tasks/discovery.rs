//! Finding env files: a walk of the env roots (at start, on reload, after lost events and as the
//! periodic safety net) and of single directories the watcher saw appear, each file found read
//! into the index.

use super::envfile::Classifier;
use super::index::{Clock, FileUpdate, Tasks};
use crate::config::Config;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// How deep below an env root task env files may sit (`<sched>/<job>/job-1/<task>/wd/file`
/// is 6).
const MAX_ENV_DEPTH: usize = 8;

/// Read every env file under the configured roots and forget the ones that are gone.
/// Returns files that are still being written (retry after they settle).
pub(crate) fn rescan_env(tasks: &Tasks, config: &Config, clock: Clock<'_>) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut unsettled = Vec::new();
    for root in &config.env_roots {
        let mut found = Vec::new();
        find_env_files(root, &config.env_file_names, 0, &mut found);
        for path in found {
            if let FileUpdate::Unsettled = update_env_file(tasks, config, &path, root, clock) {
                unsettled.push(path.clone());
            }
            seen.insert(path);
        }
    }
    for path in tasks.paths() {
        if !seen.contains(&path) {
            tasks.remove(&path);
            tracing::info!(path = %path.display(), "env file gone; its values are forgotten");
        }
    }
    unsettled
}

/// Scan one directory (created after start, or moved in) for env files.
pub(crate) fn scan_env_dir(
    tasks: &Tasks,
    config: &Config,
    dir: &Path,
    clock: Clock<'_>,
) -> Vec<PathBuf> {
    let Some(root) = root_of(config, dir) else {
        return Vec::new();
    };
    let depth = dir.strip_prefix(root).map_or(0, |r| r.components().count());
    let mut found = Vec::new();
    find_env_files(dir, &config.env_file_names, depth, &mut found);
    found
        .into_iter()
        .filter(|path| {
            matches!(
                update_env_file(tasks, config, path, root, clock),
                FileUpdate::Unsettled
            )
        })
        .collect()
}

/// The env root `path` lies under.
pub(crate) fn root_of<'c>(config: &'c Config, path: &Path) -> Option<&'c Path> {
    config
        .env_roots
        .iter()
        .find(|r| path.starts_with(r))
        .map(PathBuf::as_path)
}

/// (Re)read one env file and log what happened.
pub(crate) fn update_env_file(
    tasks: &Tasks,
    config: &Config,
    path: &Path,
    root: &Path,
    clock: Clock<'_>,
) -> FileUpdate {
    let classifier = Classifier {
        legacy_names: &config.legacy_names,
        legacy_by_length: config.legacy_by_length,
    };
    let update = tasks.update_file(path, root, &classifier, clock);
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
