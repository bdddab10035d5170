"""Writing the media tree as an ISO 9660 image, laid out in one pass.

Interchange level 3 with Rock Ridge 1.09 (the real names, modes, executable bits, symlinks)
and Joliet (names for Windows). The ISO 9660 names themselves are mangled to d-characters and
made unique per directory; readers use the Rock Ridge or Joliet names.

The whole tree is known before anything is written, so the image is planned first: the volume
descriptors, the four path tables, every directory of both trees and the Rock Ridge continuation
areas get their blocks, then every file its extent, in the order of the walk. Everything before
the file data is written from that plan in one write and the file data is copied into place
(`output.Copier`), so the writer runs at the speed of the copy, as the FAT32 writer does.
pycdlib, xorriso, isoinfo, bsdtar and 7z read the result in the tests. (pycdlib wrote these
images before: its plan of 2,300 files took as long as copying 300 MB; see docs/images.md.)

Files of 4 GiB or more would need multi-extent records, which several readers get wrong
(`isoinfo -R -x` and pycdlib by Rock Ridge path return only the last extent; see
docs/images.md). The media tree therefore splits such files for ISO too, and `write_iso`
refuses them.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mediabuilder import interrupts, ui
from mediabuilder.errors import InternalError, InvalidInput
from mediabuilder.media.label import validate_label
from mediabuilder.media.output import Copier, pwrite_all
from mediabuilder.media.split import SINGLE_EXTENT_MAX, Slice

# The biggest file written as a single extent; bigger ones must be split beforehand.
ISO_MAX_FILE = SINGLE_EXTENT_MAX
JOLIET_MAX = 64  # UCS-2 characters of a Joliet name
ISO_NAME_MAX = 30  # name + extension, ECMA-119 level 2 and 3
ISO_DIR_MAX = 31
RR_NAME_MAX = 253  # bytes of a Rock Ridge name that Linux reads whole (fs/isofs/rock.c cuts longer ones)
RR_TARGET_MAX = 1024  # bytes of a symlink target from which libisofs (xorriso) refuses the whole image
MAX_DIRECTORIES = 65535  # a path table names a parent in 16 bits

_NOT_D = re.compile(r"[^A-Z0-9_]")
NOT_JOLIET = re.compile(r"[*/:;?\\]")
_CONTROL = re.compile(r"[\x00-\x1f]")

BLOCK = 2048
_VOLUME_1 = b"\x01\x00\x00\x01"  # volume sequence number 1, both-endian
_SYSTEM_AREA = 16  # blocks before the first volume descriptor
_FIRST_FREE = _SYSTEM_AREA + 3  # after the primary and Joliet descriptors and the terminator
_RECORD_MAX = 254  # bytes of a directory record: at most 255, and even
_CE_SIZE = 28
_ROOT_MODE = stat.S_IFDIR | 0o555
_LINK_MODE = stat.S_IFLNK | 0o555
_APPLICATION = "MEDIABUILDER"

# Rock Ridge's RR entry (RRIP 1.09): which entries the record has.
_RR_PX, _RR_SL, _RR_NM, _RR_TF = 0x01, 0x04, 0x08, 0x80
_ER = (
    b"RRIP_1991A",
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS",
    b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN "
    b"PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.",
)


def _joliet_units(text: str) -> int:
    """UCS-2 (UTF-16) code units of `text`: what a Joliet name is counted in."""
    return len(text.encode("utf-16-be")) // 2


@dataclass
class _Names:
    """Unique ISO 9660 and Joliet names of one directory's entries."""

    iso: set[str] = field(default_factory=set)
    joliet: set[str] = field(default_factory=set)
    # The next number to try for a stem: every lower one is taken (names are never given back),
    # so many names with one stem do not each try all the numbers before theirs.
    tried: dict[tuple[str, ...], int] = field(default_factory=dict)

    def iso_file(self, name: str) -> str:
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            stem, ext = name, ""
        ext = _NOT_D.sub("_", ext.upper())[:8]
        stem = _NOT_D.sub("_", stem.upper()) or "_"
        return self._unique_iso(stem, ext, ISO_NAME_MAX - len(ext)) + ";1"

    def iso_dir(self, name: str) -> str:
        return self._unique_iso(_NOT_D.sub("_", name.upper()), "", ISO_DIR_MAX)

    def _unique_iso(self, stem: str, ext: str, room: int) -> str:
        key = ("iso", stem[:room], ext, str(room))  # the names whose candidates are all alike
        for n in range(self.tried.get(key, 0), len(self.iso) + 1):
            suffix = f"_{n}" if n else ""
            candidate = stem[: room - len(suffix)] + suffix + (f".{ext}" if ext else "")
            if candidate not in self.iso:
                self.iso.add(candidate)
                self.tried[key] = n + 1
                return candidate
        raise AssertionError("unreachable")

    def joliet_name(self, name: str) -> str:
        clean = NOT_JOLIET.sub("_", name)
        stem, dot, ext = clean.rpartition(".")
        if not dot or len(ext) > 8:
            stem, dot, ext = clean, "", ""
        fits = _joliet_units(clean) <= JOLIET_MAX
        first = clean if fits else _cut_units(stem, JOLIET_MAX - _joliet_units(dot + ext)) + dot + ext
        key = ("joliet", first.lower())  # the names whose candidates are all alike (without case)
        for n in range(self.tried.get(key, 0), len(self.joliet) + 1):
            tail = (f"~{n}" if n else "") + dot + ext
            candidate = first if n == 0 else _cut_units(stem, JOLIET_MAX - _joliet_units(tail)) + tail
            if candidate.lower() not in self.joliet:  # Linux and Windows look Joliet names up without case
                self.joliet.add(candidate.lower())
                self.tried[key] = n + 1
                return candidate
        raise AssertionError("unreachable")


