"""FAT32's on-disk structures (`fatfs`), checked against what mtools writes for the same names."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mediabuilder.media import fatfs
from mediabuilder.run import run

ASCII_NAMES = [
    "nix-cache-info",
    "MixedCase.Json",
    ".hidden",
    "abcdefghij.txt",
    "abcdefghijk.txt",
    "a b.c d",
    "0123456789abcdefghijklmnopqrstuv.narinfo",
    "exactly-13-ch",  # 13 UTF-16 units: one long entry, no padding
    "exactly-26-characters-long",  # 26: two long entries, no padding
    "Foo.txt",  # fits 8.3 in mixed case: a long name and FOO.TXT, no tail
    "Foo~1.txt",  # and FOO~1.TXT is then this one's, not a tail of Foo.txt's
]


def test_short_fit() -> None:
    assert fatfs.short_fit("install.sh") == (b"INSTALL SH ", fatfs.NT_LOWER_BASE | fatfs.NT_LOWER_EXT)
    assert fatfs.short_fit("cache") == (b"CACHE      ", fatfs.NT_LOWER_BASE)
    assert fatfs.short_fit("README.txt") == (b"README  TXT", fatfs.NT_LOWER_EXT)
    assert fatfs.short_fit("NAR") == (b"NAR        ", 0)
    assert fatfs.short_fit("abc~1.txt") == (b"ABC~1   TXT", fatfs.NT_LOWER_BASE | fatfs.NT_LOWER_EXT)
    for name in ("MixedCase.Json", "a.b.c", ".git", "abcdefghi", "abc.json", "a+b", "a b", "ü.txt", "x."):
        assert fatfs.short_fit(name) is None, name


def test_entry_count() -> None:
    assert fatfs.entry_count("install.sh") == 1
    assert fatfs.entry_count("exactly-13-ch") == 2
    assert fatfs.entry_count("exactly-13-chr") == 3
    assert fatfs.entry_count("x" * 255) == 1 + 20


def test_short_names_avoid_names_that_fit() -> None:
    names = fatfs.ShortNames(["abcdefghij.txt", "ABCDEF~1.TXT", "abcdefghijk.txt"])
    assert names.generate("abcdefghij.txt") == b"ABCDEF~2TXT"
    assert names.generate("abcdefghijk.txt") == b"ABCDEF~3TXT"


def test_short_names_mixed_case_keep_their_own() -> None:
    names = fatfs.ShortNames(["Foo.txt", "Foo~1.txt", "foo~2.TXT"])
    assert names.generate("Foo.txt") == b"FOO     TXT"
    assert names.generate("Foo~1.txt") == b"FOO~1   TXT"
    assert names.generate("fOo.txt.bak") == b"FOOTXT~1BAK"


def test_short_names_many_alike() -> None:
    """Ten thousand names with one basis: all distinct, the tail widening as Windows does."""
    names = fatfs.ShortNames([])
    started = time.process_time()
    shorts = [names.generate(f"archive.part{i:05}") for i in range(10_000)]
    assert len(set(shorts)) == 10_000
    assert shorts[0] == b"ARCHIV~1PAR"
    assert shorts[9] == b"ARCHI~10PAR"
    assert shorts[9_999] == b"AR~10000PAR"
    assert time.process_time() - started < 5  # linear, not one probe per earlier name


def test_fat_chunks() -> None:
    eoc = fatfs.END_OF_CHAIN
    data = b"".join(fatfs.fat_chunks([(2, 1), (3, 3), (6, 1)]))
    assert struct.unpack("<7I", data) == (0x0FFFFFF8, eoc, eoc, 4, 5, eoc, eoc)
    # A chain longer than one chunk comes out in pieces that join up exactly.
    pieces = list(fatfs.fat_chunks([(2, 600_000), (600_002, 2)]))
    assert len(pieces) > 1
    entries = struct.unpack(f"<{600_004}I", b"".join(pieces))
    assert entries[2:600_001] == tuple(range(3, 600_002))
    assert entries[600_001:] == (eoc, 600_003, eoc)
    with pytest.raises(ValueError, match="does not follow"):
        list(fatfs.fat_chunks([(2, 1), (4, 1)]))


def test_stamp() -> None:
    when = time.mktime((2024, 2, 29, 13, 45, 59, 0, 0, -1))
    assert fatfs.stamp(when) == ((13 << 11) | (45 << 5) | 29, (44 << 9) | (2 << 5) | 29)
    assert fatfs.stamp(0) == (0, (1 << 5) | 1)  # before 1980: 1980-01-01


def _root_entries(image: Path) -> list[bytes]:
    """The 32-byte entries of the root directory's first cluster of a FAT32 image."""
    with image.open("rb") as f:
        boot = f.read(512)
        per_cluster = boot[13]
        reserved, fats = struct.unpack_from("<HB", boot, 14)
        fat_sectors, root = struct.unpack_from("<I4xI", boot, 36)
        f.seek((reserved + fats * fat_sectors + (root - 2) * per_cluster) * 512)
        data = f.read(per_cluster * 512)
    return [data[i : i + 32] for i in range(0, len(data), 32) if data[i] != 0]


@pytest.mark.integration
def test_same_entries_as_mtools(tmp_path: Path) -> None:
    """mtools (an independent writer) picks the same short names and writes the same long-name
    entries, checksums included, for the same names in the same order."""
    image = tmp_path / "m.img"
    with image.open("wb") as f:
        f.truncate(300 * 1024 * 1024)
    run(["mkfs.fat", "-F", "32", "-S", "512", "-s", "8", image])  # 4 KiB clusters: one holds the root
    for name in ASCII_NAMES:
        (tmp_path / name).write_text("x")
        run(["mcopy", "-i", image, tmp_path / name, "::/"])
    entries = _root_entries(image)
    short_names = fatfs.ShortNames(ASCII_NAMES)
    for name in ASCII_NAMES:
        short = short_names.generate(name)
        longs = fatfs.long_entries(name, short)
        count = len(longs) // 32
        theirs, entries = entries[: count + 1], entries[count + 1 :]
        assert b"".join(theirs[:count]) == longs, name
        assert theirs[count][:11] == short, name
    assert entries == []


REPO = Path(__file__).resolve().parent.parent


PKG_HINT = ("its dependency `fs` needs pkg_resources, which setuptools 82 removed: "
            "pip install 'setuptools<80.9' into mediabuilder's environment")
DEPS_HINT = "pip install mediabuilder's dependencies (pyproject.toml) into its environment"


@pytest.mark.parametrize(("blocked", "why", "hint"), [
    ("pkg_resources", "import of pkg_resources halted; None in sys.modules", PKG_HINT),
    ("fs", "No module named 'fs.base'; 'fs' is not a package", DEPS_HINT),
])
def test_pyfatfs_import_guard(blocked: str, why: str, hint: str) -> None:
    """Where pyfatfs cannot be imported (setuptools 82 removed the pkg_resources its dependency
    `fs` imports, as a fresh Python 3.12+ venv gets), one line says what to install, no
    traceback. Run in a fresh interpreter whose import of the module is blocked."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from mediabuilder.errors import InvalidInput\n"
            "from mediabuilder.media.fatfs import pyfatfs_class\n"
            "try:\n    pyfatfs_class()\nexcept InvalidInput as e:\n    print(e); print(e.hint)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [
        f"cannot import pyfatfs, which reads FAT32 images: {why}",
        hint,
    ]


def test_pyfatfs_imports() -> None:
    from pyfatfs.PyFatFS import PyFatFS

    assert fatfs.pyfatfs_class() is PyFatFS
