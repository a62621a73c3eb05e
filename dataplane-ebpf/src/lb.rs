//! Service lookup, backend selection and the per-packet pipeline shared by
//! TC and XDP.
//!
//! XDP is an accelerator. It finishes flows that leave by the device they
//! came in on (XDP_TX), and DNATs flows to local backends, marking them in
//! XDP metadata so TC skips them. Whatever else it cannot finish (a route
//! by another device, a neighbour not yet resolved, no metadata room, ICMP
//! errors) it passes *untouched*, and TC, attached to the same devices,
//! does the work. Both hooks share conntrack, so a flow TC opened is
//! accelerated by XDP from its next packet on.

use dataplane_common::{
    AFFINITY_CLIENT_ADDRESS, AffinityKey, AffinityValue, BACKEND_FLAG_TERMINATING, Backend,
    CT_FLAG_REPLY, CtValue, SERVICE_FLAG_EXTERNAL, SERVICE_FLAG_NODEPORT, ServiceKey, ServiceValue,
    counters::Reason,
    flow_hash::{flow_hash, maglev_slot},
};

use crate::{
    conntrack,
    counters::count,
    icmp,
    maps::{
        WHARF_AFFINITY, WHARF_BACKENDS, WHARF_MAGLEV, WHARF_NODEADDRS, WHARF_SERVICES,
        WHARF_SNATADDRS,
    },
    nat::{self, Route, RouteStatus},
    packet::Packet,
    parse::{self, Flow, Parsed},
};

/// What to do with the packet once the pipeline is done with it.
#[derive(Clone, Copy)]
pub enum Verdict {
    Pass,
    Drop,
    /// Out of `ifindex` with MAC addresses already set (XDP: only the
    /// ingress device, as XDP_TX).
    Redirect {
        ifindex: u32,
    },
    /// Out of `ifindex`, letting the kernel resolve the neighbour (TC only).
    RedirectNeigh {
        ifindex: u32,
    },
}

/// A frontend's slot-0 entry.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: ServiceKey,
    pub value: ServiceValue,
}

impl Frontend {
    #[inline(always)]
    pub fn is_nodeport(&self) -> bool {
        self.value.flags & SERVICE_FLAG_NODEPORT != 0
    }
}

pub fn process<P: Packet>(pkt: &mut P) -> Verdict {
    match parse::ipv4(pkt) {
        Parsed::Pass => Verdict::Pass,
        Parsed::Malformed => drop(pkt, Reason::DropMalformed),
        Parsed::Fragment => {
            count(Reason::PassFragment, pkt.len());
            Verdict::Pass
        }
        Parsed::IcmpError(error) if !P::XDP => icmp::reply_error(pkt, &error),
        Parsed::IcmpError(_) => Verdict::Pass,
        Parsed::Flow(flow) => flow_packet(pkt, &flow),
    }
}

/// Egress of the node's devices: only replies that a local process (a
/// backend on the node itself) sends for a translated flow are rewritten.
/// Everything else, including what ingress already translated and
/// redirected here, matches no reply entry and passes.
pub fn process_egress<P: Packet>(pkt: &mut P) -> Verdict {
    // Forwarded and redirected packets carry the device they came in by;
    // only locally sent ones (ingress index 0) can be such replies, so the
    // rest of the node's egress traffic costs no conntrack lookup.
    if pkt.ingress_ifindex() != 0 {
        return Verdict::Pass;
    }
    let Parsed::Flow(flow) = parse::ipv4(pkt) else {
        return Verdict::Pass;
    };
    match conntrack::track(&flow) {
        Some(entry) if entry.flags & CT_FLAG_REPLY != 0 => nat::reply_on_egress(pkt, &flow, &entry),
        _ => Verdict::Pass,
    }
}

#[inline(always)]
pub fn drop<P: Packet>(pkt: &P, reason: Reason) -> Verdict {
    count(reason, pkt.len());
    Verdict::Drop
}

