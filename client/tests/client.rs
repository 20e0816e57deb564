//! The library against a fake agent.

mod common;

use common::{err, ok, standard, FakeAgent, Reply};
use nodeseal_client::protocol::ErrorCode;
use nodeseal_client::{Builder, Client, Error};
use serde_json::json;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn client(agent: &FakeAgent) -> Client {
    Builder::new()
        .socket(&agent.path)
        .task("/tasks/t1")
        .retry_for(Duration::from_secs(10))
        .connect()
        .unwrap()
}

#[test]
fn every_operation_sends_the_documented_request() {
    let agent = FakeAgent::start(standard);
    let mut c = client(&agent);
    assert_eq!(c.socket_path(), agent.path);
    assert_eq!(c.get("A").unwrap().expose(), "1");
    let env = c.env().unwrap();
    let pairs: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
    assert_eq!(pairs, [("A", "1"), ("B", "x y"), ("PW", "hunter2")]);
    assert_eq!(c.list().unwrap(), ["A", "B", "PW"]);
    assert_eq!(
        c.open("nodeseal.v1.xyz", Some("TOK")).unwrap().expose(),
        "opened:TOK:xyz"
    );
    assert_eq!(c.health().unwrap()["status"], "ok");
    assert_eq!(c.status().unwrap()["uptime_secs"], 5);
    assert_eq!(c.revoke("ABCD", true).unwrap()["state"], "revoked");
    assert_eq!(c.restore("abcd").unwrap()["state"], "loaded");

    let reqs = agent.requests();
    // One connection, ids counting up, version 1 on every line.
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r["v"], 1);
        assert_eq!(r["id"], json!(i as u64 + 1));
    }
    let strip = |mut r: serde_json::Value| {
        let o = r.as_object_mut().unwrap();
        o.remove("v");
        o.remove("id");
        r
    };
    let reqs: Vec<_> = reqs.into_iter().map(strip).collect();
    assert_eq!(
        reqs,
        [
            json!({"op": "get", "name": "A", "task": "/tasks/t1"}),
            json!({"op": "env", "task": "/tasks/t1"}),
            json!({"op": "list", "task": "/tasks/t1"}),
            // The task goes with `open` too: job- and task-bound tokens are matched against it.
            json!({"op": "open", "token": "nodeseal.v1.xyz", "name": "TOK", "task": "/tasks/t1"}),
            json!({"op": "health"}),
            json!({"op": "status"}),
            json!({"op": "revoke", "thumbprint": "ABCD", "purge": true}),
            json!({"op": "restore", "thumbprint": "abcd"}),
        ]
    );
}

#[test]
fn task_is_omitted_when_unknown() {
    let agent = FakeAgent::start(standard);
    // No builder task; the test process has no AZ_BATCH_* variables.
    assert!(std::env::var_os("AZ_BATCH_TASK_DIR").is_none());
    let mut c = Builder::new().socket(&agent.path).connect().unwrap();
    c.list().unwrap();
    assert!(agent.requests()[0].get("task").is_none());
}

#[test]
fn error_codes_map_and_never_carry_values() {
    let agent = FakeAgent::start(standard);
    let mut c = Builder::new()
        .socket(&agent.path)
        .retry_for(Duration::ZERO)
        .connect()
        .unwrap();
    let cases = [
        ("NOPE", ErrorCode::NotFound, false, 66),
        ("FORBIDDEN", ErrorCode::Forbidden, false, 77),
        ("GONE", ErrorCode::KeyUnavailable, true, 75),
        ("BAD", ErrorCode::BadToken, false, 65),
        ("OLD", ErrorCode::Expired, false, 65),
        ("HUGE", ErrorCode::TooLarge, false, 65),
        ("BOOM", ErrorCode::Internal, false, 70),
        ("BUSY", ErrorCode::Busy, true, 75),
        ("AMBIGUOUS", ErrorCode::ConfigError, false, 78),
    ];
    for (name, code, retryable, exit) in cases {
        let e = c.get(name).unwrap_err();
        assert_eq!(e.code(), Some(code), "{name}");
        assert_eq!(e.is_retryable(), retryable, "{name}");
        assert_eq!(e.exit_code(), exit, "{name}");
        assert!(matches!(e, Error::Agent { .. }));
    }
    // The connection survives error answers.
    assert_eq!(c.get("PW").unwrap().expose(), "hunter2");
}

