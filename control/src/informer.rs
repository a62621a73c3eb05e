//! Shared informers: one watch per resource type feeding one cache that
//! every controller reads, and a stream of changed objects per
//! subscriber that triggers reconciles (kube-runtime's `Controller` takes
//! them through `for_shared_stream`/`owns_shared_stream`).
//!
//! kube-runtime 2.0's own shared reflector does not pass deletions on to
//! subscribers; a ReplicaSet must hear that its pod was deleted, so this
//! one forwards every added, changed and deleted object, including
//! objects found gone when a watch re-lists.

use std::{collections::HashMap, fmt::Debug, hash::Hash, sync::Arc};

use futures::{Stream, StreamExt as _};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::warn;

/// One resource type's watch, cache and subscribers.
pub struct Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<K>>>,
}

impl<K> Debug for Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Informer")
            .field("kind", &K::kind(&()))
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    ObjectRef<K>: Hash + Eq,
{
    pub fn new(api: Api<K>, config: watcher::Config) -> Self {
        Self {
            api,
            config,
            writer: Writer::default(),
            subscribers: Vec::new(),
        }
    }

    /// The cache; `wait_until_ready` resolves after the first full list.
    pub fn store(&self) -> Store<K> {
        self.writer.as_reader()
    }

    /// Every object added, changed or deleted from now on.
    pub fn subscribe(&mut self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.subscribers.push(sender);
        UnboundedReceiverStream::new(receiver)
    }

    fn publish(&mut self, object: Arc<K>) {
        self.subscribers
            .retain(|subscriber| subscriber.send(Arc::clone(&object)).is_ok());
    }

    /// Watches until the future is dropped (the watch restarts itself
    /// with back-off after errors).
    pub async fn run(mut self) {
        let mut events = watcher(self.api.clone(), self.config.clone())
            .default_backoff()
            .boxed();
        // Objects cached when a re-list began: those not listed again
        // were deleted meanwhile.
        let mut before_relist: Option<HashMap<ObjectRef<K>, Arc<K>>> = None;
        // Listed objects are announced once the store holds them (at
        // InitDone): a reconcile triggered earlier would not find them.
        let mut listed: Vec<Arc<K>> = Vec::new();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    warn!(kind = %K::kind(&()), %error, "watch");
                    continue;
                }
            };
            self.writer.apply_watcher_event(&event);
            match event {
                watcher::Event::Init => {
                    before_relist = Some(
                        self.store()
                            .state()
                            .into_iter()
                            .map(|o| (ObjectRef::from_obj(o.as_ref()), o))
                            .collect(),
                    );
                }
                watcher::Event::InitApply(object) => {
                    if let Some(before) = &mut before_relist {
                        before.remove(&ObjectRef::from_obj(&object));
                    }
                    listed.push(Arc::new(object));
                }
                watcher::Event::Apply(object) | watcher::Event::Delete(object) => {
                    self.publish(Arc::new(object));
                }
                watcher::Event::InitDone => {
                    for object in std::mem::take(&mut listed) {
                        self.publish(object);
                    }
                    for (_, gone) in before_relist.take().into_iter().flatten() {
                        self.publish(gone);
                    }
                }
            }
        }
    }
}
