"""Walk a closure through binary caches: narinfos level by level, in parallel, trusted or refused.

Each path is looked up in the substituters in Priority order (lower first). A narinfo that no
trusted key signed (and that is no genuine content-addressed path) is refused for that
substituter and the next one is asked; a path that only untrusted copies exist of is an error
naming it and why each copy was refused. Paths that no substituter has are returned as missing:
the caller may take them from the local store.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mediabuilder.cache.verify import ca_problem, check_signature
from mediabuilder.errors import FormatError, InvalidMedia
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import Substituter


@dataclass
class Closure:
    """The walk's outcome: where each found path comes from, and the paths nobody has."""

    found: dict[StorePath, tuple[NarInfo, Substituter]] = field(default_factory=dict)
    missing: list[StorePath] = field(default_factory=list)


@dataclass(frozen=True)
class _Lookup:
    path: StorePath
    found: tuple[NarInfo, Substituter] | None
    refusals: tuple[str, ...]


def by_priority(substituters: list[Substituter]) -> list[Substituter]:
    """Lower Priority first; equal priorities keep the order given."""
    return sorted(substituters, key=lambda s: s.priority)


def lookup(path: StorePath, substituters: list[Substituter]) -> _Lookup:
    """The first trusted narinfo of `path` in `substituters` (already in priority order)."""
    refusals: list[str] = []
    for substituter in substituters:
        try:
            info = substituter.narinfo(path)
        except FormatError as e:
            refusals.append(f"{substituter.url}: {e}")
            continue
        if info is None:
            continue
        problem = check_signature(info, list(substituter.trusted_keys)) or ca_problem(info)
        if problem is None:
            return _Lookup(path, (info, substituter), tuple(refusals))
        refusals.append(f"{substituter.url}: {problem}")
    return _Lookup(path, None, tuple(refusals))


def walk_closure(roots: list[StorePath], substituters: list[Substituter], jobs: int = 8,
                 on_found: Callable[[NarInfo, Substituter], None] | None = None) -> Closure:
    """Every path `roots` reference, directly or not, with its narinfo and substituter.

    `on_found` is called (on this thread) with each trusted narinfo as soon as it is in. Raises
    InvalidMedia when a path is offered only with narinfos that cannot be trusted."""
    ordered = by_priority(substituters)
    closure = Closure()
    refused: dict[StorePath, tuple[str, ...]] = {}
    seen = set(roots)
    level = sorted(seen)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while level:
            following: set[StorePath] = set()
            for result in pool.map(lambda p: lookup(p, ordered), level):
                if result.found is None:
                    if result.refusals:
                        refused[result.path] = result.refusals
                    else:
                        closure.missing.append(result.path)
                    continue
                closure.found[result.path] = result.found
                if on_found is not None:
                    on_found(*result.found)
                following.update(r for r in result.found[0].reference_paths() if r not in seen)
            seen |= following
            level = sorted(following)
    if refused:
        path, reasons = min(refused.items())
        more = f" (and {len(refused) - 1} more paths)" if len(refused) > 1 else ""
        raise InvalidMedia(f"{path}: refused: {'; '.join(reasons)}{more}",
                           hint="pass the key that signed this cache with --trusted-key, if you trust it")
    closure.missing.sort()
    return closure
