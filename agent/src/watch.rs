//! Filesystem watching: inotify (through `notify`) on the env roots, key source dirs and the
//! revocation list, debounced into rescans of exactly what changed; a full rescan at start, on
//! reload, when the kernel reports lost events, and every minute as a safety net.

use crate::keys::key_sources;
use crate::lifecycle::{Changed, Lifecycle, ScanWork};
use crate::shutdown::Shutdown;
use crate::state::State;
use notify::{Event, EventKind, RecursiveMode, Watcher};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Quiet time after an event before acting, so a file written in several steps is read once.
const DEBOUNCE: Duration = Duration::from_millis(25);
/// How often missing directories are retried and the safety-net rescan considered.
const TICK: Duration = Duration::from_millis(500);
const FULL_RESCAN_EVERY: Duration = Duration::from_secs(60);
/// Full rescans asked for by lost events are at least this far apart: the rescan's own file
/// opens generate inotify events, and on a huge tree they must not overflow the queue into an
/// endless loop of rescans.
const MIN_FULL_INTERVAL: Duration = Duration::from_secs(1);

struct Watches {
    watcher: Option<notify::RecommendedWatcher>,
    /// Directories watched, with whether recursively.
    active: HashSet<(PathBuf, bool)>,
    /// Directories that did not exist yet.
    missing: Vec<(PathBuf, bool)>,
}

impl Watches {
    fn new(tx: mpsc::UnboundedSender<notify::Result<Event>>) -> Self {
        let watcher = notify::recommended_watcher(move |res| {
            let _ = tx.send(res);
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start the file watcher; relying on periodic rescans"))
        .ok();
        Self {
            watcher,
            active: HashSet::new(),
            missing: Vec::new(),
        }
    }

    /// Watch what `config` names; returns directories that became watchable (to scan them).
    fn setup(&mut self, state: &State) -> Vec<PathBuf> {
        let config = state.config();
        let mut wanted: Vec<(PathBuf, bool)> = Vec::new();
        for root in &config.env_roots {
            wanted.push((root.clone(), true));
        }
        for s in key_sources(&config) {
            wanted.push((s.path.clone(), false));
        }
        if let Some(list) = &config.revocation_list {
            if let Some(parent) = list.parent() {
                wanted.push((parent.to_path_buf(), false));
            }
        }
        if let Some(w) = self.watcher.as_mut() {
            for (path, _) in self.active.iter() {
                if !wanted.iter().any(|(p, _)| p == path) {
                    let _ = w.unwatch(path);
                }
            }
        }
        self.active.retain(|a| wanted.contains(a));
        self.missing = wanted
            .into_iter()
            .filter(|w| !self.active.contains(w))
            .collect();
        self.retry_missing()
    }

    /// A watched directory that was deleted takes its inotify watch with it: treat it as
    /// missing again so it is re-watched (and rescanned) when it comes back.
    fn forget_vanished(&mut self) {
        let vanished: Vec<(PathBuf, bool)> = self
            .active
            .iter()
            .filter(|(p, _)| !p.is_dir())
            .cloned()
            .collect();
        for v in vanished {
            if let Some(w) = self.watcher.as_mut() {
                let _ = w.unwatch(&v.0);
            }
            self.active.remove(&v);
            self.missing.push(v);
        }
    }

    /// Watch every active directory again: notify then walks each tree and adds watches for
    /// subdirectories whose creation events were lost.
    fn rewatch(&mut self) {
        for (path, recursive) in std::mem::take(&mut self.active) {
            if let Some(w) = self.watcher.as_mut() {
                let _ = w.unwatch(&path);
            }
            self.missing.push((path, recursive));
        }
        self.retry_missing();
    }

    fn retry_missing(&mut self) -> Vec<PathBuf> {
        let Some(w) = self.watcher.as_mut() else {
            return Vec::new();
        };
        let mut added = Vec::new();
        let mut still = Vec::new();
        for (path, recursive) in std::mem::take(&mut self.missing) {
            if !path.is_dir() {
                still.push((path, recursive));
                continue;
            }
            let mode = if recursive {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            match w.watch(&path, mode) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), recursive, "watching");
                    self.active.insert((path.clone(), recursive));
                    added.push(path);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot watch; will retry");
                    still.push((path, recursive));
                }
            }
        }
        self.missing = still;
        added
    }
}

