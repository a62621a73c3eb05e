//! The pinned maps. Static names match `dataplane_common::names`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    AffinityKey, AffinityValue, Backend, Counter, CtKey, CtValue, MaglevTable, RevNat, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, capacity, counters::Reason,
};

#[map]
pub static WHARF_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, 0);

#[map]
pub static WHARF_BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

#[map]
pub static WHARF_REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(capacity::REV_NAT, 0);

/// LRU, so a full table evicts the least recently used flow instead of
/// refusing new ones.
#[map]
pub static WHARF_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map]
pub static WHARF_SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(capacity::SOCK_REV_NAT, 0);

#[map]
pub static WHARF_MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::pinned(capacity::MAGLEV, BPF_F_NO_PREALLOC);

#[map]
pub static WHARF_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(capacity::AFFINITY, 0);

#[map]
pub static WHARF_NODEADDRS: HashMap<u32, u8> = HashMap::pinned(capacity::NODE_ADDRS, 0);

#[map]
pub static WHARF_SNATADDRS: HashMap<u32, u32> = HashMap::pinned(capacity::SNAT_ADDRS, 0);

#[map]
pub static WHARF_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::COUNT, 0);
