//! Task env files: which files exist, who owns them, which task they belong to, and what each
//! variable holds (a v1 token, a legacy Shipyard ciphertext, or a plain value). Decrypted values
//! are cached per variable and dropped (zeroized) with their file entry.

use nodeseal_envelope::envfile::EnvFile;
use nodeseal_envelope::token::{self, Format};
use nodeseal_envelope::Thumbprint;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use zeroize::Zeroizing;

/// How a variable's value is stored in its env file.
pub enum ValueKind {
    /// Served as it is.
    Plain(Zeroizing<String>),
    /// A v1 token and the key ids it names.
    V1 {
        /// The token text.
        token: String,
        /// Its recipients.
        recipients: Vec<Thumbprint>,
    },
    /// A Batch Shipyard ciphertext (standard base64 of RSA PKCS#1 v1.5).
    Shipyard {
        /// The base64 text.
        token: String,
        /// Decoded length (the modulus length of the key that can open it).
        len: usize,
    },
    /// Looks like a v1 token but does not parse: served as an error, never as plain text.
    Invalid(String),
}

/// A decrypted value and where it came from.
pub struct Cached {
    /// Cleartext, wiped on drop.
    pub value: Arc<Zeroizing<String>>,
    /// The key that opened it.
    pub key: Thumbprint,
    /// When it stops being served from cache.
    pub expires: Instant,
}

/// One variable of an env file.
pub struct Var {
    /// Name.
    pub name: String,
    /// Stored form.
    pub kind: ValueKind,
    /// Decrypted value, if opened recently.
    pub cache: Mutex<Option<Cached>>,
}

/// A parsed env file and its task.
pub struct EnvEntry {
    /// The file.
    pub path: PathBuf,
    /// The task directory (parent of `wd/` when the file is in `wd/`).
    pub task_dir: PathBuf,
    /// Batch job id, from the path.
    pub job_id: Option<String>,
    /// Batch task id, from the path.
    pub task_id: Option<String>,
    /// The file's owner: the only non-root uid that may read these values.
    pub owner_uid: u32,
    /// Variables in file order.
    pub vars: Vec<Var>,
    /// What the file looked like when read, so an unchanged file keeps its cached values.
    stamp: FileStamp,
}

/// Identity and version of a file as `stat` sees it; ctime covers chown and chmod too.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    len: u64,
    ino: u64,
    uid: u32,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            len: m.len(),
            ino: m.ino(),
            uid: m.uid(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

impl EnvEntry {
    /// Drop every cached value opened with `key`.
    pub fn evict_key(&self, key: &Thumbprint) -> usize {
        let mut n = 0;
        for v in &self.vars {
            let mut c = v.cache.lock().unwrap_or_else(|e| e.into_inner());
            if c.as_ref().is_some_and(|c| c.key == *key) {
                *c = None;
                n += 1;
            }
        }
        n
    }
}

/// Everything the agent knows about tasks, by env-file path and by task directory.
#[derive(Default)]
pub struct Tasks {
    inner: RwLock<Index>,
    /// Env files whose writer closed them (or renamed them into place) since they last changed.
    writers_done: Mutex<HashSet<PathBuf>>,
}

/// Both views under one lock so they never disagree; the per-task view makes a request's
/// lookup independent of how many tasks the node runs.
#[derive(Default)]
struct Index {
    files: BTreeMap<PathBuf, Arc<EnvEntry>>,
    by_task: HashMap<PathBuf, BTreeMap<PathBuf, Arc<EnvEntry>>>,
}

impl Index {
    fn insert(&mut self, entry: Arc<EnvEntry>) {
        self.remove(&entry.path);
        self.by_task
            .entry(entry.task_dir.clone())
            .or_default()
            .insert(entry.path.clone(), entry.clone());
        self.files.insert(entry.path.clone(), entry);
    }

    fn remove(&mut self, path: &Path) -> bool {
        let Some(old) = self.files.remove(path) else {
            return false;
        };
        if let Some(task) = self.by_task.get_mut(&old.task_dir) {
            task.remove(path);
            if task.is_empty() {
                self.by_task.remove(&old.task_dir);
            }
        }
        true
    }
}

/// Outcome of (re)reading one env file.
#[derive(Debug, PartialEq, Eq)]
pub enum FileUpdate {
    /// Loaded or reloaded.
    Loaded {
        /// Number of variables.
        vars: usize,
    },
    /// Gone (deleted or no longer readable): forgotten.
    Removed,
    /// Same file, same content: kept with its cached values.
    Unchanged,
    /// Still being written: retry after it settles.
    Unsettled,
    /// Unparseable: forgotten until it changes.
    Invalid(String),
}

/// Env files larger than this are refused: a task must not make the agent read gigabytes.
const MAX_ENV_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A file whose last line has no newline is read as complete only once its writer has closed it
/// and it has not changed for this long (several quick appends stay one write)...
pub const SETTLE: Duration = Duration::from_millis(300);
/// ...or, when no close was seen (a writer holding the file open, or lost events), once it has
/// not changed for this long.
pub const UNTERMINATED_GRACE: Duration = Duration::from_secs(5);

/// The rules that classify values, taken from the config.
pub struct Classifier<'a> {
    /// Names whose values may be Shipyard ciphertexts.
    pub legacy_names: &'a [String],
    /// Also any value whose decoded length is an RSA modulus length nodeseal accepts.
    pub legacy_by_length: bool,
}

