"""Writing the media tree as a FAT32 image with dosfstools and mtools.

pyfatfs takes time quadratic in a directory's size to create files (docs/images.md), so the
image is formatted by `mkfs.fat` and filled by `mcopy`; pyfatfs only reads (see `source`).
The image is a bare filesystem ("superfloppy") or carries an MBR or GPT partition table
written by `sfdisk`, with one partition starting at 1 MiB.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder import ui
from mediabuilder.errors import ExternalError, InternalError, InvalidInput
from mediabuilder.media.iso import validate_label
from mediabuilder.media.split import FAT32_MAX_FILE
from mediabuilder.run import output as run_output
from mediabuilder.run import require, run

SECTOR = 512
MIB = 1024 * 1024
PARTITION_START = MIB
RESERVED_SECTORS = 32
FAT_COPIES = 2
# Fewer clusters than this and Windows (which goes by the cluster count) calls it FAT16.
MIN_CLUSTERS = 65525 + 16
MAX_CLUSTERS = 0x0FFFFFF5 - 16
LABEL_MAX = 11
PARTITION_TABLES = ("none", "mbr", "gpt")
PARTITION_TYPES = {"mbr": "c", "gpt": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"}
HEADROOM_FRACTION = 0.10
HEADROOM_BYTES = 64 * MIB
_FAT_FORBIDDEN = re.compile(r'[\x00-\x1f"*/:<>?\\|]')

TOOLS = {
    "mkfs.fat": "to format FAT32 images",
    "mcopy": "to copy files into FAT32 images",
    "mmd": "to make directories in FAT32 images",
    "sfdisk": "to write partition tables on FAT32 images",
}


def fat_label(label: str) -> str:
    """The FAT volume label for the media label: upper case, at most 11 characters."""
    return validate_label(label)[:LABEL_MAX]


def cluster_size(volume_bytes: int) -> int:
    """The cluster size Microsoft's table (and mkfs.fat) picks for a FAT32 volume this big."""
    if volume_bytes <= 260 * MIB:
        return 512
    if volume_bytes <= 8 * 1024 * MIB:
        return 4096
    if volume_bytes <= 16 * 1024 * MIB:
        return 8192
    if volume_bytes <= 32 * 1024 * MIB:
        return 16384
    return 32768


