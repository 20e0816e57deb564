//! The task index: which env files exist, who owns them, which task they belong to, and what each
//! variable holds (a v1 token, a legacy Shipyard ciphertext, or a plain value). Decrypted values
//! are cached per variable and dropped (zeroized) with their file entry.

use super::envfile::{read_env_file, Classifier, ValueKind};
use super::layout::FoundFile;
use super::settle;
use nodeseal_client::protocol::SkippedLine;
use nodeseal_envelope::envfile::EnvFile;
use nodeseal_envelope::Thumbprint;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};
use zeroize::Zeroizing;

/// A decrypted value and where it came from.
pub(crate) struct Cached {
    /// Cleartext, wiped on drop.
    pub value: Arc<Zeroizing<String>>,
    /// The key that opened it.
    pub key: Thumbprint,
    /// When it stops being served from cache.
    pub expires: Instant,
}

/// One variable of an env file.
pub(crate) struct Var {
    /// Name.
    pub name: String,
    /// Stored form.
    pub kind: ValueKind,
    /// Decrypted value, if opened recently.
    pub cache: Mutex<Option<Cached>>,
}

/// A parsed env file and its task.
pub(crate) struct EnvEntry {
    /// The file.
    pub path: PathBuf,
    /// The task directory (parent of `wd/` when the file is in `wd/`).
    pub task_dir: PathBuf,
    /// Batch job id, from the path.
    pub job_id: Option<String>,
    /// Batch task id, from the path.
    pub task_id: Option<String>,
    /// The file's owner: the only non-root uid that may read these values on the host socket.
    pub owner_uid: u32,
    /// The task's owner (its directory's, or its file's when root owns the directory): a
    /// per-task socket belongs to it and serves only its files.
    pub task_owner: u32,
    /// Variables in file order.
    pub vars: Vec<Var>,
    /// Lines that serve nothing, reported to the callers who may read the file.
    pub skipped: Vec<SkippedLine>,
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
    pub(crate) fn evict_key(&self, key: &Thumbprint) -> usize {
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

/// Where the wall-clock time comes from (`&SystemTime::now` outside tests).
pub(crate) type Clock<'a> = &'a dyn Fn() -> SystemTime;

/// Everything the agent knows about tasks, by env-file path and by task directory.
#[derive(Default)]
pub(crate) struct Tasks {
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
pub(crate) enum FileUpdate {
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

impl Tasks {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// (Re)read an env file the layout walk found and opened. `clock` tells the time once the
    /// file has been read: a time taken earlier could be older than a write made meanwhile, and
    /// that file would look settled.
    pub(crate) fn update_file(
        &self,
        found: FoundFile,
        classifier: &Classifier<'_>,
        clock: Clock<'_>,
    ) -> FileUpdate {
        let FoundFile {
            path,
            mut file,
            task,
        } = found;
        let Ok(meta) = file.metadata() else {
            return if self.remove(&path) {
                FileUpdate::Removed
            } else {
                FileUpdate::Invalid("cannot stat it".into())
            };
        };
        let known = self.read().files.get(&path).cloned();
        if known.is_some_and(|e| e.stamp == FileStamp::of(&meta) && e.task_owner == task.owner) {
            return FileUpdate::Unchanged;
        }
        let bytes = match read_env_file(&mut file, &meta) {
            Ok(b) => b,
            Err(e) => {
                self.remove(&path);
                return FileUpdate::Invalid(e.to_string());
            }
        };
        let parsed = match EnvFile::parse_bytes(&bytes) {
            Ok(p) => p,
            Err(e) => {
                self.remove(&path);
                return FileUpdate::Invalid(e.to_string());
            }
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| clock().duration_since(m).ok());
        if !settle::is_settled(parsed.terminated, self.writers().contains(&path), age) {
            // A writer may still be appending to the last line: never serve half a value.
            return FileUpdate::Unsettled;
        }
        self.writers().remove(&path);
        let vars: Vec<Var> = parsed
            .vars()
            .map(|(name, value)| Var {
                name: name.to_owned(),
                kind: classifier.classify(name, value),
                cache: Mutex::new(None),
            })
            .collect();
        let skipped = skipped_report(&parsed, &path);
        let n = vars.len();
        let entry = Arc::new(EnvEntry {
            path,
            task_dir: task.task_dir,
            job_id: task.job_id,
            task_id: Some(task.task_id),
            owner_uid: meta.uid(),
            task_owner: task.owner,
            vars,
            skipped,
            stamp: FileStamp::of(&meta),
        });
        self.write().insert(entry);
        FileUpdate::Loaded { vars: n }
    }

    /// Every known file below `dir`.
    pub(crate) fn paths_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.read()
            .files
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect()
    }

    fn writers(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.writers_done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watcher saw `path`'s writer close it (or rename it into place).
    pub(crate) fn note_writer_done(&self, path: &Path) {
        self.writers().insert(path.to_owned());
    }

    /// The watcher saw `path` being written again.
    pub(crate) fn note_writer_active(&self, path: &Path) {
        self.writers().remove(path);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget a file; its cached values are zeroized when the last request using them ends.
    pub(crate) fn remove(&self, path: &Path) -> bool {
        self.writers().remove(path);
        self.write().remove(path)
    }

    /// Every known file path.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.read().files.keys().cloned().collect()
    }

    /// Every entry.
    pub(crate) fn entries(&self) -> Vec<Arc<EnvEntry>> {
        self.read().files.values().cloned().collect()
    }

    /// Entries of one task directory, in path order.
    pub(crate) fn entries_of(&self, task_dir: &Path) -> Vec<Arc<EnvEntry>> {
        self.read()
            .by_task
            .get(task_dir)
            .map(|files| files.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of distinct task directories.
    pub(crate) fn task_count(&self) -> usize {
        self.read().by_task.len()
    }

    /// Distinct task directories whose files `uid` owns.
    pub(crate) fn task_dirs_owned_by(&self, uid: u32) -> Vec<PathBuf> {
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
    pub(crate) fn evict_key(&self, key: &Thumbprint) -> usize {
        self.entries().iter().map(|e| e.evict_key(key)).sum()
    }

    /// Drop every cached value.
    pub(crate) fn evict_all(&self) {
        for e in self.entries() {
            for v in &e.vars {
                *v.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

/// Skipped lines reported per file: a file of a million bad lines must not cost the agent a
/// million reports (the file's owner chooses its content).
const MAX_REPORTED_SKIPPED: usize = 32;

/// The skipped lines of `parsed` as reported to callers: the first [`MAX_REPORTED_SKIPPED`],
/// then one line saying how many more there are.
fn skipped_report(parsed: &EnvFile, path: &Path) -> Vec<SkippedLine> {
    let file = path.display().to_string();
    let mut out = Vec::new();
    let mut more = 0usize;
    let mut first_more = 0usize;
    for (line, name, why) in parsed.skipped() {
        if out.len() < MAX_REPORTED_SKIPPED {
            out.push(SkippedLine {
                file: file.clone(),
                line: line as u64,
                name: name.map(str::to_owned),
                reason: why.to_string(),
            });
        } else {
            if more == 0 {
                first_more = line;
            }
            more += 1;
        }
    }
    if more > 0 {
        out.push(SkippedLine {
            file,
            line: first_more as u64,
            name: None,
            reason: format!("and {more} more lines from here on are not served"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::layout::TaskIdentity;

    #[test]
    fn skipped_lines_are_reported_up_to_a_bound_then_counted() {
        let text: String = (0..100).map(|i| format!("BAD {i}=x\n")).collect::<String>() + "OK=1\n";
        let parsed = EnvFile::parse(&text).unwrap();
        let report = skipped_report(&parsed, Path::new("/t/nodeseal.env"));
        assert_eq!(report.len(), MAX_REPORTED_SKIPPED + 1);
        assert_eq!(report[0].line, 1);
        assert!(report[0].reason.contains("whitespace"));
        let last = report.last().unwrap();
        assert_eq!(last.line, MAX_REPORTED_SKIPPED as u64 + 1);
        assert!(last.reason.contains("68 more"), "{}", last.reason);
        assert_eq!(parsed.vars().collect::<Vec<_>>(), [("OK", "1")]);
    }
    use crate::tasks::settle::{SETTLE, UNTERMINATED_GRACE};
    use std::time::Duration;

    #[test]
    fn an_unterminated_file_is_served_only_once_it_settles_by_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("job/job-1/t1/wd");
        std::fs::create_dir_all(&task).unwrap();
        let file = task.join("nodeseal.env");
        std::fs::write(&file, "A=1\nB=half-writ").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let tasks = Tasks::new();
        let classifier = Classifier {
            legacy_names: &[],
            legacy_by_length: false,
        };
        let found = || FoundFile {
            path: file.clone(),
            file: std::fs::File::open(&file).unwrap(),
            task: TaskIdentity {
                task_dir: task.parent().unwrap().to_owned(),
                job_id: Some("job".into()),
                task_id: "t1".into(),
                owner: 0,
            },
        };
        let at = |d: Duration| move || mtime + d;
        let update = |d| tasks.update_file(found(), &classifier, &at(d));
        assert_eq!(update(Duration::ZERO), FileUpdate::Unsettled);
        // Closed by its writer: served once quiet for SETTLE.
        tasks.note_writer_done(&file);
        assert_eq!(
            update(SETTLE - Duration::from_millis(1)),
            FileUpdate::Unsettled
        );
        assert_eq!(update(SETTLE), FileUpdate::Loaded { vars: 2 });
        assert_eq!(update(SETTLE), FileUpdate::Unchanged);
        // Rewritten, writer still active: only the grace period lets it through.
        std::fs::write(&file, "A=1\nB=half-writ-again").unwrap();
        let mtime2 = std::fs::metadata(&file).unwrap().modified().unwrap();
        tasks.note_writer_active(&file);
        let at2 = |d: Duration| move || mtime2 + d;
        let update2 = |d| tasks.update_file(found(), &classifier, &at2(d));
        assert_eq!(update2(SETTLE), FileUpdate::Unsettled);
        assert_eq!(update2(UNTERMINATED_GRACE), FileUpdate::Loaded { vars: 2 });
    }
}
