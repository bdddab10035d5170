"""Flake inputs shaped like real ones, end to end: the example's nixpkgs locked as `github:` (its
source put into the store beforehand, never downloaded), tools with `inputs.nixpkgs.follows`, and
tools' own input `systems` that the flake does not name (nested); the lock as Nix 2.26 writes it.
For each shape: the exact registry entry, the archived store path on the media and in the
installed store, and the offline re-evaluation of /etc/nixos (in a network namespace, the media
read-only, the inputs' original sources out of reach). Unit tests of the lock reading below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_nix_env, nix, prepare_example, run_cli
from test_install import evaluate_installed, install_offline

from mediabuilder import flakelock
from mediabuilder.errors import InvalidInput
from mediabuilder.media import registry
from mediabuilder.store.hashes import Hash
from mediabuilder.store.storepath import make_store_path

# Fixed commit dates in examples/prepare.sh: nixpkgs' second commit (2023-11-03T10:00:00Z) and
# systems' only one (2023-11-01T12:00:00Z). Their trees carry no DEST, but nixpkgs' holds the
# hash of the preparing machine's static busybox (pkgs/bootstrap-files.nix): its revision and
# NAR hash are computed here, not pinned.
NIXPKGS_LAST_MODIFIED = 1699005600
SYSTEMS_LAST_MODIFIED = 1698840000


def nixpkgs_version(inst: Installed) -> str:
    """lib.version: lastModifiedDate and shortRev of the pin."""
    return f"23.11.20231103.{inst.revs['nixpkgs'][:7]}"


def tree_nar_hash(repo: Path, scratch: Path) -> str:
    """The NAR hash of a repository's HEAD tree, as a github: input's tarball unpacks to."""
    scratch.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    return nix("nix", "hash", "path", scratch).stdout.strip()


def source_path(nar_hash: str) -> str:
    return str(make_store_path("source", Hash.parse(nar_hash).digest, "source"))


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass(frozen=True)
class Installed:
    dest: Path
    lock: dict
    archive: dict  # `nix flake archive --json` of the example, run by the test
    media: Path
    toplevel: str
    root: Path
    revs: dict[str, str]  # each input repository's HEAD (read before the sources are moved away)
    nixpkgs_nar_hash: str


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("inputs")
    dest = base / "example"
    prepare_example(dest)
    flake = dest / "flake"
    lock = json.loads((flake / "flake.lock").read_text())
    archive = json.loads(nix("unshare", "--net", "nix", "flake", "archive", "--json", flake).stdout)
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", base / "cache", "--output", base / "media")
    assert proc.returncode == 0, proc.stderr
    toplevel = proc.stdout.split("\t")[1].strip()
    revs = {name: git_out(dest / "inputs" / name, "rev-parse", "HEAD") for name in ("nixpkgs", "systems", "tools")}
    nixpkgs_nar_hash = tree_nar_hash(dest / "inputs" / "nixpkgs", base / "nixpkgs-tree")
    hidden = base / "inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    try:
        root = base / "root"
        root.mkdir()
        proc = install_offline(base / "media", root, "--host", "alpha", "--yes")
        assert proc.returncode == 0, proc.stderr
        yield Installed(dest, lock, archive, base / "media", toplevel, root, revs, nixpkgs_nar_hash)
    finally:
        os.rename(hidden, dest / "inputs")


def node(inst: Installed, name: str) -> dict:
    nodes: dict = inst.lock["nodes"]
    return nodes[name]


@pytest.mark.integration
def test_lock_as_nix_2_26_writes_it(installed: Installed) -> None:
    dest = installed.dest
    assert sorted(installed.lock["nodes"]) == ["nixpkgs", "root", "site", "systems", "tools"]
    assert installed.lock["version"] == 7
    assert node(installed, "root") == {"inputs": {"nixpkgs": "nixpkgs", "site": "site", "tools": "tools"}}
    # github: owner, repo, rev, narHash, lastModified; no revCount, no download.
    assert node(installed, "nixpkgs") == {
        "locked": {"lastModified": NIXPKGS_LAST_MODIFIED, "narHash": installed.nixpkgs_nar_hash, "owner": "NixOS",
                   "repo": "nixpkgs", "rev": installed.revs["nixpkgs"],
                   "type": "github"},
        "original": {"owner": "NixOS", "ref": "nixos-23.11", "repo": "nixpkgs", "type": "github"},
    }
    # follows: tools' nixpkgs is the flake's; its nested `systems` a node of its own.
    assert node(installed, "tools")["inputs"] == {"nixpkgs": ["nixpkgs"], "systems": "systems"}
    for name, commits in (("tools", 2), ("systems", 1)):
        locked = node(installed, name)["locked"]
        assert locked["ref"] == "refs/heads/main" and locked["type"] == "git", name
        assert locked["url"] == f"file://{dest}/inputs/{name}"
        assert locked["rev"] == installed.revs[name]
        assert locked["revCount"] == commits
    assert node(installed, "systems")["locked"]["lastModified"] == SYSTEMS_LAST_MODIFIED
    assert node(installed, "site")["locked"]["type"] == "path"
    assert not any(n.get("locked", {}).get("type") == "tarball" for n in installed.lock["nodes"].values())


@pytest.mark.integration
def test_nix_archives_every_shape(installed: Installed) -> None:
    """What Nix itself says the inputs are: the test's reference for the media."""
    nodes = installed.lock["nodes"]
    inputs = installed.archive["inputs"]
    assert sorted(inputs) == ["nixpkgs", "site", "tools"]
    assert list(inputs["tools"]["inputs"]) == ["systems"]  # the follows is not archived again
    for name in ("nixpkgs", "site", "tools"):
        assert inputs[name]["path"] == source_path(nodes[name]["locked"]["narHash"]), name
    assert inputs["tools"]["inputs"]["systems"]["path"] == source_path(nodes["systems"]["locked"]["narHash"])
    # Without Nix (`--system` builds), the lock alone gives the same inputs, nested the same way.
    assert registry.archive_from_lock(installed.dest / "flake/flake.lock") == {"inputs": inputs}


