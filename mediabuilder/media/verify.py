"""Verify a whole medium in place: everything install.sh checks before it writes a byte, and the
binary cache on top.

install.sh trusts nothing but the key in `media-key.pub` and what Nix copies, signed by it, out
of the cache: the manifest store path. So this checks, in install.sh's order (locate_media,
check_media, check_sums, choose_host): the files and directories it needs (the parts its
install.sh sources among them); the key file's form, that it is a trusted key, and that the
signed manifest records the same key; that `manifest.storepath` names a signed, input-addressed
manifest path whose manifest.json equals the one on the medium; every name in the signed
sha256sums (inside the medium, present, and its sha256), registry.json, the bundle and
install.sh's parts among them, split parts with their whole; every
host's line and store paths, each with its narinfo. Then what install.sh leaves to Nix or does
not check: every narinfo, signature, NAR hash and reference of the cache, the registry's pins,
the bundle's header, and no file on the medium that the manifest does not cover. A medium
install.sh refuses is never ok here.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from mediabuilder import ui
from mediabuilder.cache.verify import Fault, Report, check_signature, nar_file_names, verify_cache_on
from mediabuilder.errors import InvalidMedia, MediabuilderError
from mediabuilder.media.manifest import SELF_CHECKED
from mediabuilder.media.registry import Registry
from mediabuilder.media.scripts import parts_of, pins_of
from mediabuilder.media.source import MediaSource
from mediabuilder.media.trust import signed_manifest_files
from mediabuilder.store.keys import PublicKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath

BUNDLE_HEADERS = (b"# v2 git bundle\n", b"# v3 git bundle\n")
# cache/nix-cache-info and cache/{nar,log,realisations}/ are checked with the cache.
REQUIRED_FILES = ("media-key.pub", "manifest.json", "manifest.storepath", "registry.json", "flake/repo.bundle")
MAX_SMALL = 64 * 1024 * 1024  # manifest.json, registry.json, a key: read whole, so bounded
_MANIFEST_PATH = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-mediabuilder-manifest$")
_STORE_PATH = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+$")
_SUM = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
_WHOLE = re.compile(r"^# whole ([0-9a-f]{64}) +(.+)$")


def first_line(data: bytes) -> str:
    """The first line as install.sh's first_line reads it: no CR, no trailing whitespace."""
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip()


