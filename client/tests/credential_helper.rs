//! `docker-credential-nodeseal` against a fake agent, checked byte for byte against the
//! credential-helper protocol Docker speaks.

mod common;

use common::{err, ok, FakeAgent, Reply};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_docker-credential-nodeseal");

fn task_values(values: Value) -> impl Fn(&Value) -> Reply + Send + Sync + 'static {
    move |req: &Value| match req["op"].as_str() {
        Some("env") => ok(json!({ "values": values.clone() })),
        Some("open") => ok(json!({"value": format!(
            "opened-{}",
            req["token"].as_str().unwrap().trim_start_matches("nodeseal.v1.")
        )})),
        _ => err("bad_request", "unexpected op", false),
    }
}

fn shipyard_task() -> Value {
    json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": ",myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "hubuser,acruser"},
        {"name": "DOCKER_LOGIN_PASSWORD", "value": "hub\"pw,acr\\pw"},
        {"name": "NODESEAL_REGISTRY_GH_SERVER", "value": "ghcr.io"},
        {"name": "NODESEAL_REGISTRY_GH_USERNAME", "value": "octo"},
        {"name": "NODESEAL_REGISTRY_GH_PASSWORD", "value": "ghp_secret"},
        {"name": "NODESEAL_REGISTRY_ACR2_SERVER", "value": "https://myreg.azurecr.io/"},
        {"name": "NODESEAL_REGISTRY_ACR2_USERNAME", "value": "acr-explicit"},
        {"name": "NODESEAL_REGISTRY_ACR2_PASSWORD", "value": "acr-explicit-pw"},
    ])
}

fn helper(socket: &Path, action: &str, stdin: &[u8]) -> Output {
    helper_with(socket, action, stdin, &[])
}

fn helper_with(socket: &Path, action: &str, stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg(action)
        .env("NODESEAL_SOCKET", socket)
        .env("NODESEAL_RETRY_SECS", "0.2")
        .env_remove("AZ_BATCH_TASK_DIR")
        .env_remove("DOCKER_LOGIN_SERVER")
        .env_remove("DOCKER_LOGIN_USERNAME")
        .env_remove("DOCKER_LOGIN_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn out(o: &Output) -> &str {
    std::str::from_utf8(&o.stdout).unwrap()
}

#[test]
fn get_docker_hub_from_the_shipyard_lists() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    // Docker sends the server URL with a newline; these are Docker Hub's spellings.
    for server in [
        "https://index.docker.io/v1/",
        "docker.io",
        "index.docker.io",
    ] {
        let o = helper(&agent.path, "get", format!("{server}\n").as_bytes());
        assert_eq!(o.status.code(), Some(0), "{server}: {}", out(&o));
        assert_eq!(
            out(&o),
            format!(
                "{{\"ServerURL\":\"{server}\",\"Username\":\"hubuser\",\"Secret\":\"hub\\\"pw\"}}\n"
            )
        );
        assert!(o.stderr.is_empty());
    }
}

#[test]
fn per_registry_values_win_over_shipyard_lists() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    let o = helper(&agent.path, "get", b"myreg.azurecr.io");
    assert_eq!(
        out(&o),
        "{\"ServerURL\":\"myreg.azurecr.io\",\"Username\":\"acr-explicit\",\"Secret\":\"acr-explicit-pw\"}\n"
    );
    let o = helper(&agent.path, "get", b"https://ghcr.io\n");
    assert_eq!(
        out(&o),
        "{\"ServerURL\":\"https://ghcr.io\",\"Username\":\"octo\",\"Secret\":\"ghp_secret\"}\n"
    );
}

#[test]
fn shipyard_second_entry_and_escaping() {
    let values = json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": ",myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "hubuser,acruser"},
        {"name": "DOCKER_LOGIN_PASSWORD", "value": "hubpw,acr\\pw"},
    ]);
    let agent = FakeAgent::start(task_values(values));
    let o = helper(&agent.path, "get", b"https://myreg.azurecr.io/v2/\n");
    assert_eq!(
        out(&o),
        "{\"ServerURL\":\"https://myreg.azurecr.io/v2/\",\"Username\":\"acruser\",\"Secret\":\"acr\\\\pw\"}\n"
    );
}

#[test]
fn unknown_registry_is_not_found_the_way_docker_expects() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    let o = helper(&agent.path, "get", b"quay.io\n");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(out(&o), "credentials not found in native keychain\n");
    // A task without an env file has no registries either.
    let agent = FakeAgent::start(|_| err("not_found", "no env file for this task", false));
    let o = helper(&agent.path, "get", b"https://index.docker.io/v1/\n");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(out(&o), "credentials not found in native keychain\n");
}

