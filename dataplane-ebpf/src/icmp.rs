//! ICMP errors (TC only; XDP passes ICMP on, and hands refusals to TC).
//!
//! Refusals: a new flow to a frontend without backends is answered with
//! "port unreachable", as kube-proxy's REJECT rules do, so the client's
//! connect() or connected send fails at once instead of timing out.
//!
//! Translated errors:
//! A backend (or a router on its way) that reports "port unreachable",
//! "fragmentation needed" and the like quotes the packet it got: the
//! backend's address and port. The client only knows the frontend, so the
//! quoted header is restored to the frontend (and, for SNATed flows, to the
//! client's own address and port) before the error is sent on; without
//! this, path-MTU discovery and fast failure break for every service.

use dataplane_common::{CT_FLAG_REPLY, CT_FLAG_SNAT, CtKey, checksum, counters::Reason, protocol};

use crate::{
    conntrack,
    counters::count,
    lb::{Verdict, drop},
    maps::WHARF_REV_NAT,
    nat::{self, deliver},
    packet::{L4Csum, Packet, header_at, load, read},
    parse::{
        ETH_HLEN, Flow, ICMP_CSUM, IP_CSUM, IP_DADDR, IP_SADDR, IPV4_HLEN, IcmpError, L3_OFF,
        L4_DPORT, L4_SPORT,
    },
};

const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// What an error quotes of the refused packet: its IPv4 header (without
/// options) and the first 8 bytes of its L4 header (RFC 792).
const QUOTE_LEN: usize = IPV4_HLEN + 8;
/// Where the error's own headers go: after the Ethernet header, in front
/// of the quote.
const ERROR_ROOM: u32 = (IPV4_HLEN + ICMP_HLEN) as u32;
const ERROR_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTE_LEN;

