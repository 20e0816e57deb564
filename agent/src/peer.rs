//! Who is on the other end of a connection, from the kernel, never from anything the caller says
//! and never from a pid number.
//!
//! uid, gid and supplementary groups are the credentials the kernel recorded at `connect()`
//! (`SO_PEERCRED`, `SO_PEERGROUPS`): they stay true of the connection whoever holds it later.
//! Whether uid 0 is host root depends on the pid and user namespaces of the process that
//! connected (a user namespace is entered for good: no process goes back to its parent's), and
//! they are read through a pidfd the kernel took at `connect()` (`SO_PEERPIDFD`), which names that
//! process and no other: a pid number can be taken over by another process once the caller has
//! exited, a pidfd cannot. It is decided once, at accept, and kept for the connection. When the
//! kernel cannot say (no `SO_PEERPIDFD`, a process that has gone, a failed call), nobody is host
//! root.
//!
//! [`Identify::account`] gathers what the kernel says; [`Peer::decide`] is the pure decision over
//! it, tested below for every answer the kernel can give.

use crate::authz::Caller;
use crate::sys;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// A namespace (pid or user), by its nsfs inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Namespace {
    dev: u64,
    ino: u64,
}

impl Namespace {
    fn of_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    fn of_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self::of_metadata(&std::fs::File::from(fd).metadata()?))
    }

    /// The agent's own namespace of this kind (`pid`, `user`).
    fn own(kind: &str) -> io::Result<Self> {
        Ok(Self::of_metadata(&std::fs::metadata(format!(
            "/proc/self/ns/{kind}"
        ))?))
    }
}

/// What this kernel can tell about the process behind a connection; probed once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Support {
    /// `SO_PEERPIDFD` and `PIDFD_GET_PID_NAMESPACE` (Linux 6.11): the namespace straight from
    /// the pidfd.
    PidfdNamespace,
    /// `SO_PEERPIDFD` without the ioctl (Linux 6.5 to 6.10): the namespace from `/proc/<pid>`
    /// with the pid the pidfd reports, accepted only if the pidfd's process is still alive after
    /// the read (then the pid was still its own).
    PidfdProc,
    /// No `SO_PEERPIDFD`: the kernel cannot attest where a caller runs.
    Unattested,
}

/// Where the process that connected runs, as the kernel answered at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerNamespace {
    /// Still the process that connected, in this pid namespace.
    Known(Namespace),
    /// The process that connected has gone: whoever holds the connection now is unknown.
    Gone,
    /// The process runs in a pid namespace the agent cannot see into.
    Invisible,
    /// This kernel cannot say (no `SO_PEERPIDFD`).
    Unattested,
    /// The kernel refused to answer; the reason, for the log.
    Failed(String),
}

/// What the kernel said about one connection: the input of [`Peer::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelAccount {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// For log lines only: a pid number identifies nobody.
    pub(crate) pid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) namespace: PeerNamespace,
    /// The same answer for the process's user namespace.
    pub(crate) user_namespace: PeerNamespace,
}

/// Kernel-reported identity of a connected process, decided at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Effective uid at `connect()`.
    pub(crate) uid: u32,
    /// Effective gid at `connect()`.
    pub(crate) gid: u32,
    /// Supplementary groups at `connect()`; empty when the kernel would not say.
    pub(crate) groups: Vec<u32>,
    /// Pid at `connect()` as seen from the agent's pid namespace, for log lines only; 0 when the
    /// peer lives in a namespace the agent cannot see into.
    pub(crate) pid: u32,
    /// uid 0 in the agent's own pid namespace, attested through the pidfd. Root in a container,
    /// or a caller that has gone, is not host root.
    pub(crate) host_root: bool,
    /// A process of the agent's own pid namespace, still the one that connected, attested
    /// through the pidfd; false when the kernel cannot say.
    pub(crate) host_process: bool,
    /// Whether this kernel can attest where a caller runs at all (`SO_PEERPIDFD`).
    pub(crate) namespace_attested: bool,
}

