//! PodDisruptionBudget status, as upstream's disruption controller: how
//! many covered pods are expected, how many must stay healthy, how many
//! are, and so how many may be disrupted now. The eviction subresource
//! spends `disruptionsAllowed` and records each eviction in
//! `disruptedPods`; this controller keeps such a pod out of the healthy
//! count until its deletion shows (or 2 minutes pass), so two evictions
//! never both spend the last allowed disruption.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet, StatefulSet},
        core::v1::Pod,
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    ResourceExt,
    runtime::{controller::Action, reflector::ObjectRef},
};

use super::{Context, Error, scaled_value, write_status};
use crate::{budgets, pods};

/// The controllers' caches `expected_scale` looks pods' owners up in.
pub(super) struct Owners<'a> {
    pub replicasets: &'a [Arc<ReplicaSet>],
    pub deployments: &'a [Arc<Deployment>],
    pub statefulsets: &'a [Arc<StatefulSet>],
}

/// Upstream's `getExpectedScale`: the replicas the covered pods'
/// controllers want, each controller counted once (a Deployment in
/// rollout owns pods through two ReplicaSets). A pod without a known
/// controller makes a percentage or `maxUnavailable` meaningless.
pub(super) fn expected_scale(covered: &[Arc<Pod>], owners: &Owners<'_>) -> Result<i32, String> {
    let mut scales: BTreeMap<String, i32> = BTreeMap::new();
    for pod in covered {
        let pod_name = pod.name_any();
        let Some(reference) = pods::controller_of(&pod.metadata) else {
            return Err(format!("found no controller ref for pod \"{pod_name}\""));
        };
        let found = match reference.kind.as_str() {
            "ReplicaSet" => by_uid(owners.replicasets, &reference.uid).map(|rs| {
                let deployment = pods::controller_of(&rs.metadata)
                    .filter(|r| r.kind == "Deployment")
                    .and_then(|r| by_uid(owners.deployments, &r.uid));
                match deployment {
                    Some(d) => (&d.metadata, d.spec.as_ref().and_then(|s| s.replicas)),
                    None => (&rs.metadata, rs.spec.as_ref().and_then(|s| s.replicas)),
                }
            }),
            "StatefulSet" => by_uid(owners.statefulsets, &reference.uid)
                .map(|ss| (&ss.metadata, ss.spec.as_ref().and_then(|s| s.replicas))),
            _ => None,
        };
        let Some((owner, replicas)) = found else {
            return Err(format!("found no controllers for pod \"{pod_name}\""));
        };
        scales.insert(owner.uid.clone().unwrap_or_default(), replicas.unwrap_or(1));
    }
    Ok(scales.values().sum())
}

fn by_uid<'a, K: kube::Resource>(list: &'a [Arc<K>], uid: &str) -> Option<&'a Arc<K>> {
    list.iter().find(|o| o.meta().uid.as_deref() == Some(uid))
}

/// The budget's status, and when a recorded eviction times out (the
/// status must then be computed again).
#[derive(Debug, PartialEq)]
pub(super) struct Plan {
    pub status: PodDisruptionBudgetStatus,
    pub recheck_at: Option<DateTime<Utc>>,
}

/// Computes the status of `budget` over the pods it covers.
pub(super) fn plan(
    budget: &PodDisruptionBudget,
    covered: &[Arc<Pod>],
    expected_scale: impl FnOnce() -> Result<i32, String>,
    now: DateTime<Utc>,
) -> Plan {
    let spec = budget.spec.clone().unwrap_or_default();
    let previous = budget.status.clone().unwrap_or_default();
    let generation = budget.metadata.generation;
    let pods_count = i32::try_from(covered.len()).unwrap_or(i32::MAX);
    let counts = match (&spec.max_unavailable, &spec.min_available) {
        (Some(max_unavailable), _) => expected_scale().and_then(|scale| {
            let unavailable = scaled_value(max_unavailable, scale, true)
                .ok_or_else(|| format!("invalid maxUnavailable {max_unavailable:?}"))?;
            Ok((scale, (scale - unavailable).max(0)))
        }),
        (None, Some(IntOrString::Int(min))) => Ok((pods_count, *min)),
        (None, Some(percent @ IntOrString::String(_))) => expected_scale().and_then(|scale| {
            let desired = scaled_value(percent, scale, true)
                .ok_or_else(|| format!("invalid minAvailable {percent:?}"))?;
            Ok((scale, desired))
        }),
        (None, None) => Ok((pods_count, 0)),
    };
    let (expected, desired) = match counts {
        Ok(counts) => counts,
        Err(error) => {
            // Fail safe: nothing may be disrupted on a budget not understood.
            let mut status = PodDisruptionBudgetStatus {
                disruptions_allowed: 0,
                observed_generation: generation,
                ..previous
            };
            budgets::set_allowed_condition(&mut status, Some(&error), generation, now);
            return Plan {
                status,
                recheck_at: None,
            };
        }
    };
    // Evictions still under way: the pod is neither gone nor deleting.
    let mut disrupted = BTreeMap::new();
    let mut recheck_at: Option<DateTime<Utc>> = None;
    for (name, when) in previous.disrupted_pods.iter().flatten() {
        let live = covered
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(name) && !pods::is_deleting(&p.metadata));
        let expires = when.0 + budgets::DISRUPTION_TIMEOUT;
        if live && expires > now {
            disrupted.insert(name.clone(), when.clone());
            recheck_at = Some(recheck_at.map_or(expires, |r| r.min(expires)));
        }
    }
    let healthy = covered
        .iter()
        .filter(|p| {
            !pods::is_deleting(&p.metadata)
                && !disrupted.contains_key(p.metadata.name.as_deref().unwrap_or_default())
                && pods::is_ready(p)
        })
        .count();
    let healthy = i32::try_from(healthy).unwrap_or(i32::MAX);
    let allowed = if expected <= 0 {
        0
    } else {
        (healthy - desired).max(0)
    };
    let mut status = PodDisruptionBudgetStatus {
        observed_generation: generation,
        disrupted_pods: (!disrupted.is_empty()).then_some(disrupted),
        disruptions_allowed: allowed,
        current_healthy: healthy,
        desired_healthy: desired,
        expected_pods: expected,
        conditions: previous.conditions,
    };
    budgets::set_allowed_condition(&mut status, None, generation, now);
    Plan { status, recheck_at }
}

