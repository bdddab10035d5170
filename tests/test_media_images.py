"""`mediabuilder build` to a directory, an ISO image and a FAT32 image (bare or partitioned),
checked as written and as independent readers extract it (xorriso, bsdtar, isoinfo, mcopy,
fsck.fat); a 4.5 GiB store path that must be split, installed offline from each image; and bad
input (labels, sizes, an existing output, a filesystem that fills up part-way)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Example, assert_one_line_error, make_nix_env, nix, path_info, run_cli
from media_checks import expected_tree, fsck_fat, mtools_image, tree_dirs
from test_install import install_offline

from mediabuilder.media import fat32

pytestmark = pytest.mark.integration

MIB = 1024**2
GIB = 1024**3
FAT32_MAX_FILE = 4 * GIB - 1
PART_SIZE = 4 * GIB - 64 * 1024  # split.PART_SIZE, spelled out
SELF_CHECKED = ("manifest.json", "manifest.storepath", "media-key.pub")
EMPTY_DIRS = ("cache/log", "cache/realisations")
HOST = "alpha"


# The shared checker


def _narinfo_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key] = value
    return fields


def manifest_nar(root: Path) -> tuple[str, str]:
    """The narinfo and the NAR file (relative names) of the signed manifest store path."""
    storepath = (root / "manifest.storepath").read_text()
    assert storepath.endswith("\n") and storepath.count("\n") == 1
    match = re.fullmatch(r"/nix/store/([0-9a-z]{32})-mediabuilder-manifest", storepath.strip())
    assert match, storepath
    narinfo = f"cache/{match.group(1)}.narinfo"
    assert (root / narinfo).is_file(), narinfo
    url = _narinfo_fields(root / narinfo)["URL"]
    return narinfo, f"cache/{url}"


def check_media(root: Path, key: str, *, hashes: bool = True, verify: bool = True) -> dict:
    """The media tree at `root` is what its manifest says, file for file, and verifies.

    Every file of manifest.json["files"] (a whole file, or each of its parts when split) is
    there with the manifest's size and sha256; besides them only the self-checked files and the
    manifest path's narinfo and NAR; the empty cache directories exist; `mediabuilder verify
    ROOT --trusted-key KEY` exits 0. Returns the manifest.
    """
    manifest = json.loads((root / "manifest.json").read_text())
    actual = expected_tree(root) if hashes else {
        p.relative_to(root).as_posix(): (p.stat().st_size, "") for p in root.rglob("*") if p.is_file()
    }
    listed: set[str] = set()
    for name, entry in manifest["files"].items():
        parts = entry.get("parts") or []
        if parts:
            assert name not in actual, f"{name} is split, yet also on the media whole"
            assert sum(p["size"] for p in parts) == entry["size"], name
            pieces = [(p["name"], p["size"], p["sha256"]) for p in parts]
        else:
            pieces = [(name, entry["size"], entry["sha256"])]
        for piece, size, digest in pieces:
            assert piece in actual, f"{piece}: missing"
            got_size, got_digest = actual[piece]
            assert got_size == size, f"{piece}: {got_size} bytes, the manifest says {size}"
            if hashes:
                assert got_digest == digest, f"{piece}: sha256 differs from the manifest"
            listed.add(piece)
    narinfo, nar = manifest_nar(root)
    extras = {*SELF_CHECKED, narinfo, nar}
    for name in extras:
        assert name in actual, f"{name}: missing"
    assert sorted(set(actual) - listed - extras) == [], "files on the media the manifest does not list"
    assert (root / "media-key.pub").read_text().strip() == key
    assert manifest["key"]["public"] == key
    for d in EMPTY_DIRS:
        assert (root / d).is_dir(), d
        assert list((root / d).iterdir()) == [], d
    if verify:
        proc = run_cli("verify", root, "--trusted-key", key)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return manifest


def verify_image(image: Path, key: str) -> None:
    proc = run_cli("verify", image, "--trusted-key", key)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Independent readers


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def xorriso_extract(iso: Path, dest: Path) -> Path:
    run("xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/", dest)
    return dest


def bsdtar_extract(iso: Path, dest: Path) -> Path:
    dest.mkdir()
    run("bsdtar", "-xf", iso, "-C", dest)
    return dest


def isoinfo_listing(iso: Path) -> tuple[set[str], set[str]]:
    """(files, directories) by Rock Ridge name, from `isoinfo -R -l`."""
    files: set[str] = set()
    dirs: set[str] = set()
    current = None
    for line in run("isoinfo", "-R", "-l", "-i", iso).stdout.splitlines():
        if line.startswith("Directory listing of "):
            current = line.removeprefix("Directory listing of ").strip().strip("/")
            continue
        match = re.match(r"^([d-])[-rwxsStT]{9}\s.*\]\s+(\S.*?)\s*$", line)
        if match is None or current is None:
            continue
        kind, name = match.groups()
        if name in (".", ".."):
            continue
        rel = f"{current}/{name}" if current else name
        (dirs if kind == "d" else files).add(rel)
    return files, dirs


def fat_offset(image: Path, table: str) -> int:
    """The filesystem's offset, read from the image's partition table (none: a boot sector at 0)."""
    if table == "none":
        with image.open("rb") as f:
            sector = f.read(512)
        assert sector[82:90] == b"FAT32   " and sector[510:512] == b"\x55\xaa"
        proc = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=False)
        assert proc.returncode != 0 or '"partitions"' not in proc.stdout, proc.stdout
        return 0
    info = json.loads(run("sfdisk", "--json", image).stdout)["partitiontable"]
    assert info["label"] == ("dos" if table == "mbr" else "gpt")
    (part,) = info["partitions"]
    sector = int(info.get("sectorsize", 512))
    if table == "mbr":
        assert part["type"] == "c"
    else:
        assert part["type"].upper() == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
    offset = int(part["start"]) * sector
    assert offset == MIB
    with image.open("rb") as f:
        f.seek(offset + 82)
        assert f.read(8) == b"FAT32   "
    return offset


def mcopy_extract(image: Path, offset: int, dest: Path) -> Path:
    dest.mkdir()
    spec = mtools_image(image, offset)
    run("mcopy", "-s", "-n", "-m", "-i", spec, "::/*", dest)
    return dest


# Building media


@dataclass(frozen=True)
class Media:
    base: Path
    cache: Path
    key: str
    outputs: dict[str, Path]  # "dir", "iso", "fat32-none", "fat32-mbr", "fat32-gpt"
    toplevel: str


def build(example: Example, cache: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("build", "--flake", f"{example.flake}#{HOST}", "--cache", cache, "--output", output, *args)


@pytest.fixture(scope="module")
def media(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Media:
    base = tmp_path_factory.mktemp("images")
    cache = base / "cache"
    outputs = {
        "dir": (base / "media", ()),
        "iso": (base / "media.iso", ("--format", "iso", "--label", "NIXOS_TEST")),
        **{f"fat32-{t}": (base / f"media-{t}.img", ("--format", "fat32", "--partition-table", t))
           for t in ("none", "mbr", "gpt")},
    }
    toplevel = None
    for name, (out, args) in outputs.items():
        proc = build(example, cache, out, *args)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        line = proc.stdout.strip()
        assert line.startswith(f"{HOST}\t"), proc.stdout
        toplevel = line.split("\t")[1]
    assert toplevel == example.toplevels[HOST]
    key = (base / "media" / "media-key.pub").read_text().strip()
    return Media(base, cache, key, {n: o for n, (o, _) in outputs.items()}, toplevel)


def test_dir_tree(media: Media) -> None:
    root = media.outputs["dir"]
    manifest = check_media(root, media.key)
    assert manifest["hosts"][HOST]["toplevel"] == media.toplevel
    assert not any("parts" in e for e in manifest["files"].values())
    # Nothing but the output beside it: no temporary names.
    assert not [p.name for p in media.base.iterdir() if p.name.startswith(".")]


def test_iso_independent_readers(media: Media, tmp_path: Path) -> None:
    iso = media.outputs["iso"]
    verify_image(iso, media.key)
    xorriso = check_media(xorriso_extract(iso, tmp_path / "xorriso"), media.key)
    bsdtar = check_media(bsdtar_extract(iso, tmp_path / "bsdtar"), media.key)
    assert xorriso == bsdtar
    assert os.access(tmp_path / "bsdtar" / "install.sh", os.X_OK)
    assert os.access(tmp_path / "xorriso" / "install.sh", os.X_OK)
    files, dirs = isoinfo_listing(iso)
    assert files == set(expected_tree(tmp_path / "bsdtar"))
    assert dirs == tree_dirs(tmp_path / "bsdtar")
    assert {"cache/log", "cache/realisations", "cache/nar", "flake"} <= dirs


@pytest.mark.parametrize("table", ["none", "mbr", "gpt"])
def test_fat32_independent_readers(media: Media, table: str, tmp_path: Path) -> None:
    image = media.outputs[f"fat32-{table}"]
    offset = fat_offset(image, table)
    fsck_fat(image, offset, tmp_path)
    verify_image(image, media.key)
    check_media(mcopy_extract(image, offset, tmp_path / "mcopy"), media.key)


def test_same_tree_in_every_format(media: Media, tmp_path: Path) -> None:
    """Apart from the manifest's creation time (and so the signed manifest), every format
    carries the same files."""
    def shape(root: Path) -> dict[str, tuple[int, str]]:
        narinfo, nar = manifest_nar(root)
        skip = {"manifest.json", "manifest.storepath", narinfo, nar}
        return {k: v for k, v in expected_tree(root).items() if k not in skip}

    want = shape(media.outputs["dir"])
    assert shape(bsdtar_extract(media.outputs["iso"], tmp_path / "iso")) == want
    image = media.outputs["fat32-gpt"]
    assert shape(mcopy_extract(image, fat_offset(image, "gpt"), tmp_path / "fat")) == want


# A store path with one 4.5 GiB file


BIG_SIZE = 4 * GIB + GIB // 2


@dataclass(frozen=True)
class BigPath:
    path: str
    nar_hash: str
    nar_size: int


def _write_random(path: Path, size: int) -> None:
    """`size` bytes of AES-CTR keystream (incompressible), or Python's PRNG without openssl."""
    if shutil.which("openssl"):
        with path.open("wb") as out:
            gen = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-pass", "pass:mediabuilder", "-nosalt",
                                    "-pbkdf2", "-in", "/dev/zero"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
            head = subprocess.run(["head", "-c", str(size)], stdin=gen.stdout, stdout=out, check=True)
            assert gen.stdout is not None
            gen.stdout.close()
            gen.wait()
            assert head.returncode == 0
    else:
        import random

        rng = random.Random(20260101)
        with path.open("wb") as out:
            left = size
            while left:
                n = min(left, 64 * MIB)
                out.write(rng.randbytes(n))
                left -= n
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def big_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigPath]:
    staging = tmp_path_factory.mktemp("big") / "mediabuilder-big-test"
    staging.mkdir()
    _write_random(staging / "blob.bin", BIG_SIZE)
    path = nix("nix-store", "--add", staging).stdout.strip()
    shutil.rmtree(staging)
    try:
        info = path_info(path)
        assert info["narSize"] > 4 * GIB
        yield BigPath(path, info["narHash"], info["narSize"])
    finally:
        nix("nix-store", "--delete", path, check=False)


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("big-cache") / "cache"
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["iso", "fat32"])
def test_big_store_path_split_and_installed(example: Example, big_path: BigPath, big_cache: Path,
                                            fmt: str, tmp_path: Path) -> None:
    image = tmp_path / f"media.{fmt}"
    extracted = tmp_path / "extracted"
    root = tmp_path / "root"
    try:
        proc = build(example, big_cache, image, "--format", fmt, "--store-path", big_path.path,
                     "--compression", "none", *(("--partition-table", "gpt") if fmt == "fat32" else ()))
        assert proc.returncode == 0, proc.stderr
        if fmt == "iso":
            bsdtar_extract(image, extracted)
        else:
            # fsck.fat finds nothing wrong with the parts (4 GiB - 2048 bytes was read as 0 bytes)
            files, _, _ = fsck_fat(image, fat_offset(image, "gpt"), tmp_path)
            mcopy_extract(image, fat_offset(image, "gpt"), extracted)
            assert files == len(expected_tree(extracted)) + len(tree_dirs(extracted)) + 1
        image.unlink()

        key = (extracted / "media-key.pub").read_text().strip()
        manifest = check_media(extracted, key, hashes=False, verify=False)
        assert big_path.path in manifest["store_paths"]
        assert manifest["hosts"][HOST]["nar_bytes"] > big_path.nar_size
        hash_part = Path(big_path.path).name.split("-")[0]
        info = _narinfo_fields(extracted / "cache" / f"{hash_part}.narinfo")
        assert info["Compression"] == "none" and int(info["NarSize"]) == big_path.nar_size
        entry = manifest["files"][f"cache/{info['URL']}"]
        assert entry["size"] == big_path.nar_size > 4 * GIB
        parts = entry["parts"]
        assert len(parts) == 2
        assert [p["size"] for p in parts] == [PART_SIZE, big_path.nar_size - PART_SIZE]
        assert PART_SIZE == 4 * GIB - 64 * 1024 < FAT32_MAX_FILE
        assert [p["name"] for p in parts] == [f"cache/{info['URL']}.part{i:03d}" for i in range(len(parts))]
        assert not (extracted / "cache" / info["URL"]).exists()
        # the parts were hashed as the NAR entered the cache, not read again for the image
        assert (big_cache / "parts" / f"{Path(info['URL']).name}.json").is_file()

        root.mkdir()
        proc = install_offline(extracted, root, "--host", HOST, "--yes")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        shutil.rmtree(extracted)
        installed = path_info(big_path.path, store=root)
        assert installed["narHash"] == big_path.nar_hash
        assert installed["narSize"] == big_path.nar_size
        toplevel = example.toplevels[HOST]
        assert path_info(toplevel, store=root)["narHash"] == path_info(toplevel)["narHash"]
        blob = root / big_path.path.lstrip("/") / "blob.bin"
        assert blob.stat().st_size == BIG_SIZE
    finally:
        image.unlink(missing_ok=True)
        shutil.rmtree(extracted, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


# Bad input: one clear line, exit 2, nothing left behind


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_label_too_long(example: Example, media: Media, out_dir: Path) -> None:
    label = "A" * 40
    proc = build(example, media.cache, out_dir / "media.iso", "--format", "iso", "--label", label)
    assert_one_line_error(proc, "--label", label)
    assert os.listdir(out_dir) == []


def test_size_too_small_for_fat32(example: Example, media: Media, out_dir: Path) -> None:
    proc = build(example, media.cache, out_dir / "media.img", "--format", "fat32", "--size", "1M")
    assert_one_line_error(proc, "--size 1M", "too small")
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("fmt", ["iso", "fat32", "dir"])
def test_output_exists(example: Example, media: Media, out_dir: Path, fmt: str) -> None:
    output = out_dir / "media"
    if fmt == "dir":
        output.mkdir()
        (output / "keep").write_text("old\n")
    else:
        output.write_text("old\n")
    before = expected_tree(out_dir)
    proc = build(example, media.cache, output, "--format", fmt)
    if fmt == "dir":  # the user's own file, not a medium: refused even with --force
        assert_one_line_error(proc, f"{output}: holds files that are not part of a medium (keep)")
        assert_one_line_error(build(example, media.cache, output, "--format", fmt, "--force"),
                              f"{output}: holds files that are not part of a medium (keep)")
    else:
        assert_one_line_error(proc, f"{output}: already exists")
    assert sorted(os.listdir(out_dir)) == ["media"]
    assert expected_tree(out_dir) == before


def fat_metadata_pages(tree: Path, page: int) -> int:
    """Pages of everything but file data in the (sparse) FAT32 image of `tree` (no --size): the
    boot sectors, in each FAT the entries of the used clusters, every directory's clusters."""
    content = fat32.scan(tree).content
    geometry = fat32.auto_geometry(content)
    fat_bytes = (2 + content.clusters(geometry.cluster)) * 4
    dirs = sum(-(-max(n, 1) // geometry.cluster) * geometry.cluster for n in content.dir_entry_bytes)
    return 1 + fat32.FAT_COPIES * -(-fat_bytes // page) + -(-dirs // page) + len(content.dir_entry_bytes)


@pytest.mark.parametrize(("fmt", "phase"), [
    pytest.param("dir", "assembly"),
    pytest.param("iso", "write", id="iso-write"),
    pytest.param("fat32", "format"),
    pytest.param("fat32", "copy", id="fat32-copy"),
])
def test_output_filesystem_fills_up(example: Example, media: Media, tmp_path: Path, fmt: str, phase: str) -> None:
    """The output's filesystem (a small tmpfs in a private mount namespace) fills up part-way:
    while a directory's tree is assembled beside the output, while the ISO is written, while
    mkfs.fat writes the FATs, while mcopy copies files. One line naming the path and saying
    there is no space; the tmpfs holds nothing afterwards."""
    # Sizes from what the build writes, not from `du` (the machine's block size) or leftovers: a
    # directory's tree is assembled beside the output (tmpfs takes whole pages per file); an
    # image's beside the cache, so only the image lands on the output's filesystem.
    files = [p.stat().st_size for p in media.outputs["dir"].rglob("*") if p.is_file()]
    page = os.sysconf("SC_PAGE_SIZE")
    # The sparse FAT32 image: the boot sectors' page, the FAT entries of the used clusters in
    # each FAT, the directories; then the files.
    fat_pages = fat_metadata_pages(media.outputs["dir"], page)
    assert fat_pages * page < sum(files) // 4, (fat_pages, sum(files))
    size_kib = {
        "assembly": sum(-(-n // page) * page for n in files) // 2 // 1024,  # half the tree's pages
        "write": sum(files) // 2 // 1024,  # the ISO holds every byte of every file: half fits
        "format": page // 1024,  # the boot sectors' page fits, the first FAT's does not
        "copy": sum(files) // 2 // 1024,  # the boot sectors, FATs and directories fit, half the files do not
    }[phase]
    full = tmp_path / "full"
    full.mkdir()
    left = tmp_path / "left.txt"
    output = full / ("media" if fmt == "dir" else f"media.{fmt}")
    script = (
        'set -e; mount -t tmpfs -o "size=$2k" tmpfs "$1"; dir=$1; left=$3; shift 3; '
        'rc=0; "$@" || rc=$?; ls -A "$dir" > "$left"; exit $rc'
    )
    env = make_nix_env()
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "fill", str(full),
         str(size_kib), str(left), sys.executable, "-m", "mediabuilder", "build",
         "--flake", f"{example.flake}#{HOST}", "--cache", str(media.cache), "--output", str(output),
         "--format", fmt],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert left.is_file(), proc.stderr
    line = assert_one_line_error(proc)
    assert left.read_text() == "", f"left on the full filesystem: {left.read_text()!r}"
    assert str(full) in line, line
    assert "no space" in line.lower(), line
    if phase == "write":
        assert "while writing the ISO image" in line, line
    elif phase == "copy":
        assert "while writing the FAT32 image" in line, line
    assert os.listdir(full) == []  # the namespace's tmpfs is gone; nothing written underneath


def test_image_verify_reads_image_not_mount(media: Media) -> None:
    """The digest of each image is stable across verify: it is read, never written."""
    for name in ("iso", "fat32-gpt"):
        image = media.outputs[name]
        before = hashlib.sha256(image.read_bytes()).hexdigest()
        verify_image(image, media.key)
        assert hashlib.sha256(image.read_bytes()).hexdigest() == before
