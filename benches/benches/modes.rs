//! The proxy modes side by side, in one run: for eBPF, iptables and
//! nftables at 1, 1k and 10k ClusterIP services of 10 endpoints each, the
//! agent's full sync (first sync after start, into an empty node), one
//! endpoint change, and new TCP connections through a ClusterIP from a
//! pod: the median connect() time (the SYN's round trip through the
//! translation: first-packet latency) and connections per second.
//!
//! Each (size, mode) gets a fresh network-namespace node
//! (`wharf_tests::node`) running the real agent binary; sync times are the
//! agent's own `elapsed_us` log figures (the proxy's sync alone, not
//! manifest parsing). Sizes run in turn with the modes interleaved, so
//! machine drift hits every mode alike. `WHARF_BENCH_MODES` and
//! `WHARF_BENCH_SIZES` (comma-separated) narrow the run. Prints a table
//! and writes `wharf-modes.json` next to criterion's reports.

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use wharf_tests::{node::Node, services::nth, vm};

/// `iptables-legacy` is the iptables mode on a node whose rules live in
/// the legacy backend (seeded with one legacy rule, which the agent's
/// detection follows): iptables-nft-restore slows down quadratically with
/// the number of chains, legacy does not. `ipvs` runs only when named: on
/// a kernel without IPVS the chosen modes all run in a VM (software
/// emulated, so its figures compare with each other, not with the host's).
const MODES: [&str; 5] = ["ebpf", "iptables", "iptables-legacy", "nftables", "ipvs"];
const SIZES: [u32; 3] = [1, 1_000, 10_000];
const ENDPOINTS: u32 = 10;
/// One-endpoint changes measured per point (the median is reported).
const CHANGES: usize = 5;
/// Connections per round; the middle of `ROUNDS` rounds is reported.
const CONNECTIONS: usize = 1_000;
const ROUNDS: usize = 3;

