//! The exchange driven by hand: no sockets, no threads, no sleeps; the clock only moves when a
//! test says so.

use super::*;
use crate::protocol::ErrorCode;

const SOCK: &str = "/test/agent.sock";
const OK_V: &[u8] = b"{\"v\":1,\"id\":ID,\"ok\":true,\"value\":\"v\"}\n";
const BUSY: &[u8] = b"{\"v\":1,\"ok\":false,\"error\":{\"code\":\"busy\",\"message\":\"too many connections\",\"retryable\":true}}\n";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A hand-driven exchange with a fake clock.
struct T {
    ex: Exchange,
    now: Instant,
    start: Instant,
}

fn describe(a: &Action<'_>) -> String {
    match a {
        Action::Connect(p) => format!("Connect({})", p.display()),
        Action::Write(b) => format!("Write({:?})", String::from_utf8_lossy(b)),
        Action::Read(_) => "Read".into(),
        Action::Sleep(d) => format!("Sleep({d:?})"),
        Action::Close => "Close".into(),
        Action::Ready => "Ready".into(),
        Action::Done(r) => format!("Done({r:?})"),
        Action::Fail(e) => format!("Fail({e:?})"),
    }
}

impl T {
    /// A client that has connected, with this retry budget and response cap.
    fn new(retry: Duration, max_response_bytes: usize) -> Self {
        let cfg = Config {
            socket: SOCK.into(),
            task: None,
            retry,
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_response_bytes,
        };
        let start = Instant::now();
        let mut t = Self {
            ex: Exchange::connect(cfg, start),
            now: start,
            start,
        };
        t.connect();
        t.ready();
        t
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn feed(&mut self, event: Event) {
        self.ex.handle(event, self.now);
    }

    fn request(&mut self) {
        self.ex.request(Operation::Health, self.now);
    }

    fn connect(&mut self) {
        match self.ex.poll() {
            Action::Connect(p) => assert_eq!(p, Path::new(SOCK)),
            a => panic!("expected Connect, got {}", describe(&a)),
        }
        self.feed(Event::Connected);
    }

    fn connect_fails(&mut self, kind: io::ErrorKind) {
        match self.ex.poll() {
            Action::Connect(_) => {}
            a => panic!("expected Connect, got {}", describe(&a)),
        }
        self.feed(Event::ConnectFailed(kind.into()));
    }

    /// Accept the whole pending write; returns the bytes.
    fn write(&mut self) -> Vec<u8> {
        let bytes = match self.ex.poll() {
            Action::Write(b) => b.to_vec(),
            a => panic!("expected Write, got {}", describe(&a)),
        };
        self.feed(Event::Wrote(bytes.len()));
        bytes
    }

    fn write_fails(&mut self, kind: io::ErrorKind) {
        match self.ex.poll() {
            Action::Write(_) => {}
            a => panic!("expected Write, got {}", describe(&a)),
        }
        self.feed(Event::WriteFailed(kind.into()));
    }

    /// The agent sends `bytes` (with `ID` replaced by the request's id).
    fn reply(&mut self, bytes: &[u8], id: u64) {
        let bytes = String::from_utf8_lossy(bytes).replace("ID", &id.to_string());
        let n = match self.ex.poll() {
            Action::Read(buf) => {
                buf[..bytes.len()].copy_from_slice(bytes.as_bytes());
                bytes.len()
            }
            a => panic!("expected Read, got {}", describe(&a)),
        };
        self.feed(Event::Read(n));
    }

    fn eof(&mut self) {
        match self.ex.poll() {
            Action::Read(_) => {}
            a => panic!("expected Read, got {}", describe(&a)),
        }
        self.feed(Event::Read(0));
    }

    fn feed_read_error(&mut self, kind: io::ErrorKind) {
        match self.ex.poll() {
            Action::Read(_) => {}
            a => panic!("expected Read, got {}", describe(&a)),
        }
        self.feed(Event::ReadFailed(kind.into()));
    }

    fn close(&mut self) {
        match self.ex.poll() {
            Action::Close => {}
            a => panic!("expected Close, got {}", describe(&a)),
        }
        self.feed(Event::Closed);
    }

    /// Sleep as told, moving the clock; returns the pause.
    fn sleep(&mut self) -> Duration {
        let d = match self.ex.poll() {
            Action::Sleep(d) => d,
            a => panic!("expected Sleep, got {}", describe(&a)),
        };
        self.now += d;
        self.feed(Event::Slept);
        d
    }

    fn ready(&mut self) {
        match self.ex.poll() {
            Action::Ready => {}
            a => panic!("expected Ready, got {}", describe(&a)),
        }
    }

    fn done(&mut self) -> Response {
        match self.ex.poll() {
            Action::Done(r) => r,
            a => panic!("expected Done, got {}", describe(&a)),
        }
    }

    fn fail(&mut self) -> Error {
        match self.ex.poll() {
            Action::Fail(e) => e,
            a => panic!("expected Fail, got {}", describe(&a)),
        }
    }

    /// A whole successful round trip on the open connection for request `id`.
    fn round_trip(&mut self, id: u64) {
        self.request();
        self.write();
        self.reply(OK_V, id);
        assert_eq!(self.done().value.unwrap().as_str(), "v");
    }
}

fn io_source(e: &Error) -> &io::Error {
    match e {
        Error::Io { source, path } => {
            assert_eq!(path, Path::new(SOCK));
            source
        }
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn requests_are_framed_with_an_id_per_request() {
    let mut t = T::new(ms(0), 1000);
    t.ex.request(
        Operation::Get {
            name: "A".into(),
            task: Some("/t".into()),
        },
        t.now,
    );
    assert_eq!(
        t.write(),
        b"{\"v\":1,\"id\":1,\"op\":\"get\",\"name\":\"A\",\"task\":\"/t\"}\n"
    );
    t.reply(OK_V, 1);
    t.done();
    t.request();
    assert_eq!(t.write(), b"{\"v\":1,\"id\":2,\"op\":\"health\"}\n");
}

#[test]
fn partial_writes_continue_where_they_stopped() {
    let mut t = T::new(ms(0), 1000);
    t.request();
    match t.ex.poll() {
        Action::Write(b) => assert_eq!(b.len(), 29),
        a => panic!("{}", describe(&a)),
    }
    t.feed(Event::Wrote(10));
    assert_eq!(t.write(), b"\":1,\"op\":\"health\"}\n");
    // An answer split over reads is assembled.
    t.reply(b"{\"v\":1,\"id\":1,", 1);
    t.reply(b"\"ok\":true,\"info\":{}}\n", 1);
    assert!(t.done().info.is_some());
}

#[test]
fn busy_is_retried_with_doubling_backoff_then_succeeds() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    let mut pauses = Vec::new();
    for _ in 0..3 {
        t.write();
        t.reply(BUSY, 1);
        // The agent hangs up after busy: the retry is on a new connection.
        t.close();
        pauses.push(t.sleep());
        t.connect();
    }
    assert_eq!(pauses, [ms(50), ms(100), ms(200)]);
    assert_eq!(
        t.write(),
        b"{\"v\":1,\"id\":1,\"op\":\"health\"}\n",
        "the same request, same id"
    );
    t.reply(OK_V, 1);
    t.done();
}

#[test]
fn backoff_doubles_to_one_second() {
    let mut b = Backoff::new(Duration::from_secs(3600), Instant::now());
    let now = Instant::now();
    let delays: Vec<Duration> = (0..8).map(|_| b.next_delay(now).unwrap()).collect();
    assert_eq!(delays[0], BACKOFF_START);
    assert_eq!(delays[1], BACKOFF_START * 2);
    assert_eq!(*delays.last().unwrap(), BACKOFF_MAX);
    assert_eq!(BACKOFF_START, ms(50));
    assert_eq!(BACKOFF_MAX, Duration::from_secs(1));
    let mut b = Backoff::new(Duration::ZERO, now);
    assert_eq!(b.next_delay(now), None);
}

#[test]
fn busy_gives_up_when_the_budget_is_spent() {
    let mut t = T::new(ms(300), 1000);
    t.request();
    let mut pauses = Vec::new();
    loop {
        t.write();
        t.reply(BUSY, 1);
        match t.ex.poll() {
            Action::Close => t.feed(Event::Closed),
            a => panic!("{}", describe(&a)),
        }
        match t.ex.poll() {
            Action::Sleep(d) => {
                pauses.push(d);
                t.now += d;
                t.feed(Event::Slept);
                t.connect();
            }
            Action::Fail(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Busy));
                break;
            }
            a => panic!("{}", describe(&a)),
        }
    }
    // The last pause is cut to what is left of the budget, and nothing is slept past it.
    assert_eq!(pauses, [ms(50), ms(100), ms(150)]);
    assert_eq!(t.elapsed(), ms(300));
}

