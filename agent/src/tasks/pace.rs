//! How fast one uid's env files are (re)read: every read and parse runs on the one lifecycle
//! thread, so a user who changes a big file in a loop (a `utime` loop changes its mtime and
//! ctime each time) would otherwise keep that thread busy and hold up every other uid's change.
//! Each uid has a bucket of `limits.env_read_bytes_per_sec_per_uid` bytes a second, holding at
//! most one second of it. A file is read when its owner's bucket is not empty, and its bytes
//! are taken from it (it may go into debt, so a file bigger than a second's worth is still read
//! once the uid has been quiet); otherwise the read is deferred and retried, and reads the file
//! as it is then, so a deferred change is served late, never lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// What a scan reads under: the rate in force and the time.
pub(crate) struct Pace<'a> {
    /// `limits.env_read_bytes_per_sec_per_uid`.
    pub(crate) bytes_per_sec: u64,
    /// Monotonic time (`&Instant::now` outside tests).
    pub(crate) now: &'a dyn Fn() -> Instant,
    /// Read every file now, still charging it: the first load before READY, which must hold
    /// every file there is.
    pub(crate) unpaced: bool,
}

/// Per-uid debt of bytes read, in byte-nanoseconds: a read of `n` bytes adds `n * 1e9`, and
/// each nanosecond pays back `bytes_per_sec`. Exact integer arithmetic, so many quick reads
/// lose no refill to rounding.
#[derive(Default)]
pub(crate) struct ReadPace {
    debts: Mutex<HashMap<u32, (u128, Instant)>>,
}

impl ReadPace {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (u128, Instant)>> {
        self.debts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `uid`'s debt at `now`, in byte-nanoseconds.
    fn debt(&self, uid: u32, bytes_per_sec: u64, now: Instant) -> u128 {
        self.lock().get(&uid).map_or(0, |&(debt, at)| {
            let paid = now.saturating_duration_since(at).as_nanos() * u128::from(bytes_per_sec);
            debt.saturating_sub(paid)
        })
    }

    /// Whether `uid` may have a file read now: its bucket is not empty.
    pub(crate) fn may_read(&self, uid: u32, bytes_per_sec: u64, now: Instant) -> bool {
        self.debt(uid, bytes_per_sec, now) < u128::from(bytes_per_sec) * NANOS_PER_SEC
    }

    /// Take `bytes` read from `uid`'s bucket.
    pub(crate) fn spend(&self, uid: u32, bytes: u64, bytes_per_sec: u64, now: Instant) {
        let debt = self.debt(uid, bytes_per_sec, now) + u128::from(bytes) * NANOS_PER_SEC;
        let mut debts = self.lock();
        debts.insert(uid, (debt, now));
        // Uids whose debt is paid back hold nothing: forgotten now and then, so the map holds
        // only uids read from in about the last second, however many uids ever were.
        if debts.len() > 64 && debts.len().is_power_of_two() {
            debts.retain(|_, (debt, at)| {
                now.saturating_duration_since(*at).as_nanos() * u128::from(bytes_per_sec) < *debt
            });
        }
    }

    /// How much `uid` has read lately, for putting quiet uids' files first in a scan.
    pub(crate) fn pressure(&self, uid: u32, bytes_per_sec: u64, now: Instant) -> u128 {
        self.debt(uid, bytes_per_sec, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_uid_reads_a_second_of_its_rate_then_waits_for_what_it_read() {
        let pace = ReadPace::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let rate = 4 * MIB;
        // Quiet: a file bigger than a second's worth is still read, and puts the uid in debt.
        assert!(pace.may_read(1, rate, t0));
        pace.spend(1, 12 * MIB, rate, t0);
        assert!(!pace.may_read(1, rate, t0));
        // 12 MiB read, 4 MiB of bucket: 8 MiB of debt, paid back at 4 MiB/s in 2 s.
        assert!(!pace.may_read(1, rate, ms(1999)));
        assert!(pace.may_read(1, rate, ms(2001)));
        // Other uids are not held up by uid 1.
        assert!(pace.may_read(2, rate, t0));
        // Small files within the rate are never held up: 40 KiB ten times a second.
        for i in 0..100 {
            let at = ms(10_000 + 100 * i);
            assert!(pace.may_read(3, rate, at), "read {i}");
            pace.spend(3, 40 << 10, rate, at);
        }
        // A burst takes at most the bucket (and the read that empties it), then waits for the rate.
        let mut read = 0;
        let at = ms(20_000);
        while pace.may_read(4, rate, at) {
            pace.spend(4, MIB, rate, at);
            read += 1;
        }
        assert_eq!(read, 4);
        pace.spend(4, MIB, rate, at);
        assert!(!pace.may_read(4, rate, at + Duration::from_millis(249)));
        assert!(pace.may_read(4, rate, at + Duration::from_millis(251)));
    }

    #[test]
    fn a_clock_that_does_not_move_or_steps_back_pays_nothing_back() {
        let pace = ReadPace::default();
        let t = Instant::now() + Duration::from_secs(10);
        pace.spend(1, 8 * MIB, MIB, t);
        assert!(!pace.may_read(1, MIB, t));
        assert!(!pace.may_read(1, MIB, t - Duration::from_secs(5)));
        assert!(pace.pressure(1, MIB, t) > pace.pressure(2, MIB, t));
        assert!(pace.may_read(1, MIB, t + Duration::from_millis(7001)));
    }

    #[test]
    fn paid_up_uids_are_forgotten() {
        let pace = ReadPace::default();
        let t0 = Instant::now();
        for uid in 0..1000 {
            pace.spend(uid, 1, MIB, t0 + Duration::from_secs(u64::from(uid)));
        }
        assert!(pace.lock().len() <= 128, "{}", pace.lock().len());
    }
}