def _cut_units(text: str, units: int) -> str:
    """The longest start of `text` of at most `units` UTF-16 code units."""
    while _joliet_units(text) > units:
        text = text[: max(0, min(len(text) - 1, units))]
    return text


@dataclass(eq=False)
class _Node:
    """A directory, file (or part of one) or symlink of the image."""

    name: str  # the Rock Ridge name; "" for the root
    mode: int
    parent: _Node | None
    iso_id: bytes = b"\0"
    joliet_id: bytes | None = b"\0"  # None: not in the Joliet tree (a symlink)
    source: str | None = None  # a file's: where its data is read from
    start: int = 0  # a part's offset in `source`
    size: int = 0
    target: bytes | None = None  # a symlink's
    children: list[_Node] | None = None  # a directory's, in ISO 9660 order
    extent: int = 0  # a file's data, a directory's ISO 9660 records
    joliet_extent: int = 0
    iso_bytes: int = 0  # a directory's records, whole blocks
    joliet_bytes: int = 0
    number: int = 0  # in the ISO 9660 path table
    joliet_number: int = 0
    subdirs: int = 0  # a directory's

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _both16(n: int) -> bytes:
    return n.to_bytes(2, "little") + n.to_bytes(2, "big")


def _both32(n: int) -> bytes:
    return n.to_bytes(4, "little") + n.to_bytes(4, "big")


def _iso_key(node: _Node) -> tuple[bytes, bytes]:
    """ECMA-119 9.3's order: by name, then by extension (the version is always 1)."""
    stem, _, ext = node.iso_id.partition(b";")[0].partition(b".")
    return stem, ext


def _joliet_key(node: _Node) -> bytes:
    return node.joliet_id or b""


@dataclass
class _Dates:
    record: bytes  # 7 bytes: a directory record's date, and Rock Ridge's TF entry's
    volume: bytes  # 17 bytes: a volume descriptor's

    @classmethod
    def at(cls, epoch: int | None) -> _Dates:
        """`epoch` in UTC, or (None) now in local time."""
        if epoch is None:
            tm = time.localtime()
            offset = (tm.tm_gmtoff or 0) // 900
        else:
            tm, offset = time.gmtime(epoch), 0
        record = bytes([tm.tm_year - 1900, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, offset & 0xFF])
        volume = time.strftime("%Y%m%d%H%M%S", tm).encode() + b"00" + bytes([offset & 0xFF])
        return cls(record, volume)


