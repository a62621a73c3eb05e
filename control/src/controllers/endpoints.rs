//! EndpointSlices (and the legacy Endpoints `kubectl describe service`
//! shows) for Services with a selector, as kube-controller-manager's
//! endpointslice and endpoints controllers write them, since kube-proxy
//! and wharf-agent consume exactly this:
//!
//! - one endpoint per pod with an IP that is not finished, with `ready`
//!   (Ready and not terminating, or `publishNotReadyAddresses`), `serving`
//!   (Ready even while terminating) and `terminating`, `nodeName`, `zone`
//!   and a `targetRef`;
//! - ports resolved per pod (a named `targetPort` looks up the pod's
//!   container port), so pods with different numbers for one name land in
//!   different slices;
//! - at most 100 endpoints per slice; existing slices keep their
//!   endpoints where possible and are rewritten only when they change;
//! - labels `kubernetes.io/service-name` and
//!   `endpointslice.kubernetes.io/managed-by`, the Service as controller
//!   owner, and one empty placeholder slice for a Service without
//!   endpoints;
//! - `endpoints.kubernetes.io/last-change-trigger-time` on every slice
//!   written: the earliest pod readiness change or Service creation not
//!   yet reflected, from which proxies measure network-programming
//!   latency.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference,
            Pod, Service,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    chrono::{DateTime, SecondsFormat, Utc},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, controller_reference};
use crate::{labels, pods};

pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const MAX_PER_SLICE: usize = 100;
const ZONE: &str = "topology.kubernetes.io/zone";

fn selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    service
        .spec
        .as_ref()?
        .selector
        .as_ref()
        .filter(|s| !s.is_empty())
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
}

/// When the changes behind each Service's endpoints were made, as
/// upstream's trigger-time tracker reckons them: a Service seen for the
/// first time reports its creation; after that a pod's change is its
/// Ready condition's last transition, a Service's its creation, and a
/// sync reports the earliest of those that moved since its last sync.
/// (Like upstream, a pod that changes twice between syncs counts once.)
#[derive(Debug, Default)]
pub struct TriggerTimes(Mutex<HashMap<(String, String), Seen>>);

#[derive(Debug, Default)]
struct Seen {
    service: Option<DateTime<Utc>>,
    pods: HashMap<String, DateTime<Utc>>,
}

impl TriggerTimes {
    /// The earliest change to `service` or the pods it selects since the
    /// last call for it; None when nothing moved.
    pub fn earliest_change(
        &self,
        service: &Service,
        candidates: &[Arc<Pod>],
    ) -> Option<DateTime<Utc>> {
        let key = (service.namespace().unwrap_or_default(), service.name_any());
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let known = all.contains_key(&key);
        let seen = all.entry(key).or_default();
        let mut earliest: Option<DateTime<Utc>> = None;
        let mut pods = HashMap::new();
        let selector = selector(service);
        for pod in candidates {
            let ready_since = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_transition_time.as_ref());
            let (true, Some(name), Some(time)) = (
                selector.is_some_and(|s| selects(s, pod)),
                pod.metadata.name.clone(),
                ready_since,
            ) else {
                continue;
            };
            if seen.pods.get(&name).is_none_or(|before| time.0 > *before) {
                earliest = Some(earliest.map_or(time.0, |e| e.min(time.0)));
            }
            pods.insert(name, time.0);
        }
        let created = service.metadata.creation_timestamp.as_ref().map(|t| t.0);
        if let Some(created) = created
            && seen.service.is_none_or(|before| created > before)
        {
            earliest = Some(earliest.map_or(created, |e| e.min(created)));
        }
        *seen = Seen {
            service: created,
            pods,
        };
        if known { earliest } else { created }
    }

    /// Forgets a Service that is going away.
    pub fn forget(&self, service: &Service) {
        let key = (service.namespace().unwrap_or_default(), service.name_any());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Forgets the Services `exists` no longer knows (deleted ones are
    /// not reconciled, so `forget` never hears of them). Runs when the
    /// map has grown past twice `live`, so it costs O(1) per call
    /// amortized.
    pub fn prune(&self, live: usize, exists: impl Fn(&str, &str) -> bool) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() > 2 * live.max(16) {
            all.retain(|(namespace, name), _| exists(namespace, name));
        }
    }
}

