//! Closed-loop load over Unix stream sockets: one connection for latency, many connections (one
//! thread each) for throughput. Every loop is bounded by a request count and a deadline.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// What one load run measured.
pub(crate) struct LoadResult {
    /// Per-request latencies in microseconds.
    pub latencies_us: Vec<f64>,
    /// Completed requests per second over the run.
    pub per_sec: f64,
}

fn connect(socket: &Path) -> Result<(UnixStream, BufReader<UnixStream>)> {
    let s = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

/// Send one line and read one line; the reply must contain `"ok":true` when `check_ok`.
fn round_trip(
    s: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
    line: &[u8],
    reply: &mut String,
    check_ok: bool,
) -> Result<()> {
    s.write_all(line)?;
    reply.clear();
    if r.read_line(reply)? == 0 {
        bail!("server closed the connection");
    }
    if check_ok && !reply.contains("\"ok\":true") {
        bail!("request failed: {}", reply.trim_end());
    }
    Ok(())
}

/// `count` requests one after another on one connection, after `warmup` unmeasured ones.
pub(crate) fn one_connection(
    socket: &Path,
    requests: &[Vec<u8>],
    warmup: usize,
    count: usize,
    deadline: Duration,
    check_ok: bool,
) -> Result<LoadResult> {
    let (mut s, mut r) = connect(socket)?;
    let mut reply = String::new();
    for i in 0..warmup {
        round_trip(
            &mut s,
            &mut r,
            &requests[i % requests.len()],
            &mut reply,
            check_ok,
        )?;
    }
    let mut latencies_us = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        round_trip(
            &mut s,
            &mut r,
            &requests[i % requests.len()],
            &mut reply,
            check_ok,
        )?;
        latencies_us.push(t.elapsed().as_secs_f64() * 1e6);
        if start.elapsed() > deadline {
            break;
        }
    }
    let per_sec = latencies_us.len() as f64 / start.elapsed().as_secs_f64();
    Ok(LoadResult {
        latencies_us,
        per_sec,
    })
}

/// `conns` connections, each a thread sending requests back to back for `duration` (or until
/// `max_per_conn`); connection `c` starts at request `c` of `requests` and walks them in turn.
pub(crate) fn many_connections(
    socket: &Path,
    requests: &[Vec<u8>],
    conns: usize,
    duration: Duration,
    max_per_conn: usize,
    check_ok: bool,
) -> Result<LoadResult> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(connect(socket)?);
    }
    let barrier = std::sync::Barrier::new(conns + 1);
    let mut elapsed = Duration::ZERO;
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(c, (mut s, mut r))| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Vec<f64>> {
                    let mut reply = String::new();
                    // One unmeasured request: connection set-up is not what is measured.
                    round_trip(
                        &mut s,
                        &mut r,
                        &requests[c % requests.len()],
                        &mut reply,
                        check_ok,
                    )?;
                    barrier.wait();
                    let start = Instant::now();
                    let mut lat = Vec::with_capacity(1024);
                    let mut i = c;
                    while start.elapsed() < duration && lat.len() < max_per_conn {
                        let t = Instant::now();
                        round_trip(
                            &mut s,
                            &mut r,
                            &requests[i % requests.len()],
                            &mut reply,
                            check_ok,
                        )?;
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let out = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("load thread panicked")))
            })
            .collect();
        elapsed = t0.elapsed();
        out
    });
    let mut latencies_us = Vec::new();
    for r in results {
        latencies_us.extend(r?);
    }
    // The run lasts until the slowest connection's last answer.
    let per_sec = latencies_us.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(LoadResult {
        latencies_us,
        per_sec,
    })
}
