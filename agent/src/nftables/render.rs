//! The rules, as `nft -f` transactions, in one wharf-owned table:
//!
//! ```text
//! table ip wharf
//!   nat-prerouting, nat-output -> services:
//!     ip daddr . l4proto . dport vmap @service-ips        O(1) dispatch
//!     fib daddr type local: l4proto . dport vmap @service-nodeports
//!   svc-<frontend>: [mark for masquerade]
//!     numgen random mod N == 0 dnat to backend 1
//!     numgen random mod N-1 == 0 dnat to backend 2 ... dnat to backend N
//!   with session affinity instead:
//!     svc-<frontend>: [ip saddr @aff-... goto ep-...]..., then the same
//!       cascade with goto ep-...
//!     ep-<frontend>-<backend>: update @aff-... { ip saddr }, dnat
//!   nat-postrouting -> masquerading: hairpin (translated flows whose
//!     saddr . daddr is in @hairpin),
//!     and what was marked (mark bit 0x4000, kube-proxy's)
//!   filter-input/forward/output: ct state new ->
//!     vmap @no-endpoint-services / @no-endpoint-nodeports -> reject
//! ```
//!
//! One chain per frontend in the common case: nft's cost per sync grows
//! with the objects in the table (it reads them back to check a
//! transaction), so endpoints are rules, not chains, unless affinity
//! needs a place per endpoint to remember clients. Object names
//! spell out the frontend and backend (nft allows dots and long names),
//! so they are stable and readable in `nft list table`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddrV4,
};

use crate::proxy::{DesiredState, Frontend, FrontendKey, FrontendKind, TrafficPolicy};

pub const TABLE: &str = "wharf";
const SERVICE_IPS: &str = "service-ips";
const SERVICE_NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
pub const SERVICE_CHAIN: &str = "svc-";
pub const ENDPOINT_CHAIN: &str = "ep-";
pub const AFFINITY_SET: &str = "aff-";

/// The table skeleton: base chains, dispatch chains and maps. Every
/// statement is idempotent (`add` of an existing object is a no-op), and
/// the chains holding fixed rules are flushed and refilled.
const SKELETON: &str = "\
add table ip wharf
add chain ip wharf nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain ip wharf nat-output { type nat hook output priority -100; policy accept; }
add chain ip wharf nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }
add chain ip wharf filter-input { type filter hook input priority filter; policy accept; }
add chain ip wharf filter-forward { type filter hook forward priority filter; policy accept; }
add chain ip wharf filter-output { type filter hook output priority filter; policy accept; }
add chain ip wharf services
add chain ip wharf no-endpoints
add chain ip wharf reject-chain
add chain ip wharf mark-for-masquerade
add chain ip wharf masquerading
add map ip wharf service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
add map ip wharf service-nodeports { type inet_proto . inet_service : verdict; }
add map ip wharf no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }
add map ip wharf no-endpoint-nodeports { type inet_proto . inet_service : verdict; }
add set ip wharf hairpin { type ipv4_addr . ipv4_addr; }
flush chain ip wharf nat-prerouting
flush chain ip wharf nat-output
flush chain ip wharf nat-postrouting
flush chain ip wharf filter-input
flush chain ip wharf filter-forward
flush chain ip wharf filter-output
flush chain ip wharf services
flush chain ip wharf no-endpoints
flush chain ip wharf reject-chain
flush chain ip wharf mark-for-masquerade
flush chain ip wharf masquerading
flush map ip wharf service-ips
flush map ip wharf service-nodeports
flush map ip wharf no-endpoint-services
flush map ip wharf no-endpoint-nodeports
flush set ip wharf hairpin
add rule ip wharf nat-prerouting jump services
add rule ip wharf nat-output jump services
add rule ip wharf nat-postrouting jump masquerading
add rule ip wharf filter-input ct state new jump no-endpoints
add rule ip wharf filter-forward ct state new jump no-endpoints
add rule ip wharf filter-output ct state new jump no-endpoints
add rule ip wharf services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip wharf services ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @service-nodeports
add rule ip wharf no-endpoints ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip wharf no-endpoints fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip wharf reject-chain reject
add rule ip wharf mark-for-masquerade meta mark set meta mark or 0x4000
add rule ip wharf masquerading ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random
add rule ip wharf masquerading meta mark & 0x4000 == 0 return
add rule ip wharf masquerading meta mark set meta mark xor 0x4000
add rule ip wharf masquerading masquerade fully-random
";

/// A per-frontend object: a chain or an affinity set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Chain(String),
    Set(String),
}

fn protocol(key: &FrontendKey) -> String {
    key.protocol.to_string().to_lowercase()
}

fn frontend_name(key: &FrontendKey) -> String {
    format!("{}-{}-{}", key.address, protocol(key), key.port)
}

