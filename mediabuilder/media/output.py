"""Where a medium is written, and how it comes into place without anyone mistaking a half-written
one for a medium, or losing what was there.

    new path         staged beside it (`.NAME.tmp-…`) and renamed into place, never over
                     something that appeared meanwhile (RENAME_NOREPLACE)
    an existing dir  (an empty directory, a mounted stick) written inside: the tree is staged in
                     `DIR/.mediabuilder-staging-…`, then moved in entry by entry, install.sh and
                     the manifest last; with --force an old medium there is replaced, but only
                     when the directory holds nothing else
    an image file    written beside it and renamed over it (--force)

Every temporary is flocked by the process that writes it, for as long as it lives; a later run
deletes the ones whose lock is free (left by a killed run), and never anything else. The output
itself is locked for the whole build, so two builds racing to one output cannot both succeed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mediabuilder.errors import InvalidInput

STAGING_PREFIX = ".mediabuilder-staging-"
# What a medium holds at its root (docs/media-layout.md). Markers come last when moving in, go
# first when removing: a reader takes a directory with install.sh and a manifest for a medium.
MEDIA_ENTRIES = ("cache", "flake", "registry.json", "media-key.pub", "README.txt")
MARKERS = ("manifest.storepath", "manifest.json", "install.sh")
# Made by filesystems and desktops, not by a user: they may sit beside a medium and are left alone.
SYSTEM_ENTRIES = ("lost+found", "System Volume Information", ".Trashes", ".fseventsd", ".Spotlight-V100")
_RENAME_NOREPLACE = 1


@dataclass(frozen=True)
class Protected:
    """A path the output must neither contain nor lie inside, and why (for the message)."""

    path: Path
    what: str


def tmp_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_not_protected(output: Path, protected: list[Protected]) -> None:
    """Refuse an output that is, contains or lies inside the cache, the key or the repository:
    --force would delete it, or the medium would land in what goes onto the medium."""
    out = Path(os.path.realpath(output))
    for item in protected:
        p = Path(os.path.realpath(item.path))
        if out == p:
            raise InvalidInput(f"{output}: the output is {item.what}", hint="choose another --output")
        if _inside(out, p):
            raise InvalidInput(f"{output}: the output lies inside {item.what} {item.path}",
                               hint="choose an --output outside it")
        if _inside(p, out):
            raise InvalidInput(f"{output}: the output contains {item.what} {item.path}",
                               hint="choose another --output: replacing it would delete that")


def foreign_entries(directory: Path) -> list[str]:
    """Entries of `directory` that are neither a medium's nor the filesystem's own."""
    ours = {*MEDIA_ENTRIES, *MARKERS, *SYSTEM_ENTRIES}
    return sorted(e.name for e in os.scandir(directory)
                  if e.name not in ours and not e.name.startswith((".Trash-", STAGING_PREFIX)))


def media_entries(directory: Path) -> list[str]:
    return [n for n in (*MARKERS, *MEDIA_ENTRIES) if os.path.lexists(directory / n)]


class Lock:
    """An exclusive flock on an open file or directory, held until `release`."""

    def __init__(self, path: Path, what: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InvalidInput(f"{path}: another mediabuilder is writing {what} right now",
                               hint="wait for it to finish, or choose another --output") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_stale(directory: Path, prefix: str) -> int:
    """Delete the temporaries `prefix` + tempfile's 8 random characters in `directory` that no
    living process holds locked (a killed run's): plain files and directories, never a symlink
    or anything else; returns how many."""
    removed = 0
    ours = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if not ours.fullmatch(entry.name) or entry.is_symlink():
                continue
            if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
                continue
            path = Path(entry.path)
            try:
                lock = Lock(path, "it")
            except (InvalidInput, OSError):
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    _rmtree(path)
                else:
                    path.unlink()
                removed += 1
            finally:
                lock.release()
    return removed


def _rmtree(path: Path) -> None:
    def writable(func: object, name: str, _exc: object) -> None:  # read-only store copies inside
        os.chmod(os.path.dirname(name), 0o755)
        shutil.rmtree(name, ignore_errors=True) if os.path.isdir(name) else os.unlink(name)

    shutil.rmtree(path, onerror=writable)


@contextlib.contextmanager
def temporary(where: Path, prefix: str, *, directory: bool) -> Iterator[Path]:
    """A locked temporary file or directory `where/prefix…`, removed on leaving unless it was
    renamed away meanwhile."""
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=where)
        os.close(fd)
        path = Path(name)
    lock = Lock(path, "it")
    try:
        yield path
    finally:
        lock.release()
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                _rmtree(path)
            else:
                path.unlink()


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST when `dst` exists (renameat2 RENAME_NOREPLACE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem without the flag
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    raise OSError(err, os.strerror(err), str(dst))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (vfat over FUSE, ...) cannot sync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def move_in(tree: Path, output: Path) -> None:
    """Move the finished medium `tree` into the directory `output` (same filesystem), replacing
    the old medium's entries: the old markers go first, the new ones come last."""
    old = media_entries(output)
    for name in old:  # MARKERS come first in media_entries
        target = output / name
        if target.is_dir() and not target.is_symlink():
            _rmtree(target)
        else:
            target.unlink()
    _fsync_dir(output)
    names = sorted(e.name for e in os.scandir(tree))
    rest = [n for n in names if n not in MARKERS]
    for name in [*rest, *(m for m in MARKERS if m in names)]:
        if name in MARKERS:
            _fsync_dir(output)
        os.rename(tree / name, output / name)
    _fsync_dir(output)


def place(src: Path, output: Path, *, replace: bool) -> None:
    """Rename the finished file or directory `src` to `output`: over an existing output only when
    `replace`; otherwise an output that appeared meanwhile (another build) is an error."""
    try:
        if replace and os.path.lexists(output):
            os.replace(src, output)
        else:
            rename_noreplace(src, output)
    except FileExistsError:
        raise InvalidInput(f"{output}: appeared while this build was running (another build?)",
                           hint="nothing was replaced; choose another --output or pass --force") from None
    _fsync_dir(output.parent)
