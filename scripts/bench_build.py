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

Each timing is the median of ROUNDS runs, alternating ours and the reference. Data lives under
$MEDIABUILDER_BENCH_DIR/build (default /var/tmp/mediabuilder-bench/build); the big path stays in
the store for later runs (`nix-store --delete` it to free the space). No wall-clock assertions:
this prints numbers; the exit status is 0 unless something failed to run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
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


def tree_case(flake: Path, paths: list[str]) -> dict[str, float | int]:
    """Medians: ours iso / fat32, dir (+ xorriso, + mkfs.fat/mcopy); the largest peak RSS."""
    cache = WORK / "cache-tree"
    extra = [a for p in paths for a in ("--store-path", p)]
    tree, image = WORK / "media", WORK / "media.img"
    remove(tree)
    bench.say("bench tree: filling the cache (not timed) ...")
    build(flake, cache, tree, "dir", extra)
    content = fat32.scan(tree).content
    size, _ = fat32.image_geometry(content, None, "none")
    remove(tree)
    times: dict[str, list[float]] = {k: [] for k in ("iso", "fat32", "dir+xorriso", "dir+mkfs.fat")}
    peak = 0
    for rnd in range(ROUNDS):
        for fmt, ref_name, script, args in (("iso", "dir+xorriso", REF_ISO, []),
                                            ("fat32", "dir+mkfs.fat", REF_FAT, [str(size)])):
            bench.say(f"  bench tree, round {rnd + 1}/{ROUNDS}: build --format {fmt} ...")
            wall, rss = build(flake, cache, image, fmt, extra)
            times[fmt].append(wall)
            peak = max(peak, rss)
            remove(image)
            bench.say(f"  bench tree, round {rnd + 1}/{ROUNDS}: build --format dir + {ref_name[4:]} ...")
            dir_wall, rss = build(flake, cache, tree, "dir", extra)
            peak = max(peak, rss)
            ref_wall, _, _ = bench.measured(f"ref-{fmt}", ["bash", "-c", script, "ref", str(tree), str(image), *args])
            times[ref_name].append(dir_wall + ref_wall)
            bench.say(f"    {fmt} {wall:.1f} s; dir {dir_wall:.1f} s + {ref_name[4:]} {ref_wall:.1f} s")
            remove(tree)
            remove(image)
    return {**{k: statistics.median(v) for k, v in times.items()}, "rss": peak}


def big_case(flake: Path) -> dict[str, float | int] | None:
    """Medians: ours iso / fat32 with the 4.5 GiB path, and copying its NAR once; None without room."""
    free = shutil.disk_usage(WORK).free
    marker = WORK / "big-path"
    have = marker.is_file() and bench.all_valid([marker.read_text().strip()])
    if free + (BIG_FILE if have else 0) < BIG_ROOM:
        bench.say(f"4.5 GiB case skipped: {free / GiB:.1f} GiB free on {WORK}, it needs {BIG_ROOM / GiB:.0f}")
        return None
    path = big_path()
    cache = WORK / "cache-big"
    image, copy = WORK / "big.img", WORK / "big.copy"
    extra = ["--store-path", path, "--compression", "none"]
    bench.say("4.5 GiB path: filling the cache (not timed) ...")
    build(flake, cache, image, "iso", extra)
    remove(image)
    nar = max((cache / "nar").iterdir(), key=lambda p: p.stat().st_size)
    nar_size = nar.stat().st_size
    times: dict[str, list[float]] = {"iso": [], "fat32": [], "copy": []}
    peak = 0
    try:
        for rnd in range(ROUNDS):
            for fmt in ("iso", "fat32"):
                bench.say(f"  4.5 GiB path, round {rnd + 1}/{ROUNDS}: build --format {fmt} ...")
                wall, rss = build(flake, cache, image, fmt, extra)
                times[fmt].append(wall)
                peak = max(peak, rss)
                remove(image)
                bench.say(f"    {wall:.1f} s, peak RSS {rss / MiB:.0f} MiB")
            bench.say(f"  4.5 GiB path, round {rnd + 1}/{ROUNDS}: copying its NAR ...")
            wall, _, _ = bench.measured("limit-copy-nar", ["bash", "-c", COPY, "copy", str(nar), str(copy)])
            times["copy"].append(wall)
            remove(copy)
            bench.say(f"    {wall:.1f} s")
    finally:
        remove(image)
        remove(copy)
        shutil.rmtree(cache, ignore_errors=True)
    return {**{k: statistics.median(v) for k, v in times.items()}, "rss": peak, "nar": nar_size}


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISSED"


def main() -> int:
    for tool in ("xorriso", "mkfs.fat", "mcopy", "openssl", "sync", "nix"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    paths, _ = bench.build_set()
    flake = example()
    tree = tree_case(flake, paths)
    big = big_case(flake)
    rows: list[tuple[str, str, str, str]] = [("bench tree", f"example host {HOST} + {len(paths)} store paths", "", "")]
    for fmt, ref in (("iso", "dir+xorriso"), ("fat32", "dir+mkfs.fat")):
        ratio = tree[fmt] / tree[ref]
        rows += [(f"{fmt}: build --format {fmt}", f"{tree[fmt]:.1f} s", "", ""),
                 (f"{fmt}: build --format dir + {ref[4:]} + fsync", f"{tree[ref]:.1f} s", "", ""),
                 (f"(1) {fmt}: ours / dir + {ref[4:]}", f"{ratio:.3f}", "<= 0.8", verdict(ratio, 0.8))]
    peaks = [int(tree["rss"])]
    if big is None:
        rows.append(("(2) one 4.5 GiB path", "skipped: not enough free disk", "<= 1.3", "?"))
    else:
        peaks.append(int(big["rss"]))
        rows.append(("limit: its NAR copied once + fsync", f"{big['copy']:.1f} s ({big['nar'] / GiB:.2f} GiB)", "", ""))
        for fmt in ("iso", "fat32"):
            ratio = big[fmt] / big["copy"]
            rows += [(f"{fmt}: build, one 4.5 GiB path", f"{big[fmt]:.1f} s", "", ""),
                     (f"(2) {fmt}: build / NAR copy", f"{ratio:.3f}", "<= 1.3", verdict(ratio, 1.3))]
    peak = max(peaks)
    rows.append(("(3) peak RSS, every build", f"{peak / MiB:.0f} MiB", "<= 256 MiB", verdict(peak, RSS_TARGET)))
    bench.print_table(rows)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine)")
    print(f"medians of {ROUNDS} rounds; cores: {os.cpu_count()}; data: {WORK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
