"""Verdicts users rely on: `verify` and `inspect` on the media people bring.

What verify accepts, install.sh installs, and what install.sh refuses, verify refuses: each
damaged medium is judged by both, the real install.sh (`--dry-run`) in a mount namespace with
no network. Images are read in place (nothing written to $TMPDIR, not even on a tiny one);
truncated and damaged ISO and FAT32 images, and images crafted by editing bytes of real ones
(hostile names, looping or shared cluster chains, sizes past the image), are refused with exit
2 and one line naming the image, by verify and inspect alike. The exit status contract: 0 every
check holds, 1 the medium was read and faults were found (one line each), 2 not readable as a
medium at all or bad arguments (one `error:` line)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import NIX_CONFIG, REPO, Example, assert_one_line_error, make_nix_env, run_cli

from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.writer import export_tree
from mediabuilder.media.manifest import trust_path
from mediabuilder.media.source import DirSource
from mediabuilder.media.trust import signed_manifest_files
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.pathinfo import PathInfo

pytestmark = pytest.mark.integration

HOST = "alpha"
TIMEOUT = 120  # a guard against hangs, not a measurement
MEMORY = 2 * 1024**3  # address space verify and inspect get for crafted images


@dataclass(frozen=True)
class Media:
    base: Path
    key: str
    dir: Path
    iso: Path
    fat: Path  # bare FAT32
    gpt: Path  # FAT32 in a GPT partition


@pytest.fixture(scope="module")
def media(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Media:
    base = tmp_path_factory.mktemp("verdicts")
    outputs = {
        "dir": (base / "media", ()),
        "iso": (base / "media.iso", ("--format", "iso", "--label", "NIXOS_TEST")),
        "fat": (base / "media.img", ("--format", "fat32")),
        "gpt": (base / "media-gpt.img", ("--format", "fat32", "--partition-table", "gpt")),
    }
    for name, (out, args) in outputs.items():
        proc = run_cli("build", "--flake", f"{example.flake}#{HOST}", "--cache", base / "cache", "--output", out,
                       *args)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    key = (base / "media" / "media-key.pub").read_text().strip()
    return Media(base, key, *(out for out, _ in outputs.values()))


def mb(*args: str | Path, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with bounded memory, a hang guard and its own $TMPDIR."""
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(["prlimit", f"--as={MEMORY}", sys.executable, "-m", "mediabuilder", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def fault_paths(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The subjects of verify's fault lines (`SUBJECT: what is wrong` on stdout)."""
    return {line.split(": ", 1)[0] for line in proc.stdout.splitlines()}


# verify and install.sh agree


def run_install(tmp: Path, medium: Path) -> subprocess.CompletedProcess[str]:
    """install.sh --dry-run from a read-only bind mount of the medium, no network."""
    _needs_root()
    root, scratch = tmp / "target", tmp / "scratch"
    for d in (root, scratch):
        d.mkdir(exist_ok=True)
    root.chmod(0o755)
    wrapper = ('set -e; mount --make-rprivate /; mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"; '
               'mount --bind "$2" "$2"; shift 2; exec "$@"')
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "TMPDIR": str(scratch), "HOME": str(tmp / "home")}
    proc = subprocess.run(
        ["unshare", "-m", "-n", "--", "bash", "-c", wrapper, "_", str(medium), str(root),
         "bash", str(medium / "install.sh"), "--media", str(medium), "--root", str(root), "--dry-run", "--yes"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=TIMEOUT, check=False,
    )
    assert list(root.iterdir()) == [] and list(scratch.iterdir()) == []
    return proc


def _needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (mount namespaces)")


def install_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The subject of install.sh's one error line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("install.sh: error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    return errors[0].removeprefix("install.sh: error: ").split(": ", 1)[0]


def _narinfos(medium: Path) -> list[Path]:
    storepath = (medium / "manifest.storepath").read_text().strip()
    own = f"{storepath[11:43]}.narinfo"
    return sorted(p for p in (medium / "cache").glob("*.narinfo") if p.name != own)


def _nar_of(narinfo: Path) -> Path:
    url = re.search(r"^URL: (.+)$", narinfo.read_text(), re.M)
    assert url is not None
    return narinfo.parent / url.group(1)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _edit_manifest(m: Path) -> None:
    text = (m / "manifest.json").read_text()
    (m / "manifest.json").write_text(text.replace('"nix": "', '"nix": "9', 1))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "key replaced": lambda m: (m / "media-key.pub").write_text(SecretKey.generate("other-1").public().render() + "\n"),
    "key not a key": lambda m: (m / "media-key.pub").write_text("not a key\n"),
    "key cut short": lambda m: (m / "media-key.pub").write_text((m / "media-key.pub").read_text()[:30] + "\n"),
    "key missing": lambda m: (m / "media-key.pub").unlink(),
    "manifest.json edited": _edit_manifest,
    "manifest.storepath garbage": lambda m: (m / "manifest.storepath").write_text("/nix/store/garbage\n"),
    "manifest.storepath missing": lambda m: (m / "manifest.storepath").unlink(),
    "manifest narinfo missing": lambda m: (m / "cache" / f"{(m / 'manifest.storepath').read_text()[11:43]}.narinfo"
                                           ).unlink(),
    "registry.json missing": lambda m: (m / "registry.json").unlink(),
    "bundle missing": lambda m: (m / "flake/repo.bundle").unlink(),
    "cache/log missing": lambda m: (m / "cache/log").rmdir(),
    "cache/realisations missing": lambda m: (m / "cache/realisations").rmdir(),
    "nix-cache-info missing": lambda m: (m / "cache/nix-cache-info").unlink(),
    "README.txt missing": lambda m: (m / "README.txt").unlink(),
    "registry.json flipped": lambda m: _flip(m / "registry.json"),
    "install.sh part flipped": lambda m: _flip(m / "install-disk.sh"),
    "install.sh part missing": lambda m: (m / "install-host.sh").unlink(),
    "NAR flipped": lambda m: _flip(_nar_of(_narinfos(m)[0])),
    "NAR missing": lambda m: _nar_of(_narinfos(m)[0]).unlink(),
    "narinfo missing": lambda m: _narinfos(m)[0].unlink(),
    "narinfo URL outside the cache": lambda m: _set_url(_narinfos(m)[0], "../../../../etc/passwd"),
}


def _resign(medium: Path, key_file: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """A new manifest store path signed by the media key itself (what someone holding the key,
    or a bug in mediabuilder, could write), its files as `edit` leaves them."""
    old = medium / "cache" / f"{(medium / 'manifest.storepath').read_text()[11:43]}.narinfo"
    with DirSource(medium) as source:
        info = NarInfo.parse(old.read_text())
        files = signed_manifest_files(source, info)
    edit(files)
    _nar_of(old).unlink()
    old.unlink()
    trust = medium.parent / "trust"
    trust.mkdir()
    for name, data in files.items():
        (trust / name).write_bytes(data)
    path, nar_hash, nar_size = trust_path(trust)
    export_tree(BinaryCache(medium / "cache"), trust, PathInfo(path, nar_hash, nar_size, ()),
                SecretKey.load(key_file), "zstd")
    shutil.rmtree(trust)
    (medium / "manifest.storepath").write_text(f"{path}\n")
    (medium / "manifest.json").write_bytes(files["manifest.json"])


def _add_sum(files: dict[str, bytes], line: str) -> None:
    files["sha256sums"] += f"{line}\n".encode()


def _drop_sum(files: dict[str, bytes], name: str) -> None:
    lines = files["sha256sums"].decode().splitlines(keepends=True)
    files["sha256sums"] = "".join(ln for ln in lines if not ln.endswith(f"  {name}\n")).encode()


SIGNED_DAMAGES: dict[str, Callable[[dict[str, bytes]], None]] = {
    "sums name outside the media": lambda f: _add_sum(f, f"{'0' * 64}  ../../../../etc/shadow"),
    "sums absolute name": lambda f: _add_sum(f, f"{'0' * 64}  /etc/shadow"),
    "sums malformed line": lambda f: _add_sum(f, "not a line of sha256sum"),
    "sums without registry.json": lambda f: _drop_sum(f, "registry.json"),
    "sums without an install.sh part": lambda f: _drop_sum(f, "install-upgrade.sh"),
    "key file differs from the signed key": lambda f: f.update(key=SecretKey.generate("x").public().render().encode()),
    "hosts malformed": lambda f: f.update(hosts=b"alpha\tnot-a-path\t12\n"),
    "no host": lambda f: f.update(hosts=b""),
    "store-paths without the host": lambda f: f.update({"store-paths": b"@tools\tgit\t/nix/store/x\n"}),
}


@pytest.mark.parametrize("damage", sorted(SIGNED_DAMAGES))
def test_verify_refuses_signed_manifests_install_refuses(media: Media, tmp_path: Path, damage: str) -> None:
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    _resign(medium, media.base / "cache" / "signing-key.sec", SIGNED_DAMAGES[damage])
    subject = install_error(run_install(tmp_path, medium))
    verified = mb("verify", medium, "--trusted-key", media.key)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert subject in fault_paths(verified), (subject, verified.stdout)


def test_a_part_signed_but_not_install_sh_s_is_refused_by_both(media: Media, tmp_path: Path) -> None:
    """A part other than the one install.sh carries the sha256 of, signed with the rest (a
    forger's medium, or another mediabuilder's part beside this install.sh): both refuse it."""
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    part = medium / "install-disk.sh"
    part.write_text(part.read_text() + "# another install-disk.sh\n")
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    _resign(medium, media.base / "cache" / "signing-key.sec",
            lambda f: f.update(sha256sums=re.sub(rb"(?m)^[0-9a-f]{64}(  install-disk\.sh)$",
                                                  digest.encode() + rb"\1", f["sha256sums"])))
    assert install_error(run_install(tmp_path, medium)) == "install-disk.sh"
    verified = mb("verify", medium, "--trusted-key", media.key)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert verified.stdout.splitlines() == ["install-disk.sh: is not the part this install.sh was made with (forged "
                                            "media, or made by another mediabuilder version)"]


def _set_url(narinfo: Path, url: str) -> None:
    """URL is not covered by the signature: anyone can change it."""
    narinfo.write_text(re.sub(r"^URL: .*$", f"URL: {url}", narinfo.read_text(), flags=re.M))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_refuses_what_install_refuses(media: Media, tmp_path: Path, damage: str) -> None:
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    DAMAGES[damage](medium)
    installed = run_install(tmp_path, medium)
    subject = install_error(installed)
    verified = mb("verify", medium, "--trusted-key", media.key)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    assert "Traceback" not in verified.stderr
    # The same file named: as the subject of a fault line, or (a NAR's URL) in the line of its store path.
    assert (subject.rstrip("/") in {p.rstrip("/") for p in fault_paths(verified)}
            or f" {subject.removeprefix('cache/')}" in verified.stdout), (subject, verified.stdout)


def test_verify_and_install_accept_the_intact_medium(media: Media, tmp_path: Path) -> None:
    installed = run_install(tmp_path, media.dir)
    assert installed.returncode == 0, installed.stderr
    verified = mb("verify", media.dir, "--trusted-key", media.key)
    assert (verified.returncode, verified.stdout) == (0, ""), verified.stderr


def test_verify_trusting_the_medium_still_checks_its_key_file(media: Media, tmp_path: Path) -> None:
    """Without --trusted-key verify trusts media-key.pub, as install.sh does without
    --expect-key: a key file another key replaced is still refused (the manifest's signature)."""
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    DAMAGES["key replaced"](medium)
    verified = mb("verify", medium)
    narinfo = f"cache/{(medium / 'manifest.storepath').read_text()[11:43]}.narinfo"
    assert verified.stdout.splitlines() == [
        f"{narinfo}: the manifest is not signed by media-key.pub (forged or damaged media)"]
    assert verified.returncode == 1
    DAMAGES["key not a key"](medium)
    verified = mb("verify", medium)
    assert verified.stdout.splitlines() == ["media-key.pub: not a Nix public key 'name:base64' of 32 bytes "
                                            "(damaged media)"]
    assert verified.returncode == 1


def test_an_unlisted_file_is_a_fault_install_ignores(media: Media, tmp_path: Path) -> None:
    """Deliberately stricter than install.sh: a file no signature covers is reported."""
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    (medium / "evil.sh").write_text("echo hi\n")
    assert run_install(tmp_path, medium).returncode == 0
    verified = mb("verify", medium, "--trusted-key", media.key)
    assert (verified.returncode, verified.stdout) == (1, "evil.sh: not listed in the manifest\n")


@pytest.mark.parametrize("name", ["manifest.json", "manifest.storepath"])
def test_symlinks_on_a_dir_medium_are_not_followed(media: Media, tmp_path: Path, name: str) -> None:
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    (medium / name).unlink()
    (medium / name).symlink_to("/dev/zero")
    verified = mb("verify", medium, "--trusted-key", media.key)
    assert verified.returncode == 1, verified.stderr
    assert verified.stdout.splitlines()[0] == f"{name}: missing from the media (damaged or incomplete media)"
    assert install_error(run_install(tmp_path, medium)) == name


# In place: nothing written anywhere


@pytest.mark.parametrize("fmt", ["dir", "iso", "fat", "gpt"])
def test_verify_and_inspect_write_nothing(media: Media, tmp_path: Path, fmt: str) -> None:
    target = getattr(media, fmt)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    verified = mb("verify", target, "--trusted-key", media.key, tmpdir=scratch)
    assert (verified.returncode, verified.stdout) == (0, ""), verified.stderr
    inspected = mb("inspect", target, "--json", tmpdir=scratch)
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert summary["kind"] == {"dir": "dir", "iso": "iso"}.get(fmt, "fat32")
    on_disk = sorted(p for p in media.dir.rglob("*") if p.is_file())
    assert summary["files"] == len(on_disk)  # the same tree in every format
    if fmt == "dir":
        assert summary["bytes"] == sum(p.stat().st_size for p in on_disk)
    else:  # each build has its own manifest (a few bytes either way); the images' trees are read back
        assert 0 < summary["bytes"] < target.stat().st_size  # exactly by independent readers elsewhere
    assert summary["hosts"][HOST]["nar_bytes"] == json.loads((media.dir / "manifest.json").read_text()
                                                             )["hosts"][HOST]["nar_bytes"]
    assert list(scratch.iterdir()) == []


def test_verify_an_image_on_a_tiny_tmp(media: Media, tmp_path: Path) -> None:
    """A $TMPDIR of 64 KiB, far smaller than the images: nothing goes there."""
    _needs_root()
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    script = ('set -e; mount -t tmpfs -o size=64k tiny "$1"; shift; export TMPDIR="$1"; shift; '
              '"$@"; ls -A "$TMPDIR" | wc -l')
    for image in (media.iso, media.gpt):
        proc = subprocess.run(
            ["unshare", "-m", "--", "bash", "-c", script, "_", str(tiny), str(tiny),
             sys.executable, "-m", "mediabuilder", "verify", str(image), "--trusted-key", media.key],
            env=make_nix_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert (proc.returncode, proc.stdout) == (0, "0\n"), proc.stderr


# The exit status contract


def test_exit_status_contract_is_documented() -> None:
    contract = ("Exit 0 when every check holds; 1 when the medium was read and faults were found (one line "
                "each); 2 when it is not readable as a medium at all (not an image, truncated, damaged "
                "structure) or on bad arguments (one error: line).")
    help_text = run_cli("verify", "--help").stdout
    assert contract in " ".join(help_text.split())
    assert contract.replace("error:", "`error:`") in " ".join((REPO / "README.md").read_text().split())


def test_not_a_medium_is_exit_2(media: Media, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(100_000))
    for command in ("verify", "inspect"):
        assert_one_line_error(mb(command, junk), f"{junk}: not a directory, ISO 9660 or FAT32 image")
        assert_one_line_error(mb(command, tmp_path / "nope"), f"{tmp_path / 'nope'}: no such file or directory")
    assert_one_line_error(mb("verify", media.dir, "--trusted-key", "nope"), "--trusted-key nope: neither a key")


def test_inspect_refuses_absurd_sizes(media: Media, tmp_path: Path) -> None:
    medium = tmp_path / "medium"
    shutil.copytree(media.dir, medium, symlinks=True)
    manifest = json.loads((medium / "manifest.json").read_text())
    manifest["hosts"][HOST]["nar_bytes"] = -5
    (medium / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(mb("inspect", medium), f"{medium}: manifest.json: hosts.{HOST}: not a toplevel")


# Truncated and damaged images: exit 2, one line naming the image


def _cut(source: Path, dest: Path, size: int) -> Path:
    with source.open("rb") as f, dest.open("wb") as out:
        out.write(f.read(size))
    return dest


def _judged(image: Path, key: str, *needles: str) -> None:
    for command in (("verify", image, "--trusted-key", key), ("inspect", image)):
        line = assert_one_line_error(mb(*command), str(image), *needles)
        assert line.startswith(f"error: {image}: "), line


@pytest.mark.parametrize("where", ["1000", "40000", "half", "last-block"])
def test_truncated_iso(media: Media, tmp_path: Path, where: str) -> None:
    size = media.iso.stat().st_size
    cut = {"1000": 1000, "40000": 40000, "half": size // 2, "last-block": size - 2048}[where]
    image = _cut(media.iso, tmp_path / "cut.iso", cut)
    needle = "not a directory, ISO 9660 or FAT32 image" if cut < 32774 else (
        f"truncated ISO 9660 image: {cut} bytes, its volume descriptor says {size}")
    _judged(image, media.key, needle)


@pytest.mark.parametrize("fmt", ["fat", "gpt"])
@pytest.mark.parametrize("where", ["300", "40000", "half", "last-sector"])
def test_truncated_fat32(media: Media, tmp_path: Path, fmt: str, where: str) -> None:
    source = getattr(media, fmt)
    size = source.stat().st_size
    cut = {"300": 300, "40000": 40000, "half": size // 2, "last-sector": size - 512}[where]
    image = _cut(source, tmp_path / "cut.img", cut)
    if cut < 512 or (fmt == "gpt" and cut < 1024):
        needle = "not a directory, ISO 9660 or FAT32 image"
    elif fmt == "gpt":
        needle = "truncated image: its backup GPT header"
    else:
        needle = f"truncated FAT32 image: {cut} bytes, its boot sector says the filesystem ends at byte {size}"
    _judged(image, media.key, needle)


def _fat_layout(image: Path) -> tuple[int, int, int, int, int]:
    """(filesystem offset, FAT offset, FAT bytes, number of FATs, first data byte) of a FAT32 image."""
    data = image.read_bytes()[:1 << 20]
    offset = 0
    if data[512:520] == b"EFI PART":
        entries = struct.unpack_from("<Q", data, 512 + 72)[0] * 512
        offset = struct.unpack_from("<Q", data, entries + 32)[0] * 512
    bps, spc, reserved, fats = struct.unpack_from("<HBHB", data, offset + 11)
    fat_sectors = struct.unpack_from("<I", data, offset + 36)[0]
    del spc
    return offset, offset + reserved * bps, fat_sectors * bps, fats, offset + (reserved + fats * fat_sectors) * bps


def _set_fat(f: object, layout: tuple[int, int, int, int, int], cluster: int, value: int) -> None:
    _, fat, fat_bytes, fats, _ = layout
    for copy in range(fats):
        f.seek(fat + copy * fat_bytes + 4 * cluster)  # type: ignore[attr-defined]
        f.write(struct.pack("<I", value))  # type: ignore[attr-defined]


def _root_entry(image: Path, short: bytes) -> int:
    """Where the root directory's short entry `short` (11 bytes) is in the image."""
    data = image.read_bytes()
    start = _fat_layout(image)[4]  # the root directory is the first cluster our writer fills
    at = data.find(short, start, start + (1 << 16))
    assert at >= 0 and (at - start) % 32 == 0, short
    return at


def _root_long_name(image: Path, first_chars: str) -> int:
    """Where the long-name entry holding the first 5 characters `first_chars` starts."""
    data = image.read_bytes()
    start = _fat_layout(image)[4]
    at = data.find(first_chars.encode("utf-16-le"), start, start + (1 << 16))
    assert at >= 0 and (at - 1 - start) % 32 == 0, first_chars
    return at - 1


def _patch(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _craft_fat(image: Path, how: str) -> str:
    """Damage the copy of a bare FAT32 image; returns what the refusal must say."""
    layout = _fat_layout(image)
    if how == "boot sector zeroed":
        _patch(image, layout[0], bytes(512))
        return "not a directory, ISO 9660 or FAT32 image"
    if how == "FAT zeroed":
        with image.open("r+b") as f:
            for copy in range(layout[3]):
                f.seek(layout[1] + copy * layout[2])
                f.write(bytes(layout[2]))
        return "damaged FAT32 image: the cluster chain of directory / points at cluster 0x0"
    if how == "root directory zeroed":
        fat = image.read_bytes()[layout[1] : layout[1] + layout[2]]
        entries = struct.unpack(f"<{len(fat) // 4}I", fat)
        root = 1
        while entries[1 + root] & 0x0FFFFFFF == 2 + root:  # our writer: the root's clusters are 2, 3, ...
            root += 1
        in_use = sum(1 for e in entries[2:] if e & 0x0FFFFFFF)
        _patch(image, layout[4], bytes(32))  # its first entry: the directory now ends there
        return f"damaged FAT32 image: {in_use - root} clusters in use belong to no file or directory"
    if how == "second FAT differs":
        with image.open("r+b") as f:
            f.seek(layout[1] + layout[2] + 4 * 5)
            value = struct.unpack("<I", f.read(4))[0]
            f.seek(-4, 1)
            f.write(struct.pack("<I", value ^ 1))
        return "damaged FAT32 image: FAT copy 2 differs from the first"
    if how == "backup boot sector differs":
        _patch(image, layout[0] + 6 * 512 + 3, b"X")
        return "damaged FAT32 image: the backup boot sector (sector 6) differs from the boot sector"
    if how == "root chain loops":
        with image.open("r+b") as f:
            _set_fat(f, layout, 2, 2)
        return "damaged FAT32 image: the cluster chain of directory / loops or shares cluster 2 with another file"
    entry = _root_entry(image, b"FLAKE      ")
    if how == "directory points at the root":
        _patch(image, entry + 20, struct.pack("<H", 0))
        _patch(image, entry + 26, struct.pack("<H", 2))
        return "damaged FAT32 image: the cluster chain of directory /flake loops or shares cluster 2 with another file"
    if how == "duplicate name":
        _patch(image, _root_entry(image, b"CACHE      "), b"FLAKE      ")
        return "/: the name 'flake' is in the directory twice"
    long_entry = _root_long_name(image, "regis")
    short_entry = long_entry + 32  # 'registry.json' is 13 characters: one long-name entry
    if how == "slash in a long name":
        _patch(image, long_entry + 1 + 2 * 2, "/".encode("utf-16-le"))
        return "/: invalid file name 're/istry.json'"
    if how == "control character in a long name":
        _patch(image, long_entry + 1 + 2 * 2, "\x01".encode("utf-16-le"))
        return "/: invalid file name 're\\x01istry.json'"
    if how == "dot-dot long name":
        _patch(image, long_entry + 1, "..".encode("utf-16-le") + bytes(2))
        return "/: invalid file name '..'"
    size, = struct.unpack_from("<I", image.read_bytes(), short_entry + 28)
    if how == "size past the image":
        _patch(image, short_entry + 28, struct.pack("<I", 0xFFFFFFFF))
        return "damaged FAT32 image: the cluster chain of registry.json ends before its 4294967295 bytes"
    if how == "4 GiB chained to itself":  # once: 4 GiB written per such entry
        cluster = struct.unpack_from("<H", image.read_bytes(), short_entry + 26)[0]
        with image.open("r+b") as f:
            _set_fat(f, layout, cluster, cluster)
        _patch(image, short_entry + 28, struct.pack("<I", 0xFFFFFFFF))
        return f"damaged FAT32 image: the cluster chain of registry.json loops or shares cluster {cluster} with another"
    if how == "chain longer than the size":
        _patch(image, short_entry + 28, struct.pack("<I", 1))
        return "damaged FAT32 image: the cluster chain of registry.json is longer than its size allows"
    if how == "shared clusters":
        cluster = struct.unpack_from("<H", image.read_bytes(), short_entry + 26)[0]
        readme = _root_entry(image, b"README  TXT")
        _patch(image, readme + 20, struct.pack("<H", 0))
        _patch(image, readme + 26, struct.pack("<H", cluster))
        _patch(image, readme + 28, struct.pack("<I", size))  # README.txt claims registry.json's data
        return f"loops or shares cluster {cluster} with another file"
    raise AssertionError(how)


FAT_CRAFTS = ["boot sector zeroed", "FAT zeroed", "second FAT differs", "backup boot sector differs",
              "root directory zeroed", "root chain loops", "directory points at the root", "duplicate name",
              "slash in a long name", "control character in a long name", "dot-dot long name",
              "size past the image", "4 GiB chained to itself", "chain longer than the size", "shared clusters"]


@pytest.mark.parametrize("how", FAT_CRAFTS)
def test_crafted_fat32(media: Media, tmp_path: Path, how: str) -> None:
    image = tmp_path / "crafted.img"
    shutil.copyfile(media.fat, image)
    needle = _craft_fat(image, how)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for command in (("verify", image, "--trusted-key", media.key), ("inspect", image)):
        assert_one_line_error(mb(*command, tmpdir=scratch), f"error: {image}: ", needle)
    assert list(scratch.iterdir()) == []


def _craft_iso(image: Path, how: str) -> str:
    data = image.read_bytes()
    if how == "volume descriptor zeroed":
        _patch(image, 16 * 2048, bytes(2048))
        return "not a directory, ISO 9660 or FAT32 image"
    nm = b"NM\x12\x01\x00registry.json"  # Rock Ridge's name entry: NM, length, version, flags, name
    at = data.find(nm)
    assert at > 0 and data.find(nm, at + 1) < 0
    name_at = at + 5
    if how == "slash in a Rock Ridge name":
        _patch(image, name_at + 2, b"/")
        return "/: invalid file name 're/istry.json'"
    if how == "NUL in a Rock Ridge name":
        _patch(image, name_at + 2, b"\0")
        return "/: invalid file name 're\\x00istry.json'"
    if how == "Rock Ridge name flagged '..'":
        _patch(image, at + 4, b"\x04")  # NM's PARENT flag: Linux then calls the file '..'
        return "/: invalid file name '..'"
    if how == "duplicate Rock Ridge name":
        names = re.findall(rb"NM\x2d\x01\x00([0-9a-df-np-sv-z]{32}\.narinfo)", data)
        _patch(image, data.find(b"NM\x2d\x01\x00" + names[0]) + 5, names[1])
        return f"cache: the name '{names[1].decode()}' is in the directory twice"
    registry, flake = _iso_record(data, b"REGISTRY.JSON;1"), _iso_record(data, b"FLAKE")
    joliet = _iso_record(data, "registry.json".encode("utf-16-be"))
    if how == "Rock Ridge name differs from Joliet":
        _patch(image, name_at + 7, b"z")  # Linux reads registrz.json, Windows registry.json
        return "registrz.json: damaged ISO 9660 image: Rock Ridge and Joliet disagree (Joliet: no such file)"
    if how == "Joliet name differs from Rock Ridge":
        _patch(image, joliet + 33 + 2 * 7, "z".encode("utf-16-be"))
        return "registry.json: damaged ISO 9660 image: Rock Ridge and Joliet disagree (Joliet: no such file)"
    if how == "Joliet data differs from Rock Ridge":
        manifest = _iso_record(data, "manifest.json".encode("utf-16-be"))
        _patch(image, joliet + 2, data[manifest + 2 : manifest + 18])  # Windows reads manifest.json's bytes
        return "registry.json: damaged ISO 9660 image: Rock Ridge and Joliet disagree (Joliet: other data)"
    if how == "Joliet size differs from Rock Ridge":
        _patch(image, joliet + 10, struct.pack("<I", 1) + struct.pack(">I", 1))
        return "registry.json: damaged ISO 9660 image: Rock Ridge and Joliet disagree (Joliet: other data)"
    if how == "big-endian size differs":  # pycdlib reads the little-endian one, 7z refuses the image
        _patch(image, joliet + 14, struct.pack(">I", 1))
        return f"/ (Joliet): damaged ISO 9660 image: a directory record at byte {joliet} is inconsistent"
    if how == "reserved bytes of the volume descriptor":  # libarchive then ignores the descriptor
        _patch(image, 16 * 2048 + 1661, b"\x01")
        return "the primary volume descriptor (block 16) is invalid: bytes 1395-2047"
    if how == "extended attribute record":  # ECMA-119 readers start the data after it, pycdlib does not
        _patch(image, registry + 1, b"\x01")
        return "a record with an extended attribute record (readers place its data differently)"
    if how == "ISO 9660 name twice":
        _patch(image, registry + 33, b"MANIFEST.JSON;1")  # a reader without Rock Ridge sees one manifest.json
        return "damaged ISO 9660 image: Failed adding duplicate name to parent"  # pycdlib's own check
    if how == "Rock Ridge name missing":
        _patch(image, at, b"XX")  # the NM entry becomes an unknown one: the record has only its ISO 9660 name
        return "damaged ISO 9660 image: Unknown SUSP record"  # pycdlib's own check
    if how == "directory points at the root":
        root = struct.unpack_from("<I", data, 156 + 2 + 16 * 2048)[0]  # the PVD's root directory record
        _patch(image, flake + 2, struct.pack("<I", root) + struct.pack(">I", root))
        return "damaged ISO 9660 image: ISO Directory Records form a loop"
    if how == "size past the image":
        _patch(image, registry + 10, struct.pack("<I", 0xFFFFF000) + struct.pack(">I", 0xFFFFF000))
        return "damaged ISO 9660 image: registry.json and "  # pycdlib cuts it at the image's end: onto others
    if how == "shared data":
        manifest = _iso_record(data, b"MANIFEST.JSON;1")
        _patch(image, registry + 2, data[manifest + 2 : manifest + 18])  # extent and length, both byte orders
        return "damaged ISO 9660 image: manifest.json and registry.json share their data"
    raise AssertionError(how)


def _iso_record(data: bytes, ident: bytes) -> int:
    """Where the ISO 9660 directory record with this identifier starts (in the root directory)."""
    at = data.find(bytes([len(ident)]) + ident)
    assert at > 0 and data.find(bytes([len(ident)]) + ident, at + 1) < 0, ident
    return at - 32


ISO_CRAFTS = ["volume descriptor zeroed", "slash in a Rock Ridge name", "NUL in a Rock Ridge name",
              "Rock Ridge name flagged '..'", "duplicate Rock Ridge name", "directory points at the root",
              "size past the image", "shared data", "Rock Ridge name differs from Joliet",
              "Joliet name differs from Rock Ridge", "Joliet data differs from Rock Ridge",
              "Joliet size differs from Rock Ridge", "ISO 9660 name twice", "Rock Ridge name missing",
              "big-endian size differs", "reserved bytes of the volume descriptor", "extended attribute record"]


@pytest.mark.parametrize("how", ISO_CRAFTS)
def test_crafted_iso(media: Media, tmp_path: Path, how: str) -> None:
    image = tmp_path / "crafted.iso"
    shutil.copyfile(media.iso, image)
    needle = _craft_iso(image, how)
    for command in (("verify", image, "--trusted-key", media.key), ("inspect", image)):
        assert_one_line_error(mb(*command), f"error: {image}: ", needle)


# Split NARs in a cache: joined in place, parts contiguous


def test_split_nar_read_joined_and_gaps_refused(media: Media, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(media.base / "cache", cache, symlinks=True)
    narinfo = next(p for p in sorted(cache.glob("*.narinfo")) if _nar_of(p).stat().st_size > 1000)
    nar = _nar_of(narinfo)
    data = nar.read_bytes()
    nar.unlink()
    for i, piece in enumerate((data[:1000], data[1000:])):
        nar.with_name(f"{nar.name}.part{i:03d}").write_bytes(piece)
    verified = mb("verify", cache)
    assert (verified.returncode, verified.stdout) == (0, ""), verified.stderr
    nar.with_name(f"{nar.name}.part001").rename(nar.with_name(f"{nar.name}.part002"))
    verified = mb("verify", cache)
    store_path = re.search(r"^StorePath: (.+)$", narinfo.read_text(), re.M)
    assert store_path is not None
    url = nar.relative_to(cache).as_posix()
    assert verified.stdout.splitlines() == [
        f"{store_path.group(1)}: cannot read {url}: {url}: split parts 000, 002 do not run from 000 without a gap"]
    assert verified.returncode == 1


@pytest.mark.parametrize(("kind", "claim"), [("input-addressed", 1 << 40), ("content-addressed", 1 << 40),
                                           ("content-addressed", 1 << 30)])
def test_an_unsigned_decompression_bomb_is_not_unpacked(media: Media, tmp_path: Path, kind: str, claim: int) -> None:
    """1 GiB of zeros in 32 KiB of zstd, behind a narinfo whose NarSize claims a TiB (or the
    truth): the signature no longer holds, and nothing unsigned is unpacked. An input-addressed
    path is refused for its signature; a content-addressed one, which could be trusted by its
    content, for expanding more than any NAR does (the two kinds were once picked by chance)."""
    import zstandard

    cache = tmp_path / "cache"
    shutil.copytree(media.base / "cache", cache, symlinks=True)
    narinfos = [n for n in sorted(cache.glob("*.narinfo"))
                if bool(re.search(r"^CA: ", n.read_text(), re.M)) == (kind == "content-addressed")]
    assert narinfos, f"the example medium has no {kind} path"
    narinfo = narinfos[0]
    nar = _nar_of(narinfo)
    with nar.open("wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
        for _ in range(1024):
            z.write(bytes(1 << 20))
    size = nar.stat().st_size
    text = re.sub(r"^NarSize: .*$", f"NarSize: {claim}", narinfo.read_text(), flags=re.M)
    text = re.sub(r"^(FileHash|FileSize): .*\n", "", text, flags=re.M)
    narinfo.write_text(text)
    verified = mb("verify", cache)
    store_path = re.search(r"^StorePath: (.+)$", text, re.M)
    assert store_path is not None
    lines = verified.stdout.splitlines()
    if kind == "input-addressed":
        assert len(lines) == 1 and lines[0].startswith(f"{store_path.group(1)}: no valid signature by a trusted key "
                                                       "(signed by "), lines
    else:
        assert lines == [f"{store_path.group(1)}: unsigned, and its NarSize ({claim} bytes) is more than 1024 times "
                         f"its {size}-byte file: not unpacked (a decompression bomb)"], verified
    assert verified.returncode == 1
