//! The client's side of the conversation with the agent, as a state machine without I/O.
//!
//! Both clients drive the same [`Exchange`]: ask it what to do ([`Exchange::poll`]), do it on
//! their own socket, and tell it what happened ([`Exchange::handle`]). Everything that decides
//! (framing, line assembly and its size cap, id matching, retries and backoff, when a connection
//! is worth keeping, and the wording of errors) lives here once, so the blocking and the tokio
//! client cannot drift apart, and it can be tested without sockets, threads or sleeps: the
//! clock is an argument.

use crate::config::{Config, BACKOFF_MAX, BACKOFF_START};
use crate::error::{Error, Result};
use crate::protocol::{Operation, Request, Response};
use crate::wire::{self, LineBuffer};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the driver must do next.
pub(crate) enum Action<'a> {
    /// Drop any stream still held, connect to this socket; answer with
    /// [`Event::Connected`] or [`Event::ConnectFailed`].
    Connect(&'a Path),
    /// Write (a prefix of) these bytes; answer with [`Event::Wrote`], [`Event::WriteFailed`] or
    /// [`Event::TimedOut`].
    Write(&'a [u8]),
    /// Read into this buffer; answer with [`Event::Read`] (0 for end of stream),
    /// [`Event::ReadFailed`] or [`Event::TimedOut`]. The buffer is the exchange's own zeroizing
    /// one, so response bytes never pass through a driver's buffer.
    Read(&'a mut [u8]),
    /// Wait this long, then answer with [`Event::Slept`].
    Sleep(Duration),
    /// Drop the stream; answer with [`Event::Closed`].
    Close,
    /// The connection [`Exchange::connect`] asked for is open; nothing was sent.
    Ready,
    /// The request succeeded.
    Done(Response),
    /// The request failed for good.
    Fail(Error),
}

/// What happened when the driver performed the last [`Action`].
#[derive(Debug)]
pub(crate) enum Event {
    Connected,
    ConnectFailed(io::Error),
    Wrote(usize),
    WriteFailed(io::Error),
    Read(usize),
    ReadFailed(io::Error),
    /// The driver's read or write timeout expired.
    TimedOut,
    Slept,
    Closed,
}

/// Wording of the errors the exchange makes up itself (the others come from the OS).
const EOF_BEFORE_ANSWER: &str = "the agent closed the connection without answering";
const EOF_MID_ANSWER: &str = "the agent closed the connection in the middle of a response";
const READ_TIMED_OUT: &str = "the agent did not answer in time";
const WRITE_TIMED_OUT: &str = "the agent did not take the request in time";
const WRITE_ZERO: &str = "the agent stopped taking the request";

/// One client's connection state and its current request.
pub(crate) struct Exchange {
    cfg: Config,
    /// Response bytes received and not yet consumed; replaced (and so wiped) with every
    /// connection.
    buf: LineBuffer,
    conn: Conn,
    next_id: u64,
    attempt: Attempt,
    step: Step,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Conn {
    Closed,
    /// `used`: a request has completed on this connection, so a failure may just mean the agent
    /// closed it while idle.
    Open {
        used: bool,
    },
}

/// The request in flight, across reconnects and retries.
struct Attempt {
    /// The request line; empty when only connecting.
    line: Vec<u8>,
    id: u64,
    backoff: Backoff,
    /// Whether the one free reconnect after a stale connection has been spent.
    reconnected: bool,
    /// Whether the connection this attempt is using had served a request before.
    was_used: bool,
}

enum Step {
    Idle,
    Connect,
    Write {
        written: usize,
    },
    /// `write_failed`: the write failed, but an answer (`busy`) may still be waiting; if none
    /// comes, this is the error to report.
    Read {
        write_failed: Option<io::Error>,
    },
    Sleep(Duration),
    Close(Box<Step>),
    Ready,
    Done(Response),
    Fail(Error),
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Idle => "idle",
            Step::Connect => "connecting",
            Step::Write { .. } => "writing",
            Step::Read { .. } => "reading",
            Step::Sleep(_) => "sleeping",
            Step::Close(_) => "closing",
            Step::Ready | Step::Done(_) | Step::Fail(_) => "finished",
        }
    }

    /// Whether the driver has collected (or is about to collect) the outcome, so the
    /// connection is in a known state.
    fn is_settled(&self) -> bool {
        matches!(
            self,
            Step::Idle | Step::Ready | Step::Done(_) | Step::Fail(_)
        )
    }
}

impl Exchange {
    /// A client's exchange, starting with a connection (retried within the budget).
    pub(crate) fn connect(cfg: Config, now: Instant) -> Self {
        let attempt = Attempt::new(Vec::new(), 0, cfg.retry, now);
        Self {
            buf: LineBuffer::new(cfg.max_response_bytes),
            cfg,
            conn: Conn::Closed,
            next_id: 1,
            attempt,
            step: Step::Connect,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    /// Start sending `op`; the retry budget starts at `now`.
    pub(crate) fn request(&mut self, op: Operation, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Request::new(op);
        req.id = Some(id.into());
        // A previous request that never finished (its future was dropped) may have left half a
        // request or half an answer on the stream: never reuse that connection.
        let abandoned = !self.step.is_settled() && self.conn != Conn::Closed;
        let line = match wire::encode(&req) {
            Ok(line) => line,
            Err(e) => {
                self.step = self.close_then_if(abandoned, Step::Fail(e));
                return;
            }
        };
        self.attempt = Attempt::new(line, id, self.cfg.retry, now);
        self.step = if abandoned {
            Step::Close(Box::new(Step::Connect))
        } else {
            match self.conn {
                Conn::Open { used } => {
                    self.attempt.was_used = used;
                    Step::Write { written: 0 }
                }
                Conn::Closed => Step::Connect,
            }
        };
    }

    /// What a driver's run after [`Exchange::request`] produced: always a response, since
    /// `Ready` only ends a connect.
    pub(crate) fn response(outcome: Option<Response>) -> Result<Response> {
        outcome.ok_or_else(|| Error::Protocol("the exchange ended without a response".into()))
    }

    /// The next action. Call once per [`Exchange::handle`]; after `Ready`, `Done` or `Fail`,
    /// start again with [`Exchange::request`].
    pub(crate) fn poll(&mut self) -> Action<'_> {
        if self.step.is_settled() {
            return match std::mem::replace(&mut self.step, Step::Idle) {
                Step::Ready => Action::Ready,
                Step::Done(resp) => Action::Done(resp),
                Step::Fail(e) => Action::Fail(e),
                _ => Action::Fail(self.misuse("polled with no request in progress")),
            };
        }
        match &self.step {
            Step::Connect => Action::Connect(&self.cfg.socket),
            Step::Write { written } => Action::Write(&self.attempt.line[*written..]),
            Step::Read { .. } => Action::Read(self.buf.prepare()),
            Step::Sleep(d) => Action::Sleep(*d),
            Step::Close(_) => Action::Close,
            Step::Idle | Step::Ready | Step::Done(_) | Step::Fail(_) => {
                unreachable!("settled steps are handled above")
            }
        }
    }

    /// Advance on what the driver saw; `now` is the time it saw it.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) {
        let step = std::mem::replace(&mut self.step, Step::Idle);
        self.step = match (step, event) {
            (Step::Connect, Event::Connected) => self.connected(),
            (Step::Connect, Event::ConnectFailed(e)) => self.connect_failed(e, now),
            (Step::Connect, Event::TimedOut) => {
                self.connect_failed(io::ErrorKind::TimedOut.into(), now)
            }
            (Step::Write { written }, Event::Wrote(n)) if n > 0 => {
                let written = written + n;
                if written < self.attempt.line.len() {
                    Step::Write { written }
                } else {
                    self.next_line(None, now)
                }
            }
            (Step::Write { .. }, Event::Wrote(_)) => self.next_line(
                Some(io::Error::new(io::ErrorKind::WriteZero, WRITE_ZERO)),
                now,
            ),
            (Step::Write { .. }, Event::WriteFailed(e)) => self.next_line(Some(e), now),
            (Step::Write { .. }, Event::TimedOut) => {
                let e = io::Error::new(io::ErrorKind::TimedOut, WRITE_TIMED_OUT);
                self.next_line(Some(e), now)
            }
            (Step::Read { write_failed }, Event::Read(0)) => {
                self.buf.commit(0);
                let e = write_failed.unwrap_or_else(|| {
                    let what = if self.buf.has_partial() {
                        EOF_MID_ANSWER
                    } else {
                        EOF_BEFORE_ANSWER
                    };
                    io::Error::new(io::ErrorKind::UnexpectedEof, what)
                });
                self.io_failed(e, now)
            }
            (Step::Read { write_failed }, Event::Read(n)) => {
                self.buf.commit(n);
                self.next_line(write_failed, now)
            }
            (Step::Read { write_failed }, Event::ReadFailed(e)) => {
                self.buf.commit(0);
                self.io_failed(write_failed.unwrap_or(e), now)
            }
            (Step::Read { write_failed }, Event::TimedOut) => {
                self.buf.commit(0);
                let e = write_failed
                    .unwrap_or_else(|| io::Error::new(io::ErrorKind::TimedOut, READ_TIMED_OUT));
                self.io_failed(e, now)
            }
            (Step::Sleep(_), Event::Slept) => Step::Connect,
            (Step::Close(next), Event::Closed) => {
                self.conn = Conn::Closed;
                self.buf = LineBuffer::new(self.cfg.max_response_bytes);
                *next
            }
            (step, event) => {
                let e = self.misuse(&format!("got {event:?} while {}", step.name()));
                self.close_then(Step::Fail(e))
            }
        };
    }

    fn connected(&mut self) -> Step {
        self.conn = Conn::Open { used: false };
        self.buf = LineBuffer::new(self.cfg.max_response_bytes);
        self.attempt.was_used = false;
        if self.attempt.line.is_empty() {
            Step::Ready
        } else {
            Step::Write { written: 0 }
        }
    }

    fn connect_failed(&mut self, e: io::Error, now: Instant) -> Step {
        let delay = if wire::connect_is_transient(&e) {
            self.attempt.backoff.next_delay(now)
        } else {
            None
        };
        match delay {
            Some(d) => Step::Sleep(d),
            None => Step::Fail(Error::Unreachable {
                path: self.cfg.socket.clone(),
                source: e,
            }),
        }
    }

    /// Take the answer if a whole line is buffered, else keep reading.
    fn next_line(&mut self, write_failed: Option<io::Error>, now: Instant) -> Step {
        match self.buf.take_line() {
            Err(e) => self.close_then(Step::Fail(e)),
            Ok(Some(line)) => self.answered(&line, now),
            Ok(None) => Step::Read { write_failed },
        }
    }

    fn answered(&mut self, line: &[u8], now: Instant) -> Step {
        match wire::decode(line, self.attempt.id) {
            Ok(resp) => {
                self.conn = Conn::Open { used: true };
                Step::Done(resp)
            }
            // The agent hangs up after a busy answer (connection or rate limit), so the retry
            // needs a new connection.
            Err(e) if wire::response_is_busy(&e) => match self.attempt.backoff.next_delay(now) {
                Some(d) => self.close_then(Step::Sleep(d)),
                None => self.close_then(Step::Fail(e)),
            },
            // A well-formed refusal leaves the stream at a line boundary: keep it.
            Err(e @ Error::Agent { .. }) => {
                self.conn = Conn::Open { used: true };
                Step::Fail(e)
            }
            // The stream may be mid-line or out of step; never reuse it.
            Err(e) => self.close_then(Step::Fail(e)),
        }
    }

    /// Every operation is idempotent, so a connection the agent dropped (it was restarting, or
    /// it refused us at a limit and hung up) is retried on a new one within the retry budget;
    /// a connection that went stale while idle is reopened once at once.
    fn io_failed(&mut self, e: io::Error, now: Instant) -> Step {
        let next = if !wire::is_stale_connection(&e) {
            Step::Fail(self.io_error(e))
        } else if self.attempt.was_used && !self.attempt.reconnected {
            self.attempt.reconnected = true;
            Step::Connect
        } else {
            match self.attempt.backoff.next_delay(now) {
                Some(d) => Step::Sleep(d),
                None => Step::Fail(self.io_error(e)),
            }
        };
        self.close_then(next)
    }

    fn io_error(&self, source: io::Error) -> Error {
        Error::Io {
            path: self.cfg.socket.clone(),
            source,
        }
    }

    /// A driver that does not follow the poll/handle protocol is a bug in this crate; fail the
    /// request instead of guessing at the stream's state.
    fn misuse(&self, what: &str) -> Error {
        debug_assert!(false, "exchange misuse: {what}");
        self.io_error(io::Error::other(format!("internal client error: {what}")))
    }

    fn close_then(&self, next: Step) -> Step {
        self.close_then_if(self.conn != Conn::Closed, next)
    }

    fn close_then_if(&self, close: bool, next: Step) -> Step {
        if close {
            Step::Close(Box::new(next))
        } else {
            next
        }
    }
}

impl Attempt {
    fn new(line: Vec<u8>, id: u64, budget: Duration, now: Instant) -> Self {
        Self {
            line,
            id,
            backoff: Backoff::new(budget, now),
            reconnected: false,
            was_used: false,
        }
    }
}

/// Exponential backoff within a total time budget.
struct Backoff {
    deadline: Instant,
    next: Duration,
}

impl Backoff {
    fn new(budget: Duration, now: Instant) -> Self {
        Self {
            deadline: now.checked_add(budget).unwrap_or(now),
            next: BACKOFF_START,
        }
    }

    /// The next pause, or `None` once the budget is spent.
    fn next_delay(&mut self, now: Instant) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(now)?;
        if left.is_zero() {
            return None;
        }
        let delay = self.next.min(left);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(delay)
    }
}

#[cfg(test)]
mod tests;
