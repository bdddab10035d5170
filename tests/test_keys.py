"""Signing keys: Nix's key file formats and signatures, byte for byte."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import path_info

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import PublicKey, SecretKey, write_key_pair
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.storepath import StorePath

# Made by `nix-store --generate-binary-cache-key test1 sk pk` (Nix 2.8).
SECRET = "test1:JNwdT9VpL8/mgVzW2NiJBrp9gfnDzXhVCMqM812Ku/ppHjKSgs2mVQdB9j5KmySHsF/Kmwk+2yM6n0KPXFvMXw=="
PUBLIC = "test1:aR4ykoLNplUHQfY+Spskh7BfypsJPtsjOp9Cj1xbzF8="
FINGERPRINT = (
    b"1;/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f;"
    b"sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;"
)
SIG = "test1:hGe9pyDXGTsfY7cd7mMDmVU5rk7oMCEwXWs5EiTw9TcukYw4i7APHez/ZrqBsCFS+0m3Cg5F9odhC90TNAdvBQ=="


def nix_env() -> dict[str, str]:
    return {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nbuild-users-group =\n"
        "sandbox = false\nsubstituters =\nflake-registry =",
    }


def test_known_key_and_signature() -> None:
    secret = SecretKey.parse(SECRET)
    assert secret.name == "test1"
    assert secret.render() == SECRET
    assert secret.public().render() == PUBLIC
    assert PublicKey.parse(PUBLIC) == secret.public()
    assert secret.sign(FINGERPRINT) == SIG
    public = PublicKey.parse(PUBLIC)
    assert public.verify(FINGERPRINT, SIG)
    assert SECRET not in repr(secret)


def test_verify_rejects() -> None:
    public = PublicKey.parse(PUBLIC)
    assert not public.verify(FINGERPRINT + b"x", SIG)
    assert not public.verify(FINGERPRINT, SIG.replace("test1:", "test2:"))
    assert not public.verify(FINGERPRINT, "test1:not base64!")
    assert not public.verify(FINGERPRINT, "test1:" + base64.b64encode(b"\0" * 63).decode())
    assert not public.verify(FINGERPRINT, "test1:" + base64.b64encode(b"\0" * 64).decode())
    assert not public.verify(FINGERPRINT, "no colon")
    other = SecretKey.generate("test1")
    assert not other.public().verify(FINGERPRINT, SIG)


def test_generate() -> None:
    a, b = SecretKey.generate("cache-1"), SecretKey.generate("cache-1")
    assert a != b
    assert a.public().verify(b"x", a.sign(b"x"))
    assert SecretKey.parse(a.render()) == a
    for bad in ("a:b", "", "my key", "clé-1", "-x", "a" * 101, "tab\tname"):
        with pytest.raises(InvalidInput) as info:
            SecretKey.generate(bad)
        assert str(info.value) == (f"key name {bad!r}: must be 1-100 ASCII letters, digits, '.', '_', '+' or '-', "
                                   "starting with a letter or digit")
    assert SecretKey.generate("cache.nixos.org-1").name == "cache.nixos.org-1"


def test_key_names_nix_conf_cannot_hold_are_refused_when_read() -> None:
    """A public key file whose name has a space would be two entries of trusted-public-keys."""
    b64 = PUBLIC.partition(":")[2]
    with pytest.raises(FormatError, match="name 'my key' is not 1-100 ASCII letters"):
        PublicKey.parse(f"my key:{b64}", source="k.pub")


def test_public_fingerprint() -> None:
    fp = PublicKey.parse(PUBLIC).fingerprint()
    assert fp == "263c:5992:fc0c:79cb:1bb7:0ee1:5e57:c22b"  # `base64 -d | sha256sum` of the key, first 128 bits
    assert fp.split(":") == [Hash.sha256(PublicKey.parse(PUBLIC).key).hex()[i : i + 4] for i in range(0, 32, 4)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "not 'name:base64'"),
        (":" + SECRET.split(":")[1], "not 'name:base64'"),
        ("k:!!!!", "not valid base64"),
        ("k:" + base64.b64encode(b"\0" * 32).decode(), "32 bytes, not 64"),
        ("k:" + base64.b64encode(b"\0" * 64).decode(), "does not match its seed"),
    ],
)
def test_secret_parse_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message) as info:
        SecretKey.parse(text, "keys/secret")
    assert str(info.value).startswith("keys/secret: ")


def test_public_parse_errors() -> None:
    with pytest.raises(FormatError, match="64 bytes, not 32"):
        PublicKey.parse(SECRET)
    with pytest.raises(FormatError, match="not 'name:base64'"):
        PublicKey.parse("")


def test_non_ascii_base64_is_a_format_error() -> None:
    """A byte flipped in a key or signature read from a medium: refused, not a ValueError."""
    flipped = PUBLIC[:10] + "\u00e9" + PUBLIC[11:]
    with pytest.raises(FormatError, match="is not valid base64"):
        PublicKey.parse(flipped, "media-key.pub")
    assert not PublicKey.parse(PUBLIC).verify(FINGERPRINT, SIG[:10] + "\u00e9" + SIG[11:])
    with pytest.raises(FormatError, match="invalid base64 digest"):
        Hash.parse("sha256-" + "\u00e9" * 43 + "=")


def test_load(tmp_path: Path) -> None:
    (tmp_path / "sk").write_text(SECRET + "\n")
    assert SecretKey.load(tmp_path / "sk").render() == SECRET
    with pytest.raises(InvalidInput, match=f"{tmp_path}/missing: cannot read key file"):
        SecretKey.load(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="cannot read key file"):
        PublicKey.load(tmp_path)
    (tmp_path / "bad").write_text("garbage")
    with pytest.raises(FormatError, match=f"{tmp_path}/bad: public key is not"):
        PublicKey.load(tmp_path / "bad")


def test_write_key_pair(tmp_path: Path) -> None:
    secret = write_key_pair("media-1", tmp_path / "sk", tmp_path / "pk")
    assert SecretKey.load(tmp_path / "sk") == secret
    assert PublicKey.load(tmp_path / "pk") == secret.public()
    assert stat.S_IMODE(os.stat(tmp_path / "sk").st_mode) == 0o600
    assert (tmp_path / "sk").read_text() == secret.render()  # no newline, as Nix writes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk", "sk"]
    with pytest.raises(InvalidInput, match="already exists"):
        write_key_pair("media-1", tmp_path / "sk2", tmp_path / "pk")
    assert not (tmp_path / "sk2").exists()


def _run(*args: str) -> str:
    return subprocess.run(list(args), env=nix_env(), check=True, capture_output=True, text=True).stdout


@pytest.mark.integration
def test_against_nix(tmp_path: Path) -> None:
    sk, pk = tmp_path / "sk", tmp_path / "pk"
    _run("nix-store", "--generate-binary-cache-key", "keys-test-1", str(sk), str(pk))
    secret, public = SecretKey.load(sk), PublicKey.load(pk)
    assert secret.public() == public
    assert secret.render() == sk.read_text()
    assert public.render() == pk.read_text()

    (tmp_path / "file").write_bytes(os.urandom(100))
    path = _run("nix-store", "--add", str(tmp_path / "file")).strip()
    _run("nix", "store", "sign", "--key-file", str(sk), path)
    info = path_info(path, "--sigs")
    sigs = [s for s in info["signatures"] if s.startswith("keys-test-1:")]
    assert len(sigs) == 1
    narinfo = NarInfo(
        store_path=StorePath.parse(path),
        url="nar/x.nar",
        compression="none",
        file_hash=None,
        file_size=None,
        nar_hash=Hash.parse(info["narHash"]).nix32(),
        nar_size=info["narSize"],
        references=tuple(sorted(StorePath.parse(r).base for r in info["references"])),
    )
    assert secret.sign(narinfo.fingerprint()) == sigs[0]
    assert public.verify(narinfo.fingerprint(), sigs[0])


@pytest.mark.integration
def test_nix_accepts_our_keys(tmp_path: Path) -> None:
    """A pair written by write_key_pair signs with `nix store sign`, giving our own signature."""
    write_key_pair("ours-1", tmp_path / "sk", tmp_path / "pk")
    secret = SecretKey.load(tmp_path / "sk")
    (tmp_path / "file").write_bytes(os.urandom(100))
    path = _run("nix-store", "--add", str(tmp_path / "file")).strip()
    _run("nix", "store", "sign", "--key-file", str(tmp_path / "sk"), path)
    info = path_info(path, "--sigs")
    narinfo = NarInfo(StorePath.parse(path), "nar/x.nar", "none", None, None,
                      Hash.parse(info["narHash"]).nix32(), info["narSize"])
    assert secret.sign(narinfo.fingerprint()) in info["signatures"]
    _run("nix", "store", "verify", "--sigs-needed", "1", "--trusted-public-keys",
         (tmp_path / "pk").read_text(), path)
