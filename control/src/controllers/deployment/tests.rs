//! The rollout arithmetic, stepped like a cluster would step it.

use k8s_openapi::api::apps::v1::ReplicaSetStatus;
use serde_json::json;

use super::*;

fn deployment(replicas: i32, strategy: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default", "generation": 2, "uid": "d-uid"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": strategy,
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "v2"}]}},
        },
    }))
    .unwrap()
}

fn replica_set(
    name: &str,
    revision: i64,
    replicas: i32,
    available: i32,
    desired: i32,
) -> ReplicaSet {
    let mut rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": name,
            "annotations": {REVISION: revision.to_string(), DESIRED_REPLICAS: desired.to_string()}},
        "spec": {"replicas": replicas, "selector": {}},
    }))
    .unwrap();
    rs.status = Some(ReplicaSetStatus {
        replicas,
        ready_replicas: Some(available),
        available_replicas: Some(available),
        ..Default::default()
    });
    rs
}

#[test]
fn hashes_are_stable_safe_and_change_with_collisions() {
    let d = deployment(3, json!({}));
    let template = template(&d);
    let hash = template_hash(&template, None);
    assert_eq!(hash, template_hash(&template, None));
    assert_ne!(hash, template_hash(&template, Some(1)));
    assert!(hash.bytes().all(|b| SAFE.contains(&b)), "{hash}");
    let mut labelled = template.clone();
    labelled
        .metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .insert(TEMPLATE_HASH.to_owned(), hash);
    assert!(equal_ignoring_hash(&labelled, &template));
    // What `kubectl rollout undo` writes back has `resources: {}`.
    let mut undone = template.clone();
    undone.spec.as_mut().unwrap().containers[0].resources = Some(Default::default());
    assert!(equal_ignoring_hash(&undone, &template));
    undone.spec.as_mut().unwrap().containers[0].image = Some("v1".to_owned());
    assert!(!equal_ignoring_hash(&undone, &template));
}

#[test]
fn surge_rounds_up_and_unavailability_down() {
    let d = deployment(10, json!({"type": "RollingUpdate"}));
    assert_eq!(surge_and_unavailable(&d), (3, 2), "25% of 10");
    let d = deployment(
        4,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}),
    );
    assert_eq!(surge_and_unavailable(&d), (0, 1), "never both zero");
    let d = deployment(4, json!({"type": "Recreate"}));
    assert_eq!(surge_and_unavailable(&d), (0, 0));
}

/// Steps a rollout: the controller sizes the sets, then the cluster
/// converges (old pods leave at once, new pods become available one step
/// after creation). Checks the strategy's bounds at every step.
fn roll(d: &Deployment, replicas: i32) -> usize {
    let (surge, unavailable) = surge_and_unavailable(d);
    let mut old = replica_set("web-old", 1, replicas, replicas, replicas);
    let mut new = replica_set("web-new", 2, 0, 0, replicas);
    let mut idle = 0;
    for step in 0..100 {
        let all = [&old, &new];
        let changes = sizes(d, &all, &[&old], &new, false, false);
        if changes.is_empty() {
            if spec_replicas(&new) == replicas && spec_replicas(&old) == 0 {
                return step;
            }
            // Waiting for new pods to become available; the cluster
            // must get it moving again within a step.
            idle += 1;
            assert!(idle < 3, "step {step}: the rollout stalled");
        } else {
            idle = 0;
        }
        // New pods created last step are available now.
        let ready_new = spec_replicas(&new);
        for (name, size) in changes {
            let rs = if name == "web-old" {
                &mut old
            } else {
                &mut new
            };
            rs.spec.as_mut().unwrap().replicas = Some(size);
        }
        let old_size = spec_replicas(&old);
        old.status = Some(ReplicaSetStatus {
            replicas: old_size,
            available_replicas: Some(old_size),
            ..Default::default()
        });
        new.status = Some(ReplicaSetStatus {
            replicas: spec_replicas(&new),
            available_replicas: Some(ready_new.min(spec_replicas(&new))),
            ..Default::default()
        });
        let total = spec_replicas(&old) + spec_replicas(&new);
        let available = old_size + ready_new.min(spec_replicas(&new));
        assert!(total <= replicas + surge, "step {step}: {total} pods");
        assert!(
            available >= replicas - unavailable,
            "step {step}: {available} available"
        );
    }
    panic!("the rollout did not finish");
}

