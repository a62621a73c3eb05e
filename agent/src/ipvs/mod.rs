//! The IPVS proxy mode, kube-proxy's layout: a virtual server per
//! ClusterIP, external IP and load-balancer IP port, and per node address
//! for each NodePort; a real server per endpoint (weight 0 while it
//! terminates: its connections go on, new ones go elsewhere), programmed
//! through the kernel's IPVS generic-netlink family. Service addresses are
//! bound to a dummy device so the node accepts their packets. IPVS
//! itself answers a virtual server without real servers with ICMP port
//! unreachable. A small nftables table masquerades external NodePort
//! traffic (Cluster policy) and hairpin connections.

mod kernel;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use tracing::info;

use kernel::{Ipvs, RealServer, Scheduling, VirtualKey};
pub use kernel::{IpvsError, Kernel};

use crate::{
    conntrack::ConntrackError,
    host::{ExecError, Host, System},
    proxy::{
        Changes, DesiredState, Forwarding, Frontend, FrontendKey, FrontendKind, Programmed,
        Protocol, ServiceProxy, StaleFlows, SyncStats, TrafficPolicy, commit,
    },
};

/// The dummy device holding service addresses (kube-proxy's kube-ipvs0).
pub const DEVICE: &str = "wharf-ipvs0";
/// The nftables table with the masquerade rules IPVS needs.
const TABLE: &str = "wharf-ipvs";

/// IPVS sysctls kube-proxy sets too: let netfilter see IPVS connections
/// (so masquerading works), and drop connections whose real server was
/// removed at their next packet instead of black-holing them.
const SYSCTLS: [(&str, &str); 3] = [
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
];

