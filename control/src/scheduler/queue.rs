//! Pods waiting to be scheduled, as upstream's scheduling queue: an
//! active heap (higher priority first, then first come), a back-off area
//! for pods whose attempt failed (1 s doubling to 10 s), and an
//! unschedulable area for pods no node could take, which a cluster change
//! (a node added or changed, a pod gone) moves back, and which is retried
//! anyway after 60 s.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use tokio::time::Instant;

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    Active,
    /// Back in the active heap once the instant passes.
    Backoff(Instant),
    Unschedulable(Instant),
    /// Handed to the scheduling cycle; not in any area until it returns.
    InFlight,
}

#[derive(Debug)]
struct Waiting {
    pod: Arc<Pod>,
    attempts: u32,
    area: Area,
    /// Invalidates heap entries pushed before the last move.
    generation: u64,
    /// Arrival order among equal priorities.
    arrival: u64,
}

/// The queue; `key` is `namespace/name`.
#[derive(Debug, Default)]
pub struct Queue {
    pods: HashMap<String, Waiting>,
    /// (priority, earliest arrival first, generation, key)
    active: BinaryHeap<(i32, Reverse<u64>, u64, String)>,
    /// Keys backing off or unschedulable: what flushes and cluster
    /// changes look at, so neither scans every pending pod.
    parked: HashSet<String>,
    counter: u64,
}

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

impl Queue {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pods.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Whether `pop` may have something (the heap can hold stale
    /// entries, which `pop` skips).
    pub fn has_active(&self) -> bool {
        !self.active.is_empty()
    }

    fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn activate(&mut self, key: &str) {
        self.parked.remove(key);
        let generation = self.next_counter();
        let Some(waiting) = self.pods.get_mut(key) else {
            return;
        };
        waiting.area = Area::Active;
        waiting.generation = generation;
        self.active.push((
            priority(&waiting.pod),
            Reverse(waiting.arrival),
            generation,
            key.to_owned(),
        ));
    }

    /// A pending pod appeared or changed. A change to its spec or labels
    /// makes an unschedulable pod worth another attempt; a status-only
    /// change (our own condition write) does not.
    pub fn upsert(&mut self, key: &str, pod: Arc<Pod>) {
        let arrival = self.next_counter();
        match self.pods.get_mut(key) {
            Some(waiting) => {
                let relevant = waiting.pod.spec != pod.spec
                    || waiting.pod.metadata.labels != pod.metadata.labels;
                waiting.pod = pod;
                if relevant && matches!(waiting.area, Area::Unschedulable(_) | Area::Backoff(_)) {
                    self.activate(key);
                }
            }
            None => {
                self.pods.insert(
                    key.to_owned(),
                    Waiting {
                        pod,
                        attempts: 0,
                        area: Area::Active,
                        generation: 0,
                        arrival,
                    },
                );
                self.activate(key);
            }
        }
    }

    /// The pod was bound, deleted or finished.
    pub fn remove(&mut self, key: &str) {
        self.parked.remove(key);
        self.pods.remove(key);
    }

    /// The next pod to schedule, if one is active. It stays known, in
    /// flight, until the watch reports it bound or the attempt fails, so
    /// a watch event about it meanwhile does not queue it twice.
    pub fn pop(&mut self) -> Option<(String, Arc<Pod>)> {
        while let Some((_, _, generation, key)) = self.active.pop() {
            let Some(waiting) = self.pods.get_mut(&key) else {
                continue;
            };
            if waiting.generation != generation || waiting.area != Area::Active {
                continue;
            }
            waiting.area = Area::InFlight;
            return Some((key, Arc::clone(&waiting.pod)));
        }
        None
    }

    /// The attempt failed: no node fits (`unschedulable`), or an error
    /// (back off and retry).
    pub fn failed(&mut self, key: &str, unschedulable: bool) {
        let now = Instant::now();
        let Some(waiting) = self.pods.get_mut(key) else {
            return;
        };
        waiting.attempts = waiting.attempts.saturating_add(1);
        waiting.area = if unschedulable {
            Area::Unschedulable(now + UNSCHEDULABLE_RETRY)
        } else {
            Area::Backoff(now + backoff(waiting.attempts))
        };
        self.parked.insert(key.to_owned());
    }

    /// Keeps only the pods `keep` says still exist (after a re-list).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.pods.retain(|key, _| keep(key));
        self.parked.retain(|key| keep(key));
    }

    /// Something changed that may let unschedulable pods fit: they go
    /// through back-off (so a burst of changes cannot spin them).
    pub fn cluster_changed(&mut self) {
        let now = Instant::now();
        for key in &self.parked {
            if let Some(waiting) = self.pods.get_mut(key)
                && let Area::Unschedulable(_) = waiting.area
            {
                waiting.area = Area::Backoff(now + backoff(waiting.attempts));
            }
        }
    }

    /// Moves pods whose back-off or unschedulable wait has passed back to
    /// the active heap; returns when the next one will be due.
    pub fn flush(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for key in &self.parked {
            let Some(waiting) = self.pods.get(key) else {
                continue;
            };
            if let Area::Backoff(at) | Area::Unschedulable(at) = waiting.area {
                if at <= now {
                    due.push(key.clone());
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        for key in due {
            self.activate(&key);
        }
        next
    }
}

fn backoff(attempts: u32) -> Duration {
    INITIAL_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::fixtures::pod;

    fn with_priority(name: &str, value: i32) -> Arc<Pod> {
        let mut pod = pod(name, "0", "0");
        pod.spec.as_mut().unwrap().priority = Some(value);
        Arc::new(pod)
    }

    #[test]
    fn higher_priority_first_then_arrival() {
        let mut queue = Queue::default();
        queue.upsert("ns/a", with_priority("a", 0));
        queue.upsert("ns/b", with_priority("b", 10));
        queue.upsert("ns/c", with_priority("c", 0));
        let order: Vec<String> = std::iter::from_fn(|| queue.pop().map(|(k, _)| k)).collect();
        assert_eq!(order, ["ns/b", "ns/a", "ns/c"]);
        assert_eq!(queue.len(), 3, "in flight until bound or failed");
    }

    #[tokio::test(start_paused = true)]
    async fn unschedulable_pods_wait_for_a_change() {
        let mut queue = Queue::default();
        queue.upsert("ns/a", with_priority("a", 0));
        let (key, popped) = queue.pop().unwrap();
        queue.failed(&key, true);
        assert!(queue.pop().is_none());
        // Our own status write does not retry it.
        queue.upsert(&key, popped);
        assert!(queue.pop().is_none());
        queue.cluster_changed();
        tokio::time::advance(Duration::from_millis(1100)).await;
        queue.flush();
        assert_eq!(queue.pop().unwrap().0, "ns/a");
        queue.failed("ns/a", false);
        // Second failure: two seconds.
        tokio::time::advance(Duration::from_millis(1500)).await;
        queue.flush();
        assert!(queue.pop().is_none());
        tokio::time::advance(Duration::from_millis(600)).await;
        queue.flush();
        assert!(queue.pop().is_some());
        queue.remove("ns/a");
        assert!(queue.is_empty());
    }
}
