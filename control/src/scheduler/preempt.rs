//! Preemption: a pending pod no node can take may evict pods of lower
//! priority (`spec.priority`, which the API server resolves from the
//! PriorityClass) from one node, as upstream's DefaultPreemption does:
//!
//! - only nodes where every filter failure is about capacity, pod count or
//!   host ports are candidates;
//! - on each, all lower-priority pods are removed, the pod must then fit,
//!   and victims are given back highest priority first while it still
//!   fits (fewest, least important victims);
//! - the node whose most important victim is least important wins, then
//!   the lowest sum of victim priorities, then the fewest victims.
//!
//! A pod with `preemptionPolicy: Never` never preempts, and a pod whose
//! earlier victims are still terminating waits for them instead of
//! choosing more. When nothing can be preempted, the reason per node
//! follows the FitError as upstream's does ("preemption: 0/3 nodes are
//! available: 3 No preemption victims found for incoming pod.").

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::{
    FitError,
    cache::{Cache, NodeInfo},
    filter::PodContext,
};
use crate::pods;

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

const NOT_HELPFUL: &str = "Preemption is not helpful for scheduling";
const NO_VICTIMS: &str = "No preemption victims found for incoming pod";

/// The node and the pods to evict from it, or why there is none (the
/// text after "preemption: " in the unschedulable message).
pub fn plan(cache: &Cache, pod: &Pod, fit: &FitError) -> Result<(String, Vec<Arc<Pod>>), String> {
    let per_node = |not_helpful: usize, no_victims: usize| {
        let mut parts = Vec::new();
        if not_helpful > 0 {
            parts.push(format!("{not_helpful} {NOT_HELPFUL}"));
        }
        if no_victims > 0 {
            parts.push(format!("{no_victims} {NO_VICTIMS}"));
        }
        format!("0/{} nodes are available: {}.", fit.nodes, parts.join(", "))
    };
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.preemption_policy.as_deref());
    if policy == Some("Never") {
        return Err("not eligible due to preemptionPolicy=Never.".to_owned());
    }
    if !fit.reasons.keys().any(|r| r.resolvable_by_preemption()) {
        return Err(per_node(fit.nodes, 0));
    }
    let own = priority(pod);
    let nominated = pod
        .status
        .as_ref()
        .and_then(|s| s.nominated_node_name.as_deref());
    if let Some(info) = nominated.and_then(|n| cache.info(n))
        && info
            .pods
            .iter()
            .any(|p| pods::is_deleting(&p.metadata) && priority(p) < own)
    {
        return Err("not eligible due to a terminating pod on the nominated node.".to_owned());
    }
    let context = PodContext::new(cache, pod);
    // (highest victim priority, sum of priorities, victims), node, victims
    type Candidate = ((i32, i64, usize), String, Vec<Arc<Pod>>);
    let mut best: Option<Candidate> = None;
    let (mut not_helpful, mut no_victims) = (0, 0);
    for info in cache.infos() {
        if info.node.is_none() {
            continue;
        }
        let Err(reasons) = context.filter(info) else {
            // It fits now (the cache changed since the attempt).
            continue;
        };
        if !reasons.iter().all(|r| r.resolvable_by_preemption()) {
            not_helpful += 1;
            continue;
        }
        let Some(victims) = victims_on(&context, info, own) else {
            no_victims += 1;
            continue;
        };
        let rank = (
            victims
                .iter()
                .map(|v| priority(v))
                .max()
                .unwrap_or(i32::MIN),
            victims.iter().map(|v| i64::from(priority(v))).sum(),
            victims.len(),
        );
        if best.as_ref().is_none_or(|(r, _, _)| rank < *r) {
            best = Some((rank, info.name().to_owned(), victims));
        }
    }
    best.map(|(_, node, victims)| (node, victims))
        .ok_or_else(|| per_node(not_helpful, no_victims))
}

/// The fewest least important lower-priority pods whose removal lets the
/// pod fit on this node.
fn victims_on(context: &PodContext<'_>, info: &NodeInfo, own: i32) -> Option<Vec<Arc<Pod>>> {
    let mut candidates: Vec<Arc<Pod>> = info
        .pods
        .iter()
        .filter(|p| priority(p) < own && !pods::is_deleting(&p.metadata))
        .cloned()
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let mut without = info.clone();
    for victim in &candidates {
        without.remove(victim);
    }
    context.filter(&without).ok()?;
    // Give back the most important first; keep each that still fits.
    candidates.sort_by_key(|p| std::cmp::Reverse(priority(p)));
    let mut victims = Vec::new();
    for candidate in candidates {
        let mut with = without.clone();
        with.add(&candidate);
        if context.filter(&with).is_ok() {
            without = with;
        } else {
            victims.push(candidate);
        }
    }
    Some(victims)
}
