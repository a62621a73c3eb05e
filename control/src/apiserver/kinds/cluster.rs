//! discovery, coordination, rbac, autoscaling, policy, scheduling and
//! metrics kinds.

use k8s_openapi::{
    api::{
        autoscaling::v2::HorizontalPodAutoscaler,
        coordination::v1::Lease,
        discovery::v1::EndpointSlice,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{
            ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
        },
        scheduling::v1::PriorityClass,
    },
    chrono::{DateTime, Utc},
};
use serde_json::{Value, json};

use super::{Kind, ResourceType, register, workloads::selector_string};
use crate::apiserver::{
    status::Cause,
    table::{Column, age},
    validation::{Causes, NameRule, check_port, check_protocol},
};
use crate::usage::{NodeMetrics, PodMetrics};

pub(super) fn register_all(types: &mut Vec<ResourceType>) {
    register::<EndpointSlice>(types);
    register::<Lease>(types);
    register::<Role>(types);
    register::<ClusterRole>(types);
    register::<RoleBinding>(types);
    register::<ClusterRoleBinding>(types);
    register::<HorizontalPodAutoscaler>(types);
    register::<PodDisruptionBudget>(types);
    register::<PriorityClass>(types);
    register::<PodMetrics>(types);
    register::<NodeMetrics>(types);
}

/// Priorities above this are reserved for the system classes.
pub const HIGHEST_USER_PRIORITY: i32 = 1_000_000_000;

