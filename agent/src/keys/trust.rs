//! Which key source files the agent trusts, and how it reads them.
//!
//! A key source is where root puts private keys; a file in it that a task user could have
//! placed, redirected or rewritten would let that user plant a key in the root store or probe
//! root-only files (does `/root-only/secret` unlock this PFX?). So:
//!
//! - every key file, companion (`.pw`, `.crt`, sibling certificate) and passphrase file is
//!   opened with `O_NOFOLLOW | O_NONBLOCK`, must then be a regular file (`fstat` on that fd),
//!   and is read from that fd; change detection stamps come from the same `fstat`;
//! - that file and its source directory must be owned by root (or by the agent's own euid, so
//!   an unprivileged agent can read its own files) and not writable by group or others.
//!
//! Refusals name the file and the command that fixes it, never anything read from it.

use nix::errno::Errno;
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// Why a symbolic link is refused (also what `status` says).
pub(crate) const LINK_REASON: &str =
    "is a symbolic link; the agent never follows links in key sources";

/// The largest key source file read (a Batch PFX is at most 10 KB, a Key Vault PEM a chain).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Enough of a file's metadata to notice any change: content, replacement, chmod or chown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    mode: u32,
    uid: u32,
}

impl FileStamp {
    /// From `fstatat`, for files looked at beside a directory descriptor.
    pub(crate) fn of_stat(st: &nix::sys::stat::FileStat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            len: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
            mode: st.st_mode,
            uid: st.st_uid,
        }
    }

    pub(crate) fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
        }
    }
}

/// A trusted file, open, with the metadata of that very fd.
pub(crate) struct Opened {
    file: File,
    meta: Metadata,
}

impl Opened {
    pub(crate) fn stamp(&self) -> FileStamp {
        FileStamp::of(&self.meta)
    }

    /// The whole file, from the fd that was checked.
    pub(crate) fn read(self, path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut buf = Zeroizing::new(Vec::with_capacity(
            usize::try_from(self.meta.len().min(MAX_FILE_BYTES)).unwrap_or(0),
        ));
        self.file
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "{} is larger than {MAX_FILE_BYTES} bytes; not a key file",
                path.display()
            ));
        }
        Ok(buf)
    }
}

/// What opening one key source file found.
pub(crate) enum Probe {
    /// A trusted regular file.
    Open(Opened),
    /// Nothing there.
    Missing,
    /// Refused (symlink, not a regular file, untrusted owner or mode, unreadable), with the
    /// reason for `status` and a stamp of what is there, so an unchanged refusal is not
    /// re-examined (and re-logged) on every scan while a fix is noticed.
    Refused(String, Option<FileStamp>),
}

impl Probe {
    /// The stamp of what is at the path (`None` when nothing is).
    pub(crate) fn stamp(&self) -> Option<FileStamp> {
        match self {
            Probe::Open(o) => Some(o.stamp()),
            Probe::Missing => None,
            Probe::Refused(_, s) => *s,
        }
    }
}

fn lstamp(path: &Path) -> Option<FileStamp> {
    fs::symlink_metadata(path).ok().map(|m| FileStamp::of(&m))
}

/// Open `path` for reading as a key source file: never through a symlink, never blocking on
/// a FIFO, only a regular file, only one root (or the agent) owns and only it may write.
pub(crate) fn probe(path: &Path) -> Probe {
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Probe::Missing,
        Err(e) if e.raw_os_error() == Some(Errno::ELOOP as i32) && is_symlink(path) => {
            return Probe::Refused(format!("{} {LINK_REASON}", path.display()), lstamp(path))
        }
        Err(e) => {
            return Probe::Refused(format!("cannot open {}: {e}", path.display()), lstamp(path))
        }
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => {
            return Probe::Refused(format!("cannot stat {}: {e}", path.display()), lstamp(path))
        }
    };
    let stamp = Some(FileStamp::of(&meta));
    if !meta.file_type().is_file() {
        return Probe::Refused(
            format!(
                "{} is {}, not a regular file; the agent reads only regular files in key sources",
                path.display(),
                type_name(&meta)
            ),
            stamp,
        );
    }
    if let Err(reason) = check_owner_and_mode(path, &meta, "file") {
        return Probe::Refused(reason, stamp);
    }
    Probe::Open(Opened { file, meta })
}

fn libc_flags() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits()
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

