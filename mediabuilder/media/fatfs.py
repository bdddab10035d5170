"""FAT32's on-disk structures, as Microsoft's FAT specification (2005) defines them.

What `fat32.write_fat32` needs to lay out a whole filesystem in one pass: the boot sector and
FSInfo sector, 8.3 short names with their long-name (VFAT) entries, directory entries and the
file allocation table as runs of contiguous clusters. Pure functions of their arguments; the
writer decides where things go.
"""

from __future__ import annotations

import struct
import sys
import time
import warnings
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from mediabuilder.errors import InvalidInput

SECTOR = 512
ENTRY = 32  # bytes per directory entry
MAX_DIR_ENTRIES = 65536  # a directory holds at most this many 32-byte entries
ATTR_VOLUME_ID = 0x08
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LONG_NAME = 0x0F
LAST_LONG_ENTRY = 0x40
# DIR_NTRes: Windows NT (and Linux, mtools) keep an 8.3 name's lower case here, not in a long name.
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10
MEDIA_FIXED = 0xF8
END_OF_CHAIN = 0x0FFFFFFF  # also FAT[1]: the "clean" and "no I/O error" bits set
BACKUP_BOOT_SECTOR = 6
FSINFO_SECTOR = 1
ROOT_CLUSTER = 2
UNKNOWN = 0xFFFFFFFF  # FSInfo: no hint where free clusters are
LABEL_BYTES = 11
BOOT_CODE = 0x5A  # where the jump at byte 0 lands, after the FAT32 BPB
NOT_BOOTABLE = b"\xcd\x18\xeb\xfe"  # int 18h (boot failed: try the next device), else spin
_SHORT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")
_FAT_CHUNK = 256 * 1024  # FAT entries buffered before they are handed out (1 MiB)


def _upper_83(name: str) -> bytes | None:
    """The 11-byte short name of a name that fits 8.3 once upper-cased (`Foo.txt`: `FOO     TXT`)."""
    base, dot, ext = name.partition(".")
    if not base or len(base) > 8 or len(ext) > 3 or "." in ext or (dot and not ext) or not name.isascii():
        return None
    if not _SHORT_CHARS.issuperset(base.upper()) or not _SHORT_CHARS.issuperset(ext.upper()):
        return None
    return (base.upper().ljust(8) + ext.upper().ljust(3)).encode("ascii")


def short_fit(name: str) -> tuple[bytes, int] | None:
    """The 11-byte short name and DIR_NTRes case flags of a name that needs no long name: one
    that fits 8.3, each part all upper or all lower case."""
    short = _upper_83(name)
    if short is None:
        return None
    base, _, ext = name.partition(".")
    flags = 0
    for part, lower_flag in ((base, NT_LOWER_BASE), (ext, NT_LOWER_EXT)):
        if part != part.upper():
            if part != part.lower():
                return None
            flags |= lower_flag
    return short, flags


