//! The blocking client.

use crate::config::{Builder, Config};
use crate::error::{Error, Result};
use crate::protocol::{Operation, Request, Response};
use crate::wire::{self, Backoff, LineBuffer};
use crate::Secret;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

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
    cfg: Config,
    conn: Option<Conn>,
    next_id: u64,
}

struct Conn {
    stream: UnixStream,
    buf: LineBuffer,
    /// Whether a request has completed on this connection (so a failure may just mean the agent
    /// closed an idle connection).
    used: bool,
}

/// Why one exchange failed.
enum Failure {
    Io(io::Error),
    Other(Error),
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
            cfg,
            conn: None,
            next_id: 1,
        };
        let mut backoff = Backoff::new(client.cfg.retry);
        client.ensure_connected(&mut backoff)?;
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
        &self.cfg.socket
    }

    /// The task directory sent as the request scope, if any.
    ///
    /// ```no_run
    /// let client = nodeseal_client::Client::connect()?;
    /// eprintln!("task: {:?}", client.task());
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn task(&self) -> Option<&str> {
        self.cfg.task.as_deref()
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
        let task = self.cfg.task.clone();
        let resp = self.request(Operation::Get {
            name: name.to_string(),
            task,
        })?;
        wire::take_value(resp, "get")
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
        let task = self.cfg.task.clone();
        let resp = self.request(Operation::Env { task })?;
        wire::take_values(resp)
    }

    /// The task's variable names (never values).
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let names: Vec<String> = client.list()?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn list(&mut self) -> Result<Vec<String>> {
        let task = self.cfg.task.clone();
        let resp = self.request(Operation::List { task })?;
        wire::take_names(resp)
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
        let resp = self.request(Operation::Open {
            token: token.to_string(),
            name: name.map(str::to_string),
        })?;
        wire::take_value(resp, "open")
    }

    /// Liveness: `{"status":"ok","version":"0.1.0","keys":N,"tasks":N}`.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// println!("{}", client.health()?);
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn health(&mut self) -> Result<serde_json::Value> {
        let resp = self.request(Operation::Health)?;
        wire::take_info(resp, "health")
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
        let resp = self.request(Operation::Status)?;
        wire::take_info(resp, "status")
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
        let resp = self.request(Operation::Revoke {
            thumbprint: thumbprint.to_string(),
            purge,
        })?;
        wire::take_info(resp, "revoke")
    }

    /// Undo a revocation (host root only). Returns `{"thumbprint","state"}`.
    ///
    /// ```no_run
    /// let mut client = nodeseal_client::Client::connect()?;
    /// client.restore("3f786850e387550fdab836ed7e6dc881de23001b")?;
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn restore(&mut self, thumbprint: &str) -> Result<serde_json::Value> {
        let resp = self.request(Operation::Restore {
            thumbprint: thumbprint.to_string(),
        })?;
        wire::take_info(resp, "restore")
    }

    /// Send any operation and return the successful response; error responses become
    /// [`Error::Agent`]. `busy` answers are retried within the retry budget.
    ///
    /// ```no_run
    /// use nodeseal_client::protocol::Operation;
    /// let mut client = nodeseal_client::Client::connect()?;
    /// let resp = client.request(Operation::Health)?;
    /// assert!(resp.ok);
    /// # Ok::<(), nodeseal_client::Error>(())
    /// ```
    pub fn request(&mut self, op: Operation) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Request::new(op);
        req.id = Some(id.into());
        let line = wire::encode(&req)?;
        let mut backoff = Backoff::new(self.cfg.retry);
        let mut reconnected = false;
        loop {
            self.ensure_connected(&mut backoff)?;
            let conn = self.conn.as_mut().expect("connected above");
            let used = conn.used;
            match exchange(conn, &line, id) {
                Ok(resp) => {
                    conn.used = true;
                    return Ok(resp);
                }
                Err(Failure::Other(e)) if wire::response_is_busy(&e) => {
                    // The agent hangs up after a busy answer (connection or rate limit), so
                    // the retry needs a new connection.
                    self.conn = None;
                    match backoff.next_delay() {
                        Some(d) => std::thread::sleep(d),
                        None => return Err(e),
                    }
                }
                Err(Failure::Other(e)) => {
                    if !matches!(e, Error::Agent { .. }) {
                        // The stream may be mid-line; never reuse it.
                        self.conn = None;
                    } else {
                        conn.used = true;
                    }
                    return Err(e);
                }
                Err(Failure::Io(e)) => {
                    self.conn = None;
                    if let Some(d) = wire::retry_after_io(&e, used, &mut reconnected, &mut backoff)
                    {
                        std::thread::sleep(d);
                        continue;
                    }
                    return Err(Error::Io {
                        path: self.cfg.socket.clone(),
                        source: e,
                    });
                }
            }
        }
    }

    fn ensure_connected(&mut self, backoff: &mut Backoff) -> Result<()> {
        if self.conn.is_some() {
            return Ok(());
        }
        loop {
            match self.connect_once() {
                Ok(conn) => {
                    self.conn = Some(conn);
                    return Ok(());
                }
                Err(e) => {
                    let delay = if wire::connect_is_transient(&e) {
                        backoff.next_delay()
                    } else {
                        None
                    };
                    match delay {
                        Some(d) => std::thread::sleep(d),
                        None => {
                            return Err(Error::Unreachable {
                                path: self.cfg.socket.clone(),
                                source: e,
                            })
                        }
                    }
                }
            }
        }
    }

    fn connect_once(&self) -> io::Result<Conn> {
        let stream = UnixStream::connect(&self.cfg.socket)?;
        stream.set_read_timeout(nonzero(self.cfg.read_timeout))?;
        stream.set_write_timeout(nonzero(self.cfg.write_timeout))?;
        Ok(Conn {
            stream,
            buf: LineBuffer::new(self.cfg.max_response_bytes),
            used: false,
        })
    }
}

/// `set_*_timeout` refuses zero; treat zero as "no timeout".
fn nonzero(d: std::time::Duration) -> Option<std::time::Duration> {
    (!d.is_zero()).then_some(d)
}

fn exchange(conn: &mut Conn, line: &[u8], id: u64) -> std::result::Result<Response, Failure> {
    // A failed write is not the end: the agent may have answered (`busy`) and hung up before
    // reading our request, and that answer is still waiting to be read.
    let write_failed = conn
        .stream
        .write_all(line)
        .and_then(|()| conn.stream.flush())
        .err();
    loop {
        if let Some(resp_line) = conn.buf.take_line().map_err(Failure::Other)? {
            return wire::decode(&resp_line, id).map_err(Failure::Other);
        }
        let room = conn.buf.prepare();
        let n = match conn.stream.read(room) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                conn.buf.commit(0);
                continue;
            }
            Err(e) => {
                conn.buf.commit(0);
                return Err(Failure::Io(write_failed.unwrap_or(e)));
            }
        };
        conn.buf.commit(n);
        if n == 0 {
            if let Some(e) = write_failed {
                return Err(Failure::Io(e));
            }
            let partial = conn.buf.has_partial();
            return Err(Failure::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if partial {
                    "the agent closed the connection in the middle of a response"
                } else {
                    "the agent closed the connection without answering"
                },
            )));
        }
    }
}
