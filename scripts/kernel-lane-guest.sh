#!/bin/busybox sh
# /init of the kernel lane's QEMU guest (copied into the initramfs by scripts/kernel-lane.sh).
# Reports on the serial console with lines starting `KLANE:` that the host parses, then powers
# off. Busybox's shell runs its own applets ahead of PATH: the real tools are called by absolute
# path here (the test executables find them through PATH, where they come first).
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mkdir -p /dev/pts /dev/shm /run/netns /run/wireguard
/bin/busybox mount -t devpts devpts /dev/pts
# devtmpfs has no /dev/std* links and no udev makes them here; nft -f - opens /dev/stdin.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
. /lane/settings

now() { cut -d' ' -f1 /proc/uptime; }
finish() {
  echo "KLANE:DONE $(now)"
  sync
  poweroff -f
  sleep 5
}
echo
echo "KLANE:BOOTED $(now) kernel $(uname -r), $(nproc) vCPU"
hostname lane
/usr/sbin/ip link set lo up
if ! /usr/sbin/modprobe wireguard; then
  echo "KLANE:ERROR modprobe wireguard failed: this kernel cannot run kernel WireGuard"
fi

# --- the scenarios --------------------------------------------------------------------------------
# run_suite BACKEND: every test of LANE_TESTS, one process each, exact names, one thread.
run_suite() {
  backend=$1
  for t in $LANE_TESTS; do
    log=/tmp/klane-$backend-$t.log
    start=$(now)
    OPENSPAN_TEST_BACKEND=$backend OPENSPAN_TEST_BIN_DIR=/lane/bin OPENSPAN_KEEP_LAB=1 \
      /lane/tests/mesh --exact "$t" --test-threads=1 --nocapture >"$log" 2>&1
    rc=$?
    secs=$(echo "$(now) $start" | awk '{printf "%.1f", $1 - $2}')
    # What the agents chose (backend auto must pick the kernel here).
    devices=$(cat /tmp/openspan-*/node-*/agent.log 2>/dev/null | grep -o 'kernel WireGuard on [^ "]*\|userspace[^"]*device[^"]*' | sort | uniq -c | tr '\n' ';')
    result=PASS
    if [ $rc -ne 0 ] || ! grep -q 'test result: ok. 1 passed' "$log"; then
      result=FAIL
    elif [ "$backend" != userspace ] && echo "$devices" | grep -q userspace; then
      result=FAIL
      echo "agents used a userspace device with backend $backend: $devices" >>"$log"
    fi
    echo "KLANE:RESULT $backend $t $result ${secs}s devices: $devices"
    if [ $result = FAIL ]; then
      echo "KLANE:LOG-BEGIN $backend $t"
      tail -n 120 "$log"
      for a in /tmp/openspan-*/node-*/agent.log; do
        [ -f "$a" ] && { echo "--- $a"; tail -n 15 "$a"; }
      done
      echo "KLANE:LOG-END $backend $t"
    fi
    rm -rf /tmp/openspan-*
  done
}

if [ "$LANE_MODE" = test ]; then
  for backend in $LANE_BACKENDS; do
    run_suite "$backend"
  done
  finish
fi

