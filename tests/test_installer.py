"""`mediabuilder build --installer NIXOS.iso --format iso`: the installer ISO remastered.

The menus are edited by parsing (unit tests on the stand-in's menus and an older layout); the
remastered stand-in ISO (tests/standin.py) is read back by xorriso, isoinfo, 7z and pycdlib,
verified with `mediabuilder verify`, and booted under QEMU (BIOS as a CD, UEFI as a USB stick),
where the stand-in's live system (systemd, Nix 2.26) reports on the serial console what it found
under /iso. The unattended install itself boots in test_installer_boot.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pytest
import standin
from conftest import EXAMPLE_HOSTS, Example, assert_one_line_error, make_nix_env, prepare_example, run_cli
from test_unattended import INSTALL as UNATTENDED_INSTALL

from mediabuilder.errors import InvalidInput, InvalidMedia
from mediabuilder.installer import layout, menus
from mediabuilder.installer.remaster import kernel_params
from mediabuilder.profile import load_profile

HOSTS = EXAMPLE_HOSTS  # alpha, beta
DEFAULT = "beta"
INSTALL = menus.Install(HOSTS, {h: kernel_params(h) for h in HOSTS}, DEFAULT)
STOCK_APPEND = f"APPEND {standin.KERNEL_LINE}"
OLD_ISOLINUX = """\
SERIAL 0 38400
TIMEOUT 100
DEFAULT boot

