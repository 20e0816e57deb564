//! The task index: which env files exist, who owns them, which task they belong to, and what each
//! variable holds (a v1 token, a legacy Shipyard ciphertext, or a plain value). Decrypted values
//! are cached per variable and dropped (zeroized) with their file entry.
//!
//! Each file is read under [`FileCaps`] and charged to its owner's accounts (`crate::budget`):
//! its bytes, and the memory its entry holds. A file over a cap is kept as a *refused* entry
//! with the reason, so its task answers with that reason instead of a partial view, and the
//! reason is logged once, not on every rescan.

use super::envfile::{
    candidate_var_lines, lines_in, read_env_file, shown_name, Classifier, FileCaps, OverCap,
    PerUid, Unreadable, ValueKind, LINES_PER_VAR,
};
use super::layout::FoundFile;
use super::pace::{Pace, ReadPace};
use super::settle;
use crate::budget::{Charge, Ledger};
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
    /// Its memory on the file owner's budget, given back when the value is dropped.
    pub _memory: Charge,
}

impl Cached {
    /// What a cached cleartext of `len` bytes costs: the text, its `Arc` and the bookkeeping.
    pub(crate) fn cost(len: usize) -> usize {
        len + size_of::<Self>() + 2 * ALLOCATION_OVERHEAD + 16
    }
}

/// What the allocator spends per allocation beyond the bytes asked for (header and rounding),
/// counted so that a file of many tiny variables is charged what it really costs.
const ALLOCATION_OVERHEAD: usize = 16;

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
    /// Variables in file order (none when refused).
    pub vars: Vec<Var>,
    /// Set when the file broke a cap: the task answers this instead of any of its values.
    pub refused: Option<OverCap>,
    /// Lines that serve nothing, reported to the callers who may read the file.
    pub skipped: Vec<SkippedLine>,
    /// What the file looked like when read, so an unchanged file keeps its cached values.
    stamp: FileStamp,
    /// The caps it was read under: a reload that changes them reads it again.
    caps: FileCaps,
    /// Its bytes on the owner's env-bytes account.
    bytes: Charge,
    /// Its entry's memory on the owner's memory budget.
    memory: Charge,
}

