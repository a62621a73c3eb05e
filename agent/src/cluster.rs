//! API mode: Services, EndpointSlices and this node's Node, followed on an
//! API server (wharf-control or any kube-apiserver) through kube-rs
//! reflectors, the way kube-proxy follows them. This is the kube-proxy
//! replacement's source of desired state.

use std::{path::Path, sync::Arc, time::Duration, time::SystemTime};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    chrono::DateTime,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinSet};
use tracing::{info, warn};

use crate::{
    manifest::{self, Locality, ZONE_LABEL},
    sync::{Source, Update},
    telemetry::Telemetry,
};

/// Objects kube-proxy leaves alone, and so does wharf: services another
/// proxy implementation claims, and headless services (nothing to
/// forward). The same selector serves EndpointSlices, which carry their
/// Service's labels (upstream's controller also labels a headless
/// service's slices `service.kubernetes.io/headless`; wharf's does not,
/// so those slices are watched, and translate to nothing).
const PROXIED: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The annotation the EndpointSlice controller stamps with the time of the
/// change (to a pod or the service) that the slice's contents reflect.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The taint the cluster autoscaler puts on a node it is about to remove.
const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file.
pub async fn client(path: &Path) -> Result<Client, ClusterError> {
    let kubeconfig_error = |source| ClusterError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Ok(Client::try_from(config)?)
}

/// Which watch an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Node,
}

/// What a watch reports to the source.
#[derive(Debug)]
enum Change {
    /// A full list arrived: the cache now holds the whole set (again).
    Listed(Kind),
    /// An object was added, changed or deleted; for an EndpointSlice, when
    /// the change it reflects was made.
    Object { trigger: Option<SystemTime> },
}

/// The cluster's services as this node should forward them.
#[derive(Debug)]
pub struct Cluster {
    node: String,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    changes: mpsc::UnboundedReceiver<Change>,
    /// Which caches have been filled by a full list.
    listed: Vec<Kind>,
    triggers: Vec<SystemTime>,
    /// Changes made before the agent started are not timed: their
    /// latency is the agent's downtime, not programming. Rounded down to
    /// the second, as the API's timestamps (a Service's creation) are, so
    /// a change in the second the agent started is timed too.
    started: SystemTime,
    /// The services last left out, so each rejection is logged once.
    rejected: Vec<String>,
    telemetry: Arc<Telemetry>,
    /// The watch tasks; dropped (so stopped) with the source.
    _watches: JoinSet<()>,
}

impl Cluster {
    /// Starts the watches of node `node`'s proxy; the node's eligibility
    /// for load-balancer traffic is reported to `telemetry`.
    pub fn watch(client: Client, node: &str, telemetry: Arc<Telemetry>) -> Self {
        let (tx, changes) = mpsc::unbounded_channel();
        let mut watches = JoinSet::new();
        let proxied = watcher::Config::default().labels(PROXIED);
        let services = follow(
            &mut watches,
            Api::<Service>::all(client.clone()),
            proxied.clone(),
            Kind::Services,
            |_| None,
            tx.clone(),
        );
        let slices = follow(
            &mut watches,
            Api::<EndpointSlice>::all(client.clone()),
            proxied,
            Kind::EndpointSlices,
            trigger_time,
            tx.clone(),
        );
        let nodes = follow(
            &mut watches,
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            Kind::Node,
            |_| None,
            tx,
        );
        Self {
            node: node.to_string(),
            services,
            slices,
            nodes,
            changes,
            listed: Vec::new(),
            triggers: Vec::new(),
            started: whole_seconds(SystemTime::now()),
            rejected: Vec::new(),
            telemetry,
            _watches: watches,
        }
    }

    fn record(&mut self, change: Change) {
        match change {
            Change::Listed(kind) => {
                if !self.listed.contains(&kind) {
                    info!(?kind, "cache synced");
                    self.listed.push(kind);
                }
            }
            Change::Object { trigger } => self
                .triggers
                .extend(trigger.filter(|time| *time >= self.started)),
        }
    }

