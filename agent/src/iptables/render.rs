//! The rules, as `iptables-restore` input, in kube-proxy's proven layout
//! under wharf's own chain names (so other rule owners are left alone):
//!
//! ```text
//! nat PREROUTING, OUTPUT -> WHARF-SERVICES
//!   -d VIP -p P --dport N -> WHARF-SVC-<hash>      one chain per frontend
//!   dst-type LOCAL        -> WHARF-NODEPORTS -> WHARF-SVC-<hash>
//! WHARF-SVC-<hash>: [mark for masquerade] [affinity: recent --rcheck]
//!   statistic --probability 1/n, 1/(n-1), ... -> WHARF-SEP-<hash>
//! WHARF-SEP-<hash>: hairpin mark, [recent --set], DNAT to the backend
//! nat POSTROUTING -> WHARF-POSTROUTING: masquerade what was marked
//! filter INPUT, FORWARD, OUTPUT -> WHARF-NO-ENDPOINTS: REJECT frontends
//!   without backends (ICMP port unreachable: connect() fails at once)
//! ```
//!
//! Chain names hash the frontend (and backend), so a frontend's chains
//! keep their names across syncs and agent restarts, and a sync that
//! changes one frontend rewrites only its chains (KEP-3453) plus the
//! dispatch chains.

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddrV4};

use crate::proxy::{DesiredState, Frontend, FrontendKey, FrontendKind, TrafficPolicy};

pub const PREFIX: &str = "WHARF-";
pub const SERVICES: &str = "WHARF-SERVICES";
pub const NODEPORTS: &str = "WHARF-NODEPORTS";
pub const POSTROUTING: &str = "WHARF-POSTROUTING";
pub const MARK_MASQ: &str = "WHARF-MARK-MASQ";
pub const NO_ENDPOINTS: &str = "WHARF-NO-ENDPOINTS";
const SERVICE_CHAIN: &str = "WHARF-SVC-";
const ENDPOINT_CHAIN: &str = "WHARF-SEP-";
/// The packet mark bit that asks POSTROUTING to masquerade (kube-proxy's).
const MASQ_MARK: &str = "0x4000";

/// A jump from a built-in chain into one of wharf's.
#[derive(Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub chain: &'static str,
    pub target: &'static str,
    comment: &'static str,
}

impl Jump {
    /// The rule, without the `-A CHAIN`/`-I CHAIN` in front.
    pub fn rule(&self) -> String {
        format!(
            "-m comment --comment \"{}\" -j {}",
            self.comment, self.target
        )
    }
}

pub const JUMPS: [Jump; 6] = [
    Jump {
        table: "nat",
        chain: "PREROUTING",
        target: SERVICES,
        comment: "wharf service portals",
    },
    Jump {
        table: "nat",
        chain: "OUTPUT",
        target: SERVICES,
        comment: "wharf service portals",
    },
    Jump {
        table: "nat",
        chain: "POSTROUTING",
        target: POSTROUTING,
        comment: "wharf postrouting rules",
    },
    Jump {
        table: "filter",
        chain: "INPUT",
        target: NO_ENDPOINTS,
        comment: "wharf services without endpoints",
    },
    Jump {
        table: "filter",
        chain: "FORWARD",
        target: NO_ENDPOINTS,
        comment: "wharf services without endpoints",
    },
    Jump {
        table: "filter",
        chain: "OUTPUT",
        target: NO_ENDPOINTS,
        comment: "wharf services without endpoints",
    },
];

/// The chains a sync always writes, and that outlive every frontend.
pub const STATIC_CHAINS: [&str; 5] = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, NO_ENDPOINTS];

pub fn service_chain(key: &FrontendKey) -> String {
    format!("{SERVICE_CHAIN}{}", hash(&key.to_string()))
}

pub fn endpoint_chain(key: &FrontendKey, backend: SocketAddrV4) -> String {
    format!("{ENDPOINT_CHAIN}{}", hash(&format!("{key}>{backend}")))
}

