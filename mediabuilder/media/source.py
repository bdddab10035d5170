"""Reading media in place, without mounting or extracting it: a directory, an ISO 9660 image
or a FAT32 image.

Everything on a medium is hostile until verified. Opening an image indexes it once: every name
is checked (no `/`, no `.` or `..`, no NUL or control characters, not empty, no duplicates in
a directory) and every file's data is located as (offset, length) extents that must lie inside
the image and belong to no other file. A damaged structure is `InvalidMedia` when the image is
opened; files are then read by positioned reads of those extents, never copied anywhere.

This module has what all media share, the directory and the detection of an image's kind; the
image readers build on it: `iso_source` (ISO 9660 with Rock Ridge or Joliet, by pycdlib and
strict checks of its own) and `fat_source` (FAT32, bare or in the first FAT32 partition of an MBR
or GPT table).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

from mediabuilder.errors import InvalidInput, InvalidMedia

SECTOR = 512
ISO_SIGNATURE_OFFSET = 32769
ISO_BLOCK = 2048
GPT_SIGNATURE = b"EFI PART"
MBR_PROTECTIVE = 0xEE
CHUNK = 1024 * 1024
Extents = tuple[tuple[int, int], ...]  # (byte offset in the image, length) of a file's data


def check_name(name: str, where: str) -> str:
    """`name` if it can be one component of a medium-relative path; InvalidMedia otherwise."""
    if not name or name in (".", "..") or "/" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidMedia(f"{where}: invalid file name {name!r} (empty, '.', '..', '/' or a control character)")
    return name


def check_relpath(relpath: str, where: str) -> list[str]:
    """The components of a medium-relative POSIX path; InvalidMedia for anything else."""
    if relpath.startswith("/"):
        raise InvalidMedia(f"{where}: {relpath!r} is not relative to the medium")
    return [check_name(part, where) for part in relpath.split("/")]


class MediaSource(ABC):
    """Files and directories of some media, by relative POSIX path."""

    kind: str

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def files(self) -> Iterator[tuple[str, int]]:
        """(relative path, size) of every regular file."""

    @abstractmethod
    def dirs(self) -> Iterator[str]:
        """The relative path of every directory except the root."""

    @abstractmethod
    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        """A stream of the file's bytes; InvalidMedia when it is not a regular file."""

    @abstractmethod
    def size(self, relpath: str) -> int | None:
        """The size of a regular file, None when there is none by that name."""

    def is_file(self, relpath: str) -> bool:
        return self.size(relpath) is not None

    def is_dir(self, relpath: str) -> bool:
        return relpath in set(self.dirs())

    def read_bytes(self, relpath: str, limit: int) -> bytes:
        """The whole file, refused (InvalidMedia) when it is bigger than `limit` bytes."""
        size = self.size(relpath)
        if size is None:
            raise self._missing(relpath)
        if size > limit:
            raise InvalidMedia(f"{self.path}: {relpath} is {size} bytes, more than the {limit} it may have")
        with self.open(relpath) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidMedia(f"{self.path}: {relpath} grew while it was read")
        return data

    @property
    def free_bytes(self) -> int:
        return 0

    @property
    def size_total(self) -> int:
        return sum(size for _, size in self.files())

    def extract(self, relpath: str, dest: Path) -> None:
        """Copy the file to `dest`, streaming."""
        with self.open(relpath) as inp, dest.open("wb") as out:
            shutil.copyfileobj(inp, out, CHUNK)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> MediaSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _missing(self, relpath: str) -> InvalidMedia:
        return InvalidMedia(f"{self.path}: has no file {relpath}")


