//! Keys, values and names of the pinned service maps.

/// IANA protocol numbers the dataplane translates.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Map names, shared so the agent opens exactly what the programs declare
/// (the eBPF statics carry the same names; the kernel keeps 15 bytes).
/// Pinned under `/sys/fs/bpf/wharf/<node>/` so a restarted agent reuses them.
pub mod names {
    pub const SERVICES: &str = "WHARF_SERVICES";
    pub const BACKENDS: &str = "WHARF_BACKENDS";
    pub const REV_NAT: &str = "WHARF_REV_NAT";
    pub const CONNTRACK: &str = "WHARF_CT";
    pub const SOCK_REV_NAT: &str = "WHARF_SOCK_REV";
    pub const MAGLEV: &str = "WHARF_MAGLEV";
    pub const AFFINITY: &str = "WHARF_AFFINITY";
    /// Node addresses (key, network order) that NodePort frontends answer
    /// on and that forwarded NodePort traffic is SNATed to; value unused (1).
    pub const NODE_ADDRS: &str = "WHARF_NODEADDRS";
    /// Per external device (key: ifindex), the node address traffic that
    /// came in by it is SNATed to when it leaves by it again.
    pub const SNAT_ADDRS: &str = "WHARF_SNATADDRS";
    pub const COUNTERS: &str = "WHARF_COUNTERS";
}

/// Capacities. The service map holds one entry per frontend plus one per
/// backend slot, so 262,144 entries fit 100k ClusterIPs with a backend
/// each, or 10k frontends with 25 backends each.
pub mod capacity {
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    pub const REV_NAT: u32 = 131_072;
    /// Per-flow entries (two per translated flow: original and reply).
    pub const CONNTRACK: u32 = 262_144;
    pub const SOCK_REV_NAT: u32 = 262_144;
    /// Maglev tables are 4 KiB each; the map is created without
    /// preallocation so only services that exist cost memory.
    pub const MAGLEV: u32 = 131_072;
    pub const NODE_ADDRS: u32 = 256;
    pub const SNAT_ADDRS: u32 = 256;
    /// (client, frontend) pairs remembered, shared by every affinity
    /// frontend (LRU: the least recently used pair is forgotten first).
    pub const AFFINITY: u32 = 262_144;
}

/// Maglev lookup table size `M`: a prime, so every backend's permutation
/// (offset + j * skip mod M) visits every slot. With `M` = 1021 and up to
/// 10 backends a backend's share deviates from 1/N by under 1%; Maglev's
/// paper recommends `M` > 100 * N, so services with more than ~10 backends
/// trade a little balance for a table that stays 4 KiB.
pub const MAGLEV_TABLE_SIZE: usize = 1021;

/// Frontend of a service: one per (VIP, port, protocol), plus one entry per
/// backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network order. 0 for a NodePort frontend,
    /// which matches every address in the node-address map.
    pub address: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// 0 for the frontend header, `1..=count` for backend slots.
    pub backend_slot: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl ServiceKey {
    pub const fn new(address: u32, port: u16, protocol: u8, backend_slot: u16) -> Self {
        Self {
            address,
            port,
            backend_slot,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// Slot 0 of a frontend: `count`, `flags`, `rev_nat_id`, and in
/// `backend_id` the session-affinity timeout (as Cilium's `lb4_service`
/// overlays the two). Slots `1..=count`: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Slots: the backend. Slot 0: `sessionAffinity: ClientIP`'s timeout
    /// in seconds, 0 without affinity.
    pub backend_id: u32,
    /// Number of backends eligible for new flows (ready ones). Terminating
    /// backends keep their conntrack entries but have no slot.
    pub count: u16,
    pub flags: u16,
    /// Index into the reverse-NAT map: restores this frontend's address and
    /// port on replies and keys the frontend's Maglev table.
    pub rev_nat_id: u32,
}

/// `ServiceValue::flags`: the frontend is a NodePort (address 0).
pub const SERVICE_FLAG_NODEPORT: u16 = 1 << 0;
/// `ServiceValue::flags`: the frontend is reached from outside the cluster
/// (NodePort, externalIPs, load-balancer IPs). A flow to it whose backend
/// sits behind the device it came in by is SNATed to a node address, so
/// the reply comes back through this node.
pub const SERVICE_FLAG_EXTERNAL: u16 = 1 << 1;

/// A backend (endpoint address and port), keyed by a node-local id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// IPv4 address, network order.
    pub address: u32,
    /// Port, network order.
    pub port: u16,
    pub protocol: u8,
    /// `BACKEND_FLAG_*`.
    pub flags: u8,
}

/// The backend is terminating: flows it already has continue, a new TCP
/// connection (SYN) that finds it in conntrack picks another backend.
pub const BACKEND_FLAG_TERMINATING: u8 = 1 << 0;

/// Reverse NAT: what a reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat {
    /// Frontend address, network order (0 for a NodePort frontend: the
    /// node address the client used is kept in conntrack instead).
    pub address: u32,
    /// Frontend port, network order.
    pub port: u16,
    pub _pad: u16,
}

