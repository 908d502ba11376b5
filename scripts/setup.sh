#!/usr/bin/env bash
# Installs what interceptor needs to build, run its demo and run its tests on a fresh
# Debian 12 machine, as root, from Debian's packages and the Rust crate registry only.
# Safe to run again: every step first checks whether its result is already present.
#
# Usage: scripts/setup.sh [--ktls-guest]
#   --ktls-guest  also install QEMU and fetch the guest kernel used by the kTLS tests
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
APT_PACKAGES=(
  # eBPF build: Debian's rustc ships a precompiled `core` for bpfel-unknown-none, and
  # bpf-linker links against this LLVM.
  "llvm-$LLVM_MAJOR-dev" zlib1g-dev libzstd-dev rustc-web cargo-web libstd-rust-web-dev-bpf
  # Topology, capture and traffic tools used by the demo and the tests.
  iproute2 tcpdump
  # The REDIRECT rules of `interceptor sidecar`, the benchmark baseline (nf_tables backend).
  iptables
  # Bulk throughput in `cargo xtask bench`.
  iperf3
  # The bench chart's text font.
  fonts-dejavu-core
  # protoc, which tonic-prost-build runs to compile the CA service's protobuf definition.
  protobuf-compiler
)

log() { echo "setup: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages with apt-get)"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing from apt: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages present"
fi

# rustup's stable builds the userspace crates; make sure it exists before cargo install.
command -v cargo >/dev/null || die "cargo not found: install rustup's stable toolchain first"

export PATH="$HOME/.cargo/bin:$PATH"
if [[ $(bpf-linker --version 2>/dev/null) != *"$BPF_LINKER_VERSION"* ]]; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
  env LLVM_PREFIX=/usr/lib/llvm-$LLVM_MAJOR "LLVM_SYS_${LLVM_MAJOR}1_PREFIX=/usr/lib/llvm-$LLVM_MAJOR" \
    cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked --no-default-features \
    --features "llvm-$LLVM_MAJOR" --quiet
else
  log "bpf-linker $BPF_LINKER_VERSION present"
fi

# bpf-linker reads the LLVM bitcode that Debian's rustc writes, so both must use the
# same LLVM major version; a newer rustc-web from the security suite would break it.
rustc_llvm=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ $rustc_llvm == "$LLVM_MAJOR" ]] ||
  die "/usr/bin/rustc uses LLVM $rustc_llvm but bpf-linker is built for LLVM $LLVM_MAJOR; update LLVM_MAJOR in $0"

if [[ ${1:-} == --ktls-guest ]]; then
  "$(dirname "$0")/ktls-vm-run.sh" --prepare
fi
log "done"
