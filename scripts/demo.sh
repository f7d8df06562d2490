#!/usr/bin/env bash
# A one-command demo of an openspan mesh: three nodes in network namespaces on one bridge, a
# discovery server on the bridge, three kubespan-agents (userspace WireGuard). It waits until
# every node sees its two peers up, shows `kubespanctl status`, `peers` and `health` of each
# node, pings node-3's mesh address from node-1 through the tunnel, then removes everything
# (also on failure and on Ctrl-C).
#
#   sudo scripts/demo.sh
#
# Needs root, `ip` and `nft` (scripts/deps.sh installs them on Debian/Ubuntu). Builds the debug
# binaries when they are missing; OPENSPAN_DEMO_BIN_DIR names a directory that holds
# discovery-server, kubespan-agent and kubespanctl instead. Exits non-zero when the mesh does not
# come up within OPENSPAN_DEMO_TIMEOUT seconds (30) or the ping fails.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
nodes=3
timeout="${OPENSPAN_DEMO_TIMEOUT:-30}"
# Everything this run creates is named after this prefix: never the tests' labs (os<n>x...).
prefix="osdemo$$"
switch="${prefix}-sw"
subnet="10.79.0"
server="${subnet}.254:3000"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || fail "needs root (network namespaces, WireGuard links, nftables): run sudo $0"
for tool in ip nft; do
  command -v "$tool" >/dev/null || fail "$tool is missing: scripts/deps.sh installs it (Debian/Ubuntu, as root)"
done

