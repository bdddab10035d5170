"""A stand-in for the NixOS 25.05 minimal installer ISO, built from Debian packages and cached.

Laid out like the real one (FIELD-NOTES "The NixOS installer ISO"): the kernel and initrd under
`/boot/<store-name>/`, `/isolinux/isolinux.cfg` (BIOS menu with several entries),
`/boot/efi.img` (FAT, label EFIBOOT, holding `EFI/BOOT/{BOOTX64.EFI,grub.cfg}`), the same
`/EFI/BOOT/` on the ISO9660 tree, `/EFI/nixos-installer-image`, `/boot/grub/loopback.cfg`,
`/nix-store.squashfs`, `/version.txt`, volume label `nixos-minimal-25.05-x86_64`, and made with
the xorriso flags nixpkgs uses.

Its live system is what the minimal ISO offers install.sh (the contract's item 4): a Debian 13
root (mmdebstrap) with systemd as PID 1, Nix 2.26, bash, coreutils, util-linux, fdisk (sfdisk),
dosfstools and e2fsprogs; no git, no Python, no network. It is squashed into
`/nix-store.squashfs` (on the real ISO that file holds only the store; NixOS's stage 1 makes the
root). The initrd (busybox) loads Debian's modules for CD, SATA, USB and virtio disks and for the
file systems, finds the ISO by the label in `root=LABEL=`, mounts it at /iso, mounts the squashfs
under a tmpfs overlay as the new root, moves /iso into it and switch_roots to systemd, which
honours `systemd.run=` from the kernel line.

It reports on the serial console in lines starting `STANDIN:`: the initrd the kernel command
line and the device it mounted; without `systemd.run=`, a unit of the live system (in
multi-user.target) what PID 1 and Nix are and what it found under `/iso/DIR` when the command line
names `mediabuilder.medium=DIR`, and then powers off (the real ISO would show a login prompt).
The stock kernel line carries `console=ttyS0,115200n8`, which the real ISO's default entry does
not (it has a serial variant): so the console of the live system, where `systemd.run=` writes,
is the serial line the tests read.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

LABEL = "nixos-minimal-25.05-x86_64"
# Fake store names, shaped like 25.05's.
KERNEL_DIR = "boot/3hg0ixf6kcw5ds7hg6qwmpkd1a5h0c0s-linux-6.12.30"
INITRD_DIR = "boot/f8kyvdpy7q6ak9wbcqmw2dkdl5apc7dp-initrd-linux-6.12.30"
TOPLEVEL = "/nix/store/9wq3a4r0cw4b0q2x6n1l3z8b5g8d6k2j-nixos-system-nixos-25.05.20250601.abcdef0"
KERNEL_LINE = f"init={TOPLEVEL}/init root=LABEL={LABEL} boot.shell_on_fail console=ttyS0,115200n8 loglevel=4"
SOURCE_DATE_EPOCH = "1748736000"
GPT_GUID = "6e1d0b6c-1a36-4f8e-9b36-7d3f1c2a9e01"
# Bump when the recipe below changes: part of the cache key.
RECIPE = "4"
CACHE_ROOT = Path(os.environ.get("MEDIABUILDER_STANDIN_CACHE", "/var/cache/mediabuilder"))

# Loaded by the initrd; the live root has no /lib/modules, so whatever it mounts later (ext4 and
# vfat for the install, crc32c for ext4, code pages for vfat) is loaded here too.
ROOT_MODULES = ("isofs", "sr_mod", "ata_piix", "ahci", "sd_mod", "virtio_blk", "virtio_pci", "virtio_scsi",
                "xhci_pci", "ehci_pci", "uhci_hcd", "usb_storage", "uas", "loop", "squashfs", "overlay",
                "ext4", "crc32c_generic", "crc32c_intel", "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1",
                "nls_utf8", "efivarfs")
# The live system (the contract's item 4); `mount` and `fdisk` (sfdisk) are not in mmdebstrap's apt variant.
LIVE_PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "nix-bin", "bash", "coreutils", "util-linux", "mount",
                 "fdisk", "dosfstools", "e2fsprogs")
LIVE_SUITE = "trixie"

ISOLINUX_CFG = f"""\
SERIAL 0 115200
TIMEOUT 10
UI menu.c32

MENU TITLE NixOS
MENU CLEAR
MENU ROWS 6
MENU MARGIN 0

