//! The agent's only `unsafe` code, calls with no safe wrapper:
//! - adopting the listening socket systemd passes by socket activation: `sd_listen_fds` hands
//!   over a raw descriptor number, and turning a number into an owned socket is unchecked;
//! - `mlockall` with `MCL_ONFAULT`, which nix does not expose: without it `MCL_FUTURE` would
//!   fault in every reserved thread stack and multiply the agent's resident memory;
//! - taking ownership of the descriptor `openat2`/`openat` return (nix hands back a raw number),
//!   in [`open_beneath`], the one way the agent opens anything inside a task tree;
//! - who is calling, from the kernel ([`peer_pidfd`], [`peer_groups`], [`pidfd_pid_namespace`],
//!   [`pidfd_user_namespace`], [`pidfd_is_alive`]): getsockopt options and pidfd calls nix 0.29
//!   does not wrap;
//! - `mallopt(M_MMAP_THRESHOLD)` in [`return_big_frees_to_kernel`].
//!
//! Everything else goes through safe wrappers (tokio, nix).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// The first socket systemd passed us (`LISTEN_FDS`/`LISTEN_PID`), if any. The environment
/// variables are removed so child processes do not see them.
pub(crate) fn inherited_listener() -> std::io::Result<Option<UnixListener>> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()?.collect();
    let Some(&fd) = fds.first() else {
        return Ok(None);
    };
    // SAFETY: systemd guarantees that descriptors SD_LISTEN_FDS_START.. are open and passed to
    // this process alone (sd_notify::listen_fds checked LISTEN_PID); we take ownership exactly
    // once, here, and check below that it is a listening Unix stream socket before using it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    listener.local_addr()?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Lock current and future memory as it is touched (`MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT`).
pub(crate) fn lock_memory() -> std::io::Result<()> {
    // SAFETY: mlockall takes only flags and touches no memory of ours; failure is reported via
    // errno, which we turn into an io::Error.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Keep glibc's mmap threshold fixed at its initial 128 KiB, so every big buffer (an env file
/// being read, an answer being written) is its own mapping, given back to the kernel when freed.
/// glibc otherwise raises the threshold after the first big free and serves later big buffers
/// from heap arenas that keep the memory; under mlockall it would stay resident and locked, and
/// a per-uid memory budget would bound what the agent uses but not what it keeps.
pub(crate) fn return_big_frees_to_kernel() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; it takes two integers and touches no
    // memory of ours. It is called once at start, before the runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Open `name`, one path component, beneath the directory `dir` without following a symlink or
/// magic link anywhere: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS`, or, on kernels without `openat2` (before 5.6), `openat` with
/// `O_NOFOLLOW`, which for a single component refuses exactly the same things.
pub(crate) fn open_beneath(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    flags: nix::fcntl::OFlag,
) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name);
    if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a single path component",
        ));
    }
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    let fd = match nix::fcntl::openat2(dir.as_raw_fd(), name, how) {
        Err(nix::errno::Errno::ENOSYS) => nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            flags,
            nix::sys::stat::Mode::empty(),
        ),
        other => other,
    }
    .map_err(std::io::Error::from)?;
    // SAFETY: the kernel just returned `fd` as a new descriptor owned by nobody else; it is
    // wrapped exactly once, here.
    Ok(unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd) })
}

/// The pidfd of the process at the other end of a connected Unix socket, as the kernel captured
/// it at `connect()` (`SO_PEERPIDFD`, Linux 6.5): it names that process, never a pid number
/// another process could take. `ENOPROTOOPT`: this kernel has no such option.
pub(crate) fn peer_pidfd(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are live locals of the sizes `len` states; the kernel writes at most
    // `len` bytes into `fd` and the new length into `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fd < 0 || len as usize != size_of::<libc::c_int>() {
        return Err(std::io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: the kernel just installed `fd` as a new descriptor of ours; wrapped once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The supplementary groups of the peer at `connect()` (`SO_PEERGROUPS`, Linux 4.13), as the
/// kernel recorded them with its credentials.
pub(crate) fn peer_groups(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536: one retry with the size the kernel asks for always suffices.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` owns `len` bytes of initialised gid_t the kernel may overwrite; it
        // writes at most `len` bytes and the length it used (or needs, with ERANGE) into `len`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() || count > 65536 {
            return Err(err);
        }
        groups.resize(count, 0);
    }
    Err(std::io::Error::other("SO_PEERGROUPS kept growing"))
}

/// The pid namespace of the process `pidfd` names (`PIDFD_GET_PID_NAMESPACE`, Linux 6.11), as a
/// namespace descriptor; `ESRCH` once that process has been reaped, `ENOTTY` on kernels without
/// the ioctl.
pub(crate) fn pidfd_pid_namespace(pidfd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: this ioctl takes no argument and touches no memory of ours; it returns a new
    // descriptor or -1 with errno.
    let fd = unsafe { libc::ioctl(pidfd.as_raw_fd(), libc::PIDFD_GET_PID_NAMESPACE, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just installed `fd` as a new descriptor of ours; wrapped once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The user namespace of the process `pidfd` names (`PIDFD_GET_USER_NAMESPACE`, Linux 6.11), as
/// a namespace descriptor; errors as [`pidfd_pid_namespace`].
pub(crate) fn pidfd_user_namespace(pidfd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: this ioctl takes no argument and touches no memory of ours; it returns a new
    // descriptor or -1 with errno.
    let fd = unsafe { libc::ioctl(pidfd.as_raw_fd(), libc::PIDFD_GET_USER_NAMESPACE, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just installed `fd` as a new descriptor of ours; wrapped once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process `pidfd` names still exists (`pidfd_send_signal` with signal 0, Linux
/// 5.1): `Ok(())` while it runs or is a zombie, `ESRCH` once it has been reaped.
pub(crate) fn pidfd_is_alive(pidfd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: signal 0 sends nothing; the siginfo pointer is null, which the syscall accepts,
    // and flags are 0. No memory of ours is touched.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3), for tests that need one of a child of theirs.
#[cfg(test)]
pub(crate) fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just installed `fd` as a new descriptor of ours; wrapped once, here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
