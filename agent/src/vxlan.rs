//! The VXLAN overlay (`--routing vxlan`), for nodes that do not share an
//! L2 segment: pod traffic to another node is wrapped in UDP to that
//! node's address, so the network between nodes only needs to route node
//! addresses, never pod ones.
//!
//! The layout is flannel's: one device per node, no multicast and no
//! learning, every peer written in statically from the API server's
//! Nodes.
//!
//! ```text
//!  node A (192.168.1.1, pods 10.244.1.0/24)
//!  wharf-vxlan  10.244.1.1/32, MAC 0e:77:c0:a8:01:01, VNI 1, UDP 8472
//!  route  10.244.2.0/24 via 10.244.2.1 dev wharf-vxlan onlink
//!  neigh  10.244.2.1 lladdr 0e:77:c0:a8:02:01        (node B's VTEP)
//!  fdb    0e:77:c0:a8:02:01 dst 192.168.2.1          (node B's address)
//! ```
//!
//! A VTEP's MAC is derived from its node's address, so a peer's entries
//! follow from its Node alone. The device carries the node's pod gateway
//! address, so traffic the node itself sends to remote pods leaves from
//! an address the remote side routes back through the overlay.

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::{
    netdev,
    netlink::{
        self, Attrs, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NetlinkError, Socket,
    },
    podnet::{self, PodnetError},
};

/// The overlay device's name.
pub const DEVICE: &str = "wharf-vxlan";
/// The VXLAN network identifier: one overlay per cluster.
pub const VNI: u32 = 1;
/// The UDP port: Linux's own VXLAN default, also flannel's and Cilium's.
pub const PORT: u16 = 8472;
/// Bytes VXLAN adds to each packet: outer Ethernet (14), IPv4 (20), UDP
/// (8) and the VXLAN header (8). Pods get the underlay MTU minus this, so
/// a full-sized pod packet still fits the underlay once wrapped.
pub const OVERHEAD: u32 = 50;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LINK: u16 = 3;
const IFLA_VXLAN_LOCAL: u16 = 4;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NTF_SELF: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("no device of this node has {address}, the address to carry the overlay")]
    NoUnderlay { address: Ipv4Addr },
    #[error("the overlay's underlay {device}: {source}")]
    Underlay {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Link(#[from] PodnetError),
}

fn netlink_error(action: impl Into<String>) -> impl FnOnce(NetlinkError) -> VxlanError {
    let action = action.into();
    move |source| VxlanError::Netlink { action, source }
}

fn route_socket() -> Result<Socket, VxlanError> {
    Socket::open(libc::NETLINK_ROUTE).map_err(netlink_error("opening rtnetlink"))
}

/// The VTEP MAC of the node at `address`: locally administered, unicast,
/// the address in its last four bytes.
pub fn vtep_mac(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x0e, 0x77, a, b, c, d]
}

/// This node's end of the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// The node's address: the outer source, and what peers send to.
    pub local: Ipv4Addr,
    /// The device that has it: the outer packets' way out.
    pub underlay: u32,
    /// The underlay's MTU.
    pub underlay_mtu: u32,
}

/// What the kernel has for a link, as far as the overlay cares.
#[derive(Debug, Default, PartialEq, Eq)]
struct Link {
    index: u32,
    mtu: u32,
    kind: Option<String>,
    vni: Option<u32>,
    local: Option<Ipv4Addr>,
    port: Option<u16>,
    underlay: Option<u32>,
}

/// The link named `name`, if there is one.
fn link(socket: &mut Socket, name: &str) -> Result<Option<Link>, VxlanError> {
    let Ok(index) = podnet::index(name) else {
        return Ok(None);
    };
    let replies = match socket.request(RTM_GETLINK, 0, &podnet::ifinfomsg(index, 0, 0)) {
        Ok(replies) => replies,
        Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
        Err(source) => {
            return Err(VxlanError::Netlink {
                action: format!("reading link {name}"),
                source,
            });
        }
    };
    let Some(attributes) = replies.first().and_then(|r| r.payload.get(16..)) else {
        return Ok(None);
    };
    let u32_of = |bytes: Option<&[u8]>| {
        bytes
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_ne_bytes)
    };
    let mut found = Link {
        index,
        mtu: u32_of(netlink::find(attributes, IFLA_MTU)).unwrap_or(0),
        ..Link::default()
    };
    if let Some(info) = netlink::find(attributes, IFLA_LINKINFO) {
        found.kind = netlink::find(info, IFLA_INFO_KIND).and_then(podnet::c_string);
        if let Some(data) = netlink::find(info, IFLA_INFO_DATA) {
            found.vni = u32_of(netlink::find(data, IFLA_VXLAN_ID));
            found.underlay = u32_of(netlink::find(data, IFLA_VXLAN_LINK));
            found.local = netlink::find(data, IFLA_VXLAN_LOCAL)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(Ipv4Addr::from);
            found.port = netlink::find(data, IFLA_VXLAN_PORT)
                .and_then(|b| <[u8; 2]>::try_from(b).ok())
                .map(u16::from_be_bytes);
        }
    }
    Ok(Some(found))
}

