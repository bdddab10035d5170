#!/usr/bin/env python3
"""Benchmark whole `mediabuilder build`s of images against this machine's limits, in one run.

    python scripts/bench_build.py            (`just bench`, after scripts/bench.py)

With the example flake (examples/prepare.sh, host alpha) and a warm cache, prints:

  1. the bench tree (scripts/bench.py's synthetic set as --store-paths): `build --format iso`
     and `--format fat32` / `build --format dir` followed by `xorriso -as mkisofs -R -J`, or by
     `mkfs.fat -F 32` + `mcopy -s` into an image of the same size, + fsync (target <= 0.8);
  2. a medium holding one 4.5 GiB path (`--compression none`): the whole ISO and FAT32 build /
     copying its NAR once to the same disk + fsync (target <= 1.3), when the disk has room
     (19 GiB free: the path, its cache entry, the image and its split parts);
  3. the peak RSS of every build (RUSAGE_CHILDREN of a dedicated wrapper; target <= 256 MiB).

Each timing is the median of ROUNDS runs, alternating ours and the reference, with its spread
(fastest-slowest); each ratio is the median of the ratios taken round by round, with theirs. Data lives under
$MEDIABUILDER_BENCH_DIR/build (default /var/tmp/mediabuilder-bench/build); the big path stays in
the store for later runs (`nix-store --delete` it to free the space). No wall-clock assertions:
this prints numbers; the exit status is 0 unless something failed to run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: the set, the wrapper, the table)
import bench_images  # noqa: E402  (the 4.5 GiB of keystream)

from mediabuilder.media import fat32  # noqa: E402

REPO = bench.REPO
WORK = bench.BENCH_DIR / "build"
HOST = "alpha"
ROUNDS = 3
GiB = 1024**3
MiB = 1024**2
BIG_FILE = 4 * GiB + GiB // 2
BIG_ROOM = 4 * BIG_FILE + GiB  # the path, its cache entry, the image and (before one pass) its parts
RSS_TARGET = 256 * MiB

REF_ISO = 'set -e; tree=$1; img=$2; xorriso -as mkisofs -R -J -quiet -o "$img" "$tree"; sync "$img"'
REF_FAT = ('set -e; tree=$1; img=$2; size=$3; rm -f "$img"; truncate -s "$size" "$img"; '
           'mkfs.fat -F 32 -n BENCH "$img" >/dev/null; mcopy -s -i "$img" "$tree"/* ::/; sync "$img"')
COPY = 'set -e; src=$1; out=$2; cat "$src" > "$out"; sync "$out"'


def example() -> Path:
    """The example flake, prepared once under WORK/example."""
    dest = WORK / "example"
    if not (dest / "flake" / "flake.lock").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        bench.say("preparing the example flake ...")
        subprocess.run(["bash", str(REPO / "examples" / "prepare.sh"), str(dest)], env=bench.env(), check=True)
    return dest / "flake"


def big_path() -> str:
    """A store path holding one 4.5 GiB file of keystream, made once (its name in a marker file)."""
    marker = WORK / "big-path"
    if marker.is_file() and bench.all_valid([marker.read_text().strip()]):
        return marker.read_text().strip()
    bench.say("adding a 4.5 GiB store path (once) ...")
    staging = WORK / "mediabuilder-bench-big"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    bench_images.keystream(staging / "blob.bin", BIG_FILE)
    path = bench.check_output(["nix-store", "--add", str(staging)]).strip()
    shutil.rmtree(staging)
    marker.write_text(path + "\n")
    return path


def build(flake: Path, cache: Path, out: Path, fmt: str, extra: list[str]) -> tuple[float, int]:
    """(wall s, peak RSS bytes) of one `mediabuilder build`; the output is left for the caller."""
    wall, rss, _ = bench.measured(f"build-{fmt}", [
        *bench.MEDIABUILDER, "build", "--flake", f"{flake}#{HOST}", "--cache", str(cache), "--output", str(out),
        "--format", fmt, *extra])
    return wall, rss


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Case:
    """One case's builds: their times by name, round by round, and the largest peak RSS."""

    flake: Path
    cache: Path
    extra: list[str]
    rounds: bench.Rounds = field(default_factory=bench.Rounds)
    peak: int = 0

    def build(self, name: str, out: Path, fmt: str, keep: bool = False) -> float:
        """Time one build into `out` as `name`; the output is removed unless `keep`."""
        wall, rss = build(self.flake, self.cache, out, fmt, self.extra)
        self.rounds.add(name, wall)
        self.peak = max(self.peak, rss)
        if not keep:
            remove(out)
        return wall

    def shell(self, name: str, script: str, *args: str) -> float:
        """Time a reference or limit script (bash -c SCRIPT ref ARGS...) as `name`."""
        wall, _, _ = bench.measured(name, ["bash", "-c", script, "ref", *args])
        return self.rounds.add(name, wall)