fn type_name(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Owned by root or by the agent's euid, and not writable by group or others: only then can no
/// task user have written (or be able to rewrite) what the agent reads.
pub(crate) fn check_owner_and_mode(path: &Path, meta: &Metadata, what: &str) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let fix = if me == 0 {
        format!("chown root:root {p} && chmod go-w {p}", p = path.display())
    } else {
        format!("chown {me} {p} && chmod go-w {p}", p = path.display())
    };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "key source {what} {} is owned by uid {}, not root, so that user could plant or swap keys; refused; fix with: {fix}",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "key source {what} {} has mode {:o}, writable by group or others, so they could plant or swap keys; refused; fix with: {fix}",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// What a key source directory is.
pub(crate) enum DirProbe {
    /// Trusted: read its files.
    Trusted,
    /// Absent (yet).
    Missing,
    /// Refused, with the reason and a stamp of the directory.
    Refused(String, Option<FileStamp>),
}

/// Check a source directory. The configured path itself may go through symlinks (node images
/// link `/mnt/batch` elsewhere); the directory it names must be trusted.
pub(crate) fn probe_dir(path: &Path) -> DirProbe {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirProbe::Missing,
        Err(e) => {
            return DirProbe::Refused(
                format!("cannot stat key source {}: {e}", path.display()),
                lstamp(path),
            )
        }
    };
    let stamp = Some(FileStamp::of(&meta));
    if !meta.is_dir() {
        return DirProbe::Refused(
            format!("key source {} is not a directory", path.display()),
            stamp,
        );
    }
    match check_owner_and_mode(path, &meta, "directory") {
        Ok(()) => DirProbe::Trusted,
        Err(reason) => DirProbe::Refused(reason, stamp),
    }
}

/// Read a passphrase (Batch writes it with or without a trailing newline) from a probed file.
pub(crate) fn passphrase_from(opened: Opened, path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut bytes = opened.read(path)?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    Ok(bytes)
}

