#!/usr/bin/env bash
# install.sh - install a NixOS host from mediabuilder media, offline.
#
# Runs on the official NixOS installer (bash, coreutils, util-linux, grep, sed, nix; maybe git;
# no Python, maybe no jq). The media tree and its trust scheme are described in
# docs/media-layout.md of mediabuilder. In short: manifest.storepath names a store path in the
# media cache, signed by the media key; it is copied with Nix into a scratch store with only that
# key trusted, and only the files inside it are trusted from then on (manifest.json, sha256sums,
# hosts, store-paths, key). Every file on the media is checked against sha256sums and the target
# is checked before a single byte is written to it.
#
# sha256sums may carry comment lines that sha256sum itself ignores:
#   # whole <sha256 hex> <name>
# for a file that is stored split as <name>.part000, <name>.part001, ... (the parts are listed
# as ordinary lines). <name> is relative to the media root, like every name in sha256sums.
#
# The script is this file and its PARTS beside it on the medium. This file is what a person checks
# out of band (its sha256, printed by the build): it holds everything up to and including
# check_media, and vouches for the parts: each is read once into $VERIFIED, matched against the
# signed sha256sums like every file, and against the sha256 this file carries for it
# (PARTS_SHA256), and only then sourced from there (load_parts), never from the medium itself. No
# function of a part runs before that.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

readonly PROG=install.sh
readonly STORE_PATH_RE='^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+$'
readonly MANIFEST_PATH_RE='^/nix/store/[0-9a-df-np-sv-z]{32}-mediabuilder-manifest$'
# The fingerprint: the first 128 bits of the key's sha256, in groups of four hex digits.
readonly FINGERPRINT_RE='^[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){7}$'
# The 64-bit fingerprint of earlier mediabuilder versions: too short to trust (a colliding key can be ground).
readonly SHORT_FINGERPRINT_RE='^[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){3}$'
readonly TARGET_CACHE_NAME=.mediabuilder-cache
# The parts of this script: the host installed, the disk, upgrades, offline rebuilds.
readonly PARTS=(install-host.sh install-disk.sh install-upgrade.sh install-rebuild.sh)
# Their sha256 (scripts/pin_install_parts.py writes them; the tests check them). The key alone
# cannot vouch for the parts: they run before its fingerprint is confirmed (a dry run never asks,
# an install asks in confirm), and a forged medium's parts would skip the question.
readonly PARTS_SHA256='
a64afb5b84baea4d2dd1a56ad03695159649e34efc3f923ed79759b418d9bca7  install-host.sh
2cb08eca279f09961764834a9cad22614b4d77f47f7ba9fe04267c81ef54fe5a  install-disk.sh
3476d9c163b840454b1d60f3e895fe1fda85c4593b27f464c7c47e3c18a58a4e  install-upgrade.sh
7bac195c73dd2d9af72fd7555db1b7de74545ae9de84cdd2ed345da8c8e79acf  install-rebuild.sh
'
# Files read from the media once, into $VERIFIED, checked there and used only from there: a medium
# may answer differently the second time it is read.
readonly COPIED=(media-key.pub manifest.json registry.json flake/repo.bundle "${PARTS[@]}")

# Options.
HOST=""
ROOT=/mnt
FLAKE_DIR=/etc/nixos
EXPECT_KEY=""
DRY_RUN=0
YES=0
MEDIA=""
UPGRADE=0
BOOT=0
ROOT_GIVEN=0
FLAKE_DIR_GIVEN=0
DISK_REQ=""         # --disk or the install record: a device path or "auto"
LAYOUT=""           # uefi, bios or disko
UNATTENDED=0

# State, filled by the phases.
SCRATCH=""
VERIFIED=""         # $SCRATCH/verified: the COPIED files, as checked
KEY=""              # name:base64 of the media key
FINGERPRINT=""
CREATED=""          # the medium's creation time, from the signed manifest
MANIFEST_PATH=""    # /nix/store/<hash>-mediabuilder-manifest
TRUSTED=""          # the manifest directory inside the scratch store
TOPLEVEL=""
NAR_BYTES=0
SPLIT_BYTES=0       # bytes of split NARs this host needs reassembled on the target
HOST_PATHS=()
SPLIT_NEEDED=()     # names (relative to the media root) of split NARs this host needs
SOURCE_CACHE=""     # the cache nix copies from: the media's, or one on the target disk
TARGET_CACHE=""     # set once created on the target, so that cleanup removes it
GIT=()
CHROOT_MOUNTS=()
NIX_TRUST=()        # the --option flags every Nix call gets
STATE=""            # $ROOT/var/lib/mediabuilder: what the machine was installed from (upgrades)
INSTALLED_HOST=""
INSTALLED_REV=""

