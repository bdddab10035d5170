"""Verify a binary cache with Python alone: every narinfo, signature, NAR and reference.

A path passes when its narinfo parses and names its own file, a trusted key signed it (or it is
content-addressed and its name follows from its content), the compressed file matches FileHash
and FileSize, the NAR inside matches NarHash and NarSize, and every reference is present.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import zstandard

from mediabuilder import ui
from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.cache.layout import _NARINFO, SUBDIRS
from mediabuilder.cache.writer import default_jobs
from mediabuilder.errors import InvalidMedia, MediabuilderError
from mediabuilder.store import contentaddress
from mediabuilder.store.hashes import Hash, sha256_stream
from mediabuilder.store.keys import PublicKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import STORE_DIR

if TYPE_CHECKING:
    from mediabuilder.media.source import MediaSource

CHUNK = 1 << 20
MAX_NARINFO = 1 << 20  # a narinfo lists references by name: a megabyte is thousands of them
# An unsigned content-addressed NAR must be unpacked to be trusted, so its unsigned NarSize
# could promise any amount of work: it may expand at most this much over its file (a source
# tree compresses 3-10x with zstd or xz; 32 KiB of zstd can hold a GiB of zeros).
MAX_UNSIGNED_EXPANSION = 1024
UNSIGNED_SLACK = 1 << 20
_PART = re.compile(r"^[0-9]{3}$")


@dataclass(frozen=True)
class Fault:
    path: str
    fault: str

    def __str__(self) -> str:
        return f"{self.path}: {self.fault}"


@dataclass
class Report:
    paths: int = 0
    nar_bytes: int = 0
    faults: list[Fault] = field(default_factory=list)
    file_sha256: dict[str, str] = field(default_factory=dict)  # NAR files and split parts read → hex

    @property
    def ok(self) -> bool:
        return not self.faults


@dataclass(frozen=True)
class _Checked:
    hash_part: str
    label: str
    references: tuple[str, ...]
    nar_size: int
    faults: tuple[Fault, ...]
    file_sha256: dict[str, str] = field(default_factory=dict)  # NAR file and its parts, as read → hex


def signed_by(info: NarInfo, trusted: list[PublicKey]) -> bool:
    """Whether a trusted key signed `info`."""
    fingerprint = info.fingerprint()
    return any(key.verify(fingerprint, sig) for key in trusted for sig in info.sigs)


def check_signature(info: NarInfo, trusted: list[PublicKey]) -> str | None:
    """None when a trusted key signed `info` or its CA gives its store path; otherwise the fault.
    A path trusted by its CA alone must then have its NAR checked against the CA (`_check_nar`)."""
    if signed_by(info, trusted):
        return None
    if info.ca:
        return _ca_mismatch(info, info.ca)
    if not info.sigs:
        return "not signed"
    names = ", ".join(sorted({s.split(":", 1)[0] for s in info.sigs}))
    return f"no valid signature by a trusted key (signed by {names})"


def ca_problem(info: NarInfo) -> str | None:
    """Why `info`'s CA, signed or not, is not this path's content address, or None. The signature
    covers StorePath, NarHash, NarSize and References only: a CA line added to or altered in a
    signed narinfo would be registered by Nix as the path's content address. So any CA must give
    the store path (and, for `fixed:r:sha256`, be the NarHash); an unsigned path's NAR is then
    checked against it too (`_check_nar`)."""
    if info.ca is None:
        return None
    problem = _ca_mismatch(info, info.ca)
    if problem is None or problem.startswith("bad content address"):
        return problem
    return f"{problem} (an unsigned CA line, forged)"


def _ca_mismatch(info: NarInfo, ca: str) -> str | None:
    """Why `ca` does not give `info`'s store path (or, for `fixed:r:sha256`, its NarHash); None
    when it does."""
    try:
        refs = tuple(type(info.store_path).parse(r) for r in info.references)
        expected = contentaddress.expected_path(info.store_path.name, ca, refs, info.store_path)
        nar_hash = contentaddress.nar_hash_of_ca(ca)
    except MediabuilderError as e:
        return f"bad content address: {e}"
    if expected != info.store_path:
        return f"content address {ca} does not give this store path"
    if nar_hash is not None and nar_hash.nix32() != info.nar_hash:
        return "NarHash differs from the content address"
    return None


class _Hashing:
    """The bytes of `stream` as they are read, hashed (the compressed file, while the NAR inside
    it is decompressed from it), with the byte count handed to `progress`."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None]) -> None:
        self._stream, self._progress = stream, progress
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._stream.read(n if n is not None and n >= 0 else CHUNK)
        self.sha.update(data)
        self.size += len(data)
        self._progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _Joined(io.RawIOBase):
    """Split parts `NAME.part000`, `NAME.part001`, ... read as one stream."""

    def __init__(self, source: MediaSource, parts: list[str]) -> None:
        super().__init__()
        self._source, self._parts = source, parts
        self._current: BinaryIO | None = None
        self._sha: Any = None
        self._name = ""
        self.part_sha256: dict[str, str] = {}  # of each part read to its end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._current is None:
                if not self._parts:
                    return 0
                self._name = self._parts.pop(0)
                self._current, self._sha = self._source.open(self._name).__enter__(), hashlib.sha256()
            data = self._current.read(len(buffer))
            if data:
                self._sha.update(data)
                buffer[: len(data)] = data
                return len(data)
            self._current.close()
            self._current = None
            self.part_sha256[self._name] = self._sha.hexdigest()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


