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
set -euo pipefail

readonly PROG=install.sh
readonly STORE_PATH_RE='^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+$'
readonly MANIFEST_PATH_RE='^/nix/store/[0-9a-df-np-sv-z]{32}-mediabuilder-manifest$'
# The fingerprint: the first 128 bits of the key's sha256, in groups of four hex digits.
readonly FINGERPRINT_RE='^[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){7}$'
# The 64-bit fingerprint of earlier mediabuilder versions: too short to trust (a colliding key can be ground).
readonly SHORT_FINGERPRINT_RE='^[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){3}$'
readonly TARGET_CACHE_NAME=.mediabuilder-cache
# Files read from the media once, into $VERIFIED, checked there and used only from there: a medium
# may answer differently the second time it is read.
readonly COPIED=(media-key.pub manifest.json registry.json flake/repo.bundle)

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
    abandon_disk # unmounts the target disk (install.sh --disk) last
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
# Phases

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
    for f in media-key.pub manifest.json manifest.storepath registry.json flake/repo.bundle cache/nix-cache-info; do
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
        cache/*.narinfo | cache/nix-cache-info) CAP=$((1024 * 1024)) ;;
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

# The key, the signed manifest path and every file's hash.
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
    for name in registry.json flake/repo.bundle; do
        grep -Fqx -- "$name" < <(sed -E 's/^[0-9a-f]{64} [ *]//' "$copied") ||
            die "$MANIFEST_PATH/sha256sums" "does not list $name (media made by an incompatible mediabuilder)"
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

choose_host() {
    local -a names=() toplevels=() bytes=()
    local name toplevel nar rest
    while IFS=$'\t' read -r name toplevel nar rest || [[ -n $name ]]; do
        [[ -z $name ]] && continue
        [[ -z $rest && $toplevel =~ $STORE_PATH_RE && $nar =~ ^[0-9]+$ ]] ||
            die "$MANIFEST_PATH/hosts" "malformed line for '$name' (media made by an incompatible mediabuilder)"
        names+=("$name")
        toplevels+=("$toplevel")
        bytes+=("$nar")
    done <"$TRUSTED/hosts"
    ((${#names[@]} > 0)) || die "$MANIFEST_PATH/hosts" "lists no host (nothing to install)"

    local i pick=-1
    if [[ -n $HOST ]]; then
        for i in "${!names[@]}"; do
            [[ ${names[i]} == "$HOST" ]] && pick=$i
        done
        ((pick >= 0)) || die "$HOST" "no such host on this medium (it has: ${names[*]})"
    elif ((${#names[@]} == 1)); then
        pick=0
    elif ((YES)); then
        die --host "several hosts on this medium, pass one of: ${names[*]}"
    else
        [[ -r /dev/tty ]] || die --host "several hosts and no terminal to ask on; pass one of: ${names[*]}"
        printf 'Hosts on this medium:\n' >&2
        for i in "${!names[@]}"; do
            printf '  %d) %s\n' "$((i + 1))" "${names[i]}" >&2
        done
        local answer=""
        printf 'Install which host? [1-%d] ' "${#names[@]}" >&2
        IFS= read -r answer </dev/tty || true
        if ! [[ $answer =~ ^[0-9]+$ ]] || ((answer < 1 || answer > ${#names[@]})); then
            die /dev/tty "'$answer' is not a host number"
        fi
        pick=$((answer - 1))
    fi
    HOST=${names[pick]}
    TOPLEVEL=${toplevels[pick]}
    NAR_BYTES=${bytes[pick]}
    step "host $HOST: $TOPLEVEL"

    # Its store paths (closure, flake inputs, tools).
    local line="" found=0 paths
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ ${line%%$'\t'*} == "$HOST" && $line == *$'\t'* ]]; then
            found=1
            paths=${line#*$'\t'}
            read -r -a HOST_PATHS <<<"$paths"
            break
        fi
    done <"$TRUSTED/store-paths"
    ((found)) || die "$MANIFEST_PATH/store-paths" "has no line for host $HOST (damaged media)"
    local p has_toplevel=0
    for p in "${HOST_PATHS[@]}"; do
        [[ $p =~ $STORE_PATH_RE ]] || die "$MANIFEST_PATH/store-paths" "'$p' is not a store path"
        [[ $p == "$TOPLEVEL" ]] && has_toplevel=1
    done
    ((has_toplevel)) || die "$MANIFEST_PATH/store-paths" "the paths of $HOST do not include its toplevel"
    split_base_paths
    info "${#HOST_PATHS[@]} store paths, $NAR_BYTES bytes unpacked"

    # Every path's narinfo, and its NAR: on the media whole, or split (reassembled later).
    local hash url listed=$SCRATCH/urls
    : >"$listed"
    for p in "${HOST_PATHS[@]}"; do
        hash=${p#/nix/store/}
        hash=${hash:0:32}
        [[ -f $MEDIA/cache/$hash.narinfo ]] || die "cache/$hash.narinfo" "missing: $p is not on the media (damaged media)"
        [[ -f $VERIFIED/cache/$hash.narinfo ]] ||
            die "cache/$hash.narinfo" "not listed in the signed sha256sums (forged media)"
        printf '%s\n' "$VERIFIED/cache/$hash.narinfo" >>"$listed"
    done
    local -A whole=() seen=()
    local sum
    while read -r sum name; do
        whole[$name]=$sum
    done <"$SCRATCH/whole"
    while IFS= read -r url; do
        [[ -n ${seen[$url]:-} ]] && continue
        seen[$url]=1
        [[ $url != /* && /$url/ != */../* ]] || die "cache/$url" "narinfo URL points outside the cache (forged media)"
        if [[ -f $MEDIA/cache/$url ]]; then
            continue
        elif [[ -n ${whole[cache/$url]:-} ]]; then
            SPLIT_NEEDED+=("cache/$url")
            for p in "$MEDIA/cache/$url".part[0-9][0-9][0-9]; do
                [[ -f $p ]] || die "cache/$url.part000" "missing from the media (damaged media)"
                SPLIT_BYTES=$((SPLIT_BYTES + $(stat -c %s -- "$p")))
            done
        else
            die "cache/$url" "missing from the media (damaged media)"
        fi
    done < <(tr '\n' '\0' <"$listed" | xargs -0 sed -n 's/^URL: //p')
    if ((${#SPLIT_NEEDED[@]} > 0)); then
        info "${#SPLIT_NEEDED[@]} split NAR(s) to reassemble on the target ($SPLIT_BYTES bytes)"
    fi
}

check_target() {
    step "checking the target $ROOT"
    [[ -d $ROOT ]] || die "$ROOT" "does not exist (mount the target file system there)"
    mountpoint -q -- "$ROOT" || die "$ROOT" "is not a mount point (mount the target file system there)"
    local owner mode
    read -r owner mode < <(stat -c '%u %a' -- "$ROOT")
    [[ $owner == 0 && $mode == 755 ]] ||
        die "$ROOT" "owned by uid $owner with mode $mode; it must be root's with mode 755 (chown root:root $ROOT; chmod 755 $ROOT)"
    local avail need
    avail=$(df -B1 --output=avail -- "$ROOT" | tail -n1 | tr -d '[:space:]')
    [[ $avail =~ ^[0-9]+$ ]] || die "$ROOT" "cannot read the free space (df printed '$avail')"
    need=$((NAR_BYTES + NAR_BYTES / 10 + SPLIT_BYTES))
    ((avail >= need)) ||
        die "$ROOT" "only $avail bytes free, $HOST needs $need (its store plus 10%); use a bigger partition"
    info "$avail bytes free, $need needed"
    local dir=$ROOT$FLAKE_DIR
    if [[ -e $dir || -L $dir ]]; then
        [[ -d $dir && ! -L $dir ]] || die "$dir" "exists and is not a directory; remove it or pass another --flake-dir"
        [[ -z $(ls -A -- "$dir") ]] || die "$dir" "is not empty; empty it or pass another --flake-dir"
    fi
    if ((!DRY_RUN)) && ((EUID != 0)); then
        die "$ROOT" "installing needs root; run this script as root (sudo)"
    fi
    read_flake_info
}

# The flake repository, cloned from the bundle into scratch before anything is written to the
# target: HEAD at the recorded commit, the flake's directory with its flake.nix, the remotes.
# clone_flake later copies this checked clone into the target.
check_bundle() {
    step "checking the flake repository (clone of flake/repo.bundle)"
    find_git
    local dir=$SCRATCH/flake bundle=$VERIFIED/flake/repo.bundle
    "${GIT[@]}" clone --quiet --no-hardlinks -- "$bundle" "$dir" 2>"$SCRATCH/git.log" ||
        die flake/repo.bundle "git cannot clone the bundle (damaged media, or made from a shallow clone): $(tail -n1 "$SCRATCH/git.log")"
    local -a g=("${GIT[@]}" -C "$dir")
    # Every branch of the bundle as a local branch (origin goes away below).
    "${g[@]}" fetch --quiet --update-head-ok -- "$bundle" '+refs/heads/*:refs/heads/*' 2>"$SCRATCH/git.log" ||
        die flake/repo.bundle "git cannot fetch the bundle's branches: $(tail -n1 "$SCRATCH/git.log")"
    if [[ -n $BRANCH ]]; then
        "${g[@]}" checkout --quiet "$BRANCH" -- 2>"$SCRATCH/git.log" ||
            die flake/repo.bundle "has no branch $BRANCH to check out: $(tail -n1 "$SCRATCH/git.log")"
    else
        "${g[@]}" checkout --quiet --detach "$REV" -- 2>"$SCRATCH/git.log" ||
            die flake/repo.bundle "does not hold the recorded commit $REV: $(tail -n1 "$SCRATCH/git.log")"
    fi
    local head
    head=$("${g[@]}" rev-parse HEAD) || die flake/repo.bundle "git rev-parse HEAD failed in its clone"
    [[ $head == "$REV" ]] ||
        die flake/repo.bundle "branch ${BRANCH:-<detached>} is at $head, not the recorded commit $REV (media made from a changed repository)"
    [[ -f $dir/${SUBDIR:+$SUBDIR/}flake.nix ]] ||
        die flake/repo.bundle "has no ${SUBDIR:+$SUBDIR/}flake.nix at $REV (media made by an incompatible mediabuilder)"
    run "${g[@]}" remote remove origin
    local i
    for i in "${!REMOTE_NAMES[@]}"; do
        run "${g[@]}" remote add -- "${REMOTE_NAMES[i]}" "${REMOTE_URLS[i]}"
    done
    info "branch ${BRANCH:-<detached>} at ${REV:0:12}, flake in ${FLAKE_DIR}${SUBDIR:+/$SUBDIR}, ${#REMOTE_NAMES[@]} remote(s)"
}

BRANCH=""
REV=""
SUBDIR=""           # the flake's directory inside the repository ("" at its top)
REMOTE_NAMES=()
REMOTE_URLS=()

# Undo JSON string escapes of the simple kind; fails on \uXXXX.
json_unescape() {
    local s=$1 out=""
    while [[ $s == *\\* ]]; do
        out+=${s%%\\*}
        s=${s#*\\}
        case ${s:0:1} in
            '"' | \\ | /) out+=${s:0:1} ;;
            *) return 1 ;;
        esac
        s=${s:1}
    done
    printf '%s' "$out$s"
}

# branch, rev and remotes of the flake from the trusted manifest.json. No jq on the installer:
# this relies on mediabuilder writing manifest.json with json.dumps(indent=2, sort_keys=True), so
# the "flake" object starts at a line '  "flake": {', its own keys sit on lines indented by four
# spaces, and each remote is alone on a line of the "remotes" object.
read_flake_info() {
    local block line in_remotes=0 name url
    BRANCH="" REV="" SUBDIR="" REMOTE_NAMES=() REMOTE_URLS=() # (read again by check_target after --disk)
    block=$(sed -n '/^  "flake": {$/,/^  }/p' "$TRUSTED/manifest.json")
    [[ -n $block ]] || die "$MANIFEST_PATH/manifest.json" "has no \"flake\" object (media made by an incompatible mediabuilder)"
    while IFS= read -r line; do
        if ((in_remotes)); then
            if [[ $line =~ ^\ {4}\},?$ ]]; then
                in_remotes=0
            elif [[ $line =~ ^\ {6}\"(([^\"\\]|\\.)*)\":\ \"(([^\"\\]|\\.)*)\",?$ ]]; then
                if name=$(json_unescape "${BASH_REMATCH[1]}") && url=$(json_unescape "${BASH_REMATCH[3]}"); then
                    REMOTE_NAMES+=("$name")
                    REMOTE_URLS+=("$url")
                else
                    warn "remote line '$line' has escapes this script does not read; restore it by hand"
                fi
            else
                die "$MANIFEST_PATH/manifest.json" "cannot read the remotes line '$line'"
            fi
        elif [[ $line =~ ^\ {4}\"remotes\":\ \{\},?$ ]]; then
            :
        elif [[ $line =~ ^\ {4}\"remotes\":\ \{$ ]]; then
            in_remotes=1
        elif [[ $line =~ ^\ {4}\"rev\":\ \"([0-9a-f]{40}|[0-9a-f]{64})\",?$ ]]; then
            REV=${BASH_REMATCH[1]}
        elif [[ $line =~ ^\ {4}\"branch\":\ \"(([^\"\\]|\\.)*)\",?$ ]]; then
            BRANCH=$(json_unescape "${BASH_REMATCH[1]}") ||
                die "$MANIFEST_PATH/manifest.json" "cannot read the branch name"
        elif [[ $line =~ ^\ {4}\"subdir\":\ \"(([^\"\\]|\\.)*)\",?$ ]]; then
            SUBDIR=$(json_unescape "${BASH_REMATCH[1]}") ||
                die "$MANIFEST_PATH/manifest.json" "cannot read the flake's subdir"
        fi
    done <<<"$block"
    SUBDIR=${SUBDIR%/}
    [[ $SUBDIR != /* && /$SUBDIR/ != */../* ]] ||
        die "$MANIFEST_PATH/manifest.json" "flake subdir '$SUBDIR' points outside the repository (forged media)"
    [[ -n $REV ]] || die "$MANIFEST_PATH/manifest.json" "has no flake \"rev\" (media made by an incompatible mediabuilder)"
}

confirm() {
    local plan_cache="file://$MEDIA/cache"
    ((${#SPLIT_NEEDED[@]} > 0)) && plan_cache="file://$ROOT/$TARGET_CACHE_NAME (media cache plus ${#SPLIT_NEEDED[@]} reassembled NAR(s))"
    if ((DRY_RUN)); then
        step "dry run: every check passed; the plan"
        {
            printf '    host:        %s\n' "$HOST"
            printf '    toplevel:    %s\n' "$TOPLEVEL"
            printf '    store paths: %s (%s bytes unpacked)\n' "${#HOST_PATHS[@]}" "$NAR_BYTES"
            printf '    would run:   nix copy --from %s --to local?root=%s <%s paths>\n' "$plan_cache" "$ROOT" "${#HOST_PATHS[@]}"
            printf '                 nix-env --store %s -p %s/nix/var/nix/profiles/system --set %s\n' "$ROOT" "$ROOT" "$TOPLEVEL"
            printf '                 NIXOS_INSTALL_BOOTLOADER=1 %s/bin/switch-to-configuration boot (inside %s)\n' "$TOPLEVEL" "$ROOT"
            printf '                 git clone flake/repo.bundle %s%s (branch %s, rev %s, flake in %s)\n' "$ROOT" "$FLAKE_DIR" \
                "${BRANCH:-<detached>}" "$REV" "$FLAKE_DIR${SUBDIR:+/$SUBDIR}"
            printf '                 write %s/var/lib/mediabuilder/registry.json and %s/root/.config/nix/nix.conf\n' "$ROOT" "$ROOT"
            if [[ -n $DISK_REQ ]]; then
                printf '    first:       erase %s, layout %s, mount it at %s (%s)\n' "$DISK" "$LAYOUT" "$ROOT" "$DISK_DESC"
            fi
        } >&2
        exit 0
    fi
    if [[ -n $DISK_REQ ]]; then # confirm_disk asks (or, unattended, not)
        ((YES)) || { [[ -r /dev/tty ]] && confirm_key; }
        return 0
    fi
    if ((YES)); then
        local checked="media key as expected"
        [[ -n $EXPECT_KEY ]] || checked="MEDIA KEY NOT CHECKED"
        step "installing $HOST into $ROOT (--yes, $checked)"
        return
    fi
    [[ -r /dev/tty ]] || die /dev/tty "no terminal to ask on; pass --yes to install without asking"
    confirm_key
    step "confirm"
    local answer=""
    printf 'Install %s into %s? [y/N] ' "$HOST" "$ROOT" >&2
    IFS= read -r answer </dev/tty || true
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "$ROOT" "not confirmed; nothing was written"
}

# Without --expect-key, the operator compares the fingerprint with the one the medium's maker gave.
confirm_key() {
    [[ -z $EXPECT_KEY ]] || return 0
    step "confirm the media key (no --expect-key given)"
    {
        printf '    media key:   %s\n' "${KEY%%:*}"
        printf '    fingerprint: %s\n' "$FINGERPRINT"
        printf '    created:     %s\n' "$CREATED"
        printf "install.sh comes from the medium: a forged medium installs the forger's system.\n"
    } >&2
    local answer=""
    printf "Is this, group by group, the fingerprint the medium's maker gave you? [y/N] " >&2
    IFS= read -r answer </dev/tty || true
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] ||
        die media-key.pub "fingerprint not confirmed; nothing was written (get the fingerprint from the medium's maker, pass --expect-key)"
}

# Reassemble split NARs into a cache on the target disk that links to everything else.
prepare_source_cache() {
    SOURCE_CACHE=$VERIFIED/cache
    ((${#SPLIT_NEEDED[@]} > 0)) || return 0
    local dir=$ROOT/$TARGET_CACHE_NAME
    rm -rf -- "$dir"
    TARGET_CACHE=$dir
    mkdir -m 0700 -- "$dir"
    # The checked narinfos, and symlinks to every NAR of the media cache.
    cp -rs -- "$MEDIA/cache/nar" "$dir/nar"
    cp -P -- "$VERIFIED/cache/log" "$VERIFIED/cache/realisations" "$dir/"
    cp -- "$VERIFIED/cache/"*.narinfo "$VERIFIED/cache/nix-cache-info" "$dir/"
    local rel sum got p
    local -A whole=()
    while read -r sum rel; do
        whole[$rel]=$sum
    done <"$SCRATCH/whole"
    for rel in "${SPLIT_NEEDED[@]}"; do
        info "reassembling $rel"
        local -a parts=()
        for p in "$MEDIA/$rel".part[0-9][0-9][0-9]; do
            parts+=("$p")
        done
        # The parts must be part000, part001, ... with no gap.
        local i
        for i in "${!parts[@]}"; do
            [[ ${parts[i]} == "$MEDIA/$rel.part$(printf '%03d' "$i")" ]] ||
                die "$rel.part$(printf '%03d' "$i")" "missing from the media (damaged media)"
        done
        rm -f -- "$dir/${rel#cache/}"
        got=$(cat -- "${parts[@]}" | tee -- "$dir/${rel#cache/}" | sha256sum) ||
            die "$dir/${rel#cache/}" "cannot write the reassembled file (target disk full?)"
        got=${got%% *}
        [[ $got == "${whole[$rel]}" ]] || die "$rel" "sha256 mismatch of the reassembled parts (damaged media)"
    done
    SOURCE_CACHE=$dir
}

copy_closure() {
    step "copying ${#HOST_PATHS[@]} store paths into $ROOT/nix/store"
    prepare_source_cache
    copy_paths --to "local?root=$ROOT"
}

# copy_paths [NIX COPY FLAGS...]: HOST_PATHS from the source cache, with only the media key
# trusted. The .drv files of offline rebuilds go in a second call with --derivation (without it
# Nix 2.8 takes a .drv for its outputs and builds them; with it Nix 2.26 takes an output for its
# .drv).
copy_paths() {
    local -a outs=() drvs=()
    local p
    for p in "${HOST_PATHS[@]}"; do
        if [[ $p == *.drv ]]; then drvs+=("$p"); else outs+=("$p"); fi
    done
    local -a copy=(nix copy "${NIX_TRUST[@]}" --option substitute true --option substituters "file://$SOURCE_CACHE"
        --from "file://$SOURCE_CACHE" "$@")
    ((${#outs[@]} == 0)) || run "${copy[@]}" "${outs[@]}"
    ((${#drvs[@]} == 0)) || run "${copy[@]}" --derivation "${drvs[@]}"
}

set_profile() {
    step "setting the system profile to $TOPLEVEL"
    mkdir -p -- "$ROOT/nix/var/nix/profiles"
    # As nixos-install does: nix-env --store ROOT -p ROOT/nix/var/nix/profiles/system --set PATH
    run nix-env --store "$ROOT" \
        --option trusted-public-keys "$KEY" --option require-sigs true \
        --option substitute true --option substituters "file://$SOURCE_CACHE" \
        -p "$ROOT/nix/var/nix/profiles/system" --set "$TOPLEVEL"
}

install_bootloader() {
    step "installing the boot loader (switch-to-configuration boot)"
    mkdir -p -- "$ROOT/etc"
    touch -- "$ROOT/etc/NIXOS"
    in_target NIXOS_INSTALL_BOOTLOADER=1 "$TOPLEVEL/bin/switch-to-configuration" boot
}

# in_target [VAR=VALUE...] COMMAND ARGS...: COMMAND inside ROOT, with nixos-enter, else in a chroot
# with /dev, /proc and /sys bound in (what nixos-enter would provide).
in_target() {
    local -a vars=()
    while [[ $1 =~ ^[A-Z_][A-Z0-9_]*= ]]; do
        vars+=("$1")
        shift
    done
    if command -v nixos-enter >/dev/null; then
        run env "${vars[@]}" nixos-enter --root "$ROOT" -- "$@"
        return
    fi
    local d
    for d in dev proc sys; do
        mkdir -p -- "$ROOT/$d"
        if ! mountpoint -q -- "$ROOT/$d"; then
            mount --rbind "/$d" "$ROOT/$d" || die "$ROOT/$d" "cannot bind-mount /$d for the chroot"
            CHROOT_MOUNTS+=("$ROOT/$d")
            # Else unmounting inside would reach the live system's own mounts, and `umount -R` leaves
            # $ROOT/sys/fs/cgroup busy on a systemd live system (it then never powers off).
            mount --make-rslave "$ROOT/$d" || die "$ROOT/$d" "cannot make the chroot's bind mount a slave"
        fi
    done
    run env "${vars[@]}" chroot "$ROOT" "$@"
    local i
    for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R "${CHROOT_MOUNTS[i]}" || umount -lR "${CHROOT_MOUNTS[i]}" || warn "cannot unmount ${CHROOT_MOUNTS[i]}"
    done
    CHROOT_MOUNTS=()
}

# Whether git on PATH runs (bash's `command -v` also names a non-executable match).
have_git() {
    local path
    path=$(command -v git) && [[ -f $path && -x $path ]]
}

find_git() {
    if have_git; then
        GIT=(git)
        return
    fi
    local line tool="" path=""
    while IFS=$'\t' read -r line tool path; do
        [[ $line == @tools && $tool == git ]] && break
        path=""
    done <"$TRUSTED/store-paths"
    [[ $path =~ $STORE_PATH_RE ]] || die "$MANIFEST_PATH/store-paths" "no git on this system and no '@tools<TAB>git' path on the media"
    info "no git here: copying $path from the media into the live store"
    run nix copy "${NIX_TRUST[@]}" --option substituters '' --from "file://${SOURCE_CACHE:-$VERIFIED/cache}" "$path"
    [[ -x $path/bin/git ]] || die "$path/bin/git" "not found after copying git from the media"
    GIT=("$path/bin/git")
}

clone_flake() {
    local dir=$ROOT$FLAKE_DIR
    step "putting the flake repository into $dir"
    mkdir -p -- "$dir"
    run cp -a -- "$SCRATCH/flake/." "$dir/"
    local i
    for i in "${!REMOTE_NAMES[@]}"; do
        info "remote ${REMOTE_NAMES[i]}: ${REMOTE_URLS[i]}"
    done
}

configure_nix() {
    step "configuring Nix in the target for offline flake evaluation"
    local lib=$ROOT/var/lib/mediabuilder
    mkdir -p -- "$lib"
    local f
    for f in registry.json manifest.json media-key.pub; do
        install -m 0644 -- "$VERIFIED/$f" "$lib/$f"
    done
    [[ -d $ROOT/root ]] || mkdir -m 0700 -- "$ROOT/root"
    mkdir -p -- "$ROOT/root/.config/nix"
    printf '%s\n' \
        '# Written by mediabuilder install.sh: evaluate the flake offline with the pinned registry.' \
        'experimental-features = nix-command flakes' \
        'flake-registry = /var/lib/mediabuilder/registry.json' >"$ROOT/root/.config/nix/nix.conf"
}

done_summary() {
    if [[ -n $TARGET_CACHE ]]; then
        rm -rf -- "$TARGET_CACHE"
        TARGET_CACHE=""
    fi
    step "done: $HOST installed into $ROOT ($TOPLEVEL, ${#HOST_PATHS[@]} store paths, flake in $FLAKE_DIR${SUBDIR:+/$SUBDIR} at ${REV:0:12})"
    info "rebuild it with: nixos-rebuild switch --flake $FLAKE_DIR${SUBDIR:+/$SUBDIR}#$HOST"
}

# ---------------------------------------------------------------------------------------------
# Disks: the guard, partitioning, formatting and mounting (install.sh --disk, --unattended).
# Nothing here writes before every check passed: plan_disk only reads (lsblk, findmnt, sizes);
# prepare_disk, the first write, runs after the medium, the host, the bundle and the confirmation.
# Until the very end the root file system is labelled nixos-unfinished and the ESP has no label,
# so a disk whose install failed is never mounted as /dev/disk/by-label/nixos (not presented as
# installed); finish_disk labels them once everything is written and unmounted. A disko layout
# cannot be labelled so: a failed disko install has its partition table wiped instead.

readonly ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
readonly BIOS_BOOT_TYPE=21686148-6449-6E6F-744E-656564454649
readonly LINUX_TYPE=0FC63DAF-8483-4772-8E79-3D69D8477DE4
readonly ROOT_LABEL_UNFINISHED=nixos-unfinished
readonly MIB=$((1024 * 1024))

DISK_REQ=""         # --disk or the install record: a device path or "auto"
LAYOUT=""           # uefi, bios or disko
UNATTENDED=0
DISK=""             # the chosen whole disk, canonical (/dev/vda)
DISK_DESC=""        # "/dev/vda: QEMU HARDDISK, 8589934592 bytes, serial ..."
DISKO_EXE=""        # the host's disko program (layout disko)
ESP_PART=""         # the partitions' block devices once made
ROOT_PART=""
DISK_WRITTEN=0      # set once prepare_disk wrote the disk: cleanup then marks it not installed
DISK_DONE=0
DISK_MOUNTS=()      # what prepare_disk mounted, in order
PART_LOOPS=()       # loop devices attached to partitions (no partition nodes from the kernel)

# The signed install record ($TRUSTED/install): the unattended host and disk, each host's
# layout (and disko program). With --unattended, HOST and DISK_REQ come from it.
declare -A REC_LAYOUT=() REC_DISKO=() REC_DISKO_DEVICES=()
read_install_record() {
    local rec=$TRUSTED/install key a b c rec_host="" rec_disk=""
    if [[ ! -f $rec ]]; then
        ((!UNATTENDED)) || die "$MANIFEST_PATH" "has no install record: this medium was built without --unattended HOST --install-disk DISK"
        return 0
    fi
    while IFS=$'\t' read -r key a b c || [[ -n $key ]]; do
        case $key in
            unattended) rec_host=$a ;;
            disk) rec_disk=$a ;;
            host) REC_LAYOUT[$a]=$b REC_DISKO[$a]=$c ;;
            disko-device)
                [[ $b =~ ^/dev/[A-Za-z0-9_][A-Za-z0-9_.:/-]*$ && /$b/ != */../* ]] ||
                    die "$MANIFEST_PATH/install" "disko device '$b' of host $a is not a device path"
                REC_DISKO_DEVICES[$a]+="$b "
                ;;
            '') ;;
            *) die "$MANIFEST_PATH/install" "unknown line '$key' (media made by an incompatible mediabuilder)" ;;
        esac
    done <"$rec"
    ((UNATTENDED)) || return 0
    [[ -n $rec_host && -n $rec_disk ]] ||
        die "$MANIFEST_PATH/install" "records no unattended host and disk: this medium was built without --unattended HOST --install-disk DISK"
    check_cmdline_host "$rec_host"
    HOST=$rec_host DISK_REQ=$rec_disk
    info "unattended install record: $HOST onto $DISK_REQ"
}

# The layout: --layout, else the host's in the record, else uefi; disko needs the host's program.
choose_layout() {
    local recorded=${REC_LAYOUT[$HOST]:-}
    [[ -n $LAYOUT ]] || LAYOUT=${recorded:-uefi}
    case $LAYOUT in
        uefi | bios) ;;
        disko)
            DISKO_EXE=${REC_DISKO[$HOST]:-}
            [[ $recorded == disko && $DISKO_EXE =~ ^/nix/store/[0-9a-df-np-sv-z]{32}-[^/]+(/bin/[A-Za-z0-9+._-]+)?$ ]] ||
                die --layout "disko: the medium has no disko script for host $HOST (its layout is ${recorded:-not recorded})"
            local p found=0
            for p in "${HOST_PATHS[@]}"; do
                [[ $p == "${DISKO_EXE%/bin/*}" ]] && found=1
            done
            ((found)) || die "$MANIFEST_PATH/install" "the disko script $DISKO_EXE is not in the paths of $HOST (forged media)"
            ;;
        *) die "$MANIFEST_PATH/install" "layout '$LAYOUT' is not uefi, bios or disko" ;;
    esac
}

# The kernel line's mediabuilder.host= (the menu entry that booted) must be the record's host.
check_cmdline_host() {
    local cmdline=${INSTALL_SH_CMDLINE:-/proc/cmdline} word line=""
    local -a words=()
    [[ -r $cmdline ]] || return 0
    IFS= read -r line <"$cmdline" || true
    read -r -a words <<<"$line"
    for word in "${words[@]}"; do
        if [[ $word == mediabuilder.host=* && ${word#*=} != "$1" ]]; then
            die "$cmdline" "the boot entry installs ${word#*=}, but this medium's unattended install is $1 (remastered menus edited?); nothing was written"
        fi
    done
}

# lsblk -P: one device a line, KEY="value" pairs (quotes and controls escaped as \xHH, so a value
# never holds a quote: a hostile model or serial cannot break out). Parsed, never eval'd.
declare -A LSBLK_ROW=()
parse_lsblk_row() {
    local rest=$1
    LSBLK_ROW=()
    while [[ $rest =~ ^[[:space:]]*([A-Z:-]+)=\"([^\"]*)\"(.*)$ ]]; do
        LSBLK_ROW[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
        rest=${BASH_REMATCH[3]}
    done
}

# The devices the guard looks at: all of them, or with MEDIABUILDER_DISKS only those listed
# (the tests' loop devices, which then count as whole disks; docs/installer.md).
list_devices() {
    local -a only=()
    [[ -z ${MEDIABUILDER_DISKS:-} ]] || read -r -a only <<<"$MEDIABUILDER_DISKS"
    lsblk -P -b -o NAME,PATH,PKNAME,TYPE,RM,RO,SIZE,MODEL,SERIAL,MOUNTPOINT -- "${only[@]}" 2>"$SCRATCH/lsblk.err" ||
        die lsblk "cannot list the disks: $(head -n1 "$SCRATCH/lsblk.err")"
}

# The whole disk under a block device (itself when it is one).
whole_disk_of() {
    local dev=$1 parent
    while parent=$(lsblk -n -d -o PKNAME -- "$dev" 2>/dev/null) && [[ -n ${parent// /} ]]; do
        dev=/dev/${parent// /}
    done
    printf '%s\n' "$dev"
}

# The candidates (whole, internal, writable, unused disks) into CANDIDATES and their
# descriptions into CANDIDATE_DESC; every other disk with why not into EXCLUDED.
CANDIDATES=()
CANDIDATE_DESC=()
EXCLUDED=()
find_candidates() {
    local -A type=() rm=() ro=() size=() model=() serial=() path=() busy=() parent=()
    local line name medium="" src n
    while IFS= read -r line; do
        parse_lsblk_row "$line"
        name=${LSBLK_ROW[NAME]:-}
        [[ -n $name ]] || continue
        type[$name]=${LSBLK_ROW[TYPE]:-} rm[$name]=${LSBLK_ROW[RM]:-0} ro[$name]=${LSBLK_ROW[RO]:-0}
        size[$name]=${LSBLK_ROW[SIZE]:-0}
        [[ ${size[$name]} =~ ^[0-9]+$ ]] || size[$name]=0 # used in arithmetic: digits only
        model[$name]=${LSBLK_ROW[MODEL]:-} serial[$name]=${LSBLK_ROW[SERIAL]:-}
        path[$name]=${LSBLK_ROW[PATH]:-/dev/$name} parent[$name]=${LSBLK_ROW[PKNAME]:-}
        [[ -z ${LSBLK_ROW[MOUNTPOINT]:-} ]] || busy[$name]=${LSBLK_ROW[MOUNTPOINT]}
    done < <(list_devices)
    # A mounted partition (or holder) makes its whole disk busy.
    for name in "${!busy[@]}"; do
        n=$name
        while [[ -n ${parent[$n]:-} && -n ${type[${parent[$n]}]:-} ]]; do
            n=${parent[$n]}
        done
        [[ $n == "$name" || -n ${busy[$n]:-} ]] || busy[$n]="${busy[$name]} (on ${path[$name]})"
    done
    # The device that holds the medium (/iso), whether or not lsblk shows it mounted.
    if src=$(findmnt -n -o SOURCE -T "$MEDIA" 2>/dev/null) && [[ $src == /dev/* ]]; then
        medium=$(whole_disk_of "${src%%\[*}")
        medium=${medium#/dev/}
    fi
    local why desc kinds=disk
    [[ -z ${MEDIABUILDER_DISKS:-} ]] || kinds="disk loop"
    for name in $(printf '%s\n' "${!type[@]}" | sort); do
        why=""
        if [[ " $kinds " != *" ${type[$name]} "* ]]; then
            continue # partitions, cdroms, loop devices, device-mapper: never whole disks
        elif [[ $name == "$medium" ]]; then
            why="holds the boot medium ($MEDIA)"
        elif [[ ${rm[$name]} == 1 ]]; then
            why="removable"
        elif [[ ${ro[$name]} == 1 ]]; then
            why="read-only"
        elif [[ -n ${busy[$name]:-} ]]; then
            why="in use: mounted at ${busy[$name]}"
        elif [[ -z ${MEDIABUILDER_DISKS:-} && $name =~ ^(loop|sr|zram|ram|fd|nbd) ]]; then
            why="not a disk ($name)"
        elif ((${size[$name]} == 0)); then
            why="empty (0 bytes)"
        fi
        desc="${path[$name]}: ${model[$name]:-unknown model}, $(human_size "${size[$name]}") (${size[$name]} bytes), serial ${serial[$name]:-none}"
        if [[ -n $why ]]; then
            EXCLUDED+=("$desc: not a candidate, $why")
        else
            CANDIDATES+=("${path[$name]}")
            CANDIDATE_DESC+=("$desc")
        fi
    done
}

human_size() {
    local b=$1 unit=B v
    for v in KiB MiB GiB TiB; do
        ((b >= 1024 * 10)) || break
        b=$((b / 1024)) unit=$v
    done
    printf '%s %s' "$b" "$unit"
}

# The disk: the single candidate for auto, else the one named, which must be a candidate. Reads only.
plan_disk() {
    step "choosing the target disk (${DISK_REQ}, layout $LAYOUT)"
    find_candidates
    if [[ $LAYOUT == disko && -n ${REC_DISKO_DEVICES[$HOST]:-} ]]; then
        plan_disko_disks
        return
    fi
    local i listed=""
    for i in "${!CANDIDATE_DESC[@]}"; do
        listed+="${listed:+; }${CANDIDATE_DESC[i]}"
    done
    if [[ $DISK_REQ == auto ]]; then
        if ((${#CANDIDATES[@]} == 0)); then
            local others="" e
            for e in "${EXCLUDED[@]}"; do others+="${others:+; }$e"; done
            die "--disk auto" "no internal disk to install onto (${others:-no disks at all}); nothing was written"
        fi
        ((${#CANDIDATES[@]} == 1)) ||
            die "--disk auto" "${#CANDIDATES[@]} disks could be the target, name one with --disk: $listed; nothing was written"
        DISK=${CANDIDATES[0]} DISK_DESC=${CANDIDATE_DESC[0]}
    else
        local want e
        want=$(readlink -f -- "$DISK_REQ") || want=""
        [[ -n $want && -b $want ]] || die "$DISK_REQ" "no such block device; nothing was written"
        for i in "${!CANDIDATES[@]}"; do
            [[ $(readlink -f -- "${CANDIDATES[i]}") == "$want" ]] && DISK=${CANDIDATES[i]} DISK_DESC=${CANDIDATE_DESC[i]}
        done
        if [[ -z $DISK ]]; then
            for e in "${EXCLUDED[@]}"; do
                [[ $e == "$want: "* ]] && die "$DISK_REQ" "${e#*: not a candidate, } ($e); nothing was written"
            done
            die "$DISK_REQ" "not a whole disk (a partition or another device?); the candidates: ${listed:-none}; nothing was written"
        fi
    fi
    info "target: $DISK_DESC"
    check_disk_space
}

# A disko host whose configuration names its disks: the script erases those, so every one must
# be a candidate, and the disk asked for (auto: the first of them) one of them. Reads only.
DISKO_DEVICES=()
plan_disko_disks() {
    local dev want i e ok named=""
    read -r -a DISKO_DEVICES <<<"${REC_DISKO_DEVICES[$HOST]}"
    for dev in "${DISKO_DEVICES[@]}"; do
        want=$(readlink -f -- "$dev") || want=""
        [[ -n $want && -b $want ]] ||
            die "$dev" "host $HOST's disko configuration erases $dev, which is no block device here; nothing was written"
        ok=0
        for i in "${!CANDIDATES[@]}"; do
            [[ $(readlink -f -- "${CANDIDATES[i]}") == "$want" ]] && ok=1 && info "disko erases: ${CANDIDATE_DESC[i]}"
        done
        if ((!ok)); then
            for e in "${EXCLUDED[@]}"; do
                [[ $e == "$want: "* ]] &&
                    die "$dev" "host $HOST's disko configuration erases $dev, which is ${e#*: not a candidate, } ($e); nothing was written"
            done
            die "$dev" "host $HOST's disko configuration erases $dev, which is not a whole disk here; nothing was written"
        fi
        [[ $DISK_REQ == auto || $(readlink -f -- "$DISK_REQ") != "$want" ]] || named=$dev
    done
    [[ $DISK_REQ == auto || -n $named ]] ||
        die "$DISK_REQ" "host $HOST's disko configuration erases ${DISKO_DEVICES[*]}, not $DISK_REQ; nothing was written"
    DISK=${named:-${DISKO_DEVICES[0]}}
    DISK_DESC="${DISKO_DEVICES[*]} (host $HOST's disko configuration)"
    info "target: $DISK_DESC"
}

# The root partition must hold the host's store plus 10% (ext4 keeps about 5% for itself).
check_disk_space() {
    [[ $LAYOUT != disko ]] || return 0
    local bytes reserve=$((2 * MIB)) need root
    bytes=$(blockdev --getsize64 "$DISK") || die "$DISK" "cannot read its size"
    [[ $LAYOUT == uefi ]] && reserve=$((reserve + 512 * MIB))
    [[ $LAYOUT == bios ]] && reserve=$((reserve + MIB))
    need=$((NAR_BYTES + NAR_BYTES / 10 + SPLIT_BYTES))
    root=$(((bytes - reserve) * 95 / 100))
    ((bytes > reserve && root >= need)) ||
        die "$DISK" "is $bytes bytes: its root partition would hold about $root, $HOST needs $need (its store plus 10%); nothing was written"
}

# Interactive: the operator types the disk's name; --yes skips that only for a disk named by path.
confirm_disk() {
    if ((UNATTENDED)); then
        step "unattended install of $HOST onto $DISK ($LAYOUT): the disk will be erased"
        return
    fi
    if ((YES)); then
        [[ $DISK_REQ != auto ]] || die "--disk auto" "not with --yes: name the disk (--disk $DISK) or confirm it on the terminal"
        step "erasing $DISK for $HOST (--yes): $DISK_DESC"
        return
    fi
    [[ -r /dev/tty ]] || die /dev/tty "no terminal to confirm the disk on; pass --yes --disk $DISK"
    {
        printf 'EVERYTHING ON THIS DISK WILL BE ERASED:\n'
        printf '    %s\n' "$DISK_DESC"
        printf '    layout %s, then %s installed onto it\n' "$LAYOUT" "$HOST"
        printf 'Type the disk'"'"'s name (%s) to erase it, anything else to stop: ' "$DISK"
    } >&2
    local answer=""
    IFS= read -r answer </dev/tty || true
    [[ $answer == "$DISK" ]] || die "$DISK" "not confirmed ('$answer' is not $DISK); nothing was written"
}

# PART_DEV: the block device of partition N of DISK: the kernel's node, or, when it makes none
# (a loop device without partition scanning, as in containers), a loop device over its sectors.
PART_DEV=""
partition_device() {
    local n=$1 node tries line start size ss dev
    if [[ $DISK =~ [0-9]$ ]]; then node=${DISK}p$n; else node=$DISK$n; fi
    for ((tries = 0; tries < 50; tries++)); do
        if [[ -b $node ]]; then
            PART_DEV=$node
            return
        fi
        ((tries == 0)) && { partx -u -- "$DISK" 2>/dev/null || true; }
        ((tries == 0)) && command -v udevadm >/dev/null && { udevadm settle 2>/dev/null || true; }
        sleep 0.1
    done
    line=$(sfdisk --dump -- "$DISK" | grep -E "^[^ ]*[^0-9]$n : ") || die "$DISK" "has no partition $n after partitioning"
    [[ $line =~ start=\ *([0-9]+),\ size=\ *([0-9]+) ]] || die "$DISK" "cannot read partition $n: '$line'"
    start=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
    ss=$(blockdev --getss "$DISK") || die "$DISK" "cannot read its sector size"
    dev=$(losetup --find --show --offset $((start * ss)) --sizelimit $((size * ss)) -- "$DISK") ||
        die "$DISK" "no partition device $node from the kernel, and cannot attach a loop device to partition $n"
    PART_LOOPS+=("$dev")
    info "no $node from the kernel: partition $n attached as $dev"
    PART_DEV=$dev
}

# The first write: partition, format, mount at ROOT.
prepare_disk() {
    DISK_WRITTEN=1
    if [[ $LAYOUT == disko ]]; then
        prepare_disko
        return
    fi
    partition_disk
    format_disk
    mount_disk
}

partition_disk() {
    step "partitioning $DISK ($LAYOUT: GPT, $([[ $LAYOUT == uefi ]] && echo 'ESP 512 MiB' || echo 'BIOS boot 1 MiB') + root)"
    run wipefs --all --quiet -- "$DISK"
    local first
    if [[ $LAYOUT == uefi ]]; then
        first="size=512MiB, type=$ESP_TYPE, name=boot"
    else
        first="size=1MiB, type=$BIOS_BOOT_TYPE, name=bios-boot"
    fi
    printf 'label: gpt\n%s\ntype=%s, name=nixos\n' "$first" "$LINUX_TYPE" |
        sfdisk --quiet --wipe always --wipe-partitions always -- "$DISK" >"$SCRATCH/sfdisk.log" 2>&1 ||
        die "$DISK" "sfdisk failed: $(tail -n1 "$SCRATCH/sfdisk.log")"
    if [[ $LAYOUT == uefi ]]; then
        partition_device 1
        ESP_PART=$PART_DEV
    fi
    partition_device 2
    ROOT_PART=$PART_DEV
}

format_disk() {
    step "formatting: ext4 on $ROOT_PART${ESP_PART:+, vfat on $ESP_PART}"
    run mkfs.ext4 -q -F -L "$ROOT_LABEL_UNFINISHED" "$ROOT_PART"
    if [[ -n $ESP_PART ]]; then
        # Clusters small enough for FAT32's minimum of 65525 (mkfs.fat's own choice leaves 32224
        # on 512 MiB, which it warns some firmware may not read): a power of two, at least one.
        local ss per=1 bytes
        ss=$(blockdev --getss "$ESP_PART") || die "$ESP_PART" "cannot read its sector size"
        bytes=$(blockdev --getsize64 "$ESP_PART") || die "$ESP_PART" "cannot read its size"
        while ((per * 2 * 70000 <= bytes / ss)); do per=$((per * 2)); done
        run mkfs.fat -F 32 -s "$per" "$ESP_PART" >/dev/null
    fi
}

mount_disk() {
    step "mounting $ROOT_PART at $ROOT${ESP_PART:+ and $ESP_PART at $ROOT/boot}"
    mkdir -p -- "$ROOT"
    run mount -- "$ROOT_PART" "$ROOT"
    DISK_MOUNTS+=("$ROOT")
    chmod 0755 -- "$ROOT"
    if [[ -n $ESP_PART ]]; then
        mkdir -p -- "$ROOT/boot"
        run mount -o umask=077 -- "$ESP_PART" "$ROOT/boot"
        DISK_MOUNTS+=("$ROOT/boot")
    fi
}

# The host's disko script, from the media cache (signed, in the host's closure): it erases,
# partitions, formats and mounts at /mnt what the host's configuration names.
prepare_disko() {
    local script=${DISKO_EXE%/bin/*}
    step "running the host's disko script $DISKO_EXE"
    [[ $ROOT == /mnt ]] || die --root "disko mounts at /mnt: leave --root out"
    run nix copy "${NIX_TRUST[@]}" --option substituters '' --from "file://$VERIFIED/cache" "$script"
    run "$DISKO_EXE"
    DISK_MOUNTS+=("$ROOT")
}

# Everything unmounted, then the labels that make the disk bootable: the last write.
finish_disk() {
    step "unmounting $ROOT and labelling the file systems"
    sync
    run umount -R -- "$ROOT"
    DISK_MOUNTS=()
    [[ $LAYOUT == disko ]] || label_disk
    detach_partition_loops
    DISK_DONE=1
}

# The labels the installed system mounts by (/dev/disk/by-label/nixos, .../boot).
label_disk() {
    run e2label "$ROOT_PART" nixos
    [[ -z $ESP_PART ]] || run fatlabel "$ESP_PART" boot
}

detach_partition_loops() {
    local i
    for ((i = ${#PART_LOOPS[@]} - 1; i >= 0; i--)); do
        losetup -d "${PART_LOOPS[i]}" 2>/dev/null || true
    done
    PART_LOOPS=()
}

# On failure (from cleanup): unmount what was mounted; a disko disk gets its partition table wiped.
abandon_disk() {
    local i
    for ((i = ${#DISK_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -R -- "${DISK_MOUNTS[i]}" 2>/dev/null || umount -lR -- "${DISK_MOUNTS[i]}" 2>/dev/null || true
    done
    DISK_MOUNTS=()
    detach_partition_loops
    if ((DISK_WRITTEN && !DISK_DONE)) && [[ -n $DISK ]]; then
        if [[ $LAYOUT == disko ]]; then
            local dev
            for dev in "${DISKO_DEVICES[@]:-$DISK}"; do
                wipefs --all --quiet -- "$dev" 2>/dev/null || true
                printf '%s: %s: the install failed: its partition table was wiped (not installed)\n' "$PROG" "$dev" >&2
            done
        else
            printf '%s: %s: the install failed: its root file system stays labelled %s (not installed)\n' \
                "$PROG" "$DISK" "$ROOT_LABEL_UNFINISHED" >&2
        fi
    fi
}

# ---------------------------------------------------------------------------------------------
# Delta media and upgrades (install.sh --upgrade): an installed machine brought to a newer medium.
# What the machine was installed from is kept in $ROOT/var/lib/mediabuilder (the STATE): the
# medium's manifest.json and key, and `installed` (host, toplevel, flake revision, manifest).
# A medium is newer when its flake revision descends from the installed one in the bundle's
# history (creation times are not compared: reproducible media carry fixed ones).

STATE=""
INSTALLED_HOST=""
INSTALLED_REV=""
BASE_NEEDED=()      # a delta medium's paths for this host that the target must already hold

# The store of ROOT for Nix: the running system's own with ROOT "/" (upgrades only).
target_store() {
    if [[ -z $ROOT ]]; then
        printf 'local\n'
    else
        printf 'local?root=%s\n' "$ROOT"
    fi
}

# A delta medium carries only what its base lacked: it upgrades, it cannot install.
refuse_delta_install() {
    [[ -f $TRUSTED/base ]] || return 0
    die manifest.json "this is a delta medium (only what changed since an older medium): it upgrades machines installed from that one (install.sh --upgrade) and cannot install a new one; use a full medium"
}

# On a delta medium, the host's paths that its signed `base` lists are not on the medium: they
# move from HOST_PATHS to BASE_NEEDED (check_base then demands them valid in the target's store).
split_base_paths() {
    [[ -f $TRUSTED/base ]] || return 0
    local key value p
    local -A relied=()
    while read -r key value; do
        [[ $key == path ]] || continue
        [[ $value =~ $STORE_PATH_RE ]] || die "$MANIFEST_PATH/base" "'$value' is not a store path"
        relied[$value]=1
    done <"$TRUSTED/base"
    local -a shipped=()
    for p in "${HOST_PATHS[@]}"; do
        if [[ -n ${relied[$p]:-} ]]; then
            BASE_NEEDED+=("$p")
        else
            shipped+=("$p")
        fi
    done
    HOST_PATHS=("${shipped[@]}")
    info "delta medium: ${#HOST_PATHS[@]} of these on it, ${#BASE_NEEDED[@]} to be in the target's store already"
}

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

# The installed host, and a medium that has it (media for another host are refused).
choose_upgrade_host() {
    if [[ -z $HOST ]]; then
        [[ -n $INSTALLED_HOST ]] || die --host "$STATE/installed does not name this machine's host; pass --host NAME"
        HOST=$INSTALLED_HOST
    elif [[ -n $INSTALLED_HOST && $HOST != "$INSTALLED_HOST" ]]; then
        die --host "this machine is $INSTALLED_HOST, not $HOST (an upgrade keeps the host; reinstall to change it)"
    fi
    local name rest found=0 listed=""
    while IFS=$'\t' read -r name rest; do
        [[ $name == "$HOST" ]] && found=1
        listed+=${listed:+ }$name
    done <"$TRUSTED/hosts"
    ((found)) || die "$MEDIA" "is media for another host: it has no $HOST (it has: $listed); nothing was written"
}

check_upgrade_target() {
    step "checking the installed system in ${ROOT:-/}"
    ((DRY_RUN || EUID == 0)) || die "${ROOT:-/}" "upgrading needs root; run this script as root (sudo)"
    local need=0 size avail
    while IFS= read -r size; do
        need=$((need + size))
    done < <(tr '\n' '\0' <"$SCRATCH/urls" | xargs -0 -r sed -n 's/^NarSize: //p')
    avail=$(df -B1 --output=avail -- "${ROOT:-/}/nix/store" | tail -n1 | tr -d '[:space:]')
    [[ $avail =~ ^[0-9]+$ ]] || die "${ROOT:-/}" "cannot read the free space (df printed '$avail')"
    ((avail >= need + need / 10)) ||
        die "${ROOT:-/}/nix/store" "only $avail bytes free, the upgrade needs $((need + need / 10)) (new paths plus 10%); collect garbage first"
    local dir=$ROOT$FLAKE_DIR
    if [[ -e $dir || -L $dir ]]; then
        [[ -d $dir/.git && ! -L $dir ]] ||
            die "$dir" "is not a git repository; move it away or pass another --flake-dir"
    fi
}

# The medium's revision must descend from the installed one; the same one is already installed.
check_newer() {
    local -a g=("${GIT[@]}" -C "$SCRATCH/flake")
    if [[ $REV == "$INSTALLED_REV" ]]; then
        step "already up to date: $HOST was installed from ${REV:0:12}, this medium's revision; nothing to do"
        exit 0
    fi
    if ! "${g[@]}" cat-file -e "$INSTALLED_REV^{commit}" 2>/dev/null ||
        ! "${g[@]}" merge-base --is-ancestor "$INSTALLED_REV" "$REV" 2>/dev/null; then
        die "$MEDIA" "its revision ${REV:0:12} does not descend from ${INSTALLED_REV:0:12}, the installed one (older or unrelated media: refused; nothing was written)"
    fi
    info "${REV:0:12} descends from the installed ${INSTALLED_REV:0:12}"
}

# A delta medium: every path it relies on must be valid in the target's store.
check_base() {
    ((${#BASE_NEEDED[@]} > 0)) || return 0
    step "checking the base: ${#BASE_NEEDED[@]} paths the delta medium relies on"
    local invalid
    invalid=$(nix-store --store "$(target_store)" --check-validity --print-invalid "${BASE_NEEDED[@]}" 2>"$SCRATCH/validity.err") ||
        die "${ROOT:-/}/nix/store" "nix-store --check-validity failed: $(tail -n1 "$SCRATCH/validity.err")"
    if [[ -n $invalid ]]; then
        die "$(head -n1 <<<"$invalid")" "not in ${ROOT:-/}/nix/store, nor $(($(wc -l <<<"$invalid") - 1)) more: this machine lacks the base of the delta medium (use a full medium, or one built with --since this machine's /var/lib/mediabuilder)"
    fi
    info "all present"
}

confirm_upgrade() {
    local action=switch
    ((BOOT)) && action=boot
    if ((DRY_RUN)); then
        step "dry run: every check passed; the plan"
        {
            printf '    host:        %s (%s -> %s)\n' "$HOST" "${INSTALLED_REV:0:12}" "${REV:0:12}"
            printf '    toplevel:    %s\n' "$TOPLEVEL"
            printf '    would run:   nix copy --no-recursive --from file://%s --to %s <%s paths>\n' "$MEDIA/cache" "$(target_store)" "${#HOST_PATHS[@]}"
            printf '                 git fetch the bundle into %s%s refs/remotes/media/*, fast-forward %s\n' "$ROOT" "$FLAKE_DIR" "${BRANCH:-HEAD}"
            printf '                 nix-env -p %s/nix/var/nix/profiles/system --set %s\n' "$ROOT" "$TOPLEVEL"
            printf '                 %s/bin/switch-to-configuration %s\n' "$TOPLEVEL" "$action"
        } >&2
        exit 0
    fi
    if ((YES)); then
        step "upgrading $HOST in ${ROOT:-/} to ${REV:0:12} (--yes)"
        return
    fi
    [[ -r /dev/tty ]] || die /dev/tty "no terminal to ask on; pass --yes to upgrade without asking"
    confirm_key
    local answer=""
    printf 'Upgrade %s in %s to %s? [y/N] ' "$HOST" "${ROOT:-/}" "${REV:0:12}" >&2
    IFS= read -r answer </dev/tty || true
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "${ROOT:-/}" "not confirmed; nothing was written"
}

# Only the paths the target lacks are copied (--no-recursive: the list is the closure, less, on a
# delta medium, what check_base found in the target).
upgrade_copy() {
    step "copying ${#HOST_PATHS[@]} store paths into ${ROOT:-}/nix/store (those it lacks)"
    prepare_source_cache
    copy_paths --no-recursive --to "$(target_store)"
}

# The bundle's branches into refs/remotes/media/*; the local branch fast-forwarded when it has
# nothing the medium lacks, else left alone with a hint how to merge.
upgrade_flake() {
    local dir=$ROOT$FLAKE_DIR
    if [[ ! -e $dir ]]; then
        clone_flake
        return
    fi
    step "bringing $dir forward to ${REV:0:12} (the medium's branches in refs/remotes/media/)"
    local -a g=("${GIT[@]}" -C "$dir")
    run "${g[@]}" fetch --quiet --no-tags -- "$SCRATCH/flake" '+refs/heads/*:refs/remotes/media/*' '+HEAD:refs/remotes/media/HEAD'
    local ref=HEAD cur head
    [[ -n $BRANCH ]] && ref=refs/heads/$BRANCH
    if ! cur=$("${g[@]}" rev-parse -q --verify "$ref^{commit}"); then
        run "${g[@]}" branch --quiet -- "$BRANCH" "$REV"
        info "created branch $BRANCH at ${REV:0:12}"
        return
    fi
    head=$("${g[@]}" symbolic-ref -q HEAD || printf 'HEAD')
    if [[ $cur == "$REV" ]]; then
        info "${BRANCH:-HEAD} is already at ${REV:0:12}"
    elif ! "${g[@]}" merge-base --is-ancestor "$cur" "$REV"; then
        info "${BRANCH:-HEAD} has commits the medium does not (${cur:0:12}): left as it is; to merge:"
        info "  git -C $dir merge media/${BRANCH:-HEAD}"
    elif [[ -n $BRANCH && $head != "$ref" ]]; then
        run "${g[@]}" update-ref "$ref" "$REV" "$cur"
        info "fast-forwarded $BRANCH to ${REV:0:12} (not checked out)"
    elif "${g[@]}" merge --ff-only --quiet "$REV" 2>"$SCRATCH/git.log"; then
        info "fast-forwarded ${BRANCH:-HEAD} to ${REV:0:12}"
    else
        warn "cannot fast-forward the checkout of $dir ($(tail -n1 "$SCRATCH/git.log")); left as it is: git -C $dir merge --ff-only media/${BRANCH:-HEAD}"
    fi
}

upgrade_registry() {
    step "refreshing the pinned registry (the input sources came with the closure)"
    mkdir -p -- "$STATE"
    install -m 0644 -- "$VERIFIED/registry.json" "$STATE/.registry.json.new"
    mv -f -- "$STATE/.registry.json.new" "$STATE/registry.json"
}

# The new generation: nix-env renames the profile link atomically, the last step that decides
# what boots. A profile already at TOPLEVEL (an upgrade killed after it) gets no second one.
upgrade_profile() {
    local profile=$ROOT/nix/var/nix/profiles/system generation current
    # system -> system-N-link -> /nix/store/...-nixos-system-...: read link by link, inside ROOT.
    generation=$(readlink -- "$profile") || die "$profile" "not a symbolic link"
    current=$(readlink -- "$ROOT/nix/var/nix/profiles/${generation##*/}" || true)
    if [[ $current == "$TOPLEVEL" ]]; then
        info "the system profile already points at $TOPLEVEL"
        return
    fi
    step "new system generation $TOPLEVEL (the old one stays for rollback)"
    run nix-env --store "$(target_store)" \
        --option trusted-public-keys "$KEY" --option require-sigs true --option substituters '' \
        -p "$profile" --set "$TOPLEVEL"
}

