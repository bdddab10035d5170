"""Reading a FAT32 file system in place (mediabuilder.media.source's MediaSource), bare or in a
partition: boot sector, FAT and directories, each cluster chain walked once with loops and shared
clusters refused, so time and memory are bounded by the image.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path

from mediabuilder.errors import InvalidMedia
from mediabuilder.media.fatfs import (
    ATTR_DIRECTORY,
    ATTR_LONG_NAME,
    ATTR_VOLUME_ID,
    ENTRY,
    LAST_LONG_ENTRY,
    MAX_DIR_ENTRIES,
    NT_LOWER_BASE,
    NT_LOWER_EXT,
    checksum,
)
from mediabuilder.media.source import SECTOR, Extents, _ImageSource, is_fat32_boot_sector

FAT_MASK = 0x0FFFFFFF
FAT_BAD = 0x0FFFFFF7  # this and above: a bad cluster or the end of a chain


class FatSource(_ImageSource):
    """A FAT32 filesystem at `offset` bytes into an image file (Microsoft's FAT specification).

    Each cluster chain is walked once, from a FAT read whole: a cluster met twice (a loop, or two
    files or directories sharing clusters) or a chain that does not hold exactly its file's size
    is damaged media."""

    kind = "fat32"

    def __init__(self, path: Path, offset: int) -> None:
        super().__init__(path)
        self.offset = offset
        try:
            self._geometry()
            self._fat = self._read_fat()
            self._owner = bytearray(self._clusters + 2)  # 1: the cluster belongs to a file already
            self._index()
        except InvalidMedia:
            self.close()
            raise

    def _damaged(self, what: str) -> InvalidMedia:
        return InvalidMedia(f"{self.path}: damaged FAT32 image: {what}")

    def _geometry(self) -> None:
        boot = os.pread(self._image.fileno(), SECTOR, self.offset)
        if not is_fat32_boot_sector(boot):
            raise self._damaged(f"no FAT32 boot sector at byte {self.offset}")
        self._sector, per_cluster, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
        total = struct.unpack_from("<H", boot, 19)[0] or struct.unpack_from("<I", boot, 32)[0]
        self._fat_sectors, self._root = struct.unpack_from("<I", boot, 36)[0], struct.unpack_from("<I", boot, 44)[0]
        end = self.offset + total * self._sector
        if end > self.image_size:
            raise InvalidMedia(
                f"{self.path}: truncated FAT32 image: {self.image_size} bytes, its boot sector says the "
                f"filesystem ends at byte {end}"
            )
        data_sector = reserved + fats * self._fat_sectors
        if reserved < 1 or fats < 1 or self._fat_sectors < 1 or data_sector >= total:
            raise self._damaged("the boot sector's layout is impossible")
        backup = struct.unpack_from("<H", boot, 50)[0]
        fd = self._image.fileno()
        if 0 < backup < reserved and os.pread(fd, SECTOR, self.offset + backup * self._sector) != boot:
            raise self._damaged(f"the backup boot sector (sector {backup}) differs from the boot sector")
        self._fats = fats
        self._cluster_bytes = per_cluster * self._sector
        self._clusters = (total - data_sector) // per_cluster
        self._fat_offset = self.offset + reserved * self._sector
        self._data_offset = self.offset + data_sector * self._sector
        if (self._clusters + 2) * 4 > self._fat_sectors * self._sector:
            raise self._damaged(f"its FAT of {self._fat_sectors} sectors cannot hold {self._clusters} clusters")

    def _read_fat(self) -> array[int]:
        """The first FAT; every other copy must be the same (fsck.fat and Windows read those too)."""
        fat = array("I")
        length = (self._clusters + 2) * 4
        fd = self._image.fileno()
        data = os.pread(fd, length, self._fat_offset)
        for copy in range(1, self._fats):
            if os.pread(fd, length, self._fat_offset + copy * self._fat_sectors * self._sector) != data:
                raise self._damaged(f"FAT copy {copy + 1} differs from the first")
        fat.frombytes(data)
        if sys.byteorder != "little":
            fat.byteswap()
        return fat

    def _chain(self, first: int, clusters: int, what: str, size: int | None) -> Extents:
        """The extents of the chain from `first`: exactly the clusters a file of `size` bytes
        needs, or for a directory (`size` None) at most `clusters`."""
        extents: list[tuple[int, int]] = []
        cluster, count = first, 0
        while True:
            if not 2 <= cluster < self._clusters + 2:
                if size is not None and count:
                    raise self._damaged(f"the cluster chain of {what} ends before its {size} bytes")
                raise self._damaged(f"the cluster chain of {what} points at cluster {cluster:#x}")
            if self._owner[cluster]:
                raise self._damaged(f"the cluster chain of {what} loops or shares cluster {cluster} with another file")
            self._owner[cluster] = 1
            count += 1
            if count > clusters:
                raise self._damaged(f"the cluster chain of {what} is longer than its size allows")
            address = self._data_offset + (cluster - 2) * self._cluster_bytes
            if extents and sum(extents[-1]) == address:
                extents[-1] = (extents[-1][0], extents[-1][1] + self._cluster_bytes)
            else:
                extents.append((address, self._cluster_bytes))
            cluster = self._fat[cluster] & FAT_MASK
            if cluster >= FAT_BAD:
                if cluster != FAT_BAD and (count == clusters or size is None):
                    return tuple(extents)
                raise self._damaged(f"the cluster chain of {what} ends before its {size} bytes")

    def _index(self) -> None:
        pending = [("", self._root)]
        dir_clusters = -(-MAX_DIR_ENTRIES * ENTRY // self._cluster_bytes)
        while pending:
            rel, first = pending.pop()
            extents = self._chain(first, dir_clusters, f"directory /{rel}", None)
            data = b"".join(os.pread(self._image.fileno(), n, o) for o, n in extents)
            for name, attr, cluster, size in self._entries(data, rel):
                child = self._add(rel, name, f"/{rel}")
                if attr & ATTR_DIRECTORY:
                    self._dirs.add(child)
                    pending.append((child, cluster))
                elif size == 0:
                    if cluster != 0:
                        raise self._damaged(f"{child} is empty but has cluster {cluster}")
                    self._add_file(child, ())
                else:
                    chain = self._chain(cluster, -(-size // self._cluster_bytes), child, size)
                    last_offset, last_length = chain[-1]
                    trimmed = (*chain[:-1], (last_offset, last_length - (-size % self._cluster_bytes)))
                    self._add_file(child, trimmed)
        self._check_lost()

    def _check_lost(self) -> None:
        """Clusters the FAT marks in use must belong to a file or directory: a chain nothing
        points to is what is left of a damaged directory."""
        entries = self._fat[2:]  # counted in C: a stick has millions of clusters
        in_use = len(entries) - entries.count(0) - entries.count(FAT_BAD)
        lost = in_use - self._owner.count(1)  # every cluster of a chain walked is in use
        if lost:
            raise self._damaged(f"{lost} clusters in use belong to no file or directory (a damaged directory?)")

    def _entries(self, data: bytes, rel: str) -> Iterator[tuple[str, int, int, int]]:
        """(name, attributes, first cluster, size) of each entry in a directory's bytes."""
        long_parts: dict[int, bytes] = {}
        long_check = -1
        for at in range(0, len(data) - ENTRY + 1, ENTRY):
            entry = data[at : at + ENTRY]
            if entry[0] == 0:
                return
            attr = entry[11]
            if entry[0] == 0xE5:
                long_parts = {}
            elif attr & 0x3F == ATTR_LONG_NAME:
                if entry[0] & LAST_LONG_ENTRY:
                    long_parts, long_check = {}, entry[13]
                elif entry[13] != long_check:
                    long_check = -1  # every part carries the checksum: readers (mtools) check each one
                long_parts[entry[0] & 0x1F] = entry[1:11] + entry[14:26] + entry[28:32]
            elif attr & ATTR_VOLUME_ID:
                long_parts = {}
            else:
                short = entry[:11]
                name = self._long_name(long_parts, long_check, short, rel) or _short_name(short, entry[12])
                long_parts = {}
                if short in (b".          ", b"..         "):
                    continue
                cluster = struct.unpack_from("<H", entry, 20)[0] << 16 | struct.unpack_from("<H", entry, 26)[0]
                yield name, attr, cluster, struct.unpack_from("<I", entry, 28)[0]

    def _long_name(self, parts: dict[int, bytes], check: int, short: bytes, rel: str) -> str | None:
        if not parts or check != checksum(short) or sorted(parts) != list(range(1, len(parts) + 1)):
            return None  # an orphaned long name: readers use the short one, and so do we
        units = b"".join(parts[i] for i in sorted(parts))
        end = next((i for i in range(0, len(units), 2) if units[i : i + 2] == b"\0\0"), len(units))
        try:
            return units[:end].decode("utf-16-le")
        except UnicodeDecodeError:
            raise self._damaged(f"/{rel}: a long name that is not UTF-16") from None

    @property
    def free_bytes(self) -> int:
        free = self._fat[2:].count(0)
        return free * self._cluster_bytes


def _short_name(short: bytes, ntres: int) -> str:
    """The 8.3 name with the case recorded in DIR_NTRes."""
    raw = (b"\xe5" + short[1:]) if short[0] == 0x05 else short
    base, ext = raw[:8].rstrip(b" ").decode("cp437"), raw[8:].rstrip(b" ").decode("cp437")
    if ntres & NT_LOWER_BASE:
        base = base.lower()
    if ntres & NT_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base