/// Conntrack key: a flow as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, protocol: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            protocol,
            _pad: [0; 3],
        }
    }

    /// The key of the opposite direction of the same flow.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.daddr,
            self.saddr,
            self.dport,
            self.sport,
            self.protocol,
        )
    }
}

/// Conntrack value. An original-direction entry (client -> frontend) says
/// which backend the flow goes to; a reply-direction entry (backend ->
/// client, or backend -> node address when SNATed) says how to restore the
/// reply. Both carry the backend id so removing a backend purges both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// NodePort flows: the node address the client sent to. A NodePort
    /// frontend's own address is 0 (it answers on every node address), so
    /// replies restore this one as their source.
    pub node_address: u32,
    /// With `CT_FLAG_SNAT`. Original direction: the source the flow was
    /// rewritten to (a node address). Reply direction: the client's address,
    /// restored as the reply's destination.
    pub nat_address: u32,
    /// With `CT_FLAG_SNAT`: the port paired with `nat_address`.
    pub nat_port: u16,
    /// `CT_FLAG_*`.
    pub flags: u8,
    pub _pad: u8,
    /// When a packet last used this entry: CLOCK_MONOTONIC seconds
    /// (`bpf_ktime_get_ns() / 1e9`), refreshed at most once a second. The
    /// agent expires idle flows by it.
    pub last_seen: u32,
}

/// The entry describes the reply direction.
pub const CT_FLAG_REPLY: u8 = 1 << 0;
/// The flow's source was rewritten to a node address (forwarded NodePort
/// traffic, so replies come back through this node).
pub const CT_FLAG_SNAT: u8 = 1 << 1;
/// A TCP FIN or RST went through: the flow is closing and expires soon.
pub const CT_FLAG_CLOSING: u8 = 1 << 2;

/// Socket-LB reverse translation, keyed by socket cookie and the backend
/// the socket was connected to: lets `recvmsg`/`getpeername` report the
/// service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    pub address: u32,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

/// Session affinity: which backend a client's flows to a frontend go to.
/// Clients are IPv4 addresses for packets TC and XDP see, and network
/// namespace cookies for sockets socket-LB translates (a pod's sockets
/// share one), as Cilium keys them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// An IPv4 address (network order) or a netns cookie, by `kind`.
    pub client: u64,
    pub rev_nat_id: u32,
    /// `AFFINITY_CLIENT_*`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

pub const AFFINITY_CLIENT_ADDRESS: u8 = 0;
pub const AFFINITY_CLIENT_NETNS: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// When the client last opened a flow to the frontend: CLOCK_MONOTONIC
    /// seconds, as conntrack's `last_seen`.
    pub last_used: u32,
}

/// One frontend's Maglev lookup table: backend ids by
/// `flow_hash::maglev_slot(hash)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
    /// Never read. LLVM turns the slot's byte offset into
    /// `(hash * M) >> 30 & !3`, which the verifier bounds by 4083, not
    /// 4080: without 4 spare bytes a 4-byte read there looks 3 bytes out.
    pub _verifier_pad: u32,
}

impl Default for MaglevTable {
    fn default() -> Self {
        Self {
            backend_ids: [0; MAGLEV_TABLE_SIZE],
            _verifier_pad: 0,
        }
    }
}

const _: () = {
    assert!(size_of::<ServiceKey>() == 12);
    assert!(size_of::<ServiceValue>() == 12);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<RevNat>() == 8);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 24);
    assert!(size_of::<SockRevKey>() == 16);
    assert!(size_of::<SockRevValue>() == 12);
    assert!(size_of::<MaglevTable>() == 4 * MAGLEV_TABLE_SIZE + 4);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<AffinityValue>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and
    // integer arrays with every padding byte an explicit field, so any bit
    // pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RevNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MaglevTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::Counter {}
}