impl Peer {
    /// The decision: host root is uid 0 whose process, still the one that connected, runs in
    /// the agent's own pid namespace and its own user namespace. Root that entered a user
    /// namespace of its own is still uid 0 to `SO_PEERCRED` but holds no capability over the
    /// host. Everything else, an unknown own pid namespace included, is not host root.
    /// `own_user_ns` is `None` on a kernel without user namespaces, where everyone is in the one.
    pub(crate) fn decide(
        account: &KernelAccount,
        own_ns: Option<Namespace>,
        own_user_ns: Option<Namespace>,
    ) -> Self {
        let in_own_namespace = match (&account.namespace, own_ns) {
            (PeerNamespace::Known(theirs), Some(own)) => *theirs == own,
            _ => false,
        };
        let in_own_user_namespace = match (&account.user_namespace, own_user_ns) {
            (_, None) => true,
            (PeerNamespace::Known(theirs), Some(own)) => *theirs == own,
            _ => false,
        };
        Self {
            uid: account.uid,
            gid: account.gid,
            groups: account.groups.clone(),
            pid: account.pid,
            host_root: account.uid == 0 && in_own_namespace && in_own_user_namespace,
            host_process: in_own_namespace,
            namespace_attested: account.namespace != PeerNamespace::Unattested,
        }
    }

    /// Whom admission counts this connection against.
    pub(crate) fn principal(&self) -> crate::server::admission::Principal {
        crate::server::admission::Principal {
            uid: self.uid,
            host_root: self.host_root,
        }
    }

    /// What authorization decides on.
    pub(crate) fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            host_root: self.host_root,
            host_process: self.host_process,
            namespace_attested: self.namespace_attested,
        }
    }
}

/// How this agent identifies callers: the kernel's support and the agent's own pid namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identify {
    support: Support,
    own_ns: Option<Namespace>,
    /// `None`: this kernel has no user namespaces.
    own_user_ns: Option<Namespace>,
}

impl Identify {
    /// Probe the kernel on a socket pair of our own and say in one log line how callers are
    /// identified.
    pub(crate) fn probe() -> Self {
        let mut own_ns = Namespace::own("pid");
        let own_user_ns = match Namespace::own("user") {
            Ok(ns) => Some(ns),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                own_ns = Err(e);
                None
            }
        };
        let support = probe_support(own_ns.as_ref().ok().copied(), own_user_ns);
        match (&own_ns, support) {
            (Err(e), _) => tracing::error!(
                error = %e,
                "cannot read /proc/self/ns/pid or /proc/self/ns/user: nobody is host root through a socket; admin operations are refused, task reads by uid still work"
            ),
            (Ok(_), Support::PidfdNamespace) => tracing::info!(
                "callers identified at accept by pidfd (SO_PEERPIDFD, PIDFD_GET_PID_NAMESPACE)"
            ),
            (Ok(_), Support::PidfdProc) => tracing::info!(
                "callers identified at accept by pidfd (SO_PEERPIDFD; namespace from /proc, rechecked against the pidfd)"
            ),
            (Ok(_), Support::Unattested) => tracing::warn!(
                "this kernel cannot attest the caller (no SO_PEERPIDFD, Linux 6.5): nobody is host root through a socket; admin operations are refused, task reads by uid still work"
            ),
        }
        if support != Support::Unattested && !has_effective_cap(CAP_SYS_PTRACE) {
            tracing::error!(
                "no CAP_SYS_PTRACE: the kernel will not say where another process runs (a ptrace read check), so host root is not recognised and other uids are refused on the host socket; grant CAP_SYS_PTRACE (the shipped unit does)"
            );
        }
        Self {
            support,
            own_ns: own_ns.ok(),
            own_user_ns,
        }
    }

    /// The identity of the peer on `stream`, decided now, once.
    pub(crate) fn peer(&self, stream: &tokio::net::UnixStream) -> io::Result<Peer> {
        Ok(Peer::decide(
            &self.account(stream)?,
            self.own_ns,
            self.own_user_ns,
        ))
    }

    /// What the kernel says about the peer on `stream`. Fails only if it gives no credentials.
    fn account(&self, stream: &tokio::net::UnixStream) -> io::Result<KernelAccount> {
        let cred = stream.peer_cred()?;
        let sock = stream.as_fd();
        let groups = sys::peer_groups(sock).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the caller's groups (SO_PEERGROUPS); using none");
            Vec::new()
        });
        let (namespace, user_namespace) = peer_namespaces(self.support, sock);
        Ok(KernelAccount {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            groups,
            namespace,
            user_namespace,
        })
        .inspect(|a| {
            for ns in [&a.namespace, &a.user_namespace] {
                if let PeerNamespace::Failed(why) = ns {
                    tracing::debug!(peer_uid = a.uid, error = %why, "caller's namespace unknown; not host root");
                }
            }
        })
    }
}

