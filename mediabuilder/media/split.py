"""Cutting files that a filesystem cannot hold into numbered parts, and joining them again.

A file `NAME` bigger than the limit becomes `NAME.part000`, `NAME.part001`, ... each at most
`limit` bytes; the parts are hashed while they are copied so the manifest can list them. An
image needs no copies: each part is a `Slice` of the whole file, hashed in one read of it
(`slice_file`), that the image writers read straight from it. A file hashed as it was written
(`PartHashes`, the cache's NARs) needs not even that read: `slices_of` takes its parts as given.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mediabuilder.errors import InternalError

FAT32_MAX_FILE = 4 * 1024**3 - 1
# The biggest cluster FAT32 allows (64 KiB; Windows and Linux mount it, mkfs.fat makes it).
FAT32_MAX_CLUSTER = 64 * 1024
# The biggest file whose clusters stay below 2^32 bytes at every cluster size: fsck.fat 4.2 sums
# a file's clusters in 32 bits, so a file of 4 GiB - 2048 bytes in 4 KiB clusters (exactly 2^32
# bytes of them) is reported as "cluster chain length is 0 bytes" and emptied by `fsck -a`.
FAT32_SAFE_FILE = 2**32 - FAT32_MAX_CLUSTER
# The biggest file one ISO 9660 directory record (a single extent) holds, as we, pycdlib and
# xorriso write it; bigger files become multi-extent files that some readers truncate.
SINGLE_EXTENT_MAX = 4 * 1024**3 - 2048
# The part size the media tree uses for every format: a single ISO extent, and on FAT32 (any
# cluster size) below what any checker misreads. 4 GiB - 64 KiB.
PART_SIZE = min(FAT32_SAFE_FILE, SINGLE_EXTENT_MAX)
CHUNK = 1024 * 1024
PART_DIGITS = 3


@dataclass(frozen=True)
class Part:
    """One part of a split file: its file name (no directory), size in bytes and sha256 (hex)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Slice:
    """A part as a byte range of the whole file it is cut from (nothing is copied)."""

    name: str  # the part's file name, in the whole file's directory
    source: Path  # the whole file
    offset: int
    size: int


def needs_split(size: int, limit: int) -> bool:
    return size > limit


def part_names(name: str, count: int) -> list[str]:
    """`NAME.part000`, `NAME.part001`, ... for `count` parts."""
    if count < 1 or count > 10**PART_DIGITS:
        raise InternalError(f"{name}: cannot split into {count} parts")
    return [f"{name}.part{i:0{PART_DIGITS}d}" for i in range(count)]


def part_count(size: int, limit: int) -> int:
    return max(1, -(-size // limit))


def split_file(src: Path, dest_dir: Path, limit: int) -> list[Part]:
    """Copy `src` into `dest_dir` as parts of at most `limit` bytes each, streaming.

    Each part is written under a temporary name and renamed once complete, so a part that
    exists under its final name is whole.
    """
    if limit < 1:
        raise InternalError(f"split limit must be positive, not {limit}")
    size = src.stat().st_size
    names = part_names(src.name, part_count(size, limit))
    parts: list[Part] = []
    with src.open("rb") as inp:
        for name in names:
            parts.append(_copy_part(inp, dest_dir / name, min(limit, size - limit * len(parts))))
    if sum(p.size for p in parts) != size:
        raise InternalError(f"{src}: changed size while it was being split")
    return parts


def slices_of(src: Path, limit: int, hashed: Sequence[tuple[int, str]]) -> tuple[list[Part], list[Slice]]:
    """What `slice_file` gives, from the (size, sha256) of each part recorded when `src` was written
    (`PartHashes`); InternalError unless they cut a file of `src`'s size into parts of `limit`."""
    size = src.stat().st_size
    names = part_names(src.name, part_count(size, limit))
    want = [min(limit, size - limit * i) for i in range(len(names))]
    if [n for n, _ in hashed] != want:
        raise InternalError(f"{src}: its recorded parts do not cut {size} bytes into parts of {limit}")
    parts = [Part(name, n, digest) for name, (n, digest) in zip(names, hashed, strict=True)]
    return parts, [Slice(p.name, src, limit * i, p.size) for i, p in enumerate(parts)]


class PartHashes:
    """The sha256 of a file written front to back and, in the same pass, of the parts of `limit`
    bytes `slice_file` would cut it into. The first part's digest is the whole file's state at
    `limit` bytes (a copy of it), so only the bytes after the first part are hashed twice."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InternalError(f"split limit must be positive, not {limit}")
        self.limit = limit
        self.whole = hashlib.sha256()
        self.size = 0
        self._done: list[tuple[int, str]] = []  # (size, sha256) of the parts that are complete
        self._current: Any = None  # the part being written, from the second part on

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            room = self.limit - self.size % self.limit
            piece, view = view[:room], view[room:]
            self.whole.update(piece)
            if self._current is not None:
                self._current.update(piece)
            self.size += len(piece)
            if self.size % self.limit == 0:  # a part ends here
                self._done.append((self.limit, (self._current or self.whole.copy()).hexdigest()))
                self._current = hashlib.sha256()

    def parts(self) -> list[tuple[int, str]]:
        """(size, sha256) of every part of what was written so far (one part when it fits `limit`)."""
        if self.size <= self.limit:
            return [(self.size, self.whole.hexdigest())]
        tail = self.size % self.limit
        return self._done + ([(tail, self._current.hexdigest())] if tail else [])


def slice_file(src: Path, limit: int) -> tuple[list[Part], list[Slice]]:
    """The parts `split_file` would write, as byte ranges of `src`, hashed in one read of it."""
    if limit < 1:
        raise InternalError(f"split limit must be positive, not {limit}")
    size = src.stat().st_size
    names = part_names(src.name, part_count(size, limit))
    parts: list[Part] = []
    slices: list[Slice] = []
    buffer = memoryview(bytearray(CHUNK))
    with src.open("rb", buffering=0) as inp:
        for i, name in enumerate(names):
            offset, want = limit * i, min(limit, size - limit * i)
            digest = hashlib.sha256()
            done = 0
            while done < want:
                n = inp.readinto(buffer[: min(CHUNK, want - done)])
                if not n:
                    raise InternalError(f"{src}: changed size while it was being split")
                digest.update(buffer[:n])
                done += n
            parts.append(Part(name, want, digest.hexdigest()))
            slices.append(Slice(name, src, offset, want))
        if inp.read(1):
            raise InternalError(f"{src}: changed size while it was being split")
    return parts, slices


def _copy_part(inp: BinaryIO, dest: Path, size: int) -> Part:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    written = 0
    try:
        with tmp.open("wb") as out:
            while written < size:
                chunk = inp.read(min(CHUNK, size - written))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
        tmp.rename(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Part(dest.name, written, digest.hexdigest())


def join_parts(parts: Iterable[Path], out: BinaryIO) -> int:
    """Append the parts, in the given order, to `out`; return the number of bytes written."""
    total = 0
    for path in parts:
        with path.open("rb") as inp:
            while chunk := inp.read(CHUNK):
                out.write(chunk)
                total += len(chunk)
    return total
