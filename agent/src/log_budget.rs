//! Bounded logging under floods: repeated lines of one kind about one uid are budgeted per
//! window (`limits.log_lines_per_kind_per_uid` warnings, `limits.audit_refusals_per_outcome_per_uid`
//! refusal audit records, per `limits.log_window_secs`). What is over the budget is counted,
//! never dropped silently: when the window ends one summary line says how many similar lines
//! were suppressed, of which kind, about which uid.
//!
//! A uid connecting tens of thousands of times a second would otherwise write as many warning
//! lines, filling the disk and drowning every other uid's audit trail. Successful decisions are
//! not budgeted here: their rate is bounded by the request rate limit, and each is the record
//! of a secret handed out.

use crate::config::Limits;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Which budget a line draws on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Stream {
    /// Operational warnings (refused connections, broken limits, malformed requests).
    Warning,
    /// Audit records of refused decisions.
    Audit,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    length: Duration,
    emitted: u32,
    suppressed: u64,
}

/// The lines that ended their window with some suppressed: one summary each.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Suppressed {
    pub(crate) stream: Stream,
    pub(crate) kind: &'static str,
    pub(crate) uid: u32,
    pub(crate) count: u64,
}

/// Per (stream, kind, uid) windows.
#[derive(Default)]
pub(crate) struct LogBudget {
    windows: Mutex<HashMap<(Stream, &'static str, u32), Window>>,
}

/// Kinds are code constants and uids are accounts, so the table stays small; past this many
/// entries it is summarized and cleared rather than grown.
const MAX_WINDOWS: usize = 65_536;

impl LogBudget {
    /// Whether one more line of `kind` about `uid` may be written at `now`. Summaries of ended
    /// windows that are due are appended to `due`.
    fn allow(
        &self,
        key: (Stream, &'static str, u32),
        budget: u32,
        length: Duration,
        now: Instant,
        due: &mut Vec<Suppressed>,
    ) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= MAX_WINDOWS && !windows.contains_key(&key) {
            drain(&mut windows, None, due);
        }
        let w = windows.entry(key).or_insert(Window {
            started: now,
            length,
            emitted: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.started) >= w.length {
            if w.suppressed > 0 {
                due.push(summary(&key, w.suppressed));
            }
            *w = Window {
                started: now,
                length,
                emitted: 0,
                suppressed: 0,
            };
        }
        if w.emitted < budget {
            w.emitted += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Close every window that has ended by `now`, returning the summaries owed.
    fn flush(&self, now: Instant) -> Vec<Suppressed> {
        let mut due = Vec::new();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        drain(&mut windows, Some(now), &mut due);
        due
    }
}

fn summary(key: &(Stream, &'static str, u32), count: u64) -> Suppressed {
    Suppressed {
        stream: key.0,
        kind: key.1,
        uid: key.2,
        count,
    }
}

/// Remove the windows ended by `now` (all of them if `None`), collecting their summaries.
fn drain(
    windows: &mut HashMap<(Stream, &'static str, u32), Window>,
    now: Option<Instant>,
    due: &mut Vec<Suppressed>,
) {
    windows.retain(|key, w| {
        let ended = now.is_none_or(|now| now.saturating_duration_since(w.started) >= w.length);
        if ended && w.suppressed > 0 {
            due.push(summary(key, w.suppressed));
        }
        !ended
    });
}

static BUDGET: LazyLock<LogBudget> = LazyLock::new(LogBudget::default);

fn allow(stream: Stream, kind: &'static str, uid: u32, budget: u32, limits: &Limits) -> bool {
    let mut due = Vec::new();
    let length = Duration::from_secs(limits.log_window_secs);
    let allowed = BUDGET.allow(
        (stream, kind, uid),
        budget,
        length,
        Instant::now(),
        &mut due,
    );
    emit(&due);
    allowed
}

/// Whether to write a warning of `kind` (a code constant) about `uid` now.
pub(crate) fn warning(kind: &'static str, uid: u32, limits: &Limits) -> bool {
    allow(
        Stream::Warning,
        kind,
        uid,
        limits.log_lines_per_kind_per_uid,
        limits,
    )
}

/// Whether to write the audit record of a decision with `outcome` for `uid` now. Successes are
/// always written.
pub(crate) fn audit(outcome: &'static str, uid: u32, limits: &Limits) -> bool {
    outcome == "ok"
        || allow(
            Stream::Audit,
            outcome,
            uid,
            limits.audit_refusals_per_outcome_per_uid,
            limits,
        )
}

/// Write the summaries of windows that have ended, every second until the process ends, so a
/// flood that stops is still accounted for.
pub(crate) async fn summarize_periodically() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        emit(&BUDGET.flush(Instant::now()));
    }
}

fn emit(due: &[Suppressed]) {
    for s in due {
        match s.stream {
            Stream::Warning => tracing::warn!(
                kind = s.kind,
                peer_uid = s.uid,
                suppressed = s.count,
                "similar warning lines suppressed"
            ),
            Stream::Audit => tracing::warn!(
                outcome = s.kind,
                peer_uid = s.uid,
                suppressed = s.count,
                "similar audit records suppressed (refused requests of this uid, counted in status)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn over_budget_lines_are_counted_and_summarized_when_the_window_ends() {
        let b = LogBudget::default();
        let t0 = Instant::now();
        let key = (Stream::Warning, "refused", 1000);
        let mut due = Vec::new();
        let allowed = (0..1000)
            .filter(|_| b.allow(key, 3, W, t0, &mut due))
            .count();
        assert_eq!(allowed, 3);
        assert!(due.is_empty(), "nothing is owed before the window ends");
        assert!(b.flush(t0 + W / 2).is_empty());
        assert_eq!(
            b.flush(t0 + W),
            vec![Suppressed {
                stream: Stream::Warning,
                kind: "refused",
                uid: 1000,
                count: 997
            }]
        );
        assert!(b.flush(t0 + W * 3).is_empty(), "each summary is owed once");
    }

    #[test]
    fn the_next_line_after_a_window_owes_the_summary_and_starts_a_new_budget() {
        let b = LogBudget::default();
        let t0 = Instant::now();
        let key = (Stream::Audit, "bad_token", 7);
        let mut due = Vec::new();
        for _ in 0..5 {
            b.allow(key, 2, W, t0, &mut due);
        }
        assert!(b.allow(key, 2, W, t0 + W, &mut due));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 3);
    }

    #[test]
    fn budgets_are_per_uid_kind_and_stream() {
        let b = LogBudget::default();
        let t0 = Instant::now();
        let mut due = Vec::new();
        assert!(b.allow((Stream::Warning, "a", 1), 1, W, t0, &mut due));
        assert!(!b.allow((Stream::Warning, "a", 1), 1, W, t0, &mut due));
        assert!(b.allow((Stream::Warning, "a", 2), 1, W, t0, &mut due));
        assert!(b.allow((Stream::Warning, "b", 1), 1, W, t0, &mut due));
        assert!(b.allow((Stream::Audit, "a", 1), 1, W, t0, &mut due));
    }

    #[test]
    fn successes_are_always_audited() {
        let l = Limits {
            audit_refusals_per_outcome_per_uid: 1,
            ..Limits::default()
        };
        assert!((0..100).all(|_| audit("ok", 4_000_000_001, &l)));
    }
}
