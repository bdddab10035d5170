"""Verify a whole media tree: the signed manifest, every file's size and sha256 (split parts
included), the bundle, the registry and the binary cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.verify import Fault, Report, check_signature, verify_cache
from mediabuilder.errors import MediabuilderError
from mediabuilder.media.manifest import SELF_CHECKED, hash_file, read_storepath
from mediabuilder.media.registry import Registry
from mediabuilder.media.trust import signed_manifest_text
from mediabuilder.store.keys import PublicKey

BUNDLE_HEADERS = (b"# v2 git bundle\n", b"# v3 git bundle\n")


def _check_manifest_signature(root: Path, trusted: list[PublicKey], report: Report) -> dict[str, Any] | None:
    """The manifest store path is signed by a trusted key and holds exactly manifest.json."""
    try:
        path = read_storepath((root / "manifest.storepath").read_text(), "manifest.storepath")
        info = BinaryCache(root / "cache").read_narinfo(path)
    except (OSError, MediabuilderError) as e:
        report.faults.append(Fault("manifest.storepath", str(e)))
        return None
    if info.ca is not None:
        report.faults.append(Fault("manifest.storepath", "the manifest path is content-addressed: not signed"))
    elif (problem := check_signature(info, trusted)) is not None:
        report.faults.append(Fault("manifest.storepath", f"manifest {problem}"))
    try:
        text = (root / "manifest.json").read_text()
        manifest: dict[str, Any] = json.loads(text)
    except (OSError, ValueError) as e:
        report.faults.append(Fault("manifest.json", f"unreadable: {e}"))
        return None
    # The signed store path's NAR contains manifest.json; compare by unpacking it from the cache.
    signed = signed_manifest_text(root, info)
    if signed is None:
        report.faults.append(Fault("manifest.storepath", "cannot read the signed manifest from the cache"))
    elif signed != text:
        report.faults.append(Fault("manifest.json", "differs from the signed manifest (edited?)"))
    keys = {k.render() for k in trusted}
    if manifest.get("key", {}).get("public") not in keys:
        report.faults.append(Fault("media-key.pub", "the media key is not a trusted key"))
    return manifest


def verify_media(root: Path, trusted: list[PublicKey], jobs: int = 0) -> Report:
    report = Report()
    manifest = _check_manifest_signature(root, trusted, report)
    if manifest is None:
        return report
    files: dict[str, Any] = manifest.get("files", {})
    on_media = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    expected: set[str] = set()
    for name, entry in sorted(files.items()):
        parts = entry.get("parts") or []
        if parts:
            whole = hashlib.sha256()
            size = 0
            for part in parts:
                expected.add(part["name"])
                got = _check_file(root, part["name"], part["size"], part["sha256"], report)
                if got is None:
                    break
                with open(root / part["name"], "rb") as f:
                    while chunk := f.read(1 << 20):
                        whole.update(chunk)
                        size += len(chunk)
            else:
                if size != entry["size"] or whole.hexdigest() != entry["sha256"]:
                    report.faults.append(Fault(name, "its parts do not join to the recorded file"))
        else:
            expected.add(name)
            _check_file(root, name, entry["size"], entry["sha256"], report)
    manifest_nar = _manifest_files(root)
    for extra in sorted(on_media - expected - set(SELF_CHECKED) - manifest_nar):
        report.faults.append(Fault(extra, "not listed in the manifest"))
    if (root / "flake/repo.bundle").is_file():
        with open(root / "flake/repo.bundle", "rb") as f:
            if f.readline() not in BUNDLE_HEADERS:
                report.faults.append(Fault("flake/repo.bundle", "not a git bundle"))
    try:
        pins = Registry.parse((root / "registry.json").read_text(), "registry.json")
        paths = set(manifest.get("store_paths", []))
        for pin in pins.pins:
            if pin.path not in paths:
                report.faults.append(Fault("registry.json", f"{pin.id} pins {pin.path}, which is not on the media"))
    except (OSError, MediabuilderError) as e:
        report.faults.append(Fault("registry.json", str(e)))
    cache_report = verify_cache(root / "cache", trusted, jobs)
    report.paths, report.nar_bytes = cache_report.paths, cache_report.nar_bytes
    report.faults.extend(cache_report.faults)
    return report


def _check_file(root: Path, name: str, size: int, sha256: str, report: Report) -> bool | None:
    path = root / name
    if not path.is_file():
        report.faults.append(Fault(name, "missing"))
        return None
    entry = hash_file(path)
    if entry.size != size:
        report.faults.append(Fault(name, f"{entry.size} bytes, the manifest says {size}"))
        return None
    if entry.sha256 != sha256:
        report.faults.append(Fault(name, "sha256 mismatch (damaged media)"))
        return None
    return True


def _manifest_files(root: Path) -> set[str]:
    """The manifest store path's narinfo and NAR: checked by signature, not listed."""
    try:
        path = read_storepath((root / "manifest.storepath").read_text(), "manifest.storepath")
        info = BinaryCache(root / "cache").read_narinfo(path)
    except (OSError, MediabuilderError):
        return set()
    return {f"cache/{path.hash_part}.narinfo", f"cache/{info.url}"}
