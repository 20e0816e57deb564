//! The operator subcommands (`status`, `keys`, `revoke`, `restore`): one request to the running
//! agent over its socket, printed for humans or as JSON.

use anyhow::{bail, Context, Result};
use nodeseal_client::protocol::Operation;
use std::path::Path;
use std::time::Duration;

/// Send one request and return the agent's `info` object, or the agent's error.
pub fn call(socket: &Path, op: Operation) -> Result<serde_json::Value> {
    let mut client = nodeseal_client::Client::builder()
        .socket(socket)
        .retry_for(Duration::from_secs(5))
        .connect()
        .context("is the agent running? (systemctl status nodeseal-agent)")?;
    let response = client.request(op)?;
    if let Some(err) = &response.error {
        bail!("agent refused: {} ({})", err.message, err.code);
    }
    Ok(response.info.clone().unwrap_or(serde_json::Value::Null))
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

/// Render the `keys` part of a status document as a table.
pub fn render_keys(info: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<40}  {:<8}  {:>5}  {:<20}  {:>6}  {}\n",
        "THUMBPRINT", "STATE", "BITS", "NOT AFTER", "OPENED", "SOURCE"
    );
    for k in info["keys"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<40}  {:<8}  {:>5}  {:<20}  {:>6}  {}{}\n",
            k["thumbprint"].as_str().unwrap_or("-"),
            k["state"].as_str().unwrap_or("?"),
            k["bits"].as_u64().map_or("-".into(), |b| b.to_string()),
            fmt_time(k["not_after"].as_i64()),
            k["opened"].as_u64().unwrap_or(0),
            k["source"].as_str().unwrap_or(""),
            k["reason"]
                .as_str()
                .map_or(String::new(), |r| format!("  ({r})")),
        ));
    }
    out
}

/// Render a whole status document for humans.
pub fn render_status(info: &serde_json::Value) -> String {
    let mut out = format!(
        "nodeseal-agent {}  up {} s\n\nKeys:\n{}\nTasks:\n",
        info["version"].as_str().unwrap_or("?"),
        info["uptime_secs"].as_u64().unwrap_or(0),
        render_keys(info)
    );
    let tasks = info["tasks"].as_array().cloned().unwrap_or_default();
    if tasks.is_empty() {
        out.push_str("  (none)\n");
    }
    for t in tasks {
        out.push_str(&format!(
            "  job {} task {} (uid {}): {} values  {}\n",
            t["job_id"].as_str().unwrap_or("-"),
            t["task_id"].as_str().unwrap_or("-"),
            t["owner_uid"],
            t["values"],
            t["task_dir"].as_str().unwrap_or("")
        ));
    }
    let c = &info["counters"];
    out.push_str(&format!(
        "\nRequests: {} ({} ok), decrypts: {}, limited: {}, errors: {}\n",
        c["requests"], c["ok"], c["decrypts"], c["limited"], c["errors"]
    ));
    out
}
