//! The inotify watches (through `notify`), owned by the lifecycle thread so that no inotify
//! call runs on the async workers. Only directories the layout names are watched, one level
//! each (never recursively: a task that makes 200,000 directories costs no watch), up to
//! `limits.max_watched_dirs`; past that the periodic rescan finds changes.

use notify::{Event, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Events queued between the watcher thread and the watcher task at most. A user touching its
/// files in a loop makes events faster than scans take them; past this the queue ends with one
/// "rescan" event and further events are dropped, as the kernel does when its own queue
/// overflows, so the queue's memory is bounded and another user's change waits for at most
/// one drain of it and one full rescan, not for every event queued before it.
pub(crate) const EVENT_QUEUE: usize = 16384;

pub(crate) struct Watches {
    watcher: Option<notify::RecommendedWatcher>,
    active: BTreeSet<PathBuf>,
    warned_cap: bool,
}

impl Watches {
    /// Watches whose events go to `events`.
    pub(crate) fn new(events: mpsc::Sender<notify::Result<Event>>) -> Self {
        let watcher = notify::recommended_watcher(move |res| {
            // One thread sends, so the last free slot stays free for the rescan marker: once
            // it is taken the queue is full until the watcher task drains it.
            if events.capacity() > 1 {
                let _ = events.try_send(res);
            } else {
                let lost = Event::new(notify::EventKind::Other)
                    .set_flag(notify::event::Flag::Rescan);
                let _ = events.try_send(Ok(lost));
            }
        })
        .map_err(|e| tracing::error!(error = %e, "cannot start the file watcher; relying on periodic rescans"))
        .ok();
        Self {
            watcher,
            active: BTreeSet::new(),
            warned_cap: false,
        }
    }

    /// Watch exactly `wanted` (in priority order), at most `cap` of them. Returns the
    /// directories newly watched: what changed in them before now was not seen, so the caller
    /// walks them once more.
    pub(crate) fn sync(&mut self, wanted: &[PathBuf], cap: usize) -> Vec<PathBuf> {
        let Some(w) = self.watcher.as_mut() else {
            return Vec::new();
        };
        let wanted_set: BTreeSet<&PathBuf> = wanted.iter().take(cap).collect();
        if wanted.len() > cap && !self.warned_cap {
            tracing::warn!(
                wanted = wanted.len(),
                cap,
                "more directories than limits.max_watched_dirs; the rest are found by the periodic rescan"
            );
            self.warned_cap = true;
        }
        let stale: Vec<PathBuf> = self
            .active
            .iter()
            .filter(|p| !wanted_set.contains(p))
            .cloned()
            .collect();
        for p in stale {
            let _ = w.unwatch(&p);
            self.active.remove(&p);
        }
        let mut added = Vec::new();
        for p in wanted_set {
            if self.active.contains(p) {
                continue;
            }
            match w.watch(p, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.active.insert(p.clone());
                    added.push(p.clone());
                }
                // Not there (yet): the next sync tries again.
                Err(e) => tracing::trace!(path = %p.display(), error = %e, "cannot watch yet"),
            }
        }
        added
    }

    /// Forget every watch (events were lost: directories made meanwhile have none); the next
    /// sync adds them all again.
    pub(crate) fn reset(&mut self) {
        if let Some(w) = self.watcher.as_mut() {
            for p in std::mem::take(&mut self.active) {
                let _ = w.unwatch(&p);
            }
        }
    }
}
