"""The flake's git repository as it travels on the media: one `git bundle` with every ref and
its history, plus the branch, commit and remotes to restore on the installed machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mediabuilder import run as runner
from mediabuilder import ui
from mediabuilder.errors import InvalidInput

UNCOMMITTED_BRANCH = "mediabuilder/uncommitted"
# Fixed identity for the commit of an uncommitted working tree, so it works with no git config.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "mediabuilder",
    "GIT_AUTHOR_EMAIL": "mediabuilder@localhost",
    "GIT_COMMITTER_NAME": "mediabuilder",
    "GIT_COMMITTER_EMAIL": "mediabuilder@localhost",
}


@dataclass(frozen=True)
class FlakeRepo:
    top: Path  # the repository's top-level directory
    subdir: str  # the flake's directory inside it ("" at the top)
    rev: str
    branch: str | None
    dirty: bool
    remotes: dict[str, str] = field(default_factory=dict)


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return runner.output(["git", "-C", str(repo), *args], env=env)


def open_repo(flake_dir: Path) -> FlakeRepo:
    """Read the repository that holds `flake_dir`; it must be a git checkout."""
    proc = runner.run(["git", "-C", str(flake_dir), "rev-parse", "--show-toplevel"], check=False)
    if proc.returncode != 0:
        raise InvalidInput(
            f"{flake_dir}: the flake is not in a git repository",
            hint="mediabuilder ships the flake with its history: `git init` and commit it first",
        )
    top = Path(proc.stdout.decode().strip())
    head = runner.run(["git", "-C", str(top), "rev-parse", "--verify", "-q", "HEAD"], check=False)
    if head.returncode != 0:
        raise InvalidInput(f"{top}: the repository has no commit yet", hint="commit the flake first")
    branch = runner.run(["git", "-C", str(top), "symbolic-ref", "--short", "-q", "HEAD"], check=False)
    remotes: dict[str, str] = {}
    config = runner.run(["git", "-C", str(top), "config", "--get-regexp", r"^remote\..*\.url$"], check=False)
    for line in config.stdout.decode().splitlines():
        key, _, url = line.partition(" ")
        remotes[key.removeprefix("remote.").removesuffix(".url")] = url
    status = _git(top, "status", "--porcelain", "--untracked-files=normal")
    return FlakeRepo(
        top=top,
        subdir=os.path.relpath(flake_dir.resolve(), top) if flake_dir.resolve() != top else "",
        rev=head.stdout.decode().strip(),
        branch=branch.stdout.decode().strip() or None,
        dirty=bool(status),
        remotes=remotes,
    )


def commit_working_tree(repo: FlakeRepo) -> str:
    """Commit the working tree (tracked and untracked files) on top of HEAD without touching the
    user's index, branches or files; returns the new commit."""
    index = repo.top / ".git" / f"mediabuilder-index-{os.getpid()}"
    env = {"GIT_INDEX_FILE": str(index), **_IDENTITY}
    try:
        _git(repo.top, "read-tree", "HEAD", env=env)
        _git(repo.top, "add", "-A", env=env)
        tree = _git(repo.top, "write-tree", env=env)
    finally:
        index.unlink(missing_ok=True)
    message = "mediabuilder: uncommitted changes of the working tree (built with --allow-dirty)"
    return _git(repo.top, "commit-tree", tree, "-p", "HEAD", "-m", message, env=_IDENTITY)


def write_bundle(repo: FlakeRepo, output: Path, allow_dirty: bool) -> FlakeRepo:
    """Bundle every ref into `output`; a dirty tree is refused unless `allow_dirty`, which adds
    the working tree as branch `mediabuilder/uncommitted`. Returns the repo as the media has it."""
    if repo.dirty and not allow_dirty:
        raise InvalidInput(
            f"{repo.top}: the git tree has uncommitted changes",
            hint="commit them, or pass --allow-dirty to ship them as a labelled commit on top",
        )
    ref = f"refs/heads/{UNCOMMITTED_BRANCH}"
    shipped = repo
    if repo.dirty:
        commit = commit_working_tree(repo)
        _git(repo.top, "update-ref", ref, commit)
        shipped = FlakeRepo(repo.top, repo.subdir, commit, UNCOMMITTED_BRANCH, True, repo.remotes)
        ui.warn(f"{repo.top}: uncommitted changes shipped as commit {commit[:12]} on branch {UNCOMMITTED_BRANCH}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        runner.run(["git", "-C", str(repo.top), "bundle", "create", "--quiet", str(output), "--all"])
        if shipped.branch is None:  # detached HEAD: make sure the commit is reachable
            runner.run(["git", "-C", str(repo.top), "bundle", "verify", "--quiet", str(output)])
    finally:
        if repo.dirty:
            _git(repo.top, "update-ref", "-d", ref)
    return shipped
