"""The first-boot installer `mediabuilder/media/install.sh`.

Unit tier: shellcheck, option handling, and the key fingerprint against Python's. Integration
tier: a tiny hand-made medium (a fake toplevel whose switch-to-configuration is a static
busybox script, a split NAR, a git bundle) installed with real Nix from a read-only bind mount
into a bind-mounted root, in mount and network namespaces; and the ways a medium can be bad.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.writer import export_nar, narinfo_for
from mediabuilder.media.scripts import INSTALL_PARTS, parts_of, pins_of
from mediabuilder.store import nar
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.pathinfo import PathInfo
from mediabuilder.store.storepath import StorePath, make_fixed_output_path, make_store_path

SCRIPT = Path(__file__).resolve().parent.parent / "mediabuilder" / "media" / "install.sh"
OPTIONS = ["--host", "--root", "--flake-dir", "--expect-key", "--media", "--dry-run", "--yes", "--help"]
NIX_CONFIG = (
    "experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\n"
    "substituters =\nflake-registry ="
)
# What a forged part adds: a mark in the target the moment it is sourced.
PWN = '\nprintf "%s\\n" sourced >"$ROOT/pwned"\n'
REMOTES = {"origin": "https://example.org/flake.git", "backup": "ssh://git@example.org/flake \"x\""}


def bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


# Unit tier


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shebang_and_strict_mode() -> None:
    lines = SCRIPT.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines


def test_help_names_every_option() -> None:
    result = bash("--help")
    assert result.returncode == 0
    for option in OPTIONS:
        assert option in result.stderr
    assert result.stdout == ""


def test_unknown_option_is_one_line_exit_2() -> None:
    result = bash("--frobnicate")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["install.sh: error: --frobnicate: unknown option (see --help)"]


def test_missing_option_value() -> None:
    result = bash("--host")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


def test_missing_media_is_one_line(tmp_path: Path) -> None:
    result = bash("--media", str(tmp_path), "--dry-run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("install.sh: error:")]
    assert errors == [
        "install.sh: error: media-key.pub: missing from the media (damaged or incomplete media; rebuild it)"
    ]


def test_install_sh_sources_its_parts_only_from_the_checked_copies() -> None:
    """install.sh's PARTS are the ones the build ships, and it sources each from $VERIFIED, in
    load_parts, and nothing else from anywhere; no part sources anything. Every file stays under
    the ~800 lines STYLE.md asks for."""
    text = SCRIPT.read_text()
    assert parts_of(text.encode()) == INSTALL_PARTS
    sources = [line.strip() for line in text.splitlines() if line.strip().startswith(("source ", ". "))]
    assert sources == [f'source "$VERIFIED/{name}"' for name in INSTALL_PARTS]
    body = text[text.index("\nload_parts() {\n"):]
    assert body[:body.index("\n}\n")].count("source ") == len(INSTALL_PARTS)
    for name in INSTALL_PARTS:
        part = SCRIPT.with_name(name).read_text()
        assert part.startswith(f"# shellcheck shell=bash\n# {name} - a part of install.sh (mediabuilder): ")
        assert not [ln for ln in part.splitlines() if ln.strip().startswith(("source ", ". "))], name
        assert len(part.splitlines()) < 800, name
    assert len(text.splitlines()) < 800


def test_install_sh_carries_the_sha256_of_each_part() -> None:
    """install.sh vouches for its parts by the sha256 it carries for each (after editing a part:
    scripts/pin_install_parts.py)."""
    text = SCRIPT.read_text()
    start = text.index("\nreadonly PARTS_SHA256='\n") + 1
    block = text[start:text.index("\n'\n", start) + 2]
    sums = "".join(f"{hashlib.sha256(SCRIPT.with_name(n).read_bytes()).hexdigest()}  {n}\n" for n in INSTALL_PARTS)
    assert block == f"readonly PARTS_SHA256='\n{sums}'", "stale: run scripts/pin_install_parts.py"
    assert pins_of(text.encode()) == {n: hashlib.sha256(SCRIPT.with_name(n).read_bytes()).hexdigest()
                                      for n in INSTALL_PARTS}


@pytest.mark.parametrize("n", range(5))
def test_fingerprint_matches_python(n: int) -> None:
    public = SecretKey.generate(f"test-{n}").public()
    result = subprocess.run(
        ["bash", "-c", 'source "$1"; key_fingerprint "$2"', "_", str(SCRIPT), public.render()],
        capture_output=True, text=True, env={**os.environ, "INSTALL_SH_SOURCE_ONLY": "1"}, check=True,
    )
    assert result.stdout.strip() == public.fingerprint()


# Integration tier: a hand-made medium


@dataclass
class Medium:
    root: Path
    key: SecretKey
    toplevel: str
    data_path: str
    rev: str
    manifest_path: str
    git_tool: str


def _fake_path(store: Path, name: str, seed: str) -> tuple[Path, str]:
    sp = make_store_path("output:out", hashlib.sha256(seed.encode()).digest(), name)
    return store / sp.base, sp.full


def _export(cache: BinaryCache, disk: Path, full: str, refs: list[str], key: SecretKey, ca: str | None = None) -> str:
    nar_hash, nar_size = nar.nar_hash_and_size(disk)
    info = PathInfo(path=StorePath.parse(full), nar_hash=nar_hash, nar_size=nar_size,
                    references=tuple(sorted(StorePath.parse(r) for r in refs)), ca=ca)
    exported = export_nar(str(cache.root), str(disk), nar_hash.nix32(), nar_size, "zstd")
    cache.write_narinfo(narinfo_for(info, exported, "zstd", key))
    return exported.url


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout


def make_medium(tmp: Path, split: bool = True, bad_whole: bool = False, forge_ca: bool = False,
                flake: dict[str, object] | None = None, bundle: tuple[str, ...] = ("--all",),
                unlisted: tuple[str, ...] = (), forged_parts: tuple[str, ...] = ()) -> Medium:
    """A signed medium; `flake` overrides manifest.json's flake fields, `bundle` what the
    bundle holds (git bundle create's revisions), `unlisted` files its sha256sums leaves out,
    `forged_parts` install.sh's parts changed before signing (as a forger's medium has them)."""
    key = SecretKey.generate("test-media-1")
    store = tmp / "fakestore"
    store.mkdir()
    media = tmp / "media"
    cache = BinaryCache(media / "cache")
    cache.create()

    busybox_disk, busybox = _fake_path(store, "busybox", "busybox")
    (busybox_disk / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", busybox_disk / "bin" / "sh")
    data_disk, data = _fake_path(store, "data", "data")
    data_disk.mkdir()
    (data_disk / "blob").write_bytes(os.urandom(300_000))  # incompressible: a NAR worth splitting
    top_disk, toplevel = _fake_path(store, "nixos-system-alpha-24.05", "toplevel")
    (top_disk / "bin").mkdir(parents=True)
    stc = top_disk / "bin" / "switch-to-configuration"
    stc.write_text(f'#!{busybox}/bin/sh\necho "$1 $NIXOS_INSTALL_BOOTLOADER" > /etc/installed-by-test\n')
    stc.chmod(0o755)
    (top_disk / "data").symlink_to(data)
    # The `@tools` git: a wrapper around the system's git binary (enough to test the fallback).
    git_disk, git_tool = _fake_path(store, "git-2.42.0", "git")
    (git_disk / "bin").mkdir(parents=True)
    (git_disk / "bin" / "git").write_text('#!/bin/sh\nexec /usr/lib/git-core/git "$@"\n')
    (git_disk / "bin" / "git").chmod(0o755)

    _export(cache, busybox_disk, busybox, [], key)
    data_url = _export(cache, data_disk, data, [], key)
    _export(cache, top_disk, toplevel, [busybox, data], key)
    _export(cache, git_disk, git_tool, [], key)
    nar_bytes = sum(nar.nar_hash_and_size(p)[1] for p in (busybox_disk, data_disk, top_disk, git_disk))

    (media / "registry.json").write_text(json.dumps({"version": 2, "flakes": []}))
    (media / "README.txt").write_text("test medium\n")
    for name in ("install.sh", *INSTALL_PARTS):
        shutil.copy(SCRIPT.with_name(name), media / name)
    for name in forged_parts:
        with open(media / name, "a") as f:
            f.write(PWN)
    repo = tmp / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "flake.nix").write_text("{ outputs = _: { }; }\n")
    _git(repo, "add", "flake.nix")
    _git(repo, "commit", "-q", "-m", "one")
    _git(repo, "branch", "dev")
    (repo / "flake.nix").write_text("{ outputs = _: { x = 1; }; }\n")
    _git(repo, "commit", "-q", "-am", "two")
    _git(repo, "tag", "v1")
    rev = _git(repo, "rev-parse", "HEAD").strip()
    (media / "flake").mkdir()
    _git(repo, "bundle", "create", "-q", str(media / "flake" / "repo.bundle"), *bundle)

    whole_lines = []
    if split:
        nar_file = cache.root / data_url
        blob = nar_file.read_bytes()
        whole = hashlib.sha256(blob + (b"x" if bad_whole else b"")).hexdigest()
        whole_lines.append(f"# whole {whole} cache/{data_url}")
        half = len(blob) // 2
        Path(f"{nar_file}.part000").write_bytes(blob[:half])
        Path(f"{nar_file}.part001").write_bytes(blob[half:])
        nar_file.unlink()

    sums = []
    for path in sorted(p for p in media.rglob("*") if p.is_file()):
        rel = path.relative_to(media).as_posix()
        if rel in unlisted:
            continue
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    manifest = {
        "version": 1, "mediabuilder": "0.1.0", "nix": "2.8.0", "created": "2026-01-01T00:00:00Z",
        "key": {"name": key.name, "public": key.public().render(), "fingerprint": key.public().fingerprint()},
        "hosts": {"alpha": {"toplevel": toplevel, "flake_attr": "nixosConfigurations.alpha", "paths": 4,
                            "nar_bytes": nar_bytes}},
        "flake": {"bundle": "flake/repo.bundle", "rev": rev, "branch": "main", "dirty": False,
                  "remotes": REMOTES, "source": busybox, "inputs": {"nixpkgs": {"path": busybox, "rev": "0" * 40}},
                  **(flake or {})},
        "tools": {"git": git_tool},
        "store_paths": [busybox, data, toplevel, git_tool],
        "files": {},
    }
    manifest_text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (media / "manifest.json").write_text(manifest_text)

    mdir = tmp / "manifest-dir"
    mdir.mkdir()
    (mdir / "manifest.json").write_text(manifest_text)
    (mdir / "sha256sums").write_text("\n".join(sums + whole_lines) + "\n")
    (mdir / "hosts").write_text(f"alpha\t{toplevel}\t{nar_bytes}\n")
    (mdir / "store-paths").write_text(f"alpha\t{busybox} {data} {toplevel} {git_tool}\n@tools\tgit\t{git_tool}\n")
    (mdir / "key").write_text(key.public().render() + "\n")
    manifest_hash, _ = nar.nar_hash_and_size(mdir)
    if forge_ca:
        # Content-addressed: Nix takes it without any signature, so it must be refused.
        manifest_path = make_fixed_output_path(True, manifest_hash, "mediabuilder-manifest").full
        ca = f"fixed:r:sha256:{manifest_hash.nix32()}"
        _export(cache, mdir, manifest_path, [], SecretKey.generate("forger"), ca=ca)
    else:
        manifest_path = make_store_path("output:out", manifest_hash.digest, "mediabuilder-manifest").full
        _export(cache, mdir, manifest_path, [], key)
    (media / "manifest.storepath").write_text(manifest_path + "\n")
    (media / "media-key.pub").write_text(key.public().render() + "\n")
    return Medium(media, key, toplevel, data, rev, manifest_path, git_tool)


def run_installer(
    tmp: Path, medium: Medium, *args: str, mode: int = 0o755, hide_git: bool = False, typed: str | None = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run install.sh from a read-only bind mount of the medium into a bind-mounted root, with
    no network. `hide_git`: no git on PATH, and an empty tmpfs as the live /nix. `typed`: run on
    a terminal (script(1) gives it a pty as /dev/tty, its output then on stdout) and type this."""
    root = tmp / "target"
    root.mkdir(exist_ok=True)
    root.chmod(mode)
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    wrapper = (
        'set -e; mount --make-rprivate /; mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; '
        'mount --bind "$2" "$2"; '
        'if [ "$3" = 1 ]; then mount --bind /dev/null "$(command -v git)"; mount -t tmpfs none /nix; fi; '
        'shift 3; exec "$@"'
    )
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "TMPDIR": str(scratch), "HOME": str(tmp / "home")}
    install = ["bash", str(medium.root / "install.sh"), "--media", str(medium.root), "--root", str(root), *args]
    if typed is not None:
        install = ["setsid", "script", "-qec", shlex.join(install), "/dev/null"]
    result = subprocess.run(
        ["unshare", "-m", "-n", "--", "bash", "-c", wrapper, "_", str(medium.root), str(root), str(int(hide_git)),
         *install],
        capture_output=True, text=True, env=env, input=typed if typed is not None else "",
    )
    assert list(scratch.iterdir()) == [], "the scratch directory was not cleaned up"
    return result, root


