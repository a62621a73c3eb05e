//! Routing between nodes: each other node's podCIDR is routed through
//! that node, so pods reach pods on any node by their own addresses,
//! without NAT. How (`--routing`, one way for the whole cluster):
//! `native`, a route through the peer's InternalIP, for nodes on one L2
//! segment; or `vxlan`, a route into the overlay (see `vxlan`), for nodes
//! that only have routes to each other's addresses. Routes are followed
//! from the API server's Nodes and tagged with their own rtnetlink
//! protocol number, so the ones that are no longer wanted are found and
//! removed; a route someone else already has to the same destination is
//! left alone (and logged).
//! The same Nodes say which addresses pod traffic is not masqueraded to
//! (see `egress`).

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tracing::{info, warn};

use crate::{
    egress,
    host::System,
    ipam::PodCidr,
    netlink::{
        self, Attrs, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NetlinkError, Socket,
    },
    vxlan::{self, Overlay, Peer, VxlanError},
};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;
/// The gateway is on the link, whatever the link's addresses say.
const RTNH_F_ONLINK: u32 = 4;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
/// `static`: what routes to pods on this node are.
pub const RTPROT_STATIC: u8 = 4;
/// Routes to other nodes' podCIDRs: a protocol number of wharf's own
/// (`ip route` shows `proto 199`), so they are told apart from everyone
/// else's.
pub const RTPROT_WHARF: u8 = 199;

/// How long to wait after a Node change for the rest of its burst.
const BATCH: Duration = Duration::from_millis(100);

/// How often routes and the egress table are rewritten with no Node
/// change: failed routes are retried, and ones the kernel dropped (a
/// link went down) or someone flushed come back.
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: NetlinkError,
    },
    /// Boxed: the overlay's errors include pod wiring's, which include
    /// these.
    #[error(transparent)]
    Overlay(Box<VxlanError>),
}

impl From<VxlanError> for RoutesError {
    fn from(error: VxlanError) -> Self {
        Self::Overlay(Box::new(error))
    }
}

/// How pods reach pods on other nodes (`--routing`): the same on every
/// node of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// A route to each peer's podCIDR through the peer's address: nodes
    /// share an L2 segment.
    Native,
    /// A route to each peer's podCIDR into the VXLAN overlay: nodes only
    /// need routes to each other's addresses.
    Vxlan(Overlay),
}

/// A route: `destination/prefix [via gateway] [dev oif] [onlink]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: u8,
    pub protocol: u8,
    /// The gateway is taken as on the link `oif` (an overlay peer's).
    pub onlink: bool,
}

impl Route {
    /// `struct rtmsg` and attributes, for RTM_NEWROUTE and RTM_DELROUTE.
    fn message(&self) -> Vec<u8> {
        // family, dst_len, src_len, tos, table, protocol, scope, type,
        // flags.
        let mut message = vec![
            libc::AF_INET as u8,
            self.prefix,
            0,
            0,
            RT_TABLE_MAIN,
            self.protocol,
            self.scope,
            RTN_UNICAST,
        ];
        let flags = if self.onlink { RTNH_F_ONLINK } else { 0 };
        message.extend_from_slice(&flags.to_ne_bytes());
        let mut attributes = Attrs::new();
        if self.prefix > 0 {
            attributes.put(RTA_DST, &self.destination.octets());
        }
        if let Some(gateway) = self.gateway {
            attributes.put(RTA_GATEWAY, &gateway.octets());
        }
        if let Some(oif) = self.oif {
            attributes.put_u32(RTA_OIF, oif);
        }
        message.extend(attributes.into_bytes());
        message
    }

    /// Adds the route, or replaces the one to the same destination.
    pub fn replace(&self, socket: &mut Socket) -> Result<(), RoutesError> {
        socket
            .request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &self.message())
            .map(drop)
            .map_err(|source| RoutesError::Netlink {
                action: format!("adding the route to {self}"),
                source,
            })
    }

    /// Adds the route unless one to the same destination exists.
    fn create(&self, socket: &mut Socket) -> Result<(), RoutesError> {
        socket
            .request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &self.message())
            .map(drop)
            .map_err(|source| RoutesError::Netlink {
                action: format!("adding the route to {self}"),
                source,
            })
    }

    fn delete(&self, socket: &mut Socket) -> Result<(), RoutesError> {
        match socket.request(RTM_DELROUTE, 0, &self.message()) {
            Ok(_) => Ok(()),
            // Gone already (its device went away).
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(RoutesError::Netlink {
                action: format!("removing the route to {self}"),
                source,
            }),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.destination, self.prefix)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// Another node: its podCIDR and its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PeerNode {
    pods: PodCidr,
    address: Ipv4Addr,
}

