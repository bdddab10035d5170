"""The output's lifecycle (mediabuilder/media/output.py) at the level of single calls: the order in
which a medium appears, which temporaries a later run may delete, renames that never clobber,
and the split limit taken from the output's own filesystem. The builds themselves are walked in
test_user_walks.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mediabuilder.build import BuildRequest, Target, split_limit
from mediabuilder.errors import InvalidInput
from mediabuilder.media import fsinfo, output, split
from mediabuilder.profile import CacheSettings, MediaSettings


def test_markers_move_in_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader takes for a medium (install.sh, the manifest) appears only after the rest."""
    tree, out = tmp_path / "tree", tmp_path / "out"
    out.mkdir()
    for name in ("cache", "flake"):
        (tree / name).mkdir(parents=True)
    for name in ("install.sh", "manifest.json", "manifest.storepath", "registry.json", "media-key.pub"):
        (tree / name).write_text(name)
    seen: list[str] = []
    real_rename = os.rename

    def spy(src: str | Path, dst: str | Path) -> None:
        seen.append(Path(dst).name)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    output.move_in(tree, out)
    monkeypatch.undo()
    assert seen == ["cache", "flake", "media-key.pub", "registry.json", "manifest.storepath", "manifest.json",
                    "install.sh"]
    assert sorted(os.listdir(out)) == sorted(seen)


def test_a_live_builds_temporaries_are_not_deleted(tmp_path: Path) -> None:
    """Cleaning up after a killed run must not take the files of one that is still running."""
    with output.temporary(tmp_path, ".media.iso.tmp-", directory=False) as live:
        dead = tmp_path / ".media.iso.tmp-dead0_k1"
        dead.write_text("left by a killed run\n")
        (tmp_path / ".media.iso.tmp-deaddir1" / "sub").mkdir(parents=True)
        (tmp_path / "media.iso.tmp-not-ours").write_text("the user's\n")
        (tmp_path / ".media.iso.tmp-my-notes").write_text("the user's, named like ours but not ours\n")
        os.symlink("/etc", tmp_path / ".media.iso.tmp-symlink1")
        assert output.remove_stale(tmp_path, ".media.iso.tmp-") == 2
        assert live.exists() and not dead.exists()
    assert sorted(os.listdir(tmp_path)) == [".media.iso.tmp-my-notes", ".media.iso.tmp-symlink1",
                                            "media.iso.tmp-not-ours"]


def test_place_never_replaces_what_appeared_meanwhile(tmp_path: Path) -> None:
    for directory in (False, True):
        src, dst = tmp_path / f"src{directory}", tmp_path / f"dst{directory}"
        if directory:
            src.mkdir()
            dst.mkdir()  # even an empty directory: another build's output
        else:
            src.write_text("new\n")
            dst.write_text("someone else's\n")
        with pytest.raises(InvalidInput, match="appeared while this build was running"):
            output.place(src, dst, replace=False)
        assert src.exists()
    output.place(tmp_path / "srcFalse", tmp_path / "dstFalse", replace=True)
    assert (tmp_path / "dstFalse").read_text() == "new\n"


def test_split_limit_comes_from_the_outputs_own_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAT32 stick mounted at the output itself (not at its parent) splits at FAT32's limit."""
    stick = tmp_path / "stick"
    stick.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 1 0:30 / / rw - ext4 /dev/vda rw\n"
                         f"99 36 8:17 / {stick} rw,relatime - vfat /dev/sdb1 rw\n")
    monkeypatch.setattr(fsinfo, "MOUNTINFO", mountinfo)
    req = BuildRequest(refs=(), cache=CacheSettings(dir=tmp_path / "c"), media=MediaSettings(), output=stick)
    assert split_limit(req, Target(stick, inside=True, replace=False)) == split.PART_SIZE
    assert split_limit(req, Target(tmp_path / "new", inside=False, replace=False)) is None
    assert split_limit(req, Target(stick / "new", inside=False, replace=False)) == split.PART_SIZE


def test_protected_paths_messages(tmp_path: Path) -> None:
    cache = tmp_path / "a" / "cache"
    cache.mkdir(parents=True)
    guard = [output.Protected(cache, "the cache")]
    for out, message in ((cache, "the output is the cache"),
                         (cache / "x", f"the output lies inside the cache {cache}"),
                         (tmp_path / "a", f"the output contains the cache {cache}")):
        with pytest.raises(InvalidInput) as info:
            output.check_not_protected(out, guard)
        assert str(info.value) == f"{out}: {message}"
    output.check_not_protected(tmp_path / "b", guard)  # beside it: fine