def _needs_real_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (bind mounts, namespaces)")
    for tool in ("nix", "unshare", "busybox", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("install.sh: error:")]


@pytest.mark.integration
def test_install_from_read_only_medium(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path)
    fp = medium.key.public().fingerprint()
    result, root = run_installer(tmp_path, medium, "--yes", "--expect-key", fp)
    assert result.returncode == 0, result.stderr
    assert fp in result.stderr
    steps = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    assert len(steps) == 13, steps  # one a phase, the bundle checked in scratch among them
    assert "reassembling cache/nar/" in result.stderr

    profile = root / "nix/var/nix/profiles/system"
    assert os.readlink(root / "nix/var/nix/profiles" / os.readlink(profile)) == medium.toplevel
    assert (root / medium.toplevel.lstrip("/") / "bin/switch-to-configuration").is_file()
    assert (root / medium.data_path.lstrip("/") / "blob").stat().st_size == 300_000
    assert (root / "etc/NIXOS").exists()
    assert (root / "etc/installed-by-test").read_text() == "boot 1\n"
    assert not (root / ".mediabuilder-cache").exists()

    flake = root / "etc/nixos"
    assert _git(flake, "rev-parse", "HEAD").strip() == medium.rev
    assert _git(flake, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert set(_git(flake, "branch", "--format=%(refname:short)").split()) == {"main", "dev"}
    assert _git(flake, "tag").split() == ["v1"]
    remotes = {}
    for name in _git(flake, "remote").split():
        remotes[name] = _git(flake, "remote", "get-url", name).strip()
    assert remotes == REMOTES

    lib = root / "var/lib/mediabuilder"
    assert (lib / "registry.json").read_bytes() == (medium.root / "registry.json").read_bytes()
    assert (lib / "manifest.json").read_bytes() == (medium.root / "manifest.json").read_bytes()
    assert (lib / "media-key.pub").read_bytes() == (medium.root / "media-key.pub").read_bytes()
    conf = (root / "root/.config/nix/nix.conf").read_text()
    assert "experimental-features = nix-command flakes" in conf
    assert "flake-registry = /var/lib/mediabuilder/registry.json" in conf


@pytest.mark.integration
def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path)
    result, root = run_installer(tmp_path, medium, "--dry-run", "--expect-key", medium.key.public().render())
    assert result.returncode == 0, result.stderr
    assert medium.key.public().fingerprint() in result.stderr
    assert medium.toplevel in result.stderr
    assert "store paths: 4" in result.stderr
    assert list(root.iterdir()) == []


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["part", "narinfo", "missing", "manifest", "key", "expect", "short", "target"])
def test_bad_medium_or_target_is_refused_before_writing(tmp_path: Path, damage: str) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path)
    cache = medium.root / "cache"
    part = next(cache.glob("nar/*.part001"))
    subject = ""
    if damage == "part":
        _flip_byte(part)
        subject = f"{part.relative_to(medium.root)}: sha256 mismatch (damaged media)"
    elif damage == "narinfo":
        narinfo = cache / (medium.toplevel[len("/nix/store/"):][:32] + ".narinfo")
        narinfo.write_text(narinfo.read_text().replace("Sig:", "Sig: x"))
        subject = f"{narinfo.relative_to(medium.root)}: sha256 mismatch"
    elif damage == "missing":
        part.unlink()
        subject = f"{part.relative_to(medium.root)}: missing from the media"
    elif damage == "manifest":
        path = medium.root / "manifest.json"
        path.write_text(path.read_text().replace('"alpha"', '"alphA"'))
        subject = "manifest.json: differs from the signed copy"
    elif damage == "key":
        (medium.root / "media-key.pub").write_text(SecretKey.generate("other").public().render() + "\n")
        subject = "is not signed by media-key.pub"
    elif damage == "expect":
        subject = "media-key.pub: fingerprint"
    elif damage == "short":  # the 64-bit fingerprint of old mediabuilder, even the right one
        subject = "is a 64-bit fingerprint, too short to trust"
    elif damage == "target":
        subject = "owned by uid 0 with mode 700"
    args = ["--yes"]
    if damage == "expect":
        args += ["--expect-key", ":".join(["0000"] * 8)]
    elif damage == "short":
        args += ["--expect-key", medium.key.public().fingerprint()[:19]]
    result, root = run_installer(tmp_path, medium, *args, mode=0o700 if damage == "target" else 0o755)
    assert result.returncode == 2, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and subject in errors[0], result.stderr
    assert list(root.iterdir()) == []