/// The per-frontend chains `frontend` needs: none without backends (a
/// reject rule stands in), else its service chain and one per backend.
pub fn chains_of(key: &FrontendKey, frontend: &Frontend) -> BTreeSet<String> {
    let backends: Vec<SocketAddrV4> = active(frontend).collect();
    if backends.is_empty() {
        return BTreeSet::new();
    }
    let mut chains: BTreeSet<String> = backends
        .into_iter()
        .map(|b| endpoint_chain(key, b))
        .collect();
    chains.insert(service_chain(key));
    chains
}

fn active(frontend: &Frontend) -> impl Iterator<Item = SocketAddrV4> + '_ {
    frontend
        .active()
        .map(|b| SocketAddrV4::new(b.address, b.port))
}

/// One `iptables-restore --noflush` transaction.
#[derive(Debug)]
pub struct Plan<'a> {
    pub desired: &'a DesiredState,
    /// Frontends whose chains are (re)written.
    pub rewrite: &'a BTreeSet<FrontendKey>,
    /// Per-frontend chains to delete.
    pub delete: &'a BTreeSet<String>,
    /// Jumps from built-in chains to add.
    pub add_jumps: &'a [&'a Jump],
    /// Write the masquerade chains too (a full sync).
    pub full: bool,
}

impl Plan<'_> {
    /// The restore input, and how many rules it writes.
    pub fn render(&self) -> (String, usize) {
        let mut out = String::new();
        let mut rules = 0;
        // nat: declaring a chain flushes it (or creates it), so every
        // chain written or deleted is declared first.
        out.push_str("*nat\n");
        let mut declared: Vec<String> = vec![SERVICES.into(), NODEPORTS.into()];
        if self.full {
            declared.extend([POSTROUTING.into(), MARK_MASQ.into()]);
        }
        for key in self.rewrite {
            declared.extend(chains_of(key, &self.desired.frontends[key]));
        }
        declared.extend(self.delete.iter().cloned());
        for chain in &declared {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for jump in self.add_jumps.iter().filter(|j| j.table == "nat") {
            let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.rule());
            rules += 1;
        }
        if self.full {
            let _ = writeln!(
                out,
                "-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
                 -A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}\n\
                 -A {POSTROUTING} -m comment --comment \"wharf service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
                 -A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}"
            );
            rules += 4;
        }
        for (key, frontend) in &self.desired.frontends {
            if active(frontend).next().is_none() {
                continue;
            }
            let protocol = protocol(key);
            let comment = comment(frontend);
            let chain = service_chain(key);
            if frontend.kind == FrontendKind::NodePort {
                let _ = writeln!(
                    out,
                    "-A {NODEPORTS} -p {protocol} -m comment --comment \"{comment}\" -m {protocol} --dport {} -j {chain}",
                    key.port
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {SERVICES} -d {}/32 -p {protocol} -m comment --comment \"{comment}\" -m {protocol} --dport {} -j {chain}",
                    key.address, key.port
                );
            }
            rules += 1;
        }
        // NodePorts last: they match any local address. Loopback is left
        // out: DNAT from 127/8 to a pod would need route_localnet.
        let _ = writeln!(
            out,
            "-A {SERVICES} ! -d 127.0.0.0/8 -m comment --comment \"wharf nodeports; must be last\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
        );
        rules += 1;
        for key in self.rewrite {
            rules += render_frontend(&mut out, key, &self.desired.frontends[key]);
        }
        for chain in self.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");

        out.push_str("*filter\n");
        let _ = writeln!(out, ":{NO_ENDPOINTS} - [0:0]");
        for jump in self.add_jumps.iter().filter(|j| j.table == "filter") {
            let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.rule());
            rules += 1;
        }
        for (key, frontend) in &self.desired.frontends {
            if active(frontend).next().is_some() {
                continue;
            }
            let protocol = protocol(key);
            let destination = if frontend.kind == FrontendKind::NodePort {
                "-m addrtype --dst-type LOCAL".to_string()
            } else {
                format!("-d {}/32", key.address)
            };
            let _ = writeln!(
                out,
                "-A {NO_ENDPOINTS} {destination} -p {protocol} -m comment --comment \"{} has no endpoints\" -m {protocol} --dport {} -j REJECT --reject-with icmp-port-unreachable",
                comment(frontend),
                key.port
            );
            rules += 1;
        }
        out.push_str("COMMIT\n");
        (out, rules)
    }
}

