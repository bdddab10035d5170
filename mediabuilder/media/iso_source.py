"""Reading an ISO 9660 image in place (mediabuilder.media.source's MediaSource), strictly.

Indexed with pycdlib by ISO 9660 (or Joliet) path, never by Rock Ridge path (pycdlib by Rock
Ridge path returns only the last extent of a multi-extent file); the names presented are the Rock
Ridge ones. What pycdlib lets through is checked here: the descriptors and their terminator,
both-endian fields, directory loops, every ISO 9660 name against its Rock Ridge name, the Joliet
tree against the Rock Ridge one, and extents that overlap.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from pathlib import Path
from typing import Any

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from mediabuilder.errors import InvalidMedia
from mediabuilder.media.iso import JOLIET_MAX, NOT_JOLIET
from mediabuilder.media.source import (
    ISO_BLOCK,
    Extents,
    _data,
    _ImageSource,
    check_name,
)

NM_CURRENT, NM_PARENT = 0x02, 0x04  # Rock Ridge NM flags: the name is "." or ".."
_ISO_FILE = re.compile(r"[A-Z0-9_]*(\.[A-Z0-9_]*)?;[0-9]+")  # ECMA-119 levels 2 and 3, what writers write
# a directory's name is d-characters; xorriso's -full-iso9660-filenames (NixOS's installer ISOs)
# keeps one dot in it: /BOOT/3HG0…KD1A5H.30 for boot/3hg0…-linux-6.12.30
_ISO_DIR = re.compile(r"[A-Z0-9_]+(\.[A-Z0-9_]*)?")


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
                    raise InvalidMedia(
                        f"{self.path}: damaged ISO 9660 image: the volume descriptor set terminator "
                        f"(block {block}) is invalid (readers differ on such an image)"
                    )
                return
            if vd[0] not in (1, 2):
                continue
            primary = vd[0] == 1
            path_l, path_m = struct.unpack_from("<I", vd, 140)[0], struct.unpack_from(">I", vd, 148)[0]
            faults = [
                what
                for what, bad in (
                    ("version", vd[6] != 1),
                    ("byte 7", primary and vd[7] != 0),
                    ("bytes 72-79", any(vd[72:80])),
                    ("bytes 88-119", primary and any(vd[88:120])),
                    ("its root directory record", vd[156] != 34),
                    ("its path table's place", not 18 <= path_l < blocks or (path_m and not 18 <= path_m < blocks)),
                    ("file structure version", vd[881] != 1),
                    ("byte 882", vd[882] != 0),
                    ("bytes 1395-2047", any(vd[1395:])),
                )
                if bad
            ]
            if faults:
                kind = "primary" if primary else "supplementary"
                raise InvalidMedia(
                    f"{self.path}: damaged ISO 9660 image: the {kind} volume descriptor (block "
                    f"{block}) is invalid: {faults[0]} (readers differ on such an image)"
                )

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
            if (
                record.is_dir()
                and moved is None
                and record.rock_ridge is not None
                and (record.rock_ridge.relocated_record() or (rel == "" and ident == "RR_MOVED"))
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
            raise InvalidMedia(
                f"{where}: a record with an extended attribute record (readers place its data differently)"
            )
        if not (record.is_dot() or record.is_dotdot()):
            return False
        want = here[0] if record.is_dot() else here[1]
        if want >= 0 and record.extent_location() != want:
            raise InvalidMedia(
                f"{where}: its {'.' if record.is_dot() else '..'} record points at block "
                f"{record.extent_location()}, not {want}"
            )
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
                if (
                    size < 34
                    or at + size > end
                    or 33 + record[32] > size
                    or any(record[a : a + n] != record[a + n : a + 2 * n][::-1] for a, n in ((2, 4), (10, 4), (28, 2)))
                ):
                    raise InvalidMedia(
                        f"{self.path}: {rel}: damaged ISO 9660 image: a directory record at byte "
                        f"{first + start + at} is inconsistent "
                        "(its length, or its little- and big-endian fields, disagree)"
                    )
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
            raise InvalidMedia(
                f"{self.path}: {where}: damaged ISO 9660 image: a record without its Rock Ridge name "
                f"(readers differ: {ident!r} or another name)"
            )
        if not (_ISO_FILE.fullmatch(ident) or _ISO_DIR.fullmatch(ident)):  # a relocated directory's is a file
            raise InvalidMedia(
                f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is not "
                "d-characters (readers without Rock Ridge would show another name)"
            )
        if self._iso.has_rock_ridge() and not _plain_name_fits(name, ident, record.is_dir()):
            self._misspelt.append(
                f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is not "
                "a spelling of its Rock Ridge name (readers without Rock Ridge would show another "
                "name)"
            )
        if ident in idents:
            raise InvalidMedia(
                f"{self.path}: {where}: damaged ISO 9660 image: its ISO 9660 name {ident!r} is in "
                "the directory twice (readers without Rock Ridge see one file)"
            )
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
        twins = _case_twins([*self._files, *self._dirs])  # Joliet renames all but one of them
        for rel, (extents, _) in sorted(self._files.items()):
            has_data = any(n for _, n in extents)
            jrel: str | None = (
                rel
                if _joliet_spells(rel) and rel not in twins
                else next((j for j in by_extents.get(extents, ()) if j not in claimed and has_data), None)
            )
            if jrel is None and not has_data:  # an empty file renamed by Joliet: any empty one beside it
                parent = rel.rpartition("/")[0]
                jrel = next((j for j, e in sorted(files.items())
                             if j not in claimed and j.rpartition("/")[0] == parent and not _data(e)), None)
            if jrel is None or _data(files.get(jrel)) != _data(extents):
                seen = "no such file" if jrel not in files else "other data"
                raise InvalidMedia(
                    f"{self.path}: {rel}: damaged ISO 9660 image: Rock Ridge and Joliet disagree (Joliet: {seen})"
                )
            claimed.add(jrel)
        extra = sorted(set(files) - claimed)
        missing = sorted(d for d in self._dirs if _joliet_spells(d) and not twins & _ancestry(d) and d not in dirs)
        if extra or missing or len(dirs) != len(self._dirs):
            what = (
                f"{extra[0]} is only in the Joliet tree"
                if extra
                else f"directory {missing[0]} is not in the Joliet tree"
                if missing
                else f"{len(self._dirs)} directories in one, {len(dirs)} in the other"
            )
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
                raise InvalidMedia(
                    f"{self.path}: {child}: damaged ISO 9660 image: the Joliet name is in the directory twice"
                )
            names.add(name)
            if record.is_dir():
                if record.extent_location() in seen:
                    raise InvalidMedia(f"{self.path}: damaged ISO 9660 image: Joliet directory {child} loops")
                seen.add(record.extent_location())
                self._check_both_endian(f"{child} (Joliet)", record)
                dirs.add(child)
                # '..' unchecked: xorriso 1.5.4 (libisofs), which makes NixOS's installer ISOs, points a
                # Joliet subdirectory's '..' at the directory itself; readers walk down, not up
                self._walk_joliet(
                    child, f"{path.rstrip('/')}/{ident}", (record.extent_location(), -1), files, dirs, seen
                )
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


def _joliet_spells(rel: str) -> bool:
    """Whether Joliet can hold every name of `rel` as it is (ISO writers change the others):
    64 UTF-16 code units, none of `*/:;?\\`."""
    return all(
        len(part.encode("utf-16-be")) // 2 <= JOLIET_MAX and not NOT_JOLIET.search(part) for part in rel.split("/")
    )


def _case_twins(rels: list[str]) -> set[str]:
    """The paths whose name another entry of the same directory has too, but for case."""
    groups: dict[tuple[str, str], list[str]] = {}
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        groups.setdefault((parent, name.lower()), []).append(rel)
    return {rel for group in groups.values() if len(group) > 1 for rel in group}


def _ancestry(rel: str) -> set[str]:
    """`rel` and each directory above it."""
    parts = rel.split("/")
    return {"/".join(parts[: i + 1]) for i in range(len(parts))}
