//! What the agent answers: one protocol request from one peer, authorized from its kernel
//! credentials, logged as one structured line with the outcome (never the value).

use crate::config::Config;
use crate::decrypt_pool::DecryptPool;
use crate::keystore::KeyStore;
use crate::peer::Peer;
use crate::tasks::{normalize_task_dir, Cached, EnvEntry, Tasks, ValueKind};
use nodeseal_client::protocol::{ErrorCode, NamedValue, Operation, Request, Response};
use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::{legacy, KeyPair, Thumbprint, TokenError};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

/// Which socket a request came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The host-wide socket: access by peer credentials.
    Host,
    /// A per-task socket inside this task directory: answers for that task only, whoever asks
    /// (reaching the socket file is the credential).
    Task(PathBuf),
}

/// One open connection of a uid; dropping it frees the slot.
pub struct ConnectionSlot {
    agent: Arc<Agent>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .agent
            .connections_by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// An error answer: a stable code and a message that never holds a secret.
pub type Failure = (ErrorCode, String);

fn fail<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, Failure> {
    Err((code, msg.into()))
}

/// Request counters for `status`.
#[derive(Default)]
pub struct Counters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Successful answers.
    pub ok: AtomicU64,
    /// Failed answers by code.
    pub errors: Mutex<HashMap<&'static str, u64>>,
    /// Decryptions performed (cache misses).
    pub decrypts: AtomicU64,
    /// Connections refused or cut at a limit.
    pub limited: AtomicU64,
    /// SIGHUP reloads completed (config re-read, keys and env files rescanned): tests and
    /// operators wait for this to move instead of sleeping.
    pub reloads: AtomicU64,
    /// Batches of file-system work completed (watch events and periodic rescans).
    pub scans: AtomicU64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The agent's shared state.
pub struct Agent {
    config: RwLock<Arc<Config>>,
    /// Private keys.
    pub keys: KeyStore,
    /// Task env files.
    pub tasks: Tasks,
    /// Counters.
    pub counters: Counters,
    /// Bounds concurrent RSA work to the cores, so decryption never starves the reactor or
    /// queues hundreds of blocking threads.
    /// RSA work runs here, one thread per core, so it never stalls the reactor.
    decrypt_pool: DecryptPool,
    rate: Mutex<HashMap<u32, Bucket>>,
    started: Instant,
    /// Serializes key rescans: two concurrent ingests of one key could pair one run's PFX with
    /// the other's passphrase file.
    pub key_scan: Mutex<()>,
    /// Open connections per peer uid.
    connections_by_uid: Mutex<HashMap<u32, usize>>,
    /// When each expiring certificate was last warned about.
    pub expiry_warned: Mutex<HashMap<Thumbprint, Instant>>,
}

impl Agent {
    /// A fresh agent with `config` and no keys or tasks yet.
    pub fn new(config: Config) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            config: RwLock::new(Arc::new(config)),
            keys: KeyStore::new(),
            tasks: Tasks::new(),
            counters: Counters::default(),
            decrypt_pool: DecryptPool::new(cores),
            rate: Mutex::new(HashMap::new()),
            started: Instant::now(),
            expiry_warned: Mutex::new(HashMap::new()),
            connections_by_uid: Mutex::new(HashMap::new()),
            key_scan: Mutex::new(()),
        }
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the config (SIGHUP).
    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Count a new connection of `uid`; `None` when the uid is at its limit. The returned guard
    /// gives the slot back when dropped.
    pub fn admit_connection(self: &Arc<Self>, uid: u32) -> Option<ConnectionSlot> {
        let max = self.config().limits.max_connections_per_uid;
        let mut map = self
            .connections_by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            agent: self.clone(),
            uid,
        })
    }

    /// Take one request from `uid`'s budget; false means "answer busy".
    pub fn take_rate_token(&self, uid: u32) -> bool {
        let limits = self.config().limits.clone();
        let now = Instant::now();
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        if rate.len() > 65_536 {
            // Bound the table: forget buckets that have refilled anyway.
            rate.retain(|_, b| now.duration_since(b.last) < Duration::from_secs(10));
        }
        let burst = f64::from(limits.burst_per_uid);
        let b = rate.entry(uid).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let refill =
            now.duration_since(b.last).as_secs_f64() * f64::from(limits.requests_per_sec_per_uid);
        b.tokens = (b.tokens + refill).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Answer one request and log the decision.
    pub async fn handle(
        self: &Arc<Self>,
        peer: &Peer,
        scope: &Scope,
        request: Request,
    ) -> Response {
        let op = request.op.name();
        let mut audit = Audit::default();
        let result = if request.v != nodeseal_client::protocol::PROTOCOL_VERSION {
            fail(
                ErrorCode::BadRequest,
                format!(
                    "protocol version {} is not supported; this agent speaks version {}",
                    request.v,
                    nodeseal_client::protocol::PROTOCOL_VERSION
                ),
            )
        } else {
            self.dispatch(peer, scope, request.op, &mut audit).await
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut response = match result {
            Ok(r) => {
                self.counters.ok.fetch_add(1, Ordering::Relaxed);
                r
            }
            Err((code, message)) => {
                *self
                    .counters
                    .errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(code.as_str())
                    .or_default() += 1;
                audit.outcome = code.as_str();
                Response::error(code, message)
            }
        };
        response.id = request.id;
        audit.log(peer, op);
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        peer: &Peer,
        scope: &Scope,
        op: Operation,
        audit: &mut Audit,
    ) -> Result<Response, Failure> {
        match op {
            Operation::Health => Ok(self.health()),
            Operation::Status => {
                require_host_root(peer, scope, "status")?;
                Ok(self.status())
            }
            Operation::Get { name, task } => {
                audit.secret_name = Some(name.clone());
                let entries = self.readable_entries(peer, scope, task.as_deref(), audit)?;
                let (entry, index) = find_var(&entries, &name).ok_or_else(|| {
                    (
                        ErrorCode::NotFound,
                        format!("no variable {name} in this task's env files"),
                    )
                })?;
                let (value, key) = self.resolve(&entry, index).await?;
                audit.key_id = key;
                let mut r = Response::ok();
                r.value = Some(Zeroizing::new(value.as_str().to_owned()));
                Ok(r)
            }
            Operation::Env { task } => {
                let entries = self.readable_entries(peer, scope, task.as_deref(), audit)?;
                let mut order: Vec<String> = Vec::new();
                for e in &entries {
                    for v in &e.vars {
                        if !order.contains(&v.name) {
                            order.push(v.name.clone());
                        }
                    }
                }
                // Open every value at once: decryptions spread over the cores (the permits
                // bound them) instead of running one after another.
                let mut jobs = tokio::task::JoinSet::new();
                for (position, name) in order.into_iter().enumerate() {
                    let Some((entry, index)) = find_var(&entries, &name) else {
                        continue;
                    };
                    let agent = self.clone();
                    jobs.spawn(async move {
                        let result = agent.resolve(&entry, index).await;
                        (position, name, result)
                    });
                }
                let mut opened = Vec::with_capacity(jobs.len());
                while let Some(done) = jobs.join_next().await {
                    let (position, name, result) = done.map_err(|_| {
                        (ErrorCode::Internal, "a decryption task failed".to_owned())
                    })?;
                    let (value, _) = result.map_err(|(code, msg)| {
                        audit.secret_name = Some(name.clone());
                        (code, format!("{name}: {msg}"))
                    })?;
                    opened.push((position, name, value));
                }
                opened.sort_by_key(|(position, _, _)| *position);
                let values: Vec<NamedValue> = opened
                    .into_iter()
                    .map(|(_, name, value)| NamedValue {
                        name,
                        value: Zeroizing::new(value.as_str().to_owned()),
                    })
                    .collect();
                let mut r = Response::ok();
                r.values = Some(values);
                Ok(r)
            }
            Operation::List { task } => {
                let entries = self.readable_entries(peer, scope, task.as_deref(), audit)?;
                let mut names: Vec<String> = Vec::new();
                for e in &entries {
                    for v in &e.vars {
                        if !names.contains(&v.name) {
                            names.push(v.name.clone());
                        }
                    }
                }
                let mut r = Response::ok();
                r.names = Some(names);
                Ok(r)
            }
            Operation::Open { token, name } => {
                audit.secret_name = name.clone();
                let (value, key) = self
                    .open_presented(peer, scope, &token, name.as_deref())
                    .await?;
                audit.key_id = Some(key);
                let mut r = Response::ok();
                r.value = Some(value);
                Ok(r)
            }
            Operation::Revoke { thumbprint, purge } => {
                require_host_root(peer, scope, "revoke")?;
                let tp = parse_thumbprint(&thumbprint)?;
                audit.key_id = Some(tp);
                crate::lifecycle::revoke(self, tp, purge)
                    .map_err(|e| (ErrorCode::Internal, format!("{e:#}")))?;
                let mut r = Response::ok();
                r.info = Some(
                    serde_json::json!({"thumbprint": tp.to_string(), "state": "revoked", "purged": purge}),
                );
                Ok(r)
            }
            Operation::Restore { thumbprint } => {
                require_host_root(peer, scope, "restore")?;
                let tp = parse_thumbprint(&thumbprint)?;
                audit.key_id = Some(tp);
                crate::lifecycle::restore(self, tp)
                    .map_err(|e| (ErrorCode::Internal, format!("{e:#}")))?;
                let state = if self.keys.get(&tp).is_ok() {
                    "loaded"
                } else {
                    "missing"
                };
                let mut r = Response::ok();
                r.info = Some(serde_json::json!({"thumbprint": tp.to_string(), "state": state}));
                Ok(r)
            }
            _ => fail(
                ErrorCode::BadRequest,
                "operation not supported by this agent",
            ),
        }
    }

    fn health(&self) -> Response {
        let mut r = Response::ok();
        r.info = Some(serde_json::json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "keys": self.keys.usable_count(),
            "tasks": self.task_count(),
            "reloads": self.counters.reloads.load(Ordering::Relaxed),
            "scans": self.counters.scans.load(Ordering::Relaxed),
        }));
        r
    }

    fn task_count(&self) -> usize {
        self.tasks.task_count()
    }

    /// The `status` document: keys, tasks and counters, never values.
    pub fn status_info(&self) -> serde_json::Value {
        let mut tasks: Vec<serde_json::Value> = Vec::new();
        let mut by_dir: std::collections::BTreeMap<PathBuf, Vec<Arc<EnvEntry>>> =
            Default::default();
        for e in self.tasks.entries() {
            by_dir.entry(e.task_dir.clone()).or_default().push(e);
        }
        for (dir, entries) in by_dir {
            let first = &entries[0];
            tasks.push(serde_json::json!({
                "task_dir": dir.display().to_string(),
                "job_id": first.job_id,
                "task_id": first.task_id,
                "owner_uid": first.owner_uid,
                "files": entries.iter().map(|e| e.path.display().to_string()).collect::<Vec<_>>(),
                "values": entries.iter().map(|e| e.vars.len()).sum::<usize>(),
            }));
        }
        let errors = self
            .counters
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let config = self.config();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.started.elapsed().as_secs(),
            "keys": self.keys.status(),
            "tasks": tasks,
            "env_roots": config.env_roots,
            "counters": {
                "requests": self.counters.requests.load(Ordering::Relaxed),
                "ok": self.counters.ok.load(Ordering::Relaxed),
                "decrypts": self.counters.decrypts.load(Ordering::Relaxed),
                "limited": self.counters.limited.load(Ordering::Relaxed),
                "reloads": self.counters.reloads.load(Ordering::Relaxed),
                "scans": self.counters.scans.load(Ordering::Relaxed),
                "errors": errors,
            },
        })
    }

    fn status(&self) -> Response {
        let mut r = Response::ok();
        r.info = Some(self.status_info());
        r
    }

    /// The env files of the task the caller names (or owns) that the caller may read.
    fn readable_entries(
        &self,
        peer: &Peer,
        scope: &Scope,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Vec<Arc<EnvEntry>>, Failure> {
        let task_dir = match (scope, task) {
            (Scope::Task(dir), None) => dir.clone(),
            (Scope::Task(dir), Some(t)) => {
                let asked = normalize_task_dir(t);
                if &asked != dir {
                    return fail(
                        ErrorCode::Forbidden,
                        "this per-task socket answers only for its own task",
                    );
                }
                asked
            }
            (Scope::Host, Some(t)) => normalize_task_dir(t),
            (Scope::Host, None) => {
                if peer.uid == 0 {
                    return fail(
                        ErrorCode::BadRequest,
                        "name the task: set \"task\" to the task directory (AZ_BATCH_TASK_DIR)",
                    );
                }
                let owned = self.tasks.task_dirs_owned_by(peer.uid);
                match owned.len() {
                    0 => {
                        return fail(
                            ErrorCode::NotFound,
                            format!("no task env file owned by uid {} is known", peer.uid),
                        )
                    }
                    1 => owned.into_iter().next().unwrap_or_default(),
                    n => {
                        return fail(
                            ErrorCode::BadRequest,
                            format!(
                                "uid {} owns {n} tasks; set \"task\" to the task directory (AZ_BATCH_TASK_DIR)",
                                peer.uid
                            ),
                        )
                    }
                }
            }
        };
        let entries = self.tasks.entries_of(&task_dir);
        if let Some(first) = entries.first() {
            audit.task_id = first.task_id.clone();
            audit.job_id = first.job_id.clone();
        }
        if entries.is_empty() {
            return fail(
                ErrorCode::NotFound,
                format!("no env file is known for task {}", task_dir.display()),
            );
        }
        let readable: Vec<Arc<EnvEntry>> = match scope {
            Scope::Task(_) => entries,
            Scope::Host if peer.host_root => entries,
            Scope::Host if peer.uid == 0 => {
                return fail(
                    ErrorCode::Forbidden,
                    "uid 0 outside the host's pid namespace is not host root; use the task's own socket",
                )
            }
            Scope::Host => entries
                .into_iter()
                .filter(|e| e.owner_uid == peer.uid)
                .collect(),
        };
        if readable.is_empty() {
            return fail(
                ErrorCode::Forbidden,
                format!(
                    "uid {} does not own the env files of task {}",
                    peer.uid,
                    task_dir.display()
                ),
            );
        }
        Ok(readable)
    }

    /// Whether `peer` may `open` tokens of key `tp`: host root and per-task sockets always;
    /// otherwise the key's rule in `open_allowed_by_key`, else the global rule.
    fn may_open_with(&self, peer: &Peer, scope: &Scope, tp: &Thumbprint) -> bool {
        if peer.host_root || matches!(scope, Scope::Task(_)) {
            return true;
        }
        let config = self.config();
        if let Some(rule) = config
            .open_allowed_by_key
            .iter()
            .find(|(k, _)| Thumbprint::from_hex(k).ok() == Some(*tp))
            .map(|(_, r)| r)
        {
            return rule.uids.contains(&peer.uid) || rule.gids.contains(&peer.gid);
        }
        let by_uid = match &config.open_allowed_uids {
            None => peer.uid != 0,
            Some(uids) => uids.contains(&peer.uid),
        };
        by_uid || config.open_allowed_gids.contains(&peer.gid)
    }

    /// The cleartext of variable `index` of `entry`, from cache or by decrypting.
    async fn resolve(
        &self,
        entry: &Arc<EnvEntry>,
        index: usize,
    ) -> Result<(Arc<Zeroizing<String>>, Option<Thumbprint>), Failure> {
        let var = &entry.vars[index];
        match &var.kind {
            ValueKind::Plain(v) => return Ok((Arc::new(v.clone()), None)),
            ValueKind::Invalid(reason) => {
                return fail(
                    ErrorCode::BadToken,
                    format!("the stored token is invalid: {reason}"),
                )
            }
            _ => {}
        }
        {
            let cache = var.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.as_ref() {
                if c.expires > Instant::now() && !self.keys.is_revoked(&c.key) {
                    return Ok((c.value.clone(), Some(c.key)));
                }
            }
        }
        let (value, key) = match &var.kind {
            ValueKind::V1 { token, recipients } => {
                self.open_v1(token, recipients, Some(&var.name)).await?
            }
            ValueKind::Shipyard { token, len } => self.open_shipyard(token, *len).await?,
            _ => unreachable!("plain and invalid values returned above"),
        };
        let value = Arc::new(value);
        let ttl = Duration::from_secs(self.config().cache_ttl_secs);
        if !ttl.is_zero() {
            *var.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
                value: value.clone(),
                key,
                expires: Instant::now() + ttl,
            });
        }
        Ok((value, Some(key)))
    }

    async fn open_presented(
        &self,
        peer: &Peer,
        scope: &Scope,
        token_text: &str,
        name: Option<&str>,
    ) -> Result<(Zeroizing<String>, Thumbprint), Failure> {
        let forbidden = |tp: &Thumbprint| {
            (
                ErrorCode::Forbidden,
                format!(
                    "uid {} may not open tokens of key {tp} (see open_allowed_uids and open_allowed_by_key in the agent config)",
                    peer.uid
                ),
            )
        };
        match token::detect(token_text) {
            Some(Format::V1) => {
                let info = token::inspect(token_text).map_err(token_failure)?;
                let allowed: Vec<Thumbprint> = info
                    .recipients
                    .iter()
                    .filter(|tp| self.may_open_with(peer, scope, tp))
                    .copied()
                    .collect();
                if allowed.is_empty() {
                    return Err(forbidden(&info.recipients[0]));
                }
                self.open_v1(token_text, &allowed, Some(name.unwrap_or("")))
                    .await
            }
            Some(Format::Shipyard) => {
                let len = legacy::decode(token_text).map_or(0, |d| d.len());
                let key = self.legacy_key_for(len)?;
                if !self.may_open_with(peer, scope, &key.thumbprint()) {
                    return Err(forbidden(&key.thumbprint()));
                }
                self.open_shipyard(token_text, len).await
            }
            _ => fail(
                ErrorCode::BadToken,
                "not a nodeseal v1 token nor a Batch Shipyard ciphertext",
            ),
        }
    }

    async fn open_v1(
        &self,
        token_text: &str,
        recipients: &[Thumbprint],
        name: Option<&str>,
    ) -> Result<(Zeroizing<String>, Thumbprint), Failure> {
        let keys: Vec<Arc<KeyPair>> = recipients
            .iter()
            .filter_map(|tp| self.keys.get(tp).ok())
            .collect();
        if keys.is_empty() {
            return fail(
                ErrorCode::KeyUnavailable,
                format!(
                    "none of the token's keys is available on this node ({}); retry later",
                    recipients
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        let token_text = token_text.to_owned();
        let name = name.map(str::to_owned);
        let opened = self
            .blocking(move || {
                let lookup = |tp: &Thumbprint| keys.iter().find(|k| k.thumbprint() == *tp).cloned();
                token::open_v1(&token_text, &lookup, name.as_deref(), SystemTime::now())
            })
            .await?
            .map_err(token_failure)?;
        self.keys.count_open(&opened.key);
        Ok((utf8(opened.value)?, opened.key))
    }

    /// The one key that may open a legacy ciphertext of `len` bytes: `legacy_key` if set, else
    /// the only loaded key of that size. Never several: with implicit rejection a wrong key
    /// "succeeds" with garbage, so trying keys in turn would serve a wrong value.
    fn legacy_key_for(&self, len: usize) -> Result<Arc<KeyPair>, Failure> {
        let config = self.config();
        if let Some(tp) = config
            .legacy_key
            .as_deref()
            .and_then(|t| Thumbprint::from_hex(t).ok())
        {
            return match self.keys.get(&tp) {
                Ok(k) if k.modulus_len() == len => Ok(k),
                Ok(k) => fail(
                    ErrorCode::BadToken,
                    format!(
                        "legacy ciphertext is {} bits but legacy_key {tp} is {} bits",
                        len * 8,
                        k.bits()
                    ),
                ),
                Err(_) => fail(
                    ErrorCode::KeyUnavailable,
                    format!("legacy_key {tp} is not available on this node; retry later"),
                ),
            };
        }
        let mut keys = self.keys.with_modulus_len(len);
        match keys.len() {
            0 => fail(
                ErrorCode::KeyUnavailable,
                format!("no {}-bit key is available on this node for this legacy ciphertext; retry later", len * 8),
            ),
            1 => Ok(keys.remove(0)),
            n => fail(
                ErrorCode::KeyUnavailable,
                format!(
                    "{n} keys of {} bits are loaded and legacy ciphertexts name none; set legacy_key in the agent config",
                    len * 8
                ),
            ),
        }
    }

    async fn open_shipyard(
        &self,
        token_text: &str,
        len: usize,
    ) -> Result<(Zeroizing<String>, Thumbprint), Failure> {
        let key = self.legacy_key_for(len)?;
        let token_text = token_text.to_owned();
        let tp = key.thumbprint();
        let value = self
            .blocking(move || legacy::open(&token_text, &key))
            .await?
            .map_err(token_failure)?;
        self.keys.count_open(&tp);
        Ok((utf8(value)?, tp))
    }

    /// Run RSA work on the blocking pool, at most one job per core at a time.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Failure> {
        self.counters.decrypts.fetch_add(1, Ordering::Relaxed);
        self.decrypt_pool.run(f).await.ok_or_else(|| {
            (
                ErrorCode::Busy,
                "the agent is shutting down; retry shortly".to_owned(),
            )
        })
    }

    /// Stop the decrypt threads (after the last request is answered).
    pub fn shutdown(&self) {
        self.decrypt_pool.shutdown();
    }
}

fn utf8(bytes: Zeroizing<Vec<u8>>) -> Result<Zeroizing<String>, Failure> {
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => fail(ErrorCode::BadToken, "the decrypted value is not UTF-8 text"),
    }
}

