//! The one owner of mutations. Keys, env files and the config change only here, on one thread,
//! one command at a time: rescans the watcher asks for, revoke and restore from the admin
//! operations, reloads on SIGHUP. Commands arrive over a channel and are answered over a
//! oneshot each, so the async workers never run PKCS#12 parsing, file reads or fsyncs, and two
//! changes never interleave (an ingest could otherwise pair one run's PFX with the other's
//! passphrase file).

use crate::config::Config;
use crate::keys::expiry::ExpiryWarnings;
use crate::keys::sources::SourceId;
use crate::keys::{ingest, key_sources, revocation, Changes};
use crate::report::{KeyChange, KeyState};
use crate::state::State;
use crate::tasks::discovery::{self, Refusals};
use crate::tasks::pace::Pace;
use crate::watches::Watches;
use anyhow::{Context, Result};
use nodeseal_envelope::Thumbprint;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// File-system work, as the watcher gathered it from events.
#[derive(Debug, Default)]
pub(crate) struct ScanWork {
    /// Rescan every key source and env root.
    pub(crate) full: bool,
    /// Rescan the key sources.
    pub(crate) keys: bool,
    /// Copy readable keys into the store during the key rescan (off only for the first load,
    /// so READY does not wait for the store's fsyncs).
    pub(crate) skip_ingest: bool,
    /// Layout directories to walk again (a task, a job, a root): what the index knew below
    /// each is replaced by what is there now.
    pub(crate) targets: BTreeSet<PathBuf>,
    /// Events were lost: directories made meanwhile have no watch yet.
    pub(crate) rewatch: bool,
    /// What the watcher last saw of each file's writer: closed it (or renamed it into place)
    /// or still writing. Decides when a file with an unterminated last line may be read.
    pub(crate) writer_closed: BTreeMap<PathBuf, bool>,
    /// This scan completes a SIGHUP reload.
    pub(crate) completes_reload: bool,
}

impl ScanWork {
    /// Everything, from scratch.
    pub(crate) fn full() -> Self {
        Self {
            full: true,
            ..Self::default()
        }
    }
}

enum Command {
    Scan {
        work: Box<ScanWork>,
        /// Env files still being written (retry after they settle).
        reply: oneshot::Sender<Vec<PathBuf>>,
    },
    Revoke {
        key: Thumbprint,
        purge: bool,
        reply: oneshot::Sender<Result<KeyChange>>,
    },
    Restore {
        key: Thumbprint,
        reply: oneshot::Sender<Result<KeyChange>>,
    },
    Reload {
        config: Option<Box<Config>>,
        reply: oneshot::Sender<()>,
    },
}

/// Sends commands to the lifecycle thread.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    commands: mpsc::UnboundedSender<Command>,
}

/// How much file-system work is done: scans completed, and how many of them completed a reload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Generation {
    pub(crate) scans: u64,
    pub(crate) reloads: u64,
}

/// What the lifecycle thread tells the rest of the agent.
#[derive(Clone)]
pub(crate) struct Changed {
    /// Moves after every scan (which may have changed the set of tasks). The per-task sockets
    /// publish it in `health` once they match it, so a caller who saw it move can connect.
    pub(crate) tasks: watch::Receiver<Generation>,
    /// Moves when a reload replaced the config: watches and task sockets are set up again.
    pub(crate) config: watch::Receiver<u64>,
}

/// The lifecycle thread's answer was lost: it stopped (the agent is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the agent is shutting down")]
pub(crate) struct Stopped;

impl Lifecycle {
    /// Start the lifecycle thread. It ends when every [`Lifecycle`] handle is dropped.
    pub(crate) fn start(
        state: Arc<State>,
        events: mpsc::Sender<notify::Result<notify::Event>>,
    ) -> Result<(Self, Changed, std::thread::JoinHandle<()>)> {
        let (commands, rx) = mpsc::unbounded_channel();
        let (tasks_tx, tasks) = watch::channel(Generation::default());
        let (config_tx, config) = watch::channel(0u64);
        let owner = Owner {
            state,
            expiry: ExpiryWarnings::default(),
            watches: Watches::new(events),
            layout_dirs: BTreeSet::new(),
            refusals: Refusals::default(),
            pending_unsettled: Vec::new(),
            tasks_changed: tasks_tx,
            config_changed: config_tx,
        };
        let thread = std::thread::Builder::new()
            .name("nodeseal-lifecycle".into())
            .spawn(move || owner.run(rx))
            .context("cannot start the lifecycle thread")?;
        Ok((Self { commands }, Changed { tasks, config }, thread))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }

    /// Do file-system work; returns env files still being written.
    pub(crate) async fn scan(&self, work: ScanWork) -> Result<Vec<PathBuf>, Stopped> {
        self.ask(|reply| Command::Scan {
            work: Box::new(work),
            reply,
        })
        .await
    }