DEFAULT boot

# Default Boot
LABEL boot
MENU LABEL NixOS 25.05.20250601.abcdef0 Installer
LINUX /{KERNEL_DIR}/bzImage
APPEND {KERNEL_LINE}
INITRD /{INITRD_DIR}/initrd

# A variant to boot with 'nomodeset'
LABEL boot-nomodeset
MENU LABEL NixOS 25.05.20250601.abcdef0 Installer (nomodeset)
LINUX /{KERNEL_DIR}/bzImage
APPEND {KERNEL_LINE} nomodeset
INITRD /{INITRD_DIR}/initrd

# A variant to boot with 'copytoram'
LABEL boot-copytoram
MENU LABEL NixOS 25.05.20250601.abcdef0 Installer (copytoram)
LINUX /{KERNEL_DIR}/bzImage
APPEND {KERNEL_LINE} copytoram
INITRD /{INITRD_DIR}/initrd

# A variant to boot with verbose logging to the console
LABEL boot-debug
MENU LABEL NixOS 25.05.20250601.abcdef0 Installer (debug)
LINUX /{KERNEL_DIR}/bzImage
APPEND {KERNEL_LINE} loglevel=7
INITRD /{INITRD_DIR}/initrd

# A variant to boot with a serial console enabled
LABEL boot-serial
MENU LABEL NixOS 25.05.20250601.abcdef0 Installer (serial console=ttyS0,115200n8)
LINUX /{KERNEL_DIR}/bzImage
APPEND {KERNEL_LINE} console=ttyS0,115200n8
INITRD /{INITRD_DIR}/initrd
"""

GRUB_CFG = f"""\
set textmode=false
# This uses the defaults, and makes the serial terminal available.
serial
terminal_input --append serial
terminal_output --append serial

search --set=root --file /EFI/nixos-installer-image

insmod gfxterm
insmod png
set timeout=1

clear
# This message will only be viewable on the default (UEFI console) display.
echo ""
echo "Loading graphical boot menu..."

menuentry 'NixOS 25.05.20250601.abcdef0 Installer ' --class installer {{
  # Fallback to UEFI console for boot, efifb sometimes has difficulties.
  terminal_output console

  linux /{KERNEL_DIR}/bzImage ${{isoboot}} {KERNEL_LINE}
  initrd /{INITRD_DIR}/initrd
}}

menuentry 'NixOS 25.05.20250601.abcdef0 Installer (nomodeset)' --class nomodeset {{
  linux /{KERNEL_DIR}/bzImage ${{isoboot}} {KERNEL_LINE} nomodeset
  initrd /{INITRD_DIR}/initrd
}}

submenu "HiDPI, Quirks and Accessibility" --class hidpi --class submenu {{
  menuentry 'NixOS 25.05.20250601.abcdef0 Installer (copytoram)' --class copytoram {{
    linux /{KERNEL_DIR}/bzImage ${{isoboot}} {KERNEL_LINE} copytoram
    initrd /{INITRD_DIR}/initrd
  }}
}}

menuentry 'NixOS 25.05.20250601.abcdef0 Installer (serial console=ttyS0,115200n8)' --class serial {{
  linux /{KERNEL_DIR}/bzImage ${{isoboot}} {KERNEL_LINE} console=ttyS0,115200n8
  initrd /{INITRD_DIR}/initrd
}}

