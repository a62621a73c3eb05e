#!/usr/bin/env bash
# Installs everything wharf needs to build and test on a Debian machine of
# this kind (see ../shared/notes/PLATFORM.md). Idempotent: each step checks
# first, so a second run takes a second or two.
set -euo pipefail

die() { echo "setup: $*" >&2; exit 1; }

# cargo-installed tools (bpf-linker) live here; sudo's secure_path drops it.
export PATH="$HOME/.cargo/bin:$PATH"
step() { echo "setup: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs apt packages and later loads eBPF programs"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian"
command -v rustup >/dev/null || die "rustup not found: the machine's Rust toolchain is missing"
command -v kubectl >/dev/null \
  || die "kubectl not found: the API server's tests drive kubectl 1.32 (preinstalled on this machine kind)"
python3 -m pip --version >/dev/null 2>&1 \
  || die "python3 with pip not found: the API server's tests use the official Python client"

# Debian packages: LLVM 22 for bpf-linker, iproute2/ethtool for the netns
# tests and demo, curl for the demo, etcd-server for the etcd store,
# protobuf-compiler for etcd-client's generated gRPC code, the rule tools
# the iptables and nftables proxy modes drive (conntrack to read flows
# back in tests), qemu + busybox for the VM harness the IPVS mode is
# tested in (this host's kernel has no IPVS), and containerd, runc and the
# CNI project's plugins (its loopback plugin) for the CRI tests (busybox
# also makes their images), and wrk, the keep-alive HTTP load of `wharf
# bench routing`.
packages=(llvm-22-dev libzstd-dev zlib1g-dev iproute2 ethtool curl etcd-server protobuf-compiler
  iptables nftables conntrack ipvsadm qemu-system-x86 busybox-static cpio binutils
  containerd runc containernetworking-plugins wrk)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi

# The eBPF crate builds with nightly's build-std, which needs rust-src;
# the test command lints it with nightly's clippy.
rustup toolchain list | grep -q '^nightly' \
  || die "no nightly toolchain: the eBPF crate needs it (it is preinstalled on this machine kind)"
installed=$(rustup component list --toolchain nightly --installed)
for component in rust-src clippy; do
  if ! grep -q "^$component" <<<"$installed"; then
    step "adding $component to nightly"
    rustup component add "$component" --toolchain nightly >/dev/null \
      || die "rustup component add $component --toolchain nightly failed"
  fi
done

# bpf-linker links the eBPF object; built against Debian's LLVM 22, never
# the image's LLVM 14 (PLATFORM.md).
BPF_LINKER_VERSION=0.13.0
if ! bpf-linker --version 2>/dev/null | grep -qx "bpf-linker $BPF_LINKER_VERSION"; then
  step "building bpf-linker $BPF_LINKER_VERSION (about 80 s)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install --quiet --locked bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features llvm-22 \
    || die "cargo install bpf-linker failed"
fi

# The official Python client: the API server's end-to-end tests drive it.
if ! python3 -c 'import kubernetes, sys; sys.exit(not kubernetes.__version__.startswith("32."))' 2>/dev/null; then
  step "installing the kubernetes Python client"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'kubernetes>=32,<33' \
    || die "pip install kubernetes failed (needs python3 with pip and PyPI access)"
fi

# The VM harness (tests/src/vm.rs) boots Debian's stock kernel, which has
# IPVS: the package is unpacked under /var/cache/wharf/vm, not installed.
VM_DIR=/var/cache/wharf/vm
if [ ! -d "$VM_DIR/kernel/boot" ]; then
  kernel_package=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
  if [ -z "$kernel_package" ]; then
    apt-get update -qq || die "apt-get update failed"
    kernel_package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
  fi
  [ -n "$kernel_package" ] || die "no linux-image-amd64 package in the apt sources: the VM harness needs Debian's kernel"
  step "unpacking $kernel_package for the VM harness"
  mkdir -p "$VM_DIR"
  (cd "$VM_DIR" && rm -rf kernel.new ./*.deb && apt-get download -qq "$kernel_package" 2>/dev/null \
    && dpkg-deb -x ./*.deb kernel.new && rm -f ./*.deb && mv kernel.new kernel) \
    || die "downloading or unpacking $kernel_package failed"
fi

# bpffs: the agent mounts it itself, but tests and the demo check pins.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi
step "ready"