upgrade_switch() {
    local action=switch
    ((BOOT)) && action=boot
    step "activating it (switch-to-configuration $action)"
    if [[ -z $ROOT ]]; then
        run "$TOPLEVEL/bin/switch-to-configuration" "$action"
    else
        in_target "$TOPLEVEL/bin/switch-to-configuration" "$action"
    fi
}

# What the machine now runs from: written at install and after an upgrade, each file renamed
# into place, `installed` last.
record_install() {
    local f sum
    STATE=$ROOT/var/lib/mediabuilder
    mkdir -p -- "$STATE"
    for f in manifest.json media-key.pub; do
        install -m 0644 -- "$VERIFIED/$f" "$STATE/.$f.new"
        mv -f -- "$STATE/.$f.new" "$STATE/$f"
    done
    sum=$(sha256sum <"$VERIFIED/manifest.json")
    printf 'host\t%s\ntoplevel\t%s\nrev\t%s\nflake-dir\t%s\nmanifest-sha256\t%s\nmanifest-storepath\t%s\n' \
        "$HOST" "$TOPLEVEL" "$REV" "$FLAKE_DIR" "${sum%% *}" "$MANIFEST_PATH" >"$STATE/.installed.new"
    mv -f -- "$STATE/.installed.new" "$STATE/installed"
}

