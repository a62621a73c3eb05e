//! ReplicaSet: keeps `spec.replicas` active pods from the template.
//!
//! Pods are created in slow-start batches (1, 2, 4, ...) so a template
//! the API refuses fails once, not 500 times; surplus pods are deleted
//! least valuable first (upstream's ranking: unscheduled, pending, not
//! ready, ready for less time, more restarts, newer).

use std::{cmp::Reverse, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use k8s_openapi::api::{
    apps::v1::{ReplicaSet, ReplicaSetStatus},
    core::v1::Pod,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use super::{Context, Error, claim_selected, new_pod, write_status};
use crate::{events::EventType, pods};

/// Upstream's burst limit per sync.
const MAX_BATCH: usize = 500;

/// What one sync of a ReplicaSet does.
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    pub create: usize,
    pub delete: Vec<Arc<Pod>>,
    pub status: ReplicaSetStatus,
    /// Pods that are ready but not yet available count once their
    /// `minReadySeconds` pass: look again then.
    pub requeue: Option<Duration>,
}

/// The sync of `rs` given the pods it owns. Without `expectations_met`
/// (the cache has not seen earlier writes yet) it only reports status.
pub(super) fn plan(
    rs: &ReplicaSet,
    owned: &[Arc<Pod>],
    expectations_met: bool,
    now: DateTime<Utc>,
) -> Plan {
    let spec = rs.spec.as_ref();
    let wanted = usize::try_from(spec.and_then(|s| s.replicas).unwrap_or(1)).unwrap_or(0);
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| pods::is_active(p)).collect();
    let (mut create, mut delete) = (0, Vec::new());
    if expectations_met {
        if active.len() < wanted {
            create = (wanted - active.len()).min(MAX_BATCH);
        } else if active.len() > wanted {
            let mut ranked = active.clone();
            ranked.sort_by_key(|pod| deletion_rank(pod));
            delete = ranked
                .into_iter()
                .take((active.len() - wanted).min(MAX_BATCH))
                .cloned()
                .collect();
        }
    }
    let template_labels = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let count = |f: &dyn Fn(&Pod) -> bool| {
        i32::try_from(active.iter().filter(|p| f(p)).count()).unwrap_or(i32::MAX)
    };
    let status = ReplicaSetStatus {
        replicas: count(&|_| true),
        fully_labeled_replicas: Some(count(&|p| {
            let own = p.metadata.labels.clone().unwrap_or_default();
            template_labels.iter().all(|(k, v)| own.get(k) == Some(v))
        })),
        ready_replicas: Some(count(&pods::is_ready)),
        available_replicas: Some(count(&|p| pods::is_available(p, min_ready, now))),
        observed_generation: rs.metadata.generation,
        conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
    };
    let requeue = (min_ready > 0 && status.ready_replicas != status.available_replicas)
        .then(|| Duration::from_secs(u64::try_from(min_ready).unwrap_or(0) + 1));
    Plan {
        create,
        delete,
        status,
        requeue,
    }
}

/// Lower sorts first, i.e. is deleted first.
fn deletion_rank(pod: &Pod) -> impl Ord {
    let assigned = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let ready_since = pods::ready_since(pod);
    let restarts: i32 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|s| s.restart_count).sum());
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (
        assigned,
        phase,
        ready_since.is_some(),
        // Ready for less time (a later transition) goes first.
        Reverse(ready_since),
        Reverse(restarts),
        Reverse(created),
    )
}

