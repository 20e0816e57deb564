//! Who may read what: pure decisions over plain data. The kernel-reported caller, the socket it
//! came in on, the task it asks about with the owners of that task's env files, the token's
//! audience and the opening policy from the config go in; a decision or a typed [`Refusal`]
//! comes out. No I/O and no locks here (user and group names are resolved through an injected
//! [`Accounts`]), so every rule is tested below without root.
//!
//! [`decide`] is the one function that decides every opening: a value of an env file (`get`,
//! `env`, `list`) and a token the caller presents (`open`), on the host socket and on per-task
//! sockets alike.

use crate::config::{Config, OpenRule};
use crate::refusal::Refusal;
use nodeseal_envelope::audience::Selector;
use nodeseal_envelope::Thumbprint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The caller as the kernel reported it when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Effective uid.
    pub(crate) uid: u32,
    /// Effective gid.
    pub(crate) gid: u32,
    /// Supplementary groups at `connect()` (`SO_PEERGROUPS`).
    pub(crate) groups: Vec<u32>,
    /// uid 0 in the agent's own pid namespace, attested through a pidfd at accept. Root in a
    /// container is not host root.
    pub(crate) host_root: bool,
    /// A process of the agent's own pid namespace, attested through a pidfd at accept.
    pub(crate) host_process: bool,
    /// Whether the kernel can attest where callers run (`SO_PEERPIDFD`); without it nobody is
    /// host root, and uid 0 is told why.
    pub(crate) namespace_attested: bool,
}

impl Caller {
    /// Whether `gid` is the caller's primary or one of its supplementary groups.
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// uid 0 outside the host's pid namespace: root of some container, not a node account, so
    /// no uid, user, gid or group selector names it.
    fn is_container_root(&self) -> bool {
        self.uid == 0 && !self.host_root
    }

    /// Whether the caller's uid and groups name a node account. Not for container root, and not
    /// for any process the kernel places outside the host's pid namespace: root of a container
    /// without a user namespace of its own can take any uid, so a uid it shows proves nothing.
    /// (Without `SO_PEERPIDFD` that cannot be told, and the uid is taken as shown.)
    fn is_node_account(&self) -> bool {
        !self.is_container_root() && (self.host_process || !self.namespace_attested)
    }
}

/// Which socket a request came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The host-wide socket: access by the caller's credentials.
    Host,
    /// A per-task socket inside this task directory: answers for that task only, whoever asks
    /// (reaching the socket file is the credential), and only with the env files of the task's
    /// owner.
    Task { dir: PathBuf, owner: u32 },
}

/// On the host socket a caller is served by its uid only as a host process. Root in a container
/// without a user namespace of its own keeps CAP_SETUID over the host's uids and can connect as
/// any of them, so a caller the kernel attests to run elsewhere (or to have gone) is no uid
/// there. Without `SO_PEERPIDFD` nothing can be attested and reads by uid go on.
fn outside_host(caller: &Caller, scope: &Scope) -> bool {
    *scope == Scope::Host && caller.namespace_attested && !caller.host_process
}

/// Admin operations: host root on the host socket only.
pub(crate) fn require_host_root(
    caller: &Caller,
    scope: &Scope,
    op: &'static str,
) -> Result<(), Refusal> {
    if caller.host_root && *scope == Scope::Host {
        Ok(())
    } else if caller.uid == 0 && !caller.namespace_attested && *scope == Scope::Host {
        Err(Refusal::CallerUnattested)
    } else {
        Err(Refusal::HostRootOnly { op })
    }
}

/// Normalise what a caller names as its task: its task dir or its `wd/`.
pub(crate) fn normalize_task_dir(s: &str) -> PathBuf {
    let p = Path::new(s.trim_end_matches('/'));
    if p.file_name().is_some_and(|n| n == "wd") {
        p.parent().unwrap_or(p).to_path_buf()
    } else {
        p.to_path_buf()
    }
}

/// The task a read (`get`, `env`, `list`) concerns: the socket's own task, the one the caller
/// names, or the only task the caller owns. `owned_by` lists the task dirs whose env files a uid
/// owns; it is asked only when the caller names no task on the host socket.
pub(crate) fn task_to_read(
    caller: &Caller,
    scope: &Scope,
    asked: Option<&str>,
    owned_by: impl FnOnce(u32) -> Vec<PathBuf>,
) -> Result<PathBuf, Refusal> {
    match (scope, asked) {
        (Scope::Task { dir, .. }, None) => Ok(dir.clone()),
        (Scope::Task { dir, .. }, Some(t)) => {
            let asked = normalize_task_dir(t);
            if &asked == dir {
                Ok(asked)
            } else {
                Err(Refusal::ForeignTask)
            }
        }
        (Scope::Host, Some(t)) => Ok(normalize_task_dir(t)),
        (Scope::Host, None) if caller.uid == 0 => Err(Refusal::NameTheTask),
        (Scope::Host, None) if outside_host(caller, scope) => {
            Err(Refusal::OutsideHost { uid: caller.uid })
        }
        (Scope::Host, None) => {
            let mut owned = owned_by(caller.uid);
            match owned.len() {
                0 => Err(Refusal::NoTaskOwned { uid: caller.uid }),
                1 => Ok(owned.remove(0)),
                count => Err(Refusal::SeveralTasksOwned {
                    uid: caller.uid,
                    count,
                }),
            }
        }
    }
}

