//! The scheduler's view of the cluster: every node with the sum of what
//! the pods bound (or assumed bound) to it request.
//!
//! A pod is *assumed* on its node the moment the scheduler picks it,
//! before the binding is written, so the next pod (scheduled while the
//! first binding is in flight) sees the capacity taken. The watch then
//! confirms the binding, or a failed binding forgets the assumption.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::{
    pods,
    resources::{self, Resources},
};

/// A host port a pod holds: protocol, host IP (`0.0.0.0` for any), port.
pub type HostPort = (String, String, i32);

/// One node and what is placed on it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    name: String,
    /// `None` while pods name a node the cache has not seen yet.
    pub node: Option<Arc<Node>>,
    pub allocatable: Resources,
    pub requested: Resources,
    /// CPU and memory with upstream's non-zero defaults, for scoring.
    pub score_requested: (i64, i64),
    pub pods: Vec<Arc<Pod>>,
    pub host_ports: Vec<HostPort>,
    /// Pods here with required anti-affinity, which every incoming pod
    /// must respect; counted so nodes without any are skipped.
    anti_affinity_pods: usize,
}

fn has_required_anti_affinity(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|terms| !terms.is_empty())
}

impl NodeInfo {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.node
            .as_ref()?
            .metadata
            .labels
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    pub(super) fn add(&mut self, pod: &Arc<Pod>) {
        self.requested += &resources::pod_requests(pod);
        let (cpu, memory) = resources::pod_score_requests(pod);
        self.score_requested.0 += cpu;
        self.score_requested.1 += memory;
        self.host_ports.extend(host_ports(pod));
        self.anti_affinity_pods += usize::from(has_required_anti_affinity(pod));
        self.pods.push(Arc::clone(pod));
    }

    pub(super) fn remove(&mut self, pod: &Pod) {
        let key = pods::key(&pod.metadata);
        let Some(at) = self.pods.iter().position(|p| pods::key(&p.metadata) == key) else {
            return;
        };
        let stored = self.pods.swap_remove(at);
        self.anti_affinity_pods -= usize::from(has_required_anti_affinity(&stored));
        self.requested.sub(&resources::pod_requests(&stored));
        let (cpu, memory) = resources::pod_score_requests(&stored);
        self.score_requested.0 -= cpu;
        self.score_requested.1 -= memory;
        for port in host_ports(&stored) {
            if let Some(at) = self.host_ports.iter().position(|p| *p == port) {
                self.host_ports.swap_remove(at);
            }
        }
    }
}

/// The host ports a pod's containers ask for.
pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|port| *port > 0)?;
            Some((
                p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                p.host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".to_owned()),
                port,
            ))
        })
        .collect()
}

/// Where a pod is accounted, and whether only by assumption.
#[derive(Debug)]
struct Placement {
    node: String,
    assumed: bool,
}

/// Nodes in a stable order (the scheduler walks them round-robin) and
/// where every placed pod is.
#[derive(Debug, Default)]
pub struct Cache {
    infos: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    placements: HashMap<String, Placement>,
}

impl Cache {
    /// All node infos, including placeholders without a Node.
    pub fn infos(&self) -> &[NodeInfo] {
        &self.infos
    }

    /// How many nodes have a Node object.
    pub fn node_count(&self) -> usize {
        self.infos.iter().filter(|i| i.node.is_some()).count()
    }