/// A frontend's service chain and endpoint chains; returns the rule count.
fn render_frontend(out: &mut String, key: &FrontendKey, frontend: &Frontend) -> usize {
    let backends: Vec<SocketAddrV4> = active(frontend).collect();
    if backends.is_empty() {
        return 0;
    }
    let protocol = protocol(key);
    let chain = service_chain(key);
    let mut rules = 0;
    // External clients are masqueraded so replies come back through this
    // node (kube-proxy's Cluster policy); Local keeps their address.
    if frontend.kind != FrontendKind::ClusterIp && frontend.policy == TrafficPolicy::Cluster {
        let _ = writeln!(out, "-A {chain} -j {MARK_MASQ}");
        rules += 1;
    }
    if let Some(seconds) = frontend.affinity_timeout {
        for backend in &backends {
            let endpoint = endpoint_chain(key, *backend);
            let _ = writeln!(
                out,
                "-A {chain} -m recent --rcheck --seconds {seconds} --reap --name {endpoint} --mask 255.255.255.255 --rsource -j {endpoint}"
            );
            rules += 1;
        }
    }
    let count = backends.len();
    for (index, backend) in backends.iter().enumerate() {
        let endpoint = endpoint_chain(key, *backend);
        let remaining = count - index;
        if remaining > 1 {
            let _ = writeln!(
                out,
                "-A {chain} -m statistic --mode random --probability {:.10} -j {endpoint}",
                1.0 / remaining as f64
            );
        } else {
            let _ = writeln!(out, "-A {chain} -j {endpoint}");
        }
        rules += 1;
    }
    for backend in backends {
        let endpoint = endpoint_chain(key, backend);
        // Hairpin: a backend reaching itself through the service must see
        // the reply come from the service, so it is masqueraded.
        let _ = writeln!(out, "-A {endpoint} -s {}/32 -j {MARK_MASQ}", backend.ip());
        let affinity = if frontend.affinity_timeout.is_some() {
            format!(" -m recent --set --name {endpoint} --mask 255.255.255.255 --rsource")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "-A {endpoint} -p {protocol}{affinity} -m {protocol} -j DNAT --to-destination {backend}"
        );
        rules += 2;
    }
    rules
}

fn protocol(key: &FrontendKey) -> String {
    key.protocol.to_string().to_lowercase()
}

fn comment(frontend: &Frontend) -> String {
    let kind = match frontend.kind {
        FrontendKind::ClusterIp => "cluster IP",
        FrontendKind::NodePort => "nodePort",
        FrontendKind::ExternalIp => "external IP",
        FrontendKind::LoadBalancer => "load balancer IP",
    };
    format!("{} {kind}", frontend.service)
}

