//! Talking to an agent and looking at its process from outside.

use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// One request over a new connection to `socket`; `None` if there is no answer.
pub fn request_at(socket: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let mut line = serde_json::to_vec(req).ok()?;
    line.push(b'\n');
    s.write_all(&line).ok()?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).ok()?;
    serde_json::from_str(&reply).ok()
}

/// The error code of a response (`""` on success).
pub fn code_of(r: &Value) -> String {
    r["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// A request as another uid (root only); panics when the agent does not answer.
pub fn request_as(uid: u32, socket: &Path, req: &Value) -> Value {
    try_request_as(uid, socket, req).unwrap_or_else(|| {
        panic!(
            "no answer to a request as uid {uid} on {}",
            socket.display()
        )
    })
}

/// Like [`request_as`], but tolerant of an agent that answers and hangs up before the request
/// is sent (a `busy` refusal): returns the line the agent wrote, `None` if it wrote none.
/// A python3 child, because switching uids needs a process of its own.
pub fn try_request_as(uid: u32, socket: &Path, req: &Value) -> Option<Value> {
    use std::os::unix::process::CommandExt;
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\n")
except OSError:
    pass
buf = b""
while not buf.endswith(b"\n"):
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .arg(req.to_string())
        .uid(uid)
        .gid(uid)
        .output()
        .expect("cannot run python3");
    serde_json::from_slice(&out.stdout).ok()
}

/// Numeric fields (KiB) of `/proc/<pid>/status`, such as `"VmRSS:"`; 0 for a field that is
/// absent.
pub fn proc_status_kib(pid: u32, names: &[&str]) -> std::io::Result<Vec<u64>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(names.iter().map(|n| field(n)).collect())
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, &["VmRSS:"])
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"))[0]
}

/// Number of file descriptors `pid` has open. The agent makes itself non-dumpable, which
/// leaves its `/proc/<pid>/fd` readable by root only.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd (root only for the agent): {e}"))
        .count()
}
