#!/usr/bin/env bash
# Create a fresh working copy of the example flake under DEST, with its inputs shaped like real
# ones and a flake.lock as Nix 2.26 writes it:
#   DEST/inputs/nixpkgs  git repo, 2 commits   (flake input `nixpkgs`, locked as
#                                               github:NixOS/nixpkgs at the 2nd commit; its
#                                               source is put into the Nix store, so nothing is
#                                               ever downloaded)
#   DEST/inputs/tools    git repo, 2 commits   (flake input `tools`, type git; its nixpkgs
#                                               follows the flake's, its own lock pins an older one)
#   DEST/inputs/systems  git repo, 1 commit    (tools' input `systems`, type git: nested, the
#                                               flake does not name it)
#   DEST/inputs/site     plain directory       (flake input `site`, type path, flake = false)
#   DEST/flake           git repo, 3 commits, remotes origin + backup, committed flake.lock
# Commit authors and dates are fixed, so nixpkgs' and systems' revisions are the same on every
# run (the others contain DEST in their flake.nix and vary with it). The lock files are rendered
# from flake.lock.in templates (Nix cannot lock a github: input offline) and Nix is then asked
# to accept them unchanged. Prints nothing but errors.
set -euo pipefail

usage() { echo "usage: $0 DEST   (DEST must not exist or be empty)" >&2; exit 2; }
[ $# -eq 1 ] || usage
[ -n "$1" ] || usage

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -e "$1" ] && [ -n "$(ls -A "$1")" ]; then
    echo "prepare.sh: $1 exists and is not empty" >&2
    exit 1
fi
mkdir -p "$1"
dest=$(cd "$1" && pwd -P)

export GIT_AUTHOR_NAME="Example Admin" GIT_AUTHOR_EMAIL="admin@example.invalid"
export GIT_COMMITTER_NAME="Example Admin" GIT_COMMITTER_EMAIL="admin@example.invalid"
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export TZ=UTC

g() { git -c init.defaultBranch=main -c user.name="$GIT_AUTHOR_NAME" \
        -c user.email="$GIT_AUTHOR_EMAIL" -c commit.gpgsign=false -c core.autocrlf=false "$@"; }

# commit DIR DATE MESSAGE: commit everything in DIR with a fixed date.
commit() {
    g -C "$1" add -A
    GIT_AUTHOR_DATE="$2" GIT_COMMITTER_DATE="$2" g -C "$1" commit -q -m "$3"
}

