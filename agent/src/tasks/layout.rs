//! Where tasks are, and only there: a model of the scheduler's layout, walked through directory
//! descriptors. Task users can write inside their task trees, so nothing here follows a link,
//! recurses into what a task made, or believes a path it has not opened itself.
//!
//! - Batch (`batch`): `<root>/<job>/job-<n>/<task>/` (a job schedule adds a level:
//!   `<root>/<schedule>/<job>/job-<n>/<task>/`), env files at `<task>/wd/<name>` and
//!   `<task>/<name>`.
//! - Flat (`flat`), for Slurm, Kubernetes and plain hosts: `<root>/<id>/<name>`.
//!
//! Every directory is opened beneath its parent's descriptor ([`crate::sys::open_beneath`]:
//! no symlink, no magic link, one component at a time). A task is believed (its job, task id and
//! owner) only when no uid other than root, the agent and the owner of its env file could have
//! created, renamed or replaced any directory from the env root down to the file: each level is
//! owned by one of them and not writable by group or others (unless sticky).
//! Its job and task ids need more, since selectors open for them: the directory holding the
//! job's is root's or the agent's, and no level above the task lets group or others add to it,
//! sticky or not (`Walker::read_task`).

use crate::config::TaskLayout;
use crate::sys::open_beneath;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A directory the agent opened itself, and what its inode said then.
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    uid: u32,
    mode: u32,
}

impl Dir {
    /// An env root, by its configured path (the config is root's; the path is trusted).
    pub(crate) fn root(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).bits())
            .open(path)?;
        Self::from_fd(OwnedFd::from(file), path.to_owned())
    }

    fn from_fd(fd: OwnedFd, path: PathBuf) -> std::io::Result<Self> {
        let meta = File::from(fd.try_clone()?).metadata()?;
        Ok(Self {
            fd,
            path,
            uid: meta.uid(),
            mode: meta.mode(),
        })
    }

    /// The subdirectory `name`, refused if it is anything but a real directory.
    pub(crate) fn child(&self, name: &OsStr) -> std::io::Result<Self> {
        let fd = open_beneath(self.fd.as_fd(), name, OFlag::O_DIRECTORY | OFlag::O_RDONLY)?;
        Self::from_fd(fd, self.path.join(name))
    }

    /// The regular file `name`, opened for reading (never a link, FIFO or device).
    pub(crate) fn open_file(&self, name: &OsStr) -> std::io::Result<File> {
        let fd = open_beneath(self.fd.as_fd(), name, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(file)
    }

    /// Names of the subdirectories, as the directory lists them (no entry is followed).
    pub(crate) fn subdirs(&self) -> Vec<OsString> {
        let Ok(mut dir) = nix::dir::Dir::openat(
            Some(self.fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return Vec::new();
        };
        dir.iter()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_bytes();
                name != b"." && name != b".." && e.file_type() == Some(nix::dir::Type::Directory)
            })
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
            .collect()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }

    /// Why uids other than `trusted` could have created, renamed or replaced what is in it.
    /// `sticky_ok`: a sticky directory others may write still protects what is in it from them
    /// (true above tasks; a task directory shared that way would have two owners).
    fn untrusted_because(&self, trusted: &[u32], sticky_ok: bool) -> Option<String> {
        if !trusted.contains(&self.uid) {
            return Some(format!("it is owned by uid {}", self.uid));
        }
        let sticky = sticky_ok && self.mode & 0o1000 != 0;
        if self.mode & 0o022 != 0 && !sticky {
            return Some(format!(
                "it is writable by group or others (mode {:o})",
                self.mode & 0o7777
            ));
        }
        None
    }
}

/// What a place in the tree is, by its components below the env root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Level {
    Root,
    /// A level above tasks: a job, a schedule, a `job-<n>` run.
    Container,
    /// A task directory.
    Task {
        job_id: Option<String>,
        task_id: String,
    },
    /// A task's working directory.
    Wd,
    /// Anything else: never looked into.
    Outside,
}

