//! The task side against a real agent: `nodeseal-client` get/env/list/exec and its exit codes,
//! `docker-credential-nodeseal`, the Python module, and per-task sockets used from a
//! "container" (root in its own pid and mount namespaces, seeing one task directory).

use nodeseal_testkit::{bin, run_with_stdin};
use nodeseal_testkit::{wait_until, Node};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const DB: &str = "db-Secret-client-e2e";
const REG_PW: &str = "registry-Pw-client-e2e";
const BOUND_VALUE: &str = "bound-Secret-client-e2e";

struct Fixture {
    node: Node,
    cert: nodeseal_testkit::Cert,
    task: PathBuf,
    /// Another task of the same job, with one plain value.
    plain_task: PathBuf,
    /// A task whose values cannot all be opened (unknown key, expired): `env` on it fails whole.
    broken_task: PathBuf,
    /// Sealed for this fixture's task (`task:job-c/task-c`) with the pool key, name `BOUND`.
    bound_token: String,
    /// Like `foreign_token`, but sealed for this fixture's task: the policy lets the task open
    /// it, and only the missing key stops it.
    foreign_bound_token: String,
}

/// Seal `value` for `cert` as the agent's own library does, bound to `name` and `audience`
/// (`nodeseal seal` gains `--audience` separately).
fn seal_bound(cert: &nodeseal_testkit::Cert, name: &str, value: &str, audience: &[&str]) -> String {
    use nodeseal_envelope::{token, Recipient, SealOptions};
    let recipient = Recipient::load(&cert.crt, None).unwrap();
    token::seal(
        value.as_bytes(),
        &[recipient],
        &SealOptions {
            name: Some(name.to_owned()),
            not_after: None,
            audience: audience.iter().map(|s| s.parse().unwrap()).collect(),
        },
    )
    .unwrap()
}

fn fixture() -> Fixture {
    let mut node = Node::new();
    let cert = node.create_cert("pool");
    let other = node.create_cert("elsewhere");
    node.drop_pfx(&cert);
    let task = node.task("job-c", "task-c");
    let db = node.seal(&cert, Some("DB_PASSWORD"), DB, "v1");
    let reg = node.seal(&cert, None, REG_PW, "shipyard");
    let foreign = node.seal(&other, Some("FOREIGN"), "never", "v1");
    let foreign_bound = seal_bound(&other, "FOREIGN", "never", &["task:job-c/task-c"]);
    let bound = seal_bound(&cert, "BOUND", BOUND_VALUE, &["task:job-c/task-c"]);
    let bound_in_file = seal_bound(&cert, "BOUND_IN_FILE", BOUND_VALUE, &["job:job-c"]);
    let expired = {
        let out = run_with_stdin(
            Command::new(bin("nodeseal"))
                .args([
                    "seal",
                    "--name",
                    "OLD",
                    "--not-after",
                    "2000-01-01T00:00:00Z",
                    "--cert",
                ])
                .arg(&cert.crt),
            b"stale",
        );
        // Sealing an already-expired token is refused; fall back to a v1 token that is.
        if out.status.success() {
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        } else {
            String::new()
        }
    };
    node.write_env(
        &task,
        &format!(
            "DB_PASSWORD={db}\nDOCKER_LOGIN_SERVER=myregistry.azurecr.io\nDOCKER_LOGIN_USERNAME=puller\nDOCKER_LOGIN_PASSWORD={reg}\nPLAIN=it's \"quoted\" $HOME\nBOUND_IN_FILE={bound_in_file}\n"
        ),
    );
    let broken_task = node.task("job-c", "task-broken");
    let mut env = format!("FOREIGN={foreign}\n");
    if !expired.is_empty() {
        env.push_str(&format!("OLD={expired}\n"));
    }
    node.write_env(&broken_task, &env);
    let plain_task = node.task("job-c", "task-plain");
    node.write_env(&plain_task, "ONLY=plain\n");
    node.start();
    Fixture {
        node,
        cert,
        task,
        plain_task,
        broken_task,
        bound_token: bound,
        foreign_bound_token: foreign_bound,
    }
}

