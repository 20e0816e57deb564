//! Thin client for the nodeseal agent.
//!
//! A task process asks the node's `nodeseal-agent` for the cleartext of the values sealed into
//! its task, over a Unix socket; the agent decides by the caller's kernel credentials. This crate
//! holds the wire types ([`protocol`]), a blocking [`Client`], an optional tokio
//! [`AsyncClient`] (feature `async`), and the `nodeseal-client` and `docker-credential-nodeseal`
//! programs. The library depends only on std, serde, zeroize and secrecy.
//!
//! ```no_run
//! use secrecy::ExposeSecret;
//! let mut client = nodeseal_client::Client::connect()?;
//! let password = client.get("DB_PASSWORD")?;
//! # let _ = password.expose_secret();
//! # Ok::<(), nodeseal_client::Error>(())
//! ```
//!
//! Discovery: an explicit socket ([`Client::connect_to`], [`Builder::socket`]), else
//! `$NODESEAL_SOCKET`, else `$AZ_BATCH_TASK_DIR/nodeseal.sock` if it exists, else
//! `/run/nodeseal/agent.sock`. The task directory sent with each request is
//! `$AZ_BATCH_TASK_DIR`, else the parent of `$AZ_BATCH_TASK_WORKING_DIR` when that ends in `/wd`.
//! A missing or refusing socket and `busy` answers are retried with exponential backoff
//! (50 ms doubling to 1 s) for 10 s in total, or `$NODESEAL_RETRY_SECS`.
//! Both clients drive the same exchange logic, so they retry, reconnect and fail alike.
#![forbid(unsafe_code)]

#[cfg(feature = "async")]
mod async_client;
mod client;
mod config;
mod error;
mod exchange;
mod ops;
pub mod protocol;
mod secret;
mod wire;

#[cfg(feature = "async")]
pub use async_client::AsyncClient;
pub use client::Client;
pub use config::{
    Builder, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_READ_TIMEOUT, DEFAULT_RETRY,
    DEFAULT_WRITE_TIMEOUT, RETRY_SECS_ENV, SOCKET_ENV, TASK_SOCKET_NAME,
};
pub use error::{exit, Error, Result};
pub use ops::{first_failure, PartialEnv};
/// Re-exported so callers can name [`secrecy::ExposeSecret`] without their own dependency.
pub use secrecy;
pub use secret::Secret;
