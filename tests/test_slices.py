"""Parts written straight from the whole file (one pass): an image made from slices of a file is
byte for byte the image made from the same parts copied out, and independent readers (bsdtar,
xorriso, 7z, mtools, fsck.fat) give the parts back with the sizes and hashes `split_file` gives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from media_checks import fsck_fat, mtools_image, nontrivial_bytes

from mediabuilder.media import fatfs
from mediabuilder.media.fat32 import write_fat32
from mediabuilder.media.iso import write_iso
from mediabuilder.media.source import open_source
from mediabuilder.media.split import Part, Slice, slice_file, split_file
from mediabuilder.run import run

LIMIT = 300_000  # small parts of the same kind as PART_SIZE's, so the test is fast
SIZE = 2 * LIMIT + 12_345
EPOCH = 1_700_000_000


def skeleton(root: Path) -> Path:
    """A media-like tree (the manifest gives both trees the same identity); its NAR directory."""
    nar = root / "cache" / "nar"
    nar.mkdir(parents=True)
    (root / "manifest.json").write_text('{"same": "for both trees"}\n')
    (root / "cache" / "a.narinfo").write_text("StorePath: /nix/store/a\n")
    (nar / "small.nar").write_bytes(nontrivial_bytes(5000, seed=1))
    (nar / "zz.nar").write_bytes(nontrivial_bytes(7000, seed=2))
    return nar


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, list[Part], dict[Path, list[Slice]]]:
    """(the tree with the parts copied out, the tree with the whole file, the parts, the slices)."""
    data = nontrivial_bytes(SIZE, seed=3)
    copied = tmp_path / "copied"
    nar = skeleton(copied)
    whole = nar / "big.nar"
    whole.write_bytes(data)
    parts = split_file(whole, nar, LIMIT)
    whole.unlink()
    sliced = tmp_path / "sliced"
    nar = skeleton(sliced)
    (nar / "big.nar").write_bytes(data)
    got, slices = slice_file(nar / "big.nar", LIMIT)
    assert got == parts
    return copied, sliced, parts, {nar / "big.nar": slices}


def test_slice_file_gives_split_files_parts(tmp_path: Path) -> None:
    for size in (1, LIMIT - 1, LIMIT, LIMIT + 1, SIZE):
        data = nontrivial_bytes(size, seed=size)
        src = tmp_path / f"f{size}.bin"
        src.write_bytes(data)
        out = tmp_path / f"out{size}"
        out.mkdir()
        parts, slices = slice_file(src, LIMIT)
        assert parts == split_file(src, out, LIMIT)
        assert [(s.name, s.source, s.size) for s in slices] == [(p.name, src, p.size) for p in parts]
        assert [s.offset for s in slices] == [LIMIT * i for i in range(len(parts))]
        assert [hashlib.sha256(data[s.offset:s.offset + s.size]).hexdigest() for s in slices] == [
            p.sha256 for p in parts]


def extracted_parts(root: Path, parts: list[Part]) -> list[Part]:
    return [Part(p.name, (root / "cache" / "nar" / p.name).stat().st_size,
                 hashlib.sha256((root / "cache" / "nar" / p.name).read_bytes()).hexdigest()) for p in parts]


@pytest.mark.integration
def test_iso_from_slices(tmp_path: Path, trees: tuple[Path, Path, list[Part], dict[Path, list[Slice]]]) -> None:
    copied, sliced, parts, slices = trees
    reference, ours = tmp_path / "copied.iso", tmp_path / "sliced.iso"
    write_iso(copied, reference, label="SLICES", epoch=EPOCH)
    write_iso(sliced, ours, label="SLICES", epoch=EPOCH, slices=slices)
    assert ours.read_bytes() == reference.read_bytes()
    for tool, argv in (("bsdtar", ["bsdtar", "-xf", ours, "-C"]),
                       ("xorriso", ["xorriso", "-osirrox", "on", "-indev", ours, "-extract", "/", ]),
                       ("7z", ["7z", "x", "-y", ours])):
        out = tmp_path / tool
        out.mkdir()
        if tool == "7z":
            run([*argv, f"-o{out}"])
        else:
            run([*argv, out])
        assert extracted_parts(out, parts) == parts, tool
        assert not (out / "cache" / "nar" / "big.nar").exists()
        assert sorted(p.name for p in (out / "cache" / "nar").iterdir()) == sorted(
            ["small.nar", "zz.nar", *(p.name for p in parts)])
    listing = run(["isoinfo", "-R", "-l", "-i", ours]).stdout.decode()
    for part in parts:
        assert f" {part.size} " in listing and part.name in listing
    with open_source(ours) as source:
        assert {k: v for k, v in source.files() if ".part" in k} == {f"cache/nar/{p.name}": p.size for p in parts}


@pytest.mark.integration
@pytest.mark.parametrize(("table", "offset"), [("none", 0), ("gpt", 1024**2)])
def test_fat32_from_slices(tmp_path: Path, trees: tuple[Path, Path, list[Part], dict[Path, list[Slice]]],
                           table: str, offset: int) -> None:
    copied, sliced, parts, slices = trees
    reference, ours = tmp_path / "copied.img", tmp_path / "sliced.img"
    write_fat32(copied, reference, label="SLICES", partition_table=table, epoch=EPOCH)
    write_fat32(sliced, ours, label="SLICES", partition_table=table, epoch=EPOCH, slices=slices)
    assert ours.read_bytes() == reference.read_bytes()
    files, _, _ = fsck_fat(ours, offset, tmp_path)
    assert files == 6 + 3 + 1  # files (parts, not the whole), cache, nar and the root
    out = tmp_path / "mcopy"
    out.mkdir()
    image = mtools_image(ours, offset)
    run(["mcopy", "-s", "-n", "-i", image, "::/cache", "::/manifest.json", out])
    assert extracted_parts(out, parts) == parts
    assert sorted(p.name for p in (out / "cache" / "nar").iterdir()) == sorted(
        ["small.nar", "zz.nar", *(p.name for p in parts)])
    with open_source(ours) as source:
        assert {k: v for k, v in source.files() if ".part" in k} == {f"cache/nar/{p.name}": p.size for p in parts}
    if table == "none":  # pyfatfs, a reader independent of ours, opens a bare filesystem
        fs = fatfs.pyfatfs_class()(str(ours), read_only=True)
        try:
            # pyfatfs 1.1 ignores DIR_NTRes: names are compared case-insensitively (test_fat32)
            top = {e.name.lower(): e.name for e in fs.scandir("/")}["cache"]
            nar = f"/{top}/" + {e.name.lower(): e.name for e in fs.scandir(f"/{top}")}["nar"]
            names = {entry.name.lower(): entry.name for entry in fs.scandir(nar)}
            assert sorted(names) == sorted(["small.nar", "zz.nar", *(p.name for p in parts)])
            got = []
            for part in parts:
                data = fs.readbytes(f"{nar}/{names[part.name]}")
                got.append(Part(part.name, len(data), hashlib.sha256(data).hexdigest()))
            assert got == parts
        finally:
            fs.close()
