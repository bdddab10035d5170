"""The volume label: what ISO 9660 allows (FAT32 takes its first 11 characters).

A module of its own so that checking a label, as the CLI does before any work, and writing a
FAT32 image do not import pycdlib.
"""

from __future__ import annotations

import re

from mediabuilder.errors import InvalidInput

LABEL_MAX = 32
_LABEL_RE = re.compile(r"[A-Z0-9_]+")


def validate_label(label: str) -> str:
    """The volume label upper-cased, or InvalidInput saying what a label may contain."""
    upper = label.upper()
    if not upper or len(upper) > LABEL_MAX or not _LABEL_RE.fullmatch(upper):
        raise InvalidInput(
            f"--label/media.label: {label!r} is not a valid ISO 9660 volume label: "
            f"use 1 to {LABEL_MAX} characters A-Z, 0-9 and _ (lower case is upper-cased)"
        )
    return upper