# --- capture: one agent with a fixed identity, its netlink traffic seen through nlmon ----------
if [ "$LANE_MODE" = capture ]; then
  IP=/usr/sbin/ip
  cap=/tmp/capture
  mkdir -p $cap
  fail() {
    echo "KLANE:CAPTURE FAIL $*"
    echo "KLANE:LOG-BEGIN capture"
    for f in $cap/*.log; do echo "--- $f"; tail -n 40 "$f"; done
    echo "KLANE:LOG-END capture"
    finish
  }
  $IP netns add capsw && $IP netns add capa && $IP netns add capb || fail "netns"
  $IP -n capsw link add br0 type bridge && $IP -n capsw link set br0 up
  $IP -n capsw addr add 10.99.0.254/24 dev br0
  $IP -n capsw link set lo up
  for n in a b; do
    case $n in a) addr=10.99.0.1 mac=02:00:00:00:99:01 ;; b) addr=10.99.0.2 mac=02:00:00:00:99:02 ;; esac
    $IP link add veth$n type veth peer name eth0 netns cap$n || fail "veth $n"
    $IP link set veth$n netns capsw
    $IP -n capsw link set veth$n master br0 up
    $IP -n cap$n link set lo up
    $IP -n cap$n link set eth0 address $mac
    $IP -n cap$n addr add $addr/24 dev eth0
    $IP -n cap$n link set eth0 up
  done
  $IP netns exec capsw /lane/bin/discovery-server --addr=10.99.0.254:3000 --landing-addr= \
    --metrics-addr= --snapshots-enabled=false >$cap/server.log 2>&1 &
  # Fixed identities: keys, node ids (test values, published in the fixture's README.txt).
  mkdir -p $cap/a/state $cap/b/state
  chmod 700 $cap/a/state $cap/b/state
  printf 'privateKey: iMNJN1ResAH8S0/I7cByR7nCLzgW1qBhD2JyoNyl+0A=\npublicKey: 4x3MUtMrc9yH//xsqxTUtcw1qSnjK+ht7ChqHkrHlR8=\n' >$cap/a/state/kubespan-identity.yaml
  printf 'privateKey: MENtOWFGrKm0SHclRWnbuBbWcbQdViOQe3NQu8Gb3Vc=\npublicKey: yRf7UyPnnPJtx2tpvBNsDT23UwIP5jJR+DS+0MZ7Eho=\n' >$cap/b/state/kubespan-identity.yaml
  printf 'nodeId: KernelLaneCaptureNodeA\n' >$cap/a/state/node-identity.yaml
  printf 'nodeId: KernelLaneCaptureNodeB\n' >$cap/b/state/node-identity.yaml
  chmod 600 $cap/*/state/*.yaml
  for n in a b; do
    case $n in a) mac=02:00:00:00:99:01 ;; b) mac=02:00:00:00:99:02 ;; esac
    cat >$cap/$n/config.yaml <<EOF
clusterID: kernel-lane-capture
clusterSecret: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
nodeName: node-$n
discovery:
  endpoints: ["http://10.99.0.254:3000"]
stateDir: $cap/$n/state
apiSocket: $cap/$n/agent.sock
metricsAddr: ""
interface: kubespan
backend: kernel
listenPort: 51820
macAddress: "$mac"
filters:
  endpoints: ["10.99.0.0/24"]
peerKeepaliveSeconds: 2
peerDownSeconds: 6
endpointTimeoutSeconds: 3
EOF
  done
  RUST_LOG=info $IP netns exec capb /lane/bin/kubespan-agent --config $cap/b/config.yaml >$cap/b.log 2>&1 &
  # node-b's link is up before node-a starts: node-a's capture then holds one peer addition.
  i=0
  until $IP netns exec capb /usr/bin/wg show kubespan >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "node-b's link never appeared"; sleep 0.1
  done
  $IP -n capa link add nlmon0 type nlmon || fail "ip link add nlmon0 type nlmon"
  $IP -n capa link set nlmon0 up
  $IP netns exec capa /usr/bin/tcpdump -i nlmon0 -U -s 0 -w $cap/agent-kernel.pcap >$cap/tcpdump.log 2>&1 &
  tcpdump_pid=$!
  i=0
  until grep -q 'listening on' $cap/tcpdump.log; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "tcpdump never listened on nlmon0"; sleep 0.1
  done
  RUST_LOG=info $IP netns exec capa /lane/bin/kubespan-agent --config $cap/a/config.yaml >$cap/a.log 2>&1 &
  agent_pid=$!
  i=0
  until /lane/bin/kubespanctl --socket $cap/a/agent.sock -o json peers 2>/dev/null | grep -q '"state": *"up"'; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "node-a never saw node-b up"; sleep 0.1
  done
  echo "KLANE:INFO node-a sees node-b up at $(now)"
  sleep 1
  $IP netns exec capa /usr/bin/wg show kubespan dump >$cap/wg-show-dump.txt 2>&1 || fail "wg show"
  $IP netns exec capa /usr/bin/wg show kubespan >>$cap/wg-show.log 2>&1
  kill -TERM $agent_pid
  i=0
  while kill -0 $agent_pid 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 150 ] && fail "node-a did not stop"; sleep 0.1
  done
  sleep 0.5
  kill -INT $tcpdump_pid
  wait $tcpdump_pid
  cat $cap/wg-show.log
  /usr/bin/tcpdump -r $cap/agent-kernel.pcap -n 2>/dev/null | head -n 400
  echo "KLANE:INFO $(/usr/bin/tcpdump -r $cap/agent-kernel.pcap -n 2>/dev/null | wc -l) netlink messages captured"
  echo "KLANE:CAPTURE OK"
  for f in agent-kernel.pcap wg-show-dump.txt a.log; do
    echo "KLANE:FILE-BEGIN $f"
    base64 $cap/$f
    echo "KLANE:FILE-END $f"
  done
  finish
fi

# --- bench: mesh-bench, kernel WireGuard next to the userspace devices ----------------------------
if [ "$LANE_MODE" = bench ]; then
  # The userspace devices open /dev/net/tun, which devtmpfs shows once tun is loaded.
  /usr/sbin/modprobe tun || echo "KLANE:ERROR modprobe tun failed"
  # What the emulated CPU offers (the SIMD both kernel and userspace crypto pick from).
  echo "KLANE:INFO cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); flags:$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(sse.*|ssse3|avx.*|aes|pclmulqdq|bmi2|adx)$' | tr '\n' ' ')"
  echo "KLANE:INFO mesh-bench $LANE_BENCH_ARGS starting at $(now)"
  # shellcheck disable=SC2086 # the arguments are words
  /lane/bin/mesh-bench $LANE_BENCH_ARGS >/tmp/bench.txt 2>/tmp/bench.log
  rc=$?
  echo "KLANE:INFO mesh-bench exited $rc at $(now)"
  echo "KLANE:REPORT-BEGIN"
  cat /tmp/bench.txt
  echo "KLANE:REPORT-END"
  echo "KLANE:LOG-BEGIN bench"
  cat /tmp/bench.log
  echo "KLANE:LOG-END bench"
  if [ $rc -eq 0 ]; then echo "KLANE:BENCH OK"; else echo "KLANE:BENCH FAIL $rc"; fi
  finish
fi

echo "KLANE:ERROR unknown mode $LANE_MODE"
finish
