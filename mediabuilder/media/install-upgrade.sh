# shellcheck shell=bash
# install-upgrade.sh - a part of install.sh (mediabuilder): delta media and upgrades (--upgrade).
# Not a script to run: install.sh sources it from its checked copy once that copy matched the
# signed sha256sums and the sha256 install.sh carries for it (load_parts), and calls these
# functions from its main.

# ---------------------------------------------------------------------------------------------
# Delta media and upgrades (install.sh --upgrade): an installed machine brought to a newer medium.
# What the machine was installed from is kept in $ROOT/var/lib/mediabuilder (the STATE): the
# medium's manifest.json and key, and `installed` (host, toplevel, flake revision, manifest).
# A medium is newer when its flake revision descends from the installed one in the bundle's
# history (creation times are not compared: reproducible media carry fixed ones).
# (read_installed, which runs before check_media, is in install.sh.)

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
    # shellcheck disable=SC2153 # BOOT is install.sh's --boot (not a misspelt ROOT)
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
