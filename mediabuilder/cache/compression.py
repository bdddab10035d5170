"""Streaming compression of NARs as Nix names it: zstd, xz, none (and bzip2, read only)."""

from __future__ import annotations

import bz2
import lzma
from typing import IO, Protocol

import zstandard

from mediabuilder.errors import FormatError

EXTENSIONS = {"zstd": ".nar.zst", "xz": ".nar.xz", "none": ".nar", "bzip2": ".nar.bz2"}
ZSTD_LEVEL = 3  # Nix's default for zstd


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Compressor:
    """Compresses what is written into `sink`; `close()` flushes the end of the frame."""

    def __init__(self, compression: str, sink: Writer) -> None:
        self._sink = sink
        self._zstd: zstandard.ZstdCompressionWriter | None = None
        self._xz: lzma.LZMACompressor | None = None
        if compression == "zstd":
            self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(
                sink, closefd=False, write_return_read=True  # type: ignore[arg-type]
            )
        elif compression == "xz":
            self._xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=6)
        elif compression != "none":
            raise ValueError(f"cannot compress with {compression!r}")

    def write(self, data: bytes) -> None:
        if self._zstd is not None:
            self._zstd.write(data)
        elif self._xz is not None:
            out = self._xz.compress(data)
            if out:
                self._sink.write(out)
        else:
            self._sink.write(data)

    def close(self) -> None:
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
            self._zstd.close()
        elif self._xz is not None:
            self._sink.write(self._xz.flush())


def decompressing_reader(compression: str, source: IO[bytes], name: str = "") -> IO[bytes]:
    """A stream of the NAR inside `source`, compressed as the narinfo's `Compression` says."""
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    if compression == "xz":
        return lzma.LZMAFile(source)
    if compression == "bzip2":
        return bz2.BZ2File(source)
    if compression == "none":
        return source
    raise FormatError(f"{name}: unknown compression {compression!r}")
