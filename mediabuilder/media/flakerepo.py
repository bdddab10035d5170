"""The flake's git repository as it travels on the media: one `git bundle` with every ref and
its history, plus the branch, commit and remotes to restore on the installed machine.

The user's repository is only read: the bundle is made from a temporary `--shared` mirror, and
an uncommitted working tree (`--allow-dirty`) is committed with a temporary index into that
mirror's object store, on a branch name the user does not have. The systems are then built from
that commit (`snapshot_ref`), so the installed /etc/nixos evaluates to them."""

from __future__ import annotations

import atexit
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
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
# `nix build` leaves these symlinks in the working directory; they are never the user's changes.
_RESULT_LINKS = ("result", "result-*")
_LISTED = 3  # dirty files named in the error
# scheme://authority...: the authority ends at the first '/', '?' or '#'.
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
_SSH_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git"})
# Query parameters that carry a secret (GitLab's private_token, OAuth's access_token, signed
# URLs' sig and X-Amz-*): dropped from recorded URLs, compared without case.
_SECRET_PARAMS = frozenset({
    "token", "access_token", "private_token", "oauth_token", "auth_token", "job_token", "id_token",
    "refresh_token", "password", "passwd", "pass", "pwd", "secret", "client_secret", "auth", "key", "api_key",
    "apikey", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
})
_warned: set[tuple[Path, str]] = set()  # (repository, remote) warned about credentials: once per run


@dataclass(frozen=True)
class FlakeRepo:
    top: Path  # the repository's top-level directory (of this worktree)
    subdir: str  # the flake's directory inside it ("" at the top)
    rev: str
    branch: str | None
    dirty: bool
    remotes: dict[str, str] = field(default_factory=dict)
    changes: tuple[str, ...] = ()  # dirty paths (relative to top), ignored paths left out
    mirror: Path | None = None  # the temporary mirror holding the commit of a dirty tree


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, input: bytes | None = None,
         raw: bool = False) -> str:
    out = runner.run(["git", "--no-optional-locks", "-C", str(repo), *args], env=env, input=input).stdout.decode()
    return out if raw else out.strip()


def _probe(repo: Path, *args: str) -> str | None:
    """A git query that may fail: its output, or None."""
    proc = runner.run(["git", "--no-optional-locks", "-C", str(repo), *args], check=False)
    return proc.stdout.decode().strip() if proc.returncode == 0 else None


def open_repo(flake_dir: Path, ignore: Iterable[Path] = ()) -> FlakeRepo:
    """Read the repository that holds `flake_dir`, refusing states that cannot be shipped so that
    the installed /etc/nixos evaluates to the built systems. `ignore`: paths that never count as
    the user's changes (the cache, the signing key)."""
    top_text = _probe(flake_dir, "rev-parse", "--show-toplevel")
    if top_text is None:
        raise InvalidInput(
            f"{flake_dir}: the flake is not in a git repository",
            hint="mediabuilder ships the flake with its history: `git init` and commit it first",
        )
    top = Path(top_text)
    rev = _probe(top, "rev-parse", "--verify", "-q", "HEAD^{commit}")
    if not rev:
        raise InvalidInput(f"{top}: the repository has no commit yet", hint="commit the flake first")
    check_shippable(top, flake_dir.resolve())
    subdir = os.path.relpath(flake_dir.resolve(), top) if flake_dir.resolve() != top else ""
    changes = dirty_paths(top, ignore)
    branch = _probe(top, "symbolic-ref", "--short", "-q", "HEAD") or None
    return FlakeRepo(top=top, subdir=subdir, rev=rev, branch=branch, dirty=bool(changes), remotes=_remotes(top),
                     changes=changes)


def check_shippable(top: Path, flake_dir: Path) -> None:
    """Refuse, before any work, what a bundle cannot carry or Nix would change."""
    if _probe(top, "rev-parse", "--is-shallow-repository") == "true":
        raise InvalidInput(f"{top}: the repository is a shallow clone; its bundle would lack the history "
                           "it needs and could not be cloned at install", hint=f"run `git -C {top} fetch --unshallow`")
    staged = _git(top, "ls-files", "--stage", "-z", raw=True).split("\0")
    if (top / ".gitmodules").exists() or any(e.startswith("160000 ") for e in staged):
        raise InvalidInput(f"{top}: the repository has submodules, which the media cannot carry",
                           hint="vendor their files into the repository (or a flake input) and commit")
    nix_file = os.path.relpath(flake_dir / "flake.nix", top)
    if _probe(top, "ls-files", "--error-unmatch", "--", f":(literal){nix_file}") is None:
        raise InvalidInput(f"{flake_dir / 'flake.nix'}: not committed to the repository at {top}",
                           hint="git add and commit the flake")
    lock = os.path.relpath(flake_dir / "flake.lock", top)
    if _probe(top, "ls-files", "--error-unmatch", "--", f":(literal){lock}") is None:
        raise InvalidInput(f"{flake_dir / 'flake.lock'}: no committed lock file; the media pins the inputs "
                           "the lock names", hint=f"run `nix flake lock {flake_dir}` and commit flake.lock")


