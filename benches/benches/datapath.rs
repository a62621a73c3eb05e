//! Per-packet cost of the XDP and TC programs (ns/packet, as the kernel's
//! BPF_PROG_TEST_RUN measures it over >= 1e6 runs) with 1 to 100k services
//! programmed. Hash lookups should keep it flat as services grow.
//!
//! The kernel re-runs the program on the same, already rewritten buffer,
//! so the frame goes to frontend A whose backend is frontend B, whose
//! backend is A again: after two runs both flows are in conntrack, and every
//! further run is one established-flow translation (conntrack hit, backend
//! lookup, destination rewrite with checksum updates), the common case.

use std::net::{Ipv4Addr, SocketAddrV4};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wharf_agent::proxy::{DesiredState, FrontendKind, Protocol};
use wharf_tests::{
    fixture::Fixture,
    frame::{self, TCP_ACK},
    services::{add, ready},
};

const SERVICE_COUNTS: [u32; 4] = [1, 1_000, 10_000, 100_000];
/// Runs per kernel measurement.
const REPEAT: u32 = 1_000_000;

fn a() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80)
}

fn b() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 2), 80)
}

/// The ping-pong pair plus `count - 2` filler ClusterIPs (10.100.x.y),
/// each with one backend of its own.
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
    for i in 0..count.saturating_sub(2) {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let backend = SocketAddrV4::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i),
            8080,
        );
        add(
            &mut state,
            FrontendKind::ClusterIp,
            vip,
            80,
            Protocol::Tcp,
            &ready(&[backend]),
        );
    }
    state
}

fn per_packet(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_packet");
    let frame = frame::tcp(
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40000),
        a(),
        TCP_ACK,
    );
    for count in SERVICE_COUNTS {
        let mut fixture = Fixture::load(&format!("bench{count}"));
        fixture.sync(&services(count));
        for (hook, xdp) in [("xdp", true), ("tc", false)] {
            // Open both flows so every measured run is established.
            fixture.time(xdp, &frame, 2);
            group.bench_with_input(BenchmarkId::new(hook, count), &count, |bench, _| {
                bench.iter_custom(|iters| {
                    let ns = fixture.time(xdp, &frame, REPEAT);
                    std::time::Duration::from_nanos(ns * iters)
                });
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    targets = per_packet
}
criterion_main!(benches);