/// Identity and version of a file as `stat` sees it; ctime covers chown and chmod too.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    len: u64,
    dev: u64,
    ino: u64,
    uid: u32,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            len: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            uid: m.uid(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// What a parsed variable costs the agent: the `Var`, its name and stored value (with
/// recipients), and their allocations.
fn var_cost(v: &Var) -> usize {
    let stored = match &v.kind {
        ValueKind::Plain(p) => p.capacity() + 2 * size_of::<usize>(),
        ValueKind::V1 { token, recipients } => {
            token.capacity() + size_of_val(recipients.as_slice()) + ALLOCATION_OVERHEAD
        }
        ValueKind::Shipyard { token, .. } => token.capacity(),
        ValueKind::Invalid(reason) => reason.capacity(),
    };
    size_of::<Var>() + v.name.capacity() + stored + 2 * ALLOCATION_OVERHEAD
}

impl EnvEntry {
    /// An entry of plain values, for tests of what is built on the index.
    #[cfg(test)]
    pub(crate) fn plain_for_test(path: &str, vars: &[(&str, &str)]) -> Self {
        let ledger = Ledger::default();
        Self {
            path: path.into(),
            task_dir: "/t".into(),
            job_id: None,
            task_id: None,
            owner_uid: 1000,
            task_owner: 1000,
            vars: vars
                .iter()
                .map(|(name, value)| Var {
                    name: (*name).to_owned(),
                    kind: ValueKind::Plain(Arc::new(Zeroizing::new((*value).to_owned()))),
                    cache: Mutex::new(None),
                })
                .collect(),
            refused: None,
            skipped: Vec::new(),
            stamp: FileStamp {
                len: 0,
                dev: 0,
                ino: 0,
                uid: 1000,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            caps: FileCaps::from_limits(&crate::config::Limits::default()),
            bytes: ledger.free_charge(),
            memory: ledger.free_charge(),
        }
    }

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
pub(crate) struct Tasks {
    inner: RwLock<Index>,
    /// Env files whose writer closed them (or renamed them into place) since they last changed.
    writers_done: Mutex<HashSet<PathBuf>>,
    /// Per-uid memory: entries and cached values are charged here (shared with the server,
    /// which charges responses being written).
    memory: Arc<Ledger>,
    /// Per-uid bytes of env files read.
    env_bytes: Arc<Ledger>,
    /// Per-uid pace of reads, so one uid changing its files in a loop cannot keep the
    /// lifecycle thread from everyone else's.
    reads: ReadPace,
}

/// Both views under one lock so they never disagree; the per-task view makes a request's
/// lookup independent of how many tasks the node runs.
/// `by_owner` counts, per uid, its files in each task directory, so finding a caller's tasks
/// costs what that caller has, not what the node holds.
#[derive(Default)]
struct Index {
    files: BTreeMap<PathBuf, Arc<EnvEntry>>,
    by_task: HashMap<PathBuf, BTreeMap<PathBuf, Arc<EnvEntry>>>,
    by_owner: HashMap<u32, BTreeMap<PathBuf, usize>>,
}

impl Index {
    fn insert(&mut self, entry: Arc<EnvEntry>) {
        self.remove(&entry.path);
        self.by_task
            .entry(entry.task_dir.clone())
            .or_default()
            .insert(entry.path.clone(), entry.clone());
        *self
            .by_owner
            .entry(entry.owner_uid)
            .or_default()
            .entry(entry.task_dir.clone())
            .or_default() += 1;
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
        if let Some(dirs) = self.by_owner.get_mut(&old.owner_uid) {
            if let Some(n) = dirs.get_mut(&old.task_dir) {
                *n -= 1;
                if *n == 0 {
                    dirs.remove(&old.task_dir);
                }
            }
            if dirs.is_empty() {
                self.by_owner.remove(&old.owner_uid);
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
    /// Changed, but its owner has read its bucket empty (`limits.env_read_bytes_per_sec_per_uid`):
    /// kept as it was, retried like an unsettled file, and then read as it is by then.
    Deferred,
    /// Unparseable: forgotten until it changes.
    Invalid(String),
    /// Over a cap: kept as refused (its task answers the reason) until it changes or fits.
    Refused(OverCap),
}

impl Tasks {
    /// An empty registry charging entries and cached values to `memory`.
    pub(crate) fn new(memory: Arc<Ledger>) -> Self {
        Self {
            inner: RwLock::default(),
            writers_done: Mutex::default(),
            memory,
            env_bytes: Arc::default(),
            reads: ReadPace::default(),
        }
    }

    /// How much the owners of the files known below `dir` have read lately (the most of any):
    /// a scan walks quiet owners' directories first.
    pub(crate) fn read_pressure_under(&self, dir: &Path, pace: &Pace<'_>) -> u128 {
        let owners: HashSet<u32> = self
            .read()
            .files
            .range(dir.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .map(|(_, e)| e.owner_uid)
            .collect();
        let now = (pace.now)();
        owners
            .into_iter()
            .map(|uid| self.reads.pressure(uid, pace.bytes_per_sec, now))
            .max()
            .unwrap_or(0)
    }

    /// How much `uid` has read lately.
    pub(crate) fn read_pressure(&self, uid: u32, pace: &Pace<'_>) -> u128 {
        self.reads.pressure(uid, pace.bytes_per_sec, (pace.now)())
    }

    /// Whether `known`, read from a file that has not changed since, can stay as it is: loaded
    /// under the same caps, or refused for a reason that still holds.
    fn still_current(&self, known: &EnvEntry, caps: &FileCaps) -> bool {
        if known.caps != *caps {
            return false;
        }
        let Some((account, need)) = known.refused.as_ref().and_then(OverCap::per_uid_need) else {
            return true;
        };
        let uid = known.owner_uid;
        let fits = match account {
            PerUid::EnvBytes => {
                self.env_bytes.used(uid).saturating_add(need) as u64 <= caps.max_env_bytes_per_uid
            }
            PerUid::Memory => {
                self.memory.used(uid).saturating_add(need) <= caps.memory_budget_per_uid
            }
        };
        !fits
    }

    /// Keep `path` as refused for `why`, replacing what was known of it.
    fn refuse(
        &self,
        path: PathBuf,
        task: super::layout::TaskIdentity,
        meta: &std::fs::Metadata,
        caps: &FileCaps,
        why: OverCap,
    ) -> FileUpdate {
        self.writers().remove(&path);
        let entry = Arc::new(EnvEntry {
            path,
            task_dir: task.task_dir,
            job_id: task.job_id,
            task_id: Some(task.task_id),
            owner_uid: meta.uid(),
            task_owner: task.owner,
            vars: Vec::new(),
            refused: Some(why.clone()),
            skipped: Vec::new(),
            stamp: FileStamp::of(meta),
            caps: *caps,
            bytes: self.env_bytes.free_charge(),
            memory: self.memory.free_charge(),
        });
        self.write().insert(entry);
        FileUpdate::Refused(why)
    }

    /// (Re)read an env file the layout walk found and opened, at its owner's `pace`. `clock`
    /// tells the time once the file has been read: a time taken earlier could be older than a
    /// write made meanwhile, and that file would look settled.
    pub(crate) fn update_file(
        &self,
        found: FoundFile,
        classifier: &Classifier<'_>,
        caps: &FileCaps,
        pace: &Pace<'_>,
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
        if known.as_ref().is_some_and(|e| {
            e.stamp == FileStamp::of(&meta)
                && e.task_owner == task.owner
                && self.still_current(e, caps)
        }) {
            return FileUpdate::Unchanged;
        }
        let uid = meta.uid();
        let now = (pace.now)();
        if !pace.unpaced && !self.reads.may_read(uid, pace.bytes_per_sec, now) {
            return FileUpdate::Deferred;
        }
        // Charged before reading, whatever the outcome: a refused or unparseable file costs
        // its read too (one over the size cap is refused unread).
        if meta.len() <= caps.max_file_bytes {
            self.reads.spend(uid, meta.len(), pace.bytes_per_sec, now);
        }
        // What the entry being replaced gives back once it goes: its successor may use it.
        let (bytes_credit, memory_credit) = known
            .as_ref()
            .filter(|e| e.owner_uid == uid)
            .map_or((0, 0), |e| (e.bytes.bytes(), e.memory.bytes()));
        drop(known);
        let bytes = match read_env_file(&mut file, &meta, caps.max_file_bytes) {
            Ok(b) => b,
            Err(Unreadable::Over(why)) => return self.refuse(path, task, &meta, caps, why),
            Err(Unreadable::Io(e)) => {
                self.remove(&path);
                return FileUpdate::Invalid(e.to_string());
            }
        };
        let bytes_charge = match self.env_bytes.try_charge(
            uid,
            bytes.len(),
            caps.max_env_bytes_per_uid as usize,
            bytes_credit,
        ) {
            Ok(c) => c,
            Err(over) => {
                let why = OverCap::EnvBytesPerUid {
                    uid,
                    wanted: over.wanted as u64,
                    total: (over.used + over.wanted) as u64,
                    max: caps.max_env_bytes_per_uid,
                };
                return self.refuse(path, task, &meta, caps, why);
            }
        };
        let max_lines = caps.max_vars.saturating_mul(LINES_PER_VAR);
        if lines_in(&bytes) > max_lines {
            let why = OverCap::Lines { max: max_lines };
            return self.refuse(path, task, &meta, caps, why);
        }
        if candidate_var_lines(&bytes) > caps.max_vars {
            let why = OverCap::Vars { max: caps.max_vars };
            return self.refuse(path, task, &meta, caps, why);
        }
        let parsed = match EnvFile::parse_bytes_vars_only(&bytes) {
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
        if let Some((name, value)) = parsed
            .vars()
            .find(|(_, value)| value.len() > caps.max_value_bytes)
        {
            let why = OverCap::ValueBytes {
                name: shown_name(name),
                len: value.len(),
                max: caps.max_value_bytes,
            };
            return self.refuse(path, task, &meta, caps, why);
        }
        let mut vars = Vec::with_capacity(parsed.vars().count());
        vars.extend(parsed.vars().map(|(name, value)| Var {
            name: name.to_owned(),
            kind: classifier.classify(name, value),
            cache: Mutex::new(None),
        }));
        let skipped = skipped_report(&parsed, &path);
        drop(parsed);
        drop(bytes);
        // The candidate count bounds this for the grammar as it is; checked again on what the
        // parser really made, so a grammar change cannot lift the cap.
        if vars.len() > caps.max_vars {
            let why = OverCap::Vars { max: caps.max_vars };
            return self.refuse(path, task, &meta, caps, why);
        }
        let cost = size_of::<EnvEntry>()
            + path.as_os_str().len()
            + task.task_dir.as_os_str().len()
            + vars.iter().map(var_cost).sum::<usize>();
        let memory_charge =
            match self
                .memory
                .try_charge(uid, cost, caps.memory_budget_per_uid, memory_credit)
            {
                Ok(c) => c,
                Err(over) => {
                    drop(vars);
                    let why = OverCap::MemoryBudget {
                        uid,
                        wanted: over.wanted,
                        total: over.used + over.wanted,
                        max: caps.memory_budget_per_uid,
                    };
                    return self.refuse(path, task, &meta, caps, why);
                }
            };
        self.writers().remove(&path);
        let n = vars.len();
        let entry = Arc::new(EnvEntry {
            path,
            task_dir: task.task_dir,
            job_id: task.job_id,
            task_id: Some(task.task_id),
            owner_uid: uid,
            task_owner: task.owner,
            vars,
            refused: None,
            skipped,
            stamp: FileStamp::of(&meta),
            caps: *caps,
            bytes: bytes_charge,
            memory: memory_charge,
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

    /// Distinct task directories whose files `uid` owns, in path order.
    pub(crate) fn task_dirs_owned_by(&self, uid: u32) -> Vec<PathBuf> {
        self.read()
            .by_owner
            .get(&uid)
            .map(|dirs| dirs.keys().cloned().collect())
            .unwrap_or_default()
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
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    fn caps() -> FileCaps {
        FileCaps::from_limits(&crate::config::Limits::default())
    }

    /// Reads at the default rate, each a minute after the one before: never deferred.
    fn unhurried() -> Pace<'static> {
        static NEXT: Mutex<Option<Instant>> = Mutex::new(None);
        Pace {
            bytes_per_sec: crate::config::Limits::default().env_read_bytes_per_sec_per_uid,
            now: &|| {
                let mut next = NEXT.lock().unwrap();
                let now = next.map_or_else(Instant::now, |t| t + Duration::from_secs(60));
                *next = Some(now);
                now
            },
            unpaced: false,
        }
    }

    #[test]
    fn an_unterminated_file_is_served_only_once_it_settles_by_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("job/job-1/t1/wd");
        std::fs::create_dir_all(&task).unwrap();
        let file = task.join("nodeseal.env");
        std::fs::write(&file, "A=1\nB=half-writ").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let tasks = Tasks::new(Arc::default());
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
        let update = |d| tasks.update_file(found(), &classifier, &caps(), &unhurried(), &at(d));
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
        let update2 = |d| tasks.update_file(found(), &classifier, &caps(), &unhurried(), &at2(d));
        assert_eq!(update2(SETTLE), FileUpdate::Unsettled);
        assert_eq!(update2(UNTERMINATED_GRACE), FileUpdate::Loaded { vars: 2 });
    }

    /// A settled env file `content` in task `t` of a temp tree, and a way to present it to the
    /// index as the layout walk would.
    struct Fixture {
        _dir: tempfile::TempDir,
        tasks: Tasks,
        memory: Arc<Ledger>,
        root: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let memory = Arc::new(Ledger::default());
            Self {
                root: dir.path().to_owned(),
                _dir: dir,
                tasks: Tasks::new(memory.clone()),
                memory,
            }
        }

        fn write(&self, t: &str, content: &str) -> PathBuf {
            let wd = self.root.join("job/job-1").join(t).join("wd");
            std::fs::create_dir_all(&wd).unwrap();
            let file = wd.join("nodeseal.env");
            std::fs::write(&file, content).unwrap();
            file
        }

        fn update(&self, file: &Path, caps: &FileCaps) -> FileUpdate {
            self.update_at(file, caps, &unhurried())
        }

        fn update_at(&self, file: &Path, caps: &FileCaps, pace: &Pace<'_>) -> FileUpdate {
            let task_dir = file.parent().unwrap().parent().unwrap().to_owned();
            let found = FoundFile {
                path: file.to_owned(),
                file: std::fs::File::open(file).unwrap(),
                task: TaskIdentity {
                    task_id: task_dir.file_name().unwrap().to_string_lossy().into(),
                    task_dir,
                    job_id: Some("job".into()),
                    owner: 0,
                },
            };
            let classifier = Classifier {
                legacy_names: &[],
                legacy_by_length: false,
            };
            let later = || SystemTime::now() + Duration::from_secs(60);
            self.tasks
                .update_file(found, &classifier, caps, pace, &later)
        }
    }

    fn refused_naming(update: FileUpdate, cap: &str) -> OverCap {
        match update {
            FileUpdate::Refused(why) => {
                assert!(why.to_string().contains(cap), "{why}");
                why
            }
            other => panic!("expected a refusal naming {cap}, got {other:?}"),
        }
    }

    #[test]
    fn each_per_file_cap_refuses_the_file_naming_it_once() {
        let f = Fixture::new();
        let many: String = (0..11).map(|i| format!("V{i}=x\n")).collect();
        for (content, caps, cap) in [
            (
                "A=12345678\n".to_owned(),
                FileCaps {
                    max_file_bytes: 8,
                    ..caps()
                },
                "limits.max_env_file_bytes",
            ),
            (
                many,
                FileCaps {
                    max_vars: 10,
                    ..caps()
                },
                "limits.max_vars_per_file",
            ),
            (
                "A=1\nBIG=123456\n".to_owned(),
                FileCaps {
                    max_value_bytes: 5,
                    ..caps()
                },
                "limits.max_value_bytes",
            ),
        ] {
            let file = f.write("t", &content);
            let why = refused_naming(f.update(&file, &caps), cap);
            // Kept, so the task answers the reason; not read (nor logged) again unchanged.
            let entries = f.tasks.entries_of(file.parent().unwrap().parent().unwrap());
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].refused.as_ref(), Some(&why));
            assert!(entries[0].vars.is_empty());
            assert_eq!(f.update(&file, &caps), FileUpdate::Unchanged);
            // Under the default caps (a reload raising them) it is read again and loads.
            assert!(matches!(
                f.update(&file, &self::caps()),
                FileUpdate::Loaded { .. }
            ));
            assert!(f.tasks.remove(&file));
        }
        // Ten variables and comments under a cap of ten: comments and blanks do not count.
        let file = f.write("t", &format!("# c\n\n{}", "A=1\n".repeat(10)));
        let caps = FileCaps {
            max_vars: 10,
            ..caps()
        };
        assert_eq!(f.update(&file, &caps), FileUpdate::Loaded { vars: 10 });
    }

    #[test]
    fn a_uid_over_its_env_bytes_is_refused_until_its_other_files_shrink() {
        let f = Fixture::new();
        let caps = FileCaps {
            max_env_bytes_per_uid: 100,
            ..caps()
        };
        let a = f.write("a", &format!("A={}\n", "x".repeat(60)));
        let b = f.write("b", &format!("B={}\n", "y".repeat(60)));
        assert_eq!(f.update(&a, &caps), FileUpdate::Loaded { vars: 1 });
        refused_naming(f.update(&b, &caps), "limits.max_env_bytes_per_uid");
        assert_eq!(f.update(&b, &caps), FileUpdate::Unchanged);
        // The same file rewritten pays with what its old entry gives back.
        std::fs::write(&a, format!("A={}\n", "z".repeat(90))).unwrap();
        assert_eq!(f.update(&a, &caps), FileUpdate::Loaded { vars: 1 });
        // Once the other file goes, the refused one fits and is read again, unchanged.
        assert!(f.tasks.remove(&a));
        assert_eq!(f.update(&b, &caps), FileUpdate::Loaded { vars: 1 });
    }

    #[test]
    fn parsed_files_are_charged_to_the_memory_budget_and_given_back() {
        let f = Fixture::new();
        let content: String = (0..1000).map(|i| format!("N{i}=v\n")).collect();
        let file = f.write("t", &content);
        assert_eq!(f.update(&file, &caps()), FileUpdate::Loaded { vars: 1000 });
        let uid = std::fs::metadata(&file).unwrap().uid();
        let charged = f.memory.used(uid);
        // Each tiny variable costs the agent far more than its 6 bytes in the file.
        assert!(charged > 1000 * size_of::<Var>(), "{charged}");
        assert!(f.tasks.remove(&file));
        assert_eq!(f.memory.used(uid), 0);
        let small = FileCaps {
            memory_budget_per_uid: charged - 1,
            ..caps()
        };
        refused_naming(f.update(&file, &small), "limits.memory_budget_per_uid");
        assert_eq!(f.memory.used(uid), 0);
        assert_eq!(f.update(&file, &small), FileUpdate::Unchanged);
    }

    #[test]
    fn a_uid_changing_its_file_in_a_loop_is_read_at_its_pace_and_others_are_not_held_up() {
        let f = Fixture::new();
        let t0 = Instant::now();
        let clock = Mutex::new(t0);
        let now = || *clock.lock().unwrap();
        let set = |ms: u64| *clock.lock().unwrap() = t0 + Duration::from_millis(ms);
        let pace = Pace {
            bytes_per_sec: 1000,
            now: &now,
            unpaced: false,
        };
        let big = f.write("big", &format!("A={}\n", "x".repeat(2997)));
        let other = f.write("other", "B=1\n");
        assert_eq!(
            f.update_at(&big, &caps(), &pace),
            FileUpdate::Loaded { vars: 1 }
        );
        // Touched (mtime and ctime change): 3000 bytes read, 1000 a second, so 2 s of debt.
        let touch = || {
            let t = std::fs::File::options().write(true).open(&big).unwrap();
            t.set_modified(SystemTime::now() - Duration::from_secs(3))
                .unwrap();
        };
        touch();
        assert_eq!(f.update_at(&big, &caps(), &pace), FileUpdate::Deferred);
        // Still served as it was meanwhile.
        let entries = f.tasks.entries_of(big.parent().unwrap().parent().unwrap());
        assert_eq!(entries[0].vars.len(), 1);
        // The same uid's other file waits too (the budget is the uid's); a bare stat is free.
        std::fs::write(&other, "B=2\n").unwrap();
        assert_eq!(f.update_at(&other, &caps(), &pace), FileUpdate::Deferred);
        set(1999);
        assert_eq!(f.update_at(&big, &caps(), &pace), FileUpdate::Deferred);
        // Paid back: read as it is now, so the last change is never lost.
        std::fs::write(&big, format!("A={}\nC=3\n", "y".repeat(2993))).unwrap();
        set(2001);
        assert_eq!(
            f.update_at(&big, &caps(), &pace),
            FileUpdate::Loaded { vars: 2 }
        );
        set(5002);
        assert_eq!(
            f.update_at(&other, &caps(), &pace),
            FileUpdate::Loaded { vars: 1 }
        );
        // Another uid's pace is its own; quiet owners' directories are put first.
        let uid = std::fs::metadata(&big).unwrap().uid();
        assert!(f.tasks.read_pressure(uid, &pace) > f.tasks.read_pressure(uid + 1, &pace));
        assert!(
            f.tasks
                .read_pressure_under(&f.root.join("job/job-1/big"), &pace)
                > f.tasks
                    .read_pressure_under(&f.root.join("job/job-1/nobody"), &pace)
        );
        // The first load is never deferred (READY holds every file), but is charged.
        touch();
        let first_load = Pace {
            unpaced: true,
            ..pace
        };
        assert_eq!(
            f.update_at(&big, &caps(), &first_load),
            FileUpdate::Loaded { vars: 2 }
        );
        touch();
        assert_eq!(f.update_at(&big, &caps(), &pace), FileUpdate::Deferred);
    }
}