impl PeerNode {
    /// The route to its pods: through its address, or into the overlay
    /// (device `overlay`) through its pod gateway.
    fn route(&self, overlay: Option<u32>) -> Route {
        Route {
            destination: self.pods.network(),
            prefix: self.pods.prefix(),
            gateway: Some(match overlay {
                Some(_) => self.pods.gateway(),
                None => self.address,
            }),
            oif: overlay,
            scope: RT_SCOPE_UNIVERSE,
            protocol: RTPROT_WHARF,
            onlink: overlay.is_some(),
        }
    }

    fn vtep(&self) -> Peer {
        Peer {
            node: self.address,
            gateway: self.pods.gateway(),
        }
    }
}

/// A node's podCIDR.
fn pod_cidr(node: &Node) -> Option<PodCidr> {
    PodCidr::parse(node.spec.as_ref()?.pod_cidr.as_deref()?).ok()
}

/// A node's IPv4 InternalIP.
fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// The nodes other than `me` with a podCIDR and an IPv4 InternalIP.
fn peers<'a>(nodes: impl IntoIterator<Item = &'a Node>, me: &str) -> BTreeSet<PeerNode> {
    nodes
        .into_iter()
        .filter(|node| node.metadata.name.as_deref() != Some(me))
        .filter_map(|node| {
            Some(PeerNode {
                pods: pod_cidr(node)?,
                address: internal_ip(node)?,
            })
        })
        .collect()
}

/// The routes wharf programmed, read back from the kernel.
fn programmed(socket: &mut Socket) -> Result<BTreeSet<Route>, RoutesError> {
    let mut request = vec![libc::AF_INET as u8];
    request.resize(12, 0);
    let replies = socket
        .request(RTM_GETROUTE, NLM_F_DUMP, &request)
        .map_err(|source| RoutesError::Netlink {
            action: "listing routes".into(),
            source,
        })?;
    Ok(replies
        .iter()
        .filter_map(|reply| {
            let header = reply.payload.get(..12)?;
            if header[5] != RTPROT_WHARF || header[4] != RT_TABLE_MAIN || header[7] != RTN_UNICAST {
                return None;
            }
            let attributes = &reply.payload[12..];
            let address = |kind| {
                netlink::find(attributes, kind)
                    .and_then(|v| <[u8; 4]>::try_from(v).ok())
                    .map(Ipv4Addr::from)
            };
            let onlink = u32::from_ne_bytes(header[8..12].try_into().ok()?) & RTNH_F_ONLINK != 0;
            // Only overlay routes name their device (see `PeerNode::route`).
            let oif = netlink::find(attributes, RTA_OIF)
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .map(u32::from_ne_bytes)
                .filter(|_| onlink);
            Some(Route {
                destination: address(RTA_DST).unwrap_or(Ipv4Addr::UNSPECIFIED),
                prefix: header[1],
                gateway: address(RTA_GATEWAY),
                oif,
                scope: header[6],
                protocol: RTPROT_WHARF,
                onlink,
            })
        })
        .collect())
}

