"""What a user types, from where a user types it: another working directory, inside the flake,
onto a mounted stick, with --force near things that must never be deleted, two builds at once,
SIGTERM/SIGINT/SIGHUP/SIGKILL part-way, ordinary mistakes, and no right to write the Nix store.

Each case asserts the exact outcome: a medium that verifies, or one `error:` line with exit 2
(128 + the signal for an interruption), and nothing lost or left behind. The repository states
(shallow, worktree, submodules, ...) are walked in test_user_repos.py, damaged media in
test_user_verdicts.py, sizes, labels and progress in test_user_images.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Example, assert_one_line_error, make_nix_env, nix, run_cli
from media_checks import write_big_file

pytestmark = pytest.mark.integration

HOST = "alpha"
BIG = 320 * 1024**2  # long enough an export and an image write to be caught part-way


def build_args(example: Example, cache: Path, output: Path | str, *extra: str) -> list[str]:
    return ["build", "--flake", f"{example.flake}#{HOST}", "--cache", str(cache), "--output", str(output), *extra]


def verify_ok(target: Path, key_file: Path, cwd: Path | None = None) -> None:
    proc = run_cli("verify", target, "--trusted-key", key_file, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rstrip().endswith(": ok"), proc.stderr


def listing(root: Path) -> list[str]:
    """Every path under `root`, relative, sorted: what a test compares before and after."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def leftovers(*dirs: Path) -> list[str]:
    """Temporaries mediabuilder may leave: `.tmp-*`, `.NAME.tmp-*`, `.mediabuilder-staging-*`."""
    found = []
    for d in dirs:
        for sub in (d, d / "nar"):
            if sub.is_dir():
                found += [str(p) for p in sub.iterdir() if p.name.startswith(".") and ("tmp" in p.name or
                                                                                     "staging" in p.name)]
    return sorted(found)


# Paths


def test_relative_paths_from_another_directory(example: Example, tmp_path: Path) -> None:
    """`--flake ../x#alpha -o x.iso --cache c` from a directory that is not the flake's: every
    path is the caller's (git bundle runs elsewhere and used to get `cache/...` relative)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    flake = os.path.relpath(example.flake, cwd)
    proc = run_cli("build", "--flake", f"{flake}#{HOST}", "--format", "iso", "-o", "x.iso", "--cache", "c", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{HOST}\t{example.toplevels[HOST]}\n"
    assert sorted(os.listdir(cwd)) == ["c", "x.iso"]
    umask = os.umask(0)
    os.umask(umask)
    assert (cwd / "x.iso").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user makes
    verify_ok(Path("x.iso"), Path("c/signing-key.pub"), cwd=cwd)


def test_from_inside_the_flake_with_the_default_cache(example: Example, tmp_path: Path) -> None:
    """`--flake .#alpha` from inside the flake: the default cache (and its secret key) is made in
    $XDG_CACHE_HOME, not in the repository, which stays clean and is not refused as dirty."""
    xdg = tmp_path / "xdg"
    env = make_nix_env({"XDG_CACHE_HOME": str(xdg)})
    before = subprocess.run(["git", "-C", example.flake, "status", "--porcelain", "--ignored"],
                            capture_output=True, text=True, check=True).stdout
    out = tmp_path / "media"
    proc = run_cli("build", "--flake", f".#{HOST}", "--output", out, cwd=example.flake, env=env)
    assert proc.returncode == 0, proc.stderr
    cache = xdg / "mediabuilder"
    assert f"created signing key {cache / 'signing-key.sec'}" in proc.stderr
    assert (cache / "signing-key.sec").is_file()
    assert not (example.flake / "cache").exists()
    after = subprocess.run(["git", "-C", example.flake, "status", "--porcelain", "--ignored"],
                           capture_output=True, text=True, check=True).stdout
    assert after == before
    verify_ok(out, cache / "signing-key.pub")
    # The secret key is nowhere on the medium.
    secret = (cache / "signing-key.sec").read_bytes().strip()
    assert not [p for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_output_inside_the_repository_is_refused(example: Example, tmp_path: Path) -> None:
    """`-o media` from inside the flake would put the medium into what goes onto the medium."""
    proc = run_cli("build", "--flake", f".#{HOST}", "--cache", tmp_path / "c", "--output", "media",
                   cwd=example.flake)
    assert_one_line_error(proc, f"{example.flake / 'media'}: the output lies inside the flake repository")
    assert not (example.flake / "media").exists()
    assert not (tmp_path / "c").exists()


MOUNT_DRIVER = """
import json, os, subprocess, sys
stick, report, *build = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "tmpfs", stick], check=True)
def cli(*args):
    p = subprocess.run([sys.executable, "-m", "mediabuilder", *args], capture_output=True, text=True)
    return {"rc": p.returncode, "stderr": p.stderr, "listing": sorted(os.listdir(stick))}
