//! The blocking client: a std `UnixStream` driving the [`Exchange`].

use crate::config::{Builder, Config};
use crate::error::Result;
use crate::exchange::{Action, Event, Exchange};
use crate::ops::{self, Call};
use crate::protocol::{Operation, Response};
use crate::Secret;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A blocking connection to the nodeseal agent. Requests go one at a time over one socket
/// connection, which is reopened transparently if the agent closed it.
///
/// ```no_run
/// use secrecy::ExposeSecret;
/// let mut client = nodeseal_client::Client::connect()?;
/// let password = client.get("DB_PASSWORD")?;
/// println!("{} bytes", password.expose_secret().len());
/// # Ok::<(), nodeseal_client::Error>(())
/// ```
pub struct Client {
    exchange: Exchange,
    stream: Option<UnixStream>,
}

impl Client {
    /// Connect to the discovered socket: `$NODESEAL_SOCKET`, else `$AZ_BATCH_TASK_DIR/nodeseal.sock`
    /// if it exists, else `/run/nodeseal/agent.sock`. Retries a missing or refusing socket for
    /// the retry budget (default 10 s, `$NODESEAL_RETRY_SECS`).
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn connect() -> Result<Self> {
        Builder::new().connect()
    }

    /// Connect to the socket at `path`, skipping discovery.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect_to("/run/nodeseal/agent.sock")?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Self> {
        Builder::new().socket(path.as_ref()).connect()
    }

    /// Settings for a client: socket, task, retry budget, timeouts.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::builder().task("/tasks/t1").connect()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn builder() -> Builder {
        Builder::new()
    }

    pub(crate) fn from_config(cfg: Config) -> Result<Self> {
        let mut client = Self {
            exchange: Exchange::connect(cfg, Instant::now()),
            stream: None,
        };
        client.drive()?;
        Ok(client)
    }

    /// The socket this client talks to.
    ///
    /// ```no_run
    /// let client = nodeseal_client::Client::connect()?;
    /// eprintln!("using {}", client.socket_path().display());
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn socket_path(&self) -> &Path {
        &self.exchange.config().socket
    }

    /// The task directory sent as the request scope, if any.
    ///
    /// ```no_run
    /// let client = nodeseal_client::Client::connect()?;
    /// eprintln!("task: {:?}", client.task());
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn task(&self) -> Option<&str> {
        self.exchange.config().task.as_deref()
    }

    /// One value of the task, by variable name.
    ///
    /// ```no_run
    /// use secrecy::ExposeSecret;
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let key = client.get("STORAGE_KEY")?;
    /// # let _ = key.expose_secret();
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn get(&mut self, name: &str) -> Result<Secret> {
        self.call(ops::get(name, self.task()))
    }

    /// Every value of the task, in env-file order.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// for (name, _value) in client.env()? {
    ///     println!("{name}");
    /// }
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn env(&mut self) -> Result<Vec<(String, Secret)>> {
        self.call(ops::env(self.task()))
    }

    /// Every value of the task that opened, and the names that did not with why: one bad
    /// value does not hide the others. [`Client::env`] is the all-or-nothing form.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let (values, failed) = client.env_partial()?;
    /// for f in &failed {
    ///     eprintln!("{}: {} ({})", f.name, f.error.message, f.error.code);
    /// }
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn env_partial(&mut self) -> Result<ops::PartialEnv> {
        self.call(ops::env_partial(self.task()))
    }

    /// The task's variable names (never values).
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let names: Vec<String> = client.list()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn list(&mut self) -> Result<Vec<String>> {
        self.call(ops::list(self.task()))
    }

    /// The task's variable names, and the env-file lines that serve nothing with why.
    pub fn list_report(&mut self) -> Result<(Vec<String>, Vec<crate::protocol::SkippedLine>)> {
        self.call(ops::list_report(self.task()))
    }

    /// Decrypt a token the caller holds (a `nodeseal.v1.` token or a legacy Batch Shipyard
    /// ciphertext). `name` is the variable name the value will be used as; a v1 token bound to
    /// another name is refused with `bad_token`.
    ///
    /// ```no_run
    /// let token = std::env::var("DB_PASSWORD").unwrap_or_default();
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let value = client.open(&token, Some("DB_PASSWORD"))?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn open(&mut self, token: &str, name: Option<&str>) -> Result<Secret> {
        self.call(ops::open(token, name, self.task()))
    }

    /// Liveness: `{"status":"ok","version":"0.1.0","keys":N,"tasks":N}`.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// println!("{}", client.health()?);
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn health(&mut self) -> Result<serde_json::Value> {
        self.call(ops::health())
    }

    /// Keys, tasks and counters (host root only); see `docs/protocol.md` for the fields.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let status = client.status()?;
    /// println!("{}", status["uptime_secs"]);
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn status(&mut self) -> Result<serde_json::Value> {
        self.call(ops::status())
    }

    /// Withdraw the key with this SHA-1 thumbprint until restored; `purge` also deletes it from
    /// the agent's store (host root only). Returns `{"thumbprint","state"}`.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// client.revoke("3f786850e387550fdab836ed7e6dc881de23001b", false)?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn revoke(&mut self, thumbprint: &str, purge: bool) -> Result<serde_json::Value> {
        self.call(ops::revoke(thumbprint, purge))
    }

    /// Undo a revocation (host root only). Returns `{"thumbprint","state"}`.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// client.restore("3f786850e387550fdab836ed7e6dc881de23001b")?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn restore(&mut self, thumbprint: &str) -> Result<serde_json::Value> {
        self.call(ops::restore(thumbprint))
    }

    /// Send any operation and return the successful response; error responses become
    /// [`Error::Agent`](crate::Error::Agent). `busy` answers are retried within the retry budget.
    ///
    /// ```no_run
    /// use nodeseal_client::protocol::Operation;
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let resp = client.request(Operation::Health)?;
    /// assert!(resp.ok);
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn request(&mut self, op: Operation) -> Result<Response> {
        self.exchange.request(op, Instant::now());
        Exchange::response(self.drive()?)
    }

    fn call<T>(&mut self, call: Call<T>) -> Result<T> {
        (call.parse)(self.request(call.op)?)
    }

    /// Perform the exchange's actions until it finishes: `None` when it only connected.
    fn drive(&mut self) -> Result<Option<Response>> {
        let cfg = self.exchange.config();
        let (read_timeout, write_timeout) = (cfg.read_timeout, cfg.write_timeout);
        loop {
            let event = match self.exchange.poll() {
                Action::Connect(path) => {
                    self.stream = None;
                    match retry_eintr(|| open_stream(path, read_timeout, write_timeout)) {
                        Ok(stream) => {
                            self.stream = Some(stream);
                            Event::Connected
                        }
                        Err(e) => Event::ConnectFailed(e),
                    }
                }
                Action::Write(bytes) => {
                    match retry_eintr(|| connected(&mut self.stream)?.write(bytes)) {
                        Ok(n) => Event::Wrote(n),
                        Err(e) if is_timeout(&e) => Event::TimedOut,
                        Err(e) => Event::WriteFailed(e),
                    }
                }
                Action::Read(buf) => match retry_eintr(|| connected(&mut self.stream)?.read(buf)) {
                    Ok(n) => Event::Read(n),
                    Err(e) if is_timeout(&e) => Event::TimedOut,
                    Err(e) => Event::ReadFailed(e),
                },
                Action::Sleep(d) => {
                    std::thread::sleep(d);
                    Event::Slept
                }
                Action::Close => {
                    self.stream = None;
                    Event::Closed
                }
                Action::Ready => return Ok(None),
                Action::Done(resp) => return Ok(Some(resp)),
                Action::Fail(e) => return Err(e),
            };
            self.exchange.handle(event, Instant::now());
        }
    }
}

/// The one place a signal interrupting a system call is dealt with: try again.
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A socket timeout shows up as `EAGAIN` (`WouldBlock`) on Linux, `TimedOut` elsewhere.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn connected(stream: &mut Option<UnixStream>) -> io::Result<&mut UnixStream> {
    stream
        .as_mut()
        .ok_or_else(|| io::ErrorKind::NotConnected.into())
}

fn open_stream(
    path: &Path,
    read_timeout: Duration,
    write_timeout: Duration,
) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(nonzero(read_timeout))?;
    stream.set_write_timeout(nonzero(write_timeout))?;
    Ok(stream)
}

/// `set_*_timeout` refuses zero; treat zero as "no timeout".
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_agent_times_out_with_the_shared_wording() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // Accepted by the backlog, never read or answered.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut c = Builder::new()
            .socket(&path)
            .read_timeout(Duration::from_millis(50))
            .connect()
            .unwrap();
        match c.health().unwrap_err() {
            crate::Error::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut);
                assert_eq!(source.to_string(), "the agent did not answer in time");
            }
            e => panic!("{e:?}"),
        }
    }
}