pub fn service_chain(key: &FrontendKey) -> String {
    format!("{SERVICE_CHAIN}{}", frontend_name(key))
}

fn endpoint_name(key: &FrontendKey, backend: SocketAddrV4) -> String {
    format!("{}-{}-{}", frontend_name(key), backend.ip(), backend.port())
}

fn endpoint_chain(key: &FrontendKey, backend: SocketAddrV4) -> String {
    format!("{ENDPOINT_CHAIN}{}", endpoint_name(key, backend))
}

/// The affinity set names its timeout: a changed timeout is a new set
/// (older nft cannot change a set's timeout in place).
fn affinity_set(key: &FrontendKey, backend: SocketAddrV4, seconds: u32) -> String {
    format!("{AFFINITY_SET}{seconds}-{}", endpoint_name(key, backend))
}

fn active(frontend: &Frontend) -> Vec<SocketAddrV4> {
    frontend
        .active()
        .map(|b| SocketAddrV4::new(b.address, b.port))
        .collect()
}

/// The objects `frontend` needs: none without backends (a reject verdict
/// stands in), else its service chain and, with affinity, a chain and a
/// set per backend.
pub fn objects_of(key: &FrontendKey, frontend: &Frontend) -> BTreeSet<Object> {
    let backends = active(frontend);
    if backends.is_empty() {
        return BTreeSet::new();
    }
    let mut objects = BTreeSet::from([Object::Chain(service_chain(key))]);
    if let Some(seconds) = frontend.affinity_timeout {
        for backend in backends {
            objects.insert(Object::Chain(endpoint_chain(key, backend)));
            objects.insert(Object::Set(affinity_set(key, backend, seconds)));
        }
    }
    objects
}

/// The `hairpin` set's elements for these frontends: every backend that
/// takes new flows, paired with itself (a backend reaching itself through
/// a service is masqueraded, or it would answer itself directly).
pub fn hairpins<'a>(frontends: impl Iterator<Item = &'a Frontend>) -> BTreeSet<std::net::Ipv4Addr> {
    frontends
        .flat_map(|f| f.active().map(|b| b.address))
        .collect()
}

/// The map element that dispatches (or rejects) `key`.
fn element(key: &FrontendKey, frontend: &Frontend) -> (&'static str, String, String) {
    let node_port = frontend.kind == FrontendKind::NodePort;
    let has_backends = frontend.active().next().is_some();
    let map = match (node_port, has_backends) {
        (false, true) => SERVICE_IPS,
        (true, true) => SERVICE_NODEPORTS,
        (false, false) => NO_ENDPOINT_SERVICES,
        (true, false) => NO_ENDPOINT_NODEPORTS,
    };
    let selector = if node_port {
        format!("{} . {}", protocol(key), key.port)
    } else {
        format!("{} . {} . {}", key.address, protocol(key), key.port)
    };
    let verdict = if has_backends {
        format!("goto {}", service_chain(key))
    } else {
        "goto reject-chain".to_string()
    };
    (map, selector, verdict)
}

/// One `nft -f` transaction.
#[derive(Debug)]
pub struct Plan<'a> {
    pub desired: &'a DesiredState,
    /// Frontends as they were programmed before, for element and object
    /// changes (empty on a full sync: the maps are flushed).
    pub previous: &'a crate::proxy::Programmed,
    /// Frontends whose objects and element are (re)written.
    pub rewrite: &'a BTreeSet<FrontendKey>,
    /// Frontends to remove (their elements; objects are in `delete`).
    pub remove: &'a BTreeSet<FrontendKey>,
    /// Per-frontend objects to delete.
    pub delete: &'a BTreeSet<Object>,
    /// Per-frontend objects that exist now: rewritten chains among them
    /// are flushed first; new ones need no flush.
    pub existing: &'a BTreeSet<Object>,
    /// Hairpin set elements to add and to remove (a full sync flushes the
    /// set, so it only adds).
    pub hairpin_add: &'a BTreeSet<std::net::Ipv4Addr>,
    pub hairpin_remove: &'a BTreeSet<std::net::Ipv4Addr>,
    /// Rewrite the skeleton (and so every element) too.
    pub full: bool,
}

