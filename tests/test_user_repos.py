"""The repositories users bring, walked as a user would (issue 11, items 2, 5, 6, 7): real media
built from a real git repository made here, then either installed offline and the installed
/etc/nixos re-evaluated to the installed toplevel, or refused in one line (exit 2) before any
work — no cache, no key, no output — with the user's refs, index, objects and files untouched."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import assert_one_line_error, build_toplevels, prepare_example, run_cli
from test_install import evaluate_installed, install_offline
from test_install_script import make_medium, run_installer

from mediabuilder.build import BuildRequest, check_systems
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.writer import export_tree
from mediabuilder.errors import InvalidInput
from mediabuilder.profile import CacheSettings, MediaSettings
from mediabuilder.store import nar
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.pathinfo import PathInfo
from mediabuilder.store.storepath import make_store_path

pytestmark = pytest.mark.integration

HOSTS = ("alpha", "beta")
ASKED = ("beta", "alpha")  # not the order Nix 2.8 answers in
ORIGIN = "https://git.example.invalid/example/machines.git"
BACKUP = "ssh://git@backup.example.invalid/srv/git/machines.git"
GIT_ENV = {"GIT_AUTHOR_NAME": "User", "GIT_AUTHOR_EMAIL": "user@example.invalid", "GIT_COMMITTER_NAME": "User",
           "GIT_COMMITTER_EMAIL": "user@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], env={**os.environ, **GIT_ENV}, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


@dataclass(frozen=True)
class Base:
    dest: Path
    flake: Path  # the example's own repository
    cache: Path  # shared by the builds that succeed (outside every repository)
    toplevels: dict[str, str]  # each host built on its own


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("repos")
    dest = root / "example"
    prepare_example(dest)
    return Base(dest, dest / "flake", root / "cache", build_toplevels(dest / "flake", HOSTS))


@contextlib.contextmanager
def inputs_out_of_reach(dest: Path) -> Iterator[None]:
    """The flake inputs' original sources hidden: an install must not need them."""
    hidden = dest.parent / f"{dest.name}-inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    try:
        yield
    finally:
        os.rename(hidden, dest / "inputs")


def clone(base: Base, dest: Path, *args: str) -> Path:
    """A user's clone of the example, with its remotes as the example has them."""
    subprocess.run(["git", "clone", "-q", *args, f"file://{base.flake}", str(dest)], env={**os.environ, **GIT_ENV},
                   check=True, capture_output=True)
    git(dest, "remote", "set-url", "origin", ORIGIN)
    git(dest, "remote", "add", "backup", BACKUP)
    return dest


