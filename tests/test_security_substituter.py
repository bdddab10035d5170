"""A hostile substituter: what its narinfos do not sign (URL, FileHash, FileSize, Compression) is
not trusted, and nothing it could swap in stays in our cache or counts as present later.

The narinfo signature covers StorePath, NarHash, NarSize and References only. A server (or
anyone in between) can point a correctly signed narinfo at another file; every NAR is therefore
decompressed and checked against the signed NarHash and NarSize before it is taken in.
"""

# ruff: noqa: F811 - the fixtures of test_substituter, imported, are test arguments here
from __future__ import annotations

import base64
import hashlib
import io
import lzma
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import nix
from fakecache_server import FakeCache
from test_substituter import (  # noqa: F401 - fixtures
    FAST_BACKOFF,
    media_key,
    nar_files,
    run_prefetch,
    server,
    toplevel,
    upstream,
    upstream_infos,
    upstream_key,
)

from mediabuilder.cache.layout import BinaryCache
from mediabuilder.cache.verify import verify_cache
from mediabuilder.errors import InvalidInput, InvalidMedia, MediabuilderError
from mediabuilder.store import contentaddress, nar
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import Substituter
from mediabuilder.substituter.prefetch import prefetch

pytestmark = pytest.mark.integration


def victim_and_donor(upstream: Path) -> tuple[NarInfo, NarInfo]:
    """Two paths of the closure: the largest NAR (to be swapped) and the second largest."""
    infos = sorted(upstream_infos(upstream).values(), key=lambda i: i.nar_size, reverse=True)
    return infos[0], infos[1]


def swapped_nar(upstream: Path, victim: NarInfo, donor: NarInfo) -> tuple[NarInfo, bytes]:
    """`victim`'s narinfo, its signature intact, pointing at `donor`'s NAR served uncompressed."""
    assert donor.compression == "xz"
    data = lzma.decompress((upstream / donor.url).read_bytes())
    file_hash = Hash("sha256", hashlib.sha256(data).digest()).nix32()
    url = f"nar/{file_hash.removeprefix('sha256:')}.nar"
    forged = replace(victim, url=url, compression="none", file_hash=file_hash, file_size=len(data))
    assert forged.fingerprint() == victim.fingerprint()  # the upstream signature still holds
    return forged, data


def refusal(server: FakeCache, info: NarInfo) -> str:
    return (f"{info.store_path}: the NAR from {server.url} ({info.url}) is damaged: decompressed, it is not "
            "the NAR its signed NarHash and NarSize describe")


