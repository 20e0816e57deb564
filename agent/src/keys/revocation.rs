//! Withdrawn keys: the operator's revocation list file, and revocations by command, which the
//! agent persists itself so they survive a restart.

use super::store::{Changes, KeyStore};
use crate::config::Config;
use crate::fsutil::atomic_write;
use anyhow::{Context, Result};
use nodeseal_envelope::Thumbprint;
use std::collections::HashSet;
use std::fs;
use std::path::Path;

/// File in the state dir listing thumbprints revoked by command.
const REVOKED_BY_COMMAND: &str = "revoked-by-command";

/// Parse a revocation list: one thumbprint per line, `#` comments and blank lines ignored. Bad
/// lines are reported and skipped so one typo does not un-revoke everything else.
pub(crate) fn parse_revocation_list(text: &str, path: &Path) -> HashSet<Thumbprint> {
    let mut set = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match Thumbprint::from_hex(line) {
            Ok(tp) => {
                set.insert(tp);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), line = i + 1, error = %e, "revocation list entry skipped")
            }
        }
    }
    set
}

/// Reload the revocation list file and the by-command list.
pub(crate) fn reload(keys: &KeyStore, config: &Config) -> Changes {
    let mut changes = Changes::default();
    let list = match &config.revocation_list {
        Some(path) => match fs::read_to_string(path) {
            Ok(text) => parse_revocation_list(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => {
                // Fail closed would revoke nothing we know of; keep the previous list instead.
                tracing::error!(path = %path.display(), error = %e, "cannot read revocation list; keeping the previous one");
                return changes;
            }
        },
        None => HashSet::new(),
    };
    changes.merge(keys.set_revocation_list(list));
    let by_command = config.state_dir.join(REVOKED_BY_COMMAND);
    if let Ok(text) = fs::read_to_string(&by_command) {
        for tp in parse_revocation_list(&text, &by_command) {
            changes.merge(keys.set_revoked_by_command(tp, true));
        }
    }
    changes
}

/// Save the by-command list (atomically: a crash keeps the old list or the new one).
pub(crate) fn persist_revoked_by_command(keys: &KeyStore, config: &Config) -> Result<()> {
    let mut text =
        String::from("# thumbprints revoked with `nodeseal-agent revoke`; managed by the agent\n");
    for tp in keys.revoked_by_command() {
        text.push_str(&tp.to_string());
        text.push('\n');
    }
    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state dir {}", config.state_dir.display()))?;
    atomic_write(
        &config.state_dir.join(REVOKED_BY_COMMAND),
        text.as_bytes(),
        0o600,
    )
}

/// Delete the ingested copy of `tp` from the store.
pub(crate) fn purge_store_copy(config: &Config, tp: &Thumbprint) -> Result<()> {
    let store = config.key_store_dir();
    for name in [format!("sha1-{tp}.pfx"), format!("sha1-{tp}.pfx.pw")] {
        match fs::remove_file(store.join(&name)) {
            Ok(()) => tracing::warn!(key_id = %tp, file = %name, "ingested key purged"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot purge {}", store.join(&name).display()))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_skipped_and_the_rest_stays_revoked() {
        let tp = Thumbprint([7; 20]);
        let text = format!(
            "# header\n{tp}  # rotated\nnot-a-thumbprint\n\n{}\n",
            tp.to_string().to_uppercase()
        );
        let set = parse_revocation_list(&text, Path::new("revoked"));
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![tp]);
    }
}
