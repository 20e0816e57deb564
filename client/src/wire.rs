//! Framing and response decoding shared by the blocking and async clients.

use crate::config::{BACKOFF_MAX, BACKOFF_START};
use crate::error::{Error, Result};
use crate::protocol::{ErrorCode, Response, PROTOCOL_VERSION};
use crate::Secret;
use std::io;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Bytes read from the socket per read call.
const CHUNK: usize = 64 * 1024;

/// Accumulates response bytes until a newline. Every buffer that ever holds response bytes is
/// zeroizing, including the ones left behind when it grows (a plain `Vec` would leave copies of
/// cleartext in freed memory on reallocation).
pub(crate) struct LineBuffer {
    buf: Zeroizing<Vec<u8>>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    /// Length of `buf` before the last [`LineBuffer::prepare`].
    filled: usize,
    limit: usize,
}

impl LineBuffer {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::new()),
            scanned: 0,
            filled: 0,
            limit,
        }
    }

    /// The next complete line (without its newline), if one is buffered.
    pub(crate) fn take_line(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let rest = &self.buf[self.scanned..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                if end > self.limit {
                    return Err(Error::ResponseTooLarge { limit: self.limit });
                }
                let mut line = Zeroizing::new(Vec::with_capacity(end));
                line.extend_from_slice(&self.buf[..end]);
                // `drain` moves the tail down in place; the zeroizing Vec wipes its whole
                // capacity on drop, so nothing stale survives.
                self.buf.drain(..=end);
                self.scanned = 0;
                Ok(Some(line))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.limit {
                    return Err(Error::ResponseTooLarge { limit: self.limit });
                }
                Ok(None)
            }
        }
    }

    /// Room to read into; follow with [`LineBuffer::commit`].
    pub(crate) fn prepare(&mut self) -> &mut [u8] {
        let len = self.buf.len();
        let need = len + CHUNK;
        if need > self.buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(2 * self.buf.capacity())));
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
        }
        self.buf.resize(need, 0);
        self.filled = len;
        &mut self.buf[len..]
    }

    /// Keep `n` bytes of what was read into the slice from [`LineBuffer::prepare`].
    pub(crate) fn commit(&mut self, n: usize) {
        self.buf.truncate(self.filled + n);
    }

    /// Whether bytes of an incomplete line are buffered.
    pub(crate) fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// One request line, newline included.
pub(crate) fn encode(req: &crate::protocol::Request) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(req)
        .map_err(|e| Error::Protocol(format!("cannot encode the request: {}", e.classify_str())))?;
    line.push(b'\n');
    Ok(line)
}

trait Classify {
    fn classify_str(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "unexpected JSON structure",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

/// Parse and check one response line; an error response becomes [`Error::Agent`].
pub(crate) fn decode(line: &[u8], expected_id: u64) -> Result<Response> {
    // serde's messages can quote the input (which may be a value), so only the category and
    // position are kept.
    let resp: Response = serde_json::from_slice(line).map_err(|e| {
        Error::Protocol(format!(
            "{} at column {} of the response",
            e.classify_str(),
            e.column()
        ))
    })?;
    if resp.v != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "agent answered with protocol version {}, this client speaks {PROTOCOL_VERSION}",
            resp.v
        )));
    }
    if let Some(id) = &resp.id {
        if id.as_u64() != Some(expected_id) {
            return Err(Error::Protocol(format!(
                "response id {id} does not match request id {expected_id}"
            )));
        }
    }
    if !resp.ok {
        return match resp.error {
            Some(body) => Err(Error::Agent {
                code: body.code,
                message: body.message,
            }),
            None => Err(Error::Protocol(
                "error response without an `error` object".into(),
            )),
        };
    }
    Ok(resp)
}

fn missing(field: &str, op: &str) -> Error {
    Error::Protocol(format!("`{op}` response without `{field}`"))
}

pub(crate) fn take_value(resp: Response, op: &str) -> Result<Secret> {
    resp.value
        .map(Secret::from)
        .ok_or_else(|| missing("value", op))
}

pub(crate) fn take_values(resp: Response) -> Result<Vec<(String, Secret)>> {
    let values = resp.values.ok_or_else(|| missing("values", "env"))?;
    Ok(values
        .into_iter()
        .map(|nv| (nv.name, Secret::from(nv.value)))
        .collect())
}

pub(crate) fn take_names(resp: Response) -> Result<Vec<String>> {
    resp.names.ok_or_else(|| missing("names", "list"))
}

pub(crate) fn take_info(resp: Response, op: &str) -> Result<serde_json::Value> {
    resp.info.ok_or_else(|| missing("info", op))
}

/// Whether a failed connect may succeed later: the agent is not there yet, or is restarting,
/// or its backlog is full.
pub(crate) fn connect_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock
    )
}

