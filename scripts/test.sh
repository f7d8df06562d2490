#!/usr/bin/env bash
# Runs every test of the workspace. Installs the system packages the tests need when they are
# missing (Debian/Ubuntu, as root); elsewhere it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A needed=(
  [ip]=iproute2
  [nft]=nftables
  [wg]=wireguard-tools
  [ping]=iputils-ping
  [iperf3]=iperf3
  [tcpdump]=tcpdump
  [wireguard-go]=wireguard-go
)
missing=()
for cmd in "${!needed[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${needed[$cmd]}")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing test dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing test dependencies: ${missing[*]} (install them, or run this script as root on Debian)" >&2
    exit 1
  fi
fi

# The namespace tests run the built binaries (discovery-server, kubespan-agent, kubespanctl);
# the 40-node convergence test (netns-tests/tests/scale.rs) runs the release agent and server.
cargo build --workspace --bins --locked
cargo build --release -p kubespan-agent -p discovery-server --bins --locked
cargo test --workspace --locked "$@"

# The kernel lane: the namespace mesh scenarios against kernel WireGuard (backend kernel and
# auto) in a QEMU guest booting Debian's cloud kernel; see README.md, "The kernel lane". It fails
# the run when a scenario fails or when QEMU cannot run here; OPENSPAN_SKIP_KERNEL_LANE=1 skips
# it, and says so.
scripts/kernel-lane.sh
