//! The kernel's IPVS table through its generic-netlink family ("IPVS",
//! `include/uapi/linux/ip_vs.h`), behind the small `Ipvs` trait the proxy
//! programs; tests use an in-memory table instead.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::{
    netlink::{self, Attrs, NLM_F_DUMP, NetlinkError, Socket},
    proxy::Protocol,
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const IPVS_GENL_VERSION: u8 = 1;
const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_SET_SERVICE: u8 = 2;
const IPVS_CMD_DEL_SERVICE: u8 = 3;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_SET_DEST: u8 = 6;
const IPVS_CMD_DEL_DEST: u8 = 7;
const IPVS_CMD_GET_DEST: u8 = 8;
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;
const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
/// Connections from one client (netmask /32) stick to one real server.
const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// Forwarding by rewriting the destination (NAT), as kube-proxy does.
const IP_VS_CONN_F_MASQ: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("the kernel has no IPVS (generic-netlink family \"IPVS\" not found; is ip_vs loaded?)")]
    Unavailable,
    #[error("IPVS {operation} {subject}: {source}")]
    Netlink {
        operation: &'static str,
        subject: String,
        #[source]
        source: NetlinkError,
    },
}

/// A virtual server's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualKey {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for VirtualKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// How a virtual server schedules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduling {
    /// `rr`, `wrr`, `sh`, ... (an `ip_vs_<name>` module must be loaded).
    pub scheduler: String,
    /// Session affinity: persistence timeout in seconds.
    pub persistence: Option<u32>,
}

/// A real server: weight 0 takes no new connections but keeps its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RealServer {
    pub address: SocketAddrV4,
    pub weight: u32,
}

/// What the proxy needs of an IPVS table.
pub trait Ipvs {
    fn services(&mut self) -> Result<Vec<(VirtualKey, Scheduling)>, IpvsError>;
    /// Adds the service, or updates its scheduling if it exists.
    fn put_service(
        &mut self,
        key: &VirtualKey,
        scheduling: &Scheduling,
        exists: bool,
    ) -> Result<(), IpvsError>;
    fn remove_service(&mut self, key: &VirtualKey) -> Result<(), IpvsError>;
    fn real_servers(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>, IpvsError>;
    /// Adds the real server, or updates its weight if it exists.
    fn put_real_server(
        &mut self,
        key: &VirtualKey,
        server: &RealServer,
        exists: bool,
    ) -> Result<(), IpvsError>;
    fn remove_real_server(
        &mut self,
        key: &VirtualKey,
        address: SocketAddrV4,
    ) -> Result<(), IpvsError>;
}

/// The running kernel's IPVS table (the calling thread's network
/// namespace).
#[derive(Debug)]
pub struct Kernel {
    socket: Socket,
    family: u16,
}

impl Kernel {
    pub fn open() -> Result<Self, IpvsError> {
        let error = |source| IpvsError::Netlink {
            operation: "open",
            subject: "generic netlink".into(),
            source,
        };
        let mut socket = Socket::open(libc::NETLINK_GENERIC).map_err(error)?;
        let mut attrs = Attrs::new();
        attrs.put_str(CTRL_ATTR_FAMILY_NAME, "IPVS");
        let replies =
            match socket.request(GENL_ID_CTRL, 0, &genl_message(CTRL_CMD_GETFAMILY, 1, attrs)) {
                Ok(replies) => replies,
                Err(e) if e.errno() == Some(libc::ENOENT) => return Err(IpvsError::Unavailable),
                Err(e) => return Err(error(e)),
            };
        let family = replies
            .iter()
            .find_map(|r| {
                let value = netlink::find(r.payload.get(4..)?, CTRL_ATTR_FAMILY_ID)?;
                Some(u16::from_ne_bytes(value.try_into().ok()?))
            })
            .ok_or(IpvsError::Unavailable)?;
        Ok(Self { socket, family })
    }

    /// Whether this kernel has IPVS (for `auto` and cleanup).
    pub fn available() -> bool {
        Self::open().is_ok()
    }

