//! Deployment: one ReplicaSet per pod template (named by the template's
//! hash), rolled from old to new with RollingUpdate (`maxSurge`,
//! `maxUnavailable`) or Recreate, with revision numbers that
//! `kubectl rollout undo/history/status` read, history pruned to
//! `revisionHistoryLimit`, proportional scaling mid-rollout, and the
//! Available and Progressing conditions (`progressDeadlineSeconds`).
//!
//! The arithmetic is upstream's (`pkg/controller/deployment`), as pure
//! functions of the Deployment and its ReplicaSets.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec},
        core::v1::{Pod, PodTemplateSpec},
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, claim_selected, controlled_by, controller_reference, write_status};
use crate::{events::EventType, pods};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const TEMPLATE_HASH: &str = "pod-template-hash";

/// Upstream's `rand.SafeEncodeString` alphabet: no vowels, no 0/1/3.
const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The ReplicaSet name suffix for a template: FNV-1a over the template's
/// JSON and the collision count, its decimal digits mapped onto `SAFE`
/// as upstream does.
pub fn template_hash(template: &PodTemplateSpec, collisions: Option<i32>) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(template).unwrap_or_default());
    if let Some(count) = collisions {
        feed(&count.to_le_bytes());
    }
    hash.to_string()
        .bytes()
        .map(|b| char::from(SAFE[usize::from(b) % SAFE.len()]))
        .collect()
}

/// Templates equal apart from the hash label (upstream's
/// `EqualIgnoreHash`). Compared as JSON with empty objects, empty lists
/// and nulls dropped, as Go's structs make `resources: {}` and no
/// `resources` the same thing (`kubectl rollout undo` writes the former).
fn equal_ignoring_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    fn prune(value: serde_json::Value) -> Option<serde_json::Value> {
        match value {
            serde_json::Value::Null => None,
            serde_json::Value::Object(map) => {
                let map: serde_json::Map<String, serde_json::Value> = map
                    .into_iter()
                    .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                    .collect();
                (!map.is_empty()).then_some(serde_json::Value::Object(map))
            }
            serde_json::Value::Array(list) => {
                let list: Vec<serde_json::Value> = list
                    .into_iter()
                    .map(|v| prune(v).unwrap_or_default())
                    .collect();
                (!list.is_empty()).then_some(serde_json::Value::Array(list))
            }
            other => Some(other),
        }
    }
    let strip = |t: &PodTemplateSpec| {
        let mut t = t.clone();
        if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.remove(TEMPLATE_HASH);
        }
        prune(serde_json::to_value(t).unwrap_or_default())
    };
    strip(a) == strip(b)
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status.as_ref().map_or((0, 0, 0), |s| {
        (
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        )
    })
}

fn wanted(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn is_recreate(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate")
}

/// `maxSurge` (percent rounded up) and `maxUnavailable` (rounded down)
/// for the current replica count; both 0 would deadlock, so then one may
/// be unavailable.
pub(super) fn surge_and_unavailable(d: &Deployment) -> (i32, i32) {
    if is_recreate(d) {
        return (0, 0);
    }
    let rolling = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let default = IntOrString::String("25%".to_owned());
    let resolve = |value: Option<&IntOrString>, round_up: bool| {
        let total = wanted(d);
        super::scaled_value(value.unwrap_or(&default), total, round_up)
            .unwrap_or_else(|| super::scaled_value(&default, total, round_up).unwrap_or(0))
    };
    let surge = resolve(rolling.and_then(|r| r.max_surge.as_ref()), true);
    let unavailable = resolve(rolling.and_then(|r| r.max_unavailable.as_ref()), false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable.min(wanted(d)))
    }
}

/// The new ReplicaSet's size this step (upstream's `NewRSNewReplicas`).
pub(super) fn new_replicas(
    d: &Deployment,
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
) -> i32 {
    let current = new_rs.map_or(0, spec_replicas);
    if is_recreate(d) {
        return wanted(d);
    }
    if current >= wanted(d) {
        return wanted(d);
    }
    let (surge, _) = surge_and_unavailable(d);
    let total: i32 = all.iter().map(|rs| spec_replicas(rs)).sum();
    let room = wanted(d) + surge - total;
    if room <= 0 {
        return current;
    }
    current + room.min(wanted(d) - current)
}

