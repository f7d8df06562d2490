#!/usr/bin/env bash
# Both directions at once through one userspace WireGuard tunnel between two network namespaces
# (veth, no bridge): `iperf3 --bidir` for 5 s over openspan's device or wireguard-go, each
# configured with wg(8). Root; needs iproute2, wireguard-tools, iperf3 (and wireguard-go).
#
#   cargo build --release -p kubespan-agent --bins
#   scripts/bidir-bench.sh openspan        # or: scripts/bidir-bench.sh wireguard-go
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-openspan}" in
  openspan) tunnel=(target/release/openspan-wireguard) ;;
  wireguard-go) tunnel=(wireguard-go -f) ;;
  *) echo "usage: $0 [openspan|wireguard-go]" >&2; exit 2 ;;
esac
id="bd$$"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  ip netns del "${id}a" 2>/dev/null || true
  ip netns del "${id}b" 2>/dev/null || true
  rm -f "/var/run/wireguard/${id}wa.sock" "/var/run/wireguard/${id}wb.sock"
}
trap cleanup EXIT
ip netns add "${id}a"
ip netns add "${id}b"
ip link add "${id}va" netns "${id}a" type veth peer name "${id}vb" netns "${id}b"
for side in a b; do
  n=$([[ $side == a ]] && echo 1 || echo 2)
  ip -n "$id$side" link set lo up
  ip -n "$id$side" addr add "10.66.0.$n/24" dev "${id}v$side"
  ip -n "$id$side" link set "${id}v$side" up
  WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error timeout 60 ip netns exec "$id$side" "${tunnel[@]}" "${id}w$side" >/dev/null 2>&1 &
  pids+=($!)
done
for _ in $(seq 50); do
  [[ -S /var/run/wireguard/${id}wa.sock && -S /var/run/wireguard/${id}wb.sock ]] && break
  sleep 0.1
done
key_a=$(wg genkey); key_b=$(wg genkey)
pub_a=$(wg pubkey <<<"$key_a"); pub_b=$(wg pubkey <<<"$key_b")
ip netns exec "${id}b" wg set "${id}wb" private-key <(echo "$key_b") listen-port 51820 \
  peer "$pub_a" allowed-ips 10.67.0.1/32 endpoint 10.66.0.1:51820
ip netns exec "${id}a" wg set "${id}wa" private-key <(echo "$key_a") listen-port 51820 \
  peer "$pub_b" allowed-ips 10.67.0.2/32 endpoint 10.66.0.2:51820
ip -n "${id}a" addr add 10.67.0.1/24 dev "${id}wa"
ip -n "${id}b" addr add 10.67.0.2/24 dev "${id}wb"
ip -n "${id}a" link set "${id}wa" mtu 1420 up
ip -n "${id}b" link set "${id}wb" mtu 1420 up
ip netns exec "${id}a" ping -c 1 -W 5 10.67.0.2 >/dev/null
ip netns exec "${id}b" timeout 30 iperf3 -s -1 >/dev/null 2>&1 &
pids+=($!)
sleep 0.3
echo "${1:-openspan}: iperf3 --bidir, 5 s"
ip netns exec "${id}a" timeout 30 iperf3 -c 10.67.0.2 -t 5 --bidir | grep -E "receiver"