def _remotes(top: Path) -> dict[str, str]:
    """The remotes' URLs as the media records them: without passwords or tokens (see
    `without_credentials`), each remote that had some named in one warning."""
    remotes: dict[str, str] = {}
    proc = runner.run(["git", "-C", str(top), "config", "-z", "--get-regexp", r"^remote\..*\.url$"], check=False)
    config = proc.stdout.decode()
    for entry in config.split("\0"):
        key, _, url = entry.partition("\n")
        if key:
            name = key.removeprefix("remote.").removesuffix(".url")
            clean = without_credentials(url)
            if clean != url and (top, name) not in _warned:
                _warned.add((top, name))
                ui.warn(f"{top}: remote {name}: its URL carries credentials; the media records it without them "
                        f"({clean})")
            remotes[name] = clean
    return remotes


def without_credentials(url: str) -> str:
    """`url` without the secrets in its userinfo and query: ssh URLs keep their user name
    (`ssh://git@host/x`) and lose a password; any other scheme loses the whole userinfo, which
    is a token or `user:password` (`https://deploy:TOKEN@host/x` -> `https://host/x`); query
    parameters that carry tokens (`?private_token=`, `?access_token=`, ...) are dropped.
    scp-like `git@host:path` and local paths carry no secret and stay as they are."""
    match = _URL_RE.fullmatch(url)
    if match is None:
        return url
    scheme, authority, rest = match.groups()
    rest = _without_secret_params(rest)
    if "@" not in authority:
        return f"{scheme}://{authority}{rest}"
    userinfo, _, host = authority.rpartition("@")
    if scheme.lower() in _SSH_SCHEMES:
        user = userinfo.partition(":")[0]
        return f"{scheme}://{user}@{host}{rest}" if user else f"{scheme}://{host}{rest}"
    return f"{scheme}://{host}{rest}"


def _without_secret_params(rest: str) -> str:
    """A URL's path, query and fragment without the query parameters in `_SECRET_PARAMS`
    (`/x.git?private_token=T&ref=main` -> `/x.git?ref=main`)."""
    path, mark, query = rest.partition("?")
    if not mark:
        return rest
    query, hash_, fragment = query.partition("#")
    kept = [p for p in query.split("&") if p.partition("=")[0].lower() not in _SECRET_PARAMS]
    return path + (f"?{'&'.join(kept)}" if kept else "") + hash_ + fragment


def dirty_paths(top: Path, ignore: Iterable[Path] = ()) -> tuple[str, ...]:
    """The working tree's changes against HEAD (paths relative to `top`), leaving out untracked
    files under `ignore` and `nix build`'s `result` links."""
    # As git names them: from the real top-level directory (symlinked parents resolved).
    ignored = [Path(os.path.realpath(Path(os.path.abspath(p)).parent)) / Path(p).name for p in ignore]
    fields = _git(top, "status", "--porcelain=v1", "-z", "--untracked-files=all", raw=True).split("\0")
    changes: list[str] = []
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:  # a rename's or copy's source follows
            changes.append(fields[i])
            i += 1
        if status == "??" and _ignored(top / path, ignored):
            continue
        changes.append(path)
    return tuple(changes)


def _ignored(path: Path, ignored: list[Path]) -> bool:
    if path.is_symlink() and any(fnmatch.fnmatchcase(path.name, p) for p in _RESULT_LINKS):
        return True
    return any(path == p or p in path.parents for p in ignored)


def dirty_error(repo: FlakeRepo) -> InvalidInput:
    shown = ", ".join(repo.changes[:_LISTED])
    more = f" and {len(repo.changes) - _LISTED} more" if len(repo.changes) > _LISTED else ""
    return InvalidInput(f"{repo.top}: the git tree has uncommitted changes: {shown}{more}",
                        hint="commit them, or pass --allow-dirty to ship them as a labelled commit on top")


def commit_time(repo: FlakeRepo) -> int | None:
    """The committer time of the worktree's HEAD (the shipped commit, or the parent of a dirty
    tree's snapshot) in seconds since 1970; None when git cannot say."""
    text = _probe(repo.top, "show", "-s", "--format=%ct", "HEAD")
    return int(text) if text is not None and text.isdigit() else None


