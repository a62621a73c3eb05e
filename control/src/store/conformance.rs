//! One suite, two stores: every case runs against [`EmbeddedStore`] and
//! against [`EtcdStore`] on a real etcd server started for the case.

use std::time::Duration;

use futures::StreamExt as _;

use super::{
    Check, EmbeddedStore, EtcdStore, Event, EventKind, Op, RangeRequest, Revision, Store,
    StoreError, Txn, TxnOutcome, WatchStream,
};
use crate::etcd_process::EtcdProcess;

/// Keeps a store's backing files (and server) alive for one case.
struct Backing {
    _dir: tempfile::TempDir,
    _etcd: Option<EtcdProcess>,
}

async fn embedded() -> (EmbeddedStore, Backing) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    (
        store,
        Backing {
            _dir: dir,
            _etcd: None,
        },
    )
}

async fn etcd() -> (EtcdStore, Backing) {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdProcess::start(dir.path()).await.unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint().to_owned()])
        .await
        .unwrap();
    (
        store,
        Backing {
            _dir: dir,
            _etcd: Some(etcd),
        },
    )
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _backing) = super::embedded().await;
                    super::$case(store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _backing) = super::etcd().await;
                    super::$case(store).await;
                }
            )*
        }
    };
}

suite!(
    fresh_store_is_at_revision_one,
    create_fails_when_the_key_exists,
    update_needs_the_current_mod_revision,
    delete_needs_the_current_mod_revision,
    writes_in_one_txn_share_a_revision,
    range_pages_through_a_prefix_in_key_order,
    range_at_a_past_revision_sees_that_state,
    range_at_a_future_revision_fails,
    watch_replays_history_then_follows_live_changes,
    watch_sees_only_its_prefix,
    compaction_expires_old_reads_and_watches,
    concurrent_creates_of_one_key_commit_once,
    concurrent_writers_are_watched_in_revision_order,
);

async fn committed(store: &impl Store, txn: Txn) -> Revision {
    match store.txn(txn).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        TxnOutcome::Rejected { current } => panic!("rejected; current state {current:?}"),
    }
}

async fn put(store: &impl Store, key: &str, value: &str) -> Revision {
    let txn = Txn {
        checks: Vec::new(),
        ops: vec![Op::Put {
            key: key.to_owned(),
            value: value.as_bytes().to_vec(),
        }],
    };
    committed(store, txn).await
}

async fn next_events(watch: &mut WatchStream) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch delivered nothing in 10 s")
        .expect("watch ended")
        .expect("watch failed")
}

fn summary(events: &[Event]) -> Vec<(EventKind, String, String, Option<String>)> {
    events
        .iter()
        .map(|event| {
            (
                event.kind,
                event.kv.key.clone(),
                String::from_utf8(event.kv.value.clone()).unwrap(),
                event
                    .prev
                    .as_ref()
                    .map(|prev| String::from_utf8(prev.value.clone()).unwrap()),
            )
        })
        .collect()
}

fn keys_and_values(range: &super::Range) -> Vec<(&str, &[u8])> {
    range
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect()
}

async fn fresh_store_is_at_revision_one(store: impl Store) {
    assert_eq!(store.revision().await.unwrap(), 1);
    assert_eq!(store.get("/nothing").await.unwrap(), None);
}

async fn create_fails_when_the_key_exists(store: impl Store) {
    let revision = committed(&store, Txn::create("/a", b"one".to_vec())).await;
    assert_eq!(revision, 2);
    let kv = store.get("/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.value.as_slice()),
        (2, 2, &b"one"[..])
    );
    match store.txn(Txn::create("/a", b"two".to_vec())).await.unwrap() {
        TxnOutcome::Rejected { current } => assert_eq!(current, vec![Some(kv)]),
        other => panic!("second create: {other:?}"),
    }
    assert_eq!(store.revision().await.unwrap(), 2);
}

async fn update_needs_the_current_mod_revision(store: impl Store) {
    let created = committed(&store, Txn::create("/a", b"one".to_vec())).await;
    let updated = committed(&store, Txn::update("/a", created, b"two".to_vec())).await;
    assert_eq!(updated, created + 1);
    match store
        .txn(Txn::update("/a", created, b"stale".to_vec()))
        .await
        .unwrap()
    {
        TxnOutcome::Rejected { current } => {
            let current = current[0].as_ref().unwrap();
            assert_eq!(
                (current.mod_revision, current.value.as_slice()),
                (updated, &b"two"[..])
            );
            assert_eq!(current.create_revision, created);
        }
        other => panic!("stale update: {other:?}"),
    }
    match store
        .txn(Txn::update("/missing", created, b"x".to_vec()))
        .await
        .unwrap()
    {
        TxnOutcome::Rejected { current } => assert_eq!(current, vec![None]),
        other => panic!("update of a missing key: {other:?}"),
    }
}