/// Whether the caller may read an env file owned by `owner` through `scope`: on a per-task
/// socket, the files of the socket's owner; on the host socket, its own files, or every file for
/// host root. Root of a container owns no file on the host socket.
fn may_read_file(caller: &Caller, scope: &Scope, owner: u32) -> bool {
    match scope {
        Scope::Task {
            owner: task_owner, ..
        } => owner == *task_owner,
        Scope::Host if caller.host_root => true,
        Scope::Host if caller.uid == 0 || outside_host(caller, scope) => false,
        Scope::Host => owner == caller.uid,
    }
}

/// Which of a task's env files (given by their owners, in order) the caller may read; the
/// answer is their positions, never empty. A caller other than host root gets one and the same
/// refusal for a task that does not exist and for a task it may not read, so it cannot probe
/// which tasks exist.
pub(crate) fn readable_files(
    caller: &Caller,
    scope: &Scope,
    task_dir: &Path,
    owners: &[u32],
) -> Result<Vec<usize>, Refusal> {
    if *scope == Scope::Host && caller.is_container_root() {
        return Err(if caller.namespace_attested {
            Refusal::ContainerRoot
        } else {
            Refusal::CallerUnattested
        });
    }
    if outside_host(caller, scope) {
        return Err(Refusal::OutsideHost { uid: caller.uid });
    }
    let readable: Vec<usize> = (0..owners.len())
        .filter(|&i| may_read_file(caller, scope, owners[i]))
        .collect();
    if !readable.is_empty() {
        return Ok(readable);
    }
    if caller.host_root && *scope == Scope::Host {
        return Err(Refusal::UnknownTask {
            task_dir: task_dir.to_owned(),
        });
    }
    Err(Refusal::NoReadableTask {
        uid: caller.uid,
        task_dir: task_dir.to_owned(),
    })
}

/// The task an `open` speaks for, whose job and task ids job and task selectors are matched
/// against: the per-task socket's task; on the host socket the task the caller names, else the
/// only task whose env files the caller owns. `None`: no task context (host root or container
/// root naming none, a caller owning none or several). A named task still has to pass
/// [`readable_files`].
pub(crate) fn task_for_open(
    caller: &Caller,
    scope: &Scope,
    asked: Option<&str>,
    owned_by: impl FnOnce(u32) -> Vec<PathBuf>,
) -> Result<Option<PathBuf>, Refusal> {
    match (scope, asked) {
        // Which tasks a process outside the host owns cannot be told: its uid proves nothing.
        (Scope::Host, None) if caller.uid == 0 || outside_host(caller, scope) => Ok(None),
        (Scope::Host, None) => {
            let mut owned = owned_by(caller.uid);
            Ok((owned.len() == 1).then(|| owned.remove(0)))
        }
        _ => task_to_read(caller, scope, asked, owned_by).map(Some),
    }
}

/// Looks up user and group names in the node's account database. Names that do not resolve
/// match nobody.
pub(crate) trait Accounts {
    /// The uid of user `name`.
    fn uid_of_user(&self, name: &str) -> Option<u32>;
    /// The gid of group `name`.
    fn gid_of_group(&self, name: &str) -> Option<u32>;
}

/// The Batch ids of a verified task (its place in the task tree: see `tasks::layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TaskIds<'a> {
    /// Job id (none in the flat layout).
    pub(crate) job: Option<&'a str>,
    /// Task id.
    pub(crate) task: Option<&'a str>,
}

/// Where the value to open comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin<'a> {
    /// An env file of a verified task, owned by `owner`.
    EnvFile { owner: u32, task: TaskIds<'a> },
    /// A token the caller presents (`open`), with the caller's task (see [`task_for_open`]).
    Presented { task: Option<TaskIds<'a>> },
}

impl<'a> Origin<'a> {
    fn task(&self) -> Option<TaskIds<'a>> {
        match self {
            Self::EnvFile { task, .. } => Some(*task),
            Self::Presented { task } => *task,
        }
    }
}

/// Who a token is for. Legacy Shipyard ciphertexts and v1 tokens sealed without an audience
/// are unbound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience<'a> {
    /// For whoever may read the env file that holds it.
    Unbound,
    /// For the callers one of these selectors matches.
    Bound(&'a [Selector]),
}

/// The opening policy, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    /// This node's pool (`pool:` selectors match it); `None` matches no `pool:` selector.
    pub(crate) pool_id: Option<&'a str>,
    /// Uids that may `open` unbound tokens (host root always may).
    pub(crate) open_uids: &'a [u32],
    /// Gids (primary or supplementary) that may `open` unbound tokens.
    pub(crate) open_gids: &'a [u32],
    /// Per-key rules for unbound tokens, replacing the two above for their key.
    pub(crate) open_by_key: &'a BTreeMap<Thumbprint, OpenRule>,
    /// Refuse every unbound token, everywhere and for everyone.
    pub(crate) require_audience: bool,
}

