//! Two CPU cgroups for the under-abuse run, modelling how a Batch node runs the agent: the agent
//! is a systemd service with a cgroup of its own (nodeseal-agent.service, default CPU weight) and
//! every task runs under the Batch node agent's service, a sibling cgroup with the same default
//! weight. Under CPU contention the agent then gets its cgroup's share however many threads the
//! tasks run, where in one shared cgroup an attacker's 64 busy threads would compete
//! thread-for-thread with the agent's few.
//!
//! Both cgroups are created at the root of the hierarchy that carries the cpu controller (found in
//! /proc/self/mountinfo: cgroup v2 if its `cgroup.controllers` lists `cpu`, else the v1 `cpu`
//! controller), as siblings like two systemd services. [`Cgroups`] removes them when dropped, on
//! error paths too: whatever still runs in them goes back to this process's own cgroup first.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Names of this benchmark's cgroups: `nodeseal-bench-<pid>-agent` and `-tasks`.
const PREFIX: &str = "nodeseal-bench-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A cpu-controller hierarchy as this process sees it.
struct Hierarchy {
    version: Version,
    /// Where it is mounted.
    mount: PathBuf,
    /// The cgroup path (as /proc/<pid>/cgroup spells it) that the mount shows at `mount`.
    mount_root: String,
}

/// The "agent" and "tasks" cgroups of one run.
pub(crate) struct Cgroups {
    hierarchy: Hierarchy,
    agent: PathBuf,
    tasks: PathBuf,
    /// This process's own cgroup: where leftovers go back before the rmdir.
    home: PathBuf,
    /// cgroup v2: `+cpu` was written to the root's subtree_control by this run (undone at drop).
    enabled_cpu: bool,
}

/// Which of the two cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Which {
    Agent,
    Tasks,
}

/// Undo the escapes of a mountinfo path field (`\040` for a space and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            out.push(
                d.iter()
                    .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
            );
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cpu hierarchies in `mountinfo`: (version, mount point, mount root), v2 first.
fn cpu_mounts(mountinfo: &str) -> Vec<(Version, PathBuf, String)> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let (root, mount) = (unescape(pre[3]), PathBuf::from(unescape(pre[4])));
        match post[0] {
            "cgroup2" => found.push((Version::V2, mount, root)),
            "cgroup" if post[2].split(',').any(|o| o == "cpu") => {
                found.push((Version::V1, mount, root));
            }
            _ => {}
        }
    }
    found.sort_by_key(|(v, _, _)| *v == Version::V1);
    found
}

/// This process's cgroup path in `version`'s hierarchy, from /proc/self/cgroup.
fn own_cgroup(proc_cgroup: &str, version: Version) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        };
        ours.then(|| path.to_owned())
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {text:?} to {}", path.display()))
}

impl Hierarchy {
    fn find() -> Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("cannot read /proc/self/mountinfo")?;
        for (version, mount, mount_root) in cpu_mounts(&mountinfo) {
            if version == Version::V2 {
                let controllers =
                    fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "cpu") {
                    continue;
                }
            }
            return Ok(Self {
                version,
                mount,
                mount_root,
            });
        }
        bail!("no cgroup v2 hierarchy offering the cpu controller and no cgroup v1 cpu controller in /proc/self/mountinfo")
    }

    /// The directory of cgroup `path` (as /proc/<pid>/cgroup spells it) under the mount.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.mount_root == "/" {
            path
        } else {
            let rel = path.strip_prefix(self.mount_root.as_str())?;
            if !rel.is_empty() && !rel.starts_with('/') {
                return None;
            }
            rel
        };
        let rel = rel.trim_start_matches('/');
        Some(if rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(rel)
        })
    }

    /// The cgroup path (as /proc/<pid>/cgroup spells it) of directory `dir` under the mount.
    fn path_of(&self, dir: &Path) -> String {
        let rel = dir.strip_prefix(&self.mount).unwrap_or(dir);
        let root = self.mount_root.trim_end_matches('/');
        format!("{root}/{}", rel.display())
    }

    fn weight_file(&self) -> (&'static str, &'static str) {
        match self.version {
            Version::V1 => ("cpu.shares", "1024"),
            Version::V2 => ("cpu.weight", "100"),
        }
    }
}

