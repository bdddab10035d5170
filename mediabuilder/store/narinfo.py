"""`<hashpart>.narinfo`: what a binary cache says about one store path, and what its Sig signs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mediabuilder.errors import FormatError
from mediabuilder.store import nix32
from mediabuilder.store.hashes import SIZES, Hash
from mediabuilder.store.storepath import StorePath

_REQUIRED = ("StorePath", "URL", "NarHash", "NarSize")
_SINGLE = ("StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
           "References", "Deriver", "CA")


@dataclass(frozen=True)
class NarInfo:
    """One narinfo file. Hashes are kept as `sha256:<nix32>`, references and deriver as base names."""

    store_path: StorePath
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None

    @classmethod
    def parse(cls, text: str, source: str = "") -> NarInfo:
        """Parse narinfo `text`; FormatError naming `source` and the bad line on any problem."""
        where = source or "narinfo"
        fields: dict[str, str] = {}
        sigs: list[str] = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line:
                continue
            key, sep, value = line.partition(": ")
            if not sep:
                raise FormatError(f"{where}: line {number}: {line[:80]!r} is not 'Key: value'")
            if key == "Sig":
                sigs.append(value)
            elif key in _SINGLE:
                if key in fields:
                    raise FormatError(f"{where}: line {number}: {key} appears twice")
                fields[key] = value
            # Nix ignores keys it does not know (e.g. System); so do we.
        missing = [k for k in _REQUIRED if k not in fields]
        if missing:
            raise FormatError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(
                store_path=StorePath.parse(fields["StorePath"]),
                url=fields["URL"],
                compression=fields.get("Compression") or "bzip2",
                file_hash=_hash(fields, "FileHash"),
                file_size=_int(fields, "FileSize"),
                nar_hash=_hash(fields, "NarHash") or "",
                nar_size=_int(fields, "NarSize") or 0,
                references=_references(fields.get("References", "")),
                deriver=_deriver(fields.get("Deriver")),
                sigs=tuple(sigs),
                ca=fields.get("CA"),
            )
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None

    def __post_init__(self) -> None:
        if not self.url:
            raise FormatError("URL is empty")
        if self.nar_size <= 0:
            raise FormatError(f"NarSize: {self.nar_size} is not a positive size")
        if self.references != tuple(sorted(set(self.references))):
            raise FormatError("References: must be sorted and unique")

    def render(self) -> str:
        """The narinfo text, byte for byte as Nix writes it."""
        lines = [
            f"StorePath: {self.store_path.full}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {self.nar_hash}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append(f"References: {' '.join(self.references)}")
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver}")
        lines.extend(f"Sig: {sig}" for sig in self.sigs)
        if self.ca is not None:
            lines.append(f"CA: {self.ca}")
        return "".join(line + "\n" for line in lines)

    def fingerprint(self) -> bytes:
        """What a Sig signs: `1;<path>;<sha256:nix32 NarHash>;<NarSize>;<sorted full refs, comma-joined>`."""
        algo, _, digest = self.nar_hash.partition(":")
        if algo != "sha256" or not nix32.is_valid(digest, 32):
            raise FormatError(f"{self.store_path.base}: NarHash {self.nar_hash!r} is not sha256:<nix32>")
        refs = ",".join(StorePath.parse(r).full for r in self.references)
        return f"1;{self.store_path.full};{self.nar_hash};{self.nar_size};{refs}".encode()

    def reference_paths(self) -> tuple[StorePath, ...]:
        """The references as StorePath objects."""
        return tuple(StorePath.parse(r) for r in self.references)

    def with_sigs(self, sigs: tuple[str, ...]) -> NarInfo:
        """A copy with `sigs` in place of the current signatures."""
        return replace(self, sigs=sigs)


def _hash(fields: dict[str, str], key: str) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    algo, _, digest = value.partition(":")
    size = SIZES.get(algo)
    if size is not None and nix32.is_valid(digest, size):  # already as we would write it
        return value
    try:
        return Hash.parse(value).nix32()
    except FormatError as e:
        raise FormatError(f"{key}: {e}") from None


def _int(fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise FormatError(f"{key}: {value!r} is not a number")
    return int(value)


def _references(value: str) -> tuple[str, ...]:
    if "/" in value:
        raise FormatError(f"References: {value[:80]!r} must list base names, not full paths")
    try:
        return tuple(sorted({StorePath.parse(r).base for r in value.split()}))
    except FormatError as e:
        raise FormatError(f"References: {e}") from None


def _deriver(value: str | None) -> str | None:
    if value is None or value == "unknown-deriver":
        return None
    try:
        return StorePath.parse(value).base
    except FormatError as e:
        raise FormatError(f"Deriver: {e}") from None
