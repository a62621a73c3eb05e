//! Forgetting stale UDP flows in the kernel's conntrack table, through
//! ctnetlink: one dump, then a delete per matching entry. Used by the
//! modes whose translation state lives in conntrack (iptables, nftables,
//! IPVS); the eBPF mode keeps its own flow table.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::{
    netlink::{self, Attrs, NLM_F_DUMP, NetlinkError, Socket},
    proxy::{Protocol, StaleUdp},
};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack {operation}: {source}")]
    Netlink {
        operation: &'static str,
        #[source]
        source: NetlinkError,
    },
}

/// One direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    source: SocketAddrV4,
    destination: SocketAddrV4,
    protocol: u8,
}

impl Tuple {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let ip = netlink::find(bytes, CTA_TUPLE_IP)?;
        let proto = netlink::find(bytes, CTA_TUPLE_PROTO)?;
        let address = |kind| -> Option<Ipv4Addr> {
            let value: [u8; 4] = netlink::find(ip, kind)?.try_into().ok()?;
            Some(Ipv4Addr::from(value))
        };
        // Ports are in network byte order; ICMP entries have none.
        let port = |kind| -> Option<u16> {
            let value: [u8; 2] = netlink::find(proto, kind)?.try_into().ok()?;
            Some(u16::from_be_bytes(value))
        };
        Some(Self {
            source: SocketAddrV4::new(address(CTA_IP_V4_SRC)?, port(CTA_PROTO_SRC_PORT)?),
            destination: SocketAddrV4::new(address(CTA_IP_V4_DST)?, port(CTA_PROTO_DST_PORT)?),
            protocol: *netlink::find(proto, CTA_PROTO_NUM)?.first()?,
        })
    }

    fn put(&self, attrs: &mut Attrs, kind: u16) {
        attrs.nested(kind, |tuple| {
            tuple
                .nested(CTA_TUPLE_IP, |ip| {
                    ip.put(CTA_IP_V4_SRC, &self.source.ip().octets())
                        .put(CTA_IP_V4_DST, &self.destination.ip().octets());
                })
                .nested(CTA_TUPLE_PROTO, |proto| {
                    proto
                        .put(CTA_PROTO_NUM, &[self.protocol])
                        .put(CTA_PROTO_SRC_PORT, &self.source.port().to_be_bytes())
                        .put(CTA_PROTO_DST_PORT, &self.destination.port().to_be_bytes());
                });
        });
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    original: Tuple,
    reply: Tuple,
    /// Network byte order, as the kernel sends it.
    zone: Option<[u8; 2]>,
}

impl Flow {
    /// Whether this flow is one `stale` names.
    fn is(&self, stale: &StaleUdp) -> bool {
        let frontend = &stale.frontend;
        let to_frontend = self.original.protocol == Protocol::Udp.number()
            && self.original.destination.port() == frontend.port
            // A NodePort frontend (0.0.0.0) answers on every node address.
            && (frontend.address.is_unspecified()
                || *self.original.destination.ip() == frontend.address);
        to_frontend
            && match stale.backend {
                Some(backend) => self.reply.source == backend,
                // Untranslated: the reply would come from where the
                // client sent it.
                None => self.reply.source == self.original.destination,
            }
    }
}

/// Deletes the UDP flows `stale` names from the calling thread's network
/// namespace; returns how many went.
pub fn forget_udp(stale: &[StaleUdp]) -> Result<usize, ConntrackError> {
    if stale.is_empty() {
        return Ok(0);
    }
    let error = |operation| move |source| ConntrackError::Netlink { operation, source };
    let mut socket = Socket::open(libc::NETLINK_NETFILTER).map_err(error("socket"))?;
    let replies = socket
        .request(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_DUMP,
            &nfgenmsg(),
        )
        .map_err(error("dump"))?;
    let mut deleted = 0;
    for reply in replies {
        let Some(flow) = reply.payload.get(4..).and_then(parse_flow) else {
            continue;
        };
        if !stale.iter().any(|s| flow.is(s)) {
            continue;
        }
        let mut attrs = Attrs::new();
        flow.original.put(&mut attrs, CTA_TUPLE_ORIG);
        if let Some(zone) = flow.zone {
            attrs.put(CTA_ZONE, &zone);
        }
        let mut message = nfgenmsg();
        message.extend(attrs.into_bytes());
        match socket.request(
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
            0,
            &message,
        ) {
            Ok(_) => deleted += 1,
            // Expired between the dump and now: just as good.
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(error("delete")(e)),
        }
    }
    Ok(deleted)
}

fn parse_flow(attrs: &[u8]) -> Option<Flow> {
    Some(Flow {
        original: Tuple::parse(netlink::find(attrs, CTA_TUPLE_ORIG)?)?,
        reply: Tuple::parse(netlink::find(attrs, CTA_TUPLE_REPLY)?)?,
        zone: netlink::find(attrs, CTA_ZONE).and_then(|z| z.try_into().ok()),
    })
}

/// The netfilter header: IPv4, version 0, resource id 0.
fn nfgenmsg() -> Vec<u8> {
    vec![libc::AF_INET as u8, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::FrontendKey;

    fn tuple(source: &str, destination: &str) -> Tuple {
        Tuple {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            protocol: 17,
        }
    }

    #[test]
    fn flows_parse_back_from_their_attributes_and_match_stale_entries() {
        let flow = Flow {
            original: tuple("10.244.0.20:40053", "10.96.0.10:53"),
            reply: tuple("10.244.0.11:5353", "10.244.0.20:40053"),
            zone: None,
        };
        let mut attrs = Attrs::new();
        flow.original.put(&mut attrs, CTA_TUPLE_ORIG);
        flow.reply.put(&mut attrs, CTA_TUPLE_REPLY);
        assert_eq!(parse_flow(&attrs.into_bytes()), Some(flow));

        let frontend = FrontendKey {
            address: "10.96.0.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let stale = |backend: Option<&str>| StaleUdp {
            frontend,
            backend: backend.map(|b| b.parse().unwrap()),
        };
        assert!(flow.is(&stale(Some("10.244.0.11:5353"))));
        assert!(!flow.is(&stale(Some("10.244.0.12:5353"))));
        assert!(!flow.is(&stale(None)), "translated flows are kept");
        let untranslated = Flow {
            reply: tuple("10.96.0.10:53", "10.244.0.20:40053"),
            ..flow
        };
        assert!(untranslated.is(&stale(None)));
        let node_port = StaleUdp {
            frontend: FrontendKey {
                address: Ipv4Addr::UNSPECIFIED,
                ..frontend
            },
            backend: Some("10.244.0.11:5353".parse().unwrap()),
        };
        assert!(flow.is(&node_port), "a NodePort matches any node address");
    }
}
