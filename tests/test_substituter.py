"""Prefetching a closure from an HTTP binary cache made by real Nix, through a faulty server.

The NARs arrive byte for byte as the server has them, the narinfos carry the upstream signature
and ours, dropped connections resume with Range, 5xx answers are retried, damaged or forged
files are refused naming the path and the substituter, and a killed run resumes where it was.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Example, closure_of, nix
from fakecache_server import FakeCache

from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.verify import verify_cache
from mediabuilder.errors import InvalidInput, InvalidMedia
from mediabuilder.media.split import slice_file
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter import client
from mediabuilder.substituter.client import Substituter
from mediabuilder.substituter.closure import walk_closure
from mediabuilder.substituter.prefetch import PrefetchResult, prefetch

pytestmark = pytest.mark.integration

FAST_BACKOFF = 0.01  # seconds; the default (0.2 s, doubling) would only slow the tests


# Fixtures


@pytest.fixture(scope="module")
def toplevel(example: Example) -> str:
    return example.toplevels["alpha"]


@pytest.fixture(scope="module")
def upstream_key() -> SecretKey:
    return SecretKey.generate("upstream-test-1")


@pytest.fixture(scope="module")
def media_key() -> SecretKey:
    return SecretKey.generate("media-test-1")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, toplevel: str, upstream_key: SecretKey) -> Path:
    """alpha's closure signed with `upstream_key` and copied by Nix into a file:// cache (xz)."""
    root = tmp_path_factory.mktemp("upstream")
    key_file = root / "upstream.sec"
    key_file.write_text(upstream_key.render())
    nix("nix", "store", "sign", "--key-file", key_file, "-r", toplevel)
    cache = root / "cache"
    nix("nix", "copy", "--to", f"file://{cache}", toplevel)
    return cache


@pytest.fixture
def server(upstream: Path) -> Iterator[FakeCache]:
    fake = FakeCache(upstream).start()
    try:
        yield fake
    finally:
        fake.stop()


def upstream_infos(cache: Path) -> dict[str, NarInfo]:
    return {info.store_path.full: info
            for info in (NarInfo.parse(f.read_text(), str(f)) for f in sorted(cache.glob("*.narinfo")))}


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def nar_files(cache: Path) -> dict[str, str]:
    return {f.name: sha256(f) for f in sorted((cache / "nar").iterdir())}


def run_prefetch(url: str, upstream_key: SecretKey, media_key: SecretKey, dest: Path, toplevel: str,
                 jobs: int = 4) -> PrefetchResult:
    substituter = Substituter(url, [upstream_key.public()], jobs=jobs, backoff=FAST_BACKOFF)
    return prefetch([StorePath.parse(toplevel)], [substituter], BinaryCache(dest), media_key, jobs=jobs)


# The whole closure


