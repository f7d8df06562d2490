#!/usr/bin/env bash
# The kernel lane: runs the namespace mesh scenarios (netns-tests/tests/mesh.rs) against kernel
# WireGuard, inside a QEMU guest that boots Debian's cloud kernel, with `backend: kernel` and with
# `backend: auto`. CI machines have no WireGuard module (and no usable KVM): the guest runs on
# QEMU's software CPU (TCG). See README.md ("The kernel lane") and ../shared/spec/kernel-lab.md.
#
#   scripts/kernel-lane.sh                 build, boot, run the scenarios; non-zero on any failure
#   scripts/kernel-lane.sh --capture DIR   instead: record the netlink traffic between one agent
#                                          with a fixed identity and kernel WireGuard (nlmon) into
#                                          DIR/agent-kernel.pcap (golden-test fixtures)
#   scripts/kernel-lane.sh --bench [DIR]   instead: run mesh-bench inside the guest (kernel
#                                          WireGuard next to openspan's userspace device on the
#                                          same emulated CPU), print its report and, with DIR,
#                                          write it to DIR/mesh-bench-guest.txt. Not run by CI.
#                                          Throughput under TCG is emulated: compare the rows
#                                          with each other, never with numbers from the host.
#
# Environment:
#   OPENSPAN_SKIP_KERNEL_LANE=1       skip the lane (said loudly; exit 0)
#   OPENSPAN_KERNEL_LANE_NO_BUILD=1   use the release binaries already built (no cargo)
#   OPENSPAN_KERNEL_LANE_TIMEOUT=S    bound on the guest's run (default 240 s; --bench: 900 s)
#   OPENSPAN_KERNEL_LANE_BENCH_ARGS="..."  mesh-bench's arguments in --bench mode (default
#                                     "--duration 5 --repeat 1 --ping-count 20")
#   OPENSPAN_KERNEL_LANE_SMP=N        guest vCPUs (default 1; 2 uses multi-threaded TCG, slower on a
#                                     busy 2-core machine: 133 s against 110 s for the guest)
#   OPENSPAN_KERNEL_LANE_TESTS="a b"  run only these test functions of mesh.rs
#   OPENSPAN_KERNEL_LANE_CPU=MODEL    QEMU's -cpu (default: QEMU's own, which offers only SSE2;
#                                     `max` offers what TCG emulates, SSSE3 to AVX2: the SIMD
#                                     paths kernel and userspace crypto take on real hardware)
#
# Everything it downloads or builds lives in target/kernel-lab/; the kernel package is unpacked
# there with dpkg-deb (never installed into the host's /boot) and reused by the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { echo "kernel-lane: $*" >&2; }
die() {
  echo "kernel-lane: FAILED: $*" >&2
  exit 1
}

capture_dir=
bench=0
bench_dir=
while (($#)); do
  case $1 in
    --capture)
      capture_dir=${2:?--capture needs a directory}
      shift 2
      ;;
    --bench)
      bench=1
      shift
      if (($#)) && [[ $1 != -* ]]; then
        bench_dir=$1
        shift
      fi
      ;;
    -h | --help)
      awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
      exit 0
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n $capture_dir && $bench == 1 ]] && die "--capture and --bench are separate modes: pick one"

if [[ ${OPENSPAN_SKIP_KERNEL_LANE:-} == 1 ]]; then
  cat >&2 <<'EOF'
################################################################################################
kernel-lane: SKIPPED because OPENSPAN_SKIP_KERNEL_LANE=1 is set.
kernel-lane: kernel WireGuard (backend: kernel / auto) was NOT tested in this run.
################################################################################################
EOF
  exit 0
fi

# The scenarios the lane runs (netns-tests/tests/mesh.rs), each once per backend.
default_tests=(
  three_nodes_form_an_encrypted_mesh_and_leave_nothing_behind
  a_dead_first_endpoint_is_left_for_the_next_one
  a_dead_peer_is_down_quickly_and_its_traffic_never_leaks_unless_bypass_is_on
  an_agent_killed_with_sigkill_restarts_and_takes_its_link_back
)
read -r -a tests <<<"${OPENSPAN_KERNEL_LANE_TESTS:-${default_tests[*]}}"
backends=(kernel auto)
if ((bench)); then
  timeout_secs=${OPENSPAN_KERNEL_LANE_TIMEOUT:-900}
else
  timeout_secs=${OPENSPAN_KERNEL_LANE_TIMEOUT:-240}
fi
bench_args=${OPENSPAN_KERNEL_LANE_BENCH_ARGS:---duration 5 --repeat 1 --ping-count 20}
smp=${OPENSPAN_KERNEL_LANE_SMP:-1}