/// Everything a batch of events asks for.
#[derive(Default)]
struct Batch {
    scan: ScanWork,
    /// Events were lost: directories created meanwhile have no watch yet.
    rewatch: bool,
}

fn classify(state: &State, event: notify::Result<Event>, batch: &mut Batch) {
    let work = &mut batch.scan;
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "file watcher error; re-adding watches and doing a full rescan");
            work.full = true;
            batch.rewatch = true;
            return;
        }
    };
    if event.need_rescan() {
        tracing::warn!(
            "file watcher lost events (queue overflow); re-adding watches and doing a full rescan"
        );
        work.full = true;
        batch.rewatch = true;
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
    let config = state.config();
    let key_dirs: Vec<PathBuf> = key_sources(&config).into_iter().map(|s| s.path).collect();
    for path in event.paths {
        if config.revocation_list.as_deref() == Some(path.as_path())
            || key_dirs
                .iter()
                .any(|d| path.parent() == Some(d.as_path()) || &path == d)
        {
            work.keys = true;
        }
        if !config.env_roots.iter().any(|r| path.starts_with(r)) {
            continue;
        }
        let is_env_name = path
            .file_name()
            .is_some_and(|n| config.env_file_names.iter().any(|e| n == e.as_str()));
        if is_env_name {
            if let Some(closed) = writer {
                // The last event of the batch tells where the writer is.
                work.writer_closed.insert(path.clone(), closed);
            }
            work.env_files.insert(path);
        } else if path.is_dir() {
            work.env_dirs.insert(path);
        } else if !path.exists() {
            // A removed or renamed-away directory takes its tasks with it.
            work.gone.insert(path);
        }
    }
}

/// Run the watcher until shutdown: events and ticks become [`ScanWork`] for the lifecycle
/// thread; a config change (reload) sets the watches up again and completes the reload with a
/// full rescan.
pub(crate) async fn run(
    state: Arc<State>,
    lifecycle: Lifecycle,
    mut changed: Changed,
    mut shutdown: Shutdown,
    watching: tokio::sync::oneshot::Sender<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watches = Watches::new(tx);
    watches.setup(&state);
    let _ = watching.send(());
    let mut unsettled: Vec<(PathBuf, Instant)> = Vec::new();
    let mut last_full = Instant::now();
    let mut full_pending = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let mut batch = Batch::default();
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                classify(&state, ev, &mut batch);
                // Debounce: gather whatever else arrives in the next few milliseconds.
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(ev) = rx.try_recv() {
                    classify(&state, ev, &mut batch);
                }
            }
            _ = tick.tick() => {
                watches.forget_vanished();
                let appeared = watches.retry_missing();
                if !appeared.is_empty() {
                    batch.scan.full = true;
                }
                let now = Instant::now();
                for (path, _) in unsettled.iter().filter(|(_, due)| *due <= now) {
                    batch.scan.env_files.insert(path.clone());
                }
                unsettled.retain(|(_, due)| *due > now);
                if last_full.elapsed() >= FULL_RESCAN_EVERY || full_pending {
                    batch.scan.full = true;
                }
            }
            Ok(()) = changed.config.changed() => {
                watches.setup(&state);
                batch.scan.full = true;
                batch.scan.completes_reload = true;
            }
            _ = shutdown.stopped() => break,
        }
        if batch.rewatch {
            watches.rewatch();
        }
        let work = &mut batch.scan;
        if work.full && !work.completes_reload && last_full.elapsed() < MIN_FULL_INTERVAL {
            // Too soon after the last one: the next tick does it.
            full_pending = true;
            work.full = false;
        }
        let full = work.full;
        // No answer: the command failed (logged by the lifecycle thread) or the agent is
        // stopping, which the select above sees next.
        let newly_unsettled = lifecycle.scan(batch.scan).await.unwrap_or_default();
        if full {
            last_full = Instant::now();
            full_pending = false;
        }
        let due = Instant::now() + crate::tasks::settle::SETTLE;
        unsettled.extend(newly_unsettled.into_iter().map(|p| (p, due)));
    }
}
