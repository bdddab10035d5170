"""The scripts a medium carries: install.sh, the parts it sources, and unattended.sh.

install.sh is the file a person checks out of band (the build prints its sha256); it vouches for
its parts: it sources each only from its own checked copy, once that copy matched the signed
sha256sums and the sha256 install.sh carries for it (docs/media-layout.md)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

INSTALL_SH = "install.sh"
# install.sh's PARTS, in its order (tests/test_install_script.py holds the two lists equal).
INSTALL_PARTS = ("install-host.sh", "install-disk.sh", "install-upgrade.sh", "install-rebuild.sh")
UNATTENDED_SH = "unattended.sh"
_PARTS_LINE = re.compile(rb"^readonly PARTS=\(([A-Za-z0-9 ._-]*)\)$", re.M)
_PINS = re.compile(rb"^readonly PARTS_SHA256='\n((?:[0-9a-f]{64}  [A-Za-z0-9._-]+\n)*)'$", re.M)


def write_scripts(tree: Path, unattended: bool) -> None:
    """install.sh and its parts into the media tree; unattended.sh too for an unattended install."""
    package = resources.files("mediabuilder.media")
    for name, mode in ((INSTALL_SH, 0o755), *((part, 0o644) for part in INSTALL_PARTS),
                       *(((UNATTENDED_SH, 0o755),) if unattended else ())):
        (tree / name).write_bytes(package.joinpath(name).read_bytes())
        (tree / name).chmod(mode)


def parts_of(script: bytes) -> tuple[str, ...]:
    """The parts an install.sh sources (its `readonly PARTS=(...)` line); none for one from
    before install.sh had parts."""
    match = _PARTS_LINE.search(script)
    return tuple(match.group(1).decode().split()) if match else ()


def pins_of(script: bytes) -> dict[str, str]:
    """The sha256 an install.sh carries for each of its parts (its PARTS_SHA256 block)."""
    match = _PINS.search(script)
    lines = match.group(1).decode().splitlines() if match else []
    return {name: sha for sha, name in (line.split("  ", 1) for line in lines)}
