"""The fixed cost of a rerun: the intactness verdicts remembered in the cache (`intact.state`)
and the command line's long runs of `--store-path`.

A remembered verdict saves the parse and the re-signing of a narinfo, never a check: a record
forged, made under another key, torn, or for other narinfo bytes (however the file's inode, size
and times look) is ignored and the path checked in full, and the NAR file is checked every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import Example, run_cli

from mediabuilder import cli
from mediabuilder.cache import intact
from mediabuilder.cache.layout import INTACT_STATE, BinaryCache
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath

SUMMARY = re.compile(r"Exporting NARs … (\d+) exported \(.*\), (\d+) already present")
HASH = "0" * 31 + "1"


def _key(name: str, seed: bytes) -> SecretKey:
    import nacl.signing

    signing = nacl.signing.SigningKey(hashlib.sha256(seed).digest())
    return SecretKey(name, bytes(signing) + bytes(signing.verify_key))


KEY = _key("media-test-1", b"intact key")
OTHER = _key("media-test-1", b"another key, same name")


def _narinfo(key: SecretKey) -> NarInfo:
    unsigned = NarInfo(store_path=StorePath.parse(f"/nix/store/{HASH}-hello"), url=f"nar/0{'1' * 51}.nar.zst",
                       compression="zstd", file_hash=f"sha256:0{'1' * 51}", file_size=100,
                       nar_hash=f"sha256:1{'2' * 51}", nar_size=200)
    return NarInfo(**{**unsigned.__dict__, "sigs": (key.sign(unsigned.fingerprint()),)})


def _saved(tmp_path: Path, key: SecretKey = KEY) -> tuple[BinaryCache, NarInfo, bytes]:
    """A cache holding one narinfo, its verdict remembered under `key` and saved."""
    cache = BinaryCache(tmp_path)
    info = _narinfo(key)
    raw = cache.write_narinfo(info)
    records = intact.IntactRecords(cache, key)
    records.remember(raw, info)
    records.save()
    return cache, info, raw


# The state file, read back


def test_saved_verdicts_are_read_back_for_the_same_bytes_only(tmp_path: Path) -> None:
    cache, info, raw = _saved(tmp_path)
    records = intact.IntactRecords(cache, KEY)
    assert records.get(info.store_path, raw) == intact.Verdict(info.nar_hash, 200, info.url, 100)
    assert records.get(info.store_path, raw.replace(b"zstd", b"xz\n\n")) is None
    assert records.get(StorePath.parse(f"/nix/store/{'2' * 32}-hello"), raw) is None


@pytest.mark.parametrize("damage", ["another key", "body changed", "mac changed", "torn", "no header", "not json"])
def test_a_forged_or_damaged_state_file_is_ignored_whole(tmp_path: Path, damage: str) -> None:
    cache, info, raw = _saved(tmp_path)
    state = tmp_path / INTACT_STATE
    head, body = state.read_bytes().split(b"\n", 1)
    if damage == "another key":  # a record that another key (same name) vouches for
        _saved(tmp_path, OTHER)
    elif damage == "body changed":  # a record for other bytes, under the old MAC
        forged = json.loads(body)
        forged[HASH][0] = hashlib.sha256(b"forged narinfo").hexdigest()
        state.write_bytes(head + b"\n" + json.dumps(forged, separators=(",", ":")).encode())
    elif damage == "mac changed":
        state.write_bytes(head[:-1] + (b"0" if head[-1:] != b"0" else b"1") + b"\n" + body)
    elif damage == "torn":
        state.write_bytes(head + b"\n" + body[: len(body) // 2])
    elif damage == "no header":
        state.write_bytes(body)
    else:
        mac = intact.IntactRecords(cache, KEY)._mac(b"[1, 2")
        state.write_bytes(intact.MAGIC + b" " + mac + b"\n[1, 2")
    assert intact.IntactRecords(cache, KEY).get(info.store_path, raw) is None


def test_a_record_of_the_right_key_and_shape_is_needed(tmp_path: Path) -> None:
    """A well-formed MAC over records of the wrong shape (as a future version might write) is
    ignored, not half-read."""
    cache, info, raw = _saved(tmp_path)
    records = intact.IntactRecords(cache, KEY)
    body = json.dumps({HASH: [hashlib.sha256(raw).hexdigest(), info.nar_hash, "200", info.url, 100]}).encode()
    (tmp_path / INTACT_STATE).write_bytes(intact.MAGIC + b" " + records._mac(body) + b"\n" + body)
    assert intact.IntactRecords(cache, KEY).get(info.store_path, raw) is None


def test_unchanged_records_are_not_written_again_and_gone_narinfos_are_dropped(tmp_path: Path) -> None:
    cache, info, raw = _saved(tmp_path)
    state = tmp_path / INTACT_STATE
    before = os.stat(state)
    records = intact.IntactRecords(cache, KEY)
    records.remember(raw, info)
    records.save()
    after = os.stat(state)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    other = NarInfo(**{**info.__dict__, "store_path": StorePath.parse(f"/nix/store/{'2' * 32}-other")})
    records.remember(b"bytes of a narinfo that is not in the cache", other)
    records.save()
    assert list(json.loads(state.read_bytes().split(b"\n", 1)[1])) == [HASH]


# The command line


STORE_ARGS = [f"/nix/store/{c * 32}-p{i}" for i, c in enumerate("0123456789abcd")]


@pytest.mark.parametrize("argv", [
    ["cache", "--cache", "/c", *[a for p in STORE_ARGS for a in ("--store-path", p)]],
    ["build", "--store-path", "a", "--store-path", "b", "--label", "L", "--store-path", "c", "--store-path=d",
     "--store-path", "e", "--store-path", "f", "--flake", "x#y", "-o", "out", "--store-path", "g"],
    ["cache", "--store-p", "a", "--store-path", "b", "--store-path", "c"],
    ["--quiet", "cache", "--store-path", "a", "--store-path", "b", "--store-path=c", "--store-path", "d"],
], ids=["many", "interleaved", "abbreviated", "equals"])
def test_long_runs_of_store_paths_parse_as_argparse_parses_them(argv: list[str]) -> None:
    parser = cli.build_parser()
    assert vars(cli.parse_repeated(parser, argv)) == vars(parser.parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["verify", "/t", "--store-path", "a", "--store-path", "b"],
    ["cache", "--store-path", "a", "--store-path", "b", "--", "--store-path", "c"],
    ["cache", "--cache", "--store-path", "a", "--store-path", "b"],
    ["cache", "--store-path", "a", "--store-path", "-b", "--store-path", "c", "--store-path", "d"],
    ["cache", "--store-path", "a", "--store-path", "b", "--jobs", "0"],
], ids=["other-command", "after-dashes", "as-a-value", "dash-value", "other-error"])
def test_long_runs_of_store_paths_fail_as_argparse_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as plain:
        parser.parse_args(argv)
    expected = capsys.readouterr()
    with pytest.raises(SystemExit) as ours:
        cli.parse_repeated(parser, argv)
    assert (ours.value.code, capsys.readouterr()) == (plain.value.code, expected)
    assert plain.value.code == 2 and expected.err.startswith("error: ")


# Real caches, real Nix


def _fill(cache: Path, toplevel: str, key: Path) -> tuple[int, int]:
    proc = run_cli("cache", "--store-path", toplevel, "--cache", cache, "--key", key)
    assert proc.returncode == 0, proc.stderr
    m = SUMMARY.search(proc.stderr)
    assert m, proc.stderr
    return int(m.group(1)), int(m.group(2))


@pytest.fixture
def filled(example: Example, tmp_path: Path) -> tuple[Path, str, Path, int]:
    """A cache of alpha's closure, filled and then rerun once: (cache, toplevel, key file, paths)."""
    key = tmp_path / "key.sec"
    key.write_text(KEY.render())
    cache = tmp_path / "cache"
    toplevel = example.toplevels["alpha"]
    exported, present = _fill(cache, toplevel, key)
    assert exported > 10 and present == 0
    assert _fill(cache, toplevel, key) == (0, exported)
    return cache, toplevel, key, exported