def test_prefetch_copies_the_closure_as_is(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                           media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    closure = closure_of(toplevel)
    result = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert result.downloaded == len(closure) and result.present == 0
    assert result.missing == ()
    # Our cache verifies with either key alone.
    for key in (upstream_key, media_key):
        report = verify_cache(dest, [key.public()], jobs=2)
        assert report.ok, report.faults
        assert report.paths == len(closure)
    # Every NAR is the server's file, same name, same bytes; none was fetched twice.
    assert nar_files(dest) == nar_files(upstream)
    assert all(n == 1 for n in server.nar_requests().values())
    theirs, ours = upstream_infos(upstream), upstream_infos(dest)
    assert sorted(ours) == closure
    for path, info in ours.items():
        up = theirs[path]
        assert (info.url, info.file_hash, info.file_size, info.compression) == \
            (up.url, up.file_hash, up.file_size, up.compression)
        assert info.sigs[:-1] == up.sigs
        assert media_key.public().verify(info.fingerprint(), info.sigs[-1])
    assert not list((dest / "nar").glob(".*"))
    # A rerun downloads nothing.
    server.reset_counts()
    again = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert again.downloaded == 0 and again.present == len(closure)
    assert server.nar_requests() == {}


def test_prefetch_from_a_file_url(upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str,
                                  tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    run_prefetch(f"file://{upstream}", upstream_key, media_key, dest, toplevel)
    assert nar_files(dest) == nar_files(upstream)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_nix_copies_from_the_prefetched_cache_with_the_media_key(
    server: FakeCache, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    dest = tmp_path / "cache"
    run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    root = tmp_path / "root"
    nix("nix", "copy", "--from", f"file://{dest}", "--to", root, toplevel,
        "--option", "trusted-public-keys", media_key.public().render())
    assert sorted(nix("nix", "--store", root, "path-info", "-r", toplevel).stdout.split()) == closure_of(toplevel)
    nix("nix", "--store", root, "store", "verify", "--no-trust", "-r", toplevel)


# Faults


def largest_nar(upstream: Path) -> NarInfo:
    return max(upstream_infos(upstream).values(), key=lambda i: i.file_size or 0)


def test_dropped_connection_resumes_with_range(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                               media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    big = largest_nar(upstream)
    assert big.file_size and big.file_size > 64 * 1024
    server.faults.drop_once[big.url] = big.file_size // 2
    dest = tmp_path / "cache"
    result = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert sha256(dest / big.url) == sha256(upstream / big.url)
    assert server.requests[big.url] == 2
    assert [p for p, _ in server.ranges] == [big.url]
    offset = int(server.ranges[0][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= big.file_size // 2
    assert result.resumed == 0  # resumed within the run, not from a partial file
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def assert_parts_recorded(dest: Path, limit: int) -> int:
    """Every NAR file of `dest` over `limit` has its parts recorded as slice_file cuts and hashes
    them (one read of the file, after the fact); the others none. Returns how many have them."""
    cache, recorded = BinaryCache(dest), 0
    for nar_file in sorted((dest / "nar").iterdir()):
        url = f"nar/{nar_file.name}"
        if nar_file.stat().st_size > limit:
            parts, _ = slice_file(nar_file, limit)
            assert cache.read_parts(url, limit) == [(p.size, p.sha256) for p in parts], url
            recorded += 1
        else:
            assert not cache.parts_path(url).exists(), url
    return recorded


def test_downloaded_nars_have_their_parts_hashed_as_they_arrive(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image writers take a big NAR's parts from the cache's record (one read of it): a
    download records them too, across a dropped connection, from a partial file left by an earlier
    run, and for a complete NAR file that lost its record."""
    big, second = sorted(upstream_infos(upstream).values(), key=lambda i: i.file_size or 0, reverse=True)[:2]
    # Parts of the same kind as PART_SIZE's, small enough that the two biggest NARs have several.
    limit = (second.file_size or 0) // 3
    assert limit > 1024 and (big.file_size or 0) > 3 * limit
    monkeypatch.setattr(client, "PART_SIZE", limit)
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    half = (upstream / second.url).read_bytes()[: (second.file_size or 0) // 2]
    (dest / "nar" / f".partial-{second.url.removeprefix('nar/')}").write_bytes(half)
    server.faults.drop_once[big.url] = (big.file_size or 0) // 2
    result = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert result.resumed == 1 and server.requests[big.url] == 2
    recorded = assert_parts_recorded(dest, limit)
    assert recorded >= 2
    # A NAR file complete without its narinfo and record: checked, reused, and recorded again.
    BinaryCache(dest).parts_path(big.url).unlink()
    BinaryCache(dest).narinfo_path(big.store_path).unlink()
    server.reset_counts()
    again = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert again.downloaded == 1 and server.nar_requests() == {}
    assert assert_parts_recorded(dest, limit) == recorded
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


@pytest.mark.parametrize("ignore_range", [False, True])
def test_partial_file_from_an_earlier_run(ignore_range: bool, server: FakeCache, upstream: Path,
                                          upstream_key: SecretKey, media_key: SecretKey, toplevel: str,
                                          tmp_path: Path) -> None:
    """A partial download is resumed with Range (206), or started over when the server answers 200."""
    big = largest_nar(upstream)
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    half = (upstream / big.url).read_bytes()[: (big.file_size or 0) // 2]
    (dest / "nar" / f".partial-{big.url.removeprefix('nar/')}").write_bytes(half)
    server.faults.ignore_range = ignore_range
    result = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert result.resumed == 1
    assert server.requests[big.url] == 1
    assert server.ranges == [(big.url, f"bytes={len(half)}-")]
    assert server.sent[big.url] == (big.file_size or 0) - (0 if ignore_range else len(half))
    assert sha256(dest / big.url) == sha256(upstream / big.url)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_damaged_partial_file_is_downloaded_again(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                                  media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    big = largest_nar(upstream)
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    (dest / "nar" / f".partial-{big.url.removeprefix('nar/')}").write_bytes(b"garbage" * 1000)
    run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert server.requests[big.url] == 2  # resumed, found wrong, then fetched whole
    assert sha256(dest / big.url) == sha256(upstream / big.url)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_server_errors_are_retried(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                   media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    top = StorePath.parse(toplevel)
    big = largest_nar(upstream)
    narinfo = f"{top.hash_part}.narinfo"
    server.faults.errors[narinfo] = 3
    server.faults.errors[big.url] = 3
    dest = tmp_path / "cache"
    run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert server.requests[narinfo] == 4
    assert server.requests[big.url] == 4
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_flipped_byte_is_refused(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                 media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    big = largest_nar(upstream)
    server.faults.flip.add(big.url)
    dest = tmp_path / "cache"
    with pytest.raises(InvalidMedia) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    message = str(caught.value)
    assert str(big.store_path) in message and server.url in message
    assert not (dest / big.url).exists()
    assert not (dest / f"{big.store_path.hash_part}.narinfo").exists()
    # The damaged download is gone; others cut short stay to be resumed by the next run.
    assert not (dest / "nar" / f".partial-{big.url.removeprefix('nar/')}").exists()


def test_narinfo_signed_by_another_key_is_refused(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    top = StorePath.parse(toplevel)
    name = f"{top.hash_part}.narinfo"
    info = NarInfo.parse((upstream / name).read_text())
    intruder = SecretKey.generate("intruder-1")
    server.faults.replace[name] = info.with_sigs((intruder.sign(info.fingerprint()),)).render().encode()
    dest = tmp_path / "cache"
    with pytest.raises(InvalidMedia) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    message = str(caught.value)
    assert toplevel in message and server.url in message and "intruder-1" in message
    assert not (dest / name).exists()
    # With a second substituter that has a trusted copy, the walk falls through to it.
    http = Substituter(server.url, [upstream_key.public()], backoff=FAST_BACKOFF)
    local = Substituter(f"file://{upstream}", [upstream_key.public()])
    walked = walk_closure([top], [http, local], jobs=2)
    assert walked.found[top][1] is local
    assert len(walked.found) == len(closure_of(toplevel))


def test_unreachable_substituter_is_one_error(upstream_key: SecretKey) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: connection refused
    substituter = Substituter(f"http://127.0.0.1:{port}", [upstream_key.public()], backoff=FAST_BACKOFF)
    with pytest.raises(InvalidInput) as caught:
        _ = substituter.priority
    assert str(caught.value) == \
        f"http://127.0.0.1:{port}: cannot download nix-cache-info after 5 tries: Connection refused"


def test_path_no_substituter_has_is_missing(server: FakeCache, upstream_key: SecretKey, media_key: SecretKey,
                                            toplevel: str, tmp_path: Path) -> None:
    absent = StorePath.parse("/nix/store/" + "0" * 32 + "-not-in-any-cache")
    substituter = Substituter(server.url, [upstream_key.public()], backoff=FAST_BACKOFF)
    result = prefetch([StorePath.parse(toplevel), absent], [substituter], BinaryCache(tmp_path / "c"), media_key,
                      jobs=4)
    assert result.missing == (absent,)
    assert len(result.paths) == len(closure_of(toplevel))


# A killed run


PREFETCH_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from mediabuilder.cache.layout import BinaryCache
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter import client
from mediabuilder.substituter.client import Substituter
from mediabuilder.substituter.prefetch import PrefetchResult, prefetch
substituter = Substituter({url!r}, [PublicKey.parse({pub!r})], jobs=2)
prefetch([StorePath.parse({top!r})], [substituter], BinaryCache(Path({dest!r})), SecretKey.parse({sec!r}), jobs=2)
"""


def test_killed_prefetch_resumes(server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey,
                                 toplevel: str, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    server.faults.bytes_per_second = 64 * 1024
    script = PREFETCH_RUN.format(repo=str(REPO), url=server.url, pub=upstream_key.public().render(), top=toplevel,
                               dest=str(dest), sec=media_key.render())
    # Kill while the biggest NAR is on its way: at this rate it takes seconds, so it is still partial
    # when the kill lands (a small one could complete in between).
    biggest = dest / "nar" / f".partial-{max((upstream / 'nar').iterdir(), key=lambda f: f.stat().st_size).name}"
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (biggest.exists() and biggest.stat().st_size > 0):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    first = server.nar_requests()
    complete_after_kill = {f"nar/{f.name}" for f in (dest / "nar").iterdir() if not f.name.startswith(".")}
    partial_after_kill = {f"nar/{f.name.removeprefix('.partial-')}" for f in (dest / "nar").glob(".partial-*")
                          if f.stat().st_size > 0}
    assert partial_after_kill
    server.reset_counts()
    server.faults.bytes_per_second = 0
    run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    second = server.nar_requests()

    assert nar_files(dest) == nar_files(upstream)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok
    nars = set(nar_files(upstream))
    # Only what was missing was downloaded again; partial files resumed with Range.
    assert not complete_after_kill & set(second)
    resumed = set(first) & set(second)
    assert partial_after_kill <= resumed
    assert {p for p, _ in server.ranges} == partial_after_kill
    assert sum(first.values()) + sum(second.values()) == len(nars) + len(resumed)


def test_two_runs_into_one_cache_at_once(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                         media_key: SecretKey, toplevel: str, tmp_path: Path) -> None:
    """Two builds sharing a cache: each NAR is downloaded once; neither removes the other's partial files."""
    dest = tmp_path / "cache"
    server.faults.bytes_per_second = 512 * 1024
    script = PREFETCH_RUN.format(repo=str(REPO), url=server.url, pub=upstream_key.public().render(), top=toplevel,
                                 dest=str(dest), sec=media_key.render())
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors

    assert nar_files(dest) == nar_files(upstream)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok
    assert server.nar_requests() == {f"nar/{name}": 1 for name in nar_files(upstream)}