def expected_registry(inst: Installed) -> list[dict]:
    nodes = inst.lock["nodes"]
    entries = []
    for name in ("nixpkgs", "site", "systems", "tools"):  # nixpkgs first, then by id
        locked = nodes[name]["locked"]
        to = {"type": "path", "path": source_path(locked["narHash"]), "narHash": locked["narHash"]}
        to |= {k: locked[k] for k in ("rev", "revCount", "lastModified") if k in locked}
        entries.append({"from": {"type": "indirect", "id": name}, "to": to, "exact": True})
    return entries


@pytest.mark.integration
def test_registry_pins_every_shape(installed: Installed) -> None:
    media_registry = json.loads((installed.media / "registry.json").read_text())
    assert media_registry == {"version": 2, "flakes": expected_registry(installed)}
    nixpkgs = media_registry["flakes"][0]["to"]
    assert set(nixpkgs) == {"type", "path", "narHash", "rev", "lastModified"}  # github: no revCount
    # The installed copy is the media's.
    lib = installed.root / "var/lib/mediabuilder/registry.json"
    assert lib.read_bytes() == (installed.media / "registry.json").read_bytes()
    manifest = json.loads((installed.media / "manifest.json").read_text())
    assert manifest["flake"]["inputs"] == {e["from"]["id"]: {"path": e["to"]["path"], "narHash": e["to"]["narHash"]}
                                           for e in expected_registry(installed)}