#[inline(always)]
fn flow_packet<P: Packet>(pkt: &mut P, flow: &Flow) -> Verdict {
    if let Some(entry) = conntrack::track(flow) {
        if entry.flags & CT_FLAG_REPLY != 0 {
            return nat::reply(pkt, flow, &entry);
        }
        if let Some(backend) = established_backend(&entry, flow) {
            return nat::forward(pkt, flow, &entry, &backend, &Route::UNKNOWN);
        }
    }
    match lookup_frontend(flow.daddr, flow.dport, flow.protocol) {
        Some(frontend) => new_flow(pkt, flow, &frontend),
        None => {
            if flow.syn {
                conntrack::forget_stale_reply(flow);
            }
            Verdict::Pass
        }
    }
}

/// The backend an existing flow keeps, unless a new TCP connection (SYN)
/// reuses the 5-tuple of one whose backend is now terminating or gone, or
/// whose reply entry is gone: then the flow is opened afresh.
#[inline(always)]
fn established_backend(entry: &CtValue, flow: &Flow) -> Option<Backend> {
    let backend = backend(entry.backend_id)?;
    if flow.syn
        && (backend.flags & BACKEND_FLAG_TERMINATING != 0
            || !conntrack::has_reply(flow, entry, &backend))
    {
        return None;
    }
    Some(backend)
}

fn new_flow<P: Packet>(pkt: &mut P, flow: &Flow, frontend: &Frontend) -> Verdict {
    if frontend.value.count == 0 {
        return icmp::refuse(pkt, flow);
    }
    let hash = flow_hash(
        flow.saddr,
        flow.daddr,
        flow.sport,
        flow.dport,
        flow.protocol,
    );
    let Some(backend_id) = pick_backend(
        frontend,
        hash,
        u64::from(flow.saddr),
        AFFINITY_CLIENT_ADDRESS,
    ) else {
        return drop(pkt, Reason::DropStaleService);
    };
    let Some(backend) = backend(backend_id) else {
        return drop(pkt, Reason::DropStaleService);
    };
    let mut entry = CtValue {
        backend_id,
        rev_nat_id: frontend.value.rev_nat_id,
        node_address: if frontend.is_nodeport() {
            flow.daddr
        } else {
            0
        },
        ..CtValue::default()
    };
    let mut route = Route::UNKNOWN;
    if frontend.value.flags & SERVICE_FLAG_EXTERNAL != 0 {
        route = nat::route(pkt, flow.saddr, backend.address, flow);
        if route.egress() == Some(pkt.ingress_ifindex())
            && let Some(source) = snat_address(pkt, flow, frontend)
        {
            // The backend sits behind the device the client came in by:
            // without SNAT it would answer the client directly, and the
            // client would drop a reply from an address it never called.
            if P::XDP && route.status != RouteStatus::Resolved {
                return Verdict::Pass;
            }
            entry.flags |= dataplane_common::CT_FLAG_SNAT;
            entry.nat_address = source;
        }
    }
    let entry = match conntrack::open(flow, entry, &backend, hash) {
        Ok(entry) => entry,
        Err(reason) => return drop(pkt, reason),
    };
    nat::forward(pkt, flow, &entry, &backend, &route)
}

/// The node address to SNAT an external flow to: the one the client
/// called for a NodePort, else the ingress device's (no SNAT if the agent
/// gave it none).
#[inline(always)]
fn snat_address<P: Packet>(pkt: &P, flow: &Flow, frontend: &Frontend) -> Option<u32> {
    if frontend.is_nodeport() {
        return Some(flow.daddr);
    }
    // SAFETY: plain data, see `lookup_frontend`.
    unsafe { WHARF_SNATADDRS.get(pkt.ingress_ifindex()) }.copied()
}

