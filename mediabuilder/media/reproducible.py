"""What makes two builds of the same flake give the same bytes: one date, and identifiers derived
from the content instead of drawn at random.

The date is `SOURCE_DATE_EPOCH` when set (https://reproducible-builds.org/specs/source-date-epoch/),
else the flake's commit time, else 1980-01-01 (FAT's first day). Every date on a medium is that
date, in UTC: the manifest's `created`, every FAT entry, every ISO 9660, Joliet and Rock Ridge
date. The FAT volume serial, the MBR disk identifier and the GPT GUIDs are hashes of the medium's
content (its signed manifest lists every file's sha256) and of the purpose of the identifier.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

from mediabuilder.errors import InvalidInput

FALLBACK_EPOCH = 315532800  # 1980-01-01T00:00:00Z: no date is known
LAST_EPOCH = 4102444799  # 2099-12-31T23:59:59Z: FAT, ISO 9660 and Joliet all still hold it


def source_date_epoch(commit_time: int | None) -> int:
    """The medium's date in seconds since 1970: SOURCE_DATE_EPOCH, else `commit_time`."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if raw:
        if not (raw.isascii() and raw.isdigit()) or not FALLBACK_EPOCH <= int(raw) <= LAST_EPOCH:
            raise InvalidInput(
                f"SOURCE_DATE_EPOCH={raw!r} is not a time from 1980 to 2099 in seconds since 1970",
                hint="unset it, or set it to the commit's time: SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)",
            )
        return int(raw)
    if commit_time is None:
        return FALLBACK_EPOCH
    return min(max(commit_time, FALLBACK_EPOCH), LAST_EPOCH)


def iso_date(epoch: int) -> str:
    """`epoch` as the manifest writes it: 2023-11-04T10:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def content_seed(tree: Path, label: str) -> bytes:
    """What the identifiers of a medium's image are derived from: its label and its manifest
    (which lists every file with its sha256), or, for a tree without one, every name and size."""
    digest = hashlib.sha256(b"mediabuilder media identity 1\0" + label.encode() + b"\0")
    manifest = tree / "manifest.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for top, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(top, name)
                digest.update(f"{path.relative_to(tree).as_posix()}\0{path.lstat().st_size}\0".encode())
    return digest.digest()


def derived(seed: bytes, purpose: str, size: int) -> bytes:
    """`size` bytes for `purpose`, derived from `seed`."""
    return hashlib.sha256(seed + b"\0" + purpose.encode()).digest()[:size]


def derived_uuid(seed: bytes, purpose: str) -> uuid.UUID:
    """A UUID for `purpose` (RFC 9562 version 8: custom, here a hash of the content)."""
    raw = bytearray(derived(seed, purpose, 16))
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(raw))
