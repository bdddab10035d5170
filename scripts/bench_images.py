#!/usr/bin/env python3
"""Benchmark the image writers against the reference tools, measured in the same run.

    python scripts/bench_images.py

On a media-like tree (the binary cache `scripts/bench.py` filled, hard-linked, when it exists:
~2,200 narinfo and NAR files; otherwise ~1,200 files / ~800 MB built from this machine's
/usr binaries and libraries), prints:

  1. ISO: ours (`write_iso`) / `xorriso -as mkisofs -R -J -o X TREE` + fsync of X (target <= 1.1);
  2. FAT32: ours (`write_fat32`, no partition table) / `mkfs.fat -F 32` + `mcopy -s` into an
     image of the same size and cluster size + fsync (target <= 1.1);
  3. each writer / this machine's limit for that work, measured in the same rounds: a plain
     copy of the tree's bytes to the same disk (`cat` of every file into one file + fsync of
     it), reported as a ratio (no target of its own: it is what `just bench-build` aims at);
  4. peak RSS of each writer writing a tree holding one 4.5 GiB file (as the two parts the
     media tree splits it into), from RUSAGE_CHILDREN of a dedicated wrapper process, so it
     covers the writer and every tool it runs (target <= 256 MiB).

Ours fsyncs the image before renaming it into place, so the references are timed with an
fsync of their image too (`sync FILE`); the table shows the reference's time without it as
well. Each timing is the median of ROUNDS runs, alternating reference and ours, page cache warm
(a run takes about a second, and on a shared machine the best of two was often one lucky run),
with its spread (fastest-slowest); each ratio is the median of the round-by-round ratios.

Data lives under $MEDIABUILDER_BENCH_DIR/images (default /var/tmp/mediabuilder-bench/images),
never in the repository; images are deleted as soon as they are measured. No wall-clock
assertions: this prints numbers; the exit status is 0 unless something failed to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: its table printer)

from mediabuilder.media import fat32  # noqa: E402
from mediabuilder.media.split import PART_SIZE, split_file  # noqa: E402

BENCH_DIR = Path(os.environ.get("MEDIABUILDER_BENCH_DIR", "/var/tmp/mediabuilder-bench"))
WORK = BENCH_DIR / "images"
SOURCES = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/bin"))
MiB = 1024**2
GiB = 1024**3
SYNTH_FILES = 1200
SYNTH_BYTES = 800 * 1000 * 1000
BIG_FILE = 4 * GiB + GiB // 2
ROUNDS = 5
LABEL = "NIXOS_BENCH"
RSS_TARGET = 256 * MiB

# Runs argv, then prints its wall time and the peak RSS of the process tree it waited for.
WRAPPER = r"""
import json, resource, subprocess, sys, time
argv = sys.argv[1:]
t = time.monotonic()
proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
wall = time.monotonic() - t
print(json.dumps({"rc": proc.returncode, "wall": wall, "err": proc.stderr.decode(errors="replace")[-2000:],
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

OURS_ISO = ("import sys; from pathlib import Path; from mediabuilder.media.iso import write_iso; "
            "write_iso(Path(sys.argv[1]), Path(sys.argv[2]), label=sys.argv[3])")
OURS_FAT32 = ("import sys; from pathlib import Path; from mediabuilder.media.fat32 import write_fat32; "
              "write_fat32(Path(sys.argv[1]), Path(sys.argv[2]), label=sys.argv[3])")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measured(name: str, argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of argv in a dedicated wrapper; exits when it fails."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], env=env(), check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout)
    if result["rc"] != 0:
        sys.exit(f"bench: {name} failed with exit status {result['rc']}:\n{result['err']}")
    return result["wall"], result["maxrss_kib"] * 1024


def fsynced(path: Path) -> float:
    started = time.monotonic()
    subprocess.run(["sync", str(path)], check=True)
    return time.monotonic() - started


# The trees


def place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def media_skeleton(root: Path) -> None:
    """The small files every medium has besides its cache."""
    (root / "cache" / "nar").mkdir(parents=True, exist_ok=True)
    for sub in ("log", "realisations"):
        (root / "cache" / sub).mkdir(exist_ok=True)
    (root / "flake").mkdir(exist_ok=True)
    for name in ("install.sh", "install-host.sh", "install-disk.sh", "install-upgrade.sh", "install-rebuild.sh"):
        script = root / name
        script.write_bytes((REPO / "mediabuilder" / "media" / name).read_bytes())
        script.chmod(0o755 if name == "install.sh" else 0o644)
    for name, text in (("README.txt", "bench\n"), ("manifest.json", "{}\n"), ("registry.json", "{}\n"),
                       ("media-key.pub", "bench-1:AAAA\n"), ("manifest.storepath", "/nix/store/x\n"),
                       ("flake/repo.bundle", "# v2 git bundle\n")):
        (root / name).write_text(text)


def from_bench_cache(root: Path) -> str | None:
    """The binary cache `scripts/bench.py` filled, hard-linked into a media tree; None if absent."""
    cache = BENCH_DIR / "cache-ours"
    if not (cache / "nar").is_dir() or len(list(cache.glob("*.narinfo"))) < 1000:
        return None
    media_skeleton(root)
    for path in cache.iterdir():
        if path.is_file():
            place(path, root / "cache" / path.name)
    for path in (cache / "nar").iterdir():
        place(path, root / "cache" / "nar" / path.name)
    return f"scripts/bench.py's binary cache ({cache})"


def source_files() -> list[Path]:
    files = []
    for top in SOURCES:
        for dirpath, _, names in os.walk(top):
            for n in names:
                p = Path(dirpath) / n
                if not p.is_symlink() and p.is_file() and 0 < p.stat().st_size <= 6 * MiB and os.access(p, os.R_OK):
                    files.append(p)
    files.sort()
    if not files:
        sys.exit("bench: no files in /usr/bin and /usr/lib/x86_64-linux-gnu to build the tree from")
    return files


def synthetic(root: Path) -> str:
    """~1,200 files / ~800 MB: half narinfo-sized text, half NAR-sized concatenations of binaries."""
    media_skeleton(root)
    rng = random.Random(20231101)
    files = source_files()
    nars = SYNTH_FILES // 2
    per_nar = SYNTH_BYTES // nars
    cursor = 0
    for i in range(nars):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        (root / "cache" / f"{digest[:32]}.narinfo").write_text(f"StorePath: /nix/store/{digest[:32]}-p{i}\n" * 8)
        budget = int(per_nar * rng.uniform(0.2, 1.8))
        with (root / "cache" / "nar" / f"{digest}.nar.zst").open("wb") as out:
            written = 0
            while written < budget:
                data = files[cursor % len(files)].read_bytes()[: budget - written]
                cursor += 1
                out.write(data)
                written += len(data)
    return "synthetic, from /usr binaries and libraries"


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                while f.read(8 * MiB):
                    pass


def keystream(path: Path, size: int) -> None:
    """`size` bytes of AES-CTR keystream (incompressible) into `path`."""
    with path.open("wb") as out:
        gen = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-pass", "pass:bench", "-nosalt", "-pbkdf2",
                                "-in", "/dev/zero"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert gen.stdout is not None
        subprocess.run(["head", "-c", str(size)], stdin=gen.stdout, stdout=out, check=True)
        gen.stdout.close()
        gen.wait()


def big_tree(root: Path) -> None:
    """A media skeleton plus one 4.5 GiB NAR of AES-CTR keystream, split as the media tree does."""
    media_skeleton(root)
    whole = root.parent / "big.nar"
    keystream(whole, BIG_FILE)
    split_file(whole, root / "cache" / "nar", PART_SIZE)
    whole.unlink()


# The measurements


def reference_fat32(tree: Path, image: Path, size: int, cluster: int) -> list[str]:
    entries = [str(p) for p in sorted(tree.iterdir())]
    script = ('set -e; img=$1; size=$2; spc=$3; shift 3; rm -f "$img"; truncate -s "$size" "$img"; '
              'mkfs.fat -F 32 -S 512 -s "$spc" -n BENCH "$img" >/dev/null; mcopy -s -i "$img" "$@" ::/')
    return ["bash", "-c", script, "ref", str(image), str(size), str(cluster // 512), *entries]


# The limit: the same bytes, in one stream, to one file on the same disk, fsynced.
PLAIN_COPY = ('set -eo pipefail; tree=$1; out=$2; find "$tree" -type f -print0 | sort -z '
              '| xargs -0 cat > "$out"; sync "$out"')


def plain_copy(tree: Path, out: Path) -> float:
    """Wall seconds of copying every file of `tree` into `out` and fsyncing it (deleted after)."""
    out.unlink(missing_ok=True)
    try:
        wall, _ = measured("limit-copy", ["bash", "-c", PLAIN_COPY, "copy", str(tree), str(out)])
    finally:
        out.unlink(missing_ok=True)
    return wall


def compare(tree: Path) -> bench.Rounds:
    """Wall times, ROUNDS of each: FMT (ours), FMT-ref (the reference without fsync), FMT-ref+fsync,
    and copy (the plain copy, measured in the same rounds)."""
    content = fat32.scan(tree).content
    size, geometry = fat32.image_geometry(content, None, "none")
    image = WORK / "out.img"
    rounds = bench.Rounds()
    for fmt in ("iso", "fat32"):
        for rnd in range(ROUNDS):
            say(f"  {fmt}, round {rnd + 1}/{ROUNDS}: reference ...")
            if fmt == "iso":
                ref_argv = ["xorriso", "-as", "mkisofs", "-R", "-J", "-quiet", "-o", str(image), str(tree)]
            else:
                ref_argv = reference_fat32(tree, image, size, geometry.cluster)
            image.unlink(missing_ok=True)
            wall, _ = measured(f"ref-{fmt}", ref_argv)
            rounds.add(f"{fmt}-ref", wall)
            rounds.add(f"{fmt}-ref+fsync", wall + fsynced(image))
            image.unlink()
            say(f"  {fmt}, round {rnd + 1}/{ROUNDS}: ours ...")
            code = OURS_ISO if fmt == "iso" else OURS_FAT32
            rounds.add(fmt, measured(f"ours-{fmt}", [sys.executable, "-c", code, str(tree), str(image), LABEL])[0])
            image.unlink()
            say(f"  {fmt}, round {rnd + 1}/{ROUNDS}: plain copy ...")
            rounds.add(f"{fmt}-copy", plain_copy(tree, image))
    return rounds


def peak_rss(tree: Path, image: Path) -> dict[str, tuple[float, int]]:
    """format -> (wall seconds, peak RSS bytes) of our writer writing `tree` to `image` (deleted after)."""
    out: dict[str, tuple[float, int]] = {}
    for fmt, code in (("iso", OURS_ISO), ("fat32", OURS_FAT32)):
        say(f"  write_{fmt} ...")
        image.unlink(missing_ok=True)
        try:
            out[fmt] = measured(f"rss-{fmt}", [sys.executable, "-c", code, str(tree), str(image), LABEL])
        finally:
            image.unlink(missing_ok=True)
    return out


def rss_row(name: str, peak: int, detail: str) -> tuple[str, str, str, str]:
    """A table row for a peak RSS against the 256 MiB target."""
    return name, f"{peak / MiB:.0f} MiB ({detail})", "<= 256 MiB", bench.verdict(peak, RSS_TARGET)


def main() -> int:
    for tool in ("xorriso", "mkfs.fat", "mcopy", "mmd", "openssl", "sync"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed")
    WORK.mkdir(parents=True, exist_ok=True)
    if REPO in WORK.resolve().parents:
        sys.exit(f"bench: {WORK} is inside the repository; choose another MEDIABUILDER_BENCH_DIR")
    tree = WORK / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    say("preparing the tree ...")
    origin = from_bench_cache(tree) or synthetic(tree)
    count, nbytes = tree_size(tree)
    warm(tree)
    say(f"tree: {count} files, {nbytes / MiB:.0f} MiB ({origin})")
    times = compare(tree)
    shutil.rmtree(tree)

    big = WORK / "big-tree"
    shutil.rmtree(big, ignore_errors=True)
    rss: dict[str, tuple[float, int]] = {}
    free = shutil.disk_usage(WORK).free
    if free < 3 * BIG_FILE:  # the whole file while it is split, the parts, the image
        say(f"4.5 GiB tree skipped: {free / GiB:.1f} GiB free on {WORK}, it needs {3 * BIG_FILE / GiB:.1f}")
    else:
        say("preparing the 4.5 GiB tree ...")
        big_tree(big)
        try:
            rss = peak_rss(big, WORK / "big.out")
        finally:
            shutil.rmtree(big, ignore_errors=True)

    rows: list[tuple[str, str, str, str]] = [
        ("tree", f"{count} files, {nbytes / MiB:.0f} MiB", "", ""),
    ]
    for fmt, ref_name in (("iso", "xorriso -as mkisofs -R -J"), ("fat32", "mkfs.fat -F 32 + mcopy -s")):
        ratio = times.ratio(fmt, f"{fmt}-ref+fsync")
        rows += [
            (f"{fmt}: ours (write_{fmt})", times.text(fmt), "", ""),
            (f"{fmt}: {ref_name}", f"{times.text(f'{fmt}-ref')}, {times.text(f'{fmt}-ref+fsync')} with fsync", "", ""),
            (f"{fmt}: ours / reference (with fsync)", times.ratio_text(fmt, f"{fmt}-ref+fsync"), "<= 1.1",
             bench.verdict(ratio, 1.1)),
            (f"{fmt}: limit: plain copy of the bytes + fsync", times.text(f"{fmt}-copy"), "", ""),
            (f"{fmt}: ours / limit (plain copy)", times.ratio_text(fmt, f"{fmt}-copy"), "", ""),
        ]
    for fmt in ("iso", "fat32"):
        if fmt not in rss:
            rows.append((f"peak RSS, write_{fmt}, 4.5 GiB file", "skipped: not enough free disk", "<= 256 MiB", "?"))
            continue
        wall, peak = rss[fmt]
        rows.append(rss_row(f"peak RSS, write_{fmt}, 4.5 GiB file", peak, f"{wall:.1f} s"))
    bench.print_table(rows)
    bench.print_footer(ROUNDS, WORK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
