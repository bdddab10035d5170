# shellcheck shell=bash
# install-rebuild.sh - a part of install.sh (mediabuilder): offline rebuilds.
# Not a script to run: install.sh sources it from its checked copy once that copy matched the
# signed sha256sums and the sha256 install.sh carries for it (load_parts), and calls these
# functions from its main.

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
