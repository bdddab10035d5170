"""How install.sh lays out the target disk: the layouts, each host's choice, the check that the
host's own `fileSystems` fit it, and the install record the signed manifest carries.

    uefi   GPT: 1 = ESP 512 MiB vfat `boot` (/boot), 2 = the rest, ext4 `nixos` (/)
    bios   GPT: 1 = BIOS boot partition 1 MiB (GRUB's core.img), 2 = the rest, ext4 `nixos` (/)
    disko  the host's own disko script (config.system.build), shipped in the media cache

A host whose configuration has disko scripts defaults to "disko", any other to "uefi". A layout
the host's `fileSystems` contradict is refused at build time: the installed system would not
find its root or its /boot.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mediabuilder import nixcli
from mediabuilder import run as runner
from mediabuilder.errors import InternalError, InvalidInput
from mediabuilder.profile import InstallSettings, Layout
from mediabuilder.store.storepath import StorePath

# disko's scripts in config.system.build, the one install.sh runs first (FIELD-NOTES): each
# destroys what is on the disk, partitions, formats and mounts at /mnt.
DISKO_SCRIPTS = ("destroyFormatMount", "diskoScript")
DISKO_NAMES = (*DISKO_SCRIPTS, "format", "mount", "formatMount", "destroy", "formatScript", "mountScript",
               "diskoScriptNoDeps", "destroyFormatMountNoDeps")
# What each layout makes: mount point -> (label, fsType).
MADE: dict[Layout, dict[str, tuple[str, str]]] = {
    Layout.UEFI: {"/": ("nixos", "ext4"), "/boot": ("boot", "vfat")},
    Layout.BIOS: {"/": ("nixos", "ext4")},
}
_DISK = re.compile(r"/dev/[A-Za-z0-9_][A-Za-z0-9_.:/-]*")


def is_device_path(text: str) -> bool:
    """A path under /dev as install.sh's disk guard accepts one (no `.` or `..` steps)."""
    return bool(_DISK.fullmatch(text)) and "/../" not in f"{text}/" and "/./" not in f"{text}/"


def check_disk(disk: str) -> str:
    """`--install-disk`: "auto" or a device path under /dev (what install.sh's guard accepts)."""
    if disk != "auto" and not is_device_path(disk):
        raise InvalidInput(f"--install-disk {disk}: not a device path such as /dev/vda, nor auto",
                           hint="name the whole disk (/dev/vda, /dev/nvme0n1, /dev/disk/by-id/...) or pass auto")
    return disk


def check_settings(settings: InstallSettings, hosts: list[str], installer: bool, boot_default: str) -> None:
    """What can be checked before any work: --unattended names a host and has a disk."""
    if settings.disk:
        check_disk(settings.disk)
    if not settings.unattended:
        if settings.disk:
            raise InvalidInput(f"--install-disk {settings.disk}: only with --unattended HOST",
                               hint="an interactive install picks its disk on the target: install.sh --disk")
        return
    if hosts and settings.unattended not in hosts:  # (a bare --flake PATH: checked once its hosts are known)
        raise InvalidInput(f"--unattended {settings.unattended}: not one of the hosts ({', '.join(hosts)})",
                           hint="name one of the hosts given with --flake PATH#HOST")
    if not settings.disk:
        raise InvalidInput(f"--unattended {settings.unattended}: needs --install-disk DEVICE or auto",
                           hint="an unattended install asks nothing: name the target disk (or auto: the single "
                                "internal disk) at build time")
    if installer and boot_default:
        raise InvalidInput(f"--boot-default {boot_default}: not with --unattended (the unattended entry is the "
                           "default)", hint="leave --boot-default out")


@dataclass(frozen=True)
class HostLayout:
    layout: Layout
    disko: StorePath | None = None  # the disko script's store path (its closure ships with the host)
    disko_exe: str = ""  # the program install.sh runs: the path itself, or its single bin/ entry
    disko_devices: tuple[str, ...] = ()  # the disks it partitions (config.disko.devices.disk), when known


@dataclass(frozen=True)
class Facts:
    """What one evaluation says of a host: its disko scripts (attr -> drv, out), its fileSystems,
    and the disks its disko configuration partitions (name -> device; None: no such option)."""

    disko: dict[str, dict[str, str]]
    file_systems: dict[str, dict[str, Any]] | None
    disko_devices: dict[str, Any] | None = None