usage() {
    cat >&2 <<EOF
Usage: $PROG [--host NAME] [--root /mnt] [--flake-dir /etc/nixos] [--expect-key KEY]
             [--disk DEVICE|auto] [--layout uefi|bios|disko] [--media DIR] [--dry-run] [--yes] [--help]
       $PROG --unattended [--expect-key KEY] [--media DIR]
       $PROG --upgrade [--root /] [--boot] [--host NAME] [--expect-key KEY] [--media DIR] [--dry-run] [--yes]

Install a NixOS host from this medium into ROOT, with no network; or, with --upgrade, bring a
machine installed from an older medium to this one.

  --host NAME        the host to install (default: the only one; else a menu)
  --root DIR         the mounted target file system (default: /mnt)
  --flake-dir DIR    where the flake repository goes inside the target (default: /etc/nixos)
  --expect-key KEY   the media key you expect: "name:base64" or its fingerprint
                     "abcd:ef01:2345:6789:abcd:ef01:2345:6789" (the build prints it); without it
                     you are asked to confirm the fingerprint shown
  --media DIR        the media directory (default: the directory of this script)
  --disk DEVICE|auto erase DEVICE (a whole disk), partition, format and mount it at ROOT, then
                     install; auto: the single internal disk that is not the boot medium. You
                     confirm by typing the disk's name (default: install into a mounted ROOT)
  --layout LAYOUT    with --disk: uefi (GPT, ESP 512 MiB vfat "boot" at /boot, ext4 "nixos"),
                     bios (GPT, BIOS boot partition, ext4 "nixos") or disko (the host's disko
                     script from the medium) (default: the host's layout in the install record)
  --unattended       install as the medium's signed install record says (host, disk, layout:
                     mediabuilder build --unattended HOST --install-disk DISK), asking nothing;
                     the last line is "mediabuilder: installed HOST onto DEVICE"
  --upgrade          upgrade the installed machine at ROOT (default: /): a new system generation,
                     switch-to-configuration switch, /etc/nixos brought forward, the registry
                     refreshed; the medium must descend from what is installed (docs/upgrade.md)
  --boot             with --upgrade: switch-to-configuration boot (activate at the next boot)
  --dry-run          check everything, print what would be done, change nothing
  --yes              do not ask for confirmation
  --help             show this help
EOF
}

step() {
    printf '==> %s\n' "$*" >&2
}