impl Kind for PriorityClass {
    const SHORT_NAMES: &'static [&'static str] = &["pc"];

    fn validate(&self, causes: &mut Causes) {
        let name = self.metadata.name.as_deref().unwrap_or_default();
        if self.value > HIGHEST_USER_PRIORITY && !name.starts_with("system-") {
            causes.push(Cause::invalid(
                "value",
                &json!(self.value),
                format!(
                    "maximum allowed value of a user defined priority is {HIGHEST_USER_PRIORITY}"
                ),
            ));
        }
        if let Some(policy) = &self.preemption_policy
            && policy != "PreemptLowerPriority"
            && policy != "Never"
        {
            causes.push(Cause::not_supported(
                "preemptionPolicy",
                &json!(policy),
                &["Never", "PreemptLowerPriority"],
            ));
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Value", "integer", 0),
            Column::new("Global-Default", "boolean", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        vec![
            json!(self.value),
            json!(self.global_default.unwrap_or(false)),
            json!(age(&self.metadata, now)),
        ]
    }
}

const ADDRESS_TYPES: &[&str] = &["FQDN", "IPv4", "IPv6"];

impl Kind for EndpointSlice {
    fn validate(&self, causes: &mut Causes) {
        if !ADDRESS_TYPES.contains(&self.address_type.as_str()) {
            causes.push(Cause::not_supported(
                "addressType",
                &json!(self.address_type),
                ADDRESS_TYPES,
            ));
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.addresses.is_empty() {
                causes.push(Cause::required(format!("endpoints[{i}].addresses")));
            }
            for (j, address) in endpoint.addresses.iter().enumerate() {
                let valid = match self.address_type.as_str() {
                    "IPv4" => address.parse::<std::net::Ipv4Addr>().is_ok(),
                    "IPv6" => address.parse::<std::net::Ipv6Addr>().is_ok(),
                    _ => true,
                };
                if !valid {
                    causes.push(Cause::invalid(
                        format!("endpoints[{i}].addresses[{j}]"),
                        &json!(address),
                        format!("must be a valid {} address", self.address_type),
                    ));
                }
            }
        }
        for (i, port) in self.ports.iter().flatten().enumerate() {
            if let Some(number) = port.port {
                check_port(&format!("ports[{i}].port"), number, causes);
            }
            check_protocol(
                &format!("ports[{i}].protocol"),
                port.protocol.as_deref(),
                causes,
            );
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("AddressType", "string", 0),
            Column::new("Ports", "string", 0),
            Column::new("Endpoints", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let ports: Vec<String> = self
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.map(|n| n.to_string()))
            .collect();
        let addresses: Vec<&str> = self
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect();
        let shown = match addresses.len() {
            0 => "<none>".to_owned(),
            n if n > 3 => format!("{} + {} more...", addresses[..3].join(","), n - 3),
            _ => addresses.join(","),
        };
        vec![
            json!(self.address_type),
            json!(if ports.is_empty() {
                "<unset>".to_owned()
            } else {
                ports.join(",")
            }),
            json!(shown),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for Lease {
    fn columns() -> Vec<Column> {
        vec![
            Column::new("Holder", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let holder = self.spec.as_ref().and_then(|s| s.holder_identity.clone());
        vec![
            json!(holder.unwrap_or_default()),
            json!(age(&self.metadata, now)),
        ]
    }
}

fn validate_rules(rules: &[PolicyRule], causes: &mut Causes) {
    for (i, rule) in rules.iter().enumerate() {
        if rule.verbs.is_empty() {
            causes.push(Cause::required(format!("rules[{i}].verbs")));
        }
        let has_resources = rule.resources.as_ref().is_some_and(|r| !r.is_empty());
        let has_urls = rule
            .non_resource_urls
            .as_ref()
            .is_some_and(|u| !u.is_empty());
        if !has_resources && !has_urls {
            causes.push(Cause::required(format!("rules[{i}].resources")));
        }
    }
}

fn validate_binding(
    role_ref: &RoleRef,
    subjects: &[Subject],
    namespaced: bool,
    causes: &mut Causes,
) {
    let kinds: &[&str] = if namespaced {
        &["ClusterRole", "Role"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&role_ref.kind.as_str()) {
        causes.push(Cause::not_supported(
            "roleRef.kind",
            &json!(role_ref.kind),
            kinds,
        ));
    }
    if role_ref.name.is_empty() {
        causes.push(Cause::required("roleRef.name"));
    }
    for (i, subject) in subjects.iter().enumerate() {
        if !matches!(subject.kind.as_str(), "User" | "Group" | "ServiceAccount") {
            causes.push(Cause::not_supported(
                format!("subjects[{i}].kind"),
                &json!(subject.kind),
                &["Group", "ServiceAccount", "User"],
            ));
        }
        if subject.name.is_empty() {
            causes.push(Cause::required(format!("subjects[{i}].name")));
        }
    }
}

fn created_at(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Value {
    json!(
        meta.creation_timestamp
            .as_ref()
            .map(|t| t.0.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    )
}

/// Roles and ClusterRoles behave alike: rules, validated the same way.
macro_rules! role_kind {
    ($kind:ty) => {
        impl Kind for $kind {
            const NAME_RULE: NameRule = NameRule::PathSegment;

            fn validate(&self, causes: &mut Causes) {
                validate_rules(self.rules.as_deref().unwrap_or_default(), causes);
            }

            fn columns() -> Vec<Column> {
                vec![Column::new("Created At", "date", 0)]
            }

            fn cells(&self, _now: DateTime<Utc>) -> Vec<Value> {
                vec![created_at(&self.metadata)]
            }
        }
    };
}

role_kind!(Role);
role_kind!(ClusterRole);

fn binding_columns() -> Vec<Column> {
    vec![
        Column::new("Role", "string", 0),
        Column::new("Age", "string", 0),
        Column::new("Users", "string", 1),
        Column::new("Groups", "string", 1),
        Column::new("ServiceAccounts", "string", 1),
    ]
}

fn binding_cells(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    role_ref: &RoleRef,
    subjects: &[Subject],
    now: DateTime<Utc>,
) -> Vec<Value> {
    let of = |kind: &str| -> String {
        subjects
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| match (&s.namespace, kind) {
                (Some(namespace), "ServiceAccount") => format!("{namespace}/{}", s.name),
                _ => s.name.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        json!(format!("{}/{}", role_ref.kind, role_ref.name)),
        json!(age(meta, now)),
        json!(of("User")),
        json!(of("Group")),
        json!(of("ServiceAccount")),
    ]
}

/// RoleBindings and ClusterRoleBindings differ only in which roles they
/// may refer to.
macro_rules! binding_kind {
    ($kind:ty, namespaced: $namespaced:expr) => {
        impl Kind for $kind {
            const NAME_RULE: NameRule = NameRule::PathSegment;

            fn validate(&self, causes: &mut Causes) {
                validate_binding(
                    &self.role_ref,
                    self.subjects.as_deref().unwrap_or_default(),
                    $namespaced,
                    causes,
                );
            }

            fn columns() -> Vec<Column> {
                binding_columns()
            }

            fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
                binding_cells(
                    &self.metadata,
                    &self.role_ref,
                    self.subjects.as_deref().unwrap_or_default(),
                    now,
                )
            }
        }
    };
}

binding_kind!(RoleBinding, namespaced: true);
binding_kind!(ClusterRoleBinding, namespaced: false);

impl Kind for HorizontalPodAutoscaler {
    const SHORT_NAMES: &'static [&'static str] = &["hpa"];
    const CATEGORIES: &'static [&'static str] = &["all"];
    const STATUS: bool = true;

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        if spec.max_replicas < 1 {
            causes.push(Cause::invalid(
                "spec.maxReplicas",
                &json!(spec.max_replicas),
                "must be greater than or equal to 1",
            ));
        }
        if let Some(min) = spec.min_replicas
            && min > spec.max_replicas
        {
            causes.push(Cause::invalid(
                "spec.maxReplicas",
                &json!(spec.max_replicas),
                "must be greater than or equal to `minReplicas`",
            ));
        }
        if spec.scale_target_ref.name.is_empty() {
            causes.push(Cause::required("spec.scaleTargetRef.name"));
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Reference", "string", 0),
            Column::new("MinPods", "string", 0),
            Column::new("MaxPods", "integer", 0),
            Column::new("Replicas", "integer", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let target = &spec.scale_target_ref;
        vec![
            json!(format!("{}/{}", target.kind, target.name)),
            json!(
                spec.min_replicas
                    .map_or_else(|| "<unset>".to_owned(), |m| m.to_string())
            ),
            json!(spec.max_replicas),
            json!(
                self.status
                    .as_ref()
                    .and_then(|s| s.current_replicas)
                    .unwrap_or(0)
            ),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for PodDisruptionBudget {
    const SHORT_NAMES: &'static [&'static str] = &["pdb"];
    const STATUS: bool = true;

    fn validate(&self, causes: &mut Causes) {
        if let Some(spec) = &self.spec
            && spec.min_available.is_some()
            && spec.max_unavailable.is_some()
        {
            causes.push(Cause::invalid(
                "spec",
                &json!(spec),
                "minAvailable and maxUnavailable cannot be both set",
            ));
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Min Available", "string", 0),
            Column::new("Max Unavailable", "string", 0),
            Column::new("Allowed Disruptions", "integer", 0),
            Column::new("Age", "string", 0),
            Column::new("Selector", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let show = |value: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>| {
            match value {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                    n.to_string()
                }
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s)) => s,
                None => "N/A".to_owned(),
            }
        };
        vec![
            json!(show(spec.min_available)),
            json!(show(spec.max_unavailable)),
            json!(self.status.as_ref().map_or(0, |s| s.disruptions_allowed)),
            json!(age(&self.metadata, now)),
            json!(
                spec.selector
                    .as_ref()
                    .map_or_else(|| "<none>".to_owned(), selector_string)
            ),
        ]
    }
}

/// Usage reports show the window they cover.
macro_rules! usage_kind {
    ($kind:ty) => {
        impl Kind for $kind {
            fn columns() -> Vec<Column> {
                vec![
                    Column::new("Window", "string", 0),
                    Column::new("Age", "string", 0),
                ]
            }

            fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
                vec![json!(self.window), json!(age(&self.metadata, now))]
            }
        }
    };
}

usage_kind!(PodMetrics);
usage_kind!(NodeMetrics);
