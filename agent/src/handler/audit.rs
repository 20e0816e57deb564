//! The audit record: one structured line per request with who asked, for what, and the outcome
//! (never the value). journald shows the fields as `PEER_UID=`, `OUTCOME=` and so on.

use crate::peer::Peer;
use nodeseal_envelope::Thumbprint;

/// The fields of one audit line, filled in as the request is handled.
#[derive(Default)]
pub(crate) struct Audit {
    pub(crate) task_id: Option<String>,
    pub(crate) job_id: Option<String>,
    pub(crate) secret_name: Option<String>,
    pub(crate) key_id: Option<Thumbprint>,
    /// The error code; `None` for success.
    pub(crate) outcome: Option<&'static str>,
}

impl Audit {
    pub(crate) fn log(&self, peer: &Peer, op: &'static str) {
        let outcome = self.outcome.unwrap_or("ok");
        let key_id = self.key_id.map(|k| k.to_string());
        macro_rules! line {
            ($lvl:ident) => {
                // Names and ids the caller or a task chose are escaped and quoted by the log's
                // field formatter (logging.rs), so they cannot forge fields or lines.
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
