//! Mutating admission the API server applies to new objects, as
//! upstream's default admission plugins do.

use serde_json::{Value, json};

/// Upstream's DefaultTolerationSeconds: how long a pod stays bound to a
/// node that became not ready or unreachable before it is evicted
/// (`--default-not-ready-toleration-seconds`,
/// `--default-unreachable-toleration-seconds`, 300 s each).
#[derive(Clone, Copy, Debug)]
pub struct TolerationDefaults {
    pub not_ready_seconds: i64,
    pub unreachable_seconds: i64,
}

impl Default for TolerationDefaults {
    fn default() -> Self {
        Self {
            not_ready_seconds: 300,
            unreachable_seconds: 300,
        }
    }
}

const NOT_READY: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";

impl TolerationDefaults {
    /// Adds `NoExecute` tolerations for the two taints unless the pod
    /// already tolerates them.
    pub fn apply(&self, pod: &mut Value) {
        if !pod["spec"].is_object() {
            return;
        }
        let tolerations = &mut pod["spec"]["tolerations"];
        if !tolerations.is_array() {
            *tolerations = json!([]);
        }
        let Some(list) = tolerations.as_array_mut() else {
            return;
        };
        for (key, seconds) in [
            (NOT_READY, self.not_ready_seconds),
            (UNREACHABLE, self.unreachable_seconds),
        ] {
            let covered = list.iter().any(|t| {
                let effect = t["effect"].as_str().unwrap_or_default();
                let matches_key = t["key"].as_str() == Some(key)
                    || (t["key"].as_str().unwrap_or_default().is_empty()
                        && t["operator"].as_str() == Some("Exists"));
                matches_key && (effect.is_empty() || effect == "NoExecute")
            });
            if !covered {
                list.push(json!({
                    "key": key,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": seconds,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_what_is_missing_and_keeps_what_is_there() {
        let defaults = TolerationDefaults {
            not_ready_seconds: 300,
            unreachable_seconds: 60,
        };
        let mut pod = json!({"spec": {"tolerations": [
            {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}
        ]}});
        defaults.apply(&mut pod);
        let list = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["tolerationSeconds"], 5);
        assert_eq!(list[1]["key"], UNREACHABLE);
        assert_eq!(list[1]["tolerationSeconds"], 60);

        let mut tolerates_all = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        defaults.apply(&mut tolerates_all);
        assert_eq!(
            tolerates_all["spec"]["tolerations"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
}