/// How far each old ReplicaSet (oldest first) shrinks this step
/// (upstream's `reconcileOldReplicaSets`): first unhealthy replicas, then
/// available ones down to `replicas - maxUnavailable`.
pub(super) fn old_scale_down(
    d: &Deployment,
    old: &[&ReplicaSet],
    new_rs: &ReplicaSet,
) -> BTreeMap<String, i32> {
    let mut sizes: BTreeMap<String, i32> = BTreeMap::new();
    let old_total: i32 = old.iter().map(|rs| spec_replicas(rs)).sum();
    if old_total == 0 {
        return sizes;
    }
    let (_, unavailable) = surge_and_unavailable(d);
    let min_available = wanted(d) - unavailable;
    let all_total = old_total + spec_replicas(new_rs);
    let new_unavailable = spec_replicas(new_rs) - status_of(new_rs).2;
    let mut budget = all_total - min_available - new_unavailable;
    if budget <= 0 {
        return sizes;
    }
    // Unhealthy replicas cost no availability: remove them first.
    for rs in old {
        if budget <= 0 {
            break;
        }
        let unhealthy = spec_replicas(rs) - status_of(rs).2;
        if unhealthy <= 0 {
            continue;
        }
        let cut = unhealthy.min(budget);
        budget -= cut;
        sizes.insert(rs.name_any(), spec_replicas(rs) - cut);
    }
    let size = |rs: &ReplicaSet, sizes: &BTreeMap<String, i32>| {
        sizes
            .get(&rs.name_any())
            .copied()
            .unwrap_or_else(|| spec_replicas(rs))
    };
    let available: i32 = old
        .iter()
        .map(|rs| status_of(rs).2.min(size(rs, &sizes)))
        .sum::<i32>()
        + status_of(new_rs).2;
    let mut budget = available - min_available;
    for rs in old {
        if budget <= 0 {
            break;
        }
        let current = size(rs, &sizes);
        let cut = current.min(budget);
        if cut > 0 {
            budget -= cut;
            sizes.insert(rs.name_any(), current - cut);
        }
    }
    sizes
}

/// A scale of the Deployment during a rollout: every active
/// ReplicaSet grows or shrinks in proportion to its size, the remainder
/// going to the largest (upstream's proportional scaling).
pub(super) fn proportional(d: &Deployment, active: &[&ReplicaSet]) -> BTreeMap<String, i32> {
    let (surge, _) = surge_and_unavailable(d);
    let allowed = wanted(d) + surge;
    let total: i32 = active.iter().map(|rs| spec_replicas(rs)).sum();
    let diff = allowed - total;
    let mut sizes = BTreeMap::new();
    if total == 0 {
        return sizes;
    }
    if diff == 0 {
        // Sizes stay; the annotations still learn the new replica count,
        // which ends the scaling event.
        return active
            .iter()
            .map(|rs| (rs.name_any(), spec_replicas(rs)))
            .collect();
    }
    let mut ordered: Vec<&&ReplicaSet> = active.iter().collect();
    ordered.sort_by_key(|rs| std::cmp::Reverse((spec_replicas(rs), revision(rs))));
    let mut given = 0;
    for rs in &ordered {
        let share =
            i32::try_from(i64::from(spec_replicas(rs)) * i64::from(diff) / i64::from(total))
                .unwrap_or(0);
        given += share;
        sizes.insert(rs.name_any(), spec_replicas(rs) + share);
    }
    if let Some(first) = ordered.first() {
        let entry = sizes.entry(first.name_any()).or_default();
        *entry = (*entry + diff - given).max(0);
    }
    sizes
}

/// The ReplicaSet sizes this sync writes (only those that change).
/// A scale of the Deployment while several ReplicaSets are active is
/// spread proportionally (also while paused); otherwise Recreate shrinks
/// every old one to zero and grows the new one once no old pod is left,
/// and RollingUpdate first grows the new one within the surge, then
/// shrinks old ones within the availability budget.
pub(super) fn sizes(
    d: &Deployment,
    all: &[&ReplicaSet],
    old: &[&ReplicaSet],
    new_rs: &ReplicaSet,
    paused: bool,
    old_pods_remain: bool,
) -> BTreeMap<String, i32> {
    let active: Vec<&ReplicaSet> = all
        .iter()
        .filter(|rs| spec_replicas(rs) > 0)
        .copied()
        .collect();
    let scaling_event = active.iter().any(|rs| {
        rs.annotations()
            .get(DESIRED_REPLICAS)
            .and_then(|v| v.parse::<i32>().ok())
            != Some(wanted(d))
    });
    if paused || (scaling_event && active.len() > 1 && !is_recreate(d)) {
        return match active.as_slice() {
            _ if !scaling_event => BTreeMap::new(),
            // One active ReplicaSet simply takes the new count.
            [only] => [(only.name_any(), wanted(d))].into(),
            _ => proportional(d, &active),
        };
    }
    if is_recreate(d) {
        let mut sizes: BTreeMap<String, i32> = old
            .iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .map(|rs| (rs.name_any(), 0))
            .collect();
        if sizes.is_empty() && !old_pods_remain && spec_replicas(new_rs) != wanted(d) {
            sizes.insert(new_rs.name_any(), wanted(d));
        }
        return sizes;
    }
    let target = new_replicas(d, all, Some(new_rs));
    if target != spec_replicas(new_rs) {
        return [(new_rs.name_any(), target)].into();
    }
    old_scale_down(d, old, new_rs)
}

