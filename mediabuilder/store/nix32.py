"""Nix's base-32 ("nix32"): its own alphabet, digits taken from the last byte first."""

from __future__ import annotations

from mediabuilder.errors import FormatError

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUES = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(size: int) -> int:
    """Characters nix32 needs for `size` bytes (20 -> 32, 32 -> 52)."""
    return (size * 8 - 1) // 5 + 1 if size else 0


def encode(data: bytes) -> str:
    """Encode `data` as Nix does (`nix-hash --to-base32`)."""
    value = int.from_bytes(data, "little")
    length = encoded_length(len(data))
    return "".join(ALPHABET[(value >> (5 * n)) & 0x1F] for n in range(length - 1, -1, -1))


def decode(text: str) -> bytes:
    """Decode nix32 `text`; FormatError on a character outside the alphabet or an impossible length."""
    size = len(text) * 5 // 8
    if encoded_length(size) != len(text):
        raise FormatError(f"nix32 string {text!r} has an impossible length {len(text)}")
    value = 0
    for c in text:
        digit = _VALUES.get(c)
        if digit is None:
            raise FormatError(f"nix32 string {text!r} contains invalid character {c!r}")
        value = (value << 5) | digit
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
