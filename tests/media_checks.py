"""Shared checkers for media trees: exact file sets, sizes, hashes and directories.

Not a test module. Used on the tree as written, on what independent readers extract from an
image, and on what `open_source` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

from mediabuilder.media.source import MediaSource

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expected_tree(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) for every regular file under `root`."""
    found = {}
    for top, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(top, name)
            if stat.S_ISREG(path.lstat().st_mode):
                found[path.relative_to(root).as_posix()] = (path.stat().st_size, sha256_file(path))
    return found


def tree_dirs(root: Path) -> set[str]:
    return {Path(top, d).relative_to(root).as_posix() for top, dirs, _ in os.walk(root) for d in dirs}


def check_tree(root: Path, expected: dict[str, tuple[int, str]], dirs: set[str]) -> None:
    """`root` holds exactly the expected files (sizes and hashes) and every expected directory."""
    actual = expected_tree(root)
    assert sorted(actual) == sorted(expected)
    for rel, (size, digest) in expected.items():
        assert actual[rel] == (size, digest), rel
    missing = sorted(d for d in dirs if not (root / d).is_dir())
    assert missing == []


def check_source(source: MediaSource, expected: dict[str, tuple[int, str]], dirs: set[str]) -> None:
    """The same check through `open_source`: listing, sizes, streamed hashes, directories."""
    assert dict(source.files()).keys() == expected.keys()
    assert {rel: size for rel, size in source.files()} == {rel: s for rel, (s, _) in expected.items()}
    for rel, (_, digest) in expected.items():
        h = hashlib.sha256()
        with source.open(rel) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        assert h.hexdigest() == digest, rel
    assert set(source.dirs()) == dirs
    assert source.size_total == sum(size for size, _ in expected.values())


LONG_NAME = "0a1b2c3d4e5f6g7h8i9jakblcmdnfp0q-very-long-store-path-name-with-many-parts-1.2.3.narinfo"
EMPTY_DIRS = {"cache/log", "cache/realisations", "deep/a/b/c/d/e/f/g/h/empty"}


