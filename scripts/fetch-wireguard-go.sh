#!/usr/bin/env bash
# Fetch a current wireguard-go for mesh-bench, without installing anything into the system.
#
# Debian bookworm's wireguard-go (0.0.20220316) predates wireguard-go's vectorized I/O, TUN TCP
# offloads and UDP GSO/GRO (written in 2023, first released in 0.0.20231211), so it is no fair
# userspace reference. This script takes the wireguard-go binary package from a newer Debian suite
# (testing/unstable by default) with `apt-get download` under a private apt configuration (its own
# sources list, lists and cache under <dest>/apt, removed afterwards; the system's sources, lists
# and dpkg state are not touched), checks it the way apt always does (the suite's signed Release
# file, the Debian archive keyring), and unpacks it with `dpkg-deb -x`:
#
#   <dest>/bin/wireguard-go        the binary (a Go program; needs only libc >= 2.34)
#   <dest>/PACKAGE                 what was fetched: package version, suite, sha256, --version
#
# Usage: scripts/fetch-wireguard-go.sh [--update] [DEST]
#   DEST      default: <repo>/target/wireguard-go-current
#   --update  look again for a newer package even when DEST already has one
# Environment:
#   WIREGUARD_GO_SUITES   suites to look in (default: "testing unstable"); the newest wins
#   WIREGUARD_GO_VERSION  a Debian package version to take instead of the newest
#                         (e.g. 0.0.20231211-1+b9 from trixie)
#   DEBIAN_MIRROR         the Debian archive to use (default: the one this host's apt sources
#                         use for Debian's main suite, from `apt-get indextargets`)
#
# Idempotent: with a binary already in DEST (of WIREGUARD_GO_VERSION when that is set) it only
# says what is there and asks no network. Then run the bench with it:
#   target/release/mesh-bench --wireguard-go /usr/bin/wireguard-go \
#       --wireguard-go target/wireguard-go-current/bin/wireguard-go
#
# Needs network access to the Debian archive: never call it from CI or the test suite.
set -euo pipefail

update=0
dest=""
for arg in "$@"; do
    case "$arg" in
        --update) update=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "fetch-wireguard-go: unknown option $arg" >&2
            exit 2
            ;;
        *) dest="$arg" ;;
    esac
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${dest:-$repo/target/wireguard-go-current}"
suites="${WIREGUARD_GO_SUITES:-testing unstable}"
pinned="${WIREGUARD_GO_VERSION:-}"
mirror="${DEBIAN_MIRROR:-}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
binary="$dest/bin/wireguard-go"

say() { echo "fetch-wireguard-go: $*" >&2; }

report() {
    say "$binary: $("$binary" --version 2>/dev/null | head -n1)"
    sed 's/^/  /' "$dest/PACKAGE" >&2
    echo "$binary"
}

if [[ -x "$binary" && -f "$dest/PACKAGE" && $update -eq 0 ]]; then
    have="$(sed -n 's/^package: wireguard-go //p' "$dest/PACKAGE")"
    if [[ -z "$pinned" || "$pinned" == "$have" ]]; then
        say "already there (--update to look for a newer one)"
        report
        exit 0
    fi
fi

for tool in apt-get apt-cache dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null || {
        say "$tool is missing (this script needs a Debian-based host)"
        exit 1
    }
done
[[ -f "$keyring" ]] || {
    say "$keyring is missing: apt-get install debian-archive-keyring"
    exit 1
}

if [[ -z "$mirror" ]]; then
    mirror="$(apt-get indextargets --format '$(ORIGIN)|$(LABEL)|$(REPO_URI)' 'Created-By: Packages' |
        awk -F'|' '$1 == "Debian" && $2 == "Debian" {print $3; exit}')"
    mirror="${mirror%/}"
    [[ -n "$mirror" ]] || {
        say "no Debian archive in this host's apt sources (apt-get update first?): set DEBIAN_MIRROR"
        exit 1
    }
fi

apt_dir="$dest/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dest/bin"
: >"$apt_dir/sources.list"
for suite in $suites; do
    echo "deb [signed-by=$keyring] $mirror $suite main" >>"$apt_dir/sources.list"
done
apt_opts=(
    -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Architecture=amd64"
    -o "Acquire::Languages=none"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
)
[[ "$(dpkg --print-architecture)" == amd64 ]] || {
    say "only amd64 is set up here (this host: $(dpkg --print-architecture))"
    exit 1
}

say "reading the package lists of: $suites ($mirror)"
apt-get "${apt_opts[@]}" -qq update >&2

version="$pinned"
if [[ -z "$version" ]]; then
    version="$(apt-cache "${apt_opts[@]}" madison wireguard-go | awk '{print $3}' |
        sort -V -u | tail -n1)"
fi
[[ -n "$version" ]] || {
    say "no wireguard-go in $suites"
    exit 1
}
suite="$(apt-cache "${apt_opts[@]}" madison wireguard-go |
    awk -v v="$version" '$3 == v {print $6; exit}')"
[[ -n "$suite" ]] || {
    say "wireguard-go $version is not in $suites; there: $(apt-cache "${apt_opts[@]}" madison wireguard-go | awk '{print $3}' | tr '\n' ' ')"
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "downloading wireguard-go $version from $suite"
(cd "$work" && apt-get "${apt_opts[@]}" -qq download "wireguard-go=$version" >&2)
deb="$(ls "$work"/wireguard-go_*.deb)"
dpkg-deb -x "$deb" "$work/x"
install -m 0755 "$work/x/usr/bin/wireguard-go" "$binary.new"
mv -f "$binary.new" "$binary"
for doc in changelog.Debian.gz copyright; do
    [[ -f "$work/x/usr/share/doc/wireguard-go/$doc" ]] &&
        cp "$work/x/usr/share/doc/wireguard-go/$doc" "$dest/"
done

{
    echo "package: wireguard-go $version"
    echo "suite: $suite ($mirror)"
    echo "deb: $(basename "$deb"), $(stat -c %s "$deb") bytes, sha256 $(sha256sum "$deb" | cut -d' ' -f1)"
    echo "binary: $(stat -c %s "$binary") bytes, sha256 $(sha256sum "$binary" | cut -d' ' -f1)"
    echo "reports: $("$binary" --version | head -n1)"
    echo "built with: $(dpkg-deb -f "$deb" Built-Using)"
    echo "fetched: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$dest/PACKAGE"
rm -rf "$apt_dir" # the suites' package lists (~50 MB): --update reads them anew
say "fetched"
report
