"""The one stick, booted: the unattended install under QEMU onto a blank virtio disk, and the
installed disk booting by itself.

OUT.iso is the stand-in installer (tests/standin.py: systemd and Nix 2.26 as its live system)
remastered with `--unattended bootbox --install-disk auto --layout uefi` for the bootable test
host (tests/bootable_host.py). The default menu entry runs the install after the menu's timeout
and powers off; the disk is then judged on this machine (not the power-off: FIELD-NOTES): the
partition table by sfdisk, both file systems' labels by blkid, the ESP by mtools, the ext4 root
through a read-only loop device (the closure in the store's database and on disk, the system
profile, /etc/nixos and its history by git). Then the disk alone boots under UEFI (OVMF, the
removable path EFI/BOOT/BOOTX64.EFI: systemd-boot, the host's kernel and initrd), whose initrd
reports `INSTALLED: host=bootbox toplevel=...` on the serial console.

Boots (software emulation, about a minute each for the installer): BIOS+CD and UEFI+USB installs
(UEFI with a second, removable USB stick, which `auto` must pass over), each installed disk
booted under UEFI, and two disks with `auto`, refused. Every run has a hard
timeout and is killed; a failing test prints the serial console. Each boot's time is printed
(`pytest -s`) and recorded in docs/installer.md.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bootable_host
import pytest
import standin
from conftest import make_nix_env, nix, run_cli

pytestmark = pytest.mark.integration

HOST = bootable_host.HOST
GIB = 1024 ** 3
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
INSTALL_TIMEOUT = 900  # seconds: a boot, the install and the power-off under software emulation
DISK_BOOT_TIMEOUT = 300


@dataclass(frozen=True)
class Built:
    host: bootable_host.BootableHost
    iso: Path
    toplevel: str
    closure: list[str]
    inputs: list[str]  # the flake's and its inputs' store paths (nix flake archive)
    base: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("installer-boot")
    env = make_nix_env()
    host = bootable_host.make(base / "host", env)
    flake = f"{host.flake}#{HOST}"
    (result,) = json.loads(nix("nix", "build", "--no-link", "--json",
                               f"{host.flake}#nixosConfigurations.{HOST}.config.system.build.toplevel").stdout)
    toplevel = result["outputs"]["out"]
    archived = json.loads(nix("nix", "flake", "archive", "--json", host.flake).stdout)

    def paths(node: dict) -> list[str]:
        return [node["path"], *(p for sub in node.get("inputs", {}).values() for p in paths(sub))]

    iso = base / "out.iso"
    proc = run_cli("build", "--flake", flake, "--format", "iso", "--installer", standin.standin_iso(),
                   "--unattended", HOST, "--install-disk", "auto", "--layout", "uefi", "--cache", base / "cache",
                   "-o", iso, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return Built(host, iso, toplevel, sorted(nix("nix", "path-info", "-r", toplevel).stdout.split()),
                 sorted(set(paths(archived))), base)


@dataclass(frozen=True)
class Run:
    returncode: int | None  # None: killed (the pattern was seen, or the timeout hit)
    serial: str
    seconds: float


def blank_disk(path: Path, size: int = 2 * GIB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def qemu(argv: list[str], log: Path, timeout: float, until: str | None = None) -> Run:
    """Run QEMU (software emulation) until it exits, `until` shows on the serial console (then it
    is killed: a refused install keeps the machine up with a shell), or `timeout` (killed; the
    test then fails with the console)."""
    full = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1536", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{log}", *argv]
    start = time.monotonic()
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    code: int | None = None
    try:
        while True:
            try:
                code = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                pass
            text = log.read_bytes().decode(errors="replace") if log.exists() else ""
            if until is not None and until in text:
                time.sleep(3)  # the lines after it
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                pytest.fail(f"QEMU still running after {timeout} s; the serial console:\n{text[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - start
    serial = log.read_bytes().decode(errors="replace")
    if code not in (0, None):
        assert proc.stderr is not None
        pytest.fail(f"QEMU exited {code}: {proc.stderr.read().decode(errors='replace')}\n{serial[-6000:]}")
    return Run(code, serial, seconds)


def uefi(tmp: Path, name: str) -> list[str]:
    vars_fd = tmp / f"OVMF_VARS-{name}.fd"
    shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_fd)  # fresh: no boot entries, the removable path
    return ["-machine", "q35", "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", f"if=pflash,format=raw,file={vars_fd}"]


def virtio_disks(*disks: Path) -> list[str]:
    argv: list[str] = []
    for i, disk in enumerate(disks):
        argv += ["-drive", f"if=none,id=disk{i},format=raw,file={disk}",
                 "-device", f"virtio-blk-pci,drive=disk{i},serial=MBTEST-{i}"]
    return argv


def installer(firmware: str, iso: Path, tmp: Path) -> list[str]:
    """BIOS: the ISO as a CD (SeaBIOS). UEFI: as a USB stick, writable and not marked removable, so
    that only its being the boot medium keeps the guard off it (its hash is checked after)."""
    if firmware == "bios":
        return ["-cdrom", str(iso)]
    return [*uefi(tmp, "installer"), "-device", "qemu-xhci",
            "-drive", f"if=none,id=stick,format=raw,file={iso}", "-device", "usb-storage,drive=stick,removable=off"]


def console_lines(serial: str, prefix: str) -> list[str]:
    """The console's lines holding `prefix`, from where it starts (systemd's status lines or a
    terminal reset may precede it on the same line)."""
    return [ln[ln.index(prefix):].strip() for ln in serial.replace("\r", "").splitlines() if prefix in ln]


def report(what: str, run: Run) -> None:
    print(f"\nBOOT {what}: {run.seconds:.0f} s")


@dataclass(frozen=True)
class Installed:
    firmware: str
    disk: Path
    run: Run
    stick: Path | None  # UEFI: the stick the ISO was booted from
    spare: Path | None  # UEFI: a blank, writable, removable USB stick beside it


@pytest.fixture(scope="module", params=["bios", "uefi"])
def installed(request: pytest.FixtureRequest, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    firmware = request.param
    tmp = tmp_path_factory.mktemp(f"install-{firmware}")
    disk = blank_disk(tmp / "disk.img")
    stick = spare = None
    medium = built.iso
    extra: list[str] = []
    if firmware == "uefi":
        stick = tmp / "stick.img"
        shutil.copyfile(built.iso, stick)
        medium = stick
        # A removable disk is never a candidate: with it, `auto` still means the one virtio disk.
        spare = blank_disk(tmp / "spare.img", GIB)
        extra = ["-drive", f"if=none,id=spare,format=raw,file={spare}",
                 "-device", "usb-storage,drive=spare,removable=on"]
    run = qemu([*installer(firmware, medium, tmp), *extra, *virtio_disks(disk)], tmp / "serial.log", INSTALL_TIMEOUT)
    report(f"{firmware} x {'CD' if firmware == 'bios' else 'USB stick'} x {HOST}: unattended install", run)
    return Installed(firmware, disk, run, stick, spare)


def test_unattended_install_runs_and_powers_off(installed: Installed, built: Built) -> None:
    """The default entry (after the menu's timeout) boots the stock kernel line plus the
    unattended parameters; install.sh's last line names the host and the disk; QEMU exits
    (systemd.run_success_action=poweroff)."""
    serial = installed.run.serial
    assert installed.run.returncode == 0, serial[-6000:]
    cmdline = console_lines(serial, "STANDIN: cmdline: ")
    assert len(cmdline) == 1, serial[-6000:]
    words = cmdline[0].removeprefix("STANDIN: cmdline: ").split()
    assert words[1:len(standin.KERNEL_LINE.split()) + 1] == standin.KERNEL_LINE.split()
    assert (f"mediabuilder.host={HOST} mediabuilder.medium=mediabuilder mediabuilder.unattended=1 "
            "systemd.run=/iso/mediabuilder/unattended.sh systemd.run_success_action=poweroff "
            "systemd.run_failure_action=none") in cmdline[0]
    mediabuilder = console_lines(serial, "mediabuilder: ")
    assert mediabuilder[-1] == f"mediabuilder: installed {HOST} onto /dev/vda", serial[-6000:]
    assert not [ln for ln in mediabuilder if "install failed" in ln], serial[-6000:]
    if installed.stick is not None:  # the boot medium, writable, was not touched
        assert sha256(installed.stick) == sha256(built.iso)
    if installed.spare is not None:  # nor the removable stick
        assert sha256(installed.spare) == sha256(blank_disk(installed.spare.with_name("blank.img"), GIB))


@dataclass(frozen=True)
class Partition:
    start: int  # bytes
    size: int
    type: str


def partitions(disk: Path) -> tuple[str, list[Partition]]:
    table = json.loads(subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    return table["label"], [Partition(p["start"] * 512, p["size"] * 512, p["type"]) for p in table["partitions"]]


def probe(disk: Path, part: Partition) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(part.start), "-S", str(part.size), disk],
                         capture_output=True, text=True, check=True).stdout
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)


@pytest.fixture()
def root_fs(installed: Installed, tmp_path: Path) -> Iterator[Path]:
    """The installed ext4 root, mounted read-only from a read-only loop device over its partition."""
    _, parts = partitions(installed.disk)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "-o", str(parts[1].start),
                           "--sizelimit", str(parts[1].size), installed.disk],
                          capture_output=True, text=True, check=True).stdout.strip()
    mnt = tmp_path / "root"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", loop, mnt], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_disk_layout_and_esp(installed: Installed, built: Built, tmp_path: Path) -> None:
    """GPT: the ESP (512 MiB, vfat, label boot) holding systemd-boot at the removable path, the
    kernel, the initrd and the loader entry the host's switch-to-configuration wrote; the rest
    ext4 labelled nixos."""
    label, parts = partitions(installed.disk)
    assert label == "gpt"
    assert [p.type for p in parts] == [ESP_TYPE, LINUX_TYPE]
    assert parts[0].size == 512 * 1024 * 1024
    assert parts[1].start >= parts[0].start + parts[0].size and parts[1].start + parts[1].size <= 2 * GIB
    esp, root = probe(installed.disk, parts[0]), probe(installed.disk, parts[1])
    assert (esp["TYPE"], esp["LABEL"]) == ("vfat", "boot")
    assert (root["TYPE"], root["LABEL"]) == ("ext4", "nixos")
    image = f"{installed.disk}@@{parts[0].start}"
    alone = tmp_path / "esp.img"  # fsck.fat reads a whole file: the partition's bytes
    subprocess.run(["dd", f"if={installed.disk}", f"of={alone}", "bs=1M", f"skip={parts[0].start}",
                    f"count={parts[0].size}", "iflag=skip_bytes,count_bytes", "status=none"], check=True)
    fsck = subprocess.run(["fsck.fat", "-n", alone], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    alone.unlink()

    def mtype(path: str) -> bytes:
        return subprocess.run(["mtype", "-i", image, f"::{path}"], capture_output=True, check=True).stdout

    boot = Path(built.host.boot)
    efi = (boot / "systemd-bootx64.efi").read_bytes()
    assert mtype("/EFI/BOOT/BOOTX64.EFI") == efi
    assert mtype("/EFI/systemd/systemd-bootx64.efi") == efi
    top_id = Path(built.toplevel).name[:32]
    assert mtype(f"/EFI/nixos/{top_id}-linux-bzImage.efi") == (boot / "kernel").read_bytes()
    assert mtype(f"/EFI/nixos/{top_id}-initrd-initrd.efi") == (boot / "initrd").read_bytes()
    assert mtype("/loader/loader.conf") == b"timeout 0\ndefault nixos-generation-1.conf\n"
    assert mtype("/loader/entries/nixos-generation-1.conf").decode() == (
        f"title NixOS ({HOST})\nversion Generation 1 {bootable_host.VERSION}\n"
        f"linux /EFI/nixos/{top_id}-linux-bzImage.efi\ninitrd /EFI/nixos/{top_id}-initrd-initrd.efi\n"
        f"options init={built.toplevel}/init root=LABEL=nixos console=ttyS0,115200n8 mediabuilder.testhost={HOST}\n")


def test_disk_holds_closure_profile_and_flake(installed: Installed, built: Built, root_fs: Path) -> None:
    """The target's store: the closure and the flake's inputs, valid in its database and present
    on disk; the system profile points at the toplevel; /etc/nixos is the flake's repository with
    its history, clean, at the built commit."""
    db = sqlite3.connect(f"file:{root_fs}/nix/var/nix/db/db.sqlite?mode=ro&immutable=1", uri=True)
    try:
        valid = sorted(row[0] for row in db.execute("SELECT path FROM ValidPaths"))
    finally:
        db.close()
    assert set(built.closure) <= set(valid), sorted(set(built.closure) - set(valid))
    assert set(built.inputs) <= set(valid), sorted(set(built.inputs) - set(valid))
    for path in valid:
        assert (root_fs / path.lstrip("/")).exists() or (root_fs / path.lstrip("/")).is_symlink(), path
    profiles = root_fs / "nix/var/nix/profiles"
    assert (profiles / "system").readlink() == Path("system-1-link")
    assert (profiles / "system-1-link").readlink() == Path(built.toplevel)
    repo = root_fs / "etc/nixos"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", f"safe.directory={repo}", "-C", repo, *args], capture_output=True,
                              text=True, check=True).stdout

    def src_git(*args: str) -> str:
        return subprocess.run(["git", "-C", built.host.flake, *args], capture_output=True, text=True,
                              check=True).stdout

    assert git("log", "--format=%H %s") == src_git("log", "--format=%H %s")
    assert git("log", "--format=%s").splitlines() == ["lock nixpkgs", "the test host"]
    assert git("status", "--porcelain") == ""
    assert (repo / "flake.lock").read_bytes() == (built.host.flake / "flake.lock").read_bytes()


def test_installed_disk_boots_by_itself(installed: Installed, built: Built, tmp_path: Path) -> None:
    """The disk alone under UEFI with fresh firmware variables: OVMF starts systemd-boot from
    EFI/BOOT/BOOTX64.EFI, which boots the loader entry; the host's initrd reports the host, the
    toplevel, and the system profile it reads from the installed root."""
    assert installed.run.returncode == 0, "the install did not finish"
    run = qemu([*uefi(tmp_path, "disk"), *virtio_disks(installed.disk)], tmp_path / "serial.log", DISK_BOOT_TIMEOUT)
    report(f"uefi x disk x {HOST}: installed by the {installed.firmware} install", run)
    assert run.returncode == 0
    assert console_lines(run.serial, "INSTALLED: ") == [
        f"INSTALLED: host={HOST} toplevel={built.toplevel}",
        f"INSTALLED: root /dev/vda2 (LABEL=nixos): system -> system-1-link -> {built.toplevel}, "
        f"nixos-version {bootable_host.VERSION}",
    ], run.serial[-6000:]


def test_two_disks_and_auto_refused(built: Built, tmp_path: Path) -> None:
    """Two internal disks and `--install-disk auto`: refused on the console with both disks
    listed (model, size, serial), the machine stays up with a shell, and neither disk nor the
    boot medium is written."""
    disks = [blank_disk(tmp_path / f"disk{i}.img", (2 + i) * GIB) for i in range(2)]
    before = [sha256(d) for d in disks]
    run = qemu([*installer("bios", built.iso, tmp_path), *virtio_disks(*disks)], tmp_path / "serial.log",
               INSTALL_TIMEOUT, until="mediabuilder: the log is ")
    report(f"bios x CD x {HOST}: two disks, auto refused", run)
    assert run.returncode is None, "the machine powered off: a refusal must keep it up with a shell"
    failed = console_lines(run.serial, "mediabuilder: install failed: ")
    assert len(failed) == 1, run.serial[-6000:]
    assert "2 disks could be the target, name one with --disk" in failed[0]
    assert "/dev/vda: " in failed[0] and "serial MBTEST-0" in failed[0] and "(2147483648 bytes)" in failed[0]
    assert "/dev/vdb: " in failed[0] and "serial MBTEST-1" in failed[0] and "(3221225472 bytes)" in failed[0]
    assert "nothing was written" in failed[0]
    assert "/dev/sr0" not in failed[0]
    assert console_lines(run.serial, "mediabuilder: the log is ") == [
        "mediabuilder: the log is /tmp/mediabuilder-install.log"]
    assert not console_lines(run.serial, "mediabuilder: installed ")
    assert [sha256(d) for d in disks] == before
