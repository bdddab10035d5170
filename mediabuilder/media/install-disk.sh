# shellcheck shell=bash
# install-disk.sh - a part of install.sh (mediabuilder): the disk (install.sh --disk, --unattended).
# Not a script to run: install.sh sources it from its checked copy once that copy matched the
# signed sha256sums and the sha256 install.sh carries for it (load_parts), and calls these
# functions from its main.

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
declare -gA REC_LAYOUT=() REC_DISKO=() REC_DISKO_DEVICES=()
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
declare -gA LSBLK_ROW=()
parse_lsblk_row() {
    local rest=$1
    LSBLK_ROW=()
    while [[ $rest =~ ^[[:space:]]*([A-Z:-]+)=\"([^\"]*)\"(.*)$ ]]; do
        LSBLK_ROW[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
        rest=${BASH_REMATCH[3]}
    done
    # Anything left is a row read only in part (a raw quote lsblk should have escaped): its
    # MOUNTPOINT could be what was lost, and a mounted disk would look unused.
    [[ -z ${rest//[[:space:]]/} ]] ||
        die lsblk "printed a row the disk guard cannot read whole (${1:0:120}); nothing was written"
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
    # shellcheck disable=SC2153 # ROOT is install.sh's --root (not a misspelt root)
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
