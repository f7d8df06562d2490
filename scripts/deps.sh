#!/usr/bin/env bash
# Installs the system packages the build and the tests need when they are missing (Debian/Ubuntu,
# as root); elsewhere it says what to install. Called by scripts/test.sh, .ci/run and
# scripts/kernel-lane.sh.
#
# Arguments add to the list: COMMAND=PACKAGE (or /FILE=PACKAGE) installs PACKAGE when the command
# (file) is missing; a bare PACKAGE is installed in any case.
set -euo pipefail

# command or file -> Debian package
declare -A needed=(
  [ip]=iproute2
  [nft]=nftables
  [wg]=wireguard-tools
  [ping]=iputils-ping
  [iperf3]=iperf3
  [tcpdump]=tcpdump
  [wireguard-go]=wireguard-go
  # The port mapper's tests run a real gateway (UPnP-IGD, NAT-PMP, PCP); this package is the
  # binary alone, without the service that would start it.
  [miniupnpd]=miniupnpd-nftables
  # The etcd backend's tests run a real etcd.
  [etcd]=etcd-server
  # etcd-client compiles etcd's .proto files at build time.
  [protoc]=protobuf-compiler
  [/usr/include/google/protobuf/descriptor.proto]=libprotobuf-dev
  # scripts/package-deb.sh: Depends from the binaries' libraries, stripping; its test renders
  # the man pages with groff.
  [dpkg-shlibdeps]=dpkg-dev
  [strip]=binutils
  [groff]=groff-base
  # The monitoring kit's tests (netns-tests/tests/monitoring.rs): promtool checks and unit-tests
  # the alert rules; the dashboard is validated against its JSON schema by Debian's python3.
  # netns-tests/tests/health.rs runs a discovery server with its clock off (faketime).
  [faketime]=faketime
  [promtool]=prometheus
  [/usr/lib/python3/dist-packages/jsonschema]=python3-jsonschema
)
missing=()
for arg in "$@"; do
  if [[ $arg == *=* ]]; then
    needed[${arg%%=*}]=${arg#*=}
  else
    missing+=("$arg")
  fi
done
for item in "${!needed[@]}"; do
  if [[ $item == /* ]]; then
    [[ -e $item ]] || missing+=("${needed[$item]}")
  else
    command -v "$item" >/dev/null 2>&1 || missing+=("${needed[$item]}")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing build and test dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing build and test dependencies: ${missing[*]} (install them, or run this script as root on Debian)" >&2
    exit 1
  fi
fi