/// Whether an answer should be retried with backoff.
pub(crate) fn response_is_busy(e: &Error) -> bool {
    matches!(
        e,
        Error::Agent {
            code: ErrorCode::Busy,
            ..
        }
    )
}

/// Whether an I/O failure on a reused connection means the agent closed it (idle timeout,
/// restart), so one fresh connection is worth a try.
pub(crate) fn is_stale_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// After an I/O failure mid-request, how long to wait before retrying on a new connection, or
/// `None` to give up. Every operation is idempotent, so a connection the agent dropped (it was
/// restarting, or it refused us at a limit and hung up) is retried within the retry budget; a
/// connection that went stale while idle is reopened once at once.
pub(crate) fn retry_after_io(
    e: &io::Error,
    was_used: bool,
    reconnected: &mut bool,
    backoff: &mut Backoff,
) -> Option<std::time::Duration> {
    if !is_stale_connection(e) {
        return None;
    }
    if was_used && !*reconnected {
        *reconnected = true;
        return Some(std::time::Duration::ZERO);
    }
    backoff.next_delay()
}

/// Exponential backoff within a total time budget.
pub(crate) struct Backoff {
    deadline: Instant,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(budget: Duration) -> Self {
        let now = Instant::now();
        Self {
            deadline: now.checked_add(budget).unwrap_or(now),
            next: BACKOFF_START,
        }
    }

    /// The next pause, or `None` once the budget is spent.
    pub(crate) fn next_delay(&mut self) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let delay = self.next.min(left);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lb: &mut LineBuffer, bytes: &[u8]) {
        let room = lb.prepare();
        room[..bytes.len()].copy_from_slice(bytes);
        lb.commit(bytes.len());
    }

    #[test]
    fn lines_split_across_reads_and_pipelined() {
        let mut lb = LineBuffer::new(100);
        feed(&mut lb, b"{\"a\":");
        assert!(lb.take_line().unwrap().is_none());
        assert!(lb.has_partial());
        feed(&mut lb, b"1}\n{\"b\":2}\n{\"c\"");
        assert_eq!(&lb.take_line().unwrap().unwrap()[..], b"{\"a\":1}");
        assert_eq!(&lb.take_line().unwrap().unwrap()[..], b"{\"b\":2}");
        assert!(lb.take_line().unwrap().is_none());
        feed(&mut lb, b":3}\n");
        assert_eq!(&lb.take_line().unwrap().unwrap()[..], b"{\"c\":3}");
        assert!(!lb.has_partial());
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mut lb = LineBuffer::new(10);
        feed(&mut lb, b"0123456789");
        assert!(lb.take_line().unwrap().is_none());
        feed(&mut lb, b"x");
        assert!(matches!(
            lb.take_line(),
            Err(Error::ResponseTooLarge { limit: 10 })
        ));
        let mut lb = LineBuffer::new(10);
        feed(&mut lb, b"0123456789abc\n");
        assert!(lb.take_line().is_err());
        let mut lb = LineBuffer::new(10);
        feed(&mut lb, b"0123456789\n");
        assert_eq!(lb.take_line().unwrap().unwrap().len(), 10);
    }

    #[test]
    fn growth_keeps_contents() {
        let mut lb = LineBuffer::new(usize::MAX);
        let big = vec![b'x'; 3 * CHUNK / 2];
        feed(&mut lb, &big[..CHUNK]);
        feed(&mut lb, &big[CHUNK..]);
        feed(&mut lb, b"\n");
        assert_eq!(&lb.take_line().unwrap().unwrap()[..], &big[..]);
    }

    #[test]
    fn decode_maps_errors_and_hides_input() {
        let e = decode(
            br#"{"v":1,"ok":false,"error":{"code":"not_found","message":"no FOO","retryable":false}}"#,
            1,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Agent {
                code: ErrorCode::NotFound,
                ..
            }
        ));
        // A value where a list belongs: serde would quote it, we must not.
        let e = decode(br#"{"v":1,"ok":true,"names":"hunter2"}"#, 1).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = decode(br#"{"v":1,"ok":true,"value":"hunter2""#, 1).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(matches!(
            decode(br#"{"v":2,"ok":true}"#, 1),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode(br#"{"v":1,"id":5,"ok":true}"#, 1),
            Err(Error::Protocol(_))
        ));
        assert!(decode(br#"{"v":1,"id":5,"ok":true}"#, 5).is_ok());
        assert!(matches!(
            decode(br#"{"v":1,"ok":false}"#, 1),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn backoff_ends_with_the_budget() {
        let mut b = Backoff::new(Duration::ZERO);
        assert_eq!(b.next_delay(), None);
        let mut b = Backoff::new(Duration::from_secs(3600));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay().unwrap()).collect();
        assert_eq!(delays[0], BACKOFF_START);
        assert_eq!(delays[1], BACKOFF_START * 2);
        assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
    }
}