/// Finds the frontend for a destination: an exact (VIP, port) match, or a
/// NodePort frontend when the address is one of this node's.
#[inline(always)]
pub fn lookup_frontend(address: u32, port: u16, protocol: u8) -> Option<Frontend> {
    let key = ServiceKey::new(address, port, protocol, 0);
    // SAFETY: service entries are plain data; a concurrent update can only
    // make us read a whole older or newer value (hash map values are
    // replaced, not written in place, by the agent).
    if let Some(value) = unsafe { WHARF_SERVICES.get(key) } {
        return Some(Frontend { key, value: *value });
    }
    // SAFETY: as above.
    unsafe { WHARF_NODEADDRS.get(address) }?;
    let key = ServiceKey::new(0, port, protocol, 0);
    // SAFETY: as above.
    let value = *unsafe { WHARF_SERVICES.get(key) }?;
    (value.flags & SERVICE_FLAG_NODEPORT != 0).then_some(Frontend { key, value })
}

/// Picks a backend for a new flow from `client`: with session affinity,
/// the one the client's last flow went to if that was within the timeout
/// and the backend still takes new flows (the agent forgets clients of
/// backends that leave the frontend); otherwise a fresh pick, remembered
/// for next time.
#[inline(always)]
pub fn pick_backend(frontend: &Frontend, hash: u32, client: u64, kind: u8) -> Option<u32> {
    // Slot 0 carries the affinity timeout in `backend_id`.
    let timeout = frontend.value.backend_id;
    if timeout == 0 {
        return select_backend(frontend, hash);
    }
    let key = AffinityKey {
        client,
        rev_nat_id: frontend.value.rev_nat_id,
        kind,
        _pad: [0; 3],
    };
    let now = conntrack::now();
    // SAFETY: plain data, see `lookup_frontend`.
    let remembered = unsafe { WHARF_AFFINITY.get(key) }.copied();
    // A terminating backend takes no new flows, unless the frontend has
    // nothing else (its slots then hold terminating backends only).
    let takes_new_flows = |b: Backend| {
        b.flags & BACKEND_FLAG_TERMINATING == 0
            || slot_backend(frontend, 1)
                .and_then(backend)
                .is_some_and(|first| first.flags & BACKEND_FLAG_TERMINATING != 0)
    };
    let backend_id = match remembered {
        Some(entry)
            if now.wrapping_sub(entry.last_used) <= timeout
                && backend(entry.backend_id).is_some_and(takes_new_flows) =>
        {
            entry.backend_id
        }
        _ => select_backend(frontend, hash)?,
    };
    // A failed insert (memory pressure) only costs the next flow its
    // affinity.
    let _ = WHARF_AFFINITY.insert(
        key,
        AffinityValue {
            backend_id,
            last_used: now,
        },
        0,
    );
    Some(backend_id)
}

/// Picks a backend for a new flow: the frontend's Maglev table when it has
/// one (so every node picks the same backend for the same flow), else
/// `hash % count` over its slots.
#[inline(always)]
fn select_backend(frontend: &Frontend, hash: u32) -> Option<u32> {
    if let Some(table) = WHARF_MAGLEV.get_ptr(frontend.value.rev_nat_id) {
        // SAFETY: `table` is a valid map value pointer from a successful
        // lookup; `maglev_slot` is < MAGLEV_TABLE_SIZE, the array's length.
        let id = unsafe { *(*table).backend_ids.get(maglev_slot(hash))? };
        return (id != 0).then_some(id);
    }
    let slot = (hash % frontend.value.count as u32) as u16 + 1;
    slot_backend(frontend, slot)
}

/// The backend id in one of a frontend's slots.
#[inline(always)]
pub fn slot_backend(frontend: &Frontend, slot: u16) -> Option<u32> {
    let key = ServiceKey {
        backend_slot: slot,
        ..frontend.key
    };
    // SAFETY: plain data, see `lookup_frontend`.
    unsafe { WHARF_SERVICES.get(key) }.map(|value| value.backend_id)
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: plain data, see `lookup_frontend`.
    unsafe { WHARF_BACKENDS.get(id) }.copied()
}
