"""NAR: byte-exact with `nix-store --dump`, and a strict reader."""

from __future__ import annotations

import io
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import path_info

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store import nar
from mediabuilder.store.hashes import Hash


def nix_env() -> dict[str, str]:
    return {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nbuild-users-group =\n"
        "sandbox = false\nsubstituters =\nflake-registry =",
    }


def s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def tokens(*parts: bytes) -> bytes:
    return b"".join(s(p) for p in parts)


def regular(contents: bytes, executable: bool = False) -> bytes:
    exe = tokens(b"executable", b"") if executable else b""
    return tokens(b"(", b"type", b"regular") + exe + tokens(b"contents", contents, b")")


def symlink(target: bytes) -> bytes:
    return tokens(b"(", b"type", b"symlink", b"target", target, b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(tokens(b"entry", b"(", b"name", name, b"node") + node + s(b")") for name, node in entries)
    return tokens(b"(", b"type", b"directory") + body + s(b")")


def archive(node: bytes) -> bytes:
    return s(b"nix-archive-1") + node


def dump_bytes(path: Path) -> bytes:
    out = bytearray()
    nar.dump(path, out.extend)
    return bytes(out)


# --- writer ---------------------------------------------------------------------------------------


def test_dump_known_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hi\n")
    data = dump_bytes(tmp_path / "f")
    assert data == archive(regular(b"hi\n"))
    assert len(data) == 120
    # Nix 2.8: `nix-store --add f` records narHash sha256:1xmr8jic... for this file.
    assert Hash.sha256(data).nix32() == "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    assert nar.nar_hash_and_size(tmp_path / "f") == (Hash.sha256(data), 120)


def test_dump_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "b").write_bytes(b"")
    (root / "B").write_bytes(b"12345678")
    (root / "x").write_bytes(b"#!/bin/sh\n")
    (root / "x").chmod(0o744)
    (root / "g").write_bytes(b"group-exec only")
    (root / "g").chmod(0o654)
    (root / "d" / "l").symlink_to("../nowhere")
    expected = archive(
        directory(
            (b"B", regular(b"12345678")),
            (b"b", regular(b"")),
            (b"d", directory((b"l", symlink(b"../nowhere")))),
            (b"g", regular(b"group-exec only")),
            (b"x", regular(b"#!/bin/sh\n", executable=True)),
        )
    )
    assert dump_bytes(root) == expected


def test_dump_batches_writes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for i in range(2000):
        (root / f"f{i:04}").write_bytes(b"x" * 100)
    (root / "big").write_bytes(b"y" * (3 * nar.READ_CHUNK + 5))
    chunks: list[int] = []
    out = bytearray()

    def write(data: bytes) -> None:
        chunks.append(len(data))
        out.extend(data)

    nar.dump(root, write)
    assert max(chunks) <= nar.READ_CHUNK + nar.WRITE_BATCH
    assert len(chunks) < 20
    assert nar.validate(io.BytesIO(out)) == len(out)


def test_dump_rejects_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidInput, match="cannot put this kind of file"):
        dump_bytes(tmp_path)


# --- reader ---------------------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A stream that returns at most 3 bytes per read, to exercise short reads."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 3) if n >= 0 else 3)


def test_restore_round_trip(tmp_path: Path) -> None:
    data = archive(
        directory(
            (b"a", regular(b"abc" * 1000, executable=True)),
            (b"e", directory()),
            (b"l", symlink(b"/nix/store/dangling")),
            (b"z", regular(b"")),
        )
    )
    nar.restore(Trickle(data), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "a").read_bytes() == b"abc" * 1000
    assert os.stat(out / "a").st_mode & 0o777 == 0o755
    assert os.stat(out / "z").st_mode & 0o777 == 0o644
    assert os.readlink(out / "l") == "/nix/store/dangling"
    assert list((out / "e").iterdir()) == []
    assert dump_bytes(out) == data
    assert nar.validate(Trickle(data)) == len(data)


