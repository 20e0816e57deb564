//! `health` (everyone), and `status`, `revoke`, `restore` (host root on the host socket).

use super::audit::Audit;
use super::{Answer, Context, Handler};
use crate::authz;
use crate::lifecycle;
use crate::refusal::Refusal;
use crate::report::{Health, KeyChange, StatusReport, TaskStatus};
use crate::tasks::EnvEntry;
use nodeseal_envelope::Thumbprint;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Handler {
    pub(super) fn health(&self) -> Result<Answer, Refusal> {
        let state = &self.state;
        Answer::report(&Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            keys: state.keys.usable_count(),
            tasks: state.tasks.task_count(),
            reloads: state.counters.reloads.load(Ordering::Relaxed),
            scans: state.counters.scans.load(Ordering::Relaxed),
        })
    }

    pub(super) fn status(&self, cx: &Context<'_>) -> Result<Answer, Refusal> {
        authz::require_host_root(&cx.caller, cx.scope, "status")?;
        Answer::report(&self.status_report(cx))
    }

    /// The `status` document: keys, tasks and counters, never values.
    fn status_report(&self, cx: &Context<'_>) -> StatusReport {
        let state = &self.state;
        let mut by_dir: BTreeMap<PathBuf, Vec<Arc<EnvEntry>>> = BTreeMap::new();
        for e in state.tasks.entries() {
            by_dir.entry(e.task_dir.clone()).or_default().push(e);
        }
        let tasks = by_dir
            .into_iter()
            .map(|(dir, entries)| {
                let first = &entries[0];
                TaskStatus {
                    task_dir: dir.display().to_string(),
                    job_id: first.job_id.clone(),
                    task_id: first.task_id.clone(),
                    owner_uid: first.owner_uid,
                    files: entries
                        .iter()
                        .map(|e| e.path.display().to_string())
                        .collect(),
                    values: entries.iter().map(|e| e.vars.len()).sum(),
                }
            })
            .collect();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: state.started.elapsed().as_secs(),
            keys: state.keys.status(),
            tasks,
            env_roots: cx.config.env_roots.clone(),
            counters: state.counters.report(),
            memory_by_uid: state.memory.snapshot(),
        }
    }

    pub(super) async fn revoke(
        &self,
        cx: &Context<'_>,
        thumbprint: &str,
        purge: bool,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let tp = self.key_operation(cx, "revoke", thumbprint, audit)?;
        key_change(self.lifecycle.revoke(tp, purge).await)
    }

    pub(super) async fn restore(
        &self,
        cx: &Context<'_>,
        thumbprint: &str,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let tp = self.key_operation(cx, "restore", thumbprint, audit)?;
        key_change(self.lifecycle.restore(tp).await)
    }

    /// The key an admin operation names, once the caller may run it.
    fn key_operation(
        &self,
        cx: &Context<'_>,
        op: &'static str,
        thumbprint: &str,
        audit: &mut Audit,
    ) -> Result<Thumbprint, Refusal> {
        authz::require_host_root(&cx.caller, cx.scope, op)?;
        let tp = parse_thumbprint(thumbprint)?;
        audit.key_id = Some(tp);
        Ok(tp)
    }
}

/// The lifecycle thread's answer to a revoke or restore.
fn key_change(
    answer: Result<anyhow::Result<KeyChange>, lifecycle::Stopped>,
) -> Result<Answer, Refusal> {
    let change = answer
        .map_err(|_| Refusal::ShuttingDown)?
        .map_err(|e| Refusal::Internal(format!("{e:#}")))?;
    Answer::report(&change)
}

fn parse_thumbprint(s: &str) -> Result<Thumbprint, Refusal> {
    Thumbprint::from_hex(s).map_err(|e| Refusal::BadThumbprint(e.to_string()))
}
