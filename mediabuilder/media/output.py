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
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder.errors import InternalError, InvalidInput
from mediabuilder.interrupts import uninterrupted
from mediabuilder.media.scripts import INSTALL_PARTS

# Every temporary of a build, wherever it is (beside the output, inside it, in the cache), is named
# TMP_PREFIX + tempfile's 8 random characters: a later run can find a killed run's whatever the
# output was called, and a long output name cannot make a temporary name too long.
TMP_PREFIX = ".mediabuilder-tmp-"
# Written first and removed last while a medium is moved into a directory: entries beside it are
# an interrupted medium's, which --force may replace.
INCOMPLETE = ".mediabuilder-incomplete"
INSTALL_SH_HEADER = b"#!/usr/bin/env bash\n# install.sh - install a NixOS host from mediabuilder media"
# What a medium holds at its root (docs/media-layout.md). Markers come last when moving in, go
# first when removing: a reader takes a directory with install.sh and a manifest for a medium.
MEDIA_ENTRIES = ("cache", "flake", "registry.json", "media-key.pub", "README.txt", *INSTALL_PARTS, "unattended.sh")
MARKERS = ("manifest.storepath", "manifest.json", "install.sh")
# Made by filesystems and desktops, not by a user: they may sit beside a medium and are left alone.
SYSTEM_ENTRIES = ("lost+found", "System Volume Information", ".Trashes", ".fseventsd", ".Spotlight-V100")
_RENAME_NOREPLACE = 1


@dataclass(frozen=True)
class Protected:
    """A path the output must neither contain nor lie inside, and why (for the message)."""

    path: Path
    what: str


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


def holds_medium(directory: Path) -> bool:
    """Whether `directory` holds a medium mediabuilder wrote (or was interrupted writing): its
    install.sh, or the mark of an interrupted move. Names alone prove nothing: a user's own
    `cache/` or `README.txt` is not a medium."""
    if os.path.lexists(directory / INCOMPLETE):
        return True
    try:
        with open(directory / "install.sh", "rb") as f:
            return f.read(len(INSTALL_SH_HEADER)) == INSTALL_SH_HEADER
    except OSError:
        return False


def foreign_entries(directory: Path) -> list[str]:
    """Entries of `directory` that are neither the filesystem's own nor, when it holds a medium,
    the medium's."""
    ours = {*SYSTEM_ENTRIES, INCOMPLETE}
    if holds_medium(directory):
        ours |= {*MEDIA_ENTRIES, *MARKERS}
    return sorted(e.name for e in os.scandir(directory)
                  if e.name not in ours and not e.name.startswith((".Trash-", TMP_PREFIX)))


def media_entries(directory: Path) -> list[str]:
    """The medium's entries in `directory` (see `holds_medium`), markers first."""
    if not holds_medium(directory):
        return []
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
                with uninterrupted():
                    remove(path)
                removed += 1
            finally:
                lock.release()
    return removed


def _rmtree(path: Path) -> None:
    """Remove a tree of ours; a read-only directory inside it (a store path's copy) is made
    writable first, never anything outside it."""
    root = os.path.realpath(path)

    def writable(_func: object, name: str, error: object) -> None:
        parent = os.path.dirname(name)
        if not (os.path.realpath(parent) + "/").startswith(root + "/"):
            raise error[1] if isinstance(error, tuple) else error  # type: ignore[misc]
        os.chmod(parent, 0o755)
        if os.path.isdir(name) and not os.path.islink(name):
            _rmtree(Path(name))
        else:
            os.unlink(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable)
    else:
        shutil.rmtree(path, onerror=writable)


def remove(path: Path) -> None:
    """Delete a temporary file or tree of ours, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            _rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def temporary(where: Path, *, directory: bool, prefix: str = TMP_PREFIX) -> Iterator[Path]:
    """A locked temporary file or directory `where/prefix…`, removed on leaving unless it was
    renamed away meanwhile."""
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=where)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() makes it: an image others may read (mkstemp: 0600)
        os.close(fd)
        path = Path(name)
    lock = Lock(path, "it")
    try:
        yield path
    finally:
        with uninterrupted():
            remove(path)
            lock.release()


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


def _syncfs(directory: Path) -> None:
    """Flush the filesystem of `directory` (data and metadata) to its device."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(directory))
    finally:
        os.close(fd)


# Bytes an image writer writes between two starts of writeback (see WriteBehind).
WRITE_BEHIND = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