    /// Withdraw a key until restored; with `purge`, also delete its ingested copy.
    pub(crate) async fn revoke(
        &self,
        key: Thumbprint,
        purge: bool,
    ) -> Result<Result<KeyChange>, Stopped> {
        self.ask(|reply| Command::Revoke { key, purge, reply })
            .await
    }

    /// Undo a revocation by command.
    pub(crate) async fn restore(&self, key: Thumbprint) -> Result<Result<KeyChange>, Stopped> {
        self.ask(|reply| Command::Restore { key, reply }).await
    }

    /// Put `config` in force (if any), drop every cached value, and rescan everything under it
    /// (watches included).
    pub(crate) async fn reload(&self, config: Option<Config>) -> Result<(), Stopped> {
        self.ask(|reply| Command::Reload {
            config: config.map(Box::new),
            reply,
        })
        .await
    }
}

/// The pace env files are read at under `config`.
fn pace(config: &Config, unpaced: bool) -> Pace<'static> {
    Pace {
        bytes_per_sec: config.limits.env_read_bytes_per_sec_per_uid,
        now: &Instant::now,
        unpaced,
    }
}

struct Owner {
    state: Arc<State>,
    expiry: ExpiryWarnings,
    watches: Watches,
    /// Layout directories the last walks found: what is watched besides roots and key dirs.
    layout_dirs: BTreeSet<PathBuf>,
    refusals: Refusals,
    /// Files still being written that a reload found: handed to the watcher with the next
    /// scan's answer, so it retries them.
    pending_unsettled: Vec<PathBuf>,
    tasks_changed: watch::Sender<Generation>,
    config_changed: watch::Sender<u64>,
}

