//! `get`, `env` and `list`: values of the task the caller may read, from the env files the
//! task index knows. The last definition of a name across a task's files wins, as with repeated
//! `--env-file`.

use super::audit::Audit;
use super::{Answer, Context, Handler};
use crate::authz;
use crate::refusal::Refusal;
use crate::tasks::EnvEntry;
use nodeseal_client::protocol::NamedValue;
use std::sync::Arc;
use zeroize::Zeroizing;

impl Handler {
    pub(super) async fn get(
        &self,
        cx: &Context<'_>,
        name: String,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        audit.secret_name = Some(name.clone());
        let entries = self.readable_entries(cx, task, audit)?;
        let Some((entry, index)) = find_var(&entries, &name) else {
            return Err(Refusal::NoSuchVariable { name });
        };
        let (value, key) = self
            .resolve(&cx.config, cx.caller.uid, &entry, index)
            .await?;
        audit.key_id = key;
        Ok(Answer::Value(Zeroizing::new(value.as_str().to_owned())))
    }

    pub(super) async fn env(
        self: &Arc<Self>,
        cx: &Context<'_>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let entries = self.readable_entries(cx, task, audit)?;
        let order = names_in_order(&entries);
        // Open every value at once: decryptions spread over the decrypt pool's threads instead
        // of running one after another.
        let mut jobs = tokio::task::JoinSet::new();
        for (position, name) in order.into_iter().enumerate() {
            let Some((entry, index)) = find_var(&entries, &name) else {
                continue;
            };
            let handler = self.clone();
            let config = cx.config.clone();
            let uid = cx.caller.uid;
            jobs.spawn(async move {
                let result = handler.resolve(&config, uid, &entry, index).await;
                (position, name, result)
            });
        }
        let mut opened = Vec::with_capacity(jobs.len());
        while let Some(done) = jobs.join_next().await {
            let (position, name, result) =
                done.map_err(|_| Refusal::Internal("a decryption task failed".into()))?;
            let (value, _) = result.map_err(|inner| {
                audit.secret_name = Some(name.clone());
                Refusal::InValue {
                    name: name.clone(),
                    inner: Box::new(inner),
                }
            })?;
            opened.push((position, name, value));
        }
        opened.sort_by_key(|(position, _, _)| *position);
        Ok(Answer::Values(
            opened
                .into_iter()
                .map(|(_, name, value)| NamedValue {
                    name,
                    value: Zeroizing::new(value.as_str().to_owned()),
                })
                .collect(),
        ))
    }

    pub(super) fn list(
        &self,
        cx: &Context<'_>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let entries = self.readable_entries(cx, task, audit)?;
        Ok(Answer::Names(names_in_order(&entries)))
    }

    /// The env files of the task the caller names (or owns) that the caller may read.
    fn readable_entries(
        &self,
        cx: &Context<'_>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Vec<Arc<EnvEntry>>, Refusal> {
        let tasks = &self.state.tasks;
        let task_dir = authz::task_to_read(&cx.caller, cx.scope, task, |uid| {
            tasks.task_dirs_owned_by(uid)
        })?;
        let entries = tasks.entries_of(&task_dir);
        if let Some(first) = entries.first() {
            audit.task_id = first.task_id.clone();
            audit.job_id = first.job_id.clone();
        }
        let owners: Vec<u32> = entries.iter().map(|e| e.owner_uid).collect();
        let readable = authz::readable_files(&cx.caller, cx.scope, &task_dir, &owners)?;
        Ok(readable.into_iter().map(|i| entries[i].clone()).collect())
    }
}

/// Every name once, in order of first appearance across the files.
fn names_in_order(entries: &[Arc<EnvEntry>]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        for v in &e.vars {
            if !names.contains(&v.name) {
                names.push(v.name.clone());
            }
        }
    }
    names
}

/// The last definition of `name` across the task's files.
fn find_var(entries: &[Arc<EnvEntry>], name: &str) -> Option<(Arc<EnvEntry>, usize)> {
    let mut found = None;
    for e in entries {
        if let Some(i) = e.vars.iter().rposition(|v| v.name == name) {
            found = Some((e.clone(), i));
        }
    }
    found
}