@pytest.mark.integration
def test_target_checks(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False)
    root = tmp_path / "target"
    (root / "etc/nixos").mkdir(parents=True)
    (root / "etc/nixos/x").write_text("")
    result, _ = run_installer(tmp_path, medium, "--yes")
    assert result.returncode == 2
    assert error_lines(result) == [
        f"install.sh: error: {root}/etc/nixos: is not empty; empty it or pass another --flake-dir"
    ]
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


@pytest.mark.integration
def test_reassembled_nar_is_checked_against_its_whole_line(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, bad_whole=True)
    result, root = run_installer(tmp_path, medium, "--yes")
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1 and "sha256 mismatch of the reassembled parts (damaged media)" in errors[0], result.stderr
    # Written only after every check passed, and removed on the way out.
    assert not (root / ".mediabuilder-cache").exists()


@pytest.mark.integration
def test_git_from_the_media_when_the_installer_has_none(tmp_path: Path) -> None:
    _needs_real_tools()
    if not Path("/usr/lib/git-core/git").is_file():
        pytest.skip("needs Debian's /usr/lib/git-core/git")
    medium = make_medium(tmp_path, split=False)
    result, root = run_installer(tmp_path, medium, "--yes", hide_git=True)
    assert result.returncode == 0, result.stderr
    assert f"copying {medium.git_tool} from the media into the live store" in result.stderr
    assert _git(root / "etc/nixos", "rev-parse", "HEAD").strip() == medium.rev


