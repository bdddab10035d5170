from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from media_checks import (
    EMPTY_DIRS,
    LONG_NAME,
    check_source,
    check_tree,
    edge_tree,
    expected_tree,
    full_listing,
    make_tree,
    tree_dirs,
)

from mediabuilder.errors import InternalError, InvalidInput
from mediabuilder.media import iso as iso_module
from mediabuilder.media.iso import ISO_MAX_FILE, write_iso
from mediabuilder.media.label import validate_label
from mediabuilder.media.source import open_source
from mediabuilder.run import run


def test_validate_label() -> None:
    assert validate_label("nixos_offline_24") == "NIXOS_OFFLINE_24"
    assert validate_label("A" * 32) == "A" * 32
    assert validate_label("A" * 32, "iso") == "A" * 32
    for bad in ("A" * 33, "", "nixos-offline", "ÄBC", "a b", "ß"):
        with pytest.raises(InvalidInput) as caught:
            validate_label(bad)
        assert str(caught.value) == (f"--label/media.label: {bad!r} is not a valid ISO 9660 volume label: "
                                     "use 1 to 32 characters A-Z, 0-9 and _ (lower case is upper-cased)")


def test_iso_max_file() -> None:
    assert ISO_MAX_FILE == 0xFFFFF800


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, str]], set[str]]:
    root = tmp_path / "tree"
    expected, dirs = make_tree(root)
    return root, expected, dirs