def _scan(tree: Path, slices: Mapping[Path, Sequence[Slice]]) -> tuple[_Node, list[_Node]]:
    """The tree as nodes, and its files in the order their data is written (the walk's)."""

    def refuse(error: OSError) -> None:
        raise error

    root = _Node("", _ROOT_MODE, None, children=[])
    dirs = {os.fspath(tree): root}
    files: list[_Node] = []
    cut = {os.fspath(path): pieces for path, pieces in slices.items()}  # paths as strings: 2,300 Paths cost
    for top, dirnames, filenames in os.walk(tree, onerror=refuse):
        dirnames.sort()
        directory = dirs[top]
        assert directory.children is not None
        entries: list[tuple[str, str, Slice | None]] = []
        for name in filenames:
            path = os.path.join(top, name)
            pieces = cut.get(path)
            entries += [(name, path, None)] if pieces is None else [(p.name, path, p) for p in pieces]
        names = _Names()
        subdirs = [(d, os.path.join(top, d), None) for d in dirnames]
        for name, path, piece in subdirs + sorted(entries, key=lambda e: e[0]):
            node = _node(path, name, piece, directory, names)
            directory.children.append(node)
            if node.is_dir:
                dirs[path] = node
                directory.subdirs += 1
            elif node.source is not None:
                files.append(node)
    return root, files


def _mode(st: os.stat_result) -> int:
    kind = stat.S_IFMT(st.st_mode)
    executable = st.st_mode & 0o111 or kind == stat.S_IFDIR
    return kind | (0o755 if executable else 0o644)


def _node(path: str, name: str, piece: Slice | None, parent: _Node, names: _Names) -> _Node:
    st = os.lstat(path)
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise InternalError(f"{path}: the name is not UTF-8; Rock Ridge and Joliet names on the media are") from None
    if size > RR_NAME_MAX:
        raise InternalError(
            f"{path}: a name of {size} bytes; Linux reads at most {RR_NAME_MAX} bytes of a "
            "Rock Ridge name, so the media tree must not hold it"
        )
    if _CONTROL.search(name):
        raise InternalError(f"{path}: a control character in the name; Joliet names cannot hold one")
    if piece is not None:  # a part: a byte range of the file at `path`
        if piece.size > ISO_MAX_FILE:
            raise InternalError(f"{path}: a part of {piece.size} bytes is more than ISO_MAX_FILE ({ISO_MAX_FILE})")
        node = _Node(name, _mode(st), parent, source=path, start=piece.offset, size=piece.size)
    elif stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(path))
        if len(target) >= RR_TARGET_MAX:
            raise InternalError(
                f"{path}: a symlink target of {len(target)} bytes; libisofs (xorriso) reads none of "
                f"{RR_TARGET_MAX} or more, so the media tree must not hold it"
            )
        node = _Node(name, _LINK_MODE, parent, target=target)
    elif stat.S_ISDIR(st.st_mode):
        node = _Node(name, _mode(st), parent, children=[])
    elif stat.S_ISREG(st.st_mode):
        if st.st_size > ISO_MAX_FILE:
            raise InternalError(
                f"{path}: {st.st_size} bytes is more than ISO_MAX_FILE ({ISO_MAX_FILE}); "
                "the media tree must split it before it is written to an ISO image"
            )
        node = _Node(name, _mode(st), parent, source=path, size=st.st_size)
    else:
        raise InternalError(f"{path}: not a regular file, directory or symlink; cannot put it on an ISO")
    node.iso_id = (names.iso_dir(name) if node.is_dir else names.iso_file(name)).encode("ascii")
    node.joliet_id = None if node.target is not None else names.joliet_name(name).encode("utf-16-be")
    return node


# System Use Sharing Protocol (SUSP 1.12) and Rock Ridge (RRIP 1.09) entries.
def _entry(signature: bytes, body: bytes) -> bytes:
    return signature + bytes([4 + len(body), 1]) + body


@functools.cache  # a few modes and link counts, thousands of entries
def _px(mode: int, links: int) -> bytes:
    return _entry(b"PX", _both32(mode) + _both32(links) + _both32(0) + _both32(0))


def _nm(name: bytes) -> list[bytes]:
    chunks = [name[i : i + 250] for i in range(0, len(name), 250)] or [b""]
    return [_entry(b"NM", bytes([i < len(chunks) - 1]) + chunk) for i, chunk in enumerate(chunks)]


