//! `get`, `env` and `list`: values of the task the caller may read, from the env files the
//! task index knows. The last definition of a name across a task's files wins, as with repeated
//! `--env-file`; the first appearance gives the order. [`Merged`] is that view, built in one
//! pass, so a request costs what the task's own files hold and no more.

use super::audit::Audit;
use super::{Answer, Context, Handler};
use crate::authz;
use crate::refusal::Refusal;
use crate::tasks::{EnvEntry, ValueKind};
use nodeseal_client::protocol::{NamedError, NamedValue, SkippedLine};
use std::collections::HashMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The fewest bytes one value adds to an `env` answer beside its name and value (quotes, keys,
/// separators), so the sum over values is a lower bound of the answer's size.
const NAMED_VALUE_OVERHEAD: usize = 24;

/// Sealed values one `env` opens at once (see `Handler::env`): enough to keep every decrypt
/// thread busy, few enough that a waiting `env` holds little.
const ENV_OPENS_IN_FLIGHT: usize = 32;

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
        let Some((entry, index)) = Merged::last_definition(&entries, &name)? else {
            return Err(match skipped_line_named(&entries, &name) {
                Some(s) => Refusal::SkippedLine {
                    name,
                    file: s.file.clone(),
                    line: s.line,
                    reason: s.reason.clone(),
                },
                None => Refusal::NoSuchVariable { name },
            });
        };
        let approved = self.authorize(cx, &entry, index)?;
        let (value, key) = self
            .resolve(&cx.config, cx.caller.uid, &entry, index, approved)
            .await?;
        audit.key_id = key;
        Ok(Answer::Value(Zeroizing::new(value.as_str().to_owned())))
    }

    /// Every value of the task the caller may read. One value that cannot be opened (not for
    /// this caller, or plain base64 that only looks like a legacy ciphertext) is reported by
    /// name in the answer's errors; it does not hide the others. Clients fail the whole answer
    /// unless asked for a partial one, so a job never starts with a secret silently missing.
    pub(super) async fn env(
        self: &Arc<Self>,
        cx: &Context<'_>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let merged = Merged::new(self.readable_entries(cx, task, audit)?)?;
        let mut opened = Vec::with_capacity(merged.slots.len());
        let mut failed = Vec::new();
        let refused = |position: usize, name: String, inner: Refusal| {
            inner
                .to_response()
                .error
                .map(|error| (position, NamedError { name, error }))
        };
        let limits = &cx.config.limits;
        let max_response = limits.max_response_bytes;
        let mut at_least = 0usize;
        // Cleartext opened for this answer is charged to the caller while the answer is built
        // (a value the cache does not keep exists only here); given back when this returns,
        // just before the writer charges the finished answer.
        let mut building: Option<crate::budget::Charge> = None;
        let uid = cx.caller.uid;
        // An `env` of many sealed values waits for the caller's RSA turns for at most one
        // `max_rate_wait_ms` in all: past it, values over the rate are refused at once.
        let started = tokio::time::Instant::now();
        let max_wait = std::time::Duration::from_millis(limits.max_rate_wait_ms);
        let mut hurried: Option<Arc<crate::config::Config>> = None;
        // Each value is authorized before it is opened, so a refused one costs no RSA. At most
        // ENV_OPENS_IN_FLIGHT values are being opened at once (spread over the decrypt pool):
        // each holds a task while it waits, and a uid asking for a huge task's `env` on all its
        // connections must not hold one per value.
        let mut values = merged.iter().enumerate();
        let mut jobs = tokio::task::JoinSet::new();
        loop {
            while jobs.len() < ENV_OPENS_IN_FLIGHT {
                let Some((position, (name, entry, index))) = values.next() else {
                    break;
                };
                let approved = match self.authorize(cx, entry, index) {
                    Ok(approved) => approved,
                    Err(inner) => {
                        failed.extend(refused(position, name.to_owned(), inner));
                        continue;
                    }
                };
                if let ValueKind::Plain(value) = &entry.vars[index].kind {
                    // An answer over the cap is refused before its values are copied:
                    // otherwise each `env` of a huge task would copy it all, on the async
                    // workers, only to be refused by the writer (`server::connection` checks
                    // the exact size).
                    at_least += name.len() + value.len() + NAMED_VALUE_OVERHEAD;
                    if at_least > max_response {
                        return Err(Refusal::ResponseTooLarge {
                            len: at_least,
                            max: max_response,
                        });
                    }
                    // Served as stored: nothing to wait for, so no task per value.
                    opened.push((position, name.to_owned(), value.clone()));
                    continue;
                }
                let config = if started.elapsed() < max_wait {
                    cx.config.clone()
                } else {
                    hurried
                        .get_or_insert_with(|| {
                            let mut c = (*cx.config).clone();
                            c.limits.max_rate_wait_ms = 0;
                            Arc::new(c)
                        })
                        .clone()
                };
                let (name, entry) = (name.to_owned(), entry.clone());
                let handler = self.clone();
                jobs.spawn(async move {
                    let result = handler.resolve(&config, uid, &entry, index, approved).await;
                    (position, name, result)
                });
            }
            let Some(done) = jobs.join_next().await else {
                break;
            };
            let (position, name, result) =
                done.map_err(|_| Refusal::Internal("a decryption task failed".into()))?;
            match result {
                Ok((value, key)) => {
                    if let Some(key) = key {
                        audit.used_key(key);
                    }
                    let len = name.len() + value.len() + NAMED_VALUE_OVERHEAD;
                    at_least += len;
                    if at_least > max_response {
                        return Err(Refusal::ResponseTooLarge {
                            len: at_least,
                            max: max_response,
                        });
                    }
                    let budget = limits.memory_budget_per_uid;
                    match self.state.memory.try_charge(uid, len, budget, 0) {
                        Ok(more) => {
                            building = Some(match building.take() {
                                Some(held) => held.join(more),
                                None => more,
                            })
                        }
                        Err(over) => {
                            return Err(Refusal::MemoryBudgetFull {
                                uid,
                                used: over.used,
                                len: at_least,
                                max: budget,
                            })
                        }
                    }
                    opened.push((position, name, value));
                }
                Err(inner) => failed.extend(refused(position, name, inner)),
            }
        }
        drop(building);
        opened.sort_by_key(|(position, _, _)| *position);
        failed.sort_by_key(|(position, _)| *position);
        Ok(Answer::Values(
            opened
                .into_iter()
                .map(|(_, name, value)| NamedValue {
                    name,
                    value: Zeroizing::new(value.as_str().to_owned()),
                })
                .collect(),
            failed.into_iter().map(|(_, e)| e).collect(),
            skipped_lines(&merged.entries),
        ))
    }

    /// `list` shows every name of the env files the caller may read (names, never values),
    /// including those of values sealed for someone else: `get` and `env` then refuse such a
    /// value by name, so a list is exactly what `env` tries to serve.
    pub(super) fn list(
        &self,
        cx: &Context<'_>,
        task: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Answer, Refusal> {
        let merged = Merged::new(self.readable_entries(cx, task, audit)?)?;
        Ok(Answer::Names(
            merged.names(),
            skipped_lines(&merged.entries),
        ))
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

/// Every skipped line of the task's files, file by file.
fn skipped_lines(entries: &[Arc<EnvEntry>]) -> Vec<SkippedLine> {
    entries.iter().flat_map(|e| e.skipped.clone()).collect()
}

/// The last skipped line that names `name` (an exported function), for a `get` that misses.
fn skipped_line_named<'a>(entries: &'a [Arc<EnvEntry>], name: &str) -> Option<&'a SkippedLine> {
    entries
        .iter()
        .flat_map(|e| e.skipped.iter())
        .rfind(|s| s.name.as_deref() == Some(name))
}

