//! A fake Batch node in a temp dir (the layout `tests/e2e/node.rs` uses) and the real
//! `nodeseal-agent` process on it, started with `NOTIFY_SOCKET` pointing at a datagram socket
//! of ours so start-up time is measured to the agent's own READY=1.

use anyhow::{bail, Context, Result};
use nodeseal_envelope::token::{self, SealOptions};
use nodeseal_envelope::KeyPair;
use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Passphrase of the benchmark's throwaway PFX files (never a secret under test).
pub const PFX_PASS: &str = "nodeseal-bench-pass";

/// One generated key pair with its PFX bytes.
pub struct BenchKey {
    /// The pair, for sealing and for the in-process parse baseline.
    pub pair: KeyPair,
    /// PKCS#12 under [`PFX_PASS`].
    pub pfx: Vec<u8>,
}

impl BenchKey {
    /// A fresh RSA key of `bits` with a self-signed certificate.
    pub fn generate(bits: u32) -> Result<Self> {
        let pair = KeyPair::generate(bits, 30, "nodeseal-bench")
            .with_context(|| format!("cannot generate an RSA {bits} key"))?;
        let pfx = pair
            .to_pkcs12(PFX_PASS.as_bytes(), false)
            .context("cannot export the benchmark key as PKCS#12")?;
        Ok(Self { pair, pfx })
    }

    /// Lowercase thumbprint.
    pub fn thumbprint(&self) -> String {
        self.pair.thumbprint().to_string()
    }

    /// A v1 token of `value` bound to `name`.
    pub fn seal_v1(&self, name: &str, value: &str) -> Result<String> {
        let opts = SealOptions {
            name: Some(name.to_owned()),
            not_after: None,
        };
        token::seal(value.as_bytes(), &[self.pair.recipient()], &opts)
            .with_context(|| format!("cannot seal {name}"))
    }

