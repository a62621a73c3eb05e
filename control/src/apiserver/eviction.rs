//! The pods/eviction subresource's decision: a pod may be deleted when no
//! PodDisruptionBudget covers it, when it is not running anyway, or when
//! its one budget still allows a disruption, which the eviction spends.
//! `kubectl drain` relies on it, retrying every refusal (429) until the
//! disruption controller has seen replacements become ready.

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        core::v1::Pod,
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};

use super::status::{ApiError, Cause, Subject};
use crate::{budgets, pods};

/// Upstream's cap on evictions the disruption controller has not yet
/// confirmed (`MaxDisruptedPodSize`).
const MAX_DISRUPTED_PODS: usize = 2000;

/// What an eviction does before deleting the pod.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Delete right away: nothing to spend.
    Delete,
    /// Write this status to the budget (one disruption fewer, the pod
    /// recorded as disrupted), pinned at the budget's resourceVersion,
    /// then delete.
    Spend {
        budget: String,
        resource_version: String,
        status: PodDisruptionBudgetStatus,
    },
}

fn too_many_requests(pod: &Pod, message: &str, cause: String) -> ApiError {
    ApiError::TooManyRequests {
        subject: Subject {
            group: String::new(),
            resource: "pods".to_owned(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        },
        message: message.to_owned(),
        causes: vec![Cause {
            reason: "DisruptionBudget",
            field: String::new(),
            message: cause,
        }],
    }
}

/// Decides an eviction of `pod` against the budgets of its namespace,
/// as upstream's eviction REST storage.
pub fn judge(
    pod: &Pod,
    budgets: &[PodDisruptionBudget],
    now: DateTime<Utc>,
) -> Result<Verdict, ApiError> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    // Not running, or already going: no budget counts it as healthy.
    if pods::is_terminal(pod) || phase == Some("Pending") || pods::is_deleting(&pod.metadata) {
        return Ok(Verdict::Delete);
    }
    let covering: Vec<&PodDisruptionBudget> =
        budgets.iter().filter(|b| budgets::covers(b, pod)).collect();
    let budget = match covering.as_slice() {
        [] => return Ok(Verdict::Delete),
        [one] => *one,
        _ => {
            return Err(ApiError::internal(
                "This pod has more than one PodDisruptionBudget, which the eviction \
                 subresource does not support.",
            ));
        }
    };
    let name = budget.metadata.name.clone().unwrap_or_default();
    let mut status = budget.status.clone().unwrap_or_default();
    if !pods::is_ready(pod) {
        let policy = budget
            .spec
            .as_ref()
            .and_then(|s| s.unhealthy_pod_eviction_policy.as_deref());
        // An unready pod is not part of the healthy count the budget
        // protects: it may go whenever the budget is met without it.
        let met = status.desired_healthy > 0 && status.current_healthy >= status.desired_healthy;
        if policy == Some("AlwaysAllow") || met {
            return Ok(Verdict::Delete);
        }
    }
    if status.observed_generation.unwrap_or(0) < budget.metadata.generation.unwrap_or(0) {
        return Err(too_many_requests(
            pod,
            "Cannot evict pod as it would violate the pod's disruption budget.",
            format!("The disruption budget {name} is still being processed by the server."),
        ));
    }
    let forbidden = |message: &str| ApiError::Forbidden {
        subject: Subject {
            group: "policy".to_owned(),
            resource: "poddisruptionbudgets".to_owned(),
            name: name.clone(),
        },
        message: message.to_owned(),
    };
    if status.disruptions_allowed < 0 {
        return Err(forbidden("pdb disruptions allowed is negative"));
    }
    if status.disrupted_pods.as_ref().map_or(0, |m| m.len()) > MAX_DISRUPTED_PODS {
        return Err(forbidden(
            "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
        ));
    }
    if status.disruptions_allowed == 0 {
        return Err(too_many_requests(
            pod,
            "Cannot evict pod as it would violate the pod's disruption budget.",
            format!(
                "The disruption budget {name} needs {} healthy pods and has {} currently",
                status.desired_healthy, status.current_healthy
            ),
        ));
    }
    status.disruptions_allowed -= 1;
    if status.disruptions_allowed == 0 {
        budgets::set_allowed_condition(&mut status, None, budget.metadata.generation, now);
    }
    status
        .disrupted_pods
        .get_or_insert_with(Default::default)
        .insert(pod.metadata.name.clone().unwrap_or_default(), Time(now));
    Ok(Verdict::Spend {
        budget: name,
        resource_version: budget.metadata.resource_version.clone().unwrap_or_default(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{PodCondition, PodStatus},
            policy::v1::PodDisruptionBudgetSpec,
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    };

    use super::*;

    fn pod(phase: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".to_owned()),
                namespace: Some("default".to_owned()),
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn budget(name: &str, allowed: i32, healthy: i32, desired: i32) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("default".to_owned()),
                generation: Some(1),
                resource_version: Some("7".to_owned()),
                ..Default::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
            status: Some(PodDisruptionBudgetStatus {
                observed_generation: Some(1),
                disruptions_allowed: allowed,
                current_healthy: healthy,
                desired_healthy: desired,
                expected_pods: healthy,
                ..Default::default()
            }),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    #[test]
    fn an_uncovered_or_idle_pod_is_deleted_without_a_budget() {
        let running = pod("Running", true);
        assert_eq!(judge(&running, &[], now()).unwrap(), Verdict::Delete);
        let blocked = [budget("b", 0, 2, 2)];
        for idle in ["Pending", "Succeeded", "Failed"] {
            assert_eq!(
                judge(&pod(idle, false), &blocked, now()).unwrap(),
                Verdict::Delete
            );
        }
    }

    #[test]
    fn an_allowed_eviction_spends_one_disruption_and_records_the_pod() {
        let Verdict::Spend {
            budget,
            resource_version,
            status,
        } = judge(&pod("Running", true), &[budget("b", 1, 3, 2)], now()).unwrap()
        else {
            panic!("expected a spend");
        };
        assert_eq!((budget.as_str(), resource_version.as_str()), ("b", "7"));
        assert_eq!(status.disruptions_allowed, 0);
        assert_eq!(status.disrupted_pods.unwrap()["web-1"].0, now());
        assert_eq!(status.conditions.unwrap()[0].reason, "InsufficientPods");
    }

    #[test]
    fn a_spent_budget_refuses_with_429_and_says_why() {
        let error = judge(&pod("Running", true), &[budget("b", 0, 2, 2)], now()).unwrap_err();
        let status = error.status();
        assert_eq!(status["code"], 429);
        assert_eq!(status["reason"], "TooManyRequests");
        assert_eq!(
            status["details"]["causes"][0]["message"],
            "The disruption budget b needs 2 healthy pods and has 2 currently"
        );
    }

    #[test]
    fn an_unprocessed_budget_refuses() {
        let mut stale = budget("b", 1, 3, 2);
        stale.metadata.generation = Some(2);
        let error = judge(&pod("Running", true), &[stale], now()).unwrap_err();
        assert!(
            error.status()["details"]["causes"][0]["message"]
                .as_str()
                .unwrap()
                .contains("still being processed")
        );
    }

    #[test]
    fn an_unready_pod_goes_when_the_budget_is_met_without_it() {
        let unready = pod("Running", false);
        assert_eq!(
            judge(&unready, &[budget("b", 0, 2, 2)], now()).unwrap(),
            Verdict::Delete
        );
        assert!(judge(&unready, &[budget("b", 0, 1, 2)], now()).is_err());
        let mut always = budget("b", 0, 1, 2);
        always.spec.as_mut().unwrap().unhealthy_pod_eviction_policy =
            Some("AlwaysAllow".to_owned());
        assert_eq!(judge(&unready, &[always], now()).unwrap(), Verdict::Delete);
    }

    #[test]
    fn two_covering_budgets_are_an_error() {
        let error = judge(
            &pod("Running", true),
            &[budget("a", 1, 3, 2), budget("b", 1, 3, 2)],
            now(),
        )
        .unwrap_err();
        assert_eq!(error.status()["code"], 500);
    }
}