def test_write_and_read_back(tmp_path: Path, tree: tuple[Path, dict[str, tuple[int, str]], set[str]]) -> None:
    root, expected, dirs = tree
    iso = tmp_path / "media.iso"
    write_iso(root, iso, label="nixos_test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["media.iso", "tree"]
    with open_source(iso) as source:
        assert source.kind == "iso"
        assert source.free_bytes == 0
        check_source(source, expected, dirs)
        assert set(source.dirs()) >= EMPTY_DIRS
        out = tmp_path / "x"
        source.extract(f"cache/{LONG_NAME}", out)
        assert out.read_bytes() == (root / "cache" / LONG_NAME).read_bytes()


def test_refuses_unsplit_big_file(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    with (root / "huge").open("wb") as f:
        f.truncate(ISO_MAX_FILE + 1)
    with pytest.raises(InternalError, match="must split it"):
        write_iso(root, tmp_path / "x.iso", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_refuses_a_name_linux_would_cut(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / ("n" * 250 + ".txt")).write_text("254 bytes\n")
    with pytest.raises(InternalError, match="a name of 254 bytes; Linux reads at most 253 bytes"):
        write_iso(root, tmp_path / "x.iso", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: (root / "ctl\x01").write_text("x\n"), "ctl\x01: a control character in the name"),
    (lambda root: (root / "link").symlink_to("t" * 1024), "link: a symlink target of 1024 bytes; libisofs"),
])
def test_refuses_what_readers_cannot_read(tmp_path: Path, make: Callable[[Path], object], message: str) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    make(root)
    with pytest.raises(InternalError) as caught:
        write_iso(root, tmp_path / "x.iso", label="X")
    assert message in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_many_directories_and_clashing_names_stay_fast(tmp_path: Path) -> None:
    """4,000 sibling directories and 3,000 names that mangle alike: each counted and named once
    (both took time in the square of their number: seconds here, minutes at 16,000)."""
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(4000):
        (root / f"d{i}").mkdir()
    clash = root / "clash"
    clash.mkdir()
    for i in range(3000):
        (clash / ("p" * 70 + f"{i:05d}.txt")).write_text("")
    calls = 0
    original = iso_module._joliet_units

    def counted(text: str) -> int:
        nonlocal calls
        calls += 1
        return original(text)

    iso_module._joliet_units = counted  # type: ignore[assignment]
    try:
        write_iso(root, tmp_path / "x.iso", label="X")
    finally:
        iso_module._joliet_units = original  # type: ignore[assignment]
    assert calls < 20 * 7001  # a few per name; trying every number before each would be millions
    with open_source(tmp_path / "x.iso") as source:
        assert len(list(source.files())) == 3000 and len(list(source.dirs())) == 4001


def test_refuses_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / os.fsdecode(b"latin1-\xe9")).write_text("x\n")
    with pytest.raises(InternalError, match="latin1-.*: the name is not UTF-8"):
        write_iso(root, tmp_path / "x.iso", label="X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


@pytest.mark.integration
def test_independent_readers(tmp_path: Path, tree: tuple[Path, dict[str, tuple[int, str]], set[str]]) -> None:
    root, expected, dirs = tree
    iso = tmp_path / "media.iso"
    write_iso(root, iso, label="NIXOS_TEST")

    xorriso_out = tmp_path / "xorriso"
    run(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/", xorriso_out])
    check_tree(xorriso_out, expected, dirs)
    assert os.access(xorriso_out / "install.sh", os.X_OK)
    assert not os.access(xorriso_out / "manifest.json", os.X_OK)

    bsdtar_out = tmp_path / "bsdtar"
    bsdtar_out.mkdir()
    run(["bsdtar", "-xf", iso, "-C", bsdtar_out])
    check_tree(bsdtar_out, expected, dirs)
    assert os.access(bsdtar_out / "install.sh", os.X_OK)

    listing = run(["isoinfo", "-R", "-l", "-i", iso]).stdout.decode()
    assert f" {LONG_NAME} " in listing + " "
    assert re.search(r"-r-xr-xr-x .* install\.sh", listing) or re.search(r"-rwxr-xr-x .* install\.sh", listing)
    assert "Directory listing of /cache/realisations/" in listing
    joliet = run(["isoinfo", "-J", "-l", "-i", iso]).stdout.decode()
    assert "MixedCase.Json" in joliet
    assert "Directory listing of /cache/log/" in joliet
    volume = run(["isoinfo", "-d", "-i", iso]).stdout.decode()
    assert "Volume id: NIXOS_TEST" in volume


@pytest.mark.integration
def test_no_space_left(tmp_path: Path, tree: tuple[Path, dict[str, tuple[int, str]], set[str]]) -> None:
    root, _, _ = tree
    full = tmp_path / "full"
    full.mkdir()
    snippet = f"""
import os, sys
from pathlib import Path
from mediabuilder.errors import InvalidInput
from mediabuilder.media.iso import write_iso
try:
    write_iso(Path({str(root)!r}), Path({str(full)!r}) / "media.iso", label="X")
except InvalidInput as e:
    print("InvalidInput:", e)
print("left:", sorted(os.listdir({str(full)!r})))
"""
    script = (
        f"mount -t tmpfs -o size=2M tmpfs {full} && {sys.executable} -c \"$SNIPPET\""
    )
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        env={**os.environ, "SNIPPET": snippet},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"InvalidInput: {full}/media.iso: no space left on device" in proc.stdout
    assert "left: []" in proc.stdout


@pytest.mark.integration
def test_edge_tree_read_back_by_every_reader(tmp_path: Path) -> None:
    """Names of 255 bytes, non-ASCII and non-BMP names, clashing names, a directory of several
    blocks, 13 levels, long and dotted symlinks (media_checks.edge_tree): xorriso and bsdtar
    extract exactly the tree (names, executable bits, sizes, sha256, symlink targets), isoinfo
    lists every Rock Ridge name, 7z extracts every file's data by Joliet, and open_source (pycdlib
    and our checks) reads it back."""
    root = tmp_path / "tree"
    edge_tree(root)
    want = full_listing(root)
    iso = tmp_path / "edge.iso"
    write_iso(root, iso, label="EDGE")

    for tool, argv in (("xorriso", ["xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/"]),
                       ("bsdtar", ["bsdtar", "-xf", iso, "-C"])):
        out = tmp_path / tool
        out.mkdir()
        run([*argv, out])
        assert full_listing(out) == want, tool

    listing = run(["isoinfo", "-R", "-l", "-i", iso]).stdout.decode()
    names = {line.split("]", 1)[1].strip().split(" -> ")[0] for line in listing.splitlines() if "]  " in line}
    assert names - {".", ".."} == {Path(rel).name for rel in want}

    joliet = tmp_path / "7z"
    run(["7z", "x", "-y", iso, f"-o{joliet}"])
    files = [v[2:] for v in want.values() if v[0] == "file"]
    assert sorted(v[2:] for v in full_listing(joliet).values() if v[0] == "file") == sorted(files)
    kept = [rel for rel, v in want.items() if v[0] != "link"]  # Joliet has no symlinks
    assert len(full_listing(joliet)) == len(kept)
    fits = {rel for rel in kept if all(len(part.encode("utf-16-be")) <= 2 * 64 for part in rel.split("/"))}
    # cut to 64 UTF-16 units: the 150 in many/, the 253-byte name, 100 × ü, 40 × U+1F600 (80 units),
    # the two long directory names and the file under one of them
    assert len(kept) - len(fits) == 156
    # a_b is renamed: Joliet names are looked up without case (by Linux too), and A_B came first
    assert set(full_listing(joliet)) & fits == fits - {"a_b"}

    with open_source(iso) as source:
        check_source(source, expected_tree(root), tree_dirs(root) - {"links/to-dir"})