    /// This node's zone, and whether it should take load-balancer
    /// traffic: not while it is being deleted or the cluster autoscaler
    /// is about to remove it (KEP-3836, as kube-proxy's `/healthz`).
    fn locality(&self) -> (Locality, bool) {
        let node = self.nodes.state().first().cloned();
        let zone = node
            .as_ref()
            .and_then(|node| node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
            .filter(|zone| !zone.is_empty());
        let leaving = node.as_ref().is_some_and(|node| {
            node.metadata.deletion_timestamp.is_some()
                || node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT))
        });
        let locality = Locality {
            node: self.node.clone(),
            zone,
        };
        (locality, !leaving)
    }
}

impl Source for Cluster {
    /// Watch events carry whole objects: nothing to wait for.
    const SETTLE: Duration = Duration::ZERO;
    /// Short: programming latency is what this mode is judged by (a lone
    /// endpoint change is programmed within a few ms of its event), and
    /// changes arriving during a sync are all taken by the next one.
    const MIN_INTERVAL: Duration = Duration::from_millis(20);

    async fn changed(&mut self) {
        match self.changes.recv().await {
            Some(change) => self.record(change),
            // Every watch task ended: nothing will change again.
            None => std::future::pending::<()>().await,
        }
    }

    fn desired(&mut self) -> Update {
        while let Ok(change) = self.changes.try_recv() {
            self.record(change);
        }
        let triggers = std::mem::take(&mut self.triggers);
        // Never prune from a partial picture: until every cache is
        // filled, the dataplane keeps what it has.
        if self.listed.len() < 3 {
            return Update {
                state: None,
                triggers,
            };
        }
        let services = self.services.state();
        let slices = self.slices.state();
        let (locality, eligible) = self.locality();
        self.telemetry.set_node_eligible(eligible);
        let translation = manifest::translate(
            services.iter().map(AsRef::as_ref),
            slices.iter().map(AsRef::as_ref),
            &locality,
        );
        let rejected: Vec<String> = translation
            .rejected
            .iter()
            .map(ToString::to_string)
            .collect();
        if rejected != self.rejected {
            for error in rejected.iter().filter(|e| !self.rejected.contains(e)) {
                warn!(%error, "service left out");
            }
            self.rejected = rejected;
        }
        Update {
            state: Some(translation.state),
            triggers,
        }
    }
}

/// Starts a reflector on `api`, reporting lists and changes on `tx`;
/// returns its cache. A failed watch is retried with kube-rs's default
/// back-off (up to about a minute between tries), and the cache keeps its
/// last contents meanwhile.
fn follow<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    trigger: fn(&K) -> Option<SystemTime>,
    tx: mpsc::UnboundedSender<Change>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, config).default_backoff());
    tasks.spawn(async move {
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            let change = match event {
                Ok(watcher::Event::InitDone) => Change::Listed(kind),
                Ok(watcher::Event::Apply(object)) => Change::Object {
                    trigger: trigger(&object),
                },
                // A deleted slice still carries the trigger time of its
                // last change, which its deletion is not.
                Ok(watcher::Event::Delete(_)) => Change::Object { trigger: None },
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(error) => {
                    warn!(?kind, %error, "watch failed; retrying");
                    continue;
                }
            };
            if tx.send(change).is_err() {
                return;
            }
        }
    });
    reader
}

fn whole_seconds(time: SystemTime) -> SystemTime {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs())
}

/// An EndpointSlice's last-change-trigger-time, if it has a valid one.
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let text = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_times_are_read_from_the_annotation() {
        let mut slice = EndpointSlice::default();
        assert_eq!(trigger_time(&slice), None);
        slice.metadata.annotations = Some(
            [(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "2026-11-22T10:00:01Z".to_string(),
            )]
            .into(),
        );
        let at = trigger_time(&slice).expect("parsed");
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_795_341_601
        );
        slice
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(TRIGGER_TIME_ANNOTATION.to_string(), "yesterday".into());
        assert_eq!(trigger_time(&slice), None, "garbage is ignored");
    }
}
