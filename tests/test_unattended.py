"""Unattended installs and disk layouts, the build side: the menus' unattended entry, the
layout check against a host's fileSystems, the signed install record, the refusals before any
work, and a host with disko-style scripts (made by the test in a flake of its own) installed
from its own script onto a loop device."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import standin
from conftest import EXAMPLE_HOSTS, assert_one_line_error, closure_of, prepare_example, run_cli
from test_partition import LINUX, Loops, in_root, partitions, probe, run_medium

from mediabuilder.errors import InvalidInput
from mediabuilder.installer import layout, menus
from mediabuilder.installer.remaster import kernel_params, unattended_params
from mediabuilder.profile import InstallSettings, Layout, load_profile

UNATTENDED = ("mediabuilder.host=alpha mediabuilder.medium=mediabuilder mediabuilder.unattended=1 "
              "systemd.run=/iso/mediabuilder/unattended.sh systemd.run_success_action=poweroff "
              "systemd.run_failure_action=none")
INSTALL = menus.Install(EXAMPLE_HOSTS, {h: kernel_params(h) for h in EXAMPLE_HOSTS}, None, "alpha",
                        unattended_params("alpha"))
UEFI_FS = {"/": {"device": "/dev/disk/by-label/nixos", "fsType": "ext4", "label": None},
           "/boot": {"device": "/dev/disk/by-label/boot", "fsType": "vfat", "label": None}}


# The menus (fast)


def test_unattended_params() -> None:
    assert unattended_params("alpha") == UNATTENDED
    assert '"' not in UNATTENDED and "'" not in UNATTENDED  # quotes break the unit's ExecStart


def test_isolinux_unattended_entry_is_the_default() -> None:
    text = menus.edit_isolinux(standin.ISOLINUX_CFG, INSTALL, "isolinux.cfg")
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("LABEL")][:4] == [
        "LABEL boot", "LABEL install-alpha", "LABEL install-beta", "LABEL install-alpha-unattended"]
    assert "DEFAULT install-alpha-unattended" in lines
    start = lines.index("LABEL install-alpha-unattended")
    block = lines[start:lines.index("", start)]
    assert block == ["LABEL install-alpha-unattended", "MENU DEFAULT", "MENU LABEL Install alpha offline (unattended)",
                     f"LINUX /{standin.KERNEL_DIR}/bzImage", f"APPEND {standin.KERNEL_LINE} {UNATTENDED}",
                     f"INITRD /{standin.INITRD_DIR}/initrd"]
    assert lines.count("MENU DEFAULT") == 1


def test_grub_unattended_entry_is_the_default() -> None:
    text = menus.edit_grub(standin.GRUB_CFG, INSTALL, "grub.cfg")
    assert text.endswith("\n\n# mediabuilder: the default entry\nset default=install-alpha-unattended\n")
    head = "menuentry 'Install alpha offline (unattended)' --class installer --id install-alpha-unattended {"
    body = text[text.index(head):]
    body = body[:body.index("\n}") + 2]
    linux = f"  linux /{standin.KERNEL_DIR}/bzImage ${{isoboot}} {standin.KERNEL_LINE} {UNATTENDED}"
    assert linux in body.splitlines()
    assert text.count("--id install-alpha ") == 1  # the interactive entry stays as it was


# Layouts (fast)


def test_file_systems_that_fit() -> None:
    layout.check_file_systems("h", Layout.UEFI, UEFI_FS)
    layout.check_file_systems("h", Layout.UEFI, {"/": {"device": None, "label": "nixos", "fsType": "ext4"},
                                                 "/tmp": {"device": "tmpfs", "fsType": "tmpfs", "label": None}})
    layout.check_file_systems("h", Layout.BIOS, {"/": UEFI_FS["/"]})
    layout.check_file_systems("h", Layout.BIOS, {})  # none declared: nothing to compare
    layout.check_file_systems("h", Layout.BIOS, None)  # no such option
    layout.check_file_systems("h", Layout.DISKO, {"/": {"device": "/dev/vda9", "fsType": "xfs"}})


@pytest.mark.parametrize(("chosen", "fs", "message"), [
    (Layout.UEFI, {**UEFI_FS, "/": {"device": "/dev/disk/by-label/root", "fsType": "ext4"}},
     'host h: fileSystems."/" is /dev/disk/by-label/root (ext4), but layout uefi makes /dev/disk/by-label/nixos '
     "(ext4): the installed system would not boot"),
    (Layout.UEFI, {**UEFI_FS, "/": {"device": "/dev/disk/by-label/nixos", "fsType": "btrfs"}},
     'host h: fileSystems."/" is /dev/disk/by-label/nixos (btrfs), but layout uefi makes'),
    (Layout.BIOS, UEFI_FS,
     'host h: fileSystems."/boot" is on /dev/disk/by-label/boot, which layout bios does not make'),
    (Layout.UEFI, {**UEFI_FS, "/home": {"device": "/dev/sdb1", "fsType": "ext4"}},
     'host h: fileSystems."/home" is on /dev/sdb1, which layout uefi does not make'),
    (Layout.UEFI, {"/boot": UEFI_FS["/boot"]}, 'host h: fileSystems has no "/"'),
])
def test_file_systems_that_do_not_fit(chosen: Layout, fs: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        layout.check_file_systems("h", chosen, fs)
    assert str(info.value).startswith(message)


def test_install_record() -> None:
    record = layout.InstallRecord("alpha", "auto", {"alpha": layout.HostLayout(Layout.BIOS),
                                                    "beta": layout.HostLayout(Layout.UEFI)})
    assert record.table() == "unattended\talpha\ndisk\tauto\nhost\talpha\tbios\nhost\tbeta\tuefi\n"
    assert record.to_json() == {"unattended": "alpha", "disk": "auto", "layout": "bios",
                                "hosts": {"alpha": {"layout": "bios", "disko": None},
                                          "beta": {"layout": "uefi", "disko": None}}}
    assert layout.InstallRecord("", "", {"a": layout.HostLayout(Layout.UEFI)}).table() == "host\ta\tuefi\n"


@pytest.mark.parametrize(("settings", "message"), [
    (InstallSettings("alpha"), "--unattended alpha: needs --install-disk DEVICE or auto"),
    (InstallSettings("gamma", "auto"), "--unattended gamma: not one of the hosts (alpha, beta)"),
    (InstallSettings("", "auto"), "--install-disk auto: only with --unattended HOST"),
    (InstallSettings("alpha", "sda"), "--install-disk sda: not a device path such as /dev/vda, nor auto"),
    (InstallSettings("alpha", "/dev/../etc/passwd"), "--install-disk /dev/../etc/passwd: not a device path"),
])
def test_settings_refused(settings: InstallSettings, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        layout.check_settings(settings, list(EXAMPLE_HOSTS), installer=False, boot_default="")
    assert str(info.value).startswith(message)


def test_profile_install_section(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[install]\nunattended = "alpha"\ndisk = "auto"\nlayout = "bios"\n')
    assert load_profile(tmp_path / "p.toml").install == InstallSettings("alpha", "auto", Layout.BIOS)


def test_boot_default_and_unattended_refused() -> None:
    with pytest.raises(InvalidInput, match="--boot-default beta: not with --unattended"):
        layout.check_settings(InstallSettings("alpha", "/dev/vda"), list(EXAMPLE_HOSTS), installer=True,
                              boot_default="beta")


@pytest.mark.parametrize(("args", "message"), [
    (("--unattended", "alpha"), "--unattended alpha: needs --install-disk DEVICE or auto"),
    (("--unattended", "gamma", "--install-disk", "auto"), "--unattended gamma: not one of the hosts (alpha)"),
    (("--install-disk", "/dev/vda"), "--install-disk /dev/vda: only with --unattended HOST"),
    (("--layout", "mbr"), "argument --layout: invalid choice: 'mbr'"),
])
def test_cli_refuses_before_any_work(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "flake").mkdir()
    (tmp_path / "flake" / "flake.nix").write_text("{ outputs = _: { }; }\n")  # never evaluated
    proc = run_cli("build", "--flake", f"{tmp_path}/flake#alpha", "--cache", tmp_path / "cache",
                   "-o", tmp_path / "out", *args)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


# A flake of the test's own: hosts with fileSystems and with disko-style scripts


def add_host(flake: Path, name: str, module: str, build: str = "", disko_disks: dict[str, str] | None = None) -> None:
    """Host `name` of `module` in the flake, committed. `build` (a file taking the host's pkgs):
    a script added to its config.system.build as `destroyFormatMount`, as disko adds its own (the
    example's small module system builds config.system.build itself, so the flake adds it);
    `disko_disks`: config.disko.devices.disk, as disko's module declares the disks it erases."""
    (flake / "hosts" / f"{name}.nix").write_text(module)
    host = f'mkHost "{name}" ./hosts/{name}.nix'
    if build:
        (flake / "hosts" / f"{name}-disko.nix").write_text(build)
        script = f"destroyFormatMount = import ./hosts/{name}-disko.nix s.pkgs;"
        disks = " ".join(f"{json.dumps(d)}.device = {json.dumps(dev)};" for d, dev in (disko_disks or {}).items())
        devices = f"disko.devices.disk = {{ {disks} }}; " if disko_disks is not None else ""
        host = (f"let s = {host}; in s // {{ config = s.config // {{ {devices}system = s.config.system // {{ build = "
                f"s.config.system.build // {{ {script} }}; }}; }}; }}")
    text = (flake / "flake.nix").read_text()
    anchor = '        beta = mkHost "beta" ./hosts/beta.nix;\n'
    (flake / "flake.nix").write_text(text.replace(anchor, f"{anchor}        {name} = {host};\n"))
    subprocess.run(["git", "-C", str(flake), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(flake), "-c", "user.name=Admin", "-c", "user.email=admin@example.invalid",
                    "commit", "-q", "-m", f"Add host {name}"], check=True)


@pytest.mark.integration
def test_file_systems_mismatch_refused(tmp_path: Path) -> None:
    prepare_example(tmp_path / "example")
    flake = tmp_path / "example" / "flake"
    add_host(flake, "gamma", '{ fileSystems."/" = { device = "/dev/disk/by-label/root"; fsType = "ext4"; }; }\n')
    proc = run_cli("build", f"--flake={flake}#gamma", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                   "--unattended", "gamma", "--install-disk", "auto")
    assert_one_line_error(proc, 'host gamma: fileSystems."/" is /dev/disk/by-label/root (ext4), but layout uefi '
                                "makes /dev/disk/by-label/nixos (ext4): the installed system would not boot")
    assert not (tmp_path / "media").exists()
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                   "--layout", "disko")
    assert_one_line_error(proc, "--layout disko: host alpha has no disko script in config.system.build (it has none)")


DISKO_HOST = """\
# A host with disko: its fileSystems as disko declares them (the script is in delta-disko.nix).
{ fileSystems."/" = { device = "/dev/disk/by-label/disko-root"; fsType = "ext4"; }; }
"""
DISKO_SCRIPT = """\
# A disko-style script (config.system.build.destroyFormatMount): it erases {disk}, makes one GPT
# partition with ext4 labelled disko-root and mounts it at /mnt; its tools from PATH, as disko's
# NoDeps scripts.
pkgs: pkgs.writeScript "disko-destroy-format-mount" ''
  #!/bin/sh
  set -eu
  wipefs --all --quiet {disk}
  printf 'label: gpt\\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=disko-root\\n' | sfdisk --quiet {disk}
  partx -u {disk}
  mkfs.ext4 -q -F -L disko-root {disk}p1
  mkdir -p /mnt
  mount {disk}p1 /mnt
''
"""


@pytest.mark.integration
def test_disko_host_installs_with_its_own_script(tmp_path: Path) -> None:
    loops = Loops(tmp_path)
    try:
        disk, image = loops.new("disk", 1024**3)
        prepare_example(tmp_path / "example")
        flake = tmp_path / "example" / "flake"
        add_host(flake, "delta", DISKO_HOST, DISKO_SCRIPT.format(disk=disk))
        proc = run_cli("build", f"--flake={flake}#delta", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                       "--unattended", "delta", "--install-disk", disk)
        assert proc.returncode == 0, proc.stderr
        assert "Choosing disk layouts … delta disko" in proc.stderr
        assert (f"warning: host delta: its disko script names no config.disko.devices: install.sh's disk guard "
                f"checks {disk}, not what the script erases") in proc.stderr
        toplevel = proc.stdout.split("\t")[1].strip()
        manifest = json.loads((tmp_path / "media" / "manifest.json").read_text())
        script = manifest["install"]["hosts"]["delta"]["disko"]
        assert manifest["install"] == {"unattended": "delta", "disk": disk, "layout": "disko",
                                       "hosts": {"delta": {"layout": "disko", "disko": script}}}
        assert script.endswith("-disko-destroy-format-mount") and script in manifest["store_paths"]
        run = run_medium(tmp_path / "media", [disk], "unattended.sh")
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines()[-2:] == [f"mediabuilder: installed delta onto {disk}", "mounts left: 0"]
        assert partitions(image) == [(2048, 2 * 1024**3 // 1024 - 4096, LINUX, "disko-root")]
        assert probe(image, 2048)["LABEL"] == "disko-root"
        closure = in_root(image, 2048, "bash", "-c", 'nix --store "$ROOT" path-info -r "$0"', toplevel)
        assert sorted(closure.stdout.split()) == closure_of(toplevel), closure.stderr
    finally:
        loops.close()


@pytest.mark.integration
def test_disko_disks_are_the_ones_guarded(tmp_path: Path) -> None:
    """A disko host whose configuration names its disk (config.disko.devices): the build refuses
    another --install-disk; the record carries the disk; install.sh's guard checks that disk
    (auto means it, even with a second candidate, which stays untouched) and refuses it when it
    is not a candidate, writing nothing."""
    loops = Loops(tmp_path)
    try:
        disk, image = loops.new("disk", 1024**3)
        other, other_image = loops.new("other", 512 * 1024**2)
        prepare_example(tmp_path / "example")
        flake = tmp_path / "example" / "flake"
        add_host(flake, "delta", DISKO_HOST, DISKO_SCRIPT.format(disk=disk), {"main": disk})
        proc = run_cli("build", f"--flake={flake}#delta", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                       "--unattended", "delta", "--install-disk", other)
        assert_one_line_error(proc, f"--install-disk {other}: host delta's disko configuration partitions {disk}, "
                                    f"not {other}")
        assert not (tmp_path / "media").exists()
        proc = run_cli("build", f"--flake={flake}#delta", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                       "--unattended", "delta", "--install-disk", "auto")
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr
        manifest = json.loads((tmp_path / "media" / "manifest.json").read_text())
        script = manifest["install"]["hosts"]["delta"]["disko"]
        assert manifest["install"] == {"unattended": "delta", "disk": "auto", "layout": "disko",
                                       "hosts": {"delta": {"layout": "disko", "disko": script,
                                                           "disko_devices": [disk]}}}
        shown = run_cli("inspect", tmp_path / "media")
        assert f"layout delta: disko ({script}; erases {disk})" in shown.stdout.splitlines(), shown.stdout
        assert json.loads(run_cli("inspect", "--json", tmp_path / "media").stdout)["install"]["hosts"] == {
            "delta": {"layout": "disko", "disko": script, "disko_devices": [disk]}}
        hosts = {"delta": layout.HostLayout(Layout.DISKO, None, script, (disk,))}
        assert layout.InstallRecord("delta", "auto", hosts).table() == (
            f"unattended\tdelta\ndisk\tauto\nhost\tdelta\tdisko\t{script}\ndisko-device\tdelta\t{disk}\n")

        # Not a candidate (read-only): refused, naming it; nothing written to either disk.
        before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (image, other_image)}
        subprocess.run(["blockdev", "--setro", disk], check=True)
        run = run_medium(tmp_path / "media", [disk, other], "unattended.sh")
        subprocess.run(["blockdev", "--setrw", disk], check=True)
        assert run.returncode != 0
        assert (f"mediabuilder: install failed: install.sh: error: {disk}: host delta's disko configuration erases "
                f"{disk}, which is read-only ({disk}: unknown model, 1024 MiB (1073741824 bytes), serial none: "
                "not a candidate, read-only); nothing was written") in run.stdout.splitlines(), run.stdout
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (image, other_image)} == before

        # auto is the disk the configuration names, though two disks are candidates.
        run = run_medium(tmp_path / "media", [disk, other], "unattended.sh")
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines()[-2:] == [f"mediabuilder: installed delta onto {disk}", "mounts left: 0"]
        assert partitions(image) == [(2048, 2 * 1024**3 // 1024 - 4096, LINUX, "disko-root")]
        assert hashlib.sha256(other_image.read_bytes()).hexdigest() == before[other_image]
    finally:
        loops.close()


@pytest.mark.integration
def test_disko_device_not_under_dev_refused(tmp_path: Path) -> None:
    prepare_example(tmp_path / "example")
    flake = tmp_path / "example" / "flake"
    add_host(flake, "delta", DISKO_HOST, DISKO_SCRIPT.format(disk="/dev/vda"), {"main": "$(touch /tmp/x)"})
    proc = run_cli("build", f"--flake={flake}#delta", "--cache", tmp_path / "cache", "-o", tmp_path / "media",
                   "--unattended", "delta", "--install-disk", "auto")
    assert_one_line_error(proc, 'host delta: config.disko.devices.disk.main.device is "$(touch /tmp/x)", not a '
                                "device path under /dev that install.sh's disk guard can check")
    assert not (tmp_path / "media").exists()