pub(super) async fn reconcile(
    budget: Arc<PodDisruptionBudget>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = budget.namespace().unwrap_or_default();
    let covered: Vec<Arc<Pod>> = Context::in_namespace(&ctx.pods, &namespace)
        .into_iter()
        .filter(|p| budgets::covers(&budget, p))
        .collect();
    let now = Utc::now();
    let plan = plan(
        &budget,
        &covered,
        || {
            expected_scale(
                &covered,
                &Owners {
                    replicasets: &Context::in_namespace(&ctx.replicasets, &namespace),
                    deployments: &Context::in_namespace(&ctx.deployments, &namespace),
                    statefulsets: &Context::in_namespace(&ctx.statefulsets, &namespace),
                },
            )
        },
        now,
    );
    // Pinned: evictions spend `disruptionsAllowed` in between, and a
    // status computed before one must not give the disruption back.
    write_status(
        &ctx,
        budget.as_ref(),
        budget.status.as_ref(),
        &plan.status,
        budget.metadata.resource_version.as_deref(),
    )
    .await?;
    Ok(match plan.recheck_at {
        Some(at) => Action::requeue((at - now).to_std().unwrap_or_default()),
        None => Action::await_change(),
    })
}

/// Maps a pod to the budgets covering it.
pub(super) fn pod_to_budgets(
    ctx: &Arc<Context>,
) -> impl Fn(Arc<Pod>) -> Vec<ObjectRef<PodDisruptionBudget>> + Send + Sync + 'static {
    let budgets = ctx.budgets.clone();
    move |pod| {
        budgets
            .state()
            .iter()
            .filter(|b| budgets::covers(b, &pod))
            .map(|b| ObjectRef::from_obj(b.as_ref()))
            .collect()
    }
}

