"""Where things are in a `file://` binary cache, and writing its files safely.

    nix-cache-info              StoreDir, WantMassQuery, Priority
    <hashpart>.narinfo          one per store path, written last
    nar/<filehash>.nar.zst      the compressed NARs
    log/, realisations/         empty, but Nix wants them on read-only media
    parts/<nar file>.json       the sha256 of each part of a NAR bigger than a part, recorded as
                                it was written (local caches only; never copied to media)
    intact.state                what the intactness check found, authenticated by the key
                                (cache/intact.py; local caches only; never copied to media)
    signing-key.sec/.pub        the key a build made for itself (never copied to media)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from mediabuilder.errors import FormatError, InvalidInput, InvalidMedia
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import STORE_DIR, StorePath

CACHE_INFO = f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: 30\n"
SUBDIRS = ("nar", "log", "realisations")
SECRET_KEY = "signing-key.sec"
PUBLIC_KEY = "signing-key.pub"
PARTS = "parts"
INTACT_STATE = "intact.state"
TMP_PREFIX = ".tmp-"
_NARINFO = re.compile(r"^[0-9a-df-np-sv-z]{32}\.narinfo$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def temp_name(final: Path) -> Path:
    """A temporary name beside `final`, unique to this process, that no reader looks at."""
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{final.name}")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write under a temporary name, then rename: readers see the old file or the whole new one."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            lock(f)
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def lock(f: IO[bytes]) -> None:
    """Mark a temporary file as being written: the lock lasts as long as the writer's process
    (unlike a pid, which a zombie keeps and a new process may reuse)."""
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_unless_locked(path: Path) -> bool:
    """Delete `path` unless a living process holds its write lock (see `lock`); whether it was
    deleted. The deletion happens under the lock, after checking that `path` still names the
    locked file, so a writer that claims the name meanwhile sees it gone and starts afresh."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False
        path.unlink()
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class BinaryCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Narinfos parsed, by the file they were parsed from (inode, size, mtime), with the sha256
        # of its bytes: a build reads each one four times (fill, closure, sizes, assembly), and
        # opening and parsing are most of that; the media's sums take the sha256.
        self._parsed: dict[StorePath, tuple[tuple[int, int, int], NarInfo, str]] = {}
        # Narinfo files read by `narinfo_bytes` and not parsed yet, by the file they were read from.
        self._read: dict[StorePath, tuple[tuple[int, int, int], bytes]] = {}

    def __repr__(self) -> str:
        return f"BinaryCache({str(self.root)!r})"

    # Layout
    def narinfo_path(self, path: StorePath) -> Path:
        return self.root / f"{path.hash_part}.narinfo"

    def narinfo_file(self, path: StorePath) -> str:
        """`narinfo_path` as a string: a build asks it thousands of times, pathlib is slow."""
        return os.path.join(self.root, f"{path.hash_part}.narinfo")

    def file_path(self, url: str) -> Path:
        if url.startswith("/") or ".." in url.split("/"):
            raise FormatError(f"{self.root}: narinfo URL {url!r} points outside the cache")
        return self.root / url

    # Creating
    def create(self) -> None:
        """Make the directory tree (idempotent); a directory that cannot be written is an error."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in SUBDIRS:
                (self.root / sub).mkdir(exist_ok=True)
            info = self.root / "nix-cache-info"
            if not info.exists():
                write_atomic(info, CACHE_INFO.encode())
            probe = temp_name(self.root / "probe")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise InvalidInput(
                f"{self.root}: cache directory is not writable ({e.strerror})",
                hint="choose another one with --cache DIR",
            ) from None

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a run that was killed; returns how many."""
        removed = 0
        for directory in (self.root, self.root / "nar", self.root / PARTS):
            for entry in directory.glob(f"{TMP_PREFIX}*"):
                removed += remove_unless_locked(entry)
        return removed

    # Reading
    def has_narinfo(self, path: StorePath) -> bool:
        return self.narinfo_path(path).is_file()

    def read_narinfo(self, path: StorePath) -> NarInfo:
        """The path's narinfo, parsed again only when its file changed since it was last parsed
        (another inode, size or modification time: a narinfo is replaced by a rename)."""
        file = self.narinfo_file(path)
        try:
            known = self._parsed.get(path)
            if known is not None and known[0] == _identity(os.stat(file)):
                return known[1]
            read = self._read.pop(path, None)
            if read is None or read[0] != _identity(os.stat(file)):
                read = self._read_file(file)
        except FileNotFoundError:
            raise InvalidMedia(f"{file}: missing") from None
        return self._parse(path, *read)

    def narinfo_bytes(self, path: StorePath) -> bytes:
        """The bytes of the path's narinfo file (OSError when it cannot be read), kept until
        `parse_read` or `read_narinfo` parses them."""
        read = self._read_file(self.narinfo_file(path))
        self._read[path] = read
        return read[1]

    def parse_read(self, path: StorePath) -> NarInfo:
        """The narinfo that `narinfo_bytes` last returned, parsed: those very bytes."""
        known = self._parsed.get(path)
        read = self._read.pop(path)
        if known is not None and known[0] == read[0]:
            return known[1]
        return self._parse(path, *read)

    @staticmethod
    def _read_file(file: str) -> tuple[tuple[int, int, int], bytes]:
        with open(file, "rb") as f:
            return _identity(os.fstat(f.fileno())), f.read()

    def _parse(self, path: StorePath, identity: tuple[int, int, int], raw: bytes) -> NarInfo:
        file = self.narinfo_file(path)
        try:
            text = raw.decode().replace("\r\n", "\n").replace("\r", "\n")  # as read_text() reads
        except UnicodeDecodeError:
            raise FormatError(f"{file}: not text") from None
        info = NarInfo.parse(text, source=file)
        self._parsed[path] = (identity, info, hashlib.sha256(raw).hexdigest())
        return info

    def narinfo_digest(self, path: StorePath, file: Path | str) -> tuple[int, str] | None:
        """The size and sha256 of `path`'s narinfo as it was parsed, when `file` is that same
        file (a hard link to it, unchanged), else None."""
        known = self._parsed.get(path)
        try:
            return (known[0][1], known[2]) if known is not None and known[0] == _identity(os.stat(file)) else None
        except OSError:
            return None

    def narinfo_files(self) -> Iterator[Path]:
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if _NARINFO.match(entry.name):
                yield Path(entry.path)

    def write_narinfo(self, info: NarInfo) -> bytes:
        """Write `info`'s narinfo file; returns its bytes."""
        data = info.render().encode()
        write_atomic(self.narinfo_path(info.store_path), data)
        return data

    def parts_path(self, url: str) -> Path:
        return self.root / PARTS / f"{Path(url).name}.json"

    def write_parts(self, url: str, limit: int, parts: list[tuple[int, str]]) -> None:
        """Record the (size, sha256) of each `limit`-byte part of the NAR file `url`, hashed as it
        was written into this cache, bound to the file's size and modification time."""
        st = self.file_path(url).stat()
        record = {"limit": limit, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "parts": parts}
        (self.root / PARTS).mkdir(exist_ok=True)
        write_atomic(self.parts_path(url), json.dumps(record).encode())

    def read_parts(self, url: str, limit: int) -> list[tuple[int, str]] | None:
        """The parts recorded for the NAR file `url` at `limit`, or None (then hash them): none
        recorded, another limit, or a file whose size or modification time is not what it was
        when its parts were hashed. Trusted as the narinfo's FileHash is: this cache wrote both."""
        try:
            st = self.file_path(url).stat()
            record = json.loads(self.parts_path(url).read_bytes())
            parts = [(int(n), str(digest)) for n, digest in record["parts"]]
            if (record["limit"], record["size"], record["mtime_ns"]) != (limit, st.st_size, st.st_mtime_ns):
                return None
        except (OSError, ValueError, TypeError, KeyError, FormatError):
            return None
        cut = [min(limit, st.st_size - start) for start in range(0, st.st_size, limit)]
        if [n for n, _ in parts] != cut or not all(_SHA256_HEX.fullmatch(digest) for _, digest in parts):
            return None
        return parts

    def public_key(self) -> PublicKey | None:
        file = self.root / PUBLIC_KEY
        return PublicKey.load(file) if file.is_file() else None


def default_key_name() -> str:
    """`HOST-mediabuilder-1`, the host name cut to what a key name may hold."""
    host = re.sub(r"[^A-Za-z0-9_+-]", "", socket.gethostname().split(".")[0])[:60]
    return f"{host or 'local'}-mediabuilder-1"


def load_or_create_key(cache: BinaryCache, key_file: Path | None, name: str) -> tuple[SecretKey, bool]:
    """The signing key: `key_file` if given, else the cache's own, created when missing.

    Returns the key and whether it was created now."""
    if key_file is not None:
        return SecretKey.load(key_file), False
    secret = cache.root / SECRET_KEY
    if secret.exists():
        return SecretKey.load(secret), False
    key = SecretKey.generate(name)
    write_atomic(cache.root / PUBLIC_KEY, (key.public().render() + "\n").encode())
    write_atomic(secret, (key.render() + "\n").encode(), mode=0o600)
    return key, True
