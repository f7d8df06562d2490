#!/usr/bin/env bash
# Runs every test of the workspace. Installs the system packages the build and the tests need
# when they are missing (scripts/deps.sh: Debian/Ubuntu, as root); elsewhere it says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh

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
