//! The controllers: API clients that drive actual state toward the
//! objects' specs, as kube-controller-manager's do.
//!
//! Each is a kube-runtime `Controller` with an idempotent, level-triggered
//! `reconcile(object, context) -> Result<Action, Error>`; the decision
//! itself is a pure function of the object and the caches (tested against
//! fixtures in each module), the reconcile only reads caches and writes
//! what the decision says. All controllers share one cache per resource
//! type (`informer`), and none starts before every cache has listed once,
//! so nothing is deleted or recreated on a partial view.

mod autoscaler;
mod certificates;
mod cronjob;
mod daemonset;
mod deployment;
mod disruption;
mod endpoints;
mod expectations;
mod gc;
mod history;
mod job;
mod namespace;
mod node_ipam;
mod node_lifecycle;
mod replicaset;
mod serviceaccount;
mod statefulset;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
        batch::v1::{CronJob, Job},
        certificates::v1::CertificateSigningRequest,
        coordination::v1::Lease,
        core::v1::{Endpoints, Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{
    Api, Client, Resource,
    api::{ObjectMeta, Patch, PatchParams},
    core::NamespaceResourceScope,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::{events::Recorder, informer::Informer};

pub use self::{expectations::Expectations, node_ipam::parse_cidr};

/// Settings of the controllers (`wharf-control` flags).
#[derive(Clone, Debug)]
pub struct Options {
    /// Pod addresses: each node gets a `/node_cidr_mask` of it.
    pub cluster_cidr: (Ipv4Addr, u8),
    pub node_cidr_mask: u8,
    /// A node whose lease was not renewed for this long is NotReady.
    pub node_monitor_grace: Duration,
    /// How often each HorizontalPodAutoscaler is evaluated.
    pub autoscaler_sync_period: Duration,
    /// The cluster CA, which signs approved requests for node client and
    /// serving certificates; without it, requests wait for another
    /// signer.
    pub signer: Option<Arc<crate::pki::Authority>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
            node_cidr_mask: 24,
            node_monitor_grace: Duration::from_secs(40),
            autoscaler_sync_period: Duration::from_secs(15),
            signer: None,
        }
    }
}

/// A failed API call in a reconcile; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("encoding {object}: {source}")]
    Encode {
        object: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn api(
        action: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> Self {
        let object = object.into();
        move |source| Self::Api {
            action,
            object,
            source,
        }
    }
}

/// A node's last heartbeat and when this process saw it change.
pub type Heartbeat = (Option<DateTime<Utc>>, Instant);

/// What every reconcile sees: the client, the shared caches, the event
/// recorder and the settings.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub pods: Store<Pod>,
    pub replicasets: Store<ReplicaSet>,
    pub deployments: Store<Deployment>,
    pub daemonsets: Store<DaemonSet>,
    pub statefulsets: Store<StatefulSet>,
    pub revisions: Store<ControllerRevision>,
    pub jobs: Store<Job>,
    pub cronjobs: Store<CronJob>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub endpoints: Store<Endpoints>,
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub namespaces: Store<Namespace>,
    pub service_accounts: Store<ServiceAccount>,
    pub budgets: Store<PodDisruptionBudget>,
    pub autoscalers: Store<HorizontalPodAutoscaler>,
    pub requests: Store<CertificateSigningRequest>,
    pub expectations: Expectations,
    /// Per Service: the pod and Service changes its slices reflect.
    pub trigger_times: endpoints::TriggerTimes,
    /// Per node: the last heartbeat seen, and when this process saw it
    /// change (node lifecycle judges silence by its own clock).
    pub heartbeats: std::sync::Mutex<HashMap<String, Heartbeat>>,
    /// Pod CIDRs handed out that the node cache may not show yet.
    pub pod_cidrs: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    /// Per autoscaler (`namespace/name`): its recent recommendations
    /// and scale changes.
    pub autoscaler_history: std::sync::Mutex<HashMap<String, autoscaler::History>>,
    /// The namespace controller's last discovery, and when it ran.
    pub discovery: std::sync::Mutex<Option<(Instant, namespace::NamespacedResources)>>,
    pub options: Options,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The cached objects of one namespace.
    pub fn in_namespace<K>(store: &Store<K>, namespace: &str) -> Vec<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        store
            .state()
            .into_iter()
            .filter(|o| o.meta().namespace.as_deref() == Some(namespace))
            .collect()
    }
}