/// `services` ClusterIPs (10.100.0.0 upwards, port 80) of `ENDPOINTS`
/// endpoints each; `extra` adds one endpoint to the middle service.
fn fillers(services: u32, extra: bool) -> String {
    let mut yaml = String::new();
    for s in 0..services {
        let vip = nth(Ipv4Addr::new(10, 100, 0, 0), s);
        let mut endpoints: Vec<Ipv4Addr> = (0..ENDPOINTS)
            .map(|e| nth(Ipv4Addr::new(10, 200, 0, 0), s * 16 + e))
            .collect();
        if extra && s == services / 2 {
            endpoints.push(Ipv4Addr::new(10, 250, 0, 1));
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{{addresses: [{e}]}}"))
            .collect();
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: f{s}, namespace: bench}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: f{s}-1, namespace: bench, labels: {{kubernetes.io/service-name: f{s}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        );
    }
    yaml
}

struct Row {
    mode: &'static str,
    services: u32,
    full_sync_ms: f64,
    one_change_ms: f64,
    connections_per_s: f64,
    connect_median_us: f64,
}

fn measure(mode: &'static str, services: u32) -> Row {
    let agent_mode = mode.trim_end_matches("-legacy");
    let tag = if mode.ends_with("legacy") {
        "leg"
    } else {
        &mode[..3]
    };
    let mut node = Node::new(&format!("bm-{tag}-{services}"), agent_mode);
    node.sync_timeout = std::time::Duration::from_secs(1800);
    if mode.ends_with("legacy") {
        node.seed_legacy_iptables();
    }
    node.write_manifest("fillers.yaml", &fillers(services, false));
    node.start_agent();
    let full_sync_ms = node.sync_times_us()[0] as f64 / 1e3;
    for change in 0..CHANGES {
        node.write_manifest("fillers.yaml", &fillers(services, change % 2 == 0));
    }
    let mut changes: Vec<u64> = node.sync_times_us()[1..].to_vec();
    changes.sort_unstable();
    let one_change_ms = changes[changes.len() / 2] as f64 / 1e3;

    let count = CONNECTIONS.to_string();
    // Warm up (ARP, conntrack tables), then measure.
    node.client(true, &["connect", "10.96.0.10:80", "--count", "50"]);
    let mut rounds: Vec<(f64, f64)> = (0..ROUNDS)
        .map(|_| {
            let line = node.client(true, &["connect", "10.96.0.10:80", "--count", &count]);
            let field = |name: &str| -> f64 {
                line[0]
                    .split(' ')
                    .find_map(|w| w.strip_prefix(name)?.parse().ok())
                    .unwrap_or_else(|| panic!("{mode}: no {name} in {line:?}"))
            };
            (field("per_s="), field("median_us="))
        })
        .collect();
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (connections_per_s, connect_median_us) = rounds[ROUNDS / 2];
    Row {
        mode,
        services,
        full_sync_ms,
        one_change_ms,
        connections_per_s,
        connect_median_us,
    }
}

/// The entries of `list` named in the comma-separated variable `name`, or
/// all of them but `ipvs` when it is unset.
fn chosen<T: Copy + ToString>(list: &[T], name: &str) -> Vec<T> {
    match std::env::var(name) {
        Ok(wanted) => list
            .iter()
            .filter(|item| wanted.split(',').any(|w| w == item.to_string()))
            .copied()
            .collect(),
        Err(_) => list
            .iter()
            .filter(|item| item.to_string() != "ipvs")
            .copied()
            .collect(),
    }
}

/// Runs this benchmark with the same choices inside a VM whose kernel
/// has IPVS; returns its exit status.
fn run_in_vm(modes: &[&str], sizes: &[u32]) -> i32 {
    let sizes: Vec<String> = sizes.iter().map(u32::to_string).collect();
    let run = vm::run(
        &vm::for_this_binary("modes")
            .env("WHARF_BENCH_MODES", &modes.join(","))
            .env("WHARF_BENCH_SIZES", &sizes.join(",")),
        "/wharf/deps/modes --bench\n",
        std::time::Duration::from_secs(7200),
    );
    println!("{}", run.console);
    run.status
}

fn main() {
    // `cargo bench` passes filter arguments; this harness takes its
    // choices from WHARF_BENCH_MODES and WHARF_BENCH_SIZES instead.
    let (modes, sizes) = (
        chosen(&MODES, "WHARF_BENCH_MODES"),
        chosen(&SIZES, "WHARF_BENCH_SIZES"),
    );
    if modes.contains(&"ipvs") && !wharf_agent::ipvs::Kernel::available() {
        std::process::exit(run_in_vm(&modes, &sizes));
    }
    let mut rows = Vec::new();
    for services in sizes.iter().copied() {
        for mode in modes.iter().copied() {
            let row = measure(mode, services);
            eprintln!(
                "{mode} at {services} services: full sync {:.1} ms, one change {:.2} ms, {:.0} conn/s",
                row.full_sync_ms, row.one_change_ms, row.connections_per_s
            );
            rows.push(row);
        }
    }
    println!(
        "{:<16} {:>8} {:>14} {:>16} {:>12} {:>14}",
        "mode", "services", "full sync ms", "one change ms", "conn/s", "connect us"
    );
    let mut json = Vec::new();
    for row in &rows {
        println!(
            "{:<16} {:>8} {:>14.1} {:>16.2} {:>12.0} {:>14.1}",
            row.mode,
            row.services,
            row.full_sync_ms,
            row.one_change_ms,
            row.connections_per_s,
            row.connect_median_us
        );
        json.push(serde_json::json!({
            "mode": row.mode,
            "services": row.services,
            "endpoints_per_service": ENDPOINTS,
            "full_sync_ms": row.full_sync_ms,
            "one_endpoint_change_ms": row.one_change_ms,
            "connections_per_s": row.connections_per_s,
            "connect_median_us": row.connect_median_us,
        }));
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = target.join("criterion").join("wharf-modes.json");
    let _ = std::fs::create_dir_all(path.parent().expect("has a parent"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).expect("plain data"),
    )
    .expect("writing the results");
    println!("results: {}", path.display());
}
