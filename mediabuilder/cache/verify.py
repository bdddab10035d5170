"""Verify a binary cache with Python alone: every narinfo, signature, NAR and reference.

A path passes when its narinfo parses and names its own file, a trusted key signed it (or it is
content-addressed and its name follows from its content), the compressed file matches FileHash
and FileSize, the NAR inside matches NarHash and NarSize, and every reference is present.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mediabuilder import ui
from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.writer import default_jobs
from mediabuilder.errors import MediabuilderError
from mediabuilder.store import contentaddress
from mediabuilder.store.hashes import Hash, sha256_stream
from mediabuilder.store.keys import PublicKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import STORE_DIR

CHUNK = 1 << 20


@dataclass(frozen=True)
class Fault:
    path: str
    fault: str

    def __str__(self) -> str:
        return f"{self.path}: {self.fault}"


@dataclass
class Report:
    paths: int = 0
    nar_bytes: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


@dataclass(frozen=True)
class _Checked:
    hash_part: str
    label: str
    references: tuple[str, ...]
    nar_size: int
    faults: tuple[Fault, ...]




def check_signature(info: NarInfo, trusted: list[PublicKey]) -> str | None:
    """None when a trusted key signed `info` or its CA is genuine; otherwise the fault."""
    fingerprint = info.fingerprint()
    if any(key.verify(fingerprint, sig) for key in trusted for sig in info.sigs):
        return None
    if info.ca:
        try:
            refs = tuple(type(info.store_path).parse(r) for r in info.references)
            expected = contentaddress.expected_path(info.store_path.name, info.ca, refs, info.store_path)
            nar_hash = contentaddress.nar_hash_of_ca(info.ca)
        except MediabuilderError as e:
            return f"bad content address: {e}"
        if expected != info.store_path:
            return f"content address {info.ca} does not give this store path"
        if nar_hash is not None and nar_hash.nix32() != info.nar_hash:
            return "NarHash differs from the content address"
        return None
    if not info.sigs:
        return "not signed"
    names = ", ".join(sorted({s.split(":", 1)[0] for s in info.sigs}))
    return f"no valid signature by a trusted key (signed by {names})"


def check_path(root: str, narinfo_file: str, trusted_keys: list[str]) -> _Checked:
    """Worker: check one narinfo and its NAR file."""
    cache = BinaryCache(Path(root))
    hash_part = Path(narinfo_file).name.removesuffix(".narinfo")
    label = f"{STORE_DIR}/{hash_part}-?"

    def failed(message: str, refs: tuple[str, ...] = (), size: int = 0) -> _Checked:
        return _Checked(hash_part, label, refs, size, (Fault(label, message),))

    try:
        info = NarInfo.parse(Path(narinfo_file).read_text(), source=narinfo_file)
    except (MediabuilderError, OSError, UnicodeDecodeError) as e:
        return failed(f"unreadable narinfo {Path(narinfo_file).name}: {e}")
    label = str(info.store_path)
    refs = info.references
    if info.store_path.hash_part != hash_part:
        return failed(f"narinfo file {hash_part}.narinfo describes another path", refs)
    faults: list[str] = []
    trusted = [PublicKey.parse(k) for k in trusted_keys]
    if (problem := check_signature(info, trusted)) is not None:
        faults.append(problem)
    try:
        file = cache.file_path(info.url)
        with open(file, "rb") as f:
            file_sha, file_size = sha256_stream(f)
    except FileNotFoundError:
        faults.append(f"NAR file {info.url} is missing")
        return _Checked(hash_part, label, refs, info.nar_size, tuple(Fault(label, m) for m in faults))
    except (OSError, MediabuilderError) as e:
        faults.append(f"cannot read {info.url}: {e}")
        return _Checked(hash_part, label, refs, info.nar_size, tuple(Fault(label, m) for m in faults))
    if info.file_size is not None and file_size != info.file_size:
        faults.append(f"{info.url} is {file_size} bytes, FileSize says {info.file_size}")
    elif info.file_hash is not None and Hash("sha256", file_sha).nix32() != info.file_hash:
        faults.append(f"{info.url} does not match its FileHash")
    else:
        try:
            with open(file, "rb") as f:
                nar_sha, nar_size = sha256_stream(decompressing_reader(info.compression, f, info.url))
        except (OSError, EOFError, MediabuilderError, ValueError) as e:
            faults.append(f"{info.url} does not decompress as {info.compression}: {e}")
        else:
            if nar_size != info.nar_size:
                faults.append(f"NAR is {nar_size} bytes, NarSize says {info.nar_size}")
            elif Hash("sha256", nar_sha).nix32() != info.nar_hash:
                faults.append("NAR does not match its NarHash")
    return _Checked(hash_part, label, refs, info.nar_size, tuple(Fault(label, m) for m in faults))


def verify_cache(root: Path, trusted: list[PublicKey], jobs: int = 0) -> Report:
    """Check every path in the cache at `root`."""
    cache = BinaryCache(root)
    report = Report()
    info_file = root / "nix-cache-info"
    if not info_file.is_file():
        report.faults.append(Fault(str(info_file), "missing: this is not a Nix binary cache"))
        return report
    if f"StoreDir: {STORE_DIR}" not in info_file.read_text(errors="replace"):
        report.faults.append(Fault(str(info_file), f"StoreDir is not {STORE_DIR}"))
    for sub in ("nar", "log", "realisations"):
        if not (root / sub).is_dir():
            report.faults.append(Fault(str(root / sub), "missing directory (Nix needs it on read-only media)"))
    files = [str(f) for f in cache.narinfo_files()]
    keys = [k.render() for k in trusted]
    checked: list[_Checked] = []
    with ui.progress(len(files), "verifying paths", unit="path") as bar, \
            ProcessPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        for result in pool.map(check_path, [str(root)] * len(files), files, [keys] * len(files), chunksize=8):
            checked.append(result)
            bar.update(1)
    present = {c.hash_part for c in checked}
    for c in checked:
        report.paths += 1
        report.nar_bytes += c.nar_size
        report.faults.extend(c.faults)
        for ref in c.references:
            if ref[:32] not in present:
                report.faults.append(Fault(c.label, f"reference {STORE_DIR}/{ref} is missing"))
    return report