impl<'a> Policy<'a> {
    pub(crate) fn of(config: &'a Config) -> Self {
        Self {
            pool_id: config.pool_id.as_deref(),
            open_uids: &config.open_allowed_uids,
            open_gids: &config.open_allowed_gids,
            open_by_key: &config.open_allowed_by_key,
            require_audience: config.require_audience,
        }
    }
}

/// One opening to decide.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Opening<'a> {
    pub(crate) caller: &'a Caller,
    pub(crate) scope: &'a Scope,
    pub(crate) origin: Origin<'a>,
    pub(crate) audience: Audience<'a>,
    /// The keys that could open it (a v1 token's recipients; the one legacy key).
    pub(crate) keys: &'a [Thumbprint],
}

/// Decide one opening; the answer is the keys the agent may use for it (never empty).
///
/// - An env-file value is only ever considered for a caller that may read its file (see
///   [`readable_files`]).
/// - A bound token opens only for a caller one of its selectors matches: `uid`/`user` the
///   caller's uid, `gid`/`group` its primary or a supplementary group (names resolved by
///   `accounts`), `job`/`task` the verified task the value came from (the env file's task, or
///   for `open` the caller's task), `pool` the configured `pool_id`. Host root is no exception.
///   Root of a container matches no uid, user, gid or group selector.
/// - An unbound token in an env file is served to whoever may read the file; presented to
///   `open`, it opens only for host root and the uids/gids the config names (per key if a rule
///   exists for that key).
/// - With `require_audience`, unbound tokens are refused everywhere, host root included.
pub(crate) fn decide(
    o: &Opening<'_>,
    policy: &Policy<'_>,
    accounts: &dyn Accounts,
) -> Result<Vec<Thumbprint>, Refusal> {
    // A process outside the host reads no env file on the host socket; a token it presents may
    // still open for a selector that names no account (`pool:`), which is what its sealer chose.
    if let Origin::EnvFile { owner, .. } = o.origin {
        if outside_host(o.caller, o.scope) {
            return Err(Refusal::OutsideHost { uid: o.caller.uid });
        }
        if !may_read_file(o.caller, o.scope, owner) {
            return Err(Refusal::NoReadableValue);
        }
    }
    match o.audience {
        Audience::Bound(selectors) => {
            let task = o.origin.task();
            if selectors
                .iter()
                .any(|s| matches(s, o.caller, task, policy.pool_id, accounts))
            {
                Ok(o.keys.to_vec())
            } else {
                Err(Refusal::NotForCaller {
                    audience: selectors.to_vec(),
                    caller: describe(o.caller, task),
                })
            }
        }
        Audience::Unbound if policy.require_audience => Err(Refusal::AudienceRequired),
        Audience::Unbound => match o.origin {
            Origin::EnvFile { .. } => Ok(o.keys.to_vec()),
            Origin::Presented { .. } => {
                let Some(first) = o.keys.first() else {
                    return Err(Refusal::NotAToken);
                };
                let allowed: Vec<Thumbprint> = o
                    .keys
                    .iter()
                    .filter(|k| may_open_unbound(o.caller, policy, k))
                    .copied()
                    .collect();
                if allowed.is_empty() {
                    Err(Refusal::OpenNotAllowed {
                        uid: o.caller.uid,
                        key: *first,
                    })
                } else {
                    Ok(allowed)
                }
            }
        },
    }
}

/// Whether one selector names this caller, in this task, on this pool.
fn matches(
    selector: &Selector,
    caller: &Caller,
    task: Option<TaskIds<'_>>,
    pool_id: Option<&str>,
    accounts: &dyn Accounts,
) -> bool {
    let account = caller.is_node_account();
    match selector {
        Selector::Uid(uid) => account && caller.uid == *uid,
        Selector::User(name) => account && accounts.uid_of_user(name) == Some(caller.uid),
        Selector::Gid(gid) => account && caller.in_group(*gid),
        Selector::Group(name) => {
            account
                && accounts
                    .gid_of_group(name)
                    .is_some_and(|g| caller.in_group(g))
        }
        Selector::Job(job) => task.is_some_and(|t| t.job == Some(job.as_str())),
        Selector::Task { job, task: id } => {
            task.is_some_and(|t| t.job == Some(job.as_str()) && t.task == Some(id.as_str()))
        }
        Selector::Pool(pool) => pool_id == Some(pool.as_str()),
    }
}

/// `open` of an unbound token with `key`: host root always; otherwise the key's rule in
/// `open_allowed_by_key`, else `open_allowed_uids`/`open_allowed_gids`. Root of a container is
/// never named by uid or gid, nor is any process outside the host's pid namespace.
fn may_open_unbound(caller: &Caller, policy: &Policy<'_>, key: &Thumbprint) -> bool {
    if caller.host_root {
        return true;
    }
    if !caller.is_node_account() {
        return false;
    }
    let (uids, gids) = match policy.open_by_key.get(key) {
        Some(rule) => (rule.uids.as_slice(), rule.gids.as_slice()),
        None => (policy.open_uids, policy.open_gids),
    };
    uids.contains(&caller.uid) || gids.iter().any(|g| caller.in_group(*g))
}

