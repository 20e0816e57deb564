//! The hidden `generate-docs` subcommand: man pages and shell completions for the packages
//! (packaging/build-deb.sh, packaging/build-tarball.sh), generated from the clap definition so
//! they cannot drift from the real options.
//! Shared by the three CLIs (`nodeseal-agent`, `nodeseal`, `nodeseal-client`); build-time
//! tooling only, never linked into the client library (it sits behind the client's `cli`
//! feature).
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap_complete::Shell;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `out/man/<bin>[-<sub>...].<section>` for the command and every visible subcommand, and
/// `out/completions/{bash/<bin>, zsh/_<bin>, fish/<bin>.fish}`. `bin` must be the command's
/// name (it is `'static` because clap only takes owned names with its `string` feature).
/// Returns the files written.
pub fn generate(
    cmd: clap::Command,
    bin: &'static str,
    section: &str,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man_dir = out.join("man");
    create_dir(&man_dir)?;
    let visible = visible_only(&cmd, bin);
    let mut cmd = cmd.disable_help_subcommand(true);
    // Building fills in each subcommand's display name (`<bin>-<sub>`) and bin name
    // (`<bin> <sub>`), which the page names and synopses use.
    cmd.build();
    man_pages(&cmd, bin, section, &man_dir, &mut written)?;

    for (shell, dir, file) in [
        (Shell::Bash, "bash", bin.to_owned()),
        (Shell::Zsh, "zsh", format!("_{bin}")),
        (Shell::Fish, "fish", format!("{bin}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        create_dir(&dir)?;
        let path = dir.join(file);
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut visible.clone(), bin, &mut buf);
        write_file(&path, &buf)?;
        written.push(path);
    }
    Ok(written)
}

fn man_pages(
    cmd: &clap::Command,
    bin: &str,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, bin, section, dir, written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section(section)
        // Subcommands have no version of their own; the footer names the package's.
        .source(format!("{bin} {}", env!("CARGO_PKG_VERSION")))
        // An empty date makes clap_mangen drop the argument from `.TH`, shifting the rest.
        .date(page_date())
        .manual("nodeseal");
    let path = dir.join(man.get_filename());
    let mut buf = Vec::new();
    man.render(&mut buf)
        .with_context(|| format!("cannot render the man page {}", path.display()))?;
    write_file(&path, &buf)?;
    written.push(path);
    Ok(())
}

/// Completions list hidden subcommands too (clap_complete does not filter them), and clap
/// cannot remove a subcommand, so completions are generated from a copy without them. `cmd`
/// must not be built yet: building adds the `--help`/`--version` arguments the copy adds again.
fn visible_only(cmd: &clap::Command, bin: &'static str) -> clap::Command {
    let mut copy = clap::Command::new(bin)
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = cmd.get_about() {
        copy = copy.about(about.clone());
    }
    copy
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {}; pass a writable directory to --out",
            dir.display()
        )
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| {
        format!(
            "cannot create {}; pass a writable directory to --out",
            path.display()
        )
    })?;
    f.write_all(bytes)
        .and_then(|()| f.flush())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The pages' date: SOURCE_DATE_EPOCH when set (reproducible packages), else today.
fn page_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    iso_date(secs)
}

/// `YYYY-MM-DD` (UTC) of a Unix time, by Howard Hinnant's days-to-civil algorithm.
fn iso_date(unix_secs: u64) -> String {
    let z = i64::try_from(unix_secs / 86_400).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_date_handles_epoch_leap_days_and_year_ends() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(951_782_400), "2000-02-29");
        assert_eq!(iso_date(951_868_799), "2000-02-29");
        assert_eq!(iso_date(951_868_800), "2000-03-01");
        assert_eq!(iso_date(1_798_761_599), "2026-12-31");
        assert_eq!(iso_date(1_798_761_600), "2027-01-01");
    }

    #[test]
    fn writes_pages_for_visible_subcommands_and_completions_without_hidden_ones() {
        let cmd = clap::Command::new("demo-bin")
            .about("Demo")
            .subcommand(clap::Command::new("visible").about("Shown"))
            .subcommand(clap::Command::new("secret-tool").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let files = generate(cmd, "demo-bin", "8", dir.path()).unwrap();
        let man = dir.path().join("man");
        assert!(files.contains(&man.join("demo-bin.8")));
        assert!(files.contains(&man.join("demo-bin-visible.8")));
        assert!(!man.join("demo-bin-secret-tool.8").exists());
        assert!(!man.join("demo-bin-help.8").exists());
        let page = fs::read_to_string(man.join("demo-bin.8")).unwrap();
        assert!(page.contains(".TH demo-bin 8 "), "{page}");
        let sub_page = fs::read_to_string(man.join("demo-bin-visible.8")).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            sub_page.contains(&format!(" \"demo-bin {version}\" nodeseal")),
            "{sub_page}"
        );
        assert!(page.contains("demo\\-bin\\-visible(8)"), "{page}");
        for rel in ["bash/demo-bin", "zsh/_demo-bin", "fish/demo-bin.fish"] {
            let text = fs::read_to_string(dir.path().join("completions").join(rel)).unwrap();
            assert!(text.contains("visible"), "{rel}: {text}");
            assert!(
                !text.contains("secret-tool"),
                "{rel} offers a hidden subcommand"
            );
        }
    }
}

/// An error and its causes on one line, like anyhow's `{:#}` but without repeats: many errors
/// (`thiserror` ones with `{source}` in their message, e.g. "cannot read FILE: OS ERROR") already
/// end with their cause's text, which `{:#}` would print a second time.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.is_empty() && out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod error_chain_tests {
    use super::error_chain;
    use std::fmt;

    /// Like a `thiserror` error whose message includes its source.
    #[derive(Debug)]
    struct CannotRead(std::io::Error);

    impl fmt::Display for CannotRead {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "cannot read /x: {}", self.0)
        }
    }

    impl std::error::Error for CannotRead {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let e = anyhow::Error::new(CannotRead(io)).context("loading certificate /x");
        assert_eq!(
            format!("{e:#}").matches(&io_text).count(),
            2,
            "anyhow repeats it"
        );
        let shown = error_chain(&e);
        assert_eq!(
            shown,
            format!("loading certificate /x: cannot read /x: {io_text}")
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }
}
