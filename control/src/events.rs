//! Events for `kubectl describe`: what a controller did or could not do.
//!
//! Recording never blocks a controller: events go through a bounded
//! channel to one writer, which drops them when 1,024 are queued (events
//! are best effort upstream too). A repeat of the same reason and message
//! for the same object within 10 minutes bumps `count` and
//! `lastTimestamp` on the existing Event instead of creating another, as
//! client-go's correlator does.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use chrono::Utc;
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;
use tracing::debug;

const QUEUE: usize = 1024;
const AGGREGATION_WINDOW: Duration = Duration::from_secs(600);
/// Remembered (object, reason, message) keys before the oldest are
/// forgotten.
const REMEMBERED: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

#[derive(Debug)]
struct Record {
    object: ObjectReference,
    kind: EventType,
    reason: String,
    message: String,
}

/// What makes two events the same: object uid, reason, message.
type Correlation = (String, String, String);

/// An Event already written: namespace, name, count, when.
type Written = (String, String, i32, Instant);

/// The handle controllers record through; cheap to clone.
#[derive(Clone, Debug)]
pub struct Recorder {
    queue: mpsc::Sender<Record>,
}

/// Writes what recorders queue; run it beside the component.
pub struct EventWriter {
    client: Client,
    component: String,
    queue: mpsc::Receiver<Record>,
    seen: HashMap<Correlation, Written>,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("component", &self.component)
            .field("remembered", &self.seen.len())
            .finish_non_exhaustive()
    }
}

/// A recorder for `component` (the Event's `source.component`) and the
/// writer that must run for events to reach the API.
pub fn recorder(client: Client, component: &str) -> (Recorder, EventWriter) {
    let (sender, receiver) = mpsc::channel(QUEUE);
    (
        Recorder { queue: sender },
        EventWriter {
            client,
            component: component.to_owned(),
            queue: receiver,
            seen: HashMap::new(),
        },
    )
}

impl Recorder {
    pub fn record<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        kind: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        self.record_ref(object.object_ref(&()), kind, reason, message);
    }

    pub fn record_ref(
        &self,
        object: ObjectReference,
        kind: EventType,
        reason: &str,
        message: impl Into<String>,
    ) {
        let record = Record {
            object,
            kind,
            reason: reason.to_owned(),
            message: message.into(),
        };
        if self.queue.try_send(record).is_err() {
            debug!(reason, "event dropped: the queue is full");
        }
    }
}

impl EventWriter {
    pub async fn run(mut self) {
        while let Some(record) = self.queue.recv().await {
            if let Err(error) = self.write(record).await {
                debug!(%error, "event not written");
            }
        }
    }

    async fn write(&mut self, record: Record) -> Result<(), kube::Error> {
        let now = Utc::now();
        let uid = record.object.uid.clone().unwrap_or_default();
        let key = (uid, record.reason.clone(), record.message.clone());
        if let Some((namespace, name, count, at)) = self.seen.get_mut(&key)
            && at.elapsed() < AGGREGATION_WINDOW
        {
            *count += 1;
            *at = Instant::now();
            let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({
                "count": *count,
                "lastTimestamp": Time(now),
            });
            return api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop);
        }
        // Cluster-scoped objects (nodes) have their events in default.
        let namespace = record
            .object
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    record.object.name.as_deref().unwrap_or("object"),
                    now.timestamp_nanos_opt().unwrap_or_default()
                )),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: record.object,
            reason: Some(record.reason),
            message: Some(record.message),
            type_: Some(record.kind.as_str().to_owned()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            reporting_component: Some(self.component.clone()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let created = api.create(&PostParams::default(), &event).await?;
        if self.seen.len() >= REMEMBERED {
            self.seen
                .retain(|_, (_, _, _, at)| at.elapsed() < AGGREGATION_WINDOW);
            if self.seen.len() >= REMEMBERED {
                self.seen.clear();
            }
        }
        self.seen
            .insert(key, (namespace, created.name_any(), 1, Instant::now()));
        Ok(())
    }
}