/// Whether the caller could `open` some unbound token at all (host root, the global lists, or a
/// per-key rule naming it), asked before a legacy ciphertext's key is looked up: which keys the
/// node holds is not for a caller who could use none of them.
pub(crate) fn may_present_unbound(caller: &Caller, policy: &Policy<'_>) -> Result<(), Refusal> {
    if policy.require_audience {
        return Err(Refusal::AudienceRequired);
    }
    let named = |uids: &[u32], gids: &[u32]| {
        caller.is_node_account()
            && (uids.contains(&caller.uid) || gids.iter().any(|g| caller.in_group(*g)))
    };
    if caller.host_root
        || named(policy.open_uids, policy.open_gids)
        || policy.open_by_key.values().any(|r| named(&r.uids, &r.gids))
    {
        Ok(())
    } else {
        Err(Refusal::UnboundNotAllowed { uid: caller.uid })
    }
}

/// The caller as a refusal names it: what the selectors were matched against.
fn describe(caller: &Caller, task: Option<TaskIds<'_>>) -> String {
    let who = if caller.host_root {
        "host root".to_owned()
    } else if caller.is_container_root() {
        "container root".to_owned()
    } else {
        format!("uid {}", caller.uid)
    };
    match task {
        Some(TaskIds {
            job: Some(job),
            task: Some(task),
        }) => format!("{who} in task {job}/{task}"),
        Some(TaskIds {
            task: Some(task), ..
        }) => format!("{who} in task {task}"),
        _ => format!("{who}, no task"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeseal_client::protocol::ErrorCode;

    const VICTIM: u32 = 1000;
    const OTHER: u32 = 1001;
    const GROUP: u32 = 2000;

    fn caller(uid: u32, gid: u32, host_root: bool) -> Caller {
        Caller {
            uid,
            gid,
            groups: Vec::new(),
            host_root,
            host_process: true,
            namespace_attested: true,
        }
    }
    /// uid 0 on a kernel without `SO_PEERPIDFD`.
    fn unattested_root() -> Caller {
        Caller {
            namespace_attested: false,
            host_process: false,
            ..caller(0, 0, false)
        }
    }
    fn host_root() -> Caller {
        caller(0, 0, true)
    }
    fn container_root() -> Caller {
        in_container(0)
    }
    /// Any uid in another pid namespace, or a caller that has gone.
    fn in_container(uid: u32) -> Caller {
        Caller {
            host_process: false,
            ..caller(uid, uid, false)
        }
    }
    fn task_dir() -> PathBuf {
        PathBuf::from("/mnt/batch/tasks/workitems/j/job-1/t")
    }
    fn task_scope() -> Scope {
        Scope::Task {
            dir: task_dir(),
            owner: VICTIM,
        }
    }
    fn code(r: Result<impl std::fmt::Debug, Refusal>) -> Option<ErrorCode> {
        r.err().map(|e| e.code())
    }

    #[test]
    fn admin_operations_are_for_host_root_on_the_host_socket_only() {
        let table = [
            (host_root(), Scope::Host, true),
            (host_root(), task_scope(), false),
            (container_root(), Scope::Host, false),
            (caller(VICTIM, VICTIM, false), Scope::Host, false),
            (caller(VICTIM, 0, false), Scope::Host, false),
        ];
        for (who, scope, allowed) in table {
            let r = require_host_root(&who, &scope, "status");
            assert_eq!(r.is_ok(), allowed, "{who:?} on {scope:?}");
            if let Err(e) = r {
                assert_eq!(e.code(), ErrorCode::Forbidden);
                assert!(e.to_string().contains("status"), "{e}");
            }
        }
        // A kernel that cannot attest the caller: uid 0 is refused and told why.
        let e = require_host_root(&unattested_root(), &Scope::Host, "status").unwrap_err();
        assert_eq!(e.code(), ErrorCode::Forbidden);
        assert!(e.to_string().contains("no SO_PEERPIDFD"), "{e}");
    }

    #[test]
    fn the_task_a_read_concerns() {
        let owns_one = |_| vec![task_dir()];
        let owns_two = |_| vec![task_dir(), PathBuf::from("/x/t2")];
        let owns_none = |_| Vec::new();
        let wd = format!("{}/wd/", task_dir().display());
        let other = "/mnt/batch/tasks/workitems/j/job-1/other";
        // (caller, scope, asked, owned, expected task or error code)
        type Owned = fn(u32) -> Vec<PathBuf>;
        type Row<'a> = (
            Caller,
            Scope,
            Option<&'a str>,
            Owned,
            Result<PathBuf, ErrorCode>,
        );
        let table: Vec<Row<'_>> = vec![
            (
                caller(OTHER, OTHER, false),
                task_scope(),
                None,
                owns_none,
                Ok(task_dir()),
            ),
            (
                caller(OTHER, OTHER, false),
                task_scope(),
                Some(&wd),
                owns_none,
                Ok(task_dir()),
            ),
            (
                caller(OTHER, OTHER, false),
                task_scope(),
                Some(other),
                owns_none,
                Err(ErrorCode::Forbidden),
            ),
            (
                host_root(),
                task_scope(),
                Some(other),
                owns_none,
                Err(ErrorCode::Forbidden),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                Some(other),
                owns_one,
                Ok(PathBuf::from(other)),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                None,
                owns_one,
                Ok(task_dir()),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                None,
                owns_two,
                Err(ErrorCode::BadRequest),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                None,
                owns_none,
                Err(ErrorCode::NotFound),
            ),
            (
                host_root(),
                Scope::Host,
                None,
                owns_one,
                Err(ErrorCode::BadRequest),
            ),
            (
                container_root(),
                Scope::Host,
                None,
                owns_one,
                Err(ErrorCode::BadRequest),
            ),
            // Not even how many tasks the uid it shows owns.
            (
                in_container(VICTIM),
                Scope::Host,
                None,
                owns_two,
                Err(ErrorCode::Forbidden),
            ),
            (
                in_container(VICTIM),
                task_scope(),
                None,
                owns_none,
                Ok(task_dir()),
            ),
        ];
        for (who, scope, asked, owned, expected) in table {
            let got = task_to_read(&who, &scope, asked, owned).map_err(|e| e.code());
            assert_eq!(got, expected, "{who:?} on {scope:?} asking {asked:?}");
        }
    }

    #[test]
    fn which_env_files_a_caller_may_read() {
        let dir = task_dir();
        // (caller, scope, owners of the task's files, readable positions or error code)
        type Row = (Caller, Scope, Vec<u32>, Result<Vec<usize>, ErrorCode>);
        let table: Vec<Row> = vec![
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                vec![VICTIM],
                Ok(vec![0]),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                vec![OTHER, VICTIM],
                Ok(vec![1]),
            ),
            // Another's task answers like a missing one.
            (
                caller(OTHER, OTHER, false),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::NotFound),
            ),
            // Sharing the owner's group is not ownership.
            (
                caller(OTHER, VICTIM, false),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::NotFound),
            ),
            (
                host_root(),
                Scope::Host,
                vec![VICTIM, OTHER],
                Ok(vec![0, 1]),
            ),
            (
                container_root(),
                Scope::Host,
                vec![0],
                Err(ErrorCode::Forbidden),
            ),
            (
                container_root(),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::Forbidden),
            ),
            (
                unattested_root(),
                Scope::Host,
                vec![0, VICTIM],
                Err(ErrorCode::Forbidden),
            ),
            // Without attestation, reads by uid keep working.
            (
                Caller {
                    namespace_attested: false,
                    host_process: false,
                    ..caller(VICTIM, VICTIM, false)
                },
                Scope::Host,
                vec![VICTIM],
                Ok(vec![0]),
            ),
            (unattested_root(), task_scope(), vec![VICTIM], Ok(vec![0])),
            // Reaching a per-task socket is the credential: anyone, every file of the task's
            // owner, and no other uid's file that happens to sit in the task.
            (
                caller(OTHER, OTHER, false),
                task_scope(),
                vec![VICTIM, OTHER],
                Ok(vec![0]),
            ),
            (container_root(), task_scope(), vec![VICTIM], Ok(vec![0])),
            // A container can take any uid (CAP_SETUID without a user namespace): on the host
            // socket its uid owns nothing, on its task's socket it is served as anyone is.
            (
                in_container(VICTIM),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::Forbidden),
            ),
            (
                in_container(VICTIM),
                task_scope(),
                vec![VICTIM],
                Ok(vec![0]),
            ),
            (
                caller(OTHER, OTHER, false),
                task_scope(),
                vec![OTHER],
                Err(ErrorCode::NotFound),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                vec![],
                Err(ErrorCode::NotFound),
            ),
            (host_root(), task_scope(), vec![], Err(ErrorCode::NotFound)),
            (host_root(), Scope::Host, vec![], Err(ErrorCode::NotFound)),
            // Container root is refused as such whether the task exists or not.
            (
                container_root(),
                Scope::Host,
                vec![],
                Err(ErrorCode::Forbidden),
            ),
        ];
        for (who, scope, owners, expected) in table {
            let got = readable_files(&who, &scope, &dir, &owners).map_err(|e| e.code());
            assert_eq!(got, expected, "{who:?} on {scope:?} for owners {owners:?}");
        }
    }

    struct FakeAccounts;

    impl Accounts for FakeAccounts {
        fn uid_of_user(&self, name: &str) -> Option<u32> {
            match name {
                "victim" => Some(VICTIM),
                "root" => Some(0),
                _ => None,
            }
        }
        fn gid_of_group(&self, name: &str) -> Option<u32> {
            (name == "grp").then_some(GROUP)
        }
    }

    const KEY: Thumbprint = Thumbprint([1; 20]);
    const LOCKED: Thumbprint = Thumbprint([2; 20]);
    const VICTIM_TASK: TaskIds<'static> = TaskIds {
        job: Some("nightly"),
        task: Some("t1"),
    };
    const OTHER_TASK: TaskIds<'static> = TaskIds {
        job: Some("other-job"),
        task: Some("t9"),
    };
    const FLAT_TASK: TaskIds<'static> = TaskIds {
        job: None,
        task: Some("t1"),
    };

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }
    fn victim() -> Caller {
        caller(VICTIM, VICTIM, false)
    }
    fn other() -> Caller {
        caller(OTHER, OTHER, false)
    }
    fn supplementary() -> Caller {
        Caller {
            groups: vec![5, GROUP],
            ..other()
        }
    }
    fn in_env_file(owner: u32, task: TaskIds<'static>) -> Origin<'static> {
        Origin::EnvFile { owner, task }
    }
    fn presented(task: Option<TaskIds<'static>>) -> Origin<'static> {
        Origin::Presented { task }
    }

    /// One row: who, on which socket, where the value came from, its audience (`None`:
    /// unbound), and whether it opens (`Ok`) or the refusal's code.
    type Row = (
        Caller,
        Scope,
        Origin<'static>,
        Option<Vec<Selector>>,
        Result<(), ErrorCode>,
    );

    fn run(rows: Vec<Row>, policy: &Policy<'_>) {
        for (i, (who, scope, origin, audience, expected)) in rows.into_iter().enumerate() {
            let audience = match &audience {
                Some(s) => Audience::Bound(s),
                None => Audience::Unbound,
            };
            let opening = Opening {
                caller: &who,
                scope: &scope,
                origin,
                audience,
                keys: &[KEY],
            };
            let got = decide(&opening, policy, &FakeAccounts)
                .map(drop)
                .map_err(|e| e.code());
            assert_eq!(
                got, expected,
                "row {i}: {who:?} on {scope:?} from {origin:?} for {audience:?}"
            );
        }
    }

    fn rules_for_pool() -> BTreeMap<Thumbprint, OpenRule> {
        BTreeMap::new()
    }

    fn default_rules() -> BTreeMap<Thumbprint, OpenRule> {
        BTreeMap::new()
    }

    fn policy<'a>(rules: &'a BTreeMap<Thumbprint, OpenRule>) -> Policy<'a> {
        Policy {
            pool_id: Some("pool-1"),
            open_uids: &[],
            open_gids: &[],
            open_by_key: rules,
            require_audience: false,
        }
    }

    #[test]
    fn every_selector_kind_matches_its_own_and_nothing_else() {
        let rules = default_rules();
        let p = policy(&rules);
        let ok = Ok(());
        let no = Err(ErrorCode::Forbidden);
        let host = || Scope::Host;
        let b = |s: &[&str]| Some(s.iter().map(|s| sel(s)).collect::<Vec<_>>());
        let rows: Vec<Row> = vec![
            // uid
            (victim(), host(), presented(None), b(&["uid:1000"]), ok),
            (other(), host(), presented(None), b(&["uid:1000"]), no),
            (
                victim(),
                task_scope(),
                presented(Some(VICTIM_TASK)),
                b(&["uid:1000"]),
                ok,
            ),
            (host_root(), host(), presented(None), b(&["uid:0"]), ok),
            // Container root is not "uid 0" of the node.
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["uid:0"]),
                no,
            ),
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["user:root"]),
                no,
            ),
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["gid:0"]),
                no,
            ),
            // user, resolved by name; unknown names match nobody
            (victim(), host(), presented(None), b(&["user:victim"]), ok),
            (other(), host(), presented(None), b(&["user:victim"]), no),
            (
                victim(),
                host(),
                presented(None),
                b(&["user:nobody-here"]),
                no,
            ),
            // gid: primary or supplementary
            (
                caller(OTHER, GROUP, false),
                host(),
                presented(None),
                b(&["gid:2000"]),
                ok,
            ),
            (
                supplementary(),
                host(),
                presented(None),
                b(&["gid:2000"]),
                ok,
            ),
            (other(), host(), presented(None), b(&["gid:2000"]), no),
            // group, resolved by name
            (
                supplementary(),
                host(),
                presented(None),
                b(&["group:grp"]),
                ok,
            ),
            (other(), host(), presented(None), b(&["group:grp"]), no),
            (
                supplementary(),
                host(),
                presented(None),
                b(&["group:nogroup-here"]),
                no,
            ),
            // job: the verified task the value came from
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["job:nightly"]),
                ok,
            ),
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["job:nightly"]),
                ok,
            ),
            (
                other(),
                host(),
                in_env_file(OTHER, OTHER_TASK),
                b(&["job:nightly"]),
                no,
            ),
            (
                victim(),
                host(),
                presented(Some(VICTIM_TASK)),
                b(&["job:nightly"]),
                ok,
            ),
            (
                other(),
                host(),
                presented(Some(OTHER_TASK)),
                b(&["job:nightly"]),
                no,
            ),
            (victim(), host(), presented(None), b(&["job:nightly"]), no),
            (
                victim(),
                host(),
                in_env_file(VICTIM, FLAT_TASK),
                b(&["job:nightly"]),
                no,
            ),
            // task: job and task both
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["task:nightly/t1"]),
                ok,
            ),
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["task:nightly/t2"]),
                no,
            ),
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["task:other-job/t1"]),
                no,
            ),
            (
                victim(),
                host(),
                in_env_file(VICTIM, FLAT_TASK),
                b(&["task:nightly/t1"]),
                no,
            ),
            (
                victim(),
                task_scope(),
                presented(Some(VICTIM_TASK)),
                b(&["task:nightly/t1"]),
                ok,
            ),
            // pool: the configured pool id
            (other(), host(), presented(None), b(&["pool:pool-1"]), ok),
            (other(), host(), presented(None), b(&["pool:pool-2"]), no),
            // any one selector is enough; host root is no exception
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["uid:1001", "job:nightly"]),
                ok,
            ),
            (
                host_root(),
                host(),
                presented(None),
                b(&["job:nightly", "uid:1000"]),
                no,
            ),
            (
                host_root(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["job:nightly"]),
                ok,
            ),
            // a bound value in a file the caller may not read is still not served
            (
                other(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                b(&["uid:1001"]),
                no,
            ),
        ];
        run(rows, &p);
        let no_pool = Policy { pool_id: None, ..p };
        run(
            vec![(
                other(),
                Scope::Host,
                presented(None),
                b(&["pool:pool-1"]),
                no,
            )],
            &no_pool,
        );
    }

    #[test]
    fn unbound_tokens_on_every_path() {
        let mut rules = default_rules();
        rules.insert(
            LOCKED,
            OpenRule {
                uids: vec![OTHER],
                gids: vec![],
            },
        );
        let ok = Ok(());
        let no = Err(ErrorCode::Forbidden);
        let host = || Scope::Host;
        let by_default: Vec<Row> = vec![
            // From an env file: whoever may read the file.
            (victim(), host(), in_env_file(VICTIM, VICTIM_TASK), None, ok),
            (other(), host(), in_env_file(VICTIM, VICTIM_TASK), None, no),
            (
                container_root(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                None,
                no,
            ),
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                None,
                ok,
            ),
            (
                other(),
                task_scope(),
                in_env_file(OTHER, OTHER_TASK),
                None,
                no,
            ),
            (
                host_root(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                None,
                ok,
            ),
            // Presented: host root only, by default; per-task sockets no longer always may.
            (victim(), host(), presented(Some(VICTIM_TASK)), None, no),
            (
                victim(),
                task_scope(),
                presented(Some(VICTIM_TASK)),
                None,
                no,
            ),
            (
                container_root(),
                task_scope(),
                presented(Some(VICTIM_TASK)),
                None,
                no,
            ),
            (host_root(), host(), presented(None), None, ok),
            (host_root(), task_scope(), presented(None), None, ok),
        ];
        run(by_default, &policy(&rules));

        let named = Policy {
            open_uids: &[VICTIM],
            open_gids: &[GROUP],
            ..policy(&rules)
        };
        run(
            vec![
                (victim(), host(), presented(None), None, ok),
                (
                    victim(),
                    task_scope(),
                    presented(Some(VICTIM_TASK)),
                    None,
                    ok,
                ),
                (supplementary(), host(), presented(None), None, ok),
                (other(), host(), presented(None), None, no),
                (container_root(), task_scope(), presented(None), None, no),
            ],
            &named,
        );
        // A per-key rule replaces the global one for its key; a token for several keys opens
        // with the allowed ones; none allowed names the first.
        let both = [LOCKED, KEY];
        let decide_keys = |who: &Caller, keys: &[Thumbprint]| {
            decide(
                &Opening {
                    caller: who,
                    scope: &Scope::Host,
                    origin: presented(None),
                    audience: Audience::Unbound,
                    keys,
                },
                &named,
                &FakeAccounts,
            )
        };
        assert_eq!(decide_keys(&victim(), &both).unwrap(), vec![KEY]);
        assert_eq!(decide_keys(&other(), &both).unwrap(), vec![LOCKED]);
        let refused = decide_keys(&victim(), &[LOCKED]).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Forbidden);
        assert!(
            refused.to_string().contains(&LOCKED.to_string()),
            "{refused}"
        );
        assert_eq!(
            code(decide_keys(&host_root(), &[])),
            Some(ErrorCode::BadToken)
        );
        // A process in a container shows whatever uid it likes (its root can setuid to any
        // host uid): on the host socket it is nobody, and no uid selector names it anywhere.
        let outside = decide_keys(&in_container(VICTIM), &[KEY]).unwrap_err();
        assert_eq!(outside.code(), ErrorCode::Forbidden, "{outside}");
        let pool_bound = [sel("pool:pool-1"), sel(&format!("uid:{VICTIM}"))];
        let pool_from_a_container = decide(
            &Opening {
                caller: &in_container(VICTIM),
                scope: &Scope::Host,
                origin: presented(None),
                audience: Audience::Bound(&pool_bound),
                keys: &[KEY],
            },
            &policy(&rules_for_pool()),
            &FakeAccounts,
        );
        assert_eq!(pool_from_a_container.unwrap(), vec![KEY]);
        let uid_only = [sel(&format!("uid:{VICTIM}"))];
        let uid_from_a_container = decide(
            &Opening {
                caller: &in_container(VICTIM),
                scope: &Scope::Host,
                origin: presented(None),
                audience: Audience::Bound(&uid_only),
                keys: &[KEY],
            },
            &named,
            &FakeAccounts,
        );
        assert_eq!(code(uid_from_a_container), Some(ErrorCode::Forbidden));
        let uid_bound = [sel(&format!("uid:{VICTIM}"))];
        let on_task_socket = decide(
            &Opening {
                caller: &in_container(VICTIM),
                scope: &task_scope(),
                origin: in_env_file(VICTIM, VICTIM_TASK),
                audience: Audience::Bound(&uid_bound),
                keys: &[KEY],
            },
            &named,
            &FakeAccounts,
        );
        assert_eq!(code(on_task_socket), Some(ErrorCode::Forbidden));
        let job_bound = [sel("job:nightly")];
        let job_on_task_socket = decide(
            &Opening {
                caller: &in_container(VICTIM),
                scope: &task_scope(),
                origin: in_env_file(VICTIM, VICTIM_TASK),
                audience: Audience::Bound(&job_bound),
                keys: &[KEY],
            },
            &named,
            &FakeAccounts,
        );
        assert_eq!(job_on_task_socket.unwrap(), vec![KEY]);
    }

    #[test]
    fn who_may_present_an_unbound_token_before_its_key_is_known() {
        let mut rules = default_rules();
        rules.insert(
            LOCKED,
            OpenRule {
                uids: vec![OTHER],
                gids: vec![],
            },
        );
        let p = Policy {
            open_gids: &[GROUP],
            ..policy(&rules)
        };
        assert!(may_present_unbound(&host_root(), &p).is_ok());
        assert!(
            may_present_unbound(&other(), &p).is_ok(),
            "named by a key's rule"
        );
        assert!(may_present_unbound(&supplementary(), &p).is_ok());
        assert!(may_present_unbound(&victim(), &p).is_err());
        assert!(may_present_unbound(&container_root(), &p).is_err());
        let strict = Policy {
            require_audience: true,
            ..p
        };
        assert!(may_present_unbound(&host_root(), &strict).is_err());
    }

    #[test]
    fn require_audience_refuses_unbound_tokens_everywhere_and_keeps_bound_ones() {
        let rules = default_rules();
        let strict = Policy {
            open_uids: &[VICTIM],
            require_audience: true,
            ..policy(&rules)
        };
        let no = Err(ErrorCode::Forbidden);
        let host = || Scope::Host;
        let rows: Vec<Row> = vec![
            (victim(), host(), in_env_file(VICTIM, VICTIM_TASK), None, no),
            (
                container_root(),
                task_scope(),
                in_env_file(VICTIM, VICTIM_TASK),
                None,
                no,
            ),
            (
                host_root(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                None,
                no,
            ),
            (victim(), host(), presented(None), None, no),
            (host_root(), host(), presented(None), None, no),
            (
                victim(),
                host(),
                in_env_file(VICTIM, VICTIM_TASK),
                Some(vec![sel("job:nightly")]),
                Ok(()),
            ),
        ];
        run(rows, &strict);
    }

    #[test]
    fn a_refusal_names_the_audience_and_what_it_was_matched_against() {
        let rules = default_rules();
        let audience = [sel("job:nightly"), sel("uid:1000")];
        let refused = decide(
            &Opening {
                caller: &other(),
                scope: &Scope::Host,
                origin: in_env_file(OTHER, OTHER_TASK),
                audience: Audience::Bound(&audience),
                keys: &[KEY],
            },
            &policy(&rules),
            &FakeAccounts,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("job:nightly, uid:1000"), "{refused}");
        assert!(
            refused.contains("uid 1001 in task other-job/t9"),
            "{refused}"
        );
    }

    #[test]
    fn a_missing_task_and_another_uids_task_answer_alike() {
        let dir = task_dir();
        for who in [other(), supplementary(), caller(OTHER, VICTIM, false)] {
            let missing = readable_files(&who, &Scope::Host, &dir, &[]).unwrap_err();
            let foreign = readable_files(&who, &Scope::Host, &dir, &[VICTIM]).unwrap_err();
            assert_eq!(missing.code(), foreign.code());
            assert_eq!(missing.to_string(), foreign.to_string());
        }
    }

    #[test]
    fn the_task_an_open_speaks_for() {
        let one = |_| vec![task_dir()];
        let two = |_| vec![task_dir(), PathBuf::from("/x/t2")];
        let none = |_| Vec::new();
        type Owned = fn(u32) -> Vec<PathBuf>;
        type Row<'a> = (
            Caller,
            Scope,
            Option<&'a str>,
            Owned,
            Result<Option<PathBuf>, ErrorCode>,
        );
        let rows: Vec<Row<'_>> = vec![
            (victim(), Scope::Host, None, one, Ok(Some(task_dir()))),
            (victim(), Scope::Host, None, two, Ok(None)),
            (victim(), Scope::Host, None, none, Ok(None)),
            (host_root(), Scope::Host, None, one, Ok(None)),
            (container_root(), Scope::Host, None, one, Ok(None)),
            (
                victim(),
                Scope::Host,
                Some("/x/t2/wd"),
                one,
                Ok(Some(PathBuf::from("/x/t2"))),
            ),
            (other(), task_scope(), None, none, Ok(Some(task_dir()))),
            (
                other(),
                task_scope(),
                Some("/x/t2"),
                none,
                Err(ErrorCode::Forbidden),
            ),
        ];
        for (who, scope, asked, owned, expected) in rows {
            let got = task_for_open(&who, &scope, asked, owned).map_err(|e| e.code());
            assert_eq!(got, expected, "{who:?} on {scope:?} asking {asked:?}");
        }
    }

    #[test]
    fn a_caller_names_its_task_dir_or_its_wd() {
        assert_eq!(normalize_task_dir("/a/b/t/wd"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t/wd/"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t"), Path::new("/a/b/t"));
    }
}
