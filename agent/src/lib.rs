//! nodeseal-agent: the node daemon. Loads private keys, watches task env files, and decrypts on
//! demand for local task processes over Unix sockets, deciding who may read what from the
//! kernel's account of the caller.
//!
//! # The data path
//!
//! A request travels `server` → `handler` → {`authz`, `keys`, `tasks`, `state`}:
//!
//! 1. [`server`] accepts on the host socket (`server::listener`) or a per-task socket
//!    (`server::task_sockets`) and decides who is calling once, at accept (`peer`: a pidfd from
//!    `SO_PEERPIDFD`, its pid and user namespaces, uid and groups from `connect()`);
//!    `server::admission` bounds connections and request rates per uid (answers cost by size;
//!    a uid over its rate is paced, not bounced: `rate`);
//!    `server::connection` reads one request line at a time and writes each answer within the
//!    caller's memory budget (`budget`) and the write timeout.
//! 2. `handler` answers one operation per function (`values`: get/env/list, `open`,
//!    `admin`: health/status/revoke/restore) from one config snapshot, asks `authz` whether the
//!    caller may, opens values on the decrypt pool (`handler::decrypt`; `decrypt_pool` charges
//!    every RSA operation to the caller and serves uids round robin) or through Key Vault
//!    ([`keyvault`], for keys that never leave it) and writes one audit line (`handler::audit`;
//!    repeated warnings and refusals are budgeted per uid by `log_budget`). Every refusal is a `refusal::Refusal`, mapped to
//!    the wire's error codes in one place.
//! 3. `authz` is pure: caller, socket scope, task ownership, the token's audience and the
//!    opening policy in, decision out; `authz::decide` decides every opening (`get`, `env`,
//!    `list`, `open`, both kinds of socket), with user and group names resolved by `accounts`.
//!
//! Changes travel `watch` → `lifecycle` → {`keys`, `tasks`}:
//!
//! - `watch` turns inotify events and ticks into scan work; `lifecycle` is the one thread that
//!   mutates keys (`keys::store`, `keys::sources`, `keys::ingest`, `keys::revocation`,
//!   `keys::expiry`), env files (`tasks::index` with its per-file caps, `tasks::envfile`,
//!   `tasks::settle`, `tasks::discovery`, `tasks::pace` for each uid's re-read budget) and the
//!   config, on commands from the watcher, the admin operations and SIGHUP. `start_race` notices
//!   a configured root that appeared read-only in the service's sandbox and exits for a restart.
//! - `state` is what both paths share: config snapshot, key store, task index, counters.
//!
//! Around them: [`config`] (the JSON file, parsed once into types), [`report`] (the typed
//! `health`/`status` documents, shared with [`admin`], the operator commands), `fsutil`
//! (crash-safe writes), [`hardening`], [`logging`], `sys` (the crate's only `unsafe`), [`demo`],
//! and [`run`] here: the seam `main` and the demo use to start and stop the agent.
#![deny(unsafe_code)]

mod accounts;
pub mod admin;
mod authz;
mod budget;
pub mod config;
mod decrypt_pool;
pub mod demo;
mod fsutil;
mod handler;
pub mod hardening;
mod keys;
pub mod keyvault;
mod lifecycle;
mod log_budget;
pub mod logging;
mod peer;
mod rate;
mod refusal;
pub mod report;
mod server;
mod shutdown;
mod start_race;
mod state;
mod sys;
mod tasks;
mod watch;
mod watches;

