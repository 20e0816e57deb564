//! Who is calling, under attack: root in a container (its own pid namespace) is not host root on
//! the host socket, and neither is a host process of an ordinary uid that inherits a container
//! root's connection and takes over its old pid number before the agent looks. Real host root
//! still gets `status`.

use nodeseal_testkit::{code_of, spawn_with_pid, wait_child, Node};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The ordinary host uid that attacks.
const ATTACKER: u32 = 4361;
/// The uid whose task values are the prize.
const VICTIM: u32 = 4362;
const SECRET: &str = "victim-Secret-identity-e2e";

fn node_with_victim_task() -> (Node, PathBuf) {
    node_with_victim_task_and(json!({}))
}

/// Like [`node_with_victim_task`], with top-level config fields of `config` replacing the kit's.
fn node_with_victim_task_and(config: Value) -> (Node, PathBuf) {
    let mut node = Node::new();
    node.write_config(config);
    let cert = node.create_cert("pool");
    node.drop_pfx(&cert);
    let task = node.task("job-v", "victim");
    node.write_env(
        &task,
        &format!("DB={}\n", node.seal(&cert, Some("DB"), SECRET, "v1")),
    );
    std::os::unix::fs::chown(
        task.join("wd/.shipyard.envlist"),
        Some(VICTIM),
        Some(VICTIM),
    )
    .unwrap();
    node.start();
    (node, task)
}

fn has_unshare(test: &str) -> bool {
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        nodeseal_testkit::unavailable_here(test, "unshare --pid (util-linux) does not work here");
    }
    ok
}

/// Sends each request line (argv[2:]) over the connection it is given and prints each answer
/// line, or `EOF` when the agent hung up. The connection is argv[1]: a socket path to connect
/// to, or `inherit:<abstract name>` to listen there for one handed over by SCM_RIGHTS, say
/// `inherited` and wait for a line on stdin before asking.
const CALLER: &str = r#"
import socket, sys
def answer(conn):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return "EOF\n"
        buf += chunk
    return buf.decode()
if sys.argv[1].startswith("inherit:"):
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    l.bind("\0" + sys.argv[1][len("inherit:"):])
    l.listen(1)
    print("listening", flush=True)
    c, _ = l.accept()
    _, fds, _, _ = socket.recv_fds(c, 16, 1)
    conn = socket.socket(fileno=fds[0])
    print("inherited", flush=True)
    sys.stdin.readline()
else:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sys.argv[1])
for req in sys.argv[2:]:
    conn.sendall(req.encode() + b"\n")
    sys.stdout.write(answer(conn))
    sys.stdout.flush()
"#;

/// Connects to the agent's socket (argv[1]), hands the connection to the listener at the
/// abstract name argv[2], prints its pid in the host's pid namespace (the host's /proc says, as
/// nothing remounted it) and exits.
const HANDER: &str = r#"
import os, socket, sys
a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
a.connect(sys.argv[1])
h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
h.connect("\0" + sys.argv[2])
socket.send_fds(h, [b"x"], [a.fileno()])
print(os.readlink("/proc/self"), os.getpid())
"#;

fn requests(task: &std::path::Path) -> [String; 2] {
    [
        json!({"op": "status"}).to_string(),
        json!({"op": "get", "name": "DB", "task": task}).to_string(),
    ]
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not an answer: {line:?}: {e}"))
}

/// The attack's setup, one try: an ordinary host uid waits for a connection; with the agent
/// stopped, root in a pid namespace of its own connects, hands the connection over and exits;
/// a process of the ordinary uid takes its old host pid; the agent runs again. `Err` (after
/// cleaning up) when the pid was taken by some other process first, or the hand-over failed.
fn hand_over_and_take_the_pid(
    node: &mut Node,
    status: &str,
    get: &str,
    attempt: usize,
) -> Result<
    (
        std::process::Child,
        BufReader<std::process::ChildStdout>,
        u32,
        std::process::Child,
    ),
    String,
