#!/usr/bin/env python3
"""Peak memory of the image writers on a large medium: 5,000 NARs, 20 GiB.

    python scripts/bench_large.py          (or: just bench-large)

The issue asks that a closure of 5,000 paths and 20 GiB write with memory bounded by a constant,
not by file or image size. This builds a media tree of that shape under
$MEDIABUILDER_BENCH_DIR/large (default /var/tmp/mediabuilder-bench/large): the media skeleton,
5,000 narinfos and 5,000 NAR files from 64 KiB to 64 MiB (log-uniform, seeded) plus one 4.5 GiB
NAR in the two parts the media tree splits it into, 20 GiB in all. The NAR files are sparse
(the writers read them like any other file; only the images take real space, one at a time:
about 21 GiB free is needed). Then `write_iso` and `write_fat32` each write the whole tree,
in a wrapper that reports the peak RSS of the writer and every tool it runs, and the same is
measured on a tree of 50 NARs / 1 GiB for comparison: bounded means the two peaks are about the
same. Target: <= 256 MiB. Prints numbers; no assertions on time.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: its table printer)
import bench_images as images  # noqa: E402  (the wrapper, the skeleton, the writers' command lines)

from mediabuilder.media.split import PART_SIZE  # noqa: E402

WORK = images.BENCH_DIR / "large"
MiB = 1024**2
GiB = 1024**3
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def tree(root: Path, count: int, total: int, big: int, seed: int) -> tuple[int, int]:
    """A media tree of `count` NARs summing to `total` bytes, one of them `big` bytes (split
    into parts); (files, bytes)."""
    shutil.rmtree(root, ignore_errors=True)
    images.media_skeleton(root)
    nar = root / "cache" / "nar"
    rng = random.Random(seed)
    weights = [2 ** rng.uniform(16, 26) for _ in range(count - 1)]
    scale = (total - big) / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    files = nbytes = 0
    for size in sizes:
        name = "".join(rng.choice(NIX32) for _ in range(52))
        with open(nar / f"{name}.nar.zst", "wb") as f:
            f.truncate(size)
        (root / "cache" / f"{name[:32]}.narinfo").write_text(f"StorePath: /nix/store/{name[:32]}-x\n")
        files += 2
        nbytes += size
    name = "".join(rng.choice(NIX32) for _ in range(52))
    left, part = big, 0
    while left:
        size = min(PART_SIZE, left)
        with open(nar / f"{name}.nar.part{part:03d}", "wb") as f:
            f.truncate(size)
        left -= size
        part += 1
        files += 1
        nbytes += size
    (root / "cache" / f"{name[:32]}.narinfo").write_text(f"StorePath: /nix/store/{name[:32]}-big\n")
    return files + 1, nbytes


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(WORK).free
    if free < 22 * GiB:
        sys.exit(f"bench: {WORK} has {free / GiB:.1f} GiB free; the 20 GiB images need 22 GiB")
    rows: list[tuple[str, str, str, str]] = []
    results = {}
    for label, count, total in (("small", 50, 1 * GiB), ("large", 5000, 20 * GiB)):
        root = WORK / label
        images.say(f"{label} tree: {count} NARs, {total / GiB:.0f} GiB ...")
        files, nbytes = tree(root, count, total, images.BIG_FILE if label == "large" else 64 * MiB, seed=count)
        try:
            results[label] = (files, nbytes, images.peak_rss(root, WORK / "out.img"))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for label, (files, nbytes, measured) in results.items():
        rows.append((f"{label} tree", f"{files} files, {nbytes / GiB:.2f} GiB", "", ""))
        for fmt, (wall, peak) in measured.items():
            rate = nbytes / MiB / wall
            rows.append(images.rss_row(f"  peak RSS, write_{fmt}", peak, f"{wall:.1f} s, {rate:.0f} MiB/s"))
    bench.print_table(rows)
    print(f"\nNAR files sparse; images written to {WORK} and deleted; cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