def _sl(target: bytes) -> list[bytes]:
    """The SL entries of a symlink to `target`, each but the last flagged to continue.

    An entry that continues ends inside a component (the component flagged to continue, empty if
    need be): libarchive starts every SL entry without a separator, Linux adds one after an
    entry that ends with a whole component; so both read the same path."""
    components: list[tuple[int, bytes]] = [(0x08, b"")] if target.startswith(b"/") else []  # ROOT
    for part in target.split(b"/"):
        if part in (b".", b".."):
            components.append((0x02 if part == b"." else 0x04, b""))  # CURRENT, PARENT
        elif part:
            components.append((0, part))
    room = 248  # bytes of components in an entry (250), less an empty continued component's 2
    bodies: list[bytearray] = [bytearray()]
    continued = False  # whether the current entry ends with a component that continues

    def next_entry() -> None:
        nonlocal continued
        if not continued:
            bodies[-1] += b"\x01\x00"
        bodies.append(bytearray())
        continued = False

    for flag, text in components:
        while True:
            left = room - len(bodies[-1])
            if 2 + len(text) <= left:
                bodies[-1] += bytes([flag, len(text)]) + text
                continued = False
                break
            if flag == 0 and left >= 3:
                bodies[-1] += bytes([1, left - 2]) + text[: left - 2]
                text = text[left - 2 :]
                continued = True
            next_entry()
    return [_entry(b"SL", bytes([i < len(bodies) - 1]) + body) for i, body in enumerate(bodies)]


def _ce(block: int, offset: int, length: int) -> bytes:
    return _entry(b"CE", _both32(block) + _both32(offset) + _both32(length))


def _er() -> bytes:
    ident, description, source = _ER
    head = bytes([len(ident), len(description), len(source), 1])
    return _entry(b"ER", head + ident + description + source)


@dataclass
class _Record:
    """One ISO 9660 directory record: what it points at, its name, its System Use entries (those
    that fit in the record, the rest in continuation areas)."""

    node: _Node
    ident: bytes
    inline: bytes
    areas: list[tuple[int, int, bytes]]  # (block in the continuation blocks, offset, entries)

    @property
    def length(self) -> int:
        return _record_length(self.ident, len(self.inline) + (_CE_SIZE if self.areas else 0))


def _record_length(ident: bytes, system_use: int) -> int:
    length = 33 + len(ident) + (1 - len(ident) % 2) + system_use
    return length + length % 2


class _Continuations:
    """The blocks of Rock Ridge continuation areas: an area never crosses a block (Linux
    refuses one that does)."""

    def __init__(self) -> None:
        self.blocks: list[bytearray] = []

    def place(self, entries: list[bytes]) -> list[tuple[int, int, bytes]]:
        """Areas for `entries`, each in one block, chained by CE entries that `_head` writes."""
        areas: list[list[bytes]] = [[]]
        used = 0
        for i, one in enumerate(entries):
            last = i == len(entries) - 1
            if used + len(one) + (0 if last else _CE_SIZE) > BLOCK and areas[-1]:
                areas.append([])
                used = 0
            areas[-1].append(one)
            used += len(one)
        placed = []
        for chunk in areas:
            size = sum(map(len, chunk)) + (_CE_SIZE if chunk is not areas[-1] else 0)
            if not self.blocks or len(self.blocks[-1]) + size > BLOCK:
                self.blocks.append(bytearray())
            placed.append((len(self.blocks) - 1, len(self.blocks[-1]), b"".join(chunk)))
            self.blocks[-1] += bytes(size)
        return placed


def _records(directory: _Node, continuations: _Continuations, dates: _Dates) -> list[_Record]:
    """The ISO 9660 records of `directory`: `.`, `..`, then its entries."""
    parent = directory.parent or directory
    tf = _entry(b"TF", b"\x0e" + dates.record * 3)  # modification, access, attributes
    itself = [_entry(b"RR", bytes([_RR_PX | _RR_TF])), _px(directory.mode, 2 + directory.subdirs), tf]
    if directory.parent is None:  # the root's `.` says that the image has SUSP and Rock Ridge
        itself = [b"SP\x07\x01\xbe\xef\x00", *itself, _er()]
    up = [_entry(b"RR", bytes([_RR_PX | _RR_TF])), _px(parent.mode, 2 + parent.subdirs), tf]
    rows: list[tuple[_Node, bytes, list[bytes]]] = [(directory, b"\0", itself), (parent, b"\1", up)]
    for child in directory.children or ():
        flags = _RR_PX | _RR_NM | _RR_TF | (_RR_SL if child.target is not None else 0)
        links = 2 + child.subdirs if child.is_dir else 1
        entries = [_entry(b"RR", bytes([flags])), *_nm(child.name.encode()), _px(child.mode, links)]
        if child.target is not None:
            entries += _sl(child.target)
        rows.append((child, child.iso_id, [*entries, tf]))
    records = []
    for node, ident, entries in rows:
        room = _RECORD_MAX - _record_length(ident, 0)
        inline = len(entries)
        if sum(map(len, entries)) > room:
            used = _CE_SIZE
            inline = 0
            while used + len(entries[inline]) <= room:
                used += len(entries[inline])
                inline += 1
        areas = continuations.place(entries[inline:]) if inline < len(entries) else []
        records.append(_Record(node, ident, b"".join(entries[:inline]), areas))
    return records