/// An owner reference that makes `owner` the controller of a dependent.
pub fn controller_reference<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Upstream's `GetScaledValueFromIntOrPercent`: a number as is, or
/// `N%` of `total` rounded up or down; `None` for a malformed percentage
/// (validation refuses those, so callers fall back to their default).
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> Option<i32> {
    match value {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(text) => {
            let percent: i64 = text.strip_suffix('%')?.parse().ok()?;
            let scaled = i64::from(total) * percent;
            let value = if round_up {
                (scaled + 99).div_euclid(100)
            } else {
                scaled.div_euclid(100)
            };
            Some(i32::try_from(value).unwrap_or(i32::MAX))
        }
    }
}

/// Whether `dependent` is controlled by the object with this uid.
pub fn controlled_by(dependent: &ObjectMeta, uid: Option<&str>) -> bool {
    crate::pods::controller_of(dependent).is_some_and(|r| Some(r.uid.as_str()) == uid)
}

/// A pod from a controller's template, controlled by `owner`; the API
/// server appends a random suffix to `generate_name`.
pub fn new_pod<O: Resource<DynamicType = ()>>(
    template: &PodTemplateSpec,
    owner: &O,
    generate_name: &str,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name.to_owned()),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![controller_reference(owner)]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// A namespaced kind the controllers read through the API and write
/// back: what their shared helpers need of it.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// Upstream's `ClaimObjects`: of `candidates`, the ones `owner`
/// controls. Orphans the selector matches are adopted (unless the owner
/// is being deleted); controlled objects it no longer matches are
/// released. Both are written before the owner acts on them.
pub async fn claim<O, K>(
    ctx: &Context,
    owner: &O,
    candidates: Vec<Arc<K>>,
    matches: impl Fn(&K) -> bool,
) -> Result<Vec<Arc<K>>, Error>
where
    O: Resource<DynamicType = ()>,
    K: Namespaced + serde::Serialize,
{
    let uid = owner.meta().uid.as_deref();
    let mut owned = Vec::new();
    for candidate in candidates {
        let meta = candidate.meta();
        let selected = matches(&candidate);
        let refs = meta.owner_references.clone().unwrap_or_default();
        let next_refs = match crate::pods::controller_of(meta) {
            Some(r) if Some(r.uid.as_str()) == uid => {
                if selected {
                    owned.push(candidate);
                    continue;
                }
                refs.into_iter()
                    .filter(|r| Some(r.uid.as_str()) != uid)
                    .collect()
            }
            None if selected
                && !crate::pods::is_deleting(meta)
                && !crate::pods::is_deleting(owner.meta()) =>
            {
                let mut refs = refs;
                refs.push(controller_reference(owner));
                refs
            }
            _ => continue,
        };
        let name = meta.name.clone().unwrap_or_default();
        let namespace = meta.namespace.clone().unwrap_or_default();
        let adopting = next_refs.len() > meta.owner_references.as_ref().map_or(0, Vec::len);
        // The uid makes the patch fail on a recreated namesake.
        let patch = serde_json::json!({
            "metadata": { "ownerReferences": next_refs, "uid": meta.uid },
        });
        let result = Api::<K>::namespaced(ctx.client.clone(), &namespace)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        match result {
            Ok(patched) if adopting => owned.push(Arc::new(patched)),
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => return Err(Error::api("claiming", name)(error)),
        }
    }
    Ok(owned)
}