fn token_failure(e: TokenError) -> Failure {
    let code = match &e {
        TokenError::Expired { .. } => ErrorCode::Expired,
        TokenError::NoMatchingKey { .. } => ErrorCode::KeyUnavailable,
        TokenError::TooLarge { .. } => ErrorCode::TooLarge,
        TokenError::Crypto { .. } => ErrorCode::Internal,
        _ => ErrorCode::BadToken,
    };
    (code, e.to_string())
}

fn parse_thumbprint(s: &str) -> Result<Thumbprint, Failure> {
    Thumbprint::from_hex(s).map_err(|e| (ErrorCode::BadRequest, e.to_string()))
}

fn require_host_root(peer: &Peer, scope: &Scope, op: &str) -> Result<(), Failure> {
    if peer.host_root && *scope == Scope::Host {
        Ok(())
    } else {
        fail(ErrorCode::Forbidden, format!("{op} is for host root only"))
    }
}

/// The last definition of `name` across the task's files wins, as with repeated `--env-file`.
fn find_var(entries: &[Arc<EnvEntry>], name: &str) -> Option<(Arc<EnvEntry>, usize)> {
    let mut found = None;
    for e in entries {
        if let Some(i) = e.vars.iter().rposition(|v| v.name == name) {
            found = Some((e.clone(), i));
        }
    }
    found
}

