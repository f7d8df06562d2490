#!/usr/bin/env bash
# Builds the Debian packages of openspan with dpkg-deb (no debhelper):
#   openspan-discovery-server  discovery-server, its units, /etc/default/discovery-server, man page
#   openspan-agent             kubespan-agent and kubespanctl, unit, /etc/default/kubespan-agent,
#                              example configuration, man pages, bash/zsh/fish completions
#   openspan-relay             openspan-relay, unit, /etc/default/openspan-relay, example clusters
#   openspan-wireguard         the standalone userspace WireGuard device
# Man pages and completions come from the packaged binaries themselves (their hidden
# `--generate-man DIR` and `kubespanctl completion SHELL`), so they always match them.
#
# Usage: scripts/package-deb.sh [--profile release|debug] [--out DIR] [--bin-dir DIR]
#   --profile  cargo profile to build and package (default release)
#   --out      where the .deb files go (default target/debian)
#   --bin-dir  package the binaries already in DIR instead of running cargo build
# Environment: DEB_MAINTAINER ("Name <email>") overrides the Maintainer field;
# SOURCE_DATE_EPOCH, when set, dates the files (reproducible packages).
#
# Depends is computed by dpkg-shlibdeps (package dpkg-dev) from the binaries' shared libraries;
# without it, from the highest GLIBC_ symbol version they need (readelf, package binutils).
# Systemd units are installed but never enabled or started: postinst only runs
# `systemctl daemon-reload`, and only when systemd runs the host (not when installing into
# another root: dpkg sets DPKG_ROOT then).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

profile=release
out=target/debian
bin_dir=
usage() { sed -n '/^# Usage/,/^# Environment/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; }
while (($#)); do
  case $1 in
    --profile) profile=${2:?--profile needs release or debug}; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --bin-dir=*) bin_dir=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "package-deb.sh: unknown argument $1" >&2; usage; exit 2 ;;
  esac
done
case $profile in
  release|debug) ;;
  *) echo "package-deb.sh: --profile is release or debug, not $profile" >&2; exit 2 ;;
esac

for tool in dpkg-deb dpkg gzip strip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "package-deb.sh: $tool is missing (apt-get install dpkg binutils gzip)" >&2
    exit 1
  fi
done

binaries=(discovery-server kubespan-agent kubespanctl openspan-relay openspan-wireguard)
if [[ -z $bin_dir ]]; then
  cargo_profile=()
  [[ $profile == release ]] && cargo_profile=(--release)
  cargo build --locked "${cargo_profile[@]}" \
    -p discovery-server -p kubespan-agent -p openspan-relay -p openspan-wireguard \
    --bin discovery-server --bin kubespan-agent --bin kubespanctl --bin openspan-relay \
    --bin openspan-wireguard
  bin_dir=${CARGO_TARGET_DIR:-target}/$profile
fi
for bin in "${binaries[@]}"; do
  if [[ ! -x $bin_dir/$bin ]]; then
    echo "package-deb.sh: $bin_dir/$bin is missing (build it: cargo build --workspace --bins)" >&2
    exit 1
  fi
done
bin_dir=$(cd "$bin_dir" && pwd)

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[[ -n $version ]] || { echo "package-deb.sh: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
arch=$(dpkg --print-architecture)
# No project mail address exists yet: a placeholder in the reserved .invalid domain.
maintainer=${DEB_MAINTAINER:-openspan developers <maintainers@openspan.invalid>}
homepage=https://github.com/openspan/openspan

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants a source tree: debian/control and debian/<package>/.
mkdir -p "$work/debian"
printf 'Source: openspan\n' >"$work/debian/control"

# stage PACKAGE: the package's root, created empty.
stage() { mkdir -p "$work/debian/$1"; echo "$work/debian/$1"; }

# install_file MODE SOURCE DEST
install_file() { install -D -m "$1" "$2" "$3"; }

# install_binary ROOT NAME: stripped of debug information (as Debian does; the symbols stay, so
# a panic's backtrace still names functions).
install_binary() {
  install -D -m 0755 "$bin_dir/$2" "$1/usr/bin/$2"
  strip --strip-debug --remove-section=.comment "$1/usr/bin/$2"
}

# install_man ROOT NAME: the pages the binary writes, gzipped into their section.
install_man() {
  local pages=$work/man/$2 page section
  "$bin_dir/$2" --generate-man "$pages" >/dev/null
  for page in "$pages"/*; do
    section=${page##*.}
    mkdir -p "$1/usr/share/man/man$section"
    gzip -9 -n -c "$page" >"$1/usr/share/man/man$section/${page##*/}.gz"
    chmod 0644 "$1/usr/share/man/man$section/${page##*/}.gz"
  done
}