/// Converges the kernel's wharf routes to `wanted`: stale ones removed,
/// missing or changed ones written. One route failing (a peer address
/// that is unreachable, someone else's route to the same CIDR) does not
/// hold up the others; the failures are returned.
fn converge(wanted: &BTreeSet<Route>) -> Result<(), Vec<RoutesError>> {
    let mut socket = Socket::open(libc::NETLINK_ROUTE).map_err(|source| {
        vec![RoutesError::Netlink {
            action: "opening rtnetlink".into(),
            source,
        }]
    })?;
    let have = programmed(&mut socket).map_err(|e| vec![e])?;
    let mut failures = Vec::new();
    for stale in have.difference(wanted) {
        match stale.delete(&mut socket) {
            Ok(()) => info!(route = %stale, "removed the route to a node's pods"),
            Err(error) => failures.push(error),
        }
    }
    for missing in wanted.difference(&have) {
        match missing.create(&mut socket) {
            Ok(()) => info!(route = %missing, "routed a node's pods"),
            Err(error) => failures.push(error),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// What node `me` needs from the Nodes it sees: its peers, and its own
/// podCIDR (whose gateway the overlay device carries).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    peers: BTreeSet<PeerNode>,
    mine: Option<PodCidr>,
}

impl Plan {
    fn new<'a>(nodes: impl IntoIterator<Item = &'a Node> + Clone, me: &str) -> Self {
        Self {
            peers: peers(nodes.clone(), me),
            mine: nodes
                .into_iter()
                .find(|node| node.metadata.name.as_deref() == Some(me))
                .and_then(pod_cidr),
        }
    }

    /// Makes the node's routing what the plan needs, the overlay's
    /// device and entries first. Native routing removes an overlay a
    /// previous run left.
    fn program(&self, routing: Routing) -> Result<(), Vec<RoutesError>> {
        let overlay = match routing {
            Routing::Native => {
                if vxlan::remove().map_err(|e| vec![e.into()])? {
                    info!(
                        device = vxlan::DEVICE,
                        "removed the overlay: routing is native"
                    );
                }
                None
            }
            Routing::Vxlan(overlay) => {
                let device = overlay
                    .ensure(self.mine.map(PodCidr::gateway))
                    .map_err(|e| vec![e.into()])?;
                let vteps = self.peers.iter().map(PeerNode::vtep).collect();
                vxlan::converge(device, &vteps).map_err(|e| vec![e.into()])?;
                Some(device)
            }
        };
        converge(&self.peers.iter().map(|peer| peer.route(overlay)).collect())
    }
}

/// Removes every route wharf added, and the overlay (`--teardown`).
pub fn remove_all() -> Result<(), RoutesError> {
    converge(&BTreeSet::new()).map_err(|mut failures| failures.remove(0))?;
    vxlan::remove()?;
    Ok(())
}

/// Follows every Node and keeps routes to the others' podCIDRs (as
/// `routing` says), and the
/// masquerading of pods (in `cluster_cidr`) to anything but pods and
/// nodes, until dropped. Routes change only once the Node cache has
/// listed, so a restart never removes a route it has not yet heard of
/// again. A burst of Node changes costs one pass: changes only wake the
/// converging task, which then reads the cache as it is.
pub async fn follow(client: Client, me: String, cluster_cidr: String, routing: Routing) {
    let (nodes, writer) = reflector::store::<Node>();
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let events = reflector(
        writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff(),
    );
    let wake = std::sync::Arc::clone(&changed);
    let watch = async move {
        futures::pin_mut!(events);
        let mut listed = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => listed = true,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => {}
                Err(error) => {
                    warn!(%error, "watching nodes failed; retrying");
                    continue;
                }
            }
            if listed {
                wake.notify_one();
            }
        }
    };
    let program = async move {
        // The node addresses the egress table was last written for.
        let mut unmasqueraded: Option<BTreeSet<Ipv4Addr>> = None;
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the cache may not have listed yet.
        resync.tick().await;
        // The plan last programmed, so the many Node changes that move
        // nothing (status writes) cost a comparison, not a dump.
        let mut routed: Option<Plan> = None;
        let mut listed = false;
        loop {
            let full = tokio::select! {
                () = changed.notified() => {
                    listed = true;
                    tokio::time::sleep(BATCH).await;
                    false
                }
                _ = resync.tick(), if listed => true,
            };
            let state = nodes.state();
            let wanted = Plan::new(state.iter().map(AsRef::as_ref), &me);
            let addresses: BTreeSet<Ipv4Addr> =
                state.iter().filter_map(|node| internal_ip(node)).collect();
            if !full
                && routed.as_ref() == Some(&wanted)
                && unmasqueraded.as_ref() == Some(&addresses)
            {
                continue;
            }
            routed = Some(wanted.clone());
            // A resync rewrites the egress table too, in case it was
            // flushed behind the agent's back.
            let egress =
                (full || unmasqueraded.as_ref() != Some(&addresses)).then(|| addresses.clone());
            let cidr = cluster_cidr.clone();
            // Netlink calls and nft block; they are few and short.
            let done = tokio::task::spawn_blocking(move || {
                let routes = wanted.program(routing);
                let egress = egress.map(|nodes| egress::program(&System, &cidr, &nodes));
                (routes, egress)
            })
            .await;
            match done {
                Ok((routes, egress)) => {
                    if let Err(failures) = routes {
                        routed = None;
                        for error in failures {
                            warn!(%error, "programming a node route failed; retrying within a minute");
                        }
                    }
                    match egress {
                        Some(Ok(())) => unmasqueraded = Some(addresses),
                        Some(Err(error)) => {
                            warn!(%error, "programming pod egress masquerading failed");
                            unmasqueraded = None;
                        }
                        None => {}
                    }
                }
                Err(error) => warn!(%error, "programming node routes panicked"),
            }
        }
    };
    tokio::join!(watch, program);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ip: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn every_other_node_with_a_pod_cidr_gets_a_route() {
        let nodes = [
            node("me", Some("10.244.0.0/24"), "192.168.90.1"),
            node("b", Some("10.244.1.7/24"), "192.168.90.2"),
            node("c", None, "192.168.90.3"),
            node("d", Some("10.244.3.0/24"), "fd00::4"),
        ];
        let plan = Plan::new(&nodes, "me");
        assert_eq!(plan.mine, PodCidr::parse("10.244.0.0/24").ok());
        let routes = |overlay| -> Vec<String> {
            plan.peers
                .iter()
                .map(|peer| peer.route(overlay).to_string())
                .collect()
        };
        assert_eq!(routes(None), ["10.244.1.0/24 via 192.168.90.2"]);
        // Into the overlay, through the peer's pod gateway.
        assert_eq!(routes(Some(7)), ["10.244.1.0/24 via 10.244.1.1 onlink"]);
    }
}
