//! Who is on the other end of a connection, from the kernel (`SO_PEERCRED`), never from anything
//! the caller says.

use crate::authz::Caller;
use std::path::PathBuf;

/// Kernel-reported identity of a connected process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Effective uid at `connect()`.
    pub(crate) uid: u32,
    /// Effective gid at `connect()`.
    pub(crate) gid: u32,
    /// Pid as seen from the agent's pid namespace; 0 when the peer lives in a namespace the agent
    /// cannot see into.
    pub(crate) pid: u32,
    /// uid 0 in the agent's own pid namespace. Root in a container is not host root.
    pub(crate) host_root: bool,
}

/// The agent's own pid namespace identity (`pid:[4026531836]`).
pub(crate) fn own_pid_namespace() -> Option<PathBuf> {
    std::fs::read_link("/proc/self/ns/pid").ok()
}

impl Peer {
    /// Build from the credentials tokio reads with `SO_PEERCRED`.
    pub(crate) fn from_cred(cred: &tokio::net::unix::UCred, own_ns: Option<&PathBuf>) -> Self {
        let uid = cred.uid();
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        Self {
            uid,
            gid: cred.gid(),
            pid,
            host_root: uid == 0 && is_in_namespace(pid, own_ns),
        }
    }

    /// What authorization decides on.
    pub(crate) fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
            // Supplementary groups come with the pidfd work (SO_PEERGROUPS); until then gid and
            // group selectors see the primary gid only.
            groups: Vec::new(),
            host_root: self.host_root,
        }
    }
}

/// Whether `pid` shares our pid namespace. Fails closed: an unreadable link, pid 0 (the kernel's
/// answer for a peer outside our view) or an unknown own namespace all mean "no".
fn is_in_namespace(pid: u32, own_ns: Option<&PathBuf>) -> bool {
    if pid == 0 {
        return false;
    }
    let Some(own) = own_ns else { return false };
    match std::fs::read_link(format!("/proc/{pid}/ns/pid")) {
        Ok(theirs) => &theirs == own,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_in_own_namespace_and_pid_zero_never_is() {
        let own = own_pid_namespace();
        assert!(own.is_some());
        assert!(is_in_namespace(std::process::id(), own.as_ref()));
        assert!(!is_in_namespace(0, own.as_ref()));
        assert!(!is_in_namespace(std::process::id(), None));
    }
}
