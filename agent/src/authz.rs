//! Who may read what: pure decisions over plain data. The kernel-reported caller, the socket it
//! came in on, the task it asks about with the owners of that task's env files, and the `open`
//! policy from the config go in; a decision or a typed [`Refusal`] comes out. No I/O and no locks
//! here, so every rule is tested below without root.

use crate::config::{Config, OpenRule};
use crate::refusal::Refusal;
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

/// Who may `open` presented tokens, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenPolicy<'a> {
    /// `None`: every non-root uid.
    pub(crate) uids: Option<&'a [u32]>,
    pub(crate) gids: &'a [u32],
    /// Per-key rules, replacing the two above for their key.
    pub(crate) by_key: &'a BTreeMap<Thumbprint, OpenRule>,
}

impl<'a> OpenPolicy<'a> {
    pub(crate) fn of(config: &'a Config) -> Self {
        Self {
            uids: config.open_allowed_uids.as_deref(),
            gids: &config.open_allowed_gids,
            by_key: &config.open_allowed_by_key,
        }
    }
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

/// Which of a task's env files (given by their owners, in order) the caller may read; the
/// answer is their positions, never empty.
pub(crate) fn readable_files(
    caller: &Caller,
    scope: &Scope,
    task_dir: &Path,
    owners: &[u32],
) -> Result<Vec<usize>, Refusal> {
    if owners.is_empty() {
        return Err(Refusal::UnknownTask {
            task_dir: task_dir.to_owned(),
        });
    }
    let all = || (0..owners.len()).collect();
    let readable: Vec<usize> = match scope {
        Scope::Task { owner, .. } => (0..owners.len()).filter(|&i| owners[i] == *owner).collect(),
        Scope::Host if caller.host_root => all(),
        Scope::Host if caller.uid == 0 && !caller.namespace_attested => {
            return Err(Refusal::CallerUnattested)
        }
        Scope::Host if caller.uid == 0 => return Err(Refusal::ContainerRoot),
        Scope::Host if outside_host(caller, scope) => {
            return Err(Refusal::OutsideHost { uid: caller.uid })
        }
        Scope::Host => (0..owners.len())
            .filter(|&i| owners[i] == caller.uid)
            .collect(),
    };
    if readable.is_empty() {
        return Err(Refusal::NotOwner {
            uid: caller.uid,
            task_dir: task_dir.to_owned(),
        });
    }
    Ok(readable)
}

/// Whether the caller may `open` a presented token with key `key`: host root and per-task
/// sockets always; otherwise the key's rule in `open_allowed_by_key`, else the global rule.
pub(crate) fn may_open(
    caller: &Caller,
    scope: &Scope,
    policy: &OpenPolicy<'_>,
    key: &Thumbprint,
) -> bool {
    if caller.host_root || matches!(scope, Scope::Task { .. }) {
        return true;
    }
    if outside_host(caller, scope) {
        return false;
    }
    if let Some(rule) = policy.by_key.get(key) {
        return rule.uids.contains(&caller.uid) || rule.gids.contains(&caller.gid);
    }
    let by_uid = match policy.uids {
        None => caller.uid != 0,
        Some(uids) => uids.contains(&caller.uid),
    };
    by_uid || policy.gids.contains(&caller.gid)
}

/// The keys among a token's recipients the caller may open with; refused (naming the first
/// recipient) when there are none.
pub(crate) fn openable_recipients(
    caller: &Caller,
    scope: &Scope,
    policy: &OpenPolicy<'_>,
    recipients: &[Thumbprint],
) -> Result<Vec<Thumbprint>, Refusal> {
    if outside_host(caller, scope) {
        return Err(Refusal::OutsideHost { uid: caller.uid });
    }
    let allowed: Vec<Thumbprint> = recipients
        .iter()
        .filter(|tp| may_open(caller, scope, policy, tp))
        .copied()
        .collect();
    match (allowed.is_empty(), recipients.first()) {
        (false, _) => Ok(allowed),
        (true, Some(first)) => Err(Refusal::OpenNotAllowed {
            uid: caller.uid,
            key: *first,
        }),
        (true, None) => Err(Refusal::NotAToken),
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
            (
                caller(OTHER, OTHER, false),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::Forbidden),
            ),
            // Sharing the owner's group is not ownership.
            (
                caller(OTHER, VICTIM, false),
                Scope::Host,
                vec![VICTIM],
                Err(ErrorCode::Forbidden),
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
                Err(ErrorCode::Forbidden),
            ),
            (
                caller(VICTIM, VICTIM, false),
                Scope::Host,
                vec![],
                Err(ErrorCode::NotFound),
            ),
            (host_root(), task_scope(), vec![], Err(ErrorCode::NotFound)),
        ];
        for (who, scope, owners, expected) in table {
            let got = readable_files(&who, &scope, &dir, &owners).map_err(|e| e.code());
            assert_eq!(got, expected, "{who:?} on {scope:?} for owners {owners:?}");
        }
    }

    #[test]
    fn who_may_open_presented_tokens() {
        let key = Thumbprint([1; 20]);
        let locked = Thumbprint([2; 20]);
        let mut by_key = BTreeMap::new();
        by_key.insert(
            locked,
            OpenRule {
                uids: vec![OTHER],
                gids: vec![GROUP],
            },
        );
        let no_rules = BTreeMap::new();
        let everyone = OpenPolicy {
            uids: None,
            gids: &[],
            by_key: &by_key,
        };
        let only_victim = OpenPolicy {
            uids: Some(&[VICTIM]),
            gids: &[],
            by_key: &no_rules,
        };
        let nobody_but_group = OpenPolicy {
            uids: Some(&[]),
            gids: &[GROUP],
            by_key: &no_rules,
        };
        let v = caller(VICTIM, VICTIM, false);
        let o = caller(OTHER, OTHER, false);
        let in_group = caller(OTHER, GROUP, false);
        // (caller, scope, policy, key, allowed)
        let table = [
            (v.clone(), Scope::Host, everyone, key, true),
            (o.clone(), Scope::Host, everyone, key, true),
            (container_root(), Scope::Host, everyone, key, false),
            (host_root(), Scope::Host, everyone, key, true),
            (host_root(), Scope::Host, nobody_but_group, key, true),
            (v.clone(), Scope::Host, everyone, locked, false),
            (o.clone(), Scope::Host, everyone, locked, true),
            (
                caller(VICTIM, GROUP, false),
                Scope::Host,
                everyone,
                locked,
                true,
            ),
            (v.clone(), Scope::Host, only_victim, key, true),
            (o.clone(), Scope::Host, only_victim, key, false),
            (o.clone(), Scope::Host, nobody_but_group, key, false),
            (in_group, Scope::Host, nobody_but_group, key, true),
            (o.clone(), task_scope(), nobody_but_group, key, true),
            (container_root(), task_scope(), only_victim, key, true),
            (in_container(VICTIM), Scope::Host, everyone, key, false),
            (in_container(VICTIM), Scope::Host, only_victim, key, false),
            (in_container(VICTIM), task_scope(), only_victim, key, true),
        ];
        for (who, scope, policy, tp, allowed) in table {
            assert_eq!(
                may_open(&who, &scope, &policy, &tp),
                allowed,
                "{who:?} on {scope:?} with {policy:?} for {tp}"
            );
        }
        // A token for several keys opens with the allowed ones only; none allowed names the first.
        assert_eq!(
            openable_recipients(&v, &Scope::Host, &everyone, &[locked, key]).unwrap(),
            vec![key]
        );
        let refused = openable_recipients(&v, &Scope::Host, &everyone, &[locked]).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Forbidden);
        assert!(
            refused.to_string().contains(&locked.to_string()),
            "{refused}"
        );
        assert_eq!(
            code(openable_recipients(&v, &Scope::Host, &everyone, &[])),
            Some(ErrorCode::BadToken)
        );
        let outside = openable_recipients(&in_container(VICTIM), &Scope::Host, &everyone, &[key])
            .unwrap_err();
        assert!(
            outside.to_string().contains("task's own socket"),
            "{outside}"
        );
    }

    #[test]
    fn a_caller_names_its_task_dir_or_its_wd() {
        assert_eq!(normalize_task_dir("/a/b/t/wd"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t/wd/"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t"), Path::new("/a/b/t"));
    }
}
