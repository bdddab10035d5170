"""One binary cache to download from (`file://`, `http://`, `https://`): its narinfos and NARs.

HTTP goes through one urllib3 pool manager (keep-alive connections, proxies from the environment,
credentials from the URL or ~/.netrc); each request has a timeout, and connection errors, timeouts
and 5xx answers are retried with exponential backoff. urllib3 rather than requests on top of it:
requests spends about 0.75 ms of CPU on each request against urllib3's 0.2 ms, and that was most
of what a prefetch of a thousand small paths cost (README, "Substituters").

A NAR is streamed into the destination cache's `nar/` under a deterministic partial name, checked
against FileSize and FileHash as it arrives, resumed with `Range` after a dropped connection or a
killed run, and renamed when complete and the NAR inside, decompressed, matches the signed NarHash
and NarSize (the narinfo's URL, FileHash, FileSize and Compression are not signed). It is stored
as the substituter compressed it: never recompressed.

What a server sends is bounded: a narinfo by TEXT_MAX bytes, a NAR file by its FileSize, which
the signed NarSize bounds in turn; every body by a time budget (a floor, then MIN_RATE bytes a
second), so that a trickle cannot keep a build waiting. A full disk removes the partial file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import lzma
import netrc
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import urllib3
import urllib3.exceptions
import zstandard

from mediabuilder import __version__
from mediabuilder.cache.compression import EXTENSIONS, decompressing_reader
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.errors import FormatError, InvalidInput, InvalidMedia
from mediabuilder.media.split import PART_SIZE, PartHashes
from mediabuilder.store import contentaddress
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import PublicKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import STORE_DIR, StorePath

DEFAULT_PRIORITY = 50
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
TRIES = 5
BACKOFF = 0.2  # seconds before the second try; doubled for each further one
CHUNK = 1 << 20
PARTIAL_PREFIX = ".partial-"
TEXT_MAX = 4 << 20  # a narinfo or nix-cache-info longer than this is not one
MIN_RATE = 32 << 10  # bytes per second: a body slower than this on average is given up (and resumed)
DEADLINE_FLOOR = 120.0  # seconds every request may take, however small
_EXTENSION = re.compile(r"\.nar(\.[A-Za-z0-9]+)?$")

T = TypeVar("T")

# urllib3 follows redirects (a CDN, presigned S3 URLs); everything else is retried by us, below.
REDIRECTS = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10)

# What a retry can cure: the network, the server's temporary trouble.
_TRANSIENT = (
    urllib3.exceptions.MaxRetryError,  # wraps a connection error (connect=0 above)
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.DecodeError,
    urllib3.exceptions.SSLError,
    urllib3.exceptions.ProxyError,
    ConnectionError,
    TimeoutError,  # and _TooSlow
)


class Cancelled(Exception):
    """A download stopped because the caller asked (another download failed)."""


class Cancel(Protocol):
    """What stops a download: a threading.Event, or a multiprocessing one across processes."""

    def is_set(self) -> bool: ...


class _ServerError(Exception):
    """A 5xx answer: retried like a dropped connection."""


class _TooSlow(TimeoutError):
    """A body that did not arrive within its time budget: retried (a NAR resumes where it was)."""


@dataclass(frozen=True)
class CacheInfo:
    """What `nix-cache-info` says."""

    store_dir: str
    priority: int
    want_mass_query: bool


@dataclass(frozen=True)
class Downloaded:
    """A NAR now in the destination cache: its URL there, FileHash and FileSize, and whether an
    earlier partial download was resumed (or the file was already complete)."""

    url: str
    file_hash: str
    file_size: int
    resumed: bool = False
    reused: bool = False


def local_url(info: NarInfo) -> str:
    """Where `info`'s NAR goes in our cache: `nar/<nix32 FileHash><extension>`, the extension
    taken from the upstream URL (the file is not recompressed), else from Compression."""
    return f"nar/{_file_id(info)}{_extension(info)}"


def partial_name(info: NarInfo) -> str:
    """The deterministic name a download of `info` is kept under until it is complete."""
    return f"{PARTIAL_PREFIX}{_file_id(info)}{_extension(info)}"


def _file_id(info: NarInfo) -> str:
    if info.file_hash is not None and info.file_hash.startswith("sha256:"):
        return info.file_hash.removeprefix("sha256:")
    # No FileHash upstream: name the partial after the NAR hash; the final name is computed.
    return "nar-" + info.nar_hash.removeprefix("sha256:")


def _extension(info: NarInfo) -> str:
    name = unquote(urlsplit(info.url).path).rsplit("/", 1)[-1]
    match = _EXTENSION.search(name)
    if match:
        return match.group(0)
    return EXTENSIONS.get(info.compression, f".nar.{re.sub(r'[^A-Za-z0-9]', '', info.compression)}")


class Substituter:
    """A binary cache to prefetch from, and the keys whose signatures it is trusted with."""

    def __init__(self, url: str, trusted_keys: Sequence[PublicKey], jobs: int = 8,
                 tries: int = TRIES, backoff: float = BACKOFF, min_rate: int = MIN_RATE,
                 deadline_floor: float = DEADLINE_FLOOR) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("file", "http", "https"):
            raise InvalidInput(f"substituter {url!r}: only file://, http:// and https:// URLs are supported")
        self.url = url.rstrip("/")
        self.trusted_keys = tuple(trusted_keys)
        self.tries = max(1, tries)
        self.backoff = backoff
        self.min_rate = min_rate
        self.deadline_floor = deadline_floor
        self._local = Path(unquote(urlsplit(self.url).path)) if scheme == "file" else None
        self._given_url = self.url
        self._connections = max(jobs, 10)
        self._http: urllib3.PoolManager | None = None
        if self._local is None:
            self.url, self._http = _pool_manager(self._given_url, self._connections)
        self._info: CacheInfo | None = None
        self._info_lock = threading.Lock()

    def reopen(self) -> None:
        """New connections, for a forked process: the parent's sockets are the parent's."""
        self._info_lock = threading.Lock()
        if self._local is None:
            self.url, self._http = _pool_manager(self._given_url, self._connections)

    def __repr__(self) -> str:
        return f"Substituter({self.url!r})"

    def close(self) -> None:
        if self._http is not None:
            self._http.clear()

    # nix-cache-info
    @property
    def info(self) -> CacheInfo:
        """`nix-cache-info`, read once; its StoreDir must be /nix/store."""
        with self._info_lock:
            if self._info is None:
                self._info = self._read_cache_info()
            return self._info

    @property
    def priority(self) -> int:
        return self.info.priority

    def _read_cache_info(self) -> CacheInfo:
        text = self._get_text("nix-cache-info")
        if text is None:
            raise InvalidInput(f"{self.url}: no nix-cache-info: this is not a Nix binary cache",
                               hint="check the --substituter URL")
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        store_dir = fields.get("StoreDir", STORE_DIR)
        if store_dir != STORE_DIR:
            raise InvalidInput(f"{self.url}: its StoreDir is {store_dir}, not {STORE_DIR}")
        priority = fields.get("Priority", str(DEFAULT_PRIORITY))
        if not priority.isdigit():
            raise FormatError(f"{self.url}/nix-cache-info: Priority {priority!r} is not a number")
        return CacheInfo(store_dir, int(priority), fields.get("WantMassQuery") == "1")

    # narinfo
    def narinfo(self, path: StorePath) -> NarInfo | None:
        """The narinfo of `path`, or None when this cache does not have it. Raises FormatError
        (InvalidMedia) when it does not parse or describes another path."""
        name = f"{path.hash_part}.narinfo"
        text = self._get_text(name)
        if text is None:
            return None
        info = NarInfo.parse(text, source=f"{self.url}/{name}")
        if info.store_path != path:
            raise FormatError(f"{self.url}/{name}: describes {info.store_path}, not {path}")
        return info

    def _get_text(self, name: str) -> str | None:
        """A small file of the cache (at most TEXT_MAX bytes), or None when it has none."""
        if self._local is not None:
            try:
                with open(self._local / name, "rb") as f:
                    data = f.read(TEXT_MAX + 1)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise InvalidInput(f"{self.url}/{name}: cannot read: {e}") from None
            if len(data) > TEXT_MAX:
                raise self._too_long(name)
            return data.decode("utf-8", errors="replace")
        url = f"{self.url}/{name}"

        def get() -> str | None:
            assert self._http is not None
            deadline = time.monotonic() + self.deadline_floor
            response = self._http.request("GET", url, timeout=self._timeout(self.deadline_floor),
                                          retries=REDIRECTS, preload_content=False)
            with _released(response):
                if response.status in (403, 404, 410):  # S3 answers 403 for a missing key
                    _drain(response, deadline)
                    return None
                self._check_status(response, url)
                if (response.length_remaining or 0) > TEXT_MAX:  # as Content-Length announces
                    raise self._too_long(name)
                data = bytearray()
                for chunk in _read_all(response, deadline):
                    data += chunk
                    if len(data) > TEXT_MAX:
                        raise self._too_long(name)
                return data.decode("utf-8", errors="replace")

        return self._retrying(get, url)

    def _too_long(self, name: str) -> InvalidMedia:
        return InvalidMedia(f"{self.url}/{name}: longer than {TEXT_MAX >> 20} MiB: not a Nix binary cache's file",
                            hint="the substituter is broken or hostile; use another one")

    def _timeout(self, budget: float) -> urllib3.Timeout:
        return urllib3.Timeout(connect=CONNECT_TIMEOUT, read=min(READ_TIMEOUT, budget))

    def _budget(self, size: int) -> float:
        """Seconds a body of `size` bytes may take: a floor, then at least `min_rate` bytes a second."""
        return self.deadline_floor + size / self.min_rate

    # NARs
    def download_nar(self, info: NarInfo, dest: Path, on_bytes: Callable[[int], None] = lambda n: None,
                     cancel: Cancel | None = None) -> Downloaded:
        """Download `info`'s NAR into the cache directory `dest` as `local_url(info)`.

        Resumes `nar/.partial-*` left by an interrupted download; checks FileSize and FileHash;
        `on_bytes(n)` reports progress (bytes already on disk count too)."""
        partial = dest / "nar" / partial_name(info)
        final = dest / local_url(info)
        reused = self._reused(info, dest, on_bytes)
        if reused is not None:
            return reused
        with _claimed(partial, cancel):
            reused = self._reused(info, dest, on_bytes)  # another process may have completed it
            if reused is not None:
                partial.unlink()
                return reused
            resumed = partial.stat().st_size > 0
            try:
                try:
                    file_hash, hashes = self._fetch_checked(info, partial, on_bytes, cancel)
                except InvalidMedia:
                    if not resumed:
                        raise
                    # The old partial file may be what is wrong: once more, from scratch.
                    os.truncate(partial, 0)
                    on_bytes(-(info.file_size or 0))
                    file_hash, hashes = self._fetch_checked(info, partial, on_bytes, cancel)
                # FileHash, FileSize, URL and Compression are not signed: only NarHash is.
                self._check_nar_hash(info, partial)
                if info.file_hash is None:
                    final = dest / f"nar/{file_hash.removeprefix('sha256:')}{_extension(info)}"
            except InvalidMedia:
                partial.unlink(missing_ok=True)
                raise
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                partial.unlink(missing_ok=True)
                raise InvalidInput(f"{dest}: no space left for the NAR of {info.store_path} "
                                   f"({info.file_size or info.nar_size} bytes)",
                                   hint="free space there, or build into another directory") from None
            os.replace(partial, final)
            url = final.relative_to(dest).as_posix()
            _record_parts(dest, url, hashes)
        return Downloaded(url, file_hash, hashes.size, resumed=resumed)

    def _reused(self, info: NarInfo, dest: Path, on_bytes: Callable[[int], None]) -> Downloaded | None:
        """The NAR file already complete in the cache `dest`, if it is, and the NAR inside is the
        signed one (an unsigned FileHash may name another path's file)."""
        url = local_url(info)
        final = dest / url
        hashes = self._complete(final, info) if info.file_hash is not None and final.is_file() else None
        if hashes is None or info.file_hash is None or nar_problem(info, final) is not None:
            return None
        on_bytes(hashes.size)
        if BinaryCache(dest).read_parts(url, PART_SIZE) is None:
            _record_parts(dest, url, hashes)
        return Downloaded(url, info.file_hash, hashes.size, reused=True)

    def _fetch_checked(self, info: NarInfo, partial: Path, on_bytes: Callable[[int], None],
                       cancel: Cancel | None) -> tuple[str, PartHashes]:
        hashes = self._fetch_into(info, partial, on_bytes, cancel)
        file_hash, size = Hash("sha256", hashes.whole.digest()).nix32(), hashes.size
        if (info.file_size is not None and size != info.file_size) or \
                (info.file_hash is not None and file_hash != info.file_hash):
            raise self._mismatch(info, f"got {size} bytes hashing to {file_hash}; the narinfo says "
                                       f"FileSize {info.file_size}, FileHash {info.file_hash}")
        return file_hash, hashes

    def _complete(self, file: Path, info: NarInfo) -> PartHashes | None:
        """`file` hashed, when it is what the narinfo's FileSize and FileHash say."""
        if info.file_size is not None and file.stat().st_size != info.file_size:
            return None
        hashes = _hashed_file(file)
        return hashes if Hash("sha256", hashes.whole.digest()).nix32() == info.file_hash else None

    def _mismatch(self, info: NarInfo, detail: str) -> InvalidMedia:
        return InvalidMedia(f"{info.store_path}: the NAR from {self.url} ({info.url}) is damaged: {detail}",
                            hint="the substituter serves a corrupt file; try again later or use another one")

    def _check_nar_hash(self, info: NarInfo, file: Path) -> None:
        """The NAR inside `file` must be the one the signed NarHash and NarSize describe."""
        problem = nar_problem(info, file)
        if problem is not None:
            raise self._mismatch(info, problem)

    def _fetch_into(self, info: NarInfo, partial: Path, on_bytes: Callable[[int], None],
                    cancel: Cancel | None) -> PartHashes:
        """Append the rest of the file to `partial` (retrying, resuming); its hashes and size."""
        expected = info.file_size
        self._file_limit(info)  # refuses a FileSize out of proportion before a byte is downloaded
        if expected is not None and partial.stat().st_size > expected:
            os.truncate(partial, 0)
        failures = 0
        while True:
            hashes = _hashed_file(partial)
            on_bytes(hashes.size)
            try:
                if expected is None or hashes.size < expected:
                    hashes = self._append(info, partial, hashes, on_bytes, cancel)
                return hashes
            except (*_TRANSIENT, _ServerError) as e:
                failures += 1
                on_bytes(-partial.stat().st_size if partial.exists() else 0)  # counted again next try
                if failures >= self.tries:
                    raise self._unreachable(info.url, e) from None
                time.sleep(self.backoff * 2 ** (failures - 1))

    def _append(self, info: NarInfo, partial: Path, hashes: PartHashes,
                on_bytes: Callable[[int], None], cancel: Cancel | None) -> PartHashes:
        limit = self._file_limit(info)
        with open(partial, "ab") as out, self._open_nar(info, hashes.size, limit) as (start, chunks):
            if start != hashes.size:  # the server sent the whole file: start over with it
                on_bytes(-hashes.size)
                out.truncate(0)
                hashes = PartHashes(PART_SIZE)
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if hashes.size + len(chunk) > limit:
                    raise self._too_big(info, limit)
                hashes.update(chunk)
                out.write(chunk)
                on_bytes(len(chunk))
        return hashes

    @contextlib.contextmanager
    def _open_nar(self, info: NarInfo, offset: int, limit: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        """The NAR file's bytes from `offset`, or from 0 when the server ignores Range: (start, chunks).
        A body announced longer than `limit` bytes is refused before it is read; one that takes
        longer than its time budget raises _TooSlow."""
        if self._local is not None:
            try:
                f = open(self._nar_file(info), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                raise self._no_nar(info) from None
            with f:
                f.seek(offset)
                yield offset, iter(lambda: f.read(CHUNK), b"")
            return
        assert self._http is not None
        url = self._nar_url(info)
        # Per-request headers replace the pool's: keep its User-Agent and credentials.
        headers = {**self._http.headers, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        budget = self._budget(max(0, limit - offset))
        deadline = time.monotonic() + budget
        r = self._http.request("GET", url, headers=headers, preload_content=False, decode_content=False,
                               timeout=self._timeout(budget), retries=REDIRECTS)
        complete = False
        try:
            if r.status in (403, 404, 410):
                raise self._no_nar(info)
            if r.status == 416:  # the partial file is no prefix of this one
                raise _ServerError("HTTP 416: range not satisfiable")
            self._check_status(r, url)
            start = 0
            if offset and r.status == 206:
                if not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise _ServerError(f"HTTP 206 with Content-Range {r.headers.get('Content-Range')!r}")
                start = offset
            if start + (r.length_remaining or 0) > limit:  # as Content-Length announces
                raise self._too_big(info, limit)
            yield start, _read_all(r, deadline)
            complete = True
        finally:
            if not complete:  # what is left of the body is not worth reading: a new connection
                r.close()
            r.release_conn()

    def _file_limit(self, info: NarInfo) -> int:
        """The most bytes `info`'s file may have: FileSize, which NarSize (signed) bounds, as
        compressing adds little even to what does not compress (zstd, xz, bzip2: well under 1/64)."""
        bound = info.nar_size + info.nar_size // 64 + (64 << 10)
        if info.file_size is not None and info.file_size > bound:
            raise self._mismatch(info, f"its FileSize {info.file_size} is out of proportion to its signed "
                                       f"NarSize {info.nar_size}")
        return bound if info.file_size is None else info.file_size

    def _too_big(self, info: NarInfo, limit: int) -> InvalidMedia:
        what = "FileSize" if info.file_size is not None else "what its signed NarSize allows,"
        return self._mismatch(info, f"more than {what} {limit} bytes")

    def _no_nar(self, info: NarInfo) -> InvalidMedia:
        return InvalidMedia(f"{info.store_path}: {self.url} has its narinfo but not its NAR {info.url}")

    def _nar_url(self, info: NarInfo) -> str:
        if re.match(r"^https?://", info.url):
            return info.url
        return f"{self.url}/{info.url}"

    def _nar_file(self, info: NarInfo) -> Path:
        assert self._local is not None
        if info.url.startswith("/") or ".." in info.url.split("/") or "://" in info.url:
            raise FormatError(f"{self.url}/{info.store_path.hash_part}.narinfo: URL {info.url!r} points outside "
                              "the cache")
        return self._local / info.url

    # HTTP plumbing
    def _check_status(self, response: urllib3.BaseHTTPResponse, url: str) -> None:
        if response.status >= 500:
            raise _ServerError(f"HTTP {response.status} {response.reason}")
        if response.status >= 400:
            raise InvalidInput(f"{url}: HTTP {response.status} {response.reason}",
                               hint="check the --substituter URL and its access rights")

    def _retrying(self, attempt: Callable[[], T], url: str) -> T:
        for number in range(1, self.tries + 1):
            try:
                return attempt()
            except (*_TRANSIENT, _ServerError) as e:
                if number == self.tries:
                    raise self._unreachable(url, e) from None
                time.sleep(self.backoff * 2 ** (number - 1))
        raise AssertionError("unreachable")

    def _unreachable(self, what: str, error: Exception) -> InvalidInput:
        name = what.removeprefix(self.url + "/")
        return InvalidInput(f"{self.url}: cannot download {name} after {self.tries} tries: {_reason(error)}",
                            hint="check the network and the --substituter URL, then run again (downloads resume)")


def _reason(error: Exception) -> str:
    """A few words for the user instead of urllib3's nested reprs."""
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, (_ServerError, _TooSlow)):
        return str(error)
    if isinstance(error, urllib3.exceptions.ResponseError):
        return "too many redirects"
    # NewConnectionError is a ConnectTimeoutError too (for urllib3 1.x's sake): not a timeout here.
    timeout = urllib3.exceptions.TimeoutError | TimeoutError
    if isinstance(error, timeout) and not isinstance(error, urllib3.exceptions.NewConnectionError):
        return "timed out"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return "the connection closed in the middle of the file"
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", str(error))
    return errno.group(1).strip() if errno else "cannot connect"


@contextlib.contextmanager
def _claimed(partial: Path, cancel: Cancel | None) -> Iterator[None]:
    """Hold the lock of the partial file (created empty when missing) while downloading into it.

    Another process downloading the same NAR into this cache (a second build beside this one)
    waits here and then finds the file complete; `remove_unless_locked()` leaves it alone. The
    lock goes with the process, so a killed run's partial file is free again at once."""
    while True:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled() from None
                    time.sleep(0.1)
            try:
                ours = os.fstat(fd).st_ino == os.stat(partial).st_ino
            except FileNotFoundError:
                ours = False  # the holder completed (renamed) or refused (deleted) it: look again
            if ours:
                yield
                return
        finally:
            os.close(fd)


def nar_problem(info: NarInfo, file: Path) -> str | None:
    """Why the NAR inside the file `file` (compressed as `info` says) is not the one `info`'s
    signed NarHash and NarSize describe, or None. Reads at most NarSize + 1 bytes of NAR."""
    sha = hashlib.sha256()
    size = 0
    try:
        with open(file, "rb") as f:
            reader = decompressing_reader(info.compression, f, info.url)
            while size <= info.nar_size and (data := reader.read(min(CHUNK, info.nar_size + 1 - size))):
                sha.update(data)
                size += len(data)
    except (OSError, EOFError, ValueError, FormatError, lzma.LZMAError, zstandard.ZstdError) as e:
        return f"it does not decompress as {info.compression}: {e}"
    if size > info.nar_size:
        return f"decompressed, it is longer than its signed NarSize {info.nar_size}"
    if size != info.nar_size or Hash("sha256", sha.digest()).nix32() != info.nar_hash:
        return "decompressed, it is not the NAR its signed NarHash and NarSize describe"
    return _ca_problem(info, file)


def _ca_problem(info: NarInfo, file: Path) -> str | None:
    """Why the NAR in `file` (already checked against NarHash) does not have `info`'s content
    address, or None: a CA path is trusted without a signature, so its content must be checked."""
    if info.ca is None:
        return None
    try:
        nar_hash = contentaddress.nar_hash_of_ca(info.ca)
        if nar_hash is not None and nar_hash.nix32() == info.nar_hash:
            return None  # fixed:r:sha256: the NarHash just checked is the content address
        with open(file, "rb") as f:
            return contentaddress.content_problem(info.ca, decompressing_reader(info.compression, f, info.url),
                                                  info.url)
    except (OSError, EOFError, ValueError, FormatError, lzma.LZMAError, zstandard.ZstdError) as e:
        return f"its content address {info.ca} cannot be checked: {e}"


def _hashed_file(path: Path) -> PartHashes:
    """The file's sha256 and size, and those of the parts an image cuts it into."""
    hashes = PartHashes(PART_SIZE)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hashes.update(chunk)
    return hashes


def _record_parts(cache_root: Path, url: str, hashes: PartHashes) -> None:
    """The parts of a NAR file over one part, hashed as it was written (or read) here, recorded
    beside it for the images (BinaryCache.read_parts), so that they need not read it again."""
    if hashes.size > PART_SIZE:
        BinaryCache(cache_root).write_parts(url, PART_SIZE, hashes.parts())



@contextlib.contextmanager
def _released(response: urllib3.BaseHTTPResponse) -> Iterator[None]:
    """The connection back to the pool when the body was read to its end, else closed (what is
    left of a body is not worth reading, and a hostile one may have no end)."""
    try:
        yield
    finally:
        if response.length_remaining != 0:  # None: no Content-Length, the body ends when it closes
            response.close()
        response.release_conn()


def _drain(response: urllib3.BaseHTTPResponse, deadline: float) -> None:
    """Read the short rest of an answer (an error page), so that its connection can serve again."""
    if response.length_remaining is not None and response.length_remaining <= 64 << 10:
        with contextlib.suppress(*_TRANSIENT):
            for _ in _read_all(response, deadline):
                pass


def _read_all(response: urllib3.BaseHTTPResponse, deadline: float) -> Iterator[bytes]:
    """The body as it arrives, undecoded, until `deadline` (time.monotonic()); a connection that
    closes early raises ProtocolError, a body still arriving at the deadline _TooSlow."""
    while chunk := response.read1(CHUNK, decode_content=False):
        if time.monotonic() > deadline:
            raise _TooSlow("too slow: the answer did not arrive in the time its size allows")
        yield chunk
    if response.length_remaining:
        raise urllib3.exceptions.ProtocolError(f"connection closed with {response.length_remaining} bytes to go")


def _pool_manager(url: str, connections: int) -> tuple[str, urllib3.PoolManager]:
    """The URL without credentials, and a pool manager for it: keep-alive connections (one per
    download thread), the proxy that the environment names for it, and basic auth from the URL's
    user info or else from ~/.netrc. TLS is checked against the system's CA certificates, or the
    file that NIX_SSL_CERT_FILE or SSL_CERT_FILE names."""
    parts = urllib3.util.parse_url(url)
    headers = {"User-Agent": f"mediabuilder/{__version__}"}
    auth = unquote(parts.auth) if parts.auth else _netrc_auth(parts.host or "")
    if auth:
        headers.update(urllib3.make_headers(basic_auth=auth))
    ca_file = os.environ.get("NIX_SSL_CERT_FILE") or os.environ.get("SSL_CERT_FILE")
    ca_certs = ca_file if parts.scheme == "https" and ca_file else None
    bare = parts._replace(auth=None).url
    proxy = urllib.request.getproxies().get(parts.scheme or "")
    if proxy and not urllib.request.proxy_bypass(parts.host or ""):
        proxy_auth = urllib3.util.parse_url(proxy).auth
        proxy_headers = urllib3.make_headers(proxy_basic_auth=unquote(proxy_auth)) if proxy_auth else None
        return bare, urllib3.ProxyManager(proxy, num_pools=4, headers=headers, proxy_headers=proxy_headers,
                                          maxsize=connections, ca_certs=ca_certs)
    return bare, urllib3.PoolManager(num_pools=4, headers=headers, maxsize=connections, ca_certs=ca_certs)


def _netrc_auth(host: str) -> str | None:
    """`login:password` for `host` from $NETRC or ~/.netrc, as curl and Nix's netrc-file read it."""
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{entry[0]}:{entry[2]}" if entry and entry[0] else None