# Nix reports "creating lock file" and the like on stderr: show its output only on failure.
nix_() {
    local out
    if ! out=$(nix --extra-experimental-features 'nix-command flakes' "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

# nix_out ARGS: Nix's output; its stderr (offline: "you don't have Internet access") only on failure.
nix_out() {
    local err status=0 out
    err=$(mktemp)
    out=$(nix --extra-experimental-features 'nix-command flakes' "$@" 2>"$err") || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$err" >&2
        rm -f "$err"
        return "$status"
    fi
    rm -f "$err"
    printf '%s' "$out"
}

# render TEMPLATE OUT [NAME=VALUE...]: @DEST@ and each @NAME@ replaced.
render() {
    local template=$1 out=$2 kv
    shift 2
    local args=(-e "s|@DEST@|$dest|g")
    for kv in "$@"; do args+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${args[@]}" "$template" > "$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        echo "prepare.sh: $out: a placeholder was left unreplaced" >&2
        exit 1
    fi
}

# git_locked PREFIX REPO: PREFIX_REV=... PREFIX_NARHASH=... PREFIX_LASTMODIFIED=...
# PREFIX_REVCOUNT=..., for main's head, as Nix locks a git input (and its source put into the
# store, as locking does).
git_locked() {
    nix_out eval --impure --raw --expr "
        let t = builtins.fetchGit { url = \"file://$2\"; ref = \"refs/heads/main\"; }; in
        \"$1_REV=\${t.rev} $1_NARHASH=\${t.narHash} $1_LASTMODIFIED=\${toString t.lastModified} \"
        + \"$1_REVCOUNT=\${toString t.revCount}\""
}

# github_locked PREFIX REPO REV: what a github: lock says of REPO at REV (the NAR hash of its tree,
# which GitHub's tarball unpacks to, and the commit time), without adding anything to the store.
github_locked() {
    local tree
    tree=$(mktemp -d)
    g -C "$2" archive "$3" | tar -x -C "$tree"
    printf '%s_REV=%s %s_NARHASH=%s %s_LASTMODIFIED=%s' "$1" "$3" \
        "$1" "$(nix_out hash path "$tree")" \
        "$1" "$(g -C "$2" log -1 --format=%ct "$3")"
    rm -rf "$tree"
}

# is_static FILE: an x86_64 ELF executable without a program interpreter (no PT_INTERP
# program header), so it runs in a root with no /lib.
is_static() {
    local phoff phentsize phnum i type
    [ -f "$1" ] && [ -r "$1" ] || return 1
    [ "$(od -An -c -N4 "$1" | tr -d ' ')" = '177ELF' ] || return 1
    [ "$(od -An -tu1 -j4 -N2 "$1" | tr -s ' ')" = ' 2 1' ] || return 1   # 64-bit, little endian
    [ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = 62 ] || return 1      # EM_X86_64
    phoff=$(od -An -tu8 -j32 -N8 "$1" | tr -d ' ')
    phentsize=$(od -An -tu2 -j54 -N2 "$1" | tr -d ' ')
    phnum=$(od -An -tu2 -j56 -N2 "$1" | tr -d ' ')
    [ "$phnum" -gt 0 ] || return 1
    for ((i = 0; i < phnum; i++)); do
        type=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$1" | tr -d ' ')
        [ "$type" != 3 ] || return 1   # PT_INTERP: dynamically linked
    done
}

# bootstrap_files OUT: the fake nixpkgs' bootstrap (pkgs/bootstrap-files.nix): which static
# busybox of this machine its fixed-output derivation copies, and the NAR hash of what it makes
# ($out/bin/busybox), as nixpkgs pins its bootstrap tools by hash.
bootstrap_files() {
    local candidates="/bin/busybox /usr/bin/busybox /usr/lib/busybox-static/busybox" c found="" tree hash
    # First what dpkg says busybox-static installed, then the usual places.
    for c in $(dpkg-query -L busybox-static 2>/dev/null | grep '/busybox$' || true) $candidates; do
        if is_static "$c"; then found=$c; break; fi
    done
    if [ -z "$found" ]; then
        {
            echo "prepare.sh: no statically linked busybox for x86_64-linux on this machine:"
            for c in $candidates; do
                if [ -e "$c" ]; then echo "  $c: not a static ELF executable"; else echo "  $c: missing"; fi
            done
            echo "Install Debian's busybox-static (apt-get install busybox-static); the 'busybox'"
            echo "package is dynamically linked and cannot run in a root without /lib."
        } >&2
        exit 1
    fi
    tree=$(mktemp -d)
    mkdir "$tree/bin"
    cp "$found" "$tree/bin/busybox"
    chmod 0555 "$tree/bin/busybox"
    hash=$(nix_out hash path "$tree")
    chmod -R u+w "$tree"
    rm -rf "$tree"
    printf '# Written by examples/prepare.sh: the static busybox of the machine that prepared this\n# example, and the NAR hash of bootstrapBusybox (bin/busybox, a copy of it).\n{ busybox = { path = "%s"; hash = "%s"; }; }\n' \
        "$found" "$hash" >"$1"
}

# nixpkgs: the library and packages, then a README (a second revision).
mkdir -p "$dest/inputs/nixpkgs"
cp -R "$src/inputs/nixpkgs/." "$dest/inputs/nixpkgs/"
bootstrap_files "$dest/inputs/nixpkgs/pkgs/bootstrap-files.nix"
mv "$dest/inputs/nixpkgs/README.md" "$dest/inputs/nixpkgs.README.md"
g init -q "$dest/inputs/nixpkgs"
commit "$dest/inputs/nixpkgs" "2023-11-01T10:00:00Z" "Initial fake nixpkgs: lib, builders, packages"

# systems: a flake listing systems, like github:nix-systems/default.
mkdir -p "$dest/inputs/systems"
cp -R "$src/inputs/systems/." "$dest/inputs/systems/"
g init -q "$dest/inputs/systems"
commit "$dest/inputs/systems" "2023-11-01T12:00:00Z" "systems: x86_64-linux and aarch64-linux"
read -r -a systems_locked <<<"$(git_locked SYSTEMS "$dest/inputs/systems")"

# tools: a flake of its own, locked against nixpkgs' first commit and systems.
mkdir -p "$dest/inputs/tools"
render "$src/inputs/tools/flake.nix.in" "$dest/inputs/tools/flake.nix"
g init -q "$dest/inputs/tools"
commit "$dest/inputs/tools" "2023-11-02T10:00:00Z" "tools: motd-render"
read -r -a nixpkgs_old <<<"$(github_locked NIXPKGS_OLD "$dest/inputs/nixpkgs" "$(g -C "$dest/inputs/nixpkgs" rev-parse HEAD)")"
render "$src/inputs/tools/flake.lock.in" "$dest/inputs/tools/flake.lock" "${nixpkgs_old[@]}" "${systems_locked[@]}"
commit "$dest/inputs/tools" "2023-11-02T11:00:00Z" "tools: lock inputs"
read -r -a tools_locked <<<"$(git_locked TOOLS "$dest/inputs/tools")"

mv "$dest/inputs/nixpkgs.README.md" "$dest/inputs/nixpkgs/README.md"
commit "$dest/inputs/nixpkgs" "2023-11-03T10:00:00Z" "Add README"
# Its second commit as github:NixOS/nixpkgs would give it: fetchGit adds the tree to the store as
# the `-source` path that the lock's narHash names, where Nix finds it instead of downloading.
read -r -a nixpkgs_locked <<<"$(git_locked NIXPKGS "$dest/inputs/nixpkgs")"
nixpkgs_locked=("${nixpkgs_locked[@]:0:3}")  # a github: lock has no revCount

# site: a plain directory.
mkdir -p "$dest/inputs/site"
cp -R "$src/inputs/site/." "$dest/inputs/site/"
site_locked=$(nix_out eval --impure --raw --expr "
    let t = builtins.fetchTree { type = \"path\"; path = \"$dest/inputs/site\"; }; in
    \"SITE_NARHASH=\${t.narHash} SITE_LASTMODIFIED=\${toString t.lastModified}\"")
read -r -a site_locked <<<"$site_locked"

# flake: three commits, two remotes, committed lock file.
mkdir -p "$dest/flake/hosts"
g init -q "$dest/flake"
g -C "$dest/flake" remote add origin https://git.example.invalid/example/machines.git
g -C "$dest/flake" remote add backup ssh://git@backup.example.invalid/srv/git/machines.git
cp "$src/flake/hosts/common.nix" "$dest/flake/hosts/"
printf '# machines\n\nNixOS configurations of the example site.\n' > "$dest/flake/README.md"
commit "$dest/flake" "2023-11-04T10:00:00Z" "Common host configuration"
cp "$src/flake/hosts/alpha.nix" "$src/flake/hosts/beta.nix" "$dest/flake/hosts/"
render "$src/flake/flake.nix.in" "$dest/flake/flake.nix"
commit "$dest/flake" "2023-11-05T10:00:00Z" "Add hosts alpha and beta"
render "$src/flake/flake.lock.in" "$dest/flake/flake.lock" \
    "${nixpkgs_locked[@]}" "${site_locked[@]}" "${systems_locked[@]}" "${tools_locked[@]}"
# Nix must take the lock as it is: up to date with flake.nix, nothing to fetch or rewrite.
g -C "$dest/flake" add flake.lock
nix_ flake metadata --no-update-lock-file "$dest/flake"
commit "$dest/flake" "2023-11-06T10:00:00Z" "Lock inputs"

if [ -n "$(g -C "$dest/flake" status --porcelain)" ]; then
    echo "prepare.sh: $dest/flake is not clean after preparing" >&2
    exit 1
fi
