//! Ethernet/IPv4/TCP/UDP/ICMP frames for `BPF_PROG_TEST_RUN`, and checks
//! that recompute every checksum from scratch. Nothing here shares code
//! with the dataplane: a checksum bug there cannot hide behind the same
//! bug here.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const ETH_HLEN: usize = 14;

/// One's-complement sum of 16-bit big-endian words (odd byte padded).
fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn finish(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `bytes` (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    finish(sum(bytes, 0))
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, protocol]);
    pseudo.extend((len as u16).to_be_bytes());
    sum(&pseudo, 0)
}

/// Builds a frame: Ethernet, IPv4 with `options` (a multiple of 4 bytes),
/// and `l4` with its checksum field filled in (TCP/UDP over the pseudo
/// header, ICMP over itself).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + l4.len();
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend((total as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(options);
    let csum = checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut l4 = l4.to_vec();
    match protocol {
        TCP | UDP => {
            let at = if protocol == TCP { 16 } else { 6 };
            l4[at..at + 2].fill(0);
            let mut csum = finish(sum(&l4, pseudo_header_sum(src, dst, protocol, l4.len())));
            if protocol == UDP && csum == 0 {
                csum = 0xffff;
            }
            l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        ICMP => {
            l4[2..4].fill(0);
            let csum = checksum(&l4);
            l4[2..4].copy_from_slice(&csum.to_be_bytes());
        }
        _ => {}
    }
    frame.extend(ip);
    frame.extend(l4);
    frame
}

/// A TCP segment with `flags` and a few bytes of payload.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(src.port().to_be_bytes());
    l4.extend(dst.port().to_be_bytes());
    l4.extend(1000u32.to_be_bytes());
    l4.extend(0u32.to_be_bytes());
    l4.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend(b"GET");
    ipv4(*src.ip(), *dst.ip(), TCP, &[], &l4)
}

/// A UDP datagram; `zero_checksum` sends it without a checksum (legal
/// over IPv4).
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], zero_checksum: bool) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(src.port().to_be_bytes());
    l4.extend(dst.port().to_be_bytes());
    l4.extend(((8 + payload.len()) as u16).to_be_bytes());
    l4.extend([0, 0]);
    l4.extend(payload);
    let mut frame = ipv4(*src.ip(), *dst.ip(), UDP, &[], &l4);
    if zero_checksum {
        let at = ETH_HLEN + 20 + 6;
        frame[at..at + 2].fill(0);
    }
    frame
}

/// An ICMP "port unreachable" from `from` to `to`, quoting `quoted`'s IPv4
/// header and first 8 L4 bytes, as RFC 792 requires.
pub fn icmp_port_unreachable(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
    l4.extend(&quoted[ETH_HLEN..ETH_HLEN + 28]);
    ipv4(from, to, ICMP, &[], &l4)
}

/// What a test asserts on in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub protocol: u8,
}

/// The IPv4 header and payload, by the header's own lengths (clamped to
/// the frame, so fuzzed lengths cannot make a check panic).
fn ip_header(frame: &[u8]) -> (&[u8], &[u8]) {
    let ihl = (usize::from(frame[ETH_HLEN] & 0x0f) * 4).clamp(20, frame.len() - ETH_HLEN);
    let total = usize::from(u16::from_be_bytes([
        frame[ETH_HLEN + 2],
        frame[ETH_HLEN + 3],
    ]));
    let end = (ETH_HLEN + total).clamp(ETH_HLEN + ihl, frame.len());
    (
        &frame[ETH_HLEN..ETH_HLEN + ihl],
        &frame[ETH_HLEN + ihl..end],
    )
}

fn addr(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

/// The addresses and ports of a TCP/UDP frame.
pub fn headers(frame: &[u8]) -> Headers {
    let (ip, l4) = ip_header(frame);
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Headers {
        src: SocketAddrV4::new(addr(&ip[12..16]), port(0)),
        dst: SocketAddrV4::new(addr(&ip[16..20]), port(2)),
        protocol: ip[9],
    }
}

/// The quoted packet inside an ICMP error frame.
pub fn icmp_quoted(frame: &[u8]) -> Headers {
    let (_, icmp) = ip_header(frame);
    let quoted = &icmp[8..];
    let port = |at: usize| u16::from_be_bytes([quoted[20 + at], quoted[21 + at]]);
    Headers {
        src: SocketAddrV4::new(addr(&quoted[12..16]), port(0)),
        dst: SocketAddrV4::new(addr(&quoted[16..20]), port(2)),
        protocol: quoted[9],
    }
}

/// Whether every checksum in the frame verifies: the IPv4 header, the
/// L4 checksum (TCP/UDP with the pseudo header, UDP zero meaning none),
/// and for ICMP errors the ICMP checksum and the quoted IPv4 header's.
pub fn checksums_valid(frame: &[u8]) -> bool {
    let (ip, l4) = ip_header(frame);
    if checksum(ip) != 0 {
        return false;
    }
    let (src, dst, protocol) = (addr(&ip[12..16]), addr(&ip[16..20]), ip[9]);
    match protocol {
        UDP if l4[6..8] == [0, 0] => true,
        TCP | UDP => finish(sum(l4, pseudo_header_sum(src, dst, protocol, l4.len()))) == 0,
        ICMP => checksum(l4) == 0 && (l4.len() < 28 || checksum(&l4[8..28]) == 0),
        _ => true,
    }
}
