"""The volume label, checked against what each image format stores.

ISO 9660 (the primary volume descriptor's volume identifier) holds up to 32 d-characters; a FAT
volume label (boot sector and root directory entry) up to 11 of the characters FAT allows in a
short name. A label that does not fit is refused, never cut: the label is how a medium is
found (`/dev/disk/by-label/…`). A module of its own so that checking a label, as the CLI does
before any work, does not import pycdlib.
"""

from __future__ import annotations

import re

from mediabuilder.errors import InvalidInput
from mediabuilder.media.fatfs import LABEL_BYTES as FAT_LABEL_MAX

# Fits both formats: the default needs no per-format variant.
DEFAULT_LABEL = "NIXOS_MEDIA"
ISO_LABEL_MAX = 32
LABEL_MAX = ISO_LABEL_MAX  # the longest any format takes
_ISO_CHARS = "A-Z, 0-9 and _"
_FAT_CHARS = "A-Z, 0-9 and ! # $ % & ' ( ) - @ ^ _ ` { } ~"
_ISO_RE = re.compile(r"[A-Z0-9_]+")
_FAT_RE = re.compile(r"[A-Z0-9!#$%&'()\-@^_`{}~]+")
_RULES = {
    "iso": ("ISO 9660", ISO_LABEL_MAX, _ISO_CHARS, _ISO_RE),
    "fat32": ("FAT32", FAT_LABEL_MAX, _FAT_CHARS, _FAT_RE),
}


def validate_label(label: str, media_format: str = "iso") -> str:
    """The volume label upper-cased, or InvalidInput naming the rule of `media_format`
    ("iso" or "fat32"; a directory has no label)."""
    name, most, chars, pattern = _RULES[media_format]
    upper = label.upper()
    if not upper or len(upper) > most or not label.isascii() or not pattern.fullmatch(upper):
        raise InvalidInput(
            f"--label/media.label: {label!r} is not a valid {name} volume label: "
            f"use 1 to {most} characters {chars} (lower case is upper-cased)"
        )
    return upper
