//! DaemonSet: one pod on every node the template may run on, as
//! upstream's daemon controller:
//!
//! - a node qualifies when the template's nodeSelector and required node
//!   affinity match it and its NoSchedule/NoExecute taints are tolerated
//!   (with the tolerations upstream adds to daemon pods);
//! - each pod is pinned to its node by a `metadata.name` node affinity
//!   term and placed by the scheduler;
//! - extra pods on a node, and pods on nodes that no longer qualify, are
//!   deleted;
//! - RollingUpdate replaces pods whose `controller-revision-hash` is old,
//!   at most `maxUnavailable` (default 1) at a time; OnDelete waits for
//!   someone else to delete them;
//! - each template is kept as a ControllerRevision (`history`), so
//!   `kubectl rollout undo daemonset` can go back.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetStatus},
        core::v1::{
            Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
            Pod, Toleration,
        },
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use super::{Context, Error, claim_selected, history::History, new_pod, write_status};
use crate::{events::EventType, pods, scheduler::node_affinity_matches};

pub const REVISION_HASH: &str = "controller-revision-hash";

/// Upstream's `AddOrUpdateDaemonPodTolerations`.
fn daemon_tolerations() -> Vec<Toleration> {
    let toleration = |key: &str, effect: &str| Toleration {
        key: Some(key.to_owned()),
        operator: Some("Exists".to_owned()),
        effect: Some(effect.to_owned()),
        ..Default::default()
    };
    vec![
        toleration("node.kubernetes.io/not-ready", "NoExecute"),
        toleration("node.kubernetes.io/unreachable", "NoExecute"),
        toleration("node.kubernetes.io/disk-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/memory-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/pid-pressure", "NoSchedule"),
        toleration("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// The pod this DaemonSet would create for `node` (before the API server
/// names it).
fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut pod = new_pod(&template, ds, &format!("{}-", ds.name_any()));
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(REVISION_HASH.to_owned(), hash.to_owned());
    let spec = pod.spec.get_or_insert_with(Default::default);
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for extra in daemon_tolerations() {
        if !tolerations.contains(&extra) {
            tolerations.push(extra);
        }
    }
    // Upstream replaces any node affinity with the node's name.
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    affinity.node_affinity = Some(NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".to_owned(),
                    operator: "In".to_owned(),
                    values: Some(vec![node.to_owned()]),
                }]),
                match_expressions: None,
            }],
        }),
        ..Default::default()
    });
    pod
}

/// Whether the DaemonSet's pod may run on the node.
fn qualifies(ds: &DaemonSet, node: &Node) -> bool {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let probe = Pod {
        metadata: Default::default(),
        spec: template.spec.clone(),
        status: None,
    };
    let mut tolerations = pods::tolerations(&probe).to_vec();
    tolerations.extend(daemon_tolerations());
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    node_affinity_matches(&probe, node)
        && pods::untolerated(taints, &tolerations, &["NoSchedule", "NoExecute"]).is_none()
}

/// The node a daemon pod is for: where it is bound, else its affinity.
fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(node.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")?
        .values
        .as_ref()?
        .first()
        .cloned()
}

/// What one sync does.
#[derive(Debug)]
pub(super) struct Plan {
    pub create_on: Vec<String>,
    pub delete: Vec<Arc<Pod>>,
    pub status: DaemonSetStatus,
}

