//! Socket and task discovery, and the connection settings shared by both clients.

use crate::error::{Error, Result};
use crate::protocol::DEFAULT_SOCKET_PATH;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the agent's socket; overrides discovery.
pub const SOCKET_ENV: &str = "NODESEAL_SOCKET";
/// Environment variable holding the retry budget in seconds (decimal allowed, `0` disables).
pub const RETRY_SECS_ENV: &str = "NODESEAL_RETRY_SECS";
/// File name of the per-task socket inside the task directory.
pub const TASK_SOCKET_NAME: &str = "nodeseal.sock";
/// How long a client keeps retrying `busy` answers and a missing or refusing socket by default.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(10);
/// Default read timeout for one response.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default write timeout for one request.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest response line accepted by default (bytes, newline excluded). An `env` answer holds
/// every value of a task, so this is generous.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// First and longest pause between retries.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(50);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Settings for a [`Client`](crate::Client) (or `AsyncClient`); anything left unset is
/// discovered from the environment when connecting.
///
/// ```no_run
/// use std::time::Duration;
/// let mut client = nodeseal_client::Client::builder()
///     .socket("/run/nodeseal/agent.sock")
///     .task("/mnt/batch/tasks/workitems/job/job-1/task1")
///     .retry_for(Duration::from_secs(30))
///     .connect()?;
/// # Ok::<(), nodeseal_client::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Builder {
    socket: Option<PathBuf>,
    task: Option<String>,
    retry: Option<Duration>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    max_response_bytes: Option<usize>,
}

/// Fully resolved settings.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub socket: PathBuf,
    pub task: Option<String>,
    pub retry: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_response_bytes: usize,
}

impl Builder {
    /// Settings with everything discovered from the environment.
    ///
    /// ```
    /// let b = nodeseal_client::Builder::new();
    /// # let _ = b;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Use this socket instead of discovering one.
    ///
    /// ```no_run
    /// let c = nodeseal_client::Builder::new().socket("/tmp/agent.sock").connect()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Name this task directory as the request scope instead of `$AZ_BATCH_TASK_DIR`.
    ///
    /// ```no_run
    /// let c = nodeseal_client::Builder::new().task("/mnt/batch/tasks/workitems/j/job-1/t").connect()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn task(mut self, dir: impl Into<String>) -> Self {
        self.task = Some(dir.into());
        self
    }

    /// Keep retrying a missing or refusing socket and `busy` answers for this long in total
    /// (default 10 s, or `$NODESEAL_RETRY_SECS`). Zero disables retries.
    ///
    /// ```
    /// let b = nodeseal_client::Builder::new().retry_for(std::time::Duration::ZERO);
    /// # let _ = b;
    /// ```
    pub fn retry_for(mut self, budget: Duration) -> Self {
        self.retry = Some(budget);
        self
    }

    /// Give up on a response after this long (default 30 s).
    ///
    /// ```
    /// let b = nodeseal_client::Builder::new().read_timeout(std::time::Duration::from_secs(5));
    /// # let _ = b;
    /// ```
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// Give up on sending a request after this long (default 10 s).
    ///
    /// ```
    /// let b = nodeseal_client::Builder::new().write_timeout(std::time::Duration::from_secs(5));
    /// # let _ = b;
    /// ```
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = Some(timeout);
        self
    }

    /// Refuse response lines longer than this (default 16 MiB).
    ///
    /// ```
    /// let b = nodeseal_client::Builder::new().max_response_bytes(1 << 20);
    /// # let _ = b;
    /// ```
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = Some(limit);
        self
    }

    /// Connect (blocking), retrying within the retry budget.
    ///
    /// ```no_run
    /// let mut c = nodeseal_client::Builder::new().connect()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn connect(self) -> Result<crate::Client> {
        crate::Client::from_config(self.resolve()?)
    }

    /// Resolve against the process environment.
    pub(crate) fn resolve(self) -> Result<Config> {
        self.resolve_with(&|k| std::env::var_os(k), &|p| p.exists())
    }

    /// Resolve against an arbitrary environment, so discovery can be tested without touching
    /// the process environment (which is shared between test threads).
    pub(crate) fn resolve_with(
        self,
        env: &dyn Fn(&str) -> Option<OsString>,
        exists: &dyn Fn(&Path) -> bool,
    ) -> Result<Config> {
        let retry = match self.retry {
            Some(r) => r,
            None => match env(RETRY_SECS_ENV) {
                None => DEFAULT_RETRY,
                Some(s) => parse_secs(&s)?,
            },
        };
        let task = match self.task {
            Some(t) => Some(t),
            None => task_from_env(env)?,
        };
        let socket = match self.socket {
            Some(s) => s,
            None => discover_socket(env, exists),
        };
        Ok(Config {
            socket,
            task,
            retry,
            read_timeout: self.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT),
            write_timeout: self.write_timeout.unwrap_or(DEFAULT_WRITE_TIMEOUT),
            max_response_bytes: self
                .max_response_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
        })
    }
}

/// `$NODESEAL_SOCKET`, else `$AZ_BATCH_TASK_DIR/nodeseal.sock` if it exists, else the host socket.
fn discover_socket(
    env: &dyn Fn(&str) -> Option<OsString>,
    exists: &dyn Fn(&Path) -> bool,
) -> PathBuf {
    if let Some(s) = env(SOCKET_ENV).filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    if let Some(dir) = env("AZ_BATCH_TASK_DIR").filter(|s| !s.is_empty()) {
        let candidate = Path::new(&dir).join(TASK_SOCKET_NAME);
        if exists(&candidate) {
            return candidate;
        }
    }
    PathBuf::from(DEFAULT_SOCKET_PATH)
}

