//! The agent's only `unsafe` code, two calls with no safe wrapper:
//! - adopting the listening socket systemd passes by socket activation: `sd_listen_fds` hands
//!   over a raw descriptor number, and turning a number into an owned socket is unchecked;
//! - `mlockall` with `MCL_ONFAULT`, which nix does not expose: without it `MCL_FUTURE` would
//!   fault in every reserved thread stack and multiply the agent's resident memory.
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
