//! Framing, response decoding and error classification, used by the [`exchange`](crate::exchange).

use crate::error::{Error, Result};
use crate::protocol::{ErrorCode, Response, PROTOCOL_VERSION};
use std::io;
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
    /// Length of `buf` before the last [`LineBuffer::prepare`], until the matching
    /// [`LineBuffer::commit`].
    filled: Option<usize>,
    limit: usize,
}

impl LineBuffer {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Zeroizing::new(Vec::new()),
            scanned: 0,
            filled: None,
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
        // Preparing twice without a commit must not keep the first room as data.
        if let Some(filled) = self.filled.take() {
            self.buf.truncate(filled);
        }
        let len = self.buf.len();
        let need = len + CHUNK;
        if need > self.buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(2 * self.buf.capacity())));
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
        }
        self.buf.resize(need, 0);
        self.filled = Some(len);
        &mut self.buf[len..]
    }

    /// Keep `n` bytes of what was read into the slice from [`LineBuffer::prepare`].
    pub(crate) fn commit(&mut self, n: usize) {
        if let Some(filled) = self.filled.take() {
            self.buf.truncate(filled + n);
        }
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
}