    fn call(
        &mut self,
        command: u8,
        flags: u16,
        attrs: Attrs,
        operation: &'static str,
        subject: &dyn std::fmt::Display,
    ) -> Result<Vec<Vec<u8>>, IpvsError> {
        let replies = self
            .socket
            .request(
                self.family,
                flags,
                &genl_message(command, IPVS_GENL_VERSION, attrs),
            )
            .map_err(|source| IpvsError::Netlink {
                operation,
                subject: subject.to_string(),
                source,
            })?;
        Ok(replies
            .into_iter()
            .filter_map(|r| r.payload.get(4..).map(<[u8]>::to_vec))
            .collect())
    }
}

/// A generic-netlink message: the genl header, then the attributes.
fn genl_message(command: u8, version: u8, attrs: Attrs) -> Vec<u8> {
    let mut message = vec![command, version, 0, 0];
    message.extend(attrs.into_bytes());
    message
}

/// IPVS addresses are 16 bytes (an `nf_inet_addr`); IPv4 uses the first 4.
fn inet_addr(address: Ipv4Addr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&address.octets());
    bytes
}

fn service_key_attrs(attrs: &mut Attrs, key: &VirtualKey) {
    attrs
        .put_u16(IPVS_SVC_ATTR_AF, libc::AF_INET as u16)
        .put_u16(IPVS_SVC_ATTR_PROTOCOL, u16::from(key.protocol.number()))
        .put(IPVS_SVC_ATTR_ADDR, &inet_addr(key.address))
        .put(IPVS_SVC_ATTR_PORT, &key.port.to_be_bytes());
}

fn parse_service(bytes: &[u8]) -> Option<(VirtualKey, Scheduling)> {
    let protocol = u16::from_ne_bytes(
        netlink::find(bytes, IPVS_SVC_ATTR_PROTOCOL)?
            .try_into()
            .ok()?,
    );
    let address: [u8; 4] = netlink::find(bytes, IPVS_SVC_ATTR_ADDR)?
        .get(..4)?
        .try_into()
        .ok()?;
    let port: [u8; 2] = netlink::find(bytes, IPVS_SVC_ATTR_PORT)?.try_into().ok()?;
    let scheduler = netlink::find(bytes, IPVS_SVC_ATTR_SCHED_NAME)?;
    let flags = u32::from_ne_bytes(
        netlink::find(bytes, IPVS_SVC_ATTR_FLAGS)?
            .get(..4)?
            .try_into()
            .ok()?,
    );
    let timeout = u32::from_ne_bytes(
        netlink::find(bytes, IPVS_SVC_ATTR_TIMEOUT)?
            .try_into()
            .ok()?,
    );
    Some((
        VirtualKey {
            address: Ipv4Addr::from(address),
            port: u16::from_be_bytes(port),
            protocol: Protocol::from_number(u8::try_from(protocol).ok()?)?,
        },
        Scheduling {
            scheduler: String::from_utf8_lossy(scheduler)
                .trim_end_matches('\0')
                .to_string(),
            persistence: (flags & IP_VS_SVC_F_PERSISTENT != 0).then_some(timeout),
        },
    ))
}

fn parse_real_server(bytes: &[u8]) -> Option<RealServer> {
    let address: [u8; 4] = netlink::find(bytes, IPVS_DEST_ATTR_ADDR)?
        .get(..4)?
        .try_into()
        .ok()?;
    let port: [u8; 2] = netlink::find(bytes, IPVS_DEST_ATTR_PORT)?.try_into().ok()?;
    let weight = u32::from_ne_bytes(
        netlink::find(bytes, IPVS_DEST_ATTR_WEIGHT)?
            .try_into()
            .ok()?,
    );
    Some(RealServer {
        address: SocketAddrV4::new(Ipv4Addr::from(address), u16::from_be_bytes(port)),
        weight,
    })
}

