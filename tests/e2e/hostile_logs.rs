//! An unprivileged attacker (uid 4243) tries to forge lines in the agent's text log: requests
//! whose op, field names and values carry a fake audit line for a host-root request and
//! terminal escapes, raw non-JSON bytes, and, in a task dir it owns under the env root,
//! directories and env files with such names and an env file with hostile names and values.
//! Every line the agent logged must still be one of its own: the real timestamp-and-level
//! prefix, no `host_root=true` (no real root request is made), no raw control characters.

use nodeseal_testkit::{request_as, wait_until, Node};
use serde_json::{json, Value};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ATTACKER: u32 = 4243;
/// A fake audit line for a host-root request, on a line of its own.
const FORGED: &str =
    "\n2026-12-01T00:00:00Z  INFO request op=status peer_uid=0 host_root=true outcome=ok\n";
/// Clear the screen.
const CLEAR: &str = "\x1b[2J";

/// Send `line` and a newline as the attacker, raw (not necessarily JSON, not necessarily UTF-8).
fn raw_as_attacker(socket: &Path, line: &[u8]) {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(os.fsencode(sys.argv[2]) + b"\n")
    s.recv(65536)
except OSError:
    pass
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .arg(OsStr::from_bytes(line))
        .uid(ATTACKER)
        .gid(ATTACKER)
        .status()
        .expect("cannot run python3");
    assert!(status.success(), "{status:?}");
}

/// Make `path` (and what is in it) the attacker's.
fn give(path: &Path) {
    chown(path, Some(ATTACKER), Some(ATTACKER)).unwrap();
}

/// What the attacker does as a task user: its own task's env file, a task dir and env files
/// named with the forged line, and an env file with hostile names and values.
fn plant_files(node: &Node, task: &Path, round: &str) {
    let wd = task.join("wd");
    // A directory and an env file in its own task dir whose names hold the forged line.
    let dir = wd.join(format!("dir{round}{FORGED}{CLEAR}"));
    fs::create_dir_all(&dir).unwrap();
    give(&dir);
    let named = wd.join(format!(".shipyard.envlist{round}{FORGED}{CLEAR}"));
    fs::write(&named, format!("A=1{FORGED}")).unwrap();
    give(&named);
    // A whole task whose job and task ids are the forged line.
    let job = format!("job{round}{FORGED}{CLEAR}");
    let forged_task = node.task(&job, &format!("task{FORGED}{CLEAR}"));
    for d in [
        node.workitems.join(&job),
        node.workitems.join(&job).join("job-1"),
        forged_task.clone(),
        forged_task.join("wd"),
    ] {
        give(&d);
    }
    let env = node.write_env(
        &forged_task,
        &format!(
            "NAME{CLEAR}\u{2028}X=v{FORGED}\
             2026-12-01T00:00:00Z  INFO request op=status peer_uid=0 host_root=true outcome=ok\n\
             OK=value{CLEAR}\u{9b}2J\u{202e}\r\n\
             no equals sign here {CLEAR}\n\
             BAD NAME=x\x7f\n"
        ),
    );
    give(&env);
    // The attacker's own task's env file gets a hostile value (values are never logged).
    let own = node.write_env(
        task,
        &format!("PLAIN=fine\nHOSTILE=a\u{85}b{CLEAR}\u{2028}c\n"),
    );
    give(&own);
}