#[test]
fn rolling_updates_stay_within_surge_and_unavailability() {
    for (replicas, strategy) in [
        (10, json!({"type": "RollingUpdate"})),
        (
            5,
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
        ),
        (
            5,
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        ),
        (
            3,
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}}),
        ),
    ] {
        let d = deployment(replicas, strategy.clone());
        let steps = roll(&d, replicas);
        assert!(steps > 0, "{strategy}");
    }
}

#[test]
fn recreate_waits_for_old_pods_before_creating() {
    let d = deployment(3, json!({"type": "Recreate"}));
    let old = replica_set("web-old", 1, 3, 3, 3);
    let new = replica_set("web-new", 2, 0, 0, 3);
    let first = sizes(&d, &[&old, &new], &[&old], &new, false, true);
    assert_eq!(first, [("web-old".to_owned(), 0)].into());
    let old = replica_set("web-old", 1, 0, 0, 3);
    let waiting = sizes(&d, &[&old, &new], &[&old], &new, false, true);
    assert!(waiting.is_empty(), "old pods still terminating");
    let done = sizes(&d, &[&old, &new], &[&old], &new, false, false);
    assert_eq!(done, [("web-new".to_owned(), 3)].into());
}

#[test]
fn scaling_mid_rollout_is_proportional() {
    // Rolled 4 of 10 over when the user scales to 20 (surge 25%: 5).
    let d = deployment(20, json!({"type": "RollingUpdate"}));
    let old = replica_set("web-old", 1, 8, 8, 10);
    let new = replica_set("web-new", 2, 4, 4, 10);
    let changes = sizes(&d, &[&old, &new], &[&old], &new, false, false);
    assert_eq!(changes.values().sum::<i32>(), 25, "replicas + surge");
    assert!(changes["web-old"] > changes["web-new"], "{changes:?}");
    let paused = sizes(&d, &[&old, &new], &[&old], &new, true, false);
    assert_eq!(paused, changes, "a paused deployment still scales");

    // Scaled from 4 to 3 mid-rollout: 3 + 1 surge is what runs already,
    // so the sizes stay and only the annotations move on.
    let d = deployment(3, json!({"type": "RollingUpdate"}));
    let old = replica_set("web-old", 1, 3, 3, 4);
    let new = replica_set("web-new", 2, 1, 1, 4);
    let same = sizes(&d, &[&old, &new], &[&old], &new, false, false);
    assert_eq!(
        same,
        [("web-new".to_owned(), 1), ("web-old".to_owned(), 3)].into()
    );
    let old = replica_set("web-old", 1, 3, 3, 3);
    let new = replica_set("web-new", 2, 1, 1, 3);
    assert!(
        !sizes(&d, &[&old, &new], &[&old], &new, false, false).is_empty(),
        "the rollout goes on once the annotations say 3"
    );
    let single = replica_set("web-new", 2, 4, 4, 4);
    let paused = sizes(&d, &[&single], &[], &single, true, false);
    assert_eq!(
        paused,
        [("web-new".to_owned(), 3)].into(),
        "exactly replicas, no surge"
    );
}

#[test]
fn status_reports_progress_completion_and_deadlines() {
    let now = Utc::now();
    let mut d = deployment(3, json!({"type": "RollingUpdate"}));
    let new = replica_set("web-new", 2, 3, 3, 3);
    let done = status(&d, &[&new], Some(&new), false, now);
    assert_eq!(
        (
            done.replicas,
            done.updated_replicas,
            done.available_replicas,
            done.unavailable_replicas
        ),
        (Some(3), Some(3), Some(3), Some(0))
    );
    let progressing = |s: &DeploymentStatus| {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Progressing")
            .cloned()
            .unwrap()
    };
    assert_eq!(
        progressing(&done).reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );

    let stuck = replica_set("web-new", 2, 3, 1, 3);
    d.status = Some(status(&d, &[&stuck], Some(&stuck), true, now));
    assert_eq!(
        progressing(d.status.as_ref().unwrap()).reason.as_deref(),
        Some("ReplicaSetUpdated")
    );
    let later = now + chrono::Duration::seconds(601);
    let expired = status(&d, &[&stuck], Some(&stuck), false, later);
    let condition = progressing(&expired);
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_deref()),
        ("False", Some("ProgressDeadlineExceeded"))
    );
    let available = expired
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Available")
        .unwrap();
    assert_eq!(
        available.status, "False",
        "1 of 3 with maxUnavailable 0 (25% of 3)"
    );
}
