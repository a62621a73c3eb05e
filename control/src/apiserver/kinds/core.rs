//! core/v1 kinds.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{
        ConfigMap, Endpoints, Event, Namespace, NamespaceSpec, NamespaceStatus, Node, Pod, PodSpec,
        Secret, Service, ServiceAccount, ServiceSpec,
    },
    apimachinery::pkg::util::intstr::IntOrString,
    chrono::{DateTime, Utc},
};
use serde_json::{Value, json};

use super::{Kind, ResourceType, register};
use crate::apiserver::{
    status::Cause,
    table::{Column, age},
    validation::{Causes, NameRule, check_labels, check_name, check_port, check_protocol},
};

pub(super) fn register_all(types: &mut Vec<ResourceType>) {
    register::<Namespace>(types);
    register::<Pod>(types);
    register::<Service>(types);
    register::<Endpoints>(types);
    register::<Node>(types);
    register::<ConfigMap>(types);
    register::<Secret>(types);
    register::<ServiceAccount>(types);
    register::<Event>(types);
}

const ALL: &[&str] = &["all"];

impl Kind for Namespace {
    const NAME_RULE: NameRule = NameRule::Label;
    const SHORT_NAMES: &'static [&'static str] = &["ns"];
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &["status.phase"];

    fn default_fields(&mut self) {
        // The namespace controller removes this finalizer once the
        // namespace is empty.
        self.spec
            .get_or_insert_with(NamespaceSpec::default)
            .finalizers
            .get_or_insert_with(|| vec!["kubernetes".to_owned()]);
        let status = self.status.get_or_insert_with(NamespaceStatus::default);
        status.phase.get_or_insert_with(|| "Active".to_owned());
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Status", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let phase = self.status.as_ref().and_then(|s| s.phase.clone());
        vec![
            json!(phase.unwrap_or_default()),
            json!(age(&self.metadata, now)),
        ]
    }
}

/// Upstream's pod-spec defaults (for pods and every pod template).
pub(super) fn default_pod_spec(spec: &mut PodSpec) {
    spec.restart_policy
        .get_or_insert_with(|| "Always".to_owned());
    spec.dns_policy
        .get_or_insert_with(|| "ClusterFirst".to_owned());
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".to_owned());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.security_context.get_or_insert_with(Default::default);
    spec.enable_service_links.get_or_insert(true);
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        let image = container.image.as_deref().unwrap_or_default();
        // Upstream: Always for `:latest` or an untagged image, else IfNotPresent.
        let last = image.rsplit('/').next().unwrap_or_default();
        let latest = !last.contains(':') || last.ends_with(":latest");
        container.image_pull_policy.get_or_insert_with(|| {
            if latest && !image.contains('@') {
                "Always"
            } else {
                "IfNotPresent"
            }
            .to_owned()
        });
        container
            .termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".to_owned());
        container
            .termination_message_policy
            .get_or_insert_with(|| "File".to_owned());
        for port in container.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".to_owned());
        }
    }
}

/// Upstream's `GetPodQOS`: BestEffort without cpu or memory requests
/// and limits, Guaranteed when every container limits both and the
/// totals of requests and limits agree, else Burstable.
fn qos_class(spec: &PodSpec) -> &'static str {
    let mut requests: BTreeMap<&str, i64> = BTreeMap::new();
    let mut limits: BTreeMap<&str, i64> = BTreeMap::new();
    let mut guaranteed = true;
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for container in containers {
        let resources = container.resources.clone().unwrap_or_default();
        let mut limited = 0;
        for (list, totals, limit) in [
            (&resources.requests, &mut requests, false),
            (&resources.limits, &mut limits, true),
        ] {
            for name in ["cpu", "memory"] {
                let amount = list
                    .as_ref()
                    .and_then(|l| l.get(name))
                    .and_then(wharf_quantity::milli)
                    .filter(|m| *m > 0);
                if let Some(amount) = amount {
                    let total = totals.entry(name).or_default();
                    *total = total.saturating_add(amount);
                    limited += usize::from(limit);
                }
            }
        }
        guaranteed &= limited == 2;
    }
    match (
        requests.is_empty() && limits.is_empty(),
        guaranteed && requests == limits,
    ) {
        (true, _) => "BestEffort",
        (false, true) => "Guaranteed",
        (false, false) => "Burstable",
    }
}

