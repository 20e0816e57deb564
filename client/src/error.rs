//! The client's error type.

use crate::protocol::ErrorCode;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong talking to the agent.
///
/// No variant ever carries a secret: agent messages are secret-free by protocol, and decode
/// errors are reduced to a position (serde's own messages may quote the offending input).
///
/// ```no_run
/// # fn main() {
/// match nodeseal_client::Client::connect().and_then(|mut c| c.get("DB_PASSWORD")) {
///     Ok(_value) => {}
///     Err(e) if e.is_retryable() => eprintln!("try again later: {e}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent answered with an error response.
    #[error("the nodeseal agent refused the request ({code}): {message}")]
    Agent {
        /// Stable error code; act on this, not on the message.
        code: ErrorCode,
        /// The agent's explanation (never contains a secret).
        message: String,
    },
    /// No agent could be reached at `path` within the retry budget.
    #[error(
        "cannot reach the nodeseal agent at {}: {source}; check that nodeseal-agent is running, \
         or point NODESEAL_SOCKET (or --socket) at its socket",
        path.display()
    )]
    Unreachable {
        /// The socket path tried last.
        path: PathBuf,
        /// Why the last attempt failed.
        #[source]
        source: io::Error,
    },
    /// The connection broke or timed out during a request.
    #[error(
        "lost the connection to the nodeseal agent at {}: {source}; retry, and check the agent's \
         log if it keeps happening",
        path.display()
    )]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The agent's answer is not a valid protocol-v1 response.
    #[error(
        "the nodeseal agent sent a response this client does not understand ({0}); client and \
         agent versions may not match"
    )]
    Protocol(String),
    /// The agent's answer is longer than the configured limit.
    #[error(
        "the nodeseal agent's response is longer than {limit} bytes; raise the client's \
         max_response_bytes if the task really holds that much"
    )]
    ResponseTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// Bad client configuration, e.g. an unparsable `NODESEAL_RETRY_SECS`.
    #[error("invalid nodeseal client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The agent's error code, if the agent answered with one.
    ///
    /// ```
    /// use nodeseal_client::{Error, protocol::ErrorCode};
    /// let e = Error::Agent { code: ErrorCode::NotFound, message: "no such value".into() };
    /// assert_eq!(e.code(), Some(ErrorCode::NotFound));
    /// ```
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: the agent said `busy` or `key_unavailable`,
    /// the agent could not be reached, or the connection broke.
    ///
    /// ```
    /// use nodeseal_client::{Error, protocol::ErrorCode};
    /// let e = Error::Agent { code: ErrorCode::KeyUnavailable, message: "key revoked".into() };
    /// assert!(e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Agent { code, .. } => code.is_retryable(),
            Error::Unreachable { .. } | Error::Io { .. } => true,
            _ => false,
        }
    }

    /// The `sysexits.h` exit status the command-line tools use for this error.
    ///
    /// 66 not found, 69 agent unreachable, 75 retryable (`key_unavailable`, `busy`, broken
    /// connection), 77 forbidden, 65 bad token/expired/bad request/too large, 70 internal or
    /// protocol error, 78 configuration error (the agent's `config_error`, or this client's own
    /// configuration).
    ///
    /// ```
    /// use nodeseal_client::{Error, protocol::ErrorCode};
    /// let e = Error::Agent { code: ErrorCode::Forbidden, message: "not your task".into() };
    /// assert_eq!(e.exit_code(), 77);
    /// ```
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Agent { code, .. } => match code {
                ErrorCode::NotFound => exit::NOINPUT,
                ErrorCode::Forbidden => exit::NOPERM,
                ErrorCode::KeyUnavailable | ErrorCode::Busy => exit::TEMPFAIL,
                ErrorCode::BadToken
                | ErrorCode::Expired
                | ErrorCode::BadRequest
                | ErrorCode::TooLarge => exit::DATAERR,
                ErrorCode::ConfigError => exit::CONFIG,
                _ => exit::SOFTWARE,
            },
            Error::Unreachable { .. } => exit::UNAVAILABLE,
            Error::Io { .. } => exit::TEMPFAIL,
            Error::Protocol(_) | Error::ResponseTooLarge { .. } => exit::SOFTWARE,
            Error::Config(_) => exit::CONFIG,
        }
    }
}

/// `sysexits.h` exit statuses used by the command-line tools.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Command-line usage error.
    pub const USAGE: u8 = 64;
    /// Bad input data: bad token, expired, bad request, too large, unrepresentable value.
    pub const DATAERR: u8 = 65;
    /// The value or task does not exist.
    pub const NOINPUT: u8 = 66;
    /// The agent cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// Internal error in the agent, or a response the client does not understand.
    pub const SOFTWARE: u8 = 70;
    /// Writing the output failed.
    pub const IOERR: u8 = 74;
    /// Temporary failure: retry later.
    pub const TEMPFAIL: u8 = 75;
    /// Permission denied.
    pub const NOPERM: u8 = 77;
    /// Configuration error: the agent's (`config_error`) or this client's own.
    pub const CONFIG: u8 = 78;
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_sysexits() {
        let agent = |code| Error::Agent {
            code,
            message: String::new(),
        };
        assert_eq!(agent(ErrorCode::NotFound).exit_code(), 66);
        assert_eq!(agent(ErrorCode::Forbidden).exit_code(), 77);
        assert_eq!(agent(ErrorCode::KeyUnavailable).exit_code(), 75);
        assert_eq!(agent(ErrorCode::Busy).exit_code(), 75);
        for c in [
            ErrorCode::BadToken,
            ErrorCode::Expired,
            ErrorCode::BadRequest,
            ErrorCode::TooLarge,
        ] {
            assert_eq!(agent(c).exit_code(), 65, "{c}");
        }
        assert_eq!(agent(ErrorCode::Internal).exit_code(), 70);
        assert_eq!(agent(ErrorCode::ConfigError).exit_code(), 78);
        assert!(!agent(ErrorCode::ConfigError).is_retryable());
        let unreachable = Error::Unreachable {
            path: "/x".into(),
            source: io::ErrorKind::NotFound.into(),
        };
        assert_eq!(unreachable.exit_code(), 69);
        assert!(unreachable.is_retryable());
        assert!(!agent(ErrorCode::Forbidden).is_retryable());
    }

    #[test]
    fn messages_name_the_socket_and_the_remedy() {
        let e = Error::Unreachable {
            path: "/run/nodeseal/agent.sock".into(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        let s = e.to_string();
        assert!(s.contains("/run/nodeseal/agent.sock"), "{s}");
        assert!(s.contains("NODESEAL_SOCKET"), "{s}");
    }
}