class WriteBehind:
    """Starts the writeback of an image file every WRITE_BEHIND bytes written to it
    (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for it), so that the disk
    writes while the copy goes on and the fsync before the rename finds little left to write.
    Without it the kernel holds up to a fifth of memory dirty, and a 4.5 GiB image then waited
    1.4-1.9 s in its fsync after the copy (0.03 s with it; cat + sync is copy, then write).
    Where the call is missing (not Linux) or refused, the image is written as before."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = 0
        self._call: Any = None
        with contextlib.suppress(OSError, AttributeError):
            call = ctypes.CDLL(None, use_errno=True).sync_file_range
            call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            self._call = call

    def wrote(self, count: int) -> None:
        self.pending += count
        if self.pending >= WRITE_BEHIND and self._call is not None:
            self.pending = 0
            if self._call(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:  # 0, 0: the whole file
                self._call = None


COPY_CHUNK = 1024 * 1024  # bytes per read and write when an image writer copies a file in


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd`."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class Copier:
    """Copies files into an image through one reused buffer. Plain reads and writes of 1 MiB:
    on ext4 they were faster than `copy_file_range` and `sendfile` (0.25 s against 0.32 s and
    0.30 s for 575 MiB from the page cache), and they work between any two filesystems."""

    def __init__(self, out: int) -> None:
        self.out = out
        self.buffer = memoryview(bytearray(COPY_CHUNK))
        self.behind = WriteBehind(out)

    def copy(self, path: str | Path, start: int, size: int, offset: int, progress: Callable[[int], object]) -> None:
        """`size` bytes of `path` from `start` to `offset` in the image."""
        src = os.open(path, os.O_RDONLY)
        try:
            if start:
                os.lseek(src, start, os.SEEK_SET)
            done = 0
            while done < size:
                n = os.readv(src, [self.buffer[: size - done]])
                if n == 0:
                    raise InternalError(
                        f"{path}: the file is shorter than when the tree was read ({size} bytes); "
                        "was it changed while the image was written?"
                    )
                pwrite_all(self.out, self.buffer[:n], offset + done)
                self.behind.wrote(n)
                done += n
                progress(n)
        finally:
            os.close(src)


def move_in(tree: Path, output: Path) -> None:
    """Move the finished medium `tree` into the directory `output` (same filesystem), in place of
    the medium there. Renames only, run to their end whatever signal comes: the old entries go
    aside into a temporary (markers first), the new ones come in (markers last); a failed rename
    puts everything back. The INCOMPLETE mark stands meanwhile (for a power cut), and the old
    medium set aside is deleted last (after a SIGKILL, by the next run)."""
    _syncfs(tree)  # the data is on the stick before anything names it
    old = media_entries(output)
    names = sorted(e.name for e in os.scandir(tree))
    new = [*(n for n in names if n not in MARKERS), *(m for m in MARKERS if m in names)]
    with temporary(output, directory=True) as aside, uninterrupted():
        (output / INCOMPLETE).write_bytes(b"")
        _fsync_dir(output)
        moved_old: list[str] = []
        moved_new: list[str] = []
        try:
            for name in old:
                os.rename(output / name, aside / name)
                moved_old.append(name)
            _fsync_dir(output)
            for name in new:
                if name == MARKERS[0]:
                    _fsync_dir(output)
                rename_noreplace(tree / name, output / name)
                moved_new.append(name)
        except OSError:
            for name in reversed(moved_new):
                os.rename(output / name, tree / name)
            for name in reversed(moved_old):
                os.rename(aside / name, output / name)
            os.unlink(output / INCOMPLETE)
            raise
        os.unlink(output / INCOMPLETE)
        _syncfs(output)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(src: Path, output: Path, *, replace: bool) -> None:
    """Rename the finished file or directory `src` to `output`: over an existing output only when
    `replace`; otherwise an output that appeared meanwhile (another build) is an error.

    What was renamed is then on the disk: an image by an fsync of it before the rename (nearly
    free: the image writers fsync their images) and of its directory after it, not by syncing the
    whole filesystem, which waits for whatever else anyone has written to it; a tree, of many
    files, by syncing its filesystem."""
    is_file = src.is_file() and not src.is_symlink()
    if is_file:
        _fsync_file(src)
    try:
        if replace and os.path.lexists(output):
            os.replace(src, output)
        else:
            rename_noreplace(src, output)
    except FileExistsError:
        raise InvalidInput(f"{output}: appeared while this build was running (another build?)",
                           hint="nothing was replaced; choose another --output or pass --force") from None
    if is_file:
        _fsync_dir(output.parent)
    else:
        _syncfs(output.parent)
