//! Header parsing. Offsets are relative to the start of the frame; every
//! read is bounds-checked against `data_end` (see `packet::load`), so a
//! truncated or garbage frame yields `Malformed` or `Pass`, never an
//! out-of-bounds access.

use dataplane_common::{CtKey, protocol};

use crate::packet::{Packet, header_at, load, read};

pub const ETH_HLEN: usize = 14;
/// Offset of the IPv4 header (no VLAN tags: tagged frames are passed).
pub const L3_OFF: usize = ETH_HLEN;
/// IPv4 header field offsets.
pub const IPV4_HLEN: usize = 20;
const IP_PROTOCOL: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// L4 field offsets (TCP and UDP share the port layout).
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
pub const ICMP_CSUM: usize = 2;
/// An ICMP error's quoted IPv4 header starts after type, code, checksum
/// and 4 unused bytes.
pub const ICMP_INNER_IP: usize = 8;

const ETH_P_IP: u16 = 0x0800u16.to_be();
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// Fragment offset and more-fragments bits of `frag_off` (host order).
const IP_FRAGMENT_MASK: u16 = 0x3fff;

/// A TCP or UDP packet's 5-tuple and where its headers are.
#[derive(Clone, Copy)]
pub struct Flow {
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
    /// A TCP FIN or RST: the connection is closing.
    pub closing: bool,
    /// IPv4 total length (host order), for FIB MTU checks.
    pub tot_len: u16,
}

impl Flow {
    #[inline(always)]
    pub fn ct_key(&self) -> CtKey {
        CtKey::new(
            self.saddr,
            self.daddr,
            self.sport,
            self.dport,
            self.protocol,
        )
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off
            + if self.protocol == protocol::UDP {
                UDP_CSUM
            } else {
                TCP_CSUM
            }
    }
}

/// An ICMP error quoting a TCP or UDP packet: the quoted packet is one we
/// sent (or translated), seen from the other side.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub icmp_off: usize,
    pub outer_saddr: u32,
    pub outer_daddr: u32,
    /// Offset of the quoted IPv4 header.
    pub inner_off: usize,
    pub inner: Flow,
}

pub enum Parsed {
    /// Not something the service dataplane translates (not IPv4, or
    /// another L4 protocol): pass untouched.
    Pass,
    /// Headers inconsistent or truncated: drop, counted.
    Malformed,
    /// An IP fragment: pass untouched, counted.
    Fragment,
    IcmpError(IcmpError),
    Flow(Flow),
}

#[inline(always)]
pub fn ipv4<P: Packet>(pkt: &P) -> Parsed {
    let Some(ethertype) = load::<P, u16>(pkt, 12) else {
        return Parsed::Pass;
    };
    if ethertype != ETH_P_IP {
        return Parsed::Pass;
    }
    let Some(ip) = header(pkt, L3_OFF) else {
        return Parsed::Malformed;
    };
    match ip.protocol {
        protocol::TCP | protocol::UDP => {}
        protocol::ICMP => return icmp_error(pkt, &ip),
        _ => return Parsed::Pass,
    }
    if ip.fragment {
        return Parsed::Fragment;
    }
    match ports(pkt, &ip) {
        Some(flow) => Parsed::Flow(flow),
        None => Parsed::Malformed,
    }
}

/// The parts of an IPv4 header the dataplane uses.
struct Ipv4 {
    l4_off: usize,
    saddr: u32,
    daddr: u32,
    protocol: u8,
    fragment: bool,
    tot_len: u16,
}

#[inline(always)]
fn header<P: Packet>(pkt: &P, off: usize) -> Option<Ipv4> {
    let version_ihl: u8 = load(pkt, off)?;
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return None;
    }
    let tot_len = u16::from_be(load(pkt, off + 2)?);
    if (tot_len as usize) < ihl * 4 {
        return None;
    }
    let frag_off = u16::from_be(load(pkt, off + 6)?);
    Some(Ipv4 {
        // IHL <= 15, so options (up to 40 bytes) are skipped with a bounded
        // offset the verifier accepts.
        l4_off: off + ihl * 4,
        saddr: load(pkt, off + IP_SADDR)?,
        daddr: load(pkt, off + IP_DADDR)?,
        protocol: load(pkt, off + IP_PROTOCOL)?,
        fragment: frag_off & IP_FRAGMENT_MASK != 0,
        tot_len,
    })
}

