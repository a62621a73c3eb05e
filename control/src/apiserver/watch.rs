//! The watch cache: one store watch feeds every client watch.
//!
//! Decoded events go into a bounded window (the last [`WINDOW`] events)
//! and out on a broadcast channel. A client watch from resourceVersion N
//! replays the window's events after N and then follows the broadcast;
//! subscribing and copying happen under one lock, so nothing is missed or
//! repeated. A watch older than the window gets 410 Gone and re-lists, as
//! with kube-apiserver's cacher. Each event's JSON is encoded once, however
//! many watchers receive it.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{
    selectors::{FieldSelector, LabelSelector},
    status::ApiError,
    stored,
};
use crate::store::Revision;

/// Events kept for watches that start in the past. Upstream sizes its
/// window by time (75 s); a count bounds memory (about 10 MB at 1 KiB).
const WINDOW: usize = 10_000;

/// Live events queued per watcher before a slow watcher is cut off (it
/// re-watches from its last resourceVersion, as clients do on any close).
const LIVE_QUEUE: usize = 16_384;

/// How often watchers that asked for bookmarks get one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, kept as the stored bytes: most watchers need only the
/// JSON they receive, which is those bytes with `resourceVersion` set,
/// so the object tree is built only for a watcher that filters (label or
/// field selector), renders a Table, or indexes it (RBAC).
#[derive(Debug)]
pub struct CachedEvent {
    pub revision: Revision,
    pub key: String,
    pub kind: EventType,
    /// The stored (decrypted) object after the change; for a delete, its
    /// last state, sent with the deleting revision as upstream does.
    raw: Bytes,
    /// The stored object before a modification.
    prev_raw: Option<Bytes>,
    object: OnceLock<Value>,
    prev: OnceLock<Option<Value>>,
    encoded: OnceLock<Bytes>,
}

impl CachedEvent {
    pub fn new(
        revision: Revision,
        key: String,
        kind: EventType,
        raw: Bytes,
        prev_raw: Option<Bytes>,
    ) -> Self {
        Self {
            revision,
            key,
            kind,
            raw,
            prev_raw,
            object: OnceLock::new(),
            prev: OnceLock::new(),
            encoded: OnceLock::new(),
        }
    }

    /// The object as watchers see it, decoded on first use.
    pub fn object(&self) -> &Value {
        self.object.get_or_init(|| {
            stored::decode(&self.raw, self.revision).unwrap_or_else(|error| self.not_json(&error))
        })
    }

    /// The object before a modification (for selectors), decoded on
    /// first use.
    fn prev(&self) -> Option<&Value> {
        self.prev
            .get_or_init(|| {
                self.prev_raw.as_ref().map(|raw| {
                    serde_json::from_slice(raw).unwrap_or_else(|error| self.not_json(&error))
                })
            })
            .as_ref()
    }

    /// The object's JSON, made on first use without decoding it
    /// ([`stored::encode`]).
    pub fn encoded(&self) -> &Bytes {
        self.encoded.get_or_init(|| {
            stored::encode(&self.raw, self.revision)
                .unwrap_or_else(|error| {
                    self.not_json(&error);
                    b"null".to_vec()
                })
                .into()
        })
    }

    /// Logs a damaged stored object, which watchers then see as null.
    fn not_json(&self, error: &serde_json::Error) -> Value {
        tracing::warn!(%error, key = self.key, "watch cache: a stored object is not JSON");
        Value::Null
    }
}

/// What a watcher encodes: a cached event, or an object made for it
/// (initial state, bookmarks).
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    Event(&'a CachedEvent),
    Object(&'a Value),
}

impl Payload<'_> {
    pub fn object(&self) -> &Value {
        match self {
            Self::Event(event) => event.object(),
            Self::Object(object) => object,
        }
    }

    fn encoded(&self) -> Bytes {
        match self {
            Self::Event(event) => event.encoded().clone(),
            Self::Object(object) => Bytes::from(serde_json::to_vec(object).unwrap_or_default()),
        }
    }
}

