//! Process hardening done by the agent itself, so it holds even outside the systemd unit:
//! no core dumps (they would contain private keys), no ptrace by same-uid processes, a private
//! umask, and memory locked so keys and values are not swapped out.

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};

/// Apply everything; failures that weaken a defence are logged clearly, not fatal.
pub fn apply() {
    if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!(error = %e, "cannot set RLIMIT_CORE to 0");
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot clear PR_SET_DUMPABLE");
    }
    // Files and sockets the agent creates are private unless it widens them on purpose.
    umask(Mode::from_bits_truncate(0o077));
    crate::sys::return_big_frees_to_kernel();
    match crate::sys::lock_memory() {
        Ok(()) => tracing::info!("memory locked (mlockall): keys and values will not be swapped"),
        Err(e) => tracing::warn!(
            error = %e,
            "mlockall failed: secrets may be swapped to disk; run as root with CAP_IPC_LOCK or raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the unit)"
        ),
    }
}
