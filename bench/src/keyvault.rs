//! Keys that never leave Key Vault: many tasks starting at once with one token, against the
//! test kit's loopback Key Vault fake. What matters is how many `unwrapkey` calls the node makes
//! (the single flight promises one) and how long the opens take next to the same opens with the
//! key on the node, measured in the same run.

use crate::node::{self, get_request};
use crate::{Report, Row, Scale, Target};
use anyhow::{bail, Context, Result};
use nodeseal_envelope::token::{self, SealOptions};
use nodeseal_envelope::{KeyPair, Recipient};
use nodeseal_testkit::kvfake::{KeyVaultFake, FAKE_CLIENT_ID};
use nodeseal_testkit::Node;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NAME: &str = "SHARED_SECRET";
const VALUE: &str = "one-token-for-every-task";

/// `n` task dirs all holding `token`, and the agent started with every one known.
fn tasks_with(node: &mut Node, n: usize, token: &str) -> Result<Vec<PathBuf>> {
    let tasks: Vec<PathBuf> = (0..n)
        .map(|i| {
            let t = node.task("kv", &format!("t{i:04}"));
            node::write_env(node, &t, &[(NAME.into(), token.into())]);
            t
        })
        .collect();
    node.start();
    let start = Instant::now();
    while node::request(node, &json!({"op": "health"}))?["info"]["tasks"] != n {
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "the agent did not see {n} tasks; log:\n{}",
                node::log_tail(node)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(tasks)
}

/// Every task's `get` at once, one thread and connection each; the wall time until all answered.
fn open_all(node: &Node, tasks: &[PathBuf]) -> Result<f64> {
    let barrier = std::sync::Barrier::new(tasks.len() + 1);
    let (barrier, node_ref) = (&barrier, node);
    let elapsed = std::thread::scope(|s| -> Result<f64> {
        let handles: Vec<_> = tasks
            .iter()
            .map(|t| {
                s.spawn(move || {
                    barrier.wait();
                    node::request(node_ref, &get_request(t, NAME))
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            let r = h
                .join()
                .map_err(|_| anyhow::anyhow!("a request thread panicked"))??;
            if r["value"] != VALUE {
                bail!("a task got {}", r["error"]);
            }
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    })?;
    Ok(elapsed)
}

pub(crate) fn bench_keyvault(scale: &Scale, agent_bin: &Path, report: &mut Report) -> Result<()> {
    let n = if scale.smoke { 50 } else { 1000 };
    let (mut calls, mut remote_ms, mut local_ms) = (vec![], vec![], vec![]);
    let local = KeyPair::generate(2048, 30, "nodeseal-bench local")?;
    for _ in 0..scale.repeats {
        let dir = tempfile::tempdir()?;
        let fake = KeyVaultFake::start(dir.path());
        let v = fake.add_version("poolcert", 2048);
        let cert = openssl::x509::X509::from_pem(v.cert_pem.as_bytes())?;
        let recipient = Recipient::from_certificate(cert, Path::new("poolcert.crt"))?;
        let opts = SealOptions {
            name: Some(NAME.into()),
            not_after: None,
            ..Default::default()
        };
        let sealed = token::seal(VALUE.as_bytes(), &[recipient], &opts)?;
        let mut node = node::bench_node(
            agent_bin,
            &json!({
                "key_sources": [],
                "key_vault": {
                    "certificates": [fake.certificate_url("poolcert")],
                    "client_id": FAKE_CLIENT_ID,
                    "imds_endpoint": fake.imds_url,
                    "ca_file": fake.ca_file,
                    "revalidate_secs": 10,
                },
            }),
        )?;
        let tasks = tasks_with(&mut node, n, &sealed)?;
        let start = Instant::now();
        // Usable once the first check has listed the version and read its key.
        while node::request(&node, &json!({"op": "health"}))?["info"]["keys"] != 1 {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the Key Vault key never became usable; log:\n{}",
                    node::log_tail(&node)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        remote_ms.push(open_all(&node, &tasks)?);
        calls.push(fake.calls("unwrapkey") as f64);
        node::stop(&mut node)?;

        // Baseline: the same opens with the key in a key_dir on the node.
        let mut node = node::bench_node(agent_bin, &json!({}))?;
        let keys = node.root.join("keys");
        std::fs::create_dir_all(&keys)?;
        std::fs::write(
            keys.join("local.pfx"),
            local.to_pkcs12(node::PFX_PASS.as_bytes(), false)?,
        )?;
        std::fs::write(node.root.join("local.pass"), node::PFX_PASS)?;
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&node.config_path)?)?;
        config["key_sources"] = json!([{"kind": "key_dir", "path": keys, "passphrase_file": node.root.join("local.pass")}]);
        std::fs::write(&node.config_path, serde_json::to_vec(&config)?)?;
        let sealed_local = token::seal(VALUE.as_bytes(), &[local.recipient()], &opts)?;
        let tasks = tasks_with(&mut node, n, &sealed_local).context("baseline node")?;
        local_ms.push(open_all(&node, &tasks)?);
        node::stop(&mut node)?;
    }
    report.rows.push(Row {
        figure: format!("Key Vault `unwrapkey` calls for {n} concurrent task opens of one token (key in Key Vault, loopback fake)"),
        unit: "",
        ours: crate::stats::Spread::of(&calls),
        baseline_name: "—".into(),
        baseline: None,
        target: Target::AtMost(1.0),
        target_text: "1 call".into(),
        also: None,
    });
    report.rows.push(Row {
        figure: format!(
            "wall time of {n} concurrent task opens of one token (key in Key Vault, loopback fake)"
        ),
        unit: "ms",
        ours: crate::stats::Spread::of(&remote_ms),
        baseline_name: format!(
            "the same {n} opens, key on the node (RSA 2048, one local decrypt per task)"
        ),
        baseline: crate::stats::Spread::of(&local_ms),
        target: Target::Info,
        target_text: "reported".into(),
        also: None,
    });
    report.notes.push(format!(
        "Key Vault rows: the test kit's loopback fake (HTTPS, test CA, IMDS token endpoint) stands in for Key Vault, so the wall time has no network latency in it: on Azure add one round trip to the vault for the single call. {n} tasks, each with its own env file holding the same v1 token; every task's `get` is sent at once (one thread and connection each) after the key was checked; a fresh agent per repeat, so nothing is cached."
    ));
    Ok(())
}
