//! The in-memory certificate store: private keys by thumbprint, loaded from key sources,
//! reloaded when their files change, withdrawn and restored without a restart.
//!
//! Each key file is tracked by path so a rescan of one source replaces exactly that source's
//! keys. A thumbprint is usable when some file provides it and it is not revoked; the same key
//! may arrive from several places (a Batch drop and its ingested copy) and stays usable while any
//! remains.

use super::sources::SourceId;
use super::trust::{self, FileStamp, Probe};
use crate::config::{KeySource, KeySourceKind};
use crate::report::{KeyState, KeyStatus};
use nodeseal_envelope::{KeyError, KeyPair, Thumbprint};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

/// A loaded key and where it came from.
pub(crate) struct KeyEntry {
    /// The key pair.
    pub pair: Arc<KeyPair>,
    /// The file it was loaded from.
    pub origin: PathBuf,
    /// Source kind, for status.
    pub kind: KeySourceKind,
    /// The Key Vault certificate version its file name carries (`<vault>.<cert>.<version>`).
    pub version: Option<String>,
}

/// What happened to one key file on its last load.
enum FileState {
    Loaded(Arc<KeyEntry>),
    /// Not loadable yet for a reason expected to pass (e.g. the `.pw` has not arrived).
    Pending(String),
    Broken(String),
    /// The Key Vault extension's latest-version link, naming this version file beside it.
    Latest(PathBuf),
}

/// Cheap change detection so a rescan only re-parses files that changed; taken from the fds the
/// files are read through (or, for a refused file, from what is at its path).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    file: FileStamp,
    /// The companion file (`.pw`, `.crt`, passphrase file) counts too: a rotated password must
    /// trigger a reload.
    companion: Option<FileStamp>,
}

struct Tracked {
    source: SourceId,
    stamp: Option<Stamp>,
    state: FileState,
}

/// Why a key cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// Withdrawn by the revocation list or `revoke`.
    Revoked,
    /// No file provides it.
    Missing,
}

#[derive(Default)]
struct Inner {
    files: BTreeMap<PathBuf, Tracked>,
    by_thumbprint: HashMap<Thumbprint, Arc<KeyEntry>>,
    revoked_by_list: HashSet<Thumbprint>,
    revoked_by_command: HashSet<Thumbprint>,
    /// Keys that stay in Key Vault, as its last checks found them (`crate::keyvault`).
    remote: Vec<KeyStatus>,
    remote_withdrawn: HashSet<Thumbprint>,
}

impl Inner {
    fn reindex(&mut self) {
        let mut index = HashMap::new();
        for t in self.files.values() {
            if let FileState::Loaded(e) = &t.state {
                index
                    .entry(e.pair.thumbprint())
                    .or_insert_with(|| e.clone());
            }
        }
        self.by_thumbprint = index;
    }

    fn is_revoked(&self, tp: &Thumbprint) -> bool {
        self.revoked_by_list.contains(tp)
            || self.revoked_by_command.contains(tp)
            || self.remote_withdrawn.contains(tp)
    }
}

/// The store. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Default)]
pub(crate) struct KeyStore {
    inner: RwLock<Inner>,
    opened: RwLock<HashMap<Thumbprint, Arc<AtomicU64>>>,
}

/// What a rescan changed, so callers can log and evict caches.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// Thumbprints that became usable.
    pub added: Vec<Thumbprint>,
    /// Thumbprints that stopped being usable.
    pub removed: Vec<Thumbprint>,
}

impl Changes {
    /// Fold `other` into these changes.
    pub(crate) fn merge(&mut self, other: Changes) {
        self.added.extend(other.added);
        self.removed.extend(other.removed);
    }
}

