"""Store paths: `/nix/store/<32 nix32 chars>-<name>`, and how Nix computes them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mediabuilder.errors import FormatError
from mediabuilder.store import nix32
from mediabuilder.store.hashes import Hash

STORE_DIR = "/nix/store"
HASH_PART_LEN = 32
MAX_NAME_LEN = 211
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
# 32 nix32 digits hold 160 bits, a 20-byte hash exactly: the alphabet is the whole check
# (nix32.is_valid(h, 20), without decoding; a closure parses thousands of paths).
_HASH_RE = re.compile(f"[{nix32.ALPHABET}]{{{HASH_PART_LEN}}}")


def check_name(name: str, what: str = "store path name") -> None:
    """Raise FormatError unless `name` is a valid store path name (Nix's `checkName`)."""
    if not name:
        raise FormatError(f"{what} is empty")
    if len(name) > MAX_NAME_LEN:
        raise FormatError(f"{what} {name!r} is longer than {MAX_NAME_LEN} characters")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise FormatError(f"{what} {name!r} contains invalid character {bad!r}")
    if name.startswith("."):
        raise FormatError(f"{what} {name!r} starts with '.'")


@dataclass(frozen=True, order=True)
class StorePath:
    """One store path; ordered like Nix orders them (by base name)."""

    hash_part: str
    name: str

    def __post_init__(self) -> None:
        if not _HASH_RE.fullmatch(self.hash_part):
            raise FormatError(f"store path hash {self.hash_part!r} is not {HASH_PART_LEN} nix32 characters")
        check_name(self.name, f"store path name of {self.hash_part}")

    @classmethod
    def parse(cls, text: str) -> StorePath:
        """Parse a full path `/nix/store/<hash>-<name>` or a base name `<hash>-<name>`."""
        base = text
        if text.startswith("/"):
            prefix = STORE_DIR + "/"
            if not text.startswith(prefix):
                raise FormatError(f"path {text!r} is not in the Nix store {STORE_DIR}")
            base = text[len(prefix) :]
        if "/" in base:
            raise FormatError(f"store path {text!r} has a '/' in its name")
        if len(base) < HASH_PART_LEN + 2 or base[HASH_PART_LEN] != "-":
            raise FormatError(f"store path {text!r} is not <32-character hash>-<name>")
        try:
            return cls(base[:HASH_PART_LEN], base[HASH_PART_LEN + 1 :])
        except FormatError as e:
            raise FormatError(f"store path {text!r}: {e}") from None

    @property
    def base(self) -> str:
        """`<hash>-<name>`, the form narinfo References use."""
        return f"{self.hash_part}-{self.name}"

    @property
    def full(self) -> str:
        """`/nix/store/<hash>-<name>`."""
        return f"{STORE_DIR}/{self.base}"

    def __str__(self) -> str:
        return self.full


def compress_hash(digest: bytes, size: int) -> bytes:
    """Nix's compressHash: fold `digest` into `size` bytes by XOR."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(type_: str, inner_hash: bytes, name: str) -> StorePath:
    """Nix's makeStorePath: the path for `type_` (e.g. "source", "output:out") and a sha256 digest."""
    check_name(name)
    fingerprint = f"{type_}:sha256:{inner_hash.hex()}:{STORE_DIR}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return StorePath(nix32.encode(compress_hash(digest, 20)), name)


def make_type(base: str, references: Iterable[StorePath] = (), self_reference: bool = False) -> str:
    """Nix's makeType: `base`, then `:<full path>` per sorted reference, then `:self` if needed."""
    parts = [base, *(p.full for p in sorted(set(references)))]
    if self_reference:
        parts.append("self")
    return ":".join(parts)


def make_fixed_output_path(
    recursive: bool, hash_: Hash, name: str, references: Iterable[StorePath] = ()
) -> StorePath:
    """Nix's makeFixedOutputPath; `recursive` sha256 is what `nix-store --add` and flake sources use."""
    refs = tuple(references)
    if recursive and hash_.algo == "sha256":
        return make_store_path(make_type("source", refs), hash_.digest, name)
    if refs:
        raise FormatError(f"fixed-output path {name!r}: only recursive sha256 paths may have references")
    prefix = "r:" if recursive else ""
    inner = hashlib.sha256(f"fixed:out:{prefix}{hash_.algo}:{hash_.hex()}:".encode()).digest()
    return make_store_path("output:out", inner, name)


def make_text_path(contents: bytes, name: str, references: Iterable[StorePath] = ()) -> StorePath:
    """Nix's makeTextPath (builtins.toFile, .drv files)."""
    return make_store_path(make_type("text", references), hashlib.sha256(contents).digest(), name)
