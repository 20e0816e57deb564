//! The agent's socket protocol, version 1: one definition shared by the agent and every client.
//!
//! Newline-delimited JSON over a Unix stream socket. The client writes one [`Request`] per line;
//! the agent answers each with exactly one [`Response`] line, in order. See `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

/// Protocol version spoken by this crate. Requests that carry another version get `bad_request`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the agent accepts by default (bytes, newline included). A token can be
/// ~90 KiB for a 64 KiB value, so `open` needs room.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Default host-wide socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/nodeseal/agent.sock";

/// One request line.
///
/// Unknown fields, and fields the operation does not take, are refused.
#[derive(Serialize, Clone, PartialEq, Eq)]
pub struct Request {
    /// Protocol version; omitted means [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Caller-chosen correlation id, echoed back in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// What to do, with its arguments.
    #[serde(flatten)]
    pub op: Operation,
}

/// The wire shape of every request: all fields any operation takes, checked per operation.
/// One pass, no intermediate JSON tree: this runs for every request the agent answers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    #[serde(default)]
    v: Option<serde_json::Value>,
    // `"id": null` is an id like any other and is echoed back as given.
    #[serde(default, deserialize_with = "present")]
    id: Option<serde_json::Value>,
    op: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    thumbprint: Option<String>,
    #[serde(default)]
    purge: Option<bool>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

impl WireRequest {
    /// Refuse the argument fields `op` does not take, naming the first one.
    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        let given = [
            ("name", self.name.is_some()),
            ("task", self.task.is_some()),
            ("token", self.token.is_some()),
            ("thumbprint", self.thumbprint.is_some()),
            ("purge", self.purge.is_some()),
        ];
        match given.iter().find(|(f, set)| *set && !allowed.contains(f)) {
            Some((field, _)) => Err(format!("unknown field `{field}` for op `{}`", self.op)),
            None => Ok(()),
        }
    }

    fn required(value: Option<String>, field: &str, op: &str) -> Result<String, String> {
        value.ok_or_else(|| format!("missing field `{field}` for op `{op}`"))
    }

    fn into_operation(self) -> Result<Operation, String> {
        let op = self.op.as_str();
        let operation = match op {
            "get" => {
                self.only(&["name", "task"])?;
                Operation::Get {
                    name: Self::required(self.name, "name", op)?,
                    task: self.task,
                }
            }
            "env" => {
                self.only(&["task"])?;
                Operation::Env { task: self.task }
            }
            "list" => {
                self.only(&["task"])?;
                Operation::List { task: self.task }
            }
            "open" => {
                self.only(&["token", "name", "task"])?;
                Operation::Open {
                    token: Self::required(self.token, "token", op)?,
                    name: self.name,
                    task: self.task,
                }
            }
            "health" => {
                self.only(&[])?;
                Operation::Health
            }
            "status" => {
                self.only(&[])?;
                Operation::Status
            }
            "revoke" => {
                self.only(&["thumbprint", "purge"])?;
                Operation::Revoke {
                    thumbprint: Self::required(self.thumbprint, "thumbprint", op)?,
                    purge: self.purge.unwrap_or(false),
                }
            }
            "restore" => {
                self.only(&["thumbprint"])?;
                Operation::Restore {
                    thumbprint: Self::required(self.thumbprint, "thumbprint", op)?,
                }
            }
            other => {
                return Err(format!(
                    "unknown op `{other}`, expected one of get, env, list, open, health, status, revoke, restore"
                ))
            }
        };
        Ok(operation)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = WireRequest::deserialize(deserializer)?;
        let v = match &wire.v {
            None => PROTOCOL_VERSION,
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| D::Error::custom("`v` must be a small unsigned integer"))?,
        };
        let id = wire.id.clone();
        let op = wire.into_operation().map_err(D::Error::custom)?;
        Ok(Self { v, id, op })
    }
}

/// The correlation id of a request line that is not a valid [`Request`] (unknown op or field,
/// wrong type, bad version), so its error answer can still echo it. `None` when the line is not
/// a JSON object or has no `id`. Only the error path pays for this second pass.
pub fn request_id(line: &[u8]) -> Option<serde_json::Value> {
    // Other fields are skipped without being kept: only `id` is materialized.
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default, deserialize_with = "present")]
        id: Option<serde_json::Value>,
    }
    serde_json::from_slice::<IdOnly>(line).ok()?.id
}

impl Request {
    /// A version-1 request without a correlation id.
    pub fn new(op: Operation) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            id: None,
            op,
        }
    }
}

