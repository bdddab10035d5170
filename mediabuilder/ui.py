"""What the user sees: timed step lines, progress bars, debug lines. Everything goes to stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass
class _State:
    debug: bool = False
    quiet: bool = False
    lines: int = 0  # lines written through this module: a step knows whether its title is the last


def _live() -> bool:
    """Whether to draw what only a person watching needs (bars, step titles as steps start)."""
    return not state.quiet and sys.stderr.isatty()


state = _State()


def configure(*, debug: bool = False, quiet: bool = False) -> None:
    state.debug = debug
    state.quiet = quiet


def _print(message: str) -> None:
    state.lines += 1
    print(message, file=sys.stderr, flush=True)


def info(message: str) -> None:
    if not state.quiet:
        _print(message)


def warn(message: str) -> None:
    _print(f"warning: {message}")


def debug(message: str) -> None:
    if state.debug:
        _print(message)


@dataclass
class Step:
    """One step of a recipe; `detail` is printed after the title when the step ends."""

    title: str
    detail: str = ""
    skipped: bool = False
    started: float = field(default_factory=time.monotonic)


def _human_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


@contextlib.contextmanager
def step(title: str) -> Iterator[Step]:
    """Print "  <title> … <detail>, <time>" once the step is done. On a terminal the title shows
    as the step starts, and the timed line replaces it when nothing was printed in between (a
    bar, closed, leaves its line empty below the title)."""
    current = Step(title)
    debug(f"-> {title}")
    live = _live()
    if live:
        _print(f"  {title} …")
    mark = state.lines
    yield current
    if current.skipped and not live:
        return
    if live and state.lines == mark:
        sys.stderr.write("\x1b[1A\r\x1b[2K")  # up to the title's line, cleared
    if current.skipped:
        return
    elapsed = _human_seconds(time.monotonic() - current.started)
    detail = f"{current.detail}, " if current.detail else ""
    info(f"  {title} … {detail}{elapsed}")


class Bar:
    """What the code asks of a progress bar; `progress()` returns a tqdm bar or this hidden one."""

    disable = True

    def __init__(self, total: float | None = None) -> None:
        self.total = total
        self.n = 0

    def update(self, n: float = 1) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress(total: int | None, description: str, unit: str = "B", **kwargs: Any) -> Bar | tqdm:
    """A progress bar on stderr; bytes by default (scaled, with rate and ETA). Hidden when quiet
    or when stderr is not a terminal: then tqdm is not even imported (25-80 ms)."""
    if not _live():
        return Bar(total)
    from tqdm import tqdm

    sized = _sized()
    return tqdm(
        total=total,
        # A terminal that reports no size (`script`, serial consoles): tqdm would draw 0 columns
        # and hide every bar below row 0.
        ncols=None if sized else 80,
        nrows=None if sized else 24,
        desc=f"  {description}",
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
        mininterval=0.5,
        delay=1.0,
        **kwargs,
    )


def _sized() -> bool:
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        return False
    return size.columns > 0 and size.lines > 0


@contextlib.contextmanager
def ticking(bar: Bar | tqdm, done: Callable[[], int], every: float = 0.25) -> Iterator[None]:
    """Move `bar` to `done()` every `every` seconds from a thread, and once more at the end: for
    bytes counted elsewhere (worker processes, a library writing a file), so the bar advances per
    byte without a call per chunk. Nothing runs when the bar is hidden."""
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        bar.update(max(0, done() - bar.n))

    def loop() -> None:
        while not stop.wait(every):
            tick()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    tick()


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