@pytest.mark.integration
def test_content_addressed_manifest_is_refused(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, forge_ca=True)
    result, root = run_installer(tmp_path, medium, "--dry-run")
    assert result.returncode == 2
    errors = error_lines(result)
    # Nix 2.8 rejects this narinfo's CA line itself ("wrong length"); newer Nix copies the path
    # unsigned and the script's own `ca` check refuses it.
    assert len(errors) == 1, result.stderr
    assert "content-addressed" in errors[0] or "Nix cannot copy the signed manifest" in errors[0]
    assert list(root.iterdir()) == []


def _resum(tmp: Path, medium: Medium, name: str) -> None:
    """sha256sums given `name`'s new sum, outside the signature: the manifest path's NAR and
    narinfo rewritten to match, the narinfo keeping the media key's signature over the old one."""
    mdir = tmp / "manifest-dir"
    sums = (mdir / "sha256sums").read_text().splitlines()
    digest = hashlib.sha256((medium.root / name).read_bytes()).hexdigest()
    (mdir / "sha256sums").write_text("\n".join(f"{digest}  {name}" if ln.endswith(f"  {name}") else ln
                                               for ln in sums) + "\n")
    cache = BinaryCache(medium.root / "cache")
    narinfo = cache.root / f"{medium.manifest_path[len('/nix/store/'):][:32]}.narinfo"
    signed = [ln for ln in narinfo.read_text().splitlines() if ln.startswith("Sig: ")]
    assert len(signed) == 1
    _export(cache, mdir, medium.manifest_path, [], SecretKey.generate("forger"))
    lines = [ln for ln in narinfo.read_text().splitlines() if not ln.startswith("Sig: ")]
    narinfo.write_text("\n".join([*lines, *signed]) + "\n")