menuentry 'Firmware Setup' --class settings {{
  fwsetup
  clear
  echo ""
  echo "If you see this message, your EFI system doesn't support this feature."
  echo ""
}}
menuentry 'Shutdown' --class shutdown {{
  halt
}}
"""

INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /iso /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "STANDIN: $*" >/dev/ttyS0; }
stop() { say "$*"; sync; poweroff -f; sleep 10; }
say "cmdline: $(cat /proc/cmdline)"
depmod
for m in $(cat /etc/standin-modules); do modprobe "$m" 2>/dev/null; done
param() { tr ' ' '\\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
label=$(param root | sed -n 's/^LABEL=//p')
[ -n "$label" ] || stop "no root=LABEL= on the command line"
found=
for _ in $(seq 120); do
    for sys in /sys/class/block/*; do
        dev=${sys##*/}
        [ -e "$sys/partition" ] && continue
        [ -b "/dev/$dev" ] || continue
        magic=$(dd if="/dev/$dev" bs=1 skip=32769 count=5 2>/dev/null)
        [ "$magic" = CD001 ] || continue
        volid=$(dd if="/dev/$dev" bs=1 skip=32808 count=32 2>/dev/null | sed 's/ *$//')
        if [ "$volid" = "$label" ]; then found=/dev/$dev; break 2; fi
    done
    sleep 0.5
done
[ -n "$found" ] || stop "no device with label $label"
mount -t iso9660 -o ro "$found" /iso || stop "cannot mount $found"
say "mounted $found (label $label) at /iso"
mkdir -p /live/ro /live/rw /newroot
mount -t squashfs -o ro,loop /iso/nix-store.squashfs /live/ro || stop "cannot mount /iso/nix-store.squashfs"
mount -t tmpfs -o mode=0755 tmpfs /live/rw
mkdir -p /live/rw/upper /live/rw/work
mount -t overlay -o lowerdir=/live/ro,upperdir=/live/rw/upper,workdir=/live/rw/work overlay /newroot ||
    stop "cannot mount the overlay"
mkdir -p /newroot/iso
mount --move /iso /newroot/iso
for d in dev proc sys; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /lib/systemd/systemd
"""

# The live system's report (without systemd.run=): a oneshot unit in multi-user.target.
REPORT = """\
#!/bin/bash
say() { echo "STANDIN: $*" >/dev/ttyS0; }
param() { tr ' ' '\\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
say "live system: PID 1 $(cat /proc/1/comm), $(systemctl --version | head -n 1 | cut -d ' ' -f 1-2), $(nix --version)"
iso="$(findmnt -n -o SOURCE,FSTYPE /iso | tr -s ' ') ($(findmnt -n -o OPTIONS /iso | cut -d , -f 1))"
say "/iso is $iso, / is $(findmnt -n -o FSTYPE /)"
medium=$(param mediabuilder.medium)
host=$(param mediabuilder.host)
if [ -n "$medium" ]; then
    dir=/iso/$medium
    if [ -f "$dir/install.sh" ] && [ -f "$dir/manifest.json" ]; then
        say "medium at $dir for host $host: $(ls "$dir" | tr '\\n' ' ')"
        say "manifest.json sha256 $(sha256sum "$dir/manifest.json" | cut -d ' ' -f 1)"
    else
        say "no medium under $dir"
    fi
fi
say "done"
systemctl --no-block poweroff
"""
REPORT_UNIT = """\
[Unit]
Description=Stand-in installer: report on the serial console, then power off
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/standin-report

[Install]
WantedBy=multi-user.target
"""


