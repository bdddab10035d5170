"""The ISO writer's images as the Linux kernel reads them: the medium a NixOS installer mounts.

A kernel (the stand-in installer's: Debian's, tests/standin.py) boots under QEMU with an initrd
whose /init mounts the image from an IDE CD drive three times: with Rock Ridge (what the NixOS
installer uses), with Joliet only (`norock`) and as plain ISO 9660 (`norock,nojoliet`), and
prints every entry it sees with its mode, size and sha256 on the serial console. The tree is
media_checks.edge_tree plus a file of several MiB: Rock Ridge must give back exactly the tree
(names, executable bits, sizes, sha256, symlink targets); Joliet and ISO 9660 every file's data.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import standin
from media_checks import edge_tree, full_listing, nontrivial_bytes

from mediabuilder.media.iso import write_iso

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 600  # seconds; the boot takes about 20 s under software emulation here
MOUNTS = ("ro", "ro,norock,iocharset=utf8", "ro,norock,nojoliet")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /m
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { printf 'ISOREAD: %s\n' "$*" >/dev/ttyS0; }
depmod
for m in $(cat /etc/standin-modules); do modprobe "$m" 2>/dev/null; done
for _ in $(seq 120); do [ -b /dev/sr0 ] && break; sleep 0.5; done
for options in MOUNTS; do
    if mount -t iso9660 -o "$options" /dev/sr0 /m; then
        say "mount $options"
        cd /m
        find . -mindepth 1 | while read -r entry; do
            if [ -L "$entry" ]; then
                say "L $(readlink "$entry")|$entry"
            elif [ -d "$entry" ]; then
                say "D|$entry"
            else
                say "F $(stat -c '%a %s' "$entry") $(sha256sum <"$entry" | cut -d ' ' -f 1)|$entry"
            fi
        done
        cd /
        umount /m
    else
        say "mount $options failed"
    fi
done
say "done"
sync
poweroff -f
""".replace("MOUNTS", " ".join(MOUNTS))


def _boot_files(tmp: Path) -> tuple[Path, Path]:
    """The stand-in's kernel, and its initrd with our /init appended (a later cpio archive's
    files replace an earlier one's)."""
    iso = standin.standin_iso()
    kernel, initrd = tmp / "bzImage", tmp / "initrd"
    for inside, out in ((f"/{standin.KERNEL_DIR}/bzImage", kernel), (f"/{standin.INITRD_DIR}/initrd", initrd)):
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", inside, out],
                       check=True, capture_output=True)
        out.chmod(0o644)
    root = tmp / "init-root"
    root.mkdir()
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=b"init\n",
                             capture_output=True, check=True).stdout
    with initrd.open("ab") as f:
        f.write(bytes(-f.tell() % 4) + archive)
    return kernel, initrd


def _boot(kernel: Path, initrd: Path, image: Path, log: Path) -> str:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{log}", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0,115200n8 panic=-1 loglevel=3",
            "-drive", f"file={image},media=cdrom,if=ide,readonly=on,format=raw"]
    start = time.monotonic()
    try:
        subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT,
                       check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU still running after {BOOT_TIMEOUT} s:\n{log.read_text(errors='replace')[-6000:]}")
    print(f"\nBOOT kernel reads the ISO: {time.monotonic() - start:.0f} s")
    return log.read_bytes().decode(errors="replace").replace("\r", "")


def _listings(serial: str) -> dict[str, dict[str, tuple[object, ...]]]:
    """mount options -> what the kernel saw, in full_listing's form."""
    seen: dict[str, dict[str, tuple[object, ...]]] = {}
    current: dict[str, tuple[object, ...]] = {}
    for line in serial.splitlines():
        if "ISOREAD: " not in line:
            continue
        text = line[line.index("ISOREAD: ") + len("ISOREAD: "):]
        if text.startswith("mount "):
            current = seen.setdefault(text.removeprefix("mount "), {})
            continue
        if "|./" not in text:
            continue
        what, rel = text.split("|./", 1)
        if what.startswith("L "):
            current[rel] = ("link", what[2:])
        elif what == "D":
            current[rel] = ("dir",)
        else:
            _, mode, size, digest = what.split(" ")
            current[rel] = ("file", bool(int(mode, 8) & 0o100), int(size), digest)
    return seen


def test_linux_reads_rock_ridge_joliet_and_iso9660(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    edge_tree(root)
    (root / "big").mkdir()
    (root / "big" / "nar.zst").write_bytes(nontrivial_bytes(5 * 1024 * 1024 + 7, seed=5))
    image = tmp_path / "edge.iso"
    write_iso(root, image, label="EDGE", epoch=1700000000)
    want = full_listing(root)

    kernel, initrd = _boot_files(tmp_path)
    serial = _boot(kernel, initrd, image, tmp_path / "serial.log")
    assert "ISOREAD: done" in serial, serial[-6000:]
    seen = _listings(serial)
    assert sorted(seen) == sorted(MOUNTS), serial[-6000:]

    # Rock Ridge: exactly the tree. The kernel shows files and symlinks as Rock Ridge says.
    assert seen["ro"] == want

    data = Counter(v[2:] for v in want.values() if v[0] == "file")
    # Joliet: every file's data (names cut to 64 UTF-16 units; no symlinks, no modes).
    joliet = seen["ro,norock,iocharset=utf8"]
    assert Counter(v[2:] for v in joliet.values() if v[0] == "file") == data
    assert [rel for rel, v in joliet.items() if v[0] == "link"] == []
    # ISO 9660: every file's data, and each symlink as an empty file.
    plain = seen["ro,norock,nojoliet"]
    links = sum(v[0] == "link" for v in want.values())
    empty = (0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert Counter(v[2:] for v in plain.values() if v[0] == "file") == data + Counter({empty: links})
    assert sum(v[0] == "dir" for v in plain.values()) == sum(v[0] == "dir" for v in want.values())
    assert os.path.getsize(image) % 2048 == 0
