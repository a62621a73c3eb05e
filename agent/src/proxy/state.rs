//! Desired state: what the node should forward, independent of any mode.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

/// L4 protocols a service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => dataplane_common::protocol::TCP,
            Protocol::Udp => dataplane_common::protocol::UDP,
        }
    }

    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            dataplane_common::protocol::TCP => Some(Protocol::Tcp),
            dataplane_common::protocol::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where a frontend listens. NodePort frontends use `0.0.0.0`: they answer
/// on every node address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// `namespace/name:port-name`, as kube-proxy names a service port.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Whether a backend takes new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready: eligible for new flows.
    Active,
    /// Serving but terminating: keeps its flows, gets no new ones.
    Terminating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
}

/// Which endpoints a frontend may use: a Service's
/// `internalTrafficPolicy` for its ClusterIP frontends,
/// `externalTrafficPolicy` for the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Every endpoint in the cluster; modes may masquerade external
    /// clients so replies come back through this node.
    #[default]
    Cluster,
    /// Only this node's endpoints (the frontend's backends are already
    /// filtered to them), and the client's source address is kept.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub service: ServicePortName,
    /// Sorted by (address, port), so equal sets compare equal.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`: a client's new flows go to the backend
    /// its last flow used, as long as it used it within this many seconds
    /// (Kubernetes' default is 10800).
    pub affinity_timeout: Option<u32>,
    pub policy: TrafficPolicy,
}

impl Frontend {
    /// Backends eligible for new flows: the ready ones, or, when none is
    /// ready, the serving-but-terminating ones (KEP-1669, as kube-proxy
    /// does), so a rollout's last old pod still answers.
    pub fn active(&self) -> impl Iterator<Item = &Backend> {
        let any_ready = self
            .backends
            .iter()
            .any(|b| b.state == BackendState::Active);
        let wanted = if any_ready {
            BackendState::Active
        } else {
            BackendState::Terminating
        };
        self.backends.iter().filter(move |b| b.state == wanted)
    }
}

/// Everything the node should forward.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// Where new flows to each frontend can go, as read back from a dataplane:
/// the active backends' addresses. Service names, frontend kinds and
/// terminating backends are not part of it: a dataplane stores none of
/// them per frontend.
pub type Forwarding = BTreeMap<FrontendKey, BTreeSet<SocketAddrV4>>;

impl DesiredState {
    /// A short digest of the whole state, logged with every sync so an
    /// operator (or a test) can tell which state is programmed without
    /// dumping it. Stable within one build of wharf: it hashes with
    /// std's fixed-key SipHash.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(self)
    }

    /// The forwarding this state asks for, to compare with a dump.
    pub fn forwarding(&self) -> Forwarding {
        self.frontends
            .iter()
            .map(|(key, frontend)| {
                (
                    *key,
                    frontend
                        .active()
                        .map(|b| SocketAddrV4::new(b.address, b.port))
                        .collect(),
                )
            })
            .collect()
    }
}
