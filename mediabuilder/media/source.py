"""Reading media without mounting it: a directory, an ISO 9660 image or a FAT32 image.

ISO images are read with pycdlib by ISO 9660 (or Joliet) path, never by Rock Ridge path,
because pycdlib by Rock Ridge path returns only the last extent of a multi-extent file; the
names presented are the Rock Ridge ones. FAT32 images, bare or in the first FAT32 partition
of an MBR or GPT table, are read with pyfatfs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Generic, TypeVar, cast

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from mediabuilder.errors import InvalidInput, InvalidMedia
from mediabuilder.media.fatfs import NT_LOWER_BASE, NT_LOWER_EXT

SECTOR = 512
ISO_SIGNATURE_OFFSET = 32769
GPT_SIGNATURE = b"EFI PART"
MBR_PROTECTIVE = 0xEE
CHUNK = 1024 * 1024
Native = TypeVar("Native")  # how an image reader names a file: a path, a first cluster


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
        """A stream of the file's bytes."""

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
    kind = "dir"

    def files(self) -> Iterator[tuple[str, int]]:
        for top, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(top, name)
                if path.is_file() and not path.is_symlink():
                    yield path.relative_to(self.path).as_posix(), path.stat().st_size

    def dirs(self) -> Iterator[str]:
        for top, dirnames, _ in os.walk(self.path):
            dirnames.sort()
            for name in dirnames:
                yield Path(top, name).relative_to(self.path).as_posix()

    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        path = self.path / relpath
        if not path.is_file():
            raise self._missing(relpath)
        return path.open("rb")

    @property
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free


class _IndexedSource(MediaSource, Generic[Native]):
    """An image read through an index built when it is opened: relative path → (what the
    reader needs to open the file, size), and the directories."""

    _files: dict[str, tuple[Native, int]]
    _dirs: list[str]

    def files(self) -> Iterator[tuple[str, int]]:
        for rel, (_, size) in sorted(self._files.items()):
            yield rel, size

    def dirs(self) -> Iterator[str]:
        yield from sorted(self._dirs)

    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        if relpath not in self._files:
            raise self._missing(relpath)
        native, size = self._files[relpath]
        return self._open_native(relpath, native, size)

    @abstractmethod
    def _open_native(self, relpath: str, native: Native, size: int) -> AbstractContextManager[BinaryIO]: ...


class IsoSource(_IndexedSource[str]):
    """An ISO 9660 image, by Rock Ridge names if it has them, else Joliet, else ISO 9660."""

    kind = "iso"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(os.fspath(path))
            joliet_only = not self._iso.has_rock_ridge() and self._iso.has_joliet()
            self._key = "joliet_path" if joliet_only else "iso_path"
            self._files: dict[str, tuple[str, int]] = {}
            self._dirs: list[str] = []
            self._index("", "/")
        except PyCdlibException as e:
            self._iso.close()
            raise InvalidMedia(f"{path}: damaged ISO 9660 image: {e}") from e

    def _index(self, rel: str, path: str) -> None:
        names: dict[str, int] = {}  # multi-extent files are several records with one name
        for record in self._iso.list_children(**{self._key: path}):
            if record.is_dot() or record.is_dotdot():
                continue
            name, ident = self._name(record)
            if record.rock_ridge is not None and record.rock_ridge.is_symlink():
                continue
            child_rel = f"{rel}/{name}" if rel else name
            child_path = f"{path.rstrip('/')}/{ident}"
            moved = record.rock_ridge.cl_to_moved_dr if record.rock_ridge is not None else None
            if moved is not None:  # a directory relocated (deeper than 8 levels) by Rock Ridge
                child_path = self._iso.full_path_from_dirrecord(moved)
                self._dirs.append(child_rel)
                self._index(child_rel, child_path)
            elif record.is_dir():
                if record.rock_ridge is not None and (
                    record.rock_ridge.relocated_record() or (rel == "" and ident == "RR_MOVED")
                ):
                    continue  # where Rock Ridge keeps relocated directories, not part of the tree
                self._dirs.append(child_rel)
                self._index(child_rel, child_path)
            elif name in names:
                iso_path, size = self._files[child_rel]
                self._files[child_rel] = (iso_path, size + record.get_data_length())
            else:
                names[name] = 1
                self._files[child_rel] = (child_path, record.get_data_length())

    def _name(self, record: Any) -> tuple[str, str]:
        ident = record.file_identifier().decode("utf-16-be" if self._key == "joliet_path" else "ascii")
        if record.rock_ridge is not None and record.rock_ridge.name():
            return record.rock_ridge.name().decode(), ident
        return ident.split(";")[0], ident

    def _open_native(self, relpath: str, native: str, size: int) -> AbstractContextManager[BinaryIO]:
        stream = self._iso.open_file_from_iso(**{self._key: native})
        return cast(AbstractContextManager[BinaryIO], stream)

    def close(self) -> None:
        with contextlib.suppress(PyCdlibException):
            self._iso.close()