/// The pod's numbers for the Service's ports; a named target port the
/// pod does not declare is left out.
fn pod_ports(service: &Service, pod: &Pod) -> Vec<EndpointPort> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|port| {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            let number = match &port.target_port {
                None => port.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => {
                    containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .find(|p| {
                            p.name.as_ref() == Some(name)
                                && p.protocol.as_deref().unwrap_or("TCP") == protocol
                        })?
                        .container_port
                }
            };
            Some(EndpointPort {
                name: Some(port.name.clone().unwrap_or_default()),
                port: Some(number),
                protocol: Some(protocol),
                app_protocol: port.app_protocol.clone(),
            })
        })
        .collect()
}

/// The endpoints per port set for the Service's pods, by address.
pub(super) fn desired(
    service: &Service,
    candidates: &[Arc<Pod>],
    zone_of: impl Fn(&str) -> Option<String>,
) -> Desired {
    let mut groups = Desired::new();
    let Some(selector) = selector(service) else {
        return groups;
    };
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        == Some(true);
    for pod in candidates {
        let matches = selects(selector, pod);
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty());
        let (true, Some(ip), false) = (matches, ip, pods::is_terminal(pod)) else {
            continue;
        };
        let terminating = pods::is_deleting(&pod.metadata);
        let ready = pods::is_ready(pod);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let endpoint = Endpoint {
            addresses: vec![ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(publish_not_ready || (ready && !terminating)),
                serving: Some(publish_not_ready || ready),
                terminating: Some(terminating),
            }),
            zone: node.as_deref().and_then(&zone_of),
            node_name: node,
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                namespace: pod.metadata.namespace.clone(),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ports = pod_ports(service, pod);
        let key: Vec<PortKey> = ports.iter().map(port_key).collect();
        groups
            .entry(key)
            .or_insert_with(|| (ports, BTreeMap::new()))
            .1
            .insert(ip, endpoint);
    }
    groups
}

/// A port's identity for grouping: name, number, protocol.
pub(super) type PortKey = (String, i32, String);

/// Per port set: the ports and the endpoints by address.
pub(super) type Desired = BTreeMap<Vec<PortKey>, (Vec<EndpointPort>, BTreeMap<String, Endpoint>)>;

fn port_key(port: &EndpointPort) -> PortKey {
    (
        port.name.clone().unwrap_or_default(),
        port.port.unwrap_or(0),
        port.protocol.clone().unwrap_or_default(),
    )
}

/// Writes that bring the slices to the desired endpoints.
#[derive(Debug, Default)]
pub(super) struct SlicePlan {
    pub create: Vec<EndpointSlice>,
    pub update: Vec<EndpointSlice>,
    pub delete: Vec<String>,
}

fn slice_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.labels().clone();
    labels.insert(SERVICE_NAME.to_owned(), service.name_any());
    labels.insert(MANAGED_BY.to_owned(), CONTROLLER.to_owned());
    labels
}

