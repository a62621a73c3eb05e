//! What the server knows about each resource: names for discovery and URLs
//! (from k8s-openapi's `Resource` constants), and per-kind behaviour —
//! defaulting, validation, table columns, selectable fields — written
//! against the k8s-openapi types and reached through the object-safe
//! [`Codec`].

pub mod certificates;
mod cluster;
mod core;
mod workloads;

pub use self::workloads::selector_query;

use std::{any::TypeId, collections::BTreeSet, marker::PhantomData};

use k8s_openapi::{
    Metadata, NamespaceResourceScope, Resource,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    chrono::{DateTime, Utc},
};
use schemars::{JsonSchema, SchemaGenerator};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    status::{ApiError, Cause},
    table::{Column, age, name_column},
    validation::{Causes, NameRule, check_metadata},
};

/// Per-kind behaviour, implemented on the k8s-openapi type itself.
pub trait Kind:
    Resource
    + Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + JsonSchema
    + Send
    + Sync
    + 'static
{
    const NAME_RULE: NameRule = NameRule::Subdomain;
    const SHORT_NAMES: &'static [&'static str] = &[];
    /// `all` puts the kind in `kubectl get all`.
    const CATEGORIES: &'static [&'static str] = &[];
    /// Has a `/status` subresource: main updates keep status, status
    /// updates keep everything else.
    const STATUS: bool = false;
    /// Has a `/scale` subresource on spec.replicas.
    const SCALE: bool = false;
    /// Field selector paths beyond metadata.name and metadata.namespace.
    const FIELDS: &'static [&'static str] = &[];

    /// Fills unset fields with upstream's defaults.
    fn default_fields(&mut self) {}

    /// Checks the kind's own fields (metadata is checked for every kind).
    fn validate(&self, _causes: &mut Causes) {}

    /// Table columns after NAME (with AGE where upstream puts it).
    fn columns() -> Vec<Column> {
        vec![Column::new("Age", "string", 0)]
    }

    /// Cells for [`Kind::columns`].
    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        vec![json!(age(self.metadata(), now))]
    }
}

/// The object-safe face of a [`Kind`], used by the generic handlers on
/// JSON objects.
pub trait Codec: Send + Sync {
    /// Decodes into the typed form once, defaults and validates it there,
    /// and encodes it back. Fields the type does not know are dropped.
    fn normalize(&self, object: &Value) -> Result<Normalized, ApiError>;
    fn columns(&self) -> Vec<Column>;
    fn cells(&self, object: &Value, now: DateTime<Utc>) -> Vec<Value>;
    /// Adds the kind's JSON schema (and everything it refers to) to
    /// `generator`; returns its definition name.
    fn schema(&self, generator: &mut SchemaGenerator) -> String;
}

/// A body after [`Codec::normalize`].
#[derive(Debug)]
pub struct Normalized {
    /// Defaulted, with apiVersion and kind set.
    pub object: Value,
    /// Paths of fields the type does not have.
    pub unknown: Vec<String>,
    /// Why the object is invalid (metadata and kind rules); empty if valid.
    pub causes: Vec<Cause>,
}

struct Typed<K>(PhantomData<fn() -> K>);

impl<K: Kind> Typed<K> {
    /// Decodes `object`, noting the paths of fields the type does not have
    /// (but not of unknown fields that are null: nothing is lost).
    fn decode(object: &Value, unknown: &mut Vec<String>) -> Result<K, ApiError> {
        serde_ignored::deserialize(object, |path| {
            let mut steps = Vec::new();
            path_steps(&path, &mut steps);
            if !lookup(object, &steps).is_some_and(Value::is_null) {
                unknown.push(render_steps(&steps));
            }
        })
        .map_err(|error| {
            ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: {error}",
                K::KIND,
                K::VERSION,
                K::KIND
            ))
        })
    }
}

impl<K: Kind> Codec for Typed<K> {
    fn normalize(&self, object: &Value) -> Result<Normalized, ApiError> {
        let mut unknown = Vec::new();
        let mut typed = Self::decode(object, &mut unknown)?;
        typed.default_fields();
        let mut causes = Causes::default();
        check_metadata(typed.metadata(), K::NAME_RULE, &mut causes);
        typed.validate(&mut causes);
        let mut normalized = serde_json::to_value(&typed).map_err(ApiError::internal)?;
        normalized["apiVersion"] = json!(K::API_VERSION);
        normalized["kind"] = json!(K::KIND);
        Ok(Normalized {
            object: normalized,
            unknown,
            causes: causes.0,
        })
    }

    fn columns(&self) -> Vec<Column> {
        let mut columns = vec![name_column()];
        columns.extend(K::columns());
        columns
    }

    fn cells(&self, object: &Value, now: DateTime<Utc>) -> Vec<Value> {
        let Ok(typed) = K::deserialize(object) else {
            // Stored objects were normalized on the way in; this only
            // happens if the store was edited behind the server's back.
            return vec![object["metadata"]["name"].clone()];
        };
        let mut cells = vec![json!(typed.metadata().name)];
        cells.extend(typed.cells(now));
        cells
    }

    fn schema(&self, generator: &mut SchemaGenerator) -> String {
        generator.subschema_for::<K>();
        K::schema_name().into_owned()
    }
}

/// One step of a path into a JSON document.
enum Step {
    Key(String),
    Index(usize),
}

fn path_steps(path: &serde_ignored::Path<'_>, steps: &mut Vec<Step>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            path_steps(parent, steps);
            steps.push(Step::Index(*index));
        }
        Path::Map { parent, key } => {
            path_steps(parent, steps);
            steps.push(Step::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => {
            path_steps(parent, steps);
        }
    }
}

