"""Archive-grade media: the same flake revision, key and options give the same bytes in every
format, whoever builds them, wherever, whenever; `verify --against` names the first difference."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pycdlib
import pytest
from conftest import Example, assert_one_line_error, make_nix_env, run_cli

from mediabuilder.store.keys import SecretKey

pytestmark = pytest.mark.integration

HOST = "alpha"
FORMATS = {
    "dir": ("dir", ()),
    "iso": ("m.iso", ("--format", "iso")),
    "fat32": ("m.img", ("--format", "fat32")),
    "fat32-mbr": ("mbr.img", ("--format", "fat32", "--partition-table", "mbr")),
    "fat32-gpt": ("gpt.img", ("--format", "fat32", "--partition-table", "gpt")),
}
EPOCH = 1700000000  # 2023-11-14T22:13:20Z


def build_all(example: Example, where: Path, key: Path, tz: str, extra_env: dict[str, str] | None = None,
              formats: tuple[str, ...] = tuple(FORMATS)) -> dict[str, Path]:
    """Every format, into `where`, with its own cache and working directory there."""
    where.mkdir(parents=True)
    env = make_nix_env({"TZ": tz, **(extra_env or {})})
    outputs = {}
    for name in formats:
        out, args = FORMATS[name]
        proc = run_cli("build", "-q", "--flake", f"{example.flake}#{HOST}", "--cache", "cache", "--key", key,
                       "-o", out, *args, env=env, cwd=where)
        assert proc.returncode == 0, proc.stderr
        outputs[name] = where / out
    return outputs


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "site.sec"
    path.write_text(SecretKey.generate("site-1").render() + "\n")
    return path


@pytest.fixture(scope="module")
def twice(example: Example, key: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], ...]:
    """Two builds of every format: other directories, other caches, other time zones, a second apart."""
    base = tmp_path_factory.mktemp("reproducible")
    first = build_all(example, base / "one", key, "UTC")
    time.sleep(1.1)
    second = build_all(example, base / "elsewhere" / "two", key, "IST-5:30")
    return first, second


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_two_builds_give_the_same_bytes(twice: tuple[dict[str, Path], ...], fmt: str) -> None:
    first, second = (outputs[fmt] for outputs in twice)
    if fmt == "dir":
        a, b = tree_bytes(first), tree_bytes(second)
        assert sorted(a) == sorted(b)
        assert [k for k in a if a[k] != b[k]] == []
    else:
        assert first.stat().st_size == second.stat().st_size
        assert first.read_bytes() == second.read_bytes()
    same = run_cli("verify", first, "--against", second)
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"{first}: the same as {second}, " in same.stderr


def test_the_date_is_the_flake_commit_time(example: Example, twice: tuple[dict[str, Path], ...]) -> None:
    committed = int(subprocess.run(["git", "-C", example.flake, "log", "-1", "--format=%ct"], capture_output=True,
                                   text=True, check=True).stdout)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(committed))
    first = twice[0]
    assert json.loads((first["dir"] / "manifest.json").read_text())["created"] == stamp
    iso = pycdlib.PyCdlib()
    iso.open(str(first["iso"]))
    try:
        pvd = iso.pvd
        assert pvd.volume_creation_date.date_str[:14].decode() == time.strftime("%Y%m%d%H%M%S", time.gmtime(committed))
        assert pvd.volume_creation_date.gmtoffset == 0
        record = iso.get_record(rr_path="/README.txt")
        date = record.date
        assert (date.years_since_1900 + 1900, date.month, date.day_of_month, date.hour, date.minute,
                date.second, date.gmtoffset) == (*time.gmtime(committed)[:6], 0)
    finally:
        iso.close()
    # mtools, an independent reader, shows FAT's entry times as they are stored (UTC).
    listing = subprocess.run(["mdir", "-i", first["fat32"], "::/README.txt"], capture_output=True, text=True,
                             check=True, env={"PATH": "/usr/bin:/bin", "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}).stdout
    day = time.strftime("%Y-%m-%d", time.gmtime(committed))
    clock = time.strftime("%H:%M", time.gmtime(committed))
    assert any(day in line and clock in line for line in listing.splitlines() if "README" in line), listing


def test_source_date_epoch_sets_the_date(example: Example, key: Path, tmp_path: Path) -> None:
    env = {"SOURCE_DATE_EPOCH": str(EPOCH)}
    first = build_all(example, tmp_path / "a", key, "UTC", env, ("dir", "iso", "fat32-gpt"))
    second = build_all(example, tmp_path / "b", key, "EST+5", env, ("dir", "iso", "fat32-gpt"))
    assert json.loads((first["dir"] / "manifest.json").read_text())["created"] == "2023-11-14T22:13:20Z"
    assert tree_bytes(first["dir"]) == tree_bytes(second["dir"])
    for fmt in ("iso", "fat32-gpt"):
        assert first[fmt].read_bytes() == second[fmt].read_bytes(), fmt
    # xorriso, an independent reader, shows the volume's dates (written in UTC, offset 0).
    info = subprocess.run(["xorriso", "-indev", first["iso"], "-pvd_info"], capture_output=True, text=True,
                          check=True).stdout
    assert "Creation Time: 2023111422132000" in info and "Modif. Time  : 2023111422132000" in info, info


def test_identifiers_follow_the_content(twice: tuple[dict[str, Path], ...], example: Example, key: Path,
                                        tmp_path: Path) -> None:
    """The GPT disk and partition GUIDs and the MBR disk identifier are the same for the same
    medium and differ for another (here: another label)."""
    def ids(image: Path) -> tuple[str, ...]:
        table = json.loads(subprocess.run(["sfdisk", "--json", image], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]
        return (table["id"], *(p.get("uuid", "") for p in table["partitions"]))

    first, second = twice
    assert ids(first["fat32-gpt"]) == ids(second["fat32-gpt"])
    assert ids(first["fat32-mbr"]) == ids(second["fat32-mbr"])
    FORMATS["gpt-other"] = ("other.img", ("--format", "fat32", "--partition-table", "gpt", "--label", "OTHER"))
    try:
        other = build_all(example, tmp_path / "other", key, "UTC", formats=("gpt-other",))["gpt-other"]
    finally:
        del FORMATS["gpt-other"]
    a, b = ids(first["fat32-gpt"]), ids(other)
    assert len(a) == len(b) == 2 and a[0] != b[0] and a[1] != b[1], (a, b)
    assert len(set(a + b)) == 4


def test_verify_against_names_the_first_difference(twice: tuple[dict[str, Path], ...], tmp_path: Path) -> None:
    first = twice[0]
    # A changed file in a directory medium: named by its path (and verify's own fault too).
    changed = tmp_path / "changed"
    shutil.copytree(first["dir"], changed, symlinks=True)
    readme = changed / "README.txt"
    data = bytearray(readme.read_bytes())
    data[100] ^= 0x20
    readme.write_bytes(bytes(data))
    proc = run_cli("verify", first["dir"], "--against", changed)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{first['dir']} differs from {changed}: README.txt: differs from byte 100 on"]
    # A file only in one of them.
    (changed / "extra.txt").write_text("x")
    proc = run_cli("verify", first["dir"], "--against", changed)
    assert proc.stdout.splitlines()[-1] == f"{first['dir']} differs from {changed}: extra.txt: only in {changed}"
    # Two FAT32 images with the same files and another volume serial (offset 67 of the boot
    # sector and of its backup, sector 6).
    serial = tmp_path / "serial.img"
    shutil.copyfile(first["fat32"], serial)
    with serial.open("r+b") as f:
        for at in (67, 6 * 512 + 67):
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 1]))
    proc = run_cli("verify", first["fat32"], "--against", serial)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"{first['fat32']} differs from {serial}: the images hold the same files, but differ from byte 67 on "
        "(the fat32 structure: dates, serials or layout)"]
    # A directory and an image of the same medium: the same files.
    proc = run_cli("verify", first["dir"], "--against", first["iso"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"the same as {first['iso']}, file for file" in proc.stderr


def test_a_bad_source_date_epoch_is_refused(example: Example, tmp_path: Path) -> None:
    for value in ("yesterday", "12", "99999999999"):
        proc = run_cli("build", "--flake", f"{example.flake}#{HOST}", "--cache", tmp_path / "cache", "-o",
                       tmp_path / "out", env=make_nix_env({"SOURCE_DATE_EPOCH": value}))
        assert_one_line_error(proc, f"SOURCE_DATE_EPOCH={value!r}", "1980 to 2099")
        assert not (tmp_path / "out").exists()
