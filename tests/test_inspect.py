"""`mediabuilder inspect`: what a medium holds, its install record (each host's disk layout, the
unattended host and disk) and its offline-rebuild level among it, taken from the manifest signed
by the medium's key, never from a copy anyone can edit. Media built by the real CLI from the
example flake, with and without `--unattended` and `--rebuild`, read back in a directory and in
an ISO image."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Example, assert_one_line_error, run_cli

from mediabuilder.ui import human_bytes

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Media:
    plain: Path  # alpha and beta, no options
    unattended: Path  # alpha, --unattended alpha --install-disk /dev/vda --rebuild config
    unattended_iso: Path  # the same as an ISO image


@pytest.fixture(scope="module")
def media(example: Example, tmp_path_factory: pytest.TempPathFactory) -> Media:
    base = tmp_path_factory.mktemp("inspect")
    cache = ("--cache", base / "cache")
    built = Media(base / "plain", base / "unattended", base / "unattended.iso")
    proc = run_cli("build", "--flake", f"{example.flake}#alpha", "--flake", f"{example.flake}#beta", *cache,
                   "--output", built.plain)
    assert proc.returncode == 0, proc.stderr
    for out, fmt in ((built.unattended, "dir"), (built.unattended_iso, "iso")):
        proc = run_cli("build", "--flake", f"{example.flake}#alpha", *cache, "--output", out, "--format", fmt,
                       "--unattended", "alpha", "--install-disk", "/dev/vda", "--rebuild", "config")
        assert proc.returncode == 0, proc.stderr
    return built


def expected_head(medium: Path, target: Path, kind: str, example: Example) -> list[str]:
    """The lines inspect prints before its own new ones, from the medium's manifest.json."""
    manifest = json.loads((medium / "manifest.json").read_text())
    lines = [f"{target}: {kind}, made {manifest['created']} by mediabuilder {manifest['mediabuilder']} "
             f"(nix {manifest['nix']})",
             f"key: {manifest['key']['name']} ({manifest['key']['fingerprint']})"]
    for host, entry in sorted(manifest["hosts"].items()):
        assert entry["toplevel"] == example.toplevels[host]
        lines.append(f"host {host}: {entry['toplevel']} ({entry['paths']} paths, "
                     f"{human_bytes(entry['nar_bytes'])} of NAR)")
    flake = manifest["flake"]
    lines.append(f"flake: {flake['branch']} at {flake['rev'][:12]}")
    return lines


def files_line(medium: Path) -> str:
    """The last line up to its free space (which other work on this disk changes)."""
    files = [p for p in medium.rglob("*") if p.is_file()]
    return f"files: {len(files)}, {human_bytes(sum(p.stat().st_size for p in files))}; free: "


def test_medium_without_install_options(media: Media, example: Example) -> None:
    proc = run_cli("inspect", media.plain)
    assert proc.returncode == 0, proc.stderr
    *lines, last = proc.stdout.splitlines()
    assert lines == [*expected_head(media.plain, media.plain, "dir", example),
                     "rebuild: none (the systems only)",
                     "layout alpha: uefi",
                     "layout beta: uefi",
                     "unattended: no"]
    assert last.startswith(files_line(media.plain)), last
    summary = json.loads(run_cli("inspect", media.plain, "--json").stdout)
    assert summary["rebuild"] == "none"
    assert summary["install"] == {"unattended": None, "disk": None, "layout": None,
                                  "hosts": {"alpha": {"layout": "uefi", "disko": None},
                                            "beta": {"layout": "uefi", "disko": None}}}