/// `claim` with a label selector: the owner's dependents among the
/// cached objects of its namespace.
pub async fn claim_selected<O, K>(
    ctx: &Context,
    owner: &O,
    store: &Store<K>,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Result<Vec<Arc<K>>, Error>
where
    O: Resource<DynamicType = ()>,
    K: Namespaced + serde::Serialize + 'static,
{
    let namespace = owner.meta().namespace.clone().unwrap_or_default();
    let empty = std::collections::BTreeMap::new();
    claim(
        ctx,
        owner,
        Context::in_namespace(store, &namespace),
        |object| {
            crate::labels::selector_matches(
                selector,
                object.meta().labels.as_ref().unwrap_or(&empty),
            )
        },
    )
    .await
}

/// An RFC 7386 merge patch that turns `old` into `new`: changed members
/// as in `new`, members `new` lacks as null (a plain merge of `new` would
/// leave them, e.g. a map entry or an optional field that went away).
fn merge_diff(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (key, value) in new {
                match old.get(key) {
                    Some(before) if before == value => {}
                    Some(before) => {
                        patch.insert(key.clone(), merge_diff(before, value));
                    }
                    None => {
                        patch.insert(key.clone(), value.clone());
                    }
                }
            }
            for key in old.keys().filter(|key| !new.contains_key(*key)) {
                patch.insert(key.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

/// Writes `next` as the object's status unless it is what is stored
/// (every write triggers another reconcile). With `pinned`, the write
/// fails with a conflict unless the object is still at that
/// resourceVersion (for statuses others write too).
pub async fn write_status<K, S>(
    ctx: &Context,
    object: &K,
    current: Option<&S>,
    next: &S,
    pinned: Option<&str>,
) -> Result<(), Error>
where
    K: Namespaced,
    S: PartialEq + serde::Serialize,
{
    if current == Some(next) {
        return Ok(());
    }
    let meta = object.meta();
    let encoded = current
        .map(serde_json::to_value)
        .transpose()
        .and_then(|before| Ok((before.unwrap_or_default(), serde_json::to_value(next)?)));
    let (before, after) = encoded.map_err(|source| Error::Encode {
        object: crate::pods::key(meta),
        source,
    })?;
    let mut patch = serde_json::json!({ "status": merge_diff(&before, &after) });
    if let Some(version) = pinned {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    merge_status(ctx, object, patch, "updating status of").await
}

/// Sends a JSON merge patch to the object's `/status`.
pub async fn merge_status<K>(
    ctx: &Context,
    object: &K,
    patch: serde_json::Value,
    action: &'static str,
) -> Result<(), Error>
where
    K: Namespaced,
{
    let meta = object.meta();
    Api::<K>::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    )
    .patch_status(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(drop)
    .map_err(Error::api(action, crate::pods::key(meta)))
}

impl Context {
    /// For expectations: the pod is cached and not being deleted.
    pub fn pod_live(&self, namespace: &str, name: &str) -> bool {
        self.pods
            .get(&ObjectRef::new(name).within(namespace))
            .is_some_and(|p| !crate::pods::is_deleting(&p.metadata))
    }
}

fn error_policy<K>(_: Arc<K>, error: &Error, _: Arc<Context>) -> Action {
    debug!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Runs a controller until the future is dropped.
async fn drive<K, F, Fut>(controller: Controller<K>, reconcile: F, context: Arc<Context>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .with_config(controller::Config::default().concurrency(8))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                debug!(%error, "controller");
            }
        })
        .await;
}

fn informer<K>(client: &Client) -> Informer<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    Informer::new(Api::all(client.clone()), watcher::Config::default())
}

/// Maps a node's Lease to the reconcile of the Node.
fn lease_to_node(lease: Arc<Lease>) -> Option<ObjectRef<Node>> {
    lease.metadata.name.as_deref().map(ObjectRef::new)
}

/// Runs every controller until the future is dropped (leader election
/// drops it when the lease is lost).
pub async fn run(client: Client, recorder: Recorder, options: Options) {
    let mut pods = informer::<Pod>(&client);
    let mut replicasets = informer::<ReplicaSet>(&client);
    let mut deployments = informer::<Deployment>(&client);
    let mut daemonsets = informer::<DaemonSet>(&client);
    let mut statefulsets = informer::<StatefulSet>(&client);
    let mut revisions = informer::<ControllerRevision>(&client);
    let mut jobs = informer::<Job>(&client);
    let mut cronjobs = informer::<CronJob>(&client);
    let mut services = informer::<Service>(&client);
    let mut slices = informer::<EndpointSlice>(&client);
    let endpoints = informer::<Endpoints>(&client);
    let mut nodes = informer::<Node>(&client);
    let mut leases = Informer::new(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
        watcher::Config::default(),
    );
    let mut namespaces = informer::<Namespace>(&client);
    let mut service_accounts = informer::<ServiceAccount>(&client);
    let mut budgets = informer::<PodDisruptionBudget>(&client);
    let mut autoscalers = informer::<HorizontalPodAutoscaler>(&client);
    let mut requests = informer::<CertificateSigningRequest>(&client);

    let context = Arc::new(Context {
        client: client.clone(),
        recorder,
        pods: pods.store(),
        replicasets: replicasets.store(),
        deployments: deployments.store(),
        daemonsets: daemonsets.store(),
        statefulsets: statefulsets.store(),
        revisions: revisions.store(),
        jobs: jobs.store(),
        cronjobs: cronjobs.store(),
        services: services.store(),
        slices: slices.store(),
        endpoints: endpoints.store(),
        nodes: nodes.store(),
        leases: leases.store(),
        namespaces: namespaces.store(),
        service_accounts: service_accounts.store(),
        budgets: budgets.store(),
        autoscalers: autoscalers.store(),
        requests: requests.store(),
        expectations: Expectations::default(),
        trigger_times: Default::default(),
        pod_cidrs: Default::default(),
        heartbeats: Default::default(),
        autoscaler_history: Default::default(),
        discovery: Default::default(),
        options,
    });

    let replicaset_controller =
        Controller::for_shared_stream(replicasets.subscribe(), context.replicasets.clone())
            .owns_shared_stream(pods.subscribe());
    let deployment_controller =
        Controller::for_shared_stream(deployments.subscribe(), context.deployments.clone())
            .owns_shared_stream(replicasets.subscribe())
            .watches_shared_stream(pods.subscribe(), deployment::pod_to_deployment(&context));
    let endpoints_controller =
        Controller::for_shared_stream(services.subscribe(), context.services.clone())
            .owns_shared_stream(slices.subscribe())
            .watches_shared_stream(pods.subscribe(), endpoints::pod_to_services(&context));
    let namespace_controller =
        Controller::for_shared_stream(namespaces.subscribe(), context.namespaces.clone());
    let serviceaccount_controller =
        Controller::for_shared_stream(namespaces.subscribe(), context.namespaces.clone())
            .watches_shared_stream(service_accounts.subscribe(), |sa: Arc<ServiceAccount>| {
                sa.metadata
                    .namespace
                    .clone()
                    .map(|n| ObjectRef::<Namespace>::new(&n))
            });
    let lifecycle_controller =
        Controller::for_shared_stream(nodes.subscribe(), context.nodes.clone())
            .watches_shared_stream(leases.subscribe(), lease_to_node);
    let daemonset_controller =
        Controller::for_shared_stream(daemonsets.subscribe(), context.daemonsets.clone())
            .owns_shared_stream(pods.subscribe())
            .owns_shared_stream(revisions.subscribe())
            .watches_shared_stream(nodes.subscribe(), {
                let daemonsets = context.daemonsets.clone();
                move |_: Arc<Node>| {
                    daemonsets
                        .state()
                        .iter()
                        .map(|ds| ObjectRef::from_obj(ds.as_ref()))
                        .collect::<Vec<_>>()
                }
            });
    let statefulset_controller =
        Controller::for_shared_stream(statefulsets.subscribe(), context.statefulsets.clone())
            .owns_shared_stream(pods.subscribe())
            .owns_shared_stream(revisions.subscribe());
    let job_controller = Controller::for_shared_stream(jobs.subscribe(), context.jobs.clone())
        .owns_shared_stream(pods.subscribe());
    let cronjob_controller =
        Controller::for_shared_stream(cronjobs.subscribe(), context.cronjobs.clone())
            .owns_shared_stream(jobs.subscribe());
    let ipam_controller = Controller::for_shared_stream(nodes.subscribe(), context.nodes.clone());
    let certificates_controller =
        Controller::for_shared_stream(requests.subscribe(), context.requests.clone())
            .watches_shared_stream(nodes.subscribe(), certificates::node_to_requests(&context));
    let autoscaler_controller =
        Controller::for_shared_stream(autoscalers.subscribe(), context.autoscalers.clone());
    let disruption_controller =
        Controller::for_shared_stream(budgets.subscribe(), context.budgets.clone())
            .watches_shared_stream(pods.subscribe(), disruption::pod_to_budgets(&context))
            .watches_shared_stream(
                replicasets.subscribe(),
                disruption::workload_to_budgets(&context),
            )
            .watches_shared_stream(
                deployments.subscribe(),
                disruption::workload_to_budgets(&context),
            )
            .watches_shared_stream(
                statefulsets.subscribe(),
                disruption::workload_to_budgets(&context),
            );

    let mut tasks = JoinSet::new();
    tasks.spawn(pods.run());
    tasks.spawn(replicasets.run());
    tasks.spawn(deployments.run());
    tasks.spawn(daemonsets.run());
    tasks.spawn(statefulsets.run());
    tasks.spawn(revisions.run());
    tasks.spawn(jobs.run());
    tasks.spawn(cronjobs.run());
    tasks.spawn(services.run());
    tasks.spawn(slices.run());
    tasks.spawn(endpoints.run());
    tasks.spawn(nodes.run());
    tasks.spawn(leases.run());
    tasks.spawn(namespaces.run());
    tasks.spawn(service_accounts.run());
    tasks.spawn(budgets.run());
    tasks.spawn(autoscalers.run());
    tasks.spawn(requests.run());

    // Never act on a partial view.
    let ready = futures::future::join_all([
        context.pods.wait_until_ready().boxed(),
        context.replicasets.wait_until_ready().boxed(),
        context.deployments.wait_until_ready().boxed(),
        context.daemonsets.wait_until_ready().boxed(),
        context.statefulsets.wait_until_ready().boxed(),
        context.revisions.wait_until_ready().boxed(),
        context.jobs.wait_until_ready().boxed(),
        context.cronjobs.wait_until_ready().boxed(),
        context.services.wait_until_ready().boxed(),
        context.slices.wait_until_ready().boxed(),
        context.endpoints.wait_until_ready().boxed(),
        context.nodes.wait_until_ready().boxed(),
        context.leases.wait_until_ready().boxed(),
        context.namespaces.wait_until_ready().boxed(),
        context.service_accounts.wait_until_ready().boxed(),
        context.budgets.wait_until_ready().boxed(),
        context.autoscalers.wait_until_ready().boxed(),
        context.requests.wait_until_ready().boxed(),
    ]);
    tokio::select! {
        results = ready => {
            if results.iter().any(Result::is_err) {
                warn!("a cache closed before it was ready");
                return;
            }
        }
        Some(_) = tasks.join_next() => {
            warn!("an informer stopped before the caches were ready");
            return;
        }
    }

    tasks.spawn(drive(
        daemonset_controller,
        daemonset::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(job_controller, job::reconcile, Arc::clone(&context)));
    tasks.spawn(drive(
        statefulset_controller,
        statefulset::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        cronjob_controller,
        cronjob::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(gc::run(client.clone()));
    tasks.spawn(drive(
        certificates_controller,
        certificates::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        replicaset_controller,
        replicaset::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        deployment_controller,
        deployment::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        endpoints_controller,
        endpoints::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        namespace_controller,
        namespace::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        serviceaccount_controller,
        serviceaccount::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        lifecycle_controller,
        node_lifecycle::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        ipam_controller,
        node_ipam::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        disruption_controller,
        disruption::reconcile,
        Arc::clone(&context),
    ));
    tasks.spawn(drive(
        autoscaler_controller,
        autoscaler::reconcile,
        Arc::clone(&context),
    ));
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_merge_diff_nulls_what_went_away_and_keeps_what_stayed() {
        let old =
            json!({"disruptedPods": {"a": "t1", "b": "t2"}, "currentHealthy": 3, "x": {"y": 1}});
        let new = json!({"disruptedPods": {"b": "t2"}, "currentHealthy": 2, "x": {"y": 1}});
        assert_eq!(
            merge_diff(&old, &new),
            json!({"disruptedPods": {"a": null}, "currentHealthy": 2})
        );
        assert_eq!(merge_diff(&json!(null), &new), new);
        let mut patched = old.clone();
        json_patch::merge(&mut patched, &merge_diff(&old, &new));
        assert_eq!(patched, new);
    }

    #[test]
    fn int_or_percent_scales_with_rounding() {
        let percent = IntOrString::String("25%".to_owned());
        assert_eq!(scaled_value(&percent, 10, true), Some(3));
        assert_eq!(scaled_value(&percent, 10, false), Some(2));
        assert_eq!(scaled_value(&IntOrString::Int(4), 10, true), Some(4));
        assert_eq!(
            scaled_value(&IntOrString::String("x".to_owned()), 10, true),
            None
        );
    }
}