/// Keeps endpoints in the slice that already holds them, fills slices
/// with room before creating new ones, and deletes slices left empty.
/// A Service without endpoints keeps exactly one empty slice.
pub(super) fn plan_slices(
    service: &Service,
    existing: &[Arc<EndpointSlice>],
    desired: Desired,
    trigger: Option<DateTime<Utc>>,
) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let labels = slice_labels(service);
    // Every slice written says which change it reflects (or that none
    // did), so a proxy never times an old change twice.
    let stamp = |slice: &mut EndpointSlice| {
        let annotations = slice.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match trigger {
            Some(time) => annotations.insert(
                TRIGGER_TIME.to_owned(),
                time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            ),
            None => annotations.remove(TRIGGER_TIME),
        };
        if annotations.is_empty() {
            slice.metadata.annotations = None;
        }
    };
    let fresh = |ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>| {
        let mut slice = EndpointSlice {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", service.name_any())),
                labels: Some(labels.clone()),
                owner_references: Some(vec![controller_reference(service)]),
                ..Default::default()
            },
            address_type: "IPv4".to_owned(),
            endpoints,
            ports: Some(ports),
        };
        stamp(&mut slice);
        slice
    };
    // Rewrites a slice; records an update only if it changed.
    let keep = |plan: &mut SlicePlan,
                before: &EndpointSlice,
                mut slice: EndpointSlice,
                ports: &[EndpointPort]| {
        slice.metadata.labels = Some(labels.clone());
        slice.ports = Some(ports.to_vec());
        if *before != slice {
            stamp(&mut slice);
            plan.update.push(slice);
        }
    };
    if desired.values().all(|(_, endpoints)| endpoints.is_empty()) {
        let mut slices = existing.iter();
        match slices.next() {
            Some(first) => {
                let mut placeholder = EndpointSlice::clone(first);
                placeholder.endpoints.clear();
                keep(&mut plan, first, placeholder, &[]);
            }
            None => plan.create.push(fresh(Vec::new(), Vec::new())),
        }
        plan.delete.extend(slices.map(|s| s.name_any()));
        return plan;
    }
    let mut used: HashSet<String> = HashSet::new();
    for (key, (ports, mut wanted)) in desired {
        let mut slices: Vec<(&EndpointSlice, EndpointSlice)> = existing
            .iter()
            .filter(|s| {
                !used.contains(&s.name_any())
                    && s.ports.iter().flatten().map(port_key).collect::<Vec<_>>() == key
            })
            .map(|s| (s.as_ref(), EndpointSlice::clone(s)))
            .collect();
        // Endpoints stay where they are, with fresh contents.
        for (_, slice) in &mut slices {
            used.insert(slice.name_any());
            slice.endpoints = slice
                .endpoints
                .iter()
                .filter_map(|e| wanted.remove(e.addresses.first()?))
                .collect();
        }
        let mut rest = wanted.into_values();
        for (_, slice) in &mut slices {
            while slice.endpoints.len() < MAX_PER_SLICE {
                let Some(endpoint) = rest.next() else { break };
                slice.endpoints.push(endpoint);
            }
        }
        let remaining: Vec<Endpoint> = rest.collect();
        for chunk in remaining.chunks(MAX_PER_SLICE) {
            plan.create.push(fresh(ports.clone(), chunk.to_vec()));
        }
        for (before, slice) in slices {
            if slice.endpoints.is_empty() {
                plan.delete.push(slice.name_any());
            } else {
                keep(&mut plan, before, slice, &ports);
            }
        }
    }
    plan.delete.extend(
        existing
            .iter()
            .filter(|s| !used.contains(&s.name_any()))
            .map(|s| s.name_any()),
    );
    plan
}