#[test]
fn tokens_in_the_process_environment_are_opened() {
    let agent = FakeAgent::start(task_values(json!([])));
    let o = helper_with(
        &agent.path,
        "get",
        b"registry.example.com:5000",
        &[
            ("NODESEAL_REGISTRY_EX_SERVER", "registry.example.com:5000"),
            ("NODESEAL_REGISTRY_EX_USERNAME", "bot"),
            ("NODESEAL_REGISTRY_EX_PASSWORD", "nodeseal.v1.tok"),
            ("AZ_BATCH_TASK_DIR", "/tasks/t1"),
        ],
    );
    assert_eq!(
        out(&o),
        "{\"ServerURL\":\"registry.example.com:5000\",\"Username\":\"bot\",\"Secret\":\"opened-tok\"}\n"
    );
    let open = agent
        .requests()
        .into_iter()
        .find(|r| r["op"] == "open")
        .unwrap();
    assert_eq!(open["name"], "NODESEAL_REGISTRY_EX_PASSWORD");
    assert_eq!(
        open["task"], "/tasks/t1",
        "the helper's task goes with open"
    );
}

#[test]
fn list_maps_servers_to_usernames() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    let o = helper(&agent.path, "list", b"");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        out(&o),
        "{\"ghcr.io\":\"octo\",\"https://index.docker.io/v1/\":\"hubuser\",\"https://myreg.azurecr.io/\":\"acr-explicit\"}\n"
    );
    assert!(!out(&o).contains("pw"), "list never shows passwords");
}

#[test]
fn store_accepts_what_is_served_and_refuses_anything_else_saying_why() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    let store = |json: &str| helper(&agent.path, "store", json.as_bytes());
    // What `get` serves, in the spellings Docker sends (hostname only; Hub's index URL).
    for accepted in [
        r#"{"ServerURL":"myreg.azurecr.io","Username":"acr-explicit","Secret":"acr-explicit-pw"}"#,
        r#"{"ServerURL":"https://index.docker.io/v1/","Username":"hubuser","Secret":"hub\"pw"}"#,
        r#"{"ServerURL":"ghcr.io","Username":"octo","Secret":"ghp_secret"}"#,
    ] {
        let o = store(accepted);
        assert_eq!(o.status.code(), Some(0), "{accepted}: {}", out(&o));
        assert!(o.stdout.is_empty() && o.stderr.is_empty(), "{accepted}");
    }
    let refused = [
        (
            r#"{"ServerURL":"quay.io","Username":"u","Secret":"typed-in-secret"}"#,
            "serves no credentials for quay.io",
        ),
        (
            r#"{"ServerURL":"ghcr.io","Username":"someone","Secret":"typed-in-secret"}"#,
            "username \"someone\" is not the one nodeseal serves for ghcr.io (\"octo\")",
        ),
        (
            r#"{"ServerURL":"ghcr.io","Username":"octo","Secret":"typed-in-secret"}"#,
            "password given for octo at ghcr.io is not the one nodeseal serves",
        ),
        (
            r#"{"ServerURL":"ghcr.io","Username":"<token>","Secret":"typed-in-secret"}"#,
            "identity token",
        ),
        (
            r#"{"ServerURL":"ghcr.io","Secret":"typed-in-secret"#,
            "not Docker's",
        ),
    ];
    for (json, why) in refused {
        let o = store(json);
        assert_eq!(o.status.code(), Some(1), "{json}");
        assert!(out(&o).contains(why), "{json}: {}", out(&o));
        assert!(err_text(&o).contains(why), "{json}: {}", err_text(&o));
        for text in [out(&o), err_text(&o).as_str()] {
            assert!(!text.contains("typed-in-secret") && !text.contains("ghp_secret"));
        }
    }
    let o = helper(&agent.path, "erase", b"quay.io\n");
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
    assert!(
        agent.requests().iter().all(|r| r["op"] == "env"),
        "store only reads, erase never asks"
    );
    let o = helper(&agent.path, "bogus", b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).starts_with("Usage:"));
    for help in ["--help", "-h", "help"] {
        let o = helper(&agent.path, help, b"");
        assert_eq!(o.status.code(), Some(0), "{help}");
        assert!(out(&o).contains("store"), "{help}: {}", out(&o));
    }
}

fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `docker` stand-in for the client side of `docker login` with a credentials store, as the
/// Docker CLI does it (no engine runs here): the registry checks the password (this one accepts
/// `$FAKE_REGISTRY_ACCEPTS`, `user:password` pairs), then the CLI normalizes the server (empty
/// or `docker.io` is Hub's `https://index.docker.io/v1/`, others are reduced to the host name)
/// and pipes `{"ServerURL","Username","Secret"}` into `docker-credential-<credsStore> store`,
/// failing the login with "Error saving credentials" when the helper does.
const FAKE_DOCKER: &str = r#"#!/bin/bash
[ "$1" = login ] || { echo "fake docker: only login" >&2; exit 2; }
shift
user= password= server=
while [ $# -gt 0 ]; do
    case "$1" in
        --username|-u) user=$2; shift 2 ;;
        --password|-p) password=$2; shift 2 ;;
        *) server=$1; shift ;;
    esac