@pytest.mark.integration
def test_archived_inputs_on_media_and_installed(installed: Installed) -> None:
    inputs = installed.archive["inputs"]
    archived = [installed.archive["path"], *(inputs[n]["path"] for n in ("nixpkgs", "site", "tools")),
                inputs["tools"]["inputs"]["systems"]["path"]]
    manifest = json.loads((installed.media / "manifest.json").read_text())
    host_paths = manifest["store_paths"]
    for path in archived:
        assert path in host_paths, path
        assert (installed.media / "cache" / f"{Path(path).name[:32]}.narinfo").is_file(), path
    valid = nix("nix", "--store", installed.root, "path-info", *archived).stdout.split()
    assert sorted(valid) == sorted(archived)
    # tools' own lock pins an older nixpkgs, which the follows replaces: never fetched, not carried.
    tools_lock = json.loads((installed.root.parent / "inputs-out-of-reach/tools/flake.lock").read_text())
    old = source_path(tools_lock["nodes"]["nixpkgs"]["locked"]["narHash"])
    assert old != archived[1]
    assert old not in manifest["store_paths"]
    assert nix("nix", "--store", installed.root, "path-info", old, check=False).returncode != 0


@pytest.mark.integration
def test_offline_reevaluation(installed: Installed) -> None:
    assert evaluate_installed(installed.root, "alpha") == installed.toplevel
    # The version nixpkgs computes from its github pin: lastModifiedDate and shortRev.
    assert (Path(installed.toplevel) / "nixos-version").read_text() == nixpkgs_version(installed)


def eval_on_target(inst: Installed, *args: str) -> str:
    """`nix ARGS` on the installed machine's store and settings (its pinned registry), offline."""
    conf = (inst.root / "root/.config/nix/nix.conf").read_text()
    conf_file = inst.root.parent / "target-nix.conf"
    conf_file.write_text(conf.replace("/var/lib/mediabuilder/", f"{inst.root}/var/lib/mediabuilder/")
                         + "substituters =\nbuild-users-group =\n")
    env = {k: v for k, v in os.environ.items() if k != "NIX_CONFIG"}
    env |= {"NIX_USER_CONF_FILES": str(conf_file), "NIX_CONF_DIR": str(inst.root / "etc/nix")}
    proc = subprocess.run(["unshare", "--net", "nix", "--store", str(inst.root), *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.integration
def test_registry_resolves_offline_on_the_target(installed: Installed) -> None:
    # github pin: the same lib.version as the lock gives (rev and lastModified carried).
    assert eval_on_target(installed, "eval", "--raw", "nixpkgs#lib.version") == nixpkgs_version(installed)
    # The nested input, by its own name.
    systems = eval_on_target(installed, "eval", "--json", "--impure", "--expr", 'import (builtins.getFlake "systems")')
    assert json.loads(systems) == ["x86_64-linux", "aarch64-linux"]
    meta = json.loads(eval_on_target(installed, "flake", "metadata", "--json", "systems"))
    assert meta["path"] == installed.archive["inputs"]["tools"]["inputs"]["systems"]["path"]
    assert meta["revision"] == node(installed, "systems")["locked"]["rev"]


# A lock Nix cannot read: a tarball input locked with lastModified (Nix 2.18+ write that; older
# Nix refuses the whole lock). Its source is the site's, valid in the store, so a Nix that reads
# the lock builds offline.
def add_tarball_input(flake: Path) -> None:
    lock = json.loads((flake / "flake.lock").read_text())
    site = lock["nodes"]["site"]["locked"]
    lock["nodes"]["extra"] = {
        "flake": False,
        "locked": {"lastModified": site["lastModified"], "narHash": site["narHash"], "type": "tarball",
                   "url": "https://example.invalid/extra.tar.gz"},
        "original": {"type": "tarball", "url": "https://example.invalid/extra.tar.gz"},
    }
    lock["nodes"]["root"]["inputs"]["extra"] = "extra"
    (flake / "flake.lock").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    text = (flake / "flake.nix").read_text()
    text = text.replace("  inputs = {\n", '  inputs = {\n    extra = { url = "https://example.invalid/extra.tar.gz"; '
                        "flake = false; };\n", 1)
    text = text.replace("outputs = { self, nixpkgs, site, tools }:", "outputs = { self, nixpkgs, site, tools, extra }:")
    (flake / "flake.nix").write_text(text)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(flake), "commit", "-qam", "Add a tarball input"], env=env, check=True)


