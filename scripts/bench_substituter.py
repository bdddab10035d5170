#!/usr/bin/env python3
"""Benchmark prefetching from an HTTP binary cache, measured in the same run.

    python scripts/bench_substituter.py

Uses the synthetic closure of `scripts/bench.py` (>= 1,000 store paths, >= 1.5 GiB of NAR, built
once under $MEDIABUILDER_BENCH_DIR, default /var/tmp/mediabuilder-bench). Once (kept between runs,
marker `upstream/.bench-upstream.json`), the paths are signed with the bench key
(`nix store sign --key-file`) and copied with `nix copy --to file://.../upstream?compression=zstd`.
That upstream cache is served on 127.0.0.1 by a threaded HTTP server (`ThreadingHTTPServer`,
HTTP/1.1 keep-alive, TCP_NODELAY, in a subprocess stopped at the end), and the script prints:

  1. ours / reference: `prefetch()` of every bench root into an empty cache (default jobs)
     against a plain parallel download of the same files (nix-cache-info, every narinfo and NAR)
     from the same server, `xargs -P <jobs> -n 16 curl`, into an empty directory (target <= 1.2).
     prefetch ends with a sync, so the reference is timed with `sync` after curl too (its time
     without it is shown as well);
  2. the full fill from a substituter vs through the local store: `prefetch()` into an empty
     cache / `mediabuilder cache --store-path ... --compression zstd` into an empty cache (which
     reads the local store and recompresses).

Each measure is the median of ROUNDS rounds (one round when a run takes >= 60 s), reference and
ours alternating, page cache warm, dirty pages flushed before each run. A run's output is moved
aside, not deleted, until the end: ext4 skips inodes deleted in the last 30 s (300 s while their
inode table block is dirty) when it allocates new ones (`recently_deleted()` in ialloc.c), so
deleting 2,000 files makes the next run that creates 2,000 pay a scan on each create (perf: a
quarter of its CPU time), whichever run that is. No wall-clock
assertions: this prints numbers; the exit status is 0 unless something failed to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: the synthetic set and its helpers)

from mediabuilder import ui  # noqa: E402
from mediabuilder.cache.layout import BinaryCache  # noqa: E402
from mediabuilder.store.keys import PublicKey, SecretKey  # noqa: E402
from mediabuilder.store.storepath import StorePath  # noqa: E402
from mediabuilder.substituter.client import Substituter  # noqa: E402
from mediabuilder.substituter.prefetch import default_jobs, prefetch  # noqa: E402

BENCH_DIR = bench.BENCH_DIR
UPSTREAM = BENCH_DIR / "upstream"
MARKER = UPSTREAM / ".bench-upstream.json"
ROUNDS = 3
SLOW = 60.0  # seconds: one round only when a run takes this long
TRASH = BENCH_DIR / "trash"
CURL_BATCH = 16
MiB = 1024**2
GiB = 1024**3

# A quiet threaded static server; prints its port, then serves until killed.
SERVER = r"""
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real cache offers
    disable_nagle_algorithm = True  # else headers and body, written apart, wait out delayed ACKs (~40 ms)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""

say = bench.say


def set_digest(paths: list[str], key_pub: str) -> str:
    return hashlib.sha256("\n".join([key_pub, *sorted(paths)]).encode()).hexdigest()


def bench_key() -> tuple[Path, str]:
    key = BENCH_DIR / "bench-key.sec"
    if not key.exists():
        bench.check_output([*bench.MEDIABUILDER, "keygen", "bench-1", "--secret", str(key),
                            "--public", str(BENCH_DIR / "bench-key.pub")])
    return key, (BENCH_DIR / "bench-key.pub").read_text().strip()


