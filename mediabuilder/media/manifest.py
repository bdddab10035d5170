"""The manifest: what is on the media, with a size and sha256 for every file, and the signed
store path that lets `install.sh` trust it with nothing but Nix (see docs/media-layout.md)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mediabuilder.errors import InvalidMedia
from mediabuilder.store import nar
from mediabuilder.store.hashes import Hash, sha256_stream
from mediabuilder.store.storepath import StorePath, make_store_path

VERSION = 1
MANIFEST_NAME = "mediabuilder-manifest"
# Files install.sh trusts by other means than sha256sums (see docs/media-layout.md).
SELF_CHECKED = ("manifest.json", "manifest.storepath", "media-key.pub")
if TYPE_CHECKING:
    from mediabuilder.installer.layout import InstallRecord

_STOREPATH_RE = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-mediabuilder-manifest$")


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str  # hex
    parts: tuple[tuple[str, int, str], ...] = ()  # (relative name, size, sha256 hex)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"size": self.size, "sha256": self.sha256}
        if self.parts:
            data["parts"] = [{"name": n, "size": s, "sha256": h} for n, s, h in self.parts]
        return data


@dataclass(frozen=True)
class HostEntry:
    toplevel: str
    flake_attr: str
    store_paths: tuple[str, ...]  # closure + flake inputs + tools, sorted
    nar_bytes: int


@dataclass
class Manifest:
    mediabuilder: str
    nix: str
    created: str
    key: dict[str, str]
    hosts: dict[str, HostEntry]
    flake: dict[str, Any]
    tools: dict[str, str]
    files: dict[str, FileEntry] = field(default_factory=dict)
    # A delta medium (--since): its base's identity and the paths it relies on (not shipped).
    base: dict[str, Any] | None = None
    # Each host's disk layout, and the unattended install's host and disk (install.sh --unattended).
    install: InstallRecord | None = None
    # What the hosts' store paths hold for offline rebuilds: none, config or full (docs/rebuild.md).
    rebuild: str = "none"

    @property
    def relied(self) -> list[str]:
        return list(self.base["paths"]) if self.base else []

    def to_json(self) -> dict[str, Any]:
        all_paths = sorted({p for h in self.hosts.values() for p in h.store_paths} - set(self.relied))
        data: dict[str, Any] = {
            "version": VERSION,
            "mediabuilder": self.mediabuilder,
            "nix": self.nix,
            "created": self.created,
            "key": self.key,
            "hosts": {
                name: {"toplevel": h.toplevel, "flake_attr": h.flake_attr, "paths": len(h.store_paths),
                       "nar_bytes": h.nar_bytes}
                for name, h in sorted(self.hosts.items())
            },
            "flake": self.flake,
            "tools": self.tools,
            "rebuild": self.rebuild,
            "store_paths": all_paths,
            "files": {name: entry.to_json() for name, entry in sorted(self.files.items())},
        }
        if self.base is not None:
            data["base"] = self.base
        if self.install is not None:
            data["install"] = self.install.to_json()
        return data

    def render(self) -> str:
        # sort_keys and one value per line: install.sh reads a few fields with sed (no jq there).
        # UTF-8 as it is (no \u escapes, which install.sh cannot undo): branch and remote names.
        return json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    # The signed store path's contents
    def sha256sums(self) -> str:
        lines = []
        for name, entry in sorted(self.files.items()):
            if entry.parts:
                lines.append(f"# whole {entry.sha256} {name}")
                lines.extend(f"{h}  {n}" for n, _, h in entry.parts)
            else:
                lines.append(f"{entry.sha256}  {name}")
        return "\n".join(lines) + "\n"

    def hosts_table(self) -> str:
        return "".join(f"{n}\t{h.toplevel}\t{h.nar_bytes}\n" for n, h in sorted(self.hosts.items()))

    def store_paths_table(self) -> str:
        lines = [f"{n}\t{' '.join(h.store_paths)}" for n, h in sorted(self.hosts.items())]
        lines.extend(f"@tools\t{name}\t{path}" for name, path in sorted(self.tools.items()))
        return "\n".join(lines) + "\n"

    def base_table(self) -> str:
        """The signed `base` file of a delta medium, for install.sh: its base, then each path it
        relies on being valid in the target's store."""
        assert self.base is not None
        lines = [f"manifest-sha256 {self.base['manifest_sha256']}", f"rev {self.base['rev']}"]
        lines.extend(f"path {p}" for p in self.relied)
        return "\n".join(lines) + "\n"

    def write_trust_dir(self, directory: Path, rendered: str | None = None) -> None:
        """The tree that becomes the signed `-mediabuilder-manifest` store path (`rendered`: this
        manifest's render(), when the caller has it)."""
        directory.mkdir(parents=True)
        contents = {
            "manifest.json": rendered if rendered is not None else self.render(),
            "sha256sums": self.sha256sums(),
            "hosts": self.hosts_table(),
            "store-paths": self.store_paths_table(),
            "key": self.key["public"] + "\n",
        }
        if self.base is not None:
            contents["base"] = self.base_table()
        if self.install is not None:
            contents["install"] = self.install.table()
        for name, text in contents.items():
            (directory / name).write_text(text, encoding="utf-8")
            os.chmod(directory / name, 0o444)
        os.chmod(directory, 0o555)


def trust_path(directory: Path) -> tuple[StorePath, Hash, int]:
    """The store path of the manifest tree: input-addressed in form (so Nix demands a signature,
    which a content address would not), named from the hash of its NAR."""
    nar_hash, nar_size = nar.nar_hash_and_size(directory)
    return make_store_path("output:out", nar_hash.digest, MANIFEST_NAME), nar_hash, nar_size


def hash_file(path: Path) -> FileEntry:
    with open(path, "rb") as f:
        digest, size = sha256_stream(f)
    return FileEntry(size, digest.hex())


def collect_files(root: Path, skip: Iterable[str] = SELF_CHECKED, known: dict[str, FileEntry] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, FileEntry]:
    """Size and sha256 of every file under `root` (posix relative names); `known` entries (e.g.
    NARs whose FileHash is known) are taken as given."""
    skipped = set(skip) | set(exclude)
    known = known or {}
    files: dict[str, FileEntry] = {}
    for directory, _, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in names:
            rel = prefix + name
            if rel in skipped:
                continue
            files[rel] = known.get(rel) or hash_file(Path(directory, name))
    return files


def read_storepath(text: str, source: str) -> StorePath:
    line = text.strip()
    if not _STOREPATH_RE.match(line):
        raise InvalidMedia(f"{source}: not a manifest store path")
    return StorePath.parse(line)