#[test]
fn a_slow_clock_spends_the_budget_too() {
    // Time spent outside sleeps (slow connects, slow answers) counts against the budget.
    let mut t = T::new(ms(1000), 1000);
    t.request();
    t.write();
    t.now += ms(2000);
    t.reply(BUSY, 1);
    t.close();
    assert_eq!(t.fail().code(), Some(ErrorCode::Busy));
}

#[test]
fn missing_or_refusing_socket_is_retried_within_the_budget() {
    let mut t = T::new(ms(120), 1000);
    // Start from a closed connection: a busy answer closes it.
    t.request();
    t.write();
    t.reply(BUSY, 1);
    t.close();
    assert_eq!(t.sleep(), ms(50));
    t.connect_fails(io::ErrorKind::NotFound);
    assert_eq!(t.sleep(), ms(70));
    t.connect_fails(io::ErrorKind::ConnectionRefused);
    match t.fail() {
        Error::Unreachable { path, source } => {
            assert_eq!(path, Path::new(SOCK));
            assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn other_connect_errors_are_not_retried() {
    let cfg = Config {
        socket: SOCK.into(),
        task: None,
        retry: Duration::from_secs(10),
        read_timeout: Duration::ZERO,
        write_timeout: Duration::ZERO,
        max_response_bytes: 10,
    };
    let now = Instant::now();
    let mut ex = Exchange::connect(cfg, now);
    assert!(matches!(ex.poll(), Action::Connect(_)));
    ex.handle(
        Event::ConnectFailed(io::ErrorKind::PermissionDenied.into()),
        now,
    );
    assert!(matches!(ex.poll(), Action::Fail(Error::Unreachable { .. })));
}

#[test]
fn oversize_response_is_refused_and_the_connection_dropped() {
    let mut t = T::new(Duration::from_secs(10), 10);
    t.request();
    t.write();
    t.reply(b"{\"v\":1,\"ok\"", 1);
    t.close();
    assert!(matches!(t.fail(), Error::ResponseTooLarge { limit: 10 }));
    // Not retried, and the next request starts on a fresh connection.
    t.request();
    t.connect();
    t.write();
}

#[test]
fn a_line_at_the_cap_is_accepted() {
    let line = b"{\"v\":1,\"id\":1,\"ok\":true,\"info\":{}}";
    let mut t = T::new(Duration::ZERO, line.len());
    t.request();
    t.write();
    t.reply(&[&line[..], b"\n"].concat(), 1);
    t.done();
}

#[test]
fn id_mismatch_is_a_protocol_error_and_drops_the_connection() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write();
    t.reply(OK_V, 7);
    t.close();
    let e = t.fail();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(e.to_string().contains("does not match request id 1"), "{e}");
}

#[test]
fn eof_mid_line_is_an_io_error_with_its_own_wording() {
    let mut t = T::new(Duration::ZERO, 1000);
    t.request();
    t.write();
    t.reply(b"{\"v\":1,\"id\":1,", 1);
    t.eof();
    t.close();
    let e = t.fail();
    let source = io_source(&e);
    assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(source.to_string(), EOF_MID_ANSWER);

    t.request();
    t.connect();
    t.write();
    t.eof();
    t.close();
    assert_eq!(io_source(&t.fail()).to_string(), EOF_BEFORE_ANSWER);
}

#[test]
fn eof_on_a_fresh_connection_is_retried_with_backoff() {
    let mut t = T::new(ms(500), 1000);
    t.request();
    t.write();
    t.eof();
    t.close();
    assert_eq!(t.sleep(), ms(50));
    t.connect();
    t.write();
    t.reply(OK_V, 1);
    t.done();
}

#[test]
fn a_failed_write_still_reads_the_busy_answer() {
    // At its connection limit the agent writes busy and hangs up without reading: our write
    // fails, but the answer is there to read, and it is busy, so we retry.
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write_fails(io::ErrorKind::BrokenPipe);
    t.reply(BUSY, 1);
    t.close();
    assert_eq!(t.sleep(), ms(50));
    t.connect();
    t.write();
    t.reply(OK_V, 1);
    t.done();
}

#[test]
fn a_failed_write_without_an_answer_reports_the_write_error() {
    let mut t = T::new(Duration::ZERO, 1000);
    t.request();
    t.write_fails(io::ErrorKind::PermissionDenied);
    t.eof();
    t.close();
    assert_eq!(io_source(&t.fail()).kind(), io::ErrorKind::PermissionDenied);
}

#[test]
fn a_dropped_idle_connection_is_reopened_once_at_once() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.round_trip(1);
    // The agent closed the idle connection: the write fails, nothing to read.
    t.request();
    t.write_fails(io::ErrorKind::BrokenPipe);
    t.eof();
    t.close();
    // No pause before the one free reconnect.
    t.connect();
    t.write();
    t.reply(OK_V, 2);
    t.done();
    assert_eq!(t.elapsed(), Duration::ZERO);
}

#[test]
fn a_connection_dropped_again_after_the_reconnect_backs_off() {
    let mut t = T::new(Duration::ZERO, 1000);
    t.round_trip(1);
    t.request();
    t.write();
    t.feed_read_error(io::ErrorKind::ConnectionReset);
    t.close();
    t.connect();
    t.write();
    t.eof();
    t.close();
    // Zero budget: no backoff left, so the reconnect's failure is final.
    let e = t.fail();
    assert_eq!(io_source(&e).kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.is_retryable());
}

#[test]
fn timeouts_are_not_retried() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write();
    assert!(matches!(t.ex.poll(), Action::Read(_)));
    t.feed(Event::TimedOut);
    t.close();
    let e = t.fail();
    assert_eq!(io_source(&e).kind(), io::ErrorKind::TimedOut);
    assert_eq!(io_source(&e).to_string(), READ_TIMED_OUT);

    t.request();
    t.connect();
    assert!(matches!(t.ex.poll(), Action::Write(_)));
    t.feed(Event::TimedOut);
    t.eof();
    t.close();
    assert_eq!(io_source(&t.fail()).to_string(), WRITE_TIMED_OUT);
}

