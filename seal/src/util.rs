//! Input, passphrase and file-writing helpers shared by the commands.

use crate::{usage, PassArgs};
use anyhow::{Context, Result};
use nodeseal_envelope::KeyError;
use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Environment variable that may hold the PFX passphrase.
pub(crate) const PASSPHRASE_ENV: &str = "NODESEAL_PFX_PASSPHRASE";

/// All of stdin, in wiped memory.
pub(crate) fn read_stdin() -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    std::io::stdin()
        .lock()
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    Ok(buf)
}

/// Strip one trailing "\n" or "\r\n".
pub(crate) fn strip_newline(buf: &mut Zeroizing<Vec<u8>>) {
    let len = buf.len();
    if buf.ends_with(b"\r\n") {
        buf.truncate(len - 2);
    } else if buf.ends_with(b"\n") {
        buf.truncate(len - 1);
    }
}

/// A token from stdin or an argument: surrounding whitespace (the newline `echo` adds) removed.
pub(crate) fn token_text(bytes: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(bytes)
        .map_err(|_| crate::data_error("the token is not UTF-8 text"))?
        .trim();
    if s.is_empty() {
        return Err(crate::data_error("no token given (stdin was empty)"));
    }
    Ok(s.to_owned())
}

/// Resolves the PFX passphrase once, only when a file turns out to need it.
pub(crate) struct Passphrase {
    file: Option<PathBuf>,
    cached: RefCell<Option<Zeroizing<Vec<u8>>>>,
}

impl Passphrase {
    pub(crate) fn new(args: &PassArgs) -> Self {
        Passphrase {
            file: args.passphrase_file.clone(),
            cached: RefCell::new(None),
        }
    }

    /// From `--passphrase-file` or the environment only (no prompt).
    pub(crate) fn explicit(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        if let Some(f) = &self.file {
            let mut p = Zeroizing::new(
                std::fs::read(f)
                    .with_context(|| format!("reading passphrase file {}", f.display()))?,
            );
            strip_newline(&mut p);
            return Ok(Some(p));
        }
        if let Some(v) = std::env::var_os(PASSPHRASE_ENV) {
            return Ok(Some(Zeroizing::new(v.into_vec())));
        }
        Ok(None)
    }

    /// The passphrase for `path`, prompting on the terminal as a last resort.
    pub(crate) fn get(&self, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
        if let Some(p) = self.cached.borrow().as_ref() {
            return Ok(p.clone());
        }
        let p = match self.explicit()? {
            Some(p) => p,
            None => prompt(&format!("Passphrase for {}: ", path.display()))?,
        };
        *self.cached.borrow_mut() = Some(p.clone());
        Ok(p)
    }

    /// Run `f` without a passphrase and, if the file needs one, again with it.
    pub(crate) fn with<T>(
        &self,
        path: &Path,
        f: impl Fn(Option<&[u8]>) -> Result<T, KeyError>,
    ) -> Result<T> {
        if self.file.is_some() {
            let p = self.get(path)?;
            return Ok(f(Some(&p))?);
        }
        match f(None) {
            Err(KeyError::PassphraseRequired { .. }) => {
                let p = self.get(path)?;
                Ok(f(Some(&p))?)
            }
            other => Ok(other?),
        }
    }
}

/// Read a passphrase from the controlling terminal with echo off.
fn prompt(text: &str) -> Result<Zeroizing<Vec<u8>>> {
    let no_source = || {
        usage(format!(
            "a passphrase is needed and there is no terminal to ask on; pass --passphrase-file \
             FILE or set {PASSPHRASE_ENV}"
        ))
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| no_source())?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(tty.try_clone()?)
            .status()
    };
    // Refuse rather than echo the passphrase if echo cannot be turned off.
    match stty("-echo") {
        Ok(s) if s.success() => {}
        _ => return Err(no_source()),
    }
    let result = (|| -> Result<Zeroizing<Vec<u8>>> {
        let mut out = &tty;
        out.write_all(text.as_bytes())?;
        out.flush()?;
        let mut line = Zeroizing::new(Vec::new());
        let mut byte = [0u8; 1];
        let mut input = &tty;
        while input.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        out.write_all(b"\n")?;
        Ok(line)
    })();
    let _ = stty("echo");
    let mut p = result.context("reading the passphrase from the terminal")?;
    strip_newline(&mut p);
    if p.ends_with(b"\r") {
        p.pop();
    }
    Ok(p)
}

/// Write `data` to `path` atomically (temporary file in the same directory, then rename).
/// `secret` makes the file 0600; `force` allows replacing an existing file.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool, force: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mode = if secret { 0o600 } else { 0o644 };
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on the file for {}", path.display()))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    if force {
        tmp.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("writing {}", path.display()))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                usage(format!(
                    "{} already exists; pass --force to replace it",
                    path.display()
                ))
            } else {
                anyhow::Error::from(e.error).context(format!("writing {}", path.display()))
            }
        })?;
    }
    Ok(())
}

/// A unix time as UTC `YYYY-MM-DDTHH:MM:SSZ`, for every `u64` a token can carry. RFC 3339 stops
/// at year 9999; later years use ISO 8601's expanded form with a sign (`+10000-01-01T00:00:00Z`),
/// so a far expiry prints as a date rather than nothing. Proleptic Gregorian calendar.
pub(crate) fn format_utc(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    let year = if year > 9999 {
        format!("+{year}")
    } else {
        format!("{year:04}")
    };
    format!(
        "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`, for
/// non-negative day counts (eras of 400 years, 146 097 days each).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_one_newline_only() {
        for (input, want) in [
            (&b"v\n"[..], &b"v"[..]),
            (b"v\r\n", b"v"),
            (b"v\n\n", b"v\n"),
            (b"v", b"v"),
            (b"", b""),
        ] {
            let mut b = Zeroizing::new(input.to_vec());
            strip_newline(&mut b);
            assert_eq!(&b[..], want);
        }
    }

    #[test]
    fn atomic_write_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", true, false).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let e = write_atomic(&p, b"two", true, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two", false, true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }

    #[test]
    fn utc_times_match_humantime_and_go_past_year_9999() {
        use super::format_utc;
        use std::time::{Duration, UNIX_EPOCH};
        let mut t = 0u64;
        // Every ~11.6 days from 1970 to 9999, leap days and century rules included.
        while t <= 253_402_300_799 {
            let st = UNIX_EPOCH + Duration::from_secs(t);
            assert_eq!(
                format_utc(t),
                humantime::format_rfc3339_seconds(st).to_string(),
                "{t}"
            );
            t += 1_000_003;
        }
        assert_eq!(format_utc(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(format_utc(253_402_300_800), "+10000-01-01T00:00:00Z");
        // 2000 was a leap year and 2100 is not: the 400-year era rule, past 9999 too.
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(format_utc(u64::MAX), "+584554051223-11-09T07:00:15Z");
    }
}
