//! Discovery documents, legacy (`APIVersions`, `APIGroupList`,
//! `APIResourceList`) and aggregated v2 (`APIGroupDiscoveryList`), both
//! generated from the registry.

use serde_json::{Value, json};

use super::kinds::{Registry, ResourceType, certificates};

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const SUBRESOURCE_VERBS: &[&str] = &["get", "patch", "update"];

/// Media type of aggregated discovery (kubectl 1.26+ asks for it first).
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Subresources: (name, kind, group, version, verbs).
fn subresources(
    rt: &ResourceType,
) -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
)> {
    let mut out = Vec::new();
    if rt.status {
        out.push(("status", rt.kind, rt.group, rt.version, SUBRESOURCE_VERBS));
    }
    if rt.scale {
        out.push(("scale", "Scale", "autoscaling", "v1", SUBRESOURCE_VERBS));
    }
    match rt.plural {
        "pods" => {
            out.push(("binding", "Binding", "", "v1", &["create"][..]));
            out.push(("eviction", "Eviction", "policy", "v1", &["create"][..]));
            out.push(("log", "Pod", "", "v1", &["get"][..]));
        }
        "namespaces" => out.push(("finalize", "Namespace", "", "v1", &["update"][..])),
        certificates::PLURAL => {
            out.push(("approval", rt.kind, rt.group, rt.version, SUBRESOURCE_VERBS))
        }
        _ => {}
    }
    out
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn group_entry(group: &str, version: &str) -> Value {
    let group_version = json!({ "groupVersion": format!("{group}/{version}"), "version": version });
    json!({ "name": group, "versions": [group_version], "preferredVersion": group_version })
}

pub fn api_group_list(registry: &Registry) -> Value {
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": registry.groups().into_iter().map(|(g, v)| group_entry(g, v)).collect::<Vec<_>>(),
    })
}

pub fn api_group(registry: &Registry, group: &str) -> Option<Value> {
    let (_, version) = registry.groups().into_iter().find(|(g, _)| *g == group)?;
    let mut entry = group_entry(group, version);
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = registry
        .types
        .iter()
        .filter(|rt| rt.group == group && rt.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for rt in types {
        resources.push(json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": VERBS,
            "shortNames": rt.short_names,
            "categories": rt.categories,
        }));
        for (name, kind, sub_group, sub_version, verbs) in subresources(rt) {
            let mut entry = json!({
                "name": format!("{}/{name}", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if sub_group != rt.group || sub_version != rt.version {
                entry["group"] = json!(sub_group);
                entry["version"] = json!(sub_version);
            }
            resources.push(entry);
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

fn aggregated_resource(rt: &ResourceType) -> Value {
    json!({
        "resource": rt.plural,
        "responseKind": { "group": rt.group, "version": rt.version, "kind": rt.kind },
        "scope": if rt.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": rt.singular,
        "verbs": VERBS,
        "shortNames": rt.short_names,
        "categories": rt.categories,
        "subresources": subresources(rt).into_iter().map(|(name, kind, group, version, verbs)| json!({
            "subresource": name,
            "responseKind": { "group": group, "version": version, "kind": kind },
            "verbs": verbs,
        })).collect::<Vec<_>>(),
    })
}

/// Aggregated discovery for `/api` (`legacy`) or `/apis`.
pub fn aggregated(registry: &Registry, legacy: bool) -> Value {
    let groups: Vec<(&str, &str)> = if legacy {
        vec![("", "v1")]
    } else {
        registry.groups()
    };
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(group, version)| {
            let resources: Vec<Value> = registry
                .types
                .iter()
                .filter(|rt| rt.group == group && rt.version == version)
                .map(aggregated_resource)
                .collect();
            json!({
                "metadata": { "name": group },
                "versions": [{ "version": version, "resources": resources, "freshness": "Current" }],
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_resources_list_their_subresources() {
        let registry = Registry::new();
        let list = resource_list(&registry, "", "v1").unwrap();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for expected in [
            "pods",
            "pods/status",
            "pods/binding",
            "pods/eviction",
            "services",
            "namespaces/finalize",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        let apps = resource_list(&registry, "apps", "v1").unwrap();
        let scale = apps["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "deployments/scale")
            .unwrap();
        assert_eq!(scale["group"], "autoscaling");
    }

    #[test]
    fn aggregated_discovery_covers_every_group() {
        let registry = Registry::new();
        let apis = aggregated(&registry, false);
        let groups: Vec<&str> = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["metadata"]["name"].as_str().unwrap())
            .collect();
        assert!(groups.contains(&"apps") && groups.contains(&"rbac.authorization.k8s.io"));
        assert_eq!(
            aggregated(&registry, true)["items"][0]["versions"][0]["version"],
            "v1"
        );
    }
}
