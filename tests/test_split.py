from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from mediabuilder.errors import InternalError
from mediabuilder.media.split import (
    FAT32_MAX_FILE,
    PART_SIZE,
    Part,
    join_parts,
    needs_split,
    part_names,
    split_file,
)


def test_constants() -> None:
    assert FAT32_MAX_FILE == 4294967295
    assert PART_SIZE == 4294965248


def test_part_names() -> None:
    assert part_names("x.nar.zst", 3) == ["x.nar.zst.part000", "x.nar.zst.part001", "x.nar.zst.part002"]
    with pytest.raises(InternalError):
        part_names("x", 0)


def test_needs_split() -> None:
    assert not needs_split(10, 10)
    assert needs_split(11, 10)


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2500])
def test_split_and_join(tmp_path: Path, size: int) -> None:
    data = bytes((i * 7 + i // 256) % 251 for i in range(size))
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    parts = split_file(src, out, 1000)
    count = max(1, -(-size // 1000))
    assert [p.name for p in parts] == part_names("f.bin", count)
    assert sum(p.size for p in parts) == size
    for p in parts:
        body = (out / p.name).read_bytes()
        assert p == Part(p.name, len(body), hashlib.sha256(body).hexdigest())
        assert p.size <= 1000
    assert sorted(x.name for x in out.iterdir()) == [p.name for p in parts]
    joined = io.BytesIO()
    assert join_parts([out / p.name for p in parts], joined) == size
    assert joined.getvalue() == data
