//! Node lifecycle, as upstream's node lifecycle controller and taint
//! manager:
//!
//! - a node whose Lease (or Ready heartbeat) is older than
//!   `--node-monitor-grace-period` (40 s) gets its conditions set to
//!   Unknown ("Kubelet stopped posting node status.") and its pods marked
//!   not ready, so endpoints drop them at once;
//! - taints follow the Ready condition: `unreachable` for Unknown,
//!   `not-ready` for False, each as NoSchedule and NoExecute;
//! - pods on a node with NoExecute taints they do not tolerate are
//!   deleted, at once or when their `tolerationSeconds` (300 s by default,
//!   added by the API server's admission) run out from the taint's
//!   `timeAdded`;
//! - when every node of a zone (`topology.kubernetes.io/zone`; a cluster
//!   without zones is one) is not ready, the fault more likely lies
//!   between the control plane and the nodes than in all of them: as
//!   upstream's full-disruption mode, no NoExecute taints are added and
//!   none are kept there, so nothing is evicted until a node of the zone
//!   is Ready again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod, Taint},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error};
use crate::{events::EventType, pods};

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const ZONE: &str = "topology.kubernetes.io/zone";

/// What one look at a node decides.
#[derive(Debug)]
pub(super) struct Decision {
    /// The heartbeat is overdue: conditions become Unknown.
    pub mark_unknown: bool,
    /// New `spec.taints`, if they change.
    pub taints: Option<Vec<Taint>>,
    pub evict: Vec<Arc<Pod>>,
    pub requeue: Duration,
}

fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// The latest sign of life: Lease renewal, Ready heartbeat, or creation.
pub(super) fn heartbeat(node: &Node, lease: Option<&Lease>) -> Option<DateTime<Utc>> {
    let renewed = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let posted = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [renewed, posted, created].into_iter().flatten().max()
}

fn to_std(duration: chrono::Duration) -> Duration {
    duration.to_std().unwrap_or(Duration::ZERO)
}

/// `silent_for`: how long since this controller saw the heartbeat
/// change (its own clock, not the agent's: skew cannot age a node, and a
/// restarted controller gives every node a full grace period).
pub(super) fn decide(
    node: &Node,
    silent_for: Duration,
    pods_on_node: impl FnOnce() -> Vec<Arc<Pod>>,
    grace: Duration,
    rest_of_zone_down: impl FnOnce() -> bool,
    now: DateTime<Utc>,
) -> Decision {
    let stale = silent_for > grace;
    let status = if stale {
        "Unknown"
    } else {
        ready_status(node).unwrap_or("Unknown")
    };
    let mut requeue = if stale {
        Duration::from_secs(5)
    } else {
        grace - silent_for + Duration::from_secs(1)
    };
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let condition_key = match status {
        "True" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    };
    let mut taints: Vec<Taint> = current
        .iter()
        .filter(|t| t.key != NOT_READY && t.key != UNREACHABLE)
        .cloned()
        .collect();
    // Asked only of a node that is not ready: it scans every node.
    let zone_down = condition_key.is_some() && rest_of_zone_down();
    if let Some(key) = condition_key {
        for effect in ["NoSchedule", "NoExecute"] {
            if zone_down && effect == "NoExecute" {
                continue;
            }
            let existing = current.iter().find(|t| t.key == key && t.effect == effect);
            taints.push(existing.cloned().unwrap_or_else(|| Taint {
                key: key.to_owned(),
                value: None,
                effect: effect.to_owned(),
                time_added: (effect == "NoExecute").then_some(Time(now)),
            }));
        }
    }
    let mut evict = Vec::new();
    let no_execute: Vec<&Taint> = taints.iter().filter(|t| t.effect == "NoExecute").collect();
    if !no_execute.is_empty() {
        for pod in pods_on_node() {
            if !pods::is_active(&pod) {
                continue;
            }
            let tolerations = pods::tolerations(&pod);
            // The earliest moment any taint stops being tolerated.
            let mut deadline: Option<DateTime<Utc>> = None;
            let mut untolerated = false;
            for taint in &no_execute {
                let matching: Vec<_> = tolerations
                    .iter()
                    .filter(|t| pods::tolerates(t, taint))
                    .collect();
                if matching.is_empty() {
                    untolerated = true;
                    break;
                }
                // Tolerated forever unless every match has a limit.
                let limit = matching
                    .iter()
                    .map(|t| t.toleration_seconds)
                    .try_fold(i64::MIN, |acc, s| s.map(|s| acc.max(s)));
                if let Some(seconds) = limit {
                    let added = taint.time_added.as_ref().map_or(now, |t| t.0);
                    let at = added + chrono::Duration::seconds(seconds.max(0));
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                }
            }
            match deadline {
                _ if untolerated => evict.push(pod),
                Some(at) if at <= now => evict.push(pod),
                Some(at) => requeue = requeue.min(to_std(at - now) + Duration::from_millis(100)),
                None => {}
            }
        }
    }
    Decision {
        mark_unknown: stale && ready_status(node) != Some("Unknown"),
        taints: (taints != current).then_some(taints),
        evict,
        requeue,
    }
}