const CAP_SYS_PTRACE: u32 = 19;

/// Whether this process holds capability `cap` (by number) in its effective set, from
/// `/proc/self/status`; false when that cannot be read.
fn has_effective_cap(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    effective_caps(&status).is_some_and(|caps| (caps >> cap) & 1 == 1)
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn probe_support(own_ns: Option<Namespace>, own_user_ns: Option<Namespace>) -> Support {
    let Ok((ours, _theirs)) = std::os::unix::net::UnixStream::pair() else {
        return Support::Unattested;
    };
    let pidfd = match sys::peer_pidfd(ours.as_fd()) {
        Ok(fd) => fd,
        Err(e) => {
            if e.raw_os_error() != Some(libc::ENOPROTOOPT) {
                tracing::warn!(error = %e, "SO_PEERPIDFD failed on a socket pair of our own");
            }
            return Support::Unattested;
        }
    };
    // Each way is used only if it finds the agent itself where it is.
    let found_self = |pid: io::Result<Namespace>, user: io::Result<Namespace>| {
        pid.ok().is_some_and(|ns| Some(ns) == own_ns)
            && (own_user_ns.is_none() || user.ok() == own_user_ns)
    };
    let fd = pidfd.as_fd();
    if found_self(
        sys::pidfd_pid_namespace(fd).and_then(Namespace::of_fd),
        sys::pidfd_user_namespace(fd).and_then(Namespace::of_fd),
    ) {
        Support::PidfdNamespace
    } else if found_self(
        namespace_via_proc(fd, "pid"),
        namespace_via_proc(fd, "user"),
    ) {
        Support::PidfdProc
    } else {
        Support::Unattested
    }
}

/// The pid and user namespaces of the process that connected, through one pidfd.
fn peer_namespaces(support: Support, sock: BorrowedFd<'_>) -> (PeerNamespace, PeerNamespace) {
    let both = |ns: PeerNamespace| (ns.clone(), ns);
    if support == Support::Unattested {
        return both(PeerNamespace::Unattested);
    }
    let pidfd = match sys::peer_pidfd(sock) {
        Ok(fd) => fd,
        // Kernels before pidfs refuse a pidfd for a process that has been reaped.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EINVAL)) => {
            return both(PeerNamespace::Gone)
        }
        Err(e) => return both(PeerNamespace::Failed(format!("SO_PEERPIDFD: {e}"))),
    };
    let fd = pidfd.as_fd();
    let (pid, user) = match support {
        Support::PidfdNamespace => (
            sys::pidfd_pid_namespace(fd).and_then(Namespace::of_fd),
            sys::pidfd_user_namespace(fd).and_then(Namespace::of_fd),
        ),
        _ => (
            namespace_via_proc(fd, "pid"),
            namespace_via_proc(fd, "user"),
        ),
    };
    (answer(pid), answer(user))
}

fn answer(ns: io::Result<Namespace>) -> PeerNamespace {
    match ns {
        Ok(ns) => PeerNamespace::Known(ns),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => PeerNamespace::Gone,
        Err(e) if e.kind() == io::ErrorKind::NotFound => PeerNamespace::Invisible,
        Err(e) => PeerNamespace::Failed(format!("namespace of the caller: {e}")),
    }
}

/// The namespace of this kind (`pid`, `user`) of the pidfd's process through
/// `/proc/<pid>/ns/<kind>`, with the pid its fdinfo reports; the read counts only if the
/// process is still alive afterwards, because then the pid was still its own during the read.
/// `ESRCH`: gone; `NotFound`: not visible from here.
fn namespace_via_proc(pidfd: BorrowedFd<'_>, kind: &str) -> io::Result<Namespace> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid = pid_of_fdinfo(&fdinfo)
        .ok_or_else(|| io::Error::other("no Pid line in the pidfd's fdinfo"))?;
    match pid {
        -1 => return Err(io::Error::from_raw_os_error(libc::ESRCH)),
        0 => return Err(io::ErrorKind::NotFound.into()),
        _ => {}
    }
    let read = std::fs::metadata(format!("/proc/{pid}/ns/{kind}"));
    sys::pidfd_is_alive(pidfd)?;
    Ok(Namespace::of_metadata(&read?))
}

