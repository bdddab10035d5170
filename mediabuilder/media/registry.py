"""The pinned flake registry (version 2): each locked input of the flake, by id, mapped to its
exact store path and narHash, so `nixpkgs` and friends resolve with no network."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder.errors import InvalidInput
from mediabuilder.store.hashes import Hash
from mediabuilder.store.storepath import make_store_path


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
    """Pins for the root's direct inputs, from flake.lock and `nix flake archive --json`."""
    try:
        lock = json.loads(lock_file.read_text())
        nodes = lock["nodes"]
        root_inputs: dict[str, Any] = nodes[lock["root"]].get("inputs", {})
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"{lock_file}: cannot read the flake's lock file ({e})",
                           hint="run `nix flake lock` and commit flake.lock") from None
    archived: dict[str, Any] = archive.get("inputs", {})
    pins = []
    for name, node_name in root_inputs.items():
        if not isinstance(node_name, str):  # `follows` (a list): pinned through its target
            continue
        locked = nodes[node_name].get("locked", {})
        if name not in archived or "narHash" not in locked:
            continue
        extra = tuple((k, locked[k]) for k in ("rev", "revCount", "lastModified") if k in locked)
        pins.append(Pin(name, archived[name]["path"], locked["narHash"], extra))
    pins.sort(key=lambda p: (p.id != "nixpkgs", p.id))
    return Registry(tuple(pins))


def archive_from_lock(lock_file: Path) -> dict[str, Any]:
    """What `nix flake archive --json` would say, computed from flake.lock alone (no Nix): each
    locked input's `-source` path follows from its narHash (a recursive sha256 content address).
    Nested inputs are flattened; the flake's own source is unknown without Nix."""
    try:
        lock = json.loads(lock_file.read_text())
        nodes: dict[str, Any] = lock["nodes"]
        root = lock["root"]
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"{lock_file}: cannot read the flake's lock file ({e})",
                           hint="run `nix flake lock` and commit flake.lock") from None
    inputs: dict[str, Any] = {}
    for name, node in nodes.items():
        nar_hash = node.get("locked", {}).get("narHash") if name != root else None
        if nar_hash:
            path = make_store_path("source", Hash.parse(nar_hash).digest, "source")
            inputs[name] = {"path": str(path), "inputs": {}}
    # The root's input names, as `nix flake archive` keys them.
    named = {}
    for input_name, node_name in nodes[root].get("inputs", {}).items():
        if isinstance(node_name, str) and node_name in inputs:
            named[input_name] = inputs[node_name]
    for node_name, entry in inputs.items():
        if entry not in named.values():
            named[f"{node_name}"] = entry
    return {"inputs": named}


def archived_paths(archive: dict[str, Any]) -> list[str]:
    """Every store path in `nix flake archive --json` output: the flake's source and all inputs."""
    paths = [archive["path"]] if "path" in archive else []
    for sub in archive.get("inputs", {}).values():
        paths.extend(archived_paths(sub))
    return paths