# ---------------------------------------------------------------------------------------------
# Offline rebuilds (docs/rebuild.md): a medium built with --rebuild config|full lists, among each
# host's store paths, what the machine needs to build a changed configuration (.drv files,
# builders, build inputs). They were copied and checked with the rest (only the media key
# trusted); here they get a GC root, so that collecting garbage keeps them (an upgrade replaces
# the root: the earlier medium's build inputs may then go), and root's Nix is told to build with
# no substituters. The system itself must not want one: mediabuilder refuses a nix.conf that does.

REBUILD=none

read_rebuild_level() {
    local level
    level=$(sed -n -E 's/^  "rebuild": "([a-z]+)",?$/\1/p' "$TRUSTED/manifest.json")
    case ${level:-none} in
        none | config | full) REBUILD=${level:-none} ;;
        *) die "$MANIFEST_PATH/manifest.json" "unknown rebuild level '$level' (media made by an incompatible mediabuilder)" ;;
    esac
}

configure_rebuild() {
    local roots=$ROOT/nix/var/nix/gcroots/mediabuilder-rebuild p
    read_rebuild_level
    if [[ $REBUILD == none ]]; then
        rm -rf -- "$roots" # an earlier medium's build inputs: collectable from now on
        return 0
    fi
    step "keeping the build inputs for offline rebuilds ($REBUILD) and building with no substituters"
    rm -rf -- "$roots.new"
    mkdir -p -- "$roots.new"
    for p in "${HOST_PATHS[@]}" "${BASE_NEEDED[@]}"; do
        ln -sfn -- "$p" "$roots.new/${p#/nix/store/}"
    done
    rm -rf -- "$roots"
    mv -- "$roots.new" "$roots"
    local conf=$ROOT/root/.config/nix/nix.conf
    [[ -d $ROOT/root ]] || mkdir -m 0700 -- "$ROOT/root"
    mkdir -p -- "${conf%/*}"
    if ! grep -qsx 'substituters =' -- "$conf"; then
        printf '%s\n' '# Written by mediabuilder install.sh: offline rebuilds build here, from the store.' \
            'substituters =' >>"$conf"
    fi
    info "$((${#HOST_PATHS[@]} + ${#BASE_NEEDED[@]})) store paths rooted in $roots; rebuild with: nixos-rebuild switch --flake $FLAKE_DIR${SUBDIR:+/$SUBDIR}#$HOST"
}

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
