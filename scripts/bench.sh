#!/usr/bin/env bash
# Runs the benchmarks (as root: they load eBPF programs): criterion's
# per-packet and sync benchmarks, the interleaved flatness check (median
# per-packet cost from 1 to 100k services, max/min within 10%), the proxy
# modes side by side (sync times and connect latency at 1, 1k and 10k
# services; iptables-nft at 10k alone takes about 15 minutes), and the API
# server's create throughput and 1,000-watcher fan-out, embedded vs etcd.
# The summary is also written as JSON next to criterion's reports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
# The API server benchmark starts the release wharf-control binary.
cargo build --release --workspace --bins
cargo bench -p wharf-benches "$@"
python3 - "$CARGO_TARGET_DIR/criterion" <<'PY'
import json, os, sys
root = sys.argv[1]
def mean_ns(*path):
    with open(os.path.join(root, *path, "new", "estimates.json")) as f:
        return json.load(f)["mean"]["point_estimate"]
summary = {"criterion_per_packet_ns": {}, "sync_ms": {}, "apiserver": {}}
print(f"{'criterion mean ns':<18}" + "".join(f"{n:>10}" for n in ("1", "1k", "10k", "100k")))
for hook in ("xdp", "tc"):
    values = [mean_ns("per_packet", hook, str(n)) for n in (1, 1000, 10000, 100000)]
    summary["criterion_per_packet_ns"][hook] = dict(zip(("1", "1000", "10000", "100000"), values))
    print(f"{hook:<18}" + "".join(f"{v:>10.1f}" for v in values))
for name in ("full_10k_services_x10", "one_endpoint_change_at_10k"):
    summary["sync_ms"][name] = mean_ns("sync", name) / 1e6
    print(f"sync {name:<35} {summary['sync_ms'][name]:>10.2f} ms")
for store in ("embedded", "etcd"):
    creates = 1e9 / mean_ns("apiserver_create", store)
    fanout = 1000 * 1e9 / mean_ns("apiserver_watch_fanout", store)
    summary["apiserver"][store] = {"creates_per_s": creates, "watch_events_per_s_to_1000_watchers": fanout}
    print(f"apiserver {store:<9} {creates:>8.0f} creates/s   {fanout:>8.0f} watch events/s (1,000 watchers)")
with open(os.path.join(root, "wharf-flatness.json")) as f:
    flatness = json.load(f)
summary["flatness_median_ns"] = flatness
flat = all(v["max_over_min"] <= 1.10 for v in flatness.values())
summary["per_packet_flat_within_10_percent"] = flat
with open(os.path.join(root, "wharf-modes.json")) as f:
    modes = json.load(f)
summary["proxy_modes"] = modes
print(f"{'proxy mode':<16} {'services':>8} {'full sync ms':>13} {'one change ms':>14} {'connect us':>11}")
for row in modes:
    print(f"{row['mode']:<16} {row['services']:>8} {row['full_sync_ms']:>13.1f} {row['one_endpoint_change_ms']:>14.2f} {row['connect_median_us']:>11.1f}")
with open(os.path.join(root, "wharf-summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print("per-packet cost flat within 10% (interleaved medians):", "yes" if flat else "NO")
PY