pub(super) fn plan(
    ds: &DaemonSet,
    nodes: &[Arc<Node>],
    owned: &[Arc<Pod>],
    hash: &str,
    now: DateTime<Utc>,
) -> Plan {
    let min_ready = ds
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    let mut by_node: BTreeMap<String, Vec<&Arc<Pod>>> = BTreeMap::new();
    let mut plan = Plan {
        create_on: Vec::new(),
        delete: Vec::new(),
        status: DaemonSetStatus::default(),
    };
    // Nodes where a pod is still terminating get no new one yet (it
    // would fight the old one for host ports).
    let mut terminating = HashSet::new();
    for pod in owned {
        let Some(node) = target_node(pod) else {
            continue;
        };
        if pods::is_terminal(pod) && !pods::is_deleting(&pod.metadata) {
            // A failed (or exited) daemon is replaced: deleted now,
            // created again next sync.
            plan.delete.push(Arc::clone(pod));
            terminating.insert(node);
        } else if pods::is_deleting(&pod.metadata) {
            terminating.insert(node);
        } else if pods::is_active(pod) {
            by_node.entry(node).or_default().push(pod);
        }
    }
    let eligible: Vec<&Arc<Node>> = nodes.iter().filter(|n| qualifies(ds, n)).collect();
    let is_current = |p: &Pod| p.labels().get(REVISION_HASH).map(String::as_str) == Some(hash);
    let mut desired = 0;
    let (mut scheduled, mut ready, mut available, mut updated) = (0, 0, 0, 0);
    let mut outdated: Vec<&Arc<Pod>> = Vec::new();
    for node in &eligible {
        desired += 1;
        let name = node.name_any();
        let Some(mut here) = by_node.remove(&name) else {
            if !terminating.contains(&name) {
                plan.create_on.push(name);
            }
            continue;
        };
        // Keep the current, oldest pod; the rest go.
        here.sort_by_key(|p| (!is_current(p), p.metadata.creation_timestamp.clone()));
        plan.delete.extend(here.drain(1..).cloned());
        let pod = here[0];
        let bound = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some();
        scheduled += i32::from(bound);
        ready += i32::from(pods::is_ready(pod));
        available += i32::from(pods::is_available(pod, min_ready, now));
        if is_current(pod) {
            updated += i32::from(bound);
        } else {
            outdated.push(pod);
        }
    }
    // Pods on nodes that no longer qualify (or are gone).
    let misscheduled = by_node.values().flatten().count();
    plan.delete.extend(by_node.into_values().flatten().cloned());
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        != Some("OnDelete");
    if rolling {
        let max_unavailable = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.clone())
            .unwrap_or(IntOrString::Int(1));
        let max_unavailable = super::scaled_value(&max_unavailable, desired, true)
            .unwrap_or(1)
            .max(1);
        let unavailable = desired - available;
        let mut budget = max_unavailable - unavailable;
        // Unavailable old pods cost nothing to replace; do those first.
        outdated.sort_by_key(|p| pods::is_available(p, min_ready, now));
        for pod in outdated {
            let free = !pods::is_available(pod, min_ready, now);
            if free || budget > 0 {
                budget -= i32::from(!free);
                plan.delete.push(Arc::clone(pod));
            }
        }
    }
    plan.status = DaemonSetStatus {
        current_number_scheduled: scheduled,
        desired_number_scheduled: desired,
        number_misscheduled: i32::try_from(misscheduled).unwrap_or(i32::MAX),
        number_ready: ready,
        number_available: Some(available),
        // Zero is written, not left out: a merge patch would keep the
        // old count.
        number_unavailable: Some(desired - available),
        updated_number_scheduled: Some(updated),
        observed_generation: ds.metadata.generation,
        collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
        conditions: ds.status.as_ref().and_then(|s| s.conditions.clone()),
    };
    plan
}

pub(super) async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&ds.metadata) {
        return Ok(Action::await_change());
    }
    let namespace = ds.namespace().unwrap_or_default();
    let _key = pods::key(&ds.metadata);
    // Expectations are per owner object: uids never repeat.
    let owner = ds.metadata.uid.clone().unwrap_or_default();
    let selector = ds
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let owned = claim_selected(&ctx, &*ds, &ctx.pods, &selector).await?;
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let live: HashSet<String> = owned
        .iter()
        .filter_map(|p| p.labels().get(REVISION_HASH))
        .map(|hash| format!("{}-{hash}", ds.name_any()))
        .collect();
    let history = History {
        owner: &*ds,
        template: &template,
        collisions: ds.status.as_ref().and_then(|s| s.collision_count),
        hash_label: REVISION_HASH,
        live: &live,
        limit: ds
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10),
    };
    let Some(current) = history.sync(&ctx, &selector).await? else {
        return Ok(Action::await_change());
    };
    let hash = current.hash;
    let met = ctx
        .expectations
        .satisfied(&owner, |name| ctx.pod_live(&namespace, name));
    let plan = plan(&ds, &ctx.nodes.state(), &owned, &hash, Utc::now());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    if met {
        for node in &plan.create_on {
            let created = api
                .create(&PostParams::default(), &pod_for(&ds, node, &hash))
                .await
                .map_err(Error::api("creating a daemon pod for", node.clone()))?;
            ctx.expectations.created(&owner, created.name_any());
            ctx.recorder.record(
                &*ds,
                EventType::Normal,
                "SuccessfulCreate",
                format!("Created pod: {}", created.name_any()),
            );
        }
        for pod in &plan.delete {
            ctx.expectations.deleted(&owner, pod.name_any());
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => ctx.recorder.record(
                    &*ds,
                    EventType::Normal,
                    "SuccessfulDelete",
                    format!("Deleted pod: {}", pod.name_any()),
                ),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    ctx.expectations.delete_failed(&owner, &pod.name_any());
                    return Err(Error::api("deleting daemon pod", pod.name_any())(error));
                }
            }
        }
    }
    write_status(&ctx, &*ds, ds.status.as_ref(), &plan.status, None).await?;
    Ok(requeue_for_min_ready(
        ds.spec.as_ref().and_then(|s| s.min_ready_seconds),
    ))
}

