//! Per-task sockets: for each known task, a socket inside its task directory that answers only
//! for that task and its owner's env files, whoever connects. Bound, chowned and removed through
//! the task directory's descriptor, never its path. A container that has the task directory mounted reaches its
//! own secrets through it, with no host-wide socket and no uid mapping.

use super::{serve, ServeContext};
use crate::authz::Scope;
use crate::lifecycle::{Changed, Generation};
use crate::sys::open_beneath;
use crate::tasks::discovery;
use crate::tasks::layout::{open_task_dir, Dir};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use tokio::task::JoinHandle;

/// Keep one socket per known task until shutdown: sync after every scan, rebind all after a
/// reload (the socket name may have changed). Each scan generation is published in `health`
/// only once the sockets match it.
pub(crate) async fn run(
    ctx: ServeContext,
    mut changed: Changed,
    first_sync: tokio::sync::oneshot::Sender<()>,
) {
    let mut sockets = TaskSockets::default();
    let mut shutdown = ctx.shutdown.clone();
    sockets.sync(&ctx);
    publish(&ctx, *changed.tasks.borrow_and_update());
    let _ = first_sync.send(());
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

/// One served per-task socket: the task directory as the agent opened it, and the inode of
/// the socket the agent bound there (the only thing it will ever remove).
struct Served {
    dir: Dir,
    owner: u32,
    name: OsString,
    inode: (u64, u64),
    handle: JoinHandle<()>,
}

/// The per-task sockets currently served; `None`: binding failed (retried after a reload).
#[derive(Default)]
struct TaskSockets {
    served: HashMap<PathBuf, Option<Served>>,
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
        // A task whose files disagree on its owner gets no socket: it would have two owners.
        let mut owners: HashMap<PathBuf, Option<u32>> = HashMap::new();
        for e in state.tasks.entries() {
            let owner = owners
                .entry(e.task_dir.clone())
                .or_insert(Some(e.task_owner));
            if *owner != Some(e.task_owner) {
                *owner = None;
            }
        }
        let wanted: HashMap<PathBuf, u32> = owners
            .into_iter()
            .filter_map(|(dir, owner)| Some((dir, owner?)))
            .collect();
        let gone: Vec<PathBuf> = self
            .served
            .iter()
            .filter(|(d, s)| match (wanted.get(*d), s) {
                (None, _) => true,
                // Its owner changed: bind again for the new one.
                (Some(owner), Some(served)) => served.owner != *owner,
                (Some(_), None) => false,
            })
            .map(|(d, _)| d.clone())
            .collect();
        for dir in gone {
            if let Some(Some(served)) = self.served.remove(&dir) {
                served.remove();
                tracing::info!(task_dir = %dir.display(), "task gone; its socket removed");
            }
        }
        for (task_dir, owner) in wanted {
            if self.served.contains_key(&task_dir) {
                continue;
            }
            let bound = discovery::root_of(&config, &task_dir)
                .ok_or_else(|| std::io::Error::other("not under an env root"))
                .and_then(|root| open_task_dir(config.task_layout, root, &task_dir))
                .and_then(|dir| bind(dir, OsStr::new(&name), owner));
            let socket = task_dir.join(&name);
            match bound {
                Ok((dir, inode, listener)) => {
                    let scope = Scope::Task {
                        dir: task_dir.clone(),
                        owner,
                    };
                    let handle = tokio::spawn(serve(ctx.clone(), listener, scope));
                    tracing::info!(task_dir = %task_dir.display(), socket = %socket.display(), owner_uid = owner, "task socket ready");
                    let served = Served {
                        dir,
                        owner,
                        name: OsString::from(&name),
                        inode,
                        handle,
                    };
                    self.served.insert(task_dir, Some(served));
                }
                Err(e) => {
                    let message = crate::logging::about_file(
                        "cannot create task socket (the task can still use the host socket)",
                        &socket,
                        &e,
                    );
                    tracing::warn!(task_dir = %task_dir.display(), socket = %socket.display(), error = %e, message = %message);
                    // Remember the failure so we do not retry on every event; a reload retries.
                    self.served.insert(task_dir, None);
                }
            }
        }
    }

    /// Stop serving and remove every task socket.
    fn clear(&mut self) {
        for (_, served) in self.served.drain() {
            if let Some(served) = served {
                served.remove();
            }
        }
    }
}

impl Served {
    /// Stop serving, and unlink the socket if the name still holds the inode we bound: the
    /// task's user owns the directory and may have put anything there since.
    fn remove(self) {
        self.handle.abort();
        if inode_at(&self.dir, &self.name).is_ok_and(|(ino, _)| ino == self.inode) {
            let _ = unlinkat(
                Some(self.dir.fd().as_raw_fd()),
                self.name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// (device, inode) and whether it is a socket, of the entry `name` in `dir`, not following it.
fn inode_at(dir: &Dir, name: &OsStr) -> std::io::Result<((u64, u64), bool)> {
    let st = fstatat(
        Some(dir.fd().as_raw_fd()),
        name,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    let is_socket = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK;
    Ok(((st.st_dev, st.st_ino), is_socket))
}

/// Bind `name` in the opened task directory `dir` and give it to `owner`, acting on
/// descriptors only: the directory's owner may rename or replace anything in it at any moment.
fn bind(
    dir: Dir,
    name: &OsStr,
    owner: u32,
) -> std::io::Result<(Dir, (u64, u64), tokio::net::UnixListener)> {
    // A socket left by an earlier run (or the task's own) is ours to replace; nothing else is.
    match inode_at(&dir, name) {
        Ok((_, true)) => unlinkat(Some(dir.fd().as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)?,
        Ok((_, false)) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a non-socket file is in the way",
            ))
        }
        Err(_) => {}
    }
    // Through the directory's descriptor (the kernel resolves the magic link to that very
    // inode), not its path. The process umask (0077) keeps the socket private from creation.
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", dir.fd().as_raw_fd())).join(name);
    let listener = tokio::net::UnixListener::bind(&via_fd)?;
    // Chown and chmod the inode we bound, held by an O_PATH descriptor: refuse anything that
    // is not our own, singly linked socket (a swap or a hard link to another socket).
    let socket = open_beneath(dir.fd(), name, OFlag::O_PATH)?;
    let meta = std::fs::File::from(socket.try_clone()?).metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_socket() || meta.uid() != me || meta.nlink() != 1 {
        return Err(std::io::Error::other(
            "the socket was replaced while it was being set up",
        ));
    }
    let inode = (meta.dev(), meta.ino());
    let held = PathBuf::from(format!("/proc/self/fd/{}", socket.as_raw_fd()));
    std::fs::set_permissions(&held, std::fs::Permissions::from_mode(0o600))?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(&held, Some(owner), None)?;
    }
    Ok((dir, inode, listener))
}