fn condition(
    status: &str,
    reason: &str,
    message: String,
    type_: &str,
    now: DateTime<Utc>,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// Replaces a condition, keeping its transition time when the status
/// did not change, and its update time when nothing changed at all.
fn set_condition(conditions: &mut Vec<DeploymentCondition>, mut next: DeploymentCondition) {
    if let Some(current) = conditions.iter_mut().find(|c| c.type_ == next.type_) {
        if current.status == next.status {
            next.last_transition_time
                .clone_from(&current.last_transition_time);
            if current.reason == next.reason && current.message == next.message {
                next.last_update_time.clone_from(&current.last_update_time);
            }
        }
        *current = next;
    } else {
        conditions.push(next);
    }
}

/// The Deployment's status from its ReplicaSets (upstream's
/// `calculateStatus` plus the progress conditions).
pub(super) fn status(
    d: &Deployment,
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
    progressed: bool,
    now: DateTime<Utc>,
) -> DeploymentStatus {
    let previous = d.status.clone().unwrap_or_default();
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| all.iter().map(|rs| f(rs)).sum::<i32>();
    let replicas = sum(&|rs| status_of(rs).0);
    let updated = new_rs.map_or(0, |rs| status_of(rs).0);
    let ready = sum(&|rs| status_of(rs).1);
    let available = sum(&|rs| status_of(rs).2);
    let total_spec = sum(&spec_replicas);
    let mut conditions = previous.conditions.clone().unwrap_or_default();
    let (_, max_unavailable) = surge_and_unavailable(d);
    set_condition(
        &mut conditions,
        if available >= wanted(d) - max_unavailable {
            condition(
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".to_owned(),
                "Available",
                now,
            )
        } else {
            condition(
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".to_owned(),
                "Available",
                now,
            )
        },
    );
    let new_name = new_rs.map(ResourceExt::name_any).unwrap_or_default();
    let complete = new_rs.is_some()
        && updated == wanted(d)
        && replicas == wanted(d)
        && available == wanted(d)
        && new_rs.is_some_and(|rs| status_of(rs).2 == wanted(d));
    let moved = progressed
        || previous.updated_replicas.unwrap_or(0) != updated
        || previous.replicas.unwrap_or(0) != replicas
        || previous.ready_replicas.unwrap_or(0) != ready
        || previous.available_replicas.unwrap_or(0) != available;
    let deadline = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600);
    let paused = d.spec.as_ref().and_then(|s| s.paused) == Some(true);
    if paused {
        // No deadline runs while paused (upstream's DeploymentPaused).
        set_condition(
            &mut conditions,
            condition(
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".to_owned(),
                "Progressing",
                now,
            ),
        );
    } else if complete {
        set_condition(
            &mut conditions,
            condition(
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                "Progressing",
                now,
            ),
        );
    } else if moved {
        set_condition(
            &mut conditions,
            condition(
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{new_name}\" is progressing."),
                "Progressing",
                now,
            ),
        );
        if let Some(c) = conditions.iter_mut().find(|c| c.type_ == "Progressing") {
            c.last_update_time = Some(Time(now));
        }
    } else if let Some(current) = conditions.iter().find(|c| c.type_ == "Progressing")
        && current.status == "True"
        && current
            .last_update_time
            .as_ref()
            .is_some_and(|t| t.0 + chrono::Duration::seconds(deadline.into()) < now)
    {
        set_condition(
            &mut conditions,
            condition(
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                "Progressing",
                now,
            ),
        );
    }
    DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((total_spec - available).max(0)),
        conditions: Some(conditions),
        collision_count: previous.collision_count,
    }
}

