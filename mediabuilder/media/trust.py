"""Read the signed manifest store path back out of a media cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.errors import MediabuilderError
from mediabuilder.store import nar
from mediabuilder.store.narinfo import NarInfo


def signed_manifest_text(root: Path, info: NarInfo) -> str | None:
    """manifest.json as the signed NAR holds it, or None when the NAR cannot be read."""
    try:
        with tempfile.TemporaryDirectory() as tmp, open(root / "cache" / info.url, "rb") as f:
            dest = Path(tmp) / "manifest"
            nar.restore(decompressing_reader(info.compression, f, info.url), dest)
            return (dest / "manifest.json").read_text()
    except (OSError, MediabuilderError, ValueError, EOFError):
        return None
