#!/usr/bin/env bash
# The main job: installs prerequisites, builds, brings up a three-node
# local cluster (`wharf cluster up`: nodes are network namespaces of this
# host), deploys examples/demo (three web pods spread over the nodes and
# a Service), and shows requests through the ClusterIP, from a client pod,
# spread over pods on different nodes, then through every node's NodePort
# from this host. The cluster stays up: `wharf cluster down --name demo`
# removes it (the script's last line says how).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
echo "demo: building (first build ~3 min, then seconds)" >&2
cargo build --workspace --bins --quiet
BIN="$CARGO_TARGET_DIR/debug"
NAME=demo

"$BIN/wharf" cluster up --name "$NAME" --nodes 3
export KUBECONFIG=/var/lib/wharf/clusters/$NAME/control/admin.kubeconfig
kubectl get nodes -o wide

kubectl apply -f examples/demo/web.yaml
kubectl rollout status deploy/web --timeout=120s
kubectl get pods -o wide

echo
echo "demo: 30 requests to the ClusterIP 10.96.0.100 from a client pod (who answered, and the address they saw):"
kubectl delete pod client --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/demo/client.yaml >/dev/null
for _ in $(seq 120); do
  phase=$(kubectl get pod client -o jsonpath='{.status.phase}')
  [ "$phase" = Succeeded ] || [ "$phase" = Failed ] && break
  sleep 0.5
done
kubectl logs client | sort | uniq -c

echo
echo "demo: NodePort 30080 of every node, from this host:"
for address in $(kubectl get nodes -o jsonpath='{.items[*].status.addresses[?(@.type=="InternalIP")].address}'); do
  for _ in 1 2 3; do
    printf '  %s:30080 -> ' "$address"
    curl -sS -m 3 "http://$address:30080/"
  done
done

echo
echo "demo: the cluster is still up:"
echo "  export KUBECONFIG=$KUBECONFIG"
echo "  $BIN/wharf cluster status"
echo "  $BIN/wharf cluster down --name $NAME"