def facts_expr() -> str:
    """The Nix expression of a host's config `c` that gives its Facts (evaluate)."""
    wanted = " ".join(json.dumps(n) for n in DISKO_SCRIPTS)
    return (
        "(let b = (c.system or { }).build or { }; in "
        "{ disko = builtins.listToAttrs (map (a: { name = a; value = "
        "{ drv = b.${a}.drvPath; out = b.${a}.outPath; }; }) "
        f"(builtins.filter (a: b ? ${{a}}) [ {wanted} ])); "
        "fileSystems = if c ? fileSystems then builtins.mapAttrs (m: v: { device = v.device or null; "
        "label = v.label or null; fsType = v.fsType or null; }) c.fileSystems else null; "
        "diskoDevices = if c ? disko && c.disko ? devices && c.disko.devices ? disk then "
        "builtins.mapAttrs (n: d: d.device or null) c.disko.devices.disk else null; })"
    )


def facts_of(data: dict[str, Any]) -> Facts:
    return Facts(data["disko"], data["fileSystems"], data.get("diskoDevices"))


def disko_devices(host: str, facts: Facts | None) -> tuple[str, ...]:
    """The disks host's disko configuration partitions (config.disko.devices.disk.*.device),
    sorted; () when it declares none (a script without disko's module). A device install.sh's
    guard could not check (not a path under /dev) is refused."""
    if facts is None or not facts.disko_devices:
        return ()
    found = []
    for name, device in sorted(facts.disko_devices.items()):
        if not isinstance(device, str) or not is_device_path(device):
            raise InvalidInput(f"host {host}: config.disko.devices.disk.{name}.device is {json.dumps(device)}, "
                               "not a device path under /dev that install.sh's disk guard can check",
                               hint="name the disk by a path such as /dev/vda or /dev/disk/by-id/...")
        found.append(device)
    return tuple(sorted(set(found)))


def check_disko_disk(host: str, disk: str, devices: tuple[str, ...]) -> None:
    """An unattended disko host's --install-disk must be a disk its configuration partitions:
    the script erases those, whatever the guard was told."""
    if devices and disk != "auto" and disk not in devices:
        raise InvalidInput(f"--install-disk {disk}: host {host}'s disko configuration partitions "
                           f"{', '.join(devices)}, not {disk}",
                           hint=f"pass --install-disk {devices[0]} (or auto), or change config.disko.devices")


def evaluate(flake: str, names: list[str]) -> dict[str, Facts]:
    """Each host's disko scripts and `fileSystems` (None where the configuration has no such
    option), in one evaluation; a fileSystems entry gives only device, label and fsType. (A build
    asks this in the evaluation of the toplevels: nixcli.build_toplevels' `also`.)"""
    apply = (f"cs: builtins.listToAttrs (map (n: let c = cs.${{n}}.config; in {{ name = n; value = {facts_expr()}; }}) "
             f"[ {' '.join(json.dumps(n) for n in names)} ])")
    proc = runner.run([*nixcli.NIX, "eval", *nixcli.LOCKED, "--json", f"{flake}#nixosConfigurations",
                       "--apply", apply], check=False)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.decode(errors="replace").strip().splitlines()[-3:])
        raise InvalidInput(f"{flake}: cannot evaluate the hosts' disko scripts and fileSystems: {tail}")
    data: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    return {n: facts_of(data[n]) for n in names}


def _label_of(entry: Mapping[str, Any]) -> str | None:
    if entry.get("label"):
        return str(entry["label"])
    device = str(entry.get("device") or "")
    return device.removeprefix("/dev/disk/by-label/") if device.startswith("/dev/disk/by-label/") else None