done
echo "WARNING! Using --password via the CLI is insecure. Use --password-stdin." >&2
case ",$FAKE_REGISTRY_ACCEPTS," in
    *",$user:$password,"*) ;;
    *) echo "Error response from daemon: Get "https://${server:-registry-1.docker.io}/v2/": unauthorized: incorrect username or password" >&2; exit 1 ;;
esac
case "$server" in
    ""|docker.io|index.docker.io|https://index.docker.io/v1/) server=https://index.docker.io/v1/ ;;
    *) server=${server#http://}; server=${server#https://}; server=${server%%/*} ;;
esac
store=$(sed -n 's/.*"credsStore": *"\([^"]*\)".*/\1/p' "$DOCKER_CONFIG/config.json")
json=$(python3 -c 'import json,sys; print(json.dumps({"ServerURL":sys.argv[1],"Username":sys.argv[2],"Secret":sys.argv[3]}))' "$server" "$user" "$password")
if ! out=$(printf '%s' "$json" | "docker-credential-$store" store); then
    echo "Error saving credentials: error storing credentials - err: exit status 1, out: \`$out\`" >&2
    exit 1
fi
echo "Login Succeeded"
"#;

/// Batch Shipyard's `registry_login.sh` login loop, with the password decrypted by nodeseal
/// instead of `openssl rsautl` on the node's private key: the comma lists are split the same
/// way and `docker login` is invoked exactly as the script does, one registry at a time.
const SHIPYARD_LOGIN: &str = r#"set -e
set -o pipefail
DOCKER_LOGIN_PASSWORD=$(nodeseal-client get -n DOCKER_LOGIN_PASSWORD)
IFS=',' read -ra servers <<< "${DOCKER_LOGIN_SERVER}"
IFS=',' read -ra users <<< "${DOCKER_LOGIN_USERNAME}"
IFS=',' read -ra passwords <<< "${DOCKER_LOGIN_PASSWORD}"
for i in $(seq 0 $((${#users[@]}-1))); do
    set +e
    login_out=$(echo "y" | docker login --username "${users[$i]}" --password "${passwords[$i]}" "${servers[$i]}" 2>&1)
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then echo "ERROR - $login_out"; exit 1; fi
    echo "$login_out"
done
echo "INFO - Docker registry logins completed."
"#;

fn shipyard_login(agent: &FakeAgent, values: &Value, accepts: &str) -> Output {
    let bin_dir = agent.dir.path().join("bin");
    let config_dir = agent.dir.path().join("docker");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&config_dir).unwrap();
    let docker = bin_dir.join("docker");
    std::fs::write(&docker, FAKE_DOCKER).unwrap();
    std::fs::set_permissions(&docker, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        config_dir.join("config.json"),
        r#"{"credsStore": "nodeseal"}"#,
    )
    .unwrap();
    let own_bins = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        own_bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plain = |name: &str| {
        values
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["value"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Command::new("bash")
        .arg("-c")
        .arg(SHIPYARD_LOGIN)
        .env("PATH", path)
        .env("DOCKER_CONFIG", &config_dir)
        .env("NODESEAL_SOCKET", &agent.path)
        .env("NODESEAL_RETRY_SECS", "0.2")
        .env_remove("AZ_BATCH_TASK_DIR")
        // Shipyard puts the lists in the task's environment; the password stays sealed there.
        .env("DOCKER_LOGIN_SERVER", plain("DOCKER_LOGIN_SERVER"))
        .env("DOCKER_LOGIN_USERNAME", plain("DOCKER_LOGIN_USERNAME"))
        .env("DOCKER_LOGIN_PASSWORD", "sealed-ciphertext-placeholder")
        .env("FAKE_REGISTRY_ACCEPTS", accepts)
        .output()
        .unwrap()
}

fn shipyard_agent(values: &Value) -> FakeAgent {
    let values = values.clone();
    FakeAgent::start(move |req: &Value| match req["op"].as_str() {
        Some("env") => ok(json!({ "values": values.clone() })),
        Some("get") => match values
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == req["name"])
        {
            Some(v) => ok(json!({"value": v["value"]})),
            None => err("not_found", "no such variable", false),
        },
        _ => err("bad_request", "unexpected op", false),
    })
}

#[test]
fn shipyard_registry_login_runs_through_the_helper() {
    let values = json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": ",myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "hubuser,acruser"},
        {"name": "DOCKER_LOGIN_PASSWORD", "value": "hub-pw-1,acr-pw-2"},
    ]);
    let agent = shipyard_agent(&values);
    let o = shipyard_login(&agent, &values, "hubuser:hub-pw-1,acruser:acr-pw-2");
    let text = format!("{}{}", out(&o), err_text(&o));
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert_eq!(text.matches("Login Succeeded").count(), 2, "{text}");
    assert!(text.contains("logins completed"), "{text}");
    assert!(!text.contains("pw-"), "{text}");
}

#[test]
fn shipyard_registry_login_with_a_password_nodeseal_does_not_serve_fails_saying_why() {
    // The task's sealed value says one thing, the script logs in with another (here: the
    // registry password was rotated and the lists in the job edited, the sealed value not).
    let sealed = json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": "myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "acruser"},
        {"name": "DOCKER_LOGIN_PASSWORD", "value": "old-pw"},
    ]);
    let agent = FakeAgent::start(move |req: &Value| match req["op"].as_str() {
        Some("env") => ok(json!({ "values": sealed.clone() })),
        // What the script decrypts: the new password.
        Some("get") => ok(json!({"value": "new-pw"})),
        _ => err("bad_request", "unexpected op", false),
    });
    let lists = json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": "myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "acruser"},
    ]);
    let o = shipyard_login(&agent, &lists, "acruser:new-pw");
    let text = format!("{}{}", out(&o), err_text(&o));
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("Error saving credentials"), "{text}");
    assert!(
        text.contains(
            "password given for acruser at myreg.azurecr.io is not the one nodeseal serves"
        ),
        "{text}"
    );
    assert!(
        !text.contains("new-pw") && !text.contains("old-pw"),
        "{text}"
    );
}

