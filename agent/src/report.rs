//! What the agent reports about itself (`health`, `status`, `revoke`, `restore`), as types shared
//! by the agent that writes them and the admin commands that read them back. The JSON they
//! serialize to is the one `docs/protocol.md` documents.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `health`: liveness, for everyone. Counts only, nothing about any task or key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"` when the agent answers at all.
    pub status: String,
    /// Agent version.
    pub version: String,
    /// Usable (loaded, not revoked) keys.
    pub keys: usize,
    /// Task directories with known env files.
    pub tasks: usize,
    /// Completed SIGHUP reloads (absent from older agents).
    #[serde(default)]
    pub reloads: u64,
    /// Completed batches of file-system work.
    #[serde(default)]
    pub scans: u64,
}

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Usable.
    Loaded,
    /// Withdrawn by the revocation list or `revoke`.
    Revoked,
    /// Not loadable yet for a reason expected to pass (e.g. its `.pw` has not arrived).
    Pending,
    /// Not loadable: the file is wrong.
    Broken,
    /// No file provides it (only in `restore` answers).
    Missing,
}

impl KeyState {
    /// The name the JSON uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loaded => "loaded",
            Self::Revoked => "revoked",
            Self::Pending => "pending",
            Self::Broken => "broken",
            Self::Missing => "missing",
        }
    }
}

/// One row of `status`/`keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// Thumbprint (absent for files that did not load).
    pub thumbprint: Option<String>,
    /// The file.
    pub source: String,
    /// Source kind (`batch_certs`, `keyvault`, ...; empty when unknown).
    pub kind: String,
    /// Modulus bits.
    pub bits: Option<u32>,
    /// Certificate notAfter, unix seconds.
    pub not_after: Option<i64>,
    /// Where it stands.
    pub state: KeyState,
    /// Why it is not loaded.
    pub reason: Option<String>,
    /// Values opened with this key since start.
    pub opened: u64,
    /// Key Vault: the certificate version its file carries (absent elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Key Vault: the extension's latest-version link names this file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
}

/// One task of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The task directory.
    pub task_dir: String,
    /// Batch job id, from the path.
    pub job_id: Option<String>,
    /// Batch task id, from the path.
    pub task_id: Option<String>,
    /// Owner of the task's env files.
    pub owner_uid: u32,
    /// The env files.
    pub files: Vec<String>,
    /// Variables over all its files.
    pub values: usize,
}

/// Request counters of `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterReport {
    /// Requests answered.
    pub requests: u64,
    /// Successful answers.
    pub ok: u64,
    /// Decryptions performed (cache misses).
    pub decrypts: u64,
    /// Connections refused or cut at a limit.
    pub limited: u64,
    /// Completed SIGHUP reloads.
    #[serde(default)]
    pub reloads: u64,
    /// Completed batches of file-system work.
    #[serde(default)]
    pub scans: u64,
    /// Failed answers by error code.
    pub errors: BTreeMap<String, u64>,
}

/// `status`: keys, tasks and counters (host root only), never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Agent version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Every key file and revoked thumbprint.
    pub keys: Vec<KeyStatus>,
    /// Every known task.
    pub tasks: Vec<TaskStatus>,
    /// Trees watched for env files.
    pub env_roots: Vec<PathBuf>,
    /// Counters.
    pub counters: CounterReport,
    /// Bytes each uid holds on its memory budget (`limits.memory_budget_per_uid`): its parsed
    /// env files, cached values and answers being written. Uids holding nothing are left out.
    #[serde(default)]
    pub memory_by_uid: BTreeMap<u32, u64>,
}

/// `revoke` and `restore`: where the key stands afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    /// The key.
    pub thumbprint: String,
    /// Its state now.
    pub state: KeyState,
    /// `revoke` only: whether its ingested copy was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged: Option<bool>,
    /// `revoke` only: whether a key with this thumbprint was loaded. A revocation of a key the
    /// agent has not seen is kept (it applies if the key arrives), but may be a typo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_state_names_are_the_json_ones() {
        for s in [
            KeyState::Loaded,
            KeyState::Revoked,
            KeyState::Pending,
            KeyState::Broken,
            KeyState::Missing,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
