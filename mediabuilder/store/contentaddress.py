"""Check that a content-addressed path's name really follows from its content.

Nix accepts a CA path without a signature because its store path is computed from its content
address; a verifier must therefore recompute the path, or a forged CA narinfo would pass, and
check the content against the address (`content_problem`), or a forged NAR would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from mediabuilder.errors import FormatError
from mediabuilder.store.hashes import Hash
from mediabuilder.store.nar import READ_CHUNK, NarParser, Reader
from mediabuilder.store.storepath import StorePath, make_store_path


def expected_path(name: str, ca: str, references: tuple[StorePath, ...], self_path: StorePath) -> StorePath:
    """The store path that content address `ca` (narinfo form) and `references` give."""
    others = sorted(str(r) for r in references if r != self_path)
    has_self = self_path in references
    if ca.startswith("text:"):
        digest = Hash.parse(ca.removeprefix("text:"))
        return make_store_path("text" + "".join(f":{r}" for r in others), digest.digest, name)
    if not ca.startswith("fixed:"):
        raise FormatError(f"unknown content address {ca!r}")
    rest = ca.removeprefix("fixed:")
    recursive = rest.startswith("r:")
    digest = Hash.parse(rest.removeprefix("r:"))
    if recursive and digest.algo == "sha256":
        type_ = "source" + "".join(f":{r}" for r in others) + (":self" if has_self else "")
        return make_store_path(type_, digest.digest, name)
    if others or has_self:
        raise FormatError(f"fixed-output content address {ca!r} cannot have references")
    inner = hashlib.sha256(f"fixed:out:{'r:' if recursive else ''}{digest.algo}:{digest.hex()}:".encode())
    return make_store_path("output:out", inner.digest(), name)


def nar_hash_of_ca(ca: str) -> Hash | None:
    """For `fixed:r:sha256:` the NAR hash is the content address itself."""
    if ca.startswith("fixed:r:sha256:"):
        return Hash.parse(ca.removeprefix("fixed:r:"))
    return None


def content_problem(ca: str, nar: Reader, source: str = "NAR") -> str | None:
    """Why the NAR read from `nar` does not have the content address `ca`, or None.

    `fixed:r:<algo>:` hashes the NAR; `fixed:<algo>:` (flat) and `text:sha256:` hash the contents of
    the one non-executable regular file the NAR must then be. FormatError for an unknown address."""
    if ca.startswith("text:"):
        recursive, expected = False, Hash.parse(ca.removeprefix("text:"))
        if expected.algo != "sha256":
            raise FormatError(f"text content address {ca!r} is not sha256")
    elif ca.startswith("fixed:"):
        rest = ca.removeprefix("fixed:")
        recursive, expected = rest.startswith("r:"), Hash.parse(rest.removeprefix("r:"))
    else:
        raise FormatError(f"unknown content address {ca!r}")
    sha = hashlib.new(expected.algo)
    if recursive:
        while data := nar.read(READ_CHUNK):
            sha.update(data)
    else:
        sink = _FlatFile(sha.update)
        parser = NarParser(nar, source)
        try:
            parser.parse(sink)
            parser.finish()
        except FormatError as e:
            return str(e)
        if sink.problem is not None:
            return f"its content address {ca} is of one regular file, but the NAR {sink.problem}"
    if sha.digest() != expected.digest:
        return f"its contents do not have the content address {ca}"
    return None


class _FlatFile:
    """A NAR sink that passes the contents of a root regular file on, and notes anything else."""

    def __init__(self, update: Callable[[bytes], object]) -> None:
        self.update = update
        self.problem: str | None = None

    def directory(self, path: tuple[bytes, ...]) -> None:
        self.problem = self.problem or "is a directory"

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        self.problem = self.problem or "is a symlink"

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        if path:
            return _discard
        if executable:
            self.problem = "is an executable file"
        return self.update


def _discard(data: bytes) -> None:
    pass