impl KeyStore {
    /// An empty store.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A usable key by thumbprint.
    pub(crate) fn get(&self, tp: &Thumbprint) -> Result<Arc<KeyPair>, Unavailable> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if inner.is_revoked(tp) {
            return Err(Unavailable::Revoked);
        }
        inner
            .by_thumbprint
            .get(tp)
            .map(|e| e.pair.clone())
            .ok_or(Unavailable::Missing)
    }

    /// Usable keys whose modulus is `len` bytes (candidates for a legacy ciphertext).
    pub(crate) fn with_modulus_len(&self, len: usize) -> Vec<Arc<KeyPair>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<_> = inner
            .by_thumbprint
            .values()
            .filter(|e| e.pair.modulus_len() == len && !inner.is_revoked(&e.pair.thumbprint()))
            .map(|e| e.pair.clone())
            .collect();
        keys.sort_by_key(|k| k.thumbprint());
        keys
    }

    /// Number of usable keys (remote ones included).
    pub(crate) fn usable_count(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let remote = inner
            .remote
            .iter()
            .filter(|r| r.state == KeyState::Loaded)
            .count();
        inner
            .by_thumbprint
            .keys()
            .filter(|tp| !inner.is_revoked(tp))
            .count()
            + remote
    }

    /// What Key Vault's last checks found about the keys that stay there: their `status` rows;
    /// a row not `loaded` withdraws that thumbprint (cached values of it are not served).
    pub(crate) fn set_remote(&self, rows: Vec<KeyStatus>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.remote_withdrawn = rows
            .iter()
            .filter(|r| r.state != KeyState::Loaded)
            .filter_map(|r| r.thumbprint.as_deref())
            .filter_map(|t| Thumbprint::from_hex(t).ok())
            .collect();
        inner.remote = rows;
    }

    /// Count a successful open, for status.
    pub(crate) fn count_open(&self, tp: &Thumbprint) {
        if let Some(c) = self
            .opened
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tp)
        {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.opened
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*tp)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    fn usable_set(inner: &Inner) -> HashSet<Thumbprint> {
        inner
            .by_thumbprint
            .keys()
            .filter(|tp| !inner.is_revoked(tp))
            .copied()
            .collect()
    }

    fn mutate(&self, f: impl FnOnce(&mut Inner)) -> Changes {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let before = Self::usable_set(&inner);
        f(&mut inner);
        inner.reindex();
        let after = Self::usable_set(&inner);
        let mut changes = Changes {
            added: after.difference(&before).copied().collect(),
            removed: before.difference(&after).copied().collect(),
        };
        changes.added.sort();
        changes.removed.sort();
        changes
    }

    /// Replace the revocation-list set.
    pub(crate) fn set_revocation_list(&self, list: HashSet<Thumbprint>) -> Changes {
        self.mutate(|i| i.revoked_by_list = list)
    }

    /// Revoke (`true`) or restore (`false`) by command.
    pub(crate) fn set_revoked_by_command(&self, tp: Thumbprint, revoked: bool) -> Changes {
        self.mutate(|i| {
            if revoked {
                i.revoked_by_command.insert(tp);
            } else {
                i.revoked_by_command.remove(&tp);
            }
        })
    }

    /// Thumbprints revoked by command (persisted by the caller).
    pub(crate) fn revoked_by_command(&self) -> Vec<Thumbprint> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = inner.revoked_by_command.iter().copied().collect();
        v.sort();
        v
    }

    /// Whether `tp` is currently revoked (by list or command).
    pub(crate) fn is_revoked(&self, tp: &Thumbprint) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(tp)
    }

    /// Rescan `source`: re-parse new or changed files, forget vanished ones. Each file that
    /// fails is logged with its path and reason and recorded for `status`; the rest load.
    pub(crate) fn rescan_source(&self, source: &KeySource) -> Changes {
        let id = SourceId::of(source);
        // Parse outside the lock: PKCS#12 key derivation takes milliseconds per file.
        let previous: HashMap<PathBuf, Option<Stamp>> = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            inner
                .files
                .iter()
                .filter(|(_, t)| t.source == id)
                .map(|(p, t)| (p.clone(), t.stamp))
                .collect()
        };
        match trust::probe_dir(&source.path) {
            trust::DirProbe::Trusted => {}
            trust::DirProbe::Missing => {
                return self.mutate(|inner| inner.files.retain(|_, t| t.source != id));
            }
            trust::DirProbe::Refused(reason, stamp) => {
                // One row for the directory; none of its files is even opened.
                let stamp = stamp.map(|file| Stamp {
                    file,
                    companion: None,
                });
                let unchanged = stamp.is_some() && previous.get(&source.path) == Some(&stamp);
                if !unchanged {
                    let message =
                        crate::logging::about_file("key source refused", &source.path, &reason);
                    tracing::warn!(path = %source.path.display(), %reason, message = %message);
                }
                let path = source.path.clone();
                return self.mutate(|inner| {
                    inner
                        .files
                        .retain(|p, t| t.source != id || (unchanged && *p == path));
                    if !unchanged {
                        inner.files.insert(
                            path,
                            Tracked {
                                source: id.clone(),
                                stamp,
                                state: FileState::Broken(reason),
                            },
                        );
                    }
                });
            }
        }
        let candidates = list_candidates(source);
        let mut unchanged: HashSet<PathBuf> = HashSet::new();
        let mut changed: Vec<(&Candidate, Option<Stamp>, Probed)> = Vec::new();
        for cand in &candidates {
            let probes = Probed::of(&source.path, cand);
            let Some(stamp) = probes.stamp() else {
                continue; // gone since the listing
            };
            let stamp = Some(stamp);
            if previous.get(&cand.path) == Some(&stamp) {
                unchanged.insert(cand.path.clone());
            } else {
                changed.push((cand, stamp, probes));
            }
        }
        // Serial on purpose: with OpenSSL 3.0, PKCS#12 parsing on two threads takes as long as
        // on one (its algorithm fetches contend on global locks; examples/pfx_timing.rs in the
        // envelope crate measures it), so threads would only add complexity.
        let mut fresh: Vec<(PathBuf, Tracked)> = Vec::new();
        for (cand, stamp, probes) in changed {
            let state = match probes {
                Probed::Key(probes) => load_candidate(source, cand, probes),
                Probed::Link(link) => latest_link_state(&cand.path, link),
            };
            match &state {
                FileState::Loaded(e) => tracing::info!(
                    key_id = %e.pair.thumbprint(),
                    path = %cand.path.display(),
                    bits = e.pair.bits(),
                    kind = kind_name(e.kind),
                    version = e.version.as_deref().unwrap_or("-"),
                    "key loaded"
                ),
                FileState::Latest(target) => tracing::info!(
                    path = %cand.path.display(),
                    target = %target.display(),
                    "Key Vault latest-version link"
                ),
                FileState::Broken(reason) if cand.latest_link => {
                    tracing::warn!(path = %cand.path.display(), %reason, "Key Vault link refused")
                }
                FileState::Pending(reason) => {
                    tracing::info!(path = %cand.path.display(), %reason, "key pending")
                }
                FileState::Broken(reason) => {
                    // The file and the reason in MESSAGE itself: `systemctl status` shows only it.
                    let message =
                        crate::logging::about_file("key file skipped", &cand.path, reason);
                    tracing::warn!(path = %cand.path.display(), %reason, message = %message)
                }
            }
            fresh.push((
                cand.path.clone(),
                Tracked {
                    source: id.clone(),
                    stamp,
                    state,
                },
            ));
        }
        self.mutate(|inner| {
            inner
                .files
                .retain(|p, t| t.source != id || unchanged.contains(p));
            for (p, t) in fresh {
                inner.files.insert(p, t);
            }
        })
    }

    /// Track `path` (with its `companion`) as `source`'s copy of an already parsed key: the
    /// store copy written at ingest, so it is not parsed a second time.
    pub(crate) fn adopt(
        &self,
        source: &SourceId,
        path: &Path,
        companion: &Path,
        pair: Arc<KeyPair>,
    ) -> Changes {
        let stamp = Probes {
            file: trust::probe(path),
            companion: Some(trust::probe(companion)),
        }
        .stamp();
        let entry = Arc::new(KeyEntry {
            pair,
            origin: path.to_owned(),
            kind: source.kind,
            version: None,
        });
        self.mutate(|inner| {
            inner.files.insert(
                path.to_owned(),
                Tracked {
                    source: source.clone(),
                    stamp,
                    state: FileState::Loaded(entry),
                },
            );
        })
    }

    /// Forget every file of sources not in `current` (after a config reload changed the list).
    pub(crate) fn retain_sources(&self, current: &[SourceId]) -> Changes {
        self.mutate(|inner| inner.files.retain(|_, t| current.contains(&t.source)))
    }

    /// Rows for `status` and `keys`, loaded keys first, by thumbprint.
    pub(crate) fn status(&self) -> Vec<KeyStatus> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let opened = self.opened.read().unwrap_or_else(|e| e.into_inner());
        // A good latest-version link is no row of its own: it marks the version it names.
        let latest: HashSet<&PathBuf> = inner
            .files
            .values()
            .filter_map(|t| match &t.state {
                FileState::Latest(target) => Some(target),
                _ => None,
            })
            .collect();
        let mut rows: Vec<KeyStatus> = inner
            .files
            .iter()
            .filter_map(|(path, t)| match &t.state {
                FileState::Latest(_) => None,
                FileState::Loaded(e) => {
                    let tp = e.pair.thumbprint();
                    Some(KeyStatus {
                        thumbprint: Some(tp.to_string()),
                        source: path.display().to_string(),
                        kind: kind_name(e.kind).to_owned(),
                        bits: Some(e.pair.bits()),
                        not_after: Some(e.pair.not_after_unix()),
                        state: if inner.is_revoked(&tp) {
                            KeyState::Revoked
                        } else {
                            KeyState::Loaded
                        },
                        reason: None,
                        opened: opened.get(&tp).map_or(0, |c| c.load(Ordering::Relaxed)),
                        version: e.version.clone(),
                        latest: latest.contains(path),
                    })
                }
                FileState::Pending(reason) | FileState::Broken(reason) => Some(KeyStatus {
                    thumbprint: None,
                    source: path.display().to_string(),
                    kind: String::new(),
                    bits: None,
                    not_after: None,
                    state: if matches!(t.state, FileState::Pending(_)) {
                        KeyState::Pending
                    } else {
                        KeyState::Broken
                    },
                    reason: Some(reason.clone()),
                    opened: 0,
                    version: None,
                    latest: false,
                }),
            })
            .collect();
        rows.extend(inner.remote.iter().cloned().map(|mut r| {
            r.opened = r
                .thumbprint
                .as_deref()
                .and_then(|t| Thumbprint::from_hex(t).ok())
                .and_then(|tp| opened.get(&tp))
                .map_or(0, |c| c.load(Ordering::Relaxed));
            r
        }));
        // A revoked thumbprint with no file left still deserves a row: operators look for it.
        for tp in inner
            .revoked_by_list
            .iter()
            .chain(inner.revoked_by_command.iter())
        {
            if !inner.by_thumbprint.contains_key(tp)
                && !rows
                    .iter()
                    .any(|r| r.thumbprint.as_deref() == Some(&tp.to_string()))
            {
                rows.push(KeyStatus {
                    thumbprint: Some(tp.to_string()),
                    source: String::new(),
                    kind: String::new(),
                    bits: None,
                    not_after: None,
                    state: KeyState::Revoked,
                    reason: Some("revoked; no key file present".into()),
                    opened: 0,
                    version: None,
                    latest: false,
                });
            }
        }
        rows.sort_by(|a, b| {
            (a.state != KeyState::Loaded, &a.thumbprint)
                .cmp(&(b.state != KeyState::Loaded, &b.thumbprint))
        });
        rows
    }

    /// Every loaded entry (for ingest and expiry warnings).
    pub(crate) fn loaded_entries(&self) -> Vec<Arc<KeyEntry>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .files
            .values()
            .filter_map(|t| match &t.state {
                FileState::Loaded(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A file that may hold a key, with the companion file it needs.
pub(crate) struct Candidate {
    pub path: PathBuf,
    /// `.pw` for Batch PFX drops, `.crt` for waagent pairs.
    pub companion: Option<PathBuf>,
    /// Thumbprint the file name claims, checked against the certificate.
    pub claimed: Option<Thumbprint>,
    /// Key Vault: the certificate version the name carries.
    pub version: Option<String>,
    /// Key Vault: the extension's `<vault>.<certificate>` link to the latest version.
    pub latest_link: bool,
}

pub(crate) fn kind_name(kind: KeySourceKind) -> &'static str {
    match kind {
        KeySourceKind::BatchCerts => "batch_certs",
        KeySourceKind::Keyvault => "keyvault",
        KeySourceKind::Waagent => "waagent",
        KeySourceKind::KeyDir => "key_dir",
    }
}

/// Parse `sha1-<hex>.pfx` (any case) into the claimed thumbprint.
pub(crate) fn batch_pfx_thumbprint(name: &str) -> Option<Thumbprint> {
    let lower = name.to_ascii_lowercase();
    let hex = lower.strip_prefix("sha1-")?.strip_suffix(".pfx")?;
    Thumbprint::from_hex(hex).ok()
}

fn is_temp_or_hidden(name: &str) -> bool {
    name.starts_with('.') || name.ends_with('~') || name.ends_with(".tmp")
}

pub(crate) fn list_candidates(source: &KeySource) -> Vec<Candidate> {
    let Ok(dir) = fs::read_dir(&source.path) else {
        return Vec::new();
    };
    // Everything but directories is a candidate, links and FIFOs included, so that one planted
    // under a key's name shows up in `status` as refused instead of being silently skipped.
    // The Key Vault extension's own `<vault>.<certificate>` links are resolved, not opened.
    let mut links: HashSet<String> = HashSet::new();
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let t = e.file_type().ok()?;
            let name = e.file_name().into_string().ok()?;
            if t.is_symlink() {
                links.insert(name.clone());
            }
            (!t.is_dir()).then_some(name)
        })
        .filter(|n| !is_temp_or_hidden(n))
        .collect();
    names.sort();
    let dir = &source.path;
    let mut out = Vec::new();
    for name in &names {
        let lower = name.to_ascii_lowercase();
        match source.kind {
            KeySourceKind::BatchCerts => {
                if let Some(tp) = batch_pfx_thumbprint(name) {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: Some(dir.join(format!("{name}.pw"))),
                        claimed: Some(tp),
                        version: None,
                        latest_link: false,
                    });
                }
            }
            KeySourceKind::Keyvault => {
                // One PEM (key + chain) per certificate version, `<vault>.<certificate>.<version>`,
                // and `<vault>.<certificate>` linking to the latest (older layouts: the one PEM,
                // rewritten in place). Skip obvious non-keys.
                if !(lower.ends_with(".crt") || lower.ends_with(".cer") || lower.ends_with(".pw")) {
                    let parts = trust::keyvault_name_parts(name);
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: None,
                        claimed: None,
                        version: parts.and_then(|(_, _, v)| v).map(str::to_owned),
                        latest_link: links.contains(name)
                            && parts.is_some_and(|(_, _, v)| v.is_none()),
                    });
                }
            }
            KeySourceKind::Waagent => {
                if let Some(stem) = lower.strip_suffix(".prv") {
                    let crt = names
                        .iter()
                        .find(|n| n.to_ascii_lowercase() == format!("{stem}.crt"))
                        .cloned()
                        .unwrap_or_else(|| format!("{}.crt", &name[..name.len() - 4]));
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: Some(dir.join(crt)),
                        claimed: Thumbprint::from_hex(stem).ok(),
                        version: None,
                        latest_link: false,
                    });
                }
            }
            KeySourceKind::KeyDir => {
                if lower.ends_with(".pfx") || lower.ends_with(".p12") {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: source.passphrase_file.clone(),
                        claimed: None,
                        version: None,
                        latest_link: false,
                    });
                } else if lower.ends_with(".pem") || lower.ends_with(".key") {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: None,
                        claimed: None,
                        version: None,
                        latest_link: false,
                    });
                }
            }
        }
    }
    out
}

