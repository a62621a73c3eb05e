//! The one-machine store: redb tables with etcd's revision semantics.
//!
//! `keys` maps each live key to its record; `history` maps each revision to
//! the events it committed, each with the key's previous value. History
//! serves watches from old revisions and reads at old revisions (the current
//! state with later revisions undone), until compaction drops it. Every
//! commit is fsynced before it is acknowledged (redb's immediate durability),
//! so an acknowledged write survives `kill -9`.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread::JoinHandle,
};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::{
    Check, Event, EventKind, KeyValue, Op, Range, RangeRequest, Revision, Store, StoreError, Txn,
    TxnOutcome, WatchStream,
    codec::{decode_events, decode_record, encode_events, encode_record},
};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Revisions a catching-up watch reads from history per step, bounding the
/// memory one slow watcher can pin.
const CATCH_UP_BATCH: usize = 1024;

/// Live batches buffered per watcher before it falls back to history.
const LIVE_BUFFER: usize = 4096;

/// A redb-backed [`Store`]; clones share one database and its committer.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    committer: Arc<Committer>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    committed: broadcast::Sender<Arc<Batch>>,
}

/// The one thread that commits transactions, in groups: it takes every
/// transaction queued while the previous group was being written and
/// commits them in one redb transaction with one fsync, so N writers
/// waiting on the disk cost one flush, not N. Being the only committer
/// also publishes revisions in order. Callers wait on a oneshot, not on
/// a thread of their own (a blocking-pool thread per write cost thread
/// churn and lock hand-offs: a third of the API server's CPU under the
/// scheduler benchmark). It stops when the last store handle is dropped.
#[derive(Debug)]
struct Committer {
    queue: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    fn start(inner: Arc<Inner>) -> Result<Self, StoreError> {
        let path = inner.path.clone();
        let (queue, requests) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("store-commit".to_owned())
            .spawn(move || {
                while let Ok(first) = requests.recv() {
                    let mut group = vec![first];
                    group.extend(requests.try_iter());
                    // A panic fails this group (its replies are dropped,
                    // which its writers see as a failed commit), not
                    // every later write.
                    let commit = std::panic::AssertUnwindSafe(|| inner.commit_group(group));
                    if std::panic::catch_unwind(commit).is_err() {
                        tracing::error!(path = %inner.path.display(), "a group commit panicked");
                    }
                }
            })
            .map_err(|error| embedded_error(&path, redb::Error::Io(error)))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }
}

impl Drop for Committer {
    /// Closes the queue and waits for the group in progress, so the
    /// database is closed when the store is gone (and can be reopened).
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A transaction waiting for its group, and where its outcome goes.
struct Request {
    txn: Txn,
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

/// One committed revision's events.
#[derive(Debug)]
struct Batch {
    revision: Revision,
    events: Vec<Event>,
}

impl EmbeddedStore {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| embedded_error(path, e))?;
        let write = db.begin_write().map_err(|e| embedded_error(path, e))?;
        {
            write
                .open_table(KEYS)
                .map_err(|e| embedded_error(path, e))?;
            write
                .open_table(HISTORY)
                .map_err(|e| embedded_error(path, e))?;
            let mut meta = write
                .open_table(META)
                .map_err(|e| embedded_error(path, e))?;
            if meta
                .get(META_REVISION)
                .map_err(|e| embedded_error(path, e))?
                .is_none()
            {
                // etcd's first revision is 1; 0 means "current" in requests.
                meta.insert(META_REVISION, 1)
                    .map_err(|e| embedded_error(path, e))?;
                meta.insert(META_COMPACTED, 0)
                    .map_err(|e| embedded_error(path, e))?;
            }
        }
        write.commit().map_err(|e| embedded_error(path, e))?;
        let (committed, _) = broadcast::channel(LIVE_BUFFER);
        let inner = Arc::new(Inner {
            db,
            path: path.to_owned(),
            committed,
        });
        Ok(Self {
            committer: Arc::new(Committer::start(Arc::clone(&inner))?),
            inner,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner)).await?
    }
}

fn embedded_error(path: &Path, source: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded {
        path: path.to_owned(),
        source: Box::new(source.into()),
    }
}

