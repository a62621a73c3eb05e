//! Scores: which feasible node suits the pod best. Each plugin scores
//! every feasible node 0-100 and is weighted as upstream's default
//! profile weights it (resources 1 each, node affinity 2, pod affinity 2,
//! topology spread 2, taint toleration 3).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Pod, WeightedPodAffinityTerm};

use super::{
    cache::{Cache, NodeInfo},
    filter::{PodContext, term_matches},
};
use crate::{labels, pods};

const MAX: i64 = 100;

const WEIGHT_LEAST_ALLOCATED: i64 = 1;
const WEIGHT_BALANCED: i64 = 1;
const WEIGHT_NODE_AFFINITY: i64 = 2;
const WEIGHT_POD_AFFINITY: i64 = 2;
const WEIGHT_SPREAD: i64 = 2;
const WEIGHT_TAINTS: i64 = 3;

/// The weighted total for each feasible node, in the same order.
pub fn score(context: &PodContext<'_>, cache: &Cache, feasible: &[&NodeInfo]) -> Vec<i64> {
    let mut totals: Vec<i64> = feasible
        .iter()
        .map(|info| {
            WEIGHT_LEAST_ALLOCATED * least_allocated(context, info)
                + WEIGHT_BALANCED * balanced(context, info)
        })
        .collect();
    let plugins: [(i64, Vec<i64>); 4] = [
        (
            WEIGHT_NODE_AFFINITY,
            normalize(node_affinity(context.pod, feasible), false),
        ),
        (
            WEIGHT_POD_AFFINITY,
            normalize_range(pod_affinity(context.pod, cache, feasible)),
        ),
        (WEIGHT_SPREAD, spread(context, feasible)),
        (
            WEIGHT_TAINTS,
            normalize(prefer_no_schedule(context.pod, feasible), true),
        ),
    ];
    for (weight, scores) in plugins {
        for (total, score) in totals.iter_mut().zip(scores) {
            *total += weight * score;
        }
    }
    totals
}

/// (requested, allocatable) for CPU and memory with the pod placed.
fn with_pod(context: &PodContext<'_>, info: &NodeInfo) -> [(i64, i64); 2] {
    [
        (
            info.score_requested.0 + context.score_requests.0,
            info.allocatable.milli_cpu,
        ),
        (
            info.score_requested.1 + context.score_requests.1,
            info.allocatable.memory,
        ),
    ]
}

/// Free share of CPU and memory after placing the pod, averaged.
fn least_allocated(context: &PodContext<'_>, info: &NodeInfo) -> i64 {
    let free = |requested: i64, allocatable: i64| {
        if allocatable <= 0 || requested > allocatable {
            0
        } else {
            (allocatable - requested) * MAX / allocatable
        }
    };
    let [(cpu, cpu_allocatable), (memory, memory_allocatable)] = with_pod(context, info);
    let cpu = free(cpu, cpu_allocatable);
    let memory = free(memory, memory_allocatable);
    (cpu + memory) / 2
}

/// How evenly CPU and memory would be used: 100 when the two fractions
/// are equal (upstream's standard deviation of two values is half their
/// difference).
fn balanced(context: &PodContext<'_>, info: &NodeInfo) -> i64 {
    let fraction = |requested: i64, allocatable: i64| {
        if allocatable <= 0 {
            1.0
        } else {
            (requested as f64 / allocatable as f64).min(1.0)
        }
    };
    let [(cpu, cpu_allocatable), (memory, memory_allocatable)] = with_pod(context, info);
    let cpu = fraction(cpu, cpu_allocatable);
    let memory = fraction(memory, memory_allocatable);
    let deviation = (cpu - memory).abs() / 2.0;
    ((1.0 - deviation) * MAX as f64) as i64
}

/// Sum of the weights of the preferred node affinity terms each node
/// matches.
fn node_affinity(pod: &Pod, feasible: &[&NodeInfo]) -> Vec<i64> {
    let preferred = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or_default();
    feasible
        .iter()
        .map(|info| {
            let Some(node) = &info.node else { return 0 };
            preferred
                .iter()
                .filter(|term| labels::node_term_matches(&term.preference, node))
                .map(|term| i64::from(term.weight))
                .sum()
        })
        .collect()
}