impl Fixture {
    fn client(&self) -> Command {
        let mut c = Command::new(bin("nodeseal-client"));
        c.env("NODESEAL_SOCKET", &self.node.socket)
            .env("AZ_BATCH_TASK_DIR", &self.task)
            .env("NODESEAL_RETRY_SECS", "2");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.client().args(args).output().unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn get_env_list_and_exit_codes() {
    let f = fixture();
    let out = f.run(&["get", "DB_PASSWORD"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{DB}\n"));
    assert_eq!(
        text(&f.run(&["get", "DOCKER_LOGIN_PASSWORD"]).stdout).trim(),
        REG_PW
    );

    // A job-bound token in the task's env file is served to the task like any other value.
    assert_eq!(
        text(&f.run(&["get", "BOUND_IN_FILE"]).stdout).trim(),
        BOUND_VALUE
    );

    let list = text(&f.run(&["list"]).stdout);
    assert!(list.lines().any(|l| l == "DB_PASSWORD"), "{list}");
    assert!(!list.contains(DB));

    // `export` output is safe to eval: run it through a real shell.
    let export = f.run(&["env", "--format", "export"]);
    assert_eq!(export.status.code(), Some(0), "{}", text(&export.stderr));
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("{}\nprintf '%s' \"$PLAIN\"", text(&export.stdout)))
        .output()
        .unwrap();
    assert_eq!(text(&sh.stdout), "it's \"quoted\" $HOME");
    let json: serde_json::Value =
        serde_json::from_slice(&f.run(&["env", "--format", "json"]).stdout).unwrap();
    assert_eq!(json["DB_PASSWORD"], DB);

    // sysexits: not found 66, retryable 75, unreachable 69, usage 64.
    let missing = f.run(&["get", "NOPE"]);
    assert_eq!(missing.status.code(), Some(66));
    assert!(missing.stdout.is_empty());
    let broken = f.broken_task.to_str().unwrap();
    let foreign = f.run(&["--task", broken, "get", "FOREIGN"]);
    assert_eq!(foreign.status.code(), Some(75), "{}", text(&foreign.stderr));
    let unreachable = f
        .client()
        .env("NODESEAL_SOCKET", f.node.root.join("nope.sock"))
        .env("NODESEAL_RETRY_SECS", "0")
        .args(["get", "DB_PASSWORD"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(69));
    assert_eq!(f.run(&["frobnicate"]).status.code(), Some(64));
    if text(&f.run(&["--task", broken, "list"]).stdout).contains("OLD") {
        assert_eq!(
            f.run(&["--task", broken, "get", "OLD"]).status.code(),
            Some(65)
        );
    }
    // `env` is all or nothing: a job never starts with some of its secrets silently missing.
    assert_eq!(f.run(&["--task", broken, "env"]).status.code(), Some(75));
    // No secret ever reaches stderr.
    for out in [&missing, &foreign, &unreachable] {
        assert!(!text(&out.stderr).contains(DB) && !text(&out.stderr).contains(REG_PW));
    }
}

#[test]
fn exec_replaces_tokens_in_the_commands_environment() {
    let f = fixture();
    let out = f
        .client()
        .env("PRESENTED", "keep-me")
        .args(["exec", "--only", "DB_PASSWORD", "--", "/usr/bin/env"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let env = text(&out.stdout);
    assert!(
        env.lines().any(|l| l == format!("DB_PASSWORD={DB}")),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "PRESENTED=keep-me"));
    assert!(
        !env.contains("DOCKER_LOGIN_PASSWORD="),
        "--only filters: {env}"
    );
    // A token in the client's own environment, sealed for this task: `exec` opens it with the
    // task it runs in (the agent matches the token's task selector against it).
    let out = f
        .client()
        .env("BOUND", &f.bound_token)
        .args(["exec", "--only", "BOUND", "--", "/usr/bin/env"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l == format!("BOUND={BOUND_VALUE}")),
        "{}",
        text(&out.stdout)
    );
    // The same token presented from another task of the job is not for it: forbidden (77).
    let other_task = f.plain_task.to_str().unwrap();
    let out = f
        .client()
        .env("BOUND", &f.bound_token)
        .args([
            "--task",
            other_task,
            "exec",
            "--only",
            "BOUND",
            "--",
            "/usr/bin/env",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(BOUND_VALUE));
    // A token for this task whose key is not here stays unopened: exit 75.
    let out = f
        .client()
        .env("FOREIGN", &f.foreign_bound_token)
        .args(["exec", "--only", "DB_PASSWORD", "--", "/usr/bin/env"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
}

#[test]
fn docker_credential_helper_serves_registry_logins() {
    let f = fixture();
    let mut helper = Command::new(bin("docker-credential-nodeseal"));
    helper
        .env("NODESEAL_SOCKET", &f.node.socket)
        .env("AZ_BATCH_TASK_DIR", &f.task)
        .arg("get");
    let out = run_with_stdin(&mut helper, b"https://myregistry.azurecr.io/v2/\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let creds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        creds,
        serde_json::json!({"ServerURL": "https://myregistry.azurecr.io/v2/", "Username": "puller", "Secret": REG_PW})
    );
    let mut helper = Command::new(bin("docker-credential-nodeseal"));
    helper
        .env("NODESEAL_SOCKET", &f.node.socket)
        .env("AZ_BATCH_TASK_DIR", &f.task)
        .arg("get");
    let out = run_with_stdin(&mut helper, b"other.example.com");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout).trim(),
        "credentials not found in native keychain"
    );
    // `docker login` with the sealed login is kept (nothing written); another password is not.
    let store = |secret: &str| {
        let mut helper = Command::new(bin("docker-credential-nodeseal"));
        helper
            .env("NODESEAL_SOCKET", &f.node.socket)
            .env("AZ_BATCH_TASK_DIR", &f.task)
            .arg("store");
        let creds = serde_json::json!({"ServerURL": "myregistry.azurecr.io", "Username": "puller", "Secret": secret});
        run_with_stdin(&mut helper, creds.to_string().as_bytes())
    };
    let kept = store(REG_PW);
    assert_eq!(kept.status.code(), Some(0), "{}", text(&kept.stdout));
    let refused = store("not-the-sealed-one");
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stdout).contains("not the one nodeseal serves"));
    assert!(!text(&refused.stdout).contains(REG_PW) && !text(&refused.stderr).contains(REG_PW));
}

#[test]
fn docker_credential_helper_opens_a_bound_password_from_its_environment() {
    let f = fixture();
    let out = run_with_stdin(
        Command::new(bin("docker-credential-nodeseal"))
            .env("NODESEAL_SOCKET", &f.node.socket)
            .env("AZ_BATCH_TASK_DIR", &f.task)
            .env("NODESEAL_REGISTRY_X_SERVER", "bound.example.com")
            .env("NODESEAL_REGISTRY_X_USERNAME", "robot")
            .env("NODESEAL_REGISTRY_X_PASSWORD", seal_bound_for_helper(&f))
            .arg("get"),
        b"bound.example.com",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let creds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(creds["Secret"], BOUND_VALUE);
}

/// The fixture's bound value, sealed under the helper's variable name.
fn seal_bound_for_helper(f: &Fixture) -> String {
    seal_bound(
        &f.cert,
        "NODESEAL_REGISTRY_X_PASSWORD",
        BOUND_VALUE,
        &["task:job-c/task-c"],
    )
}

#[test]
fn python_module_reads_from_a_real_agent() {
    let f = fixture();
    let module_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/python");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import nodeseal_client as n, os, sys; c = n.Client(); sys.stdout.write(c.get('DB_PASSWORD').reveal() + ' ' + c.open(os.environ['BOUND'], 'BOUND').reveal())")
        .env("BOUND", &f.bound_token)
        .env("PYTHONPATH", module_dir)
        .env("NODESEAL_SOCKET", &f.node.socket)
        .env("AZ_BATCH_TASK_DIR", &f.task)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{DB} {BOUND_VALUE}"));
}

#[test]
#[ignore = "needs root: owns env files as other uids and enters pid and mount namespaces (unshare)"]
fn a_root_container_gets_its_own_task_through_the_task_socket_and_nothing_else() {
    if Command::new("unshare").arg("--version").output().is_err() {
        nodeseal_testkit::unavailable_here(
            "a_root_container_gets_its_own_task_through_the_task_socket_and_nothing_else",
            "unshare (util-linux) is not installed",
        );
        return;
    }
    let mut node = Node::new();
    let cert = node.create_cert("pool");
    node.drop_pfx(&cert);
    let mine = node.task("job-x", "mine");
    let theirs = node.task("job-y", "theirs");
    node.write_env(
        &mine,
        &format!(
            "MINE={}\n",
            node.seal(&cert, Some("MINE"), "mine-Secret", "v1")
        ),
    );
    node.write_env(
        &theirs,
        &format!(
            "THEIRS={}\n",
            node.seal(&cert, Some("THEIRS"), "theirs-Secret", "v1")
        ),
    );
    std::os::unix::fs::chown(mine.join("wd/.shipyard.envlist"), Some(4242), Some(4242)).unwrap();
    std::os::unix::fs::chown(theirs.join("wd/.shipyard.envlist"), Some(4243), Some(4243)).unwrap();
    node.start();
    let sock = mine.join("nodeseal.sock");
    assert!(
        wait_until(Duration::from_secs(5), || sock.exists()),
        "{}",
        node.logs()
    );
    let meta = fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.uid(), 4242, "task socket belongs to the task's user");
    assert_eq!(meta.mode() & 0o777, 0o600);

    // The "container": root, new pid and mount namespaces, only `mine` visible under workitems.
    let stage = node.root.join("stage");
    fs::create_dir_all(&stage).unwrap();
    let client = bin("nodeseal-client");
    let script = format!(
        r#"set -u
mount --bind '{mine}' '{stage}'
mount -t tmpfs tmpfs '{workitems}'
mkdir -p '{mine}' && mount --bind '{stage}' '{mine}'
run() {{ out=$("$@" 2>/dev/null); echo "$? $out"; }}
echo "visible $(ls '{workitems}')"
run '{client}' --socket '{sock}' --task '{mine}' get MINE
run '{client}' --socket '{sock}' --task '{theirs}' get THEIRS
run '{client}' --socket '{host}' --task '{theirs}' get THEIRS
run '{client}' --socket '{host}' --task '{mine}' get MINE
"#,
        mine = mine.display(),
        theirs = theirs.display(),
        stage = stage.display(),
        workitems = node.workitems.display(),
        client = client.display(),
        sock = sock.display(),
        host = node.socket.display(),
    );
    let out = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .env("NODESEAL_RETRY_SECS", "1")
        .output()
        .unwrap();
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines.len(),
        5,
        "stdout: {lines:?}\nstderr: {}",
        text(&out.stderr)
    );
    assert_eq!(lines[0], "visible job-x", "the container sees one task");
    assert_eq!(
        lines[1], "0 mine-Secret",
        "own task through the task socket"
    );
    assert_eq!(lines[2], "77 ", "another task through this task's socket");
    assert_eq!(
        lines[3], "77 ",
        "container root on the host socket is not host root"
    );
    assert_eq!(lines[4], "77 ", "not even for its own task");
    let logs = node.logs();
    assert!(!logs.contains("theirs-Secret"));
    assert!(logs
        .lines()
        .any(|l| l.contains("host_root=false") && l.contains("outcome=forbidden")));

    // The task ends: its socket goes away with it.
    fs::remove_dir_all(node.workitems.join("job-x")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !sock.exists()));
}

/// Two keys of one size and no `legacy_key` (every Shipyard migration that adds a second 4096-bit
/// key): a legacy value can never be opened until an operator names the key, so the client must
/// not exit 75 (Batch would requeue forever) but 78, and `check` must say so before any task runs.
#[test]
fn an_ambiguous_legacy_key_exits_78_and_check_warns_first() {
    let mut node = Node::new();
    let a = node.create_cert("first");
    let b = node.create_cert("second");
    node.drop_pfx(&a);
    node.drop_pfx(&b);
    let task = node.task("job-amb", "task-amb");
    let legacy = node.seal(&a, None, "ambiguous-legacy-pw", "shipyard");
    node.write_env(
        &task,
        &format!("DOCKER_LOGIN_PASSWORD={legacy}\nPLAIN=fine\n"),
    );
    let check = Command::new(bin("nodeseal-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("check")
        .output()
        .unwrap();
    let report = text(&check.stdout);
    let warning = report
        .lines()
        .find(|l| l.starts_with("WARNING") && l.contains("legacy_key"))
        .unwrap_or_else(|| panic!("no legacy_key warning in:\n{report}"));
    assert!(
        warning.contains(&a.thumbprint) && warning.contains(&b.thumbprint),
        "{warning}"
    );
    assert!(!report.contains("(BatchCerts)"), "{report}");

    node.start();
    let socket = node.socket.clone();
    let get = |name: &str| {
        Command::new(bin("nodeseal-client"))
            .env("NODESEAL_SOCKET", &socket)
            .env("NODESEAL_RETRY_SECS", "1")
            .arg("--task")
            .arg(&task)
            .args(["get", name])
            .output()
            .unwrap()
    };
    let out = get("DOCKER_LOGIN_PASSWORD");
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("config_error"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("legacy_key"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&get("PLAIN").stdout), "fine\n");
    let wire = node
        .request(serde_json::json!({"op": "get", "name": "DOCKER_LOGIN_PASSWORD", "task": task}));
    assert_eq!(wire["error"]["code"], "config_error", "{wire}");
    assert_eq!(wire["error"]["retryable"], false, "{wire}");

    // Naming the key resolves it, and check is quiet about it.
    node.write_config(serde_json::json!({"legacy_key": a.thumbprint}));
    node.reload();
    assert_eq!(
        text(&get("DOCKER_LOGIN_PASSWORD").stdout),
        "ambiguous-legacy-pw\n"
    );
}

/// A client matching answers to requests by `id` must get its id back on every error answer,
/// including lines the agent cannot parse as a request.
#[test]
fn every_error_answer_echoes_the_request_id() {
    let mut node = Node::new();
    node.start();
    let cases = [
        serde_json::json!({"op": "steal", "id": 42}),
        serde_json::json!({"id": "corr-1", "op": "get", "name": 7}),
        serde_json::json!({"id": {"n": [1, 2]}, "op": "get"}),
        serde_json::json!({"id": null, "op": "list", "surprise": true}),
        serde_json::json!({"id": 9, "v": "one", "op": "health"}),
        serde_json::json!({"id": 10, "v": 2, "op": "health"}),
        serde_json::json!({"id": 11, "op": "get", "name": "NOPE", "task": "/nowhere"}),
    ];
    for req in cases {
        let answer = node.request(req.clone());
        assert_eq!(answer["ok"], false, "{req} -> {answer}");
        let echoed = answer.as_object().unwrap().get("id");
        assert_eq!(echoed, req.get("id"), "{req} -> {answer}");
    }
    // Without an id, none is invented.
    let answer = node.request(serde_json::json!({"op": "steal"}));
    assert!(answer.get("id").is_none(), "{answer}");
}

fn agent_cli(node: &Node, args: &[&str]) -> Output {
    Command::new(bin("nodeseal-agent"))
        .arg("--config")
        .arg(&node.config_path)
        .args(args)
        .output()
        .unwrap()
}

/// Operator rough edges: `status` honours the `--socket`/`NODESEAL_SOCKET` its error message
/// names, `revoke` of a key the node does not hold says so, `check` names source kinds as the
/// config spells them, and `demo --keep` prints how to look at the running agent.
#[test]
#[ignore = "needs root: status and revoke answer host root only"]
fn operator_commands_do_what_their_messages_say() {
    let mut node = Node::new();
    let cert = node.create_cert("ops");
    node.drop_pfx(&cert);
    node.start();
    let elsewhere = node.root.join("not-the-agent.sock");
    // A config pointing nowhere: only --socket or NODESEAL_SOCKET can find the agent.
    let bogus_config = node.root.join("bogus.json");
    fs::write(
        &bogus_config,
        serde_json::json!({"socket_path": elsewhere}).to_string(),
    )
    .unwrap();
    let status = |extra_env: Option<&Path>, args: &[&str]| {
        let mut c = Command::new(bin("nodeseal-agent"));
        c.arg("--config").arg(&bogus_config).args(args);
        match extra_env {
            Some(s) => c.env("NODESEAL_SOCKET", s),
            None => c.env_remove("NODESEAL_SOCKET"),
        };
        c.output().unwrap()
    };
    let unreachable = status(None, &["keys"]);
    assert!(!unreachable.status.success());
    let why = text(&unreachable.stderr);
    assert!(
        why.contains("--socket") && why.contains("NODESEAL_SOCKET"),
        "{why}"
    );
    let by_flag = status(None, &["keys", "--socket", node.socket.to_str().unwrap()]);
    assert!(by_flag.status.success(), "{}", text(&by_flag.stderr));
    assert!(text(&by_flag.stdout).contains(&cert.thumbprint));
    let by_env = status(Some(&node.socket), &["keys"]);
    assert!(by_env.status.success(), "{}", text(&by_env.stderr));
    assert!(text(&by_env.stdout).contains(&cert.thumbprint));

    // Revoking a thumbprint the node has never seen is kept, but not reported as if it were
    // a loaded key.
    let unknown = "ab".repeat(20);
    let revoked = agent_cli(&node, &["revoke", &unknown]);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let info: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(info["known"], false, "{info}");
    assert!(
        text(&revoked.stderr).contains("no key with thumbprint"),
        "{}",
        text(&revoked.stderr)
    );
    let known = agent_cli(&node, &["revoke", &cert.thumbprint]);
    let info: serde_json::Value = serde_json::from_slice(&known.stdout).unwrap();
    assert_eq!(info["known"], true, "{info}");
    assert!(text(&known.stderr).is_empty(), "{}", text(&known.stderr));
    assert!(agent_cli(&node, &["restore", &cert.thumbprint])
        .status
        .success());
    assert!(agent_cli(&node, &["restore", &unknown]).status.success());

    // A key source whose directory is missing is named by its config kind.
    node.write_config(serde_json::json!({
        "key_sources": [{"kind": "batch_certs", "path": node.root.join("no-such-dir"), "ingest": true}]
    }));
    let check = agent_cli(&node, &["check"]);
    let report = text(&check.stdout);
    assert!(
        report.contains("(batch_certs): directory does not exist"),
        "{report}"
    );
    assert!(!report.contains("BatchCerts"), "{report}");
}

#[test]
#[ignore = "needs root: the commands `demo --keep` prints for status and keys answer host root only"]
fn demo_keep_prints_commands_that_work() {
    use std::io::{BufRead, BufReader};
    let mut demo = Command::new(bin("nodeseal-agent"))
        .args(["demo", "--keep"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut commands = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let line = line.trim();
        if let Some(cmd) = line.strip_prefix("nodeseal-agent ") {
            commands.push(cmd.to_owned());
            if commands.len() == 2 {
                break;
            }
        }
    }
    let outputs: Vec<Output> = commands
        .iter()
        .map(|c| {
            Command::new(bin("nodeseal-agent"))
                .args(c.split_whitespace())
                .output()
                .unwrap()
        })
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = nodeseal_testkit::wait_child(&mut demo, Duration::from_secs(10));
    assert_eq!(commands.len(), 2, "demo --keep printed {commands:?}");
    assert!(
        commands[0].ends_with(" status") && commands[1].ends_with(" keys"),
        "{commands:?}"
    );
    for (cmd, out) in commands.iter().zip(&outputs) {
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    }
    assert!(
        text(&outputs[0].stdout).contains("Keys:"),
        "{}",
        text(&outputs[0].stdout)
    );
    assert!(status.success(), "demo exit {status:?}");
}

/// An env file as a real HPC task writes it (`env | grep -v …` with an exported bash function, a
/// byte-order mark, names Docker accepts but a shell does not, a plain value that only looks like
/// a legacy ciphertext): every servable value is served, each skipped line is reported with its
/// line and reason, and the one value that cannot be opened is reported by name without failing
/// `env` for the others.
#[test]
fn docker_env_file_grammar_and_one_bad_value_hides_nothing() {
    let mut node = Node::new();
    let cert = node.create_cert("grammar");
    node.drop_pfx(&cert);
    let task = node.task("job-g", "task-g");
    let db = node.seal(&cert, Some("DB_PASSWORD"), "grammar-db-Secret", "v1");
    // 256 bytes in base64: legacy_by_length takes it for a 2048-bit ciphertext, but it is not
    // one (all ones is above any 2048-bit modulus, so it fails the same way on every run).
    let fake_legacy =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0xffu8; 256]);
    let body = format!(
        "\u{feff}FIRST=bom-ok\nBASH_FUNC_module%%=() {{  eval `modulecmd bash $*`\n  x=1\n}}\nmy-var=dash\na.b=dot\n1ABC=digit\nNÄME=umlaut\nA B=spaced\nLOOKS_LEGACY={fake_legacy}\nDB_PASSWORD={db}\n"
    );
    node.write_env(&task, &body);
    node.start();
    let socket = node.socket.clone();
    let client = |args: &[&str]| {
        Command::new(bin("nodeseal-client"))
            .env("NODESEAL_SOCKET", &socket)
            .env("NODESEAL_RETRY_SECS", "1")
            .arg("--task")
            .arg(&task)
            .args(args)
            .output()
            .unwrap()
    };
    let list = client(&["list"]);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    let names: Vec<String> = text(&list.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        names,
        [
            "FIRST",
            "my-var",
            "a.b",
            "1ABC",
            "NÄME",
            "LOOKS_LEGACY",
            "DB_PASSWORD"
        ],
        "{}",
        node.logs()
    );
    let why = text(&list.stderr);
    for (line, reason) in [
        (2, "exported bash function"),
        (3, "body of the exported bash function on line 2"),
        (4, "body of the exported bash function on line 2"),
        (9, "whitespace"),
    ] {
        assert!(
            why.lines()
                .any(|l| l.contains(&format!("line {line} skipped")) && l.contains(reason)),
            "line {line}: {why}"
        );
    }
    let wire = node.request(serde_json::json!({"op": "list", "task": task}));
    assert_eq!(wire["skipped"][0]["line"], 2, "{wire}");
    assert_eq!(wire["skipped"][0]["name"], "BASH_FUNC_module%%", "{wire}");

    for (name, value) in [("FIRST", "bom-ok"), ("my-var", "dash"), ("NÄME", "umlaut")] {
        assert_eq!(text(&client(&["get", "-n", name]).stdout), value, "{name}");
    }
    let func = client(&["get", "BASH_FUNC_module%%"]);
    assert_eq!(func.status.code(), Some(66));
    assert!(
        text(&func.stderr).contains("line 2") && text(&func.stderr).contains("bash function"),
        "{}",
        text(&func.stderr)
    );

    // `env` on the wire: every value that opens, and the one that does not by name.
    let env = node.request(serde_json::json!({"op": "env", "task": task}));
    assert_eq!(env["ok"], true, "{env}");
    let served: Vec<&str> = env["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        served.contains(&"DB_PASSWORD") && served.contains(&"my-var"),
        "{env}"
    );
    assert!(!served.contains(&"LOOKS_LEGACY"), "{env}");
    assert_eq!(env["errors"][0]["name"], "LOOKS_LEGACY", "{env}");
    assert_eq!(env["errors"][0]["error"]["code"], "bad_token", "{env}");
    // The CLI's `env` stays all or nothing (a job never starts with a value silently missing)
    // and names what failed; `exec --only` runs with the values it asked for.
    let all = client(&["env"]);
    assert_eq!(all.status.code(), Some(65), "{}", text(&all.stderr));
    assert!(
        text(&all.stderr).contains("LOOKS_LEGACY"),
        "{}",
        text(&all.stderr)
    );
    assert!(all.stdout.is_empty());
    let exec = client(&["exec", "--only", "DB_PASSWORD,my-var", "--", "/usr/bin/env"]);
    assert_eq!(exec.status.code(), Some(0), "{}", text(&exec.stderr));
    assert!(text(&exec.stdout)
        .lines()
        .any(|l| l == "DB_PASSWORD=grammar-db-Secret"));
    assert!(text(&exec.stdout).lines().any(|l| l == "my-var=dash"));
    assert!(!node.logs().contains("grammar-db-Secret"));
}
