"""Media built from an HTTP binary cache alone, on a machine without Nix (nix removed from PATH),
install offline from read-only media like media built through the local store."""

from __future__ import annotations

import filecmp
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_toplevels, closure_of, make_nix_env, nix, prepare_example, run_cli
from fakecache_server import FakeCache
from test_install import evaluate_installed, install_offline

from mediabuilder.store.keys import SecretKey

pytestmark = pytest.mark.integration

HOSTS = ("alpha", "beta")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], FakeCache, str]]:
    """A fresh example, both hosts built and signed by an upstream key, pushed with `nix copy` and
    `nix flake archive --to` into a cache served on loopback."""
    base = tmp_path_factory.mktemp("subst")
    dest = base / "example"
    prepare_example(dest)
    flake = dest / "flake"
    toplevels = build_toplevels(flake, HOSTS)
    key = SecretKey.generate(f"upstream-{os.getpid()}")
    (base / "upstream.sec").write_text(key.render())
    nix("nix", "store", "sign", "--key-file", base / "upstream.sec", "-r", *toplevels.values())
    upstream = base / "upstream"
    nix("nix", "copy", "--to", f"file://{upstream}", *toplevels.values())
    nix("nix", "flake", "archive", "--to", f"file://{upstream}", flake)
    server = FakeCache(upstream).start()
    os.rename(dest / "inputs", base / "inputs-out-of-reach")  # only the substituter has them now
    yield flake, toplevels, server, key.public().render()
    server.stop()


def _path_without_nix(tmp: Path) -> str:
    """A PATH with git and the venv but no nix."""
    bindir = tmp / "bin-without-nix"
    bindir.mkdir(exist_ok=True)
    for tool in ("git",):
        target = bindir / tool
        if not target.exists():
            target.symlink_to(f"/usr/bin/{tool}")
    return f"{Path(sys.executable).parent}:{bindir}"


def test_media_from_substituter_without_nix(served: tuple[Path, dict[str, str], FakeCache, str],
                                            tmp_path: Path) -> None:
    flake, toplevels, server, upstream_key = served
    env = make_nix_env({"PATH": _path_without_nix(tmp_path)})
    media = tmp_path / "media"
    proc = run_cli("build", "--flake", flake, *[a for h in HOSTS for a in ("--system", f"{h}={toplevels[h]}")],
                   "--substituter", server.url, "--trusted-key", upstream_key,
                   "--cache", tmp_path / "cache", "--output", media, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Prefetching" in proc.stderr and "0 not on any substituter" in proc.stderr
    manifest = json.loads((media / "manifest.json").read_text())
    assert manifest["nix"] == "none"
    assert {h: v["toplevel"] for h, v in manifest["hosts"].items()} == toplevels
    # NARs byte-identical to the server's: no recompression.
    upstream = Path(server.root)
    for nar_file in (media / "cache" / "nar").iterdir():
        twin = upstream / "nar" / nar_file.name
        if twin.exists():
            assert filecmp.cmp(nar_file, twin, shallow=False), nar_file.name
    # verify passes with the media key alone.
    proc = run_cli("verify", media, "--trusted-key", manifest["key"]["public"], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Installs offline and read-only, and the installed flake evaluates to the installed system.
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media, root, "--host", "alpha", "--yes")
    assert proc.returncode == 0, proc.stderr
    installed = sorted(nix("nix", "--store", root, "path-info", "-r", toplevels["alpha"]).stdout.split())
    assert installed == closure_of(toplevels["alpha"])
    assert evaluate_installed(root, "alpha") == toplevels["alpha"]


def test_paths_on_no_substituter_are_listed(served: tuple[Path, dict[str, str], FakeCache, str],
                                            tmp_path: Path) -> None:
    flake, toplevels, server, upstream_key = served
    env = make_nix_env({"PATH": _path_without_nix(tmp_path)})
    missing = "/nix/store/" + "1" * 32 + "-not-built-anywhere"
    proc = run_cli("build", "--flake", flake, "--system", f"alpha={toplevels['alpha']}", "--store-path", missing,
                   "--substituter", server.url, "--trusted-key", upstream_key,
                   "--cache", tmp_path / "cache", "--output", tmp_path / "media", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert missing in proc.stderr and "no substituter" in proc.stderr
    assert not (tmp_path / "media").exists()