def entry_count(name: str) -> int:
    """Directory entries the name takes: its short entry, plus 13 UTF-16 units per long entry."""
    if short_fit(name) is not None:
        return 1
    return 1 + -(-len(name.encode("utf-16-le")) // 26)


class ShortNames:
    """Unique short names for one directory, generated as Windows does: the basis name
    (upper case, invalid characters as `_`) with a numeric tail, `NIXOS-~1.JSO`."""

    def __init__(self, names: Iterable[str]) -> None:
        """`names`: every name in the directory. Those that fit 8.3 once upper-cased keep that as
        their short name (mixed case, `Foo.txt`, with a long name beside it); no generated name
        may equal one of them, or `Foo~1.txt` would also find the file called `Foo.txt`."""
        self._taken = set()
        for name in names:
            short = _upper_83(name)
            if short is not None:
                self._taken.add(short)
        self._next: dict[tuple[str, str], int] = {}

    def generate(self, name: str) -> bytes:
        """The short name for `name`, which needs a long name (`short_fit` is None)."""
        own = _upper_83(name)
        if own is not None:
            return own  # reserved for it: FAT names ignore case, so no other name has it
        stripped = name.lstrip(".").replace(" ", "")
        base, dot, ext = stripped.rpartition(".")
        if not dot:
            base, ext = stripped, ""
        base = _oem(base.replace(".", ""))[:8] or "_"
        ext = _oem(ext)[:3]
        n = self._next.get((base, ext), 1)
        while True:
            tail = f"~{n}"
            short = (base[: 8 - len(tail)] + tail).ljust(8).encode("ascii") + ext.ljust(3).encode("ascii")
            n += 1
            if short not in self._taken:
                break
        self._next[(base, ext)] = n
        self._taken.add(short)
        return short


def _oem(part: str) -> str:
    return "".join(c if c in _SHORT_CHARS else "_" for c in part.upper())


def checksum(short: bytes) -> int:
    """The short name's checksum, which each of its long-name entries carries."""
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def long_entries(name: str, short: bytes) -> bytes:
    """The long-name entries that precede `short`'s entry, last part first."""
    units = name.encode("utf-16-le")
    count = -(-len(units) // 26)
    padded = units + (b"\0\0" + b"\xff\xff" * 12)[: count * 26 - len(units)]
    check = checksum(short)
    out = []
    for seq in range(count, 0, -1):
        part = padded[(seq - 1) * 26 : seq * 26]
        order = seq | LAST_LONG_ENTRY if seq == count else seq
        out.append(struct.pack("<B10sBBB12sH4s", order, part[:10], ATTR_LONG_NAME, 0, check, part[10:22], 0, part[22:]))
    return b"".join(out)


def stamp(mtime: float) -> tuple[int, int]:
    """(time, date) in FAT's format, in UTC, clamped to 1980-2107. FAT stores no time zone: UTC
    gives the same bytes wherever the image is made (Linux reads it as UTC unless mounted with
    tz=/time_offset=; mtools shows it as local time)."""
    t = time.gmtime(mtime)
    if t.tm_year < 1980:
        return 0, (1 << 5) | 1
    if t.tm_year > 2107:
        return (23 << 11) | (59 << 5) | 29, (127 << 9) | (12 << 5) | 31
    return (t.tm_hour << 11) | (t.tm_min << 5) | (min(t.tm_sec, 59) // 2), (
        ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    )


def dir_entry(short: bytes, attr: int, flags: int, cluster: int, size: int, when: tuple[int, int]) -> bytes:
    """One short (8.3) directory entry; creation, access and write times all `when`."""
    hhmm, date = when
    return struct.pack(
        "<11sBBBHHHHHHHI", short, attr, flags, 0, hhmm, date, date, cluster >> 16, hhmm, date, cluster & 0xFFFF, size
    )


def boot_sector(
    *, sectors: int, sectors_per_cluster: int, reserved: int, fats: int, fat_sectors: int, hidden: int,
    volume_id: int, label: bytes,
) -> bytes:  # fmt: skip
    """The FAT32 boot sector (BPB). Geometry fields: 64 heads, 32 sectors a track. Its code, should
    a BIOS try to boot the medium, hands over to the next boot device."""
    sector = bytearray(SECTOR)
    sector[0:11] = b"\xeb\x58\x90MSWIN4.1"
    struct.pack_into(
        "<HBHBHHBHHHII", sector, 11,
        SECTOR, sectors_per_cluster, reserved, fats, 0, 0, MEDIA_FIXED, 0, 32, 64, hidden, sectors,
    )  # fmt: skip
    struct.pack_into(
        "<IHHIHH12sBBBI11s8s", sector, 36,
        fat_sectors, 0, 0, ROOT_CLUSTER, FSINFO_SECTOR, BACKUP_BOOT_SECTOR, b"", 0x80, 0, 0x29,
        volume_id, label, b"FAT32   ",
    )  # fmt: skip
    sector[BOOT_CODE : BOOT_CODE + len(NOT_BOOTABLE)] = NOT_BOOTABLE
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def fsinfo_sector(free_clusters: int, next_free: int) -> bytes:
    sector = bytearray(SECTOR)
    struct.pack_into("<I", sector, 0, 0x41615252)
    struct.pack_into("<III", sector, 484, 0x61417272, free_clusters, next_free)
    struct.pack_into("<I", sector, 508, 0xAA550000)
    return bytes(sector)


def fat_chunks(runs: Iterable[tuple[int, int]]) -> Iterator[bytes]:
    """The FAT from entry 0 on, in pieces of about 1 MiB, for chains of contiguous clusters
    `(first, count)` given in cluster order from cluster 2, with no gaps."""
    for chunk in _fat_entries(runs):
        if sys.byteorder != "little":
            chunk.byteswap()
        yield chunk.tobytes()


def _fat_entries(runs: Iterable[tuple[int, int]]) -> Iterator[array[int]]:
    entries = array("I", (0x0FFFFF00 | MEDIA_FIXED, END_OF_CHAIN))
    expected = ROOT_CLUSTER
    for first, count in runs:
        if first != expected or count < 1:
            raise ValueError(f"cluster run ({first}, {count}) does not follow cluster {expected}")
        expected = first + count
        for start in range(first + 1, first + count, _FAT_CHUNK):
            entries.extend(range(start, min(start + _FAT_CHUNK, first + count)))
            if len(entries) >= _FAT_CHUNK:
                yield entries
                entries = array("I")
        entries.append(END_OF_CHAIN)
        if len(entries) >= _FAT_CHUNK:
            yield entries
            entries = array("I")
    if entries:
        yield entries


def pyfatfs_class() -> Any:
    """pyfatfs's `PyFatFS`, the FAT32 reader, imported without the noise of its dependency `fs`:
    `fs` imports `pkg_resources`, which setuptools 82 removed and 80.9-81 warn about on import
    (pyproject.toml pins a setuptools that has it). Missing, one line says what to install."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            from pyfatfs.PyFatFS import PyFatFS
    except ImportError as e:
        if e.name == "pkg_resources":
            hint = ("its dependency `fs` needs pkg_resources, which setuptools 82 removed: "
                    "pip install 'setuptools<80.9' into mediabuilder's environment")
        else:
            hint = "pip install mediabuilder's dependencies (pyproject.toml) into its environment"
        raise InvalidInput(f"cannot import pyfatfs, which reads FAT32 images: {e}", hint=hint) from None
    return PyFatFS
