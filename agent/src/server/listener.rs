//! The host socket: the one systemd passed (socket activation), or one we bind, replacing a
//! stale socket but never a live agent's. Either way its listen backlog is set to
//! `limits.listen_backlog`: the backlog is one kernel queue shared by every uid, filled before
//! the agent can see who is connecting, so its length is how long one uid's connect flood can
//! make everyone else's `connect` wait (about backlog / accept rate). A connection that finds it
//! full waits in `connect` (blocking clients) or is told `EAGAIN` (clients retry it), and never
//! fails. Per-task sockets are their owner's alone (mode 0600), so only the owner queues there.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use tokio::net::UnixListener;

/// The host socket, and the path to remove at stop when we bound it ourselves.
pub(crate) fn host_socket(
    config: &Config,
    socket_activation: bool,
) -> Result<(UnixListener, Option<PathBuf>)> {
    let inherited = if socket_activation {
        crate::sys::inherited_listener().context("cannot adopt the socket passed by systemd")?
    } else {
        None
    };
    let (listener, owned) = match inherited {
        Some(l) => (
            UnixListener::from_std(l).context("cannot use the socket passed by systemd")?,
            None,
        ),
        None => (bind(config)?, Some(config.socket_path.clone())),
    };
    set_backlog(&listener, config.limits.listen_backlog)?;
    Ok((listener, owned))
}

/// Listening again on a listening socket only changes its backlog (Linux keeps the queue).
fn set_backlog(listener: &UnixListener, backlog: u32) -> Result<()> {
    let backlog = i32::try_from(backlog)
        .ok()
        .and_then(|n| nix::sys::socket::Backlog::new(n).ok())
        .with_context(|| format!("limits.listen_backlog {backlog} is out of range"))?;
    nix::sys::socket::listen(listener, backlog)
        .context("cannot set the host socket's listen backlog (limits.listen_backlog)")
}

fn bind(config: &Config) -> Result<UnixListener> {
    let path = &config.socket_path;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot chmod {}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another agent is already serving {}; stop it first (systemctl stop nodeseal-agent)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or set socket_path",
            path.display()
        ),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(config.socket_mode.bits()),
    )
    .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}
