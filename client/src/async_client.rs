//! The tokio client (feature `async`).

use crate::config::{Builder, Config};
use crate::error::{Error, Result};
use crate::protocol::{Operation, Request, Response};
use crate::wire::{self, Backoff, LineBuffer};
use crate::Secret;
use std::io;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The async counterpart of [`Client`](crate::Client): same discovery, retries and operations.
///
/// ```no_run
/// # async fn f() -> Result<(), nodeseal_client::Error> {
/// let mut client = nodeseal_client::AsyncClient::connect().await?;
/// let value = client.get("DB_PASSWORD").await?;
/// # Ok(()) }
/// ```
pub struct AsyncClient {
    cfg: Config,
    conn: Option<(UnixStream, LineBuffer, bool)>,
    next_id: u64,
}

impl Builder {
    /// Connect with tokio, retrying within the retry budget.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), nodeseal_client::Error> {
    /// let mut client = nodeseal_client::Builder::new().task("/tasks/t1").connect_async().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_async(self) -> Result<AsyncClient> {
        let mut client = AsyncClient {
            cfg: self.resolve()?,
            conn: None,
            next_id: 1,
        };
        let mut backoff = Backoff::new(client.cfg.retry);
        client.ensure_connected(&mut backoff).await?;
        Ok(client)
    }
}