// A request may carry a token; tokens are ciphertext, but keep Debug terse anyway.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("v", &self.v)
            .field("op", &self.op.name())
            .finish_non_exhaustive()
    }
}

/// The operations of protocol version 1.
///
/// `task` is the caller's task directory (`$AZ_BATCH_TASK_DIR`, or its working directory `wd/`):
/// the scope the caller asks to read. The agent checks it against the caller's kernel credentials;
/// it never grants anything by itself. On a per-task socket it may be omitted.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Operation {
    /// One value of the caller's task, by variable name.
    Get {
        /// Variable name as it appears in the task's env file.
        name: String,
        /// Task directory (scope).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
    },
    /// Every value of the caller's task, in env-file order.
    Env {
        /// Task directory (scope).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
    },
    /// Variable names of the caller's task, never values.
    List {
        /// Task directory (scope).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
    },
    /// Decrypt a token the caller presents, checking it is bound to `name`.
    Open {
        /// A v1 token or a legacy Batch Shipyard ciphertext.
        token: String,
        /// The variable name the caller will use the value as.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The caller's task directory: the job and task a bound token's `job:`/`task:`
        /// selectors are matched against (it must be a task the caller may read). Omitted: the
        /// per-task socket's task, or on the host socket the caller's only task, if it has
        /// exactly one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
    },
    /// Liveness and version; allowed to everyone.
    Health,
    /// Keys, tasks and counters (never values); host root only.
    Status,
    /// Withdraw a key until restored (host root only).
    Revoke {
        /// Lowercase SHA-1 thumbprint (any case accepted).
        thumbprint: String,
        /// Also delete the key from the agent's persistent store.
        #[serde(default)]
        purge: bool,
    },
    /// Undo a revocation (host root only).
    Restore {
        /// Lowercase SHA-1 thumbprint (any case accepted).
        thumbprint: String,
    },
}

impl Operation {
    /// The operation's wire name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Get { .. } => "get",
            Operation::Env { .. } => "env",
            Operation::List { .. } => "list",
            Operation::Open { .. } => "open",
            Operation::Health => "health",
            Operation::Status => "status",
            Operation::Revoke { .. } => "revoke",
            Operation::Restore { .. } => "restore",
        }
    }
}

/// Stable error codes. Clients act on these, never on messages.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No such value (or task) in the caller's scope.
    NotFound,
    /// The caller's kernel credentials do not allow this.
    Forbidden,
    /// The key needed is missing or revoked right now; retry later.
    KeyUnavailable,
    /// The token is malformed, tampered with, or bound to another name.
    BadToken,
    /// The token's not-after time has passed.
    Expired,
    /// The request line is not a valid request.
    BadRequest,
    /// The request line or a value is over a limit.
    TooLarge,
    /// The agent is at a limit (connections, rate); retry later.
    Busy,
    /// Something went wrong inside the agent.
    Internal,
    /// The agent's configuration cannot serve this request (e.g. several loaded keys could open
    /// a legacy ciphertext and no `legacy_key` is set). Retrying will not help: an operator must
    /// fix the node.
    ConfigError,
}

impl ErrorCode {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::KeyUnavailable | ErrorCode::Busy)
    }

    /// The wire spelling, e.g. `key_unavailable`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::KeyUnavailable => "key_unavailable",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::Expired => "expired",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::ConfigError => "config_error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error half of a response.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable explanation; never contains a secret.
    pub message: String,
    /// Same as `code.is_retryable()`, spelled out for clients in other languages.
    pub retryable: bool,
}

/// One name/value pair of an `env` response, in env-file order.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct NamedValue {
    /// Variable name.
    pub name: String,
    /// Cleartext value, wiped from memory on drop.
    pub value: Zeroizing<String>,
}

impl fmt::Debug for NamedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedValue")
            .field("name", &self.name)
            .field("value", &"[REDACTED]")
            .finish()
    }
}

/// One value of an `env` answer that could not be opened: the others are still answered.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct NamedError {
    /// Variable name.
    pub name: String,
    /// Why, as an error answer would say it.
    pub error: ErrorBody,
}

/// A line of the task's env files that serves nothing (`env`, `list`), and why.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct SkippedLine {
    /// The env file.
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    /// The variable name, where the line has a usable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why the line is skipped.
    pub reason: String,
}

