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
    /// Every key an `env` (and so `exec`) answer was opened with, besides `key_id`.
    pub(crate) keys_used: Vec<Thumbprint>,
}

impl Audit {
    /// Note a key a value was opened with (`env` opens many).
    pub(crate) fn used_key(&mut self, key: Thumbprint) {
        if self.key_id.is_none() {
            self.key_id = Some(key);
        } else if self.key_id != Some(key) && !self.keys_used.contains(&key) {
            self.keys_used.push(key);
        }
    }

    /// The keys used, comma-separated, `-` for none.
    fn key_ids(&self) -> String {
        let all: Vec<String> = self
            .key_id
            .iter()
            .chain(&self.keys_used)
            .map(|k| k.to_string())
            .collect();
        if all.is_empty() {
            "-".to_owned()
        } else {
            all.join(",")
        }
    }

    /// What `journalctl` and `systemctl status` show: the request in words. Caller-chosen
    /// names go through `logging::for_message`, so the line cannot be forged; the exact values
    /// are in the structured fields.
    fn summary(&self, peer: &Peer, op: &str, outcome: &str, key_ids: &str) -> String {
        use crate::logging::for_message;
        let mut s = op.to_owned();
        if let Some(name) = &self.secret_name {
            s.push(' ');
            s.push_str(&for_message(name));
        }
        match (&self.job_id, &self.task_id) {
            (Some(job), Some(task)) => s.push_str(&format!(
                " of task {}/{}",
                for_message(job),
                for_message(task)
            )),
            (None, Some(task)) => s.push_str(&format!(" of task {}", for_message(task))),
            _ => {}
        }
        s.push_str(&format!(" by uid {} (pid {}", peer.uid, peer.pid));
        if peer.host_root {
            s.push_str(", host root");
        }
        s.push_str(&format!("): {outcome}"));
        if key_ids != "-" {
            s.push_str(&format!(", key {key_ids}"));
        }
        s
    }

    pub(crate) fn log(&self, peer: &Peer, op: &'static str) {
        let outcome = self.outcome.unwrap_or("ok");
        let key_id = self.key_ids();
        let message = self.summary(peer, op, outcome, &key_id);
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
                    key_id = %key_id,
                    outcome = %outcome,
                    message = %message
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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            uid: 1000,
            gid: 1000,
            groups: Vec::new(),
            pid: 4242,
            host_root: false,
            host_process: true,
            namespace_attested: true,
        }
    }

    #[test]
    fn the_message_says_what_happened() {
        let audit = Audit {
            task_id: Some("task-17".into()),
            job_id: Some("nightly".into()),
            secret_name: Some("DB_PASSWORD".into()),
            key_id: Some(Thumbprint([0xab; 20])),
            outcome: Some("forbidden"),
            keys_used: Vec::new(),
        };
        let key = audit.key_ids();
        assert_eq!(
            audit.summary(&peer(), "get", "forbidden", &key),
            format!("get DB_PASSWORD of task nightly/task-17 by uid 1000 (pid 4242): forbidden, key {key}")
        );
    }

    #[test]
    fn env_names_every_key_it_used_once() {
        let mut audit = Audit::default();
        let (a, b) = (Thumbprint([1; 20]), Thumbprint([2; 20]));
        for k in [a, b, a, b] {
            audit.used_key(k);
        }
        assert_eq!(audit.key_ids(), format!("{a},{b}"));
        assert_eq!(Audit::default().key_ids(), "-");
    }

    #[test]
    fn a_hostile_task_id_cannot_forge_the_message() {
        let audit = Audit {
            task_id: Some("t\nINFO get X by uid 0 (pid 1, host root): ok".into()),
            ..Audit::default()
        };
        let message = audit.summary(&peer(), "list", "ok", "-");
        assert!(!message.contains('\n'), "{message}");
        assert!(message.ends_with("by uid 1000 (pid 4242): ok"), "{message}");
        assert!(message.contains("t<U+000A>INFO"), "{message}");
    }
}