class _Check:
    """One verification: the medium, the keys trusted, the faults found so far."""

    def __init__(self, source: MediaSource, trusted: list[PublicKey]) -> None:
        self.source, self.trusted = source, trusted
        self.report = Report()
        self.manifest_path = "the manifest"
        self.relied: frozenset[str] = frozenset()  # a delta medium's paths that its base holds

    def base(self, files: dict[str, bytes]) -> None:
        """A delta medium's signed `base`: the paths it relies on instead of carrying them."""
        if "base" not in files:
            return
        relied = set()
        for line in files["base"].decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "path" and _STORE_PATH.match(value):
                relied.add(value)
            elif key == "path" or key not in ("manifest-sha256", "rev"):
                self.fault(f"{self.manifest_path}/base", f"malformed line {line[:80]!r}")
        self.relied = frozenset(relied)

    def fault(self, path: str, message: str) -> None:
        self.report.faults.append(Fault(path, message))

    def read(self, name: str) -> bytes | None:
        try:
            return self.source.read_bytes(name, MAX_SMALL)
        except (OSError, MediabuilderError) as e:
            self.fault(name, f"cannot be read: {e}")
            return None

    def layout(self) -> None:
        data = self.read("install.sh") if self.source.is_file("install.sh") else None
        for name in (*REQUIRED_FILES, *(parts_of(data) if data is not None else ())):
            if not self.source.is_file(name):
                self.fault(name, "missing from the media (damaged or incomplete media)")

    def media_key(self, trust_own: bool = False) -> tuple[str, PublicKey] | None:
        data = self.read("media-key.pub") if self.source.is_file("media-key.pub") else None
        if data is None:
            return None
        line = first_line(data)
        try:
            key = PublicKey.parse(line)
        except MediabuilderError:
            self.fault("media-key.pub", "not a Nix public key 'name:base64' of 32 bytes (damaged media)")
            return None
        if not trust_own and key not in self.trusted:
            self.fault("media-key.pub", f"the media key {key.name} ({key.fingerprint()}) is not a trusted key")
        return line, key

    def signed_files(self, key: PublicKey) -> dict[str, bytes] | None:
        """The signed manifest path's files, once it is shown to be signed by the media key."""
        data = self.read("manifest.storepath") if self.source.is_file("manifest.storepath") else None
        if data is None:
            return None
        line = first_line(data)
        if not _MANIFEST_PATH.match(line):
            self.fault("manifest.storepath", "not a /nix/store/<hash>-mediabuilder-manifest path (damaged media)")
            return None
        self.manifest_path = line
        narinfo = f"cache/{StorePath.parse(line).hash_part}.narinfo"
        if not self.source.is_file(narinfo):
            self.fault(narinfo, "missing: the signed manifest is not in the media cache (damaged media)")
            return None
        try:
            text = self.source.read_bytes(narinfo, MAX_SMALL).decode()
            info = NarInfo.parse(text, source=narinfo)
        except (OSError, MediabuilderError, UnicodeDecodeError) as e:
            self.fault(narinfo, f"unreadable: {e}")
            return None
        if text != info.render():
            # The one narinfo no signed sum covers: its unsigned lines must be as mediabuilder
            # wrote them (an unknown or misspelt key, or a missing References, is not).
            self.fault(narinfo, "not a narinfo as mediabuilder writes it (an unknown, missing or reordered line: "
                                "damaged or forged media)")
            return None
        if str(info.store_path) != line:
            self.fault(narinfo, f"describes {info.store_path}, not the manifest path")
            return None
        if info.ca is not None:
            self.fault(narinfo, "the manifest path is content-addressed, so its signature proves nothing "
                                "(forged media)")
            return None
        if check_signature(info, [key]) is not None:
            self.fault(narinfo, "the manifest is not signed by media-key.pub (forged or damaged media)")
            return None
        try:
            return signed_manifest_files(self.source, info)
        except MediabuilderError as e:
            self.fault(narinfo, str(e))
            return None

    def signed_copies(self, files: dict[str, bytes], key_line: str) -> None:
        on_media = self.read("manifest.json") if self.source.is_file("manifest.json") else None
        if on_media is not None and on_media != files["manifest.json"]:
            self.fault("manifest.json", f"differs from the signed copy in {self.manifest_path} (edited by hand or "
                                        "damaged)")
        if first_line(files["key"]) != key_line:
            self.fault("media-key.pub", "differs from the key recorded in the signed manifest (damaged or tampered "
                                        "media)")

    def sums(self, text: str) -> tuple[dict[str, str], dict[str, str]]:
        """Signed sha256sums: {name: sha256} of the files listed, {name: sha256} of split wholes."""
        where = f"{self.manifest_path}/sha256sums"
        listed: dict[str, str] = {}
        wholes: dict[str, str] = {}
        for line in text.splitlines():
            if whole := _WHOLE.match(line):
                wholes[whole.group(2)] = whole.group(1)
            if not line or line.startswith("#"):
                continue
            match = _SUM.match(line)
            if match is None:
                self.fault(where, f"malformed line {line[:80]!r} (media made by an incompatible mediabuilder)")
                continue
            name = match.group(2)
            if name.startswith("/") or {".", ".."} & set(name.split("/")):
                self.fault(where, f"file name {name!r} points outside the media (forged media)")
            elif not self.source.is_file(name):
                self.fault(name, "missing from the media (damaged or incomplete media)")
            else:
                listed[name] = match.group(1)
        for name in ("registry.json", "flake/repo.bundle"):
            if name not in listed and self.source.is_file(name):
                self.fault(where, f"does not list {name} (media made by an incompatible mediabuilder)")
        # The parts the medium's install.sh sources: present (layout), vouched for by the sums,
        # and, by their signed sums, the parts that install.sh carries the sha256 of.
        script = self.read("install.sh") if "install.sh" in listed else None
        pins = pins_of(script) if script is not None else {}
        for name in parts_of(script) if script is not None else ():
            if name not in listed and self.source.is_file(name):
                self.fault(name, "not listed in the signed sha256sums, so nothing vouches for it (forged media, or "
                                 "made by an incompatible mediabuilder)")
            elif name in listed and listed[name] != pins.get(name):
                self.fault(name, "is not the part this install.sh was made with (forged media, or made by another "
                                 "mediabuilder version)")
        return listed, wholes

    def hosts(self, files: dict[str, bytes], wholes: dict[str, str]) -> None:
        """Every host's line, its store paths and their narinfos, as choose_host reads them."""
        where = self.manifest_path
        names: dict[str, str] = {}
        for line in files["hosts"].decode(errors="replace").splitlines():
            fields = line.split("\t", 3)
            if not fields[0]:
                continue
            if len(fields) != 3 or not _STORE_PATH.match(fields[1]) or not fields[2].isdigit():
                self.fault(f"{where}/hosts", f"malformed line for {fields[0]!r}")
                continue
            names[fields[0]] = fields[1]
        if not names:
            self.fault(f"{where}/hosts", "lists no host (nothing to install)")
        lines = {}
        for line in files["store-paths"].decode(errors="replace").splitlines():
            host, tab, paths = line.partition("\t")
            if tab and host not in lines:
                lines[host] = paths.split()
        for host, toplevel in sorted(names.items()):
            if host not in lines:
                self.fault(f"{where}/store-paths", f"has no line for host {host} (damaged media)")
                continue
            for path in lines[host]:
                if not _STORE_PATH.match(path):
                    self.fault(f"{where}/store-paths", f"{path[:80]!r} is not a store path")
                elif path not in self.relied and not self.source.is_file(f"cache/{path[11:43]}.narinfo"):
                    self.fault(f"cache/{path[11:43]}.narinfo", f"missing: {path} is not on the media (damaged media)")
            if toplevel not in lines[host]:
                self.fault(f"{where}/store-paths", f"the paths of {host} do not include its toplevel")

    def hashes(self, listed: dict[str, str], wholes: dict[str, str], bar: Any) -> None:
        """sha256 of every listed file: NAR files as the cache check read them, the rest here."""
        seen = self.report.file_sha256
        for name, whole in sorted(wholes.items()):
            if name in seen and seen[name] != whole:
                self.fault(name, "its parts do not join to the recorded file (damaged media)")
        for name in sorted(seen):
            parts = nar_file_names(self.source, name) if not self.source.is_file(name) else None
            if parts and name not in wholes:
                self.fault(name, "split, but the signed sha256sums has no whole line for it")
        for name, sha in sorted(listed.items()):
            if name not in seen:
                seen[name] = _sha256(self.source, name, bar)
            if seen[name] and seen[name] != sha:
                self.fault(name, "sha256 mismatch (damaged media)")

    def rest(self, files: dict[str, bytes], listed: dict[str, str], manifest_nar: set[str]) -> None:
        for name, _ in self.source.files():
            if name not in listed and name not in SELF_CHECKED and name not in manifest_nar:
                self.fault(name, "not listed in the manifest")
        if "flake/repo.bundle" in listed:
            with self.source.open("flake/repo.bundle") as f:
                if f.readline(64) not in BUNDLE_HEADERS:
                    self.fault("flake/repo.bundle", "not a git bundle")
        try:
            manifest: dict[str, Any] = json.loads(files["manifest.json"])
            data = self.read("registry.json") if "registry.json" in listed else None
            if data is not None:
                pins = Registry.parse(data.decode(), "registry.json")
                paths = set(manifest.get("store_paths", [])) | self.relied
                for pin in pins.pins:
                    if pin.path not in paths:
                        self.fault("registry.json", f"{pin.id} pins {pin.path}, which is not on the media")
        except (ValueError, AttributeError, MediabuilderError) as e:
            self.fault("registry.json", str(e))