impl Inner {
    fn fail<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        move |source| embedded_error(&self.path, source)
    }

    fn meta(
        &self,
        table: &impl redb::ReadableTable<&'static str, i64>,
        name: &str,
    ) -> Result<Revision, StoreError> {
        Ok(table
            .get(name)
            .map_err(self.fail())?
            .map(|guard| guard.value())
            .unwrap_or_default())
    }

    /// Commits a group (on the committer thread). Each transaction still
    /// gets its own revision and is checked against the state its
    /// predecessors in the group left.
    fn commit_group(&self, group: Vec<Request>) {
        let (txns, replies): (Vec<Txn>, Vec<_>) =
            group.into_iter().map(|r| (r.txn, r.reply)).unzip();
        let result = (|| -> Result<(Vec<TxnOutcome>, Vec<Batch>), StoreError> {
            let write = self.db.begin_write().map_err(self.fail())?;
            let mut outcomes = Vec::with_capacity(txns.len());
            let mut batches = Vec::new();
            {
                let mut keys = write.open_table(KEYS).map_err(self.fail())?;
                let mut meta = write.open_table(META).map_err(self.fail())?;
                let mut history = write.open_table(HISTORY).map_err(self.fail())?;
                let mut revision = self.meta(&meta, META_REVISION)?;
                for txn in txns {
                    let (outcome, batch) =
                        self.apply(&mut keys, &mut history, &mut revision, txn)?;
                    outcomes.push(outcome);
                    batches.extend(batch);
                }
                meta.insert(META_REVISION, revision).map_err(self.fail())?;
            }
            write.commit().map_err(self.fail())?;
            Ok((outcomes, batches))
        })();
        match result {
            Ok((outcomes, batches)) => {
                // No receivers is fine: watches catch up from history.
                for batch in batches {
                    let _ = self.committed.send(Arc::new(batch));
                }
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                // Nothing of the group was written; everyone learns why.
                let reason = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::CommitFailed {
                        path: self.path.clone(),
                        reason: reason.clone(),
                    }));
                }
            }
        }
    }

    /// One transaction inside a group; `revision` is the last assigned.
    fn apply(
        &self,
        keys: &mut redb::Table<'_, &'static str, &'static [u8]>,
        history: &mut redb::Table<'_, i64, &'static [u8]>,
        revision: &mut Revision,
        txn: Txn,
    ) -> Result<(TxnOutcome, Option<Batch>), StoreError> {
        let current = txn
            .checks
            .iter()
            .map(|check| read_key(self, keys, check.key()))
            .collect::<Result<Vec<_>, _>>()?;
        let holds = txn
            .checks
            .iter()
            .zip(&current)
            .all(|(check, kv)| match check {
                Check::Absent(_) => kv.is_none(),
                Check::ModRevision(_, revision) => {
                    kv.as_ref().map(|kv| kv.mod_revision) == Some(*revision)
                }
            });
        if !holds {
            return Ok((TxnOutcome::Rejected { current }, None));
        }
        let next = *revision + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        for op in txn.ops {
            match op {
                Op::Put { key, value } => {
                    let prev = read_key(self, keys, &key)?;
                    let create_revision = prev.as_ref().map_or(next, |kv| kv.create_revision);
                    keys.insert(
                        key.as_str(),
                        encode_record(create_revision, next, &value).as_slice(),
                    )
                    .map_err(self.fail())?;
                    events.push(Event::at(EventKind::Put, key, value, next, prev));
                }
                Op::Delete { key } => {
                    let Some(prev) = read_key(self, keys, &key)? else {
                        continue;
                    };
                    keys.remove(key.as_str()).map_err(self.fail())?;
                    events.push(Event::at(
                        EventKind::Delete,
                        key,
                        Vec::new(),
                        next,
                        Some(prev),
                    ));
                }
            }
        }
        if events.is_empty() {
            // Nothing changed: no new revision (etcd does the same).
            return Ok((
                TxnOutcome::Committed {
                    revision: *revision,
                },
                None,
            ));
        }
        history
            .insert(next, encode_events(&events).as_slice())
            .map_err(self.fail())?;
        *revision = next;
        Ok((
            TxnOutcome::Committed { revision: next },
            Some(Batch {
                revision: next,
                events,
            }),
        ))
    }

    fn range(&self, request: &RangeRequest) -> Result<Range, StoreError> {
        let read = self.db.begin_read().map_err(self.fail())?;
        let meta = read.open_table(META).map_err(self.fail())?;
        let current = self.meta(&meta, META_REVISION)?;
        let compacted = self.meta(&meta, META_COMPACTED)?;
        let keys = read.open_table(KEYS).map_err(self.fail())?;
        let start = request
            .start
            .as_deref()
            .unwrap_or(&request.prefix)
            .max(request.prefix.as_str());
        let limit = if request.limit == 0 {
            usize::MAX
        } else {
            request.limit
        };
        if request.revision == 0 || request.revision == current {
            let mut kvs = Vec::new();
            for entry in keys.range(start..).map_err(self.fail())? {
                let (key, record) = entry.map_err(self.fail())?;
                let key = key.value();
                if !key.starts_with(&request.prefix) {
                    break;
                }
                if kvs.len() == limit {
                    return Ok(Range {
                        kvs,
                        revision: current,
                        more: true,
                    });
                }
                kvs.push(decode_record(key, record.value())?);
            }
            return Ok(Range {
                kvs,
                revision: current,
                more: false,
            });
        }
        if request.revision > current {
            return Err(StoreError::FutureRevision {
                requested: request.revision,
                current: Some(current),
            });
        }
        if request.revision < compacted {
            return Err(StoreError::Compacted {
                requested: request.revision,
                compacted: Some(compacted),
            });
        }
        // The state at a past revision: today's keys, with every later
        // event undone newest first.
        let mut state = BTreeMap::new();
        for entry in keys.range(request.prefix.as_str()..).map_err(self.fail())? {
            let (key, record) = entry.map_err(self.fail())?;
            let key = key.value();
            if !key.starts_with(&request.prefix) {
                break;
            }
            state.insert(key.to_owned(), decode_record(key, record.value())?);
        }
        let history = read.open_table(HISTORY).map_err(self.fail())?;
        for entry in history
            .range(request.revision + 1..)
            .map_err(self.fail())?
            .rev()
        {
            let (revision, events) = entry.map_err(self.fail())?;
            for event in decode_events(revision.value(), events.value())?
                .into_iter()
                .rev()
            {
                if !event.kv.key.starts_with(&request.prefix) {
                    continue;
                }
                match event.prev {
                    Some(prev) => state.insert(event.kv.key, prev),
                    None => state.remove(&event.kv.key),
                };
            }
        }
        let mut matching = state.into_values().filter(|kv| kv.key.as_str() >= start);
        let kvs: Vec<_> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        Ok(Range {
            kvs,
            revision: request.revision,
            more,
        })
    }

    /// Committed batches from `from` on (at most [`CATCH_UP_BATCH`]), and
    /// whether that reached the current revision.
    fn history_from(&self, from: Revision) -> Result<(Vec<Batch>, bool), StoreError> {
        let read = self.db.begin_read().map_err(self.fail())?;
        let meta = read.open_table(META).map_err(self.fail())?;
        let compacted = self.meta(&meta, META_COMPACTED)?;
        if from < compacted {
            return Err(StoreError::Compacted {
                requested: from - 1,
                compacted: Some(compacted),
            });
        }
        let history = read.open_table(HISTORY).map_err(self.fail())?;
        let mut batches = Vec::new();
        for entry in history.range(from..).map_err(self.fail())? {
            if batches.len() == CATCH_UP_BATCH {
                return Ok((batches, false));
            }
            let (revision, events) = entry.map_err(self.fail())?;
            let revision = revision.value();
            batches.push(Batch {
                revision,
                events: decode_events(revision, events.value())?,
            });
        }
        Ok((batches, true))
    }

    /// A watch from `after` needs the history of every later revision;
    /// compaction keeps the compaction revision's own (as etcd does).
    fn check_watchable(&self, after: Revision) -> Result<(), StoreError> {
        let read = self.db.begin_read().map_err(self.fail())?;
        let meta = read.open_table(META).map_err(self.fail())?;
        let compacted = self.meta(&meta, META_COMPACTED)?;
        if after + 1 < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: Some(compacted),
            });
        }
        Ok(())
    }

    /// Runs beside the committer: redb serialises write transactions,
    /// and compaction publishes nothing.
    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(self.fail())?;
        {
            let mut meta = write.open_table(META).map_err(self.fail())?;
            let current = self.meta(&meta, META_REVISION)?;
            if revision > current {
                return Err(StoreError::FutureRevision {
                    requested: revision,
                    current: Some(current),
                });
            }
            if revision <= self.meta(&meta, META_COMPACTED)? {
                return Ok(());
            }
            let mut history = write.open_table(HISTORY).map_err(self.fail())?;
            history
                .retain_in(..revision, |_, _| false)
                .map_err(self.fail())?;
            meta.insert(META_COMPACTED, revision).map_err(self.fail())?;
        }
        write.commit().map_err(self.fail())
    }
}

