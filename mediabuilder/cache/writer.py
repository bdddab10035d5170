"""Fill a binary cache from the local Nix store: parallel, streaming, incremental, crash-safe.

Each path is serialised to NAR straight from the store, hashed and compressed in one pass into
`nar/` under a temporary name, checked against the NarHash Nix recorded, and renamed. Its
narinfo, signed, is written last, so a path is in the cache exactly when its narinfo is.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mediabuilder import interrupts, ui, workers
from mediabuilder.cache.intact import IntactRecords, Verdict
from mediabuilder.cache.layout import BinaryCache, lock, temp_name
from mediabuilder.errors import FormatError, InvalidInput, InvalidMedia, MediabuilderError
from mediabuilder.interrupts import uninterrupted
from mediabuilder.media.split import PART_SIZE, PartHashes
from mediabuilder.store import nar, nix32
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.pathinfo import PathInfo

if TYPE_CHECKING:  # imported where used: a rerun with nothing to export needs neither
    from concurrent.futures import Future, ProcessPoolExecutor
    from multiprocessing.sharedctypes import Synchronized


@dataclass(frozen=True)
class Exported:
    url: str
    file_hash: str
    file_size: int


@dataclass
class FillResult:
    exported: int = 0
    present: int = 0
    nar_bytes: int = 0
    file_bytes: int = 0


class _HashingFile:
    """A file that hashes and counts what is written to it: the whole file, and the parts of
    PART_SIZE an image cuts it into (so an image need not read it to hash them)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        lock(self._file)
        self.hashes = PartHashes(PART_SIZE)

    @property
    def size(self) -> int:
        return self.hashes.size

    def write(self, data: bytes) -> int:
        self.hashes.update(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()


def export_nar(
    root: str, store_path: str, nar_hash: str, nar_size: int, compression: str, source: str | None = None
) -> Exported:
    """Worker: write the compressed NAR of `store_path` (read from `source` if given) into
    `root/nar/`; check it against Nix's NarHash and NarSize. Runs in a worker process."""
    from mediabuilder.cache.compression import EXTENSIONS, Compressor

    nar_dir = Path(root) / "nar"
    tmp = temp_name(nar_dir / Path(store_path).name)
    out = _HashingFile(tmp)
    try:
        compressor = Compressor(compression, out)
        nar_sha = hashlib.sha256()
        size = 0

        counted = 0  # bytes of `size` already added to the shared counter

        def sink(chunk: bytes) -> None:
            nonlocal size, counted
            nar_sha.update(chunk)
            size += len(chunk)
            compressor.write(chunk)
            if size - counted >= COUNT_EVERY:
                counted = _count(size - counted) + counted

        nar.dump(Path(source or store_path), sink)
        compressor.close()
        out.close()
        _count(size - counted)
        got = Hash("sha256", nar_sha.digest()).nix32()
        if got != nar_hash or size != nar_size:
            raise InvalidMedia(
                f"{store_path}: the store path does not match its NarHash ({got}, {size} bytes; "
                f"Nix recorded {nar_hash}, {nar_size} bytes)",
                hint="the local store is damaged: run `nix-store --verify --check-contents --repair`",
            )
        file_hash = nix32.encode(out.hashes.whole.digest())
        url = f"nar/{file_hash}{EXTENSIONS[compression]}"
        os.replace(tmp, Path(root) / url)
        if out.size > PART_SIZE:
            BinaryCache(Path(root)).write_parts(url, PART_SIZE, out.hashes.parts())
        return Exported(url=url, file_hash=f"sha256:{file_hash}", file_size=out.size)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise


# NAR bytes a worker exports between two additions to the shared counter that draws the bar:
# a lock across processes per 4 MiB, not per chunk.
COUNT_EVERY = 4 * 1024 * 1024
_exported: Synchronized[int] | None = None  # in a worker of `fill`: NAR bytes, every worker's


def _start_worker(exported: Synchronized[int], parent: int) -> None:
    workers.start_worker(parent)
    global _exported
    _exported = exported


def _count(n: int) -> int:
    """Add `n` NAR bytes to the shared counter (none outside `fill`'s workers); returns `n`."""
    if _exported is not None and n:
        with _exported.get_lock():
            _exported.value += n
    return n


def narinfo_for(info: PathInfo, exported: Exported, compression: str, key: SecretKey) -> NarInfo:
    unsigned = NarInfo(
        store_path=info.path,
        url=exported.url,
        compression=compression,
        file_hash=exported.file_hash,
        file_size=exported.file_size,
        nar_hash=info.nar_hash.nix32(),
        nar_size=info.nar_size,
        references=tuple(sorted(r.base for r in info.references)),
        deriver=info.deriver.base if info.deriver else None,
        sigs=(),
        ca=info.ca,
    )
    sigs = [s for s in info.sigs if not s.startswith(key.name + ":")]
    return replace(unsigned, sigs=(key.sign(unsigned.fingerprint()), *sigs))


def is_intact(cache: BinaryCache, info: PathInfo, key: SecretKey, records: IntactRecords | None = None) -> bool:
    """Cheap check that a path need not be exported again: its narinfo parses, describes this
    NAR, is signed by `key`, and its NAR file has the recorded size. (`verify` hashes it all.)
    The first three hold when `records` remembers them of these very narinfo bytes."""
    try:
        raw = cache.narinfo_bytes(info.path)
    except OSError:
        return False
    verdict = records.get(info.path, raw) if records is not None else None
    if verdict is None:
        try:
            present = cache.parse_read(info.path)
        except MediabuilderError:
            return False
        # ed25519 signatures are deterministic: re-signing is cheaper than verifying, and equal.
        if key.sign(present.fingerprint()) not in present.sigs:
            return False
        verdict = Verdict.of(present)
        if records is not None:
            records.remember(raw, present)
    if verdict.nar_hash != info.nar_hash.nix32() or verdict.nar_size != info.nar_size:
        return False
    try:
        return cache.file_path(verdict.url).stat().st_size == verdict.file_size
    except (OSError, FormatError):
        return False


def export_tree(cache: BinaryCache, tree: Path, info: PathInfo, key: SecretKey, compression: str) -> NarInfo:
    """Put a file tree that is not in the local store into the cache as store path `info.path`."""
    cache.create()
    exported = export_nar(str(cache.root), str(info.path), info.nar_hash.nix32(), info.nar_size, compression,
                          source=str(tree))
    narinfo = narinfo_for(info, exported, compression, key)
    cache.write_narinfo(narinfo)
    return narinfo


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fill(
    cache: BinaryCache,
    infos: Iterable[PathInfo],
    key: SecretKey,
    compression: str = "zstd",
    jobs: int = 0,
) -> FillResult:
    """Export every path of `infos` that the cache lacks; returns what was done."""
    cache.create()
    cache.remove_stale_temporaries()
    result = FillResult()
    records = IntactRecords(cache, key)
    todo: list[PathInfo] = []
    for info in infos:
        if is_intact(cache, info, key, records):
            result.present += 1
        else:
            todo.append(info)
    if not todo:
        records.save()
        return result
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Biggest first, so one large path does not finish alone at the end.
    todo.sort(key=lambda i: i.nar_size, reverse=True)
    total = sum(i.nar_size for i in todo)
    count = min(jobs or default_jobs(), len(todo))
    context = multiprocessing.get_context("fork")  # not 3.14's forkserver: workers die with the build
    exported_bytes = context.Value("q", 0)  # NAR bytes the workers have exported, per 4 MiB
    pool = ProcessPoolExecutor(max_workers=count, mp_context=context, initializer=_start_worker,
                               initargs=(exported_bytes, os.getpid()))
    try:
        # Every worker forked now (fork: all at once), while this process has one thread: the bar's
        # monitor and ticker threads start below (a fork copies a lock another thread holds, taken).
        pool.submit(int).result()
        with ui.progress(total, "exporting NARs") as bar, ui.ticking(bar, lambda: exported_bytes.value):
            _export_all(cache, todo, key, compression, pool, count, result, records)
    except BaseException as e:
        with uninterrupted():
            workers.stop(pool)  # an interrupted or failed run waits for no export
            cache.remove_stale_temporaries()  # what the killed workers were writing
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InvalidInput(f"{cache.root}: no space left on device while filling the cache",
                               hint="free some space or choose another --cache") from None
        raise
    pool.shutdown()
    os.sync()
    records.save()
    return result


def _export_all(cache: BinaryCache, todo: list[PathInfo], key: SecretKey, compression: str,
                pool: ProcessPoolExecutor, count: int, result: FillResult, records: IntactRecords) -> None:
    """Keep `count` * 2 exports queued; write each narinfo, signed, as its NAR completes."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending: dict[Future[Exported], PathInfo] = {}
    queue = iter(todo)

    def submit_next() -> None:
        info = next(queue, None)
        if info is not None:
            future = pool.submit(export_nar, str(cache.root), str(info.path), info.nar_hash.nix32(),
                                 info.nar_size, compression)
            pending[future] = info

    for _ in range(count * 2):
        submit_next()
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        interrupts.check()
        for future in done:
            info = pending.pop(future)
            exported = future.result()
            narinfo = narinfo_for(info, exported, compression, key)
            records.remember(cache.write_narinfo(narinfo), narinfo)
            result.exported += 1
            result.nar_bytes += info.nar_size
            result.file_bytes += exported.file_size
            submit_next()
