"""NAR, the Nix ARchive: a streaming writer and a strict streaming reader, byte-exact with Nix.

A NAR is a sequence of strings (u64 little-endian length, the bytes, zero padding to 8):
`nix-archive-1` then one node, where a node is `( type regular [executable ""] contents <bytes> )`,
`( type symlink target <str> )` or `( type directory (entry ( name <str> node <node> ))* )`,
with entries sorted by name bytes. Only the executable bit survives.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store.hashes import Hash

MAGIC = b"nix-archive-1"
READ_CHUNK = 1 << 20
WRITE_BATCH = 256 << 10
MAX_TOKEN = 4096  # longest tag, name or symlink target the reader accepts (PATH_MAX)


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


_OPEN, _CLOSE = _str(b"("), _str(b")")
_HEADER = _str(MAGIC)
_REGULAR = _OPEN + _str(b"type") + _str(b"regular")
_EXECUTABLE = _str(b"executable") + _str(b"")
_CONTENTS = _str(b"contents")
_SYMLINK = _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_DIRECTORY = _OPEN + _str(b"type") + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")


class _Batcher:
    """Collects small pieces and hands them to `write` in batches of about WRITE_BATCH bytes."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= WRITE_BATCH:
            self.flush()

    def add_large(self, data: bytes) -> None:
        if len(data) < WRITE_BATCH:
            self.add(data)
        else:
            self.flush()
            self._write(data)

    def flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf.clear()


def dump(path: Path, write: Callable[[bytes], object]) -> None:
    """Serialise the file tree at `path` as a NAR, calling `write` with chunks, as `nix-store --dump`."""
    out = _Batcher(write)
    out.add(_HEADER)
    _dump_node(os.fsencode(path), out)
    out.flush()


def _dump_node(path: bytes, out: _Batcher) -> None:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        _dump_file(path, st.st_mode & stat.S_IXUSR != 0, out)
    elif stat.S_ISLNK(st.st_mode):
        out.add(_SYMLINK + _str(os.readlink(path)) + _CLOSE)
    elif stat.S_ISDIR(st.st_mode):
        out.add(_DIRECTORY)
        for name in sorted(os.listdir(path)):
            out.add(_ENTRY + _str(name) + _NODE)
            _dump_node(path + b"/" + name, out)
            out.add(_CLOSE)
        out.add(_CLOSE)
    else:
        raise InvalidInput(f"{os.fsdecode(path)}: cannot put this kind of file (not a file, directory "
                           "or symlink) into a NAR")


def _dump_file(path: bytes, executable: bool, out: _Batcher) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        out.add(_REGULAR + (_EXECUTABLE if executable else b"") + _CONTENTS + struct.pack("<Q", size))
        left = size
        while left:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                raise InvalidInput(f"{os.fsdecode(path)}: file shrank while it was being archived")
            out.add_large(chunk)
            left -= len(chunk)
        if f.read(1):
            raise InvalidInput(f"{os.fsdecode(path)}: file grew while it was being archived")
    out.add(b"\0" * (-size % 8) + _CLOSE)


def nar_hash_and_size(path: Path) -> tuple[Hash, int]:
    """The sha256 and the size of the NAR of `path`, without holding the NAR in memory."""
    h = hashlib.sha256()
    size = 0

    def write(data: bytes) -> None:
        nonlocal size
        h.update(data)
        size += len(data)

    dump(path, write)
    return Hash("sha256", h.digest()), size


class Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class NarSink(Protocol):
    """What the parser reports, node by node; `path` is the tuple of entry names from the root."""

    def directory(self, path: tuple[bytes, ...]) -> None: ...

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None: ...

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        """Start a regular file; returns the callable that receives its contents in chunks."""
        ...


class _NullSink:
    def directory(self, path: tuple[bytes, ...]) -> None:
        pass

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        pass

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        return _discard


def _discard(data: bytes) -> None:
    pass