/// Pods become available `minReadySeconds` after they are Ready, which no
/// watch event announces: look again then.
pub(super) fn requeue_for_min_ready(min_ready_seconds: Option<i32>) -> Action {
    match min_ready_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
    {
        Some(seconds) => Action::requeue(std::time::Duration::from_secs(seconds + 1)),
        None => Action::await_change(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn daemonset(selector: serde_json::Value, strategy: serde_json::Value) -> DaemonSet {
        serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds", "generation": 1},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "updateStrategy": strategy,
                "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"nodeSelector": selector, "containers": []}},
            },
        }))
        .unwrap()
    }

    fn node(name: &str, labels: serde_json::Value, taints: serde_json::Value) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(
                json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}),
            )
            .unwrap(),
        )
    }

    fn running(ds: &DaemonSet, node: &str, hash: &str, ready: bool) -> Arc<Pod> {
        let mut pod = pod_for(ds, node, hash);
        pod.metadata.name = Some(format!("agent-{node}-{hash}"));
        pod.spec.as_mut().unwrap().node_name = Some(node.to_owned());
        let mut value = serde_json::to_value(pod).unwrap();
        value["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]});
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn one_pod_per_qualifying_node() {
        let ds = daemonset(json!({"role": "edge"}), json!({}));
        let nodes = vec![
            node("n1", json!({"role": "edge"}), json!([])),
            node(
                "n2",
                json!({"role": "edge"}),
                json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
            ),
            node("n3", json!({"role": "core"}), json!([])),
            node(
                "n4",
                json!({"role": "edge"}),
                json!([{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]),
            ),
        ];
        let stray = running(&ds, "n3", "h1", true);
        let plan = plan(&ds, &nodes, &[stray], "h1", Utc::now());
        assert_eq!(
            plan.create_on,
            ["n1", "n4"],
            "cordoned nodes still get daemons"
        );
        assert_eq!(plan.delete.len(), 1, "n3 does not qualify");
        assert_eq!(plan.status.desired_number_scheduled, 2);
        assert_eq!(plan.status.number_misscheduled, 1);
        let pod = pod_for(&ds, "n1", "h1");
        assert_eq!(target_node(&pod).as_deref(), Some("n1"));
        assert_eq!(pod.labels()[REVISION_HASH], "h1");
    }

    #[test]
    fn rolling_updates_replace_at_most_max_unavailable() {
        let ds = daemonset(
            json!({}),
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}}),
        );
        let nodes: Vec<Arc<Node>> = (1..=5)
            .map(|i| node(&format!("n{i}"), json!({}), json!([])))
            .collect();
        let mut owned: Vec<Arc<Pod>> = (1..=5)
            .map(|i| running(&ds, &format!("n{i}"), "old", true))
            .collect();
        let first = plan(&ds, &nodes, &owned, "new", Utc::now());
        assert_eq!(first.delete.len(), 2);
        assert!(first.create_on.is_empty());
        // One old pod is already unready: replacing it is free.
        owned[4] = running(&ds, "n5", "old", false);
        let second = plan(&ds, &nodes, &owned, "new", Utc::now());
        assert_eq!(
            second.delete.len(),
            2,
            "one free plus one of budget 2 - 1 unavailable"
        );
        assert_eq!(
            second.delete[0].spec.as_ref().unwrap().node_name.as_deref(),
            Some("n5")
        );
        let on_delete = daemonset(json!({}), json!({"type": "OnDelete"}));
        assert!(
            plan(&on_delete, &nodes, &owned, "new", Utc::now())
                .delete
                .is_empty()
        );
    }
}
