//! Every reason the agent says no, as one enum with one mapping to the wire's error codes. The
//! messages never hold a secret; they say what went wrong and what to do.

use nodeseal_client::protocol::{ErrorCode, Response, PROTOCOL_VERSION};
use nodeseal_envelope::{Selector, Thumbprint, TokenError};
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
    #[error("uid 0 outside the host's pid or user namespace is not host root; use the task's own socket")]
    ContainerRoot,
    #[error("uid {uid} is not known to be a process of the host's pid namespace (a container, a caller that has gone, or the kernel would not say), where it could have taken any uid: the host socket does not serve it; use the task's own socket")]
    OutsideHost { uid: u32 },
    #[error("this kernel cannot attest the caller (no SO_PEERPIDFD, Linux 6.5): admin operations are refused and uid 0 is not host root here; use the task's own socket for a task's values")]
    CallerUnattested,
    /// For a caller other than host root: one answer whether the task does not exist or is
    /// another's, so callers cannot probe which tasks exist.
    #[error("no env file of task {} that uid {uid} may read is known", task_dir.display())]
    NoReadableTask { uid: u32, task_dir: PathBuf },
    #[error("this value's env file is not the caller's to read")]
    NoReadableValue,
    /// The policy's refusal of a bound token: which selectors, matched against what.
    #[error(
        "the token is bound to the audience {} and this caller ({caller}) is not in it; seal the \
         value with an --audience that names the caller",
        selectors(audience)
    )]
    NotForCaller {
        audience: Vec<Selector>,
        caller: String,
    },
    #[error("this agent requires an audience (require_audience) and this value is sealed without one; seal it again with --audience")]
    AudienceRequired,
    #[error("no variable {name} in this task's env files")]
    NoSuchVariable { name: String },
    #[error("{name} is on line {line} of {file}, which is not served: {reason}")]
    SkippedLine {
        name: String,
        file: String,
        line: u64,
        reason: String,
    },
    #[error("uid {uid} may not open unbound tokens of key {key}: seal the value with --audience, or name the uid in open_allowed_uids (or its group in open_allowed_gids, or a rule in open_allowed_by_key) in the agent config")]
    OpenNotAllowed { uid: u32, key: Thumbprint },
    #[error("uid {uid} may not open unbound tokens: seal the value with --audience, or name the uid in open_allowed_uids (or its group in open_allowed_gids) in the agent config")]
    UnboundNotAllowed { uid: u32 },
    #[error(
        "the token is bound to the audience {} and this caller is not in it; seal the value \
         with an --audience that names the caller",
        selectors(audience)
    )]
    NotInAudience { audience: Vec<Selector> },
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
    #[error("{count} keys of {bits} bits are loaded and a legacy ciphertext names none, so the agent cannot tell which one opens it; this is a node configuration problem, retrying will not help: set legacy_key in the agent config (see `nodeseal-agent check`)")]
    AmbiguousLegacyKey { count: usize, bits: usize },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("the decrypted value is not UTF-8 text")]
    NotUtf8,
    #[error("{0}")]
    BadThumbprint(String),
    #[error("the agent is shutting down; retry shortly")]
    ShuttingDown,
    #[error("request line longer than {max} bytes")]
    RequestTooLong { max: usize },
    #[error("request line not completed within {secs} s")]
    RequestIncomplete { secs: u64 },
    #[error("request rate limit of this uid exceeded (limits.requests_per_sec_per_uid; its turn was further off than limits.max_rate_wait_ms); slow down and retry")]
    RateLimited,
    #[error("decryption rate limit of {per_sec} RSA operations per second for this uid exceeded (limits.rsa_ops_per_sec_per_uid; its turn was further off than limits.max_rate_wait_ms); slow down and retry")]
    DecryptRateLimited { per_sec: u32 },
    #[error("the decrypt queue is full; retry shortly")]
    DecryptQueueFull,
    #[error("the token names key {key} more than once; seal it again")]
    DuplicateRecipient { key: Thumbprint },
    #[error("too many connections; retry shortly")]
    TooManyConnections,
    #[error("too many connections from this uid; retry shortly")]
    TooManyConnectionsForUid,
    /// An env file of the task broke a cap: the task answers this, never a partial view.
    #[error("env file {} is refused: {why}", path.display())]
    EnvFileRefused {
        path: PathBuf,
        why: crate::tasks::envfile::OverCap,
    },
    #[error("the answer is at least {len} bytes, over {max} (limits.max_response_bytes); ask for fewer values, e.g. one get at a time")]
    ResponseTooLarge { len: usize, max: usize },
    #[error("uid {uid} already has {used} bytes of answers being written; this one ({len} bytes) would pass {max} (limits.memory_budget_per_uid); read the answers already asked for, then retry")]
    MemoryBudgetFull {
        uid: u32,
        used: usize,
        len: usize,
        max: usize,
    },
    #[error("{0}")]
    Internal(String),
}

