#!/usr/bin/env bash
# Where a handshake flood goes in openspan's userspace WireGuard device: two devices with an
# established tunnel in network namespaces on one bridge, `handshake-flood` at 70,000 valid-mac1
# initiations per second for 8 s from a third namespace, pings through the tunnel meanwhile,
# and the victim namespace's UDP counters (datagrams taken, dropped on a full receive buffer,
# sent). With `perf` installed and PERF=1 it also records the victim device for 4 s
# (perf report -i /tmp/flood-<tag>.perf). Root; needs iproute2, wireguard-tools, ping, nstat.
#
#   cargo build --release -p openspan-wireguard --bin openspan-wireguard -p netns-tests --bin handshake-flood
#   scripts/flood-counters.sh [path/to/openspan-wireguard] [tag]
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(realpath "${1:-target/release/openspan-wireguard}")
tag=${2:-flood}
flood=target/release/handshake-flood
id="fc$$"
dir=$(mktemp -d)
cleanup() {
  for n in a b f; do
    for pid in $(ip netns pids "$id$n" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 1
  for n in a b f s; do ip netns del "$id$n" 2>/dev/null || true; done
  rm -f "/var/run/wireguard/${id}wa.sock" "/var/run/wireguard/${id}wb.sock"
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "${id}s"
ip -n "${id}s" link add br0 type bridge
ip -n "${id}s" link set br0 up
i=1
for n in a b f; do
  ip netns add "$id$n"
  ip link add "${id}v$n" type veth peer name eth0 netns "$id$n"
  ip link set "${id}v$n" netns "${id}s"
  ip -n "${id}s" link set "${id}v$n" master br0 up
  ip -n "$id$n" link set lo up
  ip -n "$id$n" addr add "10.88.0.$i/24" dev eth0
  ip -n "$id$n" link set eth0 up
  i=$((i + 1))
done
for n in a b; do
  ip netns exec "$id$n" timeout 60 "$device" "${id}w$n" >"$dir/$n.log" 2>&1 &
done
for n in a b; do
  for _ in $(seq 50); do [ -S "/var/run/wireguard/${id}w$n.sock" ] && break; sleep 0.1; done
  wg genkey >"$dir/$n.key"
done
pa=$(wg pubkey <"$dir/a.key")
pb=$(wg pubkey <"$dir/b.key")
ip netns exec "${id}a" wg set "${id}wa" private-key "$dir/a.key" listen-port 51820 \
  peer "$pb" allowed-ips 10.89.0.2/32 endpoint 10.88.0.2:51820
ip netns exec "${id}b" wg set "${id}wb" private-key "$dir/b.key" listen-port 51820 \
  peer "$pa" allowed-ips 10.89.0.1/32 endpoint 10.88.0.1:51820
for n in a b; do
  ip -n "$id$n" addr add "10.89.0.$([ $n = a ] && echo 1 || echo 2)/24" dev "${id}w$n"
  ip -n "$id$n" link set "${id}w$n" mtu 1420 up
done
sleep 1
ip netns exec "${id}b" ping -q -c 3 -i 0.2 10.89.0.1 | tail -2
ip netns exec "${id}a" nstat -n
ip netns exec "${id}f" timeout 20 "$flood" 10.88.0.1:51820 "$pa" --rate 70000 --duration 8 &
flood_pid=$!
sleep 1
if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null; then
  victim=$(ip netns pids "${id}a" | while read -r pid; do
    [ "$(readlink "/proc/$pid/exe")" = "$device" ] && echo "$pid"
  done | head -1)
  perf record -g -o "/tmp/flood-$tag.perf" -p "$victim" -- sleep 4 &
fi
echo "pings through the tunnel during the flood:"
# ping exits 1 when fewer than -c answers came by the -w deadline, which is expected here.
(ip netns exec "${id}b" ping -q -n -i 0.01 -c 500 -w 6 10.89.0.1 || true) | tail -2
wait "$flood_pid"
wait
echo "UDP counters of the victim's namespace over the flood:"
ip netns exec "${id}a" nstat | grep -E 'Udp(InDatagrams|RcvbufErrors|OutDatagrams)' || true
