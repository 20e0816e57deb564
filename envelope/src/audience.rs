//! Token audiences: who on the node a v1 token is for. A bound token carries an authenticated list
//! of selectors (`uid:N`, `user:NAME`, `gid:N`, `group:NAME`, `job:ID`, `task:JOB/TASK`,
//! `pool:ID`); the agent opens it only for a caller one of them matches. Matching needs the
//! caller's attested identity, which only the agent has, so this module only defines, parses and
//! encodes selectors; the decision lives in the agent's `authz`.
//!
//! Wire encoding (inside the v1 body, see `docs/format.md`): a count byte 1..=16, then per
//! selector a kind byte and its operand: a big-endian u32 for `uid`/`gid`, a length byte and the
//! bytes of each identifier otherwise (`task` has two: job, then task). Selectors are in strictly
//! ascending order of their encoded bytes, so a list has exactly one encoding and no duplicates.

use crate::error::TokenError;
use std::fmt;
use std::str::FromStr;

/// At most this many selectors in one token.
pub const MAX_SELECTORS: usize = 16;
/// Longest identifier (user, group, job, task or pool) a selector may hold.
pub const MAX_ID_LEN: usize = 64;

const KIND_UID: u8 = 1;
const KIND_USER: u8 = 2;
const KIND_GID: u8 = 3;
const KIND_GROUP: u8 = 4;
const KIND_JOB: u8 = 5;
const KIND_TASK: u8 = 6;
const KIND_POOL: u8 = 7;

/// One entry of a token's audience.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// A caller whose uid (from the kernel) is this.
    Uid(u32),
    /// A caller whose uid is this user's, as the node's user database says.
    User(String),
    /// A caller with this gid among its primary and supplementary groups.
    Gid(u32),
    /// A caller in this group, as the node's group database says.
    Group(String),
    /// A value that comes from a task of this Batch job.
    Job(String),
    /// A value that comes from this task of this job.
    Task {
        /// Job id.
        job: String,
        /// Task id.
        task: String,
    },
    /// A node of this pool (the agent's configured `pool_id`).
    Pool(String),
}

/// Whether `s` may be a user or group name: `[A-Za-z0-9_][A-Za-z0-9_.-]*`, at most 64 bytes.
pub fn is_valid_account_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= MAX_ID_LEN
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `s` may be a Batch job, task or pool id: letters, digits, `-` and `_`, 1..=64 bytes
/// (Batch's own rule for these ids).
pub fn is_valid_batch_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

impl Selector {
    fn kind(&self) -> u8 {
        match self {
            Self::Uid(_) => KIND_UID,
            Self::User(_) => KIND_USER,
            Self::Gid(_) => KIND_GID,
            Self::Group(_) => KIND_GROUP,
            Self::Job(_) => KIND_JOB,
            Self::Task { .. } => KIND_TASK,
            Self::Pool(_) => KIND_POOL,
        }
    }

    /// Append the wire encoding of this one selector.
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind());
        let mut id = |s: &str| {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        match self {
            Self::Uid(n) | Self::Gid(n) => out.extend_from_slice(&n.to_be_bytes()),
            Self::User(s) | Self::Group(s) | Self::Job(s) | Self::Pool(s) => id(s),
            Self::Task { job, task } => {
                id(job);
                id(task);
            }
        }
    }

    /// The selector's kind as written before the ':' (`uid`, `task`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Uid(_) => "uid",
            Self::User(_) => "user",
            Self::Gid(_) => "gid",
            Self::Group(_) => "group",
            Self::Job(_) => "job",
            Self::Task { .. } => "task",
            Self::Pool(_) => "pool",
        }
    }

    /// Check the identifiers a selector built in code holds (parsing checks them already).
    pub fn validate(&self) -> Result<(), TokenError> {
        // Only the escaped (`{:?}`) identifier goes into the message: an invalid one may come
        // from a hostile token and hold control characters meant for a terminal or a log.
        let kind = self.kind_name();
        let bad = |what: &str, s: &str| {
            Err(TokenError::Invalid(format!(
                "{kind} audience selector: {s:?} is not a valid {what}"
            )))
        };
        match self {
            Self::Uid(_) | Self::Gid(_) => Ok(()),
            Self::User(s) | Self::Group(s) if !is_valid_account_name(s) => bad(
                "account name (letters, digits, '_', '.', '-', at most 64)",
                s,
            ),
            Self::Job(s) | Self::Pool(s) if !is_valid_batch_id(s) => {
                bad("Batch id (letters, digits, '-', '_', at most 64)", s)
            }
            Self::Task { job, .. } if !is_valid_batch_id(job) => bad("Batch job id", job),
            Self::Task { task, .. } if !is_valid_batch_id(task) => bad("Batch task id", task),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid(n) => write!(f, "uid:{n}"),
            Self::User(s) => write!(f, "user:{s}"),
            Self::Gid(n) => write!(f, "gid:{n}"),
            Self::Group(s) => write!(f, "group:{s}"),
            Self::Job(s) => write!(f, "job:{s}"),
            Self::Task { job, task } => write!(f, "task:{job}/{task}"),
            Self::Pool(s) => write!(f, "pool:{s}"),
        }
    }
}