/// A pod's event concerns the Deployment owning its ReplicaSet
/// (Recreate waits for old pods to be gone).
pub(super) fn pod_to_deployment(
    ctx: &Context,
) -> impl Fn(Arc<Pod>) -> Option<ObjectRef<Deployment>> + Send + Sync + 'static {
    let replicasets = ctx.replicasets.clone();
    move |pod| {
        let namespace = pod.metadata.namespace.as_deref()?;
        let owner = pods::controller_of(&pod.metadata).filter(|r| r.kind == "ReplicaSet")?;
        let rs = replicasets.get(&ObjectRef::new(&owner.name).within(namespace))?;
        let deployment = pods::controller_of(&rs.metadata).filter(|r| r.kind == "Deployment")?;
        Some(ObjectRef::new(&deployment.name).within(namespace))
    }
}

fn template(d: &Deployment) -> PodTemplateSpec {
    d.spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default()
}

pub(super) async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    if pods::is_deleting(&d.metadata) {
        return Ok(Action::await_change());
    }
    let namespace = d.namespace().unwrap_or_default();
    let key = pods::key(&d.metadata);
    let selector = d
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let owned = claim_selected(&ctx, &*d, &ctx.replicasets, &selector).await?;
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let all: Vec<&ReplicaSet> = owned.iter().map(AsRef::as_ref).collect();
    let wanted_template = template(&d);
    let mut by_age = all.clone();
    by_age.sort_by_key(|rs| (rs.metadata.creation_timestamp.clone(), rs.name_any()));
    let new_rs = by_age
        .iter()
        .find(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| equal_ignoring_hash(t, &wanted_template))
        })
        .copied();
    let old: Vec<&ReplicaSet> = by_age
        .iter()
        .filter(|rs| new_rs.is_none_or(|n| n.metadata.uid != rs.metadata.uid))
        .copied()
        .collect();
    let max_old_revision = old.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let paused = d.spec.as_ref().and_then(|s| s.paused) == Some(true);

    let Some(new_rs) = new_rs else {
        if paused {
            return report(&ctx, &d, &all, None, false).await;
        }
        return create_new_rs(&ctx, &d, &all, max_old_revision + 1).await;
    };
    let new_revision = revision(new_rs).max(max_old_revision + 1);
    if revision(new_rs) <= max_old_revision {
        // An old template is current again (rollback): it becomes the
        // newest revision.
        let patch = serde_json::json!({ "metadata": { "annotations": { REVISION: new_revision.to_string() } } });
        rs_api
            .patch(
                &new_rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(Error::api("updating revision of", new_rs.name_any()))?;
    }
    if d.annotations().get(REVISION) != Some(&new_revision.to_string()) {
        let patch = serde_json::json!({ "metadata": { "annotations": { REVISION: new_revision.to_string() } } });
        Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
            .patch(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(Error::api("updating revision of", &key))?;
    }

    let old_pods_remain = is_recreate(&d)
        && Context::in_namespace(&ctx.pods, &namespace)
            .iter()
            .any(|pod| {
                !pods::is_terminal(pod)
                    && old
                        .iter()
                        .any(|rs| controlled_by(&pod.metadata, rs.metadata.uid.as_deref()))
            });
    let sizes = sizes(&d, &all, &old, new_rs, paused, old_pods_remain);
    let (surge, _) = surge_and_unavailable(&d);
    let mut progressed = false;
    // Every live ReplicaSet (and the new one) also learns the replica
    // count, which ends a scaling event.
    for rs in &all {
        let size = sizes
            .get(&rs.name_any())
            .copied()
            .unwrap_or_else(|| spec_replicas(rs));
        let live = spec_replicas(rs) > 0 || rs.metadata.uid == new_rs.metadata.uid;
        let stale = live && rs.annotations().get(DESIRED_REPLICAS) != Some(&wanted(&d).to_string());
        if size == spec_replicas(rs) && !stale {
            continue;
        }
        scale(&ctx, &d, &rs_api, rs, size, wanted(&d), wanted(&d) + surge).await?;
        progressed |= size != spec_replicas(rs);
    }
    prune_history(&ctx, &d, &rs_api, &old).await?;
    report(&ctx, &d, &all, Some(new_rs), progressed).await
}

/// Sets a ReplicaSet's size and the annotations proportional scaling
/// reads; records upstream's event.
async fn scale(
    ctx: &Context,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    size: i32,
    desired: i32,
    max: i32,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { DESIRED_REPLICAS: desired.to_string(), MAX_REPLICAS: max.to_string() } },
        "spec": { "replicas": size },
    });
    api.patch(
        &rs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::api("scaling", rs.name_any()))?;
    let before = spec_replicas(rs);
    if size != before {
        let direction = if size > before { "up" } else { "down" };
        ctx.recorder.record(
            d,
            EventType::Normal,
            "ScalingReplicaSet",
            format!(
                "Scaled {direction} replica set {} to {size} from {before}",
                rs.name_any()
            ),
        );
    }
    Ok(())
}