/// The fields of one audit line; journald shows them as `PEER_UID=`, `OUTCOME=` and so on.
#[derive(Default)]
struct Audit {
    task_id: Option<String>,
    job_id: Option<String>,
    secret_name: Option<String>,
    key_id: Option<Thumbprint>,
    outcome: &'static str,
}

impl Audit {
    fn log(&self, peer: &Peer, op: &'static str) {
        let outcome = if self.outcome.is_empty() {
            "ok"
        } else {
            self.outcome
        };
        let key_id = self.key_id.map(|k| k.to_string());
        macro_rules! line {
            ($lvl:ident) => {
                // Fixed vocabulary and hex as Display; names and ids the caller or a task chose
                // stay Debug-quoted, so they cannot forge fields or lines in the log.
                tracing::$lvl!(
                    op = %op,
                    peer_uid = peer.uid,
                    peer_pid = peer.pid,
                    host_root = peer.host_root,
                    task_id = self.task_id.as_deref().unwrap_or(""),
                    job_id = self.job_id.as_deref().unwrap_or(""),
                    secret_name = self.secret_name.as_deref().unwrap_or(""),
                    key_id = %key_id.as_deref().unwrap_or("-"),
                    outcome = %outcome,
                    "request"
                )
            };
        }
        match outcome {
            "ok" if op == "health" => line!(debug),
            "ok" | "not_found" => line!(info),
            _ => line!(warn),
        }
    }
}
