#!/usr/bin/env python3
"""Benchmark `mediabuilder cache` against `nix copy --to file://`, measured in the same run.

    python scripts/bench.py            (`just bench`)

Builds (once; reruns reuse it) a synthetic closure of >= 1,000 store paths and >= 1.5 GiB of
NAR made of copies of this machine's own binaries and libraries (/usr/bin,
/usr/lib/x86_64-linux-gnu), plus one path holding a single 2 GiB file, then prints:

  1. filling an empty cache with zstd: ours / `nix copy --to file://...?compression=zstd`
     (target <= 0.67);
  2. a second run with nothing changed / our first run (target <= 0.05);
  3. our peak RSS (max over our process tree, from RUSAGE_CHILDREN of a dedicated wrapper
     process) filling a cache with the 2 GiB file (target <= 256 MiB);
  4. filling an empty cache / this machine's limit for that work, measured in the same run:
     `nix-store --dump` of every path piped into one `zstd -T0` at our level (all cores), its
     output on the cache's disk (target <= 1.25; neither side fsyncs: the cache fill does not).

Data lives under $MEDIABUILDER_BENCH_DIR (default /var/tmp/mediabuilder-bench), never in the
repository. Delete that directory to rebuild the synthetic set. No wall-clock assertions: this
prints numbers, the exit status is 0 unless something failed to run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mediabuilder.cache.compression import ZSTD_LEVEL  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MEDIABUILDER = [sys.executable, "-m", "mediabuilder"]
BENCH_DIR = Path(os.environ.get("MEDIABUILDER_BENCH_DIR", "/var/tmp/mediabuilder-bench"))
SOURCES = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/bin"))

SET_VERSION = 2
PATHS = 1100
TARGET_NAR = int(1.75 * 1024**3)  # spread over PATHS, so >= 1.5 GiB with margin
BIG_FILE = 2 * 1024**3
MiB = 1024**2
GiB = 1024**3

NIX_CONFIG = "\n".join([
    "experimental-features = nix-command flakes",
    "build-users-group =",
    "sandbox = false",
    "substituters =",
    "flake-registry =",
    "warn-dirty = false",
])

# Runs argv (its output to the files given), then prints the peak RSS of the whole tree it
# waited for: RUSAGE_CHILDREN covers mediabuilder and its worker processes, nothing else.
WRAPPER = r"""
import json, resource, subprocess, sys
out, err, *argv = sys.argv[1:]
with open(out, "wb") as o, open(err, "wb") as e:
    rc = subprocess.run(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


_compiled = False


def compile_package() -> None:
    """Bytecode for mediabuilder's modules, once, as an installed package has it (pip compiles
    on install): without it (PYTHONDONTWRITEBYTECODE, a fresh checkout) each timed run would
    compile them again, about 0.1 s of every build."""
    global _compiled
    if not _compiled:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "mediabuilder")], check=True)
        _compiled = True


def env() -> dict[str, str]:
    compile_package()
    e = dict(os.environ)
    e["NIX_CONFIG"] = NIX_CONFIG
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_output(argv: list[str]) -> str:
    return subprocess.run(argv, env=env(), check=True, capture_output=True, text=True).stdout


def measured(name: str, argv: list[str]) -> tuple[float, int, str]:
    """Run argv in a dedicated wrapper; (wall seconds, peak RSS in bytes, stderr). Fails loudly."""
    logs = BENCH_DIR / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(out), str(err), *argv],
                          env=env(), check=True, capture_output=True, text=True)
    wall = time.monotonic() - started
    result = json.loads(proc.stdout)
    stderr = err.read_text(errors="replace")
    if result["rc"] != 0:
        sys.exit(f"bench: {name} failed with exit status {result['rc']}:\n{stderr[-3000:]}")
    return wall, result["maxrss_kib"] * 1024, stderr


# The synthetic closure


def source_files() -> list[tuple[Path, int]]:
    files = []
    for top in SOURCES:
        for dirpath, _, names in os.walk(top):
            for n in names:
                p = Path(dirpath) / n
                if p.is_symlink() or not p.is_file():
                    continue
                size = p.stat().st_size
                if 0 < size <= 6 * MiB and os.access(p, os.R_OK):
                    files.append((p, size))
    files.sort()
    if sum(s for _, s in files) < 100 * MiB:
        sys.exit("bench: too little data in /usr/bin and /usr/lib/x86_64-linux-gnu to build the set")
    return files


def place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    if os.access(src, os.X_OK):
        os.chmod(dst, 0o755)


def all_valid(paths: list[str]) -> bool:
    if not paths:
        return False
    proc = subprocess.run(["nix-store", "--check-validity", *paths], env=env(), capture_output=True)
    return proc.returncode == 0


