//! PATCH bodies: JSON patch (RFC 6902), JSON merge patch (RFC 7386), and
//! strategic merge patch, which merges lists of built-in types by their
//! merge keys (containers by name, ports by port, ...) and understands the
//! `$patch`, `$retainKeys` and `$deleteFromPrimitiveList` directives
//! kubectl sends. `$setElementOrder` is accepted but not applied: merged
//! lists keep the stored order, with new items appended.

use serde_json::{Map, Value};

use super::status::ApiError;

/// The patch formats, by Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies a JSON, merge or strategic patch to `current`.
pub fn apply(kind: PatchType, current: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let undecodable =
        |error: serde_json::Error| ApiError::bad_request(format!("error decoding patch: {error}"));
    match kind {
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body).map_err(undecodable)?;
            let mut patched = current.clone();
            json_patch::patch(&mut patched, &patch).map_err(|error| ApiError::Invalid {
                kind: String::new(),
                name: String::new(),
                group: String::new(),
                causes: vec![super::status::Cause {
                    reason: "FieldValueInvalid",
                    field: String::new(),
                    message: format!("the JSON patch could not be applied: {error}"),
                }],
            })?;
            Ok(patched)
        }
        PatchType::Merge => {
            let patch: Value = serde_json::from_slice(body).map_err(undecodable)?;
            let mut patched = current.clone();
            json_patch::merge(&mut patched, &patch);
            Ok(patched)
        }
        PatchType::Strategic => {
            let patch: Value = serde_json::from_slice(body).map_err(undecodable)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            Ok(strategic_merge(current, &patch, &mut Vec::new()))
        }
        PatchType::Apply => Err(ApiError::UnsupportedMediaType {
            accepted: "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json",
        }),
    }
}

/// The merge key of the list at `path` (field names from the root), as
/// the built-in types declare with `patchMergeKey`.
pub(super) fn merge_key(path: &[String]) -> Option<&'static str> {
    let last = path.last()?.as_str();
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    let in_container = matches!(
        parent,
        Some("containers" | "initContainers" | "ephemeralContainers")
    );
    Some(match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "env" if in_container => "name",
        "ports" if in_container => "containerPort",
        "ports" if path.len() == 2 && path[0] == "spec" => "port",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "taints" => "key",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars that merge as sets (`patchStrategy: merge`).
pub(super) fn merges_as_set(path: &[String]) -> bool {
    matches!(path.last().map(String::as_str), Some("finalizers"))
}

pub(super) fn strategic_merge(current: &Value, patch: &Value, path: &mut Vec<String>) -> Value {
    let (Some(current_map), Some(patch_map)) = (current.as_object(), patch.as_object()) else {
        return patch.clone();
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = patch_map.clone();
            replaced.remove("$patch");
            return Value::Object(replaced);
        }
        Some("delete") => return Value::Null,
        _ => {}
    }
    let mut merged = current_map.clone();
    if let Some(retain) = patch_map.get("$retainKeys").and_then(Value::as_array) {
        merged.retain(|key, _| retain.iter().any(|k| k.as_str() == Some(key)));
    }
    for (key, value) in patch_map {
        if key.starts_with("$setElementOrder/") || key == "$retainKeys" || key == "$patch" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) =
                (merged.get_mut(field), value.as_array())
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if value.is_null() {
            merged.remove(key);
            continue;
        }
        path.push(key.clone());
        let next = match (merged.get(key), value) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => {
                strategic_merge(existing, value, path)
            }
            (Some(Value::Array(existing)), Value::Array(items)) => {
                merge_list(existing, items, path)
            }
            (None, Value::Object(_)) => strategic_merge(&Value::Object(Map::new()), value, path),
            (None, Value::Array(items)) => merge_list(&[], items, path),
            _ => value.clone(),
        };
        path.pop();
        if next.is_null() {
            merged.remove(key);
        } else {
            merged.insert(key.clone(), next);
        }
    }
    Value::Object(merged)
}