class DirSource(MediaSource):
    """A media tree in a directory. Symbolic links are not followed: media hold regular files."""

    kind = "dir"

    def files(self) -> Iterator[tuple[str, int]]:
        for top, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(st.st_mode):
                    yield Path(top, name).relative_to(self.path).as_posix(), st.st_size

    def dirs(self) -> Iterator[str]:
        for top, dirnames, _ in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if stat.S_ISDIR(os.lstat(os.path.join(top, d)).st_mode))
            for name in dirnames:
                yield Path(top, name).relative_to(self.path).as_posix()

    def _lstat(self, relpath: str) -> os.stat_result | None:
        """The file's own status, None when it or a directory on the way is missing or a link."""
        path = self.path
        try:
            for part in check_relpath(relpath, str(self.path)):
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return None
                path = path / part
            return os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def size(self, relpath: str) -> int | None:
        st = self._lstat(relpath)
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    def is_dir(self, relpath: str) -> bool:
        st = self._lstat(relpath)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        st = self._lstat(relpath)
        if st is None or not stat.S_ISREG(st.st_mode):
            kind = "missing" if st is None else "not a regular file"
            raise InvalidMedia(f"{self.path}: {relpath}: {kind} (media hold regular files, no links)")
        fd = os.open(self.path / relpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidMedia(f"{self.path}: {relpath}: not a regular file")
        return os.fdopen(fd, "rb")

    @property
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free


class _ImageSource(MediaSource):
    """An image indexed once: relative path → (extents, size), and the directories."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._files: dict[str, tuple[Extents, int]] = {}
        self._dirs: set[str] = set()
        self._taken: dict[str, set[str]] = {}  # directory → its names, as compared on this medium
        self._image = path.open("rb", buffering=0)
        self.image_size = os.fstat(self._image.fileno()).st_size

    def _fold(self, name: str) -> str:
        return name

    def _add(self, parent: str, name: str, where: str) -> str:
        """The child's relative path, its name checked and unique in `parent`."""
        check_name(name, f"{self.path}: {where}")
        taken = self._taken.setdefault(parent, set())
        if self._fold(name) in taken:
            raise InvalidMedia(f"{self.path}: {where}: the name {name!r} is in the directory twice")
        taken.add(self._fold(name))
        return f"{parent}/{name}" if parent else name

    def _add_file(self, rel: str, extents: Extents) -> None:
        for offset, length in extents:
            if offset + length > self.image_size:
                raise InvalidMedia(
                    f"{self.path}: truncated or damaged image: {rel} lies at bytes {offset}-{offset + length}, "
                    f"the image has {self.image_size}"
                )
        self._files[rel] = (extents, sum(length for _, length in extents))

    def files(self) -> Iterator[tuple[str, int]]:
        for rel, (_, size) in sorted(self._files.items()):
            yield rel, size

    def dirs(self) -> Iterator[str]:
        yield from sorted(self._dirs)

    def is_dir(self, relpath: str) -> bool:
        return relpath in self._dirs

    def size(self, relpath: str) -> int | None:
        entry = self._files.get(relpath)
        return None if entry is None else entry[1]

    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        if relpath not in self._files:
            raise self._missing(relpath)
        reader = _ExtentReader(self._image, self._files[relpath][0], f"{self.path}: {relpath}")
        return cast(AbstractContextManager[BinaryIO], io.BufferedReader(reader, CHUNK))

    def close(self) -> None:
        self._image.close()


def _data(extents: Extents | None) -> Extents | None:
    """The extents that hold data: an empty file's extent location means nothing."""
    return None if extents is None else tuple(e for e in extents if e[1])


class _ExtentReader(io.RawIOBase):
    """A file's bytes from (offset, length) extents of an image, by positioned reads."""

    def __init__(self, image: BinaryIO, extents: Extents, name: str) -> None:
        super().__init__()
        self._fd = image.fileno()
        self._extents = extents
        self._name = name
        self._index = 0  # the extent being read
        self._done = 0  # bytes of it read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._index < len(self._extents):
            offset, length = self._extents[self._index]
            if self._done < length:
                want = min(len(buffer), length - self._done)
                data = os.pread(self._fd, want, offset + self._done)
                if not data:
                    raise InvalidMedia(f"{self._name}: the image ends inside the file's data")
                buffer[: len(data)] = data
                self._done += len(data)
                return len(data)
            self._index, self._done = self._index + 1, 0
        return 0


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def is_fat32_boot_sector(sector: bytes) -> bool:
    """A FAT32 boot sector: jump, 55 AA, a power-of-two sector size, no 16-bit FAT size."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa" or sector[0] not in (0xEB, 0xE9):
        return False
    bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", sector, 11)
    fat16_size = struct.unpack_from("<H", sector, 22)[0]
    return (
        bytes_per_sector in (512, 1024, 2048, 4096)
        and sectors_per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
        and fat16_size == 0
        and sector[82:90] == b"FAT32   "
    )


def partition_offsets(f: BinaryIO) -> list[int]:
    """Byte offsets of the partitions in a GPT or MBR partition table, in table order."""
    mbr = _read_at(f, 0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    types = [mbr[446 + 16 * i + 4] for i in range(4)]
    header = _read_at(f, SECTOR, 92)
    if MBR_PROTECTIVE in types and header[:8] == GPT_SIGNATURE:
        backup_lba = struct.unpack_from("<Q", header, 32)[0]
        if (backup_lba + 1) * SECTOR > os.fstat(f.fileno()).st_size:
            raise InvalidMedia(
                f"{f.name}: truncated image: its backup GPT header (sector {backup_lba}) is past its end"
            )
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        if entry_size < 128 or entry_size > 4096:
            return []
        table = _read_at(f, entries_lba * SECTOR, min(count, 128) * entry_size)
        offsets = []
        for i in range(len(table) // entry_size):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16] != bytes(16):
                offsets.append(struct.unpack_from("<Q", entry, 32)[0] * SECTOR)
        return offsets
    starts = [struct.unpack_from("<I", mbr, 446 + 16 * i + 8)[0] for i in range(4)]
    return [start * SECTOR for kind, start in zip(types, starts, strict=True) if kind and start]


def detect(path: Path) -> tuple[str, int]:
    """("iso", 0), ("fat32", offset) for an image; InvalidMedia for anything else."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if _read_at(f, ISO_SIGNATURE_OFFSET, 5) == b"CD001":
                return "iso", 0
            if is_fat32_boot_sector(_read_at(f, 0, SECTOR)):
                return "fat32", 0
            offsets = partition_offsets(f)
            for offset in offsets:
                if is_fat32_boot_sector(_read_at(f, offset, SECTOR)):
                    return "fat32", offset
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read it: {e.strerror}") from e
    if any(offset >= size for offset in offsets):
        raise InvalidMedia(f"{path}: truncated image: its partition table points past its end ({size} bytes)")
    if offsets:
        raise InvalidMedia(f"{path}: damaged image: a partition table, but no FAT32 boot sector in its partitions")
    raise InvalidMedia(f"{path}: not a directory, ISO 9660 or FAT32 image")


def open_source(path: Path) -> MediaSource:
    """The media at `path`: a directory, an ISO 9660 image or a FAT32 image (maybe partitioned)."""
    if path.is_dir():
        return DirSource(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or directory")
    kind, offset = detect(path)
    from mediabuilder.media.fat_source import FatSource  # noqa: PLC0415 - they build on this module
    from mediabuilder.media.iso_source import IsoSource  # noqa: PLC0415

    try:
        if kind == "iso":
            return IsoSource(path)
        return FatSource(path, offset)
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read it: {e.strerror}") from e
