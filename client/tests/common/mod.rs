//! A fake nodeseal agent: a Unix socket served by a thread, answering each request line with
//! whatever the test's handler returns.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// What the agent does with one request.
pub(crate) enum Reply {
    /// Send this response object; `v` and the request's `id` are added unless present.
    Json(Value),
    /// Send these bytes verbatim (a newline is not added).
    Raw(Vec<u8>),
    /// Close the connection without answering.
    Close,
}

type Handler = dyn Fn(&Value) -> Reply + Send + Sync;

pub(crate) struct FakeAgent {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl FakeAgent {
    pub(crate) fn start(handler: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let agent = Self {
            dir,
            path: path.clone(),
            requests: Arc::default(),
            stop: Arc::default(),
        };
        agent.serve_at(&path, Arc::new(handler), false);
        agent
    }

    /// Like `start`, but the agent closes each connection after one answer.
    pub(crate) fn start_closing(handler: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let agent = Self {
            dir,
            path: path.clone(),
            requests: Arc::default(),
            stop: Arc::default(),
        };
        agent.serve_at(&path, Arc::new(handler), true);
        agent
    }

    fn serve_at(&self, path: &Path, handler: Arc<Handler>, close_each: bool) {
        let listener = UnixListener::bind(path).unwrap();
        serve(
            listener,
            handler,
            self.requests.clone(),
            self.stop.clone(),
            close_each,
        );
    }

    /// Every request received so far, in order.
    pub(crate) fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    pub(crate) fn ops(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r["op"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so the thread ends.
        let _ = UnixStream::connect(&self.path);
    }
}

/// Serve `listener` on background threads.
pub(crate) fn serve(
    listener: UnixListener,
    handler: Arc<Handler>,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    close_each: bool,
) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let handler = handler.clone();
            let requests = requests.clone();
            thread::spawn(move || handle(conn, &*handler, &requests, close_each));
        }
    });
}

fn handle(conn: UnixStream, handler: &Handler, requests: &Mutex<Vec<Value>>, close_each: bool) {
    let mut writer = conn.try_clone().unwrap();
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        requests.lock().unwrap().push(req.clone());
        match handler(&req) {
            Reply::Json(mut resp) => {
                // Like the real agent, hang up after a busy answer.
                let hang_up = resp["error"]["code"] == "busy";
                let obj = resp.as_object_mut().unwrap();
                obj.entry("v").or_insert(json!(1));
                if let Some(id) = req.get("id") {
                    obj.entry("id").or_insert(id.clone());
                }
                let mut bytes = serde_json::to_vec(&resp).unwrap();
                bytes.push(b'\n');
                if writer.write_all(&bytes).is_err() || hang_up {
                    return;
                }
            }
            Reply::Raw(bytes) => {
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::Close => return,
        }
        if close_each {
            return;
        }
    }
}

pub(crate) fn ok(extra: Value) -> Reply {
    let mut v = json!({"ok": true});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Reply::Json(v)
}

pub(crate) fn err(code: &str, message: &str, retryable: bool) -> Reply {
    Reply::Json(json!({
        "ok": false,
        "error": {"code": code, "message": message, "retryable": retryable}
    }))
}

/// A handler that plays a small task with values `A=1`, `B=x y` and `PW=hunter2`.
pub(crate) fn standard(req: &Value) -> Reply {
    match req["op"].as_str().unwrap_or("") {
        "get" => match req["name"].as_str().unwrap_or("") {
            "A" => ok(json!({"value": "1"})),
            "PW" => ok(json!({"value": "hunter2"})),
            "FORBIDDEN" => err("forbidden", "caller uid 1000 does not own task", false),
            "GONE" => err("key_unavailable", "key 3f78 is revoked", true),
            "BAD" => err("bad_token", "token for GET_BAD is tampered with", false),
            "OLD" => err("expired", "token expired", false),
            "HUGE" => err("too_large", "value over limit", false),
            "BOOM" => err("internal", "agent bug", false),
            "BUSY" => err("busy", "too many connections", true),
            "AMBIGUOUS" => err("config_error", "2 keys of 4096 bits; set legacy_key", false),
            other => err("not_found", &format!("no value named {other}"), false),
        },
        "env" => ok(json!({"values": [
            {"name": "A", "value": "1"},
            {"name": "B", "value": "x y"},
            {"name": "PW", "value": "hunter2"},
        ]})),
        "list" => ok(json!({"names": ["A", "B", "PW"]})),
        "open" => {
            let token = req["token"].as_str().unwrap_or("");
            let name = req["name"].as_str().unwrap_or("-");
            match token.strip_prefix("nodeseal.v1.") {
                Some(rest) => ok(json!({"value": format!("opened:{name}:{rest}")})),
                None => err("bad_token", "not a token", false),
            }
        }
        "health" => {
            ok(json!({"info": {"status": "ok", "version": "0.1.0", "keys": 1, "tasks": 2}}))
        }
        "status" => ok(
            json!({"info": {"version": "0.1.0", "uptime_secs": 5, "keys": [],
                                       "tasks": [], "counters": {}}}),
        ),
        "revoke" | "restore" => ok(json!({"info": {
            "thumbprint": req["thumbprint"],
            "state": if req["op"] == "revoke" { "revoked" } else { "loaded" }
        }})),
        _ => err("bad_request", "unknown op", false),
    }
}
