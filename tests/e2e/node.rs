//! A fake Batch node in a temp dir with the real `nodeseal-agent` running on it: the fixture of
//! every agent and client end-to-end test.

use crate::util::{bin, run_with_stdin};
use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Passphrase of every PFX these tests create (never a secret under test).
pub const PFX_PASS: &str = "node-e2e-pass";

/// Whether the tests run as root (needed to act as other uids).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Print why a root-only test did nothing, so the skip is visible in the test output.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root to own files as, and connect as, other uids");
    true
}

/// A key pair made with `nodeseal cert create`.
pub struct Cert {
    /// Lowercase thumbprint.
    pub thumbprint: String,
    /// `P.pfx`.
    pub pfx: PathBuf,
    /// `P.crt`.
    pub crt: PathBuf,
    /// `P.pem` (public key).
    pub pem: PathBuf,
}

/// The node layout and, once started, the agent process.
pub struct TestNode {
    _dir: tempfile::TempDir,
    /// Everything lives below this.
    pub root: PathBuf,
    /// Batch certificate drop dir.
    pub certs: PathBuf,
    /// The env root (`workitems`).
    pub workitems: PathBuf,
    /// Agent state dir.
    pub state: PathBuf,
    /// Host socket.
    pub socket: PathBuf,
    /// Config file.
    pub config_path: PathBuf,
    /// Revocation list file.
    pub revoked: PathBuf,
    /// Agent stderr (logs).
    pub log_path: PathBuf,
    /// The agent, while running.
    pub child: Option<Child>,
    /// Workstation-side files (certificates, passphrase).
    pub workstation: PathBuf,
}

