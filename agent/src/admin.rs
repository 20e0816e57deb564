//! The operator subcommands: `check` (the config and key sources, without a running agent), and
//! `status`, `keys`, `revoke`, `restore` (one request to the running agent over its socket,
//! printed for humans or as JSON).

use crate::config::Config;
use crate::keys::{self, KeyStore};
use crate::report::{KeyState, StatusReport};
use anyhow::{bail, Context, Result};
use nodeseal_client::protocol::Operation;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// Send one request and return the agent's `info` document as it came, or the agent's error.
pub fn call(socket: &Path, op: Operation) -> Result<serde_json::Value> {
    let mut client = nodeseal_client::Client::builder()
        .socket(socket)
        .retry_for(Duration::from_secs(5))
        .connect()
        .context(
            "is the agent running? (systemctl status nodeseal-agent); the socket is --socket, \
             else $NODESEAL_SOCKET, else socket_path of the config (--config)",
        )?;
    let response = client.request(op)?;
    if let Some(err) = &response.error {
        bail!("agent refused: {} ({})", err.message, err.code);
    }
    Ok(response.info.clone().unwrap_or(serde_json::Value::Null))
}

/// What an operator should know about a `revoke` answer beyond its JSON: a revocation of a key
/// the agent does not hold is kept, but is more often a mistyped thumbprint than foresight.
pub fn revoke_note(info: &serde_json::Value) -> Option<String> {
    (info["known"] == serde_json::Value::Bool(false)).then(|| {
        format!(
            "no key with thumbprint {} is loaded on this node; the revocation is recorded and \
             applies if that key arrives. Check the thumbprint with `nodeseal-agent keys`, and \
             `nodeseal-agent restore` it if it was a mistake",
            info["thumbprint"].as_str().unwrap_or("?")
        )
    })
}

/// Read an `info` document as the report type it is.
pub fn typed<T: DeserializeOwned>(info: serde_json::Value) -> Result<T> {
    serde_json::from_value(info).context("the agent's answer is not what this version expects")
}

/// `nodeseal-agent check`: load every key source as the agent would and print what it found.
/// Returns the number of problems.
pub fn check(config: &Config, path: &Path) -> usize {
    println!("config {}: ok", path.display());
    let store = KeyStore::new();
    keys::revocation::reload(&store, config);
    for s in keys::key_sources(config) {
        if !s.path.is_dir() {
            println!(
                "key source {} ({}): directory does not exist (yet)",
                s.path.display(),
                keys::store::kind_name(s.kind)
            );
            continue;
        }
        store.rescan_source(&s);
    }
    let mut problems = 0;
    for r in store.status() {
        let reason = r.reason.as_deref().unwrap_or("");
        match r.state {
            KeyState::Loaded | KeyState::Revoked => println!(
                "key {} {} ({} bits) from {}{}",
                r.thumbprint.as_deref().unwrap_or("-"),
                r.state.as_str(),
                r.bits.unwrap_or(0),
                r.source,
                version_note(&r)
            ),
            KeyState::Pending => println!("pending {}: {reason}", r.source),
            KeyState::Broken | KeyState::Missing => {
                problems += 1;
                println!("PROBLEM {}: {reason}", r.source);
            }
        }
    }
    for warning in legacy_key_warnings(config, &store) {
        println!("WARNING {warning}");
    }
    if let Err(e) = keys::check_store_dir(&config.key_store_dir()) {
        problems += 1;
        println!("PROBLEM key store: {}", nodeseal_cli_docs::error_chain(&e));
    }
    println!(
        "{} usable key(s), {problems} problem(s)",
        store.usable_count()
    );
    problems
}

/// What would make a legacy (Batch Shipyard) ciphertext fail for every task: several usable keys
/// of one size and no `legacy_key` to say which opens it, or a `legacy_key` that is not loaded.
/// Warnings, not problems: a node serving only v1 tokens may rotate between keys of one size.
fn legacy_key_warnings(config: &Config, store: &KeyStore) -> Vec<String> {
    if let Some(tp) = config.legacy_key {
        return match store.get(&tp) {
            Ok(_) => Vec::new(),
            Err(_) => vec![format!(
                "legacy_key {tp} is not loaded: every legacy ciphertext will fail with \
                 key_unavailable until it is"
            )],
        };
    }
    let mut sizes: Vec<usize> = store
        .loaded_entries()
        .iter()
        .map(|e| e.pair.modulus_len())
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
        .into_iter()
        .filter_map(|len| {
            let keys = store.with_modulus_len(len);
            (keys.len() > 1).then(|| {
                let tps: Vec<String> = keys.iter().map(|k| k.thumbprint().to_string()).collect();
                format!(
                    "{} usable keys of {} bits ({}) and no legacy_key: a legacy (Batch Shipyard) \
                     ciphertext of that size names no key, so every one will fail with \
                     config_error (exit 78); set \"legacy_key\" in the agent config to the \
                     thumbprint of the key it was sealed to",
                    keys.len(),
                    len * 8,
                    tps.join(", ")
                )
            })
        })
        .collect()
}

fn fmt_time(unix: Option<i64>) -> String {
    match unix.and_then(|t| u64::try_from(t).ok()) {
        Some(t) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
                .to_string()
        }
        None => "-".into(),
    }
}

/// ` [version V, latest]` for a Key Vault certificate version, nothing for other keys.
fn version_note(k: &crate::report::KeyStatus) -> String {
    match (&k.version, k.latest) {
        (Some(v), true) => format!("  [version {v}, latest]"),
        (Some(v), false) => format!("  [version {v}]"),
        (None, true) => "  [latest]".into(),
        (None, false) => String::new(),
    }
}

/// Render the keys of a status document as a table.
pub fn render_keys(report: &StatusReport) -> String {
    let mut out = format!(
        "{:<40}  {:<8}  {:>5}  {:<20}  {:>6}  {}\n",
        "THUMBPRINT", "STATE", "BITS", "NOT AFTER", "OPENED", "SOURCE"
    );
    for k in &report.keys {
        out.push_str(&format!(
            "{:<40}  {:<8}  {:>5}  {:<20}  {:>6}  {}{}{}\n",
            k.thumbprint.as_deref().unwrap_or("-"),
            k.state.as_str(),
            k.bits.map_or("-".into(), |b| b.to_string()),
            fmt_time(k.not_after),
            k.opened,
            k.source,
            version_note(k),
            k.reason
                .as_deref()
                .map_or(String::new(), |r| format!("  ({r})")),
        ));
    }
    out
}

/// Render a whole status document for humans.
pub fn render_status(report: &StatusReport) -> String {
    let mut out = format!(
        "nodeseal-agent {}  up {} s\n\nKeys:\n{}\nTasks:\n",
        report.version,
        report.uptime_secs,
        render_keys(report)
    );
    if report.tasks.is_empty() {
        out.push_str("  (none)\n");
    }
    for t in &report.tasks {
        out.push_str(&format!(
            "  job {} task {} (uid {}): {} values  {}\n",
            t.job_id.as_deref().unwrap_or("-"),
            t.task_id.as_deref().unwrap_or("-"),
            t.owner_uid,
            t.values,
            t.task_dir
        ));
    }
    let c = &report.counters;
    out.push_str(&format!(
        "\nRequests: {} ({} ok), decrypts: {}, limited: {}, errors: {}\n",
        c.requests,
        c.ok,
        c.decrypts,
        c.limited,
        serde_json::to_string(&c.errors).unwrap_or_default()
    ));
    out
}
