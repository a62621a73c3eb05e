#!/usr/bin/env bash
# The single-node variant of the demo: installs prerequisites, builds, and runs the standalone
# agent on a node made of network namespaces, with the Service in
# examples/standalone/web.yaml. Then it sends traffic through the ClusterIP
# (socket-LB, and per-packet TC for a client outside its cgroup) and the
# NodePort (XDP, from an "external" host), printing which backend answered.
# Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
echo "demo: building (first build ~3 min, then seconds)" >&2
cargo build --workspace --bins --quiet
BIN="$CARGO_TARGET_DIR/debug"

P=wharf-demo
NODE=$P-node
CGROUP=/sys/fs/cgroup/unified/$P
LOG=$(mktemp -d)
pids=()
remove_topology() {
  for ns in node client b1 b2 ext; do ip netns del "$P-$ns" 2>/dev/null || true; done
  rmdir "$CGROUP" 2>/dev/null || true
  "$BIN/wharf-agent" --teardown --node-name "$NODE" 2>/dev/null || true
}
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  remove_topology
  rm -rf "$LOG"
}
remove_topology # leftovers of an interrupted run
trap cleanup EXIT

in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$P-$ns" "$@"; }

# Topology: pods on veths to the node (node side 10.244.0.1, /32 routes),
# an external host on 192.168.77.0/24.
for ns in node client b1 b2 ext; do ip netns add "$P-$ns"; ip -n "$P-$ns" link set lo up; done
pod() { # ns device address
  ip link add "$2" netns "$P-node" type veth peer name eth0 netns "$P-$1"
  ip -n "$P-node" link set "$2" up; ip -n "$P-$1" link set eth0 up
  ip -n "$P-node" addr add 10.244.0.1/32 dev "$2"
  ip -n "$P-node" route add "$3/32" dev "$2"
  ip -n "$P-$1" addr add "$3/32" dev eth0
  ip -n "$P-$1" route add 10.244.0.1 dev eth0
  ip -n "$P-$1" route add default via 10.244.0.1 dev eth0
}
pod client p-client 10.244.0.20
pod b1 p-b1 10.244.1.2
pod b2 p-b2 10.244.1.3
ip link add ext0 netns "$NODE" type veth peer name eth0 netns "$P-ext"
ip -n "$NODE" link set ext0 up; ip -n "$P-ext" link set eth0 up
ip -n "$NODE" addr add 192.168.77.1/24 dev ext0
ip -n "$P-ext" addr add 192.168.77.2/24 dev eth0
# veth leaves checksums to be filled in later (CHECKSUM_PARTIAL); a real
# NIC's XDP sees complete ones, so make the "external" link behave so.
in_ns ext ethtool -K eth0 tx off >/dev/null
in_ns node sysctl -qw net.ipv4.ip_forward=1

for b in b1 b2; do
  in_ns "$b" "$BIN/wharf-probe" serve "backend-$b" --http 8080 --udp 5353 >"$LOG/$b.log" 2>&1 &
  pids+=($!)
done
mkdir -p "$CGROUP"

echo "demo: starting wharf-agent --standalone in $NODE" >&2
in_ns node "$BIN/wharf-agent" --standalone --services-from examples/standalone --node-name "$NODE" \
  --devices ext0 --pod-devices p-client,p-b1,p-b2 --cgroup "$CGROUP" >"$LOG/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -qs synced "$LOG/agent.log" && break; sleep 0.1; done
grep -q synced "$LOG/agent.log" || { cat "$LOG/agent.log" >&2; echo "demo: the agent did not start" >&2; exit 1; }
grep -E 'attached|synced' "$LOG/agent.log" | sed 's/^/  agent: /' >&2

in_cgroup() { sh -c 'echo $$ > "$0/cgroup.procs" && shift && exec "$@"' "$CGROUP" _ "$@"; }
echo
echo "== curl http://10.96.0.10/ from a pod, translated at connect() by socket-LB"
for i in $(seq 6); do in_cgroup nsenter --net="/run/netns/$P-client" curl -s --max-time 2 http://10.96.0.10/; done
echo "== curl http://10.96.0.10/ from a pod outside the socket-LB cgroup: per-packet TC DNAT"
for i in $(seq 6); do in_ns client curl -s --max-time 2 http://10.96.0.10/; done
echo "== UDP to 10.96.0.10:53 (reply source as the application sees it)"
in_cgroup nsenter --net="/run/netns/$P-client" "$BIN/wharf-probe" udp 10.96.0.10:53 --count 4
echo "== curl http://192.168.77.1:30080/ (NodePort) from an external host: XDP"
for i in $(seq 6); do in_ns ext curl -s --max-time 2 http://192.168.77.1:30080/; done
echo
echo "demo: datapath counters:" >&2
"$BIN/wharf-agent" --node-name "$NODE" --counters | sed 's/^/  /' >&2