fn is_job_run(c: &OsStr) -> bool {
    c.to_str()
        .and_then(|s| s.strip_prefix("job-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn text(c: &OsStr) -> String {
    c.to_string_lossy().into_owned()
}

/// The level of the directory at `comps` below the root. Nothing below a task is a level of
/// its own: a task named like `job-7` must not make its subdirectories look like tasks.
pub(crate) fn level_of(layout: TaskLayout, comps: &[&OsStr]) -> Level {
    for end in 1..comps.len() {
        if let Level::Task { .. } = shape_of(layout, &comps[..end]) {
            // Only the task's own `wd` (Batch) is below a task.
            return match shape_of(layout, comps) {
                Level::Wd if end + 1 == comps.len() => Level::Wd,
                _ => Level::Outside,
            };
        }
    }
    shape_of(layout, comps)
}

/// The level `comps` would have by its shape alone.
fn shape_of(layout: TaskLayout, comps: &[&OsStr]) -> Level {
    let task = |job: Option<&OsStr>, task: &OsStr| Level::Task {
        job_id: job.map(text),
        task_id: text(task),
    };
    match layout {
        TaskLayout::Flat => match comps {
            [] => Level::Root,
            [id] => task(None, id),
            _ => Level::Outside,
        },
        TaskLayout::Batch => match comps {
            [] => Level::Root,
            [_] => Level::Container,
            [_, run] if is_job_run(run) => Level::Container,
            [_, _] => Level::Container,
            [job, run, t] if is_job_run(run) => task(Some(job), t),
            [_, _, run] if is_job_run(run) => Level::Container,
            [_, run, _, wd] if is_job_run(run) && *wd == "wd" => Level::Wd,
            [_, job, run, t] if is_job_run(run) => task(Some(job), t),
            [_, _, run, _, wd] if is_job_run(run) && *wd == "wd" => Level::Wd,
            _ => Level::Outside,
        },
    }
}

/// Components of `path` below `root`, if it lies there and has no `.`/`..` tricks.
pub(crate) fn components_below<'p>(root: &Path, path: &'p Path) -> Option<Vec<&'p OsStr>> {
    let rel = path.strip_prefix(root).ok()?;
    rel.components()
        .map(|c| match c {
            std::path::Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// Who a task belongs to and what it is called, as the walk established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskIdentity {
    pub(crate) task_dir: PathBuf,
    pub(crate) job_id: Option<String>,
    pub(crate) task_id: String,
    /// The task directory's owner when that is an ordinary uid; else the env file's owner.
    pub(crate) owner: u32,
}

/// An env file found where the layout says, opened, with its task.
pub(crate) struct FoundFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) task: TaskIdentity,
}

/// What one walk found.
#[derive(Default)]
pub(crate) struct Walk {
    pub(crate) files: Vec<FoundFile>,
    /// Every layout directory opened (to be watched).
    pub(crate) dirs: Vec<PathBuf>,
    /// Env files refused, with the reason.
    pub(crate) refused: Vec<(PathBuf, String)>,
}

/// The rules of one walk.
pub(crate) struct Walker<'a> {
    pub(crate) layout: TaskLayout,
    pub(crate) env_file_names: &'a [String],
    /// The agent's own uid (root on a node; the test user in unprivileged runs).
    pub(crate) agent_uid: u32,
}