def repo_state(repo: Path, skip: str = "") -> dict[str, object]:
    """Everything of a repository a build could change: refs, HEAD, index, objects, worktrees,
    status and the working tree's files (but the directory `skip`, e.g. a cache given inside)."""
    index = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-path", "index"))
    files = {}
    for directory, dirs, names in os.walk(repo):
        dirs[:] = [d for d in dirs if d != ".git" and Path(directory, d) != repo / skip]
        for name in names + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            path = Path(directory, name)
            st = os.lstat(path)
            files[str(path.relative_to(repo))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return {
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
        "head": (git(repo, "rev-parse", "--symbolic-full-name", "HEAD"), git(repo, "rev-parse", "HEAD")),
        "index": hashlib.sha256(index.read_bytes()).hexdigest() if index.exists() else None,
        "objects": git(repo, "count-objects", "-v"),
        "worktrees": git(repo, "worktree", "list", "--porcelain"),
        "status": [line for line in git(repo, "status", "--porcelain=v1", "--untracked-files=all", "--ignored")
                   .splitlines() if not (skip and line[3:].startswith(f"{skip}/"))],
        "files": files,
    }


def build(flake: str | Path, hosts: tuple[str, ...], output: Path, cache: Path, *extra: str | Path,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    refs = [f"--flake={flake}#{h}" for h in hosts] or [f"--flake={flake}"]
    return run_cli("build", *refs, "--cache", cache, "--output", output, *extra, cwd=cwd)


def printed(proc: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    assert proc.returncode == 0, proc.stderr
    return [(host, path) for host, path in (line.split("\t") for line in proc.stdout.splitlines())]


def manifest(media: Path) -> dict:
    return json.loads((media / "manifest.json").read_text(encoding="utf-8"))


def install_and_evaluate(base: Base, media: Path, root: Path, host: str, subdir: str = "") -> str:
    """Install `host` offline from `media` into `root`; the installed toplevel, which the
    installed flake must evaluate to offline."""
    root.mkdir()
    with inputs_out_of_reach(base.dest):
        proc = install_offline(media, root, "--host", host, "--yes")
        assert proc.returncode == 0, proc.stderr
        profile = root / "nix/var/nix/profiles/system"
        installed = os.readlink(profile.parent / os.readlink(profile))
        assert evaluate_installed(root, host, subdir) == installed
    return installed


# Item 5: hosts in any order


@pytest.fixture(scope="module")
def asked_in_reverse(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    media = tmp_path_factory.mktemp("reverse") / "media"
    proc = build(base.flake, ASKED, media, base.cache)
    assert printed(proc) == [(h, base.toplevels[h]) for h in ASKED]
    return media


@pytest.mark.parametrize("order", [ASKED, HOSTS, ()], ids=["beta-alpha", "alpha-beta", "all"])
def test_each_host_gets_its_own_system(base: Base, tmp_path: Path, order: tuple[str, ...]) -> None:
    proc = build(base.flake, order, tmp_path / "media", base.cache)
    assert printed(proc) == [(h, base.toplevels[h]) for h in order or HOSTS]
    hosts = manifest(tmp_path / "media")["hosts"]
    assert {h: v["toplevel"] for h, v in hosts.items()} == base.toplevels
    assert {h: v["flake_attr"] for h, v in hosts.items()} == {h: f"nixosConfigurations.{h}" for h in HOSTS}


@pytest.mark.parametrize("host", HOSTS)
def test_hosts_asked_in_reverse_install_their_own_system(base: Base, asked_in_reverse: Path, tmp_path: Path,
                                                        host: str) -> None:
    installed = install_and_evaluate(base, asked_in_reverse, tmp_path / "root", host)
    assert installed == base.toplevels[host]
    assert Path(installed).name[33:].startswith(f"nixos-system-{host}-")


# Item 6: repository states that are shipped


@dataclass(frozen=True)
class State:
    repo: Path  # what the user has (the repository whose state must not change)
    flake: str  # what the user passes to --flake
    subdir: str
    branch: str | None
    rev: str
    remotes: dict[str, str] = field(default_factory=lambda: {"origin": ORIGIN, "backup": BACKUP})


def _flake_in_subdir(base: Base, tmp_path: Path) -> Path:
    top = tmp_path / "site-repo"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    shutil.copytree(base.flake, top / "machines", ignore=shutil.ignore_patterns(".git"))
    (top / "README.md").write_text("# site\n\nThe machines are in machines/.\n")
    git(top, "add", "-A")
    git(top, "commit", "-q", "-m", "machines in a subdirectory")
    git(top, "remote", "add", "origin", ORIGIN)
    git(top, "remote", "add", "backup", BACKUP)
    return top


def make_state(base: Base, tmp_path: Path, kind: str) -> State:
    if kind in ("subdir", "dir-param"):
        top = _flake_in_subdir(base, tmp_path)
        flake = str(top / "machines") if kind == "subdir" else f"git+file://{top}?dir=machines"
        return State(top, flake, "machines", "main", git(top, "rev-parse", "HEAD"))
    repo = clone(base, tmp_path / "repo")
    if kind == "worktree":
        wt = tmp_path / "feature-wt"
        git(repo, "worktree", "add", "-q", "-b", "feature", str(wt))
        return State(wt, str(wt), "", "feature", git(wt, "rev-parse", "HEAD"))
    if kind == "detached":
        git(repo, "checkout", "-q", "--detach")
        (repo / "README.md").write_text("# machines\n\nA commit on no branch.\n")
        git(repo, "commit", "-q", "-am", "on a detached HEAD")
        return State(repo, str(repo), "", None, git(repo, "rev-parse", "HEAD"))
    assert kind == "non-ascii"
    git(repo, "checkout", "-q", "-b", "häuser/straße-ü")
    git(repo, "remote", "add", "ürsprung", "https://git.example.invalid/ü/maschinen.git")
    remotes = {"origin": ORIGIN, "backup": BACKUP, "ürsprung": "https://git.example.invalid/ü/maschinen.git"}
    return State(repo, str(repo), "", "häuser/straße-ü", git(repo, "rev-parse", "HEAD"), remotes)


SHIPPED = [("worktree", "alpha"), ("detached", "beta"), ("non-ascii", "alpha"), ("subdir", "beta"),
           ("dir-param", "alpha")]


@pytest.mark.parametrize(("kind", "host"), SHIPPED, ids=[k for k, _ in SHIPPED])
def test_repository_state_is_shipped_and_installs(base: Base, tmp_path: Path, kind: str, host: str) -> None:
    state = make_state(base, tmp_path, kind)
    expected = build_toplevels(state.flake, HOSTS)
    before = repo_state(state.repo)
    media = tmp_path / "media"
    proc = build(state.flake, ASKED, media, base.cache)
    assert printed(proc) == [(h, expected[h]) for h in ASKED]
    assert repo_state(state.repo) == before
    flake = manifest(media)["flake"]
    assert (flake["rev"], flake["branch"], flake["subdir"], flake["dirty"]) == (state.rev, state.branch,
                                                                                 state.subdir, False)
    assert flake["remotes"] == state.remotes
    assert "\\u" not in (media / "manifest.json").read_text(encoding="utf-8")
    registry = json.loads((media / "registry.json").read_text())
    assert sorted(f["from"]["id"] for f in registry["flakes"]) == ["nixpkgs", "site", "systems", "tools"]

    root = tmp_path / "root"
    assert install_and_evaluate(base, media, root, host, state.subdir) == expected[host]
    etc = root / "etc/nixos"
    assert git(etc, "rev-parse", "HEAD") == state.rev
    branch = subprocess.run(["git", "-C", str(etc), "symbolic-ref", "--short", "-q", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    assert (branch or None) == state.branch
    assert {name: git(etc, "remote", "get-url", name) for name in git(etc, "remote").splitlines()} == state.remotes
    assert (etc / state.subdir / "flake.nix").is_file() and (etc / state.subdir / "flake.lock").is_file()
    assert git(etc, "status", "--porcelain") == ""


# Item 6: repository states refused before any work


def _refused_state(base: Base, tmp_path: Path, kind: str) -> tuple[Path, str, tuple[str, ...]]:
    """(the repository, the --flake given, what the error line must name)."""
    if kind == "shallow":
        repo = clone(base, tmp_path / "repo", "--depth", "1")
        return repo, str(repo), ("shallow", str(repo))
    repo = clone(base, tmp_path / "repo")
    if kind == "submodule":
        subprocess.run(["git", "-c", "protocol.file.allow=always", "-C", str(repo), "submodule", "add", "-q",
                        f"file://{base.dest}/inputs/nixpkgs", "vendor/nixpkgs"], env={**os.environ, **GIT_ENV},
                       check=True, capture_output=True)
        git(repo, "commit", "-q", "-m", "vendor nixpkgs")
        return repo, str(repo), ("submodules", str(repo))
    if kind == "no-lock":
        git(repo, "rm", "-q", "flake.lock")
        git(repo, "commit", "-q", "-m", "no lock")
        return repo, str(repo), ("flake.lock", "no committed lock file")
    if kind == "untracked-flake":
        (repo / "new").mkdir()
        shutil.copy(repo / "flake.nix", repo / "new/flake.nix")
        shutil.copy(repo / "flake.lock", repo / "new/flake.lock")
        return repo, str(repo / "new"), (f"{repo}/new/flake.nix: not committed",)
    if kind == "path-ref":
        return repo, f"path:{repo}", (f"path:{repo}", "no git revision")
    if kind == "ref-param":
        return repo, f"git+file://{repo}?ref=main", ("ref=", "not supported")
    assert kind == "dirty"
    (repo / "hosts/alpha.nix").write_text((repo / "hosts/alpha.nix").read_text() + "# edited\n")
    (repo / "notes.txt").write_text("todo\n")
    (repo / "result-notes").write_text("a file, not a link: the user's\n")
    return repo, str(repo), ("uncommitted changes: hosts/alpha.nix, notes.txt, result-notes", str(repo))


REFUSED = ["shallow", "submodule", "no-lock", "untracked-flake", "path-ref", "ref-param", "dirty"]


@pytest.mark.parametrize("kind", REFUSED)
def test_repository_state_is_refused_up_front(base: Base, tmp_path: Path, kind: str) -> None:
    repo, flake, needles = _refused_state(base, tmp_path, kind)
    before = repo_state(repo)
    cache, media = tmp_path / "cache", tmp_path / "media"
    proc = build(flake, ASKED, media, cache)
    assert_one_line_error(proc, *needles)
    assert "Resolving hosts" not in proc.stderr  # before any evaluation
    assert not cache.exists() and not media.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert repo_state(repo) == before
    assert (repo / "flake.lock").exists() == (kind != "no-lock")


def test_lock_out_of_date_is_refused_and_not_rewritten(base: Base, tmp_path: Path) -> None:
    repo = clone(base, tmp_path / "repo")
    extra = f'inputs = {{\n    extra = {{ url = "path:{base.dest}/inputs/site"; flake = false; }};'
    (repo / "flake.nix").write_text((repo / "flake.nix").read_text().replace("inputs = {", extra, 1))
    git(repo, "commit", "-q", "-am", "a new input, lock not updated")
    before = repo_state(repo)
    proc = build(repo, ASKED, tmp_path / "media", tmp_path / "cache")
    assert_one_line_error(proc, "requires lock file changes")
    assert repo_state(repo) == before
    assert not (tmp_path / "media").exists()


# Item 2, repository side: the cache, the key and result links are not the user's changes


def test_cache_key_and_result_links_inside_the_repository(base: Base, tmp_path: Path) -> None:
    repo = clone(base, tmp_path / "repo")
    os.symlink(base.toplevels["alpha"], repo / "result")
    os.symlink(base.toplevels["beta"], repo / "result-beta")
    rev = git(repo, "rev-parse", "HEAD")
    (tmp_path / "link").symlink_to(repo)
    # The second time the cache, with its key and NARs, already lies in the tree; the third time
    # it is named through a symlink to the repository.
    for n, cache in ((1, repo / "cache"), (2, repo / "cache"), (3, tmp_path / "link/cache")):
        proc = build(repo, ASKED, tmp_path / f"media{n}", cache, cwd=repo)
        assert printed(proc) == [(h, base.toplevels[h]) for h in ASKED]
        flake = manifest(tmp_path / f"media{n}")["flake"]
        assert (flake["rev"], flake["dirty"]) == (rev, False)
    assert (repo / "cache/signing-key.sec").is_file()


def test_allow_dirty_in_a_worktree_keeps_the_users_refs(base: Base, tmp_path: Path) -> None:
    repo = clone(base, tmp_path / "repo")
    first = git(repo, "rev-parse", "HEAD~2")
    git(repo, "branch", "mediabuilder/uncommitted", first)  # the user's own branch of that name
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(wt))
    head = git(wt, "rev-parse", "HEAD")
    (wt / "hosts/alpha.nix").write_text((wt / "hosts/alpha.nix").read_text() + "# edited\n")
    (wt / "notes.txt").write_text("todo\n")
    (wt / "README.md").unlink()
    os.symlink(base.toplevels["alpha"], wt / "result")
    before, before_main = repo_state(wt, skip="cache"), repo_state(repo)
    media = tmp_path / "media"
    proc = build(wt, ASKED, media, wt / "cache", "--allow-dirty", cwd=wt)
    assert proc.returncode == 0, proc.stderr
    assert "uncommitted changes shipped" in proc.stderr
    assert repo_state(wt, skip="cache") == before and repo_state(repo) == before_main
    flake = manifest(media)["flake"]
    assert (flake["branch"], flake["dirty"]) == ("mediabuilder/uncommitted-2", True)
    bundle = media / "flake/repo.bundle"
    heads = git(tmp_path, "bundle", "list-heads", str(bundle)).splitlines()
    assert f"{first} refs/heads/mediabuilder/uncommitted" in heads
    assert f"{flake['rev']} refs/heads/mediabuilder/uncommitted-2" in heads
    assert f"{flake['rev']} HEAD" in heads
    shipped = tmp_path / "shipped"
    git(tmp_path, "clone", "-q", str(bundle), str(shipped))
    assert git(shipped, "rev-parse", "HEAD^") == head
    files = set(git(shipped, "ls-tree", "-r", "--name-only", "HEAD").splitlines())
    assert files == {"flake.lock", "flake.nix", "hosts/alpha.nix", "hosts/beta.nix", "hosts/common.nix", "notes.txt"}
    assert (shipped / "hosts/alpha.nix").read_text() == (wt / "hosts/alpha.nix").read_text()
    # Built from the shipped commit: the installed /etc/nixos evaluates to the installed system.
    toplevels = dict(printed(proc))
    for host in HOSTS:
        assert (Path(toplevels[host]) / "configuration-revision").read_text().strip() == flake["rev"]
    assert install_and_evaluate(base, media, tmp_path / "root", "beta") == toplevels["beta"]
    assert git(tmp_path / "root/etc/nixos", "symbolic-ref", "--short", "HEAD") == "mediabuilder/uncommitted-2"


# Item 7: --system NAME=PATH


def test_system_that_is_not_a_toplevel_is_refused(base: Base, tmp_path: Path) -> None:
    sw = os.path.realpath(Path(base.toplevels["alpha"]) / "sw")
    proc = run_cli("build", f"--flake={base.flake}", f"--system=alpha={sw}", "--cache", tmp_path / "cache",
                   "--output", tmp_path / "media")
    assert_one_line_error(proc, f"alpha={sw}", "not a NixOS system", "init")
    assert sorted(tmp_path.iterdir()) == []


def test_system_name_must_be_one_of_the_flakes_hosts(base: Base, tmp_path: Path) -> None:
    proc = run_cli("build", f"--flake={base.flake}", f"--system=gamma={base.toplevels['alpha']}",
                   "--cache", base.cache, "--output", tmp_path / "media")
    assert_one_line_error(proc, "gamma", "nixosConfigurations.gamma")
    assert not (tmp_path / "media").exists()
    proc = run_cli("build", f"--flake={base.flake}", f"--system=al pha={base.toplevels['alpha']}",
                   "--cache", tmp_path / "cache", "--output", tmp_path / "media")
    assert_one_line_error(proc, "'al pha' is not a host name")
    assert sorted(tmp_path.iterdir()) == []


def test_systems_given_in_reverse_map_to_their_names(base: Base, tmp_path: Path) -> None:
    systems = [f"--system={h}={base.toplevels[h]}" for h in ASKED]
    proc = run_cli("build", f"--flake={base.flake}", *systems, "--cache", base.cache, "--output", tmp_path / "m")
    assert printed(proc) == [(h, base.toplevels[h]) for h in ASKED]
    assert {h: v["toplevel"] for h, v in manifest(tmp_path / "m")["hosts"].items()} == base.toplevels


@pytest.mark.parametrize("files", [("init", "nixos-version", "bin/switch-to-configuration"),
                                   ("init", "nixos-version")], ids=["toplevel", "no-switch"])
def test_system_not_in_the_local_store_is_checked_in_the_cache(tmp_path: Path, files: tuple[str, ...]) -> None:
    tree = tmp_path / "tree"
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("#!/bin/sh\n")
    nar_hash, nar_size = nar.nar_hash_and_size(tree)
    path = make_store_path("output:out", nar_hash.digest, "nixos-system-alpha-23.11")
    assert not os.path.exists(path.full)
    cache = BinaryCache(tmp_path / "cache")
    export_tree(cache, tree, PathInfo(path, nar_hash, nar_size, ()), SecretKey.generate("test-1"), "zstd")
    req = BuildRequest(refs=(), cache=CacheSettings(dir=cache.root), media=MediaSettings(), output=tmp_path / "m",
                       systems=(("alpha", path),))
    if "bin/switch-to-configuration" in files:
        check_systems(req, cache)
    else:
        with pytest.raises(InvalidInput, match="not a NixOS system \\(no bin/switch-to-configuration in it\\)"):
            check_systems(req, cache)


# install.sh: the bundle is cloned and checked before anything is written to the target

BAD_BUNDLES = {
    "subdir-without-flake": ({"subdir": "machines"}, ("--all",), "flake/repo.bundle: has no machines/flake.nix"),
    "subdir-outside": ({"subdir": "../x"}, ("--all",), "flake subdir '../x' points outside the repository"),
    "prerequisites": ({}, ("main~1..main",), "flake/repo.bundle: git cannot clone the bundle"),
    "branch-elsewhere": ({"branch": "dev"}, ("--all",), "flake/repo.bundle: branch dev is at"),
    "commit-not-held": ({"branch": None, "rev": "0" * 40}, ("--all",), "does not hold the recorded commit"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_install_checks_the_bundle_before_writing(tmp_path: Path, case: str) -> None:
    flake, bundle, subject = BAD_BUNDLES[case]
    medium = make_medium(tmp_path, split=False, flake=flake, bundle=bundle)
    result, root = run_installer(tmp_path, medium, "--yes")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and subject in errors[0], result.stderr
    assert list(root.iterdir()) == []
