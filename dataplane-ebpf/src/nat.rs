//! Rewrites of one flow's packets: DNAT (and SNAT) toward the backend,
//! reverse NAT of replies, and the FIB lookups that send them on.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};
use dataplane_common::{Backend, CT_FLAG_SNAT, CtValue, counters::Reason, protocol};

use crate::{
    counters::count,
    lb::{Verdict, drop},
    maps::WHARF_REV_NAT,
    packet::{L4Csum, Packet},
    parse::{Flow, IP_CSUM, IP_DADDR, IP_SADDR, L3_OFF, L4_DPORT, L4_SPORT},
};

const AF_INET: u8 = 2;

/// The FIB's answer for a destination. A plain struct passed by
/// reference: as an enum (or inside an Option) LLVM packs the MAC arrays
/// into registers with shifts the verifier rejects on stack pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route {
    pub ifindex: u32,
    pub status: RouteStatus,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RouteStatus {
    /// Not looked up, or no route: the stack decides.
    Unknown = 0,
    /// Next hop and MACs known.
    Resolved = 1,
    /// Egress device known, neighbour not yet resolved.
    NoNeighbour = 2,
}

impl Route {
    pub const UNKNOWN: Route = Route {
        ifindex: 0,
        status: RouteStatus::Unknown,
        smac: [0; 6],
        dmac: [0; 6],
    };

    /// The egress device, if the FIB knows it.
    #[inline(always)]
    pub fn egress(&self) -> Option<u32> {
        (self.status != RouteStatus::Unknown).then_some(self.ifindex)
    }
}

/// Looks up how `daddr` is reached from the ingress device.
#[inline(always)]
pub fn route<P: Packet>(pkt: &P, saddr: u32, daddr: u32, flow: &Flow) -> Route {
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is valid.
    let mut params: bpf_fib_lookup = unsafe { zeroed() };
    params.family = AF_INET;
    params.l4_protocol = flow.protocol;
    // XDP frames are never GSO, so their length is checked against the
    // route MTU. TC leaves it 0: the kernel then checks the skb itself,
    // which lets GSO super-packets (tens of KB) through instead of
    // answering FRAG_NEEDED for them.
    if P::XDP {
        params.__bindgen_anon_1.tot_len = flow.tot_len;
    }
    params.ifindex = pkt.ingress_ifindex();
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: `params` is a live, correctly sized stack struct and the
    // context pointer is the program's own.
    let ret = unsafe {
        fib_lookup(
            pkt.ctx_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let status = match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => RouteStatus::Resolved,
        BPF_FIB_LKUP_RET_NO_NEIGH => RouteStatus::NoNeighbour,
        _ => RouteStatus::Unknown,
    };
    Route {
        ifindex: params.ifindex,
        status,
        smac: params.smac,
        dmac: params.dmac,
    }
}

/// Rewrites an established or new flow's packet toward its backend.
#[inline(always)]
pub fn forward<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    entry: &CtValue,
    backend: &Backend,
    route: &Route,
) -> Verdict {
    let snat = entry.flags & CT_FLAG_SNAT != 0;
    let looked_up;
    let route = if snat && route.status == RouteStatus::Unknown {
        looked_up = self::route(pkt, flow.saddr, backend.address, flow);
        &looked_up
    } else {
        route
    };
    // XDP finishes a SNATed flow only by XDP_TX; a DNAT-only one it passes
    // up marked, and without the mark TC would take it for a new direct
    // connection. Either way, if it cannot, TC does it all from conntrack.
    if P::XDP
        && (if snat {
            !sends_back_out(pkt, route)
        } else {
            !pkt.mark_translated()
        })
    {
        return Verdict::Pass;
    }
    let rewritten = rewrite_addr(pkt, flow, IP_DADDR, flow.daddr, backend.address)
        .and_then(|()| rewrite_port(pkt, flow, L4_DPORT, flow.dport, backend.port))
        .and_then(|()| {
            if snat {
                rewrite_addr(pkt, flow, IP_SADDR, flow.saddr, entry.nat_address)?;
                rewrite_port(pkt, flow, L4_SPORT, flow.sport, entry.nat_port)
            } else {
                Ok(())
            }
        });
    if rewritten.is_err() {
        return drop(pkt, Reason::DropMalformed);
    }
    count(
        if P::XDP {
            Reason::XdpDnat
        } else {
            Reason::TcDnat
        },
        pkt.len(),
    );
    if snat {
        deliver(pkt, route)
    } else {
        Verdict::Pass
    }
}