# install_unit ROOT UNIT [DEFAULT-FILE]: a unit of deploy/systemd with the packaged binary's
# path, reading /etc/default/DEFAULT-FILE when it exists.
install_unit() {
  local unit=$1/usr/lib/systemd/system/$2
  install_file 0644 "deploy/systemd/$2" "$unit"
  sed -i 's|/usr/local/bin/|/usr/bin/|g' "$unit"
  if [[ -n ${3:-} ]]; then
    sed -i "0,/^\[Service\]$/s||[Service]\n# Settings (environment variables): /etc/default/$3. The flags below win over them.\nEnvironmentFile=-/etc/default/$3|" "$unit"
  fi
}

install_copyright() {
  install -d -m 0755 "$1/usr/share/doc/$2"
  cat >"$1/usr/share/doc/$2/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: openspan
Source: $homepage

Files: *
Copyright: openspan developers
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
  chmod 0644 "$1/usr/share/doc/$2/copyright"
}

# depends ROOT BINARY...: the Depends value for the binaries.
depends() {
  local root=$1 rel line
  shift
  if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    local args=()
    for bin in "$@"; do args+=("-e${root#"$work"/}/usr/bin/$bin"); done
    line=$(cd "$work" && dpkg-shlibdeps -O "${args[@]}" 2>/dev/null) || {
      echo "package-deb.sh: dpkg-shlibdeps failed on $*" >&2
      (cd "$work" && dpkg-shlibdeps -O "${args[@]}") >&2
      exit 1
    }
    echo "${line#shlibs:Depends=}"
    return
  fi
  if command -v readelf >/dev/null 2>&1; then
    local glibc gcc=
    glibc=$(for bin in "$@"; do readelf -W -V "$root/usr/bin/$bin"; done |
      grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    for bin in "$@"; do
      readelf -d "$root/usr/bin/$bin" | grep -q 'Shared library: \[libgcc_s.so.1\]' && gcc=", libgcc-s1"
    done
    echo "libc6 (>= ${glibc:-2.17})$gcc"
    return
  fi
  echo "package-deb.sh: neither dpkg-shlibdeps (dpkg-dev) nor readelf (binutils) is installed to compute Depends" >&2
  exit 1
}

# maintainer_scripts ROOT STATE_DIR UNIT...: postinst reloads systemd's units (never enables or
# starts them) and, on an upgrade, restarts the ones that run (try-restart), so the new binary
# is the one running; prerm stops a running service on removal; postrm reloads systemd after
# removal, and on purge deletes STATE_DIR ("-": none), which holds the node's keys.
maintainer_scripts() {
  local root=$1 state_dir=$2
  shift 2
  local units=$*
  install -d -m 0755 "$root/DEBIAN"
  cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
# The units are installed, never enabled or started: see /usr/share/doc/<package>/README.Debian.
if [ "\$1" = configure ] && [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
	# An upgrade (\$2: the version before): the running services take the new binary.
	if [ -n "\$2" ]; then
		systemctl --system try-restart $units >/dev/null 2>&1 || true
	fi
fi
exit 0
EOF
  cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
	systemctl --system stop $units >/dev/null 2>&1 || true
fi
exit 0
EOF
  local purge_state=""
  if [[ $state_dir != - ]]; then
    purge_state="
# Purge removes the state too: it holds this node's keys (the WireGuard private key).
if [ \"\$1\" = purge ]; then
	rm -rf \"\${DPKG_ROOT:-}$state_dir\"
fi"
  fi
  cat >"$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if { [ "\$1" = remove ] || [ "\$1" = purge ]; } && [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi$purge_state
exit 0
EOF
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
}

readme_debian() {
  install -d -m 0755 "$1/usr/share/doc/$2"
  printf '%s\n' "$3" >"$1/usr/share/doc/$2/README.Debian"
  chmod 0644 "$1/usr/share/doc/$2/README.Debian"
}

# build_deb ROOT PACKAGE DEPENDS RECOMMENDS SYNOPSIS DESCRIPTION: control, conffiles, md5sums,
# then the .deb.
build_deb() {
  local root=$1 package=$2 deps=$3 recommends=$4 synopsis=$5 description=$6
  install -d -m 0755 "$root/DEBIAN"
  if [[ -d $root/etc ]]; then
    (cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
    chmod 0644 "$root/DEBIAN/conffiles"
  fi
  (cd "$root" && find usr -type f | sort | xargs md5sum) >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/md5sums"
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: $package"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $size"
    echo "Depends: $deps"
    [[ -n $recommends ]] && echo "Recommends: $recommends"
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: $homepage"
    echo "Description: $synopsis"
    # Extended description: lines start with a space; an empty line is " .".
    printf '%s\n' "$description" | sed 's/^$/./; s/^/ /'
  } >"$root/DEBIAN/control"
  chmod 0644 "$root/DEBIAN/control"
  find "$root" -type d -exec chmod 0755 {} +
  if [[ -n ${SOURCE_DATE_EPOCH:-} ]]; then
    find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  fi
  # Debug builds are large and packaged for tests: fast compression; release: xz.
  local compression=(-Zxz)
  [[ $profile == debug ]] && compression=(-Zgzip -z1)
  dpkg-deb --root-owner-group "${compression[@]}" --build "$root" \
    "$out/${package}_${version}_${arch}.deb" >/dev/null
  echo "$out/${package}_${version}_${arch}.deb"
}

# --- openspan-discovery-server ---
root=$(stage openspan-discovery-server)
install_binary "$root" discovery-server
install_man "$root" discovery-server
install_unit "$root" discovery-server.service discovery-server
install_unit "$root" discovery-server-replica.service discovery-server
install -D -m 0644 /dev/stdin "$root/etc/default/discovery-server" <<'EOF'
# Environment of discovery-server.service and discovery-server-replica.service: any
# DISCOVERY_* variable of `discovery-server --help` (man discovery-server). Flags on the
# units' ExecStart lines win over these; change those with `systemctl edit discovery-server`.
#
# TLS for the gRPC listener:
#DISCOVERY_CERTIFICATE_PATH=/etc/discovery-server/tls.crt
#DISCOVERY_KEY_PATH=/etc/discovery-server/tls.key
# A STUN responder for nodes behind NAT:
#DISCOVERY_STUN_ADDR=:3478
#DISCOVERY_MAX_CONNECTIONS=10000
EOF
install_copyright "$root" openspan-discovery-server
readme_debian "$root" openspan-discovery-server "openspan-discovery-server for Debian
-----------------------------------

The units are installed but not enabled. One server, state in a snapshot file:
  systemctl enable --now discovery-server
Several replicas sharing their state in etcd: put the etcd settings in
/etc/discovery-server/etcd.env (see the unit's comments), then
  systemctl enable --now discovery-server-replica
Settings: /etc/default/discovery-server; options: man discovery-server."
maintainer_scripts "$root" - discovery-server.service discovery-server-replica.service
deps=$(depends "$root" discovery-server)
build_deb "$root" openspan-discovery-server "$deps" "" \
  "KubeSpan-compatible discovery service" \
  "The rendezvous service of openspan and Talos KubeSpan meshes: nodes publish their
encrypted records (keys, addresses, endpoints) and watch the other nodes' records.
Wire-compatible with Sidero's discovery service.

Installs the discovery-server daemon and its systemd units (not enabled)."

# --- openspan-agent ---
root=$(stage openspan-agent)
install_binary "$root" kubespan-agent
install_binary "$root" kubespanctl
install_man "$root" kubespan-agent
install_man "$root" kubespanctl
install_unit "$root" kubespan-agent.service kubespan-agent
install -d -m 0755 "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$bin_dir/kubespanctl" completion bash >"$root/usr/share/bash-completion/completions/kubespanctl"
"$bin_dir/kubespanctl" completion zsh >"$root/usr/share/zsh/vendor-completions/_kubespanctl"
"$bin_dir/kubespanctl" completion fish >"$root/usr/share/fish/vendor_completions.d/kubespanctl.fish"
chmod 0644 "$root/usr/share/bash-completion/completions/kubespanctl" \
  "$root/usr/share/zsh/vendor-completions/_kubespanctl" \
  "$root/usr/share/fish/vendor_completions.d/kubespanctl.fish"
# The example is `kubespanctl gen config` with its fresh id and secret replaced by
# placeholders the agent refuses: an example must never carry a usable secret.
examples=$root/usr/share/doc/openspan-agent/examples
install -d -m 0755 "$examples"
{
  echo "# Example only: the agent refuses this file until clusterID and clusterSecret are set."
  echo "# Write a real one with: kubespanctl gen config --output-file /etc/kubespan/config.yaml"
  "$bin_dir/kubespanctl" gen config |
    sed 's|^clusterID: .*|clusterID: REPLACE-WITH-THE-CLUSTER-ID|; s|^clusterSecret: .*|clusterSecret: REPLACE-WITH-THE-CLUSTER-SECRET-FROM-kubespanctl-gen-secrets|'
} >"$examples/config.yaml"
chmod 0644 "$examples/config.yaml"
if grep -Eq '^clusterSecret: [A-Za-z0-9+/]{43}=' "$examples/config.yaml"; then
  echo "package-deb.sh: the example configuration still holds a secret" >&2
  exit 1
fi
install -D -m 0644 /dev/stdin "$root/etc/default/kubespan-agent" <<'EOF'
# Environment of kubespan-agent.service. The configuration file is
# /etc/kubespan/config.yaml (the unit's --config); write one with
#   kubespanctl gen config --output-file /etc/kubespan/config.yaml
#KUBESPAN_DEBUG=true
#KUBESPAN_LOG_FORMAT=json
#RUST_LOG=info
EOF
install_copyright "$root" openspan-agent
readme_debian "$root" openspan-agent "openspan-agent for Debian
------------------------

The unit is installed but not enabled. Write the configuration (the same cluster id and
secret on every node), then start the agent:
  kubespanctl gen config --discovery-endpoint http://DISCOVERY-HOST:3000 \\
    --output-file /etc/kubespan/config.yaml
  systemctl enable --now kubespan-agent
  kubespanctl status
An annotated example: /usr/share/doc/openspan-agent/examples/config.yaml.
Shell completion for kubespanctl is installed for bash, zsh and fish.
An upgrade restarts a running agent (the mesh pauses for a few seconds with the userspace
device). Purging the package deletes /var/lib/kubespan: the node's identity and WireGuard key."
maintainer_scripts "$root" /var/lib/kubespan kubespan-agent.service
deps=$(depends "$root" kubespan-agent kubespanctl)
build_deb "$root" openspan-agent "$deps" \
  "nftables, iproute2, wireguard-tools" \
  "KubeSpan-compatible WireGuard mesh agent and kubespanctl" \
  "The per-node agent of an openspan mesh: publishes this node to the discovery
services, watches the other nodes and keeps a WireGuard mesh with them (kernel
WireGuard or its own userspace device), with KubeSpan's routing and firewall
rules. Wire-compatible with Talos KubeSpan.

Installs kubespan-agent with its systemd unit (not enabled) and kubespanctl,
the command line tool that shows members, peers and mesh health."

# --- openspan-relay ---
root=$(stage openspan-relay)
install_binary "$root" openspan-relay
install_man "$root" openspan-relay
install_unit "$root" openspan-relay.service openspan-relay
install -D -m 0644 /dev/stdin "$root/usr/share/doc/openspan-relay/examples/clusters" <<'EOF'
# /etc/openspan-relay/clusters: the clusters allowed to use this relay, one
# `<cluster-id> <verifier-hex>` per line. On a node of the cluster, print its line with:
#   kubespanctl gen relay-verifier --config /etc/kubespan/config.yaml
# (it prints `<id>=<verifier>`; write it here with a space instead of `=`).
EOF
install -D -m 0644 /dev/stdin "$root/etc/default/openspan-relay" <<'EOF'
# Environment of openspan-relay.service: any RELAY_* variable of `openspan-relay --help`
# (man openspan-relay). Flags on the unit's ExecStart line win over these.
#RELAY_MAX_CONNECTIONS=10000
#RELAY_MAX_CLIENTS_PER_CLUSTER=1024
EOF
install_copyright "$root" openspan-relay
readme_debian "$root" openspan-relay "openspan-relay for Debian
-------------------------

The unit is installed but not enabled. It needs /etc/openspan-relay/tls.crt and tls.key
(the relay's certificate) and /etc/openspan-relay/clusters (example:
/usr/share/doc/openspan-relay/examples/clusters), then:
  systemctl enable --now openspan-relay
The unit runs as a dynamic user: hand it the key as a systemd credential rather than making
the file world-readable, in a drop-in (systemctl edit openspan-relay):
  [Service]
  LoadCredential=tls.key:/etc/openspan-relay/tls.key
and point the relay's key file option at %d/tls.key (man openspan-relay)."
maintainer_scripts "$root" - openspan-relay.service
deps=$(depends "$root" openspan-relay)
build_deb "$root" openspan-relay "$deps" "" \
  "QUIC relay for openspan WireGuard meshes" \
  "Forwards WireGuard packets over QUIC between openspan nodes that cannot reach
each other directly (both behind endpoint-dependent NAT, or UDP blocked).

Installs openspan-relay with its systemd unit (not enabled)."

# --- openspan-wireguard ---
root=$(stage openspan-wireguard)
install_binary "$root" openspan-wireguard
install_man "$root" openspan-wireguard
install_copyright "$root" openspan-wireguard
install -d -m 0755 "$root/DEBIAN"
deps=$(depends "$root" openspan-wireguard)
build_deb "$root" openspan-wireguard "$deps" \
  "wireguard-tools, iproute2" \
  "openspan's userspace WireGuard device" \
  "A standalone userspace WireGuard device (boringtun's protocol core with TUN
offloads and UDP GSO/GRO) configured with wg(8), like wireguard-go.

Installs openspan-wireguard, the same device kubespan-agent runs with the
userspace backend."
