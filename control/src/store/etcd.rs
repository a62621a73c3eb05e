//! [`Store`] on a real etcd server (v3 API through etcd-client).

use std::collections::VecDeque;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, EventType, GetOptions, TxnOp, TxnOpResponse,
    WatchOptions,
};

use super::{
    Check, Event, EventKind, KeyValue, Op, Range, RangeRequest, Revision, Store, StoreError, Txn,
    TxnOutcome, WatchStream, prefix_end,
};

/// A connection to an etcd cluster; clones share it.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the given client URLs (`http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let client = Client::connect(endpoints, None)
            .await
            .map_err(|e| etcd_error("connect", e, 0))?;
        Ok(Self { client })
    }
}

/// Maps etcd's revision errors (gRPC OutOfRange with a fixed message) to
/// the store's typed ones; everything else keeps etcd's error.
fn etcd_error(
    operation: &'static str,
    error: etcd_client::Error,
    requested: Revision,
) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &error {
        if status
            .message()
            .contains("required revision has been compacted")
        {
            return StoreError::Compacted {
                requested,
                compacted: None,
            };
        }
        if status
            .message()
            .contains("required revision is a future revision")
        {
            return StoreError::FutureRevision {
                requested,
                current: None,
            };
        }
    }
    StoreError::Etcd {
        operation,
        source: Box::new(error),
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: String::from_utf8(kv.key().to_vec()).map_err(|_| StoreError::Corrupt {
            at: String::from_utf8_lossy(kv.key()).into_owned(),
            reason: "key is not UTF-8",
        })?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header
        .map(etcd_client::ResponseHeader::revision)
        .unwrap_or_default()
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let response = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| etcd_error("get", e, 0))?;
        response.kvs().first().map(key_value).transpose()
    }

    async fn range(&self, request: RangeRequest) -> Result<Range, StoreError> {
        let start = request
            .start
            .as_deref()
            .unwrap_or(&request.prefix)
            .max(request.prefix.as_str());
        let mut options = GetOptions::new().with_revision(request.revision);
        options = match prefix_end(request.prefix.as_bytes()) {
            Some(end) => options.with_range(end),
            None => options.with_from_key(),
        };
        if request.limit > 0 {
            options = options.with_limit(i64::try_from(request.limit).unwrap_or(i64::MAX));
        }
        let response = self
            .client
            .kv_client()
            .get(start, Some(options))
            .await
            .map_err(|e| etcd_error("range", e, request.revision))?;
        let kvs = response
            .kvs()
            .iter()
            .map(key_value)
            .collect::<Result<_, _>>()?;
        Ok(Range {
            kvs,
            // etcd's header carries the current revision, not the one read.
            revision: match request.revision {
                0 => header_revision(response.header()),
                revision => revision,
            },
            more: response.more(),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<Compare> = txn
            .checks
            .iter()
            .map(|check| match check {
                // A missing key has version 0.
                Check::Absent(key) => Compare::version(key.as_str(), CompareOp::Equal, 0),
                Check::ModRevision(key, revision) => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let reads: Vec<TxnOp> = txn
            .checks
            .iter()
            .map(|check| TxnOp::get(check.key(), None))
            .collect();
        let request = etcd_client::Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(reads);
        let response = self
            .client
            .kv_client()
            .txn(request)
            .await
            .map_err(|e| etcd_error("txn", e, 0))?;
        if response.succeeded() {
            return Ok(TxnOutcome::Committed {
                revision: header_revision(response.header()),
            });
        }
        let current = response
            .op_responses()
            .iter()
            .map(|read| match read {
                TxnOpResponse::Get(get) => get.kvs().first().map(key_value).transpose(),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(TxnOutcome::Rejected { current })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        // etcd reports a compacted start revision after creating the watch;
        // a read at that revision reports it up front, as the embedded
        // store does. (A compaction racing this still ends the stream.)
        if after < self.revision().await? {
            let probe = RangeRequest {
                prefix: prefix.to_owned(),
                limit: 1,
                revision: after + 1,
                ..RangeRequest::default()
            };
            self.range(probe).await?;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after + 1);
        let mut stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(|e| etcd_error("watch", e, after))?;
        // The first response confirms creation or says why not.
        let first = stream
            .message()
            .await
            .map_err(|e| etcd_error("watch", e, after))?
            .ok_or_else(|| StoreError::EtcdWatchEnded {
                prefix: prefix.to_owned(),
                reason: "stream closed before the watch was created".to_owned(),
            })?;
        if first.canceled() {
            return Err(watch_canceled(prefix, after, &first));
        }
        let state = EtcdWatch {
            stream,
            prefix: prefix.to_owned(),
            after,
            pending: VecDeque::new(),
            ended: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            EtcdWatch::next_batch,
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self
            .client
            .kv_client()
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => match etcd_error("compact", error, revision) {
                // Compacting to an already compacted revision is a no-op,
                // as it is for the embedded store.
                StoreError::Compacted { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let response = self
            .client
            .kv_client()
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| etcd_error("revision", e, 0))?;
        Ok(header_revision(response.header()))
    }
}

fn watch_canceled(
    prefix: &str,
    after: Revision,
    response: &etcd_client::WatchResponse,
) -> StoreError {
    if response.compact_revision() > 0 {
        StoreError::Compacted {
            requested: after,
            compacted: Some(response.compact_revision()),
        }
    } else {
        StoreError::EtcdWatchEnded {
            prefix: prefix.to_owned(),
            reason: response.cancel_reason().to_owned(),
        }
    }
}

/// One etcd watch, regrouped into one batch per revision.
struct EtcdWatch {
    stream: etcd_client::WatchStream,
    prefix: String,
    /// The last revision delivered.
    after: Revision,
    /// Revisions received but not yet delivered.
    pending: VecDeque<Vec<Event>>,
    ended: bool,
}

impl EtcdWatch {
    async fn next_batch(mut self) -> Option<(Result<Vec<Event>, StoreError>, Self)> {
        while self.pending.is_empty() {
            if self.ended {
                return None;
            }
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return None,
                Err(error) => {
                    self.ended = true;
                    return Some((Err(etcd_error("watch", error, self.after)), self));
                }
            };
            if response.canceled() {
                self.ended = true;
                let error = watch_canceled(&self.prefix, self.after, &response);
                return Some((Err(error), self));
            }
            match group_by_revision(response.events()) {
                Ok(batches) => self.pending.extend(batches),
                Err(error) => {
                    self.ended = true;
                    return Some((Err(error), self));
                }
            }
        }
        let events = self.pending.pop_front()?;
        self.after = events[0].kv.mod_revision;
        Some((Ok(events), self))
    }
}

fn group_by_revision(events: &[etcd_client::Event]) -> Result<Vec<Vec<Event>>, StoreError> {
    let mut batches: Vec<Vec<Event>> = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let prev = event.prev_kv().map(key_value).transpose()?;
        let converted = Event {
            kind: match event.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            },
            kv: key_value(kv)?,
            prev,
        };
        match batches.last_mut() {
            Some(batch) if batch[0].kv.mod_revision == converted.kv.mod_revision => {
                batch.push(converted)
            }
            _ => batches.push(vec![converted]),
        }
    }
    Ok(batches)
}
