"""flake.lock (version 7, as Nix 2.8 to 2.2x write it): its nodes, `follows` resolved, every input
reached from the root (nested inputs too), and what an older Nix cannot read.

A node's `inputs` map an input name to a node name, or, for `follows`, to a path of input names
from the root (`["nixpkgs"]`, `["tools", "nixpkgs"]`), itself possibly a `follows`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store.hashes import Hash
from mediabuilder.store.storepath import make_store_path

LOCK_HINT = "run `nix flake lock` and commit flake.lock"
# Tarball inputs locked with these attributes (Nix 2.18 and newer write them; FlakeHub's locks
# carry `rev`) are refused by older Nix: "unsupported tarball input attribute 'lastModified'".
TARBALL_NEW_ATTRS = ("lastModified", "rev")
TARBALL_NEW_SINCE = (2, 18)


@dataclass(frozen=True)
class Input:
    """One input as reached from the root: its path of input names and the node it resolves to."""

    path: tuple[str, ...]
    node: str
    locked: dict[str, Any]
    lock_file: str  # for messages

    @property
    def source_path(self) -> str | None:
        """The `-source` store path the lock's narHash names (a recursive sha256 content address,
        how Nix finds a locked input in a store); None without a narHash."""
        nar_hash = self.locked.get("narHash")
        if nar_hash is None:
            return None
        try:
            digest = Hash.parse(nar_hash).digest if isinstance(nar_hash, str) else None
        except FormatError:
            digest = None
        if digest is None or len(digest) != 32:
            raise InvalidInput(f"{self.lock_file}: node {self.node!r} has narHash {nar_hash!r}, not a sha256 hash",
                               hint=LOCK_HINT)
        return str(make_store_path("source", digest, "source"))


@dataclass(frozen=True)
class FlakeLock:
    source: str  # the file, for messages
    nodes: dict[str, dict[str, Any]]
    root: str

    @classmethod
    def read(cls, path: Path) -> FlakeLock:
        try:
            text = path.read_bytes()
        except OSError as e:
            raise InvalidInput(f"{path}: cannot read the flake's lock file ({e.strerror})", hint=LOCK_HINT) from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str | bytes, source: str) -> FlakeLock:
        try:
            data = json.loads(text)
            nodes, root = data["nodes"], data["root"]
            ok = isinstance(nodes, dict) and root in nodes and all(
                isinstance(n, dict) and isinstance(n.get("inputs", {}), dict)
                and isinstance(n.get("locked", {}), dict) for n in nodes.values())
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InvalidInput(f"{source}: not a readable lock file (no \"nodes\" with its \"root\")",
                               hint=LOCK_HINT)
        return cls(source, nodes, root)

    def resolve(self, ref: str | list[str], seen: frozenset[tuple[str, ...]] = frozenset()) -> str:
        """The node an input refers to: a node name, or a `follows` path walked from the root."""
        if not isinstance(ref, (str, list)):
            raise InvalidInput(f"{self.source}: an input refers to {ref!r}, neither a node nor a follows path",
                               hint=LOCK_HINT)
        if isinstance(ref, str):
            if ref not in self.nodes:
                raise InvalidInput(f"{self.source}: an input refers to node {ref!r}, which the lock does not have",
                                   hint=LOCK_HINT)
            return ref
        key = tuple(ref)
        if key in seen or not all(isinstance(r, str) for r in ref):
            raise InvalidInput(f"{self.source}: the follows {'/'.join(map(str, ref))} does not lead to a node",
                               hint=LOCK_HINT)
        node = self.root
        for name in ref:
            inputs = self.nodes[node].get("inputs", {})
            if name not in inputs:
                raise InvalidInput(f"{self.source}: the follows {'/'.join(ref)} names no input {name!r}",
                                   hint=LOCK_HINT)
            node = self.resolve(inputs[name], seen | {key})
        return node

    def inputs(self) -> Iterator[Input]:
        """Every node reached from the root, once, at its shortest input path (breadth first,
        names in order): the root's own inputs first, then their inputs (nested ones)."""
        seen = {self.root}
        level: list[tuple[tuple[str, ...], str]] = [((), self.root)]
        while level:
            following: list[tuple[tuple[str, ...], str]] = []
            for path, node in level:
                for name, ref in sorted(self.nodes[node].get("inputs", {}).items()):
                    target = self.resolve(ref)
                    if target in seen:
                        continue
                    seen.add(target)
                    yield Input((*path, name), target, dict(self.nodes[target].get("locked", {})), self.source)
                    following.append(((*path, name), target))
            level = following

    def archive(self) -> dict[str, Any]:
        """What `nix flake archive --json` says, from the lock alone (no Nix): each input's source
        path by its input name, nested as Nix nests them, `follows` left out as Nix leaves them.
        The flake's own source is unknown without Nix."""

        def inputs_of(node: str, stack: frozenset[str]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, ref in sorted(self.nodes[node].get("inputs", {}).items()):
                target = self.resolve(ref)
                path = Input((), target, self.nodes[target].get("locked", {}), self.source).source_path
                if isinstance(ref, list) or path is None or target in stack:
                    continue
                out[name] = {"path": path, "inputs": inputs_of(target, stack | {target})}
            return out

        return {"inputs": inputs_of(self.root, frozenset({self.root}))}

    def check_readable(self, nix_version: str) -> None:
        """Refuse, before any evaluation, a lock the local Nix cannot read: tarball inputs locked
        with `lastModified` or `rev` under Nix older than 2.18."""
        try:
            version = tuple(int(x) for x in nix_version.split(".")[:2])
        except ValueError:
            return
        if version >= TARBALL_NEW_SINCE:
            return
        for name, node in sorted(self.nodes.items()):
            locked = node.get("locked", {})
            if locked.get("type") not in ("tarball", "file"):
                continue
            for attr in TARBALL_NEW_ATTRS:
                if attr in locked:
                    since = ".".join(map(str, TARBALL_NEW_SINCE))
                    raise InvalidInput(
                        f"{self.source}: Nix {nix_version} cannot read this lock file: input {name!r} is a "
                        f"{locked['type']} locked with {attr!r}, as Nix {since} and newer write it",
                        hint=f"build with a Nix at least as new as the one that locked the flake (Nix {since} or "
                             "newer), or re-lock with this one, which changes the pinned inputs: "
                             "nix flake lock --recreate-lock-file")