/// Maps a workload (its replicas feed `expectedPods`) to every budget of
/// its namespace.
pub(super) fn workload_to_budgets<K: kube::Resource>(
    ctx: &Arc<Context>,
) -> impl Fn(Arc<K>) -> Vec<ObjectRef<PodDisruptionBudget>> + Send + Sync + 'static {
    let budgets = ctx.budgets.clone();
    move |workload| {
        budgets
            .state()
            .iter()
            .filter(|b| b.metadata.namespace == workload.meta().namespace)
            .map(|b| ObjectRef::from_obj(b.as_ref()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            apps::v1::{DeploymentSpec, ReplicaSetSpec},
            core::v1::{PodCondition, PodStatus},
            policy::v1::PodDisruptionBudgetSpec,
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference, Time},
    };

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn owner(kind: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            kind: kind.to_owned(),
            uid: uid.to_owned(),
            controller: Some(true),
            ..Default::default()
        }
    }

    fn pod(name: &str, ready: bool, rs_uid: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("default".to_owned()),
                owner_references: Some(vec![owner("ReplicaSet", rs_uid)]),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
    }

    fn budget(min: Option<IntOrString>, max: Option<IntOrString>) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: ObjectMeta {
                name: Some("web".to_owned()),
                namespace: Some("default".to_owned()),
                generation: Some(3),
                ..Default::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                min_available: min,
                max_unavailable: max,
                selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// Two ReplicaSets of one Deployment of 4 (a rollout), and a lone
    /// ReplicaSet of 2.
    fn owners() -> (Vec<Arc<ReplicaSet>>, Vec<Arc<Deployment>>) {
        let rs = |uid: &str, replicas: i32, parent: Option<&str>| {
            Arc::new(ReplicaSet {
                metadata: ObjectMeta {
                    uid: Some(uid.to_owned()),
                    owner_references: parent.map(|p| vec![owner("Deployment", p)]),
                    ..Default::default()
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(replicas),
                    ..Default::default()
                }),
                status: None,
            })
        };
        let deployment = Arc::new(Deployment {
            metadata: ObjectMeta {
                uid: Some("d".to_owned()),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(4),
                ..Default::default()
            }),
            status: None,
        });
        (
            vec![
                rs("old", 1, Some("d")),
                rs("new", 3, Some("d")),
                rs("lone", 2, None),
            ],
            vec![deployment],
        )
    }

    #[test]
    fn the_expected_scale_counts_each_controller_once() {
        let (replicasets, deployments) = owners();
        let owners = Owners {
            replicasets: &replicasets,
            deployments: &deployments,
            statefulsets: &[],
        };
        let covered = [
            pod("a", true, "old"),
            pod("b", true, "new"),
            pod("c", true, "new"),
            pod("d", true, "lone"),
        ];
        assert_eq!(expected_scale(&covered, &owners), Ok(6));
        let orphan = Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some("orphan".to_owned()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(
            expected_scale(&[orphan], &owners)
                .unwrap_err()
                .contains("no controller ref")
        );
    }

    #[test]
    fn min_available_counts_ready_pods_against_the_minimum() {
        let covered = [
            pod("a", true, "x"),
            pod("b", true, "x"),
            pod("c", false, "x"),
        ];
        let plan = plan(
            &budget(Some(IntOrString::Int(1)), None),
            &covered,
            || unreachable!("an absolute minimum needs no scale"),
            now(),
        );
        let status = plan.status;
        assert_eq!(
            (
                status.expected_pods,
                status.desired_healthy,
                status.current_healthy,
                status.disruptions_allowed
            ),
            (3, 1, 2, 1)
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.conditions.unwrap()[0].reason, "SufficientPods");
    }

    #[test]
    fn max_unavailable_rounds_up_against_the_controllers_scale() {
        let covered: Vec<_> = (0..4).map(|i| pod(&format!("p{i}"), true, "x")).collect();
        let plan = plan(
            &budget(None, Some(IntOrString::String("30%".to_owned()))),
            &covered,
            || Ok(5),
            now(),
        );
        // 30% of 5 is 1.5, rounded up to 2 unavailable: 3 must stay.
        assert_eq!(plan.status.desired_healthy, 3);
        assert_eq!(plan.status.disruptions_allowed, 1);
    }

    #[test]
    fn an_unknown_scale_allows_nothing() {
        let mut previous = budget(Some(IntOrString::String("50%".to_owned())), None);
        previous.status = Some(PodDisruptionBudgetStatus {
            disruptions_allowed: 2,
            ..Default::default()
        });
        let plan = plan(
            &previous,
            &[pod("a", true, "x")],
            || Err("found no controllers for pod \"a\"".to_owned()),
            now(),
        );
        assert_eq!(plan.status.disruptions_allowed, 0);
        let condition = &plan.status.conditions.unwrap()[0];
        assert_eq!(condition.reason, "SyncFailed");
        assert!(condition.message.contains("no controllers"));
    }

    #[test]
    fn an_eviction_under_way_keeps_its_pod_out_of_the_healthy_count_until_it_expires() {
        let covered = [
            pod("a", true, "x"),
            pod("b", true, "x"),
            pod("c", true, "x"),
        ];
        let mut spent = budget(Some(IntOrString::Int(2)), None);
        let evicted_at = now() - chrono::Duration::seconds(30);
        spent.status = Some(PodDisruptionBudgetStatus {
            disrupted_pods: Some(
                [
                    ("a".to_owned(), Time(evicted_at)),
                    ("gone".to_owned(), Time(evicted_at)),
                ]
                .into(),
            ),
            ..Default::default()
        });
        let plan_now = plan(&spent, &covered, || Ok(3), now());
        assert_eq!(plan_now.status.current_healthy, 2);
        assert_eq!(plan_now.status.disruptions_allowed, 0);
        // The entry of a pod no longer there is dropped.
        assert_eq!(
            plan_now
                .status
                .disrupted_pods
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(
            plan_now.recheck_at,
            Some(evicted_at + budgets::DISRUPTION_TIMEOUT)
        );
        let later = plan(
            &spent,
            &covered,
            || Ok(3),
            now() + chrono::Duration::minutes(2),
        );
        assert_eq!(later.status.current_healthy, 3);
        assert_eq!(later.status.disrupted_pods, None);
        assert_eq!(later.recheck_at, None);
    }
}
