"""Prefetch closures from binary caches into our cache, the NARs copied as they are.

Each path's NAR is downloaded byte for byte (no recompression) and its narinfo is the upstream
one with our media key's signature added, written last (only once the NAR inside matched the
signed NarHash and NarSize): Nix may trust either key. A rerun skips
paths already complete and resumes partial downloads (`nar/.partial-*`) where it left off.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from mediabuilder import ui, workers
from mediabuilder.cache.layout import BinaryCache, remove_unless_locked
from mediabuilder.errors import MediabuilderError
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import (
    PARTIAL_PREFIX,
    Cancel,
    Cancelled,
    Downloaded,
    Substituter,
    partial_name,
)
from mediabuilder.substituter.closure import walk_closure

_worker: dict[str, Any] = {}  # in a worker process: what _start_worker was given


@dataclass
class PrefetchResult:
    """What a prefetch did. `missing` paths were in no substituter (take them from the local store)."""

    downloaded: int = 0
    present: int = 0
    resumed: int = 0
    file_bytes: int = 0
    nar_bytes: int = 0
    missing: tuple[StorePath, ...] = ()
    paths: tuple[StorePath, ...] = ()


def default_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, 4 * cores)


def signed(info: NarInfo, downloaded: Downloaded, key: SecretKey) -> NarInfo:
    """The upstream narinfo pointing at our copy, its signatures kept and `key`'s added. Its
    Deriver is dropped: unsigned upstream and unverifiable here (the derivation is not at hand),
    it would be vouched for by `key` and registered by the target's Nix. Keys Nix does not need
    (System, ...) were never parsed; a CA was checked to give the path (`ca_problem`)."""
    local = replace(info, url=downloaded.url, file_hash=downloaded.file_hash, file_size=downloaded.file_size,
                    deriver=None)
    upstream = tuple(s for s in info.sigs if not s.startswith(key.name + ":"))
    return local.with_sigs((*upstream, key.sign(local.fingerprint())))


def _present(cache: BinaryCache, info: NarInfo, key: PublicKey) -> NarInfo | None:
    """Our narinfo of `info`'s path when it describes the same NAR, its file has the right size and
    it is signed by our media key: we sign only what we checked against the signed NarHash. One that
    is not (left by someone else, or by another key) is downloaded again: its file is reused once its
    NAR is checked."""
    try:
        ours = cache.read_narinfo(info.store_path)
        if ours.nar_hash != info.nar_hash or ours.nar_size != info.nar_size:
            return None
        if not any(key.verify(ours.fingerprint(), s) for s in ours.sigs):
            return None
        size = cache.file_path(ours.url).stat().st_size
    except (MediabuilderError, OSError):
        return None
    return ours if ours.file_size is None or size == ours.file_size else None


def _remove_foreign_partials(cache: BinaryCache, wanted: set[str]) -> None:
    """Partial downloads this closure does not need would otherwise stay on the media (but one
    that another process is downloading into now is its own)."""
    for entry in (cache.root / "nar").glob(f"{PARTIAL_PREFIX}*"):
        if entry.name not in wanted:
            remove_unless_locked(entry)


def prefetch(
    roots: list[StorePath],
    substituters: list[Substituter],
    cache: BinaryCache,
    key: SecretKey,
    jobs: int = 0,
) -> PrefetchResult:
    """Put the closure of `roots` from `substituters` into `cache`, signed by `key` as well.

    Each NAR starts downloading as soon as the walk has found and trusted its path: over a real
    network the walk is a chain of round trips as long as the closure is deep, and the downloads
    use the bandwidth meanwhile."""
    jobs = jobs or default_jobs()
    cache.create()
    cache.remove_stale_temporaries()
    result = PrefetchResult()
    with _Downloads(cache, key, jobs, result, substituters) as downloads:
        closure = walk_closure(roots, substituters, jobs, on_found=downloads.add)
        _remove_foreign_partials(cache, {name for name, _, _ in downloads.files})
        downloads.finish()
    result.missing = tuple(closure.missing)
    result.paths = tuple(sorted(closure.found))
    if downloads.files:
        os.sync()
    return result


@dataclass
class _File:
    """One NAR file to download, and every path whose narinfo points at it (identical contents
    share one file); `downloaded` once it is complete and its narinfos are written."""

    infos: list[NarInfo]
    future: Future[Downloaded]
    downloaded: Downloaded | None = None


class _Downloads:
    """NAR downloads in worker processes, added while the walk goes on.

    Processes, not threads: on a fast link a download is mostly Python's per-request and per-chunk
    work, and threads queue for the one interpreter lock (the bench: 2.3 s in 2 processes where 8
    threads of one took 3.7 s). The workers are forked before the walk starts any thread, die with
    this process (PR_SET_PDEATHSIG: a killed run leaves none writing on), and report their bytes
    through one shared counter. Narinfos are written here, on the calling thread, as each file
    completes (last: the path is then in the cache). The first failure cancels the rest."""

    def __init__(self, cache: BinaryCache, key: SecretKey, jobs: int, result: PrefetchResult,
                 substituters: list[Substituter]) -> None:
        self.cache = cache
        self.key = key
        self.public = key.public()
        self.result = result
        self.substituters = substituters
        self.files: dict[tuple[str, str, int], _File] = {}  # by partial name, NarHash, NarSize
        self.done: queue.SimpleQueue[_File] = queue.SimpleQueue()
        self.total = 0  # bytes, growing as the walk finds paths
        context = multiprocessing.get_context("fork")
        self.cancel = context.Event()
        self.moved = context.Value("q", 0)  # bytes downloaded, by every worker
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                                        initargs=(substituters, self.cancel, self.moved, os.getpid()))
        self.pool.submit(int).result()  # forks every worker now (fork: all at once), before any thread
        self.bar = ui.progress(0, "downloading NARs")
        self.ticking = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        if not self.bar.disable:
            self.ticker.start()

    def __enter__(self) -> _Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel.set()  # a no-op after finish(): everything is done by then
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.ticking.set()
        if self.ticker.is_alive():
            self.ticker.join()
        self.bar.close()

    def add(self, info: NarInfo, substituter: Substituter) -> None:
        """A path the walk found (called on the walking thread)."""
        self._write_completed()
        if _present(self.cache, info, self.public) is not None:
            self.result.present += 1
            return
        # The file is named after the unsigned FileHash: share it only with the same signed NAR.
        name = (partial_name(info), info.nar_hash, info.nar_size)
        file = self.files.get(name)
        if file is not None:  # another path with the same contents
            file.infos.append(info)
            if file.downloaded is not None:
                self.cache.write_narinfo(signed(info, file.downloaded, self.key))
            return
        self.total += info.file_size or info.nar_size
        self.bar.total = self.total
        future = self.pool.submit(_download, self.substituters.index(substituter), info, self.cache.root)
        file = self.files[name] = _File([info], future)
        future.add_done_callback(lambda f: self._completed(file, f))

    def finish(self) -> None:
        """Wait for every download, writing narinfos as files complete; raise the first error."""
        while any(f.downloaded is None for f in self.files.values()):
            self._write_completed(block=True)
        self._tick_once()
        for file in self.files.values():
            assert file.downloaded is not None
            self.result.downloaded += len(file.infos)
            self.result.resumed += file.downloaded.resumed
            self.result.file_bytes += file.downloaded.file_size
            self.result.nar_bytes += sum(info.nar_size for info in file.infos)

    def _completed(self, file: _File, future: Future[Downloaded]) -> None:
        """On the pool's thread: hand the file to the calling thread; a failure stops the others."""
        if future.cancelled() or future.exception() is not None:
            self.cancel.set()
        self.done.put(file)

    def _write_completed(self, block: bool = False) -> None:
        """Narinfos of the files completed so far (waiting for one when `block`); raises the
        first failure that was not just cancelled by another."""
        while True:
            try:
                file = self.done.get(block=block)
            except queue.Empty:
                return
            block = False
            if file.future.cancelled():
                raise Cancelled()
            error = file.future.exception()
            if error is not None and not isinstance(error, Cancelled):
                raise error
            if error is not None:
                continue  # another one failed: its error comes through the queue as well
            file.downloaded = file.future.result()
            for info in file.infos:
                self.cache.write_narinfo(signed(info, file.downloaded, self.key))

    def _tick(self) -> None:
        while not self.ticking.wait(0.25):
            self._tick_once()

    def _tick_once(self) -> None:
        moved = self.moved.value
        self.bar.update(moved - self.bar.n)


def _start_worker(substituters: list[Substituter], cancel: Cancel, moved: Synchronized[int], parent: int) -> None:
    """In each worker process, once."""
    workers.start_worker(parent)  # signals are the parent's to handle: it cancels
    for substituter in substituters:
        substituter.reopen()
    _worker.update(substituters=substituters, cancel=cancel, moved=moved)


def _download(index: int, info: NarInfo, root: Path) -> Downloaded:
    """In a worker process: one NAR into the cache at `root`."""
    moved: Synchronized[int] = _worker["moved"]

    def on_bytes(n: int) -> None:
        with moved.get_lock():
            moved.value += n

    return _worker["substituters"][index].download_nar(info, root, on_bytes, _worker["cancel"])