def _victim(cache: Path, toplevel: str) -> Path:
    return cache / f"{StorePath.parse(toplevel).hash_part}.narinfo"


def _sign_with_other_key_in_place(narinfo: Path) -> None:
    """Give the narinfo a signature by another key of the same name and length, written in
    place with its inode, size and modification time kept."""
    st = os.stat(narinfo)
    info = NarInfo.parse(narinfo.read_text())
    forged = narinfo.read_bytes().replace(info.sigs[0].encode(), OTHER.sign(info.fingerprint()).encode())
    assert forged != narinfo.read_bytes() and len(forged) == st.st_size
    with open(narinfo, "r+b") as f:
        f.write(forged)
    os.utime(narinfo, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(narinfo)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.mark.integration
def test_rerun_keeps_the_state_as_it_was(filled: tuple[Path, str, Path, int]) -> None:
    cache, toplevel, key, total = filled
    state = cache / INTACT_STATE
    before = state.read_bytes(), os.stat(state).st_mtime_ns
    assert _fill(cache, toplevel, key) == (0, total)
    assert (state.read_bytes(), os.stat(state).st_mtime_ns) == before
    assert len(json.loads(before[0].split(b"\n", 1)[1])) == total


@pytest.mark.integration
def test_a_narinfo_changed_in_place_behind_its_record_is_exported_again(filled: tuple[Path, str, Path, int]) -> None:
    cache, toplevel, key, total = filled
    victim = _victim(cache, toplevel)
    good = victim.read_bytes()
    _sign_with_other_key_in_place(victim)
    assert _fill(cache, toplevel, key) == (1, total - 1)
    assert victim.read_bytes() == good


@pytest.mark.integration
def test_a_forged_record_does_not_make_a_bad_narinfo_intact(filled: tuple[Path, str, Path, int]) -> None:
    """Whoever can write the cache but lacks the key: a bad narinfo and a record vouching for
    its bytes, under the MAC that was there or one of another key."""
    cache, toplevel, key, total = filled
    victim = _victim(cache, toplevel)
    good = victim.read_bytes()
    _sign_with_other_key_in_place(victim)
    state = cache / INTACT_STATE
    head, body = state.read_bytes().split(b"\n", 1)
    records = json.loads(body)
    records[StorePath.parse(toplevel).hash_part][0] = hashlib.sha256(victim.read_bytes()).hexdigest()
    forged = json.dumps(records, separators=(",", ":")).encode()
    for mac in (head.split(b" ")[1], intact.IntactRecords(BinaryCache(cache), OTHER)._mac(forged)):
        state.write_bytes(intact.MAGIC + b" " + mac + b"\n" + forged)
        assert _fill(cache, toplevel, key) == (1, total - 1)
        assert victim.read_bytes() == good
        _sign_with_other_key_in_place(victim)


@pytest.mark.integration
def test_a_remembered_path_whose_nar_file_shrank_is_exported_again(filled: tuple[Path, str, Path, int]) -> None:
    cache, toplevel, key, total = filled
    info = NarInfo.parse(_victim(cache, toplevel).read_text())
    nar = cache / info.url
    os.truncate(nar, nar.stat().st_size - 1)
    assert _fill(cache, toplevel, key) == (1, total - 1)
    assert nar.stat().st_size == info.file_size
    assert run_cli("verify", cache, "--trusted-key", KEY.public().render()).returncode == 0
