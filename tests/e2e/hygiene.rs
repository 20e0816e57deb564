//! Secret hygiene of the running agent: no cleartext in its environment, command line, state
//! files or logs; no core dumps; nothing leaked to callers who are not entitled; memory locking
//! reported either way.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use nodeseal_testkit::{code_of, request_as, wait_until, Node};
use serde_json::json;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const V1_SECRET: &str = "hygiene-V1-secret-7f3a9c";
const LEGACY_SECRET: &str = "hygiene-LEGACY-secret-2b8e41";

/// A node with one key and a task whose env file holds one v1 and one legacy value.
fn node_with_secrets() -> (Node, PathBuf, String, String) {
    let node = Node::new();
    let cert = node.create_cert("pool");
    node.drop_pfx(&cert);
    let task = node.task("job-h", "task-1");
    let v1 = node.seal(&cert, Some("API_TOKEN"), V1_SECRET, "v1");
    let legacy = node.seal(&cert, None, LEGACY_SECRET, "shipyard");
    node.write_env(
        &task,
        &format!("API_TOKEN={v1}\nDOCKER_LOGIN_PASSWORD={legacy}\nPLAIN=visible\n"),
    );
    (node, task, v1, legacy)
}

/// Fetch both values once so the agent has decrypted (and possibly cached) them.
fn fetch_both(node: &Node, task: &Path) {
    assert_eq!(node.get(task, "API_TOKEN")["value"], V1_SECRET);
    assert_eq!(
        node.get(task, "DOCKER_LOGIN_PASSWORD")["value"],
        LEGACY_SECRET
    );
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn files_below(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            files_below(&p, out);
        } else if ft.is_file() {
            out.push(p);
        }
    }
}

#[test]
fn agent_environ_and_cmdline_hold_no_secret() {
    let (mut node, task, _, _) = node_with_secrets();
    node.start();
    fetch_both(&node, &task);
    let pid = node.pid();
    for what in ["environ", "cmdline"] {
        let path = format!("/proc/{pid}/{what}");
        match fs::read(&path) {
            Ok(bytes) => {
                assert!(!bytes.is_empty() || what == "environ", "{path} is empty");
                for s in [V1_SECRET, LEGACY_SECRET] {
                    assert!(!contains(&bytes, s), "{path} contains a secret");
                }
            }
            // A non-dumpable process hides these from unprivileged readers: also fine.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => panic!("{path}: {e}"),
        }
    }
}

#[test]
fn agent_writes_no_cleartext_or_private_key_pem() {
    let (mut node, task, _, _) = node_with_secrets();
    node.start();
    fetch_both(&node, &task);
    // Ingest removes the readable originals only once the store copies are written: wait for
    // that, then stop the agent so everything is flushed.
    assert!(
        wait_until(Duration::from_secs(10), || fs::read_dir(&node.certs)
            .unwrap()
            .next()
            .is_none()),
        "the PFX drop was never ingested; log:\n{}",
        node.logs()
    );
    let status = node.stop();
    assert!(status.success(), "agent exit: {status:?}\n{}", node.logs());

    let mut files = Vec::new();
    files_below(&node.state, &mut files);
    assert!(!files.is_empty(), "the agent wrote no state at all?");
    // The log is written by the agent too (stderr), at trace level.
    files.push(node.log_path.clone());
    for f in &files {
        let bytes = fs::read(f).unwrap();
        for s in [V1_SECRET, LEGACY_SECRET] {
            assert!(
                !contains(&bytes, s),
                "{} contains a cleartext value",
                f.display()
            );
        }
        assert!(
            !contains(&bytes, "PRIVATE KEY"),
            "{} contains an unencrypted private key PEM",
            f.display()
        );
    }
}