> {
    let handoff = format!("nodeseal-identity-{}-{attempt}", std::process::id());
    // The attacker's receiving end: an ordinary host uid waiting for a connection.
    let mut receiver = Command::new("python3")
        .args(["-c", CALLER, &format!("inherit:{handoff}"), status, get])
        .uid(ATTACKER)
        .gid(ATTACKER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");

    // The agent does not run between the container root's connect() and the pid's new owner
    // taking it: the race the attacker would otherwise have to win, made certain.
    node.signal(nix::sys::signal::Signal::SIGSTOP);
    let container_root = Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c", HANDER])
        .arg(&node.socket)
        .arg(&handoff)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&container_root.stdout).into_owned();
    // "<host pid> <pid inside>": the inside pid 1 shows it ran in a pid namespace of its own.
    let old_pid = match said.split_whitespace().collect::<Vec<_>>()[..] {
        [host, "1"] if container_root.status.success() => host.parse::<u32>().ok(),
        _ => None,
    };
    // The container root has exited and been reaped; its host pid goes to the attacker. The
    // agent runs again whatever happened, so that a failure below cannot leave it stopped.
    let taker = old_pid.and_then(|pid| {
        spawn_with_pid(pid, 500, || {
            let mut c = Command::new("sleep");
            c.arg("300").uid(ATTACKER).gid(ATTACKER);
            c
        })
    });
    node.signal(nix::sys::signal::Signal::SIGCONT);
    match (old_pid, taker) {
        (Some(old_pid), Some(taker)) => Ok((receiver, out, old_pid, taker)),
        (old_pid, _) => {
            let _ = receiver.kill();
            let _ = receiver.wait();
            Err(format!(
                "hand-over {} said {said:?} ({}); or pid {old_pid:?} was taken by another process",
                container_root.status,
                String::from_utf8_lossy(&container_root.stderr).trim()
            ))
        }
    }
}

#[test]
#[ignore = "needs root: enters a pid namespace (unshare), connects as other uids, stops the agent and sets ns_last_pid"]
fn a_host_user_inheriting_a_container_roots_connection_and_its_pid_is_not_host_root() {
    let test = "a_host_user_inheriting_a_container_roots_connection_and_its_pid_is_not_host_root";
    if !has_unshare(test) {
        return;
    }
    let (mut node, task) = node_with_victim_task();
    let [status, get] = requests(&task);
    // Taking a given pid races every other process the machine starts meanwhile (tests run in
    // parallel): when another one lands on the number first, the whole hand-over is made again,
    // with a new container root and so a new pid.
    let mut failures = Vec::new();
    let (mut receiver, mut out, old_pid, mut taker) = loop {
        match hand_over_and_take_the_pid(&mut node, &status, &get, failures.len()) {
            Ok(done) => break done,
            Err(why) if failures.len() < 20 => {
                eprintln!(
                    "setup try {} failed, trying again: {why}",
                    failures.len() + 1
                );
                failures.push(why);
            }
            Err(why) => panic!("setup failed 21 times: {why}; before: {failures:?}"),
        }
    };
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "inherited",
        "the attacker holds the connection"
    );
    assert_eq!(taker.id(), old_pid);

    receiver.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        line.clear();
        out.read_line(&mut line).unwrap();
        answers.push(line.clone());
    }
    let _ = wait_child(&mut receiver, Duration::from_secs(20));
    let _ = taker.kill();
    let _ = taker.wait();

    for (what, answer) in ["status", "get of the victim's task"].iter().zip(&answers) {
        assert!(!answer.contains(SECRET), "{what} leaked: {answer}");
        let answer = parse(answer);
        assert_eq!(
            code_of(&answer),
            "forbidden",
            "{what} over a connection whose pid now names a host process of uid {ATTACKER}: {answer}"
        );
    }
    let logs = node.logs();
    assert!(!logs.contains(SECRET));
    assert!(
        logs.lines()
            .any(|l| l.contains("op=status") && l.contains("host_root=false")),
        "{logs}"
    );
    // Real host root still is.
    let served = node.request(json!({"op": "status"}));
    assert_eq!(code_of(&served), "", "host root's status: {served}");
}

#[test]
#[ignore = "needs root: enters a pid namespace (unshare) as root"]
fn root_in_its_own_pid_namespace_is_not_host_root_and_host_root_is() {
    let test = "root_in_its_own_pid_namespace_is_not_host_root_and_host_root_is";
    if !has_unshare(test) {
        return;
    }
    let (node, task) = node_with_victim_task();
    let [status, get] = requests(&task);
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c", CALLER])
        .arg(&node.socket)
        .args([&status, &get])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(SECRET), "{text}");
    let answers: Vec<Value> = text.lines().map(parse).collect();
    assert_eq!(answers.len(), 2, "{text}");
    for answer in &answers {
        assert_eq!(code_of(answer), "forbidden", "{answer}");
    }
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("host root")),
        "{}",
        answers[0]
    );
    let served = node.request(json!({"op": "status"}));
    assert_eq!(code_of(&served), "", "host root's status: {served}");
    let value = node.get(&task, "DB");
    assert_eq!(value["value"], SECRET, "host root reads any task");
    // How callers are identified is said once, at start.
    let logs = node.logs();
    let said: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("callers identified at accept by pidfd")
                || l.contains("this kernel cannot attest the caller")
        })
        .collect();
    assert_eq!(said.len(), 1, "{logs}");
}