#[test]
fn agent_errors_keep_the_connection() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write();
    t.reply(
        b"{\"v\":1,\"id\":ID,\"ok\":false,\"error\":{\"code\":\"key_unavailable\",\"message\":\"revoked\",\"retryable\":true}}\n",
        1,
    );
    assert_eq!(t.fail().code(), Some(ErrorCode::KeyUnavailable));
    // key_unavailable is the caller's to retry; the next request reuses the connection.
    t.round_trip(2);
}

#[test]
fn an_abandoned_request_never_reuses_its_connection() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write();
    // Half an answer, then the caller gave up (a dropped future).
    t.reply(b"{\"v\":1,", 1);
    t.request();
    t.close();
    t.connect();
    t.write();
    t.reply(OK_V, 2);
    t.done();
}

#[test]
fn pipelined_bytes_after_an_answer_are_kept_for_the_next_line() {
    let mut t = T::new(Duration::from_secs(10), 1000);
    t.request();
    t.write();
    // The busy line of a connection limit can arrive before our request was even read.
    let both = [
        &b"{\"v\":1,\"id\":1,\"ok\":true,\"info\":{}}\n"[..],
        b"{\"v\":1,\"id\":2,\"ok\":true,\"info\":{\"n\":2}}\n",
    ]
    .concat();
    t.reply(&both, 1);
    t.done();
    t.request();
    t.write();
    assert_eq!(t.done().info.unwrap()["n"], 2);
}