def tree_case(flake: Path, paths: list[str]) -> Case:
    """ours iso / fat32 against dir (+ xorriso, + mkfs.fat/mcopy), round by round."""
    case = Case(flake, WORK / "cache-tree", [a for p in paths for a in ("--store-path", p)])
    tree, image = WORK / "media", WORK / "media.img"
    remove(tree)
    bench.say("bench tree: filling the cache (not timed) ...")
    build(flake, case.cache, tree, "dir", case.extra)
    size, _ = fat32.image_geometry(fat32.scan(tree).content, None, "none")
    remove(tree)
    for rnd in range(ROUNDS):
        for fmt, ref, script, args in (("iso", "dir+xorriso", REF_ISO, []),
                                       ("fat32", "dir+mkfs.fat", REF_FAT, [str(size)])):
            bench.say(f"  bench tree, round {rnd + 1}/{ROUNDS}: build --format {fmt}, then dir + {ref[4:]} ...")
            ours = case.build(fmt, image, fmt)
            dir_wall = case.build(f"dir ({fmt} round)", tree, "dir", keep=True)
            ref_wall = case.shell(ref[4:], script, str(tree), str(image), *args)
            case.rounds.add(ref, dir_wall + ref_wall)
            bench.say(f"    {fmt} {ours:.1f} s; dir {dir_wall:.1f} s + {ref[4:]} {ref_wall:.1f} s")
            remove(tree)
            remove(image)
    return case


def big_case(flake: Path) -> tuple[Case, int] | None:
    """ours iso / fat32 with the 4.5 GiB path against copying its NAR once, round by round, and
    the NAR's size; None without room."""
    free = shutil.disk_usage(WORK).free
    marker = WORK / "big-path"
    have = marker.is_file() and bench.all_valid([marker.read_text().strip()])
    if free + (BIG_FILE if have else 0) < BIG_ROOM:
        bench.say(f"4.5 GiB case skipped: {free / GiB:.1f} GiB free on {WORK}, it needs {BIG_ROOM / GiB:.0f}")
        return None
    case = Case(flake, WORK / "cache-big", ["--store-path", big_path(), "--compression", "none"])
    image, copy = WORK / "big.img", WORK / "big.copy"
    bench.say("4.5 GiB path: filling the cache (not timed) ...")
    build(flake, case.cache, image, "iso", case.extra)
    remove(image)
    nar = max((case.cache / "nar").iterdir(), key=lambda p: p.stat().st_size)
    nar_size = nar.stat().st_size
    try:
        for rnd in range(ROUNDS):
            for fmt in ("iso", "fat32"):
                bench.say(f"  4.5 GiB path, round {rnd + 1}/{ROUNDS}: build --format {fmt} ...")
                bench.say(f"    {case.build(fmt, image, fmt):.1f} s, peak RSS so far {case.peak / MiB:.0f} MiB")
            bench.say(f"  4.5 GiB path, round {rnd + 1}/{ROUNDS}: copying its NAR ...")
            bench.say(f"    {case.shell('copy', COPY, str(nar), str(copy)):.1f} s")
            remove(copy)
    finally:
        remove(image)
        remove(copy)
        shutil.rmtree(case.cache, ignore_errors=True)
    return case, nar_size


def main() -> int:
    for tool in ("xorriso", "mkfs.fat", "mcopy", "openssl", "sync", "nix"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    paths, _ = bench.build_set()
    flake = example()
    tree = tree_case(flake, paths)
    big = big_case(flake)
    t = tree.rounds
    rows: list[tuple[str, str, str, str]] = [("bench tree", f"example host {HOST} + {len(paths)} store paths", "", "")]
    for fmt, ref in (("iso", "dir+xorriso"), ("fat32", "dir+mkfs.fat")):
        rows += [(f"{fmt}: build --format {fmt}", t.text(fmt), "", ""),
                 (f"{fmt}: build --format dir + {ref[4:]} + fsync",
                  f"{t.text(ref)}: dir {t.text(f'dir ({fmt} round)')}", "", ""),
                 (f"(1) {fmt}: ours / dir + {ref[4:]}", t.ratio_text(fmt, ref), "<= 0.8",
                  bench.verdict(t.ratio(fmt, ref), 0.8))]
    peaks = [tree.peak]
    if big is None:
        rows.append(("(2) one 4.5 GiB path", "skipped: not enough free disk", "<= 1.3", "?"))
    else:
        case, nar_size = big
        b = case.rounds
        peaks.append(case.peak)
        rows.append(("limit: its NAR copied once + fsync", f"{b.text('copy')} ({nar_size / GiB:.2f} GiB)", "", ""))
        for fmt in ("iso", "fat32"):
            rows += [(f"{fmt}: build, one 4.5 GiB path", b.text(fmt), "", ""),
                     (f"(2) {fmt}: build / NAR copy", b.ratio_text(fmt, "copy"), "<= 1.3",
                      bench.verdict(b.ratio(fmt, "copy"), 1.3))]
    peak = max(peaks)
    rows.append(("(3) peak RSS, every build", f"{peak / MiB:.0f} MiB", "<= 256 MiB", bench.verdict(peak, RSS_TARGET)))
    bench.print_table(rows)
    bench.print_footer(ROUNDS, WORK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
