"""The one way mediabuilder runs another program."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from mediabuilder import ui
from mediabuilder.errors import ExternalError, InvalidInput

# What each external program is needed for, for the "could not find" message.
PURPOSES = {
    "nix": "to build the closure and read it from the Nix store",
    "nix-store": "to read the Nix store",
    "git": "to bundle the flake repository",
    "xorriso": "to read ISO images back",
}

Arg = str | os.PathLike[str]


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["LANG"] = "C.UTF-8"
    env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def require(program: str, purpose: str | None = None) -> str:
    """The full path of `program`, or an error saying what it is needed for."""
    found = shutil.which(program)
    if found is None:
        why = purpose or PURPOSES.get(program, "by this command")
        raise InvalidInput(
            f"could not find `{program}`, which is needed {why}",
            hint=f"install it (on Debian: apt-get install {_debian_package(program)}) or add it to PATH",
        )
    return found


def _debian_package(program: str) -> str:
    return {"nix": "nix-bin", "nix-store": "nix-bin", "mcopy": "mtools", "mmd": "mtools", "mkfs.fat": "dosfstools",
            "fsck.fat": "dosfstools", "sfdisk": "fdisk", "isoinfo": "genisoimage", "bsdtar": "libarchive-tools"}.get(
        program, program
    )


def _tail(data: bytes | str | None, lines: int = 8) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Arg | None = None,
    input: bytes | None = None,
    stdout: int | IO[bytes] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` (a list, never a shell string) with LANG=C.UTF-8 and stdin from /dev/null.

    With `capture`, stdout and stderr are returned; a failure (when `check`) raises
    `ExternalError` showing the command and the last lines of its stderr.
    """
    args = [os.fspath(a) for a in argv]
    require(args[0])
    ui.debug("+ " + shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else (subprocess.PIPE if capture else None),
            stderr=subprocess.PIPE if capture else None,
            env=_env(env),
            cwd=cwd,
            check=False,
        )
    except OSError as e:
        raise ExternalError(f"could not run `{args[0]}`: {e.strerror}") from e
    if check and proc.returncode != 0:
        raise command_failed(args, proc.returncode, proc.stderr)
    return proc


class Started:
    """A command `start` began: `result()` waits for it and answers as `run` would; `stop()`
    kills it (and reaps it) when its answer is no longer wanted."""

    def __init__(self, args: list[str], proc: subprocess.Popen[bytes], check: bool) -> None:
        self._args, self._proc, self._check = args, proc, check
        self._done: subprocess.CompletedProcess[bytes] | None = None

    def result(self) -> subprocess.CompletedProcess[bytes]:
        if self._done is None:
            stdout, stderr = self._proc.communicate()
            self._done = subprocess.CompletedProcess(self._args, self._proc.returncode, stdout, stderr)
        if self._check and self._done.returncode != 0:
            raise command_failed(self._args, self._done.returncode, self._done.stderr)
        return self._done

    def stop(self) -> None:
        if self._done is None:
            self._proc.kill()
            self._proc.communicate()
            self._done = subprocess.CompletedProcess(self._args, self._proc.returncode, b"", b"")


def start(argv: Sequence[Arg], *, check: bool = True) -> Started:
    """Start `argv` as `run` runs it (stdout and stderr captured) and return at once: for
    commands that need not wait for each other. Take the answer with `result()`."""
    args = [os.fspath(a) for a in argv]
    require(args[0])
    ui.debug("+ " + shlex.join(args) + " &")
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_env(None))
    except OSError as e:
        raise ExternalError(f"could not run `{args[0]}`: {e.strerror}") from e
    return Started(args, proc, check)


def command_failed(args: Sequence[str], returncode: int, stderr: bytes | None) -> ExternalError:
    tail = _tail(stderr)
    message = f"`{shlex.join(args)}` failed with exit status {returncode}"
    return ExternalError(message + (f":\n{tail}" if tail else ""))


@contextlib.contextmanager
def stream(
    argv: Sequence[Arg], *, env: Mapping[str, str] | None = None, cwd: Arg | None = None
) -> Iterator[IO[bytes]]:
    """Run `argv` and yield its stdout as a stream; on leaving, wait and raise if it failed."""
    args = [os.fspath(a) for a in argv]
    require(args[0])
    ui.debug("+ " + shlex.join(args))
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield proc.stdout
        except BaseException:
            proc.kill()
            raise
        stderr = proc.stderr.read()
        returncode = proc.wait()
    if returncode != 0:
        raise command_failed(args, returncode, stderr)


def output(argv: Sequence[Arg], **kwargs: object) -> str:
    """Run and return stdout as text, stripped."""
    proc = run(argv, **kwargs)  # type: ignore[arg-type]
    return proc.stdout.decode().strip()


def is_executable(path: Path) -> bool:
    return os.access(path, os.X_OK)
