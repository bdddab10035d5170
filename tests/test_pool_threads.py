"""The worker pools fork while their process has a single thread.

`fill` (cache/writer.py) and `prefetch` (substituter/prefetch.py) fork their workers (fork, so
that they die with the build). A fork copies the locks other threads hold, held, into the child:
Python 3.12+ warns "This process ... is multi-threaded, use of fork() may lead to deadlocks in the
child". The threads that existed at fork time were the progress bar's (tqdm's monitor and the
ticker that moves the bar), which live only on a terminal: so each pool runs here under a pty,
its bars drawn, with every DeprecationWarning shown, and a fork hook records how many threads the
process had at each fork. (A `filterwarnings = error` cannot catch this one: CPython clears the
warning raised by os.fork instead of raising it.)
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Example, closure_of, make_nix_env

pytestmark = pytest.mark.integration

TIMEOUT = 300  # a guard against hangs, not a measurement

# The fork hook, then the code under test, run with every DeprecationWarning shown.
PRELUDE = """
import os, sys, threading
_log = open(sys.argv[1], "a")
def _before_fork():
    _log.write(f"{threading.active_count()} {len(os.listdir('/proc/self/task'))} "
               f"{' '.join(sorted(t.name for t in threading.enumerate()))}\\n")
    _log.flush()
os.register_at_fork(before=_before_fork)
"""
CACHE = PRELUDE + """
from mediabuilder.cli import main
sys.exit(main(["cache", "--store-path", sys.argv[2], "--cache", sys.argv[3], "--jobs", "2"]))
"""
PREFETCH = PRELUDE + """
from pathlib import Path
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import Substituter
from mediabuilder.substituter.prefetch import prefetch
upstream = Path(sys.argv[3])
trusted = PublicKey.parse((upstream / "signing-key.pub").read_text().strip())
key = SecretKey.parse((upstream / "signing-key.sec").read_text().strip())
result = prefetch([StorePath.parse(sys.argv[2])], [Substituter(f"file://{upstream}", [trusted], jobs=2)],
                  BinaryCache(Path(sys.argv[4])), key, jobs=2)
print(f"downloaded {result.downloaded}", file=sys.stderr)
"""


def on_a_terminal(script: str, *args: str | Path) -> tuple[int, str]:
    """Run `script` with stdout and stderr on a pty of 80x24; its exit status and all it wrote."""
    controller, terminal = pty.openpty()
    os.set_blocking(controller, False)
    env = make_nix_env({"PYTHONPATH": str(REPO), "COLUMNS": "80", "LINES": "24"})
    proc = subprocess.Popen([sys.executable, "-W", "always::DeprecationWarning", "-c", script, *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    output = bytearray()
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], TIMEOUT)
            assert ready, f"no output for {TIMEOUT} s: {output.decode(errors='replace')}"
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        status = proc.wait(timeout=TIMEOUT)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
    return status, output.decode(errors="replace")


def forks(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def toplevel(example: Example) -> str:
    return example.toplevels["alpha"]


def test_fill_forks_before_its_bar_starts_threads(toplevel: str, tmp_path: Path) -> None:
    log = tmp_path / "forks"
    status, output = on_a_terminal(CACHE, log, toplevel, tmp_path / "cache")
    assert status == 0, output
    assert "  Exporting NARs …\r\n" in output, output  # its title drawn as it started: stderr is a terminal
    assert forks(log) == ["1 1 MainThread"] * 2, output  # --jobs 2: two workers, forked single-threaded
    assert "multi-threaded" not in output, output
    assert len(list((tmp_path / "cache").glob("*.narinfo"))) == len(closure_of(toplevel))


def test_prefetch_forks_before_any_thread(toplevel: str, tmp_path: Path) -> None:
    upstream = tmp_path / "upstream"
    status, output = on_a_terminal(CACHE, tmp_path / "fill-forks", toplevel, upstream)
    assert status == 0, output
    log = tmp_path / "forks"
    status, output = on_a_terminal(PREFETCH, log, toplevel, upstream, tmp_path / "dest")
    assert status == 0, output
    assert f"downloaded {len(closure_of(toplevel))}" in output, output
    assert forks(log) == ["1 1 MainThread"] * 2, output
    assert "multi-threaded" not in output, output
