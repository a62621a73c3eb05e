//! Map keys and values shared by wharf's eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields (the kernel
//! compares keys byte for byte, so padding must be written, never left
//! uninitialised) and its size is asserted at compile time. Addresses and
//! ports are stored in network byte order, exactly as they appear in packets
//! and in `bpf_sock_addr`, so the datapath never swaps bytes.
//!
//! The layout follows Cilium's `lb4` maps: a service frontend key carries a
//! backend slot; slot 0 holds the frontend's header (backend count, flags and
//! reverse-NAT id), slots `1..=count` hold backend ids, and backends live in
//! their own map keyed by id.
#![no_std]

pub mod checksum;
pub mod counters;
pub mod flow_hash;
pub mod maps;

pub use counters::Counter;
pub use maps::*;