/// Restores a reply's source to the frontend (and, for SNATed flows, its
/// destination to the client), then sends it straight on: its new source
/// may be a node address, which the stack would drop as martian on input.
#[inline(always)]
pub fn reply<P: Packet>(pkt: &mut P, flow: &Flow, entry: &CtValue) -> Verdict {
    let Some(rewrite) = ReplyRewrite::of(flow, entry) else {
        // The service is gone; its entries are being purged.
        return Verdict::Pass;
    };
    let route = route(pkt, rewrite.saddr, rewrite.daddr, flow);
    if P::XDP && !sends_back_out(pkt, &route) {
        return Verdict::Pass;
    }
    if rewrite.apply(pkt, flow).is_err() {
        return drop(pkt, Reason::DropMalformed);
    }
    count(
        if P::XDP {
            Reason::XdpRevNat
        } else {
            Reason::TcRevNat
        },
        pkt.len(),
    );
    deliver(pkt, &route)
}

/// A reply leaving the node from a local process: a backend on the node
/// itself (host network) answering a flow TC or XDP translated. It is
/// already on its way out, so it is only rewritten.
#[inline(always)]
pub fn reply_on_egress<P: Packet>(pkt: &mut P, flow: &Flow, entry: &CtValue) -> Verdict {
    let Some(rewrite) = ReplyRewrite::of(flow, entry) else {
        return Verdict::Pass;
    };
    if rewrite.apply(pkt, flow).is_err() {
        return drop(pkt, Reason::DropMalformed);
    }
    count(Reason::TcRevNat, pkt.len());
    Verdict::Pass
}

/// What a reply's addresses and ports become.
struct ReplyRewrite {
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
}

impl ReplyRewrite {
    /// The frontend as source; for SNATed flows, the client as destination.
    /// None when the frontend's reverse-NAT entry is gone.
    #[inline(always)]
    fn of(flow: &Flow, entry: &CtValue) -> Option<Self> {
        // SAFETY: plain data, see `lb::lookup_frontend`.
        let rev_nat = (unsafe { WHARF_REV_NAT.get(entry.rev_nat_id) }).copied()?;
        let snat = entry.flags & CT_FLAG_SNAT != 0;
        Some(Self {
            saddr: if rev_nat.address != 0 {
                rev_nat.address
            } else {
                entry.node_address
            },
            sport: rev_nat.port,
            daddr: if snat { entry.nat_address } else { flow.daddr },
            dport: if snat { entry.nat_port } else { flow.dport },
        })
    }

    #[inline(always)]
    fn apply<P: Packet>(&self, pkt: &mut P, flow: &Flow) -> Result<(), ()> {
        rewrite_addr(pkt, flow, IP_SADDR, flow.saddr, self.saddr)?;
        rewrite_port(pkt, flow, L4_SPORT, flow.sport, self.sport)?;
        rewrite_addr(pkt, flow, IP_DADDR, flow.daddr, self.daddr)?;
        rewrite_port(pkt, flow, L4_DPORT, flow.dport, self.dport)
    }
}

/// XDP can only finish a packet that leaves by the device it came in on
/// with a resolved next hop (XDP_TX).
#[inline(always)]
fn sends_back_out<P: Packet>(pkt: &P, route: &Route) -> bool {
    route.status == RouteStatus::Resolved && route.ifindex == pkt.ingress_ifindex()
}

/// Sends a rewritten packet along `route`.
#[inline(always)]
pub fn deliver<P: Packet>(pkt: &mut P, route: &Route) -> Verdict {
    match route.status {
        RouteStatus::Resolved => {
            if pkt
                .store(0, route.dmac)
                .and_then(|()| pkt.store(6, route.smac))
                .is_err()
            {
                return drop(pkt, Reason::DropMalformed);
            }
            Verdict::Redirect {
                ifindex: route.ifindex,
            }
        }
        RouteStatus::NoNeighbour => Verdict::RedirectNeigh {
            ifindex: route.ifindex,
        },
        RouteStatus::Unknown => Verdict::Pass,
    }
}

/// Rewrites the source or destination address (`field`: `IP_SADDR` or
/// `IP_DADDR`) and fixes the IPv4 and L4 checksums.
#[inline(always)]
pub fn rewrite_addr<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    field: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    pkt.store(L3_OFF + field, new)?;
    pkt.l3_csum_replace(L3_OFF + IP_CSUM, old, new)?;
    pkt.l4_csum_replace4(l4_csum(flow, true), old, new)
}

/// Rewrites the source or destination port and fixes the L4 checksum.
#[inline(always)]
pub fn rewrite_port<P: Packet>(
    pkt: &mut P,
    flow: &Flow,
    field: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    pkt.store(flow.l4_off + field, new)?;
    pkt.l4_csum_replace2(l4_csum(flow, false), old, new)
}

#[inline(always)]
fn l4_csum(flow: &Flow, pseudo: bool) -> L4Csum {
    L4Csum {
        off: flow.l4_csum_off(),
        udp: flow.protocol == protocol::UDP,
        pseudo,
    }
}