impl FromStr for Selector {
    type Err = TokenError;

    /// `KIND:VALUE` as the CLI takes it (`--audience job:nightly`).
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let invalid = |why: &str| {
            TokenError::Invalid(format!(
                "audience selector {s:?}: {why}; expected one of uid:N, user:NAME, gid:N, \
                 group:NAME, job:ID, task:JOB/TASK, pool:ID"
            ))
        };
        let (kind, value) = s.split_once(':').ok_or_else(|| invalid("no ':'"))?;
        let number = |v: &str| {
            // Canonical decimal only: "007" and "+7" would print differently from what was typed.
            match v.parse::<u32>() {
                Ok(n) if n.to_string() == v => Ok(n),
                _ => Err(invalid("not a decimal number 0..=4294967295")),
            }
        };
        let selector = match kind {
            "uid" => Self::Uid(number(value)?),
            "gid" => Self::Gid(number(value)?),
            "user" => Self::User(value.to_owned()),
            "group" => Self::Group(value.to_owned()),
            "job" => Self::Job(value.to_owned()),
            "pool" => Self::Pool(value.to_owned()),
            "task" => {
                let (job, task) = value
                    .split_once('/')
                    .ok_or_else(|| invalid("a task selector is task:JOB/TASK"))?;
                Self::Task {
                    job: job.to_owned(),
                    task: task.to_owned(),
                }
            }
            _ => return Err(invalid("unknown kind")),
        };
        selector.validate()?;
        Ok(selector)
    }
}

/// Put a list into its one canonical form: validated, duplicates dropped, sorted by encoding.
/// Refuses an empty list (an audience of nobody is a mistake, not a lock) and more than
/// [`MAX_SELECTORS`].
pub fn canonicalize(selectors: &[Selector]) -> Result<Vec<Selector>, TokenError> {
    for s in selectors {
        s.validate()?;
    }
    let mut encoded: Vec<(Vec<u8>, Selector)> = selectors
        .iter()
        .map(|s| {
            let mut b = Vec::new();
            s.encode_into(&mut b);
            (b, s.clone())
        })
        .collect();
    encoded.sort();
    encoded.dedup_by(|a, b| a.0 == b.0);
    if encoded.is_empty() {
        return Err(TokenError::Invalid(
            "an audience needs at least one selector".to_owned(),
        ));
    }
    if encoded.len() > MAX_SELECTORS {
        return Err(TokenError::Invalid(format!(
            "{} audience selectors; a token holds at most {MAX_SELECTORS}",
            encoded.len()
        )));
    }
    Ok(encoded.into_iter().map(|(_, s)| s).collect())
}

/// The wire encoding of a canonical list (see [`canonicalize`]): count byte, then each selector.
pub fn encode(selectors: &[Selector]) -> Result<Vec<u8>, TokenError> {
    let canonical = canonicalize(selectors)?;
    if canonical != selectors {
        return Err(TokenError::Invalid(
            "audience not in canonical order; pass it through audience::canonicalize".to_owned(),
        ));
    }
    let mut out = vec![canonical.len() as u8];
    for s in &canonical {
        s.encode_into(&mut out);
    }
    Ok(out)
}