impl Walker<'_> {
    /// Walk everything at and below `target` (a directory under `root`). `Err` means the
    /// target itself could not be reached (gone, a link, not a directory, outside the layout):
    /// whatever the agent knew below it is to be forgotten.
    pub(crate) fn walk(&self, root: &Path, target: &Path) -> Result<Walk, String> {
        let comps = components_below(root, target).ok_or("not under the env root")?;
        if level_of(self.layout, &comps) == Level::Outside {
            return Err("not a directory of the task layout".into());
        }
        let mut chain = vec![Dir::root(root).map_err(|e| e.to_string())?];
        for c in &comps {
            let next = chain
                .last()
                .expect("the chain starts with the root")
                .child(c)
                .map_err(|e| format!("cannot open {}: {e}", target.display()))?;
            chain.push(next);
        }
        let mut walk = Walk::default();
        let mut names: Vec<OsString> = comps.iter().map(|c| (*c).to_owned()).collect();
        self.descend(&mut chain, &mut names, &mut walk);
        Ok(walk)
    }

    fn level(&self, names: &[OsString]) -> Level {
        let refs: Vec<&OsStr> = names.iter().map(OsString::as_os_str).collect();
        level_of(self.layout, &refs)
    }

    fn descend(&self, chain: &mut Vec<Dir>, names: &mut Vec<OsString>, walk: &mut Walk) {
        let here = chain.last().expect("never empty");
        walk.dirs.push(here.path().to_owned());
        match self.level(names) {
            Level::Outside => {}
            Level::Wd => {
                // An event inside a wd: its task is what to read.
                let task_level = chain.len() - 1;
                self.read_task(&chain[..task_level], &names[..names.len() - 1], walk);
            }
            Level::Task { .. } => self.read_task(chain, names, walk),
            Level::Root | Level::Container => {
                let mut subdirs = here.subdirs();
                subdirs.sort();
                for name in subdirs {
                    names.push(name);
                    if self.level(names) != Level::Outside {
                        let last = names.last().expect("just pushed");
                        if let Ok(child) = chain.last().expect("never empty").child(last) {
                            chain.push(child);
                            self.descend(chain, names, walk);
                            chain.pop();
                        }
                    }
                    names.pop();
                }
            }
        }
    }

    /// The env files of the task whose directory ends `chain`.
    fn read_task(&self, chain: &[Dir], names: &[OsString], walk: &mut Walk) {
        let Level::Task { job_id, task_id } = self.level(names) else {
            return;
        };
        let task_dir = chain.last().expect("a task has a directory");
        let wd = match self.layout {
            TaskLayout::Batch => task_dir.child(OsStr::new("wd")).ok(),
            TaskLayout::Flat => None,
        };
        if let Some(wd) = &wd {
            walk.dirs.push(wd.path().to_owned());
        }
        let places: Vec<&Dir> = std::iter::once(task_dir).chain(wd.as_ref()).collect();
        // The job and task ids are names, and `job:`/`task:` selectors open for them: believed
        // only if no uid but root, the agent and this task's owner could have chosen them. So
        // the directory holding the job's directory (the root, or a schedule) is root's or the
        // agent's, and no level above the task lets anyone else add an entry (sticky stops
        // renames, not new names). Otherwise a task user with a first-level directory of its
        // own makes `<it>/<any job>/job-1/<any task>` (read as a schedule), and anyone makes a
        // task in a job whose run directory is sticky. The task is still its owner's: only the
        // ids go.
        let task_depth = chain.len() - 1;
        let above = &chain[..task_depth];
        let job_parent_is_roots = task_depth.checked_sub(3).is_some_and(|i| {
            above[i]
                .untrusted_because(&[0, self.agent_uid], false)
                .is_none()
        });
        let none_may_add = above.iter().all(|d| d.mode & 0o022 == 0);
        let job_id = job_id.filter(|_| job_parent_is_roots && none_may_add);
        for (i, dir) in places.iter().enumerate() {
            for name in self.env_file_names {
                let path = dir.path().join(name);
                let file = match dir.open_file(OsStr::new(name)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        walk.refused.push((path, format!("cannot open it: {e}")));
                        continue;
                    }
                };
                let file_uid = match file.metadata() {
                    Ok(m) => m.uid(),
                    Err(e) => {
                        walk.refused.push((path, format!("cannot stat it: {e}")));
                        continue;
                    }
                };
                // The root level is trusted for root and the agent only; below it, the file's
                // owner too. The wd counts when the file is in it.
                let levels = chain.iter().chain(places[1..=i].iter().copied());
                let mut reason = None;
                for (depth, d) in levels.enumerate() {
                    let trusted: &[u32] = if depth == 0 {
                        &[0, self.agent_uid]
                    } else {
                        &[0, self.agent_uid, file_uid]
                    };
                    if let Some(why) = d.untrusted_because(trusted, depth < task_depth) {
                        reason = Some(format!("{}: {why}", d.path().display()));
                        break;
                    }
                }
                if let Some(reason) = reason {
                    walk.refused
                        .push((path, format!("not trusted as a task: {reason}")));
                    continue;
                }
                let dir_uid = task_dir.uid();
                let owner = if dir_uid == 0 || dir_uid == self.agent_uid {
                    file_uid
                } else {
                    dir_uid
                };
                walk.files.push(FoundFile {
                    path,
                    file,
                    task: TaskIdentity {
                        task_dir: task_dir.path().to_owned(),
                        job_id: job_id.clone(),
                        task_id: task_id.clone(),
                        owner,
                    },
                });
            }
        }
    }
}