pub(super) fn validate_pod_spec(field: &str, spec: &PodSpec, causes: &mut Causes) {
    if spec.containers.is_empty() {
        causes.push(Cause::required(format!("{field}.containers")));
    }
    let mut names = BTreeSet::new();
    let groups = [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", spec.containers.as_slice()),
    ];
    for (list, containers) in groups {
        for (i, container) in containers.iter().enumerate() {
            let at = format!("{field}.{list}[{i}]");
            if container.name.is_empty() {
                causes.push(Cause::required(format!("{at}.name")));
            } else {
                check_name(
                    NameRule::Label,
                    &format!("{at}.name"),
                    &container.name,
                    causes,
                );
                if !names.insert(container.name.as_str()) {
                    causes.push(Cause::duplicate(
                        format!("{at}.name"),
                        &json!(container.name),
                    ));
                }
            }
            if container
                .image
                .as_deref()
                .is_none_or(|image| image.trim().is_empty())
            {
                causes.push(Cause::required(format!("{at}.image")));
            }
            for (j, port) in container.ports.iter().flatten().enumerate() {
                check_port(
                    &format!("{at}.ports[{j}].containerPort"),
                    port.container_port,
                    causes,
                );
                check_protocol(
                    &format!("{at}.ports[{j}].protocol"),
                    port.protocol.as_deref(),
                    causes,
                );
            }
        }
    }
    if let Some(policy) = &spec.restart_policy
        && !matches!(policy.as_str(), "Always" | "OnFailure" | "Never")
    {
        causes.push(Cause::not_supported(
            format!("{field}.restartPolicy"),
            &json!(policy),
            &["Always", "Never", "OnFailure"],
        ));
    }
}