def nar_file_names(source: MediaSource, name: str) -> list[str] | None:
    """The file or split parts that hold the NAR file `name`: [name], [name.part000, ...] or
    None when it is missing. Parts must run from 000 with no gap (install.sh joins what it finds)."""
    if source.is_file(name):
        return [name]
    prefix = f"{name}.part"
    numbers = sorted(int(rel[len(prefix):]) for rel, _ in source.files()
                     if rel.startswith(prefix) and _PART.match(rel[len(prefix):]))
    if not numbers:
        return None
    if numbers != list(range(len(numbers))):
        raise InvalidMedia(f"{name}: split parts {', '.join(f'{n:03d}' for n in numbers)} do not run from 000 "
                           "without a gap")
    return [f"{prefix}{n:03d}" for n in numbers]




@dataclass(frozen=True)
class _Job:
    source: MediaSource
    prefix: str  # where the cache is on the source: "cache/" on media, "" for a cache itself
    narinfo: str  # its name on the source
    trusted: tuple[PublicKey, ...]
    progress: Callable[[int], None]


def check_path(job: _Job) -> _Checked:
    """Check one narinfo and its NAR file."""
    hash_part = job.narinfo.rsplit("/", 1)[-1].removesuffix(".narinfo")
    label = f"{STORE_DIR}/{hash_part}-?"
    try:
        text = job.source.read_bytes(job.narinfo, MAX_NARINFO).decode()
        info = NarInfo.parse(text, source=job.narinfo)
    except (MediabuilderError, OSError, UnicodeDecodeError) as e:
        return _Checked(hash_part, label, (), 0, (Fault(label, f"unreadable narinfo {hash_part}.narinfo: {e}"),))
    label, refs = str(info.store_path), info.references
    if info.store_path.hash_part != hash_part:
        return _Checked(hash_part, label, refs, 0, (Fault(label, f"narinfo file {hash_part}.narinfo describes "
                                                                 "another path"),))
    if (problem := check_signature(info, list(job.trusted)) or ca_problem(info)) is not None:
        # Nothing unsigned is unpacked: its NarSize could promise any amount of work.
        return _Checked(hash_part, label, refs, info.nar_size, (Fault(label, problem),))
    faults: list[str] = []
    shas: dict[str, str] = {}
    try:
        name = job.prefix + info.url
        if info.url.startswith("/") or ".." in info.url.split("/") or "" in info.url.split("/"):
            raise InvalidMedia(f"narinfo URL {info.url} points outside the cache")
        names = nar_file_names(job.source, name)
        if names is None:
            faults.append(f"NAR file {info.url} is missing")
        else:
            shas[name] = _check_nar(job, info, names, faults, shas)
    except (OSError, MediabuilderError) as e:
        faults.append(f"cannot read {info.url}: {e}")
    return _Checked(hash_part, label, refs, info.nar_size, tuple(Fault(label, m) for m in faults), shas)