@dataclass(frozen=True)
class Content:
    """What the tree needs on a FAT filesystem: file sizes and directory entry bytes."""

    file_sizes: tuple[int, ...]
    dir_entry_bytes: tuple[int, ...]  # one per directory, root first

    def clusters(self, cluster: int) -> int:
        files = sum(-(-size // cluster) for size in self.file_sizes)
        dirs = sum(max(1, -(-size // cluster)) for size in self.dir_entry_bytes)
        return files + dirs

    @property
    def file_bytes(self) -> int:
        return sum(self.file_sizes)


def _entry_bytes(name: str) -> int:
    """Directory bytes for one entry: a short entry plus long-name entries (13 UTF-16 units each)."""
    units = len(name.encode("utf-16-le")) // 2
    return 32 * (1 + -(-units // 13))


def scan(tree: Path) -> Content:
    """Sizes of the tree's files and directories, refusing what FAT32 cannot hold. One lstat per
    entry: this runs before every image is written, on trees of thousands of files."""
    sizes: list[int] = []
    dir_bytes: list[int] = []
    pending = [(tree, 0)]
    while pending:
        directory, dots = pending.pop(0)
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        seen: dict[str, str] = {}
        for entry in entries:
            path = Path(entry.path)
            _check_name(path, entry.name, seen)
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                pending.append((path, 64))
            elif not stat.S_ISREG(st.st_mode):
                raise InternalError(f"{path}: FAT32 holds only regular files and directories")
            elif st.st_size > FAT32_MAX_FILE:
                raise InternalError(
                    f"{path}: {st.st_size} bytes is more than FAT32 holds ({FAT32_MAX_FILE}); "
                    "the media tree must split it before it is written to a FAT32 image"
                )
            else:
                sizes.append(st.st_size)
        dir_bytes.append(dots + sum(_entry_bytes(entry.name) for entry in entries))
    return Content(tuple(sizes), tuple(dir_bytes))


def _check_name(path: Path, name: str, seen: dict[str, str]) -> None:
    if _FAT_FORBIDDEN.search(name) or name.endswith((".", " ")):
        raise InternalError(f"{path}: the name cannot be stored on FAT32")
    other = seen.setdefault(name.lower(), name)
    if other != name:
        raise InternalError(f"{path}: FAT32 names ignore case, and {other!r} is in the same directory")


@dataclass(frozen=True)
class Geometry:
    """The layout of a FAT32 filesystem of `sectors` 512-byte sectors."""

    sectors: int
    cluster: int

    @property
    def sectors_per_cluster(self) -> int:
        return self.cluster // SECTOR

    @property
    def clusters(self) -> int:
        spc = self.sectors_per_cluster
        data = self.sectors - RESERVED_SECTORS
        fat_sectors = -(-(data // spc + 2) * 4 // SECTOR)
        return (data - FAT_COPIES * fat_sectors) // spc

    @classmethod
    def for_clusters(cls, clusters: int, cluster: int) -> Geometry:
        fat_sectors = -(-(clusters + 2) * 4 // SECTOR)
        sectors = RESERVED_SECTORS + FAT_COPIES * fat_sectors + clusters * (cluster // SECTOR)
        return cls(-(-sectors // (MIB // SECTOR)) * (MIB // SECTOR), cluster)


def _overhead(partition_table: str) -> tuple[int, int]:
    """Bytes before and after the filesystem in the image."""
    if partition_table == "none":
        return 0, 0
    return PARTITION_START, (MIB if partition_table == "gpt" else 0)


def minimum_geometry(content: Content) -> Geometry:
    """The smallest FAT32 filesystem that holds `content` (no headroom)."""
    cluster = 512
    while True:
        need = max(content.clusters(cluster), MIN_CLUSTERS)
        geometry = Geometry.for_clusters(need, cluster)
        if cluster_size(geometry.sectors * SECTOR) <= cluster:
            return geometry
        cluster *= 2


def auto_geometry(content: Content) -> Geometry:
    """A filesystem for `content` with 10% + 64 MiB to spare, clusters per Microsoft's table."""
    cluster = 512
    while True:
        used = content.clusters(cluster) * cluster
        room = math.ceil(used * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES
        need = max(-(-room // cluster), MIN_CLUSTERS)
        geometry = Geometry.for_clusters(need, cluster)
        if cluster_size(geometry.sectors * SECTOR) <= cluster:
            return geometry
        cluster *= 2


def image_geometry(content: Content, size: int | None, partition_table: str) -> tuple[int, Geometry]:
    """The image size and the filesystem in it; InvalidInput if `size` cannot hold `content`."""
    before, after = _overhead(partition_table)
    if size is None:
        geometry = auto_geometry(content)
        return before + geometry.sectors * SECTOR + after, geometry
    fs_sectors = (size - before - after) // SECTOR
    if fs_sectors > 0:
        geometry = Geometry(fs_sectors, cluster_size(fs_sectors * SECTOR))
        if MIN_CLUSTERS <= geometry.clusters <= MAX_CLUSTERS and content.clusters(
            geometry.cluster
        ) <= geometry.clusters:
            return size, geometry
    least = before + minimum_geometry(content).sectors * SECTOR + after
    raise InvalidInput(
        f"--size {_size_text(size)} is too small: the content needs at least {-(-least // MIB)} MiB",
        hint="leave out --size to size the image automatically",
    )


def _size_text(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", MIB), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def write_fat32(
    tree: Path, output: Path, *, label: str, size: int | None = None, partition_table: str = "none"
) -> None:
    """Write every file and directory under `tree` to the FAT32 image `output`.

    `size` is the whole image in bytes (None: sized from the content); `partition_table` is
    "none", "mbr" or "gpt". The image is built under a temporary name and renamed when done.
    """
    if partition_table not in PARTITION_TABLES:
        raise InvalidInput(
            f"media.partition_table: {partition_table!r} is not one of {', '.join(PARTITION_TABLES)}"
        )
    volume_label = fat_label(label)
    for tool, purpose in TOOLS.items():
        if tool != "sfdisk" or partition_table != "none":
            require(tool, purpose)
    content = scan(tree)
    image_size, geometry = image_geometry(content, size, partition_table)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.truncate(image_size)
        offset = _partition(tmp, partition_table)
        _format(tmp, offset, geometry, volume_label)
        _copy(tree, tmp, offset, content)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.rename(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(output, image_size) from e
        raise
    except ExternalError as e:
        # mkfs.fat says only "failed whilst writing FAT"; ask the filesystem before freeing it.
        full = "No space left on device" in str(e) or _nearly_full(output.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise _no_space(output, image_size) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nearly_full(directory: Path) -> bool:
    """Less than 1 MiB left for us: a failed write there was most likely a full disk."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize < MIB


def _no_space(output: Path, image_size: int) -> InvalidInput:
    return InvalidInput(
        f"{output}: no space left on device while writing the FAT32 image "
        f"({ui.human_bytes(image_size)}, sparse)",
        hint="free some space or write the image to another filesystem",
    )


def _partition(image: Path, partition_table: str) -> int:
    """Write the partition table; return the filesystem's offset in bytes."""
    if partition_table == "none":
        return 0
    label = "dos" if partition_table == "mbr" else "gpt"
    script = f"label: {label}\nstart={PARTITION_START // SECTOR}, type={PARTITION_TYPES[partition_table]}\n"
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", image], input=script.encode())
    table = json.loads(run_output(["sfdisk", "--json", image]))["partitiontable"]
    start = int(table["partitions"][0]["start"])
    return start * SECTOR


def _format(image: Path, offset: int, geometry: Geometry, label: str) -> None:
    sectors = offset // SECTOR
    run(
        [
            "mkfs.fat", "-F", "32", "-S", str(SECTOR), "-s", str(geometry.sectors_per_cluster),
            "-R", str(RESERVED_SECTORS), "-f", str(FAT_COPIES), "-n", label, "--mbr=n",
            "-h", str(sectors), f"--offset={sectors}", image, str(geometry.sectors * SECTOR // 1024),
        ]
    )  # fmt: skip


def mtools_image(image: Path, offset: int) -> str:
    """The `-i` argument of mtools for a filesystem at `offset` bytes in `image`."""
    return f"{image}@@{offset}" if offset else os.fspath(image)


def _copy(tree: Path, image: Path, offset: int, content: Content) -> None:
    """Copy the whole tree with one `mcopy -s` (it makes every directory, empty ones too).

    One call, because every mtools call reads and writes back the whole FAT: per-batch calls
    cost that again and again on a big image. Progress comes from the image's allocated blocks
    (the image is sparse). `mcopy -b` (batch mode) is not used: mtools 4.0.32 fails with
    "size too big" with it.
    """
    target = mtools_image(image, offset)
    entries = sorted(tree.iterdir())
    if not entries:
        return
    start = image.stat().st_blocks * 512
    done = threading.Event()

    def watch(bar: Any) -> None:
        seen = 0
        while not done.wait(0.5):
            now = image.stat().st_blocks * 512 - start
            if now > seen:
                bar.update(min(now, content.file_bytes) - min(seen, content.file_bytes))
                seen = now

    with ui.progress(content.file_bytes, "Writing FAT32 image") as bar:
        watcher = threading.Thread(target=watch, args=(bar,), daemon=True)
        watcher.start()
        try:
            run(["mcopy", "-s", "-Q", "-m", "-i", target, *entries, "::/"])
        finally:
            done.set()
            watcher.join()