def build_set() -> tuple[list[str], str]:
    """The synthetic store paths and the big path, from the marker file when still valid."""
    marker = BENCH_DIR / f"set-v{SET_VERSION}.json"
    if marker.is_file():
        data = json.loads(marker.read_text())
        if all_valid([*data["paths"], data["big"]]):
            say(f"reusing the synthetic set ({marker})")
            return data["paths"], data["big"]
    say("building the synthetic set (once; later runs reuse it)...")
    files = source_files()
    rng = random.Random(20231101)
    staging = BENCH_DIR / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    per_path = TARGET_NAR // PATHS
    cursor = 0
    dirs = []
    for i in range(PATHS):
        d = staging / f"pkg-{i:04d}"
        (d / "lib").mkdir(parents=True)
        (d / "bin").mkdir()
        (d / "share").mkdir()
        # Unique content, so no two paths collapse into one store path.
        (d / "share" / "id").write_text(f"synthetic package {i}\n")
        budget = int(per_path * rng.uniform(0.3, 1.7))
        got = 0
        while got < budget:
            src, size = files[cursor % len(files)]
            cursor += 1
            sub = "bin" if src.parent.name == "bin" else "lib"
            dst = d / sub / src.name
            if got and got + size > budget * 1.2:
                break  # keep every path near its budget: the set's size is what we plan
            if dst.exists():
                continue
            place(src, dst)
            got += size
        if i % 10 == 0:
            os.symlink("lib", d / "lib64")
        dirs.append(d)
    paths: list[str] = []
    for start in range(0, len(dirs), 100):
        out = check_output(["nix-store", "--add", *[str(d) for d in dirs[start:start + 100]]])
        paths.extend(out.split())
    if len(set(paths)) != PATHS:
        sys.exit(f"bench: expected {PATHS} distinct store paths, got {len(set(paths))}")
    big_dir = staging / "big"
    big_dir.mkdir()
    with open(big_dir / "blob.bin", "wb") as f:
        written, k = 0, 0
        while written < BIG_FILE:
            src, _ = files[k % len(files)]
            k += 1
            data = src.read_bytes()[: BIG_FILE - written]
            f.write(data)
            written += len(data)
    big = check_output(["nix-store", "--add", str(big_dir)]).strip()
    shutil.rmtree(staging)
    marker.write_text(json.dumps({"paths": paths, "big": big}))
    return paths, big


# The limit: every path serialized by Nix and compressed on all cores, one stream to one file.
DUMP_AND_COMPRESS = (
    'set -eo pipefail; out=$1; level=$2; shift 2; '
    'for p in "$@"; do nix-store --dump "$p"; done | zstd -q -T0 -"$level" -o "$out"'
)


def compress_limit(paths: list[str]) -> float:
    """Wall seconds of `nix-store --dump` of `paths` into `zstd -T0` at ZSTD_LEVEL, on BENCH_DIR's disk."""
    out = BENCH_DIR / "limit.nar.zst"
    out.unlink(missing_ok=True)
    try:
        wall, _, _ = measured("limit-dump-zstd", ["bash", "-c", DUMP_AND_COMPRESS, "limit", str(out),
                                                   str(ZSTD_LEVEL), *paths])
    finally:
        out.unlink(missing_ok=True)
    return wall


def nar_total(paths: list[str]) -> int:
    out = check_output(["nix", "path-info", "--json", *paths])
    data = json.loads(out)
    items = data if isinstance(data, list) else list(data.values())
    return sum(int(i["narSize"]) for i in items)


def fresh(name: str) -> Path:
    d = BENCH_DIR / name
    shutil.rmtree(d, ignore_errors=True)
    return d