LABEL boot
MENU LABEL NixOS 21.11 Installer
LINUX /boot/bzImage
APPEND init=/nix/store/abc-nixos-system/init root=LABEL=nixos-21.11-x86_64 initrd=/boot/initrd
"""


# Menus, parsed (fast)


def test_isolinux_entries_copy_the_stock_default() -> None:
    text = menus.edit_isolinux(standin.ISOLINUX_CFG, INSTALL, "isolinux.cfg")
    initrd = f"INITRD /{standin.INITRD_DIR}/initrd"
    stock_end = standin.ISOLINUX_CFG.index(initrd) + len(initrd)  # the end of the stock default entry

    def entry(host: str, default: bool) -> str:
        return "\n\n" + "\n".join([f"# Install {host} offline (mediabuilder)", f"LABEL install-{host}",
                          *(["MENU DEFAULT"] if default else []), f"MENU LABEL Install {host} offline",
                          f"LINUX /{standin.KERNEL_DIR}/bzImage",
                          f"{STOCK_APPEND} mediabuilder.host={host} mediabuilder.medium=mediabuilder", initrd])

    expected = (standin.ISOLINUX_CFG[:stock_end] + entry("alpha", False) + entry("beta", True)
                + standin.ISOLINUX_CFG[stock_end:])
    assert text == expected.replace("DEFAULT boot\n", "DEFAULT install-beta\n")
    assert [ln for ln in text.splitlines() if ln.startswith("LABEL")] == [
        "LABEL boot", "LABEL install-alpha", "LABEL install-beta", "LABEL boot-nomodeset", "LABEL boot-copytoram",
        "LABEL boot-debug", "LABEL boot-serial"]


def test_isolinux_without_default_keeps_stock_default() -> None:
    text = menus.edit_isolinux(standin.ISOLINUX_CFG, menus.Install(HOSTS, INSTALL.params), "x")
    assert "DEFAULT boot" in text.splitlines()
    assert "MENU DEFAULT" not in text


def test_isolinux_older_layout_initrd_in_append() -> None:
    """21.11 and older: /boot/bzImage, the initrd as `initrd=` on APPEND, no INITRD line."""
    text = menus.edit_isolinux(OLD_ISOLINUX, menus.Install(("alpha",), {"alpha": "p=1"}), "old")
    assert text == OLD_ISOLINUX + (
        "\n# Install alpha offline (mediabuilder)\nLABEL install-alpha\nMENU LABEL Install alpha offline\n"
        "LINUX /boot/bzImage\n"
        "APPEND init=/nix/store/abc-nixos-system/init root=LABEL=nixos-21.11-x86_64 initrd=/boot/initrd p=1\n")


def test_grub_entries_copy_the_first_bootable_entry() -> None:
    text = menus.edit_grub(standin.GRUB_CFG, INSTALL, "grub.cfg")
    stock_end = standin.GRUB_CFG.index("}\n", standin.GRUB_CFG.index("menuentry 'NixOS")) + 1
    assert text.startswith(standin.GRUB_CFG[:stock_end])
    added = text[stock_end:text.index("\n\nmenuentry 'NixOS 25.05.20250601.abcdef0 Installer (nomodeset)'")]
    linux = f"  linux /{standin.KERNEL_DIR}/bzImage ${{isoboot}} {standin.KERNEL_LINE}"
    body = ("  # Fallback to UEFI console for boot, efifb sometimes has difficulties.\n"
            "  terminal_output console\n\n")
    assert added == "".join(
        f"\n\n# Install {h} offline (mediabuilder)\n"
        f"menuentry 'Install {h} offline' --class installer --id install-{h} {{\n{body}"
        f"{linux} mediabuilder.host={h} mediabuilder.medium=mediabuilder\n"
        f"  initrd /{standin.INITRD_DIR}/initrd\n}}" for h in HOSTS)
    rest = text[stock_end + len(added):]
    tail = "\n\n# mediabuilder: the default entry\nset default=install-beta\n"
    assert rest == standin.GRUB_CFG[stock_end:].rstrip("\n") + tail


def test_grub_scanner_quotes_comments_and_submenus() -> None:
    cfg = ("# menuentry 'commented' { linux /x init=/y }\n"
           "submenu 'Tricky { brace' {\n  menuentry \"in \\\"sub\\\"\" { linux /k init=/i\n initrd /r\n }\n}\n"
           "menuentry 'Real' --class x {\n  echo '}'\n  linux /k init=/i a=b\n  initrd /r\n}\n")
    out = menus.edit_grub(cfg, menus.Install(("h",), {"h": "p=1"}), "g")
    assert out == cfg[:-1] + ("\n\n# Install h offline (mediabuilder)\nmenuentry 'Install h offline' --class x "
                              "--id install-h {\n  echo '}'\n  linux /k init=/i a=b p=1\n  initrd /r\n}\n")


def test_grub_copies_drop_the_stock_id_and_hotkey() -> None:
    cfg = "menuentry 'NixOS' --class installer --hotkey=n --id 'nixos' {\n  linux /k init=/i\n  initrd /r\n}\n"
    out = menus.edit_grub(cfg, menus.Install(("h",), {"h": "p=1"}), "g")
    assert out == cfg[:-1] + ("\n\n# Install h offline (mediabuilder)\nmenuentry 'Install h offline' --class installer "
                              "--id install-h {\n  linux /k init=/i p=1\n  initrd /r\n}\n")


@pytest.mark.parametrize("cfg, message", [
    ("set timeout=1\n", "no boot entry of a NixOS installer"),
    ("menuentry 'x' { linux /k quiet\n initrd /r\n}\n", "no boot entry of a NixOS installer"),
    ("menuentry 'x' { linux /k init=/i\n", "unbalanced '{'"),
    ("menuentry 'x } { linux /k init=/i }\n", "unterminated quote"),
    ("}\n", "unbalanced '}'"),
])
def test_grub_refused(cfg: str, message: str) -> None:
    with pytest.raises(InvalidMedia, match=re.escape(message)):
        menus.edit_grub(cfg, INSTALL, "g")


def test_isolinux_refused_without_a_nixos_entry() -> None:
    with pytest.raises(InvalidMedia, match="no boot entry of a NixOS installer"):
        menus.edit_isolinux("DEFAULT x\nLABEL x\nLINUX /k\nAPPEND quiet\nINITRD /r\n", INSTALL, "i")


def test_remastered_menus_refused() -> None:
    once = menus.edit_isolinux(standin.ISOLINUX_CFG, INSTALL, "i")
    with pytest.raises(InvalidMedia, match="already has an entry install-alpha"):
        menus.edit_isolinux(once, INSTALL, "i")
    once = menus.edit_grub(standin.GRUB_CFG, INSTALL, "g")
    with pytest.raises(InvalidMedia, match="already has an entry install-alpha"):
        menus.edit_grub(once, INSTALL, "g")


@pytest.mark.parametrize("host", ["it's", "a b", "-x", "x" * 64, ""])
def test_host_names_that_cannot_name_an_entry(host: str) -> None:
    with pytest.raises(InvalidInput, match="cannot name a boot menu entry"):
        menus.check_host(host)


def test_profile_installer_relative_to_the_profile(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[media]\nformat = "iso"\ninstaller = "isos/nixos.iso"\nboot_default = "beta"\n')
    media = load_profile(tmp_path / "p.toml").media
    assert (media.installer, media.boot_default) == (tmp_path.resolve() / "isos" / "nixos.iso", "beta")


# The remastered stand-in (integration)


@dataclass(frozen=True)
class Remastered:
    stock: Path
    out: Path
    key: Path
    base: Path


@pytest.fixture(scope="module")
def remastered(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Remastered:
    stock = standin.standin_iso()
    base = tmp_path_factory.mktemp("installer")
    out = base / "out.iso"
    proc = run_cli("build", *[a for h in HOSTS for a in ("--flake", f"{example.flake}#{h}")], "--format", "iso",
                   "--installer", stock, "--boot-default", DEFAULT, "--cache", base / "cache", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return Remastered(stock, out, base / "cache" / "signing-key.pub", base)


def test_two_remasters_give_the_same_bytes(example: Example, remastered: Remastered, tmp_path: Path) -> None:
    """Another cache, another directory, another time zone, later: the same ISO, byte for byte
    (xorriso's dates, the volume UUID and efi.img's edited grub.cfg all take the flake's date)."""
    time.sleep(1.1)
    again = tmp_path / "again.iso"
    proc = run_cli("build", *[a for h in HOSTS for a in ("--flake", f"{example.flake}#{h}")], "--format", "iso",
                   "--installer", remastered.stock, "--boot-default", DEFAULT, "--cache", tmp_path / "cache",
                   "--key", remastered.base / "cache" / "signing-key.sec", "-o", again,
                   env=make_nix_env({"TZ": "IST-5:30"}))
    assert proc.returncode == 0, proc.stderr
    assert again.stat().st_size == remastered.out.stat().st_size
    assert again.read_bytes() == remastered.out.read_bytes()
    same = run_cli("verify", remastered.out, "--against", again)
    assert same.returncode == 0, same.stdout + same.stderr


def xorriso_report(iso: Path) -> list[str]:
    proc = subprocess.run(["xorriso", "-report_about", "WARNING", "-indev", iso, "-report_el_torito", "as_mkisofs",
                           "-report_system_area", "plain"], capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def extract(iso: Path, path: str, dest: Path) -> Path:
    subprocess.run(["xorriso", "-report_about", "FAILURE", "-osirrox", "on", "-indev", iso,
                    "-extract", path, dest], check=True, capture_output=True)
    return dest


def mtype(image: Path, path: str) -> bytes:
    return subprocess.run(["mtype", "-i", image, path], capture_output=True, check=True).stdout


@pytest.mark.integration
def test_boot_structures_preserved(remastered: Remastered) -> None:
    before, after = xorriso_report(remastered.stock), xorriso_report(remastered.out)

    def el_torito(lines: list[str]) -> list[str]:  # without the volume's date, which is the flake's now
        start = lines.index("-V 'nixos-minimal-25.05-x86_64'")
        end = next(i for i, ln in enumerate(lines) if ln.startswith("System area options"))
        return [ln.replace(str(remastered.out), "ISO").replace(str(remastered.stock), "ISO") for ln in lines[start:end]
                if not ln.startswith("--modification-date=")]

    assert el_torito(after) == el_torito(before)
    assert "--modification-date='2025060100000000'" in before
    assert "--modification-date='2023110610000000'" in after  # the example flake's commit time
    assert "-b '/isolinux/isolinux.bin'" in after and "-e '/boot/efi.img'" in after
    assert "System area summary: MBR isohybrid cyl-align-on GPT" in after

    def table(lines: list[str]) -> list[list[str]]:  # partition rows without sizes, which grew
        rows = [ln.split() for ln in lines if ln.startswith(("MBR partition ", "GPT partition ", "GPT type",
                                                              "GPT disk GUID"))]
        return [r[:6] if r[0] == "MBR" and r[1] == "partition" and r[2] == ":" else r for r in rows]

    assert table(after) == table(before)
    # efi.img: the EFI El Torito entry and MBR partition 2 both point at the file, as in the input.
    part2 = next(ln.split() for ln in after if ln.startswith("MBR partition      :   2"))
    lba = subprocess.run(["xorriso", "-report_about", "FAILURE", "-indev", remastered.out, "-find", "/boot/efi.img",
                          "-exec", "report_lba"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"File data lba:\s+0\s*,\s*(\d+)\s*,\s*(\d+)\s*,", lba)
    assert found is not None, lba
    assert (int(part2[6]), int(part2[7])) == (int(found.group(1)) * 4, int(found.group(2)) * 4)
    # The label, by isoinfo (PVD), 7z and pycdlib.
    pvd = subprocess.run(["isoinfo", "-d", "-i", remastered.out], capture_output=True, text=True, check=True).stdout
    assert "Volume id: nixos-minimal-25.05-x86_64" in pvd.splitlines()
    sevenz = subprocess.run(["7z", "l", remastered.out], capture_output=True, text=True, check=True).stdout
    assert "mediabuilder/install.sh" in sevenz and "boot/efi.img" in sevenz
    iso = pycdlib.PyCdlib()
    iso.open(str(remastered.out))
    try:
        assert iso.pvd.volume_identifier.decode().rstrip() == "nixos-minimal-25.05-x86_64"
        catalog = iso.eltorito_boot_catalog
        assert catalog is not None and len(catalog.sections) == 1 and len(catalog.sections[0].section_entries) == 1
        assert catalog.sections[0].platform_id == 0xEF
        efi_record = iso.get_record(rr_path="/boot/efi.img")
        assert catalog.sections[0].section_entries[0].load_rba == efi_record.extent_location()
    finally:
        iso.close()


@pytest.mark.integration
def test_menus_in_all_three_places(remastered: Remastered, tmp_path: Path) -> None:
    isolinux = subprocess.run(["isoinfo", "-R", "-x", "/isolinux/isolinux.cfg", "-i", remastered.out],
                              capture_output=True, text=True, check=True).stdout
    assert isolinux == menus.edit_isolinux(standin.ISOLINUX_CFG, INSTALL, "x")
    grub = subprocess.run(["7z", "e", "-so", remastered.out, "EFI/BOOT/grub.cfg"],
                          capture_output=True, text=True, check=True).stdout
    assert grub == menus.edit_grub(standin.GRUB_CFG, INSTALL, "x")
    before = extract(remastered.stock, "/boot/efi.img", tmp_path / "stock-efi.img")
    after = extract(remastered.out, "/boot/efi.img", tmp_path / "efi.img")
    assert after.stat().st_size == before.stat().st_size
    assert mtype(after, "::/EFI/BOOT/grub.cfg") == grub.encode()
    assert mtype(after, "::/EFI/BOOT/BOOTX64.EFI") == mtype(before, "::/EFI/BOOT/BOOTX64.EFI")
    fsck = subprocess.run(["fsck.fat", "-n", after], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


@pytest.mark.integration
def test_originals_kept_and_medium_verifies(remastered: Remastered, tmp_path: Path) -> None:
    def listing(path: Path) -> dict[str, str]:  # every file's sha256, read by pycdlib
        iso = pycdlib.PyCdlib()
        iso.open(str(path))
        found = {}
        try:
            for top, _, names in iso.walk(rr_path="/"):
                for name in names:
                    data = io.BytesIO()
                    iso.get_file_from_iso_fp(data, rr_path=f"{top.rstrip('/')}/{name}")
                    found[f"{top.rstrip('/')}/{name}"] = hashlib.sha256(data.getvalue()).hexdigest()
        finally:
            iso.close()
        return found

    stock, out = listing(remastered.stock), listing(remastered.out)
    # The menus and efi.img, edited; the boot catalog and isolinux.bin's boot info table (bytes 8-63:
    # its own and the PVD's block addresses), which xorriso writes for the new layout.
    changed = {"/isolinux/isolinux.cfg", "/EFI/BOOT/grub.cfg", "/boot/efi.img", "/.boot.cat", "/isolinux/isolinux.bin"}
    assert {p: h for p, h in out.items() if p in stock and p not in changed} == \
        {p: h for p, h in stock.items() if p not in changed}
    assert {p.split("/")[1] for p in out if p not in stock} == {"mediabuilder"}
    bins = [subprocess.run(["isoinfo", "-R", "-x", "/isolinux/isolinux.bin", "-i", iso], capture_output=True,
                           check=True).stdout for iso in (remastered.stock, remastered.out)]
    assert bins[0][:8] + bins[0][64:] == bins[1][:8] + bins[1][64:] and bins[0] != bins[1]
    bins = [subprocess.run(["isoinfo", "-R", "-x", "/isolinux/isolinux.bin", "-i", iso], capture_output=True,
                           check=True).stdout for iso in (remastered.stock, remastered.out)]
    assert bins[0][:8] + bins[0][64:] == bins[1][:8] + bins[1][64:] and bins[0] != bins[1]
    proc = run_cli("verify", remastered.out, "--trusted-key", remastered.key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert re.search(r"out\.iso: \d+ paths, .* of NAR: ok$", proc.stderr.strip()), proc.stderr
    inspect = run_cli("inspect", remastered.out)
    assert inspect.returncode == 0, inspect.stderr
    assert "alpha" in inspect.stdout and "beta" in inspect.stdout


def plain_iso(tmp_path: Path, files: dict[str, str]) -> Path:
    tree = tmp_path / "plain"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    out = tmp_path / "plain.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-R", "-J", "-V", "PLAIN", "-o", out, tree], check=True,
                   capture_output=True)
    return out


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["plain", "no-menuentry", "random", "empty", "remastered"])
def test_refuses_what_is_not_a_nixos_installer(example: Example, remastered: Remastered, tmp_path: Path,
                                                kind: str) -> None:
    if kind == "plain":
        iso, needle = plain_iso(tmp_path, {"README": "hi\n"}), "no El Torito BIOS boot entry"
    elif kind == "no-menuentry":
        tree = tmp_path / "tree"
        subprocess.run(["xorriso", "-report_about", "FAILURE", "-osirrox", "on", "-indev", remastered.stock,
                        "-extract", "/", tree], check=True, capture_output=True)
        subprocess.run(["chmod", "-R", "u+w", tree], check=True)
        (tree / "EFI/BOOT/grub.cfg").write_text("set timeout=1\n")
        iso = tmp_path / "bad.iso"
        args = standin.xorriso_args(tree, iso)
        subprocess.run(args, check=True, capture_output=True)
        needle = "EFI/BOOT/grub.cfg: no boot entry of a NixOS installer"
    elif kind == "random":
        iso = tmp_path / "random.iso"
        iso.write_bytes(bytes(range(256)) * 4096)
        needle = "not readable as an ISO 9660 image"
    elif kind == "empty":
        iso = tmp_path / "empty.iso"
        iso.write_bytes(b"")
        needle = "not readable as an ISO 9660 image"
    else:
        iso, needle = remastered.out, "already has a /mediabuilder directory"
    out = tmp_path / "out.iso"
    proc = run_cli("build", "--flake", f"{example.flake}#alpha", "--format", "iso", "--installer", iso,
                   "--cache", remastered.base / "cache", "-o", out)
    assert_one_line_error(proc, str(iso), needle)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
@pytest.mark.parametrize("args, needle", [
    (("--format", "fat32"), "needs --format iso, not fat32"),
    (("--format", "iso", "--label", "OTHER"), "keeps the installer's own label"),
    (("--format", "iso", "--boot-default", "gamma"), "--boot-default gamma: not one of the hosts (alpha)"),
])
def test_refused_flags(example: Example, remastered: Remastered, tmp_path: Path, args: tuple[str, ...],
                       needle: str) -> None:
    out = tmp_path / "out.iso"
    proc = run_cli("build", "--flake", f"{example.flake}#alpha", "--installer", remastered.stock, *args,
                   "--cache", remastered.base / "cache", "-o", out)
    assert_one_line_error(proc, needle)
    assert not out.exists()


# Boots (QEMU, software emulation: about a minute each)


def boot(iso: Path, firmware: str, tmp_path: Path) -> list[str]:
    """Boot `iso` until the stand-in powers off; its STANDIN: lines from the serial console."""
    log = tmp_path / f"serial-{firmware}.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", f"file:{log}"]
    if firmware == "bios":
        argv += ["-cdrom", str(iso)]
    else:
        vars_fd = tmp_path / "OVMF_VARS.fd"
        shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_fd)
        argv += ["-machine", "q35",
                 "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                 "-drive", f"if=pflash,format=raw,file={vars_fd}",
                 "-device", "qemu-xhci", "-drive", f"if=none,id=stick,format=raw,readonly=on,file={iso}",
                 "-device", "usb-storage,drive=stick"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    serial = log.read_bytes().decode(errors="replace")
    assert proc.returncode == 0, proc.stderr + serial[-3000:]
    # From where the marker starts: the serial getty's terminal resets may precede it on a line.
    return [ln[ln.index("STANDIN: "):].strip() for ln in serial.splitlines() if "STANDIN: " in ln]


@pytest.mark.integration
@pytest.mark.parametrize("firmware, device", [("bios", "/dev/sr0"), ("uefi", "/dev/sda")])
def test_boots_into_the_install_entry(remastered: Remastered, tmp_path: Path, firmware: str, device: str) -> None:
    """BIOS (SeaBIOS) from the ISO as a CD, UEFI (OVMF) from it as a USB stick: the default entry
    (--boot-default beta) boots the stock kernel with the install's parameters; the initrd finds
    the ISO by its label and switches to the live system, where systemd (PID 1) and Nix 2.26 run
    and a unit finds the medium under /iso/mediabuilder."""
    manifest = subprocess.run(["isoinfo", "-R", "-x", "/mediabuilder/manifest.json", "-i", remastered.out],
                              capture_output=True, check=True).stdout
    lines = boot(remastered.out, firmware, tmp_path)
    cmdline = lines[0].removeprefix("STANDIN: cmdline: ").split()
    stock = standin.KERNEL_LINE.split()
    assert cmdline[0] == f"BOOT_IMAGE=/{standin.KERNEL_DIR}/bzImage"
    assert cmdline[1:1 + len(stock)] == stock
    assert cmdline[1 + len(stock):3 + len(stock)] == ["mediabuilder.host=beta", "mediabuilder.medium=mediabuilder"]
    assert lines[1:] == [
        f"STANDIN: mounted {device} (label nixos-minimal-25.05-x86_64) at /iso",
        "STANDIN: live system: PID 1 systemd, systemd 257, nix (Nix) 2.26.3",
        f"STANDIN: /iso is {device} iso9660 (ro), / is overlay",
        "STANDIN: medium at /iso/mediabuilder for host beta: README.txt cache flake install-disk.sh "
        "install-host.sh install-rebuild.sh install-upgrade.sh install.sh manifest.json manifest.storepath "
        "media-key.pub registry.json",
        f"STANDIN: manifest.json sha256 {hashlib.sha256(manifest).hexdigest()}",
        "STANDIN: done",
    ]


@pytest.mark.integration
def test_remastered_menus_default_to_the_unattended_entry(tmp_path: Path) -> None:
    """(test_unattended.py's, here because the stand-in is built on the host only.) The stand-in
    installer remastered with --unattended: all three menus as menus.py edits
    them, with the unattended entry the default, and unattended.sh on the medium, signed."""
    prepare_example(tmp_path / "example")
    flake = tmp_path / "example" / "flake"
    stock = standin.standin_iso()
    out = tmp_path / "out.iso"
    proc = run_cli("build", *[a for h in EXAMPLE_HOSTS for a in ("--flake", f"{flake}#{h}")], "--format", "iso",
                   "--installer", stock, "--cache", tmp_path / "cache", "-o", out,
                   "--unattended", "alpha", "--install-disk", "auto", "--layout", "bios")
    assert proc.returncode == 0, proc.stderr

    def read(path: str) -> str:
        return subprocess.run(["isoinfo", "-R", "-x", path, "-i", out], capture_output=True, text=True,
                              check=True).stdout

    assert read("/isolinux/isolinux.cfg") == menus.edit_isolinux(standin.ISOLINUX_CFG, UNATTENDED_INSTALL, "x")
    grub = read("/EFI/BOOT/grub.cfg")
    assert grub == menus.edit_grub(standin.GRUB_CFG, UNATTENDED_INSTALL, "x")
    efi = tmp_path / "efi.img"
    subprocess.run(["xorriso", "-report_about", "FAILURE", "-osirrox", "on", "-indev", out, "-extract",
                    "/boot/efi.img", efi], check=True, capture_output=True)
    assert subprocess.run(["mtype", "-i", efi, "::/EFI/BOOT/grub.cfg"], capture_output=True, text=True,
                          check=True).stdout == grub
    manifest = json.loads(read("/mediabuilder/manifest.json"))
    script = read("/mediabuilder/unattended.sh")
    assert script == (Path(layout.__file__).parent.parent / "media" / "unattended.sh").read_text()
    assert manifest["files"]["unattended.sh"]["sha256"] == hashlib.sha256(script.encode()).hexdigest()
    assert manifest["install"]["unattended"] == "alpha" and manifest["install"]["layout"] == "bios"
    verified = run_cli("verify", out, "--trusted-key", tmp_path / "cache" / "signing-key.pub")
    assert verified.returncode == 0, verified.stdout + verified.stderr
