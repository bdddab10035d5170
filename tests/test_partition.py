"""install.sh on disks, fast, with loop devices instead of QEMU: partitioning and formatting
(read back by sfdisk, blkid and fsck.fat), the disk guard, and whole unattended installs under
`unshare -n` from a read-only medium.

How the disks are real, and what is not: every disk is a loop device over a sparse file, and the
guard reads it with lsblk and findmnt as on the target. This host's kernel would list every
loop device of the machine (other jobs' too), and the guard never takes loop devices for disks;
so the tests set MEDIABUILDER_DISKS to their own loop devices, which makes the guard look at
only those and count them as whole disks. Everything else it judges is the kernel's: a loop
device attached read-only (`losetup -r`) is RO=1, the medium's own device is found by findmnt
from where install.sh runs, and a device with a mounted file system is in use. Removable disks
(RM=1) cannot be made here (no loop device is removable): the QEMU tests boot from a usb-storage
stick for that. The partitions' device nodes come from `partx` (FIELD-NOTES: the kernel itself
makes none for loop devices); install.sh attaches partitions by offset when none appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, closure_of, make_nix_env, prepare_example, run_cli

pytestmark = pytest.mark.integration

INSTALL_SH = REPO / "mediabuilder" / "media" / "install.sh"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# How many mounts are at or under /mnt (in n): the machine may have some of its own there.
COUNT_MNT = 'n=$(findmnt -rn -o TARGET | grep -c "^/mnt" || true)'
GiB = 1024**3
MiB = 1024**2


class Loops:
    """Loop devices over sparse files in `base`, detached (with their partitions) at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.devices: list[str] = []

    def new(self, name: str, size: int, read_only: bool = False) -> tuple[str, Path]:
        image = self.base / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        return self.attach(image, read_only), image

    def attach(self, image: Path, read_only: bool = False) -> str:
        args = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)]
        device = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        self.devices.append(device)
        return device

    def close(self) -> None:
        for device in reversed(self.devices):
            subprocess.run(["partx", "-d", device], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    found = Loops(tmp_path)
    yield found
    found.close()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def partitions(image: Path) -> list[tuple[int, int, str, str]]:
    """(start, size, type, name) of each partition, as sfdisk reads the image file."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["sectorsize"] == 512
    return [(p["start"], p["size"], p["type"], p.get("name", "")) for p in table["partitions"]]


def probe(image: Path, sector: int) -> dict[str, str]:
    """blkid -p of the file system at `sector` of the image (no loop device, no mount)."""
    out = subprocess.run(["blkid", "-p", "-O", str(sector * 512), "-o", "export", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def source_install_sh(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`script` run with install.sh's functions sourced (INSTALL_SH_SOURCE_ONLY), in a private mount namespace."""
    prelude = (f'INSTALL_SH_SOURCE_ONLY=1; source {INSTALL_SH}; source {INSTALL_SH.with_name("install-disk.sh")}; '
               'SCRATCH=$(mktemp -d); trap cleanup EXIT\n')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", prelude + script],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300, check=False)


# The guard reads `lsblk -P` and never evaluates it: hostile models and serials


def hostile_lsblk(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    """A fake `lsblk` first on PATH: `-P` prints two internal disks whose model and serial try
    command substitution, backquotes and a quote to break out (escaped as \\xHH, as lsblk -P
    escapes quotes and controls), very long values, a partition and a CD; any other call
    (whole_disk_of's `-n -d -o PKNAME`) prints nothing. Returns the environment and the files
    that appear only if something ran what lsblk printed."""
    markers = [tmp_path / f"pwned-{i}" for i in range(6)]
    m = [str(x) for x in markers]
    long_model, long_serial = "M" * 4000 + f"$(touch {m[4]})", "S" * 5000
    rows = [
        f'NAME="sdy" PATH="/dev/sdy" PKNAME="" TYPE="disk" RM="0" RO="0" SIZE="8589934592" '
        f'MODEL="$(touch {m[0]}) `touch {m[1]}` \\x22; rm -rf {tmp_path}; touch {m[2]} \\x22\\x0a#" '
        f'SERIAL="\\x22$(touch {m[3]})\\x22 ${{IFS}} %s \\x5c" MOUNTPOINT=""',
        f'NAME="nvme7n1" PATH="/dev/nvme7n1" PKNAME="" TYPE="disk" RM="0" RO="0" SIZE="1073741824" '
        f'MODEL="{long_model}" SERIAL="{long_serial}" MOUNTPOINT=""',
        f'NAME="nvme7n1p1" PATH="/dev/nvme7n1p1" PKNAME="nvme7n1" TYPE="part" RM="0" RO="0" SIZE="1048576" '
        f'MODEL="`touch {m[5]}`" SERIAL="" MOUNTPOINT=""',
        'NAME="sr0" PATH="/dev/sr0" PKNAME="" TYPE="rom" RM="1" RO="0" SIZE="0" MODEL="QEMU DVD-ROM" SERIAL="" '
        'MOUNTPOINT=""',
    ]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "lsblk.out").write_text("\n".join(rows) + "\n")
    fake = bin_dir / "lsblk"
    fake.write_text(f'#!/bin/sh\ncase " $* " in *" -P "*) exec cat {tmp_path}/lsblk.out ;; esac\nexit 0\n')
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, markers


def test_guard_shows_hostile_lsblk_values_literally(tmp_path: Path) -> None:
    env, markers = hostile_lsblk(tmp_path)
    media = tmp_path / "media"
    media.mkdir()
    proc = source_install_sh(f'MEDIA={media}; find_candidates; printf "C %s\\n" "${{CANDIDATE_DESC[@]}}"; '
                             'for e in "${EXCLUDED[@]}"; do printf "E %s\\n" "$e"; done', env)
    assert proc.returncode == 0, proc.stderr
    m = [str(x) for x in markers]
    sdy = (f"/dev/sdy: $(touch {m[0]}) `touch {m[1]}` \\x22; rm -rf {tmp_path}; touch {m[2]} \\x22\\x0a#, "
           f"8192 MiB (8589934592 bytes), serial \\x22$(touch {m[3]})\\x22 ${{IFS}} %s \\x5c")
    nvme = f"/dev/nvme7n1: {'M' * 4000}$(touch {m[4]}), 1024 MiB (1073741824 bytes), serial {'S' * 5000}"
    assert proc.stdout.splitlines() == [f"C {nvme}", f"C {sdy}"]  # by name; partitions and CDs are never listed
    assert [p for p in markers if p.exists()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "lsblk.out", "media"]


def test_guard_refuses_auto_with_two_hostile_disks(tmp_path: Path) -> None:
    env, markers = hostile_lsblk(tmp_path)
    media = tmp_path / "media"
    media.mkdir()
    proc = source_install_sh(f"MEDIA={media} DISK_REQ=auto LAYOUT=uefi; plan_disk; echo chosen $DISK", env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    m = [str(x) for x in markers]
    assert error_line(proc) == (
        "install.sh: error: --disk auto: 2 disks could be the target, name one with --disk: "
        f"/dev/nvme7n1: {'M' * 4000}$(touch {m[4]}), 1024 MiB (1073741824 bytes), serial {'S' * 5000}; "
        f"/dev/sdy: $(touch {m[0]}) `touch {m[1]}` \\x22; rm -rf {tmp_path}; touch {m[2]} \\x22\\x0a#, 8192 MiB "
        f"(8589934592 bytes), serial \\x22$(touch {m[3]})\\x22 ${{IFS}} %s \\x5c; nothing was written")
    assert "chosen" not in proc.stdout
    assert [p for p in markers if p.exists()] == []


def test_guard_refuses_a_row_it_cannot_read_whole(tmp_path: Path) -> None:
    """A raw quote (lsblk -P escapes them: a broken or hostile lsblk) would end the row early and
    lose what follows, the mount point among it: a mounted disk would look unused. Refused."""
    env, markers = hostile_lsblk(tmp_path)
    row = ('NAME="sdz" PATH="/dev/sdz" PKNAME="" TYPE="disk" RM="0" RO="0" SIZE="8589934592" '
           'MODEL="a "quoted" model" SERIAL="" MOUNTPOINT="/home"')
    (tmp_path / "lsblk.out").write_text(row + "\n")
    media = tmp_path / "media"
    media.mkdir()
    proc = source_install_sh(f"MEDIA={media} DISK_REQ=auto LAYOUT=uefi; plan_disk; echo chosen $DISK", env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert error_line(proc) == (f"install.sh: error: lsblk: printed a row the disk guard cannot read whole "
                                f"({row[:120]}); nothing was written")
    assert "chosen" not in proc.stdout


# Partitioning and formatting: install.sh's own steps on a loop device


def test_uefi_layout(loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    proc = source_install_sh(f"DISK={disk} LAYOUT=uefi; partition_disk; format_disk; detach_partition_loops")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr  # mkfs.fat's "less than the suggested minimum" clusters
    end = 2 * GiB // 1024 - 2048  # sfdisk ends the last partition on a MiB boundary before the backup GPT
    assert partitions(image) == [(2048, 512 * MiB // 512, ESP, "boot"), (1050624, end - 1050624, LINUX, "nixos")]
    esp, root = probe(image, 2048), probe(image, 1050624)
    assert (esp["TYPE"], esp.get("LABEL"), esp["VERSION"]) == ("vfat", None, "FAT32")
    assert (root["TYPE"], root["LABEL"]) == ("ext4", "nixos-unfinished")  # not bootable as installed yet
    # The ESP as a FAT checker sees it, through a loop device over its bytes.
    fsck = subprocess.run(["bash", "-c", 'd=$(losetup -f --show -r -o "$1" --sizelimit "$2" "$3") && '
                                         'fsck.fat -n "$d"; rc=$?; losetup -d "$d"; exit $rc',
                           "_", str(2048 * 512), str(512 * MiB), str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "less than the required minimum" not in fsck.stdout
    # Labelled, as install.sh does last.
    subprocess.run(["partx", "-d", disk], capture_output=True, check=False)
    proc = source_install_sh(f"DISK={disk} LAYOUT=uefi; partition_device 1; ESP_PART=$PART_DEV; partition_device 2; "
                             "ROOT_PART=$PART_DEV; label_disk; detach_partition_loops")
    assert proc.returncode == 0, proc.stderr
    assert (probe(image, 2048)["LABEL"], probe(image, 1050624)["LABEL"]) == ("boot", "nixos")


def test_bios_layout(loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    proc = source_install_sh(f"DISK={disk} LAYOUT=bios; partition_disk; format_disk; detach_partition_loops")
    assert proc.returncode == 0, proc.stderr
    end = 2 * GiB // 1024 - 2048
    assert partitions(image) == [(2048, 2048, BIOS_BOOT, "bios-boot"), (4096, end - 4096, LINUX, "nixos")]
    assert probe(image, 4096)["TYPE"] == "ext4"
    assert probe(image, 4096)["LABEL"] == "nixos-unfinished"


def test_old_signatures_wiped(loops: Loops) -> None:
    """A disk that held another file system on the whole device is partitioned afresh."""
    disk, image = loops.new("disk", GiB)
    subprocess.run(["mkfs.ext4", "-q", "-L", "old", str(image)], check=True)
    proc = source_install_sh(f"DISK={disk} LAYOUT=bios; partition_disk; format_disk; detach_partition_loops")
    assert proc.returncode == 0, proc.stderr
    whole = probe(image, 0)
    assert (whole.get("PTTYPE"), whole.get("TYPE"), whole.get("LABEL")) == ("gpt", None, None)
    assert len(partitions(image)) == 2


# Media and install.sh runs


@dataclass(frozen=True)
class Media:
    flake: Path
    unattended: Path  # --unattended alpha --install-disk auto --layout bios
    toplevel: str  # alpha's


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    base = tmp_path_factory.mktemp("partition")
    prepare_example(base / "example")
    flake = base / "example" / "flake"
    proc = run_cli("build", f"--flake={flake}#alpha", f"--flake={flake}#beta", "--cache", base / "cache",
                   "-o", base / "unattended", "--unattended", "alpha", "--install-disk", "auto", "--layout", "bios")
    assert proc.returncode == 0, proc.stderr
    toplevels = dict(line.split("\t") for line in proc.stdout.splitlines())
    return Media(flake, base / "unattended", toplevels["alpha"])


def run_medium(medium: Path, disks: list[str], *argv: str, cmdline: str | None = None,
               medium_device: str | None = None) -> subprocess.CompletedProcess[str]:
    """A script of the medium (unattended.sh, or install.sh ARGS) in a new network and mount
    namespace, from a read-only bind of the medium (or, with `medium_device`, from that device
    mounted read-only, as /iso is on the installer); only `disks` are candidates."""
    work = medium.parent / f"{medium.name}-run"
    work.mkdir(exist_ok=True)
    if medium_device:
        mount = f'mount -o ro {medium_device} "$RO"'
    else:
        mount = f'mount --bind {medium} "$RO" && mount -o remount,bind,ro "$RO"'
    script = (f'set -e; RO={work}/ro; mkdir -p "$RO"; {mount}; set +e\n'
              f'{COUNT_MNT}; before=$n; "$@"; rc=$?; {COUNT_MNT}\n'
              'echo "mounts left: $((n - before))"\n'
              'exit $rc\n')
    env = make_nix_env({"MEDIABUILDER_DISKS": " ".join(disks), "MEDIABUILDER_CONSOLE": "/dev/null",
                        "MEDIABUILDER_LOG": str(work / "install.log"), "INSTALL_SH_CMDLINE": str(work / "cmdline")})
    env.pop("NIX_CONFIG")  # install.sh must not depend on the test's Nix settings
    (work / "cmdline").write_text(cmdline or "BOOT_IMAGE=/boot/bzImage quiet\n")
    return subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", script, "_",
                           "bash", f"{work}/ro/{argv[0]}", *argv[1:]],
                          env=env, capture_output=True, text=True, timeout=900, check=False)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    (line,) = [ln for ln in proc.stderr.splitlines() + proc.stdout.splitlines() if ln.startswith("install.sh: error:")]
    return line


def in_root(image: Path, start: int, *command: str) -> subprocess.CompletedProcess[str]:
    """`command` with the ext4 root at sector `start` of `image` mounted at $ROOT (a private namespace)."""
    script = ('set -e; d=$(losetup -f --show -o "$1" "$2"); ROOT=$(mktemp -d); mount "$d" "$ROOT"; shift 2; '
              'set +e; ROOT=$ROOT "$@"; rc=$?; umount "$ROOT"; losetup -d "$d"; exit $rc')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "_",
                           str(start * 512), str(image), *command], env=make_nix_env(), capture_output=True,
                          text=True, timeout=300, check=False)


def test_unattended_install(media: Media, loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    proc = run_medium(media.unattended, [disk], "unattended.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert out[-2:] == [f"mediabuilder: installed alpha onto {disk}", "mounts left: 0"]
    assert partitions(image)[1][:3] == (4096, 2 * GiB // 1024 - 2048 - 4096, LINUX)
    assert (probe(image, 4096)["TYPE"], probe(image, 4096)["LABEL"]) == ("ext4", "nixos")
    root = '"$ROOT"'
    closure = in_root(image, 4096, "bash", "-c", f'nix --store {root} path-info -r "$0"', media.toplevel)
    assert closure.returncode == 0, closure.stderr
    assert sorted(closure.stdout.split()) == closure_of(media.toplevel)
    checks = in_root(image, 4096, "bash", "-c",
                     f'readlink {root}/nix/var/nix/profiles/$(readlink {root}/nix/var/nix/profiles/system); '
                     f'git -C {root}/etc/nixos rev-parse HEAD; cat {root}/var/log/switch-to-configuration.log; '
                     f'stat -c "%u %a" {root}')
    assert checks.returncode == 0, checks.stderr
    rev = subprocess.run(["git", "-C", str(media.flake), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert checks.stdout.splitlines() == [media.toplevel, rev.strip(),
                                          f"action=boot NIXOS_INSTALL_BOOTLOADER=1 toplevel={media.toplevel}", "0 755"]


def test_two_disks_auto_refused(media: Media, loops: Loops) -> None:
    (a, image_a), (b, image_b) = loops.new("a", 256 * MiB), loops.new("b", 512 * MiB)
    before = (sha256(image_a), sha256(image_b))
    proc = run_medium(media.unattended, [a, b], "unattended.sh")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert line == (f"install.sh: error: --disk auto: 2 disks could be the target, name one with --disk: "
                    f"{a}: unknown model, 256 MiB (268435456 bytes), serial none; "
                    f"{b}: unknown model, 512 MiB (536870912 bytes), serial none; nothing was written")
    assert proc.stdout.splitlines()[-4:] == [
        f"mediabuilder: install failed: {line}", f"mediabuilder: the log is {media.unattended}-run/install.log",
        "mediabuilder: a root shell; leave it to end the unit (the machine stays up)", "mounts left: 0"]
    assert (sha256(image_a), sha256(image_b)) == before


def test_no_disk_refused(media: Media, loops: Loops) -> None:
    ro, image = loops.new("ro", 256 * MiB, read_only=True)
    proc = run_medium(media.unattended, [ro], "unattended.sh")
    assert proc.returncode == 2
    assert error_line(proc) == (f"install.sh: error: --disk auto: no internal disk to install onto ({ro}: unknown "
                                "model, 256 MiB (268435456 bytes), serial none: not a candidate, read-only); "
                                "nothing was written")


def test_boot_medium_and_read_only_never_chosen(media: Media, loops: Loops, tmp_path: Path) -> None:
    """The medium on a disk of its own (an ext4 image made from the tree, mounted read-only as /iso
    is), a read-only disk and a good one: auto is the good one; naming the others is refused."""
    medium_image = tmp_path / "medium.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(media.unattended), str(medium_image), "64M"], check=True)
    medium = loops.attach(medium_image)
    ro, _ = loops.new("ro", 256 * MiB, read_only=True)
    good, good_image = loops.new("good", GiB)
    disks = [medium, ro, good]
    before = sha256(good_image)
    plan = run_medium(media.unattended, disks, "install.sh", "--host", "alpha", "--disk", "auto", "--dry-run",
                      medium_device=medium)
    assert plan.returncode == 0, plan.stderr
    assert f"    first:       erase {good}, layout bios, mount it at /mnt ({good}: unknown model, 1024 MiB " \
           f"(1073741824 bytes), serial none)" in plan.stderr.splitlines()
    for device, why in ((medium, f"holds the boot medium ({media.unattended}-run/ro)"), (ro, "read-only")):
        proc = run_medium(media.unattended, disks, "install.sh", "--host", "alpha", "--disk", device, "--yes",
                          medium_device=medium)
        assert proc.returncode == 2
        assert error_line(proc).startswith(f"install.sh: error: {device}: {why} ({device}: unknown model, ")
        assert error_line(proc).endswith("; nothing was written")
    assert sha256(good_image) == before


def test_boot_entry_for_another_host_refused(media: Media, loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    before = sha256(image)
    proc = run_medium(media.unattended, [disk], "unattended.sh", cmdline="init=/x mediabuilder.host=beta quiet\n")
    assert proc.returncode == 2
    assert "the boot entry installs beta, but this medium's unattended install is alpha" in error_line(proc)
    assert sha256(image) == before


def test_damaged_medium_writes_nothing(media: Media, loops: Loops, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(media.unattended, damaged, symlinks=True)
    # A NAR of the host's, not the signed manifest's own (whose damage install.sh names otherwise).
    trust = (damaged / "manifest.storepath").read_text().strip().removeprefix("/nix/store/")[:32]
    own = next(line.split(": ", 1)[1] for line in (damaged / "cache" / f"{trust}.narinfo").read_text().splitlines()
               if line.startswith("URL: "))
    nar = next(p for p in sorted((damaged / "cache" / "nar").iterdir()) if f"nar/{p.name}" != own)
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 1
    nar.write_bytes(bytes(data))
    disk, image = loops.new("disk", GiB)
    before = sha256(image)
    proc = run_medium(damaged, [disk], "unattended.sh")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line == f"install.sh: error: cache/nar/{nar.name}: sha256 mismatch (damaged media)"
    assert f"mediabuilder: install failed: {line}" in proc.stdout.splitlines()
    assert sha256(image) == before


def test_interrupted_install_not_presented_as_installed(media: Media, loops: Loops) -> None:
    """SIGTERM once the disk is partitioned: everything unmounted, the root stays nixos-unfinished."""
    disk, image = loops.new("disk", GiB)
    work = media.unattended.parent / "interrupted-run"
    work.mkdir(exist_ok=True)
    env = make_nix_env({"MEDIABUILDER_DISKS": disk, "INSTALL_SH_CMDLINE": "/dev/null"})
    env.pop("NIX_CONFIG")
    script = ('set -e; mkdir -p "$1"; mount --bind "$2" "$1"; mount -o remount,bind,ro "$1"; '
              f'{COUNT_MNT}; before=$n; bash "$1/install.sh" --unattended & pid=$!; echo "pid $pid"; set +e; '
              f'wait $pid; rc=$?; {COUNT_MNT}; echo "mounts left: $((n - before))"; exit $rc')
    with subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", script, "_",
                           str(work / "ro"), str(media.unattended)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as child:
        assert child.stdout is not None
        seen = []
        pid = 0
        for line in child.stdout:
            seen.append(line.rstrip("\n"))
            if line.startswith("pid "):
                pid = int(line.split()[1])
            if line.startswith("==> copying"):  # partitioned, formatted and mounted
                os.kill(pid, signal.SIGTERM)  # install.sh itself, by the id its parent printed
                break
        rest = child.stdout.read().splitlines()
        assert child.wait(timeout=300) == 130, "\n".join(seen + rest)
    assert rest[-2:] == [f"install.sh: {disk}: the install failed: its root file system stays labelled "
                         "nixos-unfinished (not installed)", "mounts left: 0"]
    assert probe(image, 4096)["LABEL"] == "nixos-unfinished"
    assert not any(line.startswith("mediabuilder: installed") for line in seen + rest)


def on_a_terminal(medium: Path, disks: list[str], answers: str, *args: str) -> subprocess.CompletedProcess[str]:
    """install.sh ARGS with a real terminal (script(1) gives it a pty as /dev/tty), `answers` typed;
    no network, only `disks` are candidates."""
    install = shlex.join(["bash", str(medium / "install.sh"), "--media", str(medium), *args])
    env = make_nix_env({"MEDIABUILDER_DISKS": " ".join(disks), "INSTALL_SH_CMDLINE": "/dev/null"})
    env.pop("NIX_CONFIG")
    return subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "setsid", "script", "-qec",
                           install, "/dev/null"], input=answers, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_interactive_disk_needs_its_name_typed(media: Media, loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    key = (media.unattended / "media-key.pub").read_text().strip()
    args = ("--host", "alpha", "--disk", disk, "--layout", "bios", "--expect-key", key)
    before = sha256(image)
    proc = on_a_terminal(media.unattended, [disk], "yes\n", *args)
    out = (proc.stdout + proc.stderr).replace("\r", "")
    assert proc.returncode == 2, out
    assert "EVERYTHING ON THIS DISK WILL BE ERASED:\n" \
           f"    {disk}: unknown model, 1024 MiB (1073741824 bytes), serial none\n" in out
    assert f"install.sh: error: {disk}: not confirmed ('yes' is not {disk}); nothing was written" in out
    assert sha256(image) == before
    proc = on_a_terminal(media.unattended, [disk], f"{disk}\n", *args)
    out = (proc.stdout + proc.stderr).replace("\r", "")
    assert proc.returncode == 0, out
    assert out.splitlines()[-1] == f"mediabuilder: installed alpha onto {disk}"
    assert probe(image, 4096)["LABEL"] == "nixos"


def test_auto_with_yes_refused(media: Media, loops: Loops) -> None:
    disk, image = loops.new("disk", GiB)
    before = sha256(image)
    proc = run_medium(media.unattended, [disk], "install.sh", "--host", "alpha", "--disk", "auto", "--yes")
    assert proc.returncode == 2
    assert error_line(proc) == (f"install.sh: error: --disk auto: not with --yes: name the disk (--disk {disk}) "
                                "or confirm it on the terminal")
    assert sha256(image) == before
