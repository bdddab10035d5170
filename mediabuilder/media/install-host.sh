# shellcheck shell=bash
# install-host.sh - a part of install.sh (mediabuilder): the host installed into ROOT.
# Not a script to run: install.sh sources it from its checked copy once that copy matched the
# signed sha256sums and the sha256 install.sh carries for it (load_parts), and calls these
# functions from its main.

# ---------------------------------------------------------------------------------------------
# The host: chosen, the target and the flake repository checked, confirmed; then the closure copied,
# the system profile set, the boot loader installed, the flake repository and Nix put in place.

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
            read_rebuild_level
            if [[ $REBUILD != none ]]; then
                printf '                 offline rebuilds (%s): root the %s store paths (closure, flake inputs, tools, build inputs) in %s; write "substituters =" into %s\n' \
                    "$REBUILD" "${#HOST_PATHS[@]}" "$ROOT/nix/var/nix/gcroots/mediabuilder-rebuild" "$ROOT/root/.config/nix/nix.conf"
            fi
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
