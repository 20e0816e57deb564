//! Turning file-system events into work: inotify events (from the watches the lifecycle thread
//! keeps) are classified by path alone — no file-system access here — and debounced into
//! [`ScanWork`]: rescans of exactly the layout directories that changed. Ticks add the retries
//! of files still being written and the periodic full rescan (every minute, and when the kernel
//! reports lost events).

use crate::config::Config;
use crate::keys::key_sources;
use crate::lifecycle::{Lifecycle, ScanWork};
use crate::shutdown::Shutdown;
use crate::state::State;
use crate::tasks::layout::{components_below, level_of, Level};
use notify::{Event, EventKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Quiet time after an event before acting, so a file written in several steps is read once.
const DEBOUNCE: Duration = Duration::from_millis(25);
/// How often files still being written are retried and watches for missing dirs attempted.
const TICK: Duration = Duration::from_millis(500);
const FULL_RESCAN_EVERY: Duration = Duration::from_secs(60);
/// Full rescans asked for by lost events are at least this far apart: the rescan's own file
/// opens generate inotify events, and on a huge tree they must not overflow the queue into an
/// endless loop of rescans.
const MIN_FULL_INTERVAL: Duration = Duration::from_secs(1);

/// The layout directory to rescan for an event at `path`, if it concerns tasks at all: the
/// task of an env file, or the layout directory itself. Anything else below a root (what a
/// task makes inside its working directory) is ignored without a look.
pub(crate) fn target_of(config: &Config, path: &Path) -> Option<PathBuf> {
    let root = config.env_roots.iter().find(|r| path.starts_with(r))?;
    let comps = components_below(root, path)?;
    let Some((last, parent)) = comps.split_last() else {
        return Some(root.clone());
    };
    if config.env_file_names.iter().any(|n| *last == n.as_str()) {
        return match level_of(config.task_layout, parent) {
            Level::Task { .. } => path.parent().map(Path::to_path_buf),
            Level::Wd => path.parent().and_then(Path::parent).map(Path::to_path_buf),
            _ => None,
        };
    }
    match level_of(config.task_layout, &comps) {
        Level::Outside => None,
        // The wd's task has the files to (re)read.
        Level::Wd => path.parent().map(Path::to_path_buf),
        Level::Root | Level::Container | Level::Task { .. } => Some(path.to_path_buf()),
    }
}

/// The key source directories whose events ask for a key rescan.
fn key_dirs(config: &Config) -> Vec<PathBuf> {
    key_sources(config).into_iter().map(|s| s.path).collect()
}

/// Everything a batch of events asks for. `key_dirs` is [`key_dirs`] of `config`, worked out
/// once per batch: a user touching files in a loop sends thousands of events a second.
fn classify(
    config: &Config,
    key_dirs: &[PathBuf],
    event: notify::Result<Event>,
    work: &mut ScanWork,
) {
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "file watcher error; re-adding watches and doing a full rescan");
            work.full = true;
            work.rewatch = true;
            return;
        }
    };
    if event.need_rescan() {
        // Said once a minute at most: a user who keeps the queue overflowing must not also
        // fill the log.
        static LAST_WARNED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
        let mut last = LAST_WARNED.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= FULL_RESCAN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                "file watcher lost events (queue overflow); re-adding watches and doing a full rescan (said at most once a minute)"
            );
        }
        work.full = true;
        work.rewatch = true;
        return;
    }
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    // What the event says about a writer, for files whose last line is still unterminated.
    let writer = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(true),
        // Renamed into place: finished by convention.
        EventKind::Modify(ModifyKind::Name(_)) => Some(true),
        EventKind::Modify(_) | EventKind::Create(_) => Some(false),
        EventKind::Access(_) => return,
        _ => None,
    };
    for path in event.paths {
        if config.revocation_list.as_deref() == Some(path.as_path())
            || key_dirs
                .iter()
                .any(|d| path.parent() == Some(d.as_path()) || &path == d)
        {
            work.keys = true;
        }
        let Some(target) = target_of(config, &path) else {
            continue;
        };
        let is_env_name = path
            .file_name()
            .is_some_and(|n| config.env_file_names.iter().any(|e| n == e.as_str()));
        if is_env_name {
            if let Some(closed) = writer {
                // The last event of the batch tells where the writer is.
                work.writer_closed.insert(path.clone(), closed);
            }
        }
        work.targets.insert(target);
    }
}

/// Run until shutdown: events and ticks become [`ScanWork`] for the lifecycle thread.
pub(crate) async fn run(
    state: Arc<State>,
    lifecycle: Lifecycle,
    mut events: mpsc::Receiver<notify::Result<Event>>,
    mut shutdown: Shutdown,
) {
    let mut unsettled: Vec<(PathBuf, Instant)> = Vec::new();
    let mut last_full = Instant::now();
    let mut full_pending = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let mut work = ScanWork::default();
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                let config = state.config();
                let key_dirs = key_dirs(&config);
                classify(&config, &key_dirs, ev, &mut work);
                // Debounce: gather whatever else arrives in the next few milliseconds.
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(ev) = events.try_recv() {
                    classify(&config, &key_dirs, ev, &mut work);
                }
            }
            _ = tick.tick() => {
                let config = state.config();
                let now = Instant::now();
                for (path, _) in unsettled.iter().filter(|(_, due)| *due <= now) {
                    if let Some(target) = target_of(&config, path) {
                        work.targets.insert(target);
                    }
                }
                unsettled.retain(|(_, due)| *due > now);
                if last_full.elapsed() >= FULL_RESCAN_EVERY || full_pending {
                    work.full = true;
                }
            }
            _ = shutdown.stopped() => break,
        }
        if work.full && last_full.elapsed() < MIN_FULL_INTERVAL {
            // Too soon after the last one: the next tick does it.
            full_pending = true;
            work.full = false;
        }
        let full = work.full;
        // No answer: the command failed (logged by the lifecycle thread) or the agent is
        // stopping, which the select above sees next.
        let newly_unsettled = lifecycle.scan(work).await.unwrap_or_default();
        if full {
            last_full = Instant::now();
            full_pending = false;
        }
        let due = Instant::now() + crate::tasks::settle::SETTLE;
        unsettled.extend(newly_unsettled.into_iter().map(|p| (p, due)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layout_places_become_work() {
        let config = Config {
            env_roots: vec![PathBuf::from("/w")],
            ..Config::default()
        };
        let t = |p: &str| target_of(&config, Path::new(p)).map(|p| p.display().to_string());
        assert_eq!(
            t("/w/j/job-1/t/wd/.shipyard.envlist").as_deref(),
            Some("/w/j/job-1/t")
        );
        assert_eq!(
            t("/w/j/job-1/t/nodeseal.env").as_deref(),
            Some("/w/j/job-1/t")
        );
        assert_eq!(t("/w/j/job-1/t").as_deref(), Some("/w/j/job-1/t"));
        assert_eq!(t("/w/j/job-1/t/wd").as_deref(), Some("/w/j/job-1/t"));
        assert_eq!(t("/w/j").as_deref(), Some("/w/j"));
        // What a task makes in its wd, env-file names below it included, is nobody's work.
        assert_eq!(t("/w/j/job-1/t/wd/dir-123456"), None);
        assert_eq!(t("/w/j/job-1/t/wd/sub/nodeseal.env"), None);
        assert_eq!(t("/elsewhere/nodeseal.env"), None);
    }
}
