//! One connection: who is calling (from the kernel, once, at accept), then newline-delimited
//! requests under size, idle and rate limits, each answered by the handler, and each answer
//! written under the response cap, the caller's memory budget and the write timeout: a client
//! that asks and never reads holds at most one answer, on its own budget, for a bounded time.

use super::ServeContext;
use crate::authz::Scope;
use crate::config::Limits;
use crate::peer::Peer;
use crate::refusal::Refusal;
use crate::shutdown::Shutdown;
use nodeseal_client::protocol::{request_id, Request, Response};
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
async fn cut_off(
    ctx: &ServeContext,
    peer: &Peer,
    write_half: &mut OwnedWriteHalf,
    answer: Response,
) {
    let state = ctx.handler.state();
    state.counters.limited.fetch_add(1, Ordering::Relaxed);
    let limits = &state.config().limits;
    let error = answer.error.as_ref();
    if crate::log_budget::warning(error.map_or("", |e| e.code.as_str()), peer.uid, limits) {
        tracing::warn!(
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            outcome = error.map_or("", |e| e.code.as_str()),
            reason = error.map_or("", |e| e.message.as_str()),
            "limit broken; disconnecting"
        );
    }
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    // An error line holds no secret, so no wiping; the id (when the request had one) is echoed.
    let mut line = serde_json::to_vec(&answer).unwrap_or_default();
    line.push(b'\n');
    let _ = tokio::time::timeout(write_timeout, write_half.write_all(&line)).await;
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
                cut_off(ctx, &peer, &mut write_half, why.to_response()).await;
                return;
            }
            // The line was never read whole, so there is no id to echo.
            Line::TooLong => {
                let why = Refusal::RequestTooLong {
                    max: limits.max_request_bytes,
                };
                cut_off(ctx, &peer, &mut write_half, why.to_response()).await;
                return;
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // Over its rate the uid waits for its turn here, holding only its own connection slot.
        let turn = ctx
            .admission
            .request_turn(peer.principal(), &limits, Instant::now());
        let rate = super::admission::request_rate(&limits);
        let waited = tokio::select! {
            w = crate::rate::wait_for(turn, &rate) => w,
            _ = shutdown.stopped() => return,
        };
        if waited.is_err() {
            let mut answer = Refusal::RateLimited.to_response();
            answer.id = request_id(&bytes);
            cut_off(ctx, &peer, &mut write_half, answer).await;
            return;
        }
        let response = match serde_json::from_slice::<Request>(&bytes) {
            Ok(request) => ctx.handler.handle(&peer, &scope, request).await,
            Err(e) => {
                if crate::log_budget::warning("malformed_request", peer.uid, &limits) {
                    tracing::warn!(peer_uid = peer.uid, peer_pid = peer.pid, outcome = "bad_request", error = %e, "malformed request");
                }
                let mut answer = Refusal::Malformed(e.to_string()).to_response();
                answer.id = request_id(&bytes);
                answer
            }
        };
        if write_response(ctx, &peer, &mut write_half, response, &limits)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The line for `response`; the serialized line may hold a secret and is wiped once dropped.
fn serialize(response: &Response) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(serde_json::to_vec(response).unwrap_or_default());
    out.push(b'\n');
    out
}

/// What `response` will take serialized, at least (escapes only add): known before the work.
fn least_len(response: &Response) -> usize {
    let values = response.values.as_deref().unwrap_or_default();
    let names = response.names.as_deref().unwrap_or_default();
    64 + response.value.as_ref().map_or(0, |v| v.len())
        + values
            .iter()
            .map(|v| v.name.len() + v.value.len() + 24)
            .sum::<usize>()
        + names.iter().map(|n| n.len() + 3).sum::<usize>()
}

/// Answers at least this large are serialized off the async workers, so one caller's big answers
/// never hold up everyone else's small ones.
const OFFLOAD_BYTES: usize = 64 * 1024;

/// At most this many big answers are serialized at once (one per core): each holds its values
/// twice meanwhile, and more at once would only share the same cores.
fn serializers() -> &'static tokio::sync::Semaphore {
    static SERIALIZERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SERIALIZERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// Drop `what`, off the async workers when `big`: wiping megabytes of cleartext is work in
/// proportion to the answer, like serializing it.
fn discard<T: Send + 'static>(what: T, big: bool) {
    if big {
        tokio::task::spawn_blocking(move || drop(what));
    } else {
        drop(what);
    }
}

/// Write one answer. It is charged to the caller's memory budget from before it is serialized
/// until it is written; over the budget (with the answers the caller already has in flight) or
/// over `max_response_bytes`, the caller gets the error instead. Not taken within the write
/// timeout, the answer is abandoned with the connection (an error: the caller hangs up).
async fn write_response(
    ctx: &ServeContext,
    peer: &Peer,
    write_half: &mut OwnedWriteHalf,
    response: Response,
    limits: &Limits,
) -> std::io::Result<()> {
    let state = ctx.handler.state();
    let id = response.id.clone();
    let instead = |why: Refusal| {
        state.counters.limited.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            outcome = %why.code(),
            reason = why.to_string().as_str(),
            "answer withheld at a limit"
        );
        let mut r = why.to_response();
        r.id = id.clone();
        serialize(&r)
    };
    let max = limits.max_response_bytes;
    let budget = limits.memory_budget_per_uid;
    let least = least_len(&response);
    ctx.admission
        .charge_answer(peer.principal(), least, limits, Instant::now());
    let mut charge = None;
    let big = least >= OFFLOAD_BYTES;
    let out = if least > max {
        discard(response, big);
        instead(Refusal::ResponseTooLarge { len: least, max })
    } else {
        match state.memory.try_charge(peer.uid, least, budget, 0) {
            Err(over) => {
                discard(response, big);
                instead(Refusal::MemoryBudgetFull {
                    uid: peer.uid,
                    used: over.used,
                    len: least,
                    max: budget,
                })
            }
            Ok(c) => {
                charge = Some(c);
                let out = if !big {
                    serialize(&response)
                } else {
                    let _permit = serializers().acquire().await;
                    tokio::task::spawn_blocking(move || serialize(&response))
                        .await
                        .unwrap_or_default()
                };
                if out.len() > max {
                    let len = out.len();
                    discard(out, true);
                    charge = None;
                    instead(Refusal::ResponseTooLarge { len, max })
                } else if out.len() > least {
                    // Escapes made it larger than foreseen: the rest must fit too.
                    match state
                        .memory
                        .try_charge(peer.uid, out.len() - least, budget, 0)
                    {
                        Ok(extra) => {
                            charge = charge.map(|c| c.join(extra));
                            out
                        }
                        Err(over) => {
                            let len = out.len();
                            discard(out, true);
                            charge = None;
                            instead(Refusal::MemoryBudgetFull {
                                uid: peer.uid,
                                used: over.used,
                                len,
                                max: budget,
                            })
                        }
                    }
                } else {
                    out
                }
            }
        }
    };
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let written = tokio::time::timeout(write_timeout, write_half.write_all(&out)).await;
    let big = out.len() >= OFFLOAD_BYTES;
    discard((out, charge), big);
    match written {
        Ok(result) => result,
        Err(_) => {
            state.counters.limited.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                peer_uid = peer.uid,
                peer_pid = peer.pid,
                secs = limits.write_timeout_secs,
                "answer not read within the write timeout (limits.write_timeout_secs); disconnecting"
            );
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}