/// Modulus lengths of the RSA keys nodeseal accepts (2048, 3072, 4096 bits). Legacy detection
/// by length uses these rather than the keys loaded right now: otherwise a ciphertext whose key
/// is briefly missing would be reclassified as a plain value and served as it is.
const RSA_MODULUS_LENGTHS: [usize; 3] = [256, 384, 512];

impl Classifier<'_> {
    /// Classify one value.
    pub fn classify(&self, name: &str, value: &str) -> ValueKind {
        match token::detect(value) {
            Some(Format::V1) => match token::inspect(value) {
                Ok(info) => ValueKind::V1 {
                    token: value.to_owned(),
                    recipients: info.recipients,
                },
                Err(e) => ValueKind::Invalid(e.to_string()),
            },
            Some(Format::Shipyard) => {
                let len = nodeseal_envelope::legacy::decode(value).map_or(0, |d| d.len());
                let by_name = self.legacy_names.iter().any(|n| n == name);
                let by_length = self.legacy_by_length && RSA_MODULUS_LENGTHS.contains(&len);
                if by_name || by_length {
                    ValueKind::Shipyard {
                        token: value.to_owned(),
                        len,
                    }
                } else {
                    ValueKind::Plain(Zeroizing::new(value.to_owned()))
                }
            }
            _ => ValueKind::Plain(Zeroizing::new(value.to_owned())),
        }
    }
}