/// For each preferred pod (anti-)affinity term, the weight times the
/// matching pods in the node's topology domain (negative for anti).
fn pod_affinity(pod: &Pod, cache: &Cache, feasible: &[&NodeInfo]) -> Vec<i64> {
    let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    fn preferred(
        terms: Option<&Vec<WeightedPodAffinityTerm>>,
        sign: i64,
    ) -> impl Iterator<Item = (&WeightedPodAffinityTerm, i64)> {
        terms
            .into_iter()
            .flatten()
            .map(move |t| (t, sign * i64::from(t.weight)))
    }
    let terms: Vec<(&WeightedPodAffinityTerm, i64)> = preferred(
        affinity
            .and_then(|a| a.pod_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
        1,
    )
    .chain(preferred(
        affinity
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
        -1,
    ))
    .collect();
    if terms.is_empty() {
        return vec![0; feasible.len()];
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    // term index -> domain -> weighted count
    let per_term: Vec<HashMap<&str, i64>> = terms
        .iter()
        .map(|(term, weight)| {
            let key = &term.pod_affinity_term.topology_key;
            let mut domains: HashMap<&str, i64> = HashMap::new();
            for (info, other) in cache.placed() {
                if term_matches(&term.pod_affinity_term, namespace, other)
                    && let Some(domain) = info.label(key)
                {
                    *domains.entry(domain).or_default() += weight;
                }
            }
            domains
        })
        .collect();
    feasible
        .iter()
        .map(|info| {
            terms
                .iter()
                .zip(&per_term)
                .filter_map(|((term, _), domains)| {
                    let domain = info.label(&term.pod_affinity_term.topology_key)?;
                    domains.get(domain).copied()
                })
                .sum()
        })
        .collect()
}

/// ScheduleAnyway topology spread: fewer matching pods in the node's
/// domains scores higher (upstream: `MAX * (max + min - s) / max`).
fn spread(context: &PodContext<'_>, feasible: &[&NodeInfo]) -> Vec<i64> {
    if context.soft_spread.is_empty() {
        return vec![0; feasible.len()];
    }
    let raw: Vec<i64> = feasible
        .iter()
        .map(|info| {
            context
                .soft_spread
                .iter()
                .map(|c| {
                    info.label(&c.topology_key)
                        .and_then(|d| c.counts.get(d))
                        .copied()
                        .unwrap_or(0)
                })
                .sum()
        })
        .collect();
    let max = raw.iter().copied().max().unwrap_or(0);
    let min = raw.iter().copied().min().unwrap_or(0);
    if max == 0 {
        return vec![MAX; feasible.len()];
    }
    raw.iter().map(|s| MAX * (max + min - s) / max).collect()
}

/// PreferNoSchedule taints the pod does not tolerate (fewer is better).
fn prefer_no_schedule(pod: &Pod, feasible: &[&NodeInfo]) -> Vec<i64> {
    let tolerations = pods::tolerations(pod);
    feasible
        .iter()
        .map(|info| {
            let taints = info
                .node
                .as_ref()
                .and_then(|n| n.spec.as_ref())
                .and_then(|s| s.taints.as_deref())
                .unwrap_or_default();
            let count = taints
                .iter()
                .filter(|t| {
                    t.effect == "PreferNoSchedule"
                        && !tolerations.iter().any(|tol| pods::tolerates(tol, t))
                })
                .count();
            i64::try_from(count).unwrap_or(i64::MAX)
        })
        .collect()
}

/// Scales to 0-100 by the highest score (reversed: the highest gets 0).
fn normalize(raw: Vec<i64>, reverse: bool) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0);
    raw.into_iter()
        .map(|s| {
            let scaled = if max > 0 { s * MAX / max } else { 0 };
            if reverse { MAX - scaled } else { scaled }
        })
        .collect()
}

/// Scales a range that may be negative to 0-100.
fn normalize_range(raw: Vec<i64>) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0);
    let min = raw.iter().copied().min().unwrap_or(0);
    if max == min {
        return vec![0; raw.len()];
    }
    raw.into_iter()
        .map(|s| (s - min) * MAX / (max - min))
        .collect()
}