async fn delete_needs_the_current_mod_revision(store: impl Store) {
    let created = committed(&store, Txn::create("/a", b"one".to_vec())).await;
    let updated = committed(&store, Txn::update("/a", created, b"two".to_vec())).await;
    assert!(matches!(
        store.txn(Txn::delete("/a", created)).await.unwrap(),
        TxnOutcome::Rejected { .. }
    ));
    let deleted = committed(&store, Txn::delete("/a", updated)).await;
    assert_eq!(deleted, updated + 1);
    assert_eq!(store.get("/a").await.unwrap(), None);
    // Deleting what is not there changes nothing, not even the revision.
    let unchanged = Txn {
        checks: Vec::new(),
        ops: vec![Op::Delete {
            key: "/a".to_owned(),
        }],
    };
    assert_eq!(committed(&store, unchanged).await, deleted);
}

async fn writes_in_one_txn_share_a_revision(store: impl Store) {
    let txn = Txn {
        checks: vec![
            Check::Absent("/a".to_owned()),
            Check::Absent("/b".to_owned()),
        ],
        ops: vec![
            Op::Put {
                key: "/a".to_owned(),
                value: b"1".to_vec(),
            },
            Op::Put {
                key: "/b".to_owned(),
                value: b"2".to_vec(),
            },
        ],
    };
    let revision = committed(&store, txn.clone()).await;
    let a = store.get("/a").await.unwrap().unwrap();
    let b = store.get("/b").await.unwrap().unwrap();
    assert_eq!((a.mod_revision, b.mod_revision), (revision, revision));
    // One failed check rejects every write.
    let mut partly = txn;
    partly.checks[0] = Check::ModRevision("/a".to_owned(), revision);
    partly.ops.push(Op::Put {
        key: "/c".to_owned(),
        value: b"3".to_vec(),
    });
    assert!(matches!(
        store.txn(partly).await.unwrap(),
        TxnOutcome::Rejected { .. }
    ));
    assert_eq!(store.get("/c").await.unwrap(), None);
}

async fn range_pages_through_a_prefix_in_key_order(store: impl Store) {
    for key in ["/r/c", "/r/a", "/r/b", "/r/d", "/s/a", "/q/z"] {
        put(&store, key, key).await;
    }
    let mut request = RangeRequest {
        prefix: "/r/".to_owned(),
        limit: 3,
        ..RangeRequest::default()
    };
    let first = store.range(request.clone()).await.unwrap();
    assert_eq!(
        keys_and_values(&first),
        [("/r/a", &b"/r/a"[..]), ("/r/b", b"/r/b"), ("/r/c", b"/r/c")]
    );
    assert!(first.more);
    assert_eq!(first.revision, store.revision().await.unwrap());
    request.start = Some("/r/c\0".to_owned());
    request.revision = first.revision;
    let second = store.range(request.clone()).await.unwrap();
    assert_eq!(keys_and_values(&second), [("/r/d", &b"/r/d"[..])]);
    assert!(!second.more);
    request.limit = 0;
    request.start = None;
    assert_eq!(store.range(request).await.unwrap().kvs.len(), 4);
}

