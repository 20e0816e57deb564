//! The agent's shared state: the config snapshot in force, the key store, the task index (with
//! its value cache) and the counters. Handlers read it; only the lifecycle task changes keys,
//! tasks and the config.

use crate::budget::Ledger;
use crate::config::Config;
use crate::keys::KeyStore;
use crate::report::CounterReport;
use crate::tasks::Tasks;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Request and work counters for `health` and `status`.
#[derive(Default)]
pub(crate) struct Counters {
    /// Requests answered.
    pub(crate) requests: AtomicU64,
    /// Successful answers.
    pub(crate) ok: AtomicU64,
    /// Failed answers by code.
    errors: Mutex<HashMap<&'static str, u64>>,
    /// Decryptions performed (cache misses).
    pub(crate) decrypts: AtomicU64,
    /// Connections refused or cut at a limit.
    pub(crate) limited: AtomicU64,
    /// SIGHUP reloads completed (config re-read, keys and env files rescanned, task sockets
    /// rebound): tests and operators wait for this to move instead of sleeping.
    pub(crate) reloads: AtomicU64,
    /// Batches of file-system work completed, task sockets included (watch events and periodic
    /// rescans).
    pub(crate) scans: AtomicU64,
}

impl Counters {
    pub(crate) fn count_error(&self, code: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    pub(crate) fn report(&self) -> CounterReport {
        let errors = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        CounterReport {
            requests: self.requests.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            decrypts: self.decrypts.load(Ordering::Relaxed),
            limited: self.limited.load(Ordering::Relaxed),
            reloads: self.reloads.load(Ordering::Relaxed),
            scans: self.scans.load(Ordering::Relaxed),
            errors,
        }
    }
}

/// Everything requests are answered from.
pub(crate) struct State {
    config: RwLock<Arc<Config>>,
    /// Private keys.
    pub(crate) keys: KeyStore,
    /// Task env files and their cached values.
    pub(crate) tasks: Tasks,
    /// Per-uid memory: env file entries and cached values (charged by `tasks`) and responses
    /// being written (charged by the connection writing them).
    pub(crate) memory: Arc<Ledger>,
    /// Counters.
    pub(crate) counters: Counters,
    /// When the agent started, for `uptime_secs`.
    pub(crate) started: Instant,
    /// Keys that stay in Key Vault.
    pub(crate) remote: crate::keyvault::RemoteKeys,
}

impl State {
    /// A fresh state with `config` and no keys or tasks yet.
    pub(crate) fn new(config: Config) -> Self {
        let memory = Arc::new(Ledger::default());
        Self {
            config: RwLock::new(Arc::new(config)),
            keys: KeyStore::new(),
            tasks: Tasks::new(memory.clone()),
            memory,
            counters: Counters::default(),
            started: Instant::now(),
            remote: crate::keyvault::RemoteKeys::default(),
        }
    }

    /// The config in force. A request takes one snapshot and uses it throughout, so a reload
    /// never mixes two configs within one answer.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the config (the lifecycle task, on reload).
    pub(crate) fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}
