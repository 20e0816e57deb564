//! Per-task sockets: for each known task, a socket inside its task directory that answers only
//! for that task, whoever connects. A container that has the task directory mounted reaches its
//! own secrets through it, with no host-wide socket and no uid mapping.

use super::{serve, ServeContext};
use crate::authz::Scope;
use crate::lifecycle::{Changed, Generation};
use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use tokio::task::JoinHandle;

/// Keep one socket per known task until shutdown: sync after every scan, rebind all after a
/// reload (the socket name may have changed). Each scan generation is published in `health`
/// only once the sockets match it.
pub(crate) async fn run(ctx: ServeContext, mut changed: Changed) {
    let mut sockets = TaskSockets::default();
    let mut shutdown = ctx.shutdown.clone();
    sockets.sync(&ctx);
    publish(&ctx, *changed.tasks.borrow_and_update());
    loop {
        tokio::select! {
            // Config first: a reload's rebind must not be undone by a sync ordered before it.
            biased;
            Ok(()) = changed.config.changed() => {
                sockets.clear();
                sockets.sync(&ctx);
            }
            Ok(()) = changed.tasks.changed() => {
                let generation = *changed.tasks.borrow_and_update();
                sockets.sync(&ctx);
                publish(&ctx, generation);
            }
            _ = shutdown.stopped() => break,
            else => break,
        }
    }
    sockets.clear();
}

fn publish(ctx: &ServeContext, generation: Generation) {
    let counters = &ctx.handler.state().counters;
    counters.scans.store(generation.scans, Ordering::Relaxed);
    counters
        .reloads
        .store(generation.reloads, Ordering::Relaxed);
}

/// The per-task sockets currently served.
#[derive(Default)]
struct TaskSockets {
    served: HashMap<PathBuf, (PathBuf, JoinHandle<()>)>,
}

impl TaskSockets {
    /// Make the set of served sockets match the set of known tasks.
    fn sync(&mut self, ctx: &ServeContext) {
        let state = ctx.handler.state();
        let config = state.config();
        let Some(name) = config.task_socket_name.clone() else {
            self.clear();
            return;
        };
        let mut wanted: HashMap<PathBuf, u32> = HashMap::new();
        for e in state.tasks.entries() {
            wanted.entry(e.task_dir.clone()).or_insert(e.owner_uid);
        }
        let gone: Vec<PathBuf> = self
            .served
            .keys()
            .filter(|d| !wanted.contains_key(*d))
            .cloned()
            .collect();
        for dir in gone {
            if let Some((path, handle)) = self.served.remove(&dir) {
                handle.abort();
                remove_socket(&path);
                tracing::info!(task_dir = %dir.display(), "task gone; its socket removed");
            }
        }
        for (dir, owner) in wanted {
            if self.served.contains_key(&dir) {
                continue;
            }
            let path = dir.join(&name);
            match bind(&path, owner) {
                Ok(listener) => {
                    let handle =
                        tokio::spawn(serve(ctx.clone(), listener, Scope::Task(dir.clone())));
                    tracing::info!(task_dir = %dir.display(), socket = %path.display(), owner_uid = owner, "task socket ready");
                    self.served.insert(dir, (path, handle));
                }
                Err(e) => {
                    tracing::warn!(task_dir = %dir.display(), socket = %path.display(), error = %e, "cannot create task socket; the task can still use the host socket");
                    // Remember the failure so we do not retry on every event; a reload retries.
                    self.served
                        .insert(dir, (PathBuf::new(), tokio::spawn(async {})));
                }
            }
        }
    }

    /// Stop serving and remove every task socket.
    fn clear(&mut self) {
        for (_, (path, handle)) in self.served.drain() {
            handle.abort();
            if !path.as_os_str().is_empty() {
                remove_socket(&path);
            }
        }
    }
}

/// Remove `path` only if it is a socket: the task directory belongs to the task's user, who may
/// have put anything there.
fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn bind(path: &Path, owner: u32) -> std::io::Result<tokio::net::UnixListener> {
    // A socket left by an earlier run is ours to replace; anything else is not.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a non-socket file is in the way",
            ))
        }
        Err(_) => {}
    }
    // The process umask (0077) keeps the socket private from its creation; the directory's
    // owner may swap the path for a symlink at any time, so neither call below follows one.
    let listener = tokio::net::UnixListener::bind(path)?;
    nix::sys::stat::fchmodat(
        None,
        path,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(path, Some(owner), None)?;
    }
    Ok(listener)
}