#[test]
fn key_unavailable_is_not_retried_but_busy_is() {
    let busy_left = Arc::new(AtomicUsize::new(3));
    let b = busy_left.clone();
    let agent = FakeAgent::start(move |req| {
        if req["name"] == "GONE" {
            return err("key_unavailable", "revoked", true);
        }
        if b.load(Ordering::SeqCst) > 0 {
            b.fetch_sub(1, Ordering::SeqCst);
            return err("busy", "rate limit", true);
        }
        ok(json!({"value": "v"}))
    });
    let mut c = client(&agent);
    assert_eq!(c.get("X").unwrap().expose(), "v");
    assert_eq!(
        agent.requests().len(),
        4,
        "three busy answers, then success"
    );
    let e = c.get("GONE").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::KeyUnavailable));
    assert_eq!(
        agent.requests().len(),
        5,
        "key_unavailable is left to the caller"
    );
}

#[test]
fn busy_retries_stop_when_the_budget_is_spent() {
    let agent = FakeAgent::start(|_| err("busy", "at the connection limit", true));
    let mut c = Builder::new()
        .socket(&agent.path)
        .retry_for(Duration::from_millis(300))
        .connect()
        .unwrap();
    let e = c.get("A").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Busy));
    assert!(agent.requests().len() > 1, "busy was retried");

    let agent = FakeAgent::start(|_| err("busy", "at the connection limit", true));
    let mut c = Builder::new()
        .socket(&agent.path)
        .retry_for(Duration::ZERO)
        .connect()
        .unwrap();
    assert!(c.get("A").is_err());
    assert_eq!(agent.requests().len(), 1, "a zero budget means no retries");
}

#[test]
fn connection_limit_answers_without_id_are_retried() {
    // At its connection limit the agent writes a busy line (no id) and hangs up at once.
    let refused = Arc::new(AtomicUsize::new(2));
    let r = refused.clone();
    let agent = FakeAgent::start(move |req| {
        if r.load(Ordering::SeqCst) > 0 {
            r.fetch_sub(1, Ordering::SeqCst);
            return Reply::Raw(
                b"{\"v\":1,\"ok\":false,\"error\":{\"code\":\"busy\",\"message\":\"too many connections\",\"retryable\":true}}\n".to_vec(),
            );
        }
        standard(req)
    });
    let mut c = client(&agent);
    assert_eq!(c.get("A").unwrap().expose(), "1");
    assert_eq!(agent.requests().len(), 3);
}

#[test]
fn missing_socket_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let e = Builder::new()
        .socket(&path)
        .retry_for(Duration::from_millis(200))
        .connect()
        .err()
        .unwrap();
    match &e {
        Error::Unreachable { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(e.exit_code(), 69);
    assert!(e.to_string().contains("absent.sock"));
}

#[test]
fn refused_socket_is_retried_until_the_agent_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // A socket file with nobody listening: connect is refused, as while the agent restarts.
    drop(UnixListener::bind(&path).unwrap());
    let p = path.clone();
    let restarter = std::thread::spawn(move || {
        // The outage is the scenario, not synchronization: the client must meet refused
        // connects for a while before the agent comes back.
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_file(&p).unwrap();
        let listener = UnixListener::bind(&p).unwrap();
        common::serve(
            listener,
            Arc::new(standard),
            Arc::default(),
            Arc::default(),
            false,
        );
    });
    let mut c = Builder::new()
        .socket(&path)
        .retry_for(Duration::from_secs(30))
        .connect()
        .unwrap();
    assert_eq!(c.get("A").unwrap().expose(), "1");
    restarter.join().unwrap();
}

