//! Admission control: the global connection budget, per-uid connection slots and per-uid
//! request rate buckets (`crate::rate`: over its rate a uid waits for its turn). Every decision
//! takes the limits (from the request's config snapshot) and, for rates, the time, so it is
//! tested without sockets or waiting.

use crate::config::Limits;
use crate::rate::{Rate, RateTable, Turn};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Whom a connection and its requests are counted against: the caller's uid, and for uid 0
/// whether it is host root. Root in a container is uid 0 too; counted with host root, it could
/// use up host root's allowance and lock it out of `status`, `revoke` and `restore`. Any other
/// uid has one allowance wherever it runs, so entering a namespace does not double it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Principal {
    pub(crate) uid: u32,
    pub(crate) host_root: bool,
}

/// Who may connect and send requests right now.
pub(crate) struct Admission {
    /// One permit per open connection, over all sockets.
    connections: Arc<Semaphore>,
    /// Open connections per principal.
    by_uid: Mutex<HashMap<Principal, usize>>,
    rate: RateTable<Principal>,
    /// Refused connections still being answered gracefully, per peer uid.
    refusals: Mutex<HashMap<u32, usize>>,
}

/// Answer bytes that cost one request of the per-uid request rate, beyond the first.
/// 4 KiB: a uid's sustained answers are then about 800 KB/s at the default rate (with a burst of
/// 1.6 MB), far more than a task reads, and few enough that serializing them holds up nobody.
pub(crate) const ANSWER_BYTES_PER_REQUEST: usize = 4 * 1024;

/// Refused connections one uid may have lingering (answered, waiting for the client to read).
pub(crate) const MAX_LINGERING_REFUSALS_PER_UID: usize = 4;
/// Refused connections lingering over all uids.
pub(crate) const MAX_LINGERING_REFUSALS: usize = 64;

/// One refused connection being answered gracefully; dropping it frees the place.
pub(crate) struct RefusalSlot {
    admission: Arc<Admission>,
    uid: u32,
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// One open connection of a principal; dropping it frees the slot.
pub(crate) struct UidSlot {
    admission: Arc<Admission>,
    uid: Principal,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

impl Admission {
    /// Admission with room for `max_connections` connections in all.
    pub(crate) fn new(max_connections: usize) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            by_uid: Mutex::new(HashMap::new()),
            rate: RateTable::default(),
            refusals: Mutex::new(HashMap::new()),
        }
    }

    /// A place to answer a refused connection of `uid` gracefully; `None` when the uid (or all
    /// uids together) already have their few: then the refusal must not linger.
    pub(crate) fn refusal_slot(self: &Arc<Self>, uid: u32) -> Option<RefusalSlot> {
        let mut map = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = map.values().sum();
        let mine = map.get(&uid).copied().unwrap_or(0);
        if mine >= MAX_LINGERING_REFUSALS_PER_UID || total >= MAX_LINGERING_REFUSALS {
            return None;
        }
        *map.entry(uid).or_default() += 1;
        Some(RefusalSlot {
            admission: self.clone(),
            uid,
        })
    }

    /// A place among all connections; `None` when every one is taken.
    pub(crate) fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Whether `uid` has all its connections open already (a peek: [`Self::uid_slot`] decides).
    pub(crate) fn uid_at_limit(&self, uid: Principal, limits: &Limits) -> bool {
        let map = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&uid)
            .is_some_and(|&n| n >= limits.max_connections_per_uid)
    }

    /// Count a new connection of `uid`; `None` when it is at its limit.
    pub(crate) fn uid_slot(self: &Arc<Self>, uid: Principal, limits: &Limits) -> Option<UidSlot> {
        let mut map = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_default();
        if *n >= limits.max_connections_per_uid {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            admission: self.clone(),
            uid,
        })
    }

    /// Charge an answer of `len` bytes to `uid`'s request budget at `now`: one request per
    /// [`ANSWER_BYTES_PER_REQUEST`] beyond the first, taken after the answer is made, so the
    /// budget may go into debt (down to minus one burst) and the uid's next requests wait for
    /// it. Work is linear in each request; this makes a uid whose own task is huge pay for the
    /// CPU its answers take, so it cannot keep every core serializing them.
    pub(crate) fn charge_answer(&self, uid: Principal, len: usize, limits: &Limits, now: Instant) {
        let extra = (len / ANSWER_BYTES_PER_REQUEST) as f64;
        // Host root is the operator (`status`, reading any task): never throttled by its answers.
        if extra == 0.0 || uid.host_root {
            return;
        }
        self.rate.charge(uid, extra, &request_rate(limits), now);
    }

    /// `uid`'s turn for one request at `now`: at once within its burst, later (within
    /// `limits.max_rate_wait_ms`) over its rate, or refused past that.
    pub(crate) fn request_turn(&self, uid: Principal, limits: &Limits, now: Instant) -> Turn {
        self.rate.reserve(uid, 1.0, &request_rate(limits), now)
    }
}

