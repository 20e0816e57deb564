//! The node's user and group database, for `user:` and `group:` selectors: names resolved
//! through NSS (`getpwnam_r`/`getgrnam_r` via nix) and remembered for a short while, so a
//! request naming the same user many times costs one lookup, and a renamed account is seen
//! within [`TTL`].

use crate::authz::Accounts;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an answer (found or not) is believed.
const TTL: Duration = Duration::from_secs(30);
/// Names remembered at most, per kind: token audiences are chosen by whoever seals, so the
/// cache must not grow with them. Past it the cache starts over.
const MAX_NAMES: usize = 1024;

#[derive(Default)]
struct Cache(Mutex<HashMap<String, (Option<u32>, Instant)>>);

impl Cache {
    fn get_or(&self, name: &str, look_up: impl FnOnce() -> Option<u32>) -> Option<u32> {
        let now = Instant::now();
        {
            let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((id, at)) = map.get(name) {
                if now.duration_since(*at) < TTL {
                    return *id;
                }
            }
        }
        let id = look_up();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_NAMES {
            map.clear();
        }
        map.insert(name.to_owned(), (id, now));
        id
    }
}

/// The node's accounts.
#[derive(Default)]
pub(crate) struct NodeAccounts {
    users: Cache,
    groups: Cache,
}

impl Accounts for NodeAccounts {
    fn uid_of_user(&self, name: &str) -> Option<u32> {
        self.users.get_or(name, || {
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        })
    }

    fn gid_of_group(&self, name: &str) -> Option<u32> {
        self.groups.get_or(name, || {
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_an_unknown_name_matches_nobody() {
        let a = NodeAccounts::default();
        assert_eq!(a.uid_of_user("root"), Some(0));
        assert_eq!(a.gid_of_group("root"), Some(0));
        assert_eq!(a.uid_of_user("no-such-user-nodeseal"), None);
        // Remembered: a second ask answers from the cache, found or not.
        assert_eq!(a.uid_of_user("root"), Some(0));
        assert_eq!(a.users.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = Cache::default();
        for i in 0..(MAX_NAMES + 10) {
            c.get_or(&format!("u{i}"), || None);
        }
        assert!(c.0.lock().unwrap().len() <= MAX_NAMES);
    }
}