def _check_nar(job: _Job, info: NarInfo, names: list[str], faults: list[str], shas: dict[str, str]) -> str:
    """Hash the file and the NAR in it in one read; the file's sha256 (hex)."""
    size = sum(job.source.size(n) or 0 for n in names)
    if info.file_size is not None and size != info.file_size:
        faults.append(f"{info.url} is {size} bytes, FileSize says {info.file_size}")
        job.progress(size)
        return ""
    broken, ca_problem = "", None
    ca = info.ca if info.ca is not None and not signed_by(info, list(job.trusted)) else None
    if ca is not None and info.nar_size > MAX_UNSIGNED_EXPANSION * size + UNSIGNED_SLACK:
        faults.append(f"unsigned, and its NarSize ({info.nar_size} bytes) is more than {MAX_UNSIGNED_EXPANSION} "
                      f"times its {size}-byte file: not unpacked (a decompression bomb)")
        job.progress(size)
        return ""
    joined = _Joined(job.source, list(names))
    with io.BufferedReader(joined, CHUNK) as f:
        hashing = _Hashing(f, job.progress)
        try:
            stream = decompressing_reader(info.compression, cast(IO[bytes], hashing), info.url)
            bounded = _Bounded(stream, info.nar_size)
            if ca is None:
                nar_sha, nar_size = sha256_stream(cast(IO[bytes], bounded))
            else:
                nar_sha, nar_size, ca_problem = _ca_checked(ca, bounded, info.url)
        except (OSError, EOFError, MediabuilderError, ValueError, lzma.LZMAError, zstandard.ZstdError) as e:
            broken, nar_sha, nar_size = f"{info.url} does not decompress as {info.compression}: {e}", b"", 0
        hashing.drain()
    file_sha = hashing.sha.hexdigest()
    if len(names) > 1:
        shas.update(joined.part_sha256)
    if info.file_hash is not None and Hash("sha256", bytes.fromhex(file_sha)).nix32() != info.file_hash:
        faults.append(f"{info.url} does not match its FileHash")
    elif broken:
        faults.append(broken)
    elif nar_size > info.nar_size:
        faults.append(f"NAR is longer than NarSize says ({info.nar_size} bytes)")
    elif nar_size != info.nar_size:
        faults.append(f"NAR is {nar_size} bytes, NarSize says {info.nar_size}")
    elif Hash("sha256", nar_sha).nix32() != info.nar_hash:
        faults.append("NAR does not match its NarHash")
    elif ca_problem is not None:
        faults.append(f"unsigned, and {ca_problem} (a forged content-addressed path)")
    return file_sha


def _ca_checked(ca: str, nar: _Bounded, url: str) -> tuple[bytes, int, str | None]:
    """The NAR's sha256 and size, and why its content does not have the content address `ca`
    (None when it does), in one read of the stream."""
    tee = _Tee(nar)
    problem = contentaddress.content_problem(ca, tee, url)
    while tee.read(CHUNK):
        pass
    return tee.sha.digest(), tee.size, problem


class _Tee:
    """The bytes of a stream as they are read, hashed and counted."""

    def __init__(self, stream: _Bounded) -> None:
        self._stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int, /) -> bytes:
        data = self._stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


class _Bounded:
    """A NAR stream read up to one byte past its NarSize: a decompression bomb stops there."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream, self._left = stream, limit + 1

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            return b""
        data = self._stream.read(min(n if n >= 0 else CHUNK, self._left))
        self._left -= len(data)
        return data


def verify_cache(root: Path, trusted: list[PublicKey], jobs: int = 0) -> Report:
    """Check every path in the cache directory at `root`."""
    from mediabuilder.media.source import DirSource

    return verify_cache_on(DirSource(root), "", trusted, jobs)


def verify_cache_on(source: MediaSource, prefix: str, trusted: list[PublicKey], jobs: int = 0,
                    bar: Any = None, external: frozenset[str] = frozenset()) -> Report:
    """Check every path of the cache at `prefix` ("cache/" or "") on `source`, read in place.
    References to `external` hash parts (what a delta medium's base holds) need not be present."""
    report = Report()
    where = prefix.rstrip("/") or str(source.path)
    info_name = f"{prefix}nix-cache-info"
    if not source.is_file(info_name):
        report.faults.append(Fault(f"{where}/nix-cache-info", "missing: this is not a Nix binary cache"))
        return report
    try:
        cache_info = source.read_bytes(info_name, MAX_NARINFO).decode(errors="replace")
    except (OSError, MediabuilderError) as e:
        cache_info = ""
        report.faults.append(Fault(f"{where}/nix-cache-info", str(e)))
    if f"StoreDir: {STORE_DIR}" not in cache_info.splitlines():
        report.faults.append(Fault(f"{where}/nix-cache-info", f"StoreDir is not {STORE_DIR}"))
    for sub in SUBDIRS:
        if not source.is_dir(prefix + sub):
            report.faults.append(Fault(f"{where}/{sub}", "missing directory (Nix needs it on read-only media)"))
    narinfos = [rel for rel, _ in source.files()
                if rel.startswith(prefix) and _NARINFO.match(rel[len(prefix):])]
    own_bar = bar is None
    if own_bar:
        total = sum(size for rel, size in source.files() if rel.startswith(prefix + "nar/"))
        bar = ui.progress(total, "verifying the cache")
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    work = [_Job(source, prefix, n, tuple(trusted), advance) for n in narinfos]
    with ThreadPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        checked = list(pool.map(check_path, work))
    if own_bar:
        bar.close()
    present = {c.hash_part for c in checked} | external
    for c in checked:
        report.paths += 1
        report.nar_bytes += c.nar_size
        report.faults.extend(c.faults)
        report.file_sha256.update(c.file_sha256)
        for ref in c.references:
            if ref[:32] not in present:
                report.faults.append(Fault(c.label, f"reference {STORE_DIR}/{ref} is missing"))
    return report