@pytest.mark.integration
@pytest.mark.parametrize("part", INSTALL_PARTS)
@pytest.mark.parametrize("damage", ["changed", "missing", "unlisted", "resummed", "forged"])
def test_a_part_not_as_signed_is_refused_before_writing(tmp_path: Path, damage: str, part: str) -> None:
    """install.sh sources a part only once its copy matched the signed sha256sums and the sha256
    install.sh carries: a part changed after signing, missing, not in the sums, changed with its
    sum changed outside the signature, or signed as it is on a forger's medium (a dry run without
    --expect-key, which never asks for the fingerprint) stops the install in one line naming it
    (the manifest's narinfo for the fourth), status 2, the target untouched; the checks before
    it need no function of a part."""
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False, unlisted=(part,) if damage == "unlisted" else (),
                         forged_parts=(part,) if damage == "forged" else ())
    narinfo = f"cache/{medium.manifest_path[len('/nix/store/'):][:32]}.narinfo"
    expected = {
        "changed": f"{part}: sha256 mismatch (damaged media)",
        "missing": f"{part}: missing from the media (damaged or incomplete media; rebuild it)",
        "unlisted": f"{part}: not listed in the signed sha256sums, so nothing vouches for it (forged media, or made "
                    "by an incompatible mediabuilder)",
        "resummed": f"{narinfo}: the manifest is not signed by media-key.pub (forged or damaged media)",
        "forged": f"{part}: is not the part this install.sh was made with (forged media, or made by another "
                  "mediabuilder version): run the medium's own install.sh, checked by its sha256",
    }[damage]
    if damage in ("changed", "resummed"):
        with open(medium.root / part, "a") as f:
            f.write(PWN)
    if damage == "resummed":
        _resum(tmp_path, medium, part)
    if damage == "missing":
        (medium.root / part).unlink()
    args = ("--dry-run",) if damage == "forged" else ("--yes", "--expect-key", medium.key.public().fingerprint())
    result, root = run_installer(tmp_path, medium, *args)
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [f"install.sh: error: {expected}"], result.stderr
    assert "command not found" not in result.stderr and "unbound variable" not in result.stderr
    assert list(root.iterdir()) == []


