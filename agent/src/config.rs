//! The agent's configuration: one JSON file, every field optional with a Batch-node default,
//! unknown fields refused by name. Documented field by field in `docs/configuration.md`.

use nodeseal_envelope::Thumbprint;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the agent looks for its config when neither `--config` nor `NODESEAL_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nodeseal/agent.json";

/// Problems reading or validating the config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Io {
        /// Config path.
        path: PathBuf,
        /// OS error (part of the message, so not chained again).
        source: std::io::Error,
    },
    /// Not valid JSON, an unknown field, or a wrong type.
    #[error("invalid config {}: {source}; see `nodeseal-agent print-default-config` for every field", path.display())]
    Parse {
        /// Config path.
        path: PathBuf,
        /// serde_json's error, which names the unknown field and its line.
        source: serde_json::Error,
    },
    /// A value out of range.
    #[error("invalid config {}: {field}: {reason}", path.display())]
    Invalid {
        /// Config path.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

/// The whole config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Host-wide socket, used when systemd hands us none.
    pub socket_path: PathBuf,
    /// Octal mode of the socket file. Everyone may connect: authorization is by peer credentials.
    pub socket_mode: SocketMode,
    /// Agent state; the key store is `<state_dir>/keys`.
    pub state_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`; `RUST_LOG` overrides.
    pub log_level: LogLevel,
    /// Where private keys come from.
    pub key_sources: Vec<KeySource>,
    /// A file of thumbprints (one per line, `#` comments) that are withdrawn while listed.
    pub revocation_list: Option<PathBuf>,
    /// Trees watched for task env files.
    pub env_roots: Vec<PathBuf>,
    /// File names (not paths) that are task env files.
    pub env_file_names: Vec<String>,
    /// Where the scheduler puts tasks below each env root: `batch` or `flat`.
    pub task_layout: TaskLayout,
    /// Variables whose values may be legacy Batch Shipyard ciphertexts.
    pub legacy_names: Vec<String>,
    /// Also treat any value whose base64 decodes to 256, 384 or 512 bytes as legacy.
    pub legacy_by_length: bool,
    /// Thumbprint of the key that opens legacy ciphertexts when several keys of the same size
    /// are loaded. Legacy ciphertexts name no key, and implicit rejection means a wrong key
    /// yields garbage rather than an error, so the agent never guesses between keys.
    #[serde(
        serialize_with = "serialize_optional_thumbprint",
        deserialize_with = "deserialize_legacy_key"
    )]
    pub legacy_key: Option<Thumbprint>,
    /// Per-task socket file name created in each task directory; `null` disables them.
    pub task_socket_name: Option<String>,
    /// How long a decrypted value stays cached.
    pub cache_ttl_secs: u64,
    /// Connection and request limits.
    pub limits: Limits,
    /// Uids allowed to `open` unbound tokens (host root always may; bound tokens follow their
    /// audience). Default none. `null`, which once meant every non-root uid, now means none too.
    #[serde(deserialize_with = "deserialize_null_is_none")]
    pub open_allowed_uids: Vec<u32>,
    /// Gids (primary or supplementary) allowed to `open` unbound tokens, in addition.
    pub open_allowed_gids: Vec<u32>,
    /// Per-key rules for `open` of unbound tokens by thumbprint, replacing the two fields
    /// above for that key.
    #[serde(
        serialize_with = "serialize_rules_by_key",
        deserialize_with = "deserialize_rules_by_key"
    )]
    pub open_allowed_by_key: BTreeMap<Thumbprint, OpenRule>,
    /// Refuse every unbound token (v1 without an audience, legacy Shipyard ciphertexts) on
    /// every path, for everyone.
    pub require_audience: bool,
    /// This node's Batch pool id, matched by `pool:` selectors; `null` matches none.
    pub pool_id: Option<String>,
    /// Keys that never leave Key Vault, opened through its `unwrapkey` operation with the
    /// node's managed identity; absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_vault: Option<KeyVaultConfig>,
}

