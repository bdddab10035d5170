"""Check that a content-addressed path's name really follows from its content.

Nix accepts a CA path without a signature because its store path is computed from its content
address; a verifier must therefore recompute the path, or a forged CA narinfo would pass.
"""

from __future__ import annotations

import hashlib

from mediabuilder.errors import FormatError
from mediabuilder.store.hashes import Hash
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
