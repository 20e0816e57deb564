//! The typed operations, defined once for both clients: the request each one sends and how its
//! successful response becomes the typed result.

use crate::error::{Error, Result};
use crate::protocol::{NamedError, Operation, Response, SkippedLine};
use crate::Secret;

/// One typed operation: send `op`, read the answer with `parse`.
pub(crate) struct Call<T> {
    pub(crate) op: Operation,
    pub(crate) parse: fn(Response) -> Result<T>,
}

pub(crate) fn get(name: &str, task: Option<&str>) -> Call<Secret> {
    Call {
        op: Operation::Get {
            name: name.to_string(),
            task: task.map(str::to_string),
        },
        parse: |resp| take_value(resp, "get"),
    }
}

pub(crate) fn env(task: Option<&str>) -> Call<Vec<(String, Secret)>> {
    Call {
        op: Operation::Env {
            task: task.map(str::to_string),
        },
        parse: take_values,
    }
}

pub(crate) fn list(task: Option<&str>) -> Call<Vec<String>> {
    Call {
        op: Operation::List {
            task: task.map(str::to_string),
        },
        parse: take_names,
    }
}

pub(crate) fn open(token: &str, name: Option<&str>, task: Option<&str>) -> Call<Secret> {
    Call {
        op: Operation::Open {
            token: token.to_string(),
            name: name.map(str::to_string),
            task: task.map(str::to_string),
        },
        parse: |resp| take_value(resp, "open"),
    }
}

pub(crate) fn health() -> Call<serde_json::Value> {
    Call {
        op: Operation::Health,
        parse: |resp| take_info(resp, "health"),
    }
}

pub(crate) fn status() -> Call<serde_json::Value> {
    Call {
        op: Operation::Status,
        parse: |resp| take_info(resp, "status"),
    }
}

pub(crate) fn revoke(thumbprint: &str, purge: bool) -> Call<serde_json::Value> {
    Call {
        op: Operation::Revoke {
            thumbprint: thumbprint.to_string(),
            purge,
        },
        parse: |resp| take_info(resp, "revoke"),
    }
}

pub(crate) fn restore(thumbprint: &str) -> Call<serde_json::Value> {
    Call {
        op: Operation::Restore {
            thumbprint: thumbprint.to_string(),
        },
        parse: |resp| take_info(resp, "restore"),
    }
}

fn missing(field: &str, op: &str) -> Error {
    Error::Protocol(format!("`{op}` response without `{field}`"))
}

fn take_value(resp: Response, op: &str) -> Result<Secret> {
    resp.value
        .map(Secret::from)
        .ok_or_else(|| missing("value", op))
}

pub(crate) fn env_partial(task: Option<&str>) -> Call<PartialEnv> {
    Call {
        op: Operation::Env {
            task: task.map(str::to_string),
        },
        parse: take_partial,
    }
}

/// An `env` answer with the values that opened and those that did not.
pub type PartialEnv = (Vec<(String, Secret)>, Vec<NamedError>);

fn take_partial(resp: Response) -> Result<PartialEnv> {
    let errors = resp.errors.unwrap_or_default();
    let values = resp.values.ok_or_else(|| missing("values", "env"))?;
    let values = values
        .into_iter()
        .map(|nv| (nv.name, Secret::from(nv.value)))
        .collect();
    Ok((values, errors))
}

/// The error an all-or-nothing caller gets for the values that did not open: the first one's
/// code, every failed name in the message.
pub fn first_failure(errors: &[NamedError]) -> Option<Error> {
    let first = errors.first()?;
    let mut message = format!("{}: {}", first.name, first.error.message);
    if errors.len() > 1 {
        let others: Vec<String> = errors[1..]
            .iter()
            .map(|e| format!("{} ({})", e.name, e.error.code))
            .collect();
        message.push_str(&format!("; also failed: {}", others.join(", ")));
    }
    Some(Error::Agent {
        code: first.error.code,
        message,
    })
}

/// All or nothing: a task never starts with some of its values silently missing.
fn take_values(resp: Response) -> Result<Vec<(String, Secret)>> {
    let (values, errors) = take_partial(resp)?;
    match first_failure(&errors) {
        Some(e) => Err(e),
        None => Ok(values),
    }
}

pub(crate) fn list_report(task: Option<&str>) -> Call<(Vec<String>, Vec<SkippedLine>)> {
    Call {
        op: Operation::List {
            task: task.map(str::to_string),
        },
        parse: |resp| {
            let skipped = resp.skipped.clone().unwrap_or_default();
            Ok((take_names(resp)?, skipped))
        },
    }
}

fn take_names(resp: Response) -> Result<Vec<String>> {
    resp.names.ok_or_else(|| missing("names", "list"))
}

fn take_info(resp: Response, op: &str) -> Result<serde_json::Value> {
    resp.info.ok_or_else(|| missing("info", op))
}
