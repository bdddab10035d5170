"""`mediabuilder cache` and `mediabuilder verify` against real Nix 2.8.

Nix accepts what we write (and only with our key), our NARs and narinfos are byte-exact with
Nix's own `nix copy --to file://`, signatures verify both ways, `verify` names each damaged path,
a run killed at any point leaves a cache that verifies and that a rerun completes, and bad input
is one line of error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Example,
    assert_one_line_error,
    closure_of,
    make_nix_env,
    nix,
    run_cli,
)

from mediabuilder.store.hashes import Hash
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo

pytestmark = pytest.mark.integration

COMPRESSIONS = ("zstd", "xz", "none")
SUMMARY = re.compile(r"Exporting NARs … (\d+) exported \(.*\), (\d+) already present")


# Fixtures


class Keys:
    def __init__(self, root: Path, name: str) -> None:
        self.secret_file = root / f"{name}.sec"
        self.public_file = root / f"{name}.pub"
        proc = run_cli("keygen", name, "--secret", self.secret_file, "--public", self.public_file)
        assert proc.returncode == 0, proc.stderr
        self.secret = SecretKey.load(self.secret_file)
        self.public = PublicKey.load(self.public_file)
        assert self.secret.public() == self.public

    @property
    def pub(self) -> str:
        return self.public.render()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"), "media-test-1")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("other-keys"), "intruder-1")


@pytest.fixture(scope="module")
def toplevel(example: Example) -> str:
    return example.toplevels["alpha"]


@pytest.fixture(scope="module")
def closure(toplevel: str) -> list[str]:
    paths = closure_of(toplevel)
    assert toplevel in paths
    return paths


@pytest.fixture(scope="module")
def path_infos(closure: list[str]) -> dict[str, dict[str, object]]:
    data = json.loads(nix("nix", "path-info", "--json", *closure).stdout)
    items = data if isinstance(data, list) else [{"path": k, **v} for k, v in data.items()]
    return {str(i["path"]): i for i in items}


@pytest.fixture(scope="module")
def made_cache(tmp_path_factory: pytest.TempPathFactory, toplevel: str, keys: Keys) -> Callable[[str], Path]:
    """`made_cache(compression)`: our cache of the alpha closure, made once per compression.
    Tests that damage a cache work on a copy (`copy_cache`)."""
    made: dict[str, Path] = {}

    def get(compression: str) -> Path:
        if compression not in made:
            cache = tmp_path_factory.mktemp(f"cache-{compression}") / "cache"
            proc = run_cli("cache", "--store-path", toplevel, "--cache", cache, "--compression", compression,
                           "--key", keys.secret_file)
            assert proc.returncode == 0, proc.stderr
            made[compression] = cache
        return made[compression]

    return get


def copy_cache(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def narinfos(cache: Path) -> dict[str, NarInfo]:
    """Full store path -> parsed narinfo."""
    result = {}
    for f in sorted(cache.glob("*.narinfo")):
        info = NarInfo.parse(f.read_text(), source=str(f))
        assert f.name == f"{info.store_path.hash_part}.narinfo"
        result[info.store_path.full] = info
    return result


def verify(cache: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("verify", cache, *args)


def fault_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stdout.splitlines() if ln.strip()]


# Nix accepts it


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_nix_copies_the_closure_from_our_cache(
    compression: str, made_cache: Callable[[str], Path], toplevel: str, closure: list[str], keys: Keys,
    tmp_path: Path,
) -> None:
    cache = made_cache(compression)
    assert sorted(narinfos(cache)) == closure
    root = tmp_path / "root"
    nix("nix", "copy", "--from", f"file://{cache}", "--to", root, toplevel,
        "--option", "trusted-public-keys", keys.pub)
    copied = nix("nix", "--store", root, "path-info", "-r", toplevel).stdout.split()
    assert sorted(copied) == closure
    nix("nix", "--store", root, "store", "verify", "--no-trust", "-r", toplevel)
    for path in closure:
        assert (root / path.lstrip("/")).exists() or (root / path.lstrip("/")).is_symlink()


def test_nix_refuses_our_cache_with_another_key(
    made_cache: Callable[[str], Path], toplevel: str, other_keys: Keys, tmp_path: Path
) -> None:
    proc = nix("nix", "copy", "--from", f"file://{made_cache('zstd')}", "--to", tmp_path / "root", toplevel,
               "--option", "trusted-public-keys", other_keys.pub, check=False)
    assert proc.returncode != 0
    assert not (tmp_path / "root" / toplevel.lstrip("/")).exists()
    # Nix 2.8: "lacks a valid signature"; 2.26: "lacks a signature by a trusted key".
    assert re.search(r"lacks a (valid )?signature", proc.stderr), proc.stderr


# Byte-exact with Nix


@pytest.fixture(scope="module")
def nix_cache(tmp_path_factory: pytest.TempPathFactory, toplevel: str) -> Path:
    """The same closure, written by Nix itself (`nix copy --to file://`)."""
    cache = tmp_path_factory.mktemp("nix-cache") / "cache"
    nix("nix", "copy", "--to", f"file://{cache}?compression=none", toplevel)
    return cache


def test_uncompressed_nars_hash_to_nix_narhash(
    made_cache: Callable[[str], Path], closure: list[str], path_infos: dict[str, dict[str, object]]
) -> None:
    cache = made_cache("none")
    infos = narinfos(cache)
    assert sorted(infos) == closure
    for path in closure:
        info = infos[path]
        assert info.compression == "none"
        assert info.url.endswith(".nar")
        data = (cache / info.url).read_bytes()
        digest = hashlib.sha256(data).digest()
        assert Hash("sha256", digest) == Hash.parse(str(path_infos[path]["narHash"])), path
        assert len(data) == path_infos[path]["narSize"] == info.nar_size == info.file_size
        assert info.file_hash == Hash("sha256", digest).nix32()


def test_narinfos_equal_nix_copy(
    made_cache: Callable[[str], Path], nix_cache: Path, closure: list[str]
) -> None:
    ours, theirs = narinfos(made_cache("none")), narinfos(nix_cache)
    assert sorted(ours) == sorted(theirs) == closure
    for path in closure:
        a, b = ours[path], theirs[path]
        assert (a.nar_hash, a.nar_size, a.references, a.deriver, a.ca) == \
            (b.nar_hash, b.nar_size, b.references, b.deriver, b.ca), path
        # Uncompressed, the files themselves are the same bytes.
        assert (made_cache("none") / a.url).read_bytes() == (nix_cache / b.url).read_bytes(), path
        assert a.fingerprint() == b.fingerprint()
    assert any(ours[p].deriver for p in closure)
    assert any(ours[p].references for p in closure)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_nix_store_verify_accepts_our_signatures(
    compression: str, made_cache: Callable[[str], Path], toplevel: str, keys: Keys, other_keys: Keys
) -> None:
    store = f"file://{made_cache(compression)}"
    good = nix("nix", "store", "verify", "--store", store, "-r", toplevel,
               "--option", "trusted-public-keys", keys.pub, check=False)
    assert good.returncode == 0, good.stderr
    bad = nix("nix", "store", "verify", "--store", store, "-r", toplevel,
              "--option", "trusted-public-keys", other_keys.pub, check=False)
    assert bad.returncode == 2, bad.stderr  # 2: some path is untrusted
    assert "untrusted" in bad.stderr


def test_our_verify_accepts_nix_signatures(
    toplevel: str, closure: list[str], tmp_path: Path
) -> None:
    # The local store keeps signatures across sessions: a fresh key name each time.
    name = f"nix-signed-{os.urandom(4).hex()}"
    nix_keys = Keys(tmp_path, name)
    nix("nix", "store", "sign", "--key-file", nix_keys.secret_file, "-r", toplevel)
    cache = tmp_path / "nix-signed"
    nix("nix", "copy", "--to", f"file://{cache}", toplevel)
    infos = narinfos(cache)
    assert sorted(infos) == closure
    for path, info in infos.items():
        sigs = [s for s in info.sigs if s.startswith(f"{name}:")]
        assert len(sigs) == 1, info.sigs
        assert nix_keys.public.verify(info.fingerprint(), sigs[0]), path
        assert not nix_keys.public.verify(info.fingerprint() + b"x", sigs[0])
    # ... and so does `mediabuilder verify` on the whole Nix-written (xz) cache.
    proc = verify(cache, "--trusted-key", nix_keys.pub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fault_lines(proc) == []


# verify


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_verify_intact_cache(compression: str, made_cache: Callable[[str], Path], closure: list[str],
                             keys: Keys, path_infos: dict[str, dict[str, object]]) -> None:
    cache = made_cache(compression)
    proc = verify(cache, "--trusted-key", keys.public_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    report = json.loads(verify(cache, "--trusted-key", keys.pub, "--json").stdout)
    assert report == {
        "target": str(cache),
        "ok": True,
        "paths": len(closure),
        "nar_bytes": sum(int(str(i["narSize"])) for i in path_infos.values()),
        "faults": [],
    }


def test_verify_with_another_key_fails_every_path(
    made_cache: Callable[[str], Path], closure: list[str], other_keys: Keys
) -> None:
    proc = verify(made_cache("zstd"), "--trusted-key", other_keys.pub)
    assert proc.returncode == 1
    lines = fault_lines(proc)
    assert len(lines) == len(closure)
    assert sorted(ln.split(": ", 1)[0] for ln in lines) == closure


def biggest(cache: Path) -> tuple[str, NarInfo]:
    path, info = max(narinfos(cache).items(), key=lambda kv: kv[1].nar_size)
    assert info.nar_size > 100_000  # the firmware blob
    return path, info


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_verify_flipped_byte(compression: str, made_cache: Callable[[str], Path], keys: Keys,
                             tmp_path: Path) -> None:
    cache = copy_cache(made_cache(compression), tmp_path)
    path, info = biggest(cache)
    nar = cache / info.url
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0x01
    nar.write_bytes(bytes(data))
    proc = verify(cache, "--trusted-key", keys.pub)
    assert proc.returncode == 1
    assert fault_lines(proc) == [f"{path}: {info.url} does not match its FileHash"]


def test_verify_flipped_byte_behind_a_forged_file_hash(made_cache: Callable[[str], Path], keys: Keys,
                                                       tmp_path: Path) -> None:
    """FileHash is not signed: an attacker can fix it up. The NarHash check still catches it."""
    cache = copy_cache(made_cache("none"), tmp_path)
    path, info = biggest(cache)
    nar = cache / info.url
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0x01
    nar.write_bytes(bytes(data))
    forged = NarInfo.parse((cache / f"{info.store_path.hash_part}.narinfo").read_text())
    forged = NarInfo(**{**forged.__dict__, "file_hash": Hash.sha256(bytes(data)).nix32()})
    (cache / f"{info.store_path.hash_part}.narinfo").write_text(forged.render())
    proc = verify(cache, "--trusted-key", keys.pub)
    assert proc.returncode == 1
    assert fault_lines(proc) == [f"{path}: NAR does not match its NarHash"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_verify_truncated_nar(compression: str, made_cache: Callable[[str], Path], keys: Keys,
                              tmp_path: Path) -> None:
    cache = copy_cache(made_cache(compression), tmp_path)
    path, info = biggest(cache)
    nar = cache / info.url
    size = nar.stat().st_size
    os.truncate(nar, size // 2)
    proc = verify(cache, "--trusted-key", keys.pub)
    assert proc.returncode == 1
    assert fault_lines(proc) == [f"{path}: {info.url} is {size // 2} bytes, FileSize says {size}"]


def test_verify_resigned_by_another_key(made_cache: Callable[[str], Path], keys: Keys, other_keys: Keys,
                                        tmp_path: Path) -> None:
    cache = copy_cache(made_cache("zstd"), tmp_path)
    path, info = biggest(cache)
    resigned = info.with_sigs((other_keys.secret.sign(info.fingerprint()),))
    (cache / f"{info.store_path.hash_part}.narinfo").write_text(resigned.render())
    proc = verify(cache, "--trusted-key", keys.pub)
    assert proc.returncode == 1
    assert fault_lines(proc) == [f"{path}: no valid signature by a trusted key (signed by intruder-1)"]
    # Trusting both keys, it passes again.
    assert verify(cache, "--trusted-key", keys.pub, "--trusted-key", other_keys.pub).returncode == 0


def test_verify_missing_reference(made_cache: Callable[[str], Path], keys: Keys, tmp_path: Path) -> None:
    cache = copy_cache(made_cache("zstd"), tmp_path)
    infos = narinfos(cache)
    referrers: dict[str, list[str]] = {p: [] for p in infos}
    for path, info in infos.items():
        for ref in info.reference_paths():
            if ref.full != path:
                referrers[ref.full].append(path)
    # The referenced path with the fewest referrers, so the expected lines are few and exact.
    missing = min((p for p in infos if referrers[p]), key=lambda p: (len(referrers[p]), p))
    (cache / f"{infos[missing].store_path.hash_part}.narinfo").unlink()
    proc = verify(cache, "--trusted-key", keys.pub)
    assert proc.returncode == 1
    assert sorted(fault_lines(proc)) == sorted(f"{r}: reference {missing} is missing" for r in referrers[missing])

    report = json.loads(verify(cache, "--trusted-key", keys.pub, "--json").stdout)
    assert set(report) == {"target", "ok", "paths", "nar_bytes", "faults"}
    assert report["ok"] is False
    assert report["target"] == str(cache)
    assert report["paths"] == len(infos) - 1
    assert report["nar_bytes"] == sum(i.nar_size for p, i in infos.items() if p != missing)
    assert sorted(report["faults"], key=lambda f: f["path"]) == sorted(
        ({"path": r, "fault": f"reference {missing} is missing"} for r in referrers[missing]),
        key=lambda f: f["path"])


def test_verify_own_key_by_default(made_cache: Callable[[str], Path], tmp_path: Path, toplevel: str) -> None:
    """Without --key the cache makes its own key; verify trusts it when given no --trusted-key."""
    cache = tmp_path / "cache"
    proc = run_cli("cache", "--store-path", toplevel, "--cache", cache)
    assert proc.returncode == 0, proc.stderr
    assert (cache / "signing-key.sec").stat().st_mode & 0o777 == 0o600
    proc = verify(cache)
    assert proc.returncode == 0, proc.stderr
    assert "trusting" in proc.stderr


def test_verify_trusted_key_with_a_slash(toplevel: str, tmp_path: Path) -> None:
    """Half of all keys have a '/' in their base64: such a key given as text is a key, not a file."""
    import nacl.signing

    for i in range(1000):
        seed = hashlib.sha256(b"slash-%d" % i).digest()
        signing = nacl.signing.SigningKey(seed)
        secret = SecretKey("slash-1", seed + bytes(signing.verify_key))
        if "/" in secret.public().render():
            break
    key_file = tmp_path / "slash.sec"
    key_file.write_text(secret.render())
    cache = tmp_path / "cache"
    assert run_cli("cache", "--store-path", toplevel, "--cache", cache, "--key", key_file).returncode == 0
    proc = verify(cache, "--trusted-key", secret.public().render())
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Incremental and crash-safe


@pytest.fixture(scope="module")
def big_closure(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """~200 content-addressed paths of real binaries and libraries (a few MB each) and one
    path with a ~200 MB file: big enough that exporting takes a few seconds."""
    files = sorted(p for top in (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/bin"))
                   for p in top.rglob("*") if p.is_file() and not p.is_symlink()
                   and 0 < p.stat().st_size < 8 << 20 and os.access(p, os.R_OK))
    assert sum(p.stat().st_size for p in files) > 100 << 20
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("big-closure")
    dirs = []
    for i in range(200):
        d = root / f"pkg-{i:03d}"
        d.mkdir()
        (d / "id").write_text(f"crash-safety package {i}\n")
        budget, got = rng.randint(1 << 20, 5 << 20), 0
        while got < budget:
            src = rng.choice(files)
            if (d / src.name).exists():
                continue
            shutil.copyfile(src, d / src.name)
            got += src.stat().st_size
        dirs.append(d)
    big = root / "blob"
    big.mkdir()
    with open(big / "data.bin", "wb") as f:
        written = 0
        while written < 200 << 20:
            written += f.write(rng.choice(files).read_bytes())
    paths = nix("nix-store", "--add", *dirs, big).stdout.split()
    assert len(set(paths)) == 201
    shutil.rmtree(root)
    return paths


def run_and_kill(argv: list[str], cache: Path, *, after: float, narinfos_at_least: int) -> int:
    """Start `mediabuilder cache`, SIGKILL its whole process group once `after` seconds have
    passed and the cache holds `narinfos_at_least` narinfos; returns how many it held then."""
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-m", "mediabuilder", *argv], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    try:
        while True:
            count = len(list(cache.glob("*.narinfo"))) if cache.is_dir() else 0
            if time.monotonic() - started >= after and count >= narinfos_at_least:
                break
            if proc.poll() is not None:
                raise AssertionError(f"finished before it could be killed (raise the closure size): "
                                     f"{proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    time.sleep(0.2)  # workers of the killed group die too; let the kernel reap them
    return count


def test_killed_runs_leave_a_valid_cache_and_a_rerun_completes(
    big_closure: list[str], keys: Keys, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    total = len(closure_of(*big_closure))
    assert total == 201
    argv = ["cache", "--cache", str(cache), "--compression", "zstd", "--key", str(keys.secret_file),
            "--jobs", "2", *[a for p in big_closure for a in ("--store-path", p)]]
    held = []
    # Kill points by progress, not by time (a quiet machine exports all 201 paths in ~2 s): first
    # mid-way through the biggest NAR (exported first), then at absolute narinfo counts that
    # leave room before the end, each further than the last run got.
    for after, reach in ((0.3, 0), (0.0, 30), (0.0, 90), (0.0, 160)):
        before = len(list(cache.glob("*.narinfo"))) if cache.is_dir() else 0
        target = max(reach, before + 1) if reach else 0
        count = run_and_kill(argv, cache, after=after, narinfos_at_least=target)
        assert count < total
        held.append(count)
        if (cache / "nix-cache-info").exists():
            proc = verify(cache, "--trusted-key", keys.pub)
            assert proc.returncode == 0, f"after a kill at {count} narinfos:\n{proc.stdout}{proc.stderr}"
    assert held == sorted(held) and held[-1] >= 120, held

    present = len(list(cache.glob("*.narinfo")))
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    m = SUMMARY.search(proc.stderr)
    assert m, proc.stderr
    assert (int(m.group(1)), int(m.group(2))) == (total - present, present)
    assert len(list(cache.glob("*.narinfo"))) == total
    leftovers = list(cache.glob(".tmp-*")) + list((cache / "nar").glob(".tmp-*"))
    assert leftovers == []
    proc = verify(cache, "--trusted-key", keys.pub, "--json")
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["ok"], report["paths"]) == (0, True, total), report["faults"]

    # Nothing changed: nothing exported.
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    m = SUMMARY.search(proc.stderr)
    assert m and (int(m.group(1)), int(m.group(2))) == (0, total), proc.stderr


# Bad input: one line, exit 2, no traceback


def test_unknown_host(example: Example, tmp_path: Path) -> None:
    proc = run_cli("cache", "--flake", f"{example.flake}#nosuchhost", "--cache", tmp_path / "c")
    assert_one_line_error(proc, "nosuchhost", str(example.flake))
    assert "alpha" in proc.stderr and "beta" in proc.stderr  # the hint lists the hosts


def test_flake_path_does_not_exist(tmp_path: Path) -> None:
    proc = run_cli("cache", "--flake", f"{tmp_path}/nowhere#alpha", "--cache", tmp_path / "c")
    assert_one_line_error(proc, f"{tmp_path}/nowhere", "no such flake directory")


def test_profile_unknown_key(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[cache]\ncompresion = "zstd"\n')
    proc = run_cli("--profile", profile, "cache", "--cache", tmp_path / "c")
    # `--profile` before the command is parsed by the top-level parser; either way, one line.
    assert_one_line_error(proc, str(profile), "cache.compresion", "unknown key")


def test_profile_wrong_type(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[cache]\njobs = "x"\n')
    proc = run_cli("cache", "--profile", profile, "--cache", tmp_path / "c")
    assert_one_line_error(proc, str(profile), "cache.jobs", "'x'")


def test_missing_key_file(toplevel: str, tmp_path: Path) -> None:
    proc = run_cli("cache", "--store-path", toplevel, "--cache", tmp_path / "c", "--key", "/nonexistent")
    assert_one_line_error(proc, "/nonexistent", "no such key file")


def test_cache_dir_under_a_regular_file(toplevel: str) -> None:
    """/etc/hostname is a file: mkdir under it fails even for root (ENOTDIR)."""
    assert Path("/etc/hostname").is_file()
    proc = run_cli("cache", "--store-path", toplevel, "--cache", "/etc/hostname/cache")
    assert_one_line_error(proc, "/etc/hostname/cache", "not writable")


def test_cache_dir_on_a_read_only_mount(toplevel: str, tmp_path: Path) -> None:
    """Root ignores mode bits, not a read-only mount: bind-mount a directory read-only in a
    private mount namespace and point --cache into it (EROFS)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    env = make_nix_env({"PYTHONPATH": str(REPO)})
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(ro),
         sys.executable, "-m", "mediabuilder", "cache", "--store-path", toplevel, "--cache", str(ro / "cache")],
        env=env, capture_output=True, text=True, timeout=600)
    if "unshare failed" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"no mount namespaces here: {proc.stderr.strip()}")
    assert_one_line_error(proc, f"{ro}/cache", "not writable", "Read-only file system")
    assert not (ro / "cache").exists()