def upstream_cache(paths: list[str], key: Path, key_pub: str) -> float | None:
    """Make the signed upstream cache unless the marker says it is there; seconds spent, or None."""
    digest = set_digest(paths, key_pub)
    if MARKER.is_file() and json.loads(MARKER.read_text()).get("digest") == digest and \
            all((UPSTREAM / f"{Path(p).name[:32]}.narinfo").is_file() for p in paths):
        say(f"reusing the upstream cache ({UPSTREAM})")
        return None
    say("signing the bench paths and making the upstream cache (once; later runs reuse it)...")
    started = time.monotonic()
    shutil.rmtree(UPSTREAM, ignore_errors=True)
    for start in range(0, len(paths), 200):
        bench.check_output(["nix", "store", "sign", "--key-file", str(key), *paths[start:start + 200]])
    bench.check_output(["nix", "copy", "--to", f"file://{UPSTREAM}?compression=zstd", *paths])
    MARKER.write_text(json.dumps({"digest": digest, "paths": len(paths)}))
    return time.monotonic() - started


def upstream_files(paths: list[str]) -> list[str]:
    """The relative URLs a full prefetch reads: nix-cache-info, every narinfo, every NAR."""
    urls = ["nix-cache-info"]
    nars = set()
    for p in paths:
        name = f"{Path(p).name[:32]}.narinfo"
        urls.append(name)
        for line in (UPSTREAM / name).read_text().splitlines():
            if line.startswith("URL: "):
                nars.add(line[5:].strip())
    return urls + sorted(nars)


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(UPSTREAM)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        proc.wait()
        sys.exit("bench: the HTTP server did not start")
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def fresh(name: str) -> Path:
    d = bench.fresh(name)
    os.sync()  # the previous run's dirty pages are not this run's cost
    return d


def discard(d: Path) -> None:
    """Move a run's output aside (see the module's docstring); `empty_trash()` deletes it."""
    TRASH.mkdir(exist_ok=True)
    d.rename(TRASH / f"{d.name}-{time.monotonic_ns()}")


def empty_trash() -> None:
    shutil.rmtree(TRASH, ignore_errors=True)


def run_reference(url: str, files: list[str], jobs: int) -> tuple[float, float, int]:
    """xargs -P jobs -n 16 curl of every file, then sync: (seconds, seconds without sync, bytes)."""
    dest = fresh("dl-reference")
    dest.mkdir(parents=True)
    with tempfile.NamedTemporaryFile("w", dir=BENCH_DIR, suffix=".urls") as listing:
        listing.write("".join(f"{url}/{f}\n" for f in files))
        listing.flush()
        started = time.monotonic()
        subprocess.run(["xargs", "-a", listing.name, "-P", str(jobs), "-n", str(CURL_BATCH),
                        "curl", "-s", "--fail", "--remote-name-all"], cwd=dest, check=True)
        downloaded = time.monotonic() - started
        os.sync()
        wall = time.monotonic() - started
    got = [e for e in os.scandir(dest)]
    if len(got) != len(files):
        sys.exit(f"bench: the reference download got {len(got)} files, expected {len(files)}")
    size = sum(e.stat().st_size for e in got)
    discard(dest)
    return wall, downloaded, size


def run_ours(url: str, roots: list[StorePath], trusted: PublicKey, media_key: SecretKey) -> tuple[float, int]:
    """prefetch() of every root into an empty cache: (seconds, file bytes)."""
    dest = fresh("dl-ours")
    substituter = Substituter(url, [trusted])
    try:
        started = time.monotonic()
        result = prefetch(roots, [substituter], BinaryCache(dest), media_key)
        wall = time.monotonic() - started
    finally:
        substituter.close()
    if result.missing or result.downloaded != len(roots):
        sys.exit(f"bench: prefetch downloaded {result.downloaded} paths of {len(roots)}, "
                 f"{len(result.missing)} missing")
    discard(dest)
    return wall, result.file_bytes


def run_local(paths: list[str], key: Path) -> float:
    """`mediabuilder cache` of the same paths from the local store into an empty cache, zstd."""
    dest = fresh("cache-local")
    argv = [*bench.MEDIABUILDER, "cache", "--cache", str(dest), "--compression", "zstd", "--key", str(key),
            *[a for p in paths for a in ("--store-path", p)]]
    wall, _, _ = bench.measured("substituter-local-cache", argv)
    discard(dest)
    return wall