/// The Key Vault VM extension's name for a certificate's files: `<vault>.<certificate>` (its
/// latest-version link, or the one file of older layouts) and `<vault>.<certificate>.<version>`.
/// Vault and certificate names cannot hold dots, so the parts are unambiguous.
pub(crate) fn keyvault_name_parts(name: &str) -> Option<(&str, &str, Option<&str>)> {
    let mut parts = name.split('.');
    let vault = parts.next().filter(|p| !p.is_empty())?;
    let cert = parts.next().filter(|p| !p.is_empty())?;
    let version = match parts.next() {
        None => None,
        Some(v) if !v.is_empty() => Some(v),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((vault, cert, version))
}

/// What the extension's `<vault>.<certificate>` latest-version link was found to be.
pub(crate) struct LinkProbe {
    /// Of the link itself (its replacement by a new link changes it).
    pub(crate) stamp: Option<FileStamp>,
    /// Of what it names, so a target appearing or changing is noticed.
    pub(crate) target_stamp: Option<FileStamp>,
    pub(crate) outcome: LinkOutcome,
}

pub(crate) enum LinkOutcome {
    /// A trusted regular file beside the link: a version of the same certificate.
    Version(String),
    /// It names a version not (yet) there: the extension writes the version, then the link.
    Dangling(String),
    /// Not followed, with the reason.
    Refused(String),
}

/// Resolve the latest-version link `name` of the Key Vault source `dir` without following
/// anything but it, and only to a version of the same certificate beside it: read through a
/// descriptor of the directory (`readlinkat`, `fstatat` without following), so neither the
/// link nor its target is ever reached through another path.
pub(crate) fn probe_latest_link(dir: &Path, name: &str) -> LinkProbe {
    use nix::fcntl::{readlinkat, AtFlags};
    use nix::sys::stat::fstatat;
    use std::os::fd::AsRawFd;
    let path = dir.join(name);
    let refused = |reason: String, stamp| LinkProbe {
        stamp,
        target_stamp: None,
        outcome: LinkOutcome::Refused(reason),
    };
    let dir_fd = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(dir)
    {
        Ok(f) => f,
        Err(e) => return refused(format!("cannot open {}: {e}", dir.display()), None),
    };
    let fd = Some(dir_fd.as_raw_fd());
    let link = match fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) => return refused(format!("cannot stat {}: {e}", path.display()), None),
    };
    let stamp = Some(FileStamp::of_stat(&link));
    let me = nix::unistd::geteuid().as_raw();
    if link.st_uid != 0 && link.st_uid != me {
        return refused(
            format!(
                "Key Vault link {} is owned by uid {}, not root; not followed; remove it (the extension recreates its own)",
                path.display(),
                link.st_uid
            ),
            stamp,
        );
    }
    let target = match readlinkat(fd, name) {
        Ok(t) => t,
        Err(e) => return refused(format!("cannot read link {}: {e}", path.display()), stamp),
    };
    let target = Path::new(&target);
    // The extension may write the target as a bare name or as a path in the same directory.
    let beside = match target.parent() {
        Some(p) if p.as_os_str().is_empty() => true,
        Some(p) => p == dir || fs::canonicalize(dir).is_ok_and(|d| d == p),
        None => false,
    };
    let target_name = target.file_name().and_then(|n| n.to_str());
    let Some(target_name) = target_name.filter(|_| beside && !target.ends_with("..")) else {
        return refused(
            format!(
                "Key Vault link {} points outside its directory (to {:?}); the only link followed is the extension's latest-version link to a file beside it; refused",
                path.display(),
                target.display().to_string()
            ),
            stamp,
        );
    };
    let same_cert = keyvault_name_parts(target_name).is_some_and(|(v, c, version)| {
        version.is_some() && keyvault_name_parts(name) == Some((v, c, None))
    });
    if !same_cert {
        return refused(
            format!(
                "Key Vault link {} points to {:?}, not to a version <vault>.<certificate>.<version> of its own certificate; refused",
                path.display(),
                target_name
            ),
            stamp,
        );
    }
    let target_path = dir.join(target_name);
    let st = match fstatat(fd, target_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => {
            return LinkProbe {
                stamp,
                target_stamp: None,
                outcome: LinkOutcome::Dangling(format!(
                    "waiting for its latest version {}",
                    target_path.display()
                )),
            }
        }
        Err(e) => return refused(format!("cannot stat {}: {e}", target_path.display()), stamp),
    };
    let target_stamp = Some(FileStamp::of_stat(&st));
    let kind = st.st_mode & libc::S_IFMT;
    let outcome = if kind != libc::S_IFREG {
        LinkOutcome::Refused(format!(
            "Key Vault link {} points to {}, which is not a regular file (a link to a link is never followed); refused",
            path.display(),
            target_path.display()
        ))
    } else if st.st_uid != 0 && st.st_uid != me {
        LinkOutcome::Refused(format!(
            "Key Vault link {} points to {}, owned by uid {}, not root; refused",
            path.display(),
            target_path.display(),
            st.st_uid
        ))
    } else if st.st_mode & 0o022 != 0 {
        LinkOutcome::Refused(format!(
            "Key Vault link {} points to {}, writable by group or others; refused",
            path.display(),
            target_path.display()
        ))
    } else {
        LinkOutcome::Version(target_name.to_owned())
    };
    LinkProbe {
        stamp,
        target_stamp,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn refused(p: Probe) -> String {
        match p {
            Probe::Refused(r, _) => r,
            Probe::Open(_) => panic!("opened"),
            Probe::Missing => panic!("missing"),
        }
    }

    #[test]
    fn a_regular_private_file_opens_and_reads_from_its_fd() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        fs::write(&f, b"secret\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        let Probe::Open(o) = probe(&f) else {
            panic!("refused")
        };
        assert_eq!(&passphrase_from(o, &f).unwrap()[..], b"secret");
        assert!(matches!(probe(&dir.path().join("none")), Probe::Missing));
    }

    #[test]
    fn a_symlink_is_refused_without_reading_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"the-secret").unwrap();
        let link = dir.path().join("k.pw");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let r = refused(probe(&link));
        assert!(r.contains(LINK_REASON), "{r}");
        assert!(!r.contains("the-secret"), "{r}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("k.pw");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let r = refused(probe(&fifo));
        assert!(r.contains("is a FIFO, not a regular file"), "{r}");
    }

    #[test]
    fn a_group_or_other_writable_file_or_dir_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        fs::write(&f, b"x").unwrap();
        for mode in [0o664, 0o646] {
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            let r = refused(probe(&f));
            assert!(r.contains("writable by group or others"), "{r}");
            assert!(r.contains(&format!("chmod go-w {}", f.display())), "{r}");
        }
        assert!(matches!(probe_dir(dir.path()), DirProbe::Trusted));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let DirProbe::Refused(r, _) = probe_dir(dir.path()) else {
            panic!("trusted")
        };
        assert!(r.contains("directory") && r.contains("chmod go-w"), "{r}");
        assert!(matches!(
            probe_dir(&dir.path().join("none")),
            DirProbe::Missing
        ));
        let DirProbe::Refused(r, _) = probe_dir(&f) else {
            panic!("trusted")
        };
        assert!(r.contains("not a directory"), "{r}");
    }

    #[test]
    fn a_file_of_another_owner_is_refused_with_the_fix() {
        // Only root can give a file away; unprivileged, our own file must pass.
        let me = nix::unistd::geteuid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        fs::write(&f, b"x").unwrap();
        if me == 0 {
            std::os::unix::fs::chown(&f, Some(4242), Some(4242)).unwrap();
            let r = refused(probe(&f));
            assert!(r.contains("owned by uid 4242"), "{r}");
            assert!(r.contains("chown root:root"), "{r}");
        } else {
            let meta = fs::metadata(&f).unwrap();
            assert!(check_owner_and_mode(&f, &meta, "file").is_ok());
        }
    }
}
