//! The one fake Batch node of the workspace, used by the end-to-end tests (`tests/e2e`), the
//! benchmark harness (`bench/`) and `nodeseal-agent demo`:
//!
//! - [`NodeLayout`]: a temp node root with the Batch certificate drop dir, the `workitems` env
//!   root with `<job>/job-1/<task>/wd/` task dirs and their env files, the agent's state dir and
//!   its config file; key pairs made with `nodeseal cert create` and PFX drops as Batch makes
//!   them.
//! - [`AgentProcess`]: the real `nodeseal-agent run` binary, ready when it says `READY=1` on a
//!   `NOTIFY_SOCKET` of ours (as under systemd), stopped with SIGTERM, reloaded with SIGHUP and
//!   the `reloads` generation in `health`.
//! - [`Node`]: a layout with the agent running on it, which is what most tests want.
//!
//! Setup that fails is a broken machine or a bug in the caller, never an outcome under test, so
//! everything here panics with the path and the reason instead of returning errors.
#![forbid(unsafe_code)]

mod agent;
mod bins;
#[cfg(feature = "kv-fake")]
pub mod kvfake;
mod layout;
mod pids;
mod wire;

pub use agent::{AgentOptions, AgentProcess, Node};
pub use bins::{bin, bin_dir, code, openssl, run_with_stdin, stderr, stdout};
pub use layout::{Cert, NodeLayout, PFX_PASS};
pub use pids::spawn_with_pid;
pub use wire::{
    code_of, fd_count, proc_status_kib, request_as, request_at, rss_kib, try_request_as,
};

use std::time::{Duration, Instant};

/// Whether this process runs as root: only root can own files as, and connect as, other uids.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Poll `f` every 20 ms until it holds or `timeout` passes; whether it held. For conditions
/// that are observable but announce themselves nowhere (a value becomes served, a file goes).
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

/// Wait for a child to exit, killing it (and failing) if it outlives `timeout`.
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Report that `test` cannot run here for want of `what` (a tool, a kernel feature). Under CI
/// (`CI=true`), whose machine is set up to have everything, that fails the test instead: a
/// skip there would pass without testing anything.
pub fn unavailable_here(test: &str, what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {what}; CI must provide it");
    }
    eprintln!("SKIPPED {test}: {what}");
}
