"""The output's lifecycle (mediabuilder/media/output.py) at the level of single calls: the order in
which a medium appears, which temporaries a later run may delete, renames that never clobber,
and the split limit taken from the output's own filesystem. The builds themselves are walked in
test_user_walks.py."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import weakref
from pathlib import Path

import pytest

from mediabuilder import interrupts, nixcli
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
    real_rename = output.rename_noreplace

    def spy(src: Path, dst: Path) -> None:
        assert (out / output.INCOMPLETE).exists()  # marked incomplete while entries move in
        seen.append(dst.name)
        real_rename(src, dst)

    monkeypatch.setattr(output, "rename_noreplace", spy)
    output.move_in(tree, out)
    monkeypatch.undo()
    assert seen == ["cache", "flake", "media-key.pub", "registry.json", "manifest.storepath", "manifest.json",
                    "install.sh"]
    assert sorted(os.listdir(out)) == sorted(seen)


def _medium(root: Path, tag: str) -> Path:
    (root / "cache" / "nar").mkdir(parents=True)
    (root / "cache" / "nar" / "x.nar").write_text(tag)
    (root / "flake").mkdir()
    (root / "install.sh").write_bytes(output.INSTALL_SH_HEADER + f"\n# {tag}\n".encode())
    for name in ("manifest.json", "manifest.storepath", "registry.json", "media-key.pub", "README.txt"):
        (root / name).write_text(tag)
    return root


def test_move_in_replaces_the_old_medium_and_a_failed_rename_restores_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = _medium(tmp_path / "stick", "old")
    new = _medium(tmp_path / "tree", "new")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = 0
    real_rename = output.rename_noreplace

    def third_fails(src: Path, dst: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(output, "rename_noreplace", third_fails)
    with pytest.raises(OSError, match="No space left"):
        output.move_in(new, out)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(new)) == sorted(os.listdir(out))  # the new tree is whole again
    output.move_in(new, out)
    assert (out / "cache" / "nar" / "x.nar").read_text() == "new"
    assert sorted(os.listdir(out)) == ["README.txt", "cache", "flake", "install.sh", "manifest.json",
                                       "manifest.storepath", "media-key.pub", "registry.json"]


def test_names_alone_are_not_a_medium(tmp_path: Path) -> None:
    """A user's own `cache/` and `README.txt` are the user's, not an old medium --force may take."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "README.txt").write_text("my notes\n")
    (tmp_path / "lost+found").mkdir()
    assert output.foreign_entries(tmp_path) == ["README.txt", "cache"]
    assert output.media_entries(tmp_path) == []
    (tmp_path / "install.sh").write_text("#!/bin/sh\necho not ours\n")
    assert output.foreign_entries(tmp_path) == ["README.txt", "cache", "install.sh"]
    (tmp_path / "install.sh").write_bytes(output.INSTALL_SH_HEADER + b"\n")
    assert output.foreign_entries(tmp_path) == []
    assert output.media_entries(tmp_path) == ["install.sh", "cache", "README.txt"]