pub(super) async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _key = pods::key(&rs.metadata);
    // Expectations are per owner object: uids never repeat.
    let owner = rs.metadata.uid.clone().unwrap_or_default();
    if pods::is_deleting(&rs.metadata) {
        ctx.expectations.forget(&owner);
        return Ok(Action::await_change());
    }
    let namespace = rs.namespace().unwrap_or_default();
    let selector = rs
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let owned = claim_selected(&ctx, &*rs, &ctx.pods, &selector).await?;
    let met = ctx
        .expectations
        .satisfied(&owner, |name| ctx.pod_live(&namespace, name));
    let plan = plan(&rs, &owned, met, Utc::now());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    if plan.create > 0 {
        create_pods(&ctx, &rs, &api, plan.create).await?;
    }
    for pod in &plan.delete {
        let name = pod.name_any();
        ctx.expectations.deleted(&owner, name.clone());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => ctx.recorder.record(
                &*rs,
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            ),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                ctx.expectations.delete_failed(&owner, &name);
                return Err(Error::api("deleting pod", name)(error));
            }
        }
    }
    write_status(&ctx, &*rs, rs.status.as_ref(), &plan.status, None).await?;
    Ok(plan
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// Creates `count` pods in slow-start batches; stops at the first batch
/// with a failure.
async fn create_pods(
    ctx: &Context,
    rs: &ReplicaSet,
    api: &Api<Pod>,
    count: usize,
) -> Result<(), Error> {
    let key = pods::key(&rs.metadata);
    // Expectations are per owner object: uids never repeat.
    let owner = rs.metadata.uid.clone().unwrap_or_default();
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let pod = new_pod(&template, rs, &format!("{}-", rs.name_any()));
    let mut remaining = count;
    let mut batch = 1;
    while remaining > 0 {
        let size = batch.min(remaining);
        let params = PostParams::default();
        let results = futures::future::join_all((0..size).map(|_| api.create(&params, &pod))).await;
        let mut failure = None;
        for result in results {
            match result {
                Ok(created) => {
                    let name = created.name_any();
                    ctx.recorder.record(
                        rs,
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created pod: {name}"),
                    );
                    ctx.expectations.created(&owner, name);
                }
                Err(error) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            ctx.recorder.record(
                rs,
                EventType::Warning,
                "FailedCreate",
                format!("Error creating: {error}"),
            );
            return Err(Error::api("creating pods for", key)(error));
        }
        remaining -= size;
        batch *= 2;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{PodCondition, PodStatus},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn rs(replicas: i32, min_ready: i32) -> ReplicaSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "generation": 3},
            "spec": {
                "replicas": replicas,
                "minReadySeconds": min_ready,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web", "tier": "front"}}, "spec": {"containers": []}},
            },
        }))
        .unwrap()
    }

    fn pod(name: &str, node: Option<&str>, ready_for: Option<i64>, now: DateTime<Utc>) -> Arc<Pod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.to_owned());
        pod.metadata.labels = Some([("app".to_owned(), "web".to_owned())].into());
        pod.spec = Some(Default::default());
        pod.spec.as_mut().unwrap().node_name = node.map(str::to_owned);
        pod.status = Some(PodStatus {
            phase: Some(if node.is_some() { "Running" } else { "Pending" }.to_owned()),
            conditions: ready_for.map(|seconds| {
                vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: "True".to_owned(),
                    last_transition_time: Some(Time(now - chrono::Duration::seconds(seconds))),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        });
        Arc::new(pod)
    }

    #[test]
    fn creates_the_shortfall_and_reports_status() {
        let now = Utc::now();
        let owned = vec![
            pod("a", Some("n1"), Some(60), now),
            pod("b", Some("n1"), Some(2), now),
        ];
        let plan = plan(&rs(5, 10), &owned, true, now);
        assert_eq!(plan.create, 3);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.status.replicas, 2);
        assert_eq!(plan.status.ready_replicas, Some(2));
        assert_eq!(
            plan.status.available_replicas,
            Some(1),
            "b is ready for 2 s of 10"
        );
        assert_eq!(plan.status.fully_labeled_replicas, Some(0), "no tier label");
        assert_eq!(plan.status.observed_generation, Some(3));
        assert_eq!(plan.requeue, Some(Duration::from_secs(11)));
        let waiting = super::plan(&rs(5, 0), &owned, false, now);
        assert_eq!(
            (waiting.create, waiting.delete.len()),
            (0, 0),
            "expectations pending"
        );
    }

    #[test]
    fn deletes_the_least_valuable_pods_first() {
        let now = Utc::now();
        let mut deleting = Pod::clone(&pod("gone", Some("n1"), Some(60), now));
        deleting.metadata.deletion_timestamp = Some(Time(now));
        let owned = vec![
            pod("old-ready", Some("n1"), Some(600), now),
            pod("new-ready", Some("n1"), Some(5), now),
            pod("unready", Some("n1"), None, now),
            pod("unscheduled", None, None, now),
            Arc::new(deleting),
        ];
        let plan = plan(&rs(1, 0), &owned, true, now);
        let names: Vec<_> = plan.delete.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["unscheduled", "unready", "new-ready"]);
        assert_eq!(plan.status.replicas, 4, "the deleting pod is not active");
    }
}