def test_swapped_nar_with_rewritten_file_fields_is_refused(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    victim, donor = victim_and_donor(upstream)
    forged, data = swapped_nar(upstream, victim, donor)
    server.faults.replace[f"{victim.store_path.hash_part}.narinfo"] = forged.render().encode()
    server.faults.replace[forged.url] = data
    dest = tmp_path / "cache"
    with pytest.raises(InvalidMedia) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert str(caught.value) == refusal(server, forged)
    assert server.requests[forged.url] == 1
    # Nothing of it stays: no narinfo, no NAR, no partial download.
    assert not (dest / f"{victim.store_path.hash_part}.narinfo").exists()
    assert not (dest / forged.url).exists()
    assert not (dest / "nar" / f".partial-{forged.url.removeprefix('nar/')}").exists()
    # The next run, against an honest server, downloads it properly.
    server.faults.replace.clear()
    result = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert result.downloaded >= 1
    assert nar_files(dest) == nar_files(upstream)
    assert upstream_infos(dest)[victim.store_path.full].url == victim.url
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_narinfo_pointing_at_another_paths_nar_is_refused(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    """The same URL, FileHash, FileSize and Compression as another path of the closure: the file is
    not shared (nor reused once downloaded) unless the signed NAR is the same."""
    victim, donor = victim_and_donor(upstream)
    forged = replace(victim, url=donor.url, compression=donor.compression, file_hash=donor.file_hash,
                     file_size=donor.file_size)
    server.faults.replace[f"{victim.store_path.hash_part}.narinfo"] = forged.render().encode()
    dest = tmp_path / "cache"
    with pytest.raises(InvalidMedia) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel, jobs=1)
    assert str(caught.value) == refusal(server, forged)
    assert not (dest / f"{victim.store_path.hash_part}.narinfo").exists()
    # The donor's own file, if it completed, is the donor's (partial files cut short by the refusal stay).
    complete = {name: sha for name, sha in nar_files(dest).items() if not name.startswith(".")}
    assert complete.items() <= nar_files(upstream).items()


def test_narinfo_in_the_cache_not_signed_by_the_media_key_is_not_present(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    """A rerun trusts only narinfos it signed itself (after checking their NAR): one put in the cache
    by someone else, with a swapped NAR, is downloaded again, not signed and counted present."""
    dest = tmp_path / "cache"
    first = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    victim, donor = victim_and_donor(upstream)
    forged, data = swapped_nar(upstream, victim, donor)
    (dest / forged.url).write_bytes(data)
    BinaryCache(dest).write_narinfo(forged)  # the upstream signature only
    server.reset_counts()
    again = run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert (again.downloaded, again.present) == (1, first.downloaded - 1)
    assert server.nar_requests() == {}  # its own file is still there: reused once its NAR checked
    ours = upstream_infos(dest)[victim.store_path.full]
    assert (ours.url, ours.file_hash) == (victim.url, victim.file_hash)
    assert media_key.public().verify(ours.fingerprint(), ours.sigs[-1])


# Limits: what a server sends is bounded in size and in time


BIG_BODY = 32 << 20  # bytes: far more than any file of the example's closure


def test_filesize_out_of_proportion_to_narsize_is_refused_before_downloading(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, tmp_path: Path
) -> None:
    victim, _ = victim_and_donor(upstream)
    forged = replace(victim, file_size=300_000_000)
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    with pytest.raises(InvalidMedia) as caught:
        substituter(server).download_nar(forged, dest)
    assert str(caught.value) == (f"{victim.store_path}: the NAR from {server.url} ({victim.url}) is damaged: its "
                                 f"FileSize 300000000 is out of proportion to its signed NarSize {victim.nar_size}")
    assert server.requests[victim.url] == 0
    assert list((dest / "nar").iterdir()) == []


@pytest.mark.parametrize("announced", [True, False])
@pytest.mark.parametrize("file_size", [True, False])
def test_body_longer_than_allowed_is_cut_off(announced: bool, file_size: bool, server: FakeCache, upstream: Path,
                                             upstream_key: SecretKey, tmp_path: Path) -> None:
    """Announced in Content-Length (refused before it is read) or not (cut off as it arrives); the
    limit is FileSize, or what NarSize allows when the narinfo has no FileSize."""
    victim, _ = victim_and_donor(upstream)
    info = victim if file_size else replace(victim, file_size=None, file_hash=None)
    server.faults.replace[victim.url] = (upstream / victim.url).read_bytes() + bytes(BIG_BODY)
    if not announced:
        server.faults.hide_length.add(victim.url)
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    with pytest.raises(InvalidMedia) as caught:
        substituter(server).download_nar(info, dest)
    limit = f"FileSize {victim.file_size}" if file_size else \
        f"what its signed NarSize allows, {victim.nar_size + victim.nar_size // 64 + (64 << 10)}"
    assert str(caught.value) == \
        f"{victim.store_path}: the NAR from {server.url} ({victim.url}) is damaged: more than {limit} bytes"
    assert server.sent[victim.url] < BIG_BODY // 2  # the rest was never sent: the connection closed
    assert list((dest / "nar").iterdir()) == []


@pytest.mark.parametrize("announced", [True, False])
def test_narinfo_longer_than_4_mib_is_refused(announced: bool, server: FakeCache, toplevel: str,
                                              upstream_key: SecretKey) -> None:
    top = StorePath.parse(toplevel)
    name = f"{top.hash_part}.narinfo"
    server.faults.replace[name] = f"StorePath: {toplevel}\n".encode() + b"X" * BIG_BODY
    if not announced:
        server.faults.hide_length.add(name)
    with pytest.raises(InvalidMedia) as caught:
        substituter(server).narinfo(top)
    assert str(caught.value) == f"{server.url}/{name}: longer than 4 MiB: not a Nix binary cache's file"
    assert server.sent[name] < BIG_BODY // 2


def test_narinfo_longer_than_4_mib_in_a_file_cache_is_refused(toplevel: str, upstream_key: SecretKey,
                                                              tmp_path: Path) -> None:
    top = StorePath.parse(toplevel)
    (tmp_path / f"{top.hash_part}.narinfo").write_bytes(f"StorePath: {toplevel}\n".encode() + b"X" * (5 << 20))
    with pytest.raises(InvalidMedia) as caught:
        Substituter(f"file://{tmp_path}", [upstream_key.public()]).narinfo(top)
    assert str(caught.value) == f"file://{tmp_path}/{top.hash_part}.narinfo: longer than 4 MiB: not a Nix binary " \
                                "cache's file"


def test_slow_body_is_given_up_after_its_time_budget(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                                     tmp_path: Path) -> None:
    """Each try may take a floor plus its size at the minimum rate (here 0.2 s + 4 MiB/s); the
    server sends at 256 KiB/s, and keeps sending: the read timeout alone would never stop it."""
    victim, _ = victim_and_donor(upstream)
    assert victim.file_size is not None and victim.file_size > 512 << 10
    server.faults.bytes_per_second = 256 << 10
    dest = tmp_path / "cache"
    BinaryCache(dest).create()
    slow = Substituter(server.url, [upstream_key.public()], tries=2, backoff=FAST_BACKOFF, min_rate=4 << 20,
                       deadline_floor=0.2)
    with pytest.raises(InvalidInput) as caught:
        slow.download_nar(victim, dest)
    assert str(caught.value) == (f"{server.url}: cannot download {victim.url} after 2 tries: too slow: the answer "
                                 "did not arrive in the time its size allows")
    assert server.requests[victim.url] == 2
    assert server.sent[victim.url] < victim.file_size


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (root may mount one; elsewhere the test is skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_removes_the_partial_file(server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                            small_filesystem: Path) -> None:
    victim, _ = victim_and_donor(upstream)
    assert victim.file_size is not None and victim.file_size > 512 << 10
    dest = small_filesystem / "cache"
    BinaryCache(dest).create()
    with pytest.raises(InvalidInput) as caught:
        substituter(server).download_nar(victim, dest)
    assert str(caught.value) == f"{dest}: no space left for the NAR of {victim.store_path} ({victim.file_size} bytes)"
    assert list((dest / "nar").iterdir()) == []


@pytest.mark.parametrize("source", ["url", "netrc"])
def test_credentials_go_with_every_request(source: str, server: FakeCache, upstream: Path, upstream_key: SecretKey,
                                           media_key: SecretKey, toplevel: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """From the URL's user info or from $NETRC: narinfos and NARs alike (per-request headers must
    not replace the pool's)."""
    server.faults.auth = "Basic " + base64.b64encode(b"deploy:s3cret").decode()
    url = server.url
    if source == "url":
        url = url.replace("http://", "http://deploy:s3cret@")
    else:
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login deploy password s3cret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
    dest = tmp_path / "cache"
    result = run_prefetch(url, upstream_key, media_key, dest, toplevel)
    assert result.downloaded == len(upstream_infos(upstream))
    assert nar_files(dest) == nar_files(upstream)
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def substituter(server: FakeCache) -> Substituter:
    return Substituter(server.url, [], tries=2, backoff=FAST_BACKOFF)


# Content-addressed paths: trusted without a signature, so their content is checked


@pytest.fixture(scope="module", params=["flat", "text"])
def ca_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NarInfo]:
    """One unsigned content-addressed path copied by Nix into a file:// cache (uncompressed):
    `nix store add-file` (fixed:sha256, flat) or builtins.toFile (text:sha256)."""
    root = tmp_path_factory.mktemp("ca")
    store = root / "store"
    if request.param == "flat":
        genuine = root / "genuine.txt"
        genuine.write_text("the genuine contents\n")
        path = nix("nix", "--store", store, "store", "add-file", genuine).stdout.strip()
    else:
        path = nix("nix", "--store", store, "eval", "--raw", "--expr",
                   'builtins.toFile "genuine.txt" "the genuine contents\\n"').stdout.strip()
    cache = root / "cache"
    nix("nix", "copy", "--from", store, "--to", f"file://{cache}?compression=none", path)
    info = upstream_infos(cache)[path]
    assert info.ca is not None and info.ca.startswith("fixed:sha256:" if request.param == "flat" else "text:sha256:")
    assert info.sigs == ()
    return cache, info


def forged_ca(cache: Path, info: NarInfo, tmp_path: Path) -> tuple[NarInfo, bytes]:
    """`info` (its CA and so its store path intact) describing a NAR of other contents."""
    fake = tmp_path / "forged.txt"
    fake.write_text("the forged contents\n")
    chunks: list[bytes] = []
    nar.dump(fake, chunks.append)
    data = b"".join(chunks)
    digest = Hash("sha256", hashlib.sha256(data).digest()).nix32()
    forged = replace(info, url=f"nar/{digest.removeprefix('sha256:')}.nar", compression="none", file_hash=digest,
                     file_size=len(data), nar_hash=digest, nar_size=len(data))
    return forged, data


def test_content_addressed_path_with_forged_contents_is_refused(ca_cache: tuple[Path, NarInfo],
                                                                media_key: SecretKey, tmp_path: Path) -> None:
    cache, info = ca_cache
    forged, data = forged_ca(cache, info, tmp_path)
    with FakeCache(cache) as fake:
        fake.faults.replace[f"{info.store_path.hash_part}.narinfo"] = forged.render().encode()
        fake.faults.replace[forged.url] = data
        dest = tmp_path / "cache"
        with pytest.raises(InvalidMedia) as caught:
            prefetch([info.store_path], [Substituter(fake.url, [], backoff=FAST_BACKOFF)], BinaryCache(dest),
                     media_key, jobs=1)
        assert str(caught.value) == (f"{info.store_path}: the NAR from {fake.url} ({forged.url}) is damaged: its "
                                     f"contents do not have the content address {info.ca}")
        assert sorted(p.name for p in (dest / "nar").iterdir()) == []
        assert not (dest / f"{info.store_path.hash_part}.narinfo").exists()
        # The genuine one is taken, and signed by the media key.
        fake.faults.replace.clear()
        result = prefetch([info.store_path], [Substituter(fake.url, [], backoff=FAST_BACKOFF)], BinaryCache(dest),
                          media_key, jobs=1)
    assert result.downloaded == 1
    assert verify_cache(dest, [media_key.public()], jobs=1).ok


def nar_of(path: Path) -> bytes:
    chunks: list[bytes] = []
    nar.dump(path, chunks.append)
    return b"".join(chunks)


def test_content_address_checks_what_each_method_hashes(tmp_path: Path) -> None:
    """Flat and text: the contents of the one file, which must be a non-executable regular file;
    recursive: the NAR, with the address's own algorithm."""
    file = tmp_path / "f"
    file.write_bytes(b"contents\n")
    flat = Hash("sha256", hashlib.sha256(b"contents\n").digest()).nix32()
    sha1_nar = Hash("sha1", hashlib.sha1(nar_of(file)).digest()).nix32()
    assert contentaddress.content_problem(f"fixed:{flat}", io.BytesIO(nar_of(file))) is None
    assert contentaddress.content_problem(f"text:{flat}", io.BytesIO(nar_of(file))) is None
    assert contentaddress.content_problem(f"fixed:r:{sha1_nar}", io.BytesIO(nar_of(file))) is None
    assert contentaddress.content_problem(f"fixed:r:{flat}", io.BytesIO(nar_of(file))) == \
        f"its contents do not have the content address fixed:r:{flat}"
    file.chmod(0o755)
    assert contentaddress.content_problem(f"fixed:{flat}", io.BytesIO(nar_of(file))) == \
        f"its content address fixed:{flat} is of one regular file, but the NAR is an executable file"
    assert contentaddress.content_problem(f"text:{flat}", io.BytesIO(nar_of(tmp_path))) == \
        f"its content address text:{flat} is of one regular file, but the NAR is a directory"


def test_credentials_do_not_follow_a_redirect_to_another_host(server: FakeCache, upstream: Path,
                                                              upstream_key: SecretKey, media_key: SecretKey,
                                                              toplevel: str, tmp_path: Path) -> None:
    """A NAR redirected elsewhere (a CDN) is fetched there without the cache's credentials."""
    victim, _ = victim_and_donor(upstream)
    server.faults.auth = "Basic " + base64.b64encode(b"deploy:s3cret").decode()
    with FakeCache(upstream) as cdn:
        server.faults.redirect[victim.url] = f"{cdn.url}/{victim.url}"
        dest = tmp_path / "cache"
        run_prefetch(server.url.replace("http://", "http://deploy:s3cret@"), upstream_key, media_key, dest, toplevel)
        assert cdn.requests == {victim.url: 1}
        assert cdn.authorization == {victim.url: None}
    assert server.authorization[victim.url] == server.faults.auth
    assert nar_files(dest) == nar_files(upstream)


# Unsigned fields of a signed narinfo: CA and Deriver are not covered by the signature


def test_signed_narinfo_with_a_forged_ca_line_is_refused(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    """A CA line added to a correctly signed, input-addressed narinfo (its NAR honest, the CA even
    consistent with the NarHash): Nix would register it as the path's content address. Any CA
    must give the store path, so the path is refused and nothing of it is taken in."""
    victim, _ = victim_and_donor(upstream)
    assert victim.ca is None
    forged = replace(victim, ca=f"fixed:r:{victim.nar_hash}")
    assert forged.fingerprint() == victim.fingerprint()  # the upstream signature still holds
    server.faults.replace[f"{victim.store_path.hash_part}.narinfo"] = forged.render().encode()
    dest = tmp_path / "cache"
    with pytest.raises(MediabuilderError) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert f"{server.url}: content address {forged.ca} does not give this store path (an unsigned CA line, " \
           "forged)" in str(caught.value)
    assert not (dest / f"{victim.store_path.hash_part}.narinfo").exists()
    # The same narinfo in a cache (signed by the media key, as a careless copy would): a fault.
    cache = tmp_path / "copy"
    server.faults.replace.clear()
    run_prefetch(server.url, upstream_key, media_key, cache, toplevel)
    ours = BinaryCache(cache).read_narinfo(victim.store_path)
    resigned = replace(ours, ca=f"fixed:r:{ours.nar_hash}")
    BinaryCache(cache).write_narinfo(resigned.with_sigs((media_key.sign(resigned.fingerprint()),)))
    faults = [(f.path, f.fault) for f in verify_cache(cache, [media_key.public()], jobs=2).faults]
    assert faults == [(str(victim.store_path), f"content address {resigned.ca} does not give this store path "
                                               "(an unsigned CA line, forged)")]


def test_upstream_derivers_are_not_vouched_for(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    """Deriver is unsigned and cannot be checked without the derivation: the media key does not
    sign it into our cache (so the target's Nix never registers a deriver a server made up)."""
    victim, _ = victim_and_donor(upstream)
    forged = replace(victim, deriver=f"{'0' * 32}-evil.drv")
    server.faults.replace[f"{victim.store_path.hash_part}.narinfo"] = forged.render().encode()
    dest = tmp_path / "cache"
    run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert any(info.deriver for info in upstream_infos(upstream).values())
    assert [info.deriver for info in upstream_infos(dest).values() if info.deriver] == []
    assert b"evil.drv" not in b"".join(p.read_bytes() for p in dest.glob("*.narinfo"))
    assert verify_cache(dest, [media_key.public()], jobs=2).ok


def test_decompression_bomb_is_cut_off_at_its_signed_narsize(
    server: FakeCache, upstream: Path, upstream_key: SecretKey, media_key: SecretKey, toplevel: str, tmp_path: Path
) -> None:
    """A small xz file that unpacks to 256 MiB, behind a signed narinfo with rewritten file fields:
    decompressed only to one byte past the signed NarSize, refused, and nothing of it kept."""
    victim, _ = victim_and_donor(upstream)
    bomb = lzma.compress(bytes(256 << 20), preset=9)
    assert len(bomb) < 64 << 10 and victim.nar_size < 16 << 20
    file_hash = Hash("sha256", hashlib.sha256(bomb).digest()).nix32()
    forged = replace(victim, url=f"nar/{file_hash.removeprefix('sha256:')}.nar.xz", compression="xz",
                     file_hash=file_hash, file_size=len(bomb))
    server.faults.replace[f"{victim.store_path.hash_part}.narinfo"] = forged.render().encode()
    server.faults.replace[forged.url] = bomb
    dest = tmp_path / "cache"
    with pytest.raises(InvalidMedia) as caught:
        run_prefetch(server.url, upstream_key, media_key, dest, toplevel)
    assert str(caught.value) == (f"{victim.store_path}: the NAR from {server.url} ({forged.url}) is damaged: "
                                 f"decompressed, it is longer than its signed NarSize {victim.nar_size}")
    assert not (dest / f"{victim.store_path.hash_part}.narinfo").exists()
    assert not (dest / forged.url).exists()
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) < 64 << 20  # nothing unpacked to disk