/// A task's variables as its caller sees them: every name once, in order of first appearance
/// across the files (in path order), each bound to its last definition.
pub(super) struct Merged {
    entries: Vec<Arc<EnvEntry>>,
    /// `(entry, variable)` of each name's winning definition, in first-appearance order.
    slots: Vec<(usize, usize)>,
}

impl Merged {
    /// The view of `entries`, in one pass over their variables; a refused file refuses it all.
    pub(super) fn new(entries: Vec<Arc<EnvEntry>>) -> Result<Self, Refusal> {
        refusal_in(&entries)?;
        let total = entries.iter().map(|e| e.vars.len()).sum();
        let mut position: HashMap<&str, usize> = HashMap::with_capacity(total);
        let mut slots: Vec<(usize, usize)> = Vec::with_capacity(total);
        for (e, entry) in entries.iter().enumerate() {
            for (v, var) in entry.vars.iter().enumerate() {
                match position.get(var.name.as_str()) {
                    Some(&at) => slots[at] = (e, v),
                    None => {
                        position.insert(&var.name, slots.len());
                        slots.push((e, v));
                    }
                }
            }
        }
        drop(position);
        Ok(Self { entries, slots })
    }

    /// `(name, entry, variable index)` in first-appearance order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Arc<EnvEntry>, usize)> {
        self.slots.iter().map(|&(e, v)| {
            let entry = &self.entries[e];
            (entry.vars[v].name.as_str(), entry, v)
        })
    }

    /// Every name once, in first-appearance order.
    pub(super) fn names(&self) -> Vec<String> {
        self.iter().map(|(name, _, _)| name.to_owned()).collect()
    }

    /// The definition of `name` the view binds it to, without building the view: the last
    /// file defining it, its last line there.
    pub(super) fn last_definition(
        entries: &[Arc<EnvEntry>],
        name: &str,
    ) -> Result<Option<(Arc<EnvEntry>, usize)>, Refusal> {
        refusal_in(entries)?;
        Ok(entries.iter().rev().find_map(|e| {
            let i = e.vars.iter().rposition(|v| v.name == name)?;
            Some((e.clone(), i))
        }))
    }
}