/// What one scan found at a candidate: key files, or the Key Vault latest-version link.
enum Probed {
    Key(Probes),
    Link(trust::LinkProbe),
}

impl Probed {
    fn of(dir: &Path, cand: &Candidate) -> Self {
        match cand.path.file_name().and_then(|n| n.to_str()) {
            Some(name) if cand.latest_link => Self::Link(trust::probe_latest_link(dir, name)),
            _ => Self::Key(Probes::of(cand)),
        }
    }

    fn stamp(&self) -> Option<Stamp> {
        match self {
            Self::Key(p) => p.stamp(),
            Self::Link(l) => Some(Stamp {
                file: l.stamp?,
                companion: l.target_stamp,
            }),
        }
    }
}

/// The link names the version that is served as the file it is (loaded once, under its own
/// name); the link only marks it latest.
fn latest_link_state(path: &Path, link: trust::LinkProbe) -> FileState {
    let dir = path.parent().unwrap_or(Path::new("/"));
    match link.outcome {
        trust::LinkOutcome::Version(name) => FileState::Latest(dir.join(name)),
        trust::LinkOutcome::Dangling(reason) => FileState::Pending(reason),
        trust::LinkOutcome::Refused(reason) => FileState::Broken(reason),
    }
}

/// A candidate's files, opened (or refused) once per scan: stamped, then read, from these fds.
struct Probes {
    file: Probe,
    companion: Option<Probe>,
}