struct Window {
    events: VecDeque<Arc<CachedEvent>>,
    /// Watches from this revision or later can be served.
    oldest: Revision,
    /// The newest revision seen.
    newest: Revision,
    live: broadcast::Sender<Arc<CachedEvent>>,
}

/// A new watcher's replay of buffered events and its live receiver.
type Subscription = (Vec<Arc<CachedEvent>>, broadcast::Receiver<Arc<CachedEvent>>);

/// Shared by the feeding task and every client watch.
pub struct WatchCache {
    window: Mutex<Window>,
}

impl std::fmt::Debug for WatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchCache").finish_non_exhaustive()
    }
}

impl WatchCache {
    /// A cache that starts at `revision` (it serves watches from there on).
    pub fn new(revision: Revision) -> Self {
        let (live, _) = broadcast::channel(LIVE_QUEUE);
        Self {
            window: Mutex::new(Window {
                events: VecDeque::with_capacity(WINDOW),
                oldest: revision,
                newest: revision,
                live,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one revision's events (in order) and publishes them.
    pub fn push(&self, revision: Revision, events: Vec<CachedEvent>) {
        let mut window = self.lock();
        for event in events {
            let event = Arc::new(event);
            if window.events.len() == WINDOW
                && let Some(evicted) = window.events.pop_front()
            {
                window.oldest = window.oldest.max(evicted.revision);
            }
            window.events.push_back(Arc::clone(&event));
            // No watchers is fine.
            let _ = window.live.send(event);
        }
        window.newest = window.newest.max(revision);
    }

    /// Forgets everything and ends every watch: the store watch broke and
    /// history between may be lost. Clients re-list and re-watch.
    pub fn reset(&self, revision: Revision) {
        let mut window = self.lock();
        window.events.clear();
        window.oldest = revision;
        window.newest = revision;
        window.live = broadcast::channel(LIVE_QUEUE).0;
    }

    /// The newest revision the cache has seen.
    pub fn revision(&self) -> Revision {
        self.lock().newest
    }

    /// Buffered events after `after`, and a receiver for what follows.
    fn subscribe(&self, after: Revision) -> Result<Subscription, ApiError> {
        let window = self.lock();
        if after < window.oldest {
            return Err(ApiError::Gone {
                message: format!("too old resource version: {after} ({})", window.oldest),
            });
        }
        let replay = window
            .events
            .iter()
            .filter(|event| event.revision > after)
            .cloned()
            .collect();
        Ok((replay, window.live.subscribe()))
    }
}

/// Turns an event into the bytes one watcher receives (JSON or Table).
pub type Encoder = Box<dyn Fn(&str, Payload<'_>) -> Bytes + Send>;

/// One client watch.
pub struct WatchSpec {
    /// Key prefix: the resource, and the namespace if one was given.
    pub prefix: String,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// Deliver changes after this revision.
    pub after: Revision,
    /// Objects to send as ADDED first (sendInitialEvents, or no RV).
    pub initial: Vec<Value>,
    pub bookmarks: bool,
    /// Mark the end of the initial events with a bookmark (streaming list).
    pub initial_end_bookmark: bool,
    pub timeout: Duration,
    /// apiVersion and kind of bookmark objects.
    pub api_version: &'static str,
    pub kind: &'static str,
}

impl std::fmt::Debug for WatchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchSpec")
            .field("prefix", &self.prefix)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl WatchSpec {
    fn selects(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// What this watcher sees of an event: upstream turns a change that
    /// moves an object into or out of the selection into ADDED / DELETED.
    fn view(&self, event: &CachedEvent) -> Option<EventType> {
        if !event.key.starts_with(&self.prefix) {
            return None;
        }
        // Without selectors every object is selected: decode nothing.
        let filtering = !(self.labels.is_empty() && self.fields.is_empty());
        let now = !filtering || self.selects(event.object());
        let before = !filtering || event.prev().is_some_and(|prev| self.selects(prev));
        match event.kind {
            EventType::Added => now.then_some(EventType::Added),
            EventType::Deleted => now.then_some(EventType::Deleted),
            EventType::Modified => match (before, now) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            },
        }
    }

    fn bookmark(&self, revision: Revision, initial_end: bool) -> Value {
        let mut metadata = json!({ "resourceVersion": revision.to_string() });
        if initial_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        json!({ "apiVersion": self.api_version, "kind": self.kind, "metadata": metadata })
    }
}

/// Starts a client watch; the stream ends at the timeout, when the client
/// goes away, or when the watcher falls too far behind.
/// `guard` lives as long as the watch (it counts open watches).
pub fn start(
    cache: &WatchCache,
    spec: WatchSpec,
    encode: Encoder,
    guard: impl Send + 'static,
) -> Result<mpsc::Receiver<Result<Bytes, Infallible>>, ApiError> {
    let (replay, mut live) = cache.subscribe(spec.after)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _guard = guard;
        let deadline = tokio::time::sleep(spec.timeout);
        tokio::pin!(deadline);
        let mut last = spec.after;
        for object in &spec.initial {
            if tx
                .send(Ok(encode("ADDED", Payload::Object(object))))
                .await
                .is_err()
            {
                return;
            }
        }
        if spec.initial_end_bookmark
            && tx
                .send(Ok(encode(
                    "BOOKMARK",
                    Payload::Object(&spec.bookmark(last, true)),
                )))
                .await
                .is_err()
        {
            return;
        }
        for event in replay {
            if let Some(kind) = spec.view(&event) {
                last = event.revision;
                if tx
                    .send(Ok(encode(kind.as_str(), Payload::Event(&event))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut bookmarks = tokio::time::interval(BOOKMARK_INTERVAL);
        bookmarks.tick().await;
        // The newest revision received, matching or not: a bookmark may
        // claim only what this watcher has already been through.
        let mut seen = last;
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = bookmarks.tick(), if spec.bookmarks => {
                    // Take in what is queued first, so the bookmark's
                    // version covers it.
                    loop {
                        let event = match live.try_recv() {
                            Ok(event) => event,
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            // Lagged or reset: end the watch, as below.
                            Err(_) => return,
                        };
                        seen = seen.max(event.revision);
                        if event.revision > spec.after && let Some(kind) = spec.view(&event) {
                            last = event.revision;
                            if tx.send(Ok(encode(kind.as_str(), Payload::Event(&event)))).await.is_err() {
                                return;
                            }
                        }
                    }
                    if tx.send(Ok(encode("BOOKMARK", Payload::Object(&spec.bookmark(seen.max(last), false))))).await.is_err() {
                        return;
                    }
                }
                received = live.recv() => {
                    let event = match received {
                        Ok(event) => event,
                        // Lagged or reset: end the watch; the client
                        // re-watches from the last version it saw.
                        Err(_) => return,
                    };
                    seen = seen.max(event.revision);
                    // Live events were never in the replay (both come from
                    // one locked subscribe); only what the initial list
                    // already covered is skipped. Comparing with `last`
                    // would drop a second event of the same revision.
                    if event.revision <= spec.after {
                        continue;
                    }
                    if let Some(kind) = spec.view(&event) {
                        last = event.revision;
                        if tx.send(Ok(encode(kind.as_str(), Payload::Event(&event)))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// A watch event line: `{"type":..,"object":..}\n`, reusing a cached
/// event's encoding.
pub fn json_frame(kind: &str, payload: Payload<'_>) -> Bytes {
    let body = payload.encoded();
    let mut frame = Vec::with_capacity(body.len() + 32);
    frame.extend_from_slice(b"{\"type\":\"");
    frame.extend_from_slice(kind.as_bytes());
    frame.extend_from_slice(b"\",\"object\":");
    frame.extend_from_slice(&body);
    frame.extend_from_slice(b"}\n");
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        revision: Revision,
        name: &str,
        kind: EventType,
        labels: Value,
        prev: Option<Value>,
    ) -> CachedEvent {
        let object = json!({"metadata": {"name": name, "labels": labels}});
        let bytes = |v: &Value| Bytes::from(serde_json::to_vec(v).unwrap());
        CachedEvent::new(
            revision,
            format!("/registry/core/pods/ns/{name}"),
            kind,
            bytes(&object),
            prev.as_ref().map(bytes),
        )
    }

    fn spec(after: Revision, selector: &str) -> WatchSpec {
        WatchSpec {
            prefix: "/registry/core/pods/ns/".to_owned(),
            labels: LabelSelector::parse(selector).unwrap(),
            fields: FieldSelector::default(),
            after,
            initial: Vec::new(),
            bookmarks: false,
            initial_end_bookmark: false,
            timeout: Duration::from_secs(30),
            api_version: "v1",
            kind: "Pod",
        }
    }

    async fn frames(
        rx: &mut mpsc::Receiver<Result<Bytes, Infallible>>,
        count: usize,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..count {
            let frame = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            out.push(serde_json::from_slice(&frame).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_watch_replays_the_window_then_follows_live_events() {
        let cache = WatchCache::new(10);
        cache.push(11, vec![event(11, "a", EventType::Added, json!({}), None)]);
        cache.push(12, vec![event(12, "b", EventType::Added, json!({}), None)]);
        let mut rx = start(&cache, spec(11, ""), Box::new(json_frame), ()).unwrap();
        cache.push(13, vec![event(13, "c", EventType::Added, json!({}), None)]);
        let got = frames(&mut rx, 2).await;
        assert_eq!(got[0]["object"]["metadata"]["name"], "b");
        assert_eq!(got[1]["object"]["metadata"]["name"], "c");
        assert!(matches!(cache.subscribe(9), Err(ApiError::Gone { .. })));
    }

    #[tokio::test]
    async fn every_event_of_one_revision_is_delivered() {
        let cache = WatchCache::new(1);
        let mut rx = start(&cache, spec(1, ""), Box::new(json_frame), ()).unwrap();
        cache.push(
            2,
            vec![
                event(2, "a", EventType::Added, json!({}), None),
                event(2, "b", EventType::Added, json!({}), None),
            ],
        );
        let got = frames(&mut rx, 2).await;
        assert_eq!(got[1]["object"]["metadata"]["name"], "b");
    }

    #[tokio::test]
    async fn leaving_a_label_selection_is_a_delete() {
        let cache = WatchCache::new(1);
        let mut rx = start(&cache, spec(1, "app=web"), Box::new(json_frame), ()).unwrap();
        let before = json!({"metadata": {"name": "a", "labels": {"app": "web"}}});
        cache.push(
            2,
            vec![event(
                2,
                "a",
                EventType::Modified,
                json!({"app": "db"}),
                Some(before),
            )],
        );
        cache.push(
            3,
            vec![event(
                3,
                "a",
                EventType::Modified,
                json!({"app": "web"}),
                Some(json!({"metadata": {"labels": {"app": "db"}}})),
            )],
        );
        let got = frames(&mut rx, 2).await;
        assert_eq!(
            (got[0]["type"].as_str(), got[1]["type"].as_str()),
            (Some("DELETED"), Some("ADDED"))
        );
    }

    #[test]
    fn eviction_moves_the_oldest_servable_revision() {
        let cache = WatchCache::new(0);
        for revision in 1..=(WINDOW as Revision + 5) {
            cache.push(
                revision,
                vec![event(revision, "a", EventType::Modified, json!({}), None)],
            );
        }
        assert!(cache.subscribe(4).is_err());
        assert_eq!(cache.subscribe(5).unwrap().0.len(), WINDOW);
    }
}
