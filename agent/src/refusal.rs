//! Every reason the agent says no, as one enum with one mapping to the wire's error codes. The
//! messages never hold a secret; they say what went wrong and what to do.

use nodeseal_client::protocol::{ErrorCode, Response, PROTOCOL_VERSION};
use nodeseal_envelope::{Thumbprint, TokenError};
use std::path::PathBuf;

/// Why a request or a connection was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error(
        "protocol version {asked} is not supported; this agent speaks version {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion { asked: u32 },
    #[error("operation not supported by this agent")]
    UnsupportedOperation,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("{op} is for host root only")]
    HostRootOnly { op: &'static str },
    #[error("this per-task socket answers only for its own task")]
    ForeignTask,
    #[error("name the task: set \"task\" to the task directory (AZ_BATCH_TASK_DIR)")]
    NameTheTask,
    #[error("no task env file owned by uid {uid} is known")]
    NoTaskOwned { uid: u32 },
    #[error(
        "uid {uid} owns {count} tasks; set \"task\" to the task directory (AZ_BATCH_TASK_DIR)"
    )]
    SeveralTasksOwned { uid: u32, count: usize },
    #[error("no env file is known for task {}", task_dir.display())]
    UnknownTask { task_dir: PathBuf },
    #[error("uid 0 outside the host's pid namespace is not host root; use the task's own socket")]
    ContainerRoot,
    #[error("uid {uid} does not own the env files of task {}", task_dir.display())]
    NotOwner { uid: u32, task_dir: PathBuf },
    #[error("no variable {name} in this task's env files")]
    NoSuchVariable { name: String },
    #[error("uid {uid} may not open tokens of key {key} (see open_allowed_uids and open_allowed_by_key in the agent config)")]
    OpenNotAllowed { uid: u32, key: Thumbprint },
    #[error("the stored token is invalid: {reason}")]
    InvalidStoredToken { reason: String },
    #[error("not a nodeseal v1 token nor a Batch Shipyard ciphertext")]
    NotAToken,
    #[error(
        "none of the token's keys is available on this node ({}); retry later",
        list(recipients)
    )]
    NoKeyAvailable { recipients: Vec<Thumbprint> },
    #[error("legacy ciphertext is {ciphertext_bits} bits but legacy_key {key} is {key_bits} bits")]
    LegacyKeySizeMismatch {
        ciphertext_bits: usize,
        key: Thumbprint,
        key_bits: u32,
    },
    #[error("legacy_key {key} is not available on this node; retry later")]
    LegacyKeyUnavailable { key: Thumbprint },
    #[error("no {bits}-bit key is available on this node for this legacy ciphertext; retry later")]
    NoLegacyKey { bits: usize },
    #[error("{count} keys of {bits} bits are loaded and legacy ciphertexts name none; set legacy_key in the agent config")]
    AmbiguousLegacyKey { count: usize, bits: usize },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("the decrypted value is not UTF-8 text")]
    NotUtf8,
    #[error("{0}")]
    BadThumbprint(String),
    /// One value of an `env` answer failed: the whole answer fails with its name.
    #[error("{name}: {inner}")]
    InValue { name: String, inner: Box<Refusal> },
    #[error("the agent is shutting down; retry shortly")]
    ShuttingDown,
    #[error("request line longer than {max} bytes")]
    RequestTooLong { max: usize },
    #[error("request line not completed within {secs} s")]
    RequestIncomplete { secs: u64 },
    #[error("request rate limit exceeded; slow down and retry")]
    RateLimited,
    #[error("decryption rate limit of {per_sec} RSA operations per second for this uid exceeded (limits.rsa_ops_per_sec_per_uid); slow down and retry")]
    DecryptRateLimited { per_sec: u32 },
    #[error("the decrypt queue is full; retry shortly")]
    DecryptQueueFull,
    #[error("the token names key {key} more than once; seal it again")]
    DuplicateRecipient { key: Thumbprint },
    #[error("too many connections; retry shortly")]
    TooManyConnections,
    #[error("too many connections from this uid; retry shortly")]
    TooManyConnectionsForUid,
    #[error("{0}")]
    Internal(String),
}

fn list(tps: &[Thumbprint]) -> String {
    tps.iter()
        .map(Thumbprint::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Refusal {
    /// The wire's error code: the one place that decides it.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion { .. }
            | Self::UnsupportedOperation
            | Self::Malformed(_)
            | Self::NameTheTask
            | Self::SeveralTasksOwned { .. }
            | Self::BadThumbprint(_)
            | Self::RequestIncomplete { .. } => ErrorCode::BadRequest,
            Self::HostRootOnly { .. }
            | Self::ForeignTask
            | Self::ContainerRoot
            | Self::NotOwner { .. }
            | Self::OpenNotAllowed { .. } => ErrorCode::Forbidden,
            Self::NoTaskOwned { .. } | Self::UnknownTask { .. } | Self::NoSuchVariable { .. } => {
                ErrorCode::NotFound
            }
            Self::InvalidStoredToken { .. }
            | Self::NotAToken
            | Self::LegacyKeySizeMismatch { .. }
            | Self::NotUtf8
            | Self::DuplicateRecipient { .. } => ErrorCode::BadToken,
            Self::NoKeyAvailable { .. }
            | Self::LegacyKeyUnavailable { .. }
            | Self::NoLegacyKey { .. }
            | Self::AmbiguousLegacyKey { .. } => ErrorCode::KeyUnavailable,
            Self::Token(e) => match e {
                TokenError::Expired { .. } => ErrorCode::Expired,
                TokenError::NoMatchingKey { .. } => ErrorCode::KeyUnavailable,
                TokenError::TooLarge { .. } => ErrorCode::TooLarge,
                TokenError::Crypto { .. } => ErrorCode::Internal,
                _ => ErrorCode::BadToken,
            },
            Self::InValue { inner, .. } => inner.code(),
            Self::ShuttingDown
            | Self::RateLimited
            | Self::DecryptRateLimited { .. }
            | Self::DecryptQueueFull
            | Self::TooManyConnections
            | Self::TooManyConnectionsForUid => ErrorCode::Busy,
            Self::RequestTooLong { .. } => ErrorCode::TooLarge,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The error answer.
    pub(crate) fn to_response(&self) -> Response {
        Response::error(self.code(), self.to_string())
    }

    /// The error answer as one newline-terminated line.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(&self.to_response()).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_value_keeps_its_code_and_names_the_variable() {
        let r = Refusal::InValue {
            name: "DB".into(),
            inner: Box::new(Refusal::NoLegacyKey { bits: 4096 }),
        };
        assert_eq!(r.code(), ErrorCode::KeyUnavailable);
        assert!(r.to_string().starts_with("DB: no 4096-bit key"));
    }

    #[test]
    fn refusals_of_identity_are_forbidden_and_limits_are_retryable() {
        for r in [
            Refusal::ContainerRoot,
            Refusal::ForeignTask,
            Refusal::HostRootOnly { op: "status" },
        ] {
            assert_eq!(r.code(), ErrorCode::Forbidden, "{r}");
        }
        for r in [Refusal::RateLimited, Refusal::TooManyConnectionsForUid] {
            assert!(r.code().is_retryable(), "{r}");
        }
    }
}