/// Root in a container without a user namespace of its own keeps CAP_SETUID over the host's
/// uids: it can become the victim's uid before it connects, and SO_PEERCRED then reports that
/// uid. On the host socket a caller outside the agent's pid namespace is therefore no uid at
/// all: it is refused and pointed at its task's own socket, whatever uid it shows.
#[test]
#[ignore = "needs root: enters a pid namespace (unshare) and takes the victim's uid inside it"]
fn container_root_that_takes_the_victims_uid_gets_nothing_on_the_host_socket() {
    let test = "container_root_that_takes_the_victims_uid_gets_nothing_on_the_host_socket";
    if !has_unshare(test) {
        return;
    }
    let (node, task) = node_with_victim_task();
    let get = json!({"op": "get", "name": "DB", "task": task}).to_string();
    let env = json!({"op": "env", "task": task}).to_string();
    let list = json!({"op": "list", "task": task}).to_string();
    // Root inside, it takes the victim's uid (argv[1]), modules loaded first, then talks as
    // CALLER does.
    let as_uid = format!(
        "import os, socket, sys\nuid = int(sys.argv.pop(1))\nos.setgroups([])\nos.setgid(uid)\nos.setuid(uid)\n{CALLER}"
    );
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c", &as_uid])
        .arg(VICTIM.to_string())
        .arg(&node.socket)
        .args([&get, &env, &list])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = text.lines().map(parse).collect();
    assert_eq!(
        answers.len(),
        3,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for answer in &answers {
        assert!(!answer.to_string().contains(SECRET), "leaked: {answer}");
        assert_eq!(code_of(answer), "forbidden", "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("task's own socket")),
            "{answer}"
        );
    }
    assert!(!node.logs().contains(SECRET));
    // The same uid on the host itself is served, so the refusal above is about where it runs.
    let own =
        nodeseal_testkit::request_as(VICTIM, &node.socket, &serde_json::from_str(&get).unwrap());
    assert_eq!(
        own["value"], SECRET,
        "the victim on the host reads its task: {own}"
    );
}

/// Holds argv[2] connections to argv[1], then one more, prints that one's answer (the agent
/// writes a refusal without being asked), says `holding` and keeps them all until stdin closes.
const HOLDER: &str = r#"
import socket, sys
held = []
for _ in range(int(sys.argv[2]) + 1):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sys.argv[1])
    held.append(c)
buf = b""
while not buf.endswith(b"\n"):
    chunk = held[-1].recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode().strip() or "EOF", flush=True)
print("holding", flush=True)
sys.stdin.read()
"#;

/// Container root is uid 0 too, but not host root: holding every connection uid 0 may have must
/// not lock host root out of `status`, `revoke` and `restore` (or its reads). Its own limit
/// still binds it.
#[test]
#[ignore = "needs root: enters a pid namespace (unshare) as root"]
fn container_root_holding_uid_0s_connections_does_not_lock_out_host_root() {
    let test = "container_root_holding_uid_0s_connections_does_not_lock_out_host_root";
    if !has_unshare(test) {
        return;
    }
    const PER_UID: usize = 8;
    let (node, task) =
        node_with_victim_task_and(json!({"limits": {"max_connections_per_uid": PER_UID}}));
    let mut holder = Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c", HOLDER])
        .arg(&node.socket)
        .arg(PER_UID.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run unshare");
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut over = String::new();
    out.read_line(&mut over).unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let status = node.try_request(&json!({"op": "status"}));
    let value = node.try_request(&json!({"op": "get", "name": "DB", "task": task}));
    drop(holder.stdin.take());
    let _ = wait_child(&mut holder, Duration::from_secs(20));
    assert_eq!(
        line.trim(),
        "holding",
        "the container holds its connections"
    );
    let over = parse(over.trim());
    assert_eq!(code_of(&over), "busy", "container root's own limit: {over}");
    let status = status.expect("no answer to host root's status");
    assert_eq!(
        code_of(&status),
        "",
        "host root's status while container root holds uid 0's share: {status}"
    );
    assert_eq!(value.map(|v| v["value"].clone()), Some(json!(SECRET)));
}

/// Root (argv[3:] the uids to take, argv[2] connections each): holds that many connections to
/// argv[1] under each uid, taken with seteuid so that it can come back, says `holding` once the
/// agent has answered a request on the last one, and keeps them all until stdin closes.
const SPREADER: &str = r#"
import os, socket, sys
held = []
for uid in sys.argv[3:]:
    os.seteuid(int(uid))
    for _ in range(int(sys.argv[2])):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sys.argv[1])
        held.append(c)
    os.seteuid(0)
