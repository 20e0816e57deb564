//! The agent's only `unsafe` code, four calls with no safe wrapper:
//! - adopting the listening socket systemd passes by socket activation: `sd_listen_fds` hands
//!   over a raw descriptor number, and turning a number into an owned socket is unchecked;
//! - `mlockall` with `MCL_ONFAULT`, which nix does not expose: without it `MCL_FUTURE` would
//!   fault in every reserved thread stack and multiply the agent's resident memory;
//! - taking ownership of the descriptor `openat2`/`openat` return (nix hands back a raw number),
//!   in [`open_beneath`], the one way the agent opens anything inside a task tree;
//! - `mallopt(M_MMAP_THRESHOLD)` in [`return_big_frees_to_kernel`].
//!
//! Everything else goes through safe wrappers (tokio, nix).
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, RawFd};
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
) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd, OwnedFd};
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