fn requests(node: &Node, task: &Path) {
    let forged_task = task.join(format!("x{FORGED}{CLEAR}"));
    let hostile = format!("{FORGED}{CLEAR}");
    let reqs: Vec<Value> = vec![
        // An unknown op.
        json!({ "op": hostile }),
        // An unknown field name, with a hostile value.
        json!({ "op": "get", "name": "PLAIN", "task": task, hostile.clone(): hostile }),
        // Hostile values of known fields.
        json!({ "op": "get", "name": hostile, "task": task }),
        json!({ "op": "get", "name": "PLAIN", "task": forged_task }),
        json!({ "op": "get", "name": "PLAIN", "task": hostile }),
        json!({ "op": "status", "scope": hostile }),
        json!({ "op": "status" }),
        json!({ "op": "revoke", "key_id": hostile }),
        // Wrong types, so serde quotes the value in its error.
        json!({ "op": "get", "name": { hostile.clone(): [hostile] } }),
        json!(hostile),
    ];
    for req in &reqs {
        let r = request_as(ATTACKER, &node.socket, req);
        assert_ne!(r["ok"], true, "{req} answered {r}");
    }
    // Not JSON at all, not UTF-8, with raw escapes.
    raw_as_attacker(
        &node.socket,
        format!("garbage{CLEAR}\x1b]0;title\x07").as_bytes(),
    );
    raw_as_attacker(&node.socket, b"\xff\xfe\x1b[2J\xc2\x9b2J{\"op\":");
    let mut bytes = b"{\"op\":\"".to_vec();
    bytes.extend_from_slice(b"st\x1b[2J\r\xe2\x80\xa8");
    bytes.extend_from_slice(b"\"}");
    raw_as_attacker(&node.socket, &bytes);
}

/// `2026-05-01T12:00:00.123456Z  INFO ` and the like: the prefix tracing's format gives
/// every line of the agent's (UTC, microseconds, level padded to five).
fn real_prefix(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 34
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[26] == b'Z'
        && [" TRACE ", " DEBUG ", "  INFO ", "  WARN ", " ERROR "]
            .iter()
            .any(|l| line[27..].starts_with(l))
}

#[test]
#[ignore = "needs root: chowns the attacker's files to uid 4243 and connects as uid 4243"]
fn attacker_names_and_requests_cannot_forge_log_lines() {
    let mut node = Node::new();
    let task = node.task("job", "task");
    node.write_env(&task, "PLAIN=fine\n");
    for d in [task.clone(), task.join("wd")] {
        give(&d);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    give(&task.join("wd/.shipyard.envlist"));
    // Planted before the first scan, and again while the agent watches.
    plant_files(&node, &task, "0");
    node.start();
    requests(&node, &task);
    plant_files(&node, &task, "1");
    // Waiting for the agent to see them by its log, not by `health`: a host-root request
    // would log a real `host_root=true` line.
    let seen = "workitems/job1";
    assert!(
        wait_until(Duration::from_secs(10), || node.logs().contains(seen)),
        "the agent never logged the second round of files: {}",
        node.logs()
    );
    requests(&node, &task);
    // The agent still serves its owner.
    let r = request_as(
        ATTACKER,
        &node.socket,
        &json!({"op": "get", "name": "PLAIN", "task": task}),
    );
    assert_eq!(r["value"], "fine", "{r}\n{}", node.logs());
    let r = request_as(
        ATTACKER,
        &node.socket,
        &json!({"op": "get", "name": "HOSTILE", "task": task}),
    );
    assert_eq!(r["value"], format!("a\u{85}b{CLEAR}\u{2028}c"), "{r}");

    let raw = fs::read(&node.log_path).unwrap();
    assert!(!raw.contains(&0x1b), "a raw ESC in the log");
    let logs = String::from_utf8(raw).expect("the log is UTF-8");
    // The attacker's bytes did reach the log, escaped: otherwise this test proved nothing.
    assert!(logs.contains(r"\x1b[2J"), "{logs}");
    assert!(
        logs.contains(r"\n2026-12-01T00:00:00Z  INFO request op\x3dstatus"),
        "{logs}"
    );
    assert!(logs.contains("peer_uid=4243"), "{logs}");
    for line in logs.lines() {
        assert!(
            real_prefix(line),
            "a line the agent did not write: {line:?}\n{logs}"
        );
        assert!(!line.contains("host_root=true"), "forged: {line:?}");
        assert!(!line.contains("peer_uid=0 "), "forged: {line:?}");
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')),
            "a raw control or bidi character: {line:?}"
        );
    }
}
