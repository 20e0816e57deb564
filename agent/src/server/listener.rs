//! The host socket: the one systemd passed (socket activation), or one we bind, replacing a
//! stale socket but never a live agent's.

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
    match inherited {
        Some(l) => Ok((
            UnixListener::from_std(l).context("cannot use the socket passed by systemd")?,
            None,
        )),
        None => Ok((bind(config)?, Some(config.socket_path.clone()))),
    }
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
