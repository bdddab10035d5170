"""A bounded fuzz test: random single-byte flips of the example medium, as a directory, an ISO
9660 image and a FAT32 image, each judged by `verify` in-process.

Every flip is seeded (`random.Random(SEED)`), so a failure names the seed and the offset that
reproduce it. The contract: the exit status is 0, 1 or 2 (never an internal error, never a
traceback); a flip inside any file's data is caught (exit 1 or 2); a flip verify calls ok
changed no file's content as the reader reads it back (it was in padding or unused space), nor
as independent readers see it: every name, directory and byte the same through bsdtar (Rock
Ridge), 7z (Joliet) and isoinfo (the plain ISO 9660 names), or through mcopy (mtools) and
`fsck.fat -n` (dosfstools), as on the unflipped image; and no flip makes verify hang (each is
bounded by an alarm)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from conftest import Example, run_cli

from mediabuilder import cli
from mediabuilder.media.fat_source import FatSource
from mediabuilder.media.iso_source import IsoSource
from mediabuilder.media.source import MediaSource, open_source

pytestmark = pytest.mark.integration

HOST = "alpha"
FLIPS = 200
SEED = 12
PER_FLIP = 60  # seconds: a guard against hangs, not a measurement
SMALL = ("manifest.json", "media-key.pub", "registry.json", "install.sh")


@dataclass(frozen=True)
class Media:
    key: str
    dir: Path
    iso: Path
    fat32: Path


@pytest.fixture(scope="module")
def media(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Media:
    base = tmp_path_factory.mktemp("fuzz")
    outputs = {
        "dir": (base / "media", ()),
        "iso": (base / "media.iso", ("--format", "iso", "--label", "NIXOS_TEST")),
        "fat32": (base / "media.img", ("--format", "fat32")),
    }
    for name, (out, args) in outputs.items():
        proc = run_cli("build", "--flake", f"{example.flake}#{HOST}", "--cache", base / "cache", "--output", out,
                       *args)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    key = (base / "media" / "media-key.pub").read_text().strip()
    return Media(key, outputs["dir"][0], outputs["iso"][0], outputs["fat32"][0])


class FlipTimeout(BaseException):
    """A flip verify did not judge within PER_FLIP seconds (not an Exception: cli.main must not
    turn it into an exit status)."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise FlipTimeout


def verify(target: Path, key: str, capsys: pytest.CaptureFixture[str], where: str) -> tuple[int, str]:
    """`mediabuilder verify TARGET --trusted-key KEY` in this process: its exit status, checked
    to be 0, 1 or 2 with no traceback, and its standard output (the faults)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_FLIP)
    try:
        code = cli.main(["verify", str(target), "--trusted-key", key])
    except FlipTimeout:
        raise AssertionError(f"{where}: verify did not finish within {PER_FLIP} s") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), f"{where}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{where}: {err}"
    return code, out


def flip(path: Path, offset: int, mask: int) -> None:
    """XOR the byte at `offset` with `mask`, in place (twice restores it)."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def summary(fmt: str, outcomes: Counter[int], harmless: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The counts per outcome, printed past capsys (`pytest -s` and the CI log show them)."""
    line = (f"{fmt}: {sum(outcomes.values())} flips: {outcomes[1]} faults (exit 1), {outcomes[2]} refused "
            f"(exit 2), {outcomes[0]} {harmless}")
    with capsys.disabled():
        print(line)
    return line


def dir_targets(root: Path, rng: random.Random) -> Iterator[tuple[Path, int]]:
    """(file, offset) to flip: first one in each small file everything hangs on, then files
    chosen half by size, half uniformly (so small files get their share)."""
    files = sorted((p, p.stat().st_size) for p in root.rglob("*") if p.is_file() and p.stat().st_size)
    narinfos = [p for p, _ in files if p.suffix == ".narinfo"]
    forced = [root / name for name in SMALL] + [narinfos[0], narinfos[-1]]
    for index in range(FLIPS):
        if index < len(forced):
            path = forced[index]
        elif rng.random() < 0.5:
            path = rng.choices([p for p, _ in files], weights=[n for _, n in files])[0]
        else:
            path = rng.choice(files)[0]
        yield path, rng.randrange(path.stat().st_size)