    pub fn info(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&at| &self.infos[at])
    }

    fn info_mut(&mut self, name: &str) -> &mut NodeInfo {
        let at = *self.index.entry(name.to_owned()).or_insert_with(|| {
            self.infos.push(NodeInfo {
                name: name.to_owned(),
                ..Default::default()
            });
            self.infos.len() - 1
        });
        &mut self.infos[at]
    }

    /// Adds or replaces a node; returns whether anything that decides
    /// placement changed (labels, taints, schedulability, allocatable,
    /// readiness), so heartbeats do not retry every unschedulable pod.
    pub fn upsert_node(&mut self, node: Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        let info = self.info_mut(&name);
        let changed = info
            .node
            .as_deref()
            .is_none_or(|old| placement_fingerprint(old) != placement_fingerprint(&node));
        info.allocatable = resources::node_allocatable(&node);
        info.node = Some(Arc::new(node));
        changed
    }

    /// Removes a node; while pods still name it, a placeholder that
    /// nothing lands on keeps their accounting.
    pub fn remove_node(&mut self, name: &str) {
        if let Some(&at) = self.index.get(name) {
            self.infos[at].node = None;
            self.infos[at].allocatable = Resources::default();
            self.drop_if_unused(name);
        }
    }

    fn drop_if_unused(&mut self, name: &str) {
        let Some(&at) = self.index.get(name) else {
            return;
        };
        if self.infos[at].node.is_some() || !self.infos[at].pods.is_empty() {
            return;
        }
        self.index.remove(name);
        self.infos.swap_remove(at);
        if let Some(moved) = self.infos.get(at) {
            let moved = moved.name().to_owned();
            if let Some(slot) = self.index.get_mut(&moved) {
                *slot = at;
            }
        }
    }

    /// Records a pod the watch reports bound (confirming an assumption,
    /// or moving it), or removes it once it is finished.
    pub fn upsert_pod(&mut self, pod: &Arc<Pod>) {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if node.is_empty() || pods::is_terminal(pod) {
            self.remove_pod(pod);
            return;
        }
        let key = pods::key(&pod.metadata);
        if let Some(placement) = self.placements.get(&key) {
            let old = placement.node.clone();
            self.info_mut(&old).remove(pod);
        }
        self.info_mut(&node).add(pod);
        self.placements.insert(
            key,
            Placement {
                node,
                assumed: false,
            },
        );
    }

    pub fn remove_pod(&mut self, pod: &Pod) {
        let key = pods::key(&pod.metadata);
        if let Some(placement) = self.placements.remove(&key) {
            self.info_mut(&placement.node).remove(pod);
            self.drop_if_unused(&placement.node);
        }
    }

    /// Whether the watch has reported this pod placed (not just assumed).
    pub fn is_confirmed(&self, key: &str) -> bool {
        self.placements.get(key).is_some_and(|p| !p.assumed)
    }

    /// Places a pod on `node` before its binding is written.
    pub fn assume(&mut self, pod: &Pod, node: &str) {
        let mut bound = pod.clone();
        bound.spec.get_or_insert_with(Default::default).node_name = Some(node.to_owned());
        let bound = Arc::new(bound);
        self.upsert_pod(&bound);
        if let Some(placement) = self.placements.get_mut(&pods::key(&pod.metadata)) {
            placement.assumed = true;
        }
    }

    /// Undoes an assumption whose binding failed (a confirmed placement
    /// is left alone: the watch knows better).
    pub fn forget(&mut self, pod: &Pod) {
        let key = pods::key(&pod.metadata);
        if self.placements.get(&key).is_some_and(|p| p.assumed) {
            self.remove_pod(pod);
        }
    }

    /// Placed pods with required anti-affinity terms, with their nodes.
    pub fn placed_with_anti_affinity(&self) -> impl Iterator<Item = (&NodeInfo, &Arc<Pod>)> {
        self.infos
            .iter()
            .filter(|info| info.anti_affinity_pods > 0)
            .flat_map(|info| {
                info.pods
                    .iter()
                    .filter(|p| has_required_anti_affinity(p))
                    .map(move |pod| (info, pod))
            })
    }

    /// Every placed pod with the node it is on.
    pub fn placed(&self) -> impl Iterator<Item = (&NodeInfo, &Arc<Pod>)> {
        self.infos
            .iter()
            .flat_map(|info| info.pods.iter().map(move |pod| (info, pod)))
    }
}

fn placement_fingerprint(node: &Node) -> impl PartialEq + use<'_> {
    let spec = node.spec.as_ref();
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    (
        &node.metadata.labels,
        spec.and_then(|s| s.taints.as_ref()),
        spec.and_then(|s| s.unschedulable),
        status.and_then(|s| s.allocatable.as_ref()),
        ready,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::fixtures::{node, pod};

    #[test]
    fn assumptions_count_until_forgotten_or_confirmed() {
        let mut cache = Cache::default();
        cache.upsert_node(node("n1", "4", "8Gi"));
        let web = pod("web", "1", "1Gi");
        cache.assume(&web, "n1");
        assert_eq!(cache.info("n1").unwrap().requested.milli_cpu, 1000);
        cache.forget(&web);
        assert_eq!(cache.info("n1").unwrap().requested.milli_cpu, 0);

        cache.assume(&web, "n1");
        let mut bound = web.clone();
        bound.spec.as_mut().unwrap().node_name = Some("n1".to_owned());
        cache.upsert_pod(&Arc::new(bound.clone()));
        cache.forget(&web);
        assert_eq!(
            cache.info("n1").unwrap().requested.milli_cpu,
            1000,
            "confirmed placements survive forget"
        );
        assert_eq!(cache.info("n1").unwrap().pods.len(), 1);

        bound.status.get_or_insert_with(Default::default).phase = Some("Succeeded".to_owned());
        cache.upsert_pod(&Arc::new(bound));
        assert_eq!(cache.info("n1").unwrap().requested, Resources::default());
    }

    #[test]
    fn pods_before_their_node_and_node_removal() {
        let mut cache = Cache::default();
        let mut early = pod("early", "1", "1Gi");
        early.spec.as_mut().unwrap().node_name = Some("n2".to_owned());
        cache.upsert_pod(&Arc::new(early.clone()));
        assert_eq!(cache.node_count(), 0);
        assert!(cache.upsert_node(node("n2", "4", "8Gi")));
        assert!(!cache.upsert_node(node("n2", "4", "8Gi")), "unchanged");
        assert_eq!(cache.info("n2").unwrap().requested.milli_cpu, 1000);
        cache.upsert_node(node("n1", "4", "8Gi"));
        cache.remove_node("n2");
        assert_eq!(cache.node_count(), 1, "placeholder keeps the pod");
        cache.remove_pod(&early);
        cache.remove_node("n2");
        cache.remove_node("n1");
        assert!(cache.infos().is_empty());
    }
}
