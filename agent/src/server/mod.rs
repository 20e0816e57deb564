//! Sockets: the host socket and the per-task sockets ([`task_sockets`]) share one accept loop
//! here; [`admission`] decides who may connect and send, [`connection`] reads requests under
//! size, idle and rate limits and hands each to the handler, [`listener`] binds or adopts
//! the host socket; `crate::shutdown` stops it all gracefully.

pub(crate) mod admission;
pub(crate) mod connection;
pub(crate) mod listener;
pub(crate) mod task_sockets;

use crate::authz::Scope;
use crate::handler::Handler;
use crate::peer::Identify;
use crate::refusal::Refusal;
use crate::shutdown::Shutdown;
use admission::Admission;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// Shared by every listener and connection.
#[derive(Clone)]
pub(crate) struct ServeContext {
    pub(crate) handler: Arc<Handler>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) shutdown: Shutdown,
    /// How callers are identified (probed once at start), for telling host root from the rest.
    pub(crate) identify: Identify,
}

/// Accept connections on `listener` until shutdown.
pub(crate) async fn serve(ctx: ServeContext, listener: UnixListener, scope: Scope) {
    let mut shutdown = ctx.shutdown.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.stopped() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving the others.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let state = ctx.handler.state();
        let limits = &state.config().limits;
        // A connect flood is refused as cheaply as it can be: any uid but 0 is one principal
        // wherever it runs, so one at its connection limit is turned away on SO_PEERCRED alone,
        // before the pidfd and namespace reads that identifying a caller costs.
        if let Ok(cred) = stream.peer_cred() {
            let principal = admission::Principal {
                uid: cred.uid(),
                host_root: false,
            };
            if principal.uid != 0 && ctx.admission.uid_at_limit(principal, limits) {
                let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
                refuse_at_uid_limit(&ctx, stream, principal.uid, pid);
                continue;
            }
        }
        // Who it is first, then its own allowance, then the shared budget: a uid over its
        // limit is refused without ever holding one of the slots every uid shares.
        let peer = match ctx.identify.peer(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; closing connection");
                continue;
            }
        };
        let Some(slot) = ctx.admission.uid_slot(peer.principal(), limits) else {
            refuse_at_uid_limit(&ctx, stream, peer.uid, peer.pid);
            continue;
        };
        // Host root is bounded by its own allowance alone: anyone able to take many uids (root
        // in a container can) could otherwise fill the shared budget and lock it out of
        // `status`, `revoke` and `restore`.
        let permit = if peer.host_root {
            None
        } else {
            let Some(permit) = ctx.admission.connection() else {
                state.counters.limited.fetch_add(1, Ordering::Relaxed);
                if crate::log_budget::warning("connection_limit", peer.uid, limits) {
                    tracing::warn!(
                        peer_uid = peer.uid,
                        "connection limit reached; refusing a connection"
                    );
                }
                drop(slot);
                refuse(&ctx, stream, peer.uid, Refusal::TooManyConnections);
                continue;
            };
            Some(permit)
        };
        let ctx = ctx.clone();
        let scope = scope.clone();
        tokio::spawn(async move {
            connection::handle(&ctx, stream, peer, scope).await;
            drop((slot, permit));
        });
    }
}

/// Count, log (within the uid's log budget) and refuse a connection of a uid at its limit.
fn refuse_at_uid_limit(ctx: &ServeContext, stream: tokio::net::UnixStream, uid: u32, pid: u32) {
    let state = ctx.handler.state();
    state.counters.limited.fetch_add(1, Ordering::Relaxed);
    if crate::log_budget::warning("uid_connection_limit", uid, &state.config().limits) {
        tracing::warn!(
            peer_uid = uid,
            peer_pid = pid,
            outcome = "busy",
            "per-uid connection limit reached; refusing a connection"
        );
    }
    refuse(ctx, stream, uid, Refusal::TooManyConnectionsForUid);
}

/// Answer a refused connection without letting refusals hold what every uid shares: a few per
/// uid (and a few in all) are answered gracefully, waiting briefly for the client to read the
/// answer; past that the answer is written only if the socket takes it at once, and the
/// connection is closed on the spot, so a connect flood costs no fds or tasks beyond the moment.
fn refuse(ctx: &ServeContext, stream: tokio::net::UnixStream, uid: u32, why: Refusal) {
    match ctx.admission.refusal_slot(uid) {
        Some(slot) => {
            tokio::spawn(async move {
                connection::refuse(stream, why).await;
                drop(slot);
            });
        }
        None => {
            let _ = stream.try_write(&why.to_line());
        }
    }
}