impl Kind for Pod {
    const SHORT_NAMES: &'static [&'static str] = &["po"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &[
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ];

    fn default_fields(&mut self) {
        let spec = self.spec.get_or_insert_with(PodSpec::default);
        default_pod_spec(spec);
        spec.service_account_name
            .get_or_insert_with(|| "default".to_owned());
        // Pods only (not templates): a limit without a request requests
        // the limit.
        for container in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
        {
            let Some(resources) = container.resources.as_mut() else {
                continue;
            };
            if let Some(limits) = &resources.limits {
                let requests = resources.requests.get_or_insert_with(Default::default);
                for (name, limit) in limits {
                    requests
                        .entry(name.clone())
                        .or_insert_with(|| limit.clone());
                }
            }
        }
        let qos = qos_class(spec);
        let status = self.status.get_or_insert_with(Default::default);
        status.phase.get_or_insert_with(|| "Pending".to_owned());
        status.qos_class.get_or_insert_with(|| qos.to_owned());
    }

    fn validate(&self, causes: &mut Causes) {
        match &self.spec {
            Some(spec) => validate_pod_spec("spec", spec, causes),
            None => causes.push(Cause::required("spec")),
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Ready", "string", 0),
            Column::new("Status", "string", 0),
            Column::new("Restarts", "string", 0),
            Column::new("Age", "string", 0),
            Column::new("IP", "string", 1),
            Column::new("Node", "string", 1),
            Column::new("Nominated Node", "string", 1),
            Column::new("Readiness Gates", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let statuses = status.container_statuses.unwrap_or_default();
        let ready = statuses.iter().filter(|s| s.ready).count();
        let restarts: i32 = statuses.iter().map(|s| s.restart_count).sum();
        let waiting = statuses.iter().find_map(|s| {
            let state = s.state.as_ref()?;
            state
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .or_else(|| state.terminated.as_ref().and_then(|t| t.reason.clone()))
        });
        let phase = if self.metadata.deletion_timestamp.is_some() {
            "Terminating".to_owned()
        } else {
            waiting
                .or(status.reason)
                .or(status.phase)
                .unwrap_or_else(|| "Pending".to_owned())
        };
        let gates = spec.readiness_gates.unwrap_or_default();
        vec![
            json!(format!("{ready}/{}", spec.containers.len())),
            json!(phase),
            json!(restarts.to_string()),
            json!(age(&self.metadata, now)),
            json!(status.pod_ip.unwrap_or_else(|| "<none>".to_owned())),
            json!(spec.node_name.unwrap_or_else(|| "<none>".to_owned())),
            json!(
                status
                    .nominated_node_name
                    .unwrap_or_else(|| "<none>".to_owned())
            ),
            json!(if gates.is_empty() {
                "<none>".to_owned()
            } else {
                format!("0/{}", gates.len())
            }),
        ]
    }
}

const SERVICE_TYPES: &[&str] = &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"];

impl Kind for Service {
    const NAME_RULE: NameRule = NameRule::Label1035;
    const SHORT_NAMES: &'static [&'static str] = &["svc"];
    const CATEGORIES: &'static [&'static str] = ALL;
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &["spec.clusterIP", "spec.type"];

    fn default_fields(&mut self) {
        let spec = self.spec.get_or_insert_with(ServiceSpec::default);
        let kind = spec
            .type_
            .get_or_insert_with(|| "ClusterIP".to_owned())
            .clone();
        if kind == "ExternalName" {
            return;
        }
        spec.session_affinity
            .get_or_insert_with(|| "None".to_owned());
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".to_owned());
        if kind == "NodePort" || kind == "LoadBalancer" {
            spec.external_traffic_policy
                .get_or_insert_with(|| "Cluster".to_owned());
        }
        spec.ip_family_policy
            .get_or_insert_with(|| "SingleStack".to_owned());
        spec.ip_families
            .get_or_insert_with(|| vec!["IPv4".to_owned()]);
        for port in spec.ports.iter_mut().flatten() {
            port.protocol.get_or_insert_with(|| "TCP".to_owned());
            port.target_port.get_or_insert(IntOrString::Int(port.port));
        }
    }

    fn validate(&self, causes: &mut Causes) {
        let Some(spec) = &self.spec else {
            causes.push(Cause::required("spec"));
            return;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !SERVICE_TYPES.contains(&kind) {
            causes.push(Cause::not_supported(
                "spec.type",
                &json!(kind),
                SERVICE_TYPES,
            ));
        }
        let ports = spec.ports.as_deref().unwrap_or_default();
        let headless = spec.cluster_ip.as_deref() == Some("None");
        if ports.is_empty() && kind != "ExternalName" && !headless {
            causes.push(Cause::required("spec.ports"));
        }
        if kind == "ExternalName" && spec.external_name.as_deref().is_none_or(str::is_empty) {
            causes.push(Cause::required("spec.externalName"));
        }
        let mut names = BTreeSet::new();
        for (i, port) in ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            check_port(&format!("{at}.port"), port.port, causes);
            check_protocol(&format!("{at}.protocol"), port.protocol.as_deref(), causes);
            if ports.len() > 1 && port.name.as_deref().is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("{at}.name")));
            }
            if let Some(name) = &port.name
                && !name.is_empty()
                && !names.insert(name.as_str())
            {
                causes.push(Cause::duplicate(format!("{at}.name"), &json!(name)));
            }
            if let Some(IntOrString::Int(target)) = port.target_port {
                check_port(&format!("{at}.targetPort"), target, causes);
            }
            if let Some(node_port) = port.node_port
                && kind != "NodePort"
                && kind != "LoadBalancer"
                && node_port != 0
            {
                causes.push(Cause::forbidden(
                    format!("{at}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            }
        }
        if let Some(selector) = &spec.selector {
            check_labels("spec.selector", selector, causes);
        }
        for (field, value, allowed) in [
            (
                "spec.sessionAffinity",
                spec.session_affinity.as_deref(),
                &["ClientIP", "None"][..],
            ),
            (
                "spec.externalTrafficPolicy",
                spec.external_traffic_policy.as_deref(),
                &["Cluster", "Local"],
            ),
            (
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
                &["Cluster", "Local"],
            ),
        ] {
            if let Some(value) = value
                && !allowed.contains(&value)
            {
                causes.push(Cause::not_supported(field, &json!(value), allowed));
            }
        }
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Type", "string", 0),
            Column::new("Cluster-IP", "string", 0),
            Column::new("External-IP", "string", 0),
            Column::new("Port(s)", "string", 0),
            Column::new("Age", "string", 0),
            Column::new("Selector", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let spec = self.spec.clone().unwrap_or_default();
        let kind = spec.type_.clone().unwrap_or_else(|| "ClusterIP".to_owned());
        let mut external: Vec<String> = spec.external_ips.clone().unwrap_or_default();
        for ingress in self
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default()
        {
            external.extend(ingress.ip.or(ingress.hostname));
        }
        let external = match (kind.as_str(), external.is_empty()) {
            ("ExternalName", _) => spec.external_name.clone().unwrap_or_default(),
            ("LoadBalancer", true) => "<pending>".to_owned(),
            (_, true) => "<none>".to_owned(),
            (_, false) => external.join(","),
        };
        let ports: Vec<String> = spec
            .ports
            .iter()
            .flatten()
            .map(|port| {
                let protocol = port.protocol.as_deref().unwrap_or("TCP");
                match port.node_port {
                    Some(node_port) if node_port != 0 => {
                        format!("{}:{node_port}/{protocol}", port.port)
                    }
                    _ => format!("{}/{protocol}", port.port),
                }
            })
            .collect();
        let selector: Vec<String> = spec
            .selector
            .iter()
            .flatten()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        vec![
            json!(kind),
            json!(spec.cluster_ip.unwrap_or_else(|| "<none>".to_owned())),
            json!(external),
            json!(if ports.is_empty() {
                "<none>".to_owned()
            } else {
                ports.join(",")
            }),
            json!(age(&self.metadata, now)),
            json!(if selector.is_empty() {
                "<none>".to_owned()
            } else {
                selector.join(",")
            }),
        ]
    }
}

impl Kind for Endpoints {
    const SHORT_NAMES: &'static [&'static str] = &["ep"];

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Endpoints", "string", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let mut endpoints = Vec::new();
        for subset in self.subsets.iter().flatten() {
            for address in subset.addresses.iter().flatten() {
                for port in subset.ports.iter().flatten() {
                    endpoints.push(format!("{}:{}", address.ip, port.port));
                }
            }
        }
        let shown = match endpoints.len() {
            0 => "<none>".to_owned(),
            n if n > 3 => format!("{} + {} more...", endpoints[..3].join(","), n - 3),
            _ => endpoints.join(","),
        };
        vec![json!(shown), json!(age(&self.metadata, now))]
    }
}

