//! Services + EndpointSlices -> `DesiredState`, as kube-proxy reads them:
//! - a service port's endpoints are the EndpointSlice ports of the same
//!   name (and protocol) in slices labelled `kubernetes.io/service-name`;
//! - an endpoint is active when `ready` (unset means ready), terminating
//!   when not ready but `serving`; anything else is left out;
//! - frontends: the ClusterIP(s), the NodePort (NodePort and LoadBalancer
//!   types), `externalIPs` and load-balancer ingress IPs, each per port;
//! - `sessionAffinity: ClientIP` sets the frontends' affinity timeout
//!   (`sessionAffinityConfig`, default 10800 s);
//! - a `Local` traffic policy (internal for ClusterIPs, external for the
//!   rest) keeps only the endpoints whose `nodeName` is this node;
//! - topology-aware routing (`service.kubernetes.io/topology-mode: Auto`
//!   or `trafficDistribution: PreferClose`) sends new flows of `Cluster`
//!   frontends only to the endpoints hinted for this node's zone, when
//!   every ready endpoint has hints and one is for this zone;
//! - headless services (`clusterIP: None`) and services without a
//!   selector-less IPv4 address get no frontends; SCTP and IPv6 are
//!   skipped (the dataplane is IPv4 TCP/UDP).

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::proxy::{
    Backend, BackendState, DesiredState, Frontend, FrontendKey, FrontendKind, Protocol,
    ServicePortName, TrafficPolicy,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("{object}: {field}: {reason}")]
    Invalid {
        object: String,
        field: &'static str,
        reason: String,
    },
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// The node label naming its zone, which topology-aware routing matches
/// against EndpointSlice hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Where this node is, as far as choosing backends goes: its name (for
/// `Local` traffic policies) and its zone (for topology-aware routing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub node: String,
    pub zone: Option<String>,
}

impl Locality {
    /// A node with no zone: topology hints never apply.
    pub fn node(name: &str) -> Self {
        Self {
            node: name.to_string(),
            zone: None,
        }
    }
}

/// The desired state built from what was valid, and why the rest was left
/// out. A service is taken whole or not at all.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    /// In namespace/name order of the services they reject.
    pub rejected: Vec<TranslateError>,
}

/// Builds the desired state from every Service and EndpointSlice,
/// refusing the lot if any service is invalid: for manifests, where a
/// partial state would quietly drop services still meant to exist.
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    here: &Locality,
) -> Result<DesiredState, TranslateError> {
    let Translation { state, rejected } = translate(services, slices, here);
    match rejected.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(state),
    }
}

