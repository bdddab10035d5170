"""Store paths: parsing, Nix's name rules, and Nix's path computation against known paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import path_info

from mediabuilder.errors import FormatError
from mediabuilder.store.hashes import Hash
from mediabuilder.store.nar import nar_hash_and_size
from mediabuilder.store.storepath import (
    STORE_DIR,
    StorePath,
    compress_hash,
    make_fixed_output_path,
    make_store_path,
    make_text_path,
)

HASH = "ab3li50xq0nl4q5lxdyinb8w8y13my9s"


def nix_env() -> dict[str, str]:
    return {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nbuild-users-group =\n"
        "sandbox = false\nsubstituters =\nflake-registry =",
    }


def test_parse_full_and_base() -> None:
    full = StorePath.parse(f"/nix/store/{HASH}-hello-2.12.1")
    base = StorePath.parse(f"{HASH}-hello-2.12.1")
    assert full == base
    assert full.hash_part == HASH
    assert full.name == "hello-2.12.1"
    assert full.base == f"{HASH}-hello-2.12.1"
    assert full.full == f"{STORE_DIR}/{HASH}-hello-2.12.1"
    assert str(full) == full.full


def test_allowed_characters_and_length() -> None:
    name = "aZ09+-._?=" + "x" * 201
    assert len(name) == 211
    assert StorePath.parse(f"{HASH}-{name}").name == name
    assert StorePath.parse(f"{HASH}-a.b").name == "a.b"


def test_ordering_is_by_base_name() -> None:
    a = StorePath.parse("0" * 32 + "-zz")
    b = StorePath.parse("0" * 31 + "1-aa")
    c = StorePath.parse("0" * 32 + "-zz-more")
    assert sorted([b, c, a]) == [a, c, b]
    assert [p.base for p in sorted([b, c, a])] == sorted([a.base, b.base, c.base])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"/nix/var/{HASH}-x", "not in the Nix store"),
        (f"/nix/store/{HASH}-x/bin", "has a '/'"),
        (f"{HASH}", "not <32-character hash>-<name>"),
        (f"{HASH}-", "not <32-character hash>-<name>"),
        (f"{HASH}_x", "not <32-character hash>-<name>"),
        (f"{HASH[:-1]}-x", "not <32-character hash>-<name>"),
        (f"{HASH[:-1]}e-x", "not 32 nix32"),
        (f"{HASH.upper()}-x", "not 32 nix32"),
        (f"{HASH}-a b", "invalid character ' '"),
        (f"{HASH}-caf\u00e9", "invalid character"),
        (f"{HASH}-a:b", "invalid character ':'"),
        (f"{HASH}-.hidden", "starts with '.'"),
        (f"{HASH}-" + "x" * 212, "longer than 211"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        StorePath.parse(text)


def test_constructor_checks() -> None:
    with pytest.raises(FormatError, match="is empty"):
        StorePath(HASH, "")
    with pytest.raises(FormatError, match="not 32 nix32"):
        StorePath("e" * 32, "ok")


def test_compress_hash() -> None:
    digest = bytes(range(32))
    out = compress_hash(digest, 20)
    assert len(out) == 20
    assert out[0] == 0 ^ 20 and out[11] == 11 ^ 31 and out[12] == 12


def test_known_paths() -> None:
    # All three computed by Nix 2.8 for the file "hi\n" named f and builtins.toFile "dep" "hello".
    nar_hash = Hash.parse("sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h")
    assert make_fixed_output_path(True, nar_hash, "f").base == "ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
    assert make_store_path("source", nar_hash.digest, "f").base == "ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
    flat = make_fixed_output_path(False, Hash.sha256(b"hi\n"), "f")
    assert flat.base == "hrbblgbxbvz8al5a8l85i8giajyajiwj-f"
    assert make_text_path(b"hello", "dep").base == "i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep"


def test_make_rejects_bad_names() -> None:
    with pytest.raises(FormatError):
        make_store_path("source", b"\0" * 32, "bad name")
    with pytest.raises(FormatError, match="only recursive sha256"):
        make_fixed_output_path(False, Hash.sha256(b""), "x", [StorePath.parse(f"{HASH}-x")])


def _nix(*args: str) -> str:
    return subprocess.run(list(args), env=nix_env(), check=True, capture_output=True, text=True).stdout


@pytest.mark.integration
def test_matches_nix_store_add(tmp_path: Path) -> None:
    tree = tmp_path / "my-tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data").write_bytes(os.urandom(1000))
    (tree / "link").symlink_to("sub/data")
    nar_hash, nar_size = nar_hash_and_size(tree)
    added = _nix("nix-store", "--add", str(tree)).strip()
    assert make_fixed_output_path(True, nar_hash, "my-tree").full == added
    assert make_store_path("source", nar_hash.digest, "my-tree").full == added
    info = path_info(added)
    assert info["ca"] == f"fixed:r:{nar_hash.nix32()}"
    assert info["narSize"] == nar_size

    flat = tmp_path / "flat-file"
    flat.write_bytes(os.urandom(300))
    added_flat = _nix("nix-store", "--add-fixed", "sha256", str(flat)).strip()
    assert make_fixed_output_path(False, Hash.sha256(flat.read_bytes()), "flat-file").full == added_flat
