#!/usr/bin/env python3
"""Write the sha256 of each of install.sh's parts into its PARTS_SHA256 block.

install.sh vouches for its parts itself: it sources a part only when its checked copy has the
sha256 install.sh carries for it (and matched the signed sha256sums). Run this after editing a
part; tests/test_install_script.py fails until the block is current."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

MEDIA = Path(__file__).resolve().parent.parent / "mediabuilder" / "media"
BLOCK = re.compile(r"^readonly PARTS_SHA256='\n(?:[0-9a-f]{64}  [A-Za-z0-9._-]+\n)*'$", re.M)
PARTS = re.compile(r"^readonly PARTS=\(([A-Za-z0-9 ._-]*)\)$", re.M)


def pinned_block(script: str, media: Path = MEDIA) -> str:
    """The PARTS_SHA256 block install.sh should carry for the parts beside it."""
    match = PARTS.search(script)
    if match is None:
        raise SystemExit(f"{media / 'install.sh'}: no `readonly PARTS=(...)` line")
    lines = [f"{hashlib.sha256((media / name).read_bytes()).hexdigest()}  {name}\n" for name in match.group(1).split()]
    return "readonly PARTS_SHA256='\n" + "".join(lines) + "'"


def main() -> int:
    path = MEDIA / "install.sh"
    script = path.read_text()
    if len(BLOCK.findall(script)) != 1:
        print(f"{path}: no single `readonly PARTS_SHA256='...'` block", file=sys.stderr)
        return 2
    new = BLOCK.sub(lambda _: pinned_block(script), script)
    if new != script:
        path.write_text(new)
        print(f"{path}: PARTS_SHA256 updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