/// Builds the desired state from every Service and EndpointSlice, leaving
/// out the services that cannot be forwarded: for an API server's
/// objects, where one bad service must not freeze every other.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    here: &Locality,
) -> Translation {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        if slice.address_type != "IPv4" {
            continue;
        }
        by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }

    // Two Services may claim one frontend (the API allows the same
    // externalIP and port twice). The first by namespace/name keeps it,
    // whatever order the manifests came in, and the other is warned about:
    // failing the whole state would freeze every other service.
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by_key(|s| {
        let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
        (namespace.to_string(), s.metadata.name.clone())
    });
    let mut translation = Translation::default();
    for service in services {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let slices = by_service
            .get(&(namespace.to_string(), name.to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let object = format!("Service {namespace}/{name}");
        match service_frontends(service, &object, slices, here) {
            Ok(frontends) => {
                for (key, frontend) in frontends {
                    insert(&mut translation.state, &object, key, frontend);
                }
            }
            Err(error) => translation.rejected.push(error),
        }
    }
    translation
}

/// One service's frontends, or why it has none.
fn service_frontends(
    service: &Service,
    object: &str,
    slices: &[&EndpointSlice],
    here: &Locality,
) -> Result<Vec<(FrontendKey, Frontend)>, TranslateError> {
    let namespace = service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = service.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid(object, "metadata.name", "must be set"));
    }
    let mut frontends = Vec::new();
    let Some(spec) = &service.spec else {
        return Ok(frontends);
    };
    let cluster_ips = cluster_ips(object, spec)?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Ok(frontends);
    }
    let affinity_timeout = affinity_timeout(object, spec)?;
    let internal = policy(
        object,
        "spec.internalTrafficPolicy",
        &spec.internal_traffic_policy,
    )?;
    let external = policy(
        object,
        "spec.externalTrafficPolicy",
        &spec.external_traffic_policy,
    )?;
    let prefers_zone = prefers_same_zone(service);
    let mut external_ips: Vec<(Ipv4Addr, FrontendKind)> = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        if let Some(address) = ipv4(object, "spec.externalIPs", ip)? {
            external_ips.push((address, FrontendKind::ExternalIp));
        }
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for ip in ingress
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ip.as_ref())
    {
        if let Some(address) = ipv4(object, "status.loadBalancer.ingress.ip", ip)? {
            external_ips.push((address, FrontendKind::LoadBalancer));
        }
    }

    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => continue,
            other => {
                return Err(invalid(
                    object,
                    "spec.ports.protocol",
                    format!("unknown protocol {other:?}"),
                ));
            }
        };
        let service_port = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    object,
                    "spec.ports.port",
                    format!("{} is not a port", port.port),
                )
            })?;
        let port_name = port.name.clone().unwrap_or_default();
        let endpoints = endpoints(slices, &port_name, protocol, &here.node)?;
        let zone = here
            .zone
            .as_deref()
            .filter(|zone| prefers_zone && covers_zone(&endpoints, zone));
        let frontend = |kind| {
            let policy = if kind == FrontendKind::ClusterIp {
                internal
            } else {
                external
            };
            Frontend {
                kind,
                service: ServicePortName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port: port_name.clone(),
                },
                backends: backends(&endpoints, policy, zone),
                affinity_timeout,
                policy,
            }
        };
        let mut add = |address: Ipv4Addr, port: u16, kind| {
            let key = FrontendKey {
                address,
                port,
                protocol,
            };
            frontends.push((key, frontend(kind)));
        };
        for address in &cluster_ips {
            add(*address, service_port, FrontendKind::ClusterIp);
        }
        for (address, kind) in &external_ips {
            add(*address, service_port, *kind);
        }
        if matches!(service_type, "NodePort" | "LoadBalancer")
            && let Some(node_port) = port.node_port
        {
            let node_port = u16::try_from(node_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    invalid(
                        object,
                        "spec.ports.nodePort",
                        format!("{node_port} is not a port"),
                    )
                })?;
            add(Ipv4Addr::UNSPECIFIED, node_port, FrontendKind::NodePort);
        }
    }
    Ok(frontends)
}

/// Adds a frontend; of two claims on one, the stronger kind keeps it
/// (see `claim_rank`), and between equal kinds the first service by
/// namespace/name (the caller's order).
fn insert(state: &mut DesiredState, object: &str, key: FrontendKey, frontend: Frontend) {
    match state.frontends.get(&key) {
        None => {
            state.frontends.insert(key, frontend);
        }
        Some(other) if claim_rank(other.kind) <= claim_rank(frontend.kind) => tracing::warn!(
            frontend = %key,
            kept = %other.service,
            "{object} claims a frontend another service already has; ignoring its claim"
        ),
        Some(other) => {
            tracing::warn!(
                frontend = %key,
                ignored = %other.service,
                "{object} has a stronger claim to a frontend another service also claims"
            );
            state.frontends.insert(key, frontend);
        }
    }
}

/// ClusterIPs and NodePorts are allocated by the API server, so they are
/// unique; externalIPs and load-balancer IPs are written by users and may
/// name someone else's ClusterIP (the CVE-2020-8554 pattern). So those
/// never take a frontend from the allocated kinds.
fn claim_rank(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => 0,
        FrontendKind::NodePort => 1,
        FrontendKind::LoadBalancer => 2,
        FrontendKind::ExternalIp => 3,
    }
}

fn affinity_timeout(
    object: &str,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Option<u32>, TranslateError> {
    match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => Ok(None),
        "ClientIP" => {
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            // The API allows 1..=86400.
            match u32::try_from(seconds) {
                Ok(seconds @ 1..=86_400) => Ok(Some(seconds)),
                _ => Err(invalid(
                    object,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{seconds} is not in 1..=86400"),
                )),
            }
        }
        other => Err(invalid(
            object,
            "spec.sessionAffinity",
            format!("unknown affinity {other:?}"),
        )),
    }
}

fn policy(
    object: &str,
    field: &'static str,
    value: &Option<String>,
) -> Result<TrafficPolicy, TranslateError> {
    match value.as_deref() {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(invalid(object, field, format!("unknown policy {other:?}"))),
    }
}