class FatSource(_IndexedSource[int]):
    """A FAT32 filesystem at `offset` bytes into an image file, read with pyfatfs.

    pyfatfs reads the boot sector, the FAT and the directories. File data is read here, along
    each file's cluster chain in pyfatfs's FAT: pyfatfs's own `openbin` looks the path up
    again, one entry at a time, which took 18 ms a file in a directory of 3,000 (a verify of a
    big cache would spend minutes on it)."""

    kind = "fat32"

    def __init__(self, path: Path, offset: int) -> None:
        super().__init__(path)
        self.offset = offset
        from pyfatfs.PyFatFS import PyFatFS

        try:
            self._fs = PyFatFS(os.fspath(path), offset=offset, read_only=True, preserve_case=True)
        except Exception as e:  # pyfatfs raises several kinds on damaged images
            raise InvalidMedia(f"{path}: damaged FAT32 image: {e}") from e

        self._files: dict[str, tuple[int, int]] = {}  # relpath -> (first cluster, size)
        self._dirs: list[str] = []
        self._index(self._fs.fs.root_dir, "")
        self._image = path.open("rb", buffering=0)

    def _index(self, directory: Any, rel: str) -> None:
        subdirs, files, _ = directory.get_entries()
        for entry in subdirs + files:
            name = _fat_name(entry)
            child_rel = f"{rel}/{name}" if rel else name
            if entry.is_directory():
                self._dirs.append(child_rel)
                self._index(entry, child_rel)
            else:
                self._files[child_rel] = (int(entry.get_cluster()), int(entry.filesize))

    def _open_native(self, relpath: str, native: int, size: int) -> AbstractContextManager[BinaryIO]:
        reader = _ExtentReader(self._image, self._extents(relpath, native, size), f"{self.path}: {relpath}")
        return cast(AbstractContextManager[BinaryIO], reader)

    def _extents(self, rel: str, first_cluster: int, size: int) -> list[tuple[int, int]]:
        """(byte offset in the image, length) of the file's data, contiguous clusters merged."""
        fat = self._fs.fs
        cluster_bytes = fat.bytes_per_cluster
        extents: list[tuple[int, int]] = []
        cluster = first_cluster
        for done in range(0, size, cluster_bytes):
            if not 2 <= cluster < len(fat.fat):  # free, bad, end of chain or out of range
                raise InvalidMedia(
                    f"{self.path}: damaged FAT32 image: the cluster chain of {rel} ends before its "
                    f"{size} bytes"
                )
            address = self.offset + fat.get_data_cluster_address(cluster)
            length = min(cluster_bytes, size - done)
            if extents and sum(extents[-1]) == address:
                extents[-1] = (extents[-1][0], extents[-1][1] + length)
            else:
                extents.append((address, length))
            cluster = fat.fat[cluster]
        return extents

    @property
    def free_bytes(self) -> int:
        fat = self._fs.fs
        bpb = fat.bpb_header
        total = bpb["BPB_TotSec16"] or bpb["BPB_TotSec32"]
        data = total - bpb["BPB_RsvdSecCnt"] - bpb["BPB_NumFATs"] * bpb["BPB_FATSz32"]
        clusters = data // bpb["BPB_SecPerClus"]
        free = sum(1 for entry in fat.fat[2 : clusters + 2] if entry == 0)
        return int(free * fat.bytes_per_cluster)

    def close(self) -> None:
        self._image.close()
        self._fs.close()


class _ExtentReader(io.RawIOBase):
    """A file's bytes from (offset, length) extents of an image, by positioned reads."""

    def __init__(self, image: BinaryIO, extents: list[tuple[int, int]], name: str) -> None:
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


def _fat_name(entry: Any) -> str:
    """The long name, else the 8.3 name with the case recorded in DIR_NTRes."""
    if entry.lfn_entry is not None:
        return str(entry.lfn_entry)
    base, dot, ext = entry.get_short_name().partition(".")
    if entry.ntres & NT_LOWER_BASE:
        base = base.lower()
    if entry.ntres & NT_LOWER_EXT:
        ext = ext.lower()
    return base + dot + ext


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
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
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
            if _read_at(f, ISO_SIGNATURE_OFFSET, 5) == b"CD001":
                return "iso", 0
            if is_fat32_boot_sector(_read_at(f, 0, SECTOR)):
                return "fat32", 0
            for offset in partition_offsets(f):
                if is_fat32_boot_sector(_read_at(f, offset, SECTOR)):
                    return "fat32", offset
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read it: {e.strerror}") from e
    raise InvalidMedia(f"{path}: not a directory, ISO 9660 or FAT32 image")


def open_source(path: Path) -> MediaSource:
    """The media at `path`: a directory, an ISO 9660 image or a FAT32 image (maybe partitioned)."""
    if path.is_dir():
        return DirSource(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or directory")
    kind, offset = detect(path)
    if kind == "iso":
        return IsoSource(path)
    return FatSource(path, offset)
