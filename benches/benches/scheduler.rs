//! Scheduler throughput: pods bound per second with 1,000 and 5,000
//! simulated nodes and 10,000 pending pods (kube-scheduler manages about
//! 300 pods/s at this scale; wharf's target is 1,000).
//!
//! For each node count: wharf-control (release build) serves the API
//! alone; `wharf_tests::simnodes` registers the nodes (no heartbeats: no
//! node lifecycle controller runs) and marks every bound pod Running, as
//! kubemark's hollow nodes do; the 10,000 pods (100m CPU, 128Mi each) are
//! created while no scheduler runs; then `wharf-control scheduler` starts
//! as its own process and the simulator's record of when it saw each pod
//! bound times the bindings. Reported: pods/s from the scheduler's start
//! to the last binding (including its initial list of every node and
//! pod), between the first and the last binding, and from the start to
//! the last pod reported Running (the simulator's status writes, which
//! the API server serves beside the bindings, all done). `WHARF_BENCH_NODES` (comma-separated) and `WHARF_BENCH_PODS`
//! change the sizes. Prints a table and writes `wharf-scheduler.json`
//! next to criterion's reports.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use wharf_tests::{
    control::{ControlPlane, StoreKind},
    lab::workspace_binary,
    simnodes::{Shape, SimNodes},
};

fn sizes(variable: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(variable).map_or_else(
        |_| default.to_vec(),
        |list| {
            list.split(',')
                .map(|n| n.trim().parse().expect("a number"))
                .collect()
        },
    )
}

fn pending_pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": format!("p{i}"), "labels": { "app": "bench" } },
        "spec": { "containers": [{
            "name": "main", "image": "bench",
            "resources": { "requests": { "cpu": "100m", "memory": "128Mi" } },
        }]},
    }))
    .expect("pod")
}

struct Run {
    nodes: usize,
    pods: usize,
    total: Duration,
    bindings: Duration,
    /// From the scheduler's start to the last pod reported Running.
    running: Duration,
}

fn run(nodes: usize, pods: usize) -> Run {
    let plane = ControlPlane::start(StoreKind::Embedded);
    let sim = SimNodes::start(
        &plane.kubeconfig(),
        "n",
        nodes,
        Shape {
            cpu: "32".to_owned(),
            memory: "128Gi".to_owned(),
            pods: 110,
            heartbeat: None,
        },
    );
    let client = sim.client();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let api: Api<Pod> = Api::namespaced(client, "default");
    runtime.block_on(async {
        futures::stream::iter(0..pods)
            .map(|i| {
                let api = api.clone();
                async move { api.create(&PostParams::default(), &pending_pod(i)).await }
            })
            .buffer_unordered(32)
            .try_for_each(|_| async { Ok(()) })
            .await
            .expect("create the pending pods");
    });
    let started = Instant::now();
    let mut scheduler = Command::new(workspace_binary("wharf-control"))
        .arg("scheduler")
        .arg("--kubeconfig")
        .arg(plane.data_dir().join("scheduler.kubeconfig"))
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the scheduler");
    // The simulator sees every binding (its watch puts bound pods to
    // work); a second watch here would load the machine being measured.
    // The run ends once every pod is also reported Running, so the
    // status writes a binding causes are inside the run, not after it.
    let mut progress = (0, Instant::now());
    let done = loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = sim.started();
        if now.count >= pods && now.running >= pods {
            break now;
        }
        if let Ok(Some(status)) = scheduler.try_wait() {
            panic!(
                "the scheduler exited ({status}) with {} of {pods} pods bound",
                now.count
            );
        }
        if now.count + now.running > progress.0 {
            progress = (now.count + now.running, Instant::now());
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(120),
            "no progress for two minutes ({} of {pods} pods bound, {} Running)",
            now.count,
            now.running
        );
    };
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    drop(sim);
    let (first, last) = (done.first.expect("bindings"), done.last.expect("bindings"));
    Run {
        nodes,
        pods,
        total: last - started,
        bindings: last - first,
        running: done.last_running.expect("Running pods") - started,
    }
}

fn main() {
    // `cargo bench` passes filter arguments; this harness takes its
    // sizes from WHARF_BENCH_NODES and WHARF_BENCH_PODS instead.
    let pods = sizes("WHARF_BENCH_PODS", &[10_000])[0];
    let mut rows = Vec::new();
    println!(
        "{:>6} {:>7} {:>14} {:>17} {:>17}",
        "nodes", "pods", "pods/s (total)", "pods/s (binding)", "pods/s (Running)"
    );
    for nodes in sizes("WHARF_BENCH_NODES", &[1_000, 5_000]) {
        let run = run(nodes, pods);
        let total = run.pods as f64 / run.total.as_secs_f64();
        let binding = run.pods as f64 / run.bindings.as_secs_f64();
        let running = run.pods as f64 / run.running.as_secs_f64();
        println!(
            "{:>6} {:>7} {total:>14.0} {binding:>17.0} {running:>17.0}",
            run.nodes, run.pods
        );
        rows.push(serde_json::json!({
            "nodes": run.nodes,
            "pods": run.pods,
            "seconds_total": run.total.as_secs_f64(),
            "seconds_first_to_last_binding": run.bindings.as_secs_f64(),
            "pods_per_second_total": total,
            "pods_per_second_binding": binding,
            "seconds_to_last_running": run.running.as_secs_f64(),
            "pods_per_second_running": running,
        }));
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let dir = target.join("criterion");
    std::fs::create_dir_all(&dir).expect("report directory");
    std::fs::write(
        dir.join("wharf-scheduler.json"),
        serde_json::to_string_pretty(&rows).expect("JSON"),
    )
    .expect("write wharf-scheduler.json");
}
