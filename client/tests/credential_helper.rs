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
fn store_is_refused_and_erase_is_a_no_op() {
    let agent = FakeAgent::start(task_values(shipyard_task()));
    let o = helper(
        &agent.path,
        "store",
        br#"{"ServerURL":"quay.io","Username":"u","Secret":"typed-in-secret"}"#,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).contains("read-only"));
    assert!(!out(&o).contains("typed-in-secret"));
    let o = helper(&agent.path, "erase", b"quay.io\n");
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
    assert!(
        agent.requests().is_empty(),
        "neither store nor erase asks the agent"
    );
    let o = helper(&agent.path, "bogus", b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).starts_with("Usage:"));
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
}
