"""The intactness check's verdicts, remembered between runs in the cache's `intact.state`.

`writer.is_intact` parses each narinfo and re-signs its fingerprint: most of an unchanged
rerun. That part of its verdict depends only on the narinfo's bytes and the key, so it is
remembered by the sha256 of those bytes: a record says "the narinfo whose bytes have this
sha256 parses, is signed by this key and gives this NarHash, NarSize, URL and FileSize". A
narinfo changed in any way (however its inode, size or times look) has another sha256 and is
checked in full again; the NAR file's size is still checked on every run, as before.

The file is authenticated (HMAC-SHA256 under a key derived from the signing key), so whoever can
write the cache but does not hold the key cannot make a narinfo count as intact: a forged, torn
or damaged state file, or one written under another key, is ignored whole and written afresh.
It is trusted as far as the narinfo signatures it stands for, and never copied to media.

    mediabuilder-intact-1 <hmac hex>
    {"<hashpart>": ["<sha256 hex of the narinfo>", "sha256:<NarHash>", NarSize, "URL", FileSize], ...}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass

from mediabuilder.cache.layout import INTACT_STATE, BinaryCache, write_atomic
from mediabuilder.store.keys import SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath

MAGIC = b"mediabuilder-intact-1"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NARINFO_NAME = re.compile(r"([0-9a-df-np-sv-z]{32})\.narinfo")


@dataclass(frozen=True)
class Verdict:
    """What a narinfo signed by the key says about its NAR (what is_intact compares)."""

    nar_hash: str
    nar_size: int
    url: str
    file_size: int | None

    @classmethod
    def of(cls, narinfo: NarInfo) -> Verdict:
        return cls(narinfo.nar_hash, narinfo.nar_size, narinfo.url, narinfo.file_size)


def _record(value: object) -> tuple[str, Verdict] | None:
    """One record as written by `save`, or None for anything else."""
    if not isinstance(value, list) or len(value) != 5:
        return None
    digest, nar_hash, nar_size, url, file_size = value
    if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest) and isinstance(nar_hash, str)
            and type(nar_size) is int and isinstance(url, str) and (file_size is None or type(file_size) is int)):
        return None
    return digest, Verdict(nar_hash, nar_size, url, file_size)


class IntactRecords:
    """The verdicts of `cache`'s narinfos under `key`: loaded once, saved when they changed."""

    def __init__(self, cache: BinaryCache, key: SecretKey) -> None:
        self._cache = cache
        self._file = cache.root / INTACT_STATE
        # Bound to the key's name and secret: another key's records do not authenticate.
        self._mac_key = hashlib.sha256(b"mediabuilder intact state\0" + key.name.encode() + b"\0" + key.key).digest()
        self._records = self._load()
        self._changed = False

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).hexdigest().encode()

    def _load(self) -> dict[str, tuple[str, Verdict]]:
        try:
            data = self._file.read_bytes()
        except OSError:
            return {}
        head, _, body = data.partition(b"\n")
        magic, _, mac = head.partition(b" ")
        if magic != MAGIC or not hmac.compare_digest(mac, self._mac(body)):
            return {}
        try:
            raw = json.loads(body)
        except ValueError:
            return {}
        if not isinstance(raw, dict):
            return {}
        records = {}
        for hash_part, value in raw.items():
            record = _record(value)
            if record is None:
                return {}
            records[hash_part] = record
        return records

    def get(self, path: StorePath, narinfo: bytes) -> Verdict | None:
        """The verdict recorded for `path`'s narinfo holding exactly `narinfo`, else None."""
        record = self._records.get(path.hash_part)
        if record is None or record[0] != hashlib.sha256(narinfo).hexdigest():
            return None
        return record[1]

    def remember(self, narinfo: bytes, parsed: NarInfo) -> None:
        """Record that `narinfo` (its bytes) parses as `parsed`, which `key` signed."""
        record = (hashlib.sha256(narinfo).hexdigest(), Verdict.of(parsed))
        if self._records.get(parsed.store_path.hash_part) != record:
            self._records[parsed.store_path.hash_part] = record
            self._changed = True

    def save(self) -> None:
        """Write the records when they changed, less those of narinfos no longer in the cache."""
        if not self._changed:
            return
        with os.scandir(self._cache.root) as entries:
            present = {m.group(1) for e in entries if (m := _NARINFO_NAME.fullmatch(e.name))}
        body = json.dumps({h: [d, v.nar_hash, v.nar_size, v.url, v.file_size]
                           for h, (d, v) in sorted(self._records.items()) if h in present},
                          separators=(",", ":")).encode()
        write_atomic(self._file, MAGIC + b" " + self._mac(body) + b"\n" + body, mode=0o600)
        self._changed = False
