"""What differs between Nix versions, as this environment's Nix answers it (`just test` runs
Nix 2.8 and 2.26; FIELD-NOTES and docs/nix-versions.md list the differences).

Locks written by different Nix versions, read by the Nix of this environment.

Nix 2.26 writes `lastModified` into a tarball input's lock entry; Nix 2.8 refuses such a lock
(FIELD-NOTES), so a build on 2.8 must stop at once with one line naming the lock, the Nix version
and what to do. Nix 2.26 reads both shapes. Whether Nix can read a lock is asked by exit status,
never by its message (tests/test_cross_version.py and `just test` run both versions)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from mediabuilder import nixcli
from mediabuilder.store.nar import nar_hash_and_size

pytestmark = pytest.mark.integration

FLAKE_NIX = """{
  inputs.t = { url = "file://@TARBALL@"; flake = false; };
  outputs = { self, t }: { nixosConfigurations = import "${t}/hosts.nix"; };
}
"""


def _git(flake: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(flake), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True)


def tarball_flake(tmp_path: Path, written_by: str) -> Path:
    """A committed flake whose one input is a local tarball, locked as Nix `written_by` locks it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hosts.nix").write_text("{ a = 1; b = 2; }\n")
    tarball = tmp_path / "src.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname="src")
    locked: dict[str, object] = {"narHash": nar_hash_and_size(src)[0].sri(), "type": "tarball",
                                 "url": f"file://{tarball}"}
    if written_by == "2.26":
        locked["lastModified"] = 1700000000
    lock = {"nodes": {"root": {"inputs": {"t": "t"}},
                      "t": {"flake": False, "locked": locked, "original": {"type": "tarball", "url": f"file://{tarball}"}}},
            "root": "root", "version": 7}
    flake = tmp_path / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text(FLAKE_NIX.replace("@TARBALL@", str(tarball)))
    (flake / "flake.lock").write_text(json.dumps(lock, indent=2) + "\n")
    _git(flake, "init", "-q")
    _git(flake, "add", "-A")
    _git(flake, "commit", "-q", "-m", "flake")
    return flake


def _reads_lastmodified_tarballs() -> bool:
    version = nixcli.version()
    assert version.startswith(("2.8.", "2.26.")), f"tested on Nix 2.8 and 2.26, not {version}"
    return version.startswith("2.26.")


def test_a_lock_of_old_nix_reads_everywhere(tmp_path: Path) -> None:
    flake = tarball_flake(tmp_path, "2.8")
    assert nixcli.list_hosts(str(flake)) == ["a", "b"]


def test_a_lock_of_newer_nix(tmp_path: Path) -> None:
    flake = tarball_flake(tmp_path, "2.26")
    if _reads_lastmodified_tarballs():
        assert nixcli.list_hosts(str(flake)) == ["a", "b"]
        return
    proc = run_cli("build", f"--flake={flake}#a", "--output", tmp_path / "media", "--cache", tmp_path / "cache")
    assert_one_line_error(proc, f"{flake}/flake.lock: Nix {nixcli.version()} cannot read this lock file")
    assert "hint: build with a Nix at least as new as the one that locked the flake" in proc.stderr
    assert not (tmp_path / "media").exists()


def test_a_damaged_lock(tmp_path: Path) -> None:
    flake = tarball_flake(tmp_path, "2.8")
    (flake / "flake.lock").write_text('{"nodes": ')
    _git(flake, "commit", "-q", "-a", "-m", "damage")
    proc = run_cli("build", f"--flake={flake}#a", "--output", tmp_path / "media", "--cache", tmp_path / "cache")
    assert_one_line_error(proc, f"{flake}/flake.lock: not a readable lock file")


def test_store_setting_from_nix_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nix's own `store` setting, from `nix config show --json` (2.20+) or `show-config --json`."""
    monkeypatch.delenv("NIX_REMOTE", raising=False)
    monkeypatch.setenv("NIX_CONFIG", os.environ.get("NIX_CONFIG", "") + f"\nstore = local?root={tmp_path}\n")
    assert nixcli._store_setting() == f"local?root={tmp_path}"