@pytest.mark.parametrize("fmt", ["dir", "iso"])
def test_medium_with_unattended_install_and_rebuild(media: Media, example: Example, fmt: str) -> None:
    target = media.unattended if fmt == "dir" else media.unattended_iso
    proc = run_cli("inspect", target)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The ISO's manifest differs from the directory's in its files' entries only (not shown here).
    assert lines[:-1] == [*expected_head(media.unattended, target, fmt, example),
                          "rebuild: config (what configuration-only changes need)",
                          "layout alpha: uefi",
                          "unattended: alpha onto /dev/vda (layout uefi): the disk is erased without a question"]
    if fmt == "dir":
        assert lines[-1].startswith(files_line(media.unattended)), lines[-1]
    summary = json.loads(run_cli("inspect", target, "--json").stdout)
    assert summary["rebuild"] == "config"
    # Read from the signed `install` file, as install.sh reads it: the same as manifest.json's field.
    assert summary["install"] == json.loads((media.unattended / "manifest.json").read_text())["install"] == {
        "unattended": "alpha", "disk": "/dev/vda", "layout": "uefi", "hosts": {"alpha": {"layout": "uefi",
                                                                                          "disko": None}}}


def test_edited_install_record_refused(media: Media, tmp_path: Path) -> None:
    """manifest.json on the medium is a copy: one whose disk was edited is not shown as the record."""
    medium = tmp_path / "medium"
    shutil.copytree(media.unattended, medium, symlinks=True)
    text = (medium / "manifest.json").read_text()
    assert text.count('"disk": "/dev/vda"') == 1
    (medium / "manifest.json").write_text(text.replace('"disk": "/dev/vda"', '"disk": "/dev/sdb"'))
    storepath = (medium / "manifest.storepath").read_text().strip()
    proc = run_cli("inspect", medium)
    assert_one_line_error(proc, f"error: {medium}: manifest.json: differs from the signed copy in {storepath} "
                          "(edited by hand or damaged)")
    assert proc.stderr.splitlines()[-1] == f"hint: run `mediabuilder verify {medium}` for every fault"


def test_no_signed_manifest_refused(media: Media, tmp_path: Path) -> None:
    medium = tmp_path / "medium"
    shutil.copytree(media.plain, medium, symlinks=True)
    (medium / "manifest.storepath").unlink()
    assert_one_line_error(run_cli("inspect", medium), f"error: {medium}: manifest.storepath: missing from the "
                          "media (damaged or incomplete media)")


# The signed record itself is input like any other (a medium signed by its own, unknown key)

MANIFEST = b'{\n  "hosts": {},\n  "rebuild": "config",\n  "version": 1\n}\n'


@pytest.mark.parametrize(("files", "message"), [
    ({"manifest.json": b'{\n  "rebuild": "fast"\n}\n'},
     "manifest.json: rebuild 'fast' is not one of none, config, full"),
    ({"manifest.json": MANIFEST.replace(b'"version"', b'"rebuild": "full",\n  "version"')},
     "manifest.json: rebuild given more than once (config, full)"),  # JSON takes the last, install.sh both
    ({"manifest.json": MANIFEST, "install": b"unattended\talpha\ndisk\t/dev/vda$(reboot)\nhost\talpha\tuefi\n"},
     "install: line 'disk\\t/dev/vda$(reboot)' is not an install record's"),
    ({"manifest.json": MANIFEST, "install": b"host\talpha\tzfs\n"}, "install: line 'host\\talpha\\tzfs' is not"),
    ({"manifest.json": MANIFEST, "install": b"unattended\tbeta\ndisk\t/dev/vda\nhost\talpha\tuefi\n"},
     "install: the unattended host 'beta' and disk '/dev/vda' are not one of its hosts and a disk"),
    ({"manifest.json": MANIFEST, "install": b"unattended\talpha\nhost\talpha\tuefi\n"},
     "install: the unattended host 'alpha' and disk None are not"),
])
def test_signed_settings_refused(files: dict[str, bytes], message: str) -> None:
    from mediabuilder.cli import _signed_settings
    from mediabuilder.errors import InvalidMedia

    with pytest.raises(InvalidMedia) as e:
        _signed_settings(Path("/m"), files)
    assert str(e.value).startswith(f"/m: the signed manifest: {message}"), str(e.value)
