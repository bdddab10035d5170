from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media_checks import (
    check_source,
    check_tree,
    expected_tree,
    fsck_fat,
    make_tree,
    mtools_image,
    tree_dirs,
    write_big_file,
)

from mediabuilder.errors import InternalError, InvalidInput, InvalidMedia
from mediabuilder.media import fatfs
from mediabuilder.media.fat32 import (
    MIB,
    MIN_CLUSTERS,
    Content,
    Geometry,
    auto_geometry,
    check_size,
    fat_label,
    image_geometry,
    minimum_geometry,
    scan,
    size_range,
    write_fat32,
)
from mediabuilder.media.iso import ISO_MAX_FILE, write_iso
from mediabuilder.media.label import DEFAULT_LABEL
from mediabuilder.media.source import detect, open_source
from mediabuilder.media.split import FAT32_MAX_FILE, FAT32_SAFE_FILE, PART_SIZE, slice_file
from mediabuilder.run import run, stream

Tree = tuple[Path, dict[str, tuple[int, str]], set[str]]


def test_fat_label() -> None:
    assert fat_label("nixos-media") == "NIXOS-MEDIA"
    assert fat_label(DEFAULT_LABEL) == DEFAULT_LABEL == "NIXOS_MEDIA"
    assert fat_label("a!#$%&'()-@") == "A!#$%&'()-@"
    for bad in ("nixos_offline", "", "no dots.", "a b", "é", "x/y"):
        with pytest.raises(InvalidInput) as caught:
            fat_label(bad)
        assert str(caught.value) == (
            f"--label/media.label: {bad!r} is not a valid FAT32 volume label: use 1 to 11 characters "
            "A-Z, 0-9 and ! # $ % & ' ( ) - @ ^ _ ` { } ~ (lower case is upper-cased)"
        )


def test_size_range() -> None:
    """Sizes the writer cannot make are refused before any work: below the smallest FAT32 of
    MIN_CLUSTERS clusters (with its table), above 2^32 - 1 sectors (2 TiB - 1 MiB in all)."""
    assert size_range("none") == (33 * MIB, 2 * 1024**4 - MIB)
    assert size_range("mbr") == (34 * MIB, 2 * 1024**4 - MIB)
    assert size_range("gpt") == (35 * MIB, 2 * 1024**4 - MIB)
    for table in ("none", "mbr", "gpt"):
        least, most = size_range(table)
        check_size(least, table)
        check_size(most, table)
        image, geometry = image_geometry(Content((), (32,)), most, table)
        assert image == most and geometry.sectors < 2**32 and geometry.cluster == 32768
        image, geometry = image_geometry(Content((), (32,)), least, table)
        assert image == least and geometry.clusters >= MIN_CLUSTERS
    fatfs.boot_sector(sectors=(2 * 1024**4 - MIB) // 512, sectors_per_cluster=64, reserved=32, fats=2,
                      fat_sectors=16384, hidden=0, volume_id=0, label=b"X".ljust(11))
    table_note = {"none": "", "mbr": " with a mbr partition table", "gpt": " with a gpt partition table"}
    for size, table, text in ((0, "none", "0"), (33 * MIB - 1, "none", str(33 * MIB - 1)), (MIB, "gpt", "1M")):
        least = size_range(table)[0]
        with pytest.raises(InvalidInput) as caught:
            check_size(size, table)
        assert str(caught.value) == (f"--size {text} is too small: a FAT32 image{table_note[table]} is at least "
                                     f"{least // MIB} MiB ({least} bytes)")
    for size, text in ((3 * 1024**4, "3T"), (2 * 1024**4 - MIB + 1, str(2 * 1024**4 - MIB + 1))):
        for call in (lambda s=size: check_size(s), lambda s=size: image_geometry(Content((), (32,)), s, "none")):
            with pytest.raises(InvalidInput) as caught:
                call()
            assert str(caught.value) == (f"--size {text} is too big: a FAT32 image is at most 2097151 MiB "
                                         "(2 TiB - 1 MiB, 2199022206976 bytes)")