steps = {"first": cli(*build)}
key = json.load(open(os.path.join(stick, "manifest.json")))["key"]["public"]
steps["verify"] = cli("verify", stick, "--trusted-key", key)
steps["again"] = cli(*build)
steps["force"] = cli(*build, "--force")
steps["verify2"] = cli("verify", stick, "--trusted-key", key)
open(os.path.join(stick, "notes.txt"), "w").write("mine\\n")
steps["force_with_user_file"] = cli(*build, "--force")
steps["notes"] = open(os.path.join(stick, "notes.txt")).read()
json.dump(steps, open(report, "w"))
"""


def test_output_onto_a_mounted_stick(example: Example, tmp_path: Path) -> None:
    """`--output /media/stick` with a filesystem mounted there (renaming the mount point fails
    with EBUSY): written inside, install.sh and the manifest last; --force replaces the medium
    but never a user's file beside it."""
    stick = tmp_path / "stick"
    stick.mkdir()
    report = tmp_path / "report.json"
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNT_DRIVER, stick, report,
         *build_args(example, tmp_path / "cache", stick)],
        env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(report.read_text())
    medium = ["README.txt", "cache", "flake", "install-disk.sh", "install-host.sh", "install-rebuild.sh",
              "install-upgrade.sh", "install.sh", "manifest.json", "manifest.storepath", "media-key.pub",
              "registry.json"]
    assert steps["first"]["rc"] == 0, steps["first"]["stderr"]
    assert steps["first"]["listing"] == medium
    assert steps["verify"]["rc"] == 0, steps["verify"]["stderr"]
    again = steps["again"]
    assert again["rc"] == 2 and again["stderr"].splitlines()[-2:] == [
        f"error: {stick}: already holds a medium", "hint: pass --force to replace it"]
    assert steps["force"]["rc"] == 0, steps["force"]["stderr"]
    assert steps["force"]["listing"] == medium
    assert steps["verify2"]["rc"] == 0
    refused = steps["force_with_user_file"]
    assert refused["rc"] == 2
    assert refused["stderr"].splitlines()[-2] == (f"error: {stick}: holds files that are not part of a medium "
                                                  "(notes.txt)")
    assert refused["listing"] == sorted([*medium, "notes.txt"])
    assert steps["notes"] == "mine\n"
    assert os.listdir(stick) == []  # the tmpfs was only ever mounted in the namespace


def test_output_through_a_symlink_and_with_a_long_name(example: Example, tmp_path: Path) -> None:
    """`~/stick -> /media/me/STICK` as --output; an image named up to NAME_MAX (255 bytes)."""
    real = tmp_path / "STICK"
    real.mkdir()
    (tmp_path / "stick").symlink_to(real)
    proc = run_cli(*build_args(example, tmp_path / "cache", tmp_path / "stick"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stick").is_symlink() and "install.sh" in os.listdir(real)
    long_name = tmp_path / ("a" * 251 + ".iso")
    proc = run_cli(*build_args(example, tmp_path / "cache", long_name, "--format", "iso"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["STICK", "cache", "stick", long_name.name])
    verify_ok(long_name, tmp_path / "cache" / "signing-key.pub")


def test_a_users_files_named_like_a_medium_are_not_a_medium(example: Example, tmp_path: Path) -> None:
    """A directory with the user's own `cache/` and `README.txt` is refused even with --force."""
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "data").write_text("mine\n")
    (out / "README.txt").write_text("my notes\n")
    for force in ((), ("--force",)):
        proc = run_cli(*build_args(example, tmp_path / "c", out, *force))
        assert_one_line_error(proc, f"{out}: holds files that are not part of a medium (README.txt, cache)")
    assert listing(out) == ["README.txt", "cache", "cache/data"]
    assert (out / "cache" / "data").read_text() == "mine\n"


def test_a_full_cache_disk_is_one_line(example: Example, tmp_path: Path) -> None:
    """The cache's filesystem fills up while NARs are exported (in worker processes)."""
    small = tmp_path / "small"
    small.mkdir()
    script = 'mount -t tmpfs -o size=512k tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "-", small,
                           sys.executable, "-m", "mediabuilder",
                           *build_args(example, small / "cache", tmp_path / "media")],
                          env=make_nix_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=600,
                          check=False)
    assert_one_line_error(proc, f"{small / 'cache'}: no space left on device while filling the cache")
    assert os.listdir(tmp_path) == ["small"]


