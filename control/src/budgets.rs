//! PodDisruptionBudget questions the eviction subresource (API server) and
//! the disruption controller both ask: which pods a budget covers, and the
//! `DisruptionAllowed` condition that reports its state.

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::{
        core::v1::Pod,
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

/// How long an eviction's entry in `status.disruptedPods` keeps its pod
/// out of the healthy count while the delete is under way (upstream's
/// `DeletionTimeout`, 2 minutes).
pub const DISRUPTION_TIMEOUT: chrono::Duration = chrono::Duration::minutes(2);

/// Whether the budget covers the pod. As policy/v1: a budget without a
/// selector covers nothing, an empty selector every pod of its namespace.
pub fn covers(budget: &PodDisruptionBudget, pod: &Pod) -> bool {
    let Some(selector) = budget.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    budget.metadata.namespace == pod.metadata.namespace
        && crate::labels::selector_matches(
            selector,
            pod.metadata.labels.as_ref().unwrap_or(&Default::default()),
        )
}

/// Sets the `DisruptionAllowed` condition from `disruptions_allowed`, or
/// to False with `SyncFailed` when the budget could not be computed;
/// the transition time moves only when the status does.
pub fn set_allowed_condition(
    status: &mut PodDisruptionBudgetStatus,
    sync_failure: Option<&str>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let (value, reason, message) = match sync_failure {
        Some(error) => ("False", "SyncFailed", error.to_owned()),
        None if status.disruptions_allowed > 0 => ("True", "SufficientPods", String::new()),
        None => ("False", "InsufficientPods", String::new()),
    };
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let since = conditions
        .iter()
        .find(|c| c.type_ == "DisruptionAllowed" && c.status == value)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    conditions.retain(|c| c.type_ != "DisruptionAllowed");
    conditions.push(Condition {
        type_: "DisruptionAllowed".to_owned(),
        status: value.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::policy::v1::PodDisruptionBudgetSpec,
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    };

    use super::*;

    fn budget(selector: Option<LabelSelector>) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: ObjectMeta {
                name: Some("b".to_owned()),
                namespace: Some("default".to_owned()),
                ..Default::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                selector,
                ..Default::default()
            }),
            status: None,
        }
    }

    fn pod(namespace: &str, app: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some([("app".to_owned(), app.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_missing_selector_covers_nothing_and_an_empty_one_the_namespace() {
        assert!(!covers(&budget(None), &pod("default", "web")));
        let everything = budget(Some(LabelSelector::default()));
        assert!(covers(&everything, &pod("default", "web")));
        assert!(!covers(&everything, &pod("other", "web")));
        let web = budget(Some(LabelSelector {
            match_labels: Some([("app".to_owned(), "web".to_owned())].into()),
            ..Default::default()
        }));
        assert!(covers(&web, &pod("default", "web")));
        assert!(!covers(&web, &pod("default", "db")));
    }

    #[test]
    fn the_condition_keeps_its_transition_time_while_unchanged() {
        let t0 = DateTime::<Utc>::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::<Utc>::from_timestamp(2_000, 0).unwrap();
        let mut status = PodDisruptionBudgetStatus {
            disruptions_allowed: 1,
            ..Default::default()
        };
        set_allowed_condition(&mut status, None, Some(1), t0);
        set_allowed_condition(&mut status, None, Some(2), t1);
        let condition = &status.conditions.as_ref().unwrap()[0];
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("True", "SufficientPods")
        );
        assert_eq!(condition.last_transition_time.0, t0);
        status.disruptions_allowed = 0;
        set_allowed_condition(&mut status, None, Some(2), t1);
        let condition = &status.conditions.as_ref().unwrap()[0];
        assert_eq!(condition.reason, "InsufficientPods");
        assert_eq!(condition.last_transition_time.0, t1);
        set_allowed_condition(&mut status, Some("found no controller"), Some(2), t1);
        assert_eq!(status.conditions.as_ref().unwrap()[0].reason, "SyncFailed");
    }
}
