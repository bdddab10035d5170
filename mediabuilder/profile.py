"""Profiles: TOML files in `profiles/`, parsed and validated here into frozen dataclasses.

Nothing else reads raw TOML. Unknown keys and wrong types are errors naming the file and the
`section.key`; relative paths are taken relative to the profile's own directory.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from mediabuilder.errors import InvalidInput
from mediabuilder.media.label import DEFAULT_LABEL


class Compression(enum.Enum):
    ZSTD = "zstd"
    XZ = "xz"
    NONE = "none"


class MediaFormat(enum.Enum):
    DIR = "dir"
    ISO = "iso"
    FAT32 = "fat32"


class PartitionTable(enum.Enum):
    NONE = "none"
    MBR = "mbr"
    GPT = "gpt"


class Layout(enum.Enum):
    """How install.sh partitions the target disk (docs/installer.md)."""

    UEFI = "uefi"  # GPT: ESP 512 MiB vfat `boot` at /boot, ext4 `nixos` at /
    BIOS = "bios"  # GPT: 1 MiB BIOS boot partition for GRUB, ext4 `nixos` at /
    DISKO = "disko"  # the host's own disko script, from the media cache


class RebuildLevel(enum.Enum):
    """What the medium carries for offline rebuilds on the installed machine (docs/rebuild.md)."""

    NONE = "none"
    CONFIG = "config"
    FULL = "full"


@dataclass(frozen=True)
class FlakeSettings:
    # Flake references with a host, e.g. ".#alpha" or "/src/machines#beta".
    hosts: tuple[str, ...] = ()
    allow_dirty: bool = False


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/mediabuilder` (`~/.cache/mediabuilder`): outside any working tree, so
    that the cache and its signing key never count as a flake's changes nor reach a medium."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "mediabuilder"
    try:
        return Path.home() / ".cache" / "mediabuilder"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return Path("/var/tmp") / f"mediabuilder-{os.geteuid()}"


@dataclass(frozen=True)
class CacheSettings:
    dir: Path = field(default_factory=default_cache_dir)
    compression: Compression = Compression.ZSTD
    # Secret key file; None: use (or create) the key in the cache directory.
    key: Path | None = None
    # Parallel workers; 0: one per core.
    jobs: int = 0


@dataclass(frozen=True)
class MediaSettings:
    format: MediaFormat = MediaFormat.DIR
    output: Path | None = None
    label: str = DEFAULT_LABEL
    # Image size in bytes for fat32; None: content plus headroom.
    size: int | None = None
    partition_table: PartitionTable = PartitionTable.NONE
    # A NixOS installer ISO to remaster (format iso); None: a medium of its own.
    installer: Path | None = None
    # With an installer: the host whose "Install HOST offline" entry is the menus' default; "": the stock one.
    boot_default: str = ""
    # Offline rebuilds: none (the system only: smallest), config or full (docs/rebuild.md).
    rebuild: RebuildLevel = RebuildLevel.NONE


@dataclass(frozen=True)
class InstallSettings:
    # The host the menus' default entry installs with no questions ("": no unattended install).
    unattended: str = ""
    # The target disk of an unattended install: a device path (/dev/vda) or "auto".
    disk: str = ""
    # None: "disko" when the host has disko scripts, else "uefi".
    layout: Layout | None = None


@dataclass(frozen=True)
class SubstituterSettings:
    urls: tuple[str, ...] = ()
    trusted_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    source: str = "<defaults>"
    flake: FlakeSettings = field(default_factory=FlakeSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    substituters: SubstituterSettings = field(default_factory=SubstituterSettings)
    install: InstallSettings = field(default_factory=InstallSettings)


SECTIONS: dict[str, type] = {
    "flake": FlakeSettings,
    "cache": CacheSettings,
    "media": MediaSettings,
    "substituters": SubstituterSettings,
    "install": InstallSettings,
}

T = TypeVar("T")

_SIZE_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A size in bytes: '4096', '700M', '8G' and '8GiB' are binary (8 * 1024^3), '8GB' decimal
    (8 * 1000^3, as disks are sold); K, M, G, T, any case, a fraction rounded down to a byte.
    Raises ValueError for anything else (negative, empty, unknown unit)."""
    found = _SIZE_RE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not a size: {text!r}")
    number, prefix, suffix = found.groups()
    suffix = suffix.upper()
    if suffix == "I" or (suffix == "IB" and not prefix):
        raise ValueError(f"not a size: {text!r}")
    base = 1000 if suffix == "B" and prefix else 1024
    from fractions import Fraction  # imported where used, as tomllib: not every run reads sizes

    return int(Fraction(number) * base ** _SIZE_POWERS[prefix.upper()])


def _convert(source: str, where: str, hint: Any, value: Any, base: Path) -> Any:
    """Check and convert one TOML value to the dataclass field's type (given as a string)."""

    def wrong(expected: str) -> InvalidInput:
        return InvalidInput(f"{source}: {where}: expected {expected}, got {value!r}")

    if hint == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise wrong("a non-negative integer")
        return value
    if hint == "str":
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if hint == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    if hint in ("Path", "Path | None"):
        if not isinstance(value, str) or not value:
            raise wrong("a path (string)")
        return base / os.path.expanduser(value)
    if hint == "int | None":  # sizes: 123 or "4G"
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError:
                pass
        raise wrong("a size such as 4096, \"700M\" or \"4G\"")
    for enum_type in (Compression, MediaFormat, PartitionTable, Layout, RebuildLevel):
        if hint in (enum_type.__name__, f"{enum_type.__name__} | None"):
            allowed = ", ".join(m.value for m in enum_type)
            try:
                return enum_type(value)
            except ValueError:
                raise InvalidInput(f"{source}: {where}: {value!r} is not one of {allowed}") from None
    raise AssertionError(f"unhandled field type {hint}")


def _section(source: str, name: str, cls: type[T], data: Any, base: Path) -> T:
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in data.items():
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise InvalidInput(f"{source}: {name}.{key}: unknown key (allowed: {allowed})")
        values[key] = _convert(source, f"{name}.{key}", known[key].type, value, base)
    return cls(**values)


def load_profile(path: Path) -> Profile:
    """Read and validate a profile; every error names the file and the `section.key`."""
    import tomllib  # imported where used: most runs read no profile

    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidInput(f"{source}: no such profile", hint="profiles live in profiles/*.toml") from None
    except OSError as e:
        raise InvalidInput(f"{source}: cannot read profile: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{source}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{source}: not UTF-8 text (byte {e.start})", hint="save the profile as UTF-8") from None
    base = path.resolve().parent
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            allowed = ", ".join(SECTIONS)
            raise InvalidInput(f"{source}: [{name}]: unknown section (allowed: {allowed})")
        sections[name] = _section(source, name, SECTIONS[name], value, base)
    if "flake" in sections:
        hosts = tuple(_absolute_flake_ref(ref, base) for ref in sections["flake"].hosts)
        sections["flake"] = replace(sections["flake"], hosts=hosts)
    return Profile(source=source, **sections)


def _absolute_flake_ref(ref: str, base: Path) -> str:
    """A flake reference whose flake part is a relative path is taken relative to `base`."""
    flake, sep, attr = ref.partition("#")
    # As on the command line (nixcli.parse_flake_ref): no ':' means a path, "" the directory.
    if ":" not in flake:
        flake = os.path.normpath(base / os.path.expanduser(flake or "."))
    return flake + sep + attr


def override(settings: T, **changes: Any) -> T:
    """Apply CLI flags over profile values: every change that is not None wins."""
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(settings, **given) if given else settings  # type: ignore[type-var]