/// Read a regular file without following a symlink at its last component, and stat the very
/// file that was read: the owner decides who may read the values, so the check and the read
/// must concern the same inode.
fn read_no_follow(path: &Path) -> std::io::Result<(Zeroizing<Vec<u8>>, std::fs::Metadata)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_ENV_FILE_BYTES {
        return Err(std::io::Error::other("larger than an env file can be"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    file.read_to_end(&mut bytes)?;
    Ok((bytes, meta))
}

/// Task directory, job id and task id implied by an env file's path under `root`.
///
/// Batch lays tasks out as `workitems/<job>/job-1/<task>/wd/` (a job schedule adds a level
/// above the job); Shipyard writes its env file into `wd/`.
pub fn task_of(path: &Path, root: &Path) -> (PathBuf, Option<String>, Option<String>) {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let task_dir = if parent.file_name().is_some_and(|n| n == "wd") {
        parent.parent().unwrap_or(parent).to_path_buf()
    } else {
        parent.to_path_buf()
    };
    let task_id = task_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let rel: Vec<String> = task_dir
        .strip_prefix(root)
        .map(|r| {
            r.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // The job id sits just before the `job-<n>` level.
    let job_id = rel
        .iter()
        .position(|c| {
            c.strip_prefix("job-")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|&i| i > 0)
        .map(|i| rel[i - 1].clone())
        .or_else(|| (rel.len() >= 2).then(|| rel[0].clone()));
    (task_dir, job_id, task_id)
}

/// Normalise what a caller names as its task: its task dir or its `wd/`.
pub fn normalize_task_dir(s: &str) -> PathBuf {
    let p = Path::new(s.trim_end_matches('/'));
    if p.file_name().is_some_and(|n| n == "wd") {
        p.parent().unwrap_or(p).to_path_buf()
    } else {
        p.to_path_buf()
    }
}

impl Tasks {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// (Re)read `path`, which lies under `root`.
    pub fn update_file(&self, path: &Path, root: &Path, classifier: &Classifier<'_>) -> FileUpdate {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            let known = self.read().files.get(path).cloned();
            if known.is_some_and(|e| e.stamp == FileStamp::of(&m)) {
                return FileUpdate::Unchanged;
            }
        }
        let Ok((bytes, meta)) = read_no_follow(path) else {
            return if self.remove(path) {
                FileUpdate::Removed
            } else {
                FileUpdate::Invalid("not readable".into())
            };
        };
        let parsed = match EnvFile::parse_bytes(&bytes) {
            Ok(p) => p,
            Err(e) => {
                self.remove(path);
                return FileUpdate::Invalid(e.to_string());
            }
        };
        if !parsed.terminated {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .unwrap_or(Duration::MAX);
            let closed = self.writers().contains(path);
            if !((closed && age >= SETTLE) || age >= UNTERMINATED_GRACE) {
                // A writer may still be appending to the last line: never serve half a value.
                return FileUpdate::Unsettled;
            }
        }
        self.writers().remove(path);
        let (task_dir, job_id, task_id) = task_of(path, root);
        let vars: Vec<Var> = parsed
            .vars()
            .map(|(name, value)| Var {
                name: name.to_owned(),
                kind: classifier.classify(name, value),
                cache: Mutex::new(None),
            })
            .collect();
        let n = vars.len();
        let entry = Arc::new(EnvEntry {
            path: path.to_owned(),
            task_dir,
            job_id,
            task_id,
            owner_uid: meta.uid(),
            vars,
            stamp: FileStamp::of(&meta),
        });
        self.write().insert(entry);
        FileUpdate::Loaded { vars: n }
    }

    fn writers(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.writers_done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watcher saw `path`'s writer close it (or rename it into place).
    pub fn note_writer_done(&self, path: &Path) {
        self.writers().insert(path.to_owned());
    }

    /// The watcher saw `path` being written again.
    pub fn note_writer_active(&self, path: &Path) {
        self.writers().remove(path);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget a file; its cached values are zeroized when the last request using them ends.
    pub fn remove(&self, path: &Path) -> bool {
        self.writers().remove(path);
        self.write().remove(path)
    }

    /// Forget every file under `dir` (a directory that was removed or moved away).
    pub fn remove_under(&self, dir: &Path) -> Vec<PathBuf> {
        let mut index = self.write();
        let gone: Vec<PathBuf> = index
            .files
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in &gone {
            index.remove(p);
        }
        gone
    }

    /// Every known file path.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.read().files.keys().cloned().collect()
    }

    /// Every entry.
    pub fn entries(&self) -> Vec<Arc<EnvEntry>> {
        self.read().files.values().cloned().collect()
    }

    /// Entries of one task directory, in path order.
    pub fn entries_of(&self, task_dir: &Path) -> Vec<Arc<EnvEntry>> {
        self.read()
            .by_task
            .get(task_dir)
            .map(|files| files.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of distinct task directories.
    pub fn task_count(&self) -> usize {
        self.read().by_task.len()
    }

    /// Distinct task directories whose files `uid` owns.
    pub fn task_dirs_owned_by(&self, uid: u32) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .read()
            .by_task
            .iter()
            .filter(|(_, files)| files.values().any(|e| e.owner_uid == uid))
            .map(|(dir, _)| dir.clone())
            .collect();
        dirs.sort();
        dirs
    }

    /// Drop cached values opened with `key`; returns how many.
    pub fn evict_key(&self, key: &Thumbprint) -> usize {
        self.entries().iter().map(|e| e.evict_key(key)).sum()
    }

    /// Drop every cached value.
    pub fn evict_all(&self) {
        for e in self.entries() {
            for v in &e.vars {
                *v.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_of_follows_the_batch_layout() {
        let root = Path::new("/mnt/batch/tasks/workitems");
        let (dir, job, task) = task_of(
            Path::new("/mnt/batch/tasks/workitems/myjob/job-1/task-3/wd/.shipyard.envlist"),
            root,
        );
        assert_eq!(
            dir,
            Path::new("/mnt/batch/tasks/workitems/myjob/job-1/task-3")
        );
        assert_eq!(job.as_deref(), Some("myjob"));
        assert_eq!(task.as_deref(), Some("task-3"));
        // A job schedule adds a level above the job.
        let (_, job, task) = task_of(
            Path::new("/mnt/batch/tasks/workitems/sched/myjob/job-1/t1/nodeseal.env"),
            root,
        );
        assert_eq!(job.as_deref(), Some("myjob"));
        assert_eq!(task.as_deref(), Some("t1"));
    }

    #[test]
    fn callers_may_name_the_task_dir_or_its_wd() {
        assert_eq!(normalize_task_dir("/a/b/t/wd"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t/wd/"), Path::new("/a/b/t"));
        assert_eq!(normalize_task_dir("/a/b/t"), Path::new("/a/b/t"));
    }
}
