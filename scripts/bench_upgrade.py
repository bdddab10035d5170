#!/usr/bin/env python3
"""Upgrades on the example: a full medium against a delta medium after a one-line change.

    python scripts/bench_upgrade.py [--rounds 3]

Prepares the example flake, builds medium A of host alpha and installs it offline into a
scratch root (network namespace, medium bind-mounted read-only, as the tests do), commits a
one-line configuration change (B), then builds B as a full medium and as a delta `--since A`.
Each round, alternating, copies the installed root and times `install.sh --upgrade --yes` from
each medium. Prints the media sizes (bytes of their files), NAR files shipped and the median
upgrade times; no assertion on times. Data under $MEDIABUILDER_BENCH_DIR/upgrade (default
/var/tmp/mediabuilder-bench/upgrade).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import prepare_example, run_cli  # noqa: E402
from test_install import install_offline  # noqa: E402

CHANGE = '  environment.etc."upgrade-note".text = "upgraded from medium B";\n'


def build(flake: Path, out: Path, cache: Path, *extra: str) -> None:
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", cache, "--output", out, *extra)
    if proc.returncode != 0:
        sys.exit(proc.stderr)


def medium_bytes(medium: Path) -> int:
    return sum(f.stat().st_size for f in medium.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(os.environ.get("MEDIABUILDER_BENCH_DIR", "/var/tmp/mediabuilder-bench")) / "upgrade"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    flake, cache = base / "example" / "flake", base / "cache"
    prepare_example(base / "example")
    build(flake, base / "media-a", cache)
    installed = base / "installed-a"
    installed.mkdir()
    proc = install_offline(base / "media-a", installed, "--yes")
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    alpha = flake / "hosts/alpha.nix"
    alpha.write_text(alpha.read_text()[:-2] + CHANGE + "}\n")
    subprocess.run(["git", "-C", str(flake), "-c", "user.name=Bench", "-c", "user.email=bench@example.invalid",
                    "commit", "-qam", "alpha: upgrade note"], check=True)
    media = {"full": base / "media-b", "delta": base / "media-delta"}
    build(flake, media["full"], cache)
    build(flake, media["delta"], cache, "--since", str(base / "media-a"))
    times: dict[str, list[float]] = {name: [] for name in media}
    for _ in range(args.rounds):
        for name, medium in media.items():
            root = base / f"root-{name}"
            if root.exists():
                subprocess.run(["rm", "-rf", str(root)], check=True)
            subprocess.run(["cp", "-a", str(installed), str(root)], check=True)
            started = time.monotonic()
            proc = install_offline(medium, root, "--upgrade", "--yes")
            times[name].append(time.monotonic() - started)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
    full_bytes = medium_bytes(media["full"])
    for name, medium in media.items():
        manifest = json.loads((medium / "manifest.json").read_text())
        nars = len([f for f in manifest["files"] if f.startswith("cache/nar/")])
        size = medium_bytes(medium)
        print(f"{name:6} medium {size:>10,} bytes ({size / full_bytes:6.1%} of full), {nars:3} NAR files, "
              f"upgrade median {statistics.median(times[name]):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times[name])})")


if __name__ == "__main__":
    main()
