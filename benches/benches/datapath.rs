//! Per-packet cost of the XDP and TC programs (ns/packet, as the kernel's
//! BPF_PROG_TEST_RUN measures it over >= 1e6 runs) with 1 to 100k services
//! programmed. Hash lookups should keep it flat as services grow.
//!
//! The kernel re-runs the program on the same, already rewritten buffer,
//! so the frame goes to frontend A whose backend is frontend B, whose
//! backend is A again: after two runs both flows are in conntrack, and every
//! further run is one established-flow translation (conntrack hit, backend
//! lookup, destination rewrite with checksum updates), the common case.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

mod ping_pong;
use ping_pong::{REPEAT, fixtures};

fn per_packet(c: &mut Criterion) {
    let (mut fixtures, frame) = fixtures("criterion");
    let mut group = c.benchmark_group("per_packet");
    for (hook, xdp) in [("xdp", true), ("tc", false)] {
        for (count, fixture) in &mut fixtures {
            group.bench_with_input(BenchmarkId::new(hook, *count), count, |bench, _| {
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
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = per_packet
}
criterion_main!(benches);