/// Certificates whose keys stay in Key Vault (not exportable, optionally HSM-backed): tokens
/// sealed to a version's certificate (key id: its SHA-1 thumbprint) are opened by Key Vault.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyVaultConfig {
    /// `https://<vault>.vault.azure.net/certificates/<name>`, without a version: every version
    /// Key Vault lists is served while Key Vault allows it.
    pub certificates: Vec<String>,
    /// Client id of the pool's user-assigned managed identity (`null`: the node's only one).
    #[serde(default)]
    pub client_id: Option<String>,
    /// The managed-identity token endpoint (IMDS).
    #[serde(default = "KeyVaultConfig::default_imds")]
    pub imds_endpoint: String,
    /// PEM file of CA certificates trusted for Key Vault besides the system's (tests).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How often access to every key version is re-checked and new versions looked for; a key
    /// disabled, deleted or withdrawn stops serving within this plus one call's time.
    #[serde(default = "KeyVaultConfig::default_revalidate")]
    pub revalidate_secs: u64,
    /// Key Vault calls in flight at most.
    #[serde(default = "KeyVaultConfig::default_max_calls")]
    pub max_concurrent_calls: usize,
}

impl KeyVaultConfig {
    /// IMDS on every Azure VM.
    pub const IMDS: &'static str = "http://169.254.169.254/metadata/identity/oauth2/token";

    fn default_imds() -> String {
        Self::IMDS.into()
    }

    fn default_revalidate() -> u64 {
        10
    }

    fn default_max_calls() -> usize {
        8
    }
}

/// Permission bits of the host socket, written in the file as an octal string (`"0666"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    fn parse(text: &str) -> Result<Self, String> {
        let digits = text.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 => Ok(Self(m)),
            _ => Err(format!(
                "socket_mode: {text:?} is not an octal permission mode like \"0666\""
            )),
        }
    }
}

impl fmt::Debug for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// How much the agent logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// One line per request and per change of keys or env files.
    Info,
    /// Watcher and connection detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The name `tracing`'s filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Hand-written so the error names the field; serde's own names only the variant.
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "log_level: {text:?} is not one of error, warn, info, debug, trace"
                )))
            }
        })
    }
}

fn serialize_optional_thumbprint<S: Serializer>(
    tp: &Option<Thumbprint>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match tp {
        Some(tp) => s.serialize_str(&tp.to_string()),
        None => s.serialize_none(),
    }
}

fn deserialize_legacy_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Thumbprint>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|t| {
            Thumbprint::from_hex(&t)
                .map_err(|e| serde::de::Error::custom(format!("legacy_key: {e}")))
        })
        .transpose()
}

fn deserialize_null_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    Ok(Option::<Vec<u32>>::deserialize(d)?.unwrap_or_default())
}

fn serialize_rules_by_key<S: Serializer>(
    rules: &BTreeMap<Thumbprint, OpenRule>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(rules.len()))?;
    for (tp, rule) in rules {
        map.serialize_entry(&tp.to_string(), rule)?;
    }
    map.end()
}

fn deserialize_rules_by_key<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<Thumbprint, OpenRule>, D::Error> {
    let mut rules = BTreeMap::new();
    for (t, rule) in BTreeMap::<String, OpenRule>::deserialize(d)? {
        let tp = Thumbprint::from_hex(&t)
            .map_err(|e| serde::de::Error::custom(format!("open_allowed_by_key: {t:?}: {e}")))?;
        // Two spellings of one thumbprint (hex case) would leave it unclear which rule holds.
        if rules.insert(tp, rule).is_some() {
            return Err(serde::de::Error::custom(format!(
                "open_allowed_by_key: thumbprint {tp} appears more than once; keep one rule per key"
            )));
        }
    }
    Ok(rules)
}

/// How tasks are laid out below an env root; tasks exist only there.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskLayout {
    /// Azure Batch: `<root>/[<schedule>/]<job>/job-<n>/<task>/`, env files in `<task>/wd/` and
    /// `<task>/`.
    #[default]
    Batch,
    /// One directory per task: `<root>/<id>/`, env files in it (Slurm, Kubernetes, plain hosts).
    Flat,
}

/// Who may `open` tokens of one key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct OpenRule {
    /// Uids allowed.
    pub uids: Vec<u32>,
    /// Gids allowed.
    pub gids: Vec<u32>,
}