def _record_bytes(node: _Node, ident: bytes, system_use: bytes, dates: _Dates, joliet: bool) -> bytes:
    """ECMA-119 9.1: a directory record, padded to an even length."""
    if node.is_dir:
        extent, size, flags = (node.joliet_extent, node.joliet_bytes, 2) if joliet else (node.extent, node.iso_bytes, 2)
    else:
        extent, size, flags = node.extent, node.size, 0
    length = _record_length(ident, len(system_use))
    record = (
        bytes([length, 0]) + _both32(extent) + _both32(size) + dates.record + bytes([flags, 0, 0]) + _VOLUME_1
        + bytes([len(ident)]) + ident + bytes(1 - len(ident) % 2) + system_use
    )  # fmt: skip
    return record + bytes(length - len(record))


def _places(lengths: Iterable[int]) -> Iterator[int]:
    """Where each of a directory's records starts: a record never crosses a block."""
    used = 0
    for length in lengths:
        if used % BLOCK + length > BLOCK:
            used += BLOCK - used % BLOCK
        yield used
        used += length


def _pack(lengths: Iterable[int]) -> int:
    """Bytes of a directory's records in whole blocks."""
    lengths = list(lengths)
    end = max((at + n for at, n in zip(_places(lengths), lengths, strict=True)), default=0)
    return -(-end // BLOCK) * BLOCK


def _directory_bytes(records: list[bytes], size: int) -> bytes:
    out = bytearray(size)
    for at, record in zip(_places(map(len, records)), records, strict=True):
        if at + len(record) > size:
            raise InternalError(f"a directory's records take more than the {size} bytes planned")
        out[at : at + len(record)] = record
    return bytes(out)


def _breadth_first(root: _Node, key: Callable[[_Node], bytes | tuple[bytes, bytes]]) -> list[_Node]:
    """The directories in path table order: by level, then by parent, then by name."""
    order = [root]
    for directory in order:
        order += sorted((c for c in directory.children or () if c.is_dir), key=key)
    return order


def _path_table(order: list[_Node], joliet: bool, byteorder: Literal["little", "big"]) -> bytes:
    out = bytearray()
    for node in order:
        ident = (node.joliet_id if joliet else node.iso_id) or b"\0"
        if node.parent is None:
            ident = b"\0"
        extent = node.joliet_extent if joliet else node.extent
        parent = node.parent or node
        number = parent.joliet_number if joliet else parent.number
        out += bytes([len(ident), 0]) + extent.to_bytes(4, byteorder) + number.to_bytes(2, byteorder)
        out += ident + bytes(len(ident) % 2)
    return bytes(out)


def _text(value: str, size: int, joliet: bool) -> bytes:
    if joliet:
        return (value.encode("utf-16-be") + b"\0 " * size)[: size - size % 2] + b"\0" * (size % 2)
    return value.encode("ascii").ljust(size, b" ")


def _descriptor(kind: int, label: str, blocks: int, table: tuple[int, int, int], root: bytes,
                dates: _Dates) -> bytes:
    """The primary (1) or Joliet (2) volume descriptor, ECMA-119 8.4 and 8.5."""
    joliet = kind == 2
    table_size, table_l, table_m = table
    vd = bytearray(BLOCK)
    vd[0:7] = bytes([kind]) + b"CD001\x01"
    vd[8:40] = _text("", 32, joliet)
    vd[40:72] = _text(label[:16] if joliet else label, 32, joliet)
    vd[80:88] = _both32(blocks)
    if joliet:
        vd[88:91] = b"%/E"  # UCS-2 level 3
    vd[120:132] = _both16(1) + _both16(1) + _both16(BLOCK)
    vd[132:140] = _both32(table_size)
    vd[140:144] = table_l.to_bytes(4, "little")
    vd[148:152] = table_m.to_bytes(4, "big")
    vd[156:190] = root
    for start in (190, 318, 446):  # volume set, publisher, data preparer
        vd[start : start + 128] = _text("", 128, joliet)
    vd[574:702] = _text(_APPLICATION, 128, joliet)
    for start in (702, 739, 776):  # copyright, abstract and bibliographic files
        vd[start : start + 37] = _text("", 37, joliet)
    # created, modified, expires (never: zeros), effective
    vd[813:881] = dates.volume + dates.volume + b"0" * 16 + b"\0" + dates.volume
    vd[881] = 1
    vd[883:1395] = b" " * 512  # application use
    return bytes(vd)


@dataclass
class _Image:
    """The planned image: everything before the file data, and where each file goes."""

    head: bytes
    files: list[_Node]
    blocks: int

    @property
    def data_bytes(self) -> int:
        return sum(node.size for node in self.files)


@dataclass
class _Layout:
    """Both trees' directories in path table order, their records, and the image's regions."""

    iso_order: list[_Node]
    joliet_order: list[_Node]
    records: dict[int, list[_Record]]  # id(directory) -> its ISO 9660 records
    joliet_children: dict[int, list[_Node]]  # id(directory) -> its entries in the Joliet tree, in order
    # id(directory) -> its Rock Ridge continuation areas, in blocks right after its records: libarchive
    # reads the image front to back and takes an area only when it reaches it, so an area after a
    # later directory came too late for it (a directory's name, mode or whole entry was lost)
    continuations: dict[int, _Continuations]
    tables: list[int] = field(default_factory=list)  # the blocks of the L and M tables, ISO 9660 then Joliet
    table_sizes: tuple[int, int] = (0, 0)
    continuation_start: dict[int, int] = field(default_factory=dict)  # id(directory) -> its first such block
    blocks: int = 0


def _plan(tree: Path, label: str, slices: Mapping[Path, Sequence[Slice]], dates: _Dates) -> _Image:
    root, files = _scan(tree, slices)
    layout = _directories(root, dates)
    _place(layout, files)
    return _Image(_head(layout, label, dates), files, layout.blocks)


def _directories(root: _Node, dates: _Dates) -> _Layout:
    """Number the directories of both trees, make their records and size their extents."""
    iso_order = _breadth_first(root, _iso_key)
    if len(iso_order) > MAX_DIRECTORIES:
        raise InternalError(f"{len(iso_order)} directories; an ISO 9660 path table holds at most {MAX_DIRECTORIES}")
    joliet_order = _breadth_first(root, _joliet_key)
    for number, node in enumerate(iso_order, 1):
        node.number = number
        assert node.children is not None
        node.children.sort(key=_iso_key)
    for number, node in enumerate(joliet_order, 1):
        node.joliet_number = number
    layout = _Layout(iso_order, joliet_order, {}, {}, {})
    for node in iso_order:
        layout.continuations[id(node)] = continuations = _Continuations()
        layout.records[id(node)] = records = _records(node, continuations, dates)
        node.iso_bytes = _pack(r.length for r in records)
    for node in joliet_order:
        children = sorted((c for c in node.children or () if c.joliet_id is not None), key=_joliet_key)
        layout.joliet_children[id(node)] = children
        lengths = [_record_length(b"\0", 0)] * 2 + [_record_length(c.joliet_id or b"", 0) for c in children]
        node.joliet_bytes = _pack(lengths)
    layout.table_sizes = (len(_path_table(iso_order, False, "little")), len(_path_table(joliet_order, True, "little")))
    return layout


def _place(layout: _Layout, files: list[_Node]) -> None:
    """Give every region its blocks: the path tables, the ISO 9660 directories (each followed by
    its continuation areas), the Joliet directories, then each file's data in the order of the walk (an empty file
    has no extent: 0, as pycdlib and xorriso write it)."""
    block = _FIRST_FREE
    for size in (layout.table_sizes[0], layout.table_sizes[0], layout.table_sizes[1], layout.table_sizes[1]):
        layout.tables.append(block)
        block += max(1, -(-size // BLOCK))
    for node in layout.iso_order:
        node.extent = block
        block += node.iso_bytes // BLOCK
        layout.continuation_start[id(node)] = block
        block += len(layout.continuations[id(node)].blocks)
    for node in layout.joliet_order:
        node.joliet_extent = block
        block += node.joliet_bytes // BLOCK
    for node in files:
        if node.size:
            node.extent = block
            block += -(-node.size // BLOCK)
    layout.blocks = block


def _head(layout: _Layout, label: str, dates: _Dates) -> bytes:
    """Every byte of the image before the first file's data."""
    root = layout.iso_order[0]
    head = bytearray(_SYSTEM_AREA * BLOCK)
    iso_table = (layout.table_sizes[0], layout.tables[0], layout.tables[1])
    joliet_table = (layout.table_sizes[1], layout.tables[2], layout.tables[3])
    head += _descriptor(1, label, layout.blocks, iso_table, _record_bytes(root, b"\0", b"", dates, False), dates)
    head += _descriptor(2, label, layout.blocks, joliet_table, _record_bytes(root, b"\0", b"", dates, True), dates)
    head += b"\xffCD001\x01".ljust(BLOCK, b"\0")  # the terminator
    tables: list[tuple[list[_Node], bool, Literal["little", "big"]]] = [
        (layout.iso_order, False, "little"), (layout.iso_order, False, "big"),
        (layout.joliet_order, True, "little"), (layout.joliet_order, True, "big"),
    ]  # fmt: skip
    for block, (order, joliet, byteorder) in zip(layout.tables, tables, strict=True):
        head += bytes(block * BLOCK - len(head)) + _path_table(order, joliet, byteorder)
    head += bytes(root.extent * BLOCK - len(head))

    for node in layout.iso_order:
        start = layout.continuation_start[id(node)]
        records = layout.records[id(node)]
        written = []
        for record in records:
            system_use = record.inline
            if record.areas:
                area, offset, _ = record.areas[0]
                system_use += _ce(start + area, offset, _area_size(record.areas, 0))
            written.append(_record_bytes(record.node, record.ident, system_use, dates, False))
        head += _directory_bytes(written, node.iso_bytes)
        areas = bytearray(len(layout.continuations[id(node)].blocks) * BLOCK)
        for record in records:
            for i, (area, offset, entries) in enumerate(record.areas):
                if i + 1 < len(record.areas):  # chained: the next area's CE ends this one
                    following, following_offset, _ = record.areas[i + 1]
                    entries += _ce(start + following, following_offset, _area_size(record.areas, i + 1))
                at = area * BLOCK + offset
                areas[at : at + len(entries)] = entries
        head += areas
    for node in layout.joliet_order:
        parent = node.parent or node
        own = [_record_bytes(node, b"\0", b"", dates, True), _record_bytes(parent, b"\1", b"", dates, True)]
        own += [_record_bytes(c, c.joliet_id or b"", b"", dates, True) for c in layout.joliet_children[id(node)]]
        head += _directory_bytes(own, node.joliet_bytes)
    return bytes(head)


def _area_size(areas: list[tuple[int, int, bytes]], i: int) -> int:
    return len(areas[i][2]) + (_CE_SIZE if i + 1 < len(areas) else 0)


def write_iso(tree: Path, output: Path, *, label: str, into: Path | None = None, epoch: int | None = None,
              slices: Mapping[Path, Sequence[Slice]] | None = None) -> None:
    """Write every file, directory and symlink under `tree` to the ISO image `output`; a file in
    `slices` goes on it as its parts, read straight from it.

    Every date in the image is `epoch` (seconds since 1970, in UTC; None: now, in local time).

    The image is written to a temporary name next to `output` and renamed when complete; on
    any failure the temporary file is removed. With `into`, the image is written there (the
    caller's temporary, which the caller renames) and `output` only names it in messages.
    """
    label = validate_label(label)
    if not tree.is_dir():
        raise InternalError(f"{tree}: the media tree is not a directory")
    image = _plan(tree, label, slices or {}, _Dates.at(epoch))
    tmp = into or output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            pwrite_all(fd, image.head, 0)
            copier = Copier(fd)
            with ui.progress(image.data_bytes, "Writing ISO image") as bar:
                for node in image.files:
                    interrupts.check()
                    if node.size:
                        assert node.source is not None
                        copier.copy(node.source, node.start, node.size, node.extent * BLOCK, bar.update)
            os.ftruncate(fd, image.blocks * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        if into is None:
            tmp.rename(output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InvalidInput(
                f"{output}: no space left on device while writing the ISO image "
                f"({ui.human_bytes(image.data_bytes)} of file data)",
                hint="free some space or write the image to another filesystem",
            ) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