def test_a_live_builds_temporaries_are_not_deleted(tmp_path: Path) -> None:
    """Cleaning up after a killed run must not take the files of one that is still running."""
    with output.temporary(tmp_path, directory=False) as live:
        assert live.name.startswith(".mediabuilder-tmp-")
        assert live.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an image others may read, as open() makes
        dead = tmp_path / ".mediabuilder-tmp-dead0_k1"
        dead.write_text("left by a killed run\n")
        (tmp_path / ".mediabuilder-tmp-deaddir1" / "sub").mkdir(parents=True)
        (tmp_path / "mediabuilder-tmp-notours1").write_text("the user's\n")
        (tmp_path / ".mediabuilder-tmp-my-notes").write_text("the user's, named like ours but not ours\n")
        os.symlink("/etc", tmp_path / ".mediabuilder-tmp-symlink1")
        assert output.remove_stale(tmp_path, output.TMP_PREFIX) == 2
        assert live.exists() and not dead.exists()
    assert sorted(os.listdir(tmp_path)) == [".mediabuilder-tmp-my-notes", ".mediabuilder-tmp-symlink1",
                                            "mediabuilder-tmp-notours1"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_signal_during_cleanup_waits_for_its_end() -> None:
    """SIGTERM inside `uninterrupted` is raised when the block ends, not in the middle of it."""
    previous = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.install()
    steps = []
    try:
        with pytest.raises(interrupts.Interrupted) as info, interrupts.uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now
            steps.append("cleanup finished")
        assert info.value.signum == signal.SIGTERM
        assert steps == ["cleanup finished"]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_an_interrupt_python_lost_is_raised_again_where_work_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal whose handler runs inside a weakref callback (as in the import system's module
    locks) raises into nothing: Python prints "Exception ignored" and goes on. The next
    `interrupts.check()` in a work loop raises it again; a later build starts clean."""
    previous = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal (`cmd &` ignores SIGINT)
    interrupts.install()
    try:
        class Thing:
            pass

        def callback(_ref: object) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the callback

        lost: list[type[BaseException] | None] = []
        monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(u.exc_type))  # "Exception ignored"
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        assert ref() is None
        assert lost == [interrupts.Interrupted]  # lost, as in the build that did not stop
        with pytest.raises(interrupts.Interrupted) as info:
            interrupts.check()
        assert info.value.signum == signal.SIGINT
        interrupts.install()
        interrupts.check()  # nothing pending any more
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_store_access_follows_the_daemon_socket_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NIX_REMOTE=unix://PATH and NIX_DAEMON_SOCKET_PATH name the socket checked, not the default."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "daemon.sock"))
    sock.listen()
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    try:
        monkeypatch.setenv("NIX_REMOTE", f"unix://{tmp_path}/daemon.sock")
        nixcli.check_store_access()
        monkeypatch.setenv("NIX_REMOTE", "daemon")
        monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", str(tmp_path / "daemon.sock"))
        nixcli.check_store_access()
        monkeypatch.setenv("NIX_REMOTE", f"unix://{tmp_path}/none.sock")
        with pytest.raises(InvalidInput) as info:
            nixcli.check_store_access()
        assert str(info.value) == (f"/nix/var/nix/db: user nobody cannot write the Nix store and cannot reach a "
                                   f"nix-daemon at {tmp_path}/none.sock")
    finally:
        sock.close()


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


def test_place_syncs_an_image_and_its_directory_and_a_tree_by_its_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image is made durable by fsync (its data before the rename, the directory after),
    not by syncing the whole filesystem, which waits for everyone else's writes too."""
    synced: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(output, "_syncfs", lambda directory: synced.append(f"syncfs {directory.name}"))

    def recorded(fd: int) -> None:
        synced.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "image.tmp").write_bytes(b"image")
    output.place(tmp_path / "image.tmp", out / "media.iso", replace=False)
    assert synced == ["fsync image.tmp", "fsync out"]
    synced.clear()
    (tmp_path / "tree").mkdir()
    output.place(tmp_path / "tree", out / "media", replace=False)
    assert synced == ["syncfs out"]


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


def test_write_behind_starts_writeback_every_window_and_stops_when_refused(tmp_path: Path) -> None:
    calls: list[tuple[int, int, int, int]] = []
    with open(tmp_path / "image", "wb") as f:
        behind = output.WriteBehind(f.fileno())
        assert behind._call is not None  # Linux has sync_file_range
        real = behind._call

        def recorded(*args: int) -> int:
            calls.append((args[0], args[1], args[2], args[3]))
            return int(real(*args))

        def refused(*args: int) -> int:  # EINVAL, ESPIPE, ...
            calls.append((args[0], args[1], args[2], args[3]))
            return -1

        behind._call = recorded
        for _ in range(5):
            f.write(b"\0" * (output.WRITE_BEHIND // 2))
            f.flush()
            behind.wrote(output.WRITE_BEHIND // 2)
        assert calls == [(f.fileno(), 0, 0, 2)] * 2  # after the 2nd and the 4th write
        behind._call = refused
        behind.wrote(output.WRITE_BEHIND * 3)
        behind.wrote(output.WRITE_BEHIND * 3)
        assert len(calls) == 3 and behind._call is None  # tried once, then left alone