fn list(tps: &[Thumbprint]) -> String {
    tps.iter()
        .map(Thumbprint::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Selectors are validated when parsed (letters, digits and `_.-/:` only), so they need no
/// escaping here.
fn selectors(list: &[Selector]) -> String {
    list.iter()
        .map(Selector::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Refusal {
    /// A failed `token::open_v1`: an audience refusal is the caller's identity, not the token.
    pub(crate) fn from_open_error(e: TokenError) -> Self {
        match e {
            TokenError::NotInAudience { audience } => Self::NotInAudience { audience },
            e => Self::Token(e),
        }
    }

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
            | Self::OutsideHost { .. }
            | Self::CallerUnattested
            | Self::NoReadableValue
            | Self::NotInAudience { .. }
            | Self::NotForCaller { .. }
            | Self::AudienceRequired
            | Self::OpenNotAllowed { .. }
            | Self::UnboundNotAllowed { .. } => ErrorCode::Forbidden,
            Self::NoTaskOwned { .. }
            | Self::UnknownTask { .. }
            | Self::NoReadableTask { .. }
            | Self::NoSuchVariable { .. }
            | Self::SkippedLine { .. } => ErrorCode::NotFound,
            Self::InvalidStoredToken { .. }
            | Self::NotAToken
            | Self::LegacyKeySizeMismatch { .. }
            | Self::NotUtf8
            | Self::DuplicateRecipient { .. } => ErrorCode::BadToken,
            Self::NoKeyAvailable { .. }
            | Self::LegacyKeyUnavailable { .. }
            | Self::NoLegacyKey { .. } => ErrorCode::KeyUnavailable,
            // Batch requeues retryable failures: an ambiguity only an operator can resolve must
            // not look like a key that may still arrive.
            Self::AmbiguousLegacyKey { .. } => ErrorCode::ConfigError,
            Self::Token(e) => match e {
                TokenError::Expired { .. } => ErrorCode::Expired,
                TokenError::NotInAudience { .. } => ErrorCode::Forbidden,
                TokenError::NoMatchingKey { .. } => ErrorCode::KeyUnavailable,
                TokenError::TooLarge { .. } => ErrorCode::TooLarge,
                TokenError::Crypto { .. } => ErrorCode::Internal,
                _ => ErrorCode::BadToken,
            },
            Self::ShuttingDown
            | Self::RateLimited
            | Self::DecryptRateLimited { .. }
            | Self::DecryptQueueFull
            | Self::TooManyConnections
            | Self::TooManyConnectionsForUid
            | Self::MemoryBudgetFull { .. } => ErrorCode::Busy,
            // A cap the task's own data breaks: retrying changes nothing until the data does.
            Self::RequestTooLong { .. }
            | Self::EnvFileRefused { .. }
            | Self::ResponseTooLarge { .. } => ErrorCode::TooLarge,
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
    fn an_ambiguous_legacy_key_is_a_configuration_error_not_a_retry() {
        let r = Refusal::AmbiguousLegacyKey {
            count: 2,
            bits: 4096,
        };
        assert_eq!(r.code(), ErrorCode::ConfigError);
        assert!(!r.code().is_retryable());
        assert!(r.to_string().contains("legacy_key"), "{r}");
    }

    #[test]
    fn refusals_of_identity_are_forbidden_and_limits_are_retryable() {
        for r in [
            Refusal::ContainerRoot,
            Refusal::OutsideHost { uid: 1000 },
            Refusal::CallerUnattested,
            Refusal::ForeignTask,
            Refusal::HostRootOnly { op: "status" },
        ] {
            assert_eq!(r.code(), ErrorCode::Forbidden, "{r}");
        }
        let bound = Refusal::from_open_error(TokenError::NotInAudience {
            audience: vec!["job:nightly".parse().unwrap(), "uid:1000".parse().unwrap()],
        });
        assert_eq!(bound.code(), ErrorCode::Forbidden);
        assert!(
            bound.to_string().contains("audience job:nightly, uid:1000"),
            "{bound}"
        );
        for r in [
            Refusal::RateLimited,
            Refusal::TooManyConnectionsForUid,
            Refusal::MemoryBudgetFull {
                uid: 5,
                used: 1,
                len: 1,
                max: 1,
            },
        ] {
            assert!(r.code().is_retryable(), "{r}");
        }
    }

    #[test]
    fn caps_a_task_breaks_are_too_large_not_retryable_and_named() {
        let refused = Refusal::EnvFileRefused {
            path: "/t/wd/nodeseal.env".into(),
            why: crate::tasks::envfile::OverCap::Vars { max: 10 },
        };
        let response = Refusal::ResponseTooLarge { len: 20, max: 10 };
        for (r, cap) in [
            (refused, "limits.max_vars_per_file"),
            (response, "limits.max_response_bytes"),
        ] {
            assert_eq!(r.code(), ErrorCode::TooLarge, "{r}");
            assert!(!r.code().is_retryable(), "{r}");
            assert!(r.to_string().contains(cap), "{r}");
        }
    }
}