def test_dir_flips(media: Media, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "media"
    shutil.copytree(media.dir, scratch, symlinks=True)
    rng = random.Random(SEED)
    outcomes: Counter[int] = Counter()
    caught: list[str] = []
    for path, offset in dir_targets(scratch, rng):
        mask = rng.randrange(1, 256)
        where = f"dir, seed {SEED}: {path.relative_to(scratch)} byte {offset} ^ {mask:#04x}"
        flip(path, offset, mask)
        code, _ = verify(scratch, media.key, capsys, where)
        flip(path, offset, mask)
        outcomes[code] += 1
        if code == 0:
            caught.append(where)
    line = summary("dir", outcomes, "passed", capsys)
    assert caught == [], f"{line}; flips in file data that verify called ok: {caught}"
    assert verify(scratch, media.key, capsys, "dir, restored")[0] == 0


def contents(source: MediaSource) -> dict[str, str]:
    """Every file's sha256, as the reader reads it."""
    digests = {}
    for rel, _ in source.files():
        with source.open(rel) as f:
            digests[rel] = hashlib.file_digest(f, "sha256").hexdigest()  # type: ignore[arg-type]
    return digests


def image_offsets(image: Path) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """The data extents of every file (from the reader) and every file's content; the offsets
    to flip are drawn from these by `image_targets`."""
    with open_source(image) as source:
        assert isinstance(source, IsoSource | FatSource)
        extents = sorted((o, n) for ext, _ in source._files.values() for o, n in ext if n)
        return extents, contents(source)


def image_targets(size: int, extents: list[tuple[int, int]], rng: random.Random) -> Iterator[int]:
    """FLIPS offsets: even ones inside file data (an extent chosen half by length, half
    uniformly, so small files get their share); odd ones half before the first file's data
    (where the volume descriptors, boot sector, FATs and first directories are), half anywhere
    in the image (directories, free space, padding)."""
    metadata_end = extents[0][0]
    for index in range(FLIPS):
        if index % 2:
            yield rng.randrange(metadata_end if index % 4 == 1 else size)
            continue
        if rng.random() < 0.5:
            offset, length = rng.choices(extents, weights=[n for _, n in extents])[0]
        else:
            offset, length = rng.choice(extents)
        yield offset + rng.randrange(length)


def tree(root: Path) -> dict[str, str]:
    """Every file's sha256 and every directory ("/") under `root`, by relative path."""
    seen = {}
    for top, dirnames, filenames in os.walk(root):
        for name in dirnames:
            seen[Path(top, name).relative_to(root).as_posix()] = "/"
        for name in filenames:
            path = Path(top, name)
            seen[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def tool(*argv: str | Path, cwd: Path | None = None) -> str:
    """A reader's output, or its failure as text (which then differs from the unflipped image's)."""
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LANG": "C.UTF-8"}
    try:
        proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, errors="replace",
                              timeout=PER_FLIP, env=env, cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return f"{argv[0]}: timed out"
    return f"exit {proc.returncode}\n{proc.stdout}" + (proc.stderr if proc.returncode else "")


def others(fmt: str, image: Path, offset: int) -> dict[str, object]:
    """What independent readers see in the image: each reader's files (names, directories,
    sha256) or listing, by reader."""
    views: dict[str, object] = {}
    readers: dict[str, Callable[[Path], tuple[str | Path, ...]]] = {
        "bsdtar (Rock Ridge)": lambda dest: ("bsdtar", "-xf", image, "-C", dest),
        "7z (Joliet)": lambda dest: ("7z", "x", "-y", image, f"-o{dest}"),
    } if fmt == "iso" else {
        "mcopy": lambda dest: ("mcopy", "-s", "-n", "-i", f"{image}@@{offset}", "::/*", f"{dest}/"),
    }
    for reader, argv in readers.items():
        with tempfile.TemporaryDirectory(prefix="fuzz-read-") as dest:
            status = tool(*argv(Path(dest))).split("\n", 1)[0]
            views[reader] = (status, tree(Path(dest)))
    if fmt == "iso":
        views["isoinfo (ISO 9660)"] = tool("isoinfo", "-f", "-i", image)
    else:
        views["fsck.fat -n"] = tool("fsck.fat", "-n", image).replace(str(image), "IMAGE")
    return views


def inside(offset: int, extents: list[tuple[int, int]]) -> bool:
    return any(o <= offset < o + n for o, n in extents)


@pytest.mark.parametrize("fmt", ["iso", "fat32"])
def test_image_flips(media: Media, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = getattr(media, fmt)
    scratch = tmp_path / original.name
    shutil.copyfile(original, scratch)
    rng = random.Random(SEED)
    extents, want = image_offsets(original)
    with open_source(original) as source:
        fat_offset = source.offset if isinstance(source, FatSource) else 0
        want_tree = {**want, **dict.fromkeys(source.dirs(), "/")}
    baseline = others(fmt, original, fat_offset)
    for reader, view in baseline.items():  # every reader sees the unflipped medium as verify does
        if isinstance(view, tuple):
            assert view == ("exit 0", want_tree), f"{fmt}: {reader} reads the intact image differently"
        else:
            assert str(view).startswith("exit 0"), f"{fmt}: {reader}: {view}"
    outcomes: Counter[int] = Counter()
    cross_checked = 0
    wrong: list[str] = []
    in_data = 0
    for offset in image_targets(scratch.stat().st_size, extents, rng):
        mask = rng.randrange(1, 256)
        where = f"{fmt}, seed {SEED}: byte {offset} ^ {mask:#04x}"
        flip(scratch, offset, mask)
        code, _ = verify(scratch, media.key, capsys, where)
        data = inside(offset, extents)
        in_data += data
        if code == 0 and data:
            wrong.append(f"{where}: inside file data, verify called it ok")
        elif code == 0:
            with open_source(scratch) as source:
                if contents(source) != want:
                    wrong.append(f"{where}: files read back differently, verify called it ok")
            seen = others(fmt, scratch, fat_offset)
            cross_checked += 1
            wrong += [f"{where}: {reader} sees another medium, verify called it ok"
                      for reader, view in seen.items() if view != baseline[reader]]
        flip(scratch, offset, mask)
        outcomes[code] += 1
    line = summary(fmt, outcomes, "harmless (exit 0, padding)", capsys)
    line += f"; {in_data} inside file data; {cross_checked} harmless ones read by {', '.join(baseline)}"
    with capsys.disabled():
        print(f"{fmt}: {in_data} inside file data; the {cross_checked} harmless ones read by {', '.join(baseline)}")
    assert in_data >= FLIPS // 2, line
    assert wrong == [], f"{line}: {wrong}"
    assert verify(scratch, media.key, capsys, f"{fmt}, restored")[0] == 0


def test_corrupt_manifest_nar_is_a_fault(media: Media, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flip of the zstd magic of the manifest NAR (zstd itself refuses the frame): a fault
    naming the NAR, not an internal error."""
    scratch = tmp_path / "media"
    shutil.copytree(media.dir, scratch, symlinks=True)
    digest = Path((scratch / "manifest.storepath").read_text().strip()).name.split("-")[0]
    fields = dict(line.split(": ", 1) for line in (scratch / "cache" / f"{digest}.narinfo").read_text().splitlines())
    assert fields["Compression"] == "zstd"
    nar = scratch / "cache" / fields["URL"]
    flip(nar, 0, 0xFF)
    code, out = verify(scratch, media.key, capsys, "manifest NAR")
    assert code == 1, out
    assert f"cannot read the signed manifest from cache/{fields['URL']}: zstd decompress error" in out, out
