//! The benchmark's side of the kit's fake node (`nodeseal-testkit`): keys generated in-process,
//! a config with capacity limits, and requests as `Result`s so a failed run reports instead of
//! panicking mid-measurement. The agent itself starts with `NOTIFY_SOCKET` pointing at a
//! datagram socket of the kit's, so start-up time is measured to the agent's own READY=1.

use anyhow::{bail, Context, Result};
use nodeseal_envelope::token::{self, SealOptions};
use nodeseal_envelope::KeyPair;
use nodeseal_testkit::Node;
pub(crate) use nodeseal_testkit::PFX_PASS;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One generated key pair with its PFX bytes.
pub(crate) struct BenchKey {
    /// The pair, for sealing and for the in-process parse baseline.
    pub pair: KeyPair,
    /// PKCS#12 under [`PFX_PASS`].
    pub pfx: Vec<u8>,
}

impl BenchKey {
    /// A fresh RSA key of `bits` with a self-signed certificate.
    pub(crate) fn generate(bits: u32) -> Result<Self> {
        let pair = KeyPair::generate(bits, 30, "nodeseal-bench")
            .with_context(|| format!("cannot generate an RSA {bits} key"))?;
        let pfx = pair
            .to_pkcs12(PFX_PASS.as_bytes(), false)
            .context("cannot export the benchmark key as PKCS#12")?;
        Ok(Self { pair, pfx })
    }

    /// Lowercase thumbprint.
    pub(crate) fn thumbprint(&self) -> String {
        self.pair.thumbprint().to_string()
    }

    /// A v1 token of `value` bound to `name`.
    pub(crate) fn seal_v1(&self, name: &str, value: &str) -> Result<String> {
        let opts = SealOptions {
            name: Some(name.to_owned()),
            not_after: None,
            ..Default::default()
        };
        token::seal(value.as_bytes(), &[self.pair.recipient()], &opts)
            .with_context(|| format!("cannot seal {name}"))
    }

    /// A Batch Shipyard ciphertext of `value` (raw RSA PKCS#1 v1.5, base64).
    pub(crate) fn seal_shipyard(&self, value: &str) -> Result<String> {
        let public = self
            .pair
            .certificate()
            .public_key()
            .context("certificate has no public key")?;
        nodeseal_envelope::legacy::seal(value.as_bytes(), &public)
            .context("cannot make a Shipyard ciphertext")
    }
}

/// The cleartext the benchmark stores under variable `i` (fixed length, so request and
/// response sizes are the same for every variable).
pub(crate) fn value_of(i: usize) -> String {
    format!("bench-value-{i:08}-0123456789abcdef")
}

/// Variable name `i`.
pub(crate) fn name_of(i: usize) -> String {
    format!("SECRET_{i:05}")
}

/// A fresh node run by `agent_bin`; `config_extra` is merged over the benchmark's config.
pub(crate) fn bench_node(agent_bin: &Path, config_extra: &Value) -> Result<Node> {
    let node = Node::with_agent_bin(agent_bin, "nodeseal-bench-");
    // Raised limits: the benchmark measures capacity, and one uid (root) sends everything,
    // which the default 200 requests/s (and 100 RSA operations/s) per uid would cut off within a
    // fraction of a second. The under-abuse scenarios (abuse.rs) use the shipped limits.
    let mut config = json!({
        "log_level": "info",
        "revocation_list": null,
        "limits": {
            "max_connections": 4096,
            "max_connections_per_uid": 4096,
            "idle_timeout_secs": 600,
            "requests_per_sec_per_uid": 100_000_000u64,
            "burst_per_uid": 100_000_000u64,
            "rsa_ops_per_sec_per_uid": 100_000_000u64,
            "rsa_burst_per_uid": 100_000_000u64,
        },
    });
    if let (Some(base), Some(extra)) = (config.as_object_mut(), config_extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    node.write_config(config);
    Ok(node)
}

/// Drop `key` into the certificate dir as Batch does.
pub(crate) fn drop_key(node: &Node, key: &BenchKey) {
    node.drop_pfx_bytes(&key.thumbprint(), &key.pfx, PFX_PASS);
}

/// Stop the agent if it runs (SIGTERM, bounded wait).
pub(crate) fn stop(node: &mut Node) -> Result<()> {
    if node.is_running() {
        let status = node.stop();
        if !status.success() {
            bail!(
                "agent exited with {status} on SIGTERM; log:\n{}",
                log_tail(node)
            );
        }
    }
    Ok(())
}

/// Write a task's env file from name/value pairs.
pub(crate) fn write_env(node: &Node, task_dir: &Path, lines: &[(String, String)]) -> PathBuf {
    let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    node.write_env(task_dir, &text)
}

/// The last 40 lines the agent logged.
pub(crate) fn log_tail(node: &Node) -> String {
    let text = node.logs();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// One request on a new connection.
pub(crate) fn request(node: &Node, req: &Value) -> Result<Value> {
    node.try_request(req)
        .with_context(|| format!("no answer from {}", node.socket.display()))
}

/// `get` and insist on `want`.
pub(crate) fn get_expect(node: &Node, task: &Path, name: &str, want: &str) -> Result<()> {
    let r = request(node, &get_request(task, name))?;
    if r["ok"] != true || r["value"] != want {
        bail!(
            "get {name} answered {}; log:\n{}",
            r["error"],
            log_tail(node)
        );
    }
    Ok(())
}

/// A `get` request as JSON.
pub(crate) fn get_request(task: &Path, name: &str) -> Value {
    json!({"v": 1, "op": "get", "name": name, "task": task})
}

/// `VmRSS` and `VmLck` of `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let f = status_fields(pid, &["VmRSS:", "VmLck:"])?;
    Ok((f[0], f[1]))
}

/// Numeric fields (KiB) of `/proc/<pid>/status`, 0 when absent.
pub(crate) fn status_fields(pid: u32, names: &[&str]) -> Result<Vec<u64>> {
    nodeseal_testkit::proc_status_kib(pid, names)
        .with_context(|| format!("cannot read /proc/{pid}/status"))
}