fn cluster_ips(
    object: &str,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<Vec<Ipv4Addr>, TranslateError> {
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_ref());
    }
    let mut out = Vec::new();
    for ip in ips {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        if let Some(address) = ipv4(object, "spec.clusterIP", ip)? {
            out.push(address);
        }
    }
    Ok(out)
}

/// Parses an address, skipping IPv6 (valid, but not this dataplane's).
fn ipv4(object: &str, field: &'static str, text: &str) -> Result<Option<Ipv4Addr>, TranslateError> {
    match text.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(address)) => Ok(Some(address)),
        Ok(std::net::IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(invalid(
            object,
            field,
            format!("{text:?} is not an IP address"),
        )),
    }
}

/// A service port's endpoint, as this node sees it.
#[derive(Debug)]
struct Endpoint {
    backend: Backend,
    /// Runs on this node.
    local: bool,
    /// The zones its slice hints it for (`hints.forZones`).
    zones: Vec<String>,
}

/// A service port's endpoints, by address and port.
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    node: &str,
) -> Result<Vec<Endpoint>, TranslateError> {
    let mut out: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let object = format!(
            "EndpointSlice {}/{}",
            slice.metadata.namespace.as_deref().unwrap_or("default"),
            slice.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
        }) else {
            continue;
        };
        let Some(number) = port.port else { continue };
        let number = u16::try_from(number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(&object, "ports.port", format!("{number} is not a port")))?;
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // Unset `ready` means ready (discovery/v1 API doc).
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let state = match (ready, serving) {
                (true, _) => BackendState::Active,
                (false, true) => BackendState::Terminating,
                (false, false) => continue,
            };
            let local = endpoint.node_name.as_deref() == Some(node);
            let zones: Vec<String> = endpoint
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| z.name.clone())
                .collect();
            for address in &endpoint.addresses {
                let Some(address) = ipv4(&object, "endpoints.addresses", address)? else {
                    continue;
                };
                // The same endpoint in two slices (mid-migration): active wins.
                out.entry((address, number))
                    .and_modify(|e| {
                        if state == BackendState::Active {
                            e.backend.state = state;
                        }
                    })
                    .or_insert_with(|| Endpoint {
                        backend: Backend {
                            address,
                            port: number,
                            state,
                        },
                        local,
                        zones: zones.clone(),
                    });
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Whether a service asks for topology-aware routing, as kube-proxy
/// reads it: the `service.kubernetes.io/topology-mode` annotation (or the
/// deprecated `topology-aware-hints`, which wins when both are set) is
/// `Auto`, or `spec.trafficDistribution` is `PreferClose` (or its 1.33
/// synonym `PreferSameZone`).
fn prefers_same_zone(service: &Service) -> bool {
    let annotations = service.metadata.annotations.as_ref();
    let mode = annotations.and_then(|a| {
        a.get("service.kubernetes.io/topology-aware-hints")
            .or_else(|| a.get("service.kubernetes.io/topology-mode"))
    });
    matches!(mode.map(String::as_str), Some("Auto" | "auto"))
        || service
            .spec
            .as_ref()
            .and_then(|s| s.traffic_distribution.as_deref())
            .is_some_and(|d| matches!(d, "PreferClose" | "PreferSameZone"))
}

/// Whether zone hints can be followed for `zone`: only when every ready
/// endpoint carries hints (the EndpointSlice controller set them all, or
/// none is trusted) and at least one is meant for this zone, so following
/// them never leaves the zone without a backend.
fn covers_zone(endpoints: &[Endpoint], zone: &str) -> bool {
    let ready: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| e.backend.state == BackendState::Active)
        .collect();
    ready.iter().all(|e| !e.zones.is_empty())
        && ready.iter().any(|e| e.zones.iter().any(|z| z == zone))
}

/// A frontend's backends under its traffic policy: `Local` keeps this
/// node's endpoints; `Cluster` keeps all, and when zone hints are followed
/// (`zone`), the ready endpoints meant for other zones stay only for the
/// flows they already have.
fn backends(endpoints: &[Endpoint], policy: TrafficPolicy, zone: Option<&str>) -> Vec<Backend> {
    endpoints
        .iter()
        .filter(|e| e.local || policy == TrafficPolicy::Cluster)
        .map(|e| {
            let mut backend = e.backend;
            if policy == TrafficPolicy::Cluster
                && let Some(zone) = zone
                && !e.zones.iter().any(|z| z == zone)
            {
                backend.state = BackendState::Terminating;
            }
            backend
        })
        .collect()
}