def nontrivial_bytes(size: int, seed: int = 0) -> bytes:
    """Incompressible-looking data: sha256 in counter mode."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def make_tree(root: Path) -> tuple[dict[str, tuple[int, str]], set[str]]:
    """A small media-like tree; returns (expected files, all directories)."""
    (root / "cache" / "nar").mkdir(parents=True)
    for d in EMPTY_DIRS:
        (root / d).mkdir(parents=True)
    (root / "cache" / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n")
    (root / "empty-file").write_bytes(b"")
    (root / "cache" / "nar" / "big.nar.zst").write_bytes(nontrivial_bytes(3 * 1000 * 1000))
    script = root / "install.sh"
    script.write_text("#!/bin/bash\necho hi\n")
    script.chmod(0o755)
    (root / "MixedCase.Json").write_text("{}\n")
    (root / "manifest.json").write_text('{"version": 1}\n')
    (root / "cache" / LONG_NAME).write_text("StorePath: /nix/store/x\n")
    for i in range(300):
        name = f"{hashlib.sha256(str(i).encode()).hexdigest()[:32]}.narinfo"
        (root / "cache" / name).write_bytes(nontrivial_bytes(100 + i, seed=i))
    return expected_tree(root), tree_dirs(root)


def write_big_file(path: Path, size: int) -> str:
    """`size` bytes of real binaries from /usr/bin, 4 MiB at a time, each chunk numbered so the
    file is not periodic; returns its sha256. Fast enough for several GiB."""
    chunk = bytearray()
    for exe in sorted(Path("/usr/bin").iterdir()):
        if len(chunk) >= 4 * CHUNK:
            break
        if exe.is_file() and not exe.is_symlink():
            chunk += exe.read_bytes()[: 4 * CHUNK]
    body = bytes(chunk[: 4 * CHUNK])
    digest = hashlib.sha256()
    written = 0
    with path.open("wb") as f:
        for counter in range(-(-size // (len(body) + 8))):
            block = (counter.to_bytes(8, "little") + body)[: size - written]
            f.write(block)
            digest.update(block)
            written += len(block)
    return digest.hexdigest()


def mtools_image(image: Path, offset: int) -> str:
    """The `-i` argument of mtools for a filesystem at `offset` bytes in `image`."""
    return f"{image}@@{offset}" if offset else os.fspath(image)


def fsck_fat(image: Path, offset: int, scratch: Path) -> tuple[int, int, int]:
    """`fsck.fat -n` finds nothing to complain about (a partition is copied out first); returns
    its summary: (files and directories, clusters used, clusters in all)."""
    target = image
    if offset:
        target = scratch / f"{image.name}.partition"
        dump = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
        info = json.loads(dump)["partitiontable"]
        size = int(info["partitions"][0]["size"]) * int(info.get("sectorsize", 512))
        with image.open("rb") as src, target.open("wb") as out:
            src.seek(offset)
            left = size
            while left:
                chunk = src.read(min(left, 8 * CHUNK))
                assert chunk, "partition runs past the end of the image"
                out.write(chunk)
                left -= len(chunk)
    try:
        proc = subprocess.run(["fsck.fat", "-n", str(target)], capture_output=True, text=True, check=False)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        summary = re.compile(r": (\d+) files, (\d+)/(\d+) clusters$")
        complaints = [ln for ln in lines if not ln.startswith("fsck.fat ") and not summary.search(ln)]
        assert proc.returncode == 0 and complaints == [], proc.stdout + proc.stderr
        found = summary.search(lines[-1])
        assert found, proc.stdout
        files, used, clusters = (int(n) for n in found.groups())
        return files, used, clusters
    finally:
        if target != image:
            target.unlink(missing_ok=True)


def edge_tree(root: Path) -> None:
    """A tree at the edges of ISO 9660, Rock Ridge and Joliet: a name of 253 bytes (two NM
    entries, a continuation area; Linux cuts longer ones), non-ASCII and non-BMP names (Joliet counts UTF-16 units),
    names that clash once mangled, a directory whose records fill several blocks, directories with
    long names (their Rock Ridge entries in continuation areas) before others, directories
    deeper than ECMA-119's 8 levels, symlinks (absolute, relative, with `.` and `..`, a target
    of 990 bytes in several SL entries, 130 `..` in a row, a component of 255 bytes), and files of 0, 1, 2048
    and 2049 bytes."""
    root.mkdir(parents=True)
    for name, size in (("empty", 0), ("one", 1), ("block", 2048), ("block-and-one", 2049)):
        (root / name).write_bytes(nontrivial_bytes(size, seed=size))
    (root / ("n" * 249 + ".txt")).write_text("the longest name Linux reads whole (253 bytes)\n")
    (root / ("ü" * 100 + ".json")).write_text("two bytes a character\n")
    (root / ("\U0001f600" * 40)).write_text("four bytes, two UTF-16 units a character\n")
    for name in ("a-b", "a_b", "A_B", "a.b.c", "a.b_c", "x" * 40 + ".tar.gz", "x" * 40 + ".tar.xz", ".hidden"):
        (root / name).write_text(f"{name}\n")
    tool = root / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    many = root / "many"
    many.mkdir()
    for i in range(150):
        (many / f"{i:03d}-{hashlib.sha256(str(i).encode()).hexdigest()}-with-a-long-tail.narinfo").write_text(f"{i}\n")
    # directories whose Rock Ridge name (and mode) only fit in a continuation area, before others
    (root / ("d" * 200)).mkdir()
    (root / ("e" * 130)).mkdir()
    (root / ("e" * 130) / "inside").write_text("under a long name\n")
    deep = root.joinpath(*(f"level{i}" for i in range(12)))
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("twelve levels down\n")
    (root / "links").mkdir()
    (root / "links" / "absolute").symlink_to("/nix/store/0a1b2c3d4e5f6g7h8i9jakblcmdnfp0q-hello-2.12")
    (root / "links" / "relative").symlink_to("../bin/./tool")
    # 990 bytes: libisofs (xorriso) reads no Rock Ridge target over 1,024 bytes
    (root / "links" / "long").symlink_to("/" + "/".join(f"component-{i:03d}-" + "p" * 40 for i in range(18)))
    (root / "links" / "dots").symlink_to("../" * 130 + "many")
    (root / "links" / "long-component").symlink_to("x" * 255)
    (root / "links" / "to-dir").symlink_to("../many")


def full_listing(root: Path) -> dict[str, tuple[object, ...]]:
    """relative path -> ("dir",), ("link", target) or ("file", executable, size, sha256)."""
    found: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", bool(st.st_mode & 0o100), st.st_size, sha256_file(path))
    return found