impl Plan<'_> {
    /// The transaction, and how many statements it holds.
    pub fn render(&self) -> (String, usize) {
        let mut out = String::new();
        if self.full {
            out.push_str(SKELETON);
        }
        // 1. Objects exist before anything refers to them.
        for key in self.rewrite {
            for object in objects_of(key, &self.desired.frontends[key]) {
                match object {
                    Object::Chain(name) => {
                        let _ = writeln!(out, "add chain ip {TABLE} {name}");
                        if self.existing.contains(&Object::Chain(name.clone())) {
                            let _ = writeln!(out, "flush chain ip {TABLE} {name}");
                        }
                    }
                    Object::Set(name) => {
                        let seconds = self.desired.frontends[key].affinity_timeout.unwrap_or(0);
                        let _ = writeln!(
                            out,
                            "add set ip {TABLE} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {seconds}s; }}"
                        );
                    }
                }
            }
        }
        // 2. Rules.
        for key in self.rewrite {
            render_frontend(&mut out, key, &self.desired.frontends[key]);
        }
        // 3. Elements: old ones out, new ones in (a full sync flushed the
        // maps, so everything goes in), one statement per map: nft's cost
        // is per statement more than per element.
        let mut removed: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut added: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for key in self.remove.iter().chain(self.rewrite) {
            if self.full {
                break;
            }
            let Some(old) = self.previous.get(key) else {
                continue;
            };
            let (map, selector, _) = element(key, old);
            let kept = self
                .desired
                .frontends
                .get(key)
                .is_some_and(|new| element(key, new).0 == map);
            if !kept {
                removed.entry(map).or_default().push(selector);
            }
        }
        for key in self.rewrite {
            let new = &self.desired.frontends[key];
            let (map, selector, verdict) = element(key, new);
            let present = !self.full
                && self
                    .previous
                    .get(key)
                    .is_some_and(|old| element(key, old).0 == map);
            if !present {
                added
                    .entry(map)
                    .or_default()
                    .push(format!("{selector} : {verdict}"));
            }
        }
        let pairs = |addresses: &BTreeSet<std::net::Ipv4Addr>| -> Vec<String> {
            addresses.iter().map(|a| format!("{a} . {a}")).collect()
        };
        removed.insert("hairpin", pairs(self.hairpin_remove));
        added.insert("hairpin", pairs(self.hairpin_add));
        for (verb, elements) in [("delete", &removed), ("add", &added)] {
            for (map, elements) in elements.iter().filter(|(_, e)| !e.is_empty()) {
                let _ = writeln!(
                    out,
                    "{verb} element ip {TABLE} {map} {{ {} }}",
                    elements.join(", ")
                );
            }
        }
        // 4. What nothing refers to any more: chains emptied first (they
        // may refer to each other), then deleted, then their sets.
        for object in self.delete {
            if let Object::Chain(name) = object {
                let _ = writeln!(out, "flush chain ip {TABLE} {name}");
            }
        }
        for object in self.delete {
            if let Object::Chain(name) = object {
                let _ = writeln!(out, "delete chain ip {TABLE} {name}");
            }
        }
        for object in self.delete {
            if let Object::Set(name) = object {
                let _ = writeln!(out, "delete set ip {TABLE} {name}");
            }
        }
        let statements = out.lines().count();
        (out, statements)
    }
}

