#!/usr/bin/env python3
"""Remastering the installer ISO: mediabuilder against plain xorriso replay and against pycdlib.

    python scripts/bench_installer.py [--mib 800] [--rounds 3]

Input: the stand-in installer ISO of the tests (tests/standin.py, built and cached on first
use) and a synthetic medium tree of --mib MiB in ~1,200 files. Each round, alternating, times:

  1. ours: `remaster()` (menus parsed and edited in all three places, efi.img rewritten,
     `xorriso -indev IN -outdev OUT -boot_image any replay -map …`, output checked);
  2. reference: `xorriso -indev IN -outdev OUT -boot_image any replay -map TREE /mediabuilder`
     on the same tree (the issue's target: ours <= 1.2 x this);
  3. pycdlib: open IN, add the tree under /MEDIABUILDER (Rock Ridge and Joliet), replace the two
     menus, rewrite efi.img in place, write OUT.

and then reads each output back with `xorriso -report_el_torito as_mkisofs -report_system_area
plain` and says what differs from the input. Medians of --rounds; data under
$MEDIABUILDER_BENCH_DIR/installer (default /var/tmp/mediabuilder-bench/installer). Prints
numbers; no wall-clock assertions.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pycdlib  # noqa: E402
import standin  # noqa: E402  (tests/standin.py)

from mediabuilder.installer import menus  # noqa: E402
from mediabuilder.installer.medium import MEDIUM_DIR  # noqa: E402
from mediabuilder.installer.remaster import Installer, kernel_params, remaster  # noqa: E402
from mediabuilder.media import iso as iso_writer  # noqa: E402

WORK = Path(os.environ.get("MEDIABUILDER_BENCH_DIR", "/var/tmp/mediabuilder-bench")) / "installer"
HOSTS = ("laptop", "server")


def make_tree(root: Path, mib: int) -> None:
    """~1,200 files like a cache: many small narinfo files and NARs of mixed sizes."""
    if root.is_dir():
        return
    rng = random.Random(14)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "cache" / "nar").mkdir(parents=True)
    total = mib * 1024 * 1024
    sizes = [rng.randint(1, 40) for _ in range(600)]
    scale = total / sum(sizes)
    for n, weight in enumerate(sizes):
        (tmp / "cache" / f"{n:032d}.narinfo").write_text(f"StorePath: /nix/store/{n:032d}-x\n" * 8)
        (tmp / "cache" / "nar" / f"{n:052d}.nar.zst").write_bytes(os.urandom(int(weight * scale)))
    (tmp / "install.sh").write_text("#!/bin/bash\n")
    (tmp / "manifest.json").write_text("{}\n")
    tmp.rename(root)


def timed(fn: object) -> float:
    start = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - start


def ours(src: Path, tree: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    scratch = WORK / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    remaster(src, tree, out, HOSTS, scratch)
    with out.open("rb+") as f:
        os.fsync(f.fileno())


def reference(src: Path, tree: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    subprocess.run(["xorriso", "-report_about", "FAILURE", "-indev", str(src), "-outdev", str(out),
                    "-boot_image", "any", "replay", "-map", str(tree), f"/{MEDIUM_DIR}", "-commit"],
                   check=True, capture_output=True)
    with out.open("rb+") as f:
        os.fsync(f.fileno())


def with_pycdlib(src: Path, tree: Path, out: Path) -> None:
    """The same remaster with pycdlib: the menus edited as ours edits them."""
    out.unlink(missing_ok=True)
    found, data = Installer.inspect(src)
    install = menus.Install(HOSTS, {h: kernel_params(h) for h in HOSTS})
    iso = pycdlib.PyCdlib()
    iso.open(str(src))
    plan = iso_writer._Plan(iso)  # the media writer's naming (ISO 9660, Rock Ridge, Joliet)
    iso.add_directory(f"/{MEDIUM_DIR.upper()}", rr_name=MEDIUM_DIR, joliet_path=f"/{MEDIUM_DIR}")
    plan.iso_paths[""] = f"/{MEDIUM_DIR.upper()}"
    plan.joliet_paths[""] = f"/{MEDIUM_DIR}"
    for top, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel_top = Path(top).relative_to(tree).as_posix()
        prefix = "" if rel_top == "." else f"{rel_top}/"
        for name in dirnames + sorted(filenames):
            iso_writer._add_entry(plan, Path(top, name), prefix + name)
    for rel, text in ((found.isolinux_cfg, menus.edit_isolinux(data[found.isolinux_cfg].decode(), install, "x")),
                      (found.grub_cfg, menus.edit_grub(data[found.grub_cfg].decode(), install, "y"))):
        record = iso.get_record(rr_path=f"/{rel}")
        iso_path = iso.full_path_from_dirrecord(record)
        iso.rm_file(iso_path=iso_path, rr_name=rel.rsplit("/", 1)[1])
        body = text.encode()
        iso.add_fp(io.BytesIO(body), len(body), iso_path, rr_name=rel.rsplit("/", 1)[1],
                   joliet_path=f"/{rel}")
    efi = WORK / "efi.img"
    found.extract_efi(efi)
    # (mediabuilder edits efi.img's grub.cfg with mcopy; the bench keeps its content and rewrites it
    # in the written image, same size, as pycdlib can: in place, in a second open.)
    efi_path = iso.full_path_from_dirrecord(iso.get_record(rr_path=f"/{found.efi_img}"))
    iso.write(str(out))
    iso.close()
    # pycdlib's own in-place editor refuses the El Torito boot file ("Invalid record type"): write
    # the bytes over its extent, where pycdlib's reader says it is.
    written = pycdlib.PyCdlib()
    written.open(str(out))
    extent = written.get_record(iso_path=efi_path).extent_location()
    written.close()
    with out.open("r+b") as f:
        os.pwrite(f.fileno(), efi.read_bytes(), extent * 2048)
    with out.open("rb+") as f:
        os.fsync(f.fileno())


def report(iso: Path) -> list[str]:
    proc = subprocess.run(["xorriso", "-report_about", "WARNING", "-indev", str(iso), "-report_el_torito",
                           "as_mkisofs", "-report_system_area", "plain"], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if "--interval:" not in ln and "GUID" not in ln]
    warnings = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln or "SORRY" in ln or "FAILURE" in ln]
    return lines + [f"stderr: {w}" for w in warnings]


def main() -> int:
    warnings.simplefilter("ignore", DeprecationWarning)
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    src = standin.standin_iso()
    tree = WORK / f"tree-{args.mib}"
    make_tree(tree, args.mib)
    runs: dict[str, list[float]] = {"ours": [], "xorriso replay": [], "pycdlib": []}
    fns = {"ours": ours, "xorriso replay": reference, "pycdlib": with_pycdlib}
    outs = {name: WORK / f"out-{n}.iso" for n, name in enumerate(fns)}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            runs[name].append(timed(lambda fn=fn, name=name: fn(src, tree, outs[name])))
    base = statistics.median(runs["xorriso replay"])
    print(f"input {src} ({src.stat().st_size} bytes), tree {args.mib} MiB, {args.rounds} rounds, medians:")
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"  {name:15} {med:6.2f} s  ratio to xorriso replay {med / base:.2f}  "
              f"({outs[name].stat().st_size} bytes)")
    before = report(src)
    for name, out in outs.items():
        after = report(out)
        lost = [ln for ln in before if ln not in after and "modification-date" not in ln]
        new = [ln for ln in after if ln not in before and "modification-date" not in ln]
        print(f"  {name}: boot report lines lost {len(lost)}, new {len(new)}")
        for ln in lost[:12]:
            print(f"      - {ln}")
        for ln in new[:12]:
            print(f"      + {ln}")
        out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
