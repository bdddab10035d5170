"""Nix's base-32 ("nix32"): its own alphabet, digits taken from the last byte first."""

from __future__ import annotations

from mediabuilder.errors import FormatError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_CHARS = frozenset(ALPHABET)
_TO_BASE32 = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_PAIRS = [high + low for high in ALPHABET for low in ALPHABET]  # index: high digit * 32 + low


def encoded_length(size: int) -> int:
    """Characters nix32 needs for `size` bytes (20 -> 32, 32 -> 52)."""
    return (size * 8 - 1) // 5 + 1 if size else 0


def encode(data: bytes) -> str:
    """Encode `data` as Nix does (`nix-hash --to-base32`): the base-32 numeral of `data` read as
    a little-endian number, most significant digit first. Two digits a step (a table of all
    1,024 pairs): checking an up-to-date cache encodes three hashes a path."""
    value = int.from_bytes(data, "little")
    length = encoded_length(len(data))
    odd = length % 2
    head = ALPHABET[(value >> (5 * (length - 1))) & 0x1F] if odd else ""
    return head + "".join([_PAIRS[(value >> (5 * n)) & 0x3FF] for n in range(length - 2 - odd, -1, -2)])


def decode(text: str) -> bytes:
    """Decode nix32 `text`; FormatError on a character outside the alphabet or an impossible length."""
    size = len(text) * 5 // 8
    if encoded_length(size) != len(text):
        raise FormatError(f"nix32 string {text!r} has an impossible length {len(text)}")
    if not _CHARS.issuperset(text):
        bad = next(c for c in text if c not in _CHARS)
        raise FormatError(f"nix32 string {text!r} contains invalid character {bad!r}")
    # Most significant digit first, as int() reads base 32 (its digits 0-9a-v): in C, not a loop.
    value = int(text.translate(_TO_BASE32), 32) if text else 0
    if value >> (8 * size):
        raise FormatError(f"nix32 string {text!r} has bits set beyond {size} bytes")
    return value.to_bytes(size, "little")


def is_valid(text: str, size: int) -> bool:
    """Whether `text` is the nix32 form of exactly `size` bytes."""
    if len(text) != encoded_length(size):
        return False
    try:
        decode(text)
    except FormatError:
        return False
    return True
