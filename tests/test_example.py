"""The bundled example flake (examples/): prepare it, build both hosts and check its shape.

Everything the demo and the other integration tests rely on is pinned here: the number of
store paths per host, how many they share, the kinds of files in the closure, the input
types, and that the toplevel depends on the flake's git revision and on reachable inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "examples" / "prepare.sh"
HOSTS = ("alpha", "beta")
TOPLEVEL = "nixosConfigurations.{host}.config.system.build.toplevel"

# The closure is designed, not measured: 36 shared paths (31 packages from the fake nixpkgs,
# busybox, the kernel, initrd, firmware and tools' motd-render with its unit script) plus 6 per
# host (toplevel, etc, system-units, system-path, the host's service package and its unit script).
CLOSURE_SIZE = {"alpha": 42, "beta": 42}
SHARED = 36
# Nix 2.8 downloads the global registry even for `--inputs-from` unless flake-registry is an
# absolute path; `flake-registry =` (empty, as in NIX_CONFIG) makes it fail ("unable to download
# ''"). A path that does not exist is an empty registry.
NO_REGISTRY = "/nonexistent/flake-registry.json"

NIX_CONFIG = "\n".join(
    [
        "experimental-features = nix-command flakes",
        "build-users-group =",
        "sandbox = false",
        "substituters =",
        "flake-registry =",
        "warn-dirty = false",
    ]
)


def nix_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG
    return env


def run(*args: str | Path, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], env=nix_env(), cwd=cwd, check=check, capture_output=True, text=True
    )


def closure(path: str) -> set[str]:
    return set(run("nix-store", "--query", "--requisites", path).stdout.split())


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if shutil.which("nix") is None or shutil.which("git") is None:
        pytest.skip("needs nix and git")
    dest = tmp_path_factory.mktemp("example") / "dest"
    prep = run("bash", PREPARE, dest)
    assert prep.stdout == "" and prep.stderr == "", prep.stderr
    flake = dest / "flake"
    # One build per host: Nix does not answer several installables in the order asked.
    toplevels = {h: json.loads(run("nix", "build", "--no-link", "--json", f"{flake}#{TOPLEVEL.format(host=h)}")
                               .stdout)[0]["outputs"]["out"] for h in HOSTS}
    return {"dest": dest, "flake": flake, "toplevel": toplevels}


def git(repo: Path, *args: str) -> str:
    return run("git", "-C", repo, *args).stdout


def test_prepare_layout(example: dict) -> None:
    dest: Path = example["dest"]
    flake: Path = example["flake"]
    assert len(git(flake, "log", "--format=%H").split()) >= 3
    assert len(git(dest / "inputs" / "nixpkgs", "log", "--format=%H").split()) >= 2
    assert git(flake, "status", "--porcelain") == ""
    assert "flake.lock" in git(flake, "ls-files").split()
    remotes = dict(line.split()[:2] for line in git(flake, "remote", "-v").splitlines())
    assert remotes["origin"] == "https://git.example.invalid/example/machines.git"
    assert "backup" in remotes and remotes["backup"] != remotes["origin"]
    assert not (dest / "inputs" / "site" / ".git").exists()
    assert "@DEST@" not in (flake / "flake.nix").read_text()


def test_prepare_refuses_non_empty_dest(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    res = run("bash", PREPARE, tmp_path, check=False)
    assert res.returncode != 0 and res.stdout == "" and "not empty" in res.stderr


def test_nixpkgs_revisions_are_deterministic(example: dict, tmp_path: Path) -> None:
    # Fixed authors and dates: a second preparation elsewhere gives the same nixpkgs commits.
    run("bash", PREPARE, tmp_path / "again")
    revs = git(tmp_path / "again" / "inputs" / "nixpkgs", "log", "--format=%H")
    assert revs == git(example["dest"] / "inputs" / "nixpkgs", "log", "--format=%H")


def test_closure_sizes(example: dict) -> None:
    closures = {h: closure(p) for h, p in example["toplevel"].items()}
    assert {h: len(c) for h, c in closures.items()} == CLOSURE_SIZE
    assert len(closures["alpha"] & closures["beta"]) == SHARED
    assert example["toplevel"]["alpha"] != example["toplevel"]["beta"]


def test_closure_contents(example: dict) -> None:
    paths = closure(example["toplevel"]["alpha"])
    found = {k: 0 for k in ("abs_symlink", "rel_symlink", "executable", "empty_file", "empty_dir", "big")}
    with_references = 0
    for p in paths:
        refs = set(run("nix-store", "--query", "--references", p).stdout.split()) - {p}
        with_references += bool(refs)
        for root, dirs, files in os.walk(p):
            for name in dirs + files:
                f = Path(root) / name
                st = f.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(f)
                    key = "abs_symlink" if target.startswith("/nix/store/") else "rel_symlink"
                    found[key] += 1
                elif stat.S_ISDIR(st.st_mode):
                    found["empty_dir"] += not any(f.iterdir())
                elif stat.S_ISREG(st.st_mode):
                    found["executable"] += bool(st.st_mode & stat.S_IXUSR)
                    found["empty_file"] += st.st_size == 0
                    found["big"] += st.st_size > 200_000
    assert all(found.values()), found
    assert with_references >= len(paths) // 2
    # The data file is non-trivial (not a run of one byte).
    fw = Path(example["toplevel"]["alpha"]) / "firmware" / "intel" / "fake-ucode.bin"
    data = fw.read_bytes()
    assert len(data) > 300_000 and len(set(data)) > 10


def test_toplevel_layout(example: dict) -> None:
    for host, top in example["toplevel"].items():
        t = Path(top)
        assert os.access(t / "bin" / "switch-to-configuration", os.X_OK)
        for name in ("init", "kernel", "initrd"):
            assert (t / name).is_file(), name
        assert os.access(t / "init", os.X_OK)
        assert (t / "etc").is_dir()
        assert (t / "etc" / "hostname").read_text().strip() == host
        assert (t / "etc" / "ssh" / "sshd_config").read_text().count("/nix/store/") >= 1
        assert (t / "system").read_text() == "x86_64-linux"
        assert (t / "nixos-version").read_text().startswith("23.11.")
        assert (t / "specialisation").is_dir()


def test_switch_to_configuration_logs(example: dict, tmp_path: Path) -> None:
    top = example["toplevel"]["beta"]
    log = tmp_path / "var" / "log" / "switch.log"
    env = nix_env() | {"MEDIABUILDER_SWITCH_LOG": str(log), "NIXOS_INSTALL_BOOTLOADER": "1"}
    subprocess.run([f"{top}/bin/switch-to-configuration", "boot"], env=env, check=True)
    assert log.read_text() == f"action=boot NIXOS_INSTALL_BOOTLOADER=1 toplevel={top}\n"


def busybox_of(top: str) -> str:
    (bb,) = [p for p in closure(top) if p.endswith("-busybox-static")]
    return bb


def test_busybox_is_static(example: dict) -> None:
    bb = Path(busybox_of(example["toplevel"]["alpha"]))
    assert busybox_of(example["toplevel"]["beta"]) == str(bb)
    data = (bb / "bin" / "busybox").read_bytes()
    assert data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data[:4096]
    for applet in ("sh", "mkdir", "dirname", "cat", "echo", "ln", "readlink"):
        assert os.readlink(bb / "bin" / applet) == "busybox", applet


def test_install_time_scripts_use_busybox(example: dict) -> None:
    for top in example["toplevel"].values():
        bb = busybox_of(top)
        for script in ("bin/switch-to-configuration", "activate", "init"):
            text = (Path(top) / script).read_text()
            assert text.startswith(f"#!{bb}/bin/sh\n"), script
            assert f"PATH={bb}/bin\n" in text, script
            assert "/usr/bin" not in text and "#!/bin/sh" not in text, script


def test_switch_to_configuration_in_chroot(example: dict, tmp_path: Path) -> None:
    # What the install script does: copy the closure into the target root (a chroot store),
    # then run switch-to-configuration inside it, where there is nothing but /nix.
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    top = example["toplevel"]["alpha"]
    root = tmp_path / "root"
    run("nix", "copy", "--no-check-sigs", "--to", root, top)
    assert sorted(os.listdir(root)) == ["nix"]
    stored = {p.name for p in (root / "nix" / "store").iterdir()} - {".links"}
    assert stored == {Path(p).name for p in closure(top)}
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    env = {"PATH": "/usr/bin:/bin", "NIXOS_INSTALL_BOOTLOADER": "1"}  # no MEDIABUILDER_SWITCH_LOG
    res = subprocess.run(
        [chroot, root, f"{top}/bin/switch-to-configuration", "boot"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    log = root / "var" / "log" / "switch-to-configuration.log"
    assert log.read_text() == f"action=boot NIXOS_INSTALL_BOOTLOADER=1 toplevel={top}\n"
    # init (activate, then the fake systemd) runs there too.
    res = subprocess.run([chroot, root, f"{top}/init"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"activating {top}\nsystemd 254.6\n"


def test_git_from_the_flakes_nixpkgs(example: dict) -> None:
    # mediabuilder builds tools for the media from the flake's own nixpkgs input.
    cmd = ["nix", "build", "--no-link", "--json", "--flake-registry", NO_REGISTRY]
    built = run(*cmd, "--inputs-from", example["flake"], "nixpkgs#git", cwd=example["dest"])
    git_path = json.loads(built.stdout)[0]["outputs"]["out"]
    assert Path(git_path).name[33:].startswith("git-")
    assert closure(git_path) == {git_path, busybox_of(example["toplevel"]["alpha"])}
    wrapper = Path(git_path) / "bin" / "git"
    assert wrapper.read_text().startswith(f"#!{busybox_of(example['toplevel']['alpha'])}/bin/sh\n")
    assert run(wrapper, "--version").stdout.startswith("git version ")


def test_inputs(example: dict) -> None:
    # The shapes only (tests/test_flake_inputs.py pins every field and follows them onto media).
    meta = json.loads(run("nix", "flake", "metadata", "--json", example["flake"]).stdout)
    nodes = meta["locks"]["nodes"]
    root = nodes[meta["locks"]["root"]]["inputs"]
    assert nodes[root["nixpkgs"]]["locked"]["type"] == "github"
    assert nodes[root["site"]]["locked"]["type"] == "path"
    assert nodes[root["tools"]]["locked"]["type"] == "git"
    # tools' nixpkgs follows the flake's (its own lock's older pin is not used); its systems is
    # an input the flake does not name.
    assert nodes[root["tools"]]["inputs"] == {"nixpkgs": ["nixpkgs"], "systems": "systems"}
    assert "systems" not in root and nodes["systems"]["locked"]["type"] == "git"

    archive = json.loads(run("unshare", "--net", "nix", "flake", "archive", "--json", example["flake"]).stdout)
    assert set(archive["inputs"]) == {"nixpkgs", "site", "tools"}
    assert set(archive["inputs"]["tools"]["inputs"]) == {"systems"}


def eval_toplevel(
    flake_ref: str, host: str = "alpha", store: Path | None = None
) -> subprocess.CompletedProcess[str]:
    opts = ["--store", str(store)] if store else []
    attr = f"{flake_ref}#{TOPLEVEL.format(host=host)}.outPath"
    return run("unshare", "--net", "nix", *opts, "eval", "--raw", attr, check=False)


def test_without_git_the_system_differs(example: dict, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(example["flake"], copy, ignore=shutil.ignore_patterns(".git"))
    res = eval_toplevel(f"path:{copy}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("/nix/store/")
    assert res.stdout != example["toplevel"]["alpha"]


def test_inputs_out_of_reach(example: dict, tmp_path: Path) -> None:
    # Locked inputs already valid in /nix/store are used without fetching (found by narHash),
    # so use fresh stores, offline. The github: nixpkgs is never downloaded: its source is put
    # into the store beforehand (prepare.sh does that for /nix/store, here `nix copy`).
    flake = f"git+file://{example['flake']}"
    archive = json.loads(run("nix", "flake", "archive", "--json", example["flake"]).stdout)
    nixpkgs = archive["inputs"]["nixpkgs"]["path"]
    no_github = eval_toplevel(flake, store=tmp_path / "store-no-nixpkgs")
    assert no_github.returncode != 0
    assert "github.com" in no_github.stderr and "NixOS/nixpkgs" in no_github.stderr

    run("nix", "copy", "--no-check-sigs", "--to", tmp_path / "store-ok", nixpkgs)
    ok = eval_toplevel(flake, store=tmp_path / "store-ok")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == example["toplevel"]["alpha"]

    run("nix", "copy", "--no-check-sigs", "--to", tmp_path / "store-missing", nixpkgs)
    inputs = example["dest"] / "inputs"
    away = example["dest"] / "inputs.away"
    inputs.rename(away)
    try:
        res = eval_toplevel(flake, store=tmp_path / "store-missing")
    finally:
        away.rename(inputs)
    assert res.returncode != 0
    assert "inputs/tools" in res.stderr or "inputs/site" in res.stderr