impl Ipvs for Kernel {
    fn services(&mut self) -> Result<Vec<(VirtualKey, Scheduling)>, IpvsError> {
        let replies = self.call(
            IPVS_CMD_GET_SERVICE,
            NLM_F_DUMP,
            Attrs::new(),
            "list",
            &"services",
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| parse_service(netlink::find(r, IPVS_CMD_ATTR_SERVICE)?))
            .collect())
    }

    fn put_service(
        &mut self,
        key: &VirtualKey,
        scheduling: &Scheduling,
        exists: bool,
    ) -> Result<(), IpvsError> {
        let mut attrs = Attrs::new();
        attrs.nested(IPVS_CMD_ATTR_SERVICE, |service| {
            service_key_attrs(service, key);
            let flags = if scheduling.persistence.is_some() {
                IP_VS_SVC_F_PERSISTENT
            } else {
                0
            };
            let mut flag_bytes = flags.to_ne_bytes().to_vec();
            flag_bytes.extend(u32::MAX.to_ne_bytes());
            service
                .put_str(IPVS_SVC_ATTR_SCHED_NAME, &scheduling.scheduler)
                .put(IPVS_SVC_ATTR_FLAGS, &flag_bytes)
                .put_u32(IPVS_SVC_ATTR_TIMEOUT, scheduling.persistence.unwrap_or(0))
                .put(IPVS_SVC_ATTR_NETMASK, &u32::MAX.to_be_bytes());
        });
        let (command, operation) = if exists {
            (IPVS_CMD_SET_SERVICE, "update")
        } else {
            (IPVS_CMD_NEW_SERVICE, "add")
        };
        self.call(command, 0, attrs, operation, key).map(drop)
    }

    fn remove_service(&mut self, key: &VirtualKey) -> Result<(), IpvsError> {
        let mut attrs = Attrs::new();
        attrs.nested(IPVS_CMD_ATTR_SERVICE, |service| {
            service_key_attrs(service, key)
        });
        self.call(IPVS_CMD_DEL_SERVICE, 0, attrs, "remove", key)
            .map(drop)
    }

    fn real_servers(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>, IpvsError> {
        let mut attrs = Attrs::new();
        attrs.nested(IPVS_CMD_ATTR_SERVICE, |service| {
            service_key_attrs(service, key)
        });
        let replies = self.call(
            IPVS_CMD_GET_DEST,
            NLM_F_DUMP,
            attrs,
            "list real servers of",
            key,
        )?;
        Ok(replies
            .iter()
            .filter_map(|r| parse_real_server(netlink::find(r, IPVS_CMD_ATTR_DEST)?))
            .collect())
    }

    fn put_real_server(
        &mut self,
        key: &VirtualKey,
        server: &RealServer,
        exists: bool,
    ) -> Result<(), IpvsError> {
        let mut attrs = Attrs::new();
        attrs
            .nested(IPVS_CMD_ATTR_SERVICE, |service| {
                service_key_attrs(service, key)
            })
            .nested(IPVS_CMD_ATTR_DEST, |dest| {
                dest.put(IPVS_DEST_ATTR_ADDR, &inet_addr(*server.address.ip()))
                    .put(IPVS_DEST_ATTR_PORT, &server.address.port().to_be_bytes())
                    .put_u32(IPVS_DEST_ATTR_FWD_METHOD, IP_VS_CONN_F_MASQ)
                    .put_u32(IPVS_DEST_ATTR_WEIGHT, server.weight)
                    .put_u32(IPVS_DEST_ATTR_U_THRESH, 0)
                    .put_u32(IPVS_DEST_ATTR_L_THRESH, 0)
                    .put_u16(IPVS_DEST_ATTR_ADDR_FAMILY, libc::AF_INET as u16);
            });
        let (command, operation) = if exists {
            (IPVS_CMD_SET_DEST, "update real server of")
        } else {
            (IPVS_CMD_NEW_DEST, "add real server to")
        };
        self.call(command, 0, attrs, operation, key).map(drop)
    }

    fn remove_real_server(
        &mut self,
        key: &VirtualKey,
        address: SocketAddrV4,
    ) -> Result<(), IpvsError> {
        let mut attrs = Attrs::new();
        attrs
            .nested(IPVS_CMD_ATTR_SERVICE, |service| {
                service_key_attrs(service, key)
            })
            .nested(IPVS_CMD_ATTR_DEST, |dest| {
                dest.put(IPVS_DEST_ATTR_ADDR, &inet_addr(*address.ip()))
                    .put(IPVS_DEST_ATTR_PORT, &address.port().to_be_bytes());
            });
        self.call(IPVS_CMD_DEL_DEST, 0, attrs, "remove real server from", key)
            .map(drop)
    }
}

