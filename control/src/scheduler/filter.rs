//! Filters: can this pod run on this node? Each pod is examined once
//! (`PodContext::new`, upstream's PreFilter) and the per-node checks then
//! run in upstream's plugin order, stopping at the first plugin that
//! fails; the reasons become the "0/N nodes are available" message.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Pod, PodAffinityTerm, Taint, Toleration};

use super::cache::{Cache, HostPort, NodeInfo, host_ports};
use crate::{
    labels::{self, Labels},
    pods,
    resources::{self, Resources},
};

/// Why a node cannot take the pod, worded as upstream's plugins word it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Unschedulable,
    UntoleratedTaint { key: String, value: String },
    NodeAffinity,
    HostPorts,
    Insufficient(String),
    TooManyPods,
    SpreadMissingLabel,
    Spread,
    PodAffinity,
    PodAntiAffinity,
    ExistingAntiAffinity,
}

impl Reason {
    /// Whether evicting lower-priority pods from the node can remove the
    /// reason. Preemption tries only nodes where every reason is of this
    /// kind: capacity, pod count and host ports (upstream also resolves
    /// pod anti-affinity and spread this way; wharf does not yet).
    pub fn resolvable_by_preemption(&self) -> bool {
        matches!(
            self,
            Self::HostPorts | Self::Insufficient(_) | Self::TooManyPods
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unschedulable => f.write_str("node(s) were unschedulable"),
            Self::UntoleratedTaint { key, value } => {
                write!(f, "node(s) had untolerated taint {{{key}: {value}}}")
            }
            Self::NodeAffinity => f.write_str("node(s) didn't match Pod's node affinity/selector"),
            Self::HostPorts => {
                f.write_str("node(s) didn't have free ports for the requested pod ports")
            }
            Self::Insufficient(resource) => write!(f, "Insufficient {resource}"),
            Self::TooManyPods => f.write_str("Too many pods"),
            Self::SpreadMissingLabel => f.write_str(
                "node(s) didn't match pod topology spread constraints (missing required label)",
            ),
            Self::Spread => f.write_str("node(s) didn't match pod topology spread constraints"),
            Self::PodAffinity => f.write_str("node(s) didn't match pod affinity rules"),
            Self::PodAntiAffinity => f.write_str("node(s) didn't match pod anti-affinity rules"),
            Self::ExistingAntiAffinity => {
                f.write_str("node(s) didn't satisfy existing pods anti-affinity rules")
            }
        }
    }
}

const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// A required pod (anti-)affinity term resolved against the cluster: the
/// topology domains (values of `topology_key`) holding a matching pod.
#[derive(Debug)]
struct TermDomains {
    topology_key: String,
    domains: HashSet<String>,
}

/// One `DoNotSchedule` topology spread constraint and the matching pods
/// per domain among the nodes the pod may use.
#[derive(Debug)]
pub(super) struct SpreadCounts {
    pub topology_key: String,
    pub max_skew: i32,
    pub counts: HashMap<String, i64>,
    /// The pod itself matches the selector, so placing it adds one.
    self_match: bool,
}

impl SpreadCounts {
    fn min(&self) -> i64 {
        self.counts.values().copied().min().unwrap_or(0)
    }
}

/// What the filters and scores need to know about the pod, computed once
/// per scheduling attempt.
#[derive(Debug)]
pub struct PodContext<'a> {
    pub pod: &'a Pod,
    pub requests: Resources,
    pub score_requests: (i64, i64),
    tolerations: &'a [Toleration],
    host_ports: Vec<HostPort>,
    affinity: Vec<TermDomains>,
    /// No pod in the cluster matches the affinity terms but the pod
    /// matches them itself: the first of a group may go anywhere.
    affinity_first_of_group: bool,
    anti_affinity: Vec<TermDomains>,
    /// (topology key, domain) pairs existing pods' anti-affinity forbids.
    existing_anti: Vec<(String, String)>,
    pub(super) spread: Vec<SpreadCounts>,
    pub(super) soft_spread: Vec<SpreadCounts>,
}

/// Namespaces a pod affinity term covers: its list, all for an empty
/// namespace selector, else the pod's own. (Non-empty namespace selectors
/// need namespace labels the scheduler does not watch; they add nothing.)
fn term_namespaces<'t>(term: &'t PodAffinityTerm, own: &'t str) -> Option<Vec<&'t str>> {
    let listed: Vec<&str> = term
        .namespaces
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let all = term.namespace_selector.as_ref().is_some_and(|s| {
        s.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
            && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
    });
    if all {
        None
    } else if listed.is_empty() {
        Some(vec![own])
    } else {
        Some(listed)
    }
}

pub(super) fn term_matches(term: &PodAffinityTerm, owner_namespace: &str, other: &Pod) -> bool {
    let namespace = other.metadata.namespace.as_deref().unwrap_or_default();
    let in_namespace =
        term_namespaces(term, owner_namespace).is_none_or(|list| list.contains(&namespace));
    let empty = Labels::new();
    let other_labels = other.metadata.labels.as_ref().unwrap_or(&empty);
    in_namespace
        && term
            .label_selector
            .as_ref()
            .is_some_and(|s| labels::selector_matches(s, other_labels))
}

fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

fn required_terms(pod: &Pod, anti: bool) -> &[PodAffinityTerm] {
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let terms = if anti {
        affinity
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
    } else {
        affinity
            .and_then(|a| a.pod_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
    };
    terms.map(Vec::as_slice).unwrap_or_default()
}

fn resolve_terms(cache: &Cache, pod: &Pod, terms: &[PodAffinityTerm]) -> Vec<TermDomains> {
    let namespace = pod_namespace(pod);
    terms
        .iter()
        .map(|term| TermDomains {
            topology_key: term.topology_key.clone(),
            domains: cache
                .placed()
                .filter(|(_, other)| term_matches(term, namespace, other))
                .filter_map(|(info, _)| info.label(&term.topology_key).map(str::to_owned))
                .collect(),
        })
        .collect()
}

/// Whether the node passes the pod's nodeSelector and required node
/// affinity (NodeAffinity plugin; topology spread honours it too).
pub fn node_affinity_matches(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = &pod.spec else {
        return true;
    };
    let empty = Labels::new();
    let node_labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(key, value)| node_labels.get(key) == Some(value));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    selector_ok && required.is_none_or(|r| labels::node_terms_match(&r.node_selector_terms, node))
}

fn spread_counts(cache: &Cache, pod: &Pod, hard: bool) -> Vec<SpreadCounts> {
    let Some(constraints) = pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_ref())
    else {
        return Vec::new();
    };
    let namespace = pod_namespace(pod);
    let empty = Labels::new();
    let own_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    constraints
        .iter()
        .filter(|c| (c.when_unsatisfiable == "DoNotSchedule") == hard)
        .map(|constraint| {
            let selector = constraint.label_selector.clone().unwrap_or_default();
            let mut counts: HashMap<String, i64> = HashMap::new();
            for info in cache.infos() {
                let Some(node) = &info.node else { continue };
                if !node_affinity_matches(pod, node) {
                    continue;
                }
                let Some(domain) = info.label(&constraint.topology_key) else {
                    continue;
                };
                let matching = info
                    .pods
                    .iter()
                    .filter(|other| {
                        pod_namespace(other) == namespace
                            && !pods::is_deleting(&other.metadata)
                            && labels::selector_matches(
                                &selector,
                                other.metadata.labels.as_ref().unwrap_or(&empty),
                            )
                    })
                    .count();
                *counts.entry(domain.to_owned()).or_default() +=
                    i64::try_from(matching).unwrap_or(i64::MAX);
            }
            SpreadCounts {
                topology_key: constraint.topology_key.clone(),
                max_skew: constraint.max_skew,
                counts,
                self_match: labels::selector_matches(&selector, own_labels),
            }
        })
        .collect()
}

impl<'a> PodContext<'a> {
    pub fn new(cache: &Cache, pod: &'a Pod) -> Self {
        let namespace = pod_namespace(pod);
        let affinity_terms = required_terms(pod, false);
        let affinity = resolve_terms(cache, pod, affinity_terms);
        let empty = Labels::new();
        let own_labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        let affinity_first_of_group = !affinity_terms.is_empty()
            && affinity.iter().all(|t| t.domains.is_empty())
            && affinity_terms.iter().all(|term| {
                term_namespaces(term, namespace).is_none_or(|l| l.contains(&namespace))
                    && term
                        .label_selector
                        .as_ref()
                        .is_some_and(|s| labels::selector_matches(s, own_labels))
            });
        let mut existing_anti = Vec::new();
        for (info, other) in cache.placed_with_anti_affinity() {
            for term in required_terms(other, true) {
                if term_matches(term, pod_namespace(other), pod)
                    && let Some(domain) = info.label(&term.topology_key)
                {
                    existing_anti.push((term.topology_key.clone(), domain.to_owned()));
                }
            }
        }
        Self {
            pod,
            requests: resources::pod_requests(pod),
            score_requests: resources::pod_score_requests(pod),
            tolerations: pods::tolerations(pod),
            host_ports: host_ports(pod),
            affinity,
            affinity_first_of_group,
            anti_affinity: resolve_terms(cache, pod, required_terms(pod, true)),
            existing_anti,
            spread: spread_counts(cache, pod, true),
            soft_spread: spread_counts(cache, pod, false),
        }
    }

    /// Runs the filters in upstream's order; the first failing plugin's
    /// reasons (resource fit may give several).
    pub fn filter(&self, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        let Some(node) = &info.node else {
            return Err(vec![Reason::NodeAffinity]);
        };
        self.unschedulable(node)?;
        self.taints(node)?;
        if !node_affinity_matches(self.pod, node) {
            return Err(vec![Reason::NodeAffinity]);
        }
        self.ports(info)?;
        self.fit(info)?;
        self.topology_spread(info)?;
        self.inter_pod_affinity(info)
    }

