"""Delta media (`mediabuilder build --since OLD`): what an older medium already put on a machine,
and the split of a new medium's paths into those it ships and those it relies on.

OLD is hostile input. It is a medium (directory, ISO or FAT32 image), whose manifest must be
signed by this build's key and is read from the signed store path (NAR hash and signature
checked); or a bare manifest.json (the file of a medium, or the copy an installed machine keeps
in /var/lib/mediabuilder/), which carries no signature and is only parsed, strictly and bounded
in size. Either way OLD only decides what the new medium leaves out: install.sh --upgrade checks
that every path left out is valid in the target's store before it writes anything.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.cache.verify import check_signature
from mediabuilder.errors import InvalidInput, InvalidMedia, MediabuilderError
from mediabuilder.media.trust import MAX_MANIFEST_NAR, signed_manifest_files
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import PublicKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath

MAX_MANIFEST = 64 * 1024 * 1024  # a manifest.json lists every store path once: far below this
_STORE_PATH = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+$")
_MANIFEST_PATH = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-mediabuilder-manifest$")
_REV = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


@dataclass(frozen=True)
class Base:
    """What a machine installed from OLD holds: every path OLD shipped, per host when known."""

    source: str
    manifest_sha256: str  # of OLD's manifest.json: its identity
    rev: str
    toplevels: Mapping[str, str]
    paths: frozenset[str]  # every path OLD shipped or relied on
    host_paths: Mapping[str, frozenset[str]]  # per host, when OLD's signed store-paths was read
    signed: bool

    def of_host(self, host: str) -> frozenset[str]:
        """The paths a machine of `host` installed from OLD holds (all of OLD's when unknown)."""
        return self.host_paths.get(host, self.paths)

    def to_json(self, relied: list[str]) -> dict[str, Any]:
        return {"manifest_sha256": self.manifest_sha256, "rev": self.rev, "toplevels": dict(self.toplevels),
                "paths": relied}


def load_base(path: Path, trusted: list[PublicKey]) -> Base:
    """OLD as `--since` names it; InvalidInput/InvalidMedia naming it when it is none of the forms."""
    where = f"--since {path}"
    if path.is_dir():
        if (path / "manifest.storepath").exists():
            return _from_medium(path, trusted, where)
        if (path / "manifest.json").is_file():  # an installed machine's /var/lib/mediabuilder
            return _from_manifest(_read_bounded(path / "manifest.json", where), f"{where}/manifest.json")
        raise InvalidInput(f"{where}: neither a medium nor a directory holding manifest.json",
                           hint="pass an older medium, its manifest.json, or /var/lib/mediabuilder of a machine")
    if not path.is_file():
        raise InvalidInput(f"{where}: no such file or directory")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        return _from_manifest(_read_bounded(path, where), where)
    return _from_medium(path, trusted, where)


def _read_bounded(path: Path, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST + 1)
    except OSError as e:
        raise InvalidInput(f"{where}: cannot read it: {e.strerror}") from None
    if len(data) > MAX_MANIFEST:
        raise InvalidMedia(f"{where}: larger than {MAX_MANIFEST} bytes: not a mediabuilder manifest")
    return data


def _from_medium(path: Path, trusted: list[PublicKey], where: str) -> Base:
    from mediabuilder.media.source import open_source

    try:
        with open_source(path) as source:
            files = _signed_files(source, trusted, where)
    except MediabuilderError as e:
        if str(e).startswith(where):
            raise
        raise type(e)(f"{where}: {e}", hint=e.hint) from None
    base = _from_manifest(files["manifest.json"], f"{where}: signed manifest.json", signed=True)
    host_paths = {}
    for line in files["store-paths"].decode(errors="replace").splitlines():
        host, tab, paths = line.partition("\t")
        if tab and not host.startswith("@"):
            host_paths[host] = frozenset(_store_paths(paths.split(), f"{where}: signed store-paths"))
    return Base(base.source, base.manifest_sha256, base.rev, base.toplevels,
                base.paths.union(*host_paths.values()), host_paths, signed=True)


def _signed_files(source: Any, trusted: list[PublicKey], where: str) -> dict[str, bytes]:
    """The signed manifest's files, once its narinfo is signed by a trusted key and its NAR matches."""
    if not source.is_file("manifest.storepath"):
        raise InvalidMedia(f"{where}: no manifest.storepath: not a mediabuilder medium")
    line = source.read_bytes("manifest.storepath", 4096).decode(errors="replace").strip()
    if not _MANIFEST_PATH.match(line):
        raise InvalidMedia(f"{where}: manifest.storepath: not a /nix/store/<hash>-mediabuilder-manifest path")
    narinfo = f"cache/{StorePath.parse(line).hash_part}.narinfo"
    if not source.is_file(narinfo):
        raise InvalidMedia(f"{where}: {narinfo} missing: the signed manifest is not in its cache")
    try:
        info = NarInfo.parse(source.read_bytes(narinfo, 1 << 20).decode(), source=narinfo)
    except UnicodeDecodeError:
        raise InvalidMedia(f"{where}: {narinfo}: not text") from None
    if str(info.store_path) != line or info.ca is not None:
        raise InvalidMedia(f"{where}: {narinfo} does not describe an input-addressed manifest path")
    if check_signature(info, trusted) is not None:
        names = ", ".join(f"{k.name} ({k.fingerprint()})" for k in trusted)
        raise InvalidMedia(f"{where}: its manifest is not signed by this build's key {names}",
                           hint="build with the key that made it (--key), or pass its manifest.json instead")
    if info.nar_size > MAX_MANIFEST_NAR:
        raise InvalidMedia(f"{where}: {narinfo}: the manifest NAR claims more than {MAX_MANIFEST_NAR} bytes")
    digest, size = hashlib.sha256(), 0
    try:
        with source.open(f"cache/{info.url}") as f:
            stream = decompressing_reader(info.compression, f, info.url)
            while size <= info.nar_size and (chunk := stream.read(1 << 20)):
                size += len(chunk)
                digest.update(chunk)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise InvalidMedia(f"{where}: cache/{info.url}: cannot read the manifest NAR: {e}") from None
    if size != info.nar_size or Hash("sha256", digest.digest()) != Hash.parse(info.nar_hash):
        raise InvalidMedia(f"{where}: cache/{info.url}: the manifest NAR does not match its signed hash")
    files: dict[str, bytes] = signed_manifest_files(source, info)
    return files


def _from_manifest(data: bytes, where: str, signed: bool = False) -> Base:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidMedia(f"{where}: not JSON: not a mediabuilder manifest") from None
    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise InvalidMedia(f"{where}: not a mediabuilder manifest (version 1)")
    flake, hosts = manifest.get("flake"), manifest.get("hosts")
    rev = flake.get("rev") if isinstance(flake, dict) else None
    if not isinstance(rev, str) or not _REV.match(rev):
        raise InvalidMedia(f"{where}: flake.rev is not a git commit")
    if not isinstance(hosts, dict) or not hosts:
        raise InvalidMedia(f"{where}: hosts is not an object naming at least one host")
    toplevels = {}
    for name, entry in hosts.items():
        toplevel = entry.get("toplevel") if isinstance(entry, dict) else None
        if not isinstance(toplevel, str) or not _STORE_PATH.match(toplevel):
            raise InvalidMedia(f"{where}: hosts.{str(name)[:40]}.toplevel is not a store path")
        toplevels[str(name)] = toplevel
    listed = manifest.get("store_paths")
    base = manifest.get("base")
    relied = base.get("paths", []) if isinstance(base, dict) else []  # OLD was a delta medium itself
    if not isinstance(listed, list) or not isinstance(relied, list):
        raise InvalidMedia(f"{where}: store_paths is not a list")
    paths = frozenset(_store_paths([*listed, *relied], f"{where}: store_paths"))
    return Base(where, hashlib.sha256(data).hexdigest(), rev, toplevels, paths, {}, signed)


def _store_paths(items: list[Any], where: str) -> list[str]:
    for item in items:
        if not isinstance(item, str) or not _STORE_PATH.match(item):
            raise InvalidMedia(f"{where}: {str(item)[:80]!r} is not a store path")
    return items


def split(closures: Mapping[str, list[str]], base: Base) -> tuple[list[str], list[str]]:
    """The paths a delta medium ships (each host's closure less what its machines hold) and the
    paths it relies on, both sorted."""
    shipped: set[str] = set()
    relied: set[str] = set()
    for host, paths in closures.items():
        held = base.of_host(host)
        for path in paths:
            (relied if path in held else shipped).add(path)
    return sorted(shipped), sorted(relied - shipped)