/// The `Pid:` of a pidfd's fdinfo: the pid in our namespace, 0 outside our view, -1 once gone.
fn pid_of_fdinfo(fdinfo: &str) -> Option<i64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Namespace = Namespace { dev: 4, ino: 1 };
    const CONTAINER: Namespace = Namespace { dev: 4, ino: 2 };
    const HOST_USERS: Namespace = Namespace { dev: 4, ino: 11 };
    const SANDBOX_USERS: Namespace = Namespace { dev: 4, ino: 12 };

    fn account(uid: u32, namespace: PeerNamespace) -> KernelAccount {
        KernelAccount {
            uid,
            gid: uid,
            pid: 1234,
            groups: vec![5000, 5001],
            user_namespace: match &namespace {
                PeerNamespace::Known(_) => PeerNamespace::Known(HOST_USERS),
                other => other.clone(),
            },
            namespace,
        }
    }

    #[test]
    fn host_root_is_uid_zero_still_alive_in_our_namespace_and_nothing_else() {
        use PeerNamespace::*;
        // (uid, what the kernel said, own namespace known, host root, kernel attests)
        let table = [
            (0, Known(HOST), true, true, true),
            (0, Known(CONTAINER), true, false, true),
            (1000, Known(HOST), true, false, true),
            // The process that connected has gone: a pid-reuse attack ends here.
            (0, Gone, true, false, true),
            (0, Invisible, true, false, true),
            (0, Failed("EPERM".into()), true, false, true),
            (0, Known(HOST), false, false, true),
            // No SO_PEERPIDFD: nobody is host root, and the caller can be told why.
            (0, Unattested, true, false, false),
            (1000, Unattested, true, false, false),
        ];
        for (uid, ns, own_known, host_root, attested) in table {
            let own = own_known.then_some(HOST);
            let peer = Peer::decide(&account(uid, ns.clone()), own, Some(HOST_USERS));
            assert_eq!(peer.host_root, host_root, "uid {uid}, {ns:?}, own {own:?}");
            let host_process = own_known && ns == Known(HOST);
            assert_eq!(
                peer.host_process, host_process,
                "uid {uid}, {ns:?}, own {own:?}"
            );
            assert_eq!(peer.namespace_attested, attested, "uid {uid}, {ns:?}");
            // The credentials recorded at connect() are kept whatever the namespace answer.
            assert_eq!((peer.uid, peer.gid), (uid, uid));
            assert_eq!(peer.groups, vec![5000, 5001]);
            let caller = peer.caller();
            assert_eq!(caller.host_root, host_root);
            assert_eq!(caller.host_process, host_process);
            assert_eq!(caller.groups, peer.groups);
        }
    }

    /// Root that entered a user namespace of its own, in the host's pid namespace: still uid 0
    /// to SO_PEERCRED, no capability over the host, not host root; still a host process.
    #[test]
    fn host_root_is_also_in_our_user_namespace() {
        use PeerNamespace::*;
        // (user namespace answer, own user namespace, host root)
        let table = [
            (Known(HOST_USERS), Some(HOST_USERS), true),
            (Known(SANDBOX_USERS), Some(HOST_USERS), false),
            (Gone, Some(HOST_USERS), false),
            (Invisible, Some(HOST_USERS), false),
            (Failed("EOPNOTSUPP".into()), Some(HOST_USERS), false),
            // A kernel without user namespaces: everyone is in the one there is.
            (Failed("EOPNOTSUPP".into()), None, true),
        ];
        for (user_ns, own_user, host_root) in table {
            let account = KernelAccount {
                user_namespace: user_ns.clone(),
                ..account(0, Known(HOST))
            };
            let peer = Peer::decide(&account, Some(HOST), own_user);
            assert_eq!(peer.host_root, host_root, "{user_ns:?}, own {own_user:?}");
            assert!(peer.host_process, "{user_ns:?}");
        }
    }

    #[test]
    fn the_effective_capabilities_line() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t0000000000080000\n";
        assert_eq!(effective_caps(status), Some(1 << CAP_SYS_PTRACE));
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn the_fdinfo_pid_line() {
        assert_eq!(
            pid_of_fdinfo("pos:\t0\nflags:\t02000002\nPid:\t42\nNSpid:\t42\n"),
            Some(42)
        );
        assert_eq!(pid_of_fdinfo("Pid:\t-1\n"), Some(-1));
        assert_eq!(pid_of_fdinfo("Pid:\t0\n"), Some(0));
        assert_eq!(pid_of_fdinfo("pos:\t0\n"), None);
    }

    /// On this kernel: a socket pair of our own finds the agent's own namespace both ways, and
    /// the probe picks the best one it has.
    #[test]
    fn this_kernel_finds_our_own_namespace_through_a_socket_pair() {
        let own = Namespace::own("pid").unwrap();
        let own_user = Namespace::own("user").ok();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = match sys::peer_pidfd(ours.as_fd()) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
                assert_eq!(probe_support(Some(own), own_user), Support::Unattested);
                eprintln!("SKIPPED: this kernel has no SO_PEERPIDFD");
                return;
            }
            Err(e) => panic!("SO_PEERPIDFD: {e}"),
        };
        assert_eq!(namespace_via_proc(pidfd.as_fd(), "pid").unwrap(), own);
        assert_eq!(namespace_via_proc(pidfd.as_fd(), "user").ok(), own_user);
        if let Ok(ns) = sys::pidfd_pid_namespace(pidfd.as_fd()) {
            assert_eq!(Namespace::of_fd(ns).unwrap(), own);
            let user = sys::pidfd_user_namespace(pidfd.as_fd()).and_then(Namespace::of_fd);
            assert_eq!(user.ok(), own_user);
            assert_eq!(probe_support(Some(own), own_user), Support::PidfdNamespace);
        }
        assert_eq!(probe_support(None, own_user), Support::Unattested);
        // A way that finds another user namespace for the agent itself is not used.
        if own_user.is_some() {
            assert_eq!(
                probe_support(Some(own), Some(CONTAINER)),
                Support::Unattested
            );
        }
        let groups = sys::peer_groups(ours.as_fd()).unwrap();
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = groups.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "SO_PEERGROUPS on our own socket pair");
    }

    /// The probe's answer is what the accept path acts on: the same live connection is host root
    /// (when the test runs as root) with either pidfd way, and never without SO_PEERPIDFD.
    #[tokio::test]
    async fn the_accept_path_follows_the_probed_support() {
        let own = Namespace::own("pid").ok();
        let own_user = Namespace::own("user").ok();
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let root = nix::unistd::geteuid().is_root();
        let supported = probe_support(own, own_user);
        for support in [
            Support::PidfdNamespace,
            Support::PidfdProc,
            Support::Unattested,
        ] {
            if supported == Support::Unattested && support != Support::Unattested {
                continue;
            }
            if supported == Support::PidfdProc && support == Support::PidfdNamespace {
                continue;
            }
            let peer = Identify {
                support,
                own_ns: own,
                own_user_ns: own_user,
            }
            .peer(&ours)
            .unwrap();
            let attested = support != Support::Unattested;
            assert_eq!(peer.host_root, root && attested, "{support:?}");
            assert_eq!(peer.host_process, attested, "{support:?}");
            assert_eq!(peer.namespace_attested, attested, "{support:?}");
            assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
            assert_eq!(peer.pid, std::process::id());
        }
        let unknown_own = Identify {
            support: supported,
            own_ns: None,
            own_user_ns: own_user,
        };
        assert!(!unknown_own.peer(&ours).unwrap().host_root);
    }

    /// A child that has exited and been reaped is gone by either way, even though its pid
    /// number may already belong to someone else.
    #[test]
    fn a_reaped_process_is_gone() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pidfd = sys::pidfd_open(child.id() as i32);
        let pidfd = match pidfd {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.wait();
                panic!("pidfd_open: {e}");
            }
        };
        child.wait().unwrap();
        let err = namespace_via_proc(pidfd.as_fd(), "pid").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
        assert_eq!(
            sys::pidfd_is_alive(pidfd.as_fd())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ESRCH)
        );
        for ns in [
            sys::pidfd_pid_namespace(pidfd.as_fd()),
            sys::pidfd_user_namespace(pidfd.as_fd()),
        ] {
            if let Err(e) = ns {
                assert!(
                    matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOTTY)),
                    "{e}"
                );
            } else {
                panic!("a reaped process still has a namespace");
            }
        }
    }
}
