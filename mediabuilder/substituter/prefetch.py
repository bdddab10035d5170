"""Prefetch closures from binary caches into our cache, the NARs copied as they are.

Each path's NAR is downloaded byte for byte (no recompression) and its narinfo is the upstream
one with our media key's signature added, written last: Nix may trust either key. A rerun skips
paths already complete and resumes partial downloads (`nar/.partial-*`) where it left off.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from mediabuilder import ui
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.errors import MediabuilderError
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import PARTIAL_PREFIX, Downloaded, Substituter, partial_name
from mediabuilder.substituter.closure import Closure, walk_closure


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
    """Put the closure of `roots` from `substituters` into `cache`, signed by `key` as well."""
    jobs = jobs or default_jobs()
    cache.create()
    cache.remove_stale_temporaries()
    closure = walk_closure(roots, substituters, jobs)
    result = PrefetchResult(missing=tuple(closure.missing), paths=tuple(sorted(closure.found)))
    todo = _plan(cache, closure, key, result)
    _remove_foreign_partials(cache, {partial_name(info) for info, _ in todo})
    if todo:
        _download_all(cache, todo, key, jobs, result)
        os.sync()
    return result


def _plan(cache: BinaryCache, closure: Closure, key: SecretKey,
          result: PrefetchResult) -> list[tuple[NarInfo, Substituter]]:
    """What must be downloaded; a complete path only lacking our signature is signed in place."""
    todo: list[tuple[NarInfo, Substituter]] = []
    public = key.public()
    for path in sorted(closure.found):
        info, substituter = closure.found[path]
        ours = _present(cache, info)
        if ours is None:
            todo.append((info, substituter))
            continue
        result.present += 1
        if not any(public.verify(ours.fingerprint(), s) for s in ours.sigs):
            others = tuple(s for s in ours.sigs if not s.startswith(key.name + ":"))
            cache.write_narinfo(ours.with_sigs((*others, key.sign(ours.fingerprint()))))
    # Biggest first, so one large NAR does not finish alone at the end.
    todo.sort(key=lambda item: item[0].file_size or item[0].nar_size, reverse=True)
    return todo


def _download_all(cache: BinaryCache, todo: list[tuple[NarInfo, Substituter]], key: SecretKey, jobs: int,
                  result: PrefetchResult) -> None:
    # Paths with identical contents share one NAR file: download it once.
    groups: dict[str, list[tuple[NarInfo, Substituter]]] = {}
    for item in todo:
        groups.setdefault(partial_name(item[0]), []).append(item)
    total = sum(items[0][0].file_size or items[0][0].nar_size for items in groups.values())
    cancel = threading.Event()
    lock = threading.Lock()
    with ui.progress(total, "downloading NARs") as bar:

        def on_bytes(n: int) -> None:
            with lock:
                bar.update(n)

        def one(items: list[tuple[NarInfo, Substituter]]) -> Downloaded:
            info, substituter = items[0]
            downloaded = substituter.download_nar(info, cache.root, on_bytes, cancel)
            for same, _ in items:  # last: the path is now in the cache
                cache.write_narinfo(signed(same, downloaded, key))
            return downloaded

        with ThreadPoolExecutor(max_workers=min(jobs, len(groups))) as pool:
            futures = {pool.submit(one, items): items for items in groups.values()}
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                cancel.set()
                for future in pending:
                    future.cancel()
                wait(pending)
                error = failed.exception()
                assert error is not None
                raise error
        for future, items in futures.items():
            downloaded = future.result()
            result.downloaded += len(items)
            result.resumed += downloaded.resumed
            result.file_bytes += downloaded.file_size
            result.nar_bytes += sum(info.nar_size for info, _ in items)