async fn create_new_rs(
    ctx: &Context,
    d: &Deployment,
    all: &[&ReplicaSet],
    revision: i64,
) -> Result<Action, Error> {
    let namespace = d.namespace().unwrap_or_default();
    let collisions = d.status.as_ref().and_then(|s| s.collision_count);
    let mut template = template(d);
    let hash = template_hash(&template, collisions);
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH.to_owned(), hash.clone());
    let mut selector = d
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(TEMPLATE_HASH.to_owned(), hash.clone());
    let (surge, _) = surge_and_unavailable(d);
    let replicas = if is_recreate(d) {
        0
    } else {
        new_replicas(d, all, None)
    };
    let name = format!("{}-{hash}", d.name_any());
    let rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
            annotations: Some(
                [
                    (REVISION.to_owned(), revision.to_string()),
                    (DESIRED_REPLICAS.to_owned(), wanted(d).to_string()),
                    (MAX_REPLICAS.to_owned(), (wanted(d) + surge).to_string()),
                ]
                .into(),
            ),
            owner_references: Some(vec![controller_reference(d)]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: d.spec.as_ref().and_then(|s| s.min_ready_seconds),
            selector,
            template: Some(template),
        }),
        status: None,
    };
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    match api.create(&PostParams::default(), &rs).await {
        Ok(_) => {
            ctx.recorder.record(
                d,
                EventType::Normal,
                "ScalingReplicaSet",
                format!("Scaled up replica set {name} to {replicas} from 0"),
            );
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // A namesake with another template (or another owner): hash
            // again with one more collision.
            let existing = api.get(&name).await.map_err(Error::api("reading", &name))?;
            let ours = controlled_by(&existing.metadata, d.metadata.uid.as_deref())
                && existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| equal_ignoring_hash(t, &self::template(d)));
            if !ours {
                let patch = serde_json::json!({ "status": { "collisionCount": collisions.unwrap_or(0) + 1 } });
                Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
                    .patch_status(
                        &d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(Error::api("counting a hash collision of", d.name_any()))?;
            }
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Err(error) => Err(Error::api("creating replica set", name)(error)),
    }
}

/// Deletes the oldest empty ReplicaSets beyond `revisionHistoryLimit`.
async fn prune_history(
    ctx: &Context,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    old: &[&ReplicaSet],
) -> Result<(), Error> {
    let limit = usize::try_from(
        d.spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10),
    )
    .unwrap_or(0);
    let mut empty: Vec<&&ReplicaSet> = old
        .iter()
        .filter(|rs| {
            spec_replicas(rs) == 0 && status_of(rs).0 == 0 && !pods::is_deleting(&rs.metadata)
        })
        .collect();
    if empty.len() <= limit {
        return Ok(());
    }
    empty.sort_by_key(|rs| revision(rs));
    for rs in &empty[..empty.len() - limit] {
        match api
            .delete(&rs.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => ctx.recorder.record(
                d,
                EventType::Normal,
                "DeletedReplicaSet",
                format!("Deleted old replica set {}", rs.name_any()),
            ),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::api("pruning", rs.name_any())(error)),
        }
    }
    Ok(())
}

/// Writes the status the ReplicaSets add up to; while the rollout is not
/// complete, looks again in 5 s (progress deadline, minReadySeconds).
async fn report(
    ctx: &Context,
    d: &Deployment,
    all: &[&ReplicaSet],
    new_rs: Option<&ReplicaSet>,
    progressed: bool,
) -> Result<Action, Error> {
    let next = status(d, all, new_rs, progressed, Utc::now());
    write_status(ctx, d, d.status.as_ref(), &next, None).await?;
    let done =
        next.conditions.iter().flatten().any(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable")
        });
    if done {
        Ok(Action::await_change())
    } else {
        Ok(Action::requeue(Duration::from_secs(5)))
    }
}

#[cfg(test)]
mod tests;