fn lookup<'a>(value: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(value, |at, step| match step {
        Step::Key(key) => at.get(key),
        Step::Index(index) => at.get(index),
    })
}

/// Upstream's rendering: `spec.containers[0].bogus`.
fn render_steps(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(key) if out.is_empty() => out.push_str(key),
            Step::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// A resource the server serves.
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub api_version: &'static str,
    pub kind: &'static str,
    /// Plural, lower case: the URL segment (`pods`).
    pub plural: &'static str,
    /// Lower-case kind (`pod`).
    pub singular: String,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub status: bool,
    pub scale: bool,
    pub fields: &'static [&'static str],
    pub codec: Box<dyn Codec>,
}

impl std::fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceType")
            .field("group", &self.group)
            .field("version", &self.version)
            .field("plural", &self.plural)
            .finish_non_exhaustive()
    }
}

impl ResourceType {
    fn of<K: Kind>() -> Self {
        Self {
            group: K::GROUP,
            version: K::VERSION,
            api_version: K::API_VERSION,
            kind: K::KIND,
            plural: K::URL_PATH_SEGMENT,
            singular: K::KIND.to_ascii_lowercase(),
            namespaced: TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>(),
            short_names: K::SHORT_NAMES,
            categories: K::CATEGORIES,
            status: K::STATUS,
            scale: K::SCALE,
            fields: K::FIELDS,
            codec: Box::new(Typed::<K>(PhantomData)),
        }
    }

    /// The prefix of this resource's keys in the store.
    pub fn key_prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(namespace) if self.namespaced => {
                format!("{}{namespace}/{name}", self.key_prefix())
            }
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    /// The field selector paths this resource supports.
    pub fn selectable(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace") || self.fields.contains(&field)
    }

    pub fn subject(&self, name: &str) -> super::status::Subject {
        super::status::Subject {
            group: self.group.to_owned(),
            resource: self.plural.to_owned(),
            name: name.to_owned(),
        }
    }

    /// `Invalid` for causes found outside the typed validation.
    pub fn invalid(&self, name: &str, causes: Vec<Cause>) -> ApiError {
        ApiError::Invalid {
            kind: self.kind.to_owned(),
            name: name.to_owned(),
            group: self.group.to_owned(),
            causes,
        }
    }
}

/// Every resource the server serves, in discovery order.
#[derive(Debug)]
pub struct Registry {
    pub types: Vec<ResourceType>,
}

impl Registry {
    pub fn new() -> Self {
        let mut types = Vec::new();
        core::register_all(&mut types);
        workloads::register_all(&mut types);
        cluster::register_all(&mut types);
        certificates::register_all(&mut types);
        Self { types }
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
    }

    /// API groups (other than core) with their versions, in discovery order.
    pub fn groups(&self) -> Vec<(&'static str, &'static str)> {
        let mut seen = BTreeSet::new();
        self.types
            .iter()
            .filter(|rt| !rt.group.is_empty())
            .filter(|rt| seen.insert((rt.group, rt.version)))
            .map(|rt| (rt.group, rt.version))
            .collect()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

fn register<K: Kind>(types: &mut Vec<ResourceType>) {
    types.push(ResourceType::of::<K>());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_serves_every_resource_the_issue_names() {
        let registry = Registry::new();
        for (group, version, plural) in [
            ("", "v1", "namespaces"),
            ("", "v1", "pods"),
            ("", "v1", "services"),
            ("", "v1", "endpoints"),
            ("", "v1", "nodes"),
            ("", "v1", "configmaps"),
            ("", "v1", "secrets"),
            ("", "v1", "serviceaccounts"),
            ("", "v1", "events"),
            ("apps", "v1", "deployments"),
            ("apps", "v1", "replicasets"),
            ("apps", "v1", "daemonsets"),
            ("apps", "v1", "statefulsets"),
            ("apps", "v1", "controllerrevisions"),
            ("batch", "v1", "jobs"),
            ("batch", "v1", "cronjobs"),
            ("discovery.k8s.io", "v1", "endpointslices"),
            ("coordination.k8s.io", "v1", "leases"),
            ("rbac.authorization.k8s.io", "v1", "roles"),
            ("rbac.authorization.k8s.io", "v1", "clusterroles"),
            ("rbac.authorization.k8s.io", "v1", "rolebindings"),
            ("rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
            ("autoscaling", "v2", "horizontalpodautoscalers"),
            ("policy", "v1", "poddisruptionbudgets"),
            ("scheduling.k8s.io", "v1", "priorityclasses"),
        ] {
            assert!(
                registry.find(group, version, plural).is_some(),
                "{group}/{version} {plural}"
            );
        }
        let pods = registry.find("", "v1", "pods").unwrap();
        assert!(pods.namespaced && pods.status);
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/core/pods/default/web"
        );
        assert!(!registry.find("", "v1", "nodes").unwrap().namespaced);
    }

    #[test]
    fn normalize_reports_fields_the_type_does_not_have() {
        let registry = Registry::new();
        let config_maps = registry.find("", "v1", "configmaps").unwrap();
        let input = json!({
            "metadata": {"name": "c", "bogus": 1, "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u", "extra": true},
            ]},
            "data": {"a": "b"},
            "spec": {"x": 1},
            "status": null,
        });
        let normalized = config_maps.codec.normalize(&input).unwrap();
        assert_eq!(
            normalized.unknown,
            [
                "metadata.bogus",
                "metadata.ownerReferences[0].extra",
                "spec"
            ],
            "a null unknown field loses nothing"
        );
        assert_eq!(normalized.object["kind"], "ConfigMap");
        assert_eq!(normalized.object["data"]["a"], "b");
        assert!(normalized.causes.is_empty());
    }
}
