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