impl Owner {
    fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = commands.blocking_recv() {
            // A bug in one command must not stop every later rescan, revoke and reload (test
            // builds unwind; release builds abort on panic anyway).
            let done =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(command)));
            if done.is_err() {
                tracing::error!(
                    "a lifecycle command panicked; its caller gets no answer, later commands run"
                );
            }
        }
    }

    fn apply(&mut self, command: Command) {
        {
            match command {
                Command::Scan { work, reply } => {
                    let unsettled = self.scan(*work);
                    let _ = reply.send(unsettled);
                }
                Command::Revoke { key, purge, reply } => {
                    let _ = reply.send(self.revoke(key, purge));
                }
                Command::Restore { key, reply } => {
                    let _ = reply.send(self.restore(key));
                }
                Command::Reload { config, reply } => {
                    // Files a reload found still being written go back with the next scan.
                    let unsettled = self.reload(config);
                    self.pending_unsettled.extend(unsettled);
                    let _ = reply.send(());
                }
            }
        }
    }

    fn scan(&mut self, work: ScanWork) -> Vec<PathBuf> {
        let state = self.state.clone();
        let config = state.config();
        for (path, closed) in &work.writer_closed {
            if *closed {
                state.tasks.note_writer_done(path);
            } else {
                state.tasks.note_writer_active(path);
            }
        }
        if work.full || work.keys {
            self.rescan_keys(&config, !work.skip_ingest);
        }
        if work.rewatch {
            self.watches.reset();
        }
        let mut unsettled = std::mem::take(&mut self.pending_unsettled);
        // The first load reads every file before READY; later scans read at each owner's pace.
        let unpaced = work.skip_ingest;
        if work.full {
            for path in state.tasks.paths() {
                if discovery::root_of(&config, &path).is_none() {
                    state.tasks.remove(&path);
                    tracing::info!(path = %path.display(), "env file no longer under an env root; forgotten");
                }
            }
            self.layout_dirs
                .retain(|d| discovery::root_of(&config, d).is_some());
            for root in &config.env_roots {
                unsettled.extend(self.rescan_target(&config, root, unpaced));
            }
            let now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.expiry
                .check(&state.keys.loaded_entries(), now_unix, Instant::now());
        } else {
            // Directories of quiet owners first: one whose owner keeps changing its files waits.
            let pace = pace(&config, unpaced);
            let mut targets: Vec<_> = work
                .targets
                .iter()
                .map(|t| (state.tasks.read_pressure_under(t, &pace), t))
                .collect();
            targets.sort_by_key(|(pressure, _)| *pressure);
            for (_, target) in targets {
                unsettled.extend(self.rescan_target(&config, target, unpaced));
            }
        }
        // Directories watched only now may have changed before their watch existed: walk
        // them once more (once: what that walk adds is watched, and its events come).
        let newly = self.sync_watches(&config);
        for dir in newly {
            if self.layout_dirs.contains(&dir) || config.env_roots.contains(&dir) {
                unsettled.extend(self.rescan_target(&config, &dir, unpaced));
            }
        }
        self.sync_watches(&config);
        let completes_reload = work.completes_reload;
        self.tasks_changed.send_modify(|g| {
            g.scans += 1;
            if completes_reload {
                g.reloads += 1;
            }
        });
        unsettled
    }

    /// Walk one layout directory and replace what was known below it.
    fn rescan_target(
        &mut self,
        config: &Config,
        target: &std::path::Path,
        unpaced: bool,
    ) -> Vec<PathBuf> {
        let found = discovery::rescan(
            &self.state.tasks,
            config,
            target,
            &mut self.refusals,
            &pace(config, unpaced),
            &SystemTime::now,
        );
        self.layout_dirs.retain(|d| !d.starts_with(target));
        if !found.gone {
            self.layout_dirs.extend(found.dirs);
        }
        found.unsettled
    }

    /// Watch the roots, the key source dirs and the revocation list's dir first, then the
    /// layout directories; returns what is watched only now.
    fn sync_watches(&mut self, config: &Config) -> Vec<PathBuf> {
        let mut wanted: Vec<PathBuf> = config.env_roots.clone();
        wanted.extend(key_sources(config).into_iter().map(|s| s.path));
        if let Some(parent) = config.revocation_list.as_deref().and_then(|l| l.parent()) {
            wanted.push(parent.to_path_buf());
        }
        wanted.extend(
            self.layout_dirs
                .iter()
                .filter(|d| !config.env_roots.contains(d))
                .cloned(),
        );
        self.watches.sync(&wanted, config.limits.max_watched_dirs)
    }

    /// Rescan every key source (and the store), ingest where configured, reload the revocation
    /// lists, and evict cached values of keys that went away.
    fn rescan_keys(&self, config: &Config, do_ingest: bool) {
        let keys = &self.state.keys;
        let sources = key_sources(config);
        let mut changes = Changes::default();
        for source in &sources {
            changes.merge(keys.rescan_source(source));
        }
        let ids: Vec<SourceId> = sources.iter().map(SourceId::of).collect();
        changes.merge(keys.retain_sources(&ids));
        if do_ingest {
            // The store copies were adopted as they were written; the originals are gone now.
            for emptied in ingest::ingest(keys, config, &sources) {
                if let Some(source) = sources.iter().find(|s| SourceId::of(s) == emptied) {
                    changes.merge(keys.rescan_source(source));
                }
            }
        }
        changes.merge(revocation::reload(keys, config));
        self.report(&changes);
    }

    fn report(&self, changes: &Changes) {
        // A key that left and came back in one pass is net unchanged.
        let added: HashSet<_> = changes.added.iter().collect();
        let removed: HashSet<_> = changes.removed.iter().collect();
        for tp in removed.difference(&added) {
            let evicted = self.state.tasks.evict_key(tp);
            tracing::warn!(key_id = %tp, evicted, "key no longer available; cached values evicted");
        }
        for tp in added.difference(&removed) {
            tracing::info!(key_id = %tp, "key available");
        }
    }

    fn revoke(&self, tp: Thumbprint, purge: bool) -> Result<KeyChange> {
        let state = &self.state;
        let config = state.config();
        let known = state
            .keys
            .loaded_entries()
            .iter()
            .any(|e| e.pair.thumbprint() == tp);
        let changes = state.keys.set_revoked_by_command(tp, true);
        let evicted = state.tasks.evict_key(&tp);
        tracing::warn!(key_id = %tp, evicted, purge, "key revoked by command");
        let persisted = revocation::persist_revoked_by_command(&state.keys, &config);
        if purge {
            revocation::purge_store_copy(&config, &tp)?;
            self.rescan_keys(&config, true);
        }
        self.report(&changes);
        persisted.context("the key is revoked in memory, but the revocation could not be saved and will not survive a restart")?;
        Ok(KeyChange {
            thumbprint: tp.to_string(),
            state: KeyState::Revoked,
            purged: Some(purge),
            known: Some(known),
        })
    }

    fn restore(&self, tp: Thumbprint) -> Result<KeyChange> {
        let state = &self.state;
        let config = state.config();
        let changes = state.keys.set_revoked_by_command(tp, false);
        tracing::info!(key_id = %tp, "key restored by command");
        self.report(&changes);
        revocation::persist_revoked_by_command(&state.keys, &config)?;
        Ok(KeyChange {
            thumbprint: tp.to_string(),
            state: if state.keys.get(&tp).is_ok() {
                KeyState::Loaded
            } else {
                KeyState::Missing
            },
            purged: None,
            known: None,
        })
    }

    fn reload(&mut self, config: Option<Box<Config>>) -> Vec<PathBuf> {
        if let Some(new) = config {
            let new = *new;
            if new.socket_path != self.state.config().socket_path {
                tracing::warn!("socket_path changed; it takes effect at the next restart");
            }
            self.state.set_config(new);
        }
        tracing::info!("SIGHUP: reloading config, keys and env files");
        self.state.tasks.evict_all();
        self.config_changed.send_modify(|g| *g += 1);
        self.scan(ScanWork {
            completes_reload: true,
            ..ScanWork::full()
        })
    }
}