impl AsyncClient {
    /// Connect to the discovered socket (see [`Client::connect`](crate::Client::connect)).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), nodeseal_client::Error> {
    /// let client = nodeseal_client::AsyncClient::connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect() -> Result<Self> {
        Builder::new().connect_async().await
    }

    /// Connect to the socket at `path`.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), nodeseal_client::Error> {
    /// let client = nodeseal_client::AsyncClient::connect_to("/run/nodeseal/agent.sock").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_to(path: impl AsRef<Path>) -> Result<Self> {
        Builder::new().socket(path.as_ref()).connect_async().await
    }

    /// One value of the task.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let v = c.get("DB_PASSWORD").await?;
    /// # Ok(()) }
    /// ```
    pub async fn get(&mut self, name: &str) -> Result<Secret> {
        let task = self.cfg.task.clone();
        let op = Operation::Get {
            name: name.to_string(),
            task,
        };
        wire::take_value(self.request(op).await?, "get")
    }

    /// Every value of the task, in env-file order.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let all = c.env().await?;
    /// # Ok(()) }
    /// ```
    pub async fn env(&mut self) -> Result<Vec<(String, Secret)>> {
        let task = self.cfg.task.clone();
        wire::take_values(self.request(Operation::Env { task }).await?)
    }

    /// The task's variable names.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let names = c.list().await?;
    /// # Ok(()) }
    /// ```
    pub async fn list(&mut self) -> Result<Vec<String>> {
        let task = self.cfg.task.clone();
        wire::take_names(self.request(Operation::List { task }).await?)
    }

    /// Decrypt a token the caller holds, bound to `name`.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient, token: &str) -> Result<(), nodeseal_client::Error> {
    /// let v = c.open(token, Some("DB_PASSWORD")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(&mut self, token: &str, name: Option<&str>) -> Result<Secret> {
        let op = Operation::Open {
            token: token.to_string(),
            name: name.map(str::to_string),
        };
        wire::take_value(self.request(op).await?, "open")
    }

    /// Liveness and version.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// println!("{}", c.health().await?);
    /// # Ok(()) }
    /// ```
    pub async fn health(&mut self) -> Result<serde_json::Value> {
        wire::take_info(self.request(Operation::Health).await?, "health")
    }

    /// Keys, tasks and counters (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// println!("{}", c.status().await?);
    /// # Ok(()) }
    /// ```
    pub async fn status(&mut self) -> Result<serde_json::Value> {
        wire::take_info(self.request(Operation::Status).await?, "status")
    }

    /// Withdraw a key (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// c.revoke("3f786850e387550fdab836ed7e6dc881de23001b", false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke(&mut self, thumbprint: &str, purge: bool) -> Result<serde_json::Value> {
        let op = Operation::Revoke {
            thumbprint: thumbprint.to_string(),
            purge,
        };
        wire::take_info(self.request(op).await?, "revoke")
    }

    /// Undo a revocation (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// c.restore("3f786850e387550fdab836ed7e6dc881de23001b").await?;
    /// # Ok(()) }
    /// ```
    pub async fn restore(&mut self, thumbprint: &str) -> Result<serde_json::Value> {
        let op = Operation::Restore {
            thumbprint: thumbprint.to_string(),
        };
        wire::take_info(self.request(op).await?, "restore")
    }

    /// Send any operation; see [`Client::request`](crate::Client::request).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let r = c.request(nodeseal_client::protocol::Operation::Health).await?;
    /// # Ok(()) }
    /// ```
    pub async fn request(&mut self, op: Operation) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Request::new(op);
        req.id = Some(id.into());
        let line = wire::encode(&req)?;
        let mut backoff = Backoff::new(self.cfg.retry);
        let mut reconnected = false;
        loop {
            self.ensure_connected(&mut backoff).await?;
            let (stream, buf, used) = self.conn.as_mut().expect("connected above");
            let was_used = *used;
            let outcome = exchange(stream, buf, &line, id, &self.cfg).await;
            match outcome {
                Ok(Ok(resp)) => {
                    *used = true;
                    return Ok(resp);
                }
                Ok(Err(e)) if wire::response_is_busy(&e) => {
                    // The agent hangs up after a busy answer; retry on a new connection.
                    self.conn = None;
                    match backoff.next_delay() {
                        Some(d) => tokio::time::sleep(d).await,
                        None => return Err(e),
                    }
                }
                Ok(Err(e)) => {
                    if matches!(e, Error::Agent { .. }) {
                        *used = true;
                    } else {
                        self.conn = None;
                    }
                    return Err(e);
                }
                Err(e) => {
                    self.conn = None;
                    if let Some(d) =
                        wire::retry_after_io(&e, was_used, &mut reconnected, &mut backoff)
                    {
                        tokio::time::sleep(d).await;
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

    async fn ensure_connected(&mut self, backoff: &mut Backoff) -> Result<()> {
        while self.conn.is_none() {
            match UnixStream::connect(&self.cfg.socket).await {
                Ok(s) => {
                    self.conn = Some((s, LineBuffer::new(self.cfg.max_response_bytes), false));
                }
                Err(e) => {
                    let delay = if wire::connect_is_transient(&e) {
                        backoff.next_delay()
                    } else {
                        None
                    };
                    match delay {
                        Some(d) => tokio::time::sleep(d).await,
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
        Ok(())
    }
}

async fn with_timeout<T>(
    d: std::time::Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    if d.is_zero() {
        return f.await;
    }
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the agent did not answer in time",
        )),
    }
}

/// Outer error: I/O; inner: protocol or agent error.
async fn exchange(
    stream: &mut UnixStream,
    buf: &mut LineBuffer,
    line: &[u8],
    id: u64,
    cfg: &Config,
) -> io::Result<Result<Response>> {
    // A failed write is not the end: the agent may have answered (`busy`) and hung up before
    // reading our request, and that answer is still waiting to be read.
    let write_failed = with_timeout(cfg.write_timeout, stream.write_all(line))
        .await
        .err();
    loop {
        match buf.take_line() {
            Err(e) => return Ok(Err(e)),
            Ok(Some(l)) => return Ok(wire::decode(&l, id)),
            Ok(None) => {}
        }
        let room = buf.prepare();
        let n = match with_timeout(cfg.read_timeout, stream.read(room)).await {
            Ok(n) => n,
            Err(e) => {
                buf.commit(0);
                return Err(write_failed.unwrap_or(e));
            }
        };
        buf.commit(n);
        if n == 0 {
            if let Some(e) = write_failed {
                return Err(e);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without a complete answer",
            ));
        }
    }
}