/// Answers the first packet of a flow to a frontend without backends with
/// an ICMP port unreachable from the frontend's address, sent back out of
/// the device it came in by. XDP passes the packet for TC to do this.
pub fn refuse<P: Packet>(pkt: &mut P, flow: &Flow) -> Verdict {
    if P::XDP {
        return Verdict::Pass;
    }
    count(Reason::RejectNoBackend, pkt.len());
    // Only an IPv4 header without options is quoted whole at a fixed
    // offset; such packets (rare) are dropped as before.
    if flow.l4_off != L3_OFF + IPV4_HLEN {
        return Verdict::Drop;
    }
    let (Some(destination), Some(source)) =
        (load::<P, [u8; 6]>(pkt, 0), load::<P, [u8; 6]>(pkt, 6))
    else {
        return Verdict::Drop;
    };
    let ingress = pkt.ingress_ifindex();
    let total = (IPV4_HLEN + ICMP_HLEN + QUOTE_LEN) as u16;
    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol::ICMP;
    // Addresses as loaded from the packet (network order in memory).
    ip[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
    let ip_csum = !checksum::fold(sum_words(&ip));
    ip[10..12].copy_from_slice(&ip_csum.to_ne_bytes());
    let icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    let write = |pkt: &mut P| -> Result<(), ()> {
        pkt.make_room(ERROR_ROOM, ERROR_LEN as u32)?;
        pkt.store(0, source)?;
        pkt.store(6, destination)?;
        pkt.store(L3_OFF, ip)?;
        pkt.store(L3_OFF + IPV4_HLEN, icmp)?;
        // The ICMP checksum covers its header and the quote, now in place.
        let start = L3_OFF + IPV4_HLEN;
        let message = header_at(pkt, start, ICMP_HLEN + QUOTE_LEN).ok_or(())?;
        let mut sum = 0u32;
        for word in 0..(ICMP_HLEN + QUOTE_LEN) / 2 {
            // SAFETY: `message` covers ICMP_HLEN + QUOTE_LEN bytes.
            sum += u32::from(unsafe { read::<u16>(message, word * 2) });
        }
        pkt.store(start + ICMP_CSUM, !checksum::fold(sum))
    };
    match write(pkt) {
        Ok(()) => Verdict::Redirect { ifindex: ingress },
        Err(()) => Verdict::Drop,
    }
}

/// The one's-complement sum of a header's 16-bit words, as loaded.
#[inline(always)]
fn sum_words(bytes: &[u8; IPV4_HLEN]) -> u32 {
    let mut sum = 0u32;
    for word in 0..IPV4_HLEN / 2 {
        sum += u32::from(u16::from_ne_bytes([bytes[word * 2], bytes[word * 2 + 1]]));
    }
    sum
}

pub fn reply_error<P: Packet>(pkt: &mut P, error: &IcmpError) -> Verdict {
    let inner = &error.inner;
    // The quoted packet went client -> backend; its flow's reply entry is
    // keyed backend -> client.
    let key = CtKey::new(
        inner.daddr,
        inner.saddr,
        inner.dport,
        inner.sport,
        inner.protocol,
    );
    let Some(entry) = conntrack::lookup(&key) else {
        return Verdict::Pass;
    };
    if entry.flags & CT_FLAG_REPLY == 0 {
        return Verdict::Pass;
    }
    // SAFETY: plain data, see `lb::lookup_frontend`.
    let Some(rev_nat) = (unsafe { WHARF_REV_NAT.get(entry.rev_nat_id) }).copied() else {
        return Verdict::Pass;
    };
    let frontend = if rev_nat.address != 0 {
        rev_nat.address
    } else {
        entry.node_address
    };
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let client = if snat {
        entry.nat_address
    } else {
        error.outer_daddr
    };
    let route = nat::route(pkt, frontend, client, inner);

    let mut rewrite = || -> Result<(), ()> {
        rewrite_quoted_addr(pkt, error, IP_DADDR, inner.daddr, frontend)?;
        rewrite_quoted_port(pkt, error, L4_DPORT, inner.dport, rev_nat.port)?;
        if snat {
            rewrite_quoted_addr(pkt, error, IP_SADDR, inner.saddr, entry.nat_address)?;
            rewrite_quoted_port(pkt, error, L4_SPORT, inner.sport, entry.nat_port)?;
            rewrite_outer_addr(pkt, IP_DADDR, error.outer_daddr, entry.nat_address)?;
        }
        // The backend's own host reported it: it speaks as the frontend.
        if error.outer_saddr == inner.daddr {
            rewrite_outer_addr(pkt, IP_SADDR, error.outer_saddr, frontend)?;
        }
        Ok(())
    };
    if rewrite().is_err() {
        return drop(pkt, Reason::DropMalformed);
    }
    count(Reason::IcmpErrorTranslated, pkt.len());
    deliver(pkt, &route)
}

#[inline(always)]
fn icmp_csum(error: &IcmpError) -> L4Csum {
    L4Csum {
        off: error.icmp_off + ICMP_CSUM,
        udp: false,
        pseudo: false,
    }
}

/// Rewrites an address of the quoted IPv4 header, its header checksum, and
/// the ICMP checksum that covers both.
#[inline(always)]
fn rewrite_quoted_addr<P: Packet>(
    pkt: &mut P,
    error: &IcmpError,
    field: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    let csum_off = error.inner_off + IP_CSUM;
    let old_csum: u16 = load(pkt, csum_off).ok_or(())?;
    let new_csum = checksum::replace_u32(old_csum, old, new);
    pkt.store(error.inner_off + field, new)?;
    pkt.store(csum_off, new_csum)?;
    pkt.l4_csum_replace4(icmp_csum(error), old, new)?;
    pkt.l4_csum_replace2(icmp_csum(error), old_csum, new_csum)
}

/// Rewrites a port of the quoted L4 header and the ICMP checksum. The
/// quoted L4 checksum is left alone: the quote is truncated, so nobody can
/// verify it.
#[inline(always)]
fn rewrite_quoted_port<P: Packet>(
    pkt: &mut P,
    error: &IcmpError,
    field: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    pkt.store(error.inner.l4_off + field, new)?;
    pkt.l4_csum_replace2(icmp_csum(error), old, new)
}

/// Rewrites an outer address; ICMP has no pseudo header, so only the IPv4
/// header checksum changes.
#[inline(always)]
fn rewrite_outer_addr<P: Packet>(pkt: &mut P, field: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    pkt.store(L3_OFF + field, new)?;
    pkt.l3_csum_replace(L3_OFF + IP_CSUM, old, new)
}