target_dir=${CARGO_TARGET_DIR:-$repo/target}
lab=$target_dir/kernel-lab
mkdir -p "$lab"
t_start=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $t_start" | awk '{printf "%.1f", $1 - $2}'; }

# --- host packages --------------------------------------------------------------------------
# scripts/deps.sh: the build's and the tests' packages, plus the lane's own.
lane_needs=(qemu-system-x86_64=qemu-system-x86 cpio=cpio depmod=kmod)
((bench)) && lane_needs+=(ss=iproute2)
# busybox-static, not busybox: the guest's /init has no libraries to load.
if ! { [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1; }; then
  lane_needs+=(busybox-static)
fi
"$repo/scripts/deps.sh" "${lane_needs[@]}" || die "missing packages (see above)"

# --- the binaries -----------------------------------------------------------------------------
rel=$target_dir/release
if [[ ${OPENSPAN_KERNEL_LANE_NO_BUILD:-} != 1 ]]; then
  say "building the release binaries and the release namespace tests"
  cargo build --release -p kubespan-agent -p discovery-server --bins --locked >&2
  if ((bench)); then
    cargo build --release -p openspan-wireguard -p netns-tests --bin openspan-wireguard --bin mesh-bench --locked >&2
  fi
fi
# The test executable's path comes from cargo (its name carries a hash). A capture needs none.
mesh_test=
if [[ -z $capture_dir ]] && ((!bench)); then
  cargo test --release -p netns-tests --test mesh --no-run --locked --message-format=json >"$lab/tests.json" ||
    die "cannot build the release namespace tests (cargo test --release -p netns-tests --no-run)"
  mesh_test=$(grep -o '"executable":"[^"]*/deps/mesh-[0-9a-f]*"' "$lab/tests.json" | tail -1 | cut -d'"' -f4)
  [[ -n $mesh_test && -x $mesh_test ]] || die "cannot find the release test executable of netns-tests/tests/mesh.rs (cargo test --release -p netns-tests --no-run)"
fi
lane_bins=(discovery-server kubespan-agent kubespanctl)
((bench)) && lane_bins+=(openspan-wireguard mesh-bench)
for b in "${lane_bins[@]}"; do
  [[ -x $rel/$b ]] || die "$rel/$b is missing: cargo build --release -p kubespan-agent -p discovery-server -p openspan-wireguard -p netns-tests --bins"
done

t_built=$(date +%s.%N) # the cargo builds are shared with the rest of CI: timed apart
since_built() { echo "$(date +%s.%N) $t_built" | awk '{printf "%.1f", $1 - $2}'; }

# --- the kernel ---------------------------------------------------------------------------------
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $kpkg ]]; then
  apt-get update -qq || true
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
if [[ -z $kpkg ]]; then
  # No package index (not Debian, offline): use what an earlier run cached.
  kpkg=$(ls -1 "$lab/kernels" 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $kpkg ]] || die "cannot find the Debian package linux-image-cloud-amd64 depends on (apt-cache), and no kernel is cached in $lab/kernels"
fi
kroot=$lab/kernels/$kpkg
if [[ ! -f $kroot/.unpacked ]]; then
  say "downloading $kpkg (unpacked into $kroot, not installed)"
  rm -rf "$kroot" "$lab/dl"
  mkdir -p "$lab/dl" "$kroot"
  (cd "$lab/dl" && apt-get -o APT::Sandbox::User=root download -qq "$kpkg") || die "apt-get download $kpkg failed"
  dpkg-deb -x "$lab"/dl/"$kpkg"_*.deb "$kroot"
  rm -rf "$lab/dl"
  touch "$kroot/.unpacked"
fi
kver=$(ls -1 "$kroot/lib/modules" | head -1)
vmlinuz=$kroot/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || die "$vmlinuz is missing in the unpacked kernel package"

# --- the initramfs ------------------------------------------------------------------------------
t_initramfs=$(date +%s.%N)
root=$lab/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib64,proc,sys,dev,run,tmp,root,etc,lane/bin,lane/tests}
mkdir -p "$root/var" && ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"

cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [[ -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
done

# Host tools at their own absolute paths (the guest's PATH puts them before busybox's applets;
# its shell scripts call them by absolute path, since busybox's shell prefers its applets).
copy_file() { # copy_file SRC [DEST-IN-ROOT]
  local dest=$root${2:-$1}
  mkdir -p "$(dirname "$dest")"
  cp -L "$1" "$dest"
}
libs=()
add_tool() { # add_tool NAME-OR-PATH DEST
  local src
  src=$(command -v "$1") || die "$1 is missing on the host"
  copy_file "$(readlink -f "$src")" "$2"
  libs+=("$(readlink -f "$src")")
}
add_tool ip /usr/sbin/ip
add_tool wg /usr/bin/wg
add_tool nft /usr/sbin/nft
add_tool ping /usr/bin/ping
add_tool tcpdump /usr/bin/tcpdump
add_tool kmod /usr/bin/kmod
if ((bench)); then
  add_tool iperf3 /usr/bin/iperf3
  add_tool ss /usr/bin/ss
  # wireguard-go when the host has one (mesh-bench says in its row when it is missing); boringtun-cli
  # is not shipped: its row says it is not available.
  if command -v wireguard-go >/dev/null 2>&1; then
    add_tool wireguard-go /usr/bin/wireguard-go
  else
    say "no wireguard-go on the host: its row in the guest will say it is not available"
  fi
fi
for m in modprobe insmod lsmod depmod; do ln -sf /usr/bin/kmod "$root/usr/sbin/$m"; done
rm -f "$root/sbin/modprobe" && ln -s /usr/bin/kmod "$root/sbin/modprobe" # the kernel's autoload helper

for b in "${lane_bins[@]}"; do
  cp "$rel/$b" "$root/lane/bin/$b"
  strip "$root/lane/bin/$b"
  libs+=("$rel/$b")
done
if [[ -n $mesh_test ]]; then
  cp "$mesh_test" "$root/lane/tests/mesh"
  strip "$root/lane/tests/mesh"
  libs+=("$mesh_test")
fi

# Shared libraries, at the paths the loader looks them up by.
for lib in $(for f in "${libs[@]}"; do ldd "$f" 2>/dev/null; done | grep -o '/[^ ]*' | sort -u); do
  copy_file "$lib"
done

# Kernel modules: WireGuard and what it pulls in, the lab's devices, netfilter for the agent's
# nftables table (the kernel loads expressions on demand through /sbin/modprobe), nlmon.
mods=(wireguard veth bridge tun nlmon nf_tables nft_ct nft_fib_inet nft_chain_nat nf_conntrack)
kmods=$root/lib/modules/$kver
mkdir -p "$kmods"
cp "$kroot/lib/modules/$kver"/modules.{builtin,builtin.modinfo,order} "$kmods/"
if [[ ! -f $kroot/lib/modules/$kver/modules.dep ]]; then
  depmod -b "$kroot" "$kver"
fi
{
  for m in "${mods[@]}"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
  done
  find "$kroot/lib/modules/$kver/kernel/net/netfilter" "$kroot/lib/modules/$kver/kernel/net/ipv4/netfilter" \
    "$kroot/lib/modules/$kver/kernel/net/ipv6/netfilter" -name '*.ko*'
} | sort -u | while read -r ko; do
  rel_ko=${ko#"$kroot"}
  mkdir -p "$root$(dirname "$rel_ko")"
  cp "$ko" "$root$rel_ko"
done
[[ -n $(find "$kmods" -name 'wireguard.ko*') ]] || die "the kernel package $kpkg has no wireguard module"
depmod -b "$root" "$kver"

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
tcpdump:x:104:110::/nonexistent:/usr/sbin/nologin
EOF
printf 'root:x:0:\ntcpdump:x:110:\n' >"$root/etc/group"
echo 'hosts: files' >"$root/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"

mode=test
[[ -n $capture_dir ]] && mode=capture
((bench)) && mode=bench
{
  echo "LANE_MODE=$mode"
  echo "LANE_BENCH_ARGS='$bench_args'"
  echo "LANE_BACKENDS='${backends[*]}'"
  echo "LANE_TESTS='${tests[*]}'"
} >"$root/lane/settings"
cp "$repo/scripts/kernel-lane-guest.sh" "$root/init"
chmod 755 "$root/init"

initrd=$lab/initramfs.cpio
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet >"$initrd")
say "initramfs: $(du -m "$initrd" | cut -f1) MiB, built in $(echo "$(date +%s.%N) $t_initramfs" | awk '{printf "%.1f", $1 - $2}') s (kernel $kver)"

# --- the guest ----------------------------------------------------------------------------------
log=$lab/console-$mode.log
accel=tcg
cpu_args=()
[[ -n ${OPENSPAN_KERNEL_LANE_CPU:-} ]] && cpu_args=(-cpu "$OPENSPAN_KERNEL_LANE_CPU")
((smp > 1)) && accel=tcg,thread=multi
say "booting the guest ($smp vCPU, TCG, timeout ${timeout_secs} s); console: $log"
t_boot=$(date +%s.%N)
set +e
timeout --kill-after=5 "$timeout_secs" qemu-system-x86_64 \
  -accel "$accel" "${cpu_args[@]}" -smp "$smp" -m 1024 -nographic -no-reboot -nic none \
  -kernel "$vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init" \
  </dev/null >"$log" 2>&1
qemu_rc=$?
set -e
guest_secs=$(echo "$(date +%s.%N) $t_boot" | awk '{printf "%.1f", $1 - $2}')
# Plain text: no carriage returns, no terminal escapes (the firmware clears the screen).
sed 's/\r//g; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1b[A-Za-z]//g' "$log" >"$log.txt" && mv "$log.txt" "$log"

if ! grep -q '^KLANE:BOOTED' "$log"; then
  tail -n 30 "$log" >&2
  if ((qemu_rc == 124 || qemu_rc == 137)); then
    die "the guest never reached /init within ${timeout_secs} s (QEMU exit $qemu_rc): QEMU could not run the guest on this machine, so kernel WireGuard was NOT tested"
  fi
  die "QEMU could not run the guest on this machine (exit $qemu_rc, no sign of the guest's /init; output above): kernel WireGuard was NOT tested"
fi
grep '^KLANE:' "$log" | grep -v '^KLANE:DATA' >&2 || true

if [[ $mode == bench ]]; then
  report=$(sed -n '/^KLANE:REPORT-BEGIN$/,/^KLANE:REPORT-END$/p' "$log" | sed '1d;$d')
  if [[ -z $report ]]; then
    sed -n '/^KLANE:LOG-BEGIN/,/^KLANE:LOG-END/p' "$log" | tail -n 120 >&2
    die "mesh-bench printed no report in the guest (QEMU exit $qemu_rc after $guest_secs s; console: $log)"
  fi
  {
    echo "EMULATED: mesh-bench inside a QEMU TCG guest (software CPU ${OPENSPAN_KERNEL_LANE_CPU:-default}, $smp vCPU); compare rows"
    echo "with each other, never with numbers measured on the host."
    echo "command: mesh-bench $bench_args (guest kernel $kver, $(qemu-system-x86_64 --version | head -1))"
    grep '^KLANE:INFO cpu:' "$log" | sed 's/^KLANE:INFO //' || true
    echo "$report"
  } >"$lab/mesh-bench-guest.txt"
  cat "$lab/mesh-bench-guest.txt"
  if [[ -n $bench_dir ]]; then
    mkdir -p "$bench_dir"
    cp "$lab/mesh-bench-guest.txt" "$bench_dir/mesh-bench-guest.txt"
    sed -n '/^KLANE:LOG-BEGIN bench$/,/^KLANE:LOG-END bench$/p' "$log" | sed '1d;$d' >"$bench_dir/mesh-bench-guest.log"
    say "wrote $bench_dir/mesh-bench-guest.txt and mesh-bench-guest.log"
  fi
  grep -q '^KLANE:BENCH OK' "$log" || die "mesh-bench failed in the guest (some setups failed; report above, its log in $log)"
  say "bench done: guest $guest_secs s, $(elapsed) s in all"
  exit 0
fi

if [[ $mode == capture ]]; then
  grep -q '^KLANE:CAPTURE OK' "$log" || {
    sed -n '/^KLANE:LOG-BEGIN/,/^KLANE:LOG-END/p' "$log" | tail -n 80 >&2
    die "the capture run failed (see $log)"
  }
  mkdir -p "$capture_dir"
  for name in $(sed -n 's/^KLANE:FILE-BEGIN \(.*\)$/\1/p' "$log"); do
    sed -n "/^KLANE:FILE-BEGIN $name\$/,/^KLANE:FILE-END $name\$/p" "$log" |
      sed '1d;$d' | base64 -d >"$capture_dir/$name"
    say "wrote $capture_dir/$name ($(wc -c <"$capture_dir/$name") bytes)"
  done
  say "capture done in $(since_built) s after the cargo builds (guest $guest_secs s)"
  exit 0
fi

failed=0
for backend in "${backends[@]}"; do
  for t in "${tests[@]}"; do
    line=$(grep -E "^KLANE:RESULT $backend $t (PASS|FAIL)" "$log" | tail -1 || true)
    if [[ -z $line ]]; then
      echo "kernel-lane: NO RESULT  backend=$backend $t" >&2
      failed=1
    elif [[ $line == *" FAIL"* ]]; then
      echo "kernel-lane: FAIL       backend=$backend $t" >&2
      failed=1
    fi
  done
done
if ! grep -q '^KLANE:DONE' "$log"; then
  echo "kernel-lane: the guest did not finish (QEMU exit $qemu_rc after $guest_secs s; timeout ${timeout_secs} s)" >&2
  failed=1
fi
if ((failed)); then
  sed -n '/^KLANE:LOG-BEGIN/,/^KLANE:LOG-END/p' "$log" | tail -n 150 >&2
  die "kernel WireGuard scenarios failed in the guest after $(since_built) s (console: $log)"
fi
say "PASSED: ${#tests[@]} scenarios x ${#backends[@]} backends (${backends[*]}): $(since_built) s after the cargo builds (guest $guest_secs s), $(elapsed) s in all"
