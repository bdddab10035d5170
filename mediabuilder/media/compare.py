"""`verify --against`: the first difference between two media, read in place.

Files are compared first, in the order of their paths, so that the difference is named by the file
a person would look at; two images of the same format with the same files are then compared byte
for byte, which catches what lies outside the files (dates, serials, the partition table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from mediabuilder.media.source import MediaSource

CHUNK = 1 << 20


def first_difference(mine: MediaSource, other: MediaSource) -> str | None:
    """Where `other` first differs from `mine`, as one line naming the path; None when both hold
    the same files with the same bytes, and, for two images of one format, the same image bytes."""
    here, there = str(mine.path), str(other.path)
    dirs_mine, dirs_other = set(mine.dirs()), set(other.dirs())
    files_mine, files_other = dict(mine.files()), dict(other.files())
    for rel in sorted(dirs_mine ^ dirs_other | files_mine.keys() ^ files_other.keys()):
        where = here if rel in dirs_mine or rel in files_mine else there
        return f"{rel}: only in {where}"
    for rel in sorted(files_mine):
        if files_mine[rel] != files_other[rel]:
            return f"{rel}: {files_mine[rel]} bytes in {here}, {files_other[rel]} in {there}"
        with mine.open(rel) as a, other.open(rel) as b:
            at = _first_unequal_byte(a, b)
        if at is not None:
            return f"{rel}: differs from byte {at} on"
    if mine.kind == other.kind and mine.kind != "dir":
        sizes = (os.stat(mine.path).st_size, os.stat(other.path).st_size)
        if sizes[0] != sizes[1]:
            return f"the images hold the same files, but {here} is {sizes[0]} bytes and {there} {sizes[1]}"
        with Path(mine.path).open("rb") as a, Path(other.path).open("rb") as b:
            at = _first_unequal_byte(a, b)
        if at is not None:
            return f"the images hold the same files, but differ from byte {at} on (the {mine.kind} structure: " \
                   "dates, serials or layout)"
    return None


def _first_unequal_byte(a: BinaryIO, b: BinaryIO) -> int | None:
    offset = 0
    while True:
        x, y = _read_full(a), _read_full(b)
        if x != y:
            common = min(len(x), len(y))
            return offset + next((i for i in range(common) if x[i] != y[i]), common)
        if not x:
            return None
        offset += len(x)


def _read_full(f: BinaryIO) -> bytes:
    """CHUNK bytes, fewer only at the end (a raw stream may return less per read)."""
    parts, size = [], 0
    while size < CHUNK and (data := f.read(CHUNK - size)):
        parts.append(data)
        size += len(data)
    return b"".join(parts)
