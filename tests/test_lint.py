"""Linters run as tests: ruff, mypy (disallow_untyped_defs) and shellcheck on every shell script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    scripts = ["mediabuilder/media/install.sh", "mediabuilder/media/unattended.sh", "examples/prepare.sh",
               "scripts/demo.sh", ".ci/run", "setup", "scripts/trixie-root.sh", "scripts/in-trixie"]
    proc = _run("shellcheck", *scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