def main() -> int:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if REPO in BENCH_DIR.resolve().parents or BENCH_DIR.resolve() == REPO:
        sys.exit(f"bench: {BENCH_DIR} is inside the repository; choose another MEDIABUILDER_BENCH_DIR")
    os.environ["NIX_CONFIG"] = bench.NIX_CONFIG
    ui.configure(quiet=True)
    paths, _ = bench.build_set()
    nar = bench.nar_total(paths)
    if len(paths) < 1000 or nar < 1.5 * GiB:
        sys.exit(f"bench: the synthetic set is too small ({len(paths)} paths, {nar / GiB:.2f} GiB)")
    empty_trash()  # left by a run that was stopped
    key, key_pub = bench_key()
    made = upstream_cache(paths, key, key_pub)
    files = upstream_files(paths)
    roots = [StorePath.parse(p) for p in paths]
    trusted = PublicKey.parse(key_pub, source="bench-key.pub")
    media_key = SecretKey.generate("bench-media-1")
    jobs = default_jobs()
    say(f"{len(paths)} paths, {nar / GiB:.2f} GiB of NAR, {len(files)} files upstream; jobs {jobs}")

    refs: list[float] = []
    refs_nosync: list[float] = []
    ours: list[float] = []
    local: list[float] = []
    ref_bytes = ours_bytes = 0
    server, url = start_server()
    try:
        for n in range(1, ROUNDS + 1):
            say(f"round {n}: reference (xargs -P {jobs} -n {CURL_BATCH} curl) ...")
            wall, nosync, ref_bytes = run_reference(url, files, jobs)
            refs.append(wall)
            refs_nosync.append(nosync)
            say(f"round {n}: ours (prefetch) ...")
            wall, ours_bytes = run_ours(url, roots, trusted, media_key)
            ours.append(wall)
            say(f"round {n}: mediabuilder cache from the local store ...")
            local.append(run_local(paths, key))
            say(f"round {n}: reference {refs[-1]:.1f} s, ours {ours[-1]:.1f} s, local store {local[-1]:.1f} s")
            if max(refs[-1], ours[-1], local[-1]) >= SLOW:
                break
    finally:
        stop_server(server)
        empty_trash()
    if server.returncode is None:
        sys.exit("bench: the HTTP server did not stop")

    ref, ref_nosync, our, loc = (statistics.median(x) for x in (refs, refs_nosync, ours, local))
    upstream_bytes = sum((UPSTREAM / f).stat().st_size for f in files)
    rounds = f"median of {len(ours)}" if len(ours) > 1 else "1 round"

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)

    rows = [
        ("set", f"{len(paths)} store paths, {nar / GiB:.2f} GiB of NAR; upstream zstd "
         f"{upstream_bytes / MiB:.0f} MiB in {len(files)} files", "", ""),
        ("upstream cache made (sign + nix copy)", "reused" if made is None else f"{made:.1f} s", "", ""),
        (f"reference: xargs -P {jobs} curl + sync", f"{ref:.2f} s ({rounds}: {runs(refs)}), "
         f"{ref_bytes / MiB:.0f} MiB, {ref_bytes / MiB / ref:.0f} MiB/s", "", ""),
        ("reference without sync", f"{ref_nosync:.2f} s ({runs(refs_nosync)})", "", ""),
        (f"ours: prefetch(), jobs {jobs}", f"{our:.2f} s ({rounds}: {runs(ours)}), "
         f"{ours_bytes / MiB:.0f} MiB, {ours_bytes / MiB / our:.0f} MiB/s", "", ""),
        ("(1) ours / reference", f"{our / ref:.3f} (without the reference's sync: {our / ref_nosync:.3f})",
         "<= 1.2", "ok" if our / ref <= 1.2 else "MISSED"),
        ("mediabuilder cache (local store, zstd)", f"{loc:.2f} s ({rounds}: {runs(local)})", "", ""),
        ("(2) prefetch / local-store cache", f"{our / loc:.3f} (local store / prefetch: {loc / our:.2f})", "", ""),
    ]
    bench.print_table(rows)
    print(f"\ncores: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}; default jobs = min(8, 4 x cores) "
          f"= {jobs}; server, client and curl share them), loopback 127.0.0.1, "
          f"nix: {bench.check_output(['nix', '--version']).strip()}, data: {BENCH_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
