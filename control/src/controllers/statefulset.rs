//! StatefulSet: pods with stable names `<set>-<ordinal>` (and hostnames
//! under the governing Service's subdomain), as upstream's controller:
//!
//! - `OrderedReady` (the default) creates ordinal i only once 0..i are
//!   Running and Ready, and removes the highest ordinal first, one at a
//!   time, only while the others are Ready; `Parallel` does each all at
//!   once;
//! - RollingUpdate replaces pods of an old revision from the highest
//!   ordinal down to `partition`, one at a time, each once the rest are
//!   Ready; OnDelete waits for someone else to delete them;
//! - a finished (Succeeded or Failed) pod is deleted so it comes back;
//! - each template is kept as a ControllerRevision `<set>-<hash>`
//!   (`history`), whose name the pods carry in `controller-revision-hash`
//!   and the status in `currentRevision`/`updateRevision`.
//!
//! Storage (volumeClaimTemplates) is out of scope.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use k8s_openapi::api::{
    apps::v1::{StatefulSet, StatefulSetStatus},
    core::v1::Pod,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::controller::Action,
};

use super::{
    Context, Error, claim_selected, daemonset::REVISION_HASH, history::History, new_pod,
    write_status,
};
use crate::{events::EventType, pods};

const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX: &str = "apps.kubernetes.io/pod-index";
/// The hash label on a StatefulSet's revisions (pods carry the name).
const HASH_LABEL: &str = "controller.kubernetes.io/hash";

/// The ordinal in `<set>-<ordinal>`, for pods of this set.
fn ordinal(set: &str, pod: &Pod) -> Option<i32> {
    pod.metadata
        .name
        .as_deref()?
        .strip_prefix(set)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|n| *n >= 0)
}

/// What one sync does.
#[derive(Debug)]
pub(super) struct Plan {
    pub create: Vec<i32>,
    pub delete: Vec<Arc<Pod>>,
    pub status: StatefulSetStatus,
}

/// `revision` is the name of the template's ControllerRevision.
pub(super) fn plan(
    sts: &StatefulSet,
    owned: &[Arc<Pod>],
    revision: &str,
    now: DateTime<Utc>,
) -> Plan {
    let name = sts.name_any();
    let spec = sts.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let by_ordinal: BTreeMap<i32, &Arc<Pod>> = owned
        .iter()
        .filter_map(|p| ordinal(&name, p).map(|o| (o, p)))
        .collect();
    let healthy = |p: &Pod| pods::is_active(p) && pods::is_ready(p);
    // Pods made before revisions were kept carry the bare hash.
    let runs = |p: &Pod, revision: &str| {
        p.labels().get(REVISION_HASH).is_some_and(|label| {
            label == revision || revision.strip_prefix(&format!("{name}-")) == Some(label)
        })
    };
    let mut plan = Plan {
        create: Vec::new(),
        delete: Vec::new(),
        status: StatefulSetStatus::default(),
    };
    // Finished pods are replaced (deleted now, created next sync).
    for pod in by_ordinal.values() {
        if pods::is_terminal(pod) && !pods::is_deleting(&pod.metadata) {
            plan.delete.push(Arc::clone(pod));
        }
    }
    let terminating = by_ordinal.values().any(|p| pods::is_deleting(&p.metadata));
    let wanted = 0..replicas;
    let missing: Vec<i32> = wanted
        .clone()
        .filter(|o| !by_ordinal.contains_key(o))
        .collect();
    let surplus: Vec<&Arc<Pod>> = by_ordinal
        .iter()
        .filter(|(o, _)| !wanted.contains(o))
        .map(|(_, p)| *p)
        .collect();
    let all_healthy = wanted
        .clone()
        .all(|o| by_ordinal.get(&o).is_some_and(|p| healthy(p)));
    if parallel {
        plan.create = missing;
        plan.delete.extend(
            surplus
                .into_iter()
                .filter(|p| !pods::is_deleting(&p.metadata))
                .cloned(),
        );
    } else if let Some(&first) = missing.first() {
        // Only after every lower ordinal is up.
        if (0..first).all(|o| by_ordinal.get(&o).is_some_and(|p| healthy(p))) && !terminating {
            plan.create.push(first);
        }
    } else if let Some(highest) = surplus.last()
        && all_healthy
        && !terminating
    {
        plan.delete.push(Arc::clone(highest));
    }

    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let rolling = strategy.type_.as_deref() != Some("OnDelete");
    let partition = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .unwrap_or(0);
    if rolling && plan.create.is_empty() && plan.delete.is_empty() && all_healthy && !terminating {
        let outdated = (partition..replicas)
            .rev()
            .filter_map(|o| by_ordinal.get(&o))
            .find(|p| !runs(p, revision));
        plan.delete.extend(outdated.map(|p| Arc::clone(p)));
    }
    let active: Vec<&&Arc<Pod>> = by_ordinal.values().filter(|p| pods::is_active(p)).collect();
    let count = |f: &dyn Fn(&Pod) -> bool| {
        i32::try_from(active.iter().filter(|p| f(p)).count()).unwrap_or(i32::MAX)
    };
    let updated = count(&|p| runs(p, revision));
    let previous = sts.status.clone().unwrap_or_default();
    let current_revision =
        if updated == replicas && i32::try_from(active.len()).unwrap_or(0) == replicas {
            revision.to_owned()
        } else {
            previous
                .current_revision
                .clone()
                .unwrap_or_else(|| revision.to_owned())
        };
    plan.status = StatefulSetStatus {
        replicas: count(&|_| true),
        ready_replicas: Some(count(&pods::is_ready)),
        available_replicas: Some(count(&|p| pods::is_available(p, min_ready, now))),
        current_replicas: Some(count(&|p| runs(p, &current_revision))),
        updated_replicas: Some(updated),
        current_revision: Some(current_revision),
        update_revision: Some(revision.to_owned()),
        observed_generation: sts.metadata.generation,
        collision_count: previous.collision_count,
        conditions: previous.conditions,
    };
    plan
}

