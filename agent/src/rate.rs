//! Per-caller token buckets for what the agent has a finite amount of: requests (keyed by
//! principal, `server::admission`) and RSA operations (keyed by uid, `decrypt_pool`).
//!
//! A caller over its rate is paced, not refused: its request takes its turn from the bucket
//! (which may go into debt) and waits until the debt is paid, up to `limits.max_rate_wait_ms`.
//! Refusing at once looks cheaper but is not: a refused client comes straight back, usually on a
//! new connection, and each round costs the agent an accept, an identification, a parse and an
//! answer, while a paced one costs a timer. Only a caller whose turn would come later than the
//! longest wait is refused, and it is told so only once that wait has passed, so a client that
//! retries at once is held to one refusal per connection per wait (see [`Turn::Refused`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a caller gets from its bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Turn {
    /// Go ahead, after waiting this long (zero within the burst).
    After(Duration),
    /// Its turn would come later than the longest wait: nothing was taken. The caller should be
    /// answered `busy` once the longest wait has passed (at once when it is zero).
    Refused,
}

/// The rate and burst of one kind of budget, from the config snapshot in force.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    pub(crate) per_sec: u32,
    pub(crate) burst: u32,
    /// `limits.max_rate_wait_ms`.
    pub(crate) max_wait: Duration,
}

struct Bucket {
    /// May be negative: the debt of turns already handed out (waiting) or of work charged
    /// after it was done.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: &Rate, now: Instant) {
        let refill =
            now.saturating_duration_since(self.last).as_secs_f64() * f64::from(rate.per_sec);
        self.tokens = (self.tokens + refill).min(f64::from(rate.burst));
        // A clock that steps back pays nothing back and does not move `last` backwards.
        self.last = self.last.max(now);
    }
}

/// One bucket per key, created full on first use. Keys whose bucket has refilled anyway are
/// forgotten now and then, so the table holds only recently active callers.
pub(crate) struct RateTable<K> {
    inner: Mutex<Table<K>>,
}

struct Table<K> {
    buckets: HashMap<K, Bucket>,
    /// Prune when the table grows past this: at least [`PRUNE_ABOVE`], and twice what the last
    /// prune kept, so pruning costs amortized O(1) per call even when every bucket is in debt.
    prune_at: usize,
}

impl<K> Default for RateTable<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Table {
                buckets: HashMap::new(),
                prune_at: PRUNE_ABOVE,
            }),
        }
    }
}

/// Past this many keys the table drops the buckets that are full again.
const PRUNE_ABOVE: usize = 65_536;