fn invalid(object: &str, field: &'static str, reason: impl Into<String>) -> TranslateError {
    TranslateError::Invalid {
        object: object.to_string(),
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "node-a";

    fn here() -> Locality {
        Locality::node(NODE)
    }

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn web_service(extra: &str) -> Service {
        parse(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP{extra}}}
  - {{name: dns, port: 53, protocol: UDP}}
"#
        ))
    }

    fn web_slice() -> EndpointSlice {
        parse(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.1.2]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.0.1.3]
  nodeName: node-b
- addresses: [10.0.1.4]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.0.1.5]
  conditions: {ready: false, serving: false}
"#,
        )
    }

    fn key(address: [u8; 4], port: u16, protocol: Protocol) -> FrontendKey {
        FrontendKey {
            address: Ipv4Addr::from(address),
            port,
            protocol,
        }
    }

    #[test]
    fn cluster_ip_ports_map_to_named_endpoint_ports() {
        let state = desired_state(&[web_service("")], &[web_slice()], &here()).unwrap();
        let http = &state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(http.kind, FrontendKind::ClusterIp);
        assert_eq!(http.service.to_string(), "demo/web:http");
        let got: Vec<_> = http
            .backends
            .iter()
            .map(|b| (b.address.octets()[3], b.port, b.state))
            .collect();
        assert_eq!(
            got,
            [
                (2, 8080, BackendState::Active),
                (3, 8080, BackendState::Active),
                (4, 8080, BackendState::Terminating)
            ]
        );
        let dns = &state.frontends[&key([10, 96, 0, 10], 53, Protocol::Udp)];
        assert!(dns.backends.iter().all(|b| b.port == 5353));
        assert_eq!(state.frontends.len(), 2);
    }

    #[test]
    fn node_port_only_for_node_port_types() {
        let mut service = web_service(", nodePort: 30080");
        let state = desired_state(std::slice::from_ref(&service), &[web_slice()], &here()).unwrap();
        assert!(
            !state
                .frontends
                .contains_key(&key([0, 0, 0, 0], 30080, Protocol::Tcp))
        );
        service.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        let state = desired_state(&[service], &[web_slice()], &here()).unwrap();
        assert_eq!(
            state.frontends[&key([0, 0, 0, 0], 30080, Protocol::Tcp)].kind,
            FrontendKind::NodePort
        );
    }

    #[test]
    fn headless_and_unlabelled_have_nothing_to_forward() {
        let mut service = web_service("");
        service.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(
            desired_state(&[service], &[web_slice()], &here())
                .unwrap()
                .frontends
                .is_empty()
        );
        let mut slice = web_slice();
        slice.metadata.labels = None;
        let state = desired_state(&[web_service("")], &[slice], &here()).unwrap();
        assert!(state.frontends.values().all(|f| f.backends.is_empty()));
    }

    #[test]
    fn bad_addresses_are_reported_with_the_object_and_conflicts_resolved() {
        let mut service = web_service("");
        service.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.300".into());
        let error = desired_state(&[service], &[], &here()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("Service demo/web: spec.clusterIP"),
            "{error}"
        );

        // A frontend claimed twice goes to the first service by name,
        // whatever the order, and the rest of the state stands.
        let mut twin = web_service("");
        twin.metadata.name = Some("twin".into());
        for services in [
            [web_service(""), twin.clone()],
            [twin.clone(), web_service("")],
        ] {
            let state = desired_state(&services, &[], &here()).unwrap();
            assert_eq!(
                state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)]
                    .service
                    .name,
                "twin"
            );
        }

        // An externalIP naming another service's ClusterIP never takes it,
        // however the names sort (CVE-2020-8554).
        let mut squatter = web_service("");
        squatter.metadata.name = Some("aaa".into());
        let spec = squatter.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.99".into());
        spec.external_ips = Some(vec!["10.96.0.10".into()]);
        let state = desired_state(&[squatter, web_service("")], &[], &here()).unwrap();
        let claimed = &state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(
            (claimed.service.name.as_str(), claimed.kind),
            ("web", FrontendKind::ClusterIp)
        );
    }

    #[test]
    fn affinity_and_local_policies_shape_the_frontends() {
        let mut service = web_service(", nodePort: 30080");
        let spec = service.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.session_affinity = Some("ClientIP".into());
        spec.external_traffic_policy = Some("Local".into());
        let state = desired_state(std::slice::from_ref(&service), &[web_slice()], &here()).unwrap();
        let cluster_ip = &state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(cluster_ip.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(cluster_ip.policy, TrafficPolicy::Cluster);
        assert_eq!(cluster_ip.backends.len(), 3, "internal policy is Cluster");
        let node_port = &state.frontends[&key([0, 0, 0, 0], 30080, Protocol::Tcp)];
        assert_eq!(node_port.policy, TrafficPolicy::Local);
        let local: Vec<_> = node_port.backends.iter().map(|b| b.address).collect();
        assert_eq!(
            local,
            [Ipv4Addr::new(10, 0, 1, 2)],
            "only node-a's endpoint"
        );

        // internalTrafficPolicy Local on another node: nothing local.
        let spec = service.spec.as_mut().unwrap();
        spec.internal_traffic_policy = Some("Local".into());
        spec.session_affinity_config = Some(k8s_openapi::api::core::v1::SessionAffinityConfig {
            client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let state = desired_state(
            std::slice::from_ref(&service),
            &[web_slice()],
            &Locality::node("node-c"),
        )
        .unwrap();
        let cluster_ip = &state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert!(cluster_ip.backends.is_empty());
        assert_eq!(cluster_ip.affinity_timeout, Some(60));

        service.spec.as_mut().unwrap().external_traffic_policy = Some("Nearby".into());
        let error = desired_state(&[service], &[], &here()).unwrap_err();
        assert!(
            error.to_string().contains("externalTrafficPolicy"),
            "{error}"
        );
    }

    #[test]
    fn translate_leaves_out_only_the_invalid_service() {
        let mut bad = web_service("");
        bad.metadata.name = Some("bad".into());
        bad.spec.as_mut().unwrap().session_affinity = Some("Sometimes".into());
        let translation = translate(&[bad, web_service("")], &[web_slice()], &here());
        assert_eq!(translation.state.frontends.len(), 2, "web stands");
        assert_eq!(translation.rejected.len(), 1);
        assert!(
            translation.rejected[0]
                .to_string()
                .starts_with("Service demo/bad: spec.sessionAffinity"),
            "{}",
            translation.rejected[0]
        );
    }

    /// web's slice with zone hints: .2 for zone-a, .3 for zone-b.
    fn hinted_slice() -> EndpointSlice {
        let mut slice = web_slice();
        for (endpoint, zone) in slice.endpoints.iter_mut().zip(["zone-a", "zone-b"]) {
            endpoint.hints = Some(k8s_openapi::api::discovery::v1::EndpointHints {
                for_zones: Some(vec![k8s_openapi::api::discovery::v1::ForZone {
                    name: zone.into(),
                }]),
            });
        }
        slice
    }

    fn active(state: &DesiredState) -> Vec<u8> {
        state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)]
            .active()
            .map(|b| b.address.octets()[3])
            .collect()
    }

    #[test]
    fn zone_hints_are_followed_only_when_asked_for_and_safe() {
        let in_zone = |zone: &str| Locality {
            node: NODE.into(),
            zone: Some(zone.into()),
        };
        let mut service = web_service("");
        // Hints, but the service did not ask: every ready endpoint.
        let state = desired_state(
            std::slice::from_ref(&service),
            &[hinted_slice()],
            &in_zone("zone-a"),
        )
        .unwrap();
        assert_eq!(active(&state), [2, 3]);

        service.metadata.annotations = Some(
            [(
                "service.kubernetes.io/topology-mode".to_string(),
                "Auto".to_string(),
            )]
            .into(),
        );
        let state = desired_state(
            std::slice::from_ref(&service),
            &[hinted_slice()],
            &in_zone("zone-a"),
        )
        .unwrap();
        assert_eq!(
            active(&state),
            [2],
            "only zone-a's endpoint takes new flows"
        );
        let http = &state.frontends[&key([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(http.backends.len(), 3, "zone-b's keeps its open flows");

        // A zone nobody is hinted for, a node without a zone, or an
        // endpoint without hints: hints are not followed.
        for (slice, here) in [
            (hinted_slice(), in_zone("zone-c")),
            (hinted_slice(), here()),
            (web_slice(), in_zone("zone-a")),
        ] {
            let state = desired_state(std::slice::from_ref(&service), &[slice], &here).unwrap();
            assert_eq!(active(&state), [2, 3], "{here:?}");
        }

        // trafficDistribution: PreferClose asks too.
        service.metadata.annotations = None;
        service.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
        let state = desired_state(&[service], &[hinted_slice()], &in_zone("zone-b")).unwrap();
        assert_eq!(active(&state), [3]);
    }
}
