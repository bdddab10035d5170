"""The package installs and runs in a fresh virtual environment, with the newest pip and
setuptools, on each Python `just test` runs (the host's 3.11, the Debian 13 root's 3.13).

With no network: `./setup` and scripts/trixie-root.sh put the newest pip, setuptools and wheel
and the runtime dependencies into a wheelhouse beside the interpreter (`sys.prefix/wheelhouse`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration

WHEELHOUSE = Path(sys.prefix) / "wheelhouse"


def _newest(project: str) -> str:
    """The newest version of `project` in the wheelhouse."""
    versions = [m.group(1) for w in WHEELHOUSE.glob(f"{project}-*.whl")
                if (m := re.match(rf"{project}-([0-9][^-]*)-", w.name))]
    assert versions, f"{WHEELHOUSE}: no {project} wheel (run ./setup)"
    return max(versions, key=lambda v: tuple(int(p) for p in re.findall(r"\d+", v)))


def _run(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def test_python_is_in_the_tested_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.14"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"Programming Language :: Python :: {version}" in project["classifiers"]


def test_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    # A copy of the sources: building in the checkout would leave build/ and *.egg-info there.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "mediabuilder", src / "mediabuilder", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin/python", "-m", "pip", "--disable-pip-version-check", "--no-cache-dir",
           "--isolated", "--no-input"]
    offline = ["--no-index", "--find-links", WHEELHOUSE]
    _run(*pip, "install", "-q", *offline, "--upgrade", "pip")
    assert _run(*pip, "--version").split()[1] == _newest("pip")
    # Not editable: the build runs in an isolated environment with the newest setuptools.
    _run(*pip, "install", "-q", *offline, src)
    site = Path(_run(venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (dist_info,) = site.glob("mediabuilder-*.dist-info")
    assert f"Generator: setuptools ({_newest('setuptools')})" in (dist_info / "WHEEL").read_text()
    # The console script runs; pyfatfs (whose `fs` needs pkg_resources) imports; a key pair is made.
    version = _run(venv / "bin/python", "-c", "import mediabuilder; print(mediabuilder.__version__)").strip()
    assert _run(venv / "bin/mediabuilder", "--version").strip().endswith(version)
    _run(venv / "bin/python", "-c",
         "from mediabuilder.media.fatfs import pyfatfs_class; pyfatfs_class()")
    _run(venv / "bin/mediabuilder", "keygen", "fresh-1", "--secret", tmp_path / "k.sec", "--public", tmp_path / "k.pub")
    assert (tmp_path / "k.pub").read_text().startswith("fresh-1:")
