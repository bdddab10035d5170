"""What users bring to the image options, walked through the CLI as they would: labels and sizes
refused before any work (one line, exit 2, no cache, no output), sizes spelled as disks are sold,
and the progress a person watching a terminal sees (a live bar per byte with rate and ETA, step
titles as steps start), with the output unchanged when stderr is not a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Example, assert_one_line_error, make_nix_env, nix, run_cli
from media_checks import fsck_fat

from mediabuilder.media.fat32 import Geometry

pytestmark = pytest.mark.integration

HOST = "alpha"
MIB = 1024**2


def build_args(example: Example, cache: Path, output: Path, *args: str) -> list[str]:
    return ["build", "--flake", f"{example.flake}#{HOST}", "--cache", str(cache), "--output", str(output), *args]


def assert_no_work(tmp_path: Path) -> None:
    """Refused before any work: no cache (nor key) created, nothing in the output directory."""
    assert not (tmp_path / "cache").exists()
    assert os.listdir(tmp_path / "out") == []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.mark.parametrize(("fmt", "label", "rule"), [
    ("fat32", "NIXOS_OFFLINE", "FAT32 volume label: use 1 to 11 characters"),  # the old default, 13
    ("fat32", "my stick", "FAT32 volume label: use 1 to 11 characters"),
    ("iso", "nixos-offline", "ISO 9660 volume label: use 1 to 32 characters A-Z, 0-9 and _"),
    ("iso", "A" * 33, "ISO 9660 volume label: use 1 to 32 characters A-Z, 0-9 and _"),
])
def test_bad_label_refused_before_work(example: Example, tmp_path: Path, out: Path, fmt: str, label: str,
                                       rule: str) -> None:
    proc = run_cli(*build_args(example, tmp_path / "cache", out / "media", "--format", fmt, "--label", label))
    line = assert_one_line_error(proc, "--label/media.label", repr(label), rule)
    assert line.startswith("error: --label/media.label: ")
    assert_no_work(tmp_path)


@pytest.mark.parametrize(("size", "message"), [
    ("3T", "--size 3T is too big: a FAT32 image is at most 2097151 MiB (2 TiB - 1 MiB, 2199022206976 bytes)"),
    ("2199022206977", "--size 2199022206977 is too big: a FAT32 image is at most 2097151 MiB"),
    ("0", "--size 0 is too small: a FAT32 image is at least 33 MiB (34603008 bytes)"),
    ("1M", "--size 1M is too small: a FAT32 image is at least 33 MiB (34603008 bytes)"),
    ("32MiB", "--size 32M is too small: a FAT32 image is at least 33 MiB"),
    ("-1", "--size -1: not a size"),
    ("lots", "--size lots: not a size"),
    ("8GiBs", "--size 8GiBs: not a size"),
])
def test_bad_size_refused_before_work(example: Example, tmp_path: Path, out: Path, size: str, message: str) -> None:
    proc = run_cli(*build_args(example, tmp_path / "cache", out / "media.img", "--format", "fat32", f"--size={size}"))
    assert_one_line_error(proc, message)
    assert_no_work(tmp_path)


def test_size_too_small_with_partition_table(example: Example, tmp_path: Path, out: Path) -> None:
    proc = run_cli(*build_args(example, tmp_path / "cache", out / "media.img", "--format", "fat32",
                               "--partition-table", "gpt", "--size", "34M"))
    assert_one_line_error(proc, "--size 34M is too small: a FAT32 image with a gpt partition table is at least "
                                "35 MiB (36700160 bytes)")
    assert_no_work(tmp_path)


def test_decimal_size_and_default_label(example: Example, tmp_path: Path, out: Path) -> None:
    """`--size 100MB` is 100,000,000 bytes (decimal, as disks are sold); the default label fits
    FAT32 whole; fsck.fat finds nothing wrong."""
    image = out / "media.img"
    proc = run_cli(*build_args(example, tmp_path / "cache", image, "--format", "fat32", "--size", "100MB"))
    assert proc.returncode == 0, proc.stderr
    assert image.stat().st_size == 100_000_000
    files, _, clusters = fsck_fat(image, 0, tmp_path)
    assert clusters == Geometry(100_000_000 // 512, 512).clusters
    label = subprocess.run(["fatlabel", str(image)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "NIXOS_MEDIA"


# Progress


@pytest.fixture(scope="module")
def slow_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store path of 8 MiB of random bytes: xz exports it for several seconds."""
    staging = tmp_path_factory.mktemp("slow") / "mediabuilder-progress-test"
    staging.mkdir()
    (staging / "blob.bin").write_bytes(os.urandom(8 * MIB))
    path = nix("nix-store", "--add", staging).stdout.strip()
    try:
        yield path
    finally:
        nix("nix-store", "--delete", path, check=False)


