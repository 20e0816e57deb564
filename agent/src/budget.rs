//! Per-uid accounting of what one user can make the agent hold: the memory of parsed env files,
//! cached cleartext and responses being written (one [`Ledger`]), and the bytes of env files
//! read (another). A [`Charge`] is the right to hold some bytes on a uid's account; it is given
//! back when dropped, so an entry, a cached value or a response pays exactly as long as it
//! lives, however it goes away.
//!
//! Root (uid 0) is charged like any uid: a container's root is uid 0 too, and can own files in
//! its task directory and hold connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes charged per uid, with no limit of its own: each charge names the limit in force (the
/// config may change between charges).
#[derive(Default, Debug)]
pub(crate) struct Ledger {
    used: Mutex<HashMap<u32, usize>>,
}

/// A charge did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    /// Already held on the uid's account (the credit subtracted).
    pub(crate) used: usize,
    /// What was asked for.
    pub(crate) wanted: usize,
    /// The limit in force.
    pub(crate) limit: usize,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charge `bytes` to `uid` if its account then holds at most `limit`, counting `credit`
    /// bytes of it as already free (a file being replaced pays for its successor with what its
    /// own entry will give back).
    pub(crate) fn try_charge(
        self: &Arc<Self>,
        uid: u32,
        bytes: usize,
        limit: usize,
        credit: usize,
    ) -> Result<Charge, OverBudget> {
        let mut used = self.lock();
        let held = used.get(&uid).copied().unwrap_or(0);
        let counted = held.saturating_sub(credit);
        if counted.saturating_add(bytes) > limit {
            return Err(OverBudget {
                used: counted,
                wanted: bytes,
                limit,
            });
        }
        *used.entry(uid).or_default() += bytes;
        Ok(Charge {
            ledger: Some(self.clone()),
            uid,
            bytes,
        })
    }

    /// A charge of nothing (a refused file holds nothing).
    pub(crate) fn free_charge(&self) -> Charge {
        Charge {
            ledger: None,
            uid: 0,
            bytes: 0,
        }
    }

    /// Bytes held on `uid`'s account right now.
    pub(crate) fn used(&self, uid: u32) -> usize {
        self.lock().get(&uid).copied().unwrap_or(0)
    }

    /// Bytes held per uid, for `status`.
    pub(crate) fn snapshot(&self) -> std::collections::BTreeMap<u32, u64> {
        self.lock()
            .iter()
            .map(|(&uid, &bytes)| (uid, bytes as u64))
            .collect()
    }

    fn release(&self, uid: u32, bytes: usize) {
        let mut used = self.lock();
        if let Some(held) = used.get_mut(&uid) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                used.remove(&uid);
            }
        }
    }
}

/// Bytes held on one uid's account until this is dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    ledger: Option<Arc<Ledger>>,
    uid: u32,
    bytes: usize,
}

impl Charge {
    /// How many bytes this charge holds.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// One charge holding both (of the same uid on the same ledger).
    pub(crate) fn join(mut self, mut other: Charge) -> Charge {
        // A free charge holds nothing on any ledger: joined to a real one, it is that one (its
        // bytes must stay where they can be given back).
        if self.ledger.is_none() {
            return other;
        }
        debug_assert_eq!(self.uid, other.uid);
        self.bytes += std::mem::take(&mut other.bytes);
        self
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(ledger) = &self.ledger {
            ledger.release(self.uid, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_under_the_limit_and_are_given_back_on_drop() {
        let ledger = Arc::new(Ledger::default());
        let a = ledger.try_charge(1000, 60, 100, 0).unwrap();
        let over = ledger.try_charge(1000, 41, 100, 0).unwrap_err();
        assert_eq!(
            over,
            OverBudget {
                used: 60,
                wanted: 41,
                limit: 100
            }
        );
        // Another uid has its own account.
        let other = ledger.try_charge(1001, 100, 100, 0).unwrap();
        let b = ledger.try_charge(1000, 40, 100, 0).unwrap();
        assert_eq!(ledger.used(1000), 100);
        drop(a);
        assert_eq!(ledger.used(1000), 40);
        drop((b, other));
        assert_eq!((ledger.used(1000), ledger.used(1001)), (0, 0));
    }

    #[test]
    fn a_replacement_counts_its_predecessor_as_free() {
        let ledger = Arc::new(Ledger::default());
        let old = ledger.try_charge(7, 80, 100, 0).unwrap();
        assert!(ledger.try_charge(7, 90, 100, 0).is_err());
        let new = ledger.try_charge(7, 90, 100, old.bytes()).unwrap();
        drop(old);
        assert_eq!(ledger.used(7), 90);
        drop(new);
        assert_eq!(ledger.used(7), 0);
    }
}