/// One response line. Exactly one of the optional payload fields is set on success (`env` may
/// add `errors` and `skipped`, `list` `skipped`).
#[derive(Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct Response {
    /// Protocol version of the agent.
    pub v: u32,
    /// Correlation id copied from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// Whether the request succeeded.
    pub ok: bool,
    /// `get`, `open`: the cleartext value, wiped from memory on drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Zeroizing<String>>,
    /// `env`: every value of the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<NamedValue>>,
    /// `list`: names only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// `env`: the values that could not be opened (the others are in `values`). Absent when
    /// every value opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<NamedError>>,
    /// `env`, `list`: env-file lines that serve nothing, and why. Absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Vec<SkippedLine>>,
    /// `health`, `status`, `revoke`, `restore`: a JSON object described in `docs/protocol.md`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// Set when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A successful, empty response.
    pub fn ok() -> Self {
        Self {
            v: PROTOCOL_VERSION,
            ok: true,
            ..Self::default()
        }
    }

    /// A failed response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            ok: false,
            error: Some(ErrorBody {
                code,
                message: message.into(),
                retryable: code.is_retryable(),
            }),
            ..Self::default()
        }
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("v", &self.v)
            .field("ok", &self.ok)
            .field("value", &self.value.as_ref().map(|_| "[REDACTED]"))
            .field("values", &self.values)
            .field("names", &self.names)
            .field("errors", &self.errors)
            .field("skipped", &self.skipped)
            .field("info", &self.info)
            .field("error", &self.error)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_documented_wire_form() {
        let r: Request = serde_json::from_str(r#"{"op":"get","name":"A","task":"/t"}"#).unwrap();
        assert_eq!(r.v, 1);
        assert_eq!(
            r.op,
            Operation::Get {
                name: "A".into(),
                task: Some("/t".into())
            }
        );
        let h: Request = serde_json::from_str(r#"{"v":1,"id":7,"op":"health"}"#).unwrap();
        assert_eq!(h.op, Operation::Health);
        assert_eq!(
            serde_json::to_string(&Request::new(Operation::List { task: None })).unwrap(),
            r#"{"v":1,"op":"list"}"#
        );
    }

    #[test]
    fn open_may_name_the_callers_task() {
        let r: Request =
            serde_json::from_str(r#"{"op":"open","token":"t","name":"A","task":"/t/wd"}"#).unwrap();
        assert_eq!(
            r.op,
            Operation::Open {
                token: "t".into(),
                name: Some("A".into()),
                task: Some("/t/wd".into())
            }
        );
        let without: Request = serde_json::from_str(r#"{"op":"open","token":"t"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&without).unwrap(),
            r#"{"v":1,"op":"open","token":"t"}"#
        );
    }

    #[test]
    fn ids_are_echoed_exactly_even_huge_numbers() {
        // Found by fuzzing: without exact float parsing, a huge numeric id came back 1 ulp off.
        let line = r#"{"op":"health","id":[-111111111111111111111111111111111111111111110,0.1]}"#;
        let r: Request = serde_json::from_str(line).unwrap();
        let again: Request = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn the_id_of_an_invalid_request_is_still_found() {
        for (line, id) in [
            (r#"{"op":"steal","id":7}"#, Some(serde_json::json!(7))),
            (r#"{"id":"a","op":"get"}"#, Some(serde_json::json!("a"))),
            (
                r#"{"v":"x","id":{"k":[1]},"op":"health"}"#,
                Some(serde_json::json!({"k":[1]})),
            ),
            (
                r#"{"id":null,"op":"get","name":1}"#,
                Some(serde_json::Value::Null),
            ),
            (r#"{"op":"steal"}"#, None),
            (r#"[1,2]"#, None),
            (r#"{"id":1,"#, None),
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
            assert_eq!(request_id(line.as_bytes()), id, "{line}");
        }
    }

    #[test]
    fn unknown_fields_and_ops_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"get","name":"A","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"steal"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"name":"A"}"#).is_err());
    }

    #[test]
    fn error_responses_carry_code_and_retryable() {
        let r = Response::error(ErrorCode::KeyUnavailable, "key abc revoked");
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"ok":false,"error":{"code":"key_unavailable","message":"key abc revoked","retryable":true}}"#
        );
    }

    #[test]
    fn config_errors_are_not_retryable() {
        let r = Response::error(ErrorCode::ConfigError, "set legacy_key");
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""code":"config_error""#), "{s}");
        assert!(s.contains(r#""retryable":false"#), "{s}");
        let back: Response = serde_json::from_str(&s).unwrap();
        assert_eq!(back.error.unwrap().code, ErrorCode::ConfigError);
    }

    #[test]
    fn debug_never_shows_values() {
        let mut r = Response::ok();
        r.value = Some(Zeroizing::new("hunter2".into()));
        r.values = Some(vec![NamedValue {
            name: "A".into(),
            value: Zeroizing::new("hunter2".into()),
        }]);
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