held[-1].sendall(b'{"op":"health"}\n')
held[-1].recv(65536)
print("holding", len(held), flush=True)
sys.stdin.read()
"#;

/// Container root can take any uid: holding every uid's share of connections under enough
/// uids would fill the agent's whole connection budget. Host root must still get `status`.
#[test]
#[ignore = "needs root: enters a pid namespace (unshare) as root and connects as many uids"]
fn container_root_filling_the_connection_budget_under_many_uids_does_not_lock_out_host_root() {
    let test =
        "container_root_filling_the_connection_budget_under_many_uids_does_not_lock_out_host_root";
    if !has_unshare(test) {
        return;
    }
    const PER_UID: usize = 4;
    const ALL: usize = 16;
    let (node, _task) = node_with_victim_task_and(json!({"limits": {
        "max_connections_per_uid": PER_UID,
        "max_connections": ALL,
    }}));
    let uids: Vec<String> = (0..ALL / PER_UID).map(|i| (5100 + i).to_string()).collect();
    let mut spreader = Command::new("unshare")
        .args(["--pid", "--fork", "python3", "-c", SPREADER])
        .arg(&node.socket)
        .arg(PER_UID.to_string())
        .args(&uids)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot run unshare");
    let mut out = BufReader::new(spreader.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let status = node.try_request(&json!({"op": "status"}));
    drop(spreader.stdin.take());
    let _ = wait_child(&mut spreader, Duration::from_secs(20));
    assert_eq!(
        line.trim(),
        format!("holding {ALL}"),
        "the container holds the whole budget"
    );
    let status = status.expect("no answer to host root's status");
    assert_eq!(
        code_of(&status),
        "",
        "host root's status while container root holds every connection: {status}"
    );
}

/// Root that enters a user namespace of its own is still uid 0 to SO_PEERCRED and still in the
/// host's pid namespace, but has no capability over the host any more (a sandbox, systemd's
/// `PrivateUsers=`): it is not host root. An ordinary uid that maps itself to root in a user
/// namespace is still its own uid to the agent.
#[test]
#[ignore = "needs root: enters user namespaces (unshare) as root and as another uid"]
fn root_in_a_user_namespace_of_its_own_is_not_host_root() {
    let test = "root_in_a_user_namespace_of_its_own_is_not_host_root";
    if !has_unshare(test) {
        return;
    }
    let (node, task) = node_with_victim_task();
    let [status, get] = requests(&task);
    for how in [&["--user", "--map-root-user"][..], &["--user"][..]] {
        let out = Command::new("unshare")
            .args(how)
            .args(["python3", "-c", CALLER])
            .arg(&node.socket)
            .args([&status, &get])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains(SECRET), "unshare {how:?}: {text}");
        let answers: Vec<Value> = text.lines().map(parse).collect();
        assert_eq!(answers.len(), 2, "unshare {how:?}: {text}");
        for answer in &answers {
            assert_eq!(code_of(answer), "forbidden", "unshare {how:?}: {answer}");
        }
    }
    let mut own_userns = Command::new("unshare");
    own_userns
        .args(["--user", "--map-root-user", "python3", "-c", CALLER])
        .arg(&node.socket)
        .arg(&get)
        .uid(ATTACKER)
        .gid(ATTACKER);
    let out = own_userns.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        assert!(!text.contains(SECRET), "{text}");
        let answer = parse(text.trim());
        // Another uid's task answers as a missing one would (nothing to probe).
        assert_eq!(code_of(&answer), "not_found", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(&format!("uid {ATTACKER} ")), "{answer}");
    } else {
        eprintln!(
            "unprivileged user namespaces are not allowed here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let served = node.request(json!({"op": "status"}));
    assert_eq!(code_of(&served), "", "host root's status: {served}");
    assert!(!node.logs().contains(SECRET));
}