/// The legacy Endpoints object: ready and not-ready addresses per port
/// set (terminating pods are left out, as upstream).
fn endpoints_object(service: &Service, desired: &Desired) -> Endpoints {
    let subsets: Vec<EndpointSubset> = desired
        .values()
        .filter_map(|(ports, endpoints)| {
            let address = |e: &Endpoint| EndpointAddress {
                ip: e.addresses[0].clone(),
                node_name: e.node_name.clone(),
                target_ref: e.target_ref.clone(),
                ..Default::default()
            };
            let live = || {
                endpoints
                    .values()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.terminating) != Some(true))
            };
            let ready: Vec<EndpointAddress> = live()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .map(address)
                .collect();
            let not_ready: Vec<EndpointAddress> = live()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(true))
                .map(address)
                .collect();
            if ready.is_empty() && not_ready.is_empty() {
                return None;
            }
            Some(EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|p| CorePort {
                            name: p.name.clone().filter(|n| !n.is_empty()),
                            port: p.port.unwrap_or(0),
                            protocol: p.protocol.clone(),
                            app_protocol: p.app_protocol.clone(),
                        })
                        .collect(),
                ),
            })
        })
        .collect();
    Endpoints {
        metadata: ObjectMeta {
            name: Some(service.name_any()),
            namespace: service.namespace(),
            labels: Some(service.labels().clone()).filter(|l| !l.is_empty()),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

/// Services a pod's change concerns: those selecting it now, and those
/// whose slices list it (it may have stopped matching).
pub(super) fn pod_to_services(
    ctx: &Context,
) -> impl Fn(Arc<Pod>) -> Vec<ObjectRef<Service>> + Send + Sync + 'static {
    let services = ctx.services.clone();
    let slices = ctx.slices.clone();
    move |pod| {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let empty = BTreeMap::new();
        let pod_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        let mut names: HashSet<String> = Context::in_namespace(&services, &namespace)
            .iter()
            .filter(|s| {
                selector(s).is_some_and(|sel| {
                    labels::selector_matches(
                        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                            match_labels: Some(sel.clone()),
                            match_expressions: None,
                        },
                        pod_labels,
                    )
                })
            })
            .map(|s| s.name_any())
            .collect();
        for slice in Context::in_namespace(&slices, &namespace) {
            let lists_pod = slice.endpoints.iter().any(|e| {
                e.target_ref.as_ref().and_then(|r| r.name.as_ref()) == pod.metadata.name.as_ref()
            });
            if lists_pod && let Some(service) = slice.labels().get(SERVICE_NAME) {
                names.insert(service.clone());
            }
        }
        names
            .into_iter()
            .map(|name| ObjectRef::new(&name).within(&namespace))
            .collect()
    }
}

pub(super) async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&service.metadata) || selector(&service).is_none() {
        ctx.trigger_times.forget(&service);
        return Ok(Action::await_change());
    }
    let namespace = service.namespace().unwrap_or_default();
    let nodes = ctx.nodes.clone();
    let candidates = Context::in_namespace(&ctx.pods, &namespace);
    let trigger = ctx.trigger_times.earliest_change(&service, &candidates);
    ctx.trigger_times
        .prune(ctx.services.len(), |namespace, name| {
            ctx.services
                .get(&ObjectRef::new(name).within(namespace))
                .is_some()
        });
    let desired = desired(&service, &candidates, |node| {
        nodes
            .get(&ObjectRef::new(node))?
            .labels()
            .get(ZONE)
            .cloned()
    });
    let existing: Vec<Arc<EndpointSlice>> = Context::in_namespace(&ctx.slices, &namespace)
        .into_iter()
        .filter(|s| {
            s.labels().get(SERVICE_NAME) == Some(&service.name_any())
                && s.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
        })
        .collect();
    write_endpoints(&ctx, &service, &desired).await?;
    let plan = plan_slices(&service, &existing, desired, trigger);
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    for slice in &plan.update {
        api.replace(&slice.name_any(), &PostParams::default(), slice)
            .await
            .map_err(Error::api("updating endpoint slice", slice.name_any()))?;
    }
    for slice in &plan.create {
        api.create(&PostParams::default(), slice)
            .await
            .map_err(Error::api(
                "creating endpoint slice for",
                service.name_any(),
            ))?;
    }
    for name in &plan.delete {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::api("deleting endpoint slice", name)(error)),
        }
    }
    Ok(Action::await_change())
}

async fn write_endpoints(ctx: &Context, service: &Service, desired: &Desired) -> Result<(), Error> {
    let api: Api<Endpoints> =
        Api::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
    let mut wanted = endpoints_object(service, desired);
    let name = service.name_any();
    let cached = ctx
        .endpoints
        .get(&ObjectRef::new(&name).within(&service.namespace().unwrap_or_default()));
    match cached {
        None => match api.create(&PostParams::default(), &wanted).await {
            // Created by an earlier sync the cache has not shown yet.
            Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 409, .. })) => {}
            Err(error) => return Err(Error::api("creating endpoints", &name)(error)),
        },
        Some(current)
            if current.subsets != wanted.subsets
                || current.metadata.labels != wanted.metadata.labels =>
        {
            wanted.metadata.resource_version = current.metadata.resource_version.clone();
            api.replace(&name, &PostParams::default(), &wanted)
                .await
                .map_err(Error::api("updating endpoints", &name))?;
        }
        Some(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