impl TestNode {
    /// A fresh layout and a config pointing the agent at it.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nodeseal-e2e-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        // Task dirs must be traversable by the other uids root-only tests switch to.
        fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let node = Self {
            certs: root.join("startup/certs"),
            workitems: root.join("workitems"),
            state: root.join("state"),
            socket: root.join("run/agent.sock"),
            config_path: root.join("agent.json"),
            revoked: root.join("revoked"),
            log_path: root.join("agent.log"),
            workstation: root.join("workstation"),
            child: None,
            root,
            _dir: dir,
        };
        for d in [&node.certs, &node.workitems, &node.workstation] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(node.workstation.join("pass"), PFX_PASS).unwrap();
        node.write_config(json!({}));
        node
    }

    /// The config these tests use, with `extra` fields merged over it.
    pub fn write_config(&self, extra: Value) {
        let mut config = json!({
            "socket_path": self.socket,
            "state_dir": self.state,
            "log_level": "trace",
            "key_sources": [{"kind": "batch_certs", "path": self.certs, "ingest": true}],
            "revocation_list": self.revoked,
            "env_roots": [self.workitems],
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        fs::write(
            &self.config_path,
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
    }

    /// `nodeseal cert create` into the workstation dir (valid 30 days).
    pub fn create_cert(&self, prefix: &str) -> Cert {
        self.create_cert_valid_for(prefix, 30)
    }

    /// `nodeseal cert create` with a certificate valid for `days`.
    pub fn create_cert_valid_for(&self, prefix: &str, days: u32) -> Cert {
        let p = self.workstation.join(prefix);
        let days = days.to_string();
        let out = Command::new(bin("nodeseal"))
            .args([
                "cert", "create", "--bits", "2048", "--days", &days, "--prefix",
            ])
            .arg(&p)
            .arg("--passphrase-file")
            .arg(self.workstation.join("pass"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cert create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let thumbprint = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned();
        assert_eq!(thumbprint.len(), 40);
        Cert {
            thumbprint,
            pfx: p.with_extension("pfx"),
            crt: p.with_extension("crt"),
            pem: p.with_extension("pem"),
        }
    }

    /// Certificate and unencrypted key of `cert` as one PEM (with openssl's bag attributes), as
    /// the Key Vault extension writes one per certificate.
    pub fn pem_bundle(&self, cert: &Cert) -> Vec<u8> {
        self.pkcs12_to_pem(cert, &["-nodes"])
    }

    /// Only the unencrypted private key of `cert`, PEM.
    pub fn key_pem(&self, cert: &Cert) -> Vec<u8> {
        self.pkcs12_to_pem(cert, &["-nocerts", "-nodes"])
    }

    fn pkcs12_to_pem(&self, cert: &Cert, flags: &[&str]) -> Vec<u8> {
        let passin = format!("file:{}", self.workstation.join("pass").display());
        let mut args = vec![
            "pkcs12",
            "-in",
            cert.pfx.to_str().unwrap(),
            "-passin",
            &passin,
        ];
        args.extend_from_slice(flags);
        crate::util::openssl(&args)
    }

    /// Drop a PFX and its password file into the Batch certificate dir as Batch does.
    pub fn drop_pfx(&self, cert: &Cert) -> PathBuf {
        let pfx = self.certs.join(format!("sha1-{}.pfx", cert.thumbprint));
        fs::write(format!("{}.pw", pfx.display()), PFX_PASS).unwrap();
        fs::copy(&cert.pfx, &pfx).unwrap();
        pfx
    }

    /// `nodeseal seal` a value (`format` v1 or shipyard; `name` binds v1 tokens).
    pub fn seal(&self, cert: &Cert, name: Option<&str>, value: &str, format: &str) -> String {
        let mut cmd = Command::new(bin("nodeseal"));
        cmd.args(["seal", "--format", format, "--cert"]);
        cmd.arg(if format == "shipyard" {
            &cert.pem
        } else {
            &cert.crt
        });
        if let Some(n) = name {
            cmd.args(["--name", n]);
        }
        let out = run_with_stdin(&mut cmd, value.as_bytes());
        assert!(
            out.status.success(),
            "seal: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Create `workitems/<job>/job-1/<task>/wd` and return the task dir.
    pub fn task(&self, job: &str, task: &str) -> PathBuf {
        let dir = self.workitems.join(job).join("job-1").join(task);
        fs::create_dir_all(dir.join("wd")).unwrap();
        for d in [
            self.workitems.join(job),
            self.workitems.join(job).join("job-1"),
            dir.clone(),
            dir.join("wd"),
        ] {
            fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        dir
    }

    /// Write the task's `.shipyard.envlist` atomically (temp + rename, as a careful writer does).
    pub fn write_env(&self, task_dir: &Path, content: &str) -> PathBuf {
        let path = task_dir.join("wd/.shipyard.envlist");
        let tmp = task_dir.join("wd/.envlist.tmp");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, &path).unwrap();
        path
    }

    /// Start the agent and wait until it answers `health`.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// Start with extra environment variables.
    pub fn start_with(&mut self, env: &[(&str, &str)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let with_watchdog_pid = env
            .iter()
            .any(|(k, _)| *k == "NODESEAL_TEST_EXEC_WITH_WATCHDOG_PID");
        let mut cmd = if with_watchdog_pid {
            // systemd sets WATCHDOG_PID to the service's own pid; a shell's `exec` keeps its pid.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
                .arg(bin("nodeseal-agent"));
            c
        } else {
            Command::new(bin("nodeseal-agent"))
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env("RUST_LOG", "nodeseal_agent=trace")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let ok = wait_until(Duration::from_secs(30), || {
            self.try_request(&json!({"op": "health"}))
                .is_some_and(|r| r["ok"] == true)
        });
        if !ok {
            panic!("agent did not become ready; log:\n{}", self.logs());
        }
    }

    /// Send SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        self.signal_child(&child, nix::sys::signal::Signal::SIGTERM);
        wait_child(&mut child, Duration::from_secs(20))
    }

    /// Send a signal to the running agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("agent running");
        self.signal_child(child, sig);
    }

    fn signal_child(&self, child: &Child, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One request on a fresh connection; `None` if the agent is not reachable.
    pub fn try_request(&self, req: &Value) -> Option<Value> {
        request_at(&self.socket, req)
    }

    /// One request; panics if the agent is unreachable.
    pub fn request(&self, req: Value) -> Value {
        self.try_request(&req).unwrap_or_else(|| {
            panic!(
                "agent unreachable at {}; log:\n{}",
                self.socket.display(),
                self.logs()
            )
        })
    }

    /// `get` for `task_dir`.
    pub fn get(&self, task_dir: &Path, name: &str) -> Value {
        self.request(json!({"op": "get", "name": name, "task": task_dir}))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request over a new connection to `socket`.
pub fn request_at(socket: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).ok()?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

/// The error code of a response (`""` on success).
pub fn code_of(r: &Value) -> String {
    r["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// Poll `f` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for a child, killing it if it outlives `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a request as another uid (root only); panics when the agent does not answer.
pub fn request_as(uid: u32, socket: &Path, req: &Value) -> Value {
    try_request_as(uid, socket, req).unwrap_or_else(|| {
        panic!(
            "no answer to a request as uid {uid} on {}",
            socket.display()
        )
    })
}

impl TestNode {
    /// Pid of the running agent.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Whether the agent process is still running (not exited or killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL the agent and reap it: a crash, leaving its socket file behind.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        self.signal_child(&child, nix::sys::signal::Signal::SIGKILL);
        wait_child(&mut child, Duration::from_secs(10))
    }
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// Number of file descriptors `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Like [`request_as`], but tolerant of an agent that answers and hangs up before the request
/// is sent (a `busy` refusal): returns the line the agent wrote, `None` if it wrote none.
pub fn try_request_as(uid: u32, socket: &Path, req: &Value) -> Option<Value> {
    use std::os::unix::process::CommandExt;
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except OSError:
    pass
buf = b""
while not buf.endswith(b"\n"):
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .arg(req.to_string())
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).ok()
}