/// Open the task directory `task_dir` (under `root`) by the same walk, for binding its socket.
pub(crate) fn open_task_dir(
    layout: TaskLayout,
    root: &Path,
    task_dir: &Path,
) -> std::io::Result<Dir> {
    let comps = components_below(root, task_dir)
        .filter(|c| matches!(level_of(layout, c), Level::Task { .. }))
        .ok_or_else(|| std::io::Error::other("not a task directory of the layout"))?;
    let mut dir = Dir::root(root)?;
    for c in comps {
        dir = dir.child(c)?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn c(s: &str) -> Vec<&OsStr> {
        s.split('/')
            .filter(|p| !p.is_empty())
            .map(OsStr::new)
            .collect()
    }

    #[test]
    fn the_batch_layout_has_fixed_levels() {
        let b = TaskLayout::Batch;
        assert_eq!(level_of(b, &c("")), Level::Root);
        assert_eq!(level_of(b, &c("j")), Level::Container);
        assert_eq!(level_of(b, &c("j/job-1")), Level::Container);
        assert_eq!(
            level_of(b, &c("j/job-1/t")),
            Level::Task {
                job_id: Some("j".into()),
                task_id: "t".into()
            }
        );
        assert_eq!(level_of(b, &c("j/job-1/t/wd")), Level::Wd);
        assert_eq!(
            level_of(b, &c("s/j/job-2/t")),
            Level::Task {
                job_id: Some("j".into()),
                task_id: "t".into()
            }
        );
        assert_eq!(level_of(b, &c("s/j/job-2/t/wd")), Level::Wd);
        // Below a task's wd, and anything not shaped like the layout, is never looked into;
        // nor is anything below a task whose id looks like a job run.
        for outside in [
            "j/job-1/t/wd/sub",
            "j/job-1/t/sub",
            "j/x/y",
            "s/j/job-2/t/wd/deep",
            "j/job-1/job-5/x",
            "j/job-1/job-5/x/wd",
            "j/job-1/job-5/job-1/t",
        ] {
            assert_eq!(level_of(b, &c(outside)), Level::Outside, "{outside}");
        }
        assert_eq!(level_of(TaskLayout::Flat, &c("id/wd")), Level::Outside);
        assert_eq!(level_of(b, &c("j/job-1/job-5/wd")), Level::Wd);
    }

    fn walker(names: &[String]) -> Walker<'_> {
        Walker {
            layout: TaskLayout::Batch,
            env_file_names: names,
            agent_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    #[test]
    fn env_files_are_found_only_at_their_places_and_links_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("workitems");
        let task = root.join("j/job-1/t");
        std::fs::create_dir_all(task.join("wd/deep/er")).unwrap();
        for d in [
            &root,
            &root.join("j"),
            &root.join("j/job-1"),
            &task,
            &task.join("wd"),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(task.join("wd/nodeseal.env"), "A=1\n").unwrap();
        std::fs::write(task.join("nodeseal.env"), "B=1\n").unwrap();
        // Not at a place of the layout: ignored.
        std::fs::write(task.join("wd/deep/nodeseal.env"), "C=1\n").unwrap();
        // A task made of a link to another directory: never entered.
        symlink(&task, root.join("j/job-1/linked")).unwrap();
        // An env file that is a link: refused.
        let other = root.join("j/job-1/t2/wd");
        std::fs::create_dir_all(&other).unwrap();
        for d in [root.join("j/job-1/t2"), other.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        symlink(task.join("wd/nodeseal.env"), other.join("nodeseal.env")).unwrap();

        let names = vec!["nodeseal.env".to_owned()];
        let walk = walker(&names).walk(&root, &root).unwrap();
        let mut found: Vec<_> = walk.files.iter().map(|f| f.path.clone()).collect();
        found.sort();
        assert_eq!(
            found,
            vec![task.join("nodeseal.env"), task.join("wd/nodeseal.env")]
        );
        assert_eq!(walk.refused.len(), 1, "{:?}", walk.refused);
        assert!(walk.refused[0].0.ends_with("t2/wd/nodeseal.env"));
        assert!(!walk.dirs.iter().any(|d| d.ends_with("deep")));
        assert!(!walk.dirs.iter().any(|d| d.ends_with("linked")));
        // A walk aimed at the link itself fails: everything known below it is forgotten.
        assert!(walker(&names)
            .walk(&root, &root.join("j/job-1/linked"))
            .is_err());
    }

    #[test]
    fn a_level_others_may_write_makes_the_task_untrusted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("w");
        let task = root.join("j/job-1/t");
        std::fs::create_dir_all(task.join("wd")).unwrap();
        for d in [&root, &root.join("j"), &task, &task.join("wd")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(root.join("j/job-1"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        std::fs::write(task.join("wd/nodeseal.env"), "A=1\n").unwrap();
        let names = vec!["nodeseal.env".to_owned()];
        let walk = walker(&names).walk(&root, &root).unwrap();
        assert!(walk.files.is_empty());
        assert!(
            walk.refused[0].1.contains("writable by group or others"),
            "{:?}",
            walk.refused
        );
        // Sticky, like /tmp: others cannot rename what they do not own.
        std::fs::set_permissions(
            root.join("j/job-1"),
            std::fs::Permissions::from_mode(0o1777),
        )
        .unwrap();
        let walk = walker(&names).walk(&root, &root).unwrap();
        assert_eq!(walk.files.len(), 1);
        // But anyone could have added a task to job `j` there: the job id is not believed.
        assert_eq!(walk.files[0].task.job_id, None);
        assert_eq!(walk.files[0].task.task_id, "t");
        // But a task directory is one owner's: sticky there does not make it shared ground.
        std::fs::set_permissions(&task, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let walk = walker(&names).walk(&root, &root).unwrap();
        assert!(
            walk.files.is_empty(),
            "a sticky shared task dir was trusted"
        );
    }
}
