"""Shared fixtures: the Nix environment for a container, the example flake built once per
session, and helpers to run the CLI and check its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Inside the Debian 13 root (scripts/in-trixie), the cross-version tests are not collected: they
# run from the host, which calls into the root for the other side, so `just test` runs them once.
# Nor are the installer tests and the kernel's read of ISO images yet: the stand-in installer ISO
# (and its kernel) is built from the host's Debian packages (apt-get download of a kernel) and
# booted by the host's QEMU and OVMF, which the root does not have (docs/environments.md).
TRIXIE_ONLY_ON_HOST = ["test_cross_version.py", "test_installer.py", "test_installer_boot.py", "test_iso_kernel.py"]
collect_ignore = TRIXIE_ONLY_ON_HOST if os.environ.get("MEDIABUILDER_ENV") == "trixie" else []
PREPARE = REPO / "examples" / "prepare.sh"
EXAMPLE_HOSTS = ("alpha", "beta")

# Nix in a container: no build users, no sandbox, no network substituters, no global registry.
NIX_CONFIG = "\n".join([
    "experimental-features = nix-command flakes",
    "build-users-group =",
    "sandbox = false",
    "substituters =",
    "flake-registry =",
    "warn-dirty = false",
])


def make_nix_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG
    if extra:
        env.update(extra)
    return env


@pytest.fixture(scope="session")
def nix_env() -> dict[str, str]:
    """os.environ plus the NIX_CONFIG every nix call here needs."""
    return make_nix_env()


def nix(*args: str | Path, check: bool = True, env: Mapping[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Nix command (or any command) with the container's NIX_CONFIG; text output."""
    proc = subprocess.run([str(a) for a in args], env=dict(env) if env else make_nix_env(), input=input,
                          capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def closure_of(*paths: str | Path) -> list[str]:
    """`nix path-info -r`: every path in the closure, sorted."""
    return sorted(nix("nix", "path-info", "-r", *paths).stdout.split())


def path_info(path: str, *args: str | Path, store: Path | None = None) -> dict:
    """`nix path-info --json ARGS PATH`'s entry for PATH, as any Nix prints it: a list of objects
    up to 2.18, an object keyed by path from 2.19 (FIELD-NOTES)."""
    data = json.loads(nix("nix", *(("--store", store) if store else ()), "path-info", "--json", *args, path).stdout)
    if isinstance(data, list):
        (info,) = [i for i in data if i.get("path") == path]
        return info
    info = data[path]
    assert info is not None, f"{path} is not valid"
    return info


def run_cli(*args: str | Path, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """Run `mediabuilder ARGS` as a subprocess (this venv's Python), capturing text output."""
    run_env = dict(env) if env is not None else make_nix_env()
    run_env["PYTHONPATH"] = str(REPO) + (os.pathsep + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "mediabuilder", *[str(a) for a in args]], env=run_env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2; stderr is exactly one `error:` line (plus at most one `hint:` line) with no
    traceback, and the error line contains every needle. Returns the error line."""
    where = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, where
    assert proc.returncode == 2, where
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    hints = [ln for ln in lines if ln.startswith("hint:")]
    assert len(errors) == 1, where
    assert len(hints) <= 1, where
    assert lines[-len(hints) - 1] == errors[0], f"the error line must come last (before its hint)\n{where}"
    # Progress lines (step titles) may precede the error; nothing may follow but the hint.
    assert lines.index(errors[0]) + 1 + len(hints) == len(lines), where
    assert "\n" not in errors[0]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in the error line\n{where}"
    return errors[0]


def prepare_example(dest: Path) -> subprocess.CompletedProcess[str]:
    """examples/prepare.sh into `dest` (the example flake with its inputs), which must succeed."""
    proc = subprocess.run(["bash", str(PREPARE), str(dest)], env=make_nix_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@dataclass(frozen=True)
class Example:
    dest: Path
    flake: Path
    toplevels: dict[str, str]

    def closure(self, host: str) -> list[str]:
        return closure_of(self.toplevels[host])


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> Example:
    """examples/prepare.sh into a temporary directory, both hosts built (once per session)."""
    dest = tmp_path_factory.mktemp("example") / "example"
    proc = prepare_example(dest)
    assert proc.stdout == "" and proc.stderr == ""
    flake = dest / "flake"
    return Example(dest=dest, flake=flake, toplevels=build_toplevels(flake, EXAMPLE_HOSTS))


def build_toplevels(flake: Path | str, hosts: tuple[str, ...]) -> dict[str, str]:
    """Each host's toplevel, one `nix build` per host: Nix does not answer several installables
    in the order asked, so results are never zipped with the hosts."""
    toplevels = {}
    for host in hosts:
        attr = f"{flake}#nixosConfigurations.{host}.config.system.build.toplevel"
        (built,) = json.loads(nix("nix", "build", "--no-link", "--json", attr).stdout)
        toplevels[host] = built["outputs"]["out"]
    return toplevels