def test_forkserver_start_method(example: Example, tmp_path: Path) -> None:
    """Python 3.14 starts worker processes from a fork server by default; exports use fork."""
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('forkserver'); "
            "from mediabuilder.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *build_args(example, tmp_path / "cache", tmp_path / "m")],
                          env=make_nix_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    verify_ok(tmp_path / "m", tmp_path / "cache" / "signing-key.pub")


# --force and races


def _protected_case(example: Example, tmp_path: Path, case: str) -> tuple[list[str], Path, str]:
    cache = tmp_path / "outer" / "cache"
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    subprocess.run([sys.executable, "-m", "mediabuilder", "keygen", "t-1", "--secret", key_dir / "t-1.sec",
                    "--public", key_dir / "t-1.pub"], env=make_nix_env({"PYTHONPATH": str(REPO)}), check=True,
                   capture_output=True)
    cache.mkdir(parents=True)
    (cache / "signing-key.sec").write_text("precious\n")
    output, message = {
        "the-cache": (cache, "the output is the cache"),
        "inside-the-cache": (cache / "nar", "the output lies inside the cache"),
        "holding-the-cache": (tmp_path / "outer", "the output contains the cache"),
        "the-repository": (example.flake, "the output is the flake repository"),
        "inside-the-repository": (example.flake / "hosts", "the output lies inside the flake repository"),
        "holding-the-key": (key_dir, "the output contains the signing key"),
        # An image is a file: over the key, in the cache, in the repository.
        "image-over-the-key": (key_dir / "t-1.sec", "the output is the signing key"),
        "image-in-the-cache": (cache / "signing-key.sec", "the output lies inside the cache"),
        "image-in-the-repository": (example.flake / "flake.nix", "the output lies inside the flake repository"),
    }[case]
    args = build_args(example, cache, output, "--force", "--key", str(key_dir / "t-1.sec"))
    return args, output, message


@pytest.mark.parametrize(("fmt", "case"), [
    *(("dir", case) for case in ("the-cache", "inside-the-cache", "holding-the-cache", "the-repository",
                                 "inside-the-repository", "holding-the-key")),
    *(("iso", case) for case in ("image-over-the-key", "image-in-the-cache", "image-in-the-repository")),
])
def test_force_never_deletes_the_cache_the_key_or_the_repository(example: Example, tmp_path: Path, case: str,
                                                                 fmt: str) -> None:
    args, output, message = _protected_case(example, tmp_path, case)
    before = {root: listing(root) for root in (tmp_path, example.flake)}
    proc = run_cli(*args, "--format", fmt)
    assert_one_line_error(proc, f"{output}: {message}")
    assert {root: listing(root) for root in (tmp_path, example.flake)} == before
    assert (tmp_path / "outer" / "cache" / "signing-key.sec").read_text() == "precious\n"
    assert (tmp_path / "keys" / "t-1.sec").read_text().startswith("t-1:")