def test_restore_single_file_and_symlink(tmp_path: Path) -> None:
    nar.restore(io.BytesIO(archive(regular(b"x"))), tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"x"
    nar.restore(io.BytesIO(archive(symlink(b"f"))), tmp_path / "l")
    assert os.readlink(tmp_path / "l") == "f"


def test_restore_refuses_existing_destination(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="already exists"):
        nar.restore(io.BytesIO(archive(regular(b""))), tmp_path)


def _pad_corrupt(data: bytes) -> bytes:
    # The 3-byte contents "abc" is followed by 5 bytes of padding; make one non-zero.
    i = data.index(b"abc") + 3
    return data[:i] + b"\1" + data[i + 1 :]


BAD: list[tuple[str, Callable[[], bytes], str]] = [
    ("magic", lambda: s(b"nix-archive-2") + regular(b""), "bad magic"),
    ("empty", lambda: b"", "truncated"),
    ("truncated", lambda: archive(regular(b"abcdef"))[:-12], "truncated"),
    ("padding", lambda: _pad_corrupt(archive(regular(b"abc"))), "non-zero padding"),
    ("trailing", lambda: archive(regular(b"")) + b"\0" * 8, "trailing data"),
    ("type", lambda: archive(tokens(b"(", b"type", b"fifo", b")")), "unknown node type"),
    ("open", lambda: archive(tokens(b"[", b"type", b"regular", b"contents", b"", b")")), "expected '\\('"),
    ("exec value", lambda: archive(tokens(b"(", b"type", b"regular", b"executable", b"1", b"contents", b"",
                                          b")")), "non-empty value"),
    ("exec after contents", lambda: archive(tokens(b"(", b"type", b"regular", b"contents", b"", b"executable",
                                                   b"", b")")), "expected '\\)'"),
    ("unsorted", lambda: archive(directory((b"b", regular(b"")), (b"a", regular(b"")))), "not sorted"),
    ("duplicate", lambda: archive(directory((b"a", regular(b"")), (b"a", regular(b"")))), "duplicate"),
    ("byte order", lambda: archive(directory((b"a", regular(b"")), (b"B", regular(b"")))), "not sorted"),
    ("slash", lambda: archive(directory((b"a/b", regular(b"")),)), "invalid entry name"),
    ("dotdot", lambda: archive(directory((b"..", regular(b"")),)), "invalid entry name"),
    ("dot", lambda: archive(directory((b".", regular(b"")),)), "invalid entry name"),
    ("empty name", lambda: archive(directory((b"", regular(b"")),)), "invalid entry name"),
    ("nul name", lambda: archive(directory((b"a\0", regular(b"")),)), "invalid entry name"),
    ("empty target", lambda: archive(symlink(b"")), "invalid symlink target"),
    ("huge token", lambda: s(b"nix-archive-1") + struct.pack("<Q", 1 << 40), "more than 4096"),
    ("dir junk", lambda: archive(tokens(b"(", b"type", b"directory", b"entries", b")")), "expected 'entry'"),
]


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validate_errors(make: Callable[[], bytes], message: str, tmp_path: Path) -> None:
    data = make()
    with pytest.raises(FormatError, match=message) as info:
        nar.validate(io.BytesIO(data), "nar/x.nar")
    assert str(info.value).startswith("nar/x.nar: ")
    with pytest.raises(FormatError, match=message):
        nar.restore(io.BytesIO(data), tmp_path / "out")


# --- against Nix ----------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "deep" / "er" / "est").mkdir(parents=True)
    (root / "deep" / "er" / "est" / "leaf").write_bytes(b"leaf\n")
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    for name in ("B", "a", "a-b", "a.b", "a_b", "Z", "_", "\u00e9t\u00e9"):
        (root / name).write_text(name * 7)
    (root / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run").chmod(0o755)
    (root / "abs-link").symlink_to("/nix/store/does-not-exist")
    (root / "rel-link").symlink_to("deep/er/est/leaf")
    (root / "dangling").symlink_to("nothing-here")
    (root / "dir-link").symlink_to("deep")
    (root / "big").write_bytes(os.urandom(5 * 1000 * 1000 + 3))


def nix_dump(path: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], env=nix_env(), check=True,
                          capture_output=True).stdout


@pytest.mark.integration
def test_dump_matches_nix(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    ours = dump_bytes(root)
    assert ours == nix_dump(root)
    assert nar.validate(io.BytesIO(ours)) == len(ours)

    nar.restore(io.BytesIO(ours), tmp_path / "restored")
    assert dump_bytes(tmp_path / "restored") == ours
    assert nix_dump(tmp_path / "restored") == ours

    nar_hash, nar_size = nar.nar_hash_and_size(root)
    assert (nar_hash, nar_size) == (Hash.sha256(ours), len(ours))
    added = subprocess.run(["nix-store", "--add", str(root)], env=nix_env(), check=True,
                           capture_output=True, text=True).stdout.strip()
    info = path_info(added)
    assert info["narHash"] == nar_hash.sri()
    assert info["narSize"] == nar_size
    assert Hash.parse(info["narHash"]) == nar_hash


@pytest.mark.integration
def test_restore_of_nix_restore_input(tmp_path: Path) -> None:
    """What we restore, Nix restores identically (`nix-store --restore`)."""
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    data = nix_dump(root)
    subprocess.run(["nix-store", "--restore", str(tmp_path / "by-nix")], input=data, env=nix_env(),
                   check=True, capture_output=True)
    nar.restore(io.BytesIO(data), tmp_path / "by-us")
    assert dump_bytes(tmp_path / "by-nix") == dump_bytes(tmp_path / "by-us") == data