/// An in-memory IPVS table for tests, with the kernel's rules for
/// duplicate and missing entries.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeIpvs {
    pub table: std::collections::BTreeMap<VirtualKey, (Scheduling, Vec<RealServer>)>,
    /// Mutating calls made, for tests that count them.
    pub calls: usize,
}

#[cfg(test)]
impl Ipvs for FakeIpvs {
    fn services(&mut self) -> Result<Vec<(VirtualKey, Scheduling)>, IpvsError> {
        Ok(self
            .table
            .iter()
            .map(|(k, (s, _))| (*k, s.clone()))
            .collect())
    }

    fn put_service(
        &mut self,
        key: &VirtualKey,
        scheduling: &Scheduling,
        exists: bool,
    ) -> Result<(), IpvsError> {
        self.calls += 1;
        assert_eq!(exists, self.table.contains_key(key), "{key}: EEXIST/ENOENT");
        self.table.entry(*key).or_default().0 = scheduling.clone();
        Ok(())
    }

    fn remove_service(&mut self, key: &VirtualKey) -> Result<(), IpvsError> {
        self.calls += 1;
        assert!(self.table.remove(key).is_some(), "{key}: ENOENT");
        Ok(())
    }

    fn real_servers(&mut self, key: &VirtualKey) -> Result<Vec<RealServer>, IpvsError> {
        Ok(self
            .table
            .get(key)
            .map(|(_, r)| r.clone())
            .unwrap_or_default())
    }

    fn put_real_server(
        &mut self,
        key: &VirtualKey,
        server: &RealServer,
        exists: bool,
    ) -> Result<(), IpvsError> {
        self.calls += 1;
        let servers = &mut self.table.get_mut(key).expect("service exists").1;
        let position = servers.iter().position(|s| s.address == server.address);
        assert_eq!(
            exists,
            position.is_some(),
            "{key} {}: EEXIST/ENOENT",
            server.address
        );
        match position {
            Some(at) => servers[at] = *server,
            None => servers.push(*server),
        }
        Ok(())
    }

    fn remove_real_server(
        &mut self,
        key: &VirtualKey,
        address: SocketAddrV4,
    ) -> Result<(), IpvsError> {
        self.calls += 1;
        let servers = &mut self.table.get_mut(key).expect("service exists").1;
        let before = servers.len();
        servers.retain(|s| s.address != address);
        assert_eq!(servers.len() + 1, before, "{key} {address}: ENOENT");
        Ok(())
    }
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            scheduler: "rr".into(),
            persistence: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_real_server_attributes_parse_back() {
        let key = VirtualKey {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let mut attrs = Attrs::new();
        service_key_attrs(&mut attrs, &key);
        attrs
            .put_str(IPVS_SVC_ATTR_SCHED_NAME, "rr")
            .put(IPVS_SVC_ATTR_FLAGS, &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
            .put_u32(IPVS_SVC_ATTR_TIMEOUT, 60);
        let (parsed, scheduling) = parse_service(&attrs.into_bytes()).unwrap();
        assert_eq!(parsed, key);
        assert_eq!(
            scheduling,
            Scheduling {
                scheduler: "rr".into(),
                persistence: Some(60)
            }
        );

        let mut attrs = Attrs::new();
        attrs
            .put(
                IPVS_DEST_ATTR_ADDR,
                &inet_addr(Ipv4Addr::new(10, 244, 0, 11)),
            )
            .put(IPVS_DEST_ATTR_PORT, &8080u16.to_be_bytes())
            .put_u32(IPVS_DEST_ATTR_WEIGHT, 0);
        assert_eq!(
            parse_real_server(&attrs.into_bytes()),
            Some(RealServer {
                address: "10.244.0.11:8080".parse().unwrap(),
                weight: 0
            })
        );
    }
}
