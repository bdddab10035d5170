"""Reading media in place, without mounting or extracting it: a directory, an ISO 9660 image
or a FAT32 image.

Everything on a medium is hostile until verified. Opening an image indexes it once: every name
is checked (no `/`, no `.` or `..`, no NUL or control characters, not empty, no duplicates in
a directory) and every file's data is located as (offset, length) extents that must lie inside
the image and belong to no other file. A damaged structure is `InvalidMedia` when the image is
opened; files are then read by positioned reads of those extents, never copied anywhere.

ISO images are indexed with pycdlib by ISO 9660 (or Joliet) path, never by Rock Ridge path
(pycdlib by Rock Ridge path returns only the last extent of a multi-extent file); the names
presented are the Rock Ridge ones. FAT32 images, bare or in the first FAT32 partition of an
MBR or GPT table, are read here: boot sector, FAT and directories, each cluster chain walked
once with loops and shared clusters refused, so time and memory are bounded by the image.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import struct
import sys
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from mediabuilder.errors import InvalidInput, InvalidMedia
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

SECTOR = 512
ISO_SIGNATURE_OFFSET = 32769
ISO_BLOCK = 2048
NM_CURRENT, NM_PARENT = 0x02, 0x04  # Rock Ridge NM flags: the name is "." or ".."
GPT_SIGNATURE = b"EFI PART"
MBR_PROTECTIVE = 0xEE
CHUNK = 1024 * 1024
FAT_MASK = 0x0FFFFFFF
FAT_BAD = 0x0FFFFFF7  # this and above: a bad cluster or the end of a chain
JOLIET_MAX = 64  # characters of a Joliet name
_NOT_JOLIET = re.compile(r"[*/:;?\\]")
_ISO_FILE = re.compile(r"[A-Z0-9_]*(\.[A-Z0-9_]*)?;[0-9]+")  # ECMA-119 levels 2 and 3, what writers write
# a directory's name is d-characters; xorriso's -full-iso9660-filenames (NixOS's installer ISOs)
# keeps one dot in it: /BOOT/3HG0…KD1A5H.30 for boot/3hg0…-linux-6.12.30
_ISO_DIR = re.compile(r"[A-Z0-9_]+(\.[A-Z0-9_]*)?")
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


def _plain_name_fits(name: str, ident: str, is_dir: bool) -> bool:
    """Whether the ISO 9660 name `ident` spells the Rock Ridge `name` as writers make such names:
    upper case, other characters as `_`, cut short (the extension kept, for directories too with
    xorriso), and maybe a number at the end that keeps two names apart (pycdlib's and
    mediabuilder's `_N`, xorriso's trailing digits). A name changed into another valid one (a
    flipped byte) does not fit."""
    def spelt(text: str) -> str:
        return re.sub(r"[^A-Z0-9_]", "_", text.upper())

    def fits(stem: str, want: str) -> bool:
        return want.startswith(stem) or want.startswith(re.sub(r"_?[0-9]+$", "", stem))

    plain = ident.split(";")[0]
    if fits(plain.replace(".", "_") if is_dir else plain.rstrip("."), spelt(name)):
        return True
    stem, dot, ext = plain.rpartition(".")
    want_stem, want_dot, want_ext = name.rpartition(".")
    if not dot or not want_dot or not want_stem:
        return False
    return spelt(want_ext).startswith(ext) and fits(stem, spelt(want_stem))


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


class IsoSource(_ImageSource):
    """An ISO 9660 image, by Rock Ridge names if it has them, else Joliet, else ISO 9660."""

    kind = "iso"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._iso = pycdlib.PyCdlib()
        try:
            self._check_size()
            self._iso.open_fp(self._image)
            joliet_only = not self._iso.has_rock_ridge() and self._iso.has_joliet()
            self._key = "joliet_path" if joliet_only else "iso_path"
            self._seen: set[int] = set()  # directory extents indexed: a directory met twice is a loop
            self._misspelt: list[str] = []  # ISO 9660 names that do not spell their Rock Ridge names
            root = self._iso.get_record(**{self._key: "/"})
            self._check_both_endian("/", root)
            self._index("", "/", (root.extent_location(), root.extent_location()))
            self._check_overlaps()
            if self._key == "iso_path" and self._iso.has_rock_ridge() and self._iso.has_joliet():
                self._check_joliet()
            if self._misspelt:  # last: a duplicate or a Joliet mismatch says more about the same damage
                raise InvalidMedia(self._misspelt[0])
        except InvalidMedia:
            self.close()
            raise
        except (PyCdlibException, ValueError, LookupError, struct.error, UnicodeError, RecursionError) as e:
            self.close()
            raise InvalidMedia(f"{path}: damaged ISO 9660 image: {e}") from e

    def _check_size(self) -> None:
        pvd = os.pread(self._image.fileno(), ISO_BLOCK, 16 * ISO_BLOCK)
        if len(pvd) < 88:
            raise InvalidMedia(f"{self.path}: truncated ISO 9660 image: it ends inside its volume descriptor")
        blocks, block_size = struct.unpack_from("<I", pvd, 80)[0], struct.unpack_from("<H", pvd, 128)[0]
        if block_size != ISO_BLOCK:
            raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: logical block size {block_size}, not 2048")
        if blocks * block_size > self.image_size:
            raise InvalidMedia(
                f"{self.path}: truncated ISO 9660 image: {self.image_size} bytes, its volume descriptor says "
                f"{blocks * block_size}"
            )
        self._check_descriptors(blocks)

    def _check_descriptors(self, blocks: int) -> None:
        """The primary and supplementary (Joliet) volume descriptors as strict readers (libarchive)
        want them, ECMA-119's reserved fields zero: a reader that rejects a descriptor reads
        another tree or none."""
        for block in range(16, min(blocks, 16 + 64)):
            vd = os.pread(self._image.fileno(), ISO_BLOCK, block * ISO_BLOCK)
            if len(vd) < ISO_BLOCK or vd[1:6] != b"CD001":
                return
            if vd[0] == 255:
                if vd[6] != 1 or any(vd[7:]):
                    raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: the volume descriptor set terminator "
                                       f"(block {block}) is invalid (readers differ on such an image)")
                return
            if vd[0] not in (1, 2):
                continue
            primary = vd[0] == 1
            path_l, path_m = struct.unpack_from("<I", vd, 140)[0], struct.unpack_from(">I", vd, 148)[0]
            faults = [
                what for what, bad in (
                    ("version", vd[6] != 1),
                    ("byte 7", primary and vd[7] != 0),
                    ("bytes 72-79", any(vd[72:80])),
                    ("bytes 88-119", primary and any(vd[88:120])),
                    ("its root directory record", vd[156] != 34),
                    ("its path table's place", not 18 <= path_l < blocks or (path_m and not 18 <= path_m < blocks)),
                    ("file structure version", vd[881] != 1),
                    ("byte 882", vd[882] != 0),
                    ("bytes 1395-2047", any(vd[1395:])),
                ) if bad
            ]
            if faults:
                kind = "primary" if primary else "supplementary"
                raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: the {kind} volume descriptor (block "
                                   f"{block}) is invalid: {faults[0]} (readers differ on such an image)")

    def _index(self, rel: str, path: str, here: tuple[int, int]) -> None:
        """Index the directory at `path` (whose own and parent's extents are `here`)."""
        previous: tuple[str, Any, str] | None = None  # a multi-extent file: several records, one name
        idents: set[str] = set()  # the ISO 9660 names, as a reader without Rock Ridge sees them
        for record in self._iso.list_children(**{self._key: path}):
            if self._check_record(rel, record, here):
                continue
            name, ident = self._name(record)
            self._check_ident(rel, name, ident, record, idents, previous)
            if record.rock_ridge is not None and record.rock_ridge.is_symlink():
                continue
            if previous is not None and previous[0] == name and previous[1].file_flags & 0x80:
                extents, _ = self._files[previous[2]]
                self._add_file(previous[2], (*extents, self._extent(record)))
                previous = (name, record, previous[2])
                continue
            moved = record.rock_ridge.cl_to_moved_dr if record.rock_ridge is not None else None
            if record.is_dir() and moved is None and record.rock_ridge is not None and (
                record.rock_ridge.relocated_record() or (rel == "" and ident == "RR_MOVED")
            ):
                continue  # where Rock Ridge keeps relocated directories, not part of the tree
            child_rel = self._add(rel, name, f"{rel or '/'}")
            if moved is not None or record.is_dir():
                target = moved if moved is not None else record
                if target.extent_location() in self._seen:
                    raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: directory {child_rel} loops")
                self._seen.add(target.extent_location())
                self._check_both_endian(child_rel, target)
                self._dirs.add(child_rel)
                child_path = self._iso.full_path_from_dirrecord(moved) if moved else f"{path.rstrip('/')}/{ident}"
                # a relocated directory's '..' is RR_MOVED, its parent is in Rock Ridge's PL entry
                self._index(child_rel, child_path, (target.extent_location(), -1 if moved else here[0]))
                previous = None
            else:
                self._add_file(child_rel, (self._extent(record),))
                previous = (name, record, child_rel)

    def _check_record(self, rel: str, record: Any, here: tuple[int, int]) -> bool:
        """Whether the record is a directory's `.` or `..`, each checked to point where readers
        that follow it expect; no record may have an extended attribute record, which moves the
        start of its data for some readers and not for others."""
        where = f"{self.path}: /{rel}: damaged ISO 9660 image"
        if record.xattr_len:
            raise InvalidMedia(f"{where}: a record with an extended attribute record (readers place its data "
                               "differently)")
        if not (record.is_dot() or record.is_dotdot()):
            return False
        want = here[0] if record.is_dot() else here[1]
        if want >= 0 and record.extent_location() != want:
            raise InvalidMedia(f"{where}: its {'.' if record.is_dot() else '..'} record points at block "
                               f"{record.extent_location()}, not {want}")
        return True

    def _check_both_endian(self, rel: str, directory: Any) -> None:
        """Every record in the directory's blocks holds its extent, size and volume sequence
        number the same in both byte orders, and fits its block: pycdlib reads the little-endian
        size only, other readers (7z) the big-endian one or refuse the image."""
        first = int(directory.extent_location()) * ISO_BLOCK
        length = min(int(directory.data_length), max(self.image_size - first, 0))
        for start in range(0, length, ISO_BLOCK):  # block by block: a directory may claim gigabytes
            data = os.pread(self._image.fileno(), min(ISO_BLOCK, length - start), first + start)
            at, end = 0, len(data)
            while at < end and data[at]:
                size = data[at]
                record = data[at : at + size]
                if size < 34 or at + size > end or 33 + record[32] > size or any(
                    record[a : a + n] != record[a + n : a + 2 * n][::-1] for a, n in ((2, 4), (10, 4), (28, 2))
                ):
                    raise InvalidMedia(f"{self.path}: {rel}: damaged ISO 9660 image: a directory record at byte "
                                       f"{first + start + at} is inconsistent "
                                       "(its length, or its little- and big-endian fields, disagree)")
                at += size

    def _check_ident(
        self, rel: str, name: str, ident: str, record: Any, idents: set[str], previous: tuple[str, Any, str] | None
    ) -> None:
        """What a reader without Rock Ridge sees must name the same files: every record of a
        Rock Ridge image has its Rock Ridge name, and no two files share an ISO 9660 name."""
        where = f"{rel}/{name}" if rel else name
        if self._key != "iso_path" or (previous is not None and previous[1].file_flags & 0x80):
            return  # a multi-extent file's later records repeat its name
        if self._iso.has_rock_ridge() and (record.rock_ridge is None or not record.rock_ridge.name()):
            raise InvalidMedia(f"{self.path}: {where}: damaged ISO 9660 image: a record without its Rock Ridge name "
                               f"(readers differ: {ident!r} or another name)")
        if not (_ISO_FILE.fullmatch(ident) or _ISO_DIR.fullmatch(ident)):  # a relocated directory's is a file
            raise InvalidMedia(f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is not "
                               "d-characters (readers without Rock Ridge would show another name)")
        if self._iso.has_rock_ridge() and not _plain_name_fits(name, ident, record.is_dir()):
            self._misspelt.append(f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is not "
                                  "a spelling of its Rock Ridge name (readers without Rock Ridge would show another "
                                  "name)")
        if ident in idents:
            raise InvalidMedia(f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is in "
                               "the directory twice (readers without Rock Ridge see one file)")
        idents.add(ident)

    def _check_joliet(self) -> None:
        """The Joliet tree (what Windows reads) must hold the same files as the Rock Ridge tree
        (what Linux reads): the same names where Joliet can spell them (64 characters, no
        `*/:;?\\`), the same data extents and sizes, the same directories, nothing more."""
        files: dict[str, Extents] = {}
        dirs: set[str] = set()
        root = self._iso.get_record(joliet_path="/")
        self._check_both_endian("/ (Joliet)", root)
        self._walk_joliet("", "/", (root.extent_location(), root.extent_location()), files, dirs, set())
        by_extents: dict[Extents, list[str]] = {}
        for joliet_rel, joliet_extents in files.items():
            by_extents.setdefault(joliet_extents, []).append(joliet_rel)
        claimed: set[str] = set()
        for rel, (extents, _) in sorted(self._files.items()):
            has_data = any(n for _, n in extents)
            jrel: str | None = rel if _joliet_spells(rel) else next(
                (j for j in by_extents.get(extents, ()) if j not in claimed and has_data), None
            )
            if jrel is None or _data(files.get(jrel)) != _data(extents):
                seen = "no such file" if jrel not in files else "other data"
                raise InvalidMedia(f"{self.path}: {rel}: damaged ISO 9660 image: Rock Ridge and Joliet disagree "
                                   f"(Joliet: {seen})")
            claimed.add(jrel)
        extra = sorted(set(files) - claimed)
        missing = sorted(d for d in self._dirs if _joliet_spells(d) and d not in dirs)
        if extra or missing or len(dirs) != len(self._dirs):
            what = (f"{extra[0]} is only in the Joliet tree" if extra else f"directory {missing[0]} is not in the "
                    "Joliet tree" if missing else f"{len(self._dirs)} directories in one, {len(dirs)} in the other")
            raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: Rock Ridge and Joliet disagree: {what}")

    def _walk_joliet(
        self, rel: str, path: str, here: tuple[int, int], files: dict[str, Extents], dirs: set[str], seen: set[int]
    ) -> None:
        names: set[str] = set()
        previous: str | None = None
        for record in self._iso.list_children(joliet_path=path):
            if self._check_record(f"{rel} (Joliet)", record, here):
                continue
            ident = record.file_identifier().decode("utf-16-be")
            name = ident.split(";")[0] if not record.is_dir() else ident
            child = f"{rel}/{name}" if rel else name
            if previous == child:  # a multi-extent file: several records, one name
                files[child] = (*files[child], self._extent(record))
                previous = child if record.file_flags & 0x80 else None
                continue
            check_name(name, f"{self.path}: Joliet /{rel}")
            if name in names:
                raise InvalidMedia(f"{self.path}: {child}: damaged ISO 9660 image: the Joliet name is in the "
                                   "directory twice")
            names.add(name)
            if record.is_dir():
                if record.extent_location() in seen:
                    raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: Joliet directory {child} loops")
                seen.add(record.extent_location())
                self._check_both_endian(f"{child} (Joliet)", record)
                dirs.add(child)
                # '..' unchecked: xorriso 1.5.4 (libisofs), which makes NixOS's installer ISOs, points a
                # Joliet subdirectory's '..' at the directory itself; readers walk down, not up
                self._walk_joliet(child, f"{path.rstrip('/')}/{ident}", (record.extent_location(), -1), files,
                                  dirs, seen)
                previous = None
            else:
                files[child] = (self._extent(record),)
                previous = child if record.file_flags & 0x80 else None

    @staticmethod
    def _extent(record: Any) -> tuple[int, int]:
        """The record's own extent and length (pycdlib's get_data_length answers for every record
        of the same extent with the first one's length, cut at the image's end)."""
        return int(record.extent_location()) * ISO_BLOCK, int(record.data_length)

    def _name(self, record: Any) -> tuple[str, str]:
        ident = record.file_identifier().decode("utf-16-be" if self._key == "joliet_path" else "ascii")
        rr = record.rock_ridge
        if rr is not None:
            for entries in (rr.dr_entries, rr.ce_entries):
                for nm in entries.nm_records if entries is not None else ():
                    if nm.posix_name_flags & (NM_CURRENT | NM_PARENT):  # Linux reads these as '.', '..'
                        return "." if nm.posix_name_flags & NM_CURRENT else "..", ident
        if rr is not None and rr.name():
            return rr.name().decode(), ident
        return ident.split(";")[0], ident

    def _check_overlaps(self) -> None:
        """No two files share bytes: one extent read for many names would multiply the work."""
        extents = sorted((o, n, rel) for rel, (ext, _) in self._files.items() for o, n in ext if n)
        for (o1, n1, r1), (o2, _, r2) in zip(extents, extents[1:], strict=False):
            if o1 + n1 > o2:
                raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: {r1} and {r2} share their data")

    def close(self) -> None:
        with contextlib.suppress(PyCdlibException, ValueError, OSError):
            self._iso.close()
        super().close()


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


def _data(extents: Extents | None) -> Extents | None:
    """The extents that hold data: an empty file's extent location means nothing."""
    return None if extents is None else tuple(e for e in extents if e[1])


def _joliet_spells(rel: str) -> bool:
    """Whether Joliet can hold every name of `rel` as it is (ISO writers change the others)."""
    return all(len(part) <= JOLIET_MAX and not _NOT_JOLIET.search(part) for part in rel.split("/"))


def _short_name(short: bytes, ntres: int) -> str:
    """The 8.3 name with the case recorded in DIR_NTRes."""
    raw = (b"\xe5" + short[1:]) if short[0] == 0x05 else short
    base, ext = raw[:8].rstrip(b" ").decode("cp437"), raw[8:].rstrip(b" ").decode("cp437")
    if ntres & NT_LOWER_BASE:
        base = base.lower()
    if ntres & NT_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


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
            raise InvalidMedia(f"{f.name}: truncated image: its backup GPT header (sector {backup_lba}) is past "
                               "its end")
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
    try:
        if kind == "iso":
            return IsoSource(path)
        return FatSource(path, offset)
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read it: {e.strerror}") from e
