//! `wharf bench routing` end to end, small: three modes (socket-LB eBPF,
//! iptables, and IPVS, which runs in a VM where this host's kernel has no
//! ip_vs) at 1 and 20 services, one short round of each load. Checks
//! that every figure was measured (not what it is: performance lives in
//! the committed results, not in tests), that the VM's points are marked
//! as such and kept out of the charts, that the files are written, and
//! that the mode clusters are gone afterwards.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use wharf_tests::{fixture::require_root, lab::workspace_binary};

const CLUSTERS: [&str; 3] = ["wbebpf", "wbiptables", "wbipvs"];

fn wharf(clusters: &Path, args: &[&str]) -> std::process::Output {
    Command::new(workspace_binary("wharf"))
        .args(args)
        .env("WHARF_CLUSTERS_DIR", clusters)
        .output()
        .expect("running wharf")
}

/// Downs the mode clusters a failed run may have left.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cluster in CLUSTERS {
            let _ = wharf(&self.0, &["cluster", "down", "--name", cluster]);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bench_routing_measures_every_mode_and_cleans_up() {
    require_root();
    let clusters = std::env::temp_dir().join("wharf-bench-e2e");
    let _cleanup = Cleanup(clusters.clone());
    let out = clusters.join("results");
    let in_vm = !wharf_agent::ipvs::Kernel::available();
    let _ = std::fs::remove_dir_all(&out);
    let wharf = |args: &[&str]| wharf(&clusters, args);
    let run = wharf(&[
        "bench",
        "routing",
        "--modes=ebpf,iptables,ipvs",
        "--services=1,20",
        "--duration=1",
        "--rounds=1",
        "--samples=3",
        "--sync-timeout=120",
        &format!("--out={}", out.display()),
    ]);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "bench routing failed:\n{printed}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).expect("results.json"))
            .expect("JSON");
    let points = results["points"].as_array().expect("points");
    let seen: Vec<(String, u64)> = points
        .iter()
        .map(|p| {
            (
                p["mode"].as_str().unwrap().to_string(),
                p["services"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ebpf", 1),
            ("ebpf", 20),
            ("iptables", 1),
            ("iptables", 20),
            ("ipvs", 1),
            ("ipvs", 20)
        ]
        .map(|(m, n)| (m.to_string(), n)),
        "{printed}"
    );
    for point in points {
        let what = format!("{} at {}", point["mode"], point["services"]);
        assert!(point["error"].is_null(), "{what}: {}", point["error"]);
        assert_eq!(
            point["vm"].is_string(),
            in_vm && point["mode"] == "ipvs",
            "{what}: {}",
            point["vm"]
        );
        assert!(point["full_sync_ms"].as_f64().unwrap() > 0.0, "{what}");
        let changes = point["programming_ms"].as_array().unwrap();
        assert_eq!(changes.len(), 3, "{what}");
        assert!(
            changes.iter().all(|c| c.as_f64().unwrap() > 0.0),
            "{what}: {changes:?}"
        );
        let loads = point["loads"].as_array().unwrap();
        // Three kinds, each direct and through the service.
        assert_eq!(loads.len(), 6, "{what}");
        for load in loads {
            let (p50, p99) = (
                load["p50_us"].as_f64().unwrap(),
                load["p99_us"].as_f64().unwrap(),
            );
            assert!(load["requests"].as_u64().unwrap() > 0, "{what}: {load}");
            assert!(load["per_s"].as_f64().unwrap() > 0.0, "{what}: {load}");
            assert!(p50 > 0.0 && p99 >= p50, "{what}: {load}");
            // A TCP request fails only if the datapath drops it; a UDP
            // datagram may also be lost to a full socket buffer.
            let errors = load["errors"].as_u64().unwrap();
            if load["kind"] == "udp" {
                assert!(
                    errors * 100 <= load["requests"].as_u64().unwrap(),
                    "{what}: {load}"
                );
            } else {
                assert_eq!(errors, 0, "{what}: {load}");
            }
        }
    }
    let table = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    let ipvs_row = if in_vm { "| ipvs (VM) | " } else { "| ipvs | " };
    for row in ["| ebpf | ", ipvs_row] {
        assert_eq!(
            table.lines().filter(|l| l.starts_with(row)).count(),
            2,
            "{table}"
        );
    }
    for chart in [
        "keepalive-rate.svg",
        "crr-p99.svg",
        "udp-rate.svg",
        "full-sync.svg",
        "programming.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(chart)).expect(chart);
        assert!(svg.contains("<polyline"), "{chart} draws lines");
        assert_eq!(svg.contains(">ipvs"), !in_vm, "{chart}: {svg}");
    }

    for cluster in CLUSTERS {
        assert!(
            !clusters.join(cluster).exists(),
            "{cluster}'s directory is gone"
        );
        assert!(
            !Path::new("/run/netns")
                .join(format!("wharf-{cluster}"))
                .exists()
        );
    }
}
