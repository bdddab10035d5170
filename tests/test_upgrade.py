"""Upgrades from newer media and delta media, end to end and offline: install host alpha from
medium A, change one line of its configuration and commit (B), then upgrade the installed root
with `install.sh --upgrade` from a full medium B and from a delta medium B−A, each in a network
namespace with the medium bind-mounted read-only and the flake inputs' sources out of reach."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, closure_of, make_nix_env, nix, prepare_example, run_cli
from test_install import evaluate_installed, install_offline, tree_state

pytestmark = pytest.mark.integration

CHANGE = '  environment.etc."upgrade-note".text = "upgraded from medium B";\n'


@dataclass(frozen=True)
class Media:
    base: Path
    flake: Path
    a: Path  # alpha at rev A
    b: Path  # alpha at rev B (one configuration line more)
    delta: Path  # B − A, built --since A
    delta_from_machine: Path  # B − A, built --since an installed machine's /var/lib/mediabuilder
    beta: Path  # beta only, at rev B: media for another host
    rev_a: str
    rev_b: str
    toplevel_a: str
    toplevel_b: str


def _git(*args: str | Path) -> str:
    return subprocess.run(["git", *map(str, args)], capture_output=True, text=True, check=True).stdout.strip()


def _build(flake: Path, out: Path, cache: Path, *extra: str, host: str = "alpha") -> str:
    proc = run_cli("build", f"--flake={flake}#{host}", "--cache", cache, "--output", out, *extra)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return line.split("\t")[1]


def _commit_change(flake: Path) -> None:
    alpha = flake / "hosts/alpha.nix"
    text = alpha.read_text()
    assert text.endswith("}\n")
    alpha.write_text(text[:-2] + CHANGE + "}\n")
    _git("-C", flake, "-c", "user.name=Admin", "-c", "user.email=admin@example.invalid", "commit", "-qam",
         "alpha: upgrade note")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Media]:
    base = tmp_path_factory.mktemp("upgrade")
    dest = base / "example"
    prepare_example(dest)
    flake, cache = dest / "flake", base / "cache"
    rev_a = _git("-C", flake, "rev-parse", "HEAD")
    toplevel_a = _build(flake, base / "media-a", cache)
    machine = base / "machine-a"  # an installed machine, for --since /var/lib/mediabuilder
    machine.mkdir()
    proc = install_offline(base / "media-a", machine, "--yes")
    assert proc.returncode == 0, proc.stderr
    _commit_change(flake)
    rev_b = _git("-C", flake, "rev-parse", "HEAD")
    toplevel_b = _build(flake, base / "media-b", cache)
    assert toplevel_b != toplevel_a
    assert _build(flake, base / "media-delta", cache, "--since", str(base / "media-a")) == toplevel_b
    assert _build(flake, base / "media-delta2", cache, "--since", str(machine / "var/lib/mediabuilder")) == toplevel_b
    _build(flake, base / "media-beta", cache, host="beta")
    hidden = base / "inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    yield Media(base, flake, base / "media-a", base / "media-b", base / "media-delta", base / "media-delta2",
                base / "media-beta", rev_a, rev_b, toplevel_a, toplevel_b)
    os.rename(hidden, dest / "inputs")


def installed_a(media: Media, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media.a, root, "--yes")
    assert proc.returncode == 0, proc.stderr
    return root


def upgrade(medium: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return install_offline(medium, root, "--upgrade", "--yes", *args)


def _manifest(medium: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((medium / "manifest.json").read_text())
    return data


def generations(root: Path) -> tuple[str, dict[str, str]]:
    """The system profile's current link and every generation's toplevel."""
    profiles = root / "nix/var/nix/profiles"
    links = {p.name: os.readlink(p) for p in profiles.iterdir() if p.name.startswith("system-")}
    return os.readlink(profiles / "system"), links


def switch_log(root: Path) -> list[str]:
    return (root / "var/log/switch-to-configuration.log").read_text().splitlines()


def record(root: Path) -> dict[str, str]:
    lines = (root / "var/lib/mediabuilder/installed").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines)


def assert_upgraded(media: Media, root: Path, medium: Path) -> None:
    """Generation 2 is B, generation 1 still A; switch ran for B; /etc/nixos at B; B recorded."""
    assert generations(root) == ("system-2-link", {"system-1-link": media.toplevel_a,
                                                   "system-2-link": media.toplevel_b})
    assert switch_log(root) == [
        f"action=boot NIXOS_INSTALL_BOOTLOADER=1 toplevel={media.toplevel_a}",
        f"action=switch NIXOS_INSTALL_BOOTLOADER= toplevel={media.toplevel_b}",
    ]
    installed = sorted(nix("nix", "--store", root, "path-info", "-r", media.toplevel_b).stdout.split())
    assert installed == closure_of(media.toplevel_b)
    git = ("-C", root / "etc/nixos")
    assert _git(*git, "rev-parse", "HEAD", "refs/heads/main", "refs/remotes/media/main").split() == [media.rev_b] * 3
    assert _git(*git, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert _git(*git, "status", "--porcelain") == ""
    assert _git(*git, "remote") == "backup\norigin"
    state = root / "var/lib/mediabuilder"
    assert (state / "manifest.json").read_bytes() == (medium / "manifest.json").read_bytes()
    assert (state / "registry.json").read_bytes() == (media.b / "registry.json").read_bytes()
    assert record(root)["rev"] == media.rev_b and record(root)["toplevel"] == media.toplevel_b
    # The upgraded /etc/nixos evaluates, offline, on the target's store, to what now runs.
    assert evaluate_installed(root, "alpha") == media.toplevel_b


def test_upgrade_from_full_medium_is_idempotent_and_refuses_rollback(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    assert record(root) == {"host": "alpha", "toplevel": media.toplevel_a, "rev": media.rev_a,
                            "flake-dir": "/etc/nixos",
                            "manifest-sha256": hashlib.sha256((media.a / "manifest.json").read_bytes()).hexdigest(),
                            "manifest-storepath": (media.a / "manifest.storepath").read_text().strip()}
    proc = upgrade(media.b, root)
    assert proc.returncode == 0, proc.stderr
    assert f"done: alpha upgraded in {root} from {media.rev_a[:12]} to {media.rev_b[:12]}" in proc.stderr
    assert_upgraded(media, root, media.b)
    # A second run changes nothing.
    before = tree_state(root)
    proc = upgrade(media.b, root)
    assert proc.returncode == 0, proc.stderr
    assert f"already up to date: alpha was installed from {media.rev_b[:12]}" in proc.stderr
    assert tree_state(root) == before
    # The older medium A is refused, before anything is written.
    proc = upgrade(media.a, root)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"install.sh: error: {root}-media-ro: its revision {media.rev_a[:12]} does not descend from "
                      f"{media.rev_b[:12]}, the installed one (older or unrelated media: refused; nothing was "
                      "written)"], proc.stderr
    assert tree_state(root) == before


def test_upgrade_from_delta_medium(media: Media, tmp_path: Path) -> None:
    manifest = _manifest(media.delta)
    full = _manifest(media.b)
    assert manifest["base"]["manifest_sha256"] == hashlib.sha256((media.a / "manifest.json").read_bytes()).hexdigest()
    assert manifest["base"]["rev"] == media.rev_a
    # Only what A lacks: the new toplevel, its etc and the flake's own source.
    shipped = manifest["store_paths"]
    assert sorted(Path(p).name[33:] for p in shipped) == sorted(["etc", "source", Path(media.toplevel_b).name[33:]])
    assert sorted(shipped + manifest["base"]["paths"]) == full["store_paths"]
    assert set(manifest["base"]["paths"]) <= set(_manifest(media.a)["store_paths"])
    assert len(list((media.delta / "cache").glob("*.narinfo"))) == len(shipped) + 1
    proc = run_cli("verify", media.delta, "--trusted-key", (media.b / "media-key.pub").read_text().strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Built from the installed machine's /var/lib/mediabuilder: the same paths, the same base.
    other = _manifest(media.delta_from_machine)
    assert other["store_paths"] == shipped and other["base"] == manifest["base"]

    root = installed_a(media, tmp_path)
    proc = upgrade(media.delta, root)
    assert proc.returncode == 0, proc.stderr
    assert f"checking the base: {len(manifest['base']['paths'])} paths the delta medium relies on" in proc.stderr
    assert_upgraded(media, root, media.delta)


def test_delta_medium_cannot_install(media: Media, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media.delta, root, "--yes")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "this is a delta medium" in errors[0] and "use a full medium" in errors[0]
    assert tree_state(root) == []


def test_delta_medium_needs_its_base_on_the_machine(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    registry = json.loads((media.a / "registry.json").read_text())
    site = next(f["to"]["path"] for f in registry["flakes"] if f["from"]["id"] == "site")
    assert site in _manifest(media.delta)["base"]["paths"]
    nix("nix-store", "--store", root, "--delete", site)
    # The collector removed Nix's reserved-space file (nix/var/nix/db/reserved); opening the
    # store puts it back, as install.sh's check will.
    nix("nix-store", "--store", root, "--check-validity", media.toplevel_a)
    before = tree_state(root)
    proc = upgrade(media.delta, root)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"install.sh: error: {site}: not in {root}/nix/store, nor 0 more: this machine lacks the base "
                      "of the delta medium (use a full medium, or one built with --since this machine's "
                      "/var/lib/mediabuilder)"], proc.stderr
    assert tree_state(root) == before


def test_local_commit_survives_a_diverged_upgrade(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    flake = root / "etc/nixos"
    (flake / "README.md").write_text("local notes\n")
    _git("-C", flake, "-c", "user.name=Local", "-c", "user.email=local@example.invalid", "commit", "-qam", "local")
    local = _git("-C", flake, "rev-parse", "HEAD")
    proc = upgrade(media.b, root)
    assert proc.returncode == 0, proc.stderr
    assert _git("-C", flake, "rev-parse", "HEAD", "refs/heads/main").split() == [local, local]
    assert _git("-C", flake, "rev-parse", "refs/remotes/media/main") == media.rev_b
    assert (flake / "README.md").read_text() == "local notes\n"
    assert f"git -C {flake} merge media/main" in proc.stderr
    assert generations(root)[0] == "system-2-link" and record(root)["rev"] == media.rev_b


def test_boot_upgrade_moves_a_branch_that_is_not_checked_out(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    flake = root / "etc/nixos"
    _git("-C", flake, "checkout", "-q", "-b", "experiment")
    proc = upgrade(media.delta, root, "--boot")
    assert proc.returncode == 0, proc.stderr
    assert "fast-forwarded main to" in proc.stderr and "(not checked out)" in proc.stderr
    assert _git("-C", flake, "symbolic-ref", "HEAD") == "refs/heads/experiment"
    assert _git("-C", flake, "rev-parse", "HEAD", "refs/heads/main").split() == [media.rev_a, media.rev_b]
    assert _git("-C", flake, "status", "--porcelain") == ""
    assert switch_log(root)[1:] == [f"action=boot NIXOS_INSTALL_BOOTLOADER= toplevel={media.toplevel_b}"]
    assert generations(root)[0] == "system-2-link"


def test_machine_installed_before_the_record(media: Media, tmp_path: Path) -> None:
    """A machine an earlier install.sh installed keeps manifest.json but no `installed`: its
    revision comes from the manifest, its host from --host."""
    root = installed_a(media, tmp_path)
    (root / "var/lib/mediabuilder/installed").unlink()
    before = tree_state(root)
    proc = upgrade(media.b, root)
    assert proc.returncode == 2, proc.stderr
    assert "does not name this machine's host; pass --host NAME" in proc.stderr
    assert tree_state(root) == before
    proc = upgrade(media.b, root, "--host", "alpha")
    assert proc.returncode == 0, proc.stderr
    assert_upgraded(media, root, media.b)


def test_media_for_another_host_refused(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    before = tree_state(root)
    proc = upgrade(media.beta, root)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"install.sh: error: {root}-media-ro: is media for another host: it has no alpha (it has: "
                      "beta); nothing was written"], proc.stderr
    proc = upgrade(media.beta, root, "--host", "beta")
    assert proc.returncode == 2, proc.stderr
    assert "this machine is alpha, not beta" in proc.stderr
    assert tree_state(root) == before


KILLING_NIX = """#!/usr/bin/env bash
# nix, except that `nix copy --no-recursive` copies only the new `-etc` path and then SIGKILLs
# install.sh (its parent): an upgrade killed in the middle of the copy.
if [[ ${1:-} == copy && " $* " == *" --no-recursive "* ]]; then
    args=()
    for a in "$@"; do
        [[ $a != /nix/store/* || $a == *-etc ]] && args+=("$a")
    done
    "$REAL_NIX" "${args[@]}"
    kill -KILL "$PPID"
    exit 137
fi
exec "$REAL_NIX" "$@"
"""


def test_killed_upgrade_leaves_the_old_generation(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nix").write_text(KILLING_NIX)
    (bin_dir / "nix").chmod(0o755)
    env = make_nix_env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_NIX": str(shutil.which("nix"))})
    env.pop("NIX_CONFIG")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = 'set -e; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; shift 2; exec bash "$@"'
    proc = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", script, "up",
                           str(media.b), str(ro), str(ro / "install.sh"), "--media", str(ro), "--root", str(root),
                           "--upgrade", "--yes"], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr  # unshare dies of its child's signal
    # Killed mid-copy: B's etc is in the target's store, B's toplevel is not.
    etc_b = next(p for p in _manifest(media.delta)["store_paths"] if p.endswith("-etc"))
    valid = nix("nix-store", "--store", root, "--check-validity", "--print-invalid", etc_b, media.toplevel_b)
    assert valid.stdout.split() == [media.toplevel_b]
    assert generations(root) == ("system-1-link", {"system-1-link": media.toplevel_a})
    assert record(root)["rev"] == media.rev_a
    assert _git("-C", root / "etc/nixos", "rev-parse", "HEAD") == media.rev_a
    # Run again, it completes.
    proc = upgrade(media.b, root)
    assert proc.returncode == 0, proc.stderr
    assert_upgraded(media, root, media.b)


def test_upgrade_dry_run_changes_nothing(media: Media, tmp_path: Path) -> None:
    root = installed_a(media, tmp_path)
    before = tree_state(root)
    proc = upgrade(media.delta, root, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "switch-to-configuration switch" in proc.stderr and media.toplevel_b in proc.stderr
    assert tree_state(root) == before


# `mediabuilder build --since OLD` with a bad OLD: one error line, exit 2, nothing written.


def _bad_since(media: Media, tmp_path: Path, old: Path) -> subprocess.CompletedProcess[str]:
    os.rename(media.base / "inputs-out-of-reach", media.flake.parent / "inputs")
    try:
        return run_cli("build", f"--flake={media.flake}#alpha", "--cache", media.base / "cache",
                       "--output", tmp_path / "out", "--since", old)
    finally:
        os.rename(media.flake.parent / "inputs", media.base / "inputs-out-of-reach")


@pytest.mark.parametrize("case", ["missing", "garbage", "not-a-manifest", "bad-path", "huge", "other-key",
                                  "forged-manifest"])
def test_build_since_refuses_bad_old(media: Media, tmp_path: Path, case: str) -> None:
    old = tmp_path / "old"
    if case == "garbage":
        old.write_bytes(b"\x00" * 4096)
        needle = f"{old}"
    elif case == "not-a-manifest":
        old.write_text('{"version": 1, "hosts": {}}')
        needle = "flake.rev is not a git commit"
    elif case == "bad-path":
        manifest = _manifest(media.a)
        manifest["store_paths"] = ["/etc/passwd"]
        old.write_text(json.dumps(manifest))
        needle = "'/etc/passwd' is not a store path"
    elif case == "huge":
        with open(old, "wb") as f:
            f.write(b"{")
            f.truncate(64 * 1024 * 1024 + 2)
        needle = "larger than 67108864 bytes"
    elif case == "other-key":
        other_cache = tmp_path / "other-cache"
        os.rename(media.base / "inputs-out-of-reach", media.flake.parent / "inputs")
        try:
            proc = run_cli("build", f"--flake={media.flake}#alpha", "--cache", other_cache, "--output", old)
        finally:
            os.rename(media.flake.parent / "inputs", media.base / "inputs-out-of-reach")
        assert proc.returncode == 0, proc.stderr
        needle = "its manifest is not signed by this build's key"
    elif case == "forged-manifest":
        shutil.copytree(media.a, old)
        (old / "manifest.storepath").write_text("/nix/store/" + "0" * 32 + "-mediabuilder-manifest\n")
        needle = "the signed manifest is not in its cache"
    else:
        needle = "no such file or directory"
    proc = _bad_since(media, tmp_path, old)
    assert_one_line_error(proc, f"--since {old}", needle)
    assert not (tmp_path / "out").exists()


def test_build_help_names_since() -> None:
    proc = run_cli("build", "--help")
    assert proc.returncode == 0
    assert "--since OLD" in proc.stdout and "/var/lib/mediabuilder" in proc.stdout