async fn range_at_a_past_revision_sees_that_state(store: impl Store) {
    let a = committed(&store, Txn::create("/p/a", b"a1".to_vec())).await;
    let b = committed(&store, Txn::create("/p/b", b"b1".to_vec())).await;
    let then = b;
    committed(&store, Txn::update("/p/a", a, b"a2".to_vec())).await;
    committed(&store, Txn::delete("/p/b", b)).await;
    committed(&store, Txn::create("/p/c", b"c1".to_vec())).await;
    let past = RangeRequest {
        prefix: "/p/".to_owned(),
        revision: then,
        ..RangeRequest::default()
    };
    let old = store.range(past.clone()).await.unwrap();
    assert_eq!(
        keys_and_values(&old),
        [("/p/a", &b"a1"[..]), ("/p/b", b"b1")]
    );
    assert_eq!(old.revision, then);
    assert_eq!(old.kvs[0].mod_revision, a);
    let paged = store
        .range(RangeRequest { limit: 1, ..past })
        .await
        .unwrap();
    assert_eq!(keys_and_values(&paged), [("/p/a", &b"a1"[..])]);
    assert!(paged.more);
    let now = store
        .range(RangeRequest {
            prefix: "/p/".to_owned(),
            ..RangeRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        keys_and_values(&now),
        [("/p/a", &b"a2"[..]), ("/p/c", b"c1")]
    );
}

async fn range_at_a_future_revision_fails(store: impl Store) {
    let current = put(&store, "/a", "1").await;
    let request = RangeRequest {
        prefix: "/".to_owned(),
        revision: current + 5,
        ..RangeRequest::default()
    };
    assert!(matches!(
        store.range(request).await,
        Err(StoreError::FutureRevision { requested, .. }) if requested == current + 5
    ));
}

async fn watch_replays_history_then_follows_live_changes(store: impl Store) {
    let a = committed(&store, Txn::create("/w/a", b"1".to_vec())).await;
    let start = a;
    let a2 = committed(&store, Txn::update("/w/a", a, b"2".to_vec())).await;
    committed(&store, Txn::create("/w/b", b"3".to_vec())).await;
    let mut watch = store.watch("/w/", start).await.unwrap();
    let first = next_events(&mut watch).await;
    assert_eq!(
        summary(&first),
        [(
            EventKind::Put,
            "/w/a".to_owned(),
            "2".to_owned(),
            Some("1".to_owned())
        )]
    );
    assert_eq!(first[0].kv.mod_revision, a2);
    assert_eq!(first[0].kv.create_revision, a);
    assert_eq!(
        summary(&next_events(&mut watch).await),
        [(EventKind::Put, "/w/b".to_owned(), "3".to_owned(), None)]
    );
    let deleted = committed(&store, Txn::delete("/w/a", a2)).await;
    let live = next_events(&mut watch).await;
    assert_eq!(
        summary(&live),
        [(
            EventKind::Delete,
            "/w/a".to_owned(),
            String::new(),
            Some("2".to_owned())
        )]
    );
    assert_eq!(live[0].kv.mod_revision, deleted);
    let txn = Txn {
        checks: Vec::new(),
        ops: vec![
            Op::Put {
                key: "/w/c".to_owned(),
                value: b"4".to_vec(),
            },
            Op::Put {
                key: "/w/d".to_owned(),
                value: b"5".to_vec(),
            },
        ],
    };
    let together = committed(&store, txn).await;
    let batch = next_events(&mut watch).await;
    assert_eq!(
        batch.len(),
        2,
        "one revision arrives as one batch: {batch:?}"
    );
    assert!(batch.iter().all(|event| event.kv.mod_revision == together));
}

async fn watch_sees_only_its_prefix(store: impl Store) {
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("/mine/", start).await.unwrap();
    put(&store, "/other/a", "x").await;
    put(&store, "/mine", "not under the prefix").await;
    put(&store, "/mine/a", "y").await;
    assert_eq!(
        summary(&next_events(&mut watch).await),
        [(EventKind::Put, "/mine/a".to_owned(), "y".to_owned(), None)]
    );
}

async fn compaction_expires_old_reads_and_watches(store: impl Store) {
    let first = put(&store, "/c/a", "1").await;
    let second = put(&store, "/c/a", "2").await;
    let third = put(&store, "/c/a", "3").await;
    store.compact(second).await.unwrap();
    // Compacting again, or to an older revision, is a no-op.
    store.compact(first).await.unwrap();
    let at = |revision| RangeRequest {
        prefix: "/c/".to_owned(),
        revision,
        ..RangeRequest::default()
    };
    assert!(matches!(
        store.range(at(first)).await,
        Err(StoreError::Compacted { requested, .. }) if requested == first
    ));
    let kept = store.range(at(second)).await.unwrap();
    assert_eq!(keys_and_values(&kept), [("/c/a", &b"2"[..])]);
    // As etcd: a watch may start at the compaction revision, not before.
    let too_old = store.watch("/c/", first - 1).await;
    assert!(
        matches!(too_old, Err(StoreError::Compacted { .. })),
        "{:?}",
        too_old.err()
    );
    let mut watch = store.watch("/c/", first).await.unwrap();
    assert_eq!(next_events(&mut watch).await[0].kv.mod_revision, second);
    assert_eq!(next_events(&mut watch).await[0].kv.mod_revision, third);
    assert!(matches!(
        store.compact(third + 10).await,
        Err(StoreError::FutureRevision { .. })
    ));
}

async fn concurrent_creates_of_one_key_commit_once(store: impl Store) {
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.txn(Txn::create("/once", vec![i])).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for attempt in attempts {
        if matches!(attempt.await.unwrap(), TxnOutcome::Committed { .. }) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

async fn concurrent_writers_are_watched_in_revision_order(store: impl Store) {
    const WRITERS: usize = 4;
    const WRITES: usize = 50;
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("/burst/", start).await.unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for i in 0..WRITES {
                    revisions.push(put(&store, &format!("/burst/{writer}/{i}"), "v").await);
                }
                revisions
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    acknowledged.sort_unstable();
    let mut seen = Vec::new();
    while seen.len() < WRITERS * WRITES {
        for event in next_events(&mut watch).await {
            seen.push(event.kv.mod_revision);
        }
    }
    assert_eq!(
        seen, acknowledged,
        "every acknowledged write once, in order"
    );
}