fn render_frontend(out: &mut String, key: &FrontendKey, frontend: &Frontend) {
    let backends = active(frontend);
    if backends.is_empty() {
        return;
    }
    let chain = service_chain(key);
    let protocol = protocol(key);
    // External clients are masqueraded so replies come back through this
    // node (Cluster policy); Local keeps their address.
    if frontend.kind != FrontendKind::ClusterIp && frontend.policy == TrafficPolicy::Cluster {
        let _ = writeln!(out, "add rule ip {TABLE} {chain} jump mark-for-masquerade");
    }
    // A client seen within the affinity timeout goes where it went.
    if let Some(seconds) = frontend.affinity_timeout {
        for backend in &backends {
            let _ = writeln!(
                out,
                "add rule ip {TABLE} {chain} ip saddr @{} goto {}",
                affinity_set(key, *backend, seconds),
                endpoint_chain(key, *backend)
            );
        }
    }
    // Spreading: rule i takes 1/(n-i) of what the rules before it left,
    // so each backend gets 1/n, as iptables' statistic cascade does. Plain
    // rules, not `numgen ... map { }`: nft 1.0.6 allocates anonymous maps
    // in time quadratic in their number (10k services: 50 s, not 4 s).
    let count = backends.len();
    for (index, backend) in backends.iter().enumerate() {
        let draw = match count - index {
            1 => String::new(),
            remaining => format!("numgen random mod {remaining} == 0 "),
        };
        let action = match frontend.affinity_timeout {
            Some(_) => format!("goto {}", endpoint_chain(key, *backend)),
            None => format!("meta l4proto {protocol} dnat ip to {backend}"),
        };
        let _ = writeln!(out, "add rule ip {TABLE} {chain} {draw}{action}");
    }
    let Some(seconds) = frontend.affinity_timeout else {
        return;
    };
    for backend in backends {
        let endpoint = endpoint_chain(key, backend);
        let _ = writeln!(
            out,
            "add rule ip {TABLE} {endpoint} update @{} {{ ip saddr }}",
            affinity_set(key, backend, seconds)
        );
        let _ = writeln!(
            out,
            "add rule ip {TABLE} {endpoint} meta l4proto {protocol} dnat to {backend}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::proxy::{Backend, BackendState, Programmed, Protocol, ServicePortName};

    fn frontend(kind: FrontendKind, backends: &[u8]) -> Frontend {
        Frontend {
            kind,
            service: ServicePortName::default(),
            backends: backends
                .iter()
                .map(|host| Backend {
                    address: Ipv4Addr::new(10, 244, 0, *host),
                    port: 8080,
                    state: BackendState::Active,
                })
                .collect(),
            affinity_timeout: None,
            policy: TrafficPolicy::Cluster,
        }
    }

    const VIP: FrontendKey = FrontendKey {
        address: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        protocol: Protocol::Tcp,
    };

    #[test]
    fn a_frontend_losing_its_last_backend_moves_to_the_reject_map() {
        let previous: Programmed = [(VIP, frontend(FrontendKind::ClusterIp, &[1]))].into();
        let mut desired = DesiredState::default();
        desired
            .frontends
            .insert(VIP, frontend(FrontendKind::ClusterIp, &[]));
        let delete = objects_of(&VIP, &previous[&VIP]);
        let (script, _) = Plan {
            desired: &desired,
            previous: &previous,
            rewrite: &[VIP].into(),
            remove: &BTreeSet::new(),
            delete: &delete,
            existing: &delete,
            hairpin_add: &BTreeSet::new(),
            hairpin_remove: &[Ipv4Addr::new(10, 244, 0, 1)].into(),
            full: false,
        }
        .render();
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(
            lines,
            [
                "delete element ip wharf hairpin { 10.244.0.1 . 10.244.0.1 }",
                "delete element ip wharf service-ips { 10.96.0.10 . tcp . 80 }",
                "add element ip wharf no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }",
                "flush chain ip wharf svc-10.96.0.10-tcp-80",
                "delete chain ip wharf svc-10.96.0.10-tcp-80",
            ]
        );
    }

    #[test]
    fn affinity_and_masquerade_follow_the_frontend() {
        let mut desired = DesiredState::default();
        let node_port = FrontendKey {
            address: Ipv4Addr::UNSPECIFIED,
            port: 30080,
            ..VIP
        };
        let mut sticky = frontend(FrontendKind::NodePort, &[1, 2]);
        sticky.affinity_timeout = Some(30);
        desired.frontends.insert(node_port, sticky);
        desired
            .frontends
            .insert(VIP, frontend(FrontendKind::ClusterIp, &[1, 2]));
        let (script, _) = Plan {
            desired: &desired,
            previous: &Programmed::new(),
            rewrite: &[node_port, VIP].into(),
            remove: &BTreeSet::new(),
            delete: &BTreeSet::new(),
            existing: &BTreeSet::new(),
            hairpin_add: &hairpins(desired.frontends.values()),
            hairpin_remove: &BTreeSet::new(),
            full: true,
        }
        .render();
        assert!(script.starts_with("add table ip wharf\n"));
        for line in [
            "add set ip wharf aff-30-0.0.0.0-tcp-30080-10.244.0.2-8080 { type ipv4_addr; flags dynamic,timeout; timeout 30s; }",
            "add rule ip wharf svc-0.0.0.0-tcp-30080 jump mark-for-masquerade",
            "add rule ip wharf svc-0.0.0.0-tcp-30080 ip saddr @aff-30-0.0.0.0-tcp-30080-10.244.0.1-8080 goto ep-0.0.0.0-tcp-30080-10.244.0.1-8080",
            "add rule ip wharf svc-0.0.0.0-tcp-30080 numgen random mod 2 == 0 goto ep-0.0.0.0-tcp-30080-10.244.0.1-8080",
            "add rule ip wharf svc-0.0.0.0-tcp-30080 goto ep-0.0.0.0-tcp-30080-10.244.0.2-8080",
            "add rule ip wharf ep-0.0.0.0-tcp-30080-10.244.0.2-8080 update @aff-30-0.0.0.0-tcp-30080-10.244.0.2-8080 { ip saddr }",
            "add rule ip wharf ep-0.0.0.0-tcp-30080-10.244.0.2-8080 meta l4proto tcp dnat to 10.244.0.2:8080",
            "add element ip wharf service-nodeports { tcp . 30080 : goto svc-0.0.0.0-tcp-30080 }",
            "add rule ip wharf svc-10.96.0.10-tcp-80 numgen random mod 2 == 0 meta l4proto tcp dnat ip to 10.244.0.1:8080",
            "add rule ip wharf svc-10.96.0.10-tcp-80 meta l4proto tcp dnat ip to 10.244.0.2:8080",
            "add element ip wharf hairpin { 10.244.0.1 . 10.244.0.1, 10.244.0.2 . 10.244.0.2 }",
        ] {
            assert!(script.contains(line), "missing {line:?} in\n{script}");
        }
    }
}