class NarParser:
    """Reads one NAR from `read` strictly: it accepts only the canonical form Nix writes."""

    def __init__(self, stream: Reader, source: str = "NAR") -> None:
        self._stream = stream
        self.source = source
        self.offset = 0

    def _fail(self, what: str) -> FormatError:
        return FormatError(f"{self.source}: {what} (at byte {self.offset})")

    def _read(self, n: int) -> bytes:
        parts = []
        left = n
        while left:
            data = self._stream.read(left)
            if not data:
                raise self._fail(f"truncated: expected {left} more bytes")
            parts.append(data)
            left -= len(data)
            self.offset += len(data)
        return b"".join(parts)

    def _u64(self) -> int:
        return int.from_bytes(self._read(8), "little")

    def _padding(self, length: int) -> None:
        pad = -length % 8
        if pad and self._read(pad) != b"\0" * pad:
            raise self._fail("non-zero padding")

    def _token(self, what: str) -> bytes:
        length = self._u64()
        if length > MAX_TOKEN:
            raise self._fail(f"{what} is {length} bytes long, more than {MAX_TOKEN}")
        data = self._read(length)
        self._padding(length)
        return data

    def _expect(self, *tokens: bytes) -> None:
        for token in tokens:
            got = self._token(f"expected {token.decode()!r}, got a string that")
            if got != token:
                raise self._fail(f"expected {token.decode()!r}, got {got[:64]!r}")

    def parse(self, sink: NarSink) -> int:
        """Parse the whole NAR, report it to `sink`; returns its size in bytes."""
        if self._token("magic") != MAGIC:
            raise self._fail("not a NAR (bad magic)")
        self._node((), sink)
        return self.offset

    def _node(self, path: tuple[bytes, ...], sink: NarSink) -> None:
        self._expect(b"(", b"type")
        kind = self._token("node type")
        if kind == b"regular":
            self._regular(path, sink)
        elif kind == b"symlink":
            self._expect(b"target")
            target = self._token("symlink target")
            if not target or b"\0" in target:
                raise self._fail(f"invalid symlink target {target!r}")
            sink.symlink(path, target)
            self._expect(b")")
        elif kind == b"directory":
            self._directory(path, sink)
        else:
            raise self._fail(f"unknown node type {kind[:64]!r}")

    def _regular(self, path: tuple[bytes, ...], sink: NarSink) -> None:
        tag = self._token("tag")
        executable = tag == b"executable"
        if executable:
            if self._token("executable marker") != b"":
                raise self._fail("executable marker has a non-empty value")
            tag = self._token("tag")
        if tag != b"contents":
            raise self._fail(f"expected 'contents', got {tag[:64]!r}")
        size = self._u64()
        write = sink.file(path, executable, size)
        left = size
        while left:
            chunk = self._read(min(READ_CHUNK, left))
            write(chunk)
            left -= len(chunk)
        self._padding(size)
        self._expect(b")")

    def _directory(self, path: tuple[bytes, ...], sink: NarSink) -> None:
        sink.directory(path)
        previous: bytes | None = None
        while True:
            tag = self._token("tag")
            if tag == b")":
                return
            if tag != b"entry":
                raise self._fail(f"expected 'entry' or ')', got {tag[:64]!r}")
            self._expect(b"(", b"name")
            name = self._token("entry name")
            if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                raise self._fail(f"invalid entry name {name!r}")
            if previous is not None and name <= previous:
                raise self._fail(f"entry {name!r} is not sorted after {previous!r} (or is a duplicate)")
            previous = name
            self._expect(b"node")
            self._node((*path, name), sink)
            self._expect(b")")

    def finish(self) -> None:
        """Raise FormatError if anything follows the NAR in the stream."""
        if self._stream.read(1):
            raise self._fail("trailing data after the end of the NAR")


def validate(stream: Reader, source: str = "NAR") -> int:
    """Parse a whole NAR stream (nothing may follow it); returns its size. FormatError if malformed."""
    parser = NarParser(stream, source)
    size = parser.parse(_NullSink())
    parser.finish()
    return size


class _DiskSink:
    def __init__(self, dest: Path) -> None:
        self._dest = os.fsencode(dest)

    def _path(self, path: tuple[bytes, ...]) -> bytes:
        return b"/".join((self._dest, *path))

    def directory(self, path: tuple[bytes, ...]) -> None:
        os.mkdir(self._path(path), 0o755)

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        os.symlink(target, self._path(path))

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path(path), flags, 0o755 if executable else 0o644)
        if executable:
            os.fchmod(fd, 0o755)  # the umask must not take away the one bit a NAR keeps
        f = os.fdopen(fd, "wb")
        written = 0

        def write(data: bytes) -> None:
            nonlocal written
            f.write(data)
            written += len(data)
            if written == size:
                f.close()

        if size == 0:
            f.close()
        return write


def restore(stream: Reader, dest: Path, source: str = "NAR") -> None:
    """Unpack a NAR from `stream` at `dest`, which must not exist; FormatError if it is malformed."""
    if os.path.lexists(dest):
        raise InvalidInput(f"{dest}: cannot unpack a NAR here: it already exists")
    parser = NarParser(stream, source)
    parser.parse(_DiskSink(dest))
    parser.finish()