/// The per-uid request rate in force.
pub(crate) fn request_rate(limits: &Limits) -> Rate {
    Rate {
        per_sec: limits.requests_per_sec_per_uid,
        burst: limits.burst_per_uid,
        max_wait: Duration::from_millis(limits.max_rate_wait_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Admission {
        /// The old contract, with no waiting: a turn now or none.
        fn take_rate_token(&self, uid: Principal, limits: &Limits, now: Instant) -> bool {
            let limits = Limits {
                max_rate_wait_ms: 0,
                ..limits.clone()
            };
            self.request_turn(uid, &limits, now) == Turn::After(Duration::ZERO)
        }
    }

    #[test]
    fn big_answers_cost_requests_and_a_debt_waits_for_the_refill() {
        let admission = Admission::new(8);
        let limits = Limits {
            requests_per_sec_per_uid: 10,
            burst_per_uid: 20,
            ..Limits::default()
        };
        let who = Principal {
            uid: 1000,
            host_root: false,
        };
        let now = Instant::now();
        assert!(admission.take_rate_token(who, &limits, now));
        // A small answer costs nothing more.
        admission.charge_answer(who, ANSWER_BYTES_PER_REQUEST - 1, &limits, now);
        assert!(admission.take_rate_token(who, &limits, now));
        // A 128 KiB answer costs 32 requests: more than the 18 left, so the uid is in debt...
        admission.charge_answer(who, 128 << 10, &limits, now);
        assert!(!admission.take_rate_token(who, &limits, now));
        // ...until the refill (10/s) has paid it back: 14 of debt plus one request.
        assert!(!admission.take_rate_token(who, &limits, now + Duration::from_millis(1400)));
        assert!(admission.take_rate_token(who, &limits, now + Duration::from_millis(1600)));
        // Another uid is not charged.
        let other = Principal {
            uid: 1001,
            host_root: false,
        };
        assert!(admission.take_rate_token(other, &limits, now));
    }

    fn host(uid: u32) -> Principal {
        Principal {
            uid,
            host_root: uid == 0,
        }
    }

    fn limits(per_uid: usize, rate: u32, burst: u32) -> Limits {
        Limits {
            max_connections_per_uid: per_uid,
            requests_per_sec_per_uid: rate,
            burst_per_uid: burst,
            ..Limits::default()
        }
    }

    #[test]
    fn a_uid_at_its_connection_limit_is_refused_and_others_are_not() {
        let a = Arc::new(Admission::new(10));
        let l = limits(2, 1, 1);
        let one = a.uid_slot(host(1000), &l).unwrap();
        assert!(!a.uid_at_limit(host(1000), &l));
        let _two = a.uid_slot(host(1000), &l).unwrap();
        assert!(a.uid_at_limit(host(1000), &l));
        assert!(a.uid_slot(host(1000), &l).is_none());
        assert!(!a.uid_at_limit(host(1001), &l));
        assert!(a.uid_slot(host(1001), &l).is_some());
        drop(one);
        assert!(a.uid_slot(host(1000), &l).is_some());
        // Root in a container holding uid 0's share leaves host root its own.
        let container_root = Principal {
            uid: 0,
            host_root: false,
        };
        let _held = [
            a.uid_slot(container_root, &l),
            a.uid_slot(container_root, &l),
        ];
        assert!(a.uid_slot(container_root, &l).is_none());
        assert!(a.uid_slot(host(0), &l).is_some());
    }

    #[test]
    fn lingering_refusals_are_few_per_uid_and_in_all() {
        let a = Arc::new(Admission::new(1));
        let mine: Vec<_> = (0..MAX_LINGERING_REFUSALS_PER_UID)
            .map(|_| a.refusal_slot(1000).unwrap())
            .collect();
        assert!(a.refusal_slot(1000).is_none());
        assert!(a.refusal_slot(1001).is_some(), "another uid has its own");
        drop(mine);
        let _again = a.refusal_slot(1000).unwrap();
        let others: Vec<_> = (0..MAX_LINGERING_REFUSALS as u32)
            .filter_map(|uid| a.refusal_slot(10_000 + uid))
            .collect();
        assert_eq!(others.len(), MAX_LINGERING_REFUSALS - 1);
        assert!(a.refusal_slot(99).is_none(), "the total is bounded");
    }

    #[test]
    fn the_global_budget_is_shared() {
        let a = Admission::new(1);
        let held = a.connection().unwrap();
        assert!(a.connection().is_none());
        drop(held);
        assert!(a.connection().is_some());
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate_refills_per_uid() {
        let a = Admission::new(1);
        let l = limits(1, 10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(a.take_rate_token(host(7), &l, t0));
        }
        assert!(!a.take_rate_token(host(7), &l, t0));
        assert!(
            a.take_rate_token(host(8), &l, t0),
            "another uid has its own bucket"
        );
        let container_root = Principal {
            uid: 0,
            host_root: false,
        };
        while a.take_rate_token(container_root, &l, t0) {}
        assert!(
            a.take_rate_token(host(0), &l, t0),
            "host root has a bucket of its own"
        );
        // 10 per second: one token back after 100 ms, not before.
        assert!(!a.take_rate_token(host(7), &l, t0 + Duration::from_millis(50)));
        assert!(a.take_rate_token(host(7), &l, t0 + Duration::from_millis(150)));
        assert!(!a.take_rate_token(host(7), &l, t0 + Duration::from_millis(150)));
    }
}
