"""Remastering a NixOS installer ISO: its boot menus edited, the medium under one directory.

    read the installer (hostile: bounded reads, nothing extracted to its own paths) →
    edit isolinux.cfg, EFI/BOOT/grub.cfg and the grub.cfg inside efi.img →
    `xorriso -indev IN -outdev OUT -boot_image any replay -map …` → check what came out

xorriso's replay keeps the El Torito entries (re-pointed at the new efi.img), the isohybrid MBR,
the GPT and the volume label; docs/installer.md says why xorriso and not pycdlib.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from mediabuilder import run as runner
from mediabuilder.errors import InternalError, InvalidInput, InvalidMedia, MediabuilderError
from mediabuilder.installer import menus
from mediabuilder.installer.medium import MEDIUM_DIR
from mediabuilder.media.iso_source import IsoSource

MENU_LIMIT = 1024 * 1024
EFI_IMAGE_LIMIT = 256 * 1024 * 1024
HINT = "give the stock NixOS installer ISO (nixos-minimal-*.iso)"
_OPTION = re.compile(r"^(-\S+)(?:\s+(.*))?$")


def kernel_params(host: str) -> str:
    """What an "Install HOST offline" entry adds to the stock kernel line."""
    return f"mediabuilder.host={host} mediabuilder.medium={MEDIUM_DIR}"


# The medium's script that the unattended entry runs as systemd's kernel-command-line.service.
UNATTENDED_SCRIPT = "unattended.sh"


def unattended_params(host: str) -> str:
    """What the "Install HOST offline (unattended)" entry adds: systemd-run-generator runs the
    medium's unattended.sh as a oneshot unit instead of the usual default target (no getty),
    powers off when it succeeds and leaves the machine up (the script's shell on the console)
    when it fails. No quotes: they would break the unit's ExecStart (docs/installer.md)."""
    return (f"{kernel_params(host)} mediabuilder.unattended=1 systemd.run=/iso/{MEDIUM_DIR}/{UNATTENDED_SCRIPT} "
            "systemd.run_success_action=poweroff systemd.run_failure_action=none")


@dataclass(frozen=True)
class BootReport:
    """What xorriso says about an ISO's boot structures, as `-report_el_torito as_mkisofs` and
    `-report_system_area plain` print them."""

    label: str
    bios_image: str | None  # the El Torito BIOS boot image's path (isolinux.bin)
    efi_image: str | None  # the El Torito EFI boot image's path (efi.img)
    entries: int  # El Torito boot entries
    system_area: str  # "MBR isohybrid cyl-align-on GPT" and the like
    gpt_guid: str | None  # the GPT's disk GUID, 32 hex digits as on disk

    @classmethod
    def read(cls, iso: Path) -> BootReport:
        proc = runner.run(["xorriso", "-report_about", "FAILURE", "-indev", str(iso),
                           "-report_el_torito", "as_mkisofs", "-report_system_area", "plain"], check=False)
        text = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise InvalidInput(f"{iso}: not readable as an ISO 9660 image (xorriso exit {proc.returncode})",
                               hint=HINT)
        options: list[tuple[str, str]] = []
        summary = ""
        guid = None
        for line in text.splitlines():
            if line.startswith("System area summary:"):
                summary = line.partition(":")[2].strip()
            if line.startswith("GPT disk GUID"):
                value = line.partition(":")[2].strip()
                guid = value if re.fullmatch(r"[0-9a-f]{32}", value) else None
            found = _OPTION.match(line.strip())
            if found is not None:
                options.append((found.group(1), _unquote(found.group(2) or "")))
        label = next((v for k, v in options if k == "-V"), "")
        bios = next((v for k, v in options if k == "-b"), None)
        efi = next((v for k, v in options if k == "-e"), None)
        entries = sum(1 for k, _ in options if k in ("-b", "-e"))
        return cls(label, bios, efi, entries, summary, guid)


def _unquote(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    return words[0] if len(words) == 1 else value


@dataclass(frozen=True)
class Installer:
    """A NixOS-like installer ISO: where its menus are, and its boot report."""

    path: Path
    boot: BootReport
    isolinux_cfg: str
    grub_cfg: str
    efi_img: str

    @classmethod
    def inspect(cls, path: Path) -> tuple[Installer, dict[str, bytes]]:
        """Check that `path` is a NixOS-like installer; its menus' bytes by path."""
        if not path.is_file():
            raise InvalidInput(f"{path}: no such installer ISO")
        try:
            with path.open("rb") as f:
                pvd = os.pread(f.fileno(), 8, 16 * 2048)
        except OSError as e:
            raise InvalidInput(f"{path}: cannot read it: {e.strerror}") from None
        if pvd[1:6] != b"CD001":
            raise InvalidInput(f"{path}: not readable as an ISO 9660 image (no volume descriptor at byte 32768)",
                               hint=HINT)
        boot = BootReport.read(path)
        if boot.bios_image is None or boot.efi_image is None:
            kind = "BIOS" if boot.bios_image is None else "EFI"
            raise InvalidInput(f"{path}: not a NixOS installer ISO: no El Torito {kind} boot entry", hint=HINT)
        try:
            with IsoSource(path) as iso:
                files = {rel.lower(): rel for rel, _ in iso.files()}
                if any(rel.split("/", 1)[0].lower() == MEDIUM_DIR for rel in files):
                    raise InvalidInput(f"{path}: already has a /{MEDIUM_DIR} directory (remastered before?)",
                                       hint=HINT)
                cfg_dir = boot.bios_image.strip("/").rpartition("/")[0]
                isolinux = files.get(f"{cfg_dir}/isolinux.cfg".lower().lstrip("/"))
                grub = files.get("efi/boot/grub.cfg")
                efi = boot.efi_image.strip("/")
                menu_files = (("isolinux.cfg", isolinux), ("EFI/BOOT/grub.cfg", grub))
                missing = [name for name, rel in menu_files if rel is None]
                if missing or iso.size(efi) is None:
                    gone = missing[0] if missing else efi
                    raise InvalidInput(f"{path}: not a NixOS installer ISO: it has no {gone}", hint=HINT)
                assert isolinux is not None and grub is not None
                data = {isolinux: iso.read_bytes(isolinux, MENU_LIMIT), grub: iso.read_bytes(grub, MENU_LIMIT)}
                return cls(path, boot, isolinux, grub, efi), data
        except InvalidMedia as e:
            raise InvalidInput(f"{path}: not a usable installer ISO: {e}", hint=HINT) from None

    def extract_efi(self, dest: Path) -> None:
        with IsoSource(self.path) as iso:
            size = iso.size(self.efi_img) or 0
            if size > EFI_IMAGE_LIMIT:
                raise InvalidInput(f"{self.path}: {self.efi_img} is {size} bytes, more than {EFI_IMAGE_LIMIT}")
            iso.extract(self.efi_img, dest)


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{where}: not UTF-8 text (byte {e.start})", hint=HINT) from None


def _fat_grub_cfg(image: Path, where: str) -> str | None:
    """The FAT path (`::/EFI/BOOT/grub.cfg`, as spelled there) of efi.img's grub.cfg, if any."""
    proc = runner.run(["mdir", "-/", "-b", "-i", str(image), "::/"], check=False)
    if proc.returncode != 0:
        raise InvalidInput(f"{where}: not a FAT image (mdir exit {proc.returncode})", hint=HINT)
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.strip().lower() == "::/efi/boot/grub.cfg":
            return line.strip()
    return None


def _read_fat_file(image: Path, fat_path: str, where: str) -> bytes:
    with runner.stream(["mtype", "-i", str(image), fat_path]) as out:
        data = out.read(MENU_LIMIT + 1)
        if len(data) > MENU_LIMIT:
            raise InvalidInput(f"{where}: more than {MENU_LIMIT} bytes", hint=HINT)
    return data


def remaster(installer: Path, medium: Path, output: Path, hosts: tuple[str, ...], scratch: Path,
             default: str | None = None, epoch: int | None = None, unattended: str | None = None) -> Installer:
    """Write `output`: the installer ISO with `medium` under /MEDIUM_DIR and its menus edited.
    With `unattended`, that host's unattended entry is every menu's default.
    With `epoch`, every date xorriso writes (the volume's, its UUID, every file's) and the edited
    grub.cfg in efi.img are dated `epoch`, and the same inputs give the same bytes."""
    for host in hosts:
        menus.check_host(host)
    if default is not None and default not in hosts:
        raise InvalidInput(f"--boot-default {default}: not one of the hosts ({', '.join(hosts)})")
    if unattended is not None and unattended not in hosts:
        raise InvalidInput(f"--unattended {unattended}: not one of the hosts ({', '.join(hosts)})")
    found, data = Installer.inspect(installer)
    install = menus.Install(hosts, {h: kernel_params(h) for h in hosts}, default, unattended,
                            unattended_params(unattended) if unattended is not None else "")
    where = f"{installer}: "
    try:
        new_isolinux = menus.edit_isolinux(_text(data[found.isolinux_cfg], where + found.isolinux_cfg), install,
                                           where + found.isolinux_cfg)
        new_grub = menus.edit_grub(_text(data[found.grub_cfg], where + found.grub_cfg), install,
                                   where + found.grub_cfg)
    except InvalidMedia as e:
        raise InvalidInput(f"not a NixOS installer ISO: {e}", hint=e.hint or "give the NixOS installer ISO") from None
    (scratch / "isolinux.cfg").write_text(new_isolinux)
    (scratch / "grub.cfg").write_text(new_grub)
    efi = scratch / "efi.img"
    found.extract_efi(efi)
    fat_grub = _fat_grub_cfg(efi, where + found.efi_img)
    if fat_grub is not None:
        inner_where = f"{where}{found.efi_img}{fat_grub[2:]}"
        try:
            inner_text = _text(_read_fat_file(efi, fat_grub, inner_where), inner_where)
            inner = menus.edit_grub(inner_text, install, inner_where)
        except InvalidMedia as e:
            raise InvalidInput(f"not a NixOS installer ISO: {e}", hint=HINT) from None
        (scratch / "efi-grub.cfg").write_text(inner)
        if epoch is not None:
            os.utime(scratch / "efi-grub.cfg", (epoch, epoch))
        # -m: the file's own date (else mcopy stamps the current time into efi.img)
        proc = runner.run(["mcopy", "-o", "-m", "-i", str(efi), str(scratch / "efi-grub.cfg"), fat_grub],
                          env={"TZ": "UTC"}, check=False)
        if proc.returncode != 0:
            raise InvalidInput(f"{installer}: {found.efi_img} has no room for the edited grub.cfg",
                               hint=runner.command_failed(["mcopy"], proc.returncode, proc.stderr).args[0])
    maps = [("-map", str(medium), f"/{MEDIUM_DIR}"),
            ("-map", str(scratch / "isolinux.cfg"), f"/{found.isolinux_cfg}"),
            ("-map", str(scratch / "grub.cfg"), f"/{found.grub_cfg}"),
            ("-map", str(efi), f"/{found.efi_img}")]
    argv = ["xorriso", "-report_about", "FAILURE", "-indev", str(installer), "-outdev", str(output),
            "-boot_image", "any", "replay", *[a for m in maps for a in m]]
    if found.boot.gpt_guid is not None:  # else xorriso makes a random one: keep the installer's
        argv += ["-boot_image", "any", f"gpt_disk_guid={found.boot.gpt_guid}"]
    if epoch is not None:
        uuid = time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))
        argv += ["-volume_date", "all_file_dates", f"={epoch}", "-volume_date", "c", f"={epoch}",
                 "-volume_date", "m", f"={epoch}", "-volume_date", "uuid", uuid, "-preparer_id", "mediabuilder"]
    argv.append("-commit")
    try:
        runner.run(argv, env={"TZ": "UTC"})
    except MediabuilderError as e:
        raise InternalError(f"xorriso could not remaster {installer}: {e}") from None
    check_output(found, output)
    return found


def check_output(found: Installer, output: Path) -> None:
    """The remastered ISO boots as the input did: same label, El Torito entries, system area."""
    after = BootReport.read(output)
    before = found.boot
    for what, old, new in (("volume label", before.label, after.label),
                           ("El Torito entries", before.entries, after.entries),
                           ("BIOS boot image", before.bios_image, after.bios_image),
                           ("EFI boot image", before.efi_image, after.efi_image),
                           ("system area", before.system_area, after.system_area),
                           ("GPT disk GUID", before.gpt_guid, after.gpt_guid)):
        if old != new:
            raise InternalError(f"{output}: remastering changed the {what}: {old!r} became {new!r}")