pub(super) async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    let lease = ctx
        .leases
        .get(&ObjectRef::new(&name).within("kube-node-lease"));
    let beat = heartbeat(&node, lease.as_deref());
    let silent_for = {
        let mut seen = ctx
            .heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = seen.entry(name.clone()).or_insert((beat, Instant::now()));
        if entry.0 != beat {
            *entry = (beat, Instant::now());
        }
        entry.1.elapsed()
    };
    let on_node = || {
        ctx.pods
            .state()
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()))
            .collect()
    };
    let zone = |n: &Node| n.labels().get(ZONE).cloned().unwrap_or_default();
    let rest_of_zone_down = || {
        ctx.nodes
            .state()
            .iter()
            .filter(|n| n.name_any() != name && zone(n) == zone(&node))
            .all(|n| ready_status(n) != Some("True"))
    };
    let decision = decide(
        &node,
        silent_for,
        on_node,
        ctx.options.node_monitor_grace,
        rest_of_zone_down,
        Utc::now(),
    );
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    if decision.mark_unknown {
        mark_unknown(&ctx, &node).await?;
    }
    if let Some(taints) = &decision.taints {
        let patch = serde_json::json!({ "spec": { "taints": taints } });
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::api("tainting", &name))?;
    }
    for pod in &decision.evict {
        ctx.recorder.record(
            pod.as_ref(),
            EventType::Normal,
            "TaintManagerEviction",
            format!("Marking for deletion Pod {}", pods::key(&pod.metadata)),
        );
        match Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
            .delete(&pod.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::api("evicting", pods::key(&pod.metadata))(error)),
        }
    }
    Ok(Action::requeue(decision.requeue))
}

