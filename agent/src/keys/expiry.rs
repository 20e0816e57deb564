//! Certificates running out: a warning when one has expired or expires within 30 days, at most
//! once a day per key (rescans run every minute; the journal should not). The decision takes
//! the time as input so it is tested without waiting.

use super::store::KeyEntry;
use nodeseal_envelope::Thumbprint;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WARN_BEFORE_SECS: i64 = 30 * 86_400;
const WARN_EVERY: Duration = Duration::from_secs(86_400);

/// What to say about one certificate now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    Expired,
    ExpiresIn { days: i64 },
}

/// Whether a certificate valid until `not_after_unix` deserves a warning at `now_unix`, given
/// when it was last warned about.
pub(crate) fn notice(
    not_after_unix: i64,
    now_unix: i64,
    last_warned: Option<Instant>,
    now: Instant,
) -> Option<Notice> {
    let left = not_after_unix - now_unix;
    if left >= WARN_BEFORE_SECS {
        return None;
    }
    if last_warned.is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY) {
        return None;
    }
    Some(if left < 0 {
        Notice::Expired
    } else {
        Notice::ExpiresIn {
            days: left / 86_400,
        }
    })
}

/// When each expiring certificate was last warned about; owned by the lifecycle task alone.
#[derive(Default)]
pub(crate) struct ExpiryWarnings {
    warned: HashMap<Thumbprint, Instant>,
}

impl ExpiryWarnings {
    /// Warn about every loaded key that needs it at this moment.
    pub(crate) fn check(
        &mut self,
        entries: &[std::sync::Arc<KeyEntry>],
        now_unix: i64,
        now: Instant,
    ) {
        for e in entries {
            let tp = e.pair.thumbprint();
            let Some(n) = notice(
                e.pair.not_after_unix(),
                now_unix,
                self.warned.get(&tp).copied(),
                now,
            ) else {
                continue;
            };
            self.warned.insert(tp, now);
            match n {
                Notice::Expired => {
                    tracing::warn!(key_id = %tp, path = %e.origin.display(), "certificate has expired; its tokens still open, but rotate the key")
                }
                Notice::ExpiresIn { days } => {
                    tracing::warn!(key_id = %tp, path = %e.origin.display(), days_left = days, "certificate expires within 30 days; rotate the key")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_within_thirty_days_and_then_once_a_day() {
        let now = Instant::now();
        let day = 86_400;
        assert_eq!(notice(100 * day, 0, None, now), None);
        assert_eq!(notice(30 * day, 0, None, now), None);
        assert_eq!(
            notice(29 * day + 5, 0, None, now),
            Some(Notice::ExpiresIn { days: 29 })
        );
        assert_eq!(notice(-1, 0, None, now), Some(Notice::Expired));
        let later = now + Duration::from_secs(3600);
        assert_eq!(notice(-1, 0, Some(now), later), None);
        let next_day = now + WARN_EVERY;
        assert_eq!(notice(-1, 0, Some(now), next_day), Some(Notice::Expired));
    }
}