fn read_key(
    inner: &Inner,
    keys: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<KeyValue>, StoreError> {
    keys.get(key)
        .map_err(inner.fail())?
        .map(|record| decode_record(key, record.value()))
        .transpose()
}

impl Store for EmbeddedStore {
    /// Read inline, not on the blocking pool: a point read comes from
    /// redb's page cache in microseconds, and the thread hop cost more
    /// (5% of the API server's CPU under the scheduler benchmark, which
    /// reads every pod it binds or patches).
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let inner = &self.inner;
        let read = inner.db.begin_read().map_err(inner.fail())?;
        let keys = read.open_table(KEYS).map_err(inner.fail())?;
        read_key(inner, &keys, key)
    }

    async fn range(&self, request: RangeRequest) -> Result<Range, StoreError> {
        self.blocking(move |inner| inner.range(&request)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let stopped = || StoreError::CommitFailed {
            path: self.inner.path.clone(),
            reason: "the committer stopped or its group panicked".to_owned(),
        };
        let (reply, outcome) = oneshot::channel();
        let queue = self.committer.queue.as_ref().ok_or_else(stopped)?;
        queue.send(Request { txn, reply }).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history so no commit falls between them.
        let live = self.inner.committed.subscribe();
        self.blocking(move |inner| inner.check_watchable(after))
            .await?;
        let watch = Watch {
            store: self.clone(),
            prefix: prefix.to_owned(),
            next: after + 1,
            live,
            pending: VecDeque::new(),
            behind: true,
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(watch, Watch::next_batch)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.compact(revision)).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|inner| {
            let read = inner.db.begin_read().map_err(inner.fail())?;
            let meta = read.open_table(META).map_err(inner.fail())?;
            inner.meta(&meta, META_REVISION)
        })
        .await
    }
}

