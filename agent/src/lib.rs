//! nodeseal-agent: the node daemon. Loads private keys, watches task env files, and decrypts on
//! demand for local task processes over a Unix socket, authorizing by the kernel's peer
//! credentials.
//!
//! Layout, one concern per file: [`config`] (the JSON file), [`keystore`] (keys in memory),
//! [`tasks`] (env files and cached values), [`lifecycle`] (rescans, ingest, revocation),
//! [`watch`] (inotify), [`service`] (answering requests, authorization, audit),
//! [`server`] (sockets and limits), [`task_sockets`] (per-task sockets), [`hardening`],
//! [`logging`], [`demo`], and [`run`] here, the seam tests and `main` use to start and stop it.
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod decrypt_pool;
pub mod demo;
pub mod hardening;
pub mod keystore;
pub mod lifecycle;
pub mod logging;
pub mod peer;
pub mod server;
pub mod service;
mod sys;
pub mod task_sockets;
pub mod tasks;
pub mod watch;

use anyhow::{bail, Context, Result};
use config::Config;
use server::ServeContext;
use service::{Agent, Scope};
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch as tokio_watch, Notify, Semaphore};

/// How the agent is started.
#[derive(Default)]
pub struct RunOptions {
    /// The config file to re-read on SIGHUP (none: SIGHUP only rescans keys and env files).
    pub config_path: Option<PathBuf>,
    /// Take a socket systemd passed (`LISTEN_FDS`) instead of binding `socket_path`.
    pub socket_activation: bool,
    /// Handle SIGHUP (reload) and tell systemd READY/WATCHDOG/STOPPING.
    pub daemon: bool,
}

/// Run the agent until `shutdown` completes: load keys and env files, serve, then stop
/// accepting, let in-flight requests finish (bounded by `limits.drain_timeout_secs`), remove the
/// sockets. `ready` is called once everything is loaded and the socket accepts.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Path),
) -> Result<()> {
    let agent = Arc::new(Agent::new(config));
    let config = agent.config();
    if let Err(e) = lifecycle::check_store_dir(&config.key_store_dir()) {
        tracing::error!(error = %format!("{e:#}"), "key store unusable; continuing with keys from their sources only");
    }
    {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || {
            lifecycle::rescan_keys_with(&agent, false);
            lifecycle::rescan_env(&agent);
            lifecycle::warn_expiring(&agent);
        })
        .await
        .context("initial load failed")?;
    }

    let inherited = if options.socket_activation {
        sys::inherited_listener().context("cannot adopt the socket passed by systemd")?
    } else {
        None
    };
    let (listener, owned_socket) = match inherited {
        Some(l) => (
            tokio::net::UnixListener::from_std(l)
                .context("cannot use the socket passed by systemd")?,
            None,
        ),
        None => {
            let l = bind_host_socket(&config)?;
            (l, Some(config.socket_path.clone()))
        }
    };

    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let ctx = ServeContext {
        agent: agent.clone(),
        connections: Arc::new(Semaphore::new(config.limits.max_connections)),
        shutdown: stop_rx,
        alive: alive_tx,
        own_pid_ns: peer::own_pid_namespace(),
    };
    let reload = Arc::new(Notify::new());
    let watcher = tokio::spawn(watch::run(ctx.clone(), reload.clone()));
    let host = tokio::spawn(server::serve(ctx.clone(), listener, Scope::Host));

    // Registered before READY so a reload sent right after start is never lost (or fatal).
    let hup_signal = if options.daemon {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("cannot install the SIGHUP handler")?,
        )
    } else {
        None
    };
    let socket_shown = owned_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from("(systemd socket)"));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %options.config_path.as_deref().map_or("(built-in defaults)".into(), |p| p.display().to_string()),
        socket = %socket_shown.display(),
        keys = agent.keys.usable_count(),
        tasks = agent.tasks.entries().len(),
        roots = ?config.env_roots,
        "nodeseal-agent ready"
    );
    if options.daemon {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    ready(&socket_shown);
    // Ingest (store copies written with fsync, readable originals removed) right after READY:
    // the keys are already in memory, so nothing waits for the disk.
    {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || lifecycle::rescan_keys(&agent));
    }

    let watchdog = options.daemon.then(|| tokio::spawn(watchdog()));
    let hup = tokio::spawn(reload_on_sighup(
        hup_signal,
        agent.clone(),
        options.config_path.clone(),
        reload,
    ));

    shutdown.await;
    tracing::info!("stopping: no new requests; waiting for in-flight ones");
    if options.daemon {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
    let _ = stop_tx.send(true);
    let drain = Duration::from_secs(agent.config().limits.drain_timeout_secs);
    drop(ctx);
    let _ = host.await;
    if tokio::time::timeout(drain, alive_rx.recv()).await.is_err() {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    let _ = watcher.await;
    for task in [watchdog, Some(hup)].into_iter().flatten() {
        task.abort();
    }
    if let Some(path) = owned_socket {
        let _ = std::fs::remove_file(path);
    }
    agent.tasks.evict_all();
    agent.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Bind the host socket, replacing a stale one but never a live agent's.
fn bind_host_socket(config: &Config) -> Result<tokio::net::UnixListener> {
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
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    let mode = config.socket_mode_bits().map_err(anyhow::Error::msg)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}

async fn watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tick.tick().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

async fn reload_on_sighup(
    hup: Option<tokio::signal::unix::Signal>,
    agent: Arc<Agent>,
    config_path: Option<PathBuf>,
    reload: Arc<Notify>,
) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        if let Some(path) = &config_path {
            match Config::load(path) {
                Ok(new) => {
                    let old = agent.config();
                    if new.socket_path != old.socket_path {
                        tracing::warn!("socket_path changed; it takes effect at the next restart");
                    }
                    agent.set_config(new);
                }
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the previous config");
                    continue;
                }
            }
        }
        tracing::info!("SIGHUP: reloading config, keys and env files");
        agent.tasks.evict_all();
        reload.notify_one();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
