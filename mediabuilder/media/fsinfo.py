"""How big a file the filesystem of an already-mounted directory can hold.

`--format dir` onto a mounted USB stick splits big files only when the stick's filesystem
needs it (FAT32); the filesystem type comes from /proc/self/mountinfo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mediabuilder.media.split import FAT32_MAX_FILE

MOUNTINFO = Path("/proc/self/mountinfo")
# Filesystems that limit a file to 4 GiB - 1 byte. Everything else (exfat, ext4, btrfs, xfs,
# tmpfs, ntfs, ...) has no limit that matters here; an unknown type is assumed to have none.
SMALL_FILE_FILESYSTEMS = {"vfat": FAT32_MAX_FILE, "msdos": FAT32_MAX_FILE}


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mount points and filesystem types, in the order of the file (later mounts win)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) > sep + 1:
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1]))
    return mounts


def mount_for(directory: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding `directory`: the longest mount point that is a prefix of it."""
    path = os.path.realpath(directory)
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        inside = path == point or path.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def max_file_size(directory: Path, mountinfo: str | None = None) -> int | None:
    """The biggest file the filesystem of `directory` holds, or None for no practical limit."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    mount = mount_for(directory, parse_mountinfo(mountinfo))
    if mount is None:
        return None
    return SMALL_FILE_FILESYSTEMS.get(mount.fstype)
