"""The offline medium inside a remastered installer ISO: everything under /MEDIUM_DIR.

`SubdirSource` shows that directory of a medium as a medium of its own, so that `verify` and
`inspect` read a remastered ISO as they read a plain medium (a file outside it is the
installer's, not the medium's, and no fault)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO

from mediabuilder.media.source import MediaSource

# The directory of the ISO that holds the offline medium; the live system sees it at /iso/<dir>.
MEDIUM_DIR = "mediabuilder"


def is_remastered(source: MediaSource) -> bool:
    """An installer ISO that mediabuilder remastered: no medium at its root, one under MEDIUM_DIR."""
    return (source.kind == "iso" and not source.is_file("manifest.json")
            and source.is_file(f"{MEDIUM_DIR}/manifest.json"))


class SubdirSource(MediaSource):
    """The files and directories of `inner` under `prefix`, by paths relative to it."""

    def __init__(self, inner: MediaSource, prefix: str) -> None:
        super().__init__(inner.path)
        self.kind = inner.kind
        self._inner = inner
        self._prefix = prefix.strip("/") + "/"

    def files(self) -> Iterator[tuple[str, int]]:
        for rel, size in self._inner.files():
            if rel.startswith(self._prefix):
                yield rel[len(self._prefix):], size

    def dirs(self) -> Iterator[str]:
        for rel in self._inner.dirs():
            if rel.startswith(self._prefix):
                yield rel[len(self._prefix):]

    def open(self, relpath: str) -> AbstractContextManager[BinaryIO]:
        return self._inner.open(self._prefix + relpath)

    def size(self, relpath: str) -> int | None:
        return self._inner.size(self._prefix + relpath)

    def is_dir(self, relpath: str) -> bool:
        return self._inner.is_dir(self._prefix + relpath)

    @property
    def free_bytes(self) -> int:
        return self._inner.free_bytes

    def close(self) -> None:
        self._inner.close()