#[derive(Debug, thiserror::Error)]
pub enum IpvsProxyError {
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    #[error(transparent)]
    Tool(#[from] ExecError),
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    #[error("setting {key}: {source}")]
    Sysctl {
        key: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip -j addr show {DEVICE}` printed JSON that does not parse: {0}")]
    Json(#[from] serde_json::Error),
}

/// A virtual server as programmed: scheduling and real servers by address.
type Virtual = (Scheduling, BTreeMap<SocketAddrV4, u32>);

#[derive(Debug)]
pub struct IpvsProxy<I: Ipvs = Kernel, H: Host = System> {
    /// In a cell: `dump` reads the table through `&self`.
    ipvs: RefCell<I>,
    host: H,
    /// NodePort virtual servers listen on these.
    node_addresses: Vec<Ipv4Addr>,
    scheduler: String,
    programmed: Programmed,
    /// Trust nothing: read the kernel's table back next time.
    full: bool,
    /// The masquerade sets' elements as last written.
    masquerade: Option<(BTreeSet<String>, BTreeSet<String>)>,
    stale: StaleFlows,
}

impl IpvsProxy<Kernel, System> {
    /// Opens the kernel's IPVS table and sets the sysctls IPVS mode needs.
    pub fn open(node_addresses: Vec<Ipv4Addr>, scheduler: String) -> Result<Self, IpvsProxyError> {
        for (key, value) in SYSCTLS {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .map_err(|source| IpvsProxyError::Sysctl { key, source })?;
        }
        Ok(Self::new(
            Kernel::open()?,
            System,
            node_addresses,
            scheduler,
        ))
    }
}

impl<I: Ipvs, H: Host> IpvsProxy<I, H> {
    pub fn new(ipvs: I, host: H, node_addresses: Vec<Ipv4Addr>, scheduler: String) -> Self {
        Self {
            ipvs: RefCell::new(ipvs),
            host,
            node_addresses,
            scheduler,
            programmed: Programmed::new(),
            full: true,
            masquerade: None,
            stale: StaleFlows::default(),
        }
    }

    /// The virtual servers a frontend becomes. Terminating TCP backends
    /// stay with weight 0 (their connections finish); UDP ones go at once,
    /// as kube-proxy does: a UDP "connection" never finishes while its
    /// client keeps sending.
    fn virtuals(&self, key: &FrontendKey, frontend: &Frontend) -> BTreeMap<VirtualKey, Virtual> {
        let active: BTreeSet<SocketAddrV4> = frontend
            .active()
            .map(|b| SocketAddrV4::new(b.address, b.port))
            .collect();
        let servers: BTreeMap<SocketAddrV4, u32> = frontend
            .backends
            .iter()
            .map(|b| SocketAddrV4::new(b.address, b.port))
            .filter(|address| key.protocol == Protocol::Tcp || active.contains(address))
            .map(|address| (address, u32::from(active.contains(&address))))
            .collect();
        let scheduling = Scheduling {
            scheduler: self.scheduler.clone(),
            persistence: frontend.affinity_timeout,
        };
        let addresses = if frontend.kind == FrontendKind::NodePort {
            self.node_addresses.clone()
        } else {
            vec![key.address]
        };
        addresses
            .into_iter()
            .map(|address| {
                let virtual_key = VirtualKey {
                    address,
                    port: key.port,
                    protocol: key.protocol,
                };
                (virtual_key, (scheduling.clone(), servers.clone()))
            })
            .collect()
    }

    fn all_virtuals<'a>(
        &self,
        frontends: impl Iterator<Item = (&'a FrontendKey, &'a Frontend)>,
    ) -> BTreeMap<VirtualKey, Virtual> {
        frontends.flat_map(|(k, f)| self.virtuals(k, f)).collect()
    }

    /// The kernel's virtual servers that are wharf's: on a bound service
    /// address or a node address.
    fn kernel_virtuals(
        &self,
        bound: &BTreeSet<Ipv4Addr>,
    ) -> Result<BTreeMap<VirtualKey, Virtual>, IpvsProxyError> {
        let mut ipvs = self.ipvs.borrow_mut();
        let mut out = BTreeMap::new();
        for (key, scheduling) in ipvs.services()? {
            if !bound.contains(&key.address) && !self.node_addresses.contains(&key.address) {
                continue;
            }
            let servers = ipvs
                .real_servers(&key)?
                .into_iter()
                .map(|s| (s.address, s.weight))
                .collect();
            out.insert(key, (scheduling, servers));
        }
        Ok(out)
    }

    /// Brings `old` virtual servers to `new`; returns the operations made.
    fn apply(
        &self,
        old: &BTreeMap<VirtualKey, Virtual>,
        new: &BTreeMap<VirtualKey, Virtual>,
    ) -> Result<usize, IpvsProxyError> {
        let mut ipvs = self.ipvs.borrow_mut();
        let mut operations = 0;
        for (key, (scheduling, servers)) in new {
            let before = old.get(key);
            if before.map(|(s, _)| s) != Some(scheduling) {
                ipvs.put_service(key, scheduling, before.is_some())?;
                operations += 1;
            }
            let empty = BTreeMap::new();
            let had = before.map_or(&empty, |(_, s)| s);
            for (address, weight) in servers {
                if had.get(address) != Some(weight) {
                    let server = RealServer {
                        address: *address,
                        weight: *weight,
                    };
                    ipvs.put_real_server(key, &server, had.contains_key(address))?;
                    operations += 1;
                }
            }
            for address in had.keys().filter(|a| !servers.contains_key(a)) {
                ipvs.remove_real_server(key, *address)?;
                operations += 1;
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            ipvs.remove_service(key)?;
            operations += 1;
        }
        Ok(operations)
    }

    /// Service addresses bound to the dummy device now (created if
    /// missing).
    fn bound(&self) -> Result<BTreeSet<Ipv4Addr>, IpvsProxyError> {
        match bound_addresses(&self.host)? {
            Some(bound) => Ok(bound),
            None => {
                self.host
                    .run("ip", &["link", "add", DEVICE, "type", "dummy"], None)?;
                Ok(BTreeSet::new())
            }
        }
    }
}

/// The addresses bound to the dummy device, or None without the device.
fn bound_addresses(host: &impl Host) -> Result<Option<BTreeSet<Ipv4Addr>>, IpvsProxyError> {
    if host.run("ip", &["link", "show", DEVICE], None).is_err() {
        return Ok(None);
    }
    let listing: serde_json::Value =
        serde_json::from_str(&host.run("ip", &["-j", "addr", "show", "dev", DEVICE], None)?)?;
    Ok(Some(
        listing
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
            .filter(|a| a["family"] == "inet")
            .filter_map(|a| a["local"].as_str()?.parse().ok())
            .collect(),
    ))
}

/// Addresses a set of frontends needs bound on the dummy device.
fn service_addresses<'a>(
    frontends: impl Iterator<Item = (&'a FrontendKey, &'a Frontend)>,
) -> BTreeSet<Ipv4Addr> {
    frontends
        .filter(|(_, f)| f.kind != FrontendKind::NodePort)
        .map(|(k, _)| k.address)
        .collect()
}

/// The masquerade table's set elements: virtual servers reached from
/// outside with the Cluster policy, and endpoint "loops" (an endpoint
/// reaching itself through a service).
fn masquerade_elements(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    node_addresses: &[Ipv4Addr],
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut external = BTreeSet::new();
    for (key, frontend) in frontends {
        if frontend.kind == FrontendKind::ClusterIp || frontend.policy == TrafficPolicy::Local {
            continue;
        }
        let protocol = key.protocol.to_string().to_lowercase();
        let addresses = if frontend.kind == FrontendKind::NodePort {
            node_addresses.to_vec()
        } else {
            vec![key.address]
        };
        for address in addresses {
            external.insert(format!("{address} . {protocol} . {}", key.port));
        }
    }
    // Every backend, from the frontends themselves: building the virtual
    // servers again for this would cost a pass over every node address.
    let loops = frontends
        .values()
        .flat_map(|f| &f.backends)
        .map(|b| format!("{0} . {0}", b.address))
        .collect();
    (external, loops)
}

/// The masquerade table, whole (idempotent: the table is replaced).
fn masquerade_table(external: &BTreeSet<String>, loops: &BTreeSet<String>) -> String {
    let mut out = format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\n\
         add table ip {TABLE}\n\
         add set ip {TABLE} external {{ type ipv4_addr . inet_proto . inet_service; }}\n\
         add set ip {TABLE} loops {{ type ipv4_addr . ipv4_addr; }}\n\
         add chain ip {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain ip {TABLE} output {{ type nat hook output priority -100; policy accept; }}\n\
         add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add rule ip {TABLE} prerouting ip daddr . meta l4proto . th dport @external meta mark set meta mark | 0x4000\n\
         add rule ip {TABLE} output ip daddr . meta l4proto . th dport @external meta mark set meta mark | 0x4000\n\
         add rule ip {TABLE} postrouting meta mark & 0x4000 == 0x4000 meta mark set meta mark ^ 0x4000 masquerade fully-random\n\
         add rule ip {TABLE} postrouting ip saddr . ip daddr @loops masquerade fully-random\n"
    );
    for (set, elements) in [("external", external), ("loops", loops)] {
        if !elements.is_empty() {
            let joined: Vec<&str> = elements.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "add element ip {TABLE} {set} {{ {} }}",
                joined.join(", ")
            );
        }
    }
    out
}

/// The element changes that bring the masquerade sets from `written` to
/// `wanted`.
fn masquerade_changes(
    written: &(BTreeSet<String>, BTreeSet<String>),
    wanted: &(BTreeSet<String>, BTreeSet<String>),
) -> String {
    let mut out = String::new();
    for (set, old, new) in [
        ("external", &written.0, &wanted.0),
        ("loops", &written.1, &wanted.1),
    ] {
        for (verb, elements) in [
            ("delete", old.difference(new)),
            ("add", new.difference(old)),
        ] {
            let elements: Vec<&str> = elements.map(String::as_str).collect();
            if !elements.is_empty() {
                let _ = writeln!(
                    out,
                    "{verb} element ip {TABLE} {set} {{ {} }}",
                    elements.join(", ")
                );
            }
        }
    }
    out
}

/// `ip -batch` input binding and unbinding service addresses.
fn address_changes(old: &BTreeSet<Ipv4Addr>, new: &BTreeSet<Ipv4Addr>) -> String {
    let mut out = String::new();
    for address in new.difference(old) {
        let _ = writeln!(out, "addr add {address}/32 dev {DEVICE}");
    }
    for address in old.difference(new) {
        let _ = writeln!(out, "addr del {address}/32 dev {DEVICE}");
    }
    out
}

impl<I: Ipvs, H: Host> ServiceProxy for IpvsProxy<I, H> {
    type Error = IpvsProxyError;

    fn sync(&mut self, desired: &DesiredState) -> Result<SyncStats, IpvsProxyError> {
        let changes = Changes::between(&self.programmed, desired);
        let mut stats = SyncStats::default();
        if self.full || !changes.is_empty() {
            let was_full = std::mem::replace(&mut self.full, true);
            let (old_virtuals, new_virtuals, old_addresses, new_addresses) = if was_full {
                let bound = self.bound()?;
                let old = self.kernel_virtuals(&bound)?;
                let new = self.all_virtuals(desired.frontends.iter());
                (old, new, bound, service_addresses(desired.frontends.iter()))
            } else {
                let scope: BTreeSet<&FrontendKey> =
                    changes.changed.iter().chain(&changes.removed).collect();
                let old_frontends = self.programmed.iter().filter(|(k, _)| scope.contains(k));
                let new_frontends = desired.frontends.iter().filter(|(k, _)| scope.contains(k));
                (
                    self.all_virtuals(old_frontends.clone()),
                    self.all_virtuals(new_frontends.clone()),
                    service_addresses(self.programmed.iter()),
                    service_addresses(desired.frontends.iter()),
                )
            };
            // Addresses first, so a new virtual server answers at once;
            // removed ones after their virtual servers are gone.
            let added: BTreeSet<Ipv4Addr> =
                new_addresses.difference(&old_addresses).copied().collect();
            let script = address_changes(&BTreeSet::new(), &added);
            if !script.is_empty() {
                self.host.run("ip", &["-batch", "-"], Some(&script))?;
            }
            stats.map_operations += added.len();
            stats.map_operations += self.apply(&old_virtuals, &new_virtuals)?;
            let removed: BTreeSet<Ipv4Addr> =
                old_addresses.difference(&new_addresses).copied().collect();
            let script = address_changes(&removed, &BTreeSet::new());
            if !script.is_empty() {
                self.host.run("ip", &["-batch", "-"], Some(&script))?;
            }
            stats.map_operations += removed.len();
            // The masquerade table: whole on a full sync, else only the
            // set elements that changed.
            let wanted = masquerade_elements(&desired.frontends, &self.node_addresses);
            let script = match (&self.masquerade, was_full) {
                (Some(written), false) => masquerade_changes(written, &wanted),
                _ => masquerade_table(&wanted.0, &wanted.1),
            };
            if !script.is_empty() {
                self.host.run("nft", &["-f", "-"], Some(&script))?;
            }
            self.masquerade = Some(wanted);
            self.full = false;
            if was_full {
                info!(
                    virtual_servers = new_virtuals.len(),
                    addresses = new_addresses.len(),
                    "IPVS table written in full"
                );
            }
            commit(
                &mut self.programmed,
                &mut self.stale,
                &changes,
                desired,
                &mut stats,
            );
        }
        stats.flows_purged = self.stale.forget(&self.host);
        Ok(stats)
    }

    fn resync(&mut self, desired: &DesiredState) -> Result<SyncStats, IpvsProxyError> {
        self.full = true;
        self.sync(desired)
    }

    fn dump(&self) -> Result<Forwarding, IpvsProxyError> {
        let bound = bound_addresses(&self.host)?.unwrap_or_default();
        let mut forwarding = Forwarding::new();
        for (key, (_, servers)) in self.kernel_virtuals(&bound)? {
            let node_port = !bound.contains(&key.address);
            let servers: BTreeSet<SocketAddrV4> = servers
                .into_iter()
                .filter(|(_, weight)| *weight > 0)
                .map(|(address, _)| address)
                .collect();
            let frontend = FrontendKey {
                address: if node_port {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    key.address
                },
                port: key.port,
                protocol: key.protocol,
            };
            forwarding.entry(frontend).or_default().extend(servers);
        }
        Ok(forwarding)
    }

    fn flush(&mut self) -> Result<(), IpvsProxyError> {
        self.sync(&DesiredState::default())?;
        remove(&self.host, &self.node_addresses)?;
        // The device is gone: the next sync creates it again.
        self.full = true;
        Ok(())
    }
}

/// Removes the IPVS mode's leftovers: the virtual servers on the dummy
/// device's addresses and on `node_addresses` (NodePorts), the device,
/// and the masquerade table. Returns whether there was anything (never on
/// a node that never ran IPVS mode: the device is its mark).
pub fn remove(host: &impl Host, node_addresses: &[Ipv4Addr]) -> Result<bool, IpvsProxyError> {
    let Some(bound) = bound_addresses(host)? else {
        return Ok(false);
    };
    if let Ok(mut kernel) = Kernel::open() {
        for (key, _) in kernel.services()? {
            if bound.contains(&key.address) || node_addresses.contains(&key.address) {
                kernel.remove_service(&key)?;
            }
        }
    }
    host.run("ip", &["link", "del", DEVICE], None)?;
    let _ = host.run("nft", &["delete", "table", "ip", TABLE], None);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::{kernel::FakeIpvs, *};
    use crate::proxy::StaleUdp;
    use crate::proxy::{Backend, BackendState, Protocol, ServicePortName};

    /// A host with a dummy device whose addresses `ip -batch` changes, and
    /// which accepts any nft transaction.
    #[derive(Default)]
    struct FakeHost {
        addresses: RefCell<BTreeSet<Ipv4Addr>>,
        device: RefCell<bool>,
        forgotten: RefCell<Vec<StaleUdp>>,
        nft: RefCell<Vec<String>>,
    }

    impl Host for &FakeHost {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&str>,
        ) -> Result<String, ExecError> {
            match (program, args) {
                ("ip", ["link", "show", _]) if !*self.device.borrow() => Err(ExecError::Failed {
                    program: program.into(),
                    args: args.join(" "),
                    status: std::process::ExitStatus::default(),
                    stderr: "Device does not exist".into(),
                }),
                ("ip", ["link", "add", ..]) => {
                    *self.device.borrow_mut() = true;
                    Ok(String::new())
                }
                ("ip", ["-j", "addr", ..]) => {
                    let addresses: Vec<String> = self
                        .addresses
                        .borrow()
                        .iter()
                        .map(|a| format!(r#"{{"family":"inet","local":"{a}"}}"#))
                        .collect();
                    Ok(format!(r#"[{{"addr_info":[{}]}}]"#, addresses.join(",")))
                }
                ("ip", ["-batch", "-"]) => {
                    for line in stdin.unwrap_or_default().lines() {
                        let words: Vec<&str> = line.split(' ').collect();
                        let address = words[2].trim_end_matches("/32").parse().unwrap();
                        let mut addresses = self.addresses.borrow_mut();
                        match words[1] {
                            "add" => assert!(addresses.insert(address), "{line}: exists"),
                            _ => assert!(addresses.remove(&address), "{line}: missing"),
                        }
                    }
                    Ok(String::new())
                }
                ("nft", _) => {
                    self.nft.borrow_mut().push(stdin.unwrap_or_default().into());
                    Ok(String::new())
                }
                _ => Ok(String::new()),
            }
        }

        fn forget_udp(&self, stale: &[StaleUdp]) -> Result<usize, ConntrackError> {
            self.forgotten.borrow_mut().extend_from_slice(stale);
            Ok(stale.len())
        }
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn state(backends: &[(u8, BackendState)], affinity: Option<u32>) -> DesiredState {
        let mut desired = DesiredState::default();
        for (address, port, protocol, kind) in [
            (VIP, 53, Protocol::Udp, FrontendKind::ClusterIp),
            (VIP, 80, Protocol::Tcp, FrontendKind::ClusterIp),
            (
                Ipv4Addr::UNSPECIFIED,
                30053,
                Protocol::Udp,
                FrontendKind::NodePort,
            ),
        ] {
            desired.frontends.insert(
                FrontendKey {
                    address,
                    port,
                    protocol,
                },
                Frontend {
                    kind,
                    service: ServicePortName::default(),
                    backends: backends
                        .iter()
                        .map(|(host, state)| Backend {
                            address: Ipv4Addr::new(10, 244, 0, *host),
                            port: 5353,
                            state: *state,
                        })
                        .collect(),
                    affinity_timeout: affinity,
                    policy: TrafficPolicy::Cluster,
                },
            );
        }
        desired
    }

    fn servers(
        ipvs: &FakeIpvs,
        address: Ipv4Addr,
        port: u16,
        protocol: Protocol,
    ) -> Vec<(u8, u32)> {
        let key = VirtualKey {
            address,
            port,
            protocol,
        };
        let mut servers: Vec<(u8, u32)> = ipvs.table[&key]
            .1
            .iter()
            .map(|s| (s.address.ip().octets()[3], s.weight))
            .collect();
        servers.sort();
        servers
    }

    #[test]
    fn frontends_become_virtual_servers_with_weighted_real_servers() {
        use BackendState::{Active, Terminating};
        let host = FakeHost::default();
        let mut proxy = IpvsProxy::new(FakeIpvs::default(), &host, vec![NODE], "rr".into());
        proxy
            .sync(&state(&[(1, Active), (2, Terminating)], Some(30)))
            .unwrap();
        {
            let ipvs = proxy.ipvs.borrow();
            assert_eq!(
                servers(&ipvs, VIP, 80, Protocol::Tcp),
                [(1, 1), (2, 0)],
                "terminating TCP: weight 0"
            );
            assert_eq!(
                servers(&ipvs, VIP, 53, Protocol::Udp),
                [(1, 1)],
                "terminating UDP: gone"
            );
            assert_eq!(
                servers(&ipvs, NODE, 30053, Protocol::Udp),
                [(1, 1)],
                "NodePort per node address"
            );
            assert!(ipvs.table.values().all(|(s, _)| s.persistence == Some(30)));
        }
        assert_eq!(
            *host.addresses.borrow(),
            [VIP].into(),
            "only service addresses are bound"
        );

        // The terminating backend goes: one real server removed (TCP's).
        let before = proxy.ipvs.borrow().calls;
        proxy.sync(&state(&[(1, Active)], Some(30))).unwrap();
        assert_eq!(proxy.ipvs.borrow().calls - before, 1);
        proxy.sync(&state(&[(3, Active)], Some(30))).unwrap();
        assert_eq!(
            servers(&proxy.ipvs.borrow(), VIP, 53, Protocol::Udp),
            [(3, 1)]
        );
        assert_eq!(
            host.nft
                .borrow()
                .last()
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            [
                "delete element ip wharf-ipvs loops { 10.244.0.1 . 10.244.0.1 }",
                "add element ip wharf-ipvs loops { 10.244.0.3 . 10.244.0.3 }",
            ],
            "only the changed masquerade elements"
        );
        let forgotten = host.forgotten.borrow();
        assert_eq!(
            forgotten.iter().filter(|s| s.backend.is_some()).count(),
            2,
            "backend 1's UDP flows, both UDP frontends: {forgotten:?}"
        );
        drop(forgotten);

        let forwarding = proxy.dump().unwrap();
        assert_eq!(forwarding, state(&[(3, Active)], Some(30)).forwarding());

        proxy.flush().unwrap();
        assert!(proxy.ipvs.borrow().table.is_empty());
        assert!(host.addresses.borrow().is_empty());
    }

    #[test]
    fn a_full_sync_repairs_what_changed_behind_the_proxys_back() {
        use BackendState::Active;
        let host = FakeHost::default();
        let mut proxy = IpvsProxy::new(FakeIpvs::default(), &host, vec![NODE], "rr".into());
        let desired = state(&[(1, Active), (2, Active)], None);
        proxy.sync(&desired).unwrap();
        // An operator deletes a real server and adds a virtual server on a
        // bound address.
        let vip = VirtualKey {
            address: VIP,
            port: 53,
            protocol: Protocol::Udp,
        };
        {
            let mut ipvs = proxy.ipvs.borrow_mut();
            ipvs.table.get_mut(&vip).unwrap().1.pop();
            ipvs.table.insert(
                VirtualKey { port: 99, ..vip },
                (Scheduling::default(), Vec::new()),
            );
        }
        assert_eq!(
            proxy.sync(&desired).unwrap(),
            SyncStats::default(),
            "no change seen"
        );
        let stats = proxy.resync(&desired).unwrap();
        assert_eq!(stats.map_operations, 2, "{stats:?}");
        assert_eq!(proxy.dump().unwrap(), desired.forwarding());
    }
}