/// Decode a list from the start of `buf`; returns it and the bytes consumed. Refuses (as
/// *Malformed*, or *Truncated* when `buf` ends early) a count outside 1..=16, an unknown kind,
/// an invalid identifier, and selectors out of canonical order or repeated.
pub fn decode(buf: &[u8]) -> Result<(Vec<Selector>, usize), TokenError> {
    let mut r = Cursor { buf, pos: 0 };
    let count = r.take(1, "selector count")?[0] as usize;
    if count == 0 || count > MAX_SELECTORS {
        return Err(TokenError::Malformed(format!(
            "audience selector count {count} (must be 1..={MAX_SELECTORS})"
        )));
    }
    let mut selectors: Vec<Selector> = Vec::with_capacity(count);
    let mut previous: Option<std::ops::Range<usize>> = None;
    for i in 1..=count {
        let start = r.pos;
        let kind = r.take(1, "selector kind")?[0];
        let selector = match kind {
            KIND_UID | KIND_GID => {
                let b = r.take(4, "uid/gid")?;
                let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if kind == KIND_UID {
                    Selector::Uid(n)
                } else {
                    Selector::Gid(n)
                }
            }
            KIND_USER => Selector::User(r.id(i, "user name")?),
            KIND_GROUP => Selector::Group(r.id(i, "group name")?),
            KIND_JOB => Selector::Job(r.id(i, "job id")?),
            KIND_POOL => Selector::Pool(r.id(i, "pool id")?),
            KIND_TASK => {
                let job = r.id(i, "job id")?;
                let task = r.id(i, "task id")?;
                Selector::Task { job, task }
            }
            other => {
                return Err(TokenError::Malformed(format!(
                    "audience selector {i}: unknown kind {other}"
                )))
            }
        };
        selector
            .validate()
            .map_err(|e| TokenError::Malformed(format!("audience selector {i}: {e}")))?;
        let encoded = start..r.pos;
        if previous
            .as_ref()
            .is_some_and(|p| buf[p.clone()] >= buf[encoded.clone()])
        {
            return Err(TokenError::Malformed(format!(
                "audience selector {i} ({selector}) is repeated or out of canonical order"
            )));
        }
        previous = Some(encoded);
        selectors.push(selector);
    }
    Ok((selectors, r.pos))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TokenError> {
        if self.buf.len() - self.pos < n {
            return Err(TokenError::Truncated(format!(
                "audience ends while reading {what} ({n} bytes needed)"
            )));
        }
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }

    fn id(&mut self, i: usize, what: &str) -> Result<String, TokenError> {
        let len = self.take(1, what)?[0] as usize;
        let raw = self.take(len, what)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| {
            TokenError::Malformed(format!("audience selector {i}: {what} is not ASCII"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    #[test]
    fn every_kind_parses_prints_and_round_trips() {
        let all = [
            "uid:1000",
            "user:_azbatch",
            "gid:0",
            "group:batch-users",
            "job:nightly_etl",
            "task:nightly_etl/task-7",
            "pool:gpu-pool",
        ];
        let parsed: Vec<Selector> = all.iter().map(|s| sel(s)).collect();
        for (s, p) in all.iter().zip(&parsed) {
            assert_eq!(&p.to_string(), s);
        }
        let canonical = canonicalize(&parsed).unwrap();
        let bytes = encode(&canonical).unwrap();
        let (back, used) = decode(&bytes).unwrap();
        assert_eq!(back, canonical);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for bad in [
            "uid",
            "uid:",
            "uid:-1",
            "uid:007",
            "uid:4294967296",
            "user:",
            "user:a b",
            "user:-x",
            "job:a/b",
            "job:",
            "task:onlyjob",
            "task:/t",
            "task:j/",
            "pool:é",
            "host:x",
            &format!("job:{}", "a".repeat(65)),
        ] {
            let err = bad.parse::<Selector>().unwrap_err();
            assert!(matches!(err, TokenError::Invalid(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn canonical_form_is_sorted_unique_and_bounded() {
        let list = vec![sel("job:b"), sel("uid:5"), sel("job:b"), sel("job:a")];
        assert_eq!(
            canonicalize(&list).unwrap(),
            vec![sel("uid:5"), sel("job:a"), sel("job:b")]
        );
        assert!(canonicalize(&[]).is_err());
        let many: Vec<Selector> = (0..17).map(Selector::Uid).collect();
        assert!(canonicalize(&many).is_err());
        assert!(encode(&[sel("job:b"), sel("job:a")]).is_err());
    }

    #[test]
    fn decoder_refuses_non_canonical_and_broken_lists() {
        let good = encode(&canonicalize(&[sel("uid:1"), sel("job:a")]).unwrap()).unwrap();
        // Swap order: job before uid.
        let mut swapped = vec![2u8];
        sel("job:a").encode_into(&mut swapped);
        sel("uid:1").encode_into(&mut swapped);
        let mut repeated = vec![2u8];
        sel("uid:1").encode_into(&mut repeated);
        sel("uid:1").encode_into(&mut repeated);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0], "count 0"),
            (vec![17], "count 17"),
            (swapped, "order"),
            (repeated, "repeat"),
            (vec![1, 9, 0, 0, 0, 0], "kind 9"),
            (vec![1, KIND_JOB, 0], "empty id"),
            (vec![1, KIND_JOB, 3, b'a', b'/', b'b'], "slash in job"),
            (good[..good.len() - 1].to_vec(), "truncated"),
        ];
        for (bytes, what) in cases {
            assert!(decode(&bytes).is_err(), "{what}");
        }
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(TokenError::Truncated(_))
        ));
    }
}
