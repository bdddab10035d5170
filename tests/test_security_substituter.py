"""A hostile substituter: what its narinfos do not sign (URL, FileHash, FileSize, Compression) is
not trusted, and nothing it could swap in stays in our cache or counts as present later.

The narinfo signature covers StorePath, NarHash, NarSize and References only. A server (or
anyone in between) can point a correctly signed narinfo at another file; every NAR is therefore
decompressed and checked against the signed NarHash and NarSize before it is taken in.
"""

# ruff: noqa: F811 - the fixtures of test_substituter, imported, are test arguments here
from __future__ import annotations

import hashlib
import lzma
from dataclasses import replace
from pathlib import Path

import pytest
from fakecache_server import FakeCache
from test_substituter import (  # noqa: F401 - fixtures
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
from mediabuilder.errors import InvalidMedia
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo

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
