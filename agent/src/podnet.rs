//! A pod's network attachment, over rtnetlink: a veth pair whose node
//! end stays in the node's namespace and whose other end is created
//! straight in the pod's, the pod's address and routes, and the node's
//! route back to the pod. wharf-cni drives it.
//!
//! The layout (as the CNI project's `ptp` plugin has it: point to point,
//! the gateway address on the node's veth end):
//!
//! ```text
//!  pod netns                         node netns
//!  eth0 10.244.1.5/32  ── veth ──  wh3f2a... 10.244.1.1/32
//!  10.244.1.1 dev eth0 scope link   10.244.1.5/32 dev wh3f2a...
//!  default via 10.244.1.1
//! ```
//!
//! Every node veth carries the podCIDR's gateway address, so a pod's ARP
//! for its gateway is answered by the node, and routing does the rest:
//! no bridge, no proxy ARP. The node end is tagged with an alias naming
//! the attachment, so leaked ones can be found (CNI GC).

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::{
    netlink::{
        self, Attrs, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NetlinkError, Socket,
    },
    routes::{RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, RTPROT_STATIC, Route, RoutesError},
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_UP: u32 = 1;

/// What marks a node veth as wharf's, in its alias.
pub const ALIAS_PREFIX: &str = "wharf-cni";

#[derive(Debug, thiserror::Error)]
pub enum PodnetError {
    #[error("network namespace {path}: {source}")]
    Namespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{0} has no interface index")]
    NoSuchLink(String),
    #[error(transparent)]
    Route(#[from] RoutesError),
    #[error("the attachment's thread panicked")]
    Panicked,
}

/// One pod attachment's wiring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wiring {
    /// The node end's name (see `host_ifname`).
    pub host_ifname: String,
    /// The pod end's name (CNI_IFNAME).
    pub pod_ifname: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// Names the attachment on the node end (see `alias`).
    pub alias: String,
}

/// The node end's name for an attachment: `wh` and 12 hex digits of a
/// hash of container ID and interface, within the 15 bytes Linux allows.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a: stable across builds and releases, unlike std's hasher.
    let hash = format!("{container_id}/{ifname}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("wh{:012x}", hash >> 16)
}

/// The alias tagging an attachment's node end.
pub fn alias(container_id: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}/{container_id}/{ifname}")
}

/// The hardware addresses of an attachment's two ends, for CNI results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Macs {
    pub host: Option<String>,
    pub pod: Option<String>,
}

/// Creates the attachment. A node end of the same name left by an
/// earlier try is removed first, so a retried ADD starts clean.
pub fn attach(netns: &Path, wiring: &Wiring) -> Result<Macs, PodnetError> {
    let namespace = open_namespace(netns)?;
    let mut node = route_socket("opening rtnetlink")?;
    delete_link(&mut node, &wiring.host_ifname)?;
    create_veth(&mut node, wiring, &namespace)?;
    let host = index(&wiring.host_ifname)?;
    // Tagged first: a plugin killed part-way leaves an end GC can find.
    set_alias(&mut node, host, &wiring.alias)?;
    let pod = wiring.clone();
    // The pod end is configured from a thread inside the pod's namespace
    // (a netlink socket works in the namespace it was opened in).
    let pod_mac = in_namespace(&namespace, netns, move || {
        let mut socket = route_socket("opening rtnetlink in the pod")?;
        set_up(&mut socket, index("lo")?, "lo")?;
        let link = index(&pod.pod_ifname)?;
        add_address(&mut socket, link, pod.address, &pod.pod_ifname)?;
        set_up(&mut socket, link, &pod.pod_ifname)?;
        add_route(&mut socket, pod.gateway, 32, None, link, RT_SCOPE_LINK)?;
        add_route(
            &mut socket,
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(pod.gateway),
            link,
            RT_SCOPE_UNIVERSE,
        )?;
        Ok(mac(&pod.pod_ifname))
    })?;
    add_address(&mut node, host, wiring.gateway, &wiring.host_ifname)?;
    set_up(&mut node, host, &wiring.host_ifname)?;
    add_route(&mut node, wiring.address, 32, None, host, RT_SCOPE_LINK)?;
    Ok(Macs {
        host: mac(&wiring.host_ifname),
        pod: pod_mac,
    })
}

/// Removes the attachment's node end (the pod end goes with it); false
/// if there was none.
pub fn detach(host_ifname: &str) -> Result<bool, PodnetError> {
    let mut node = route_socket("opening rtnetlink")?;
    delete_link(&mut node, host_ifname)
}

