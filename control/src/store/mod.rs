//! The seam between the API server and its storage: a revisioned key-value
//! store with etcd's semantics.
//!
//! Every committed transaction that writes gets the next revision; all of its
//! writes share it. An object's `resourceVersion` is the revision that last
//! modified its key, so a watch from revision N sees exactly the changes after
//! N, in order, once each. Two implementations pass the same conformance suite
//! (`conformance.rs`): [`EtcdStore`] against a real etcd server, and
//! [`EmbeddedStore`] on redb for one-machine clusters.

mod codec;
#[cfg(test)]
mod conformance;
mod embedded;
mod etcd;

use std::{future::Future, path::PathBuf, pin::Pin};

use futures::Stream;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store revision. Starts at 1 for an empty store (as etcd's does), so 0
/// can mean "the current revision" in requests.
pub type Revision = i64;

/// One key at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (unchanged by updates).
    pub create_revision: Revision,
    /// The revision that last wrote the key.
    pub mod_revision: Revision,
}

/// What a range read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// Keys in ascending byte order.
    pub kvs: Vec<KeyValue>,
    /// The revision the read observed.
    pub revision: Revision,
    /// More keys matched than `limit` allowed.
    pub more: bool,
}

/// A range read over every key that starts with `prefix`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeRequest {
    pub prefix: String,
    /// Start at this key (inclusive) instead of at `prefix`: list paging.
    pub start: Option<String>,
    /// At most this many keys; 0 means all.
    pub limit: usize,
    /// Read as of this revision; 0 means the current one.
    pub revision: Revision,
}

/// A precondition on one key; a transaction commits only if all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, Revision),
}

impl Check {
    fn key(&self) -> &str {
        match self {
            Self::Absent(key) | Self::ModRevision(key, _) => key,
        }
    }
}

/// A write in a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleting a key that does not exist is not an error (nor a change).
    Delete {
        key: String,
    },
}

/// Checks, then writes, atomically: the store's only write primitive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<Check>,
    pub ops: Vec<Op>,
}

impl Txn {
    /// Create `key` if it does not exist.
    pub fn create(key: &str, value: Vec<u8>) -> Self {
        Self {
            checks: vec![Check::Absent(key.to_owned())],
            ops: vec![Op::Put {
                key: key.to_owned(),
                value,
            }],
        }
    }

    /// Replace `key` if it was last written at `revision`.
    pub fn update(key: &str, revision: Revision, value: Vec<u8>) -> Self {
        Self {
            checks: vec![Check::ModRevision(key.to_owned(), revision)],
            ops: vec![Op::Put {
                key: key.to_owned(),
                value,
            }],
        }
    }

    /// Delete `key` if it was last written at `revision`.
    pub fn delete(key: &str, revision: Revision) -> Self {
        Self {
            checks: vec![Check::ModRevision(key.to_owned(), revision)],
            ops: vec![Op::Delete {
                key: key.to_owned(),
            }],
        }
    }
}

/// How a transaction ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// All checks held; the writes are durable at `revision` (the current
    /// revision if no op changed anything).
    Committed { revision: Revision },
    /// A check failed and nothing was written. `current` holds each checked
    /// key's present state, in check order, so the caller can tell
    /// "already exists" from "conflict" from "gone" without another read.
    Rejected { current: Vec<Option<KeyValue>> },
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The key after the change. For a delete: empty value, `mod_revision`
    /// is the deleting revision.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The event of `kind` on `key` at `revision`. The key keeps the
    /// creation revision of its previous value, if it had one.
    pub(crate) fn at(
        kind: EventKind,
        key: String,
        value: Vec<u8>,
        revision: Revision,
        prev: Option<KeyValue>,
    ) -> Self {
        Self {
            kind,
            kv: KeyValue {
                key,
                value,
                create_revision: prev.as_ref().map_or(revision, |prev| prev.create_revision),
                mod_revision: revision,
            },
            prev,
        }
    }
}

/// Changes in revision order, each revision's events together.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Vec<Event>, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `compacted` is the compaction revision when the store says it.
    #[error("revision {requested} has been compacted")]
    Compacted {
        requested: Revision,
        compacted: Option<Revision>,
    },
    /// `current` is the store's revision when the store says it.
    #[error("revision {requested} is newer than the store's")]
    FutureRevision {
        requested: Revision,
        current: Option<Revision>,
    },
    #[error("embedded store {path}: {source}")]
    Embedded {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// A group commit failed: every transaction in the group gets this.
    #[error("embedded store {path}: commit failed: {reason}")]
    CommitFailed { path: PathBuf, reason: String },
    #[error("embedded store task failed: {0}")]
    EmbeddedTask(#[from] tokio::task::JoinError),
    #[error("etcd {operation}: {source}")]
    Etcd {
        operation: &'static str,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("etcd watch on {prefix} ended: {reason}")]
    EtcdWatchEnded { prefix: String, reason: String },
    #[error("corrupt record at {at}: {reason}")]
    Corrupt { at: String, reason: &'static str },
}

/// A revisioned key-value store.
///
/// Methods return `Send` futures so the API server can hold a store in a
/// multi-threaded runtime; implementations are cheap to clone handles.
pub trait Store: Clone + Send + Sync + 'static {
    /// One key at the current revision.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Keys under a prefix, optionally at a past revision.
    fn range(
        &self,
        request: RangeRequest,
    ) -> impl Future<Output = Result<Range, StoreError>> + Send;

    /// Checks then writes, atomically and durably.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, StoreError>> + Send;

    /// Every change under `prefix` after revision `after`, then live ones.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;

    /// Forgets history up to `revision`: reads and watches before it fail
    /// with [`StoreError::Compacted`].
    fn compact(&self, revision: Revision) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The current revision.
    fn revision(&self) -> impl Future<Output = Result<Revision, StoreError>> + Send;
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix). `None` when no such key exists (prefix of all 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