#[inline(always)]
fn ports<P: Packet>(pkt: &P, ip: &Ipv4) -> Option<Flow> {
    // The whole fixed L4 header must be there, so checksum rewrites later
    // stay in bounds.
    let l4_len = if ip.protocol == protocol::TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    // The IPv4 length must cover the L4 header the rewrite touches (the
    // kernel drops such packets anyway; translating them would be noise).
    if (ip.tot_len as usize) < ip.l4_off - L3_OFF + l4_len {
        return None;
    }
    let (l4, flags) = if ip.protocol == protocol::TCP {
        let l4 = header_at(pkt, ip.l4_off, TCP_HLEN)?;
        // SAFETY: `l4` covers TCP_HLEN bytes; the flags byte is inside.
        (l4, unsafe { read::<u8>(l4, TCP_FLAGS) })
    } else {
        (header_at(pkt, ip.l4_off, UDP_HLEN)?, 0)
    };
    Some(Flow {
        l4_off: ip.l4_off,
        saddr: ip.saddr,
        daddr: ip.daddr,
        // SAFETY: both headers start with the two ports.
        sport: unsafe { read(l4, L4_SPORT) },
        // SAFETY: as above.
        dport: unsafe { read(l4, L4_DPORT) },
        protocol: ip.protocol,
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        closing: flags & (TCP_FIN | TCP_RST) != 0,
        tot_len: ip.tot_len,
    })
}

#[inline(always)]
fn icmp_error<P: Packet>(pkt: &P, ip: &Ipv4) -> Parsed {
    if ip.fragment {
        return Parsed::Fragment;
    }
    let Some(icmp) = header_at(pkt, ip.l4_off, ICMP_INNER_IP) else {
        return Parsed::Malformed;
    };
    // SAFETY: `icmp` covers the 8-byte ICMP header; the type is its first byte.
    let icmp_type: u8 = unsafe { read(icmp, 0) };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
    ) {
        return Parsed::Pass;
    }
    let inner_off = ip.l4_off + ICMP_INNER_IP;
    // The quoted IPv4 header without options (RFC 792 senders rarely quote
    // options; such errors pass untouched rather than half-rewritten) and
    // the 8 bytes of L4 header every sender must quote.
    let Some(quote) = header_at(pkt, inner_off, IPV4_HLEN + 8) else {
        return Parsed::Pass;
    };
    // SAFETY: `quote` covers IPV4_HLEN + 8 bytes; every field read is in it.
    let (version_ihl, inner_protocol, inner_saddr, inner_daddr, sport, dport) = unsafe {
        (
            read::<u8>(quote, 0),
            read::<u8>(quote, IP_PROTOCOL),
            read::<u32>(quote, IP_SADDR),
            read::<u32>(quote, IP_DADDR),
            read::<u16>(quote, IPV4_HLEN + L4_SPORT),
            read::<u16>(quote, IPV4_HLEN + L4_DPORT),
        )
    };
    if version_ihl != 0x45 || !matches!(inner_protocol, protocol::TCP | protocol::UDP) {
        return Parsed::Pass;
    }
    Parsed::IcmpError(IcmpError {
        icmp_off: ip.l4_off,
        outer_saddr: ip.saddr,
        outer_daddr: ip.daddr,
        inner_off,
        inner: Flow {
            l4_off: inner_off + IPV4_HLEN,
            saddr: inner_saddr,
            daddr: inner_daddr,
            sport,
            dport,
            protocol: inner_protocol,
            syn: false,
            closing: false,
            tot_len: ip.tot_len,
        },
    })
}
