//! One connection: who is calling (from the kernel, once, at accept), then newline-delimited
//! requests under size, idle and rate limits, each answered by the handler.

use super::ServeContext;
use crate::authz::Scope;
use crate::peer::Peer;
use crate::refusal::Refusal;
use crate::shutdown::Shutdown;
use nodeseal_client::protocol::{Request, Response};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

/// Answer `busy` and hang up gracefully: stop writing, then read (and drop) what the client
/// already sent for a moment, so its request write does not fail with a reset before it has read
/// our answer. Bounded in time and bytes.
pub(crate) async fn refuse(mut stream: UnixStream, why: Refusal) {
    let line = why.to_line();
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

enum Line {
    Request(Vec<u8>),
    Eof,
    TooLong,
    TimedOut { partial: bool },
    Stop,
    Failed,
}

async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    max: usize,
    idle: Duration,
    shutdown: &mut Shutdown,
) -> Line {
    let mut buf = Vec::new();
    let read = async {
        let mut limited = reader.take(max as u64 + 1);
        limited.read_until(b'\n', &mut buf).await
    };
    let r = tokio::select! {
        r = tokio::time::timeout(idle, read) => r,
        // Stop only between requests: a request already being read is not in flight yet.
        _ = shutdown.stopped() => return Line::Stop,
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
async fn cut_off(ctx: &ServeContext, peer: &Peer, write_half: &mut OwnedWriteHalf, why: Refusal) {
    let state = ctx.handler.state();
    state.counters.limited.fetch_add(1, Ordering::Relaxed);
    let limits = &state.config().limits;
    if crate::log_budget::warning(why.code().as_str(), peer.uid, limits) {
        tracing::warn!(
        peer_uid = peer.uid,
        peer_pid = peer.pid,
        outcome = %why.code(),
        reason = why.to_string().as_str(),
        "limit broken; disconnecting"
        );
    }
    let _ = write_half.write_all(&why.to_line()).await;
}

/// Serve one admitted connection until it ends, breaks a limit, or the agent stops.
pub(crate) async fn handle(ctx: &ServeContext, stream: UnixStream, peer: Peer, scope: Scope) {
    let state = ctx.handler.state();
    let (read_half, mut write_half) = stream.into_split();
    // Requests are small; a 1 KiB buffer (not tokio's 8 KiB) keeps idle connections cheap.
    let mut reader = BufReader::with_capacity(1024, read_half);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let limits = state.config().limits.clone();
        let idle = Duration::from_secs(limits.idle_timeout_secs);
        let line = read_line(&mut reader, limits.max_request_bytes, idle, &mut shutdown).await;
        let bytes = match line {
            Line::Request(b) => b,
            Line::Eof | Line::Stop | Line::Failed => return,
            Line::TimedOut { partial: false } => return,
            Line::TimedOut { partial: true } => {
                let why = Refusal::RequestIncomplete {
                    secs: limits.idle_timeout_secs,
                };
                cut_off(ctx, &peer, &mut write_half, why).await;
                return;
            }
            Line::TooLong => {
                let why = Refusal::RequestTooLong {
                    max: limits.max_request_bytes,
                };
                cut_off(ctx, &peer, &mut write_half, why).await;
                return;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !ctx
            .admission
            .take_rate_token(peer.uid, &limits, Instant::now())
        {
            cut_off(ctx, &peer, &mut write_half, Refusal::RateLimited).await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => ctx.handler.handle(&peer, &scope, request).await,
            Err(e) => {
                if crate::log_budget::warning("malformed_request", peer.uid, &limits) {
                    tracing::warn!(peer_uid = peer.uid, peer_pid = peer.pid, outcome = "bad_request", error = %e, "malformed request");
                }
                Refusal::Malformed(e.to_string()).to_response()
            }
        };
        if write_response(&mut write_half, response).await.is_err() {
            return;
        }
    }
}

async fn write_response(
    write_half: &mut OwnedWriteHalf,
    response: Response,
) -> std::io::Result<()> {
    // The serialized line may hold a secret: wipe it once written.
    let mut out = Zeroizing::new(serde_json::to_vec(&response).unwrap_or_default());
    out.push(b'\n');
    drop(response);
    write_half.write_all(&out).await
}