/// One watcher's position: replays history until it reaches the live
/// broadcast, and goes back to history whenever it falls behind the buffer.
struct Watch {
    store: EmbeddedStore,
    prefix: String,
    /// The next revision to deliver.
    next: Revision,
    live: broadcast::Receiver<Arc<Batch>>,
    pending: VecDeque<Vec<Event>>,
    /// Read history before listening live.
    behind: bool,
    ended: bool,
}

impl Watch {
    async fn next_batch(mut self) -> Option<(Result<Vec<Event>, StoreError>, Self)> {
        loop {
            if let Some(events) = self.pending.pop_front() {
                return Some((Ok(events), self));
            }
            if self.ended {
                return None;
            }
            if self.behind {
                let from = self.next;
                match self
                    .store
                    .blocking(move |inner| inner.history_from(from))
                    .await
                {
                    Ok((batches, caught_up)) => {
                        for batch in batches {
                            self.accept(&batch);
                        }
                        self.behind = !caught_up;
                    }
                    Err(error) => {
                        self.ended = true;
                        return Some((Err(error), self));
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(batch) if batch.revision < self.next => {}
                Ok(batch) if batch.revision == self.next => self.accept(&batch),
                // A gap (or a lagged buffer): history has what was missed.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.behind = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn accept(&mut self, batch: &Batch) {
        self.next = batch.revision + 1;
        let events: Vec<Event> = batch
            .events
            .iter()
            .filter(|event| event.kv.key.starts_with(&self.prefix))
            .cloned()
            .collect();
        if !events.is_empty() {
            self.pending.push_back(events);
        }
    }
}