@pytest.mark.parametrize("fmt", ["dir", "iso"])
def test_an_output_being_written_is_refused(example: Example, tmp_path: Path, fmt: str) -> None:
    """Another build holds the output's lock (the lock is how builds see each other)."""
    output = tmp_path / ("stick" if fmt == "dir" else "old.iso")
    if fmt == "dir":
        output.mkdir()
    else:
        output.write_text("an older image\n")
    fd = os.open(output, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = run_cli(*build_args(example, tmp_path / "cache", output, "--format", fmt, "--force"))
    finally:
        os.close(fd)
    assert_one_line_error(proc, f"{output}: another mediabuilder is writing")
    assert not (tmp_path / "cache").exists()


def test_two_builds_racing_to_one_output(example: Example, tmp_path: Path) -> None:
    """Started together at a new path: exactly one reports success; the other is refused."""
    cache = tmp_path / "cache"
    warm = run_cli(*build_args(example, cache, tmp_path / "warm"))  # both then take the same time
    assert warm.returncode == 0, warm.stderr
    out = tmp_path / "media"
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    procs = [subprocess.Popen([sys.executable, "-m", "mediabuilder", *build_args(example, cache, out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert loser.splitlines()[-2].startswith(f"error: {out}: "), loser
    assert any(s in loser for s in ("appeared while this build was running", "already exists",
                                    "already holds a medium", "another mediabuilder is writing")), loser
    assert sorted(os.listdir(tmp_path)) == ["cache", "media", "warm"]
    verify_ok(out, cache / "signing-key.pub")


# Interruptions


@pytest.fixture(scope="module")
def big_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 320 MiB store path: its export and its image write each last long enough to be hit."""
    src = tmp_path_factory.mktemp("big") / "big-payload"
    src.mkdir()
    write_big_file(src / "payload", BIG)
    return nix("nix-store", "--add", src).stdout.strip()


def session_processes(sid: int) -> list[str]:
    """Living processes of session `sid` (the build and anything it started), as 'pid comm'."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if int(rest[3]) == sid and rest[0] != "Z":
            found.append(f"{pid} {comm}")
    return found


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 600
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {what}")
        time.sleep(0.01)


def phase_marker(phase: str, cache: Path, out_dir: Path) -> Callable[[], bool]:
    if phase == "export":  # a NAR being written into the cache by an export worker
        return lambda: any(p.name.startswith(".tmp-") for p in (cache / "nar").glob(".tmp-*"))
    return lambda: any(out_dir.glob(".mediabuilder-tmp-*"))  # the image being written beside the output


def start_build(example: Example, cache: Path, output: Path, big_path: str) -> subprocess.Popen[str]:
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    argv = [sys.executable, "-m", "mediabuilder", *build_args(example, cache, output, "--format", "iso",
                                                               "--store-path", big_path)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_on_a_terminal)


def _as_on_a_terminal() -> None:
    """The signals as a terminal's shell leaves them: a test run started in the background
    (`pytest &`) ignores SIGINT, and the build would keep that (a SIGHUP nohup ignores stays so)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize(("signame", "to_group", "phase"), [
    ("SIGTERM", False, "export"),  # `timeout`, systemd: the main process only
    ("SIGINT", True, "export"),  # ^C: the terminal's whole process group
    ("SIGHUP", True, "export"),  # the terminal closed
    ("SIGTERM", False, "image"),
    ("SIGINT", True, "image"),
])
def test_signal_part_way(example: Example, big_path: str, tmp_path: Path, signame: str, to_group: bool,
                         phase: str) -> None:
    """Prompt exit with 128 + the signal and one line, no traceback, no process left, nothing left
    in the output's directory or the cache; the next run completes and verifies."""
    cache, out_dir = tmp_path / "cache", tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "media.iso"
    proc = start_build(example, cache, output, big_path)
    wait_for(phase_marker(phase, cache, out_dir), proc, f"the {phase} phase")
    signum = signal.Signals[signame]
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    rc = proc.wait(timeout=120)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert rc == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == f"error: interrupted ({signame}); temporary files removed"
    time.sleep(0.5)
    assert session_processes(proc.pid) == []
    assert os.listdir(out_dir) == []
    assert leftovers(cache) == []
    again = run_cli(*build_args(example, cache, output, "--format", "iso", "--store-path", big_path))
    assert again.returncode == 0, again.stderr
    verify_ok(output, cache / "signing-key.pub")


@pytest.mark.parametrize("phase", ["export", "image"])
def test_sigkill_part_way_then_the_next_run_cleans_up(example: Example, big_path: str, tmp_path: Path,
                                                      phase: str) -> None:
    """SIGKILL to the build alone: its workers die with it (no orphan writes on); what it left is
    deleted by the next run, which completes."""
    cache, out_dir = tmp_path / "cache", tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "media.iso"
    proc = start_build(example, cache, output, big_path)
    wait_for(phase_marker(phase, cache, out_dir), proc, f"the {phase} phase")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(proc.pid) == []
    left = leftovers(cache, out_dir)
    assert left, "the kill left no temporary: it did not land part-way"
    other = out_dir / "other-name.iso"  # what a killed run left goes, whatever the next one writes
    again = run_cli(*build_args(example, cache, other, "--format", "iso", "--store-path", big_path))
    assert again.returncode == 0, again.stderr
    assert leftovers(cache, out_dir) == []
    assert os.listdir(out_dir) == ["other-name.iso"]
    verify_ok(other, cache / "signing-key.pub")


# Ordinary mistakes


def _bad_input_cases(example: Example, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    bad_profile = tmp_path / "latin1.toml"
    bad_profile.write_bytes(b'[media]\nlabel = "caf\xe9"\n')
    spaced = tmp_path / "spaced.sec"
    good = subprocess.run([sys.executable, "-m", "mediabuilder", "keygen", "good-1", "--secret", tmp_path / "g.sec",
                           "--public", tmp_path / "g.pub"], env=make_nix_env({"PYTHONPATH": str(REPO)}),
                          capture_output=True, text=True, check=True)
    assert good.returncode == 0
    spaced.write_text("my key:" + (tmp_path / "g.sec").read_text().partition(":")[2])
    cache = tmp_path / "cache"
    return {
        "jobs-negative": (build_args(example, cache, tmp_path / "m", "--jobs", "-1"),
                          "mediabuilder build: argument --jobs/-j: -1 is not between 1 and 256"),
        "jobs-word": (build_args(example, cache, tmp_path / "m", "-j", "many"),
                      "argument --jobs/-j: 'many' is not a whole number"),
        "profile-not-utf8": (["build", "--profile", str(bad_profile)], f"{bad_profile}: not UTF-8 text (byte 20)"),
        "keygen-non-ascii": (["keygen", "clé-1"], "key name 'clé-1': must be 1-100 ASCII letters"),
        "keygen-space": (["keygen", "my key"], "key name 'my key': must be 1-100 ASCII letters"),
        "key-with-space": (build_args(example, cache, tmp_path / "m", "--key", str(spaced)),
                           f"{spaced}: secret key name 'my key' is not 1-100 ASCII letters"),
        "output-dot-non-empty": (build_args(example, tmp_path.with_name(tmp_path.name + "-cache"), "."),
                                 f"{tmp_path}: holds files that are not part of a medium (g.pub, g.sec, latin1.toml, "
                                 "spaced.sec)"),
        "size-for-an-iso": (build_args(example, cache, tmp_path / "m.iso", "--format", "iso", "--size", "8G"),
                            "--size 8G: only a fat32 image has a size to choose, not --format iso"),
        "iso-onto-a-directory": (build_args(example, tmp_path.with_name(tmp_path.name + "-cache"), tmp_path,
                                            "--format", "iso"),
                                 f"{tmp_path}: is a directory, but --format iso writes an image file"),
    }


@pytest.mark.parametrize("case", ["jobs-negative", "jobs-word", "profile-not-utf8", "keygen-non-ascii",
                                  "keygen-space", "key-with-space", "output-dot-non-empty", "iso-onto-a-directory",
                                  "size-for-an-iso"])
def test_ordinary_bad_input(example: Example, tmp_path: Path, case: str) -> None:
    args, message = _bad_input_cases(example, tmp_path)[case]
    before = listing(tmp_path)
    assert_one_line_error(run_cli(*args, cwd=tmp_path), message)
    assert listing(tmp_path) == before  # no cache, no key, no output, no temporary


def test_output_dot_in_an_empty_directory(example: Example, tmp_path: Path) -> None:
    """`cd /media/stick && mediabuilder build ... -o .`: the medium is written right there."""
    here = tmp_path / "stick"
    here.mkdir()
    proc = run_cli(*build_args(example, tmp_path / "cache", "."), cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert "install.sh" in os.listdir(here)
    verify_ok(here, tmp_path / "cache" / "signing-key.pub")


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A home directory user nobody can write (pytest's own tmp_path is root's alone)."""
    home = Path(tempfile.mkdtemp(prefix="mediabuilder-test-home-"))
    home.chmod(0o755)
    os.chown(home, 65534, 65534)
    # nobody must reach this checkout and its interpreter: a clone in a `mktemp -d` directory is
    # root's alone. Directories on the way get o+x (traverse, not read) for the test, then back.
    opened: list[tuple[Path, int]] = []
    for start in (REPO, Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent):
        for d in (start, *start.parents):
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
                opened.append((d, stat.S_IMODE(mode)))
    try:
        yield home
    finally:
        for d, mode in reversed(opened):
            d.chmod(mode)
        shutil.rmtree(home)


def test_a_user_who_cannot_write_the_store(example: Example, nobody_home: Path) -> None:
    """Debian's nix-bin without a daemon, run as a user: told so before any cache or key exists."""
    home = nobody_home
    env = make_nix_env({"PYTHONPATH": str(REPO), "HOME": str(home), "XDG_CACHE_HOME": ""})
    script = textwrap.dedent(f"""
        import sys
        sys.argv = ["mediabuilder", "build", "--flake", {str(example.flake) + '#' + HOST!r},
                    "--output", {str(home / 'media')!r}]
        from mediabuilder.cli import main
        sys.exit(main())
    """)
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           script], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert_one_line_error(proc, "/nix/var/nix/db: user nobody cannot write the Nix store and cannot reach a "
                                "nix-daemon at /nix/var/nix/daemon-socket/socket")
    assert os.listdir(home) == []
