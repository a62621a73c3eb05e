#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, BPF_PROG_TEST_RUN
# packet tests, and the privileged network-namespace suites. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh
# A CI run builds once, in a clone of its own: incremental state would
# only fill the disk (tens of GB over a few runs).
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The eBPF crate is only compiled for real on its own target (the host
# build above sees an empty main).
(cd dataplane-ebpf && CARGO_TARGET_DIR="$CARGO_TARGET_DIR/ebpf-clippy" rustup run nightly \
  cargo clippy --quiet --release --target bpfel-unknown-none -Z build-std=core -- -D warnings)
# The netns suites run the agent binary itself.
cargo build --workspace --bins --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line with the totals over every test binary (the last block
# cargo prints is a crate's doc-tests, usually empty).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
