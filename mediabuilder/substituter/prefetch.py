"""Prefetch closures from binary caches into our cache, the NARs copied as they are.

Each path's NAR is downloaded byte for byte (no recompression) and its narinfo is the upstream
one with our media key's signature added, written last: Nix may trust either key. A rerun skips
paths already complete and resumes partial downloads (`nar/.partial-*`) where it left off.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from mediabuilder import ui
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.errors import MediabuilderError
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import PARTIAL_PREFIX, Cancelled, Downloaded, Substituter, partial_name
from mediabuilder.substituter.closure import walk_closure


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
    """The upstream narinfo pointing at our copy, its signatures kept and `key`'s added."""
    local = replace(info, url=downloaded.url, file_hash=downloaded.file_hash, file_size=downloaded.file_size)
    upstream = tuple(s for s in info.sigs if not s.startswith(key.name + ":"))
    return local.with_sigs((*upstream, key.sign(local.fingerprint())))


def _present(cache: BinaryCache, info: NarInfo) -> NarInfo | None:
    """Our narinfo of `info`'s path when it describes the same NAR and its file has the right size."""
    try:
        ours = cache.read_narinfo(info.store_path)
        if ours.nar_hash != info.nar_hash or ours.nar_size != info.nar_size:
            return None
        size = cache.file_path(ours.url).stat().st_size
    except (MediabuilderError, OSError):
        return None
    return ours if ours.file_size is None or size == ours.file_size else None


def _remove_foreign_partials(cache: BinaryCache, wanted: set[str]) -> None:
    """Partial downloads this closure does not need would otherwise stay on the media."""
    for entry in (cache.root / "nar").glob(f"{PARTIAL_PREFIX}*"):
        if entry.name not in wanted:
            entry.unlink(missing_ok=True)


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
    with _Downloads(cache, key, jobs, result) as downloads:
        closure = walk_closure(roots, substituters, jobs, on_found=downloads.add)
        _remove_foreign_partials(cache, set(downloads.files))
        downloads.finish()
    result.missing = tuple(closure.missing)
    result.paths = tuple(sorted(closure.found))
    if downloads.files:
        os.sync()
    return result


@dataclass
class _File:
    """One NAR file to download, and every path whose narinfo points at it (identical contents
    share one file); `downloaded` once it is complete."""

    infos: list[NarInfo]
    substituter: Substituter
    future: Future[Downloaded] | None = None
    downloaded: Downloaded | None = None


class _Downloads:
    """NAR downloads in a thread pool, added while the walk goes on; each path's narinfo is
    written when its file is complete (last: the path is then in the cache). The first failure
    cancels the rest."""

    def __init__(self, cache: BinaryCache, key: SecretKey, jobs: int, result: PrefetchResult) -> None:
        self.cache = cache
        self.key = key
        self.public = key.public()
        self.result = result
        self.files: dict[str, _File] = {}  # by partial name
        self.total = 0  # bytes, growing as the walk finds paths
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.bar = ui.progress(0, "downloading NARs")

    def __enter__(self) -> _Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel.set()  # a no-op after finish(): everything is done by then
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()

    def add(self, info: NarInfo, substituter: Substituter) -> None:
        """A path the walk found (called on the walking thread)."""
        self._raise_first_error()
        ours = _present(self.cache, info)
        if ours is not None:
            self.result.present += 1
            if not any(self.public.verify(ours.fingerprint(), s) for s in ours.sigs):
                others = tuple(s for s in ours.sigs if not s.startswith(self.key.name + ":"))
                self.cache.write_narinfo(ours.with_sigs((*others, self.key.sign(ours.fingerprint()))))
            return
        name = partial_name(info)
        with self.lock:
            file = self.files.get(name)
            if file is None:
                file = self.files[name] = _File([info], substituter)
                self.total += info.file_size or info.nar_size
                self.bar.total = self.total
                self.bar.refresh()
                file.future = self.pool.submit(self._download, file)
                file.future.add_done_callback(self._stop_all_on_error)
                return
            file.infos.append(info)
            downloaded = file.downloaded
        if downloaded is not None:  # the file came in before this path was found
            self.cache.write_narinfo(signed(info, downloaded, self.key))

    def finish(self) -> None:
        """Wait for every download; raise the first error."""
        wait([f.future for f in self.files.values() if f.future is not None])
        self._raise_first_error()
        for file in self.files.values():
            assert file.downloaded is not None
            self.result.downloaded += len(file.infos)
            self.result.resumed += file.downloaded.resumed
            self.result.file_bytes += file.downloaded.file_size
            self.result.nar_bytes += sum(info.nar_size for info in file.infos)

    def _download(self, file: _File) -> Downloaded:
        downloaded = file.substituter.download_nar(file.infos[0], self.cache.root, self._progress, self.cancel)
        with self.lock:
            file.downloaded = downloaded
            infos = list(file.infos)
        for info in infos:
            self.cache.write_narinfo(signed(info, downloaded, self.key))
        return downloaded

    def _progress(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def _stop_all_on_error(self, future: Future[Downloaded]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.cancel.set()

    def _raise_first_error(self) -> None:
        """The first download that failed for a reason of its own (not cancelled by another)."""
        if not self.cancel.is_set():
            return
        errors = [f.future.exception() for f in self.files.values()
                  if f.future is not None and f.future.done() and not f.future.cancelled()]
        error = next((e for e in errors if e is not None and not isinstance(e, Cancelled)), None)
        if error is not None:
            raise error
