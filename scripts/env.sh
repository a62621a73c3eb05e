# Sourced by the scripts: one cargo target directory outside the clone, so
# fresh clones (CI) rebuild incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/wharf/target}"
mkdir -p "$CARGO_TARGET_DIR"
export PATH="$HOME/.cargo/bin:$PATH"

# The shared target directory grows by a whole workspace build (about
# 15 GB) for every new clone path, and a full disk fails a build halfway
# (seen: 78 GB of stale artifacts). Below 25 GB free it starts afresh:
# one cold build (about 10 minutes) instead of a failure.
available_kb=$(df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print $4 }')
if [ -n "$available_kb" ] && [ "$available_kb" -lt $((25 * 1024 * 1024)) ]; then
  echo "env: under 25 GB free; clearing $CARGO_TARGET_DIR" >&2
  rm -rf "${CARGO_TARGET_DIR:?}"/*
fi
unset available_kb