impl Probes {
    fn of(cand: &Candidate) -> Self {
        Self {
            file: trust::probe(&cand.path),
            companion: cand.companion.as_deref().map(trust::probe),
        }
    }

    /// `None` when the key file itself is gone.
    fn stamp(&self) -> Option<Stamp> {
        Some(Stamp {
            file: self.file.stamp()?,
            companion: self.companion.as_ref().and_then(Probe::stamp),
        })
    }
}

fn load_candidate(source: &KeySource, cand: &Candidate, probes: Probes) -> FileState {
    let kind = source.kind;
    let file = match probes.file {
        Probe::Open(o) => o,
        Probe::Refused(reason, _) => return FileState::Broken(reason),
        Probe::Missing => {
            return FileState::Broken(format!("{} vanished while read", cand.path.display()))
        }
    };
    let companion_path = cand.companion.as_deref().unwrap_or(Path::new(""));
    let companion = match probes.companion {
        None => None,
        Some(Probe::Open(o)) => Some(o),
        Some(Probe::Refused(reason, _)) => return FileState::Broken(reason),
        Some(Probe::Missing) => {
            return match kind {
                KeySourceKind::BatchCerts => FileState::Pending(format!(
                    "waiting for its password file {}",
                    companion_path.display()
                )),
                KeySourceKind::Waagent => FileState::Pending(format!(
                    "waiting for its certificate {}",
                    companion_path.display()
                )),
                _ => FileState::Broken(format!(
                    "cannot read passphrase file {}: it does not exist",
                    companion_path.display()
                )),
            }
        }
    };
    let result: Result<KeyPair, String> = match kind {
        KeySourceKind::BatchCerts => match companion {
            None => Err("no password file".into()),
            Some(pw) => trust::passphrase_from(pw, companion_path).and_then(|pw| {
                file.read(&cand.path).and_then(|der| {
                    KeyPair::from_pkcs12(&der, &pw, &cand.path).map_err(|e| e.to_string())
                })
            }),
        },
        KeySourceKind::Keyvault => file.read(&cand.path).and_then(|pem| {
            KeyPair::from_pem(&pem, None, None, &cand.path).map_err(|e| e.to_string())
        }),
        KeySourceKind::Waagent => match companion {
            None => Err("no certificate file".into()),
            Some(crt) => crt.read(companion_path).and_then(|crt_pem| {
                file.read(&cand.path).and_then(|pem| {
                    KeyPair::from_pem(&pem, Some(&crt_pem), None, &cand.path)
                        .map_err(|e| e.to_string())
                })
            }),
        },
        KeySourceKind::KeyDir => {
            let passphrase = match companion {
                Some(p) => match trust::passphrase_from(p, companion_path) {
                    Ok(pw) => Some(pw),
                    Err(e) => return FileState::Broken(format!("passphrase file: {e}")),
                },
                None => None,
            };
            let data = match file.read(&cand.path) {
                Ok(d) => d,
                Err(e) => return FileState::Broken(e),
            };
            match load_key_dir_file(
                &cand.path,
                &data,
                passphrase.as_deref().map(|p| p.as_slice()),
            ) {
                Ok(Some(pair)) => Ok(pair),
                Ok(None) => {
                    // A certificate beside its key: the key file picks it up as a sibling.
                    return FileState::Pending(
                        "certificate only (no private key in this file)".into(),
                    );
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(pair) => {
            if let Some(claimed) = cand.claimed {
                if claimed != pair.thumbprint() {
                    return FileState::Broken(
                        KeyError::ThumbprintMismatch {
                            path: cand.path.clone(),
                            expected: claimed,
                            actual: pair.thumbprint(),
                        }
                        .to_string(),
                    );
                }
            }
            FileState::Loaded(Arc::new(KeyEntry {
                pair: Arc::new(pair),
                origin: cand.path.clone(),
                kind,
                version: cand.version.clone(),
            }))
        }
        Err(reason) => FileState::Broken(reason),
    }
}

/// `KeyPair::load` for a `key_dir` file already read through a checked fd: PKCS#12, or a PEM
/// key with its certificate in the same file or in a sibling `.crt`, `.cer` or `.pem` (opened
/// under the same rules). `None`: a certificate-only PEM.
fn load_key_dir_file(
    path: &Path,
    data: &[u8],
    passphrase: Option<&[u8]>,
) -> Result<Option<KeyPair>, String> {
    let text = String::from_utf8_lossy(data);
    let pair = if text.contains("-----BEGIN ") {
        if !text.contains("PRIVATE KEY") {
            if text.contains("-----BEGIN CERTIFICATE") {
                return Ok(None);
            }
            return Err(KeyError::NoPrivateKey {
                path: path.to_owned(),
            }
            .to_string());
        }
        if text.contains("-----BEGIN CERTIFICATE")
            || text.contains("-----BEGIN X509 CERTIFICATE")
            || text.contains("-----BEGIN TRUSTED CERTIFICATE")
        {
            KeyPair::from_pem(data, None, passphrase, path).map_err(|e| e.to_string())?
        } else {
            let mut sibling_pem = None;
            for ext in ["crt", "cer", "pem"] {
                let sibling = path.with_extension(ext);
                if sibling == path {
                    continue;
                }
                match trust::probe(&sibling) {
                    Probe::Missing => continue,
                    Probe::Refused(reason, _) => return Err(reason),
                    Probe::Open(o) => {
                        sibling_pem = Some((sibling.clone(), o.read(&sibling)?));
                        break;
                    }
                }
            }
            let Some((sibling, cert)) = sibling_pem else {
                return Err(KeyError::NoCertificate {
                    path: path.to_owned(),
                }
                .to_string());
            };
            let cert_pem = if cert.windows(11).any(|w| w == b"-----BEGIN ") {
                cert
            } else {
                let c = openssl::x509::X509::from_der(&cert).map_err(|_| {
                    KeyError::NoCertificate {
                        path: sibling.clone(),
                    }
                    .to_string()
                })?;
                Zeroizing::new(
                    c.to_pem()
                        .map_err(|e| format!("{}: {e}", sibling.display()))?,
                )
            };
            KeyPair::from_pem(data, Some(&cert_pem), passphrase, path).map_err(|e| e.to_string())?
        }
    } else if data.first() == Some(&0x30) {
        let Some(pass) = passphrase else {
            return Err(KeyError::PassphraseRequired {
                path: path.to_owned(),
            }
            .to_string());
        };
        KeyPair::from_pkcs12(data, pass, path).map_err(|e| e.to_string())?
    } else {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            reason: "not a PKCS#12 (.pfx) file nor a PEM private key".into(),
        }
        .to_string());
    };
    // `sha1-<thumbprint>.pfx` or `<THUMBPRINT>.key`: the name claims a thumbprint.
    let claimed = path
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.strip_prefix("sha1-").unwrap_or(s))
        .and_then(|hex| Thumbprint::from_hex(hex).ok());
    if let Some(expected) = claimed {
        if expected != pair.thumbprint() {
            return Err(KeyError::ThumbprintMismatch {
                path: path.to_owned(),
                expected,
                actual: pair.thumbprint(),
            }
            .to_string());
        }
    }
    Ok(Some(pair))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const PASS: &str = "right-passphrase";

    /// A `batch_certs` dir (private, ours) holding one valid PFX, its `.pw` not yet written.
    fn drop_dir() -> (tempfile::TempDir, KeySource, PathBuf, Thumbprint) {
        let dir = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate(2048, 30, "store test").unwrap();
        let tp = pair.thumbprint();
        let pfx = dir.path().join(format!("sha1-{tp}.pfx"));
        fs::write(&pfx, pair.to_pkcs12(PASS.as_bytes(), false).unwrap()).unwrap();
        let source = KeySource {
            kind: KeySourceKind::BatchCerts,
            path: dir.path().to_owned(),
            ingest: Some(false),
            passphrase_file: None,
        };
        (dir, source, pfx, tp)
    }

    fn pw_of(pfx: &Path) -> PathBuf {
        PathBuf::from(format!("{}.pw", pfx.display()))
    }

    fn only_row(store: &KeyStore) -> KeyStatus {
        let rows = store.status();
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    }

    #[test]
    fn a_symlinked_password_file_is_refused_even_when_its_target_is_the_passphrase() {
        let (dir, source, pfx, tp) = drop_dir();
        // The oracle: the link's target holds the right passphrase; the key must still not load.
        let secret = dir.path().join(".root-only-secret");
        fs::write(&secret, PASS).unwrap();
        std::os::unix::fs::symlink(&secret, pw_of(&pfx)).unwrap();
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert_eq!(store.get(&tp).err(), Some(Unavailable::Missing));
        let row = only_row(&store);
        assert_eq!(row.state, KeyState::Broken);
        let reason = row.reason.unwrap();
        assert!(reason.contains(trust::LINK_REASON), "{reason}");
        assert!(!reason.contains(PASS), "{reason}");
        // Replaced by a regular file: picked up on the next scan.
        fs::remove_file(pw_of(&pfx)).unwrap();
        fs::write(pw_of(&pfx), PASS).unwrap();
        assert_eq!(store.rescan_source(&source).added, vec![tp]);
    }

    #[test]
    fn a_symlinked_key_file_is_refused_with_its_reason() {
        let (dir, source, pfx, tp) = drop_dir();
        fs::write(pw_of(&pfx), PASS).unwrap();
        let real = dir.path().join("elsewhere");
        fs::rename(&pfx, &real).unwrap();
        std::os::unix::fs::symlink(&real, &pfx).unwrap();
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert!(store.get(&tp).is_err());
        let row = only_row(&store);
        assert_eq!(row.state, KeyState::Broken);
        assert!(row.reason.unwrap().contains(trust::LINK_REASON));
    }

    #[test]
    fn a_fifo_password_file_is_refused_without_blocking_the_scan() {
        let (_dir, source, pfx, tp) = drop_dir();
        nix::unistd::mkfifo(
            &pw_of(&pfx),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert!(store.get(&tp).is_err());
        let reason = only_row(&store).reason.unwrap();
        assert!(reason.contains("is a FIFO"), "{reason}");
    }

    #[test]
    fn a_group_writable_key_file_or_dir_is_refused_with_the_fix_and_noticed_once_fixed() {
        let (dir, source, pfx, tp) = drop_dir();
        fs::write(pw_of(&pfx), PASS).unwrap();
        let store = KeyStore::new();
        fs::set_permissions(&pfx, fs::Permissions::from_mode(0o664)).unwrap();
        store.rescan_source(&source);
        assert!(store.get(&tp).is_err());
        let reason = only_row(&store).reason.unwrap();
        assert!(
            reason.contains(&format!("chmod go-w {}", pfx.display())),
            "{reason}"
        );
        // A chmod alone (no content change) is noticed.
        fs::set_permissions(&pfx, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.rescan_source(&source).added, vec![tp]);

        // The directory: one row for it, the key withdrawn, back once fixed.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(store.rescan_source(&source).removed, vec![tp]);
        let row = only_row(&store);
        assert_eq!(row.source, dir.path().display().to_string());
        let reason = row.reason.unwrap();
        assert!(
            reason.contains("directory") && reason.contains("chmod go-w"),
            "{reason}"
        );
        store.rescan_source(&source);
        assert_eq!(store.status().len(), 1);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(store.rescan_source(&source).added, vec![tp]);
        assert_eq!(store.status().len(), 1);
    }

    #[test]
    fn a_group_writable_passphrase_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        fs::create_dir(&keys).unwrap();
        let pair = KeyPair::generate(2048, 30, "key dir test").unwrap();
        fs::write(
            keys.join("a.pfx"),
            pair.to_pkcs12(PASS.as_bytes(), false).unwrap(),
        )
        .unwrap();
        let pass = dir.path().join("pass");
        fs::write(&pass, PASS).unwrap();
        let source = KeySource {
            kind: KeySourceKind::KeyDir,
            path: keys,
            ingest: None,
            passphrase_file: Some(pass.clone()),
        };
        let store = KeyStore::new();
        assert_eq!(store.rescan_source(&source).added, vec![pair.thumbprint()]);
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o620)).unwrap();
        assert_eq!(
            store.rescan_source(&source).removed,
            vec![pair.thumbprint()]
        );
        let reason = only_row(&store).reason.unwrap();
        assert!(reason.contains("writable by group or others"), "{reason}");
    }

    #[test]
    fn the_key_vault_extensions_latest_link_is_skipped_and_its_versions_read() {
        let dir = tempfile::tempdir().unwrap();
        let version = dir.path().join("vault.cert.0123");
        fs::write(&version, b"not a key").unwrap();
        std::os::unix::fs::symlink(&version, dir.path().join("vault.cert")).unwrap();
        let source = KeySource {
            kind: KeySourceKind::Keyvault,
            path: dir.path().to_owned(),
            ingest: None,
            passphrase_file: None,
        };
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert_eq!(only_row(&store).source, version.display().to_string());
    }

    fn keyvault_dir() -> (tempfile::TempDir, KeySource) {
        let dir = tempfile::tempdir().unwrap();
        let source = KeySource {
            kind: KeySourceKind::Keyvault,
            path: dir.path().to_owned(),
            ingest: None,
            passphrase_file: None,
        };
        (dir, source)
    }

    /// A version file as the extension writes it: certificate chain and private key, one PEM.
    fn write_version(dir: &Path, name: &str) -> Thumbprint {
        let pair = KeyPair::generate(2048, 30, "kv test").unwrap();
        let pfx = pair.to_pkcs12(b"x", false).unwrap();
        let parsed = openssl::pkcs12::Pkcs12::from_der(&pfx)
            .unwrap()
            .parse2("x")
            .unwrap();
        let mut pem = parsed.cert.unwrap().to_pem().unwrap();
        pem.extend(parsed.pkey.unwrap().private_key_to_pem_pkcs8().unwrap());
        fs::write(dir.join(name), pem).unwrap();
        pair.thumbprint()
    }

    fn point_latest(dir: &Path, link: &str, target: &str) {
        let tmp = dir.join(".link.tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        fs::rename(&tmp, dir.join(link)).unwrap();
    }

    #[test]
    fn key_vault_versions_load_once_each_with_their_version_and_the_link_marks_the_latest() {
        let (dir, source) = keyvault_dir();
        let v1 = write_version(dir.path(), "vault.pool.1111");
        point_latest(dir.path(), "vault.pool", "vault.pool.1111");
        let store = KeyStore::new();
        assert_eq!(store.rescan_source(&source).added, vec![v1]);
        let row = only_row(&store);
        assert_eq!(row.version.as_deref(), Some("1111"));
        assert!(row.latest);

        // Rotation: a new version, the link re-pointed; the old version stays while its file does.
        let v2 = write_version(dir.path(), "vault.pool.2222");
        point_latest(dir.path(), "vault.pool", "vault.pool.2222");
        assert_eq!(store.rescan_source(&source).added, vec![v2]);
        assert!(store.get(&v1).is_ok());
        let rows = store.status();
        assert_eq!(rows.len(), 2, "{rows:?}");
        for r in &rows {
            assert_eq!(r.latest, r.version.as_deref() == Some("2222"), "{r:?}");
        }
        fs::remove_file(dir.path().join("vault.pool.1111")).unwrap();
        assert_eq!(store.rescan_source(&source).removed, vec![v1]);

        // An absolute link into the same directory is the extension's too.
        point_latest(
            dir.path(),
            "vault.pool",
            dir.path().join("vault.pool.2222").to_str().unwrap(),
        );
        store.rescan_source(&source);
        assert!(only_row(&store).latest);
    }

    #[test]
    fn a_key_vault_link_outside_its_directory_or_to_another_certificate_is_refused() {
        let (dir, source) = keyvault_dir();
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = write_version(elsewhere.path(), "vault.pool.9999");
        point_latest(
            dir.path(),
            "vault.pool",
            elsewhere.path().join("vault.pool.9999").to_str().unwrap(),
        );
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert!(store.get(&outside).is_err());
        let row = only_row(&store);
        assert_eq!(row.state, KeyState::Broken);
        let reason = row.reason.unwrap();
        assert!(reason.contains("points outside its directory"), "{reason}");

        for target in ["../x/vault.pool.1", "vault.other.1", "vault.pool"] {
            point_latest(dir.path(), "vault.pool", target);
            store.rescan_source(&source);
            let reason = only_row(&store).reason.unwrap();
            assert!(reason.contains("refused"), "{target}: {reason}");
        }
        // A link to a link is not followed.
        point_latest(dir.path(), "vault.pool.1", "/etc/passwd");
        point_latest(dir.path(), "vault.pool", "vault.pool.1");
        store.rescan_source(&source);
        let rows = store.status();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|r| r.state == KeyState::Broken), "{rows:?}");
        assert!(rows
            .iter()
            .any(|r| r.reason.as_deref().unwrap().contains("not a regular file")));
    }

    #[test]
    fn a_dangling_key_vault_link_waits_for_its_version() {
        let (dir, source) = keyvault_dir();
        point_latest(dir.path(), "vault.pool", "vault.pool.3333");
        let store = KeyStore::new();
        store.rescan_source(&source);
        assert_eq!(only_row(&store).state, KeyState::Pending);
        let tp = write_version(dir.path(), "vault.pool.3333");
        assert_eq!(store.rescan_source(&source).added, vec![tp]);
        let row = only_row(&store);
        assert!(row.latest && row.state == KeyState::Loaded, "{row:?}");
    }
}