use anyhow::{Context, Result};
use authz::Scope;
use config::Config;
use handler::Handler;
use lifecycle::{Lifecycle, ScanWork};
use server::admission::Admission;
use server::ServeContext;
use state::State;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
    let state = Arc::new(State::new(config));
    let config = state.config();
    // Before anything is created: which roots systemd may have left read-only (start_race).
    let missing_roots = start_race::missing_at_start(&config);
    if let Err(e) = keys::check_store_dir(&config.key_store_dir()) {
        tracing::error!(error = %format!("{e:#}"), "key store unusable; continuing with keys from their sources only");
    }
    // First the socket: it refuses to start beside a live agent, before anything touches the
    // key store. Connections wait in its backlog until serving starts below.
    let (listener, owned_socket) =
        server::listener::host_socket(&config, options.socket_activation)?;
    let (events_tx, events) = tokio::sync::mpsc::channel(watches::EVENT_QUEUE);
    let (lifecycle, changed, lifecycle_thread) = Lifecycle::start(state.clone(), events_tx)?;
    let (mut trigger, stop_listener) = shutdown::channel();

    // The first load walks every root and sets up every watch before READY: a file written
    // right after READY is seen by its watch.
    let first_load = ScanWork {
        skip_ingest: true,
        ..ScanWork::full()
    };
    lifecycle
        .scan(first_load)
        .await
        .context("initial load failed")?;
    let watcher = tokio::spawn(watch::run(
        state.clone(),
        lifecycle.clone(),
        events,
        stop_listener.clone(),
    ));

    let key_vault = tokio::spawn(keyvault::run(state.clone(), stop_listener.clone()));
    let handler = Arc::new(Handler::new(state.clone(), lifecycle.clone()));
    let ctx = ServeContext {
        handler: handler.clone(),
        admission: Arc::new(Admission::new(config.limits.max_connections)),
        shutdown: stop_listener,
        identify: peer::Identify::probe(),
    };
    // READY promises the tasks' own sockets too.
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    let task_sockets = tokio::spawn(server::task_sockets::run(ctx.clone(), changed, synced_tx));
    let _ = synced.await;
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
        keys = state.keys.usable_count(),
        tasks = state.tasks.entries().len(),
        roots = ?config.env_roots,
        "nodeseal-agent ready"
    );
    if options.daemon {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    ready(&socket_shown);
    {
        let lifecycle = lifecycle.clone();
        let ingest = ScanWork {
            keys: true,
            ..ScanWork::default()
        };
        tokio::spawn(async move { lifecycle.scan(ingest).await });
    }

    let watchdog = options.daemon.then(|| tokio::spawn(watchdog()));
    let log_summaries = tokio::spawn(log_budget::summarize_periodically());
    let hup = tokio::spawn(reload_on_sighup(
        hup_signal,
        lifecycle.clone(),
        options.config_path.clone(),
    ));

    // Under systemd a root that appeared read-only is fixed by a restart (start_race); stop
    // cleanly and exit non-zero so that Restart=on-failure starts the agent again.
    let mut restart_for = None;
    if options.daemon {
        tokio::select! {
            () = shutdown => {}
            root = start_race::appeared_read_only(missing_roots) => restart_for = Some(root),
        }
    } else {
        shutdown.await;
    }
    tracing::info!("stopping: no new requests; waiting for in-flight ones");
    if options.daemon {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
    trigger.stop();
    let drain = Duration::from_secs(state.config().limits.drain_timeout_secs);
    drop(ctx);
    let _ = host.await;
    if !trigger.drained(drain).await {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    let _ = watcher.await;
    let _ = task_sockets.await;
    for task in [watchdog, Some(hup), Some(key_vault), Some(log_summaries)]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    if let Some(path) = owned_socket {
        let _ = std::fs::remove_file(path);
    }
    state.tasks.evict_all();
    handler.shutdown();
    drop(handler);
    drop(lifecycle);
    // The thread ends once the last handle is gone; a connection cut off by the drain timeout
    // may still hold one for a moment, and stopping must not wait for it.
    let joined = tokio::task::spawn_blocking(move || lifecycle_thread.join());
    let _ = tokio::time::timeout(Duration::from_secs(1), joined).await;
    tracing::info!("stopped");
    match restart_for {
        Some(root) => Err(anyhow::anyhow!(
            "{} appeared after start and is read-only in the service's sandbox; exiting so that systemd restarts the agent (Restart=on-failure) with it writable",
            root.display()
        )),
        None => Ok(()),
    }
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
    lifecycle: Lifecycle,
    config_path: Option<PathBuf>,
) {
    let Some(mut hup) = hup else { return };
    while hup.recv().await.is_some() {
        let config = match &config_path {
            Some(path) => match Config::load(path) {
                Ok(new) => Some(new),
                Err(e) => {
                    tracing::error!(error = %e, "config reload failed; keeping the previous config");
                    continue;
                }
            },
            None => None,
        };
        if lifecycle.reload(config).await.is_err() {
            return;
        }
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
