#!/usr/bin/env bash
# Create a fresh working copy of the example flake under DEST:
#   DEST/inputs/nixpkgs  git repo, 2 commits   (flake input `nixpkgs`, type git)
#   DEST/inputs/tools    git repo, 2 commits   (flake input `tools`, type git, with its own
#                                               nixpkgs input locked to nixpkgs' first commit)
#   DEST/inputs/site     plain directory       (flake input `site`, type path, flake = false)
#   DEST/flake           git repo, 3 commits, remotes origin + backup, committed flake.lock
# Commit authors and dates are fixed, so nixpkgs' revisions are the same on every run (the
# others contain DEST in their flake.nix and vary with it). Prints nothing but errors.
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

render() { sed "s|@DEST@|$dest|g" "$1" > "$2"; }

# nixpkgs: the library and packages, then a README (a second revision).
mkdir -p "$dest/inputs/nixpkgs"
cp -R "$src/inputs/nixpkgs/." "$dest/inputs/nixpkgs/"
mv "$dest/inputs/nixpkgs/README.md" "$dest/inputs/nixpkgs.README.md"
g init -q "$dest/inputs/nixpkgs"
commit "$dest/inputs/nixpkgs" "2023-11-01T10:00:00Z" "Initial fake nixpkgs: lib, builders, packages"

# tools: a flake of its own, locked against nixpkgs' first commit.
mkdir -p "$dest/inputs/tools"
render "$src/inputs/tools/flake.nix.in" "$dest/inputs/tools/flake.nix"
g init -q "$dest/inputs/tools"
commit "$dest/inputs/tools" "2023-11-02T10:00:00Z" "tools: motd-render"
nix_ flake lock "$dest/inputs/tools"
commit "$dest/inputs/tools" "2023-11-02T11:00:00Z" "tools: lock inputs"

mv "$dest/inputs/nixpkgs.README.md" "$dest/inputs/nixpkgs/README.md"
commit "$dest/inputs/nixpkgs" "2023-11-03T10:00:00Z" "Add README"

# site: a plain directory.
mkdir -p "$dest/inputs/site"
cp -R "$src/inputs/site/." "$dest/inputs/site/"

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
nix_ flake lock "$dest/flake"
commit "$dest/flake" "2023-11-06T10:00:00Z" "Lock inputs"

if [ -n "$(g -C "$dest/flake" status --porcelain)" ]; then
    echo "prepare.sh: $dest/flake is not clean after preparing" >&2
    exit 1
fi