fn pod_for(sts: &StatefulSet, ordinal: i32, revision: &str) -> Pod {
    let template = sts
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let name = format!("{}-{ordinal}", sts.name_any());
    let mut pod = new_pod(&template, sts, "");
    pod.metadata.generate_name = None;
    pod.metadata.name = Some(name.clone());
    let labels = pod.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(POD_NAME.to_owned(), name.clone());
    labels.insert(POD_INDEX.to_owned(), ordinal.to_string());
    labels.insert(REVISION_HASH.to_owned(), revision.to_owned());
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.hostname = Some(name);
    spec.subdomain = sts
        .spec
        .as_ref()
        .and_then(|s| s.service_name.clone())
        .filter(|s| !s.is_empty());
    pod
}

pub(super) async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&sts.metadata) {
        return Ok(Action::await_change());
    }
    let namespace = sts.namespace().unwrap_or_default();
    let key = pods::key(&sts.metadata);
    let selector = sts
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let owned = claim_selected(&ctx, &*sts, &ctx.pods, &selector).await?;
    let template = sts
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let live: HashSet<String> = owned
        .iter()
        .filter_map(|p| p.labels().get(REVISION_HASH).cloned())
        .collect();
    let history = History {
        owner: &*sts,
        template: &template,
        collisions: sts.status.as_ref().and_then(|s| s.collision_count),
        hash_label: HASH_LABEL,
        live: &live,
        limit: sts
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10),
    };
    let Some(current) = history.sync(&ctx, &selector).await? else {
        return Ok(Action::await_change());
    };
    let revision = current.name;
    let plan = plan(&sts, &owned, &revision, Utc::now());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for ordinal in &plan.create {
        match api
            .create(&PostParams::default(), &pod_for(&sts, *ordinal, &revision))
            .await
        {
            Ok(created) => ctx.recorder.record(
                &*sts,
                EventType::Normal,
                "SuccessfulCreate",
                format!(
                    "create Pod {} in StatefulSet {} successful",
                    created.name_any(),
                    sts.name_any()
                ),
            ),
            // The previous pod of this name is still being removed.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(Error::api("creating a pod for", &key)(error)),
        }
    }
    for pod in &plan.delete {
        match api.delete(&pod.name_any(), &DeleteParams::default()).await {
            Ok(_) => ctx.recorder.record(
                &*sts,
                EventType::Normal,
                "SuccessfulDelete",
                format!(
                    "delete Pod {} in StatefulSet {} successful",
                    pod.name_any(),
                    sts.name_any()
                ),
            ),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::api("deleting", pod.name_any())(error)),
        }
    }
    write_status(&ctx, &*sts, sts.status.as_ref(), &plan.status, None).await?;
    Ok(super::daemonset::requeue_for_min_ready(
        sts.spec.as_ref().and_then(|s| s.min_ready_seconds),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn set(replicas: i32, policy: &str, partition: i32) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "default", "uid": "s"},
            "spec": {
                "replicas": replicas, "serviceName": "db", "podManagementPolicy": policy,
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
                "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}},
            },
        }))
        .unwrap()
    }

    fn pod(sts: &StatefulSet, ordinal: i32, revision: &str, ready: bool) -> Arc<Pod> {
        let mut value = serde_json::to_value(pod_for(sts, ordinal, revision)).unwrap();
        value["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]});
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn ordered_pods_come_one_at_a_time() {
        let sts = set(3, "OrderedReady", 0);
        let now = Utc::now();
        assert_eq!(plan(&sts, &[], "r1", now).create, [0]);
        let waiting = plan(&sts, &[pod(&sts, 0, "r1", false)], "r1", now);
        assert!(waiting.create.is_empty(), "db-0 is not ready yet");
        let next = plan(&sts, &[pod(&sts, 0, "r1", true)], "r1", now);
        assert_eq!(next.create, [1]);
        let parallel = set(3, "Parallel", 0);
        assert_eq!(plan(&parallel, &[], "r1", now).create, [0, 1, 2]);

        let created = pod_for(&sts, 2, "r1");
        assert_eq!(created.name_any(), "db-2");
        let spec = created.spec.unwrap();
        assert_eq!(
            (spec.hostname.as_deref(), spec.subdomain.as_deref()),
            (Some("db-2"), Some("db"))
        );
    }

    #[test]
    fn scale_down_and_updates_go_highest_first() {
        let now = Utc::now();
        let sts = set(1, "OrderedReady", 0);
        let three: Vec<Arc<Pod>> = (0..3).map(|o| pod(&sts, o, "r1", true)).collect();
        assert_eq!(names(&plan(&sts, &three, "r1", now).delete), ["db-2"]);

        let sts = set(3, "OrderedReady", 1);
        let update = plan(&sts, &three, "r2", now);
        assert_eq!(names(&update.delete), ["db-2"]);
        let mut rolled = three.clone();
        rolled[2] = pod(&sts, 2, "r2", true);
        assert_eq!(names(&plan(&sts, &rolled, "r2", now).delete), ["db-1"]);
        rolled[1] = pod(&sts, 1, "r2", true);
        let done = plan(&sts, &rolled, "r2", now);
        assert!(done.delete.is_empty(), "db-0 is below the partition");
        assert_eq!(done.status.updated_replicas, Some(2));
        assert_eq!(done.status.update_revision.as_deref(), Some("r2"));
    }
}
