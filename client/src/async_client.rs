//! The tokio client (feature `async`): a tokio `UnixStream` driving the [`Exchange`].

use crate::config::Builder;
use crate::error::Result;
use crate::exchange::{Action, Event, Exchange};
use crate::ops::{self, Call};
use crate::protocol::{Operation, Response};
use crate::Secret;
use std::future::Future;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};
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
    exchange: Exchange,
    stream: Option<UnixStream>,
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
            exchange: Exchange::connect(self.resolve()?, Instant::now()),
            stream: None,
        };
        client.drive().await?;
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
        let call = ops::get(name, self.task());
        self.call(call).await
    }

    /// Every value of the task, in env-file order.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let all = c.env().await?;
    /// # Ok(()) }
    /// ```
    pub async fn env(&mut self) -> Result<Vec<(String, Secret)>> {
        let call = ops::env(self.task());
        self.call(call).await
    }

    /// The task's variable names.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let names = c.list().await?;
    /// # Ok(()) }
    /// ```
    pub async fn list(&mut self) -> Result<Vec<String>> {
        let call = ops::list(self.task());
        self.call(call).await
    }

    /// Decrypt a token the caller holds, bound to `name`.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient, token: &str) -> Result<(), nodeseal_client::Error> {
    /// let v = c.open(token, Some("DB_PASSWORD")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(&mut self, token: &str, name: Option<&str>) -> Result<Secret> {
        self.call(ops::open(token, name, self.task())).await
    }

    /// Liveness and version.
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// println!("{}", c.health().await?);
    /// # Ok(()) }
    /// ```
    pub async fn health(&mut self) -> Result<serde_json::Value> {
        self.call(ops::health()).await
    }

    /// Keys, tasks and counters (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// println!("{}", c.status().await?);
    /// # Ok(()) }
    /// ```
    pub async fn status(&mut self) -> Result<serde_json::Value> {
        self.call(ops::status()).await
    }

    /// Withdraw a key (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// c.revoke("3f786850e387550fdab836ed7e6dc881de23001b", false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke(&mut self, thumbprint: &str, purge: bool) -> Result<serde_json::Value> {
        self.call(ops::revoke(thumbprint, purge)).await
    }

    /// Undo a revocation (host root only).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// c.restore("3f786850e387550fdab836ed7e6dc881de23001b").await?;
    /// # Ok(()) }
    /// ```
    pub async fn restore(&mut self, thumbprint: &str) -> Result<serde_json::Value> {
        self.call(ops::restore(thumbprint)).await
    }

    /// Send any operation; see [`Client::request`](crate::Client::request).
    ///
    /// ```no_run
    /// # async fn f(c: &mut nodeseal_client::AsyncClient) -> Result<(), nodeseal_client::Error> {
    /// let r = c.request(nodeseal_client::protocol::Operation::Health).await?;
    /// # Ok(()) }
    /// ```
    pub async fn request(&mut self, op: Operation) -> Result<Response> {
        self.exchange.request(op, Instant::now());
        Exchange::response(self.drive().await?)
    }

    async fn call<T>(&mut self, call: Call<T>) -> Result<T> {
        (call.parse)(self.request(call.op).await?)
    }

    /// Perform the exchange's actions until it finishes: `None` when it only connected.
    async fn drive(&mut self) -> Result<Option<Response>> {
        let cfg = self.exchange.config();
        let (read_timeout, write_timeout) = (cfg.read_timeout, cfg.write_timeout);
        loop {
            // tokio retries EINTR itself.
            let event = match self.exchange.poll() {
                Action::Connect(path) => {
                    self.stream = None;
                    match UnixStream::connect(path).await {
                        Ok(stream) => {
                            self.stream = Some(stream);
                            Event::Connected
                        }
                        Err(e) => Event::ConnectFailed(e),
                    }
                }
                Action::Write(bytes) => match connected(&mut self.stream) {
                    Err(e) => Event::WriteFailed(e),
                    Ok(stream) => match with_timeout(write_timeout, stream.write(bytes)).await {
                        None => Event::TimedOut,
                        Some(Ok(n)) => Event::Wrote(n),
                        Some(Err(e)) => Event::WriteFailed(e),
                    },
                },
                Action::Read(buf) => match connected(&mut self.stream) {
                    Err(e) => Event::ReadFailed(e),
                    Ok(stream) => match with_timeout(read_timeout, stream.read(buf)).await {
                        None => Event::TimedOut,
                        Some(Ok(n)) => Event::Read(n),
                        Some(Err(e)) => Event::ReadFailed(e),
                    },
                },
                Action::Sleep(d) => {
                    tokio::time::sleep(d).await;
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

    fn task(&self) -> Option<&str> {
        self.exchange.config().task.as_deref()
    }
}

fn connected(stream: &mut Option<UnixStream>) -> io::Result<&mut UnixStream> {
    stream
        .as_mut()
        .ok_or_else(|| io::ErrorKind::NotConnected.into())
}

/// `None` if `d` passed first; zero means no timeout, as for the blocking client's sockets.
async fn with_timeout<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    if d.is_zero() {
        return Some(f.await);
    }
    tokio::time::timeout(d, f).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn futures_can_be_spawned() {
        let f = async {
            let mut c = AsyncClient::connect_to("/nonexistent.sock").await?;
            c.get("A").await
        };
        assert_send(&f);
    }

    #[tokio::test]
    async fn a_silent_agent_times_out_with_the_shared_wording() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut c = Builder::new()
            .socket(&path)
            .read_timeout(Duration::from_millis(50))
            .connect_async()
            .await
            .unwrap();
        match c.health().await.unwrap_err() {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut);
                assert_eq!(source.to_string(), "the agent did not answer in time");
            }
            e => panic!("{e:?}"),
        }
    }
}
