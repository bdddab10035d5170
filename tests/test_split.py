from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from mediabuilder.errors import InternalError
from mediabuilder.media.split import (
    FAT32_MAX_FILE,
    PART_SIZE,
    SINGLE_EXTENT_MAX,
    Part,
    join_parts,
    needs_split,
    part_names,
    split_file,
)


def test_constants() -> None:
    assert FAT32_MAX_FILE == 4294967295
    assert PART_SIZE == 4294901760  # 4 GiB - 64 KiB


def test_part_size_fits_every_reader() -> None:
    """Every FAT32 cluster size (512 B to 64 KiB) rounds a part up to less than 2^32 bytes, which
    fsck.fat 4.2 (32-bit sums) would read as 0 and truncate; a part is one ISO extent (whole
    2048-byte blocks, at most SINGLE_EXTENT_MAX)."""
    for shift in range(9, 17):
        cluster = 1 << shift
        assert -(-PART_SIZE // cluster) * cluster < 2**32, cluster
    assert PART_SIZE % 2048 == 0 and PART_SIZE <= SINGLE_EXTENT_MAX and PART_SIZE < FAT32_MAX_FILE
    # The size this replaces: exactly 2^32 bytes of 4 KiB clusters.
    assert -(-(4 * 1024**3 - 2048) // 4096) * 4096 == 2**32


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