def local_nix_version() -> tuple[int, int]:
    text = nix("nix", "--version").stdout.split()[-1]
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.integration
def test_lock_nix_cannot_read(tmp_path: Path) -> None:
    dest = tmp_path / "example"
    prepare_example(dest)
    add_tarball_input(dest / "flake")
    cache, media = tmp_path / "cache", tmp_path / "media"
    env = make_nix_env({"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "mediabuilder", "build",
                           f"--flake={dest / 'flake'}#alpha", "--cache", str(cache), "--output", str(media)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    version = nix("nix", "--version").stdout.split()[-1]
    if local_nix_version() < flakelock.TARBALL_NEW_SINCE:
        # The wording tests/test_lock_versions.py (Nix asked by exit status) expects too.
        assert_one_line_error(proc, f"{dest / 'flake' / 'flake.lock'}: Nix {version} cannot read this lock file")
        assert "hint: build with a Nix at least as new as the one that locked the flake" in proc.stderr
        assert not media.exists()
        # Nix itself refuses that lock (its message is Nix's business, its exit status is not).
        res = nix("unshare", "--net", "nix", "eval", "--raw", f"{dest / 'flake'}#nixosConfigurations.alpha.config"
                  ".system.build.toplevel.outPath", check=False)
        assert res.returncode == 1
    else:  # a Nix that reads the lock builds from it, offline (the tarball's source is in the store)
        assert proc.returncode == 0, proc.stderr
        ids = [f["from"]["id"] for f in json.loads((media / "registry.json").read_text())["flakes"]]
        assert ids == ["nixpkgs", "extra", "site", "systems", "tools"]


# Unit tests: the lock graph.

def lock_text(nodes: dict, root: str = "root") -> str:
    return json.dumps({"nodes": nodes, "root": root, "version": 7})


def locked(n: int, **extra: object) -> dict:
    nar_hash = "sha256-" + __import__("base64").b64encode(bytes([n]) * 32).decode()
    return {"locked": {"type": "git", "url": f"file:///r{n}", "narHash": nar_hash, "rev": f"{n:040x}", **extra}}


def test_follows_resolve_through_chains() -> None:
    lock = flakelock.FlakeLock.parse(lock_text({
        "root": {"inputs": {"a": "a", "b": "b", "c": ["b", "c"]}},
        "a": {**locked(1), "inputs": {"c": ["c"], "d": "d"}},
        "b": {**locked(2), "inputs": {"c": "c_2"}},
        "c_2": locked(3),
        "d": {**locked(4), "inputs": {"e": ["a", "c"]}},
    }), "flake.lock")
    assert lock.resolve(["a", "c"]) == "c_2"  # a.c follows c, which follows b/c
    assert lock.resolve(["a", "d", "e"]) == "c_2"
    found = [(i.path, i.node) for i in lock.inputs()]
    assert found == [(("a",), "a"), (("b",), "b"), (("c",), "c_2"), (("a", "d"), "d")]
    assert lock.archive() == {"inputs": {
        "a": {"path": source_path(locked(1)["locked"]["narHash"]), "inputs": {
            "d": {"path": source_path(locked(4)["locked"]["narHash"]), "inputs": {}}}},
        "b": {"path": source_path(locked(2)["locked"]["narHash"]), "inputs": {
            "c": {"path": source_path(locked(3)["locked"]["narHash"]), "inputs": {}}}},
    }}


@pytest.mark.parametrize(("nodes", "needle"), [
    ({"root": {"inputs": {"a": ["a"]}}}, "the follows a does not lead to a node"),
    ({"root": {"inputs": {"a": ["b"]}}}, "the follows b names no input 'b'"),
    ({"root": {"inputs": {"a": "gone"}}}, "refers to node 'gone'"),
    ({"root": {"inputs": {"a": 7}}}, "refers to 7, neither a node nor a follows path"),
])
def test_broken_follows_are_refused(nodes: dict, needle: str) -> None:
    lock = flakelock.FlakeLock.parse(lock_text(nodes), "x/flake.lock")
    with pytest.raises(InvalidInput) as e:
        list(lock.inputs())
    assert str(e.value).startswith("x/flake.lock: ") and needle in str(e.value)


def test_bad_nar_hash_is_named() -> None:
    lock = flakelock.FlakeLock.parse(lock_text({"root": {"inputs": {"a": "a"}}, "a": {"locked": {"narHash": "md5-x"}}}),
                                     "x/flake.lock")
    with pytest.raises(InvalidInput, match="^x/flake.lock: node 'a' has narHash 'md5-x', not a sha256 hash$"):
        lock.archive()


@pytest.mark.parametrize("text", [b"\xff\xfe", "", "[]", '{"nodes": {}, "root": "root"}',
                                  '{"nodes": {"root": []}, "root": "root"}',
                                  '{"nodes": {"root": {"inputs": []}}, "root": "root"}'])
def test_not_a_lock_file(text: str | bytes) -> None:
    with pytest.raises(InvalidInput, match="^f.lock: not a readable lock file"):
        flakelock.FlakeLock.parse(text, "f.lock")


def test_registry_from_lock_follows_and_nested(tmp_path: Path) -> None:
    # The root's `nixpkgs` follows tools' (a nested node); tools' `utils` is nested and pinned by
    # its own name; a nested `site` does not take the root's name.
    lock_file = tmp_path / "flake.lock"
    lock_file.write_text(lock_text({
        "root": {"inputs": {"nixpkgs": ["tools", "nixpkgs"], "site": "site", "tools": "tools"}},
        "tools": {**locked(1, revCount=3, lastModified=10), "inputs": {"nixpkgs": "nixpkgs", "site": "site_2",
                                                                      "utils": "utils"}},
        "nixpkgs": {"locked": {"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "f" * 40,
                               "lastModified": 20, "narHash": locked(2)["locked"]["narHash"]}},
        "site": locked(3), "site_2": locked(4), "utils": locked(5),
    }))
    archive = flakelock.FlakeLock.read(lock_file).archive()
    pins = registry.from_lock(lock_file, archive).pins
    assert [(p.id, p.path, p.extra) for p in pins] == [
        ("nixpkgs", source_path(locked(2)["locked"]["narHash"]), (("rev", "f" * 40), ("lastModified", 20))),
        ("site", source_path(locked(3)["locked"]["narHash"]), (("rev", f"{3:040x}"),)),
        ("tools", source_path(locked(1)["locked"]["narHash"]),
         (("rev", f"{1:040x}"), ("revCount", 3), ("lastModified", 10))),
        ("utils", source_path(locked(5)["locked"]["narHash"]), (("rev", f"{5:040x}"),)),
    ]
    # Every pinned path is one of the archived ones (the media carries them all).
    assert {p.path for p in pins} <= set(registry.archived_paths(archive))


@pytest.mark.parametrize(("version", "refused"), [("2.8.0", True), ("2.17.1", True), ("2.18.0", False),
                                                  ("2.26.3", False), ("2.91.1", False)])
def test_check_readable(version: str, refused: bool) -> None:
    lock = flakelock.FlakeLock.parse(lock_text({
        "root": {"inputs": {"t": "t"}},
        "t": {"locked": {"type": "tarball", "url": "https://x/t.tar.gz", "lastModified": 1, "narHash": "sha256-x"}},
    }), "f/flake.lock")
    if refused:
        with pytest.raises(InvalidInput) as e:
            lock.check_readable(version)
        assert str(e.value) == (f"f/flake.lock: Nix {version} cannot read this lock file: input 't' is a tarball "
                                "locked with 'lastModified', as Nix 2.18 and newer write it")
    else:
        lock.check_readable(version)
