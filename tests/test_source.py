from __future__ import annotations

from pathlib import Path

import pytest
from media_checks import check_source, make_tree

from mediabuilder.errors import InvalidInput, InvalidMedia
from mediabuilder.media.fsinfo import max_file_size, parse_mountinfo
from mediabuilder.media.source import detect, is_fat32_boot_sector, open_source
from mediabuilder.media.split import FAT32_MAX_FILE

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /tmp rw,nosuid shared:5 - tmpfs tmpfs rw
41 22 8:17 / /media/stick rw,nosuid,nodev shared:7 - vfat /dev/sdb1 rw,fmask=0022
42 22 8:33 / /media/big\\040disk rw shared:8 - exfat /dev/sdc1 rw
43 41 8:49 / /media/stick/inner rw shared:9 opt:x - btrfs /dev/sdd1 rw
"""


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.mount_point, m.fstype) for m in mounts] == [
        ("/", "ext4"),
        ("/tmp", "tmpfs"),
        ("/media/stick", "vfat"),
        ("/media/big disk", "exfat"),
        ("/media/stick/inner", "btrfs"),
    ]


@pytest.mark.parametrize(
    ("directory", "limit"),
    [
        ("/media/stick", FAT32_MAX_FILE),
        ("/media/stick/nixos", FAT32_MAX_FILE),
        ("/media/sticky", None),
        ("/media/stick/inner/x", None),
        ("/media/big disk/x", None),
        ("/home/user", None),
    ],
)
def test_max_file_size(directory: str, limit: int | None) -> None:
    assert max_file_size(Path(directory), MOUNTINFO) == limit


def test_max_file_size_here() -> None:
    assert max_file_size(Path("/proc")) is None  # proc: no practical limit


def test_dir_source(tmp_path: Path) -> None:
    expected, dirs = make_tree(tmp_path)
    with open_source(tmp_path) as source:
        assert source.kind == "dir"
        check_source(source, expected, dirs)
        out = tmp_path / "x"
        source.extract("install.sh", out)
        assert out.read_bytes() == (tmp_path / "install.sh").read_bytes()
        with pytest.raises(InvalidMedia):
            source.open("nope")


def test_unknown_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x00" * 70000)
    with pytest.raises(InvalidMedia, match="junk.img: not a directory, ISO 9660 or FAT32 image"):
        open_source(junk)
    small = tmp_path / "small"
    small.write_bytes(b"x")
    with pytest.raises(InvalidMedia):
        detect(small)
    with pytest.raises(InvalidInput):
        open_source(tmp_path / "missing")


def test_fat32_boot_sector_signature() -> None:
    assert not is_fat32_boot_sector(b"\x00" * 512)
    sector = bytearray(512)
    sector[0] = 0xEB
    sector[11:14] = (512).to_bytes(2, "little") + b"\x08"
    sector[82:90] = b"FAT32   "
    sector[510:512] = b"\x55\xaa"
    assert is_fat32_boot_sector(bytes(sector))


@pytest.mark.parametrize(("name", "ident", "is_dir", "fits"), [
    ("registry.json", "REGISTRY.JSON;1", False, True),
    ("registry.json", "REGISTRX.JSON;1", False, False),  # a flipped byte: another valid name
    ("registry.json", "REGISTRY.JSOM;1", False, False),
    ("x.nar.zst", "X_NAR.ZST;1", False, True),
    ("README", "README.;1", False, True),
    ("manifest.json", "MANIFEST_1.JSON;1", False, True),  # pycdlib's and ours: a number keeps names apart
    ("124alsjvi5bdk.narinfo", "124ALSJVI5BDK.NARINFO;1", False, True),
    ("124alsjvi5bdk.narinfo", "124ALSJVJ5BDK.NARINFO;1", False, False),
    ("3hg0ixf6kcw5ds7hg6qwmpkd1a5h0c0s-linux-6.12.30", "3HG0IXF6KCW5DS7HG6QWMPKD1A5H.30", True, True),  # xorriso
    ("flake", "FLAKE", True, True),
    ("flake", "FLAKF", True, False),
])
def test_plain_names_must_spell_their_rock_ridge_names(name: str, ident: str, is_dir: bool, fits: bool) -> None:
    from mediabuilder.media.iso_source import _plain_name_fits

    assert _plain_name_fits(name, ident, is_dir) is fits
