# Sourced by the scripts: one cargo target directory outside the clone, so
# fresh clones (CI) rebuild incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/wharf/target}"
mkdir -p "$CARGO_TARGET_DIR"
export PATH="$HOME/.cargo/bin:$PATH"
