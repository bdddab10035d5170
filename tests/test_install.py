"""End to end, offline: build media for the example flake, then install from it inside a network
namespace with the media bind-mounted read-only and the flake inputs' sources out of reach."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, closure_of, make_nix_env, nix, prepare_example, run_cli

pytestmark = pytest.mark.integration

HOSTS = ("alpha", "beta")


@dataclass(frozen=True)
class Built:
    dest: Path
    flake: Path
    media: Path
    cache: Path
    toplevels: dict[str, str]
    key: str  # the media public key


def _prepare(dest: Path) -> None:
    prepare_example(dest)


def _build(flake: Path, output: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["build", *[f"--flake={flake}#{h}" for h in HOSTS], "--cache", str(cache), "--output", str(output)]
    return run_cli(*args, *extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    base = tmp_path_factory.mktemp("e2e")
    dest = base / "example"
    _prepare(dest)
    proc = _build(dest / "flake", base / "media", base / "cache")
    assert proc.returncode == 0, proc.stderr
    toplevels = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert sorted(toplevels) == list(HOSTS)
    key = (base / "media" / "media-key.pub").read_text().strip()
    # The original inputs' sources out of reach: installs must not need them.
    hidden = base / "inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    yield Built(dest, dest / "flake", base / "media", base / "cache", toplevels, key)
    os.rename(hidden, dest / "inputs")


def install_offline(media: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """install.sh in a new network and mount namespace: no network, media read-only, root a
    mount point owned by root with mode 755."""
    ro = root.parent / f"{root.name}-media-ro"
    ro.mkdir(exist_ok=True)
    script = (
        'set -e; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; mount --bind "$3" "$3"; '
        'shift 3; exec bash "$@"'
    )
    root.chmod(0o755)
    env = make_nix_env()
    env.pop("NIX_CONFIG")  # install.sh must not depend on the test's Nix settings
    return subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "bash", "-c", script, "install",
         str(media), str(ro), str(root), str(ro / "install.sh"), "--media", str(ro), "--root", str(root), *args],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )


def tree_state(root: Path) -> list[tuple[str, int, int]]:
    """Every entry under `root` with its mode and size: to show nothing changed."""
    state = []
    for directory, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            st = os.lstat(Path(directory) / name)
            state.append((str(Path(directory, name).relative_to(root)), st.st_mode, st.st_size))
    return sorted(state)


def test_media_tree(built: Built) -> None:
    media = built.media
    for name in ("install.sh", "install-host.sh", "install-disk.sh", "install-upgrade.sh", "install-rebuild.sh",
                 "media-key.pub", "manifest.json", "manifest.storepath", "registry.json", "flake/repo.bundle",
                 "cache/nix-cache-info", "README.txt"):
        assert (media / name).is_file(), name
    for name in ("cache/nar", "cache/log", "cache/realisations"):
        assert (media / name).is_dir(), name
    manifest = json.loads((media / "manifest.json").read_text())
    assert manifest["version"] == 1
    assert {h: v["toplevel"] for h, v in manifest["hosts"].items()} == built.toplevels
    assert manifest["flake"]["remotes"] == {
        "origin": "https://git.example.invalid/example/machines.git",
        "backup": "ssh://git@backup.example.invalid/srv/git/machines.git",
    }
    assert manifest["key"]["public"] == built.key
    # Shared paths stored once: one narinfo per distinct path, plus the manifest's own.
    union = set(manifest["store_paths"])
    narinfos = list((media / "cache").glob("*.narinfo"))
    assert len(narinfos) == len(union) + 1
    for host in HOSTS:
        assert set(closure_of(built.toplevels[host])) <= union
    # Registry: nixpkgs first, each pin an archived input with its narHash.
    registry = json.loads((media / "registry.json").read_text())
    assert registry["version"] == 2
    ids = [f["from"]["id"] for f in registry["flakes"]]
    assert ids == ["nixpkgs", "site", "systems", "tools"]
    for entry in registry["flakes"]:
        assert entry["to"]["type"] == "path" and entry["to"]["path"] in union
    # Every file's size and sha256 as the manifest says; verify passes on the whole tree.
    for name, entry in manifest["files"].items():
        data = (media / name).read_bytes()
        assert len(data) == entry["size"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    proc = run_cli("verify", media, "--trusted-key", built.key)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("host", HOSTS)
def test_install_offline_read_only(built: Built, host: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(built.media, root, "--host", host, "--yes")
    assert proc.returncode == 0, proc.stderr
    toplevel = built.toplevels[host]
    # The whole closure, valid in the target store.
    installed = sorted(nix("nix", "--store", root, "path-info", "-r", toplevel).stdout.split())
    assert installed == closure_of(toplevel)
    # The system profile points at the toplevel.
    profile = root / "nix/var/nix/profiles/system"
    link = os.readlink(profile)
    assert os.readlink(profile.parent / link) == toplevel
    # switch-to-configuration ran once, for the boot loader.
    log = (root / "var/log/switch-to-configuration.log").read_text().splitlines()
    assert log == [f"action=boot NIXOS_INSTALL_BOOTLOADER=1 toplevel={toplevel}"]
    # The flake repository with its full history and its remotes.
    flake_dir = root / "etc/nixos"
    git = ["git", "-C", str(flake_dir)]
    original = ["git", "-C", str(built.flake)]
    assert _out(*git, "rev-parse", "HEAD") == _out(*original, "rev-parse", "HEAD")
    assert _out(*git, "rev-list", "--count", "HEAD") == _out(*original, "rev-list", "--count", "HEAD")
    assert _out(*git, "remote", "get-url", "origin") == "https://git.example.invalid/example/machines.git"
    assert _out(*git, "remote", "get-url", "backup") == _out(*original, "remote", "get-url", "backup")
    assert _out(*git, "status", "--porcelain") == ""
    # The flake evaluates on the installed machine's store and settings, with no network.
    assert evaluate_installed(root, host) == toplevel


def evaluate_installed(root: Path, host: str, subdir: str = "") -> str:
    """The installed /etc/nixos (its flake in `subdir`) evaluated offline on the target's store."""
    conf = (root / "root/.config/nix/nix.conf").read_text()
    assert "flake-registry = /var/lib/mediabuilder/registry.json" in conf
    # The target's settings, with its absolute paths seen from outside the target.
    outside = conf.replace("/var/lib/mediabuilder/", f"{root}/var/lib/mediabuilder/")
    conf_file = root.parent / f"{root.name}-nix.conf"
    conf_file.write_text(outside + "substituters =\nbuild-users-group =\n")
    env = {k: v for k, v in os.environ.items() if k != "NIX_CONFIG"}
    env["NIX_USER_CONF_FILES"] = str(conf_file)
    env["NIX_CONF_DIR"] = str(root / "etc/nix")  # not the build machine's /etc/nix
    attr = f"nixosConfigurations.{host}.config.system.build.toplevel.outPath"
    flake = f"git+file://{root}/etc/nixos" + (f"?dir={subdir}" if subdir else "")
    proc = subprocess.run(
        ["unshare", "--net", "nix", "--store", str(root), "eval", "--raw", f"{flake}#{attr}"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def test_dry_run_changes_nothing(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "keep").write_text("x")
    before = tree_state(root)
    proc = install_offline(built.media, root, "--host", "alpha", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert built.toplevels["alpha"] in proc.stderr + proc.stdout
    assert tree_state(root) == before


def test_several_hosts_need_a_choice_under_yes(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(built.media, root, "--yes")
    assert proc.returncode == 2
    assert "alpha" in proc.stderr and "beta" in proc.stderr
    assert tree_state(root) == []


def _damaged_copy(built: Built, tmp_path: Path) -> Path:
    copy = tmp_path / "media"
    shutil.copytree(built.media, copy)
    return copy


def _first_nar(media: Path) -> Path:
    manifest = json.loads((media / "manifest.json").read_text())
    toplevel = manifest["hosts"]["alpha"]["toplevel"]
    info = (media / "cache" / f"{Path(toplevel).name[:32]}.narinfo").read_text()
    url = next(line.split(": ", 1)[1] for line in info.splitlines() if line.startswith("URL: "))
    return media / "cache" / url


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped-nar", "missing-file", "edited-manifest", "edited-registry"])
def test_refuses_damaged_media(built: Built, tmp_path: Path, damage: str) -> None:
    media = _damaged_copy(built, tmp_path)
    if damage == "flipped-nar":
        nar_file = _first_nar(media)
        _flip(nar_file, 40)
        named = nar_file.relative_to(media).as_posix()
    elif damage == "missing-file":
        (media / "flake/repo.bundle").unlink()
        named = "flake/repo.bundle"
    elif damage == "edited-manifest":
        text = (media / "manifest.json").read_text().replace('"version": 1', '"version": 1 ')
        (media / "manifest.json").write_text(text)
        named = "manifest.json"
    else:
        registry = json.loads((media / "registry.json").read_text())
        registry["flakes"][0]["to"]["path"] = "/nix/store/00000000000000000000000000000000-source"
        (media / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
        named = "registry.json"
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media, root, "--host", "alpha", "--yes")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr
    assert tree_state(root) == []


def test_refuses_media_signed_by_another_key(built: Built, tmp_path: Path) -> None:
    other_cache = tmp_path / "other-cache"
    media = tmp_path / "other-media"
    os.rename(built.dest / "../inputs-out-of-reach", built.dest / "inputs")
    try:
        proc = _build(built.flake, media, other_cache)
    finally:
        os.rename(built.dest / "inputs", built.dest / "../inputs-out-of-reach")
    assert proc.returncode == 0, proc.stderr
    assert (media / "media-key.pub").read_text().strip() != built.key
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media, root, "--host", "alpha", "--yes", "--expect-key", built.key)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "media-key.pub" in errors[0], proc.stderr
    assert tree_state(root) == []


# Bad input to `build`


def test_build_refuses_dirty_tree(tmp_path: Path) -> None:
    dest = tmp_path / "example"
    _prepare(dest)
    (dest / "flake/hosts/alpha.nix").write_text((dest / "flake/hosts/alpha.nix").read_text() + "\n# edit\n")
    proc = _build(dest / "flake", tmp_path / "media", tmp_path / "cache")
    assert_one_line_error(proc, "uncommitted changes", str(dest / "flake"))
    assert not (tmp_path / "media").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".media")] == []
    proc = _build(dest / "flake", tmp_path / "media", tmp_path / "cache", "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "media/manifest.json").read_text())
    assert manifest["flake"]["dirty"] is True
    assert manifest["flake"]["branch"] == "mediabuilder/uncommitted"
    listing = _out("git", "bundle", "list-heads", str(tmp_path / "media/flake/repo.bundle"))
    assert f"{manifest['flake']['rev']} refs/heads/mediabuilder/uncommitted" in listing
    # The user's repository is untouched: no new branch, still dirty.
    assert "mediabuilder" not in _out("git", "-C", str(dest / "flake"), "branch", "--all")
    assert _out("git", "-C", str(dest / "flake"), "status", "--porcelain") != ""


def test_build_refuses_unknown_host(built: Built, tmp_path: Path) -> None:
    os.rename(built.dest / "../inputs-out-of-reach", built.dest / "inputs")
    try:
        proc = run_cli("build", f"--flake={built.flake}#nosuchhost", "--output", tmp_path / "m",
                       "--cache", built.cache)
    finally:
        os.rename(built.dest / "inputs", built.dest / "../inputs-out-of-reach")
    assert_one_line_error(proc, "nixosConfigurations.nosuchhost")


def test_build_refuses_non_empty_output(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious").write_text("keep me")
    for force in ((), ("--force",)):
        proc = run_cli("build", f"--flake={built.flake}#alpha", "--output", out, "--cache", built.cache, *force)
        assert_one_line_error(proc, f"{out}: holds files that are not part of a medium (precious)")
        assert (out / "precious").read_text() == "keep me"
        assert os.listdir(out) == ["precious"]


def _on_a_terminal(media: Path, root: Path, answers: str, *args: str) -> subprocess.CompletedProcess[str]:
    """install.sh with a real terminal (script(1) gives it a pty as /dev/tty); `answers` typed."""
    root.chmod(0o755)
    install = shlex.join(["bash", str(media / "install.sh"), "--media", str(media), "--root", str(root), *args])
    command = f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))} && {install}"
    env = make_nix_env()
    env.pop("NIX_CONFIG")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "setsid", "script", "-qec", command,
                           "/dev/null"], input=answers, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_host_menu_on_a_terminal(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = _on_a_terminal(built.media, root, "2\n", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "1) alpha" in out and "2) beta" in out, out
    assert built.toplevels["beta"] in out and built.toplevels["alpha"] not in out.split("2) beta", 1)[1]
    assert tree_state(root) == []


def test_confirmation_declined_writes_nothing(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    proc = _on_a_terminal(built.media, root, "y\nn\n", "--host", "alpha")  # the fingerprint yes, the install no
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"install.sh: error: {root}: not confirmed; nothing was written" in proc.stdout + proc.stderr
    assert tree_state(root) == []