/// `$AZ_BATCH_TASK_DIR`, else the parent of `$AZ_BATCH_TASK_WORKING_DIR` when that ends in `/wd`.
fn task_from_env(env: &dyn Fn(&str) -> Option<OsString>) -> Result<Option<String>> {
    let utf8 = |name: &str, v: OsString| {
        v.into_string().map_err(|_| {
            Error::Config(format!(
                "${name} is not valid UTF-8; name the task directory with --task or Builder::task"
            ))
        })
    };
    if let Some(dir) = env("AZ_BATCH_TASK_DIR").filter(|s| !s.is_empty()) {
        return utf8("AZ_BATCH_TASK_DIR", dir).map(Some);
    }
    if let Some(wd) = env("AZ_BATCH_TASK_WORKING_DIR").filter(|s| !s.is_empty()) {
        let wd = utf8("AZ_BATCH_TASK_WORKING_DIR", wd)?;
        let trimmed = wd.trim_end_matches('/');
        if let Some(parent) = trimmed.strip_suffix("/wd") {
            if !parent.is_empty() {
                return Ok(Some(parent.to_string()));
            }
        }
    }
    Ok(None)
}

fn parse_secs(s: &std::ffi::OsStr) -> Result<Duration> {
    let bad = || {
        Error::Config(format!(
            "${RETRY_SECS_ENV} must be a number of seconds such as 10 or 2.5, got {s:?}"
        ))
    };
    let secs: f64 = s
        .to_str()
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(vars: &[(&str, &str)], existing: &[&str]) -> Result<Config> {
        resolve_b(Builder::new(), vars, existing)
    }

    fn resolve_b(b: Builder, vars: &[(&str, &str)], existing: &[&str]) -> Result<Config> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let existing: Vec<PathBuf> = existing.iter().map(PathBuf::from).collect();
        b.resolve_with(&|k| map.get(k).cloned(), &|p| {
            existing.iter().any(|e| e == p)
        })
    }

    #[test]
    fn socket_discovery_order() {
        let task_sock = "/tasks/t1/nodeseal.sock";
        // Nothing set: host socket.
        let c = resolve(&[], &[]).unwrap();
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET_PATH));
        // Task dir set, but no per-task socket there: host socket.
        let c = resolve(&[("AZ_BATCH_TASK_DIR", "/tasks/t1")], &[]).unwrap();
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET_PATH));
        // Per-task socket exists: used.
        let c = resolve(&[("AZ_BATCH_TASK_DIR", "/tasks/t1")], &[task_sock]).unwrap();
        assert_eq!(c.socket, Path::new(task_sock));
        // NODESEAL_SOCKET beats the per-task socket.
        let c = resolve(
            &[
                ("AZ_BATCH_TASK_DIR", "/tasks/t1"),
                (SOCKET_ENV, "/env.sock"),
            ],
            &[task_sock],
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/env.sock"));
        // An explicit path beats everything.
        let c = resolve_b(
            Builder::new().socket("/explicit.sock"),
            &[
                ("AZ_BATCH_TASK_DIR", "/tasks/t1"),
                (SOCKET_ENV, "/env.sock"),
            ],
            &[task_sock],
        )
        .unwrap();
        assert_eq!(c.socket, Path::new("/explicit.sock"));
    }

    #[test]
    fn task_discovery() {
        let c = resolve(&[("AZ_BATCH_TASK_DIR", "/tasks/t1")], &[]).unwrap();
        assert_eq!(c.task.as_deref(), Some("/tasks/t1"));
        let c = resolve(&[("AZ_BATCH_TASK_WORKING_DIR", "/tasks/t2/wd")], &[]).unwrap();
        assert_eq!(c.task.as_deref(), Some("/tasks/t2"));
        let c = resolve(&[("AZ_BATCH_TASK_WORKING_DIR", "/tasks/t2/wd/")], &[]).unwrap();
        assert_eq!(c.task.as_deref(), Some("/tasks/t2"));
        // A working directory not named wd says nothing about the task directory.
        let c = resolve(&[("AZ_BATCH_TASK_WORKING_DIR", "/tasks/t2/work")], &[]).unwrap();
        assert_eq!(c.task, None);
        let c = resolve(
            &[
                ("AZ_BATCH_TASK_DIR", "/tasks/t1"),
                ("AZ_BATCH_TASK_WORKING_DIR", "/tasks/t2/wd"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.task.as_deref(), Some("/tasks/t1"));
        let c = resolve_b(
            Builder::new().task("/mine"),
            &[("AZ_BATCH_TASK_DIR", "/tasks/t1")],
            &[],
        )
        .unwrap();
        assert_eq!(c.task.as_deref(), Some("/mine"));
        assert_eq!(resolve(&[], &[]).unwrap().task, None);
    }

    #[test]
    fn retry_budget_from_env() {
        assert_eq!(resolve(&[], &[]).unwrap().retry, DEFAULT_RETRY);
        let c = resolve(&[(RETRY_SECS_ENV, "2.5")], &[]).unwrap();
        assert_eq!(c.retry, Duration::from_millis(2500));
        let c = resolve(&[(RETRY_SECS_ENV, "0")], &[]).unwrap();
        assert_eq!(c.retry, Duration::ZERO);
        for bad in ["soon", "-1", "NaN", "1e9"] {
            let e = resolve(&[(RETRY_SECS_ENV, bad)], &[]).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}");
            assert!(e.to_string().contains(RETRY_SECS_ENV));
        }
        let c = resolve_b(
            Builder::new().retry_for(Duration::from_secs(3)),
            &[(RETRY_SECS_ENV, "soon")],
            &[],
        )
        .unwrap();
        assert_eq!(c.retry, Duration::from_secs(3));
    }
}