def test_geometry() -> None:
    tiny = Content((1,), (64,))
    small = minimum_geometry(tiny)
    assert small.cluster == 512
    assert small.clusters >= MIN_CLUSTERS
    assert small.sectors * 512 == 33 * MIB
    auto = auto_geometry(tiny)
    assert (auto.cluster, auto.sectors * 512) == (512, 66 * MIB)
    big = auto_geometry(Content((FAT32_MAX_FILE,) * 3, (4096,)))
    assert (big.cluster, big.sectors) == (8192, 27842560)
    assert big.clusters >= Content((FAT32_MAX_FILE,) * 3, (4096,)).clusters(8192)
    assert Geometry(33 * MIB // 512, 512).clusters >= MIN_CLUSTERS


def test_least_size_is_enough() -> None:
    """The size the "too small" message asks for holds the content, with and without a table."""
    example = Content((34045952,), (64,))  # a FAT sized from the sectors left it 8 clusters short
    with pytest.raises(InvalidInput, match=r"needs at least 34 MiB$"):
        image_geometry(example, 33 * MIB, "none")
    assert image_geometry(example, 34 * MIB, "none")[1].clusters >= example.clusters(512)
    for size in range(30 * MIB, 300 * MIB, 1_300_001):
        content = Content((size,), (64,))
        for table in ("none", "mbr", "gpt"):
            try:
                image_geometry(content, 16 * MIB, table)
            except InvalidInput as e:
                least = int(str(e).rsplit(" ", 2)[-2]) * MIB
            image, geometry = image_geometry(content, least, table)
            assert image == least and geometry.clusters >= content.clusters(geometry.cluster), (size, table)


def test_size_too_small() -> None:
    content = Content((100 * MIB,), (64,))
    with pytest.raises(InvalidInput, match=r"^--size 10M is too small: the content needs at least 102 MiB$"):
        image_geometry(content, 10 * MIB, "none")
    with pytest.raises(InvalidInput, match=r"needs at least 104 MiB$"):
        image_geometry(content, 100 * MIB, "gpt")
    assert image_geometry(content, 200 * MIB, "mbr")[0] == 200 * MIB


def test_size_too_small_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    make_tree(root)
    with pytest.raises(InvalidInput, match="--size 10M is too small"):
        write_fat32(root, tmp_path / "x.img", label="X", size=10 * MIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


@pytest.mark.parametrize("size", [FAT32_MAX_FILE + 1, FAT32_SAFE_FILE + 1])
def test_refuses_unsplit_big_file(tmp_path: Path, size: int) -> None:
    """Also a file FAT32 holds but whose clusters could sum to 2^32 bytes (fsck.fat empties it)."""
    root = tmp_path / "tree"
    root.mkdir()
    with (root / "huge").open("wb") as f:
        f.truncate(size)
    with pytest.raises(InternalError, match="must split it"):
        write_fat32(root, tmp_path / "x.img", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_refuses_case_clash(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("1")
    (root / "A.TXT").write_text("2")
    with pytest.raises(InternalError, match="ignore case"):
        write_fat32(root, tmp_path / "x.img", label="X")


def test_refuses_name_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    with open(os.fsencode(root) + b"/bad\xff.txt", "wb"):
        pass
    with pytest.raises(InternalError, match=r"bad\\udcff.txt'\): the name is not UTF-8"):
        write_fat32(root, tmp_path / "x.img", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "tree"
    expected, dirs = make_tree(root)
    return root, expected, dirs


@pytest.mark.integration
@pytest.mark.parametrize(("table", "offset"), [("none", 0), ("mbr", MIB), ("gpt", MIB)])
def test_write_and_read_back(tmp_path: Path, tree: Tree, table: str, offset: int) -> None:
    root, expected, dirs = tree
    image = tmp_path / "media.img"
    write_fat32(root, image, label="nixos_test", partition_table=table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["media.img", "tree"]
    assert detect(image) == ("fat32", offset)
    assert image.stat().st_size == {"none": 69, "mbr": 70, "gpt": 71}[table] * MIB
    if table != "none":
        layout = run(["sfdisk", "--dump", image]).stdout.decode()
        assert "start=        2048" in layout
        assert ("type=c" if table == "mbr" else "type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7") in layout

    with open_source(image) as source:
        assert source.kind == "fat32"
        check_source(source, expected, dirs)
        free = source.free_bytes

    mcopy_out = tmp_path / "mcopy"
    mcopy_out.mkdir()
    entries = run(["mdir", "-b", "-i", mtools_image(image, offset), "::/"]).stdout.decode().split()
    run(["mcopy", "-s", "-n", "-i", mtools_image(image, offset), *entries, mcopy_out])
    check_tree(mcopy_out, expected, dirs)

    files, used, clusters = fsck_fat(image, offset, tmp_path)
    assert files == len(expected) + len(dirs) + 1  # fsck.fat counts the root too
    geometry = image_geometry(scan(root).content, None, table)[1]
    assert (used, clusters) == (scan(root).content.clusters(512), geometry.clusters)
    assert free == (clusters - used) * 512
    fs = tmp_path / "fs.img"
    run(["dd", f"if={image}", f"of={fs}", "bs=1M", f"skip={offset // MIB}", "status=none"])
    label = run(["fatlabel", fs]).stdout.decode().strip()
    assert label == "NIXOS_TEST"


AWKWARD_NAMES = [
    "UPPER.TXT", "lower.txt", "Mixed.txt", "nix-cache-info", ".hidden", "a b.c d", "abc~1.txt",
    "abcdefghij.txt", "abcdefghijk.txt", "ünïcödé näme.txt", "日本語のファイル名.txt", "emoji-😀.txt",
    "exactly-13-ch", "exactly-26-characters-long", "n" * 200 + ".narinfo", "Foo.txt", "Foo~1.txt",
]


def awkward_tree(root: Path) -> None:
    """Names that need long entries, generated short names and their collisions; a directory of
    3,000 names with one basis (spanning many clusters); files of 0, 1 cluster and 1 cluster +
    1 byte; empty directories, nested."""
    (root / "many").mkdir(parents=True)
    (root / "a" / "b" / "c" / "d").mkdir(parents=True)
    (root / "a" / "empty").mkdir()
    for i, name in enumerate(AWKWARD_NAMES):
        (root / name).write_bytes(name.encode() * (i + 1))
        (root / "a" / "b" / name).write_bytes(b"")
    for i in range(3000):
        (root / "many" / f"archive.part{i:04}").write_bytes(i.to_bytes(2, "little") * (i % 7))
    (root / "one-cluster").write_bytes(bytes(range(256)) * 2)
    (root / "one-cluster-and-a-byte").write_bytes(bytes(range(256)) * 2 + b"!")
    old = time.mktime((2001, 9, 9, 3, 46, 40, 0, 0, -1))
    os.utime(root / "UPPER.TXT", (old, old))


@pytest.mark.integration
def test_awkward_names_read_back(tmp_path: Path) -> None:
    """Every name, byte and directory comes back through fsck.fat, mcopy (names, bytes and
    modification times to FAT's two seconds), 7z and pyfatfs."""
    root = tmp_path / "tree"
    awkward_tree(root)
    expected, dirs = expected_tree(root), tree_dirs(root)
    image = tmp_path / "media.img"
    write_fat32(root, image, label="AWKWARD")

    files, used, _ = fsck_fat(image, 0, tmp_path)
    assert files == len(expected) + len(dirs) + 1  # fsck.fat counts the root too
    assert used == scan(root).content.clusters(512)

    mcopy_out = tmp_path / "mcopy"
    mcopy_out.mkdir()
    run(["mcopy", "-s", "-n", "-m", "-i", image, "::/*", "::/.hidden", mcopy_out])
    # mtools 4.0.32 shows each half of a UTF-16 surrogate pair (a character outside the BMP) as
    # "_"; 7z and pyfatfs below read those names whole.
    as_mtools = {rel: "".join("__" if ord(c) > 0xFFFF else c for c in rel) for rel in expected}
    check_tree(mcopy_out, {as_mtools[rel]: v for rel, v in expected.items()}, dirs)
    for rel in expected:
        theirs, ours = (mcopy_out / as_mtools[rel]).stat().st_mtime, (root / rel).stat().st_mtime
        assert ours - 2 < theirs <= ours, rel
    assert (mcopy_out / "UPPER.TXT").stat().st_mtime == time.mktime((2001, 9, 9, 3, 46, 40, 0, 0, -1))

    # Looked up by name (long or short, in any case), each finds itself, not a sibling.
    for name in ("Foo.txt", "Foo~1.txt", "FOO~1.TXT", "abc~1.txt", "ABCDEF~1.TXT"):
        want = (root / ("Foo~1.txt" if name == "FOO~1.TXT" else "abcdefghij.txt" if name == "ABCDEF~1.TXT"
                        else name)).read_bytes()
        assert run(["mtype", "-i", image, f"::/{name}"]).stdout == want, name

    sevenzip_out = tmp_path / "7z"
    run(["7z", "x", "-y", f"-o{sevenzip_out}", image])
    check_tree(sevenzip_out, expected, dirs)

    with open_source(image) as source:
        check_source(source, expected, dirs)

    # pyfatfs, a reader independent of ours: every name and byte outside the directory of 3,000
    # (pyfatfs takes minutes over that one). pyfatfs 1.1 ignores DIR_NTRes,
    # so 8.3 names come back upper case: they are compared case-insensitively.
    fs = fatfs.pyfatfs_class()(str(image), read_only=True)
    try:
        names: dict[str, str] = {}
        todo = ["/"]
        while todo:
            directory = todo.pop()
            for entry in fs.scandir(directory):
                path = f"{directory.rstrip('/')}/{entry.name}"
                if not entry.is_dir:
                    names[path.lower()] = path
                elif path.lower() != "/many":  # pyfatfs names it MANY
                    todo.append(path)
        outside = {rel: v for rel, v in expected.items() if not rel.startswith("many/")}
        assert set(names) == {f"/{rel}".lower() for rel in outside}
        for rel, (size, digest) in outside.items():
            data = fs.readbytes(names[f"/{rel}".lower()])
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), rel
    finally:
        fs.close()


def test_refuses_directory_too_big_for_fat32(tmp_path: Path) -> None:
    """11,000 names of 60 characters take 6 entries each, plus "." and "..": more than FAT32 allows."""
    nar = tmp_path / "tree" / "cache" / "nar"
    nar.mkdir(parents=True)
    for i in range(11_000):
        (nar / f"{i:052}.nar.zst").touch()
    with pytest.raises(InvalidInput, match=r"nar: 11000 names take 66002 directory entries, and a FAT32 "
                       r"directory holds at most 65536$"):
        write_fat32(tmp_path / "tree", tmp_path / "x.img", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_broken_cluster_chain_is_damaged_media(tmp_path: Path) -> None:
    """A file whose chain ends early in the FAT (both copies) is refused, not read short."""
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f.bin").write_bytes(bytes(range(250)) * 8)  # 2,000 bytes: clusters 3-6 (root: 2)
    image = tmp_path / "media.img"
    write_fat32(root, image, label="X")
    geometry = image_geometry(scan(root).content, None, "none")[1]
    assert fsck_fat(image, 0, tmp_path)[:2] == (2, 1 + 4)  # the file and the root; their clusters
    with image.open("r+b") as f:
        for copy in range(2):
            f.seek((32 + copy * geometry.fat_sectors) * 512 + 4 * 4)  # FAT[4]: the second cluster's
            f.write(bytes(4))
    fsck = subprocess.run(["fsck.fat", "-n", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 1 and fsck.stdout.splitlines()[1:6] == [  # fsck.fat sees the damage too
        "/F.BIN", "  Contains a free cluster (4). Assuming EOF.",
        "/F.BIN", "  File size is 2000 bytes, cluster chain length is 512 bytes.", "  Truncating file to 512 bytes.",
    ], fsck.stdout
    with pytest.raises(InvalidMedia, match=r"media.img: damaged FAT32 image: the cluster chain of f.bin "
                       r"ends before its 2000 bytes$"):
        open_source(image)  # every chain is walked when the image is opened


@pytest.mark.integration
def test_given_size(tmp_path: Path, tree: Tree) -> None:
    root, expected, dirs = tree
    image = tmp_path / "media.img"
    write_fat32(root, image, label="X", size=40 * MIB, partition_table="mbr")
    assert image.stat().st_size == 40 * MIB
    with open_source(image) as source:
        check_source(source, expected, dirs)
        free = source.free_bytes
    files, used, clusters = fsck_fat(image, MIB, tmp_path)
    assert files == len(expected) + len(dirs) + 1
    assert clusters == Geometry(39 * MIB // 512, 512).clusters  # the partition: all but the first MiB
    assert free == (clusters - used) * 512


@pytest.mark.integration
def test_no_space_left(tmp_path: Path, tree: Tree) -> None:
    root, _, _ = tree
    full = tmp_path / "full"
    full.mkdir()
    snippet = f"""
import os
from pathlib import Path
from mediabuilder.errors import InvalidInput
from mediabuilder.media.fat32 import write_fat32
try:
    write_fat32(Path({str(root)!r}), Path({str(full)!r}) / "media.img", label="X")
except InvalidInput as e:
    print("InvalidInput:", e)
print("left:", sorted(os.listdir({str(full)!r})))
"""
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o size=2M tmpfs {full} && {sys.executable} -c "$SNIPPET"'],
        env={**os.environ, "SNIPPET": snippet},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"InvalidInput: {full}/media.img: no space left on device" in proc.stdout, proc.stdout + proc.stderr
    assert "left: []" in proc.stdout


@pytest.mark.integration
def test_big_file_split_for_fat32_and_iso(tmp_path: Path) -> None:
    """A 4.5 GiB NAR is split, without copies, into parts that fit FAT32 and one ISO extent (the
    writers read each part straight from the whole file); both images give back the parts
    through independent readers (mcopy, bsdtar), and they rejoin exactly."""
    size = 4608 * MIB
    tree = tmp_path / "tree"
    nar_dir = tree / "cache" / "nar"
    nar_dir.mkdir(parents=True)
    big = nar_dir / "big.nar.zst"
    try:
        want = write_big_file(big, size)
        parts, slices = slice_file(big, PART_SIZE)  # no copies: the images read the parts from it
        assert [(p.name, p.size) for p in parts] == [
            ("big.nar.zst.part000", PART_SIZE),
            ("big.nar.zst.part001", size - PART_SIZE),
        ]
        assert all(p.size <= min(FAT32_MAX_FILE, ISO_MAX_FILE) for p in parts)

        image = tmp_path / "media.img"
        write_fat32(tree, image, label="BIG", partition_table="gpt", slices={big: slices})
        # fsck.fat reads every part whole: 4 KiB clusters, where 4 GiB - 2048 bytes made exactly
        # 2^32 bytes of clusters and fsck.fat reported "cluster chain length is 0 bytes".
        geometry = image_geometry(scan(tree, slices={big: slices}).content, None, "gpt")[1]
        assert geometry.cluster == 4096
        files, used, clusters = fsck_fat(image, MIB, tmp_path)
        assert (files, clusters) == (2 + 2 + 1, geometry.clusters)  # parts, cache and nar, the root
        assert used == sum(-(-p.size // 4096) for p in parts) + 3  # a cluster per directory
        digest = hashlib.sha256()
        for part in parts:
            with stream(["mcopy", "-n", "-i", mtools_image(image, MIB), f"::/cache/nar/{part.name}", "-"]) as out:
                while chunk := out.read(MIB):
                    digest.update(chunk)
        assert digest.hexdigest() == want
        image.unlink()

        iso = tmp_path / "media.iso"
        write_iso(tree, iso, label="BIG", slices={big: slices})
        digest = hashlib.sha256()
        for part in parts:
            # not isoinfo: it extracts nothing from any file of 2 GiB or more (docs/images.md)
            with stream(["bsdtar", "-xOf", iso, f"cache/nar/{part.name}"]) as out:
                while chunk := out.read(MIB):
                    digest.update(chunk)
        assert digest.hexdigest() == want
        with open_source(iso) as source:
            assert dict(source.files()) == {f"cache/nar/{p.name}": p.size for p in parts}
    finally:
        for leftover in (big, tmp_path / "media.img", tmp_path / "media.iso", *nar_dir.glob("*")):
            leftover.unlink(missing_ok=True)