def _sha256(source: MediaSource, name: str, bar: Any) -> str:
    digest = hashlib.sha256()
    try:
        with source.open(name) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                bar.update(len(chunk))
    except (OSError, MediabuilderError):
        return ""
    return digest.hexdigest()


def signed_manifest(source: MediaSource) -> dict[str, bytes]:
    """The signed manifest's files (manifest.json, install, ...), checked as install.sh checks
    them but against the medium's own key: signed by media-key.pub, input-addressed, and the
    manifest.json on the medium equal to the signed copy. That proves the medium consistent, not
    who made it (verify --trusted-key does). InvalidMedia naming the first fault."""
    check = _Check(source, [])
    key = check.media_key(trust_own=True)
    files = check.signed_files(key[1]) if key is not None else None
    if key is not None and files is not None:
        check.signed_copies(files, key[0])
    for name in ("media-key.pub", "manifest.storepath"):
        if not check.report.faults and not source.is_file(name):
            check.fault(name, "missing from the media (damaged or incomplete media)")
    if check.report.faults or files is None:
        raise InvalidMedia(f"{source.path}: {check.report.faults[0]}",
                           hint=f"run `mediabuilder verify {source.path}` for every fault")
    return files


def verify_media(source: MediaSource, trusted: list[PublicKey], jobs: int = 0) -> Report:
    """Check the medium on `source`, reading it in place."""
    check = _Check(source, trusted)
    check.layout()
    key = check.media_key()
    files = check.signed_files(key[1]) if key is not None else None
    if key is None or files is None:
        return check.report
    check.signed_copies(files, key[0])
    check.base(files)
    listed, wholes = check.sums(files["sha256sums"].decode(errors="replace"))
    check.hosts(files, wholes)
    total = sum(size for _, size in source.files())
    with ui.progress(total, "verifying") as bar:
        cache = verify_cache_on(source, "cache/", trusted, jobs, bar,
                                external=frozenset(p[11:43] for p in check.relied))
        check.report.file_sha256 = cache.file_sha256
        check.hashes(listed, wholes, bar)
    narinfo = f"cache/{StorePath.parse(check.manifest_path).hash_part}.narinfo"
    url = NarInfo.parse(source.read_bytes(narinfo, MAX_SMALL).decode(), narinfo).url
    check.rest(files, listed, {narinfo, f"cache/{url}"})
    check.report.paths, check.report.nar_bytes = cache.paths, cache.nar_bytes
    check.report.faults.extend(cache.faults)
    return check.report