/// One key source.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySource {
    /// Which layout the directory has.
    pub kind: KeySourceKind,
    /// The directory.
    pub path: PathBuf,
    /// Copy keys into the agent's store and delete the readable originals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<bool>,
    /// `key_dir` only: passphrase for PFX and encrypted PEM files in the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeySource {
    /// Ingest defaults to on for Batch certificate dirs only (task users may read those files).
    pub fn ingest(&self) -> bool {
        self.ingest
            .unwrap_or(self.kind == KeySourceKind::BatchCerts)
    }
}

/// Directory layouts the agent understands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum KeySourceKind {
    /// `sha1-<tp>.pfx` + `sha1-<tp>.pfx.pw` as Batch drops them.
    BatchCerts,
    /// Key Vault VM extension: one PEM (key + chain) per certificate, rewritten on rotation.
    Keyvault,
    /// `<THUMBPRINT>.prv` + `<THUMBPRINT>.crt`.
    Waagent,
    /// Any PEM keys (+ certificates) or PFX files with a shared passphrase file.
    KeyDir,
}

/// Limits that protect the agent from misbehaving clients.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest request line in bytes.
    pub max_request_bytes: usize,
    /// Concurrent connections over all sockets.
    pub max_connections: usize,
    /// Concurrent connections of one peer uid, so one user cannot take every slot.
    pub max_connections_per_uid: usize,
    /// Connections the host socket queues before the agent accepts them (`listen()` backlog,
    /// 1 to 4096). The queue is shared by every uid and filled before the agent can tell who
    /// connects, so it bounds how long a connect flood makes others wait; a connection finding
    /// it full waits in `connect` (or gets `EAGAIN`, which clients retry), never fails.
    pub listen_backlog: u32,
    /// A connection idle (or mid-line) this long is closed.
    pub idle_timeout_secs: u64,
    /// Sustained requests per second per peer uid.
    pub requests_per_sec_per_uid: u32,
    /// Burst allowance per peer uid.
    pub burst_per_uid: u32,
    /// A uid over its request or RSA rate is slowed down, not refused: its request waits for
    /// its turn, up to this long. Past it the request is answered `busy`, after this long too,
    /// so a client that retries at once costs the agent one refusal per wait. 0: `busy` at once.
    pub max_rate_wait_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout_secs: u64,
    /// Directories watched with inotify at most (layout levels and key sources); past it the
    /// agent warns once and relies on its periodic rescans.
    pub max_watched_dirs: usize,
    /// Largest env file read, in bytes; a larger one is refused (and its task answers
    /// `too_large` naming this cap).
    pub max_env_file_bytes: u64,
    /// Variables (and bare names) one env file may hold.
    pub max_vars_per_file: usize,
    /// Longest stored value (token or plain text) in an env file, in bytes.
    pub max_value_bytes: usize,
    /// Bytes of env files one uid's files may add up to, over every task.
    pub max_env_bytes_per_uid: u64,
    /// Bytes of one uid's env files read (and parsed) per second, with a burst of one second's
    /// worth: past it a changed file is read later, as it is then, so a user touching a big
    /// file in a loop cannot keep the one thread that reads files from everyone else's.
    pub env_read_bytes_per_sec_per_uid: u64,
    /// Memory one uid can make the agent hold: its parsed env files and the cleartext cached
    /// from them (charged to the file's owner) and the responses being written to it (charged
    /// to the caller).
    pub memory_budget_per_uid: usize,
    /// Largest response line; a larger answer is refused with `too_large`.
    pub max_response_bytes: usize,
    /// A response not taken by the client within this long is abandoned with its connection.
    pub write_timeout_secs: u64,
    /// Sustained RSA private-key operations per second per peer uid. Each operation is
    /// charged before it runs: a token that names several held keys costs one per key tried.
    pub rsa_ops_per_sec_per_uid: u32,
    /// Burst allowance of RSA operations per peer uid (an `env` of many uncached values).
    pub rsa_burst_per_uid: u32,
    /// RSA operations waiting for a decrypt thread, over all uids; past it `busy` at once.
    pub max_queued_decrypts: usize,
    /// RSA operations of one uid waiting for a decrypt thread; past it `busy` at once. The
    /// queue is served round robin between uids.
    pub max_queued_decrypts_per_uid: usize,
    /// Warning lines of one kind about one uid per `log_window_secs`; the rest are counted and
    /// summarized as "N similar lines suppressed" when the window ends.
    pub log_lines_per_kind_per_uid: u32,
    /// Refusal audit records of one outcome for one uid per `log_window_secs`; the rest are
    /// counted and summarized like warnings. Successful decisions are always logged.
    pub audit_refusals_per_outcome_per_uid: u32,
    /// The window of the two log budgets above, in seconds.
    pub log_window_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: nodeseal_client::protocol::DEFAULT_MAX_REQUEST_BYTES,
            max_connections: 1024,
            max_connections_per_uid: 128,
            listen_backlog: 64,
            idle_timeout_secs: 30,
            requests_per_sec_per_uid: 200,
            burst_per_uid: 400,
            max_rate_wait_ms: 1000,
            drain_timeout_secs: 5,
            max_watched_dirs: 16_384,
            max_env_file_bytes: 16 << 20,
            max_vars_per_file: 65_536,
            max_value_bytes: 1 << 20,
            max_env_bytes_per_uid: 32 << 20,
            env_read_bytes_per_sec_per_uid: 1 << 20,
            memory_budget_per_uid: 64 << 20,
            max_response_bytes: 16 << 20,
            write_timeout_secs: 10,
            rsa_ops_per_sec_per_uid: 100,
            rsa_burst_per_uid: 400,
            max_queued_decrypts: 2048,
            max_queued_decrypts_per_uid: 512,
            log_lines_per_kind_per_uid: 10,
            audit_refusals_per_outcome_per_uid: 100,
            log_window_secs: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from(nodeseal_client::protocol::DEFAULT_SOCKET_PATH),
            socket_mode: SocketMode(0o666),
            state_dir: PathBuf::from("/var/lib/nodeseal"),
            log_level: LogLevel::Info,
            key_sources: vec![
                KeySource {
                    kind: KeySourceKind::BatchCerts,
                    path: PathBuf::from("/mnt/batch/tasks/startup/certs"),
                    ingest: Some(true),
                    passphrase_file: None,
                },
                KeySource {
                    kind: KeySourceKind::Keyvault,
                    path: PathBuf::from("/var/lib/waagent/Microsoft.Azure.KeyVault.Store"),
                    ingest: None,
                    passphrase_file: None,
                },
                KeySource {
                    kind: KeySourceKind::Waagent,
                    path: PathBuf::from("/var/lib/waagent"),
                    ingest: None,
                    passphrase_file: None,
                },
                KeySource {
                    kind: KeySourceKind::KeyDir,
                    path: PathBuf::from("/etc/nodeseal/keys"),
                    ingest: None,
                    passphrase_file: None,
                },
            ],
            revocation_list: Some(PathBuf::from("/etc/nodeseal/revoked")),
            env_roots: vec![PathBuf::from("/mnt/batch/tasks/workitems")],
            env_file_names: vec![".shipyard.envlist".into(), "nodeseal.env".into()],
            task_layout: TaskLayout::Batch,
            legacy_names: vec![
                "DOCKER_LOGIN_PASSWORD".into(),
                "SINGULARITY_LOGIN_PASSWORD".into(),
                "SHIPYARD_STORAGE_ENV".into(),
            ],
            legacy_by_length: true,
            legacy_key: None,
            task_socket_name: Some("nodeseal.sock".into()),
            cache_ttl_secs: 300,
            limits: Limits::default(),
            open_allowed_uids: Vec::new(),
            open_allowed_gids: Vec::new(),
            open_allowed_by_key: BTreeMap::new(),
            require_audience: false,
            pool_id: None,
            key_vault: None,
        }
    }
}

