"""SIGINT, SIGTERM and SIGHUP stop a build by unwinding like ^C, so that every temporary is
removed on the way out; cleanup itself runs `uninterrupted`, with a signal kept for its end.

Blocking the signals (pthread_sigmask) would not do: Python runs its handlers in the main thread
whichever thread the kernel chose, and progress bars and process pools have threads of their own.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_depth = 0
_pending: int | None = None
_raised: int | None = None


def _handler(signum: int, _frame: object) -> None:
    global _pending
    for other in SIGNALS:  # one signal stops the build; more would only cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    if _depth:
        _pending = signum
        return
    global _raised
    _raised = signum
    raise Interrupted(signum)


def check() -> None:
    """Raise the interrupt again if one was raised and lost. Python drops an exception raised in
    a weakref callback or a `__del__` (seen: the import system's module-lock callback, a ^C while
    the image was written), and once a signal has come the others are ignored: a lost one would
    let the build run on to its end. Called where long work loops (per file or NAR written)."""
    if _raised is not None and _depth == 0:
        raise Interrupted(_raised)


def install() -> None:
    """Route the three signals to `_handler` (a SIGHUP that nohup ignores stays ignored)."""
    global _pending, _raised
    _pending = _raised = None
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block to its end; a signal that arrives meanwhile is raised when it ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
