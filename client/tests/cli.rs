//! The `nodeseal-client` program against a fake agent.

mod common;

use common::{err, ok, standard, FakeAgent};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nodeseal-client");

/// The CLI with discovery variables cleared, so only what a test sets counts.
fn cli(socket: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--socket").arg(socket);
    for v in [
        "NODESEAL_SOCKET",
        "AZ_BATCH_TASK_DIR",
        "AZ_BATCH_TASK_WORKING_DIR",
    ] {
        c.env_remove(v);
    }
    c.env("NODESEAL_RETRY_SECS", "0.2");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn get_prints_only_the_value() {
    let agent = FakeAgent::start(standard);
    let o = run(cli(&agent.path).args(["get", "PW"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, b"hunter2\n");
    assert!(o.stderr.is_empty());
    let o = run(cli(&agent.path).args(["get", "--no-newline", "PW"]));
    assert_eq!(o.stdout, b"hunter2");
    let o = run(cli(&agent.path).args(["--task", "/tasks/t9", "get", "A"]));
    assert_eq!(o.stdout, b"1\n");
    assert_eq!(agent.requests()[2]["task"], "/tasks/t9");
}

#[test]
fn task_comes_from_the_batch_environment() {
    let agent = FakeAgent::start(standard);
    run(cli(&agent.path)
        .env("AZ_BATCH_TASK_WORKING_DIR", "/tasks/t3/wd")
        .args(["list"]));
    assert_eq!(agent.requests()[0]["task"], "/tasks/t3");
}

#[test]
fn socket_comes_from_the_environment_without_a_flag() {
    let agent = FakeAgent::start(standard);
    let o = run(Command::new(BIN)
        .env("NODESEAL_SOCKET", &agent.path)
        .env_remove("AZ_BATCH_TASK_DIR")
        .args(["get", "A"]));
    assert_eq!(o.stdout, b"1\n");
}

#[test]
fn exit_codes_follow_sysexits() {
    let agent = FakeAgent::start(standard);
    for (name, code) in [
        ("NOPE", 66),
        ("FORBIDDEN", 77),
        ("GONE", 75),
        ("BUSY", 75),
        ("BAD", 65),
        ("OLD", 65),
        ("HUGE", 65),
        ("BOOM", 70),
        ("AMBIGUOUS", 78),
    ] {
        let o = run(cli(&agent.path).args(["get", name]));
        assert_eq!(o.status.code(), Some(code), "{name}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{name}");
        assert!(stderr(&o).starts_with("nodeseal-client: "), "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let o = run(cli(&dir.path().join("none.sock")).args(["get", "A"]));
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(stderr(&o).contains("none.sock"));
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let agent = FakeAgent::start(standard);
    for args in [
        vec!["frobnicate"],
        vec!["get"],
        vec![],
        vec!["env", "--format", "yaml"],
        vec!["exec"],
    ] {
        let o = run(cli(&agent.path).args(&args));
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
    }
    let o = run(cli(&agent.path).arg("--help"));
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("exec"));
    // The exit statuses a job definition acts on are in the help, each one.
    for status in [
        "64", "65", "66", "69", "70", "74", "75", "77", "78", "126", "127",
    ] {
        assert!(
            stdout(&o).contains(status),
            "--help lacks {status}: {}",
            stdout(&o)
        );
    }
    let o = run(cli(&agent.path).arg("--version"));
    assert_eq!(o.status.code(), Some(0));
    assert!(
        agent.requests().is_empty(),
        "usage errors never reach the agent"
    );
}

#[test]
fn env_formats() {
    let agent = FakeAgent::start(|req| match req["op"].as_str() {
        Some("env") => ok(json!({"values": [
            {"name": "A", "value": "plain"},
            {"name": "Q", "value": "it's \"quoted\" $HOME\nnext line"},
        ]})),
        _ => standard(req),
    });
    let o = run(cli(&agent.path).args(["env", "--format", "export"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "export A='plain'\nexport Q='it'\\''s \"quoted\" $HOME\nnext line'\n"
    );
    // The export output evaluates back to the exact values.
    let script = format!("{}printf '%s|%s' \"$A\" \"$Q\"", stdout(&o));
    let sh = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(sh.stdout).unwrap(),
        "plain|it's \"quoted\" $HOME\nnext line"
    );

    let o = run(cli(&agent.path).args(["env", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["Q"], "it's \"quoted\" $HOME\nnext line");

    // dotenv cannot hold the line break: refused, nothing printed, no value on stderr.
    let o = run(cli(&agent.path).args(["env"]));
    assert_eq!(o.status.code(), Some(65));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains('Q'));
    assert!(!stderr(&o).contains("quoted"));
}

#[test]
fn dotenv_and_list() {
    let agent = FakeAgent::start(standard);
    let o = run(cli(&agent.path).args(["env", "--format", "dotenv"]));
    assert_eq!(stdout(&o), "A=1\nB=x y\nPW=hunter2\n");
    let o = run(cli(&agent.path).arg("list"));
    assert_eq!(stdout(&o), "A\nB\nPW\n");
    let o = run(cli(&agent.path).arg("health"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "ok");
}

fn env_lines(o: &Output) -> Vec<String> {
    stdout(o).lines().map(str::to_string).collect()
}

#[test]
fn exec_replaces_the_environment() {
    let agent = FakeAgent::start(standard);
    let o = run(cli(&agent.path)
        .env("KEEP", "inherited")
        .env("TOK", "nodeseal.v1.abc")
        .env("B", "overridden by the task")
        .env("AZ_BATCH_TASK_DIR", "/tasks/t1")
        .args(["exec", "--", "/usr/bin/env"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines = env_lines(&o);
    for want in [
        "A=1",
        "B=x y",
        "PW=hunter2",
        "KEEP=inherited",
        "TOK=opened:TOK:abc",
    ] {
        assert!(lines.iter().any(|l| l == want), "{want} missing");
    }
    assert!(!lines.iter().any(|l| l.starts_with("TOK=nodeseal.v1.")));
    let open = agent
        .requests()
        .into_iter()
        .find(|r| r["op"] == "open")
        .unwrap();
    assert_eq!(open["name"], "TOK");
    // Its task goes along, so job- and task-bound tokens open for it.
    assert_eq!(open["task"], "/tasks/t1");
}

#[test]
fn exec_only_filters_task_values() {
    let agent = FakeAgent::start(standard);
    let o = run(cli(&agent.path).env("TOK", "nodeseal.v1.abc").args([
        "exec",
        "--only",
        "A,B",
        "--",
        "/usr/bin/env",
    ]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines = env_lines(&o);
    assert!(lines.iter().any(|l| l == "A=1"));
    assert!(lines.iter().any(|l| l == "B=x y"));
    assert!(!lines.iter().any(|l| l.starts_with("PW=")));
    assert!(lines.iter().any(|l| l == "TOK=opened:TOK:abc"));

    let o = run(cli(&agent.path).args(["exec", "--only", "A,MISSING", "--", "/usr/bin/env"]));
    assert_eq!(o.status.code(), Some(66));
    assert!(stderr(&o).contains("MISSING"));
    assert!(o.stdout.is_empty());
}

#[test]
fn exec_passes_arguments_and_reports_missing_commands() {
    let agent = FakeAgent::start(standard);
    let o = run(cli(&agent.path).args([
        "exec",
        "--",
        "/bin/sh",
        "-c",
        "printf '%s|%s' \"$PW\" \"$0\"",
        "-x",
    ]));
    assert_eq!(o.stdout, b"hunter2|-x");
    let o = run(cli(&agent.path).args(["exec", "--", "/nonexistent/cmd"]));
    assert_eq!(o.status.code(), Some(127));
    assert!(!stderr(&o).contains("hunter2"));
}

#[test]
fn exec_with_only_tokens_and_no_env_file() {
    let agent = FakeAgent::start(|req| match req["op"].as_str() {
        Some("env") => err("not_found", "no env file registered for task", false),
        _ => standard(req),
    });
    let o = run(cli(&agent.path)
        .env("TOK", "nodeseal.v1.zz")
        .args(["exec", "--", "/usr/bin/env"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(env_lines(&o).iter().any(|l| l == "TOK=opened:TOK:zz"));
    // Without any token, a task with no values is an error.
    let o = run(cli(&agent.path).args(["exec", "--", "/usr/bin/env"]));
    assert_eq!(o.status.code(), Some(66));
}

#[test]
fn a_bad_token_in_the_environment_stops_exec_without_leaking() {
    let agent = FakeAgent::start(|req| match req["op"].as_str() {
        Some("open") => err("bad_token", "token is bound to another name", false),
        _ => standard(req),
    });
    let o =
        run(cli(&agent.path)
            .env("TOK", "nodeseal.v1.abc")
            .args(["exec", "--", "/usr/bin/env"]));
    assert_eq!(o.status.code(), Some(65));
    assert!(o.stdout.is_empty(), "the command did not run");
    let e = stderr(&o);
    assert!(e.contains("$TOK"), "{e}");
    assert!(!e.contains("hunter2"));
}
