//! `nodeseal-agent demo --keyvault`: a key that never leaves Key Vault, end to end, against the
//! test kit's loopback fake (`nodeseal-kv-fake`, a separate binary: the fake is not part of the
//! agent). Seal for the certificate as Key Vault hands it out, start the agent with only the
//! `key_vault` section, fetch the value as a task, then disable the key in the "vault" and see
//! the value withdrawn, and restored.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use nodeseal_envelope::{token, Recipient, SealOptions};
use nodeseal_testkit::NodeLayout;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "STORAGE_KEY";
const VALUE: &str = "sealed-for-a-key-that-stays-in-key-vault";

struct Fake {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Fake {
    fn start(dir: &Path) -> Result<(Self, Value)> {
        let exe = std::env::current_exe()?;
        let bin = exe
            .parent()
            .context("the agent binary lives in a directory")?
            .join("nodeseal-kv-fake");
        if !bin.is_file() {
            bail!(
                "{} is missing; build the test kit's Key Vault fake first: cargo build -p nodeseal-testkit --features kv-fake --bin nodeseal-kv-fake",
                bin.display()
            );
        }
        let mut child = Command::new(&bin)
            .arg(dir)
            .args(["poolcert", "2048"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut out = BufReader::new(child.stdout.take().context("piped stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let info: Value = serde_json::from_str(&line).context("the fake's first line")?;
        Ok((Self { child, out }, info))
    }

    fn control(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("piped stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    fn calls(&mut self, what: &str) -> Result<u64> {
        self.control(&format!("calls {what}"))?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        Ok(line.trim().parse()?)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

/// Poll the agent (blocking) until `f` holds or `timeout` passes.
fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Run the Key Vault demo.
pub async fn run() -> Result<()> {
    let node = NodeLayout::new("nodeseal-demo-kv-");
    let task_dir = node.task("demo-job", "task-1");
    step(
        1,
        "Key Vault (a loopback fake): a certificate whose key is not exportable",
    );
    let (mut fake, info) = Fake::start(&node.root)?;
    let version = info["versions"][0].clone();
    println!(
        "    {} version {} (thumbprint {})",
        info["certificate_url"].as_str().unwrap_or(""),
        version["version"].as_str().unwrap_or(""),
        version["thumbprint"].as_str().unwrap_or("")
    );

    step(
        2,
        "Workstation: seal for the certificate downloaded from Key Vault",
    );
    let cert_pem = version["cert_pem"].as_str().unwrap_or("").to_owned();
    let cert = openssl::x509::X509::from_pem(cert_pem.as_bytes())?;
    let recipient = Recipient::from_certificate(cert, Path::new("poolcert.crt"))?;
    let sealed = token::seal(
        VALUE.as_bytes(),
        &[recipient],
        &SealOptions {
            name: Some(NAME.into()),
            not_after: None,
            ..Default::default()
        },
    )?;
    println!("    {NAME}={}... ({} chars)", &sealed[..48], sealed.len());
    node.write_env(&task_dir, &format!("{NAME}={sealed}\n"));

    step(
        3,
        "Node: the agent with no key on disk, only the key_vault section",
    );
    node.write_config(json!({
        "log_level": "error",
        "revocation_list": null,
        "key_sources": [],
        "key_vault": {
            "certificates": [info["certificate_url"]],
            "client_id": info["client_id"],
            "imds_endpoint": info["imds_url"],
            "ca_file": info["ca_file"],
            "revalidate_secs": 1,
        },
    }));
    let config = Config::load(&node.config_path)?;
    let socket = node.socket.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(crate::run(
        config,
        crate::RunOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    if ready_rx.await.is_err() {
        return agent.await?.context("the agent failed to start");
    }

    let task = task_dir.display().to_string();
    let outcome = tokio::task::spawn_blocking(move || -> Result<()> {
        let get = || -> std::result::Result<String, String> {
            let mut client = nodeseal_client::Client::builder()
                .socket(&socket)
                .task(task.clone())
                .connect()
                .map_err(|e| e.to_string())?;
            client
                .get(NAME)
                .map(|v| v.expose().to_owned())
                .map_err(|e| e.to_string())
        };
        if !wait_for(Duration::from_secs(20), || get().is_ok()) {
            bail!("the agent never served the value: {:?}", get().err());
        }
        step(4, "Task: fetch the value; the agent asked Key Vault to unwrap its content key");
        let value = get().map_err(anyhow::Error::msg)?;
        if value != VALUE {
            bail!("the agent returned a different value than was sealed");
        }
        println!("    get {NAME} -> {value}");
        for _ in 0..3 {
            get().map_err(anyhow::Error::msg)?;
        }
        println!(
            "    four gets, Key Vault unwrapkey calls: {}",
            fake.calls("unwrapkey")?
        );

        step(5, "Key Vault: disable the key; the value is withdrawn (retryable, exit 75), cached or not");
        fake.control(&format!("disable {}", version["version"].as_str().unwrap_or("")))?;
        let started = Instant::now();
        if !wait_for(Duration::from_secs(30), || get().is_err()) {
            bail!("still served 30 s after the key was disabled");
        }
        println!(
            "    after {:.1} s: get {NAME} -> {}",
            started.elapsed().as_secs_f64(),
            get().err().unwrap_or_default()
        );
        fake.control(&format!("enable {}", version["version"].as_str().unwrap_or("")))?;
        let started = Instant::now();
        if !wait_for(Duration::from_secs(30), || get().is_ok()) {
            bail!("not served again 30 s after the key was enabled");
        }
        println!(
            "    enabled again; after {:.1} s: get {NAME} -> {}",
            started.elapsed().as_secs_f64(),
            get().map_err(anyhow::Error::msg)?
        );
        Ok(())
    })
    .await?;
    let _ = stop_tx.send(());
    agent.await??;
    outcome?;
    println!("\nKey Vault demo complete: the private key never reached the node.");
    Ok(())
}