/// Every condition becomes Unknown; the node's pods stop being Ready.
async fn mark_unknown(ctx: &Context, node: &Node) -> Result<(), Error> {
    let name = node.name_any();
    let now = Time(Utc::now());
    let conditions: Vec<serde_json::Value> = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .map(|c| {
            serde_json::json!({
                "type": c.type_,
                "status": "Unknown",
                "reason": "NodeStatusUnknown",
                "message": "Kubelet stopped posting node status.",
                "lastTransitionTime": now,
            })
        })
        .collect();
    Api::<Node>::all(ctx.client.clone())
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({ "status": { "conditions": conditions } })),
        )
        .await
        .map_err(Error::api("marking unknown", &name))?;
    ctx.recorder.record(
        node,
        EventType::Normal,
        "NodeNotReady",
        format!("Node {name} status is now: NodeNotReady"),
    );
    for pod in ctx.pods.state() {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str())
            || !pods::is_ready(&pod)
        {
            continue;
        }
        let patch = serde_json::json!({ "status": { "conditions": [
            { "type": "Ready", "status": "False", "lastTransitionTime": now },
        ]}});
        if let Err(error) =
            Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(patch),
                )
                .await
        {
            tracing::debug!(%error, pod = %pods::key(&pod.metadata), "marking not ready");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(ready: &str, heartbeat: DateTime<Utc>, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": Time(heartbeat)}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, tolerations: serde_json::Value) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": "n1", "containers": [], "tolerations": tolerations},
            }))
            .unwrap(),
        )
    }

    const GRACE: Duration = Duration::from_secs(40);

    #[test]
    fn a_silent_node_becomes_unknown_and_tainted() {
        let now = Utc::now();
        let ready = node("True", now, json!([]));
        let fresh = decide(
            &ready,
            Duration::from_secs(10),
            Vec::new,
            GRACE,
            || false,
            now,
        );
        assert!(!fresh.mark_unknown && fresh.taints.is_none());
        assert_eq!(fresh.requeue, Duration::from_secs(31));

        let silent = decide(
            &ready,
            Duration::from_secs(50),
            Vec::new,
            GRACE,
            || false,
            now,
        );
        assert!(silent.mark_unknown);
        let taints = silent.taints.unwrap();
        let keys: Vec<(&str, &str)> = taints
            .iter()
            .map(|t| (t.key.as_str(), t.effect.as_str()))
            .collect();
        assert_eq!(
            keys,
            [(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")]
        );

        // Back to Ready: the condition taints go, others stay.
        let tainted = node(
            "True",
            now,
            json!([{"key": UNREACHABLE, "effect": "NoExecute"}, {"key": "gpu", "effect": "NoSchedule"}]),
        );
        let recovered = decide(&tainted, Duration::ZERO, Vec::new, GRACE, || false, now);
        let keys: Vec<String> = recovered
            .taints
            .unwrap()
            .iter()
            .map(|t| t.key.clone())
            .collect();
        assert_eq!(keys, ["gpu"]);
    }

    #[test]
    fn the_latest_sign_of_life_counts() {
        let now = Utc::now();
        let earlier = now - chrono::Duration::seconds(50);
        let old = node("True", earlier, json!([]));
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now)},
        }))
        .unwrap();
        // (MicroTime keeps microseconds.)
        assert_eq!(
            heartbeat(&old, Some(&lease)).map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros())
        );
        assert_eq!(
            heartbeat(&old, None).map(|t| t.timestamp()),
            Some(earlier.timestamp()),
            "the Ready heartbeat without a lease"
        );
    }

    #[test]
    fn pods_leave_when_their_toleration_runs_out() {
        let now = Utc::now();
        let tainted_at = now - chrono::Duration::seconds(20);
        let down = node(
            "Unknown",
            now - chrono::Duration::seconds(100),
            json!([
                {"key": UNREACHABLE, "effect": "NoSchedule"},
                {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": Time(tainted_at)},
            ]),
        );
        let pods = vec![
            pod("intolerant", json!([])),
            pod(
                "ten-seconds",
                json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}]),
            ),
            pod(
                "five-minutes",
                json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
            ),
            pod("forever", json!([{"operator": "Exists"}])),
        ];
        let decision = decide(
            &down,
            Duration::from_secs(100),
            || pods.clone(),
            GRACE,
            || false,
            now,
        );
        assert!(!decision.mark_unknown, "already Unknown");
        assert!(decision.taints.is_none(), "unchanged");
        let evicted: Vec<String> = decision.evict.iter().map(|p| p.name_any()).collect();
        assert_eq!(evicted, ["intolerant", "ten-seconds"]);
        assert!(decision.requeue <= Duration::from_secs(5));
    }

    #[test]
    fn a_whole_zone_down_evicts_nothing() {
        let now = Utc::now();
        let down = node(
            "Unknown",
            now - chrono::Duration::seconds(100),
            json!([
                {"key": UNREACHABLE, "effect": "NoSchedule"},
                {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": Time(now)},
            ]),
        );
        let pods = vec![pod("intolerant", json!([]))];
        let decision = decide(
            &down,
            Duration::from_secs(100),
            || pods.clone(),
            GRACE,
            || true,
            now,
        );
        assert!(decision.evict.is_empty());
        let taints = decision.taints.expect("the NoExecute taint goes");
        assert_eq!(taints.len(), 1);
        assert_eq!(
            (taints[0].key.as_str(), taints[0].effect.as_str()),
            (UNREACHABLE, "NoSchedule")
        );
    }
}