/// Whether the attachment is as `attach` left it: the node end exists,
/// and the pod end exists with its address.
pub fn check(netns: &Path, wiring: &Wiring) -> Result<Vec<String>, PodnetError> {
    let namespace = open_namespace(netns)?;
    let mut problems = Vec::new();
    if index(&wiring.host_ifname).is_err() {
        problems.push(format!("the node end {} is missing", wiring.host_ifname));
    }
    let (pod_ifname, address) = (wiring.pod_ifname.clone(), wiring.address);
    let found = in_namespace(&namespace, netns, move || {
        Ok(index(&pod_ifname).is_ok() && has_address(&pod_ifname, address))
    })?;
    if !found {
        problems.push(format!(
            "{} with {} is missing in the pod",
            wiring.pod_ifname, wiring.address
        ));
    }
    Ok(problems)
}

/// The node ends wharf-cni made: (name, alias).
pub fn attached() -> Result<Vec<(String, String)>, PodnetError> {
    let mut node = route_socket("opening rtnetlink")?;
    let replies = node
        .request(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0))
        .map_err(netlink_error("listing links"))?;
    Ok(replies
        .iter()
        .filter_map(|reply| {
            let attributes = reply.payload.get(16..)?;
            let name = c_string(netlink::find(attributes, IFLA_IFNAME)?)?;
            let alias = c_string(netlink::find(attributes, IFLA_IFALIAS)?)?;
            alias
                .strip_prefix(ALIAS_PREFIX)
                .is_some_and(|rest| rest.starts_with('/'))
                .then_some((name, alias))
        })
        .collect())
}

fn open_namespace(path: &Path) -> Result<File, PodnetError> {
    File::open(path).map_err(|source| PodnetError::Namespace {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).ok()
}

fn netlink_error(action: impl Into<String>) -> impl FnOnce(NetlinkError) -> PodnetError {
    let action = action.into();
    move |source| PodnetError::Netlink { action, source }
}

fn route_socket(action: &str) -> Result<Socket, PodnetError> {
    Socket::open(libc::NETLINK_ROUTE).map_err(netlink_error(action))
}

/// Runs `work` on a thread that has joined `namespace`.
fn in_namespace<T: Send + 'static>(
    namespace: &File,
    path: &Path,
    work: impl FnOnce() -> Result<T, PodnetError> + Send + 'static,
) -> Result<T, PodnetError> {
    let namespace = namespace
        .try_clone()
        .map_err(|source| PodnetError::Namespace {
            path: path.to_path_buf(),
            source,
        })?;
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: setns(2) on a descriptor this thread owns; it changes
        // this (short-lived) thread's network namespace only.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(PodnetError::Namespace {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        work()
    })
    .join()
    .map_err(|_| PodnetError::Panicked)?
}

/// An interface's index in the calling thread's namespace.
pub(crate) fn index(name: &str) -> Result<u32, PodnetError> {
    let c_name =
        std::ffi::CString::new(name).map_err(|_| PodnetError::NoSuchLink(name.to_string()))?;
    // SAFETY: if_nametoindex(3) reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        Err(PodnetError::NoSuchLink(name.to_string()))
    } else {
        Ok(index)
    }
}

/// Whether interface `name` carries `address` (as `ip -4 addr` would
/// list it), in the calling thread's namespace.
fn has_address(name: &str, address: Ipv4Addr) -> bool {
    let Ok(link) = index(name) else { return false };
    let Ok(mut socket) = route_socket("opening rtnetlink") else {
        return false;
    };
    const RTM_GETADDR: u16 = 22;
    let mut request = vec![libc::AF_INET as u8, 0, 0, 0];
    request.extend_from_slice(&0u32.to_ne_bytes());
    socket
        .request(RTM_GETADDR, NLM_F_DUMP, &request)
        .is_ok_and(|replies| {
            replies.iter().any(|reply| {
                let on_link = reply
                    .payload
                    .get(4..8)
                    .is_some_and(|i| u32::from_ne_bytes(i.try_into().expect("4 bytes")) == link);
                let local = reply
                    .payload
                    .get(8..)
                    .and_then(|a| netlink::find(a, IFA_LOCAL))
                    .and_then(|v| <[u8; 4]>::try_from(v).ok());
                on_link && local == Some(address.octets())
            })
        })
}

/// `struct ifinfomsg`: family, type, index, flags, change.
pub(crate) fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut message = vec![0u8; 4];
    message.extend_from_slice(&index.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&change.to_ne_bytes());
    message
}

