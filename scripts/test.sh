#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, BPF_PROG_TEST_RUN
# packet tests, and the privileged network-namespace suites. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/env.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The netns suites run the agent binary itself.
cargo build --workspace --bins --quiet
cargo test --workspace
