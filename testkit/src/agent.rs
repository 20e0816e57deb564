//! The real `nodeseal-agent run` process on a [`NodeLayout`], synchronized on what the agent
//! announces (sd_notify `READY=1`, the `reloads` and `scans` generations in `health`) rather
//! than on time.

use crate::layout::NodeLayout;
use crate::{bin, request_at, wait_child, wait_until};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a reload or a scan may take before the kit calls the agent stuck.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long SIGTERM may take (the agent drains in-flight requests first).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Run under a systemd-style watchdog with this period: sets `WATCHDOG_USEC` and, as
    /// systemd does, `WATCHDOG_PID` to the agent's own pid.
    pub watchdog_usec: Option<u64>,
    /// How long to wait for `READY=1`.
    pub ready_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            watchdog_usec: None,
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A running (or exited) `nodeseal-agent run`, with the notify socket it reports to.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    exit: Option<ExitStatus>,
    notify: UnixDatagram,
    notifications: Vec<String>,
    log_path: PathBuf,
    ready_after: Duration,
}

impl AgentProcess {
    /// Start `agent_bin` on `layout` (its config, its log file) and wait for `READY=1`, which
    /// the agent sends once keys and env files are loaded and the socket accepts. Panics with
    /// the agent's log if it exits first or stays silent past the timeout.
    pub fn start(agent_bin: &Path, layout: &NodeLayout, options: &AgentOptions) -> Self {
        let notify_path = layout.root.join("notify.sock");
        // A previous agent's socket file (a restart on the same layout) would make bind fail.
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", notify_path.display()));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&layout.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", layout.log_path.display()));
        let mut cmd = match options.watchdog_usec {
            // systemd sets WATCHDOG_PID to the service's pid; a shell's `exec` keeps its pid.
            Some(usec) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
                    .arg(agent_bin)
                    .env("WATCHDOG_USEC", usec.to_string());
                c
            }
            None => {
                let mut c = Command::new(agent_bin);
                c.env_remove("WATCHDOG_USEC");
                c
            }
        };
        // The config's log level decides (RUST_LOG would override it); nothing systemd would
        // pass may leak in from the environment the tests run in.
        cmd.arg("--config")
            .arg(&layout.config_path)
            .arg("run")
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin.display()));
        let mut agent = Self {
            child,
            exit: None,
            notify,
            notifications: Vec::new(),
            log_path: layout.log_path.clone(),
            ready_after: Duration::ZERO,
        };
        agent
            .notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("setting a read timeout");
        while !agent.said("READY=1") {
            if let Some(status) = agent.child.try_wait().expect("waiting for the agent") {
                agent.exit = Some(status);
                panic!(
                    "the agent exited with {status} before READY=1; log:\n{}",
                    agent.logs()
                );
            }
            if started.elapsed() > options.ready_timeout {
                panic!(
                    "the agent sent no READY=1 within {:?}; log:\n{}",
                    options.ready_timeout,
                    agent.logs()
                );
            }
            agent.receive_one();
        }
        agent.ready_after = started.elapsed();
        agent
    }

    /// Time from spawn to `READY=1`.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.exit.is_none()
            && self
                .child
                .try_wait()
                .expect("waiting for the agent")
                .is_none()
    }

    /// Send `sig` to the agent.
    pub fn signal(&self, sig: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig)
            .unwrap_or_else(|e| panic!("cannot send {sig} to the agent: {e}"));
    }

    /// SIGTERM, then wait for the exit (the agent drains first); panics if it hangs.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        self.signal(Signal::SIGTERM);
        self.wait_exit(STOP_TIMEOUT)
    }

    /// SIGKILL and reap: a crash, leaving the socket file behind.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Wait for the agent to exit on its own (after a signal sent with [`Self::signal`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let status = wait_child(&mut self.child, timeout);
        self.exit = Some(status);
        // Whatever the agent said on its way out (STOPPING=1) is in the socket's queue now.
        self.drain();
        status
    }

    /// Every sd_notify datagram the agent sent so far, oldest first.
    pub fn notifications(&mut self) -> &[String] {
        self.drain();
        &self.notifications
    }

    /// Wait until the agent sent a datagram with the line `line` (e.g. `WATCHDOG=1`).
    pub fn wait_for_notification(&mut self, line: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while !self.said(line) {
            if start.elapsed() > timeout {
                return false;
            }
            self.receive_one();
        }
        true
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn said(&self, line: &str) -> bool {
        self.notifications
            .iter()
            .any(|m| m.lines().any(|l| l == line))
    }

    /// Wait up to the socket's read timeout for one datagram.
    fn receive_one(&mut self) {
        let mut buf = [0u8; 4096];
        if let Ok(n) = self.notify.recv(&mut buf) {
            self.notifications
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        if self.notify.set_nonblocking(true).is_err() {
            return;
        }
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.notifications
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let _ = self.notify.set_nonblocking(false);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A [`NodeLayout`] with the real agent on it: what agent and client end-to-end tests use.
/// Dereferences to its layout, so `node.task(..)`, `node.certs` read as the node's.
#[derive(Debug)]
pub struct Node {
    // Declared first so it is dropped (killed) before the layout's temp dir is removed.
    agent: Option<AgentProcess>,
    layout: NodeLayout,
    agent_bin: PathBuf,
}

impl Default for Node {
    fn default() -> Self {
        Self::new()
    }
}

impl Node {
    /// A fresh layout; the agent is the `nodeseal-agent` built next to the running test.
    pub fn new() -> Self {
        Self::with_agent_bin(&bin("nodeseal-agent"), "nodeseal-e2e-")
    }

    /// A fresh layout in a temp dir named `<prefix>XXXXXX`, run by `agent_bin`.
    pub fn with_agent_bin(agent_bin: &Path, prefix: &str) -> Self {
        Self {
            agent: None,
            layout: NodeLayout::new(prefix),
            agent_bin: agent_bin.to_owned(),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &NodeLayout {
        &self.layout
    }

    /// Start the agent and wait for its READY=1; returns the time it took.
    pub fn start(&mut self) -> Duration {
        self.start_with(&AgentOptions::default())
    }

    /// [`Self::start`] with options.
    pub fn start_with(&mut self, options: &AgentOptions) -> Duration {
        assert!(
            !self.is_running(),
            "the agent is already running on this node"
        );
        let agent = AgentProcess::start(&self.agent_bin, &self.layout, options);
        let took = agent.ready_after();
        self.agent = Some(agent);
        took
    }

    /// The agent process (running or exited), for what [`Node`] does not wrap.
    pub fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("the agent was never started")
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.agent().stop()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.agent().kill9()
    }

    /// Send a signal (see [`Self::reload`] for SIGHUP).
    pub fn signal(&mut self, sig: Signal) {
        self.agent().signal(sig);
    }

    /// Wait for the agent to exit after a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.agent().wait_exit(timeout)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.agent
            .as_ref()
            .expect("the agent was never started")
            .pid()
    }

    /// Whether the agent runs.
    pub fn is_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(AgentProcess::is_running)
    }

    /// SIGHUP, then wait until `health` counts one more completed reload (config re-read, keys
    /// and env files rescanned) than before the signal.
    pub fn reload(&mut self) {
        let before = self.generation("reloads");
        self.signal(Signal::SIGHUP);
        let done = wait_until(EVENT_TIMEOUT, || {
            self.try_generation("reloads").is_some_and(|g| g > before)
        });
        assert!(
            done,
            "no reload completed within {EVENT_TIMEOUT:?} of SIGHUP (reloads still {before}); log:\n{}",
            self.logs()
        );
    }

    /// Wait until the agent completed `n` more batches of file-system work than now: with
    /// `n = 2`, at least one batch started after this call, so whatever the file system held
    /// at the call has been looked at. For "nothing happened" checks.
    pub fn wait_scans(&self, n: u64) {
        let before = self.generation("scans");
        let done = wait_until(EVENT_TIMEOUT, || {
            self.try_generation("scans")
                .is_some_and(|g| g >= before + n)
        });
        assert!(
            done,
            "the agent completed fewer than {n} scans within {EVENT_TIMEOUT:?} (from {before}); log:\n{}",
            self.logs()
        );
    }

    /// A counter from `health`'s info (`reloads`, `scans`, `keys`, `tasks`).
    pub fn generation(&self, counter: &str) -> u64 {
        self.try_generation(counter).unwrap_or_else(|| {
            panic!(
                "health has no {counter:?}: {}",
                self.request(json!({"op": "health"}))
            )
        })
    }

    fn try_generation(&self, counter: &str) -> Option<u64> {
        self.try_request(&json!({"op": "health"}))?["info"][counter].as_u64()
    }

    /// One request on a fresh connection; `None` if the agent is not reachable.
    pub fn try_request(&self, req: &Value) -> Option<Value> {
        request_at(&self.layout.socket, req)
    }

    /// One request; panics with the log if the agent is unreachable.
    /// RSA decryptions the agent has done so far (host root's `status` counter).
    pub fn decrypts(&self) -> u64 {
        self.request(serde_json::json!({"op": "status"}))["info"]["counters"]["decrypts"]
            .as_u64()
            .expect("status has counters.decrypts")
    }

    pub fn request(&self, req: Value) -> Value {
        self.try_request(&req).unwrap_or_else(|| {
            panic!(
                "agent unreachable at {}; log:\n{}",
                self.layout.socket.display(),
                self.logs()
            )
        })
    }

    /// `get` for `task_dir`.
    pub fn get(&self, task_dir: &Path, name: &str) -> Value {
        self.request(json!({"op": "get", "name": name, "task": task_dir}))
    }
}

impl std::ops::Deref for Node {
    type Target = NodeLayout;

    fn deref(&self) -> &NodeLayout {
        &self.layout
    }
}
