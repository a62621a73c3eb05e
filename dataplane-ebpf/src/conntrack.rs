//! Conntrack: two entries per translated flow, one per direction, so the
//! first lookup of every packet finds what to do with it.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use dataplane_common::{
    Backend, CT_FLAG_CLOSING, CT_FLAG_REPLY, CT_FLAG_SNAT, CtKey, CtValue, counters::Reason,
};

use crate::{
    maps::{WHARF_CT, WHARF_REV_NAT},
    parse::Flow,
};

/// SNAT source ports: below Linux's default ephemeral range (32768-60999)
/// so they never collide with the node's own connections to a backend,
/// and many, since a closed flow keeps its port for 10 s or more: a node
/// SNATing 300 new connections a second to one backend holds about 6,000
/// (the 4,536 ports above the range ran out).
const NAT_PORT_MIN: u32 = 1_024;
const NAT_PORT_COUNT: u32 = 32_768 - NAT_PORT_MIN;
/// Ports tried before giving up; each try is one map insert, and only new
/// flows whose first choice is taken pay for more than one.
const NAT_PORT_TRIES: u32 = 8;
/// Spreads the tries over the range (prime, coprime to the range size,
/// 31,744 = 2^10 * 31).
const NAT_PORT_STRIDE: u32 = 1_009;

/// CLOCK_MONOTONIC seconds: the unit of `CtValue::last_seen`.
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: plain helper call without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

/// Looks up the entry for `flow`'s packet and records the packet on it:
/// when the flow was last active (one write a second at most) and whether
/// it is closing (TCP FIN or RST), which the agent's expiry reads.
#[inline(always)]
pub fn track(flow: &Flow) -> Option<CtValue> {
    let entry = WHARF_CT.get_ptr_mut(flow.ct_key())?;
    let now = now();
    // SAFETY: `entry` points at a live map value. Another CPU may update
    // the same fields at once; either write records the same activity.
    unsafe {
        if (*entry).last_seen != now {
            (*entry).last_seen = now;
        }
        if flow.closing && (*entry).flags & CT_FLAG_CLOSING == 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
        } else if flow.syn && (*entry).flags & CT_FLAG_CLOSING != 0 {
            // A new connection on the tuple of a closed one.
            (*entry).flags &= !CT_FLAG_CLOSING;
        }
        Some(*entry)
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<CtValue> {
    // SAFETY: plain data; LRU eviction of this entry while we read it can
    // at worst yield a stale copy, which is what any lookup can return.
    unsafe { WHARF_CT.get(key) }.copied()
}

/// A client opening a direct connection (a SYN to no service) on a
/// 5-tuple whose reverse is a translated flow's reply entry: that flow is
/// over (the client reused its source port), and the entry would rewrite
/// the new connection's SYN-ACK to come from the frontend. Forget the
/// flow, both directions: a lone original-direction entry would later
/// translate requests whose replies nothing translates back.
#[inline(always)]
pub fn forget_stale_reply(flow: &Flow) {
    let reverse = flow.ct_key().reversed();
    let Some(entry) = lookup(&reverse) else {
        return;
    };
    if entry.flags & CT_FLAG_REPLY == 0 {
        return;
    }
    let _ = WHARF_CT.remove(reverse);
    // SAFETY: plain data, see `lb::lookup_frontend`.
    if let Some(rev_nat) = unsafe { WHARF_REV_NAT.get(entry.rev_nat_id) } {
        let frontend = if rev_nat.address != 0 {
            rev_nat.address
        } else {
            entry.node_address
        };
        let _ = WHARF_CT.remove(CtKey::new(
            flow.saddr,
            frontend,
            flow.sport,
            rev_nat.port,
            flow.protocol,
        ));
    }
}

/// Whether the reply entry of an original-direction entry is still there
/// (LRU eviction or a stale-reply cleanup may have taken it alone).
#[inline(always)]
pub fn has_reply(flow: &Flow, entry: &CtValue, backend: &Backend) -> bool {
    let key = if entry.flags & CT_FLAG_SNAT != 0 {
        CtKey::new(
            backend.address,
            entry.nat_address,
            backend.port,
            entry.nat_port,
            flow.protocol,
        )
    } else {
        CtKey::new(
            backend.address,
            flow.saddr,
            backend.port,
            flow.sport,
            flow.protocol,
        )
    };
    lookup(&key).is_some()
}

/// Opens conntrack for a new flow: the reply entry (choosing a free SNAT
/// port when `entry` says to SNAT), then the original-direction entry.
/// Returns the original-direction entry as stored.
#[inline(always)]
pub fn open(
    flow: &Flow,
    mut entry: CtValue,
    backend: &Backend,
    hash: u32,
) -> Result<CtValue, Reason> {
    entry.last_seen = now();
    let mut reply = CtValue {
        flags: entry.flags | CT_FLAG_REPLY,
        nat_address: flow.saddr,
        nat_port: flow.sport,
        ..entry
    };
    if entry.flags & CT_FLAG_SNAT != 0 {
        let mut chosen = None;
        for attempt in 0..NAT_PORT_TRIES {
            let port = (NAT_PORT_MIN + (hash + attempt * NAT_PORT_STRIDE) % NAT_PORT_COUNT) as u16;
            let port = port.to_be();
            let key = CtKey::new(
                backend.address,
                entry.nat_address,
                backend.port,
                port,
                flow.protocol,
            );
            if WHARF_CT.insert(key, reply, BPF_NOEXIST as u64).is_ok() {
                chosen = Some(port);
                break;
            }
        }
        entry.nat_port = chosen.ok_or(Reason::DropNatPortsExhausted)?;
    } else {
        reply.nat_address = 0;
        reply.nat_port = 0;
        let key = CtKey::new(
            backend.address,
            flow.saddr,
            backend.port,
            flow.sport,
            flow.protocol,
        );
        WHARF_CT
            .insert(key, reply, 0)
            .map_err(|_| Reason::DropStaleService)?;
    }
    WHARF_CT
        .insert(flow.ct_key(), entry, 0)
        .map_err(|_| Reason::DropStaleService)?;
    Ok(entry)
}