    /// A Batch Shipyard ciphertext of `value` (raw RSA PKCS#1 v1.5, base64).
    pub fn seal_shipyard(&self, value: &str) -> Result<String> {
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
pub fn value_of(i: usize) -> String {
    format!("bench-value-{i:08}-0123456789abcdef")
}

/// Variable name `i`.
pub fn name_of(i: usize) -> String {
    format!("SECRET_{i:05}")
}

/// The node layout and, once started, the agent.
pub struct Node {
    _dir: tempfile::TempDir,
    /// Batch certificate drop dir.
    pub certs: PathBuf,
    /// Env root.
    pub workitems: PathBuf,
    /// Host socket.
    pub socket: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    notify_path: PathBuf,
    state: PathBuf,
    agent_bin: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// An empty layout; `config_extra` is merged over the benchmark's config.
    pub fn new(agent_bin: &Path, config_extra: &Value) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nodeseal-bench-")
            .tempdir()
            .context("cannot create a temp dir")?;
        let root = dir.path().to_path_buf();
        let node = Self {
            certs: root.join("startup/certs"),
            workitems: root.join("workitems"),
            socket: root.join("run/agent.sock"),
            config_path: root.join("agent.json"),
            log_path: root.join("agent.log"),
            notify_path: root.join("notify.sock"),
            state: root.join("state"),
            agent_bin: agent_bin.to_owned(),
            child: None,
            _dir: dir,
        };
        for d in [&node.certs, &node.workitems] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        // Raised limits: the benchmark measures capacity, and one uid (root) sends everything,
        // which the default 200 requests/s per uid would cut off within a fraction of a second.
        let mut config = json!({
            "socket_path": node.socket,
            "state_dir": node.state,
            "log_level": "info",
            "key_sources": [{"kind": "batch_certs", "path": node.certs, "ingest": true}],
            "revocation_list": null,
            "env_roots": [node.workitems],
            "limits": {
                "max_connections": 4096,
                "max_connections_per_uid": 4096,
                "idle_timeout_secs": 600,
                "requests_per_sec_per_uid": 100_000_000u64,
                "burst_per_uid": 100_000_000u64,
            },
        });
        if let (Some(base), Some(extra)) = (config.as_object_mut(), config_extra.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        fs::write(&node.config_path, serde_json::to_vec_pretty(&config)?)
            .context("cannot write the agent config")?;
        Ok(node)
    }

    /// Drop `key` into the certificate dir as Batch does.
    pub fn drop_pfx(&self, key: &BenchKey) -> Result<()> {
        let pfx = self.certs.join(format!("sha1-{}.pfx", key.thumbprint()));
        fs::write(format!("{}.pw", pfx.display()), PFX_PASS)?;
        fs::write(&pfx, &key.pfx).with_context(|| format!("cannot write {}", pfx.display()))?;
        Ok(())
    }

    /// Forget the ingested key store (a first boot again).
    pub fn wipe_state(&self) -> Result<()> {
        if self.state.exists() {
            fs::remove_dir_all(&self.state).context("cannot remove the agent state dir")?;
        }
        Ok(())
    }

    /// Create `workitems/<job>/job-1/<task>/wd`; returns the task dir.
    pub fn task_dir(&self, job: &str, task: &str) -> Result<PathBuf> {
        let dir = self.workitems.join(job).join("job-1").join(task);
        fs::create_dir_all(dir.join("wd"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Write a task's `.shipyard.envlist` atomically (temp + rename).
    pub fn write_env(&self, task_dir: &Path, lines: &[(String, String)]) -> Result<()> {
        let mut text = String::new();
        for (k, v) in lines {
            text.push_str(k);
            text.push('=');
            text.push_str(v);
            text.push('\n');
        }
        let tmp = task_dir.join("wd/.envlist.tmp");
        fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, task_dir.join("wd/.shipyard.envlist"))
            .context("cannot rename the env file into place")?;
        Ok(())
    }

    /// Start the agent; returns the time from spawn to READY=1 on `NOTIFY_SOCKET`.
    pub fn start(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        let _ = fs::remove_file(&self.notify_path);
        let notify = UnixDatagram::bind(&self.notify_path)
            .with_context(|| format!("cannot bind {}", self.notify_path.display()))?;
        notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env("NOTIFY_SOCKET", &self.notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.agent_bin.display()))?;
        self.child = Some(child);
        let mut buf = [0u8; 4096];
        loop {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("agent sent no READY=1 within 60 s; log:\n{}", self.logs());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    bail!(
                        "agent exited with {status} before READY; log:\n{}",
                        self.logs()
                    );
                }
            }
            match notify.recv(&mut buf) {
                Ok(n) => {
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Ok(start.elapsed());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("reading NOTIFY_SOCKET"),
            }
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait (bounded); SIGKILL if it hangs.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("agent did not stop within 20 s of SIGTERM")
    }

    /// Everything the agent logged.
    pub fn logs(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One request on a new connection.
    pub fn request(&self, req: &Value) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("cannot connect to {}", self.socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        serde_json::from_str(&reply).with_context(|| format!("bad reply {reply:?}"))
    }

    /// `get` and insist on `want`.
    pub fn get_expect(&self, task: &Path, name: &str, want: &str) -> Result<()> {
        let r = self.request(&get_request(task, name))?;
        if r["ok"] != true || r["value"] != want {
            bail!("get {name} answered {}; log:\n{}", r["error"], self.logs());
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `get` request as JSON.
pub fn get_request(task: &Path, name: &str) -> Value {
    json!({"v": 1, "op": "get", "name": name, "task": task})
}

/// `VmRSS` and `VmLck` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let f = status_fields(pid, &["VmRSS:", "VmLck:"])?;
    Ok((f[0], f[1]))
}

/// Numeric fields (KiB) of `/proc/<pid>/status`, 0 when absent.
pub fn status_fields(pid: u32, names: &[&str]) -> Result<Vec<u64>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(names.iter().map(|n| field(n)).collect())
}
