"""Linters run as tests: ruff, mypy (disallow_untyped_defs) and shellcheck on every shell script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mediabuilder.media.scripts import INSTALL_PARTS

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff() -> None:
    proc = _run(str(BIN / "ruff"), "check", "mediabuilder", "tests", "scripts")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy() -> None:
    proc = _run(str(BIN / "mypy"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck() -> None:
    # install.sh's parts on their own, and with -x as install.sh sources them (its globals known).
    parts = [f"mediabuilder/media/{name}" for name in INSTALL_PARTS]
    scripts = ["mediabuilder/media/install.sh", *parts, "mediabuilder/media/unattended.sh", "examples/prepare.sh",
               "scripts/demo.sh", ".ci/run", "setup", "scripts/trixie-root.sh", "scripts/in-trixie"]
    proc = _run("shellcheck", "-x", *scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