info() {
    printf '    %s\n' "$*" >&2
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# die SUBJECT MESSAGE: one line on stderr, exit 2.
die() {
    printf '%s: error: %s: %s\n' "$PROG" "$1" "$2" >&2
    exit 2
}

cleanup() {
    local i
    for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${CHROOT_MOUNTS[i]}" 2>/dev/null || umount -lR "${CHROOT_MOUNTS[i]}" 2>/dev/null || true
    done
    if [[ -n $TARGET_CACHE && -d $TARGET_CACHE ]]; then
        rm -rf -- "$TARGET_CACHE"
    fi
    if declare -F abandon_disk >/dev/null; then # (install-disk.sh, once the parts are loaded)
        abandon_disk # unmounts the target disk (install.sh --disk) last
    fi
    if [[ -n $SCRATCH && -d $SCRATCH ]]; then
        chmod -R u+w -- "$SCRATCH" 2>/dev/null || true
        rm -rf -- "$SCRATCH"
    fi
}

# Run a command; on failure, one error line naming it.
run() {
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then
        die "$1" "failed with exit status $rc (see the messages above)"
    fi
}

# The fingerprint of a public key "name:base64": sha256 of the 32 raw key bytes, first 32 hex
# digits (128 bits) in groups of four (mediabuilder.store.keys.PublicKey.fingerprint).
key_fingerprint() {
    local hex out="" i
    hex=$(printf '%s' "${1#*:}" | base64 -d | sha256sum)
    for ((i = 0; i < 32; i += 4)); do
        out+=${out:+:}${hex:i:4}
    done
    printf '%s\n' "$out"
}

# The first line of a file, without trailing whitespace.
first_line() {
    local line=""
    IFS= read -r line <"$1" || true
    line=${line%$'\r'}
    printf '%s' "${line%"${line##*[![:space:]]}"}"
}

# ---------------------------------------------------------------------------------------------
# Phases: the options, the medium and its parts checked. The phases after check_media are in the
# parts.

parse_args() {
    local opt
    while (($# > 0)); do
        opt=$1
        case $opt in
            --help | -h)
                usage
                exit 0
                ;;
            --dry-run) DRY_RUN=1 ;;
            --upgrade) UPGRADE=1 ;;
            --boot) BOOT=1 ;;
            --yes | -y) YES=1 ;;
            --unattended) UNATTENDED=1 ;;
            --host | --root | --flake-dir | --expect-key | --media | --disk | --layout)
                (($# >= 2)) || die "$opt" "needs a value (see --help)"
                case $opt in
                    --host) HOST=$2 ;;
                    --root) ROOT=$2 ROOT_GIVEN=1 ;;
                    --flake-dir) FLAKE_DIR=$2 FLAKE_DIR_GIVEN=1 ;;
                    --expect-key) EXPECT_KEY=$2 ;;
                    --media) MEDIA=$2 ;;
                    --disk) DISK_REQ=$2 ;;
                    --layout) LAYOUT=$2 ;;
                esac
                shift
                ;;
            --host=* | --root=* | --flake-dir=* | --expect-key=* | --media=* | --disk=* | --layout=*)
                set -- "${opt%%=*}" "${opt#*=}" "${@:2}"
                continue
                ;;
            *) die "$opt" "unknown option (see --help)" ;;
        esac
        shift
    done
    ((UPGRADE && !ROOT_GIVEN)) && ROOT=/
    ((BOOT && !UPGRADE)) && die --boot "only with --upgrade (an install always runs switch-to-configuration boot)"
    if ((UNATTENDED)); then
        ((!UPGRADE)) || die --unattended "not with --upgrade"
        [[ -z $HOST && -z $DISK_REQ && -z $LAYOUT ]] ||
            die --unattended "takes host, disk and layout from the medium's signed install record: leave --host, --disk and --layout out"
        ((!DRY_RUN)) || die --unattended "not with --dry-run (run --disk DEVICE --dry-run to see the plan)"
        YES=1
    fi
    [[ -z $LAYOUT || -n $DISK_REQ ]] || die --layout "only with --disk DEVICE|auto (or --unattended)"
    case $LAYOUT in '' | uefi | bios | disko) ;; *) die --layout "'$LAYOUT' is not uefi, bios or disko" ;; esac
    ((!UPGRADE)) || [[ -z $DISK_REQ ]] || die --disk "not with --upgrade"
    [[ $ROOT == /* ]] || die "$ROOT" "--root must be an absolute path"
    [[ $FLAKE_DIR == /* ]] || die "$FLAKE_DIR" "--flake-dir must be an absolute path inside the target, e.g. /etc/nixos"
    [[ /$FLAKE_DIR/ != */../* ]] || die "$FLAKE_DIR" "--flake-dir must not contain '..'"
    ROOT=${ROOT%/}
    [[ -n $ROOT ]] || ((UPGRADE)) || die / "--root must not be the running system's root"
    FLAKE_DIR=${FLAKE_DIR%/}
    [[ -n $FLAKE_DIR ]] || die / "--flake-dir must not be the target's root"
    local doing=installing
    ((UPGRADE)) && doing=upgrading
    if ((DRY_RUN)); then
        step "$doing from mediabuilder media (dry run: nothing will be changed)"
    else
        step "$doing from mediabuilder media"
    fi
}

locate_media() {
    if [[ -z $MEDIA ]]; then
        MEDIA=$(dirname -- "${BASH_SOURCE[0]}")
    fi
    [[ -d $MEDIA ]] || die "$MEDIA" "media directory not found (pass --media DIR)"
    MEDIA=$(cd -- "$MEDIA" && pwd -P)
    step "media at $MEDIA"
    local f
    for f in media-key.pub manifest.json manifest.storepath registry.json flake/repo.bundle cache/nix-cache-info \
        "${PARTS[@]}"; do
        [[ -f $MEDIA/$f ]] || die "$f" "missing from the media (damaged or incomplete media; rebuild it)"
    done
    for f in cache/nar cache/log cache/realisations; do
        [[ -d $MEDIA/$f ]] || die "$f/" "directory missing from the media (Nix needs it on read-only media; rebuild it)"
    done
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/mediabuilder-install.XXXXXXXX")
    VERIFIED=$SCRATCH/verified
}

# CAP: the most bytes FILE of the media may have before it is read (a key, a path and the JSON
# files are small; the bundle must leave room in scratch for its clone). A medium is hostile until
# checked: a huge file must not fill the scratch tmpfs, nor a huge line bash's memory.
CAP=0
set_cap() {
    local blocks block_size
    case $1 in
        media-key.pub | manifest.storepath) CAP=$((4 * 1024)) ;;
        cache/*.narinfo | cache/nix-cache-info | install-*.sh) CAP=$((1024 * 1024)) ;;
        manifest.json | registry.json) CAP=$((64 * 1024 * 1024)) ;;
        *)
            read -r blocks block_size < <(stat -f -c '%a %S' -- "$SCRATCH") ||
                die "$SCRATCH" "cannot tell its free space"
            CAP=$((blocks * block_size / 3))
            ;;
    esac
}

# FILE of the media is at most its CAP, or the install stops with one line (and HINT).
check_size() {
    local size
    set_cap "$1"
    size=$(stat -L -c %s -- "$MEDIA/$1") || die "$1" "cannot be read from the media (damaged media)"
    ((size <= CAP)) ||
        die "$1" "is $size bytes, more than the $CAP it may have (damaged or forged media${2:+; $2})"
}

# Each of COPIED, read from the media once into $VERIFIED.
copy_from_media() {
    local f hint
    mkdir -p -- "$VERIFIED/flake" "$VERIFIED/cache"
    for f in "${COPIED[@]}"; do
        hint=""
        [[ $f != flake/repo.bundle ]] || hint="or set TMPDIR to a directory with more room than ${TMPDIR:-/tmp}"
        copy_one "$f" "$hint"
    done
}

# FILE of the media into $VERIFIED, never more than its CAP.
copy_one() {
    check_size "$1" "${2:-}"
    head -c $((CAP + 1)) -- "$MEDIA/$1" >"$VERIFIED/$1" 2>"$SCRATCH/cp.err" ||
        die "$1" "cannot be read from the media ($(head -n1 "$SCRATCH/cp.err"); damaged media)"
    (($(stat -c %s -- "$VERIFIED/$1") <= CAP)) ||
        die "$1" "grew past $CAP bytes while it was read (damaged or forged media)"
}

# The key, the signed manifest path and every file's hash; then the parts of this script, checked.
check_media() {
    step "checking the media (key, signed manifest, sha256 of every file)"
    copy_from_media
    check_key

    check_size manifest.storepath
    MANIFEST_PATH=$(first_line "$MEDIA/manifest.storepath")
    [[ $MANIFEST_PATH =~ $MANIFEST_PATH_RE ]] ||
        die manifest.storepath "not a /nix/store/<hash>-mediabuilder-manifest path (damaged media)"
    local hashpart=${MANIFEST_PATH#/nix/store/}
    hashpart=${hashpart:0:32}
    [[ -f $MEDIA/cache/$hashpart.narinfo ]] ||
        die "cache/$hashpart.narinfo" "missing: the signed manifest is not in the media cache (damaged media)"

    # The signed manifest, into a scratch store, with only the media key trusted.
    local store=$SCRATCH/store log=$SCRATCH/nix-copy.log
    if ! nix copy "${NIX_TRUST[@]}" --option substituters '' \
        --from "file://$MEDIA/cache" --to "local?root=$store" "$MANIFEST_PATH" 2>"$log"; then
        cat "$log" >&2
        if grep -q 'signature' "$log"; then
            die "cache/$hashpart.narinfo" "the manifest is not signed by media-key.pub (forged or damaged media)"
        fi
        die "cache/$hashpart.narinfo" "Nix cannot copy the signed manifest (damaged media; see above)"
    fi
    local json
    json=$(nix path-info "${NIX_TRUST[@]}" --store "local?root=$store" --json "$MANIFEST_PATH") ||
        die "$MANIFEST_PATH" "nix path-info failed on the scratch store"
    [[ $json == *'"narHash"'* ]] || die "$MANIFEST_PATH" "not valid in the scratch store after copying"
    if grep -Eq '"ca"[[:space:]]*:[[:space:]]*("|\{)' <<<"$json"; then
        die "cache/$hashpart.narinfo" "the manifest path is content-addressed, so its signature proves nothing (forged media)"
    fi

    TRUSTED=$store$MANIFEST_PATH
    local f
    for f in manifest.json sha256sums hosts store-paths key; do
        [[ -f $TRUSTED/$f ]] || die "$MANIFEST_PATH/$f" "missing from the signed manifest (media made by an incompatible mediabuilder)"
    done
    cmp -s -- "$TRUSTED/manifest.json" "$VERIFIED/manifest.json" ||
        die manifest.json "differs from the signed copy in $MANIFEST_PATH (edited by hand or damaged)"
    [[ $(first_line "$TRUSTED/key") == "$KEY" ]] ||
        die media-key.pub "differs from the key recorded in the signed manifest (damaged or tampered media)"
    CREATED=$(sed -n -E 's/^  "created": "([0-9A-Za-z:.+-]+)",?$/\1/p' "$TRUSTED/manifest.json")
    [[ -n $CREATED ]] || CREATED="unknown (not recorded in the signed manifest)"
    info "medium created $CREATED (signed manifest)"

    check_sums
    load_parts
}

# The key (media-key.pub's copy): a Nix public key, the expected one if --expect-key was given.
check_key() {
    local name b64 nbytes
    KEY=$(first_line "$VERIFIED/media-key.pub")
    name=${KEY%%:*}
    b64=${KEY#*:}
    if [[ $KEY != *:* || -z $name || -z $b64 ]] || ! nbytes=$(printf '%s' "$b64" | base64 -d 2>/dev/null | wc -c) ||
        ((nbytes != 32)); then
        die media-key.pub "not a Nix public key 'name:base64' of 32 bytes (damaged media)"
    fi
    FINGERPRINT=$(key_fingerprint "$KEY")
    info "media key: $name, fingerprint $FINGERPRINT"
    if [[ -n $EXPECT_KEY ]]; then
        [[ ! $EXPECT_KEY =~ $SHORT_FINGERPRINT_RE ]] ||
            die --expect-key "'$EXPECT_KEY' is a 64-bit fingerprint, too short to trust; pass the 128-bit one (eight groups of four) the medium's maker printed, or the whole key"
        if [[ $EXPECT_KEY =~ $FINGERPRINT_RE ]]; then
            [[ ${EXPECT_KEY,,} == "$FINGERPRINT" ]] ||
                die media-key.pub "fingerprint $FINGERPRINT is not the expected $EXPECT_KEY (media not made by whom you expect)"
        else
            [[ $EXPECT_KEY == "$KEY" ]] ||
                die media-key.pub "key $KEY is not the expected $EXPECT_KEY (media not made by whom you expect)"
        fi
        info "the media key is the expected one"
    elif ((UNATTENDED)); then
        info "unattended: the key is not compared (install.sh and the key come from this medium; check the medium's sha256 before you boot it)"
    elif ((YES && !DRY_RUN)); then
        warn "THE MEDIA KEY IS NOT CHECKED: --yes without --expect-key installs whatever a medium signed by"
        warn "any key holds, and install.sh itself comes from the medium. Pass --expect-key $FINGERPRINT"
        warn "only if that is the fingerprint the medium's maker gave you."
    else
        info "compare the fingerprint with the one its maker gave you (or pass --expect-key)"
    fi
    NIX_TRUST=(--extra-experimental-features 'nix-command flakes'
        --option trusted-public-keys "$KEY" --option require-sigs true)
}

# sha256 of every file listed in the signed sha256sums: the COPIED ones and the cache's narinfos
# in $VERIFIED, the others on the media. Nix copies from $VERIFIED/cache: what a narinfo does not
# sign (CA, Deriver) would otherwise be read from the media again, after it was checked.
check_sums() {
    local sums=$SCRATCH/sha256sums copied=$SCRATCH/sha256sums.copied line name count=0
    : >"$sums"
    : >"$copied"
    while IFS= read -r line || [[ -n $line ]]; do
        [[ -z $line || $line == '#'* ]] && continue
        [[ $line =~ ^([0-9a-f]{64})\ [\ *](.+)$ ]] ||
            die "$MANIFEST_PATH/sha256sums" "malformed line '$line' (media made by an incompatible mediabuilder)"
        name=${BASH_REMATCH[2]}
        [[ $name != /* && /$name/ != */../* && /$name/ != */./* ]] ||
            die "$MANIFEST_PATH/sha256sums" "file name '$name' points outside the media (forged media)"
        [[ -f $MEDIA/$name ]] || die "$name" "missing from the media (damaged or incomplete media; rebuild or recopy it)"
        if is_copied "$name"; then
            [[ $name != cache/* ]] || copy_one "$name"
            printf '%s\n' "$line" >>"$copied"
        else
            printf '%s\n' "$line" >>"$sums"
        fi
        count=$((count + 1))
    done <"$TRUSTED/sha256sums"
    sed -E 's/^[0-9a-f]{64} [ *]//' "$copied" >"$SCRATCH/copied.names"
    for name in registry.json flake/repo.bundle; do
        grep -Fqx -- "$name" "$SCRATCH/copied.names" ||
            die "$MANIFEST_PATH/sha256sums" "does not list $name (media made by an incompatible mediabuilder)"
    done
    for name in "${PARTS[@]}"; do
        grep -Fqx -- "$name" "$SCRATCH/copied.names" ||
            die "$name" "not listed in the signed sha256sums, so nothing vouches for it (forged media, or made by an incompatible mediabuilder)"
    done
    info "hashing $count files"
    hash_files "$VERIFIED" "$copied"
    hash_files "$MEDIA" "$sums"
    # Split files: the parts were just checked; their whole is checked when reassembled.
    sed -n -E 's/^# whole ([0-9a-f]{64}) +(.+)$/\1 \2/p' "$TRUSTED/sha256sums" >"$SCRATCH/whole"
    for name in nar log realisations; do
        ln -s -- "$MEDIA/cache/$name" "$VERIFIED/cache/$name"
    done
}

is_copied() {
    local f
    [[ $1 =~ ^cache/([0-9a-df-np-sv-z]{32}\.narinfo|nix-cache-info)$ ]] && return 0
    for f in "${COPIED[@]}"; do
        [[ $1 == "$f" ]] && return 0
    done
    return 1
}

# hash_files DIR SUMS: sha256sum -c SUMS in DIR; the first bad file named in one error line.
hash_files() {
    local out=$SCRATCH/sha256sum.out line name
    if ! (cd -- "$1" && LC_ALL=C sha256sum -c --quiet -- "$2") >"$out" 2>"$SCRATCH/sha256sum.err"; then
        line=$(grep -m1 ': FAILED' "$out" || true)
        name=${line%: FAILED*}
        if [[ -z $line ]]; then
            die "$MEDIA" "sha256sum failed: $(head -n1 "$SCRATCH/sha256sum.err")"
        elif [[ $line == *'open or read'* ]]; then
            [[ -e $1/$name ]] || die "$name" "missing from the media (damaged or incomplete media)"
            die "$name" "cannot be read (damaged media)"
        fi
        die "$name" "sha256 mismatch (damaged media)"
    fi
}

# The parts, sourced from their copies in $VERIFIED, which check_sums just matched against the
# signed sha256sums (it refuses a medium whose sums do not list one), once each has the sha256 this
# file carries for it: never from the medium, which may answer differently the second time it is read.
load_parts() {
    local -A pinned=()
    local sum name got
    while read -r sum name; do
        [[ -z $name ]] || pinned[$name]=$sum
    done <<<"$PARTS_SHA256"
    for name in "${PARTS[@]}"; do
        got=$(sha256sum <"$VERIFIED/$name") || die "$name" "cannot be read from its checked copy in $VERIFIED"
        [[ ${got%% *} == "${pinned[$name]:-}" ]] ||
            die "$name" "is not the part this install.sh was made with (forged media, or made by another mediabuilder version): run the medium's own install.sh, checked by its sha256"
    done
    # shellcheck source=install-host.sh
    source "$VERIFIED/install-host.sh"
    # shellcheck source=install-disk.sh
    source "$VERIFIED/install-disk.sh"
    # shellcheck source=install-upgrade.sh
    source "$VERIFIED/install-upgrade.sh"
    # shellcheck source=install-rebuild.sh
    source "$VERIFIED/install-rebuild.sh"
}

# ---------------------------------------------------------------------------------------------
# Upgrades: read before check_media (the rest is in install-upgrade.sh).

# What the machine was installed from; without --expect-key, the key it was installed with is expected.
read_installed() {
    STATE=$ROOT/var/lib/mediabuilder
    local key value
    [[ -f $STATE/manifest.json ]] ||
        die "$STATE/manifest.json" "missing: ${ROOT:-/} was not installed from mediabuilder media (nothing to upgrade; install it instead)"
    [[ -L $ROOT/nix/var/nix/profiles/system ]] ||
        die "$ROOT/nix/var/nix/profiles/system" "missing: no NixOS system installed in ${ROOT:-/}"
    if [[ -f $STATE/installed ]]; then
        while IFS=$'\t' read -r key value; do
            case $key in
                host) INSTALLED_HOST=$value ;;
                rev) INSTALLED_REV=$value ;;
                flake-dir) ((FLAKE_DIR_GIVEN)) || FLAKE_DIR=$value ;;
            esac
        done <"$STATE/installed"
    else # installed by an install.sh that kept only manifest.json
        INSTALLED_REV=$(sed -n -E '/^  "flake": \{$/,/^  \}/s/^    "rev": "([0-9a-f]+)",?$/\1/p' "$STATE/manifest.json")
    fi
    [[ $FLAKE_DIR == /?* && /$FLAKE_DIR/ != */../* ]] ||
        die "$STATE/installed" "records flake-dir '$FLAKE_DIR', not an absolute path inside the machine"
    [[ $INSTALLED_REV =~ ^([0-9a-f]{40}|[0-9a-f]{64})$ ]] ||
        die "$STATE/installed" "records no flake revision this machine was installed from (reinstall it)"
    if [[ -z $EXPECT_KEY && -f $STATE/media-key.pub ]]; then
        EXPECT_KEY=$(first_line "$STATE/media-key.pub")
        info "expecting the key this machine was installed with ($STATE/media-key.pub; --expect-key to change it)"
    fi
}

# ---------------------------------------------------------------------------------------------
# Main

main_upgrade() {
    locate_media
    read_installed
    check_media
    choose_upgrade_host
    choose_host
    read_flake_info
    check_upgrade_target
    check_bundle
    check_newer
    check_base
    confirm_upgrade
    upgrade_copy
    upgrade_flake
    upgrade_registry
    configure_rebuild
    upgrade_profile
    upgrade_switch
    record_install
    if [[ -n $TARGET_CACHE ]]; then
        rm -rf -- "$TARGET_CACHE"
        TARGET_CACHE=""
    fi
    step "done: $HOST upgraded in ${ROOT:-/} from ${INSTALLED_REV:0:12} to ${REV:0:12} ($TOPLEVEL)"
}

main() {
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    parse_args "$@"
    if ((UPGRADE)); then
        main_upgrade
        return
    fi
    locate_media
    check_media
    refuse_delta_install
    if [[ -n $DISK_REQ ]] || ((UNATTENDED)); then
        read_install_record
    fi
    choose_host
    if [[ -n $DISK_REQ ]]; then
        ((DRY_RUN || EUID == 0)) || die "$DISK_REQ" "installing onto a disk needs root; run this script as root (sudo)"
        read_flake_info
        choose_layout
        plan_disk
    else
        check_target
    fi
    check_bundle
    confirm
    if [[ -n $DISK_REQ ]]; then
        confirm_disk
        prepare_disk
        check_target
    fi
    copy_closure
    set_profile
    install_bootloader
    clone_flake
    configure_nix
    configure_rebuild
    record_install
    done_summary
    if [[ -n $DISK_REQ ]]; then
        finish_disk
        printf 'mediabuilder: installed %s onto %s\n' "$HOST" "$DISK" >&2
    fi
}

if [[ -z ${INSTALL_SH_SOURCE_ONLY:-} ]]; then
    main "$@"
fi

