"""narinfo: parse and render byte-exact with what `nix copy --to file://` writes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from mediabuilder.errors import FormatError
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo

# Written by Nix 2.8 (`nix copy --to file://...`), signed with the key below by `nix store sign`.
SIGNED = """\
StorePath: /nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f
URL: nar/09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d.nar.xz
Compression: xz
FileHash: sha256:09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d
FileSize: 124
NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
NarSize: 120
References: \n\
Sig: test1:hGe9pyDXGTsfY7cd7mMDmVU5rk7oMCEwXWs5EiTw9TcukYw4i7APHez/ZrqBsCFS+0m3Cg5F9odhC90TNAdvBQ==
CA: fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
"""
SECRET = "test1:JNwdT9VpL8/mgVzW2NiJBrp9gfnDzXhVCMqM812Ku/ppHjKSgs2mVQdB9j5KmySHsF/Kmwk+2yM6n0KPXFvMXw=="

WITH_REFS = """\
StorePath: /nix/store/3jm669s727qr8n9kj9k59c894z1l3adz-withref
URL: nar/01hp1av24rljsmn51rjf83sikw3fzw6zwg8i7csaf5s4j6wscc68.nar.xz
Compression: xz
FileHash: sha256:01hp1av24rljsmn51rjf83sikw3fzw6zwg8i7csaf5s4j6wscc68
FileSize: 172
NarHash: sha256:11p6ixb7vjpqqm75nwbjzp7540k0vzl35m7jc0w5g3f1j8gs3fdn
NarSize: 160
References: i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep
Deriver: 39ys2w5gscx83678zxlca6rhxkddq35b-withref.drv
"""


def nix_env() -> dict[str, str]:
    return {
        **os.environ,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nbuild-users-group =\n"
        "sandbox = false\nsubstituters =\nflake-registry =",
    }


def test_parse_and_render_known() -> None:
    info = NarInfo.parse(SIGNED, "ab3li50xq0nl4q5lxdyinb8w8y13my9s.narinfo")
    assert info.store_path.base == "ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
    assert info.compression == "xz"
    assert info.file_size == 124
    assert info.nar_size == 120
    assert info.references == ()
    assert info.deriver is None
    assert info.ca == "fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    assert len(info.sigs) == 1
    assert info.render() == SIGNED
    assert info.fingerprint() == (
        b"1;/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f;"
        b"sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;"
    )
    key = SecretKey.parse(SECRET)
    assert key.sign(info.fingerprint()) == info.sigs[0]
    assert key.public().verify(info.fingerprint(), info.sigs[0])


def test_references_and_deriver() -> None:
    info = NarInfo.parse(WITH_REFS)
    assert info.references == ("i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep",)
    assert info.deriver == "39ys2w5gscx83678zxlca6rhxkddq35b-withref.drv"
    assert [p.name for p in info.reference_paths()] == ["dep"]
    assert info.render() == WITH_REFS
    assert info.fingerprint().endswith(b";160;/nix/store/i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep")


def test_references_sorted_and_fingerprint_comma_joined() -> None:
    text = WITH_REFS.replace(
        "References: i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep",
        "References: zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-b 00000000000000000000000000000000-a",
    )
    info = NarInfo.parse(text)
    assert info.references == ("00000000000000000000000000000000-a", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-b")
    assert info.fingerprint().endswith(
        b";160;/nix/store/00000000000000000000000000000000-a,/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-b"
    )


def test_defaults_unknown_keys_and_other_hash_spellings() -> None:
    text = (
        "StorePath: /nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f\n"
        "URL: nar/x.nar.bz2\n"
        "System: x86_64-linux\n"
        "NarHash: sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=\n"
        "NarSize: 120\n"
        "Deriver: unknown-deriver\n"
    )
    info = NarInfo.parse(text)
    assert info.compression == "bzip2"
    assert info.nar_hash == "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
    assert info.file_hash is None and info.file_size is None and info.deriver is None
    assert info.references == ()
    assert info.render() == (
        "StorePath: /nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f\n"
        "URL: nar/x.nar.bz2\n"
        "Compression: bzip2\n"
        "NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h\n"
        "NarSize: 120\n"
        "References: \n"
    )


def test_with_sigs_and_replace() -> None:
    info = NarInfo.parse(SIGNED)
    unsigned = info.with_sigs(())
    assert "Sig:" not in unsigned.render()
    two = info.with_sigs(("a:x", "b:y"))
    assert two.render().count("\nSig: ") == 2
    assert NarInfo.parse(two.render()) == two
    assert dataclasses.replace(info, compression="zstd").compression == "zstd"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("StorePath: /nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f\n", "", "missing StorePath"),
        ("URL: nar/09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d.nar.xz\n", "", "missing URL"),
        ("NarSize: 120\n", "", "missing NarSize"),
        ("NarSize: 120\n", "NarSize: 12x\n", "NarSize: '12x' is not a number"),
        ("NarSize: 120\n", "NarSize: 0\n", "not a positive size"),
        ("FileSize: 124\n", "FileSize: -1\n", "FileSize: '-1' is not a number"),
        ("NarHash: sha256:1", "NarHash: sha256:e", "NarHash: .*invalid character"),
        ("NarHash: sha256:", "NarHash: md5:", "NarHash: .*wrong length"),
        ("StorePath: /nix/store/ab3", "StorePath: /nix/store/AB3", "not 32 nix32"),
        ("References: ", "References: /nix/store/i34iv240fwy3jw8qp0mlmayyq3s4lm40-dep", "base names"),
        ("References: ", "References: nonsense", "References: store path 'nonsense'"),
        ("CA: ", "CA:", "line 10: 'CA:fixed"),
        ("Compression: xz\n", "Compression: xz\nCompression: none\n", "line 4: Compression appears twice"),
        ("URL: ", "URL: \nX: ", "URL is empty"),
    ],
)
def test_parse_errors(old: str, new: str, message: str) -> None:
    assert old in SIGNED
    with pytest.raises(FormatError, match=message) as info:
        NarInfo.parse(SIGNED.replace(old, new, 1), "cache/ab3.narinfo")
    assert str(info.value).startswith("cache/ab3.narinfo: ")


def test_fingerprint_requires_sha256_nix32() -> None:
    sri = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY="
    info = dataclasses.replace(NarInfo.parse(SIGNED), nar_hash=sri)
    with pytest.raises(FormatError, match="is not sha256:<nix32>"):
        info.fingerprint()


def _run(*args: str) -> str:
    return subprocess.run(list(args), env=nix_env(), check=True, capture_output=True, text=True).stdout


@pytest.mark.integration
def test_nix_copy_cache_round_trip(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(64))
    sk, pk = tmp_path / "sk", tmp_path / "pk"
    _run("nix-store", "--generate-binary-cache-key", "narinfo-test-1", str(sk), str(pk))
    dep = _run("nix-store", "--add", str(tmp_path / "f")).strip()
    expr = (
        f'derivation {{ name = "user-{os.getpid()}"; system = builtins.currentSystem; builder = "/bin/sh";'
        f' args = ["-c" "echo ${{builtins.storePath "{dep}"}} {tmp_path} > $out"]; }}'
    )
    built = _run("nix-build", "--no-out-link", "-E", expr).strip()
    _run("nix", "store", "sign", "--key-file", str(sk), dep, built)
    cache = tmp_path / "cache"
    for compression in ("xz", "none"):
        _run("nix", "copy", "--to", f"file://{cache}-{compression}?compression={compression}", built)
        files = sorted((tmp_path / f"cache-{compression}").glob("*.narinfo"))
        assert len(files) == 2
        key = SecretKey.load(sk)
        public = PublicKey.load(pk)
        for file in files:
            text = file.read_text()
            info = NarInfo.parse(text, str(file))
            assert info.render() == text
            assert file.name == f"{info.store_path.hash_part}.narinfo"
            assert info.compression == compression
            assert len(info.sigs) == 1
            assert key.sign(info.fingerprint()) == info.sigs[0]
            assert public.verify(info.fingerprint(), info.sigs[0])
            if info.store_path.full == built:
                assert info.references == (dep.removeprefix("/nix/store/"),)
                assert info.deriver is not None and info.deriver.endswith(".drv")
            else:
                assert info.ca is not None and info.ca.startswith("fixed:r:sha256:")


def test_cache_reads_a_narinfo_again_only_when_its_file_changed(tmp_path: Path) -> None:
    from mediabuilder.cache.layout import BinaryCache
    from mediabuilder.errors import InvalidMedia

    cache = BinaryCache(tmp_path / "cache")
    cache.create()
    info = NarInfo.parse(SIGNED, source="test")
    cache.write_narinfo(info)
    first = cache.read_narinfo(info.store_path)
    assert first == info
    assert cache.read_narinfo(info.store_path) is first  # parsed once
    other = dataclasses.replace(info, file_size=125)  # as long as before: same size, another file
    cache.write_narinfo(other)
    assert cache.read_narinfo(info.store_path) == other
    cache.narinfo_path(info.store_path).write_text(SIGNED.replace("FileSize: 124", "FileSize: 999"))  # in place
    assert cache.read_narinfo(info.store_path).file_size == 999
    cache.narinfo_path(info.store_path).unlink()
    with pytest.raises(InvalidMedia, match="missing"):
        cache.read_narinfo(info.store_path)