@pytest.fixture(scope="module")
def warm_cache(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host's closure already exported: a build then exports only the slow path."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    proc = run_cli("cache", "--flake", f"{example.flake}#{HOST}", "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    return cache


@pytest.fixture
def cache(warm_cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(warm_cache, copy)
    return copy


def _env() -> dict[str, str]:
    env = make_nix_env()
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("COLUMNS", None)
    return env


def run_in_pty(args: list[str]) -> tuple[int, str, str]:
    """`mediabuilder ARGS` with stderr on a pseudo-terminal of 120 columns: (exit, stdout, the terminal's text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mediabuilder", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=_env())
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child and its terminal are gone
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=600), stdout, seen.decode(errors="replace")


STEP_LINE = re.compile(r"^  [A-Z][a-z][^…]* … (.+, )?\d+(\.\d)? (s|min)$")


def test_progress_on_a_terminal(example: Example, slow_path: str, cache: Path, tmp_path: Path) -> None:
    """Exporting one 8 MiB path with xz: the step's title shows as it starts, the bar moves
    within the one path (per byte, not per path) and shows bytes/s and an ETA."""
    code, stdout, terminal = run_in_pty(build_args(example, cache, tmp_path / "media",
                                                   "--store-path", slow_path, "--compression", "xz"))
    assert code == 0, terminal
    assert stdout.startswith(f"{HOST}\t/nix/store/")
    title = terminal.index("  Filling binary cache …\r\n")
    bars = re.findall(r"exporting NARs: +(\d+)%\|[^|]*\| *[\d.]+[kMG]?/[\d.]+[kMG]?B? "
                      r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]", terminal[title:])
    assert bars, terminal
    assert any(10 < int(percent) < 90 for percent in bars), bars  # within the 8 MiB path, exported first
    # The timed line replaces the title (cursor up, line cleared) and stays.
    assert re.search(r"\x1b\[1A\r\x1b\[2K  Filling binary cache … \d+ exported, \d+ already present, "
                     r"\d+(\.\d)? s\r\n", terminal), terminal
    # --quiet: nothing drawn on the terminal either.
    code, _, terminal = run_in_pty(build_args(example, cache, tmp_path / "media2", "--quiet"))
    assert code == 0 and terminal == "", terminal


def test_no_terminal_output_unchanged(example: Example, slow_path: str, cache: Path, tmp_path: Path) -> None:
    """Without a terminal: one timed line per step, as before; no titles, bars or escapes."""
    proc = run_cli(*build_args(example, cache, tmp_path / "media", "--store-path", slow_path,
                               "--compression", "xz"))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr and "exporting NARs" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"Building media {tmp_path / 'media'} (dir)"
    assert lines[-1].startswith(f"Done: {tmp_path / 'media'} in ")
    steps = lines[1:-1]
    assert [ln.split(" … ")[0].strip() for ln in steps] == [
        "Resolving hosts", "Checking the repository", "Building toplevels", "Archiving flake inputs",
        "Adding install tools", "Choosing disk layouts", "Filling binary cache", "Reading closures",
        "Assembling the media tree", "Signing the manifest", "Writing the medium",
    ]
    assert all(STEP_LINE.match(ln) for ln in steps), steps
    quiet = run_cli(*build_args(example, cache, tmp_path / "media2", "--quiet"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


UI_SCRIPT = """
import time
from mediabuilder import ui
ui.configure(quiet={quiet})
with ui.step("Long step") as step:
    done = [0]
    with ui.progress(8 * 1024**2, "copying") as bar, ui.ticking(bar, lambda: done[0]):
        for _ in range(8):
            time.sleep(0.3)
            done[0] += 1024**2
    step.detail = "8 MiB"
with ui.step("Warned step"):
    ui.warn("careful")
"""


def run_script_in_pty(code: str, rows: int = 40, columns: int = 120) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            env=_env())
    os.close(slave)
    seen = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    return seen.decode(errors="replace")


@pytest.mark.parametrize("size", [(40, 120), (0, 0)], ids=["sized", "unsized"])
def test_step_and_ticking_bar_contracts(size: tuple[int, int]) -> None:
    """The title as a step starts; a bar fed from elsewhere (ui.ticking) moves between the
    updates with rate and ETA; the timed line replaces the title unless something was printed
    in between; --quiet draws nothing but warnings. Also on a terminal that reports no size
    (`script` without a terminal, serial consoles), where tqdm alone drew nothing."""
    terminal = run_script_in_pty(UI_SCRIPT.format(quiet=False), *size)
    assert terminal.startswith("  Long step …\r\n"), terminal
    bars = re.findall(r"copying: +(\d+)%\|[^|]*\| *[\d.]+M/8\.00M \[\d\d:\d\d<\d\d:\d\d, +[\d.]+MB/s\]", terminal)
    assert any(10 < int(p) < 90 for p in bars), terminal
    assert re.search(r"\x1b\[1A\r\x1b\[2K  Long step … 8 MiB, \d+(\.\d)? s\r\n  Warned step …\r\n"
                     r"warning: careful\r\n  Warned step … \d+(\.\d)? s\r\n$", terminal), terminal
    quiet = run_script_in_pty(UI_SCRIPT.format(quiet=True), *size)
    assert quiet == "warning: careful\r\n"