/// A task with a refused file answers its reason, never a partial view: the refused file may be
/// the one that defines or overrides a name.
fn refusal_in(entries: &[Arc<EnvEntry>]) -> Result<(), Refusal> {
    match entries.iter().find_map(|e| Some((e, e.refused.as_ref()?))) {
        Some((e, why)) => Err(Refusal::EnvFileRefused {
            path: e.path.clone(),
            why: why.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, vars: &[(&str, &str)]) -> Arc<EnvEntry> {
        Arc::new(EnvEntry::plain_for_test(path, vars))
    }

    fn value(e: &EnvEntry, i: usize) -> String {
        match &e.vars[i].kind {
            ValueKind::Plain(v) => v.as_str().to_owned(),
            _ => unreachable!("test entries are plain"),
        }
    }

    fn view(entries: &[Arc<EnvEntry>]) -> Vec<(String, String)> {
        Merged::new(entries.to_vec())
            .unwrap()
            .iter()
            .map(|(name, e, i)| (name.to_owned(), value(e, i)))
            .collect()
    }

    #[test]
    fn first_appearance_orders_and_last_definition_wins_across_files() {
        let entries = [
            entry("/t/a", &[("B", "b1"), ("A", "a1"), ("B", "b2")]),
            entry("/t/b", &[("C", "c1"), ("A", "a2")]),
            entry("/t/c", &[("B", "b3"), ("D", "d1")]),
        ];
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(n, x)| ((*n).into(), (*x).into())).collect()
        };
        assert_eq!(
            view(&entries),
            pairs(&[("B", "b3"), ("A", "a2"), ("C", "c1"), ("D", "d1")])
        );
        let merged = Merged::new(entries.to_vec()).unwrap();
        assert_eq!(merged.names(), ["B", "A", "C", "D"]);
        // `get` binds every name to the same definition as the view, and misses stay misses.
        for (name, e, i) in merged.iter() {
            let (got, at) = Merged::last_definition(&entries, name).unwrap().unwrap();
            assert_eq!((got.path.as_path(), at), (e.path.as_path(), i), "{name}");
        }
        assert!(Merged::last_definition(&entries, "E").unwrap().is_none());
    }

    #[test]
    fn many_repeats_of_few_names_merge_to_those_names() {
        // The shape of the quadratic attack: each name once in the answer, last value kept.
        let vars: Vec<(String, String)> = (0..20_000)
            .map(|i| (format!("N{}", i % 7), i.to_string()))
            .collect();
        let borrowed: Vec<(&str, &str)> =
            vars.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let merged = view(&[entry("/t/a", &borrowed), entry("/t/b", &[("N3", "last")])]);
        assert_eq!(merged.len(), 7);
        assert_eq!(merged[0], ("N0".into(), "19999".into()));
        assert_eq!(merged[3], ("N3".into(), "last".into()));
    }

    #[test]
    fn a_refused_file_refuses_the_whole_view_naming_its_cap() {
        let mut refused = EnvEntry::plain_for_test("/t/b", &[]);
        refused.refused = Some(crate::tasks::envfile::OverCap::Vars { max: 10 });
        let entries = vec![entry("/t/a", &[("A", "1")]), Arc::new(refused)];
        for err in [
            Merged::new(entries.clone()).err().unwrap(),
            Merged::last_definition(&entries, "A").err().unwrap(),
        ] {
            let msg = err.to_string();
            assert!(
                msg.contains("/t/b") && msg.contains("limits.max_vars_per_file"),
                "{msg}"
            );
        }
    }
}