@dataclass
class Rounds:
    """Wall times of runs repeated in rounds, by name (shared by every bench script): the median,
    the spread, and ratios taken round by round (both sides of a ratio ran in the same round)."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> float:
        self.times.setdefault(name, []).append(seconds)
        return seconds

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def text(self, name: str) -> str:
        """`1.23 s (1.10-1.40)`: the median and the spread of the rounds."""
        t = self.times[name]
        return f"{statistics.median(t):.2f} s ({min(t):.2f}-{max(t):.2f})"

    def ratios(self, name: str, reference: str) -> list[float]:
        return [a / b for a, b in zip(self.times[name], self.times[reference], strict=True)]

    def ratio(self, name: str, reference: str) -> float:
        """The median of the round-by-round ratios."""
        return statistics.median(self.ratios(name, reference))

    def ratio_text(self, name: str, reference: str) -> str:
        """`0.734 (0.70-0.79 over 3 rounds)`."""
        r = self.ratios(name, reference)
        return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f} over {len(r)} rounds)"


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def print_footer(rounds: int, data: Path) -> None:
    """The load (other helpers' tests move both sides of a ratio) and where the data was."""
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine)")
    print(f"medians of {rounds} rounds; cores: {os.cpu_count()}; data: {data}")


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """measure / value / target / verdict, aligned (shared by every bench script)."""
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'value':<{vwidth}}  {'target':<10}  verdict")
    print("-" * (width + vwidth + 24))
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {target:<10}  {verdict}")


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if REPO in BENCH_DIR.resolve().parents or BENCH_DIR.resolve() == REPO:
        sys.exit(f"bench: {BENCH_DIR} is inside the repository; choose another MEDIABUILDER_BENCH_DIR")
    paths, big = build_set()
    nar = nar_total(paths)
    big_nar = nar_total([big])
    if len(paths) < 1000 or nar < 1.5 * GiB or big_nar < BIG_FILE:
        sys.exit(f"bench: the synthetic set is too small ({len(paths)} paths, {nar / GiB:.2f} GiB)")
    key = BENCH_DIR / "bench-key.sec"
    if not key.exists():
        check_output([*MEDIABUILDER, "keygen", "bench-1", "--secret", str(key),
                      "--public", str(BENCH_DIR / "bench-key.pub")])
    argv_bytes = sum(len(p) + len("--store-path") + 2 for p in paths)
    say(f"{len(paths)} paths, {nar / GiB:.2f} GiB of NAR; argv {argv_bytes / 1024:.0f} KiB")

    # (1) an empty cache, zstd: nix copy, then ours (page cache warm for both: the set was read
    # by path-info and a previous run; nix goes first so it gets no advantage from our run).
    say("nix copy --to file://...?compression=zstd ...")
    nix_cache = fresh("cache-nix")
    nix_wall, nix_rss, _ = measured("nix-copy", [
        "nix", "copy", "--to", f"file://{nix_cache}?compression=zstd", *paths])
    store_args = [a for p in paths for a in ("--store-path", p)]
    ours_cache = fresh("cache-ours")
    cache_argv = [*MEDIABUILDER, "cache", "--cache", str(ours_cache), "--compression", "zstd",
                  "--key", str(key), *store_args]
    say("mediabuilder cache (empty cache) ...")
    first_wall, first_rss, _ = measured("ours-first", cache_argv)
    say("mediabuilder cache (nothing changed) ...")
    second_wall, second_rss, second_err = measured("ours-second", cache_argv)
    say(f"the limit: nix-store --dump | zstd -T0 -{ZSTD_LEVEL} ...")
    limit_wall = compress_limit(paths)
    narinfos = len(list(ours_cache.glob("*.narinfo")))
    nix_narinfos = len(list(nix_cache.glob("*.narinfo")))
    ours_bytes = sum(f.stat().st_size for f in (ours_cache / "nar").iterdir())
    nix_bytes = sum(f.stat().st_size for f in (nix_cache / "nar").iterdir())

    # (3) peak RSS with one 2 GiB file in the closure.
    say("mediabuilder cache (2 GiB file) ...")
    big_cache = fresh("cache-big")
    big_wall, big_rss, _ = measured("ours-big", [
        *MEDIABUILDER, "cache", "--cache", str(big_cache), "--compression", "zstd", "--key", str(key),
        "--store-path", big])
    shutil.rmtree(big_cache, ignore_errors=True)

    present_line = next((ln.strip() for ln in second_err.splitlines() if "already present" in ln), "?")
    rows = [
        ("set", f"{len(paths)} store paths, {nar / GiB:.2f} GiB of NAR", "", ""),
        ("nix copy --to file:// (zstd)", f"{nix_wall:.1f} s, {nix_narinfos} narinfos, "
         f"{nix_bytes / MiB:.0f} MiB", "", ""),
        ("mediabuilder cache, empty cache", f"{first_wall:.1f} s, {narinfos} narinfos, "
         f"{ours_bytes / MiB:.0f} MiB", "", ""),
        ("(1) ours / nix copy", f"{first_wall / nix_wall:.3f}", "<= 0.67",
         "ok" if first_wall / nix_wall <= 0.67 else "MISSED"),
        ("mediabuilder cache, nothing changed", f"{second_wall:.2f} s ({present_line})", "", ""),
        ("(2) second run / first run", f"{second_wall / first_wall:.3f}", "<= 0.05",
         "ok" if second_wall / first_wall <= 0.05 else "MISSED"),
        (f"limit: nix-store --dump | zstd -T0 -{ZSTD_LEVEL}", f"{limit_wall:.1f} s", "", ""),
        ("(4) ours, empty cache / limit", f"{first_wall / limit_wall:.3f}", "<= 1.25",
         "ok" if first_wall / limit_wall <= 1.25 else "MISSED"),
        ("peak RSS, ours, the set", f"{first_rss / MiB:.0f} MiB (nix copy: {nix_rss / MiB:.0f} MiB)", "", ""),
        ("(3) peak RSS, ours, 2 GiB file", f"{big_rss / MiB:.0f} MiB "
         f"({big_nar / GiB:.2f} GiB NAR in {big_wall:.1f} s)", "<= 256 MiB",
         "ok" if big_rss <= 256 * MiB else "MISSED"),
    ]
    print_table(rows)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(other work on this machine slows both sides of each ratio alike, not always equally)")
    print(f"cores: {os.cpu_count()}, nix: {check_output(['nix', '--version']).strip()}, data: {BENCH_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