def check_file_systems(host: str, layout: Layout, file_systems: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Refuse a layout the host's fileSystems contradict: a mount point the layout makes that the
    host declares otherwise, or a block device the layout does not make. No fileSystems (an
    option the configuration lacks, or none declared: real NixOS refuses that itself) is not compared."""
    if layout is Layout.DISKO or not file_systems:
        return
    made = MADE[layout]
    for mount, (label, fs_type) in made.items():
        entry = file_systems.get(mount)
        if entry is None:
            if mount == "/":
                raise InvalidInput(f"host {host}: fileSystems has no \"/\", but layout {layout.value} puts the root "
                                   f"on the ext4 labelled {label}", hint=_HINT[layout])
            continue  # /boot on the root file system: the ESP is then unused, but it boots
        if _label_of(entry) != label or entry.get("fsType") != fs_type:
            said = f"{entry.get('device') or 'label ' + str(entry.get('label'))} ({entry.get('fsType')})"
            raise InvalidInput(f"host {host}: fileSystems.\"{mount}\" is {said}, but layout {layout.value} makes "
                               f"/dev/disk/by-label/{label} ({fs_type}): the installed system would not boot",
                               hint=_HINT[layout])
    for mount, entry in sorted(file_systems.items()):
        device = str(entry.get("device") or "")
        if mount not in made and (entry.get("label") or device.startswith("/dev/")):
            on = device or f"label {entry['label']}"
            raise InvalidInput(f"host {host}: fileSystems.\"{mount}\" is on {on}, "
                               f"which layout {layout.value} does not make: the installed system would not boot",
                               hint=_HINT[layout])


_HINT = {
    Layout.UEFI: "declare fileSystems.\"/\" = /dev/disk/by-label/nixos (ext4) and fileSystems.\"/boot\" = "
                 "/dev/disk/by-label/boot (vfat), or choose another --layout",
    Layout.BIOS: "declare fileSystems.\"/\" = /dev/disk/by-label/nixos (ext4) and no other disk file system, "
                 "or choose another --layout",
}


def choose(host: str, wanted: Layout | None, facts: Facts | None) -> tuple[Layout, str]:
    """The host's layout and, for disko, the config.system.build attribute of its script."""
    attr = next((a for a in DISKO_SCRIPTS if facts is not None and a in facts.disko), "")
    layout = wanted or (Layout.DISKO if attr else Layout.UEFI)
    if layout is Layout.DISKO and not attr:
        why = "it could not be evaluated (no local Nix)" if facts is None else "it has none"
        raise InvalidInput(f"--layout disko: host {host} has no disko script in config.system.build ({why})",
                           hint=f"add disko to the host, or pass --layout {Layout.UEFI.value} or {Layout.BIOS.value}")
    if facts is not None:
        check_file_systems(host, layout, facts.file_systems)
    return layout, attr if layout is Layout.DISKO else ""


def disko_program(path: StorePath) -> str:
    """The program of a built disko script: the store path itself (a script), or the single
    entry of its bin/ (`bin/disko-destroy-format-mount`)."""
    if os.path.isfile(path.full):
        return path.full
    bin_dir = os.path.join(path.full, "bin")
    entries = sorted(os.listdir(bin_dir)) if os.path.isdir(bin_dir) else []
    if len(entries) != 1:
        raise InternalError(f"{path}: a disko script should be a file or hold one program in bin/, not {entries}")
    return f"{bin_dir}/{entries[0]}"


def build_disko(drvs: list[str]) -> None:
    if drvs:
        runner.run(["nix-store", "--realise", *sorted(set(drvs))])


@dataclass(frozen=True)
class InstallRecord:
    """The signed install record: the unattended host and disk, each host's layout."""

    unattended: str
    disk: str
    hosts: dict[str, HostLayout]

    def to_json(self) -> dict[str, Any]:
        return {
            "unattended": self.unattended or None,
            "disk": self.disk or None,
            "layout": self.hosts[self.unattended].layout.value if self.unattended else None,
            "hosts": {h: {"layout": v.layout.value, "disko": v.disko_exe or None,
                          **({"disko_devices": list(v.disko_devices)} if v.disko_devices else {})}
                      for h, v in sorted(self.hosts.items())},
        }

    def table(self) -> str:
        """The signed `install` file install.sh reads (tab-separated, no JSON parser there)."""
        lines = []
        if self.unattended:
            lines += [f"unattended\t{self.unattended}", f"disk\t{self.disk}"]
        for host, v in sorted(self.hosts.items()):
            lines.append(f"host\t{host}\t{v.layout.value}" + (f"\t{v.disko_exe}" if v.disko_exe else ""))
            lines.extend(f"disko-device\t{host}\t{device}" for device in v.disko_devices)
        return "\n".join(lines) + "\n"