#[test]
fn a_closed_idle_connection_is_reopened() {
    let agent = FakeAgent::start_closing(standard);
    let mut c = client(&agent);
    assert_eq!(c.get("A").unwrap().expose(), "1");
    assert_eq!(c.get("PW").unwrap().expose(), "hunter2");
    assert_eq!(c.list().unwrap().len(), 3);
}

#[test]
fn an_agent_that_keeps_hanging_up_is_retried_then_an_io_error() {
    // Every operation is idempotent, and an agent that drops a fresh connection is usually
    // restarting or shedding load: retry on new connections within the budget, then give up.
    let agent = FakeAgent::start(|_| Reply::Close);
    let mut c = Builder::new()
        .socket(&agent.path)
        .task("/tasks/t1")
        .retry_for(Duration::from_millis(400))
        .connect()
        .unwrap();
    let e = c.get("A").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(agent.requests().len() >= 2, "resent on a new connection");
}

#[test]
fn malformed_and_oversized_responses_are_refused_without_echoing_them() {
    let agent = FakeAgent::start(|req| match req["name"].as_str() {
        Some("garbage") => Reply::Raw(b"hunter2 is not json\n".to_vec()),
        Some("wrongtype") => Reply::Raw(b"{\"v\":1,\"ok\":true,\"names\":\"hunter2\"}\n".to_vec()),
        Some("big") => Reply::Raw(
            format!(
                "{{\"v\":1,\"ok\":true,\"value\":\"{}\"}}\n",
                "x".repeat(5000)
            )
            .into_bytes(),
        ),
        Some("novalue") => ok(json!({"names": []})),
        _ => ok(json!({"value": "fine"})),
    });
    let mut c = Builder::new()
        .socket(&agent.path)
        .max_response_bytes(1000)
        .connect()
        .unwrap();
    for name in ["garbage", "wrongtype"] {
        let e = c.get(name).unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{name}: {e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
    }
    let e = c.get("big").unwrap_err();
    assert!(
        matches!(e, Error::ResponseTooLarge { limit: 1000 }),
        "{e:?}"
    );
    let e = c.get("novalue").unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    // After a broken exchange the client starts a fresh connection.
    assert_eq!(c.get("ok").unwrap().expose(), "fine");
}

#[test]
fn secrets_are_redacted_in_debug() {
    let agent = FakeAgent::start(standard);
    let mut c = client(&agent);
    let v = c.get("PW").unwrap();
    assert!(!format!("{v:?}").contains("hunter2"));
    let env = c.env().unwrap();
    assert!(!format!("{env:?}").contains("hunter2"));
}

#[cfg(feature = "async")]
#[tokio::test]
async fn async_client_speaks_the_same_protocol() {
    let busy_left = Arc::new(AtomicUsize::new(2));
    let b = busy_left.clone();
    let agent = FakeAgent::start(move |req| {
        if req["op"] == "get" && b.load(Ordering::SeqCst) > 0 {
            b.fetch_sub(1, Ordering::SeqCst);
            return err("busy", "rate limit", true);
        }
        standard(req)
    });
    let mut c = Builder::new()
        .socket(&agent.path)
        .task("/tasks/t1")
        .connect_async()
        .await
        .unwrap();
    assert_eq!(c.get("A").await.unwrap().expose(), "1");
    assert_eq!(c.env().await.unwrap().len(), 3);
    assert_eq!(c.list().await.unwrap(), ["A", "B", "PW"]);
    assert_eq!(
        c.open("nodeseal.v1.q", Some("N")).await.unwrap().expose(),
        "opened:N:q"
    );
    assert_eq!(c.health().await.unwrap()["keys"], 1);
    assert_eq!(c.status().await.unwrap()["version"], "0.1.0");
    assert_eq!(c.revoke("aa", false).await.unwrap()["state"], "revoked");
    assert_eq!(c.restore("aa").await.unwrap()["state"], "loaded");
    let e = c.get("FORBIDDEN").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden));
    assert_eq!(agent.ops()[..3], ["get", "get", "get"]);
    assert_eq!(agent.requests()[2]["task"], "/tasks/t1");
}
