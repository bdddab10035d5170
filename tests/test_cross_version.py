"""Media built by each Nix, installed and re-evaluated offline by each: this host's Nix (Debian 12,
2.8) and the Debian 13 root's (2.26, entered through scripts/in-trixie), four combinations.

Each builder prepares the example flake with its own Nix (so the lock is the one that Nix writes)
and builds media from it; the flake inputs' sources are then moved out of reach. Each installer
runs install.sh in a network namespace from a read-only bind mount of the medium, and evaluates
the installed /etc/nixos offline on the target's store. The root's /tmp is the host's, so every
path means the same file on both sides.

Runs from the host only (tests/conftest.py leaves this file out inside the root), so `just test`
runs each combination once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, make_nix_env

pytestmark = pytest.mark.integration

IN_TRIXIE = REPO / "scripts" / "in-trixie"
ENVIRONMENTS = ("host", "trixie")
HOST = "alpha"


def in_env(env: str, *argv: str | Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run argv on the host or in the Debian 13 root, with the tests' NIX_CONFIG."""
    prefix = [str(IN_TRIXIE)] if env == "trixie" else []
    proc = subprocess.run([*prefix, *map(str, argv)], env=make_nix_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"{env}: {' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def python(env: str) -> str:
    """The environment's interpreter: this one, or the root's /opt/venv (first on its PATH)."""
    return "python" if env == "trixie" else sys.executable


def nix_version(env: str) -> str:
    return in_env(env, "nix", "--version").stdout.split()[-1]


def closure(env: str, toplevel: str, store: Path | None = None) -> list[str]:
    args = ["--store", str(store)] if store else []
    return sorted(in_env(env, "nix", *args, "path-info", "-r", toplevel).stdout.split())


@dataclass(frozen=True)
class Built:
    env: str
    flake: Path
    media: Path
    toplevel: str


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The example flake prepared and built into a medium by one environment's Nix."""
    env: str = request.param
    base = tmp_path_factory.mktemp(f"cross-{env}")
    dest = base / "example"
    in_env(env, "bash", REPO / "examples/prepare.sh", dest)
    flake = dest / "flake"
    proc = in_env(env, python(env), "-m", "mediabuilder", "build", f"--flake={flake}#{HOST}",
                  "--cache", base / "cache", "--output", base / "media")
    assert proc.stdout.count("\n") == 1, proc.stdout
    name, toplevel = proc.stdout.strip().split("\t")
    # What the builder's Nix evaluates the flake to.
    attr = f"{flake}#nixosConfigurations.{HOST}.config.system.build.toplevel.outPath"
    assert (name, toplevel) == (HOST, in_env(env, "nix", "eval", "--raw", attr).stdout)
    assert json.loads((base / "media/manifest.json").read_text())["nix"] == nix_version(env)
    hidden = base / "inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    yield Built(env, flake, base / "media", toplevel)
    os.rename(hidden, dest / "inputs")


def test_the_environments_differ() -> None:
    host, trixie = nix_version("host"), nix_version("trixie")
    assert host.startswith("2.8") and trixie.startswith("2.26"), (host, trixie)
    versions = [in_env(e, python(e), "-c", "import sys; print(sys.version_info[:2])").stdout.strip()
                for e in ENVIRONMENTS]
    assert versions == ["(3, 11)", "(3, 13)"]


@pytest.mark.parametrize("installer", ENVIRONMENTS)
def test_install_and_evaluate_offline(built: Built, installer: str, tmp_path: Path) -> None:
    toplevel = built.toplevel
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o755)
    ro = tmp_path / "media-ro"
    ro.mkdir()
    # No network, the medium read-only, the root a mount point; not the tests' Nix settings.
    script = ('set -e; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; mount --bind "$3" "$3"; '
              'shift 3; exec env -u NIX_CONFIG bash "$@"')
    proc = in_env(installer, "unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", script,
                  "install", built.media, ro, root, ro / "install.sh", "--media", ro, "--root", root,
                  "--host", HOST, "--yes", check=False)
    assert proc.returncode == 0, proc.stderr
    assert closure(installer, toplevel, store=root) == closure(built.env, toplevel)
    profile = root / "nix/var/nix/profiles/system"
    assert os.readlink(profile.parent / os.readlink(profile)) == toplevel
    rev = subprocess.run(["git", "-C", built.flake, "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout
    assert subprocess.run(["git", "-C", root / "etc/nixos", "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout == rev
    assert evaluate_installed(installer, root, HOST) == toplevel


def evaluate_installed(env: str, root: Path, host: str) -> str:
    """The installed /etc/nixos evaluated offline by `env`'s Nix on the target's store, with the
    target's own settings (its absolute paths seen from outside the target)."""
    conf = (root / "root/.config/nix/nix.conf").read_text()
    assert "flake-registry = /var/lib/mediabuilder/registry.json" in conf
    outside = conf.replace("/var/lib/mediabuilder/", f"{root}/var/lib/mediabuilder/")
    conf_file = root.parent / f"{root.name}-nix.conf"
    conf_file.write_text(outside + "substituters =\nbuild-users-group =\n")
    attr = f"nixosConfigurations.{host}.config.system.build.toplevel.outPath"
    proc = in_env(env, "env", "-u", "NIX_CONFIG", f"NIX_USER_CONF_FILES={conf_file}",
                  f"NIX_CONF_DIR={root / 'etc/nix'}", "unshare", "--net",
                  "nix", "--store", root, "eval", "--raw", f"git+file://{root}/etc/nixos#{attr}", timeout=300)
    return proc.stdout.strip()
