//! Sockets: the accept loop (bounded connections), one task per connection reading
//! newline-delimited requests under size, idle and rate limits, and a graceful stop that lets
//! in-flight requests finish.

use crate::peer::Peer;
use crate::service::{Agent, Scope};
use nodeseal_client::protocol::{ErrorCode, Request, Response};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
use zeroize::Zeroizing;

/// Shared by every listener: the connection budget, the stop signal, and a sender each
/// connection holds so shutdown can wait until all are gone (mini-redis's pattern).
#[derive(Clone)]
pub struct ServeContext {
    /// The agent.
    pub agent: Arc<Agent>,
    /// One permit per open connection, over all sockets.
    pub connections: Arc<Semaphore>,
    /// Flips to `true` when the agent stops.
    pub shutdown: watch::Receiver<bool>,
    /// Dropped by each connection when it ends.
    pub alive: mpsc::Sender<()>,
    /// The agent's pid namespace, for telling host root from container root.
    pub own_pid_ns: Option<PathBuf>,
}

/// Accept connections on `listener` until shutdown.
pub async fn serve(ctx: ServeContext, listener: UnixListener, scope: Scope) {
    let mut shutdown = ctx.shutdown.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut shutdown) => return,
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
        let ctx = ctx.clone();
        let scope = scope.clone();
        match ctx.connections.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    handle_connection(&ctx, stream, scope).await;
                    drop(permit);
                });
            }
            Err(_) => {
                ctx.agent.counters.limited.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("connection limit reached; refusing a connection");
                tokio::spawn(refuse(stream, "too many connections; retry shortly"));
            }
        }
    }
}

/// Resolves once shutdown is signalled (or the sender is gone). Drops the watch guard before
/// returning so callers stay `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}

/// Answer `busy` and hang up gracefully: stop writing, then read (and drop) what the client
/// already sent for a moment, so its request write does not fail with a reset before it has read
/// our answer. Bounded in time and bytes.
async fn refuse(mut stream: UnixStream, message: &str) {
    let line = error_line(ErrorCode::Busy, message);
    let drain = async {
        stream.write_all(&line).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 64 * 1024 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(250), drain).await;
}

fn error_line(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Response::error(code, message)).unwrap_or_default();
    v.push(b'\n');
    v
}

enum Line {
    Request(Vec<u8>),
    Eof,
    TooLong,
    TimedOut { partial: bool },
    Stop,
    Failed,
}

async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    max: usize,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Line {
    let mut buf = Vec::new();
    let read = async {
        let mut limited = reader.take(max as u64 + 1);
        limited.read_until(b'\n', &mut buf).await
    };
    let r = tokio::select! {
        r = tokio::time::timeout(idle, read) => r,
        // Stop only between requests: a request already being read is not in flight yet.
        _ = stopped(shutdown) => return Line::Stop,
    };
    match r {
        Err(_) => Line::TimedOut {
            partial: !buf.is_empty(),
        },
        Ok(Err(_)) => Line::Failed,
        Ok(Ok(0)) => Line::Eof,
        Ok(Ok(_)) if buf.last() == Some(&b'\n') => {
            buf.pop();
            Line::Request(buf)
        }
        Ok(Ok(_)) if buf.len() > max => Line::TooLong,
        // EOF without a final newline: still one request (socat and printf forget it).
        Ok(Ok(_)) => Line::Request(buf),
    }
}

/// A client broke a limit: count it, log it, tell it why, and (by returning) disconnect it.
async fn cut_off(
    ctx: &ServeContext,
    peer: &Peer,
    write_half: &mut tokio::net::unix::OwnedWriteHalf,
    code: ErrorCode,
    message: &str,
) {
    ctx.agent.counters.limited.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        peer_uid = peer.uid,
        peer_pid = peer.pid,
        outcome = %code,
        reason = message,
        "limit broken; disconnecting"
    );
    let _ = write_half.write_all(&error_line(code, message)).await;
}

async fn handle_connection(ctx: &ServeContext, stream: UnixStream, scope: Scope) {
    let _alive = ctx.alive.clone();
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer::from_cred(&cred, ctx.own_pid_ns.as_ref()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; closing connection");
            return;
        }
    };
    let Some(_slot) = ctx.agent.admit_connection(peer.uid) else {
        ctx.agent.counters.limited.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            outcome = "busy",
            "per-uid connection limit reached; refusing a connection"
        );
        refuse(stream, "too many connections from this uid; retry shortly").await;
        return;
    };
    let (read_half, mut write_half) = stream.into_split();
    // Requests are small; a 1 KiB buffer (not tokio's 8 KiB) keeps idle connections cheap.
    let mut reader = BufReader::with_capacity(1024, read_half);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let limits = ctx.agent.config().limits.clone();
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let line = read_line(&mut reader, limits.max_request_bytes, idle, &mut shutdown).await;
        let bytes = match line {
            Line::Request(b) => b,
            Line::Eof | Line::Stop | Line::Failed => return,
            Line::TimedOut { partial: false } => return,
            Line::TimedOut { partial: true } => {
                let msg = format!(
                    "request line not completed within {} s",
                    limits.idle_timeout_secs
                );
                cut_off(ctx, &peer, &mut write_half, ErrorCode::BadRequest, &msg).await;
                return;
            }
            Line::TooLong => {
                let msg = format!(
                    "request line longer than {} bytes",
                    limits.max_request_bytes
                );
                cut_off(ctx, &peer, &mut write_half, ErrorCode::TooLarge, &msg).await;
                return;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !ctx.agent.take_rate_token(peer.uid) {
            let msg = "request rate limit exceeded; slow down and retry";
            cut_off(ctx, &peer, &mut write_half, ErrorCode::Busy, msg).await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => ctx.agent.handle(&peer, &scope, request).await,
            Err(e) => {
                tracing::warn!(peer_uid = peer.uid, peer_pid = peer.pid, outcome = "bad_request", error = %e, "malformed request");
                Response::error(ErrorCode::BadRequest, format!("malformed request: {e}"))
            }
        };
        // The serialized line may hold a secret: wipe it once written.
        let mut out = Zeroizing::new(serde_json::to_vec(&response).unwrap_or_default());
        out.push(b'\n');
        drop(response);
        if write_half.write_all(&out).await.is_err() {
            return;
        }
    }
}