def _run(*args: str | Path, cwd: Path | None = None) -> None:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def kernel_package() -> str:
    """The versioned package `linux-image-amd64` depends on, e.g. linux-image-6.1.0-57-amd64."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"Depends: (linux-image-\S+)", out)
    if found is None:
        raise RuntimeError(f"apt-cache depends linux-image-amd64: no kernel package in:\n{out}")
    return found.group(1)


def _module_deps(ko: Path) -> list[str]:
    data = ko.read_bytes()
    found = re.search(rb"depends=([^\0]*)\0", data)
    return [d for d in found.group(1).decode().split(",") if d] if found else []


def _modules(kernel_root: Path, version: str, dest: Path, modules: tuple[str, ...] = ROOT_MODULES) -> None:
    """Copy `modules` and everything they depend on; the initrd runs depmod."""
    tree = kernel_root / "lib" / "modules" / version
    by_name = {ko.name[:-3].replace("-", "_"): ko for ko in tree.rglob("*.ko")}
    wanted: set[str] = set()
    todo = [m for m in modules if m in by_name]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        todo.extend(d.replace("-", "_") for d in _module_deps(by_name[name]) if d.replace("-", "_") in by_name)
    for name in sorted(wanted):
        src = by_name[name]
        target = dest / "lib" / "modules" / version / src.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    for extra in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (tree / extra).exists():
            shutil.copy2(tree / extra, dest / "lib" / "modules" / version / extra)
    (dest / "etc").mkdir(exist_ok=True)
    (dest / "etc" / "standin-modules").write_text(" ".join(m for m in modules if m in by_name) + "\n")


def _initrd(kernel_root: Path, version: str, work: Path, out: Path, init: str = INIT,
            modules: tuple[str, ...] = ROOT_MODULES) -> None:
    root = work / "initrd-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/busybox", root / "bin" / "busybox")
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    _modules(kernel_root, version, root, modules)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with out.open("wb") as f:
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        gz = subprocess.Popen(["gzip", "-9n"], stdin=cpio.stdout, stdout=f)
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(("\n".join(names) + "\n").encode())
        cpio.stdin.close()
        if cpio.wait() != 0 or gz.wait() != 0:
            raise RuntimeError("cpio | gzip failed for the stand-in initrd")


def _efi_dir(tree: Path, work: Path) -> None:
    efi = tree / "EFI" / "BOOT"
    efi.mkdir(parents=True)
    _run("grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o", efi / "BOOTX64.EFI",
         "part_gpt", "part_msdos", "fat", "iso9660", "normal", "linux", "search", "search_fs_file",
         "configfile", "echo", "test", "all_video", "efi_gop", "serial", "terminal", "ls", "loopback",
         "gzio", "gfxterm", "png", "halt", "reboot")
    (efi / "grub.cfg").write_text(GRUB_CFG)
    (tree / "EFI" / "nixos-installer-image").write_text("")
    # boot/efi.img as nixpkgs makes it: the EFI tree plus 10 %, rounded up to whole MiB, plus 1 MiB.
    usage = sum(p.stat().st_size for p in (tree / "EFI").rglob("*") if p.is_file())
    mib = 1024 * 1024
    size = (usage * 110 // 100 // mib + 1) * mib
    img = tree / "boot" / "efi.img"
    with img.open("wb") as f:
        f.truncate(size)
    _run("mkfs.vfat", "--invariant", "-i", "12345678", "-n", "EFIBOOT", img)
    _run("mmd", "-i", img, "::EFI", "::EFI/BOOT")
    _run("mcopy", "-i", img, efi / "BOOTX64.EFI", efi / "grub.cfg", "::EFI/BOOT/")


def _tree(kernel_root: Path, version: str, work: Path) -> Path:
    tree = work / "tree"
    (tree / KERNEL_DIR).mkdir(parents=True)
    (tree / INITRD_DIR).mkdir(parents=True)
    shutil.copy2(kernel_root / "boot" / f"vmlinuz-{version}", tree / KERNEL_DIR / "bzImage")
    _initrd(kernel_root, version, work, tree / INITRD_DIR / "initrd")
    iso = tree / "isolinux"
    iso.mkdir()
    shutil.copy2("/usr/lib/ISOLINUX/isolinux.bin", iso / "isolinux.bin")
    for c32 in ("ldlinux.c32", "menu.c32", "libcom32.c32", "libutil.c32"):
        shutil.copy2(f"/usr/lib/syslinux/modules/bios/{c32}", iso / c32)
    (iso / "isolinux.cfg").write_text(ISOLINUX_CFG)
    _efi_dir(tree, work)
    (tree / "boot" / "grub").mkdir()
    (tree / "boot" / "grub" / "loopback.cfg").write_text("source /EFI/BOOT/grub.cfg\n")
    shutil.copy2(live_squashfs(), tree / "nix-store.squashfs")
    (tree / "version.txt").write_text("25.05.20250601.abcdef0\n")
    return tree


def _setup_live_root(root: Path) -> None:
    """What the live system needs besides its packages: Nix's container settings, a fixed machine
    id (no first-boot questions), the report unit; and less of what a live system never reads."""
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "etc" / "nix").mkdir(exist_ok=True)
    (root / "etc" / "nix" / "nix.conf").write_text(
        "build-users-group =\nsandbox = false\nexperimental-features = nix-command flakes\n")
    (root / "etc" / "hostname").write_text("nixos\n")
    (root / "etc" / "machine-id").write_text("6e1d0b6c1a364f8e9b367d3f1c2a9e01\n")
    (root / "etc" / "fstab").write_text("")
    system = root / "etc" / "systemd" / "system"
    for unit in ("systemd-firstboot.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "e2scrub_reap.service", "dpkg-db-backup.timer", "fstrim.timer", "getty@tty1.service",
                 "ldconfig.service", "systemd-journal-catalog-update.service",
                 # console=ttyS0 makes the getty generator start one on the serial line, which
                 # waits 90 s for udev's dev-ttyS0.device under emulation; the report unit needs none.
                 "serial-getty@ttyS0.service"):
        link = system / unit
        link.unlink(missing_ok=True)
        for wants in system.glob(f"*.wants/{unit}"):
            wants.unlink()
        link.symlink_to("/dev/null")
    (root / "usr" / "local" / "sbin").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "local" / "sbin" / "standin-report").write_text(REPORT)
    (root / "usr" / "local" / "sbin" / "standin-report").chmod(0o755)
    (system / "standin-report.service").write_text(REPORT_UNIT)
    (system / "multi-user.target.wants").mkdir(exist_ok=True)
    (system / "multi-user.target.wants" / "standin-report.service").symlink_to("../standin-report.service")
    (root / "iso").mkdir(exist_ok=True)
    (root / "nix" / "var" / "nix").mkdir(parents=True, exist_ok=True)


def live_cache_key() -> str:
    text = "\n".join([RECIPE, LIVE_SUITE, *LIVE_PACKAGES, REPORT, REPORT_UNIT,
                      Path(__file__).read_text().split("def _setup_live_root")[1].split("def live_cache_key")[0]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def live_squashfs() -> Path:
    """The live root (Debian 13 with systemd and Nix 2.26), squashed; built once (about a minute,
    from deb.debian.org) and kept in CACHE_ROOT/standin-live-<hash>/live.squashfs."""
    place = CACHE_ROOT / f"standin-live-{live_cache_key()}"
    squash = place / "live.squashfs"
    if squash.is_file():
        return squash
    work = CACHE_ROOT / f".standin-live-work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        root = work / "root"
        _run("mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(LIVE_PACKAGES)}", LIVE_SUITE, root,
             "http://deb.debian.org/debian")
        _setup_live_root(root)
        built = work / "live.squashfs"
        _run("mksquashfs", root, built, "-quiet", "-no-progress", "-comp", "zstd", "-noappend")
        place.mkdir(exist_ok=True)
        os.replace(built, squash)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return squash


def xorriso_args(tree: Path, out: Path) -> list[str]:
    """nixpkgs' make-iso9660-image.sh, as FIELD-NOTES gives it (a path list of the whole tree)."""
    pathlist = tree.parent / "pathlist"
    pathlist.write_text("".join(f"/{p.name}={p}\n" for p in sorted(tree.iterdir())))
    return ["xorriso", "-boot_image", "any", f"gpt_disk_guid={GPT_GUID}",
            "-volume_date", "all_file_dates", f"={SOURCE_DATE_EPOCH}",
            "-as", "mkisofs", "-iso-level", "3", "-volid", LABEL, "-appid", "nixos", "-publisher", "nixos",
            "-graft-points", "-full-iso9660-filenames", "-joliet",
            "-eltorito-boot", "isolinux/isolinux.bin", "-eltorito-catalog", ".boot.cat",
            "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", "--sort-weight", "1", "/isolinux",
            "-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin",
            "-eltorito-alt-boot", "-e", "boot/efi.img", "-no-emul-boot", "-isohybrid-gpt-basdat",
            "-r", "-path-list", str(pathlist), "--sort-weight", "0", "/", "-o", str(out)]


def cache_key(package: str) -> str:
    text = "\n".join([RECIPE, package, ISOLINUX_CFG, GRUB_CFG, INIT, live_cache_key(), Path(__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def standin_iso() -> Path:
    """The stand-in ISO, built once and kept in CACHE_ROOT/standin-<hash>/nixos-standin.iso."""
    package = kernel_package()
    place = CACHE_ROOT / f"standin-{cache_key(package)}"
    iso = place / "nixos-standin.iso"
    if iso.is_file():
        return iso
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    work = CACHE_ROOT / f".standin-work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _run("apt-get", "download", package, cwd=work)
        deb = next(work.glob("linux-image-*.deb"))
        kernel_root = work / "kernel"
        _run("dpkg-deb", "-x", deb, kernel_root)
        version = package.removeprefix("linux-image-")
        tree = _tree(kernel_root, version, work)
        built = work / "nixos-standin.iso"
        env_epoch = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
        proc = subprocess.run(xorriso_args(tree, built), capture_output=True, text=True, env=env_epoch, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"xorriso failed for the stand-in ISO:\n{proc.stderr[-3000:]}")
        place.mkdir(exist_ok=True)
        os.replace(built, iso)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return iso


if __name__ == "__main__":
    print(standin_iso())
