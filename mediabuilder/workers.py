"""Worker processes that die with the build: they leave signals to the parent, die when it dies,
and are stopped at once (not waited for) when the build fails or is interrupted."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_worker(parent: int) -> None:
    """In each (forked) worker process, first: ^C at the terminal is the parent's to handle (it
    stops the workers); SIGTERM or SIGHUP sent to the whole group ends the worker quietly, as
    the default does (not the parent's handler, inherited by fork, with its traceback); and a
    parent killed outright (SIGKILL) takes the worker with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and kill the running workers: a NAR half-exported is a locked
    temporary that the next run deletes; nothing is gained by waiting for it."""
    # The executor has no public way to end its workers before Python 3.14 (terminate_workers).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown() forgets both
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=10)
    # Its manager thread then finds the pool broken and closes its wake-up pipe; wait for that, or
    # Python 3.11's exit handler may write to the pipe as it closes ("Exception ignored ... Bad
    # file descriptor", seen after a SIGTERM during the export).
    if manager is not None:
        manager.join(timeout=10)
