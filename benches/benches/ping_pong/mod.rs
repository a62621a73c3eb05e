//! The per-packet benchmarks' setup, shared by `datapath` (criterion) and
//! `flatness` (interleaved rounds).
//!
//! The kernel re-runs the program on the same, already rewritten buffer,
//! so the frame goes to frontend A whose backend is frontend B, whose
//! backend is A again: once both flows are in conntrack, every run is one
//! established-flow translation (conntrack hit, backend lookup, destination
//! rewrite with checksum updates), the common case.

use std::net::{Ipv4Addr, SocketAddrV4};

use wharf_agent::proxy::{DesiredState, FrontendKind, Protocol};
use wharf_tests::{
    fixture::Fixture,
    frame::{self, TCP_ACK},
    services::{add, add_cluster_ips, ready},
};

pub const SERVICE_COUNTS: [u32; 4] = [1, 1_000, 10_000, 100_000];
/// Runs per kernel measurement.
pub const REPEAT: u32 = 1_000_000;

fn a() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80)
}

fn b() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 2), 80)
}

/// The ping-pong pair plus `count - 2` filler ClusterIPs, each with one
/// backend of its own.
fn services(count: u32) -> DesiredState {
    let mut state = DesiredState::default();
    add(
        &mut state,
        FrontendKind::ClusterIp,
        *a().ip(),
        80,
        Protocol::Tcp,
        &ready(&[b()]),
    );
    add(
        &mut state,
        FrontendKind::ClusterIp,
        *b().ip(),
        80,
        Protocol::Tcp,
        &ready(&[a()]),
    );
    add_cluster_ips(&mut state, count.saturating_sub(2), 1);
    state
}

/// One loaded dataplane per service count, all loaded before anything is
/// measured, with both ping-pong flows open on both hooks; and the frame.
pub fn fixtures(name: &str) -> (Vec<(u32, Fixture)>, Vec<u8>) {
    let frame = frame::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40000),
        a(),
        TCP_ACK,
    );
    let fixtures = SERVICE_COUNTS
        .iter()
        .map(|count| {
            let mut fixture = Fixture::load(&format!("{name}{count}"));
            fixture.sync(&services(*count));
            fixture.time(true, &frame, 2);
            fixture.time(false, &frame, 2);
            (*count, fixture)
        })
        .collect();
    (fixtures, frame)
}