# --- cleanup: on every exit, also on failure and on Ctrl-C ---------------------------------
workdir=""
namespaces=()
agents=()
server_pid=""

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if ((${#agents[@]} + ${#namespaces[@]})) || [[ -n $workdir ]]; then
    step "cleaning up"
  fi
  # SIGTERM lets the agents remove their links, routes, rules and nftables table.
  ((${#agents[@]})) && kill -TERM "${agents[@]}" 2>/dev/null
  for _ in $(seq 50); do
    local alive=0
    for pid in "${agents[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  ((${#agents[@]})) && kill -KILL "${agents[@]}" 2>/dev/null
  [[ -n $server_pid ]] && kill -KILL "$server_pid" 2>/dev/null
  # Anything else left in the namespaces.
  for ns in "${namespaces[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  wait 2>/dev/null
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
  rm -f /var/run/wireguard/"${prefix}"k*.sock
  [[ -n $workdir ]] && rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'printf "demo: line %s failed: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

# --- binaries -------------------------------------------------------------------------------
bin="${OPENSPAN_DEMO_BIN_DIR:-$repo/target/debug}"
if [[ ! -x $bin/discovery-server || ! -x $bin/kubespan-agent || ! -x $bin/kubespanctl ]]; then
  [[ -z ${OPENSPAN_DEMO_BIN_DIR:-} ]] || fail "$bin lacks discovery-server, kubespan-agent or kubespanctl"
  step "building discovery-server, kubespan-agent and kubespanctl (debug)"
  (cd "$repo" && cargo build -p kubespan-agent -p discovery-server --bins --locked)
fi
ctl="$bin/kubespanctl"

workdir="$(mktemp -d "/tmp/openspan-${prefix}.XXXXXX")"

# --- network: a bridge namespace and three nodes cabled to it (as netns-tests' Lab::new) -----
step "creating namespace $switch with bridge br0 ($subnet.254) and nodes ${prefix}-n1..n$nodes ($subnet.1..$nodes)"
ip netns add "$switch"
namespaces+=("$switch")
ip -n "$switch" link add br0 type bridge
ip -n "$switch" link set br0 up
ip -n "$switch" link set lo up
ip -n "$switch" addr add "$subnet.254/24" dev br0
for n in $(seq "$nodes"); do
  ns="${prefix}-n$n"
  ip netns add "$ns"
  namespaces+=("$ns")
  ip link add "${prefix}v$n" type veth peer name eth0 netns "$ns"
  ip link set "${prefix}v$n" netns "$switch"
  ip -n "$switch" link set "${prefix}v$n" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$subnet.$n/24" dev eth0
  ip -n "$ns" link set eth0 up
done

# --- discovery server ---------------------------------------------------------------------
step "starting discovery-server on $server (in $switch)"
ip netns exec "$switch" "$bin/discovery-server" --addr="$server" --landing-addr= --metrics-addr= \
  --snapshots-enabled=false >/dev/null 2>"$workdir/server.log" &
server_pid=$!
disown "$server_pid" # no "Killed" notice when the cleanup kills it

# --- agents ---------------------------------------------------------------------------------
secrets="$("$ctl" gen secrets)"
cluster_id="$(sed -n 's/^clusterID: *//p' <<<"$secrets")"
cluster_secret="$(sed -n 's/^clusterSecret: *//p' <<<"$secrets")"
if [[ -z $cluster_id || -z $cluster_secret ]]; then
  cluster_id="$(head -c 32 /dev/urandom | base64)"
  cluster_secret="$(head -c 32 /dev/urandom | base64)"
fi

step "starting $nodes kubespan-agents (userspace WireGuard, configs and logs in $workdir)"
for n in $(seq "$nodes"); do
  dir="$workdir/node-$n"
  mkdir -p "$dir"
  cat >"$dir/config.yaml" <<EOF
clusterID: $cluster_id
clusterSecret: $cluster_secret
nodeName: node-$n
discovery:
  endpoints: ["http://$server"]
stateDir: $dir/state
apiSocket: $dir/agent.sock
interface: ${prefix}k$n
backend: userspace
nftablesTable: ${prefix}
EOF
  # `ip netns exec` execs the agent: $! is the agent itself.
  RUST_LOG="${RUST_LOG:-info}" ip netns exec "${prefix}-n$n" "$bin/kubespan-agent" \
    --config "$dir/config.yaml" >/dev/null 2>"$dir/agent.log" &
  agents+=($!)
done

ctl_on() { local n=$1; shift; "$ctl" --socket "$workdir/node-$n/agent.sock" "$@"; }

# How many of node n's peers are up (from `kubespanctl -o json peers`).
peers_up() {
  local json
  json="$(ctl_on "$1" -o json peers 2>/dev/null)" || { echo 0; return; }
  if command -v python3 >/dev/null; then
    python3 -c 'import json, sys
print(sum(1 for p in json.load(sys.stdin) if (p.get("status") or {}).get("state") == "up"))' <<<"$json" 2>/dev/null || echo 0
  else
    { grep -Eo '"state": *"up"' <<<"$json" || true; } | wc -l
  fi
}

# --- wait for the mesh --------------------------------------------------------------------
step "waiting (at most ${timeout} s) until every node sees $((nodes - 1)) peers up"
deadline=$((SECONDS + timeout))
while :; do
  counts=()
  ready=1
  for n in $(seq "$nodes"); do
    up="$(peers_up "$n")"
    counts+=("node-$n: $up")
    ((up == nodes - 1)) || ready=0
  done
  ((ready)) && break
  for i in "${!agents[@]}"; do
    kill -0 "${agents[$i]}" 2>/dev/null || {
      tail -n 20 "$workdir/node-$((i + 1))/agent.log" >&2
      fail "the agent of node-$((i + 1)) exited"
    }
  done
  if ((SECONDS >= deadline)); then
    for n in $(seq "$nodes"); do
      printf -- '--- node-%s agent log (tail)\n' "$n" >&2
      tail -n 15 "$workdir/node-$n/agent.log" >&2
    done
    fail "the mesh did not come up within ${timeout} s (peers up: ${counts[*]})"
  fi
  sleep 1
done
echo "mesh up after $((SECONDS - deadline + timeout)) s (${counts[*]})"

for n in $(seq "$nodes"); do
  step "node-$n: kubespanctl status"
  ctl_on "$n" status
  step "node-$n: kubespanctl peers"
  ctl_on "$n" peers
  step "node-$n: kubespanctl health"
  ctl_on "$n" health || fail "node-$n is not healthy"
done

# --- a ping through the mesh ----------------------------------------------------------------
mesh_address() {
  local json
  json="$(ctl_on "$1" -o json identity)"
  sed -n 's/.*"mesh_address": *"\([^"]*\)".*/\1/p' <<<"$json" | head -n 1
}
from="$(mesh_address 1)"
to="$(mesh_address 3)"
[[ -n $to ]] || fail "node-3 has no mesh address"
step "ping from node-1 ($from) to node-3's mesh address $to, through WireGuard"
ip netns exec "${prefix}-n1" ping -c 3 -W 2 "$to" || fail "the ping through the mesh failed"

step "demo succeeded: 3 nodes, every peer up, node-1 reaches node-3 through the mesh"