CAPS = {"media-key.pub": 4096, "manifest.storepath": 4096, "manifest.json": 64 << 20, "registry.json": 64 << 20}


@pytest.mark.integration
@pytest.mark.parametrize("name", [*CAPS, "flake/repo.bundle"])
def test_oversized_files_are_refused_before_they_are_read(tmp_path: Path, name: str) -> None:
    """A file install.sh reads whole (a key, the manifest path, the JSON files) or copies to
    scratch (the bundle) bigger than its cap is refused in one line before a byte of it is read:
    sparse files, so a medium that claims 64 MiB or the scratch disk's free space costs nothing."""
    _needs_real_tools()
    medium = make_medium(tmp_path)
    path = medium.root / name
    if name in CAPS:
        size = CAPS[name] + 1
        cap = str(CAPS[name])
    else:  # at most a third of scratch's free space: the clone needs room too
        st = os.statvfs(tmp_path)
        size = st.f_bavail * st.f_frsize
        cap = ""
    os.truncate(path, size)
    result, root = run_installer(tmp_path, medium, "--yes", "--expect-key", medium.key.public().fingerprint())
    assert result.returncode == 2, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"install.sh: error: {name}: is {size} bytes, more than the {cap}"), errors[0]
    assert errors[0].endswith("it may have (damaged or forged media" + (
        ")" if name in CAPS else "; or set TMPDIR to a directory with more room than " + str(tmp_path / "scratch)")
    )), errors[0]
    assert list(root.iterdir()) == []
