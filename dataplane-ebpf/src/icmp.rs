//! ICMP errors about translated flows (TC only; XDP passes ICMP on).
//!
//! A backend (or a router on its way) that reports "port unreachable",
//! "fragmentation needed" and the like quotes the packet it got: the
//! backend's address and port. The client only knows the frontend, so the
//! quoted header is restored to the frontend (and, for SNATed flows, to the
//! client's own address and port) before the error is sent on; without
//! this, path-MTU discovery and fast failure break for every service.

use dataplane_common::{CT_FLAG_REPLY, CT_FLAG_SNAT, CtKey, checksum, counters::Reason};

use crate::{
    conntrack,
    counters::count,
    lb::{Verdict, drop},
    maps::WHARF_REV_NAT,
    nat::{self, deliver},
    packet::{L4Csum, Packet, load},
    parse::{ICMP_CSUM, IP_CSUM, IP_DADDR, IP_SADDR, IcmpError, L3_OFF, L4_DPORT, L4_SPORT},
};

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
