//! OpenAPI documents, generated once at startup from k8s-openapi's JSON
//! schemas (with upstream's descriptions) and the registry.
//!
//! v3 is what kubectl reads: `/openapi/v3` lists one document per
//! group-version; each PATCH operation carries the kind's
//! `x-kubernetes-group-version-kind` and a `fieldValidation` parameter, so
//! kubectl validates server-side (`fieldValidation=Strict`), and each
//! top-level schema carries its group-version-kind, so `kubectl explain`
//! finds it. PATCH operations deliberately list no request body: kubectl
//! then builds strategic merge patches from its compiled-in types, whose
//! merge keys are authoritative. v2 is served as JSON for other clients.

use std::collections::BTreeMap;

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::kinds::{Registry, ResourceType};

/// The documents, encoded once.
#[derive(Debug)]
pub struct OpenApi {
    /// `/openapi/v3`: group-version path -> server-relative URL.
    pub v3_index: Value,
    /// `/openapi/v3/<api/v1 | apis/g/v>` documents.
    pub v3: BTreeMap<String, String>,
    /// `/openapi/v2`.
    pub v2: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V2,
    V3,
}

impl Flavor {
    fn reference(self, name: &str) -> Value {
        match self {
            Self::V2 => json!({ "$ref": format!("#/definitions/{name}") }),
            Self::V3 => json!({ "$ref": format!("#/components/schemas/{name}") }),
        }
    }

    fn query(self, name: &str, description: &str) -> Value {
        match self {
            Self::V2 => {
                json!({ "name": name, "in": "query", "type": "string", "uniqueItems": true, "description": description })
            }
            Self::V3 => {
                json!({ "name": name, "in": "query", "schema": { "type": "string", "uniqueItems": true }, "description": description })
            }
        }
    }

    fn path_param(self, name: &str) -> Value {
        match self {
            Self::V2 => json!({ "name": name, "in": "path", "required": true, "type": "string" }),
            Self::V3 => {
                json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } })
            }
        }
    }

    fn response(self, schema: Value) -> Value {
        match self {
            Self::V2 => json!({ "200": { "description": "OK", "schema": schema } }),
            Self::V3 => {
                json!({ "200": { "description": "OK", "content": { "application/json": { "schema": schema } } } })
            }
        }
    }

    fn settings(self) -> SchemaSettings {
        match self {
            Self::V2 => SchemaSettings::draft07(),
            Self::V3 => SchemaSettings::openapi3(),
        }
    }
}

fn gvk(rt: &ResourceType) -> Value {
    json!({ "group": rt.group, "version": rt.version, "kind": rt.kind })
}

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The operations of one resource, added to `paths`.
fn add_paths(flavor: Flavor, rt: &ResourceType, schema: &str, paths: &mut Map<String, Value>) {
    let base = format!("/{}", group_version_path(rt.group, rt.version));
    let collection = if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{base}/{}", rt.plural)
    };
    let item = format!("{collection}/{{name}}");
    let field_validation = flavor.query(
        "fieldValidation",
        "How the server treats unknown or duplicate fields: Ignore, Warn (default) or Strict.",
    );
    let dry_run = flavor.query(
        "dryRun",
        "When present (All), the request is validated but nothing is stored.",
    );
    let field_manager = flavor.query(
        "fieldManager",
        "The name of the actor making these changes.",
    );
    let object = flavor.reference(schema);
    let operation = |action: &str, verb: &str, write: bool| {
        let mut parameters = Vec::new();
        if write {
            parameters.extend([
                dry_run.clone(),
                field_manager.clone(),
                field_validation.clone(),
            ]);
        }
        let id = format!(
            "{verb}{}{}",
            if rt.namespaced { "Namespaced" } else { "" },
            rt.kind
        );
        json!({
            "operationId": id,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk(rt),
            "parameters": parameters,
            "responses": flavor.response(object.clone()),
        })
    };
    let mut scope_parameters = vec![];
    if rt.namespaced {
        scope_parameters.push(flavor.path_param("namespace"));
    }
    paths.insert(
        collection,
        json!({
            "parameters": scope_parameters,
            "get": operation("list", "list", false),
            "post": operation("post", "create", true),
            "delete": operation("deletecollection", "deleteCollection", false),
        }),
    );
    let mut item_parameters = scope_parameters.clone();
    item_parameters.push(flavor.path_param("name"));
    let item_operations = json!({
        "parameters": item_parameters,
        "get": operation("get", "read", false),
        "put": operation("put", "replace", true),
        "patch": operation("patch", "patch", true),
        "delete": operation("delete", "delete", false),
    });
    if rt.status {
        let mut status = item_operations.clone();
        if let Some(map) = status.as_object_mut() {
            map.remove("delete");
        }
        paths.insert(format!("{item}/status"), status);
    }
    paths.insert(item, item_operations);
}