def _commit_working_tree(repo: FlakeRepo, mirror: Path, scratch: Path) -> str:
    """Commit the changed files of the working tree on top of HEAD, into `mirror`'s object
    store, with a temporary index: the user's index, objects and refs are not touched."""
    objects = _git(repo.top, "rev-parse", "--path-format=absolute", "--git-path", "objects")
    env = {"GIT_INDEX_FILE": str(scratch / "index"), "GIT_OBJECT_DIRECTORY": str(mirror / "objects"),
           "GIT_ALTERNATE_OBJECT_DIRECTORIES": objects, "GIT_LITERAL_PATHSPECS": "1", **_IDENTITY}
    _git(repo.top, "read-tree", "HEAD", env=env)
    listed = "".join(f"{p}\0" for p in repo.changes).encode()
    _git(repo.top, "add", "-A", "--pathspec-from-file=-", "--pathspec-file-nul", env=env, input=listed)
    tree = _git(repo.top, "write-tree", env=env)
    message = "mediabuilder: uncommitted changes of the working tree (built with --allow-dirty)"
    return _git(repo.top, "commit-tree", tree, "-p", "HEAD", "-m", message, env=env)


def _new_branch(mirror: Path, commit: str) -> str:
    """A branch for `commit` whose name no ref of the repository has or conflicts with."""
    names = [UNCOMMITTED_BRANCH, *(f"{UNCOMMITTED_BRANCH}-{n}" for n in range(2, 10)),
             "mediabuilder-uncommitted", *(f"mediabuilder-uncommitted-{n}" for n in range(2, 10))]
    for name in names:
        ok = runner.run(["git", "-C", str(mirror), "update-ref", f"refs/heads/{name}", commit, ""], check=False)
        if ok.returncode == 0:
            return name
    raise InvalidInput(f"every branch name mediabuilder uses for uncommitted changes is taken ({names[-1]})",
                       hint="commit your changes instead of --allow-dirty")


def _mirror(repo: FlakeRepo, scratch: Path) -> Path:
    """A bare `--shared` mirror of every ref of the user's repository (nothing copied, nothing
    written to it)."""
    mirror = scratch / "repo.git"
    runner.run(["git", "clone", "--quiet", "--mirror", "--shared", "--", str(repo.top), str(mirror)])
    return mirror


def _set_head(mirror: Path, repo: FlakeRepo) -> None:
    """HEAD as this worktree has it (a mirror's HEAD is the main worktree's)."""
    if repo.branch is not None:
        _git(mirror, "symbolic-ref", "HEAD", f"refs/heads/{repo.branch}")
    else:
        _git(mirror, "update-ref", "--no-deref", "HEAD", repo.rev)


def snapshot(repo: FlakeRepo) -> FlakeRepo:
    """The dirty working tree as a labelled commit on top of HEAD, in a temporary mirror that is
    removed when mediabuilder exits; returns the repository as the media will have it."""
    scratch = Path(tempfile.mkdtemp(prefix="mediabuilder-repo-"))
    atexit.register(shutil.rmtree, scratch, True)
    mirror = _mirror(repo, scratch)
    commit = _commit_working_tree(repo, mirror, scratch)
    branch = _new_branch(mirror, commit)
    shipped = FlakeRepo(repo.top, repo.subdir, commit, branch, True, repo.remotes, repo.changes, mirror)
    _set_head(mirror, shipped)
    ui.warn(f"{repo.top}: uncommitted changes shipped as commit {commit[:12]} on branch {branch}")
    return shipped


def snapshot_ref(repo: FlakeRepo) -> str:
    """The flake reference of a snapshot's commit, for Nix."""
    assert repo.mirror is not None and repo.branch is not None
    ref = f"git+file://{repo.mirror}?ref=refs/heads/{repo.branch}&rev={repo.rev}"
    return ref + (f"&dir={repo.subdir}" if repo.subdir else "")


# The pack inside a bundle depends on how many threads searched for deltas (one per core by
# default) and on the compression settings of whoever builds it: fix both (docs/reproducible.md).
BUNDLE_CREATE = ("-c", "pack.threads=1", "-c", "pack.window=10", "-c", "pack.depth=50", "-c", "core.compression=-1",
                 "-c", "pack.compression=-1", "bundle", "create", "--quiet")


def write_bundle(repo: FlakeRepo, output: Path, allow_dirty: bool) -> FlakeRepo:
    """Bundle every ref into `output`; a dirty tree is refused unless `allow_dirty`, which adds
    the working tree as a labelled commit on a branch of its own (see `snapshot`). Returns the
    repo as the media has it."""
    if repo.dirty and not allow_dirty:
        raise dirty_error(repo)
    if repo.dirty and repo.mirror is None:
        repo = snapshot(repo)
    output.parent.mkdir(parents=True, exist_ok=True)
    if repo.mirror is not None:
        _git(repo.mirror, *BUNDLE_CREATE, str(output.resolve()), "--all")
        return repo
    with tempfile.TemporaryDirectory(prefix="mediabuilder-repo-") as tmp:
        mirror = _mirror(repo, Path(tmp))
        _set_head(mirror, repo)
        _git(mirror, *BUNDLE_CREATE, str(output.resolve()), "--all")
    return repo