impl Overlay {
    /// The overlay of the node at `local`: found on the device that has
    /// that address.
    pub fn for_node(local: Ipv4Addr) -> Result<Self, VxlanError> {
        let underlay = netdev::holding(local)
            .ok()
            .flatten()
            .ok_or(VxlanError::NoUnderlay { address: local })?;
        let device = |source| VxlanError::Underlay {
            device: underlay.clone(),
            source,
        };
        Ok(Self {
            local,
            underlay: netdev::ifindex(&underlay).map_err(device)?,
            underlay_mtu: netdev::mtu(&underlay).map_err(device)?,
        })
    }

    /// The MTU inside the overlay: the pods' MTU.
    pub fn mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(OVERHEAD)
    }

    fn wanted(&self, index: u32) -> Link {
        Link {
            index,
            mtu: self.mtu(),
            kind: Some("vxlan".into()),
            vni: Some(VNI),
            local: Some(self.local),
            port: Some(PORT),
            underlay: Some(self.underlay),
        }
    }

    /// Makes the device as this overlay wants it, up, with `gateway` (the
    /// node's pod gateway, once it has a podCIDR); returns its index. A
    /// device that is already right is kept, so an agent restart does
    /// not interrupt traffic; one that differs is made anew.
    pub fn ensure(&self, gateway: Option<Ipv4Addr>) -> Result<u32, VxlanError> {
        let mut socket = route_socket()?;
        let index = match link(&mut socket, DEVICE)? {
            Some(have) if have == self.wanted(have.index) => have.index,
            Some(_) => {
                podnet::delete_link(&mut socket, DEVICE)?;
                self.create(&mut socket)?
            }
            None => self.create(&mut socket)?,
        };
        podnet::set_up(&mut socket, index, DEVICE)?;
        if let Some(gateway) = gateway {
            podnet::add_address(&mut socket, index, gateway, DEVICE)?;
        }
        // Replies to pods on other nodes may come back over the underlay
        // rather than the overlay (a peer node answering from its own
        // address): strict reverse-path filtering would drop them.
        let path = format!("/proc/sys/net/ipv4/conf/{DEVICE}/rp_filter");
        std::fs::write(&path, "2").map_err(|source| VxlanError::Sysctl { path, source })?;
        Ok(index)
    }

    fn create(&self, socket: &mut Socket) -> Result<u32, VxlanError> {
        let mut attributes = Attrs::new();
        attributes
            .put_str(IFLA_IFNAME, DEVICE)
            .put(IFLA_ADDRESS, &vtep_mac(self.local))
            .put_u32(IFLA_MTU, self.mtu())
            .nested(IFLA_LINKINFO, |info| {
                info.put_str(IFLA_INFO_KIND, "vxlan")
                    .nested(IFLA_INFO_DATA, |data| {
                        data.put_u32(IFLA_VXLAN_ID, VNI)
                            .put(IFLA_VXLAN_LOCAL, &self.local.octets())
                            .put_u32(IFLA_VXLAN_LINK, self.underlay)
                            .put(IFLA_VXLAN_PORT, &PORT.to_be_bytes())
                            .put(IFLA_VXLAN_LEARNING, &[0]);
                    });
            });
        let mut message = podnet::ifinfomsg(0, 0, 0);
        message.extend(attributes.into_bytes());
        socket
            .request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &message)
            .map_err(netlink_error(format!("creating {DEVICE}")))?;
        Ok(podnet::index(DEVICE)?)
    }
}

/// Removes the device, and with it every route, neighbour and
/// forwarding entry on it; true if it was there.
pub fn remove() -> Result<bool, VxlanError> {
    Ok(podnet::delete_link(&mut route_socket()?, DEVICE)?)
}

/// A peer node's VTEP: where its pods' gateway's frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// The peer's address (the outer destination).
    pub node: Ipv4Addr,
    /// The peer's pod gateway (the next hop of its podCIDR's route).
    pub gateway: Ipv4Addr,
}

/// `struct ndmsg`: family, padding, index, state, flags, type.
fn ndmsg(family: u8, index: u32, state: u16, flags: u8) -> Vec<u8> {
    let mut message = vec![family, 0, 0, 0];
    message.extend_from_slice(&index.to_ne_bytes());
    message.extend_from_slice(&state.to_ne_bytes());
    message.extend_from_slice(&[flags, 0]);
    message
}

