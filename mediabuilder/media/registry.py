"""The pinned flake registry (version 2): each locked input of the flake (nested ones too), by id,
mapped to its exact store path and narHash, so `nixpkgs` and friends resolve with no network."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder import flakelock
from mediabuilder.errors import InvalidInput


@dataclass(frozen=True)
class Pin:
    id: str
    path: str
    nar_hash: str
    extra: tuple[tuple[str, Any], ...] = ()  # rev, revCount, lastModified where the lock has them


@dataclass(frozen=True)
class Registry:
    pins: tuple[Pin, ...]

    def render(self) -> str:
        flakes = []
        for pin in self.pins:
            to: dict[str, Any] = {"type": "path", "path": pin.path, "narHash": pin.nar_hash}
            to.update(dict(pin.extra))
            flakes.append({"from": {"type": "indirect", "id": pin.id}, "to": to, "exact": True})
        return json.dumps({"version": 2, "flakes": flakes}, indent=2) + "\n"

    @classmethod
    def parse(cls, text: str, source: str) -> Registry:
        try:
            data = json.loads(text)
            assert data["version"] == 2
            pins = tuple(
                Pin(f["from"]["id"], f["to"]["path"], f["to"]["narHash"],
                    tuple((k, v) for k, v in f["to"].items() if k not in ("type", "path", "narHash")))
                for f in data["flakes"]
            )
        except (ValueError, KeyError, TypeError, AssertionError):
            raise InvalidInput(f"{source}: not a version 2 flake registry") from None
        return cls(pins)


def from_lock(lock_file: Path, archive: dict[str, Any]) -> Registry:
    """Pins for every locked input, from flake.lock and `nix flake archive --json`: the root's
    inputs under their names (a `follows` pinned as the node it leads to), then nested inputs,
    each under its own input name unless a nearer input has that name. The path is the one Nix
    archived, else the `-source` path the narHash names."""
    lock = flakelock.FlakeLock.read(lock_file)
    pins: dict[str, Pin] = {}
    for found in lock.inputs():
        name, locked = found.path[-1], found.locked
        if name in pins or "narHash" not in locked:
            continue
        path = _archived(archive, found.path) or found.source_path
        assert path is not None  # a narHash names one
        extra = tuple((k, locked[k]) for k in ("rev", "revCount", "lastModified") if k in locked)
        pins[name] = Pin(name, path, str(locked["narHash"]), extra)
    return Registry(tuple(sorted(pins.values(), key=lambda p: (p.id != "nixpkgs", p.id))))


def _archived(archive: dict[str, Any], path: tuple[str, ...]) -> str | None:
    """The store path `nix flake archive --json` gives at an input path (None for a `follows`,
    which it leaves out)."""
    entry: Any = archive
    for name in path:
        entry = entry.get("inputs", {}).get(name) if isinstance(entry, dict) else None
        if entry is None:
            return None
    found = entry.get("path") if isinstance(entry, dict) else None
    return found if isinstance(found, str) else None


def archive_from_lock(lock_file: Path) -> dict[str, Any]:
    """What `nix flake archive --json` would say, computed from flake.lock alone (no Nix); see
    `FlakeLock.archive`."""
    return flakelock.FlakeLock.read(lock_file).archive()


def archived_paths(archive: dict[str, Any]) -> list[str]:
    """Every store path in `nix flake archive --json` output: the flake's source and all inputs."""
    paths = [archive["path"]] if "path" in archive else []
    for sub in archive.get("inputs", {}).values():
        paths.extend(archived_paths(sub))
    return paths
