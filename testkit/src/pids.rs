//! Pid numbers as an attacker sees them: reusable once their process is gone.

use std::path::Path;
use std::process::{Child, Command};

/// Spawn `command()` so that its process gets exactly `pid` in this pid namespace, as a pid-reuse
/// attacker would by cycling pids until it lands on the number: `pid - 1` goes into
/// `/proc/sys/kernel/ns_last_pid` (root only) before each spawn, and a child that got another
/// number (another process on the machine took it first) is killed and the next try made.
/// `None` after `attempts` tries, or at once while a live process or thread holds `pid`.
pub fn spawn_with_pid(
    pid: u32,
    attempts: usize,
    mut command: impl FnMut() -> Command,
) -> Option<Child> {
    for _ in 0..attempts {
        if Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("cannot write /proc/sys/kernel/ns_last_pid (needs root)");
        let mut child = command().spawn().expect("cannot spawn the pid taker");
        if child.id() == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}
