"""Hashes in Nix's three spellings: `sha256:<nix32>`, `sha256:<hex>` and SRI `sha256-<base64>`."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import IO

from mediabuilder.errors import FormatError
from mediabuilder.store import nix32

SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


@dataclass(frozen=True)
class Hash:
    """A digest and the name of the algorithm that made it."""

    algo: str
    digest: bytes

    def __post_init__(self) -> None:
        size = SIZES.get(self.algo)
        if size is None:
            raise FormatError(f"unknown hash algorithm {self.algo!r} (known: {', '.join(SIZES)})")
        if len(self.digest) != size:
            raise FormatError(f"{self.algo} digest has {len(self.digest)} bytes, not {size}")

    @classmethod
    def parse(cls, text: str) -> Hash:
        """Parse `algo:<nix32>`, `algo:<hex>`, `algo:<base64>` or SRI `algo-<base64>`."""
        if ":" in text:
            algo, _, rest = text.partition(":")
            sri = False
        elif "-" in text:
            algo, _, rest = text.partition("-")
            sri = True
        else:
            raise FormatError(f"hash {text!r} has no algorithm prefix (e.g. 'sha256:')")
        size = SIZES.get(algo)
        if size is None:
            raise FormatError(f"hash {text!r}: unknown algorithm {algo!r} (known: {', '.join(SIZES)})")
        if not sri and len(rest) == 2 * size:
            try:
                return cls(algo, bytes.fromhex(rest))
            except ValueError:
                raise FormatError(f"hash {text!r}: invalid hexadecimal digest") from None
        if not sri and len(rest) == nix32.encoded_length(size):
            try:
                return cls(algo, nix32.decode(rest))
            except FormatError as e:
                raise FormatError(f"hash {text!r}: {e}") from None
        if len(rest) == 4 * ((size + 2) // 3):
            try:
                digest = base64.b64decode(rest, validate=True)
            except ValueError:  # binascii.Error, or a str with non-ASCII characters
                raise FormatError(f"hash {text!r}: invalid base64 digest") from None
            if len(digest) == size and base64.b64encode(digest).decode() == rest:
                return cls(algo, digest)
        raise FormatError(f"hash {text!r}: digest has the wrong length for {algo}")

    @classmethod
    def sha256(cls, data: bytes) -> Hash:
        """The sha256 of `data`."""
        return cls("sha256", hashlib.sha256(data).digest())

    def nix32(self) -> str:
        """`sha256:<nix32>`, as narinfo files spell it."""
        return f"{self.algo}:{nix32.encode(self.digest)}"

    def sri(self) -> str:
        """`sha256-<base64>`, as `nix path-info --json` and flake locks spell it."""
        return f"{self.algo}-{base64.b64encode(self.digest).decode()}"

    def hex(self) -> str:
        """The digest in lower-case hexadecimal, without the algorithm."""
        return self.digest.hex()

    def __str__(self) -> str:
        return self.nix32()


def sha256_stream(stream: IO[bytes], chunk: int = 1 << 20) -> tuple[bytes, int]:
    """sha256 digest and length of everything `stream` yields, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    while data := stream.read(chunk):
        sha.update(data)
        size += len(data)
    return sha.digest(), size
