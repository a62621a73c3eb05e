//! Questions every controller asks about pods and object metadata.

use chrono::{DateTime, Utc};
use k8s_openapi::{
    api::core::v1::{Pod, Taint, Toleration},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

/// Succeeded or Failed: the pod will not run again.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

pub fn is_deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// Counts toward a controller's replicas: neither finished nor being
/// deleted (upstream's `IsPodActive`).
pub fn is_active(pod: &Pod) -> bool {
    !is_terminal(pod) && !is_deleting(&pod.metadata)
}

/// When the pod's Ready condition last became True, if it is True.
pub fn ready_since(pod: &Pod) -> Option<DateTime<Utc>> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        condition
            .last_transition_time
            .as_ref()
            .map_or(DateTime::<Utc>::MIN_UTC, |t| t.0),
    )
}

pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready_seconds` (upstream's `IsPodAvailable`).
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: DateTime<Utc>) -> bool {
    ready_since(pod).is_some_and(|since| {
        min_ready_seconds <= 0 || since + chrono::Duration::seconds(min_ready_seconds.into()) <= now
    })
}

/// The owner reference with `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Whether one toleration tolerates the taint (upstream's
/// `Toleration.ToleratesTaint`): same effect or any, same key or an empty
/// key with `Exists`, and the value equal for `Equal`.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or_default();
    let key_ok = key.is_empty() || key == taint.key;
    let value_ok = match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" | "" => {
            // An empty key requires Exists.
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    };
    effect_ok && key_ok && value_ok
}

/// The first taint with one of `effects` that no toleration tolerates.
pub fn untolerated<'a>(
    taints: &'a [Taint],
    tolerations: &[Toleration],
    effects: &[&str],
) -> Option<&'a Taint> {
    taints.iter().find(|taint| {
        effects.contains(&taint.effect.as_str()) && !tolerations.iter().any(|t| tolerates(t, taint))
    })
}

pub fn tolerations(pod: &Pod) -> &[Toleration] {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default()
}

/// `namespace/name`, the key controllers and caches use.
pub fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.to_owned(),
            value: Some(value.to_owned()),
            effect: effect.to_owned(),
            time_added: None,
        }
    }

    fn toleration(key: &str, operator: &str, value: &str, effect: &str) -> Toleration {
        Toleration {
            key: Some(key.to_owned()),
            operator: Some(operator.to_owned()),
            value: Some(value.to_owned()),
            effect: Some(effect.to_owned()),
            toleration_seconds: None,
        }
    }

    #[test]
    fn toleration_matching() {
        let gpu = taint("gpu", "yes", "NoSchedule");
        assert!(tolerates(
            &toleration("gpu", "Equal", "yes", "NoSchedule"),
            &gpu
        ));
        assert!(tolerates(&toleration("gpu", "Exists", "", ""), &gpu));
        assert!(tolerates(&toleration("", "Exists", "", ""), &gpu), "all");
        assert!(!tolerates(
            &toleration("gpu", "Equal", "no", "NoSchedule"),
            &gpu
        ));
        assert!(!tolerates(
            &toleration("gpu", "Equal", "yes", "NoExecute"),
            &gpu
        ));
        assert!(
            !tolerates(&toleration("", "Equal", "", ""), &gpu),
            "empty key needs Exists"
        );
        let taints = [gpu.clone(), taint("soft", "", "PreferNoSchedule")];
        assert_eq!(
            untolerated(&taints, &[], &["NoSchedule", "NoExecute"]),
            Some(&gpu)
        );
        assert_eq!(
            untolerated(
                &taints,
                &[toleration("gpu", "Exists", "", "")],
                &["NoSchedule"]
            ),
            None
        );
    }
}
