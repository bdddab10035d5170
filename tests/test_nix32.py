"""nix32 and Hash: known vectors checked against `nix-hash --to-base32`, round trips, errors."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from mediabuilder.errors import FormatError
from mediabuilder.store import nix32
from mediabuilder.store.hashes import Hash

EMPTY_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_NIX32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
EMPTY_SRI = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
HI_NIX32 = "1r3v22qkypccqifzbww5lrn6hf1chi23m6zzkyvb8bvg457nxslq"  # sha256("hi\n"), from nix-hash


def nix_env() -> dict[str, str]:
    return {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nbuild-users-group =\n"
        "sandbox = false\nsubstituters =\nflake-registry =",
    }


def test_known_vectors() -> None:
    assert nix32.encode(bytes.fromhex(EMPTY_HEX)) == EMPTY_NIX32
    assert nix32.encode(hashlib.sha256(b"hi\n").digest()) == HI_NIX32
    assert nix32.decode(EMPTY_NIX32).hex() == EMPTY_HEX


def test_lengths() -> None:
    assert nix32.encoded_length(20) == 32
    assert nix32.encoded_length(32) == 52
    assert nix32.encoded_length(64) == 103
    assert nix32.encode(b"") == ""
    assert nix32.decode("") == b""
    assert nix32.encode(b"\x00" * 20) == "0" * 32
    assert nix32.encode(b"\x01") == "01"
    assert nix32.encode(b"\x1f") == "0z"
    assert nix32.encode(b"\xff") == "7z"


@pytest.mark.parametrize("size", [1, 2, 5, 16, 20, 32, 64])
def test_round_trip(size: int) -> None:
    for seed in range(20):
        data = hashlib.sha512(bytes([size, seed])).digest()[:size]
        text = nix32.encode(data)
        assert len(text) == nix32.encoded_length(size)
        assert nix32.decode(text) == data
        assert nix32.is_valid(text, size)


@pytest.mark.parametrize("text", ["e" * 52, "u" * 52, "o" * 52, "t" * 52, "A" * 52, "0" * 51 + "!"])
def test_decode_rejects_bad_characters(text: str) -> None:
    with pytest.raises(FormatError, match="invalid character"):
        nix32.decode(text)


@pytest.mark.parametrize("length", [1, 3, 6, 51, 54])
def test_decode_rejects_impossible_length(length: int) -> None:
    with pytest.raises(FormatError, match="impossible length"):
        nix32.decode("0" * length)


def test_decode_rejects_overflow() -> None:
    # 52 characters hold 260 bits; the top digit of a sha256 may only be 0 or 1.
    assert nix32.decode("1" + "0" * 51)[-1] == 0x80
    with pytest.raises(FormatError, match="beyond 32 bytes"):
        nix32.decode("2" + "0" * 51)
    assert nix32.is_valid("z" * 32, 20)
    assert not nix32.is_valid("z" * 31, 20)


def test_hash_spellings() -> None:
    h = Hash.sha256(b"")
    assert h.hex() == EMPTY_HEX
    assert h.nix32() == f"sha256:{EMPTY_NIX32}"
    assert h.sri() == EMPTY_SRI
    assert str(h) == h.nix32()
    for text in (h.nix32(), f"sha256:{EMPTY_HEX}", EMPTY_SRI, f"sha256:{EMPTY_SRI[7:]}"):
        assert Hash.parse(text) == h


def test_hash_other_algorithms() -> None:
    sha1 = Hash("sha1", hashlib.sha1(b"x").digest())
    assert Hash.parse(sha1.nix32()) == sha1
    assert Hash.parse(sha1.sri()) == sha1
    assert Hash.parse(f"sha1:{sha1.hex()}") == sha1
    sha512 = Hash("sha512", hashlib.sha512(b"x").digest())
    assert Hash.parse(sha512.nix32()) == sha512
    assert Hash.parse(sha512.sri()) == sha512


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EMPTY_NIX32, "no algorithm prefix"),
        (f"sha3:{EMPTY_NIX32}", "unknown algorithm"),
        (f"sha256:{EMPTY_NIX32[:-1]}", "wrong length"),
        (f"sha256:{EMPTY_HEX[:-1]}g", "invalid hexadecimal"),
        (f"sha256:{EMPTY_NIX32[:-1]}e", "invalid character"),
        ("sha256-" + "!" * 44, "invalid base64"),
        (f"sha256-{EMPTY_NIX32}", "wrong length"),
        ("sha1-" + EMPTY_SRI[7:], "wrong length"),
    ],
)
def test_hash_parse_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Hash.parse(text)


def test_hash_constructor_checks() -> None:
    with pytest.raises(FormatError, match="unknown hash algorithm"):
        Hash("crc32", b"1234")
    with pytest.raises(FormatError, match="31 bytes, not 32"):
        Hash("sha256", b"\0" * 31)


@pytest.mark.integration
def test_against_nix_hash() -> None:
    for data in (b"", b"hi\n", bytes(range(256)) * 3):
        h = Hash.sha256(data)
        out = subprocess.run(
            ["nix-hash", "--type", "sha256", "--to-base32", h.hex()],
            env=nix_env(), check=True, capture_output=True, text=True,
        ).stdout.strip()
        assert f"sha256:{out}" == h.nix32()
        sri = subprocess.run(
            ["nix", "hash", "to-sri", h.nix32()], env=nix_env(), check=True, capture_output=True, text=True
        ).stdout.strip()
        assert sri == h.sri()