impl Cgroups {
    /// Create the two cgroups, named after this process, with the default CPU weight.
    pub(crate) fn create() -> Result<Self> {
        let hierarchy = Hierarchy::find()?;
        let proc_cgroup =
            fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
        let home = own_cgroup(&proc_cgroup, hierarchy.version)
            .and_then(|path| hierarchy.dir_of(&path))
            .with_context(|| {
                format!(
                    "this process's cgroup is not visible under {}",
                    hierarchy.mount.display()
                )
            })?;
        let mut enabled_cpu = false;
        if hierarchy.version == Version::V2 {
            let control = hierarchy.mount.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control)
                .with_context(|| format!("cannot read {}", control.display()))?;
            if !enabled.split_whitespace().any(|c| c == "cpu") {
                write(&control, "+cpu")?;
                enabled_cpu = true;
            }
        }
        remove_stale(&hierarchy.mount, &home.join("cgroup.procs"));
        let tag = format!("{PREFIX}{}", std::process::id());
        let names = [format!("{tag}-agent"), format!("{tag}-tasks")];
        // Paths are filled in as the directories are made: only what this run made is removed.
        let mut groups = Self {
            hierarchy,
            agent: PathBuf::new(),
            tasks: PathBuf::new(),
            home,
            enabled_cpu,
        };
        let (file, weight) = groups.hierarchy.weight_file();
        for (i, name) in names.iter().enumerate() {
            let dir = groups.hierarchy.mount.join(name);
            fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if i == 0 {
                groups.agent = dir.clone();
            } else {
                groups.tasks = dir.clone();
            }
            write(&dir.join(file), weight)?;
        }
        // A panic aborts a release build without running destructors; the hook still runs.
        let (dirs, home_procs) = (
            names.map(|n| groups.hierarchy.mount.join(n)),
            groups.home.join("cgroup.procs"),
        );
        let earlier = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            earlier(info);
            for dir in &dirs {
                remove(dir, &home_procs);
            }
        }));
        Ok(groups)
    }

    fn dir(&self, which: Which) -> &Path {
        match which {
            Which::Agent => &self.agent,
            Which::Tasks => &self.tasks,
        }
    }

    /// For the report: which controller, where, and the weight each cgroup has.
    pub(crate) fn describe(&self) -> String {
        let (file, weight) = self.hierarchy.weight_file();
        format!(
            "cgroup {} cpu controller at `{}`, `{file}` {weight} each",
            match self.hierarchy.version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            },
            self.hierarchy.mount.display(),
        )
    }

    /// Move process `pid`, all its threads, into `which`.
    pub(crate) fn join(&self, which: Which, pid: u32) -> Result<()> {
        write(&self.dir(which).join("cgroup.procs"), &pid.to_string())
    }

    /// `which`'s cgroup.procs opened for writing by this (root) process: a child that has it on
    /// stdin joins the cgroup itself before any work, with this opener's rights (the kernel
    /// checks a migration against the credentials the file was opened with), even after it has
    /// dropped to an unprivileged uid.
    pub(crate) fn procs_file(&self, which: Which) -> Result<File> {
        let path = self.dir(which).join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    }

    /// Whether every thread of process `pid` is in `which` (false if it has exited).
    pub(crate) fn holds(&self, which: Which, pid: u32) -> bool {
        let want = self.hierarchy.path_of(self.dir(which));
        let Ok(threads) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let mut any = false;
        for thread in threads.flatten() {
            let Ok(text) = fs::read_to_string(thread.path().join("cgroup")) else {
                continue;
            };
            any = true;
            if own_cgroup(&text, self.hierarchy.version).as_deref() != Some(want.as_str()) {
                return false;
            }
        }
        any
    }
}

/// The `client` child's first act when started with `which`'s procs file on stdin (see
/// [`Cgroups::procs_file`]): "0" names the writing process itself.
pub(crate) fn join_from_stdin() -> Result<()> {
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("stdin")?;
    File::from(fd)
        .write_all(b"0")
        .context("cannot join the tasks cgroup through the cgroup.procs file on stdin")
}

/// Move whatever still runs in cgroup `dir` to `home_procs` and remove `dir`. An exiting process
/// may linger a moment, so the rmdir is tried again for a bounded while.
fn remove(dir: &Path, home_procs: &Path) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(pids) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in pids.split_whitespace() {
                let _ = fs::write(home_procs, pid);
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) if Instant::now() >= until => {
                eprintln!(
                    "nodeseal-bench: cannot remove cgroup {}: {e}",
                    dir.display()
                );
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Cgroups of earlier runs whose process is gone: a release build aborts on a panic (a testkit
/// assertion, say) before any destructor or hook could finish the job.
fn remove_stale(mount: &Path, home_procs: &Path) {
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| {
                n.strip_suffix("-agent")
                    .or_else(|| n.strip_suffix("-tasks"))
            })
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove(&entry.path(), home_procs);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let home_procs = self.home.join("cgroup.procs");
        for dir in [&self.agent, &self.tasks] {
            if !dir.as_os_str().is_empty() {
                remove(dir, &home_procs);
            }
        }
        if self.enabled_cpu {
            // Fails harmlessly if something else now uses the controller below the root.
            let _ = fs::write(self.hierarchy.mount.join("cgroup.subtree_control"), "-cpu");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 /kube\\040pod /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_v2_before_v1_and_skips_other_controllers() {
        let found = cpu_mounts(MOUNTINFO);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].0, Version::V2);
        assert_eq!(found[0].1, PathBuf::from("/sys/fs/cgroup/uni fied"));
        assert_eq!(found[0].2, "/kube pod");
        assert_eq!(found[1].0, Version::V1);
        assert_eq!(found[1].1, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
    }

    #[test]
    fn own_cgroup_picks_the_hierarchy() {
        let text = "4:memory:/m\n2:cpu,cpuacct:/svc/a\n0::/user.slice\n";
        assert_eq!(own_cgroup(text, Version::V1).as_deref(), Some("/svc/a"));
        assert_eq!(
            own_cgroup(text, Version::V2).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(own_cgroup("4:memory:/m\n", Version::V1), None);
    }

    #[test]
    fn paths_map_between_cgroup_and_mount() {
        let h = Hierarchy {
            version: Version::V2,
            mount: PathBuf::from("/cg"),
            mount_root: "/pod".into(),
        };
        assert_eq!(h.dir_of("/pod/x/y"), Some(PathBuf::from("/cg/x/y")));
        assert_eq!(h.dir_of("/pod"), Some(PathBuf::from("/cg")));
        assert_eq!(h.dir_of("/other"), None);
        assert_eq!(h.path_of(Path::new("/cg/b-agent")), "/pod/b-agent");
        let root = Hierarchy {
            mount_root: "/".into(),
            ..h
        };
        assert_eq!(root.path_of(Path::new("/cg/b-agent")), "/b-agent");
        assert_eq!(root.dir_of("/"), Some(PathBuf::from("/cg")));
    }
}
