//! Reconciler sync times against the kernel's maps: a full sync of 10k
//! services x 10 backends into empty maps, and one endpoint change at that
//! size (the diff over every frontend plus the few writes it leads to).

use std::{
    hint::black_box,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use wharf_agent::proxy::{
    Backend, BackendState, DesiredState, FrontendKey, Protocol, ServiceProxy as _,
};
use wharf_tests::{
    fixture::Fixture,
    services::{add_cluster_ips, nth},
};

const SERVICES: u32 = 10_000;
const BACKENDS: u32 = 10;

fn desired(extra_backend: bool) -> DesiredState {
    let mut state = DesiredState::default();
    add_cluster_ips(&mut state, SERVICES, BACKENDS);
    if extra_backend {
        let key = FrontendKey {
            address: nth(Ipv4Addr::new(10, 100, 0, 0), SERVICES / 2),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let frontend = state.frontends.get_mut(&key).expect("generated above");
        frontend.backends.push(Backend {
            address: Ipv4Addr::new(10, 250, 0, 1),
            port: 8080,
            state: BackendState::Active,
        });
    }
    state
}

fn sync(c: &mut Criterion) {
    let mut fixture = Fixture::load("bench-sync");
    let (base, changed) = (desired(false), desired(true));
    let mut group = c.benchmark_group("sync");

    group.bench_function("full_10k_services_x10", |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fixture.reconciler.flush().expect("flush");
                let start = Instant::now();
                black_box(fixture.reconciler.sync(&base).expect("sync"));
                total += start.elapsed();
            }
            total
        });
    });

    fixture.reconciler.sync(&base).expect("sync");
    group.bench_function("one_endpoint_change_at_10k", |bench| {
        let mut toggle = false;
        bench.iter(|| {
            toggle = !toggle;
            black_box(
                fixture
                    .reconciler
                    .sync(if toggle { &changed } else { &base })
                    .expect("sync"),
            )
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5));
    targets = sync
}
criterion_main!(benches);