fn merge_list(current: &[Value], patch: &[Value], path: &mut Vec<String>) -> Value {
    if patch
        .iter()
        .any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Value::Array(
            patch
                .iter()
                .filter(|item| item.get("$patch").is_none())
                .cloned()
                .collect(),
        );
    }
    if let Some(key) = merge_key(path) {
        let mut merged: Vec<Value> = current.to_vec();
        for item in patch {
            let id = item.get(key);
            let position = id.and_then(|id| {
                merged
                    .iter()
                    .position(|existing| existing.get(key) == Some(id))
            });
            let deleting = item.get("$patch").and_then(Value::as_str) == Some("delete");
            match (position, deleting) {
                (Some(i), true) => {
                    merged.remove(i);
                }
                (None, true) => {}
                (Some(i), false) => merged[i] = strategic_merge(&merged[i], item, path),
                (None, false) => {
                    merged.push(strategic_merge(&Value::Object(Map::new()), item, path))
                }
            }
        }
        return Value::Array(merged);
    }
    if merges_as_set(path) {
        let mut merged = current.to_vec();
        for item in patch {
            if !merged.contains(item) {
                merged.push(item.clone());
            }
        }
        return Value::Array(merged);
    }
    Value::Array(patch.to_vec())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn strategic(current: Value, patch: Value) -> Value {
        apply(PatchType::Strategic, &current, patch.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn containers_merge_by_name_and_ports_by_container_port() {
        let current = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80, "name": "http"}]},
            {"name": "sidecar", "image": "envoy"},
        ]}}}});
        let patched = strategic(
            current,
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "web"}, {"name": "sidecar"}],
                "containers": [{"name": "web", "image": "nginx:2", "ports": [{"containerPort": 443}]}],
            }}}}),
        );
        let containers = &patched["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "nginx:2");
        assert_eq!(containers[0]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(containers[1]["image"], "envoy");
    }

    #[test]
    fn directives_delete_replace_and_retain() {
        let current = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"ports": [{"port": 80}, {"port": 443}], "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patched = strategic(
            current,
            json!({
                "metadata": {"labels": {"a": null}, "finalizers": ["y"]},
                "spec": {
                    "ports": [{"port": 443, "$patch": "delete"}],
                    "strategy": {"$retainKeys": ["type"], "type": "Recreate"},
                },
            }),
        );
        assert_eq!(patched["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(patched["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(patched["spec"]["ports"], json!([{"port": 80}]));
        assert_eq!(patched["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn lists_without_merge_keys_are_replaced() {
        let current = json!({"spec": {"containers": [{"name": "a", "args": ["x", "y"]}]}});
        let patched = strategic(
            current,
            json!({"spec": {"containers": [{"name": "a", "args": ["z"]}]}}),
        );
        assert_eq!(patched["spec"]["containers"][0]["args"], json!(["z"]));
    }

    #[test]
    fn json_and_merge_patches() {
        let current = json!({"metadata": {"labels": {"a": "1"}}});
        let merged = apply(
            PatchType::Merge,
            &current,
            br#"{"metadata":{"labels":{"b":"2","a":null}}}"#,
        )
        .unwrap();
        assert_eq!(merged["metadata"]["labels"], json!({"b": "2"}));
        let patched = apply(
            PatchType::Json,
            &current,
            br#"[{"op":"replace","path":"/metadata/labels/a","value":"9"}]"#,
        )
        .unwrap();
        assert_eq!(patched["metadata"]["labels"]["a"], "9");
        assert!(
            apply(
                PatchType::Json,
                &current,
                br#"[{"op":"test","path":"/metadata/labels/a","value":"0"}]"#
            )
            .is_err()
        );
        assert!(matches!(
            apply(PatchType::Merge, &current, b"{"),
            Err(ApiError::BadRequest { .. })
        ));
    }
}
