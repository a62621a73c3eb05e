//! wharf-control throughput, embedded store against etcd in one run:
//! creates per second (16 in flight over kube-rs), and watch fan-out —
//! events per second delivered to 1,000 watchers of one collection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::{runtime::Runtime, sync::Notify};
use wharf_tests::control::{ControlPlane, StoreKind};

const IN_FLIGHT: u64 = 16;
const WATCHERS: usize = 1_000;
/// Watchers per client: kube-rs speaks HTTP/1.1, one connection per
/// watch, so the clients' pools hold 1,000 connections between them.
const WATCHERS_PER_CLIENT: usize = 100;

async fn connect(plane: &ControlPlane) -> Client {
    let kubeconfig = Kubeconfig::read_from(plane.kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(config).expect("client")
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(
        serde_json::json!({ "metadata": { "name": name }, "data": { "k": "v" } }),
    )
    .expect("ConfigMap")
}

/// 1,000 watches hold 2,000 sockets between the two processes.
fn raise_file_limit() {
    let limit = libc::rlimit {
        rlim_cur: 65_536,
        rlim_max: 65_536,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure leaves the
    // old limit, which the fan-out benchmark then reports as errors.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

fn bench_store(c: &mut Criterion, runtime: &Runtime, store: StoreKind, label: &str) {
    let plane = ControlPlane::start(store);
    let client = runtime.block_on(connect(&plane));
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let next = Arc::new(AtomicU64::new(0));

    let mut creates = c.benchmark_group("apiserver_create");
    creates.throughput(Throughput::Elements(1));
    creates.bench_function(label, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                let workers: Vec<_> = (0..IN_FLIGHT)
                    .map(|worker| {
                        let api = api.clone();
                        let next = Arc::clone(&next);
                        let share = iters / IN_FLIGHT + u64::from(worker < iters % IN_FLIGHT);
                        tokio::spawn(async move {
                            for _ in 0..share {
                                let name =
                                    format!("create-{}", next.fetch_add(1, Ordering::Relaxed));
                                api.create(&PostParams::default(), &config_map(&name))
                                    .await
                                    .expect("create");
                            }
                        })
                    })
                    .collect();
                for worker in workers {
                    worker.await.expect("create worker");
                }
                started.elapsed()
            })
        });
    });
    creates.finish();

    let received = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    runtime.block_on(async {
        api.create(&PostParams::default(), &config_map("fanout"))
            .await
            .expect("create fanout");
        let start = api
            .get("fanout")
            .await
            .expect("get")
            .metadata
            .resource_version
            .expect("rv");
        let params = WatchParams::default()
            .fields("metadata.name=fanout")
            .timeout(290);
        let mut clients = Vec::new();
        for _ in 0..WATCHERS.div_ceil(WATCHERS_PER_CLIENT) {
            clients.push(connect(&plane).await);
        }
        for i in 0..WATCHERS {
            let api: Api<ConfigMap> =
                Api::namespaced(clients[i / WATCHERS_PER_CLIENT].clone(), "default");
            let stream = api.watch(&params, &start).await.expect("watch");
            let received = Arc::clone(&received);
            let progress = Arc::clone(&progress);
            tokio::spawn(async move {
                let mut stream = stream.boxed();
                while let Some(Ok(event)) = stream.next().await {
                    if matches!(event, WatchEvent::Modified(_)) {
                        received.fetch_add(1, Ordering::Relaxed);
                        progress.notify_waiters();
                    }
                }
            });
        }
    });
    let mut fanout = c.benchmark_group("apiserver_watch_fanout");
    fanout.throughput(Throughput::Elements(WATCHERS as u64));
    let mut value = 0_u64;
    fanout.bench_function(label, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let target = received.load(Ordering::Relaxed) + WATCHERS as u64;
                    value += 1;
                    let patch = serde_json::json!({ "data": { "k": value.to_string() } });
                    api.patch("fanout", &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .expect("patch");
                    while received.load(Ordering::Relaxed) < target {
                        let waiting = progress.notified();
                        if received.load(Ordering::Relaxed) >= target {
                            break;
                        }
                        tokio::time::timeout(Duration::from_secs(10), waiting)
                            .await
                            .expect("all watchers see the event within 10 s");
                    }
                }
                started.elapsed()
            })
        });
    });
    fanout.finish();
}

fn apiserver(c: &mut Criterion) {
    raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    bench_store(c, &runtime, StoreKind::Embedded, "embedded");
    bench_store(c, &runtime, StoreKind::Etcd, "etcd");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    targets = apiserver
}
criterion_main!(benches);
