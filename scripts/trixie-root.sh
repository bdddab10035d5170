#!/usr/bin/env bash
# The second test environment: a Debian 13 (trixie) root with Nix 2.26 and Python 3.13, and a
# virtual environment with mediabuilder's dependencies inside it (/opt/venv).
#
#   scripts/trixie-root.sh          build the root unless it exists; print its path
#   scripts/trixie-root.sh --path   print the path the root has (or would have); build nothing
#
# The root is cached outside the checkout, in $MEDIABUILDER_ROOTS (default
# /var/cache/mediabuilder/roots), under a name carrying the sha256 of its recipe (this script and
# the dependencies pyproject.toml lists): every clone on the machine shares it, and it is rebuilt only when the recipe
# changes. It is built in a temporary directory and renamed into place when complete, under a lock.
# Enter it with scripts/in-trixie.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOTS=${MEDIABUILDER_ROOTS:-/var/cache/mediabuilder/roots}
SUITE=trixie
# Every tool the tests use (./setup's PACKAGES), and what a bare apt variant lacks.
PACKAGES=(nix-bin git xorriso genisoimage mtools dosfstools libarchive-tools p7zip-full shellcheck
          busybox-static zstd util-linux fdisk openssl python3-venv curl
          mount ca-certificates procps e2fsprogs)

# mediabuilder's dependencies from pyproject.toml, one a line: `runtime`, or `all` (with dev's).
dependencies() {
    python3 -c '
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
dev = project["optional-dependencies"]["dev"] if sys.argv[2] == "all" else []
print("\n".join(project["dependencies"] + dev))' "$HERE/pyproject.toml" "$1"
}

recipe_hash() {
    { cat "$HERE/scripts/trixie-root.sh"; dependencies all; } | sha256sum | cut -c1-16
}

die() {
    echo "trixie-root: $*" >&2
    exit 1
}

# Run a command inside the (unfinished) root $1, in a private mount namespace.
in_root() {
    local dir=$1
    shift
    # shellcheck disable=SC2016 # expanded by the inner bash
    unshare -m --propagation private -- bash -euc '
        dir=$1; shift
        mount --bind "$dir" "$dir"
        mount -t proc proc "$dir/proc"
        mount --rbind /dev "$dir/dev"
        exec chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
    ' in_root "$dir" "$@"
}

build() {
    local final=$1 tmp
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: run ./setup (it installs it)"
    tmp=$(mktemp -d "$ROOTS/.building-$SUITE-XXXXXX")
    # An interrupted build leaves only this hidden directory, never a root under the final name.
    trap 'rm -rf --one-file-system "$tmp"' EXIT
    echo "trixie-root: building $final (Debian 13, Nix 2.26, Python 3.13; a minute or two)" >&2
    local include
    include=$(IFS=,; echo "${PACKAGES[*]}")
    mmdebstrap --quiet --variant=apt --include="$include" "$SUITE" "$tmp" http://deb.debian.org/debian >&2
    # Nix in a container: no build users, no sandbox (as ./setup writes for the host).
    mkdir -p "$tmp/etc/nix"
    printf 'build-users-group =\nsandbox = false\n' >"$tmp/etc/nix/nix.conf"
    # pip inside needs the host's CA bundle (a proxy's CA may be in it).
    cp /etc/ssl/certs/ca-certificates.crt "$tmp/etc/ssl/certs/host-ca.crt"
    in_root "$tmp" python3 -m venv /opt/venv
    in_root "$tmp" /opt/venv/bin/pip install -q --upgrade pip >&2
    # mediabuilder's own dependencies, not mediabuilder: the checkout is put on PYTHONPATH, so one
    # root serves every checkout.
    local deps runtime
    mapfile -t deps < <(dependencies all)
    mapfile -t runtime < <(dependencies runtime)
    in_root "$tmp" /opt/venv/bin/pip install -q "${deps[@]}" >&2
    # A wheelhouse for the fresh-venv install test: the newest pip and setuptools (what a fresh
    # `pip install` builds with) and the runtime dependencies, so that test runs with no network.
    in_root "$tmp" /opt/venv/bin/pip download -q -d /opt/venv/wheelhouse pip setuptools wheel >&2
    in_root "$tmp" /opt/venv/bin/pip download -q -d /opt/venv/wheelhouse "${runtime[@]}" >&2
    in_root "$tmp" nix --version >&2
    mv -T "$tmp" "$final"
    trap - EXIT
    echo "trixie-root: ready: $final" >&2
}

main() {
    local final
    final="$ROOTS/$SUITE-$(recipe_hash)"
    if [ "${1:-}" = --path ]; then
        echo "$final"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "building a root needs root (mmdebstrap, mounts)"
    mkdir -p "$ROOTS"
    exec 9>"$ROOTS/.lock-$SUITE"
    flock 9
    # Under the lock no other build runs: whatever a killed build left is garbage.
    rm -rf --one-file-system "$ROOTS/.building-$SUITE-"*
    [ -d "$final" ] || build "$final"
    echo "$final"
}

main "$@"
