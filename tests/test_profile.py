"""Profiles: TOML parsed into frozen dataclasses; every mistake is one InvalidInput naming the
file and the `section.key`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mediabuilder.errors import InvalidInput
from mediabuilder.media.label import validate_label
from mediabuilder.profile import (
    CacheSettings,
    Compression,
    MediaFormat,
    MediaSettings,
    PartitionTable,
    Profile,
    load_profile,
    override,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / "profiles" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


VALID = """
[flake]
hosts = ["../machines#alpha", "/srv/flake#beta", "github:acme/fleet#gamma", ".#delta"]
allow_dirty = true

[cache]
dir = "../cache"
compression = "xz"
key = "keys/media.sec"
jobs = 4

[media]
format = "fat32"
output = "/abs/out.img"
label = "OFFLINE"
size = "4G"
partition_table = "gpt"

[substituters]
urls = ["file:///mnt/cache"]
trusted_keys = ["media-1:AAAA"]
"""


def test_valid_profile(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    base = path.parent.resolve()
    p = load_profile(path)
    assert p.source == str(path)
    assert p.flake.hosts == (
        str(tmp_path.resolve() / "machines") + "#alpha",
        "/srv/flake#beta",
        "github:acme/fleet#gamma",
        str(base) + "#delta",
    )
    assert p.flake.allow_dirty is True
    assert p.cache.compression is Compression.XZ
    assert p.cache.dir.resolve() == tmp_path.resolve() / "cache"
    assert p.cache.key == base / "keys" / "media.sec"
    assert p.cache.jobs == 4
    assert p.media.format is MediaFormat.FAT32
    assert p.media.output == Path("/abs/out.img")
    assert p.media.label == "OFFLINE"
    assert p.media.size == 4 * 1024**3
    assert p.media.partition_table is PartitionTable.GPT
    assert p.substituters.urls == ("file:///mnt/cache",)
    assert p.substituters.trusted_keys == ("media-1:AAAA",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cache.jobs = 1  # type: ignore[misc]


def test_relative_paths_follow_the_profile_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[cache]\ndir = "c"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_profile(Path(path)).cache.dir == path.parent.resolve() / "c"


def test_empty_profile_is_the_defaults(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, ""))
    assert dataclasses.replace(p, source="<defaults>") == Profile()
    assert p.cache == CacheSettings()


def test_bundled_example_profile() -> None:
    p = load_profile(REPO / "profiles" / "example.toml")
    assert p.cache.compression is Compression.ZSTD
    assert p.media.format is MediaFormat.DIR
    assert p.cache.dir == (REPO / "profiles").resolve() / "../cache"
    # The demo writes it as a directory and as a FAT32 image: the label must fit both.
    assert p.media.label == "NIXOS_DEMO"
    for fmt in ("iso", "fat32"):
        validate_label(p.media.label, fmt)


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("4096B", 4096), ("700M", 700 * 1024**2), ("700MiB", 700 * 1024**2),
    ("8G", 8 * 1024**3), ("8g", 8 * 1024**3), ("8GiB", 8 * 1024**3), ("8gib", 8 * 1024**3),
    ("8GB", 8 * 10**9), ("8gb", 8 * 10**9), ("16 GB", 16 * 10**9), ("1.5K", 1536), ("1.5KB", 1500),
    ("3T", 3 * 1024**4), ("2TB", 2 * 10**12), ("0", 0), (" 1M ", 1024**2),
])
def test_parse_size(text: str, size: int) -> None:
    """K/M/G/T and KiB/MiB/GiB/TiB binary; KB/MB/GB/TB decimal, as disks are sold."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "-8G", "G", "GB", "8X", "8iB", "8Gi", "1e9", "8 GiBs", "ten", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_default_label_fits_every_format() -> None:
    label = MediaSettings().label
    assert label == "NIXOS_MEDIA"
    assert validate_label(label, "iso") == validate_label(label, "fat32") == label


def test_override_keeps_none() -> None:
    s = CacheSettings(jobs=3)
    assert override(s, jobs=None, dir=None) is s
    assert override(s, jobs=5, compression=Compression.NONE) == CacheSettings(jobs=5, compression=Compression.NONE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[caches]\ndir = 'x'\n", "[caches]: unknown section (allowed: flake, cache, media, substituters, install)"),
        ("[cache]\ndirectory = 'x'\n", "cache.directory: unknown key (allowed: compression, dir, jobs, key)"),
        ("[media]\nformt = 'iso'\n", "media.formt: unknown key"),
        ("[cache]\njobs = \"x\"\n", "cache.jobs: expected a non-negative integer, got 'x'"),
        ("[cache]\njobs = -1\n", "cache.jobs: expected a non-negative integer, got -1"),
        ("[cache]\njobs = true\n", "cache.jobs: expected a non-negative integer, got True"),
        ("[flake]\nhosts = \"a#b\"\n", "flake.hosts: expected a list of strings, got 'a#b'"),
        ("[flake]\nhosts = [1]\n", "flake.hosts: expected a list of strings, got [1]"),
        ("[flake]\nallow_dirty = \"yes\"\n", "flake.allow_dirty: expected true or false, got 'yes'"),
        ("[cache]\ndir = 3\n", "cache.dir: expected a path (string), got 3"),
        ("[media]\nsize = \"lots\"\n", "media.size: expected a size such as 4096"),
        ("[media]\nlabel = 7\n", "media.label: expected a string, got 7"),
        ("cache = 3\n", "[cache] must be a table"),
        ("[media]\nformat = \"fat\"\n", "media.format: 'fat' is not one of dir, iso, fat32"),
        ("[cache]\ncompression = \"gzip\"\n", "cache.compression: 'gzip' is not one of zstd, xz, none"),
        ("[media]\npartition_table = \"apm\"\n", "media.partition_table: 'apm' is not one of none, mbr, gpt"),
        ("[cache\n", "not valid TOML"),
        ("[install]\nroot = '/mnt'\n", "install.root: unknown key (allowed: disk, layout, unattended)"),
        ("[install]\nlayout = 'mbr'\n", "install.layout: 'mbr' is not one of uefi, bios, disko"),
        ("[install]\nunattended = true\n", "install.unattended: expected a string, got True"),
    ],
)
def test_bad_profile(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_profile(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such profile"):
        load_profile(tmp_path / "nope.toml")


def test_profile_that_is_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.write_bytes(b"[media]\nlabel = \"\xff\xfe\"\n")
    with pytest.raises(InvalidInput) as info:
        load_profile(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 17)"


def test_relative_hosts_follow_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`machines#a` (no slash) and `#b` are directories beside the profile, whatever the cwd."""
    path = write(tmp_path, '[flake]\nhosts = ["machines#a", "#b", "git+file:///srv/f#c", "nixpkgs#d"]\n')
    monkeypatch.chdir(tmp_path)
    base = path.parent.resolve()
    assert load_profile(path).flake.hosts == (f"{base}/machines#a", f"{base}#b", "git+file:///srv/f#c",
                                              f"{base}/nixpkgs#d")