impl Kind for Node {
    const SHORT_NAMES: &'static [&'static str] = &["no"];
    const STATUS: bool = true;
    const FIELDS: &'static [&'static str] = &["spec.unschedulable"];

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Status", "string", 0),
            Column::new("Roles", "string", 0),
            Column::new("Age", "string", 0),
            Column::new("Version", "string", 0),
            Column::new("Internal-IP", "string", 1),
            Column::new("External-IP", "string", 1),
            Column::new("OS-Image", "string", 1),
            Column::new("Kernel-Version", "string", 1),
            Column::new("Container-Runtime", "string", 1),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let status = self.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| {
                if c.status == "True" {
                    "Ready"
                } else {
                    "NotReady"
                }
            })
            .unwrap_or("Unknown");
        let mut shown = ready.to_owned();
        if self.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            shown.push_str(",SchedulingDisabled");
        }
        let roles: Vec<&str> = self
            .metadata
            .labels
            .iter()
            .flatten()
            .filter_map(|(key, _)| key.strip_prefix("node-role.kubernetes.io/"))
            .collect();
        let address = |kind: &str| {
            status
                .addresses
                .iter()
                .flatten()
                .find(|a| a.type_ == kind)
                .map_or_else(|| "<none>".to_owned(), |a| a.address.clone())
        };
        let info = status.node_info.clone().unwrap_or_default();
        vec![
            json!(shown),
            json!(if roles.is_empty() {
                "<none>".to_owned()
            } else {
                roles.join(",")
            }),
            json!(age(&self.metadata, now)),
            json!(info.kubelet_version),
            json!(address("InternalIP")),
            json!(address("ExternalIP")),
            json!(info.os_image),
            json!(info.kernel_version),
            json!(info.container_runtime_version),
        ]
    }
}