fn create_veth(node: &mut Socket, wiring: &Wiring, namespace: &File) -> Result<(), PodnetError> {
    let mut peer = ifinfomsg(0, 0, 0);
    let mut peer_attributes = Attrs::new();
    peer_attributes
        .put_str(IFLA_IFNAME, &wiring.pod_ifname)
        .put_u32(IFLA_MTU, wiring.mtu)
        .put_u32(IFLA_NET_NS_FD, namespace.as_raw_fd() as u32);
    peer.extend(peer_attributes.into_bytes());
    let mut attributes = Attrs::new();
    attributes
        .put_str(IFLA_IFNAME, &wiring.host_ifname)
        .put_u32(IFLA_MTU, wiring.mtu)
        .nested(IFLA_LINKINFO, |info| {
            info.put_str(IFLA_INFO_KIND, "veth")
                .nested(IFLA_INFO_DATA, |data| {
                    data.put(VETH_INFO_PEER, &peer);
                });
        });
    let mut message = ifinfomsg(0, 0, 0);
    message.extend(attributes.into_bytes());
    node.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &message)
        .map(drop)
        .map_err(netlink_error(format!(
            "creating veth {} / {}",
            wiring.host_ifname, wiring.pod_ifname
        )))
}

/// Deletes a link by name; false if there was none.
pub(crate) fn delete_link(socket: &mut Socket, name: &str) -> Result<bool, PodnetError> {
    let Ok(link) = index(name) else {
        return Ok(false);
    };
    match socket.request(RTM_DELLINK, 0, &ifinfomsg(link, 0, 0)) {
        Ok(_) => Ok(true),
        // Gone in between (its pod's namespace was deleted).
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
        Err(source) => Err(PodnetError::Netlink {
            action: format!("deleting {name}"),
            source,
        }),
    }
}

pub(crate) fn set_up(socket: &mut Socket, link: u32, name: &str) -> Result<(), PodnetError> {
    socket
        .request(RTM_NEWLINK, 0, &ifinfomsg(link, IFF_UP, IFF_UP))
        .map(drop)
        .map_err(netlink_error(format!("setting {name} up")))
}

fn set_alias(socket: &mut Socket, link: u32, alias: &str) -> Result<(), PodnetError> {
    let mut message = ifinfomsg(link, 0, 0);
    let mut attributes = Attrs::new();
    attributes.put_str(IFLA_IFALIAS, alias);
    message.extend(attributes.into_bytes());
    socket
        .request(RTM_NEWLINK, 0, &message)
        .map(drop)
        .map_err(netlink_error(format!("setting the alias of link {link}")))
}

/// Adds `address`/32 to a link (replacing an equal one).
pub(crate) fn add_address(
    socket: &mut Socket,
    link: u32,
    address: Ipv4Addr,
    name: &str,
) -> Result<(), PodnetError> {
    // struct ifaddrmsg: family, prefix length, flags, scope, index.
    let mut message = vec![libc::AF_INET as u8, 32, 0, RT_SCOPE_UNIVERSE];
    message.extend_from_slice(&link.to_ne_bytes());
    let mut attributes = Attrs::new();
    attributes
        .put(IFA_LOCAL, &address.octets())
        .put(IFA_ADDRESS, &address.octets());
    message.extend(attributes.into_bytes());
    socket
        .request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &message)
        .map(drop)
        .map_err(netlink_error(format!("adding {address}/32 to {name}")))
}

/// Adds (or replaces) a route to `destination`/`prefix` out of `link`,
/// through `gateway` if given.
fn add_route(
    socket: &mut Socket,
    destination: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    link: u32,
    scope: u8,
) -> Result<(), PodnetError> {
    Route {
        destination,
        prefix,
        gateway,
        oif: Some(link),
        scope,
        protocol: RTPROT_STATIC,
        onlink: false,
    }
    .replace(socket)
    .map_err(PodnetError::from)
}

/// A link's hardware address, in the calling thread's namespace.
fn mac(name: &str) -> Option<String> {
    let link = index(name).ok()?;
    let mut socket = route_socket("opening rtnetlink").ok()?;
    let replies = socket
        .request(RTM_GETLINK, 0, &ifinfomsg(link, 0, 0))
        .ok()?;
    let address = netlink::find(replies.first()?.payload.get(16..)?, IFLA_ADDRESS)?;
    Some(
        address
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_end_names_are_short_stable_and_distinct() {
        let a = host_ifname("abc123", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("wh"));
        assert_eq!(a, host_ifname("abc123", "eth0"));
        assert_ne!(a, host_ifname("abc123", "eth1"));
        assert_ne!(a, host_ifname("abc124", "eth0"));
    }
}
