"""Unsigned content-addressed paths in a cache: trusted only when the NAR's content has the
content address. A forged one (the CA and store path of one content, the NAR, NarHash and
NarSize of another) is a fault, for `text:` and flat and recursive `fixed:` addresses."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import pytest

from mediabuilder.cache.verify import verify_cache
from mediabuilder.store import nar
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath, make_fixed_output_path, make_text_path

HONEST, FORGED = b"the content the address names\n", b"what a forger would have installed\n"


def nar_of(tmp_path: Path, content: bytes) -> bytes:
    """The NAR of one regular file holding `content`."""
    source = tmp_path / "nar-source"
    source.write_bytes(content)
    out = io.BytesIO()
    nar.dump(source, out.write)
    source.unlink()
    return out.getvalue()


def address(kind: str, tmp_path: Path, content: bytes) -> tuple[str, StorePath]:
    """The content address of `content` (narinfo form) and the store path it gives."""
    if kind == "text":
        digest = Hash("sha256", hashlib.sha256(content).digest())
        return f"text:{digest.nix32()}", make_text_path(content, "greeting")
    if kind == "flat":
        digest = Hash("sha256", hashlib.sha256(content).digest())
        return f"fixed:{digest.nix32()}", make_fixed_output_path(False, digest, "greeting")
    digest = Hash("sha512", hashlib.sha512(nar_of(tmp_path, content)).digest())  # sha256 is the NarHash itself
    return f"fixed:r:{digest.nix32()}", make_fixed_output_path(True, digest, "greeting")


def make_cache(tmp_path: Path, ca: str, path: StorePath, content: bytes) -> Path:
    """A cache holding one unsigned narinfo: `ca` and `path`, and the NAR of `content`."""
    root = tmp_path / "cache"
    for sub in ("nar", "log", "realisations"):
        (root / sub).mkdir(parents=True)
    (root / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
    data = nar_of(tmp_path, content)
    sha = Hash("sha256", hashlib.sha256(data).digest())
    url = f"nar/{sha.nix32().removeprefix('sha256:')}.nar"
    (root / url).write_bytes(data)
    info = NarInfo(store_path=path, url=url, compression="none", file_hash=sha.nix32(), file_size=len(data),
                   nar_hash=sha.nix32(), nar_size=len(data), ca=ca)
    (root / f"{path.hash_part}.narinfo").write_text(info.render())
    return root


@pytest.mark.parametrize("kind", ["text", "flat", "recursive"])
def test_forged_ca_path_is_a_fault(tmp_path: Path, kind: str) -> None:
    ca, path = address(kind, tmp_path, HONEST)
    report = verify_cache(make_cache(tmp_path, ca, path, FORGED), [SecretKey.generate("k").public()], jobs=1)
    assert [(f.path, f.fault) for f in report.faults] == [
        (str(path), f"unsigned, and its contents do not have the content address {ca} (a forged "
                    "content-addressed path)")
    ]


@pytest.mark.parametrize("kind", ["text", "flat", "recursive"])
def test_genuine_ca_path_is_ok(tmp_path: Path, kind: str) -> None:
    ca, path = address(kind, tmp_path, HONEST)
    report = verify_cache(make_cache(tmp_path, ca, path, HONEST), [SecretKey.generate("k").public()], jobs=1)
    assert report.faults == [] and report.paths == 1


def test_flat_ca_of_a_directory_is_a_fault(tmp_path: Path) -> None:
    ca, path = address("flat", tmp_path, HONEST)
    root = make_cache(tmp_path, ca, path, HONEST)
    # The same narinfo, but its NAR is of a directory: a flat address names one regular file.
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(HONEST)
    out = io.BytesIO()
    nar.dump(tmp_path / "tree", out.write)
    data = out.getvalue()
    sha = Hash("sha256", hashlib.sha256(data).digest())
    narinfo = root / f"{path.hash_part}.narinfo"
    info = NarInfo.parse(narinfo.read_text())
    (root / info.url).write_bytes(data)
    narinfo.write_text(NarInfo(store_path=path, url=info.url, compression="none", file_hash=sha.nix32(),
                               file_size=len(data), nar_hash=sha.nix32(), nar_size=len(data), ca=ca).render())
    report = verify_cache(root, [], jobs=1)
    assert [f.fault for f in report.faults] == [
        f"unsigned, and its content address {ca} is of one regular file, but the NAR is a directory "
        "(a forged content-addressed path)"
    ]


def _signed(root: Path, path: StorePath, key: SecretKey, **changes: object) -> None:
    """The cache's narinfo of `path`, changed and signed by `key` (the CA is not signed)."""
    narinfo = root / f"{path.hash_part}.narinfo"
    info = replace(NarInfo.parse(narinfo.read_text()), **changes)
    narinfo.write_text(info.with_sigs((key.sign(info.fingerprint()),)).render())


@pytest.mark.parametrize("kind", ["text", "flat", "recursive"])
def test_signed_path_with_a_forged_ca_line_is_a_fault(tmp_path: Path, kind: str) -> None:
    """The signature does not cover CA: a signed narinfo whose CA was altered is refused (Nix would
    register the CA), its genuine CA passes."""
    key = SecretKey.generate("k")
    ca, path = address(kind, tmp_path, HONEST)
    root = make_cache(tmp_path, ca, path, HONEST)
    _signed(root, path, key)
    assert verify_cache(root, [key.public()], jobs=1).ok
    other, _ = address(kind, tmp_path, FORGED)
    _signed(root, path, key, ca=other)
    report = verify_cache(root, [key.public()], jobs=1)
    assert [(f.path, f.fault) for f in report.faults] == [
        (str(path), f"content address {other} does not give this store path (an unsigned CA line, forged)")
    ]