#[test]
fn mismatched_shipyard_lists_are_explained_without_values() {
    let values = json!([
        {"name": "DOCKER_LOGIN_SERVER", "value": ",myreg.azurecr.io"},
        {"name": "DOCKER_LOGIN_USERNAME", "value": "hubuser,acruser"},
        {"name": "DOCKER_LOGIN_PASSWORD", "value": "onlyonepw"},
    ]);
    let agent = FakeAgent::start(task_values(values));
    let o = helper(&agent.path, "get", b"myreg.azurecr.io\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("DOCKER_LOGIN_PASSWORD holds 1"),
        "{}",
        out(&o)
    );
    assert!(!out(&o).contains("onlyonepw"));
}

#[test]
fn an_unreachable_agent_is_an_error_not_anonymous_access() {
    let dir = tempfile::tempdir().unwrap();
    let o = helper(&dir.path().join("none.sock"), "get", b"docker.io\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("cannot reach the nodeseal agent"),
        "{}",
        out(&o)
    );
    // Docker passes the helper's stderr through even where it drops the error and pulls
    // anonymously: the cause is on the user's terminal either way.
    assert!(
        err_text(&o).contains("cannot reach the nodeseal agent"),
        "{}",
        err_text(&o)
    );
    let o = helper(
        &dir.path().join("none.sock"),
        "store",
        br#"{"ServerURL":"ghcr.io","Username":"octo","Secret":"x"}"#,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(err_text(&o).contains("cannot reach the nodeseal agent"));
}

#[test]
fn a_task_value_that_does_not_open_fails_only_the_registry_that_needs_it() {
    let agent = FakeAgent::start(|req: &Value| match req["op"].as_str() {
        Some("env") => ok(json!({
            "values": [
                {"name": "NODESEAL_REGISTRY_GH_SERVER", "value": "ghcr.io"},
                {"name": "NODESEAL_REGISTRY_GH_USERNAME", "value": "octo"},
                {"name": "NODESEAL_REGISTRY_GH_PASSWORD", "value": "ghp_secret"},
                {"name": "NODESEAL_REGISTRY_Q_SERVER", "value": "quay.io"},
                {"name": "NODESEAL_REGISTRY_Q_USERNAME", "value": "robot"},
            ],
            "errors": [
                {"name": "NODESEAL_REGISTRY_Q_PASSWORD", "error": {"code": "key_unavailable", "message": "key gone", "retryable": true}},
                {"name": "UNRELATED", "error": {"code": "bad_token", "message": "not UTF-8", "retryable": false}},
            ],
        })),
        _ => err("bad_request", "unexpected op", false),
    });
    let o = helper(&agent.path, "get", b"ghcr.io\n");
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("ghp_secret"));
    let o = helper(&agent.path, "get", b"quay.io\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out(&o).contains("NODESEAL_REGISTRY_Q_PASSWORD cannot be opened (key_unavailable)"),
        "{}",
        out(&o)
    );
}