impl Config {
    /// Read and validate `path`. A missing file at the default path means "all defaults", so a
    /// bare install works; a missing file anywhere else is an error.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG_PATH) =>
            {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Self::parse(&text, path)
    }

    /// Parse and validate JSON text (`path` only names the file in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if self.socket_path.as_os_str().is_empty() || !self.socket_path.is_absolute() {
            return Err(invalid("socket_path", "must be an absolute path".into()));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path".into()));
        }
        for (i, root) in self.env_roots.iter().enumerate() {
            if !root.is_absolute() {
                return Err(invalid(
                    "env_roots",
                    format!("entry {i} ({}) must be an absolute path", root.display()),
                ));
            }
        }
        // A key source inside a task tree would let task users plant keys (or links) in it.
        for (i, source) in self.key_sources.iter().enumerate() {
            let fields = [
                ("path", Some(&source.path)),
                ("passphrase_file", source.passphrase_file.as_ref()),
            ];
            for (name, p) in fields {
                let Some(p) = p else { continue };
                if !p.is_absolute() {
                    return Err(invalid(
                        "key_sources",
                        format!(
                            "key_sources[{i}].{name} ({}) must be an absolute path",
                            p.display()
                        ),
                    ));
                }
                let normal = lexically_normal(p);
                for (j, root) in self.env_roots.iter().enumerate() {
                    if normal.starts_with(lexically_normal(root)) {
                        return Err(invalid(
                            "key_sources",
                            format!(
                                "key_sources[{i}].{name} ({}) lies under env_roots[{j}] ({}), a task tree task users can write; keep key sources outside every env root",
                                p.display(),
                                root.display()
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(name) = &self.task_socket_name {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(invalid(
                    "task_socket_name",
                    "must be a plain file name".into(),
                ));
            }
        }
        for name in &self.env_file_names {
            if name.is_empty() || name.contains('/') {
                return Err(invalid(
                    "env_file_names",
                    format!("{name:?} must be a plain file name"),
                ));
            }
        }
        if let Some(pool) = &self.pool_id {
            if !nodeseal_envelope::audience::is_valid_batch_id(pool) {
                return Err(invalid(
                    "pool_id",
                    format!("{pool:?} is not a Batch pool id (letters, digits, '-', '_', 1 to 64)"),
                ));
            }
        }
        let l = &self.limits;
        if l.max_request_bytes < 1024 {
            return Err(invalid(
                "limits.max_request_bytes",
                "must be at least 1024".into(),
            ));
        }
        if l.max_connections_per_uid == 0 {
            return Err(invalid(
                "limits.max_connections_per_uid",
                "must be at least 1".into(),
            ));
        }
        if l.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1".into(),
            ));
        }
        if l.requests_per_sec_per_uid == 0 || l.burst_per_uid == 0 {
            return Err(invalid(
                "limits.requests_per_sec_per_uid",
                "rate and burst must be at least 1".into(),
            ));
        }
        if l.rsa_ops_per_sec_per_uid == 0 || l.rsa_burst_per_uid == 0 {
            return Err(invalid(
                "limits.rsa_ops_per_sec_per_uid",
                "rate and burst must be at least 1".into(),
            ));
        }
        if !(1..=4096).contains(&l.listen_backlog) {
            return Err(invalid(
                "limits.listen_backlog",
                format!("{} is not between 1 and 4096", l.listen_backlog),
            ));
        }
        if l.max_rate_wait_ms > 10_000 {
            return Err(invalid(
                "limits.max_rate_wait_ms",
                format!(
                    "{} ms is longer than clients wait for an answer; use at most 10000",
                    l.max_rate_wait_ms
                ),
            ));
        }
        if l.max_queued_decrypts == 0 || l.max_queued_decrypts_per_uid == 0 {
            return Err(invalid(
                "limits.max_queued_decrypts",
                "the total and per-uid decrypt queues must hold at least 1".into(),
            ));
        }
        if l.log_window_secs == 0 {
            return Err(invalid(
                "limits.log_window_secs",
                "must be at least 1".into(),
            ));
        }
        if l.idle_timeout_secs == 0 {
            return Err(invalid(
                "limits.idle_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        for (field, value, min) in [
            ("limits.max_env_file_bytes", l.max_env_file_bytes, 1),
            ("limits.max_vars_per_file", l.max_vars_per_file as u64, 1),
            ("limits.max_value_bytes", l.max_value_bytes as u64, 1),
            ("limits.max_env_bytes_per_uid", l.max_env_bytes_per_uid, 1),
            (
                "limits.env_read_bytes_per_sec_per_uid",
                l.env_read_bytes_per_sec_per_uid,
                65_536,
            ),
            // An error line must always fit in a response.
            (
                "limits.max_response_bytes",
                l.max_response_bytes as u64,
                4096,
            ),
            (
                "limits.memory_budget_per_uid",
                l.memory_budget_per_uid as u64,
                65_536,
            ),
            ("limits.write_timeout_secs", l.write_timeout_secs, 1),
        ] {
            if value < min {
                return Err(invalid(field, format!("must be at least {min}")));
            }
        }
        if let Some(kv) = &self.key_vault {
            for (i, url) in kv.certificates.iter().enumerate() {
                if let Err(reason) = crate::keyvault::CertificateUrl::parse(url) {
                    return Err(invalid(
                        "key_vault.certificates",
                        format!("[{i}] {url:?}: {reason}"),
                    ));
                }
            }
            if !(1..=20).contains(&kv.revalidate_secs) {
                return Err(invalid(
                    "key_vault.revalidate_secs",
                    "must be 1 to 20, so a withdrawn key stops serving within 30 s".into(),
                ));
            }
            if kv.max_concurrent_calls == 0 {
                return Err(invalid(
                    "key_vault.max_concurrent_calls",
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }

    /// Where ingested keys are kept.
    pub fn key_store_dir(&self) -> PathBuf {
        self.state_dir.join("keys")
    }
}

/// `path` with `.` and `..` resolved and trailing slashes dropped, without touching the
/// filesystem (`..` above the root stays at the root).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_gives_defaults() {
        let c = Config::parse("{}", Path::new("t.json")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = Config::parse(r#"{"socket_pth": "/x"}"#, Path::new("t.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("socket_pth"), "{msg}");
        assert!(msg.contains("t.json"), "{msg}");
        let err =
            Config::parse(r#"{"limits": {"max_conns": 3}}"#, Path::new("t.json")).unwrap_err();
        assert!(err.to_string().contains("max_conns"));
    }

    #[test]
    fn invalid_values_are_refused_with_the_field() {
        for (json, field) in [
            (r#"{"socket_mode": "rwx"}"#, "socket_mode"),
            (r#"{"log_level": "loud"}"#, "log_level"),
            (r#"{"socket_path": "relative.sock"}"#, "socket_path"),
            (r#"{"limits": {"max_connections": 0}}"#, "max_connections"),
            (r#"{"limits": {"listen_backlog": 0}}"#, "listen_backlog"),
            (
                r#"{"limits": {"max_rate_wait_ms": 60000}}"#,
                "max_rate_wait_ms",
            ),
            (
                r#"{"limits": {"max_vars_per_file": 0}}"#,
                "max_vars_per_file",
            ),
            (
                r#"{"limits": {"write_timeout_secs": 0}}"#,
                "write_timeout_secs",
            ),
            (
                r#"{"limits": {"max_response_bytes": 100}}"#,
                "max_response_bytes",
            ),
            (
                r#"{"limits": {"env_read_bytes_per_sec_per_uid": 1000}}"#,
                "env_read_bytes_per_sec_per_uid",
            ),
            (
                r#"{"limits": {"memory_budget_per_uid": 1000}}"#,
                "memory_budget_per_uid",
            ),
            (r#"{"task_socket_name": "a/b"}"#, "task_socket_name"),
            (r#"{"legacy_key": "abc"}"#, "legacy_key"),
            (r#"{"pool_id": "a/b"}"#, "pool_id"),
            (r#"{"pool_id": ""}"#, "pool_id"),
            (
                r#"{"open_allowed_by_key": {"xyz": {"uids": [1]}}}"#,
                "open_allowed_by_key",
            ),
            (
                r#"{"open_allowed_by_key": {"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA": {}, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": {}}}"#,
                "more than once",
            ),
        ] {
            let msg = Config::parse(json, Path::new("t.json"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(field), "{json}: {msg}");
        }
    }

    #[test]
    fn default_config_round_trips_and_ingest_defaults_by_kind() {
        let c = Config::default();
        let text = serde_json::to_string_pretty(&c).unwrap();
        assert_eq!(Config::parse(&text, Path::new("t")).unwrap(), c);
        assert!(c.key_sources[0].ingest());
        let kv = KeySource {
            kind: KeySourceKind::Keyvault,
            path: "/x".into(),
            ingest: None,
            passphrase_file: None,
        };
        assert!(!kv.ingest());
        assert_eq!(c.socket_mode.bits(), 0o666);
    }

    #[test]
    fn the_documented_defaults_are_the_real_ones() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc
            .find("```json\n")
            .expect("docs/configuration.md has a JSON block")
            + 8;
        let end = start + doc[start..].find("```").unwrap();
        let documented =
            Config::parse(&doc[start..end], Path::new("docs/configuration.md")).unwrap();
        assert_eq!(documented, Config::default());
    }

    #[test]
    fn a_key_source_under_an_env_root_is_refused_naming_both_fields() {
        for (source, extra) in [
            (
                r#""path": "/mnt/batch/tasks/workitems/job/job-1/t/certs""#,
                "",
            ),
            (r#""path": "/mnt/batch/tasks/startup/../workitems/x/""#, ""),
            (r#""path": "/mnt/batch/tasks/workitems/""#, ""),
            (
                r#""path": "/etc/nodeseal/keys""#,
                r#", "passphrase_file": "/mnt/batch/tasks/workitems/./j/pass""#,
            ),
        ] {
            let json = format!(
                r#"{{"env_roots": ["/mnt/batch/tasks/workitems/"], "key_sources": [{{"kind": "key_dir", {source}{extra}}}]}}"#
            );
            let msg = Config::parse(&json, Path::new("t.json"))
                .unwrap_err()
                .to_string();
            let field = if extra.is_empty() {
                "key_sources[0].path"
            } else {
                "key_sources[0].passphrase_file"
            };
            assert!(msg.contains(field), "{json}: {msg}");
            assert!(msg.contains("env_roots[0]"), "{json}: {msg}");
        }
        for ok in [
            "/mnt/batch/tasks/startup/certs",
            "/mnt/batch/tasks/workitems2",
            "/mnt/batch/tasks",
            "/mnt/batch/tasks/workitems/../startup",
        ] {
            let json = format!(
                r#"{{"env_roots": ["/mnt/batch/tasks/workitems"], "key_sources": [{{"kind": "batch_certs", "path": "{ok}"}}]}}"#
            );
            Config::parse(&json, Path::new("t.json")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn open_is_for_nobody_by_default_and_the_old_null_no_longer_means_everyone() {
        assert!(Config::default().open_allowed_uids.is_empty());
        let old = Config::parse(r#"{"open_allowed_uids": null}"#, Path::new("t")).unwrap();
        assert!(old.open_allowed_uids.is_empty());
        let listed = Config::parse(r#"{"open_allowed_uids": [1000, 1001]}"#, Path::new("t"));
        assert_eq!(listed.unwrap().open_allowed_uids, vec![1000, 1001]);
        let pool = Config::parse(r#"{"pool_id": "pool-1_a"}"#, Path::new("t")).unwrap();
        assert_eq!(pool.pool_id.as_deref(), Some("pool-1_a"));
    }

    #[test]
    fn missing_non_default_file_is_an_error() {
        let err = Config::load(Path::new("/nonexistent/nodeseal.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nodeseal.json"));
    }

    #[test]
    fn key_vault_needs_https_certificate_urls_and_a_revalidation_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        let load = |kv: &str| {
            std::fs::write(&path, format!(r#"{{"key_vault": {kv}}}"#)).unwrap();
            Config::load(&path)
        };
        let ok =
            load(r#"{"certificates": ["https://v.vault.azure.net/certificates/pool"]}"#).unwrap();
        let kv = ok.key_vault.unwrap();
        assert_eq!(kv.imds_endpoint, KeyVaultConfig::IMDS);
        assert_eq!((kv.revalidate_secs, kv.max_concurrent_calls), (10, 8));
        for (bad, field) in [
            (
                r#"{"certificates": ["http://v.vault.azure.net/certificates/pool"]}"#,
                "key_vault.certificates",
            ),
            (
                r#"{"certificates": ["https://v.vault.azure.net/certificates/pool/0123"]}"#,
                "key_vault.certificates",
            ),
            (
                r#"{"certificates": [], "revalidate_secs": 60}"#,
                "key_vault.revalidate_secs",
            ),
            (
                r#"{"certificates": [], "max_concurrent_calls": 0}"#,
                "key_vault.max_concurrent_calls",
            ),
        ] {
            let msg = load(bad).unwrap_err().to_string();
            assert!(msg.contains(field), "{bad}: {msg}");
        }
        // Absent from the defaults, so the packaged agent.json does not change.
        let printed = serde_json::to_value(Config::default()).unwrap();
        assert!(printed.get("key_vault").is_none());
    }
}
