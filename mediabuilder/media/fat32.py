"""Writing the media tree as a FAT32 image, laid out in one pass.

The whole tree is known before anything is written, so every directory and file gets one run
of contiguous clusters (directories first, then files, in the order of a breadth-first walk),
the boot sectors, both FATs and every directory are written from that plan (`fatfs`), and file
data is copied into place. No FAT is read back and no free cluster is searched for, so the
writer runs at the speed of the copy. `fsck.fat`, mtools and pyfatfs check the result in the
tests. (pyfatfs creates files in time quadratic in a directory's size, and `mkfs.fat` + `mcopy`
is slower than this: see docs/images.md.)

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mediabuilder import interrupts, ui
from mediabuilder.errors import ExternalError, InternalError, InvalidInput
from mediabuilder.media import fatfs, reproducible
from mediabuilder.media.fatfs import LABEL_BYTES, SECTOR
from mediabuilder.media.label import validate_label
from mediabuilder.media.output import Copier, pwrite_all
from mediabuilder.media.split import FAT32_SAFE_FILE, Slice
from mediabuilder.run import output as run_output
from mediabuilder.run import require, run

MIB = 1024 * 1024
PARTITION_START = MIB
RESERVED_SECTORS = 32
FAT_COPIES = 2
FAT_ALIGN = 8  # sectors: each FAT a multiple of 4 KiB
# Fewer clusters than this and Windows (which goes by the cluster count) calls it FAT16.
MIN_CLUSTERS = 65525 + 16
MAX_CLUSTERS = 0x0FFFFFF5 - 16
MAX_CLUSTER_BYTES = 32768
MAX_IMAGE = 2 * 1024**4 - MIB  # see size_range
PARTITION_TABLES = ("none", "mbr", "gpt")
PARTITION_TYPES = {"mbr": "c", "gpt": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"}
HEADROOM_FRACTION = 0.10
HEADROOM_BYTES = 64 * MIB
_FAT_FORBIDDEN = re.compile(r'[\x00-\x1f"*/:<>?\\|]')


def fat_label(label: str) -> str:
    """The FAT volume label for the media label: upper case, at most 11 characters (a longer
    one is refused, not cut)."""
    return validate_label(label, "fat32")


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
    return MAX_CLUSTER_BYTES


@dataclass(frozen=True)
class Content:
    """What the tree needs on a FAT filesystem: file sizes and directory entry bytes."""

    file_sizes: tuple[int, ...]
    dir_entry_bytes: tuple[int, ...]  # one per directory, root first

    def clusters(self, cluster: int) -> int:
        files = sum(-(-size // cluster) for size in self.file_sizes)
        dirs = sum(_dir_clusters(size, cluster) for size in self.dir_entry_bytes)
        return files + dirs

    @property
    def file_bytes(self) -> int:
        return sum(self.file_sizes)


def _dir_clusters(entry_bytes: int, cluster: int) -> int:
    return max(1, -(-entry_bytes // cluster))


@dataclass(eq=False, slots=True)
class Node:
    """A file or directory of the tree, as it goes on the filesystem."""

    name: str
    path: Path
    size: int  # a file's bytes; a directory's entry bytes (dot entries or volume label included)
    mtime: float
    parent: Node | None = None
    children: list[Node] | None = None  # directories only, sorted by name
    cluster: int = 0  # the first cluster, once allocated (0: an empty file)
    offset: int = 0  # where a file's bytes start in `path` (a part: a slice of the whole file)


@dataclass
class Listing:
    """The tree: directories breadth first from the root, then files in the same order."""

    dirs: list[Node] = field(default_factory=list)
    files: list[Node] = field(default_factory=list)

    @property
    def content(self) -> Content:
        return Content(tuple(f.size for f in self.files), tuple(d.size for d in self.dirs))


def scan(tree: Path, epoch: int | None = None, slices: Mapping[Path, Sequence[Slice]] | None = None) -> Listing:
    """Every file and directory under `tree`, refusing what FAT32 cannot hold, each dated `epoch`
    (None: its mtime). A file in `slices` is written as its parts instead, each a byte range of
    it. One lstat per entry: this runs before every image is written, on trees of thousands of
    files."""
    root = Node("", tree, 0, tree.lstat().st_mtime if epoch is None else epoch, children=[])
    listing = Listing([root])
    for directory in listing.dirs:  # grows as subdirectories are found
        with os.scandir(directory.path) as scanned:
            entries = _entries(scanned, slices or {})
        seen: dict[str, str] = {}
        assert directory.children is not None
        for name, path, st, piece in entries:
            _check_name(path, name, seen)
            node = Node(name, path, 0, st.st_mtime if epoch is None else epoch, parent=directory)
            if stat.S_ISDIR(st.st_mode):
                node.children = []
                listing.dirs.append(node)
            elif not stat.S_ISREG(st.st_mode):
                raise InternalError(f"{path}: FAT32 holds only regular files and directories")
            elif (piece.size if piece else st.st_size) > FAT32_SAFE_FILE:
                raise InternalError(
                    f"{path}: {st.st_size} bytes is more than a FAT32 file safely holds ({FAT32_SAFE_FILE}); "
                    "the media tree must split it before it is written to a FAT32 image"
                )
            else:
                node.size, node.offset = (piece.size, piece.offset) if piece else (st.st_size, 0)
                listing.files.append(node)
            directory.children.append(node)
        # The root holds the volume label; every other directory "." and "..".
        entry_count = (1 if directory.parent is None else 2) + sum(fatfs.entry_count(e[0]) for e in entries)
        if entry_count > fatfs.MAX_DIR_ENTRIES:
            raise InvalidInput(
                f"{directory.path}: {len(entries)} names take {entry_count} directory entries, and a FAT32 "
                f"directory holds at most {fatfs.MAX_DIR_ENTRIES}",
                hint="use --format iso, or --format dir onto a stick formatted exFAT or ext4",
            )
        directory.size = entry_count * fatfs.ENTRY
    return listing


def _entries(scanned: Iterable[os.DirEntry[str]], slices: Mapping[Path, Sequence[Slice]],
             ) -> list[tuple[str, Path, os.stat_result, Slice | None]]:
    """A directory's entries by name: (name, path, lstat, the slice of a part or None); a file
    in `slices` gives way to its parts."""
    found: list[tuple[str, Path, os.stat_result, Slice | None]] = []
    for entry in scanned:
        path, st = Path(entry.path), entry.stat(follow_symlinks=False)
        pieces = slices.get(path)
        if pieces is None:
            found.append((entry.name, path, st, None))
        else:
            found.extend((piece.name, path, st, piece) for piece in pieces)
    return sorted(found, key=lambda e: e[0])


def _check_name(path: Path, name: str, seen: dict[str, str]) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes Python could only decode with surrogate escapes
        raise InternalError(f"{path!r}: the name is not UTF-8, and FAT32 stores names as UTF-16") from None
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
    def fat_sectors(self) -> int:
        """Sectors of one FAT: an entry for every cluster the data area could hold (a few more
        than fit beside the FATs), rounded up to 4 KiB so that the data area and its clusters
        start on page boundaries."""
        return _fat_sectors((self.sectors - RESERVED_SECTORS) // self.sectors_per_cluster)

    @property
    def clusters(self) -> int:
        data = self.sectors - RESERVED_SECTORS - FAT_COPIES * self.fat_sectors
        return data // self.sectors_per_cluster

    @classmethod
    def for_clusters(cls, clusters: int, cluster: int) -> Geometry:
        """The smallest filesystem of whole MiB with at least `clusters` clusters. The FATs are
        sized from the sectors (`fat_sectors`), a little more than `clusters` needs, so a MiB is
        added while that takes clusters below the count."""
        sectors = RESERVED_SECTORS + FAT_COPIES * _fat_sectors(clusters) + clusters * (cluster // SECTOR)
        geometry = cls(-(-sectors // (MIB // SECTOR)) * (MIB // SECTOR), cluster)
        while geometry.clusters < clusters:
            geometry = cls(geometry.sectors + MIB // SECTOR, cluster)
        return geometry


def _fat_sectors(clusters: int) -> int:
    sectors = -(-(clusters + 2) * 4 // SECTOR)
    return -(-sectors // FAT_ALIGN) * FAT_ALIGN


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


def size_range(partition_table: str) -> tuple[int, int]:
    """The smallest and the biggest image this writer makes, whatever the content: a filesystem
    of at least MIN_CLUSTERS clusters, and at most 2^32 - 1 sectors (the boot sector's and MBR's
    32-bit sector counts) with its partition table: 2 TiB - 1 MiB in all, for every table."""
    before, after = _overhead(partition_table)
    least = before + Geometry.for_clusters(MIN_CLUSTERS, SECTOR).sectors * SECTOR + after
    return least, MAX_IMAGE


def check_size(size: int, partition_table: str = "none") -> None:
    """InvalidInput, before any work, for a `--size` no content could fit or this writer cannot make."""
    least, most = size_range(partition_table)
    table = "" if partition_table == "none" else f" with a {partition_table} partition table"
    if size < least:
        raise InvalidInput(
            f"--size {_size_text(size)} is too small: a FAT32 image{table} is at least "
            f"{-(-least // MIB)} MiB ({least} bytes)",
            hint="leave out --size to size the image from its content",
        )
    if size > most:
        raise InvalidInput(
            f"--size {_size_text(size)} is too big: a FAT32 image is at most "
            f"{most // MIB} MiB (2 TiB - 1 MiB, {most} bytes)",
            hint="leave out --size to size the image from its content",
        )


def image_geometry(content: Content, size: int | None, partition_table: str) -> tuple[int, Geometry]:
    """The image size and the filesystem in it; InvalidInput if `size` cannot hold `content`."""
    before, after = _overhead(partition_table)
    if size is None:
        geometry = auto_geometry(content)
        return before + geometry.sectors * SECTOR + after, geometry
    if size > MAX_IMAGE:  # too small: the message below says what the content needs
        check_size(size, partition_table)
    fs_sectors = (size - before - after) // SECTOR
    # Microsoft's cluster size for the size first; bigger ones where the content then needs fewer
    # clusters than fit (as `minimum_geometry` may have chosen, just under a step of the table).
    cluster = cluster_size(fs_sectors * SECTOR) if fs_sectors > 0 else MAX_CLUSTER_BYTES * 2
    while cluster <= MAX_CLUSTER_BYTES:
        geometry = Geometry(fs_sectors, cluster)
        if geometry.clusters < MIN_CLUSTERS:
            break
        if geometry.clusters <= MAX_CLUSTERS and content.clusters(cluster) <= geometry.clusters:
            return size, geometry
        cluster *= 2
    least = before + minimum_geometry(content).sectors * SECTOR + after
    raise InvalidInput(
        f"--size {_size_text(size)} is too small: the content needs at least {-(-least // MIB)} MiB",
        hint="leave out --size to size the image automatically",
    )


def _size_text(size: int) -> str:
    if size <= 0:
        return str(size)
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", MIB), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def write_fat32(
    tree: Path, output: Path, *, label: str, size: int | None = None, partition_table: str = "none",
    into: Path | None = None, epoch: int | None = None, slices: Mapping[Path, Sequence[Slice]] | None = None,
) -> None:
    """Write every file and directory under `tree` to the FAT32 image `output`.

    Every entry is dated `epoch` (seconds since 1970, in UTC; None: each file's own mtime). The
    volume serial, the MBR disk identifier and the GPT GUIDs derive from the content.

    `size` is the whole image in bytes (None: sized from the content); `partition_table` is
    "none", "mbr" or "gpt". The image is built under a temporary name and renamed when done;
    with `into`, it is built there (the caller's temporary, renamed by the caller). A file of
    the tree in `slices` goes on the image as its parts, read straight from it.
    """
    if partition_table not in PARTITION_TABLES:
        raise InvalidInput(
            f"media.partition_table: {partition_table!r} is not one of {', '.join(PARTITION_TABLES)}"
        )
    volume_label = fat_label(label)
    if partition_table != "none":
        require("sfdisk", "to write partition tables on FAT32 images")
    listing = scan(tree, epoch, slices)
    seed = reproducible.content_seed(tree, volume_label)
    image_size, geometry = image_geometry(listing.content, size, partition_table)
    tmp = into or output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.truncate(image_size)
        offset = _partition(tmp, partition_table, seed)
        fd = os.open(tmp, os.O_RDWR)
        try:
            _write_filesystem(fd, offset, geometry, volume_label, listing, seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        if into is None:
            tmp.rename(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(output, image_size) from e
        raise
    except ExternalError as e:
        # sfdisk does not always say why it could not write; ask the filesystem before freeing it.
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


def _partition(image: Path, partition_table: str, seed: bytes) -> int:
    """Write the partition table, its identifiers derived from `seed`; return the filesystem's
    offset in bytes."""
    if partition_table == "none":
        return 0
    entry = f"start={PARTITION_START // SECTOR}, type={PARTITION_TYPES[partition_table]}"
    if partition_table == "mbr":
        script = f"label: dos\nlabel-id: 0x{reproducible.derived(seed, 'mbr disk id', 4).hex()}\n{entry}\n"
    else:
        disk, part = (reproducible.derived_uuid(seed, f"gpt {what} guid") for what in ("disk", "partition"))
        script = f"label: gpt\nlabel-id: {disk}\n{entry}, uuid={part}\n"
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", image], input=script.encode())
    table = json.loads(run_output(["sfdisk", "--json", image]))["partitiontable"]
    start = int(table["partitions"][0]["start"])
    return start * SECTOR


def _write_filesystem(fd: int, offset: int, geometry: Geometry, label: str, listing: Listing, seed: bytes) -> None:
    """Lay out and write the whole filesystem at `offset` in the (zero-filled, sparse) image."""
    runs = _allocate(listing, geometry.cluster)
    used = sum(count for _, count in runs)
    if used > geometry.clusters:
        raise InternalError(f"{used} clusters do not fit in a filesystem of {geometry.clusters}")
    label_bytes = label.ljust(LABEL_BYTES).encode("ascii")
    boot = fatfs.boot_sector(
        sectors=geometry.sectors, sectors_per_cluster=geometry.sectors_per_cluster,
        reserved=RESERVED_SECTORS, fats=FAT_COPIES, fat_sectors=geometry.fat_sectors,
        hidden=offset // SECTOR, label=label_bytes,
        volume_id=int.from_bytes(reproducible.derived(seed, "fat volume id", 4), "little"),
    )  # fmt: skip
    next_free = fatfs.ROOT_CLUSTER + used if used < geometry.clusters else fatfs.UNKNOWN
    info = fatfs.fsinfo_sector(geometry.clusters - used, next_free)
    for sector in (0, fatfs.BACKUP_BOOT_SECTOR):
        pwrite_all(fd, boot + info, offset + sector * SECTOR)

    fat_start = offset + RESERVED_SECTORS * SECTOR
    fat_bytes = geometry.fat_sectors * SECTOR
    position = 0
    for chunk in fatfs.fat_chunks(runs):
        for copy in range(FAT_COPIES):
            pwrite_all(fd, chunk, fat_start + copy * fat_bytes + position)
        position += len(chunk)

    data_start = fat_start + FAT_COPIES * fat_bytes

    def at(cluster: int) -> int:
        return data_start + (cluster - fatfs.ROOT_CLUSTER) * geometry.cluster

    for directory in listing.dirs:
        pwrite_all(fd, _directory(directory, label_bytes), at(directory.cluster))
    copier = Copier(fd)
    with ui.progress(listing.content.file_bytes, "Writing FAT32 image") as bar:
        for node in listing.files:
            interrupts.check()
            if node.size:
                copier.copy(node.path, node.offset, node.size, at(node.cluster), bar.update)


def _allocate(listing: Listing, cluster: int) -> list[tuple[int, int]]:
    """Give every directory, then every non-empty file, the next clusters; the runs in order."""
    runs = []
    following = fatfs.ROOT_CLUSTER
    for node in listing.dirs + listing.files:
        count = _dir_clusters(node.size, cluster) if node.children is not None else -(-node.size // cluster)
        if count:
            node.cluster = following
            runs.append((following, count))
            following += count
    return runs


def _directory(node: Node, label: bytes) -> bytes:
    """A directory's entries: the volume label (root) or "." and "..", then each child's long
    name entries (when its name needs them) and short entry."""
    assert node.children is not None
    when = fatfs.stamp(node.mtime)
    if node.parent is None:
        entries = [fatfs.dir_entry(label, fatfs.ATTR_VOLUME_ID, 0, 0, 0, when)]
    else:
        parent_cluster = 0 if node.parent.parent is None else node.parent.cluster  # 0: the root
        entries = [
            fatfs.dir_entry(b".".ljust(11), fatfs.ATTR_DIRECTORY, 0, node.cluster, 0, when),
            fatfs.dir_entry(b"..".ljust(11), fatfs.ATTR_DIRECTORY, 0, parent_cluster, 0, when),
        ]
    short_names = fatfs.ShortNames(child.name for child in node.children)
    for child in node.children:
        fit = fatfs.short_fit(child.name)
        if fit is None:
            short, flags = short_names.generate(child.name), 0
            entries.append(fatfs.long_entries(child.name, short))
        else:
            short, flags = fit
        if child.children is None:
            attr, size = fatfs.ATTR_ARCHIVE, child.size
        else:
            attr, size = fatfs.ATTR_DIRECTORY, 0
        entries.append(fatfs.dir_entry(short, attr, flags, child.cluster, size, fatfs.stamp(child.mtime)))
    data = b"".join(entries)
    if len(data) != node.size:
        raise InternalError(f"{node.path}: {len(data)} bytes of directory entries, {node.size} planned")
    return data