#[test]
#[ignore = "needs root: reads the agent's /proc/<pid>/limits and cwd, which its non-dumpable hardening leaves to root"]
fn crash_leaves_no_core_dump() {
    let (mut node, task, _, _) = node_with_secrets();
    // Children inherit our limits: allow cores so that only the agent's own hardening can be
    // what prevents one. Restored right after the spawn.
    let (soft, hard) = getrlimit(Resource::RLIMIT_CORE).unwrap();
    let raised = hard > 0 && setrlimit(Resource::RLIMIT_CORE, hard, hard).is_ok();
    node.start();
    if raised {
        setrlimit(Resource::RLIMIT_CORE, soft, hard).unwrap();
    } else {
        eprintln!("note: RLIMIT_CORE hard limit is 0 here; the limit check below is weaker");
    }
    fetch_both(&node, &task);
    let pid = node.pid();
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core_line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core limit in:\n{limits}"));
    let fields: Vec<&str> = core_line.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core_line}");

    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    let cores = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("core"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = cores(&cwd);
    // SIGABRT's default action dumps core; the Rust runtime does not handle it (it does handle
    // SIGSEGV, to report stack overflows).
    node.signal(Signal::SIGABRT);
    let status = node.wait_exit(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(Signal::SIGABRT as i32), "{status:?}");
    // WCOREDUMP: set by the kernel whenever it produced a core, whatever core_pattern says
    // (file or pipe to a handler such as systemd-coredump).
    assert!(!status.core_dumped(), "the kernel dumped the agent's core");
    assert_eq!(
        cores(&cwd),
        before,
        "core file appeared in {}",
        cwd.display()
    );
}

#[test]
#[ignore = "needs root: chowns the env file to uid 4242 and connects as uids 4242 and 4243"]
fn non_entitled_callers_never_see_cleartext() {
    let (mut node, task, v1, legacy) = node_with_secrets();
    let env = task.join("wd/.shipyard.envlist");
    std::os::unix::fs::chown(&env, Some(4242), Some(4242)).unwrap();
    // uid 4242 may also `open` unbound tokens it presents; uid 4243 is entitled to nothing
    // (and by default no uid but host root may `open` unbound tokens: docs/security.md).
    node.write_config(json!({"open_allowed_uids": [4242]}));
    node.start();
    // The owner is served, so the refusals below are about the caller, not a broken setup.
    let owner = request_as(
        4242,
        &node.socket,
        &json!({"op": "get", "name": "API_TOKEN", "task": task}),
    );
    assert_eq!(owner["value"], V1_SECRET, "{owner}");

    let requests = [
        json!({"op": "get", "name": "API_TOKEN", "task": task}),
        json!({"op": "get", "name": "DOCKER_LOGIN_PASSWORD", "task": task}),
        json!({"op": "get", "name": "API_TOKEN"}),
        json!({"op": "env", "task": task}),
        json!({"op": "env", "task": task.join("wd")}),
        json!({"op": "list", "task": task}),
        json!({"op": "open", "token": v1, "name": "API_TOKEN"}),
        json!({"op": "open", "token": v1}),
        json!({"op": "open", "token": legacy}),
        json!({"op": "status"}),
    ];
    for req in &requests {
        let r = request_as(4243, &node.socket, req);
        let text = r.to_string();
        assert!(r["ok"] != true, "{req} → {r}");
        assert!(!code_of(&r).is_empty(), "{req} → {r}");
        for s in [V1_SECRET, LEGACY_SECRET] {
            assert!(!text.contains(s), "{req} leaked a value: {r}");
        }
    }
    let logs = node.logs();
    for s in [V1_SECRET, LEGACY_SECRET] {
        assert!(!logs.contains(s), "the agent logged a cleartext value");
    }
}

#[test]
fn memory_locking_is_reported() {
    let (mut node, _, _, _) = node_with_secrets();
    node.start();
    let logs = node.logs();
    assert!(
        logs.contains("memory locked") || logs.contains("mlockall failed"),
        "neither 'memory locked' nor an mlockall warning in the log:\n{logs}"
    );
}
