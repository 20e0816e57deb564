//! The in-memory certificate store: private keys by thumbprint, loaded from key sources,
//! reloaded when their files change, withdrawn and restored without a restart.
//!
//! Each key file is tracked by path so a rescan of one source replaces exactly that source's
//! keys. A thumbprint is usable when some file provides it and it is not revoked; the same key
//! may arrive from several places (a Batch drop and its ingested copy) and stays usable while any
//! remains.

use super::sources::SourceId;
use crate::config::{KeySource, KeySourceKind};
use crate::report::{KeyState, KeyStatus};
use nodeseal_envelope::{KeyError, KeyPair, Thumbprint};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
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
}

/// What happened to one key file on its last load.
enum FileState {
    Loaded(Arc<KeyEntry>),
    /// Not loadable yet for a reason expected to pass (e.g. the `.pw` has not arrived).
    Pending(String),
    Broken(String),
}

/// Cheap change detection so a rescan only re-parses files that changed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
    /// The companion file (`.pw`, `.crt`) counts too: a rotated password must trigger a reload.
    companion: Option<(u64, i128, u64)>,
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
        self.revoked_by_list.contains(tp) || self.revoked_by_command.contains(tp)
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

    /// Number of usable keys.
    pub(crate) fn usable_count(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_thumbprint
            .keys()
            .filter(|tp| !inner.is_revoked(tp))
            .count()
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
        let candidates = list_candidates(source);
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
        let mut unchanged: HashSet<PathBuf> = HashSet::new();
        let mut changed: Vec<(&Candidate, Option<Stamp>)> = Vec::new();
        for cand in &candidates {
            let stamp = stamp_of(&cand.path, cand.companion.as_deref());
            if stamp.is_some() && previous.get(&cand.path) == Some(&stamp) {
                unchanged.insert(cand.path.clone());
            } else {
                changed.push((cand, stamp));
            }
        }
        // Serial on purpose: with OpenSSL 3.0, PKCS#12 parsing on two threads takes as long as
        // on one (its algorithm fetches contend on global locks; examples/pfx_timing.rs in the
        // envelope crate measures it), so threads would only add complexity.
        let states: Vec<FileState> = changed
            .iter()
            .map(|(cand, _)| load_candidate(source, cand))
            .collect();
        let mut fresh: Vec<(PathBuf, Tracked)> = Vec::new();
        for ((cand, stamp), state) in changed.into_iter().zip(states) {
            match &state {
                FileState::Loaded(e) => tracing::info!(
                    key_id = %e.pair.thumbprint(),
                    path = %cand.path.display(),
                    bits = e.pair.bits(),
                    kind = kind_name(e.kind),
                    "key loaded"
                ),
                FileState::Pending(reason) => {
                    tracing::info!(path = %cand.path.display(), %reason, "key pending")
                }
                FileState::Broken(reason) => {
                    tracing::warn!(path = %cand.path.display(), %reason, "key file skipped")
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
        let stamp = stamp_of(path, Some(companion));
        let entry = Arc::new(KeyEntry {
            pair,
            origin: path.to_owned(),
            kind: source.kind,
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
        let mut rows: Vec<KeyStatus> = inner
            .files
            .iter()
            .map(|(path, t)| match &t.state {
                FileState::Loaded(e) => {
                    let tp = e.pair.thumbprint();
                    KeyStatus {
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
                    }
                }
                FileState::Pending(reason) | FileState::Broken(reason) => KeyStatus {
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
                },
            })
            .collect();
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
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
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
                    });
                }
            }
            KeySourceKind::Keyvault => {
                // One PEM per certificate, named `<vault>.<certificate>`; skip obvious non-keys.
                if !(lower.ends_with(".crt") || lower.ends_with(".cer") || lower.ends_with(".pw")) {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: None,
                        claimed: None,
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
                    });
                }
            }
            KeySourceKind::KeyDir => {
                if lower.ends_with(".pfx") || lower.ends_with(".p12") {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: source.passphrase_file.clone(),
                        claimed: None,
                    });
                } else if lower.ends_with(".pem") || lower.ends_with(".key") {
                    out.push(Candidate {
                        path: dir.join(name),
                        companion: None,
                        claimed: None,
                    });
                }
            }
        }
    }
    out
}

fn stamp_of(path: &Path, companion: Option<&Path>) -> Option<Stamp> {
    let m = fs::metadata(path).ok()?;
    let companion = companion.and_then(|c| fs::metadata(c).ok()).map(|c| {
        (
            c.len(),
            i128::from(c.mtime()) * 1_000_000_000 + i128::from(c.mtime_nsec()),
            c.ino(),
        )
    });
    Some(Stamp {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
        companion,
    })
}

/// Read a passphrase file: Batch writes it with or without a trailing newline.
pub(crate) fn read_passphrase(path: &Path) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(fs::read(path)?);
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

fn load_candidate(source: &KeySource, cand: &Candidate) -> FileState {
    let kind = source.kind;
    let result: Result<KeyPair, String> = match source.kind {
        KeySourceKind::BatchCerts => {
            let pw_path = cand.companion.as_deref().unwrap_or(Path::new(""));
            match read_passphrase(pw_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return FileState::Pending(format!(
                        "waiting for its password file {}",
                        pw_path.display()
                    ))
                }
                Err(e) => Err(format!("cannot read {}: {e}", pw_path.display())),
                Ok(pw) => read_file(&cand.path).and_then(|der| {
                    KeyPair::from_pkcs12(&der, &pw, &cand.path).map_err(|e| e.to_string())
                }),
            }
        }
        KeySourceKind::Keyvault => read_file(&cand.path).and_then(|pem| {
            KeyPair::from_pem(&pem, None, None, &cand.path).map_err(|e| e.to_string())
        }),
        KeySourceKind::Waagent => {
            let crt = cand.companion.as_deref().unwrap_or(Path::new(""));
            match fs::read(crt) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return FileState::Pending(format!(
                        "waiting for its certificate {}",
                        crt.display()
                    ))
                }
                Err(e) => Err(format!("cannot read {}: {e}", crt.display())),
                Ok(crt_pem) => read_file(&cand.path).and_then(|pem| {
                    KeyPair::from_pem(&pem, Some(&crt_pem), None, &cand.path)
                        .map_err(|e| e.to_string())
                }),
            }
        }
        KeySourceKind::KeyDir => {
            let passphrase = match &source.passphrase_file {
                Some(p) => match read_passphrase(p) {
                    Ok(pw) => Some(pw),
                    Err(e) => {
                        return FileState::Broken(format!(
                            "cannot read passphrase file {}: {e}",
                            p.display()
                        ))
                    }
                },
                None => None,
            };
            let text_is_cert_only = fs::read(&cand.path)
                .map(|b| {
                    let s = String::from_utf8_lossy(&b);
                    s.contains("-----BEGIN CERTIFICATE") && !s.contains("PRIVATE KEY")
                })
                .unwrap_or(false);
            if text_is_cert_only {
                // A certificate beside its key: the key file picks it up as a sibling.
                return FileState::Pending("certificate only (no private key in this file)".into());
            }
            KeyPair::load(&cand.path, passphrase.as_deref().map(|p| p.as_slice()))
                .map_err(|e| e.to_string())
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
            }))
        }
        Err(reason) => FileState::Broken(reason),
    }
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}