    fn unschedulable(&self, node: &Node) -> Result<(), Vec<Reason>> {
        if node.spec.as_ref().and_then(|s| s.unschedulable) != Some(true) {
            return Ok(());
        }
        let taint = Taint {
            key: UNSCHEDULABLE_TAINT.to_owned(),
            effect: "NoSchedule".to_owned(),
            ..Default::default()
        };
        if self.tolerations.iter().any(|t| pods::tolerates(t, &taint)) {
            Ok(())
        } else {
            Err(vec![Reason::Unschedulable])
        }
    }

    /// NoSchedule and NoExecute taints; a node that is not Ready counts
    /// as tainted `not-ready:NoSchedule` even before the node lifecycle
    /// controller has written that taint.
    fn taints(&self, node: &Node) -> Result<(), Vec<Reason>> {
        let written = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        // Scheduling looks at hundreds of nodes per pod: the node's own
        // taints are borrowed, and copied only when one is implied.
        let implied;
        let taints: &[Taint] = if !ready && !written.iter().any(|t| t.key == NOT_READY_TAINT) {
            implied = written
                .iter()
                .cloned()
                .chain([Taint {
                    key: NOT_READY_TAINT.to_owned(),
                    effect: "NoSchedule".to_owned(),
                    ..Default::default()
                }])
                .collect::<Vec<Taint>>();
            &implied
        } else {
            written
        };
        match pods::untolerated(taints, self.tolerations, &["NoSchedule", "NoExecute"]) {
            Some(taint) => Err(vec![Reason::UntoleratedTaint {
                key: taint.key.clone(),
                value: taint.value.clone().unwrap_or_default(),
            }]),
            None => Ok(()),
        }
    }

    fn ports(&self, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        let conflict = self.host_ports.iter().any(|(protocol, ip, port)| {
            info.host_ports.iter().any(|(p, i, n)| {
                p == protocol && n == port && (i == ip || i == "0.0.0.0" || ip == "0.0.0.0")
            })
        });
        if conflict {
            Err(vec![Reason::HostPorts])
        } else {
            Ok(())
        }
    }

    fn fit(&self, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        let (want, have, free) = (&self.requests, &info.allocatable, &info.requested);
        let mut reasons = Vec::new();
        if free.pods + 1 > have.pods {
            reasons.push(Reason::TooManyPods);
        }
        let short = |request: i64, allocatable: i64, requested: i64| {
            request > 0 && request > allocatable - requested
        };
        if short(want.milli_cpu, have.milli_cpu, free.milli_cpu) {
            reasons.push(Reason::Insufficient("cpu".to_owned()));
        }
        if short(want.memory, have.memory, free.memory) {
            reasons.push(Reason::Insufficient("memory".to_owned()));
        }
        if short(
            want.ephemeral_storage,
            have.ephemeral_storage,
            free.ephemeral_storage,
        ) {
            reasons.push(Reason::Insufficient("ephemeral-storage".to_owned()));
        }
        for (name, amount) in &want.extended {
            let allocatable = have.extended.get(name).copied().unwrap_or(0);
            let requested = free.extended.get(name).copied().unwrap_or(0);
            if short(*amount, allocatable, requested) {
                reasons.push(Reason::Insufficient(name.clone()));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    fn topology_spread(&self, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        for constraint in &self.spread {
            let Some(domain) = info.label(&constraint.topology_key) else {
                return Err(vec![Reason::SpreadMissingLabel]);
            };
            let here = constraint.counts.get(domain).copied().unwrap_or(0)
                + i64::from(constraint.self_match);
            if here - constraint.min() > i64::from(constraint.max_skew) {
                return Err(vec![Reason::Spread]);
            }
        }
        Ok(())
    }

    fn inter_pod_affinity(&self, info: &NodeInfo) -> Result<(), Vec<Reason>> {
        if self
            .existing_anti
            .iter()
            .any(|(key, domain)| info.label(key) == Some(domain.as_str()))
        {
            return Err(vec![Reason::ExistingAntiAffinity]);
        }
        let in_domains = |term: &TermDomains| {
            info.label(&term.topology_key)
                .is_some_and(|v| term.domains.contains(v))
        };
        if !self.affinity_first_of_group && !self.affinity.iter().all(in_domains) {
            return Err(vec![Reason::PodAffinity]);
        }
        if self.anti_affinity.iter().any(in_domains) {
            return Err(vec![Reason::PodAntiAffinity]);
        }
        Ok(())
    }
}

/// Upstream's FitError message: "0/3 nodes are available: 1 node(s) had
/// untolerated taint {gpu: yes}, 2 Insufficient cpu." — each reason with
/// the number of nodes it ruled out, sorted as text.
pub fn unschedulable_message(nodes: usize, reasons: &BTreeMap<Reason, usize>) -> String {
    let mut parts: Vec<String> = reasons
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{nodes} nodes are available.")
    } else {
        format!("0/{nodes} nodes are available: {}.", parts.join(", "))
    }
}
