//! Logs through `tracing`: to journald when systemd connected our stderr to the journal (so
//! every field becomes a journal field: `journalctl -u nodeseal-agent OUTCOME=forbidden`),
//! otherwise to stderr. The level comes from `RUST_LOG`, else the config.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Safe to call once per process.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("nodeseal_agent={level},warn")));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    if under_journal {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(
                    // No `F_` prefix: operators filter on `OUTCOME=`, `PEER_UID=`, ...
                    journald
                        .with_field_prefix(None)
                        .with_syslog_identifier("nodeseal-agent".into()),
                )
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false),
        )
        .try_init();
}
