"""What Nix knows about a valid store path, read from every shape of `nix path-info --json`.

- up to Nix 2.18: a list of objects, each with its full `path` (invalid ones: `"valid": false`);
- from 2.19: an object keyed by full path (`null` for an invalid path; absent fields `null` from 2.23);
- from 2.33 with `--json-format 2`: `{"version": 2, "storeDir": ..., "info": {base name: {...}}}`,
  references as base names, `ca` as `{"method": ..., "hash": "sha256-..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store.hashes import Hash
from mediabuilder.store.storepath import STORE_DIR, StorePath


@dataclass(frozen=True)
class PathInfo:
    path: StorePath
    nar_hash: Hash
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: StorePath | None = None
    sigs: tuple[str, ...] = ()
    # Content address in narinfo form ("fixed:r:sha256:<nix32>", "text:sha256:..."), or None.
    ca: str | None = None


_CA_METHODS = {"nar": "fixed:r:", "flat": "fixed:", "text": "text:"}


def _ca(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("method") in _CA_METHODS:
        digest = _hash(value.get("hash"))
        return _CA_METHODS[value["method"]] + digest.nix32()
    raise FormatError(f"nix path-info: unknown content address {value!r}")


def _hash(value: Any) -> Hash:
    if isinstance(value, str):
        return Hash.parse(value)
    if isinstance(value, dict) and "algorithm" in value and "hash" in value:
        return Hash.parse(f"{value['algorithm']}-{value['hash']}" if value.get("format", "base64") == "base64"
                          else f"{value['algorithm']}:{value['hash']}")
    raise FormatError(f"nix path-info: cannot read hash {value!r}")


def _store_path(text: str, store_dir: str) -> StorePath:
    if not text.startswith("/"):
        text = f"{store_dir}/{text}"
    return StorePath.parse(text)


def _one(key: str, obj: dict[str, Any], store_dir: str) -> PathInfo:
    deriver = obj.get("deriver")
    return PathInfo(
        path=_store_path(key, store_dir),
        nar_hash=_hash(obj["narHash"]),
        nar_size=int(obj["narSize"]),
        references=tuple(sorted(_store_path(r, store_dir) for r in obj.get("references") or ())),
        deriver=_store_path(deriver, store_dir) if deriver else None,
        sigs=tuple(obj.get("signatures") or ()),
        ca=_ca(obj.get("ca")),
    )


def parse_path_info_json(text: str | bytes) -> list[PathInfo]:
    """Parse `nix path-info --json` output of any Nix version; invalid paths are an error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"nix path-info printed invalid JSON: {e}") from None
    store_dir = STORE_DIR
    entries: list[tuple[str, Any]]
    if isinstance(data, list):
        entries = [(obj.get("path", ""), None if obj.get("valid") is False else obj) for obj in data]
    elif isinstance(data, dict) and isinstance(data.get("info"), dict) and "version" in data:
        store_dir = data.get("storeDir", STORE_DIR)
        entries = list(data["info"].items())
    elif isinstance(data, dict):
        entries = list(data.items())
    else:
        raise FormatError("nix path-info printed JSON of an unknown shape")
    invalid = [key for key, obj in entries if obj is None]
    if invalid:
        raise InvalidInput(f"not valid in the Nix store: {', '.join(invalid)}",
                           hint="build or realise the paths first")
    try:
        return [_one(key, obj, store_dir) for key, obj in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"nix path-info: unexpected entry ({e!r})") from None
