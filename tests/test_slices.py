"""Parts written straight from the whole file (one pass): an image made from slices of a file is
byte for byte the image made from the same parts copied out, and independent readers (bsdtar,
xorriso, 7z, mtools, fsck.fat) give the parts back with the sizes and hashes `split_file` gives.
A NAR's parts hashed as the cache wrote it (`PartHashes`, the cache's record) are those parts."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from media_checks import fsck_fat, mtools_image, nontrivial_bytes

from mediabuilder.cache import writer
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.errors import InternalError
from mediabuilder.media import fatfs
from mediabuilder.media.fat32 import write_fat32
from mediabuilder.media.iso import write_iso
from mediabuilder.media.source import open_source
from mediabuilder.media.split import Part, PartHashes, Slice, slice_file, slices_of, split_file
from mediabuilder.run import run
from mediabuilder.store import nar
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.pathinfo import PathInfo
from mediabuilder.store.storepath import StorePath

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


def test_part_hashes_while_writing_give_slice_files_parts(tmp_path: Path) -> None:
    rng = random.Random(16)
    for size in (0, 1, LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT, 2 * LIMIT + 1, SIZE):
        data = nontrivial_bytes(size, seed=size)
        src = tmp_path / f"f{size}.bin"
        src.write_bytes(data)
        hashes = PartHashes(LIMIT)
        done = 0
        while done < size:  # writes of any size, across part boundaries
            n = rng.choice((1, 4096, LIMIT - 1, LIMIT, 3 * LIMIT))
            hashes.update(data[done:done + n])
            done += n
        assert hashes.size == size
        assert hashes.whole.hexdigest() == hashlib.sha256(data).hexdigest()
        if size == 0:
            assert hashes.parts() == [(0, hashlib.sha256(b"").hexdigest())]
            continue
        parts, slices = slice_file(src, LIMIT)
        assert hashes.parts() == [(p.size, p.sha256) for p in parts]
        assert slices_of(src, LIMIT, hashes.parts()) == (parts, slices)


def test_slices_of_refuses_parts_of_another_file(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(nontrivial_bytes(SIZE, seed=1))
    parts, _ = slice_file(src, LIMIT)
    hashed = [(p.size, p.sha256) for p in parts]
    for wrong in (hashed[:-1], [*hashed, (1, "0" * 64)], [(LIMIT - 1, hashed[0][1]), *hashed[1:]]):
        with pytest.raises(InternalError, match="recorded parts"):
            slices_of(src, LIMIT, wrong)
    with pytest.raises(InternalError, match="recorded parts"):
        slices_of(src, LIMIT + 1, hashed)


def exported_nar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> tuple[BinaryCache, str, Path]:
    """A tree holding one file of `size` bytes exported into a cache uncompressed, with parts of
    LIMIT (as PART_SIZE): (the cache, the NAR's URL, the NAR file)."""
    monkeypatch.setattr(writer, "PART_SIZE", LIMIT)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(nontrivial_bytes(size, seed=7))
    digest, nar_size = hashlib.sha256(), 0

    def sink(chunk: bytes) -> None:
        nonlocal nar_size
        digest.update(chunk)
        nar_size += len(chunk)

    nar.dump(tree, sink)
    path = StorePath.parse("/nix/store/" + "a" * 32 + "-parts-test")
    cache = BinaryCache(tmp_path / "cache")
    info = writer.export_tree(cache, tree, PathInfo(path, Hash("sha256", digest.digest()), nar_size, ()),
                              SecretKey.generate("test-1"), "none")
    return cache, info.url, cache.file_path(info.url)


def test_cache_records_a_big_nars_parts_as_it_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, url, nar_file = exported_nar(tmp_path, monkeypatch, SIZE)
    parts, _ = slice_file(nar_file, LIMIT)
    assert len(parts) == 3
    assert cache.read_parts(url, LIMIT) == [(p.size, p.sha256) for p in parts]
    assert sorted(os.listdir(cache.root / "parts")) == [f"{nar_file.name}.json"]
    assert cache.read_parts(url, LIMIT + 2048) is None  # another part size: hashed again
    os.utime(nar_file, ns=(0, 0))  # the file changed (or was copied) since: hashed again
    assert cache.read_parts(url, LIMIT) is None


def test_cache_records_no_parts_for_a_nar_that_fits_a_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, url, _ = exported_nar(tmp_path, monkeypatch, LIMIT // 2)
    assert cache.read_parts(url, LIMIT) is None
    assert not (cache.root / "parts").exists()


def test_a_damaged_parts_record_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, url, _ = exported_nar(tmp_path, monkeypatch, SIZE)
    record = cache.parts_path(url)
    good = record.read_text()
    for bad in ("", "{", "[]", good.replace('"parts": [[', '"parts": [["x", 1], ['), good.replace(str(LIMIT), "1"),
                good.replace('"size": ', '"size": 1'), good.replace('"parts": [[', '"parts": [[1, "00"], [')):
        record.write_text(bad)
        assert cache.read_parts(url, LIMIT) is None, bad


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
