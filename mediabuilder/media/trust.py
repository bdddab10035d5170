"""Read the signed manifest store path back out of a media cache, in memory: no file is written."""

from __future__ import annotations

import lzma
from collections.abc import Callable
from typing import IO

import zstandard

from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.errors import FormatError, InvalidMedia, MediabuilderError
from mediabuilder.media.source import MediaSource
from mediabuilder.store import nar
from mediabuilder.store.narinfo import NarInfo

# What the manifest store path holds (manifest.json, sha256sums, hosts, store-paths, key) is a
# few lines per file on the medium: a NAR that claims more than this is refused unread.
MAX_MANIFEST_NAR = 64 * 1024 * 1024
TRUST_FILES = ("manifest.json", "sha256sums", "hosts", "store-paths", "key")


class _Bounded:
    """At most `limit` bytes of a stream; FormatError past that (a decompression bomb)."""

    def __init__(self, stream: IO[bytes], limit: int, name: str) -> None:
        self._stream, self._left, self._name = stream, limit, name

    def read(self, n: int, /) -> bytes:
        data = self._stream.read(min(n, self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise FormatError(f"{self._name}: unpacks to more than its NarSize")
        return data


class _MemorySink:
    """The regular files at the top of a NAR of a directory, by name."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[bytes]] = {}
        self.problem: str | None = None

    def directory(self, path: tuple[bytes, ...]) -> None:
        if path:
            self.problem = f"holds a directory {b'/'.join(path)!r}"

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        self.problem = f"holds a symlink {b'/'.join(path)!r}"

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        if len(path) != 1:
            self.problem = "is not a directory of files"
            return lambda data: None
        chunks = self.chunks.setdefault(path[0].decode("utf-8", "replace"), [])
        return chunks.append

    @property
    def files(self) -> dict[str, bytes]:
        return {name: b"".join(chunks) for name, chunks in self.chunks.items()}


def signed_manifest_files(source: MediaSource, info: NarInfo) -> dict[str, bytes]:
    """The files of the signed manifest NAR, read through the cache on `source`; InvalidMedia
    (naming what is wrong) when it cannot be read or is not what mediabuilder writes. The NAR's
    hash is checked with the rest of the cache."""
    url = f"cache/{info.url}"
    if info.nar_size > MAX_MANIFEST_NAR:
        raise InvalidMedia(f"{url}: the manifest NAR claims {info.nar_size} bytes, more than {MAX_MANIFEST_NAR}")
    sink = _MemorySink()
    try:
        with source.open(url) as f:
            stream = _Bounded(decompressing_reader(info.compression, f, url), info.nar_size, url)
            parser = nar.NarParser(stream, url)
            parser.parse(sink)
            parser.finish()
    except (MediabuilderError, OSError, ValueError, EOFError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise InvalidMedia(f"cannot read the signed manifest from {url}: {e}") from None
    if sink.problem is not None:
        raise InvalidMedia(f"{url}: the signed manifest {sink.problem}")
    files = sink.files
    missing = [name for name in TRUST_FILES if name not in files]
    if missing:
        raise InvalidMedia(f"{url}: the signed manifest has no {', '.join(missing)} "
                           "(made by an incompatible mediabuilder)")
    return files