/// One document over `types` (all types for v2, one group-version for v3).
fn document(flavor: Flavor, types: &[&ResourceType]) -> Value {
    let mut generator = flavor.settings().into_generator();
    let mut paths = Map::new();
    let mut kinds = Vec::new();
    for rt in types {
        let schema = rt.codec.schema(&mut generator);
        add_paths(flavor, rt, &schema, &mut paths);
        kinds.push((schema, gvk(rt)));
    }
    let mut definitions = generator.take_definitions(true);
    for (schema, gvk) in kinds {
        if let Some(Value::Object(definition)) = definitions.get_mut(&schema) {
            definition.insert("x-kubernetes-group-version-kind".to_owned(), json!([gvk]));
        }
    }
    let info = json!({ "title": "Kubernetes", "version": "v1.32.0" });
    match flavor {
        Flavor::V2 => {
            json!({ "swagger": "2.0", "info": info, "paths": paths, "definitions": definitions })
        }
        Flavor::V3 => {
            json!({ "openapi": "3.0.0", "info": info, "paths": paths, "components": { "schemas": definitions } })
        }
    }
}

/// A short content hash for the immutable v3 URLs (FNV-1a).
fn content_hash(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016X}")
}

impl OpenApi {
    pub fn build(registry: &Registry) -> Self {
        let mut groups: Vec<(&str, &str)> = vec![("", "v1")];
        groups.extend(registry.groups());
        let mut v3 = BTreeMap::new();
        let mut index = Map::new();
        for (group, version) in groups {
            let types: Vec<&ResourceType> = registry
                .types
                .iter()
                .filter(|rt| rt.group == group && rt.version == version)
                .collect();
            let text = document(Flavor::V3, &types).to_string();
            let path = group_version_path(group, version);
            index.insert(
                path.clone(),
                json!({ "serverRelativeURL": format!("/openapi/v3/{path}?hash={}", content_hash(&text)) }),
            );
            v3.insert(path, text);
        }
        let all: Vec<&ResourceType> = registry.types.iter().collect();
        Self {
            v3_index: json!({ "paths": index }),
            v3,
            v2: document(Flavor::V2, &all).to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_documents_let_kubectl_validate_server_side_and_explain() {
        let openapi = OpenApi::build(&Registry::new());
        assert!(
            openapi.v3_index["paths"]["apis/apps/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/apps/v1?hash=")
        );
        let apps: Value = serde_json::from_str(&openapi.v3["apis/apps/v1"]).unwrap();
        let patch =
            &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(patch.get("requestBody").is_none());
        let deployment = &apps["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deployment["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(
            deployment["description"]
                .as_str()
                .unwrap()
                .contains("Deployment")
        );
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());
    }

    #[test]
    fn v2_refers_to_its_definitions() {
        let openapi = OpenApi::build(&Registry::new());
        let v2: Value = serde_json::from_str(&openapi.v2).unwrap();
        assert_eq!(v2["swagger"], "2.0");
        let get = &v2["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["get"];
        assert_eq!(
            get["responses"]["200"]["schema"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.Pod"
        );
        assert!(v2["definitions"]["io.k8s.api.core.v1.Pod"].is_object());
    }
}