/// One neighbour entry of the device: an ARP entry (`family` AF_INET,
/// `ip` the gateway) or a forwarding entry (AF_BRIDGE, `ip` the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    family: u8,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

impl Entry {
    fn message(&self, index: u32) -> Vec<u8> {
        let flags = if self.family == libc::AF_BRIDGE as u8 {
            NTF_SELF
        } else {
            0
        };
        let mut message = ndmsg(self.family, index, NUD_PERMANENT, flags);
        let mut attributes = Attrs::new();
        attributes
            .put(NDA_DST, &self.ip.octets())
            .put(NDA_LLADDR, &self.mac);
        message.extend(attributes.into_bytes());
        message
    }
}

/// The entries the device has, of both families.
fn entries(socket: &mut Socket, index: u32) -> Result<BTreeSet<Entry>, VxlanError> {
    let mut found = BTreeSet::new();
    for family in [libc::AF_INET as u8, libc::AF_BRIDGE as u8] {
        let replies = socket
            .request(RTM_GETNEIGH, NLM_F_DUMP, &ndmsg(family, 0, 0, 0))
            .map_err(netlink_error(format!("listing the neighbours of {DEVICE}")))?;
        found.extend(replies.iter().filter_map(|reply| {
            let header = reply.payload.get(..12)?;
            let on_device = u32::from_ne_bytes(header[4..8].try_into().ok()?) == index;
            let permanent = u16::from_ne_bytes(header[8..10].try_into().ok()?) == NUD_PERMANENT;
            if !on_device || !permanent {
                return None;
            }
            let attributes = &reply.payload[12..];
            Some(Entry {
                family,
                ip: <[u8; 4]>::try_from(netlink::find(attributes, NDA_DST)?)
                    .ok()?
                    .into(),
                mac: netlink::find(attributes, NDA_LLADDR)?.try_into().ok()?,
            })
        }));
    }
    Ok(found)
}

/// The ARP and forwarding entries that `peers` need.
fn wanted_entries(peers: &BTreeSet<Peer>) -> BTreeSet<Entry> {
    peers
        .iter()
        .flat_map(|peer| {
            let mac = vtep_mac(peer.node);
            [
                Entry {
                    family: libc::AF_INET as u8,
                    ip: peer.gateway,
                    mac,
                },
                Entry {
                    family: libc::AF_BRIDGE as u8,
                    ip: peer.node,
                    mac,
                },
            ]
        })
        .collect()
}

/// Converges the device's ARP and forwarding entries (device `index`) to
/// those of `peers`: stale ones removed, missing ones written.
pub fn converge(index: u32, peers: &BTreeSet<Peer>) -> Result<(), VxlanError> {
    let mut socket = route_socket()?;
    let have = entries(&mut socket, index)?;
    let wanted = wanted_entries(peers);
    for stale in have.difference(&wanted) {
        match socket.request(RTM_DELNEIGH, 0, &stale.message(index)) {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(VxlanError::Netlink {
                    action: format!("removing {stale:?} from {DEVICE}"),
                    source,
                });
            }
        }
    }
    for missing in wanted.difference(&have) {
        socket
            .request(
                RTM_NEWNEIGH,
                NLM_F_CREATE | NLM_F_REPLACE,
                &missing.message(index),
            )
            .map_err(netlink_error(format!("adding {missing:?} to {DEVICE}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_needs_an_arp_and_a_forwarding_entry_to_its_vtep() {
        let peers = BTreeSet::from([Peer {
            node: Ipv4Addr::new(192, 168, 2, 1),
            gateway: Ipv4Addr::new(10, 244, 2, 1),
        }]);
        let mac = [0x0e, 0x77, 192, 168, 2, 1];
        assert_eq!(vtep_mac(Ipv4Addr::new(192, 168, 2, 1)), mac);
        assert_eq!(
            wanted_entries(&peers),
            BTreeSet::from([
                Entry {
                    family: libc::AF_INET as u8,
                    ip: Ipv4Addr::new(10, 244, 2, 1),
                    mac
                },
                Entry {
                    family: libc::AF_BRIDGE as u8,
                    ip: Ipv4Addr::new(192, 168, 2, 1),
                    mac
                },
            ])
        );
    }

    #[test]
    fn the_overlay_takes_fifty_bytes_of_the_underlay_mtu() {
        let overlay = Overlay {
            local: Ipv4Addr::new(192, 168, 1, 1),
            underlay: 2,
            underlay_mtu: 1500,
        };
        assert_eq!(overlay.mtu(), 1450);
    }
}
