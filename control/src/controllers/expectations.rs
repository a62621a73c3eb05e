//! Expectations, as upstream's `ControllerExpectations`: after creating
//! or deleting pods, a controller must not act on its cache again until
//! the cache has seen those writes, or it would create the same pods a
//! second time. A controller records the names it created and deleted;
//! its next sync waits until the cache holds every created name and none
//! of the deleted ones, or until 60 s have passed (a write the watch
//! never reported, such as a pod deleted right after its creation).

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

const TTL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Pending {
    created: HashSet<String>,
    deleted: HashSet<String>,
    at: Instant,
}

/// Per owner key (`namespace/name`).
#[derive(Debug, Default)]
pub struct Expectations {
    pending: Mutex<HashMap<String, Pending>>,
}

impl Expectations {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Pending>) -> T) -> T {
        // A panic while holding the lock cannot leave the map half
        // updated in a way that matters: the worst is a stale entry.
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut pending)
    }

    pub fn created(&self, owner: &str, name: String) {
        self.with(|pending| {
            let entry = pending.entry(owner.to_owned()).or_insert_with(|| Pending {
                created: HashSet::new(),
                deleted: HashSet::new(),
                at: Instant::now(),
            });
            entry.created.insert(name);
            entry.at = Instant::now();
        });
    }

    pub fn deleted(&self, owner: &str, name: String) {
        self.with(|pending| {
            let entry = pending.entry(owner.to_owned()).or_insert_with(|| Pending {
                created: HashSet::new(),
                deleted: HashSet::new(),
                at: Instant::now(),
            });
            entry.deleted.insert(name);
            entry.at = Instant::now();
        });
    }

    /// A delete that failed will never show in the cache: stop waiting.
    pub fn delete_failed(&self, owner: &str, name: &str) {
        self.with(|pending| {
            if let Some(entry) = pending.get_mut(owner) {
                entry.deleted.remove(name);
            }
        });
    }

    /// Whether the cache has caught up with the owner's writes; `cached`
    /// answers "is this name in the cache and not being deleted?".
    pub fn satisfied(&self, owner: &str, cached: impl Fn(&str) -> bool) -> bool {
        self.with(|pending| {
            let Some(entry) = pending.get_mut(owner) else {
                return true;
            };
            entry.created.retain(|name| !cached(name));
            entry.deleted.retain(|name| cached(name));
            let done =
                (entry.created.is_empty() && entry.deleted.is_empty()) || entry.at.elapsed() > TTL;
            if done {
                pending.remove(owner);
            }
            done
        })
    }

    /// The owner is gone: forget what it waited for.
    pub fn forget(&self, owner: &str) {
        self.with(|pending| pending.remove(owner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_cache_has_seen_every_write() {
        let expectations = Expectations::default();
        assert!(expectations.satisfied("ns/rs", |_| false));
        expectations.created("ns/rs", "a".to_owned());
        expectations.created("ns/rs", "b".to_owned());
        expectations.deleted("ns/rs", "old".to_owned());
        assert!(!expectations.satisfied("ns/rs", |name| name == "a" || name == "old"));
        assert!(!expectations.satisfied("ns/rs", |name| name == "b" || name == "old"));
        assert!(
            expectations.satisfied("ns/rs", |name| name != "old"),
            "a and b seen earlier, old gone now"
        );
        expectations.created("ns/rs", "c".to_owned());
        expectations.forget("ns/rs");
        assert!(expectations.satisfied("ns/rs", |_| false));
    }
}