/// 64-bit FNV-1a in 13 base32 letters: stable across builds and
/// platforms (unlike std's hasher), and short enough for iptables' 28
/// character chain names ("WHARF-SVC-" + 13).
fn hash(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut value: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        value ^= u64::from(byte);
        value = value.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..13)
        .map(|i| char::from(ALPHABET[((value >> (i * 5)) & 31) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{Backend, BackendState, Protocol, ServicePortName};

    fn frontend(kind: FrontendKind, backends: &[u8]) -> Frontend {
        Frontend {
            kind,
            service: ServicePortName {
                namespace: "demo".into(),
                name: "web".into(),
                port: "http".into(),
            },
            backends: backends
                .iter()
                .map(|host| Backend {
                    address: std::net::Ipv4Addr::new(10, 244, 0, *host),
                    port: 8080,
                    state: BackendState::Active,
                })
                .collect(),
            affinity_timeout: None,
            policy: TrafficPolicy::Cluster,
        }
    }

    fn key(address: [u8; 4], port: u16) -> FrontendKey {
        FrontendKey {
            address: address.into(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn chain_names_are_stable_distinct_and_fit_iptables() {
        let a = service_chain(&key([10, 96, 0, 10], 80));
        assert_eq!(a, service_chain(&key([10, 96, 0, 10], 80)));
        assert_ne!(a, service_chain(&key([10, 96, 0, 10], 81)));
        let endpoint = endpoint_chain(&key([10, 96, 0, 10], 80), "10.244.0.1:80".parse().unwrap());
        assert!(a.len() <= 28 && endpoint.len() <= 28, "{a} {endpoint}");
        assert!(a.starts_with(PREFIX) && endpoint.starts_with(PREFIX));
    }

    #[test]
    fn spreading_probabilities_give_each_backend_an_equal_share() {
        let mut desired = DesiredState::default();
        let vip = key([10, 96, 0, 10], 80);
        desired
            .frontends
            .insert(vip, frontend(FrontendKind::ClusterIp, &[1, 2, 3, 4]));
        let rewrite = [vip].into();
        let (script, rules) = Plan {
            desired: &desired,
            rewrite: &rewrite,
            delete: &BTreeSet::new(),
            add_jumps: &[],
            full: false,
        }
        .render();
        // Each rule takes its share of what the rules before it left.
        let probabilities: Vec<f64> = script
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|p| p.split(' ').next().unwrap().parse().unwrap())
            .collect();
        let mut left = 1.0;
        for p in probabilities.iter().chain([&1.0]) {
            assert!((left * p - 0.25).abs() < 1e-9, "{probabilities:?}");
            left *= 1.0 - p;
        }
        // Dispatch, nodeport jump, 4 spread + 4 × (hairpin, DNAT).
        assert_eq!(rules, 1 + 1 + 4 + 8);
        assert!(
            script.contains("-s 10.244.0.4/32 -j WHARF-MARK-MASQ"),
            "hairpin"
        );
    }

    #[test]
    fn external_frontends_masquerade_unless_local_and_empty_ones_reject() {
        let mut desired = DesiredState::default();
        let node_port = key([0, 0, 0, 0], 30080);
        let local = key([192, 168, 78, 1], 80);
        let empty = key([10, 96, 0, 11], 80);
        desired
            .frontends
            .insert(node_port, frontend(FrontendKind::NodePort, &[1]));
        let mut external = frontend(FrontendKind::ExternalIp, &[1]);
        external.policy = TrafficPolicy::Local;
        external.affinity_timeout = Some(30);
        desired.frontends.insert(local, external);
        desired
            .frontends
            .insert(empty, frontend(FrontendKind::ClusterIp, &[]));
        let rewrite = [node_port, local, empty].into();
        let (script, _) = Plan {
            desired: &desired,
            rewrite: &rewrite,
            delete: &BTreeSet::new(),
            add_jumps: &[],
            full: true,
        }
        .render();
        let node_port_chain = service_chain(&node_port);
        let local_chain = service_chain(&local);
        assert!(script.contains(&format!("-A {node_port_chain} -j {MARK_MASQ}")));
        assert!(!script.contains(&format!("-A {local_chain} -j {MARK_MASQ}")));
        assert!(script.contains(&format!("-A {local_chain} -m recent --rcheck --seconds 30")));
        assert!(script.contains(&format!("-A {NODEPORTS} -p tcp")));
        assert!(script.contains(
            "-A WHARF-NO-ENDPOINTS -d 10.96.0.11/32 -p tcp -m comment --comment \"demo/web:http cluster IP has no endpoints\" -m tcp --dport 80 -j REJECT"
        ));
        assert!(
            !script.contains(&service_chain(&empty)),
            "no chain for a frontend without backends"
        );
    }
}