impl<K: Hash + Eq + Copy> RateTable<K> {
    fn with_bucket<T>(
        &self,
        key: K,
        rate: &Rate,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> T {
        let mut table = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if table.buckets.len() > table.prune_at {
            table.buckets.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < f64::from(rate.burst)
            });
            table.prune_at = PRUNE_ABOVE.max(2 * table.buckets.len());
        }
        let b = table.buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(rate.burst),
            last: now,
        });
        b.refill(rate, now);
        f(b)
    }

    /// Take `cost` from `key`'s bucket at `now`, or nothing if the turn would come later than
    /// `rate.max_wait`.
    pub(crate) fn reserve(&self, key: K, cost: f64, rate: &Rate, now: Instant) -> Turn {
        self.with_bucket(key, rate, now, |b| {
            let after = b.tokens - cost;
            if after >= 0.0 {
                b.tokens = after;
                return Turn::After(Duration::ZERO);
            }
            let wait = Duration::from_secs_f64(-after / f64::from(rate.per_sec));
            if wait <= rate.max_wait {
                b.tokens = after;
                Turn::After(wait)
            } else {
                Turn::Refused
            }
        })
    }

    /// Charge `cost` for work already done, going into debt down to minus one burst: the
    /// caller's next turns wait for it. A bucket already deeper in debt (turns handed out to
    /// paced requests can take it below minus one burst) stays as it is: the floor bounds what
    /// a charge adds, it never pays back turns already taken.
    pub(crate) fn charge(&self, key: K, cost: f64, rate: &Rate, now: Instant) {
        self.with_bucket(key, rate, now, |b| {
            let floor = -f64::from(rate.burst);
            if b.tokens > floor {
                b.tokens = (b.tokens - cost).max(floor);
            }
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().buckets.len()
    }
}

/// Wait for `turn`; `Err(())` (after the longest wait) when it was refused.
pub(crate) async fn wait_for(turn: Turn, rate: &Rate) -> Result<(), ()> {
    match turn {
        Turn::After(wait) => {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            Ok(())
        }
        Turn::Refused => {
            if !rate.max_wait.is_zero() {
                tokio::time::sleep(rate.max_wait).await;
            }
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: u32, burst: u32, max_wait_ms: u64) -> Rate {
        Rate {
            per_sec,
            burst,
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    const NOW: Turn = Turn::After(Duration::ZERO);

    #[test]
    fn a_burst_goes_at_once_then_turns_are_spaced_at_the_rate_up_to_the_longest_wait() {
        let table = RateTable::default();
        let r = rate(10, 3, 250);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(table.reserve(1, 1.0, &r, t0), NOW);
        }
        // 10 per second: the next turns are 100 ms apart.
        assert_eq!(
            table.reserve(1, 1.0, &r, t0),
            Turn::After(Duration::from_millis(100))
        );
        assert_eq!(
            table.reserve(1, 1.0, &r, t0),
            Turn::After(Duration::from_millis(200))
        );
        // The third would wait 300 ms, past the longest wait: refused, and nothing taken.
        assert_eq!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        assert_eq!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        // Another key has its own bucket.
        assert_eq!(table.reserve(2, 1.0, &r, t0), NOW);
        // 100 ms later one turn has been paid back.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(
            table.reserve(1, 1.0, &r, later),
            Turn::After(Duration::from_millis(200))
        );
    }

    #[test]
    fn no_longest_wait_means_refused_at_once_past_the_burst() {
        let table = RateTable::default();
        let r = rate(10, 2, 0);
        let t0 = Instant::now();
        assert_eq!(table.reserve(1, 1.0, &r, t0), NOW);
        assert_eq!(table.reserve(1, 1.0, &r, t0), NOW);
        assert_eq!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        assert_eq!(
            table.reserve(1, 1.0, &r, t0 + Duration::from_millis(100)),
            NOW
        );
    }

    #[test]
    fn work_charged_after_the_fact_is_a_debt_the_next_turns_wait_for() {
        let table = RateTable::default();
        let r = rate(10, 20, 1000);
        let t0 = Instant::now();
        assert_eq!(table.reserve(1, 1.0, &r, t0), NOW);
        // 32 more: 19 left, so 13 of debt, paid back in 1.3 s; the next turn waits 1.4 s,
        // longer than the longest wait.
        table.charge(1, 32.0, &r, t0);
        assert_eq!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        assert_eq!(
            table.reserve(1, 1.0, &r, t0 + Duration::from_millis(400)),
            Turn::After(Duration::from_millis(1000))
        );
        // A debt never goes below one burst, however much is charged.
        table.charge(2, 1e9, &r, t0);
        assert_eq!(
            table.reserve(2, 1.0, &r, t0 + Duration::from_millis(2000)),
            Turn::After(Duration::from_millis(100))
        );
    }

    #[test]
    fn a_charge_never_pays_back_turns_taken_below_minus_one_burst() {
        let table = RateTable::default();
        // A burst smaller than the longest wait's worth of turns.
        let r = rate(10, 2, 1000);
        let t0 = Instant::now();
        for _ in 0..12 {
            assert_ne!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        }
        // 10 turns of debt (1 s): a big answer charged now must not lift it to minus one burst.
        table.charge(1, 50.0, &r, t0);
        assert_eq!(table.reserve(1, 1.0, &r, t0), Turn::Refused);
        assert_eq!(
            table.reserve(1, 1.0, &r, t0 + Duration::from_millis(100)),
            Turn::After(Duration::from_millis(1000))
        );
    }

    #[test]
    fn a_clock_that_steps_back_pays_nothing_back() {
        let table = RateTable::default();
        let r = rate(10, 1, 0);
        let t = Instant::now() + Duration::from_secs(10);
        assert_eq!(table.reserve(1, 1.0, &r, t), NOW);
        assert_eq!(
            table.reserve(1, 1.0, &r, t - Duration::from_secs(5)),
            Turn::Refused
        );
        assert_eq!(table.reserve(1, 1.0, &r, t), Turn::Refused);
        assert_eq!(
            table.reserve(1, 1.0, &r, t + Duration::from_millis(100)),
            NOW
        );
    }

    #[test]
    fn the_table_forgets_full_buckets_and_keeps_the_ones_in_debt() {
        let table = RateTable::default();
        let r = rate(1, 1, 0);
        let t0 = Instant::now();
        for k in 0..=PRUNE_ABOVE as u32 {
            table.reserve(k, 1.0, &r, t0);
        }
        // Much later every bucket has refilled: the next new key prunes them all.
        let later = t0 + Duration::from_secs(5);
        table.reserve(u32::MAX, 1.0, &r, later);
        assert_eq!(table.len(), 1);
        // A bucket still in debt survives a prune, so forgetting never resets a debt.
        for k in 0..=PRUNE_ABOVE as u32 + 1 {
            table.reserve(k, 1.0, &r, later);
        }
        assert!(table.len() > PRUNE_ABOVE);
        assert_eq!(table.reserve(7, 1.0, &r, later), Turn::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_turn_is_told_after_the_longest_wait() {
        let r = rate(1, 1, 1000);
        let t = tokio::time::Instant::now();
        assert_eq!(wait_for(Turn::Refused, &r).await, Err(()));
        assert_eq!(t.elapsed(), Duration::from_millis(1000));
        let t = tokio::time::Instant::now();
        assert_eq!(
            wait_for(Turn::After(Duration::from_millis(30)), &r).await,
            Ok(())
        );
        assert_eq!(t.elapsed(), Duration::from_millis(30));
    }
}