fn check_data_keys<'a>(field: &str, keys: impl Iterator<Item = &'a String>, causes: &mut Causes) {
    for key in keys {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            causes.push(Cause::invalid(
                field,
                &json!(key),
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.' \
                 (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is \
                 '[-._a-zA-Z0-9]+')",
            ));
        }
    }
}

impl Kind for ConfigMap {
    const SHORT_NAMES: &'static [&'static str] = &["cm"];

    fn validate(&self, causes: &mut Causes) {
        check_data_keys(
            "data",
            self.data.iter().flatten().map(|(key, _)| key),
            causes,
        );
        check_data_keys(
            "binaryData",
            self.binary_data.iter().flatten().map(|(key, _)| key),
            causes,
        );
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Data", "integer", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let count = self.data.as_ref().map_or(0, |d| d.len())
            + self.binary_data.as_ref().map_or(0, |d| d.len());
        vec![json!(count), json!(age(&self.metadata, now))]
    }
}

impl Kind for Secret {
    const FIELDS: &'static [&'static str] = &["type"];

    fn default_fields(&mut self) {
        self.type_.get_or_insert_with(|| "Opaque".to_owned());
        // stringData is write-only: upstream folds it into data.
        if let Some(strings) = self.string_data.take() {
            let data = self.data.get_or_insert_with(Default::default);
            for (key, value) in strings {
                data.insert(key, k8s_openapi::ByteString(value.into_bytes()));
            }
        }
    }

    fn validate(&self, causes: &mut Causes) {
        check_data_keys(
            "data",
            self.data.iter().flatten().map(|(key, _)| key),
            causes,
        );
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Type", "string", 0),
            Column::new("Data", "integer", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        vec![
            json!(self.type_.clone().unwrap_or_default()),
            json!(self.data.as_ref().map_or(0, |d| d.len())),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for ServiceAccount {
    const SHORT_NAMES: &'static [&'static str] = &["sa"];

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Secrets", "integer", 0),
            Column::new("Age", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        vec![
            json!(self.secrets.as_ref().map_or(0, Vec::len)),
            json!(age(&self.metadata, now)),
        ]
    }
}

impl Kind for Event {
    const SHORT_NAMES: &'static [&'static str] = &["ev"];
    const FIELDS: &'static [&'static str] = &[
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ];

    fn columns() -> Vec<Column> {
        vec![
            Column::new("Last Seen", "string", 0),
            Column::new("Type", "string", 0),
            Column::new("Reason", "string", 0),
            Column::new("Object", "string", 0),
            Column::new("Message", "string", 0),
        ]
    }

    fn cells(&self, now: DateTime<Utc>) -> Vec<Value> {
        let last = self
            .last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(self.event_time.as_ref().map(|t| t.0))
            .or(self.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let object = format!(
            "{}/{}",
            self.involved_object
                .kind
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            self.involved_object.name.clone().unwrap_or_default()
        );
        vec![
            json!(last.map_or_else(
                || "<unknown>".to_owned(),
                |t| crate::apiserver::table::human_duration((now - t).num_seconds())
            )),
            json!(self.type_.clone().unwrap_or_default()),
            json!(self.reason.clone().unwrap_or_default()),
            json!(object),
            json!(self.message.clone().unwrap_or_default()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resources: &[Value]) -> PodSpec {
        let containers: Vec<Value> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| json!({"name": format!("c{i}"), "resources": r}))
            .collect();
        serde_json::from_value(json!({ "containers": containers })).unwrap()
    }

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        let both = json!({"cpu": "1", "memory": "1Gi"});
        assert_eq!(qos_class(&spec(&[json!({})])), "BestEffort");
        assert_eq!(
            qos_class(&spec(&[json!({"requests": {"cpu": "100m"}})])),
            "Burstable"
        );
        assert_eq!(
            qos_class(&spec(&[json!({"requests": both, "limits": both})])),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&spec(&[
                json!({"requests": both, "limits": both}),
                json!({})
            ])),
            "Burstable",
            "a container without limits"
        );
        // Limits alone: requests default to them, as upstream.
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "resources": {"limits": both}}]},
        }))
        .unwrap();
        pod.default_fields();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(
            container
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["cpu"]
                .0,
            "1"
        );
        assert_eq!(pod.status.unwrap().qos_class.as_deref(), Some("Guaranteed"));
    }
}
