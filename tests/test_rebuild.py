"""Offline rebuilds (`--rebuild none|config|full`, docs/rebuild.md), end to end: media of host
alpha at each level, each installed offline (network namespace, medium read-only) into a
scratch root; then a configuration value is changed in ROOT/etc/nixos, committed, and the new
toplevel built against the target's store in a network namespace with no substituter and the
flake inputs' sources out of reach. It builds for config and full and fails for none. Plus the
selection itself on a small graph, the .drv reader, and the profile setting."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_one_line_error, closure_of, make_nix_env, nix, prepare_example, run_cli
from test_install import install_offline

from mediabuilder.errors import InvalidInput
from mediabuilder.profile import RebuildLevel, load_profile
from mediabuilder.rebuild import config_selection, full_selection
from mediabuilder.store.derivation import Derivation

LEVELS = ("none", "config", "full")
TOPLEVEL = "nixosConfigurations.alpha.config.system.build.toplevel"
# The value changed on the installed machine: nginx's unit script.
OLD_SCRIPT = "exec ${pkgs.nginx}/bin/nginx -c /etc/nginx/nginx.conf"
NEW_SCRIPT = "exec ${pkgs.nginx}/bin/nginx -g 'daemon off;' -c /etc/nginx/nginx.conf"
# What that change rebuilds, by name: the unit script, the units, /etc and the toplevel.
REBUILT = ["etc", "nixos-system-alpha", "system-units", "unit-script-nginx-start"]


def _git(*args: str | Path) -> str:
    return subprocess.run(["git", *map(str, args)], capture_output=True, text=True, check=True).stdout.strip()


def _commit(repo: Path, message: str) -> None:
    _git("-C", repo, "-c", "user.name=Admin", "-c", "user.email=admin@example.invalid", "commit", "-qam", message)


@dataclass(frozen=True)
class Setup:
    dest: Path
    flake: Path
    toplevel: str
    media: dict[str, Path]
    manifests: dict[str, dict]
    roots: dict[str, Path]
    cache: Path  # with the media key


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base = tmp_path_factory.mktemp("rebuild")
    dest = base / "example"
    prepare_example(dest)
    flake = dest / "flake"
    media, manifests, roots, toplevels = {}, {}, {}, set()
    for level in LEVELS:
        media[level] = base / f"media-{level}"
        proc = run_cli("build", f"--flake={flake}#alpha", "--cache", base / "cache", "--output", media[level],
                       "--rebuild", level)
        assert proc.returncode == 0, proc.stderr
        toplevels.add(proc.stdout.split("\t")[1].strip())
        manifests[level] = json.loads((media[level] / "manifest.json").read_text())
        roots[level] = base / f"root-{level}"
        roots[level].mkdir()
        proc = install_offline(media[level], roots[level], "--yes")
        assert proc.returncode == 0, proc.stderr
    (toplevel,) = toplevels  # the level changes what is shipped, never the system
    return Setup(dest, flake, toplevel, media, manifests, roots, base / "cache")


@contextlib.contextmanager
def inputs_out_of_reach(dest: Path) -> Iterator[None]:
    """The example's input repositories moved away: the target has only its own store."""
    hidden = dest.parent / "inputs-out-of-reach"
    os.rename(dest / "inputs", hidden)
    try:
        yield
    finally:
        os.rename(hidden, dest / "inputs")


def rebuild_on_target(root: Path, message: str) -> subprocess.CompletedProcess[str]:
    """Change nginx's unit script in ROOT/etc/nixos (to a text of its own per call: Nix 2.8's
    evaluation cache knows a flake by its tree, not its revision, and is shared by all stores),
    commit, and build alpha's toplevel against ROOT's store, offline, with root's nix.conf of the
    target (no substituter)."""
    alpha = root / "etc/nixos/hosts/alpha.nix"
    text = alpha.read_text()
    assert OLD_SCRIPT in text
    alpha.write_text(text.replace(OLD_SCRIPT, f"{NEW_SCRIPT}  # {message}"))
    _commit(root / "etc/nixos", message)
    conf = (root / "root/.config/nix/nix.conf").read_text()
    conf_file = root.parent / f"{root.name}-nix.conf"
    conf_file.write_text(conf.replace("/var/lib/mediabuilder/", f"{root}/var/lib/mediabuilder/")
                         + "build-users-group = nixbld\n")
    env = {k: v for k, v in make_nix_env().items() if k != "NIX_CONFIG"}
    env |= {"NIX_USER_CONF_FILES": str(conf_file), "NIX_CONF_DIR": str(root / "etc/nix")}
    return subprocess.run(
        ["unshare", "-n", "-m", "bash", "-c", WITH_BUILD_USERS, "with-build-users", root.parent,
         "nix", "build", "--store", str(root), "--no-link", "--json", f"git+file://{root}/etc/nixos#{TOPLEVEL}",
         "--option", "substituters", "", "--option", "eval-cache", "false"],
        env=env, capture_output=True, text=True, timeout=600, check=False)


# Nix builds in a store elsewhere than /nix/store (`--store ROOT`) inside a sandbox; without
# build users that needs a user namespace, which Nix 2.26 cannot make in the Debian 13 test root
# (a chroot: the kernel refuses CLONE_NEWUSER there). A NixOS machine and the NixOS installer have
# build users: so does the rebuild here, a group `nixbld` with one user bind-mounted over
# /etc/group and /etc/passwd in a private mount namespace (the files themselves are untouched).
WITH_BUILD_USERS = """set -e
scratch=$1; shift
cp /etc/group "$scratch/group"; cp /etc/passwd "$scratch/passwd"
echo 'nixbld:x:30000:nixbld1' >>"$scratch/group"
echo 'nixbld1:x:30001:30000:Nix build user:/var/empty:/bin/false' >>"$scratch/passwd"
mount --bind "$scratch/group" /etc/group
mount --bind "$scratch/passwd" /etc/passwd
exec "$@"
"""


def built_names(stderr: str) -> list[str]:
    """The derivations Nix says it built, by name without version."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("building '/nix/store/"):
            name = line.split("'")[1][44:].removesuffix(".drv")
            names.append("nixos-system-alpha" if name.startswith("nixos-system-alpha-") else name)
    return sorted(names)


def valid_in(root: Path, path: str) -> bool:
    proc = nix("nix-store", "--store", str(root), "--check-validity", path, check=False)
    return proc.returncode == 0


def names(paths: list[str]) -> set[str]:
    return {p[44:] for p in paths}


@pytest.mark.integration
def test_levels_nest_and_are_recorded(setup: Setup) -> None:
    paths = {level: set(setup.manifests[level]["store_paths"]) for level in LEVELS}
    assert paths["none"] < paths["config"] < paths["full"]
    for level in LEVELS:
        assert setup.manifests[level]["rebuild"] == level
        # The manifest the medium's signature covers is the one install.sh read (it checks them equal).
        host = setup.manifests[level]["hosts"]["alpha"]
        assert host["paths"] == len(paths[level])
    # none: the system, the flake inputs and git, nothing else.
    runtime = set(closure_of(setup.toplevel))
    assert runtime <= paths["none"]
    assert not [p for p in paths["none"] if p.endswith(".drv")]
    # config: every .drv and the build inputs of the system's derivations (bootstrap tools, stdenv,
    # the build-only compiler), but not the fixed-output bootstrap busybox those were made from
    # nor binutils, an input of gcc only.
    extra_config = names(sorted(paths["config"] - paths["none"]))
    assert {"bootstrap-tools", "stdenv-linux", "gcc-wrapper-13.2.0"} <= extra_config
    assert names(sorted(paths["full"] - paths["config"])) == {"bootstrap-busybox", "binutils-2.40"}
    drvs = {p for p in paths["full"] if p.endswith(".drv")}
    assert drvs <= paths["config"]
    top_drv = nix("nix-store", "--query", "--deriver", setup.toplevel).stdout.strip()
    assert drvs == {p for p in nix("nix-store", "--query", "--requisites", top_drv).stdout.split()
                    if p.endswith(".drv")}
    sizes = {level: setup.manifests[level]["hosts"]["alpha"]["nar_bytes"] for level in LEVELS}
    assert sizes["none"] < sizes["config"] < sizes["full"]


@pytest.mark.integration
def test_install_keeps_build_inputs_and_turns_substituters_off(setup: Setup) -> None:
    for level in LEVELS:
        root = setup.roots[level]
        conf = (root / "root/.config/nix/nix.conf").read_text().splitlines()
        roots_dir = root / "nix/var/nix/gcroots/mediabuilder-rebuild"
        if level == "none":
            assert "substituters =" not in conf
            assert not roots_dir.exists()
            continue
        assert "substituters =" in conf
        shipped = set(setup.manifests[level]["store_paths"])
        assert {os.readlink(p) for p in roots_dir.iterdir()} == shipped
        assert all(valid_in(root, p) for p in shipped)
    # The system itself wants none either (the example's /etc/nix/nix.conf).
    assert "substituters =" in (Path(setup.toplevel) / "etc/nix/nix.conf").read_text().splitlines()


@pytest.mark.integration
def test_dry_run_plan_shows_the_rebuild_step(setup: Setup, tmp_path: Path) -> None:
    """The plan names every step that writes the target; with --rebuild config|full one of them
    roots the host's paths (build inputs among them) and turns substituters off: the level and
    how many paths it keeps."""
    plans, root_of = {}, {}
    for level in LEVELS:
        root = root_of[level] = tmp_path / f"root-{level}"
        root.mkdir()
        proc = install_offline(setup.media[level], root, "--dry-run", "--yes")
        assert proc.returncode == 0, proc.stderr
        assert list(root.iterdir()) == []
        plans[level] = proc.stderr.splitlines()
    assert not [line for line in plans["none"] if "rebuild" in line]
    for level in ("config", "full"):
        paths = setup.manifests[level]["hosts"]["alpha"]["paths"]
        assert paths > setup.manifests["none"]["hosts"]["alpha"]["paths"]
        wanted = [line.strip() for line in plans[level] if "offline rebuilds" in line]
        assert wanted == [f'offline rebuilds ({level}): root the {paths} store paths (closure, flake inputs, tools, '
                          f"build inputs) in {root_of[level]}/nix/var/nix/gcroots/mediabuilder-rebuild; write "
                          f'"substituters =" into {root_of[level]}/root/.config/nix/nix.conf'], plans[level]


@pytest.mark.integration
@pytest.mark.parametrize("level", ["config", "full"])
def test_configuration_change_rebuilds_offline(setup: Setup, level: str) -> None:
    root = setup.roots[level]
    with inputs_out_of_reach(setup.dest):
        proc = rebuild_on_target(root, f"alpha: nginx in the foreground ({level})")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    new = result["outputs"]["out"]
    assert new != setup.toplevel
    assert valid_in(root, new)
    assert not os.path.exists(new)  # built in the target's store, not the build machine's
    assert built_names(proc.stderr) == REBUILT  # nothing else was built, nothing downloaded
    assert "copying path" not in proc.stderr
    script = [p for p in (root / "nix/store").iterdir() if p.name.endswith("-unit-script-nginx-start")]
    assert any("daemon off;" in p.read_text() for p in script)


@pytest.mark.integration
def test_configuration_change_fails_cleanly_without_build_inputs(setup: Setup) -> None:
    root = setup.roots["none"]
    with inputs_out_of_reach(setup.dest):
        proc = rebuild_on_target(root, "alpha: nginx in the foreground (none)")
    assert proc.returncode == 1, proc.stderr
    # What is missing is a build input that no substituter has and the target cannot build.
    assert "dependencies of derivation" in proc.stderr and "failed to build" in proc.stderr, proc.stderr
    assert "bootstrap-busybox.drv" in proc.stderr, proc.stderr
    assert "error: unable to download" not in proc.stderr and "evaluation" not in proc.stderr, proc.stderr


@pytest.mark.integration
def test_upgrade_brings_the_build_inputs(setup: Setup, tmp_path: Path) -> None:
    # The machine installed with none is upgraded from a newer medium built with config: the
    # build inputs come with it, and a configuration change then rebuilds offline.
    flake = tmp_path / "flake"
    _git("clone", "-q", setup.flake, flake)
    note = flake / "hosts/alpha.nix"
    note.write_text(note.read_text()[:-2] + '  environment.etc."note".text = "B";\n}\n')
    _commit(flake, "alpha: a note")
    medium = tmp_path / "media-config-b"
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", setup.cache, "--output", medium,
                   "--rebuild", "config")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(setup.media["none"], root, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "substituters =" not in (root / "root/.config/nix/nix.conf").read_text().splitlines()
    proc = install_offline(medium, root, "--upgrade", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "substituters =" in (root / "root/.config/nix/nix.conf").read_text().splitlines()
    with inputs_out_of_reach(setup.dest):
        proc = rebuild_on_target(root, "alpha: nginx in the foreground (after the upgrade)")
    assert proc.returncode == 0, proc.stderr
    assert built_names(proc.stderr) == REBUILT
    # A newer medium without build inputs: their GC root goes (root's nix.conf stays as it is).
    roots_dir = root / "nix/var/nix/gcroots/mediabuilder-rebuild"
    assert roots_dir.is_dir()
    note.write_text(note.read_text().replace('"B"', '"C"'))
    _commit(flake, "alpha: note C")
    medium_c = tmp_path / "media-none-c"
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", setup.cache, "--output", medium_c)
    assert proc.returncode == 0, proc.stderr
    proc = install_offline(medium_c, root, "--upgrade", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not roots_dir.exists()


@pytest.mark.integration
def test_a_system_that_wants_a_substituter_is_refused(setup: Setup, tmp_path: Path) -> None:
    flake = tmp_path / "flake"
    _git("clone", "-q", setup.flake, flake)
    common = flake / "hosts/common.nix"
    common.write_text(common.read_text().replace("      substituters =\n",
                                                 "      substituters = https://cache.nixos.org/\n"))
    _commit(flake, "common: the public cache")
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", tmp_path / "cache", "--output", tmp_path / "m",
                   "--rebuild", "config")
    assert_one_line_error(proc, "alpha:", "etc/nix/nix.conf", "substituters = https://cache.nixos.org/",
                          "--rebuild config")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# The selection on a small graph, the .drv reader and the setting (no Nix)

def _drv(name: str, inputs: dict[str, tuple[str, ...]] | None = None, srcs: tuple[str, ...] = (),
         outputs: tuple[str, ...] = ("out",)) -> Derivation:
    outs = {o: f"/nix/store/{name}{'' if o == 'out' else '-' + o}" for o in outputs}
    return Derivation(f"/nix/store/{name}.drv", outs, inputs or {}, srcs, "/nix/store/tools/bin/sh")


def test_config_selection_on_a_small_graph() -> None:
    # fod -> tools -> compiler -> lib, app (packages) -> conf -> top; cc-src only feeds the compiler.
    graph = [
        _drv("fod"),
        _drv("tools", {"/nix/store/fod.drv": ("out",)}),
        _drv("cc-src"),
        _drv("compiler", {"/nix/store/tools.drv": ("out",), "/nix/store/cc-src.drv": ("out",)}),
        _drv("lib", {"/nix/store/tools.drv": ("out",), "/nix/store/compiler.drv": ("out",)},
             outputs=("out", "dev")),
        _drv("app", {"/nix/store/compiler.drv": ("out",), "/nix/store/lib.drv": ("dev",)}, srcs=("/nix/store/patch",)),
        _drv("conf", {"/nix/store/tools.drv": ("out",)}, srcs=("/nix/store/conf-builder.sh",)),
        _drv("top", {"/nix/store/conf.drv": ("out",), "/nix/store/app.drv": ("out",),
                     "/nix/store/tools.drv": ("out",)}),
    ]
    drvs = {d.path: d for d in graph}
    # The installed system: top, conf, app and lib's out (app's runtime reference), and a source.
    runtime = ["/nix/store/top", "/nix/store/conf", "/nix/store/app", "/nix/store/lib", "/nix/store/data-source"]
    assert config_selection(drvs, runtime) == {
        "/nix/store/conf", "/nix/store/app", "/nix/store/tools",  # inputs of top
        "/nix/store/compiler", "/nix/store/lib-dev", "/nix/store/patch",  # of app (lib: only its dev output)
        "/nix/store/conf-builder.sh",  # of conf
    }  # lib's inputs (tools, compiler) are there already; not fod, cc-src: inputs of non-system derivations
    assert full_selection(drvs) == {
        "/nix/store/fod", "/nix/store/tools", "/nix/store/cc-src", "/nix/store/compiler", "/nix/store/lib",
        "/nix/store/lib-dev", "/nix/store/app", "/nix/store/conf", "/nix/store/top"}
    assert config_selection(drvs, []) == set()


def test_config_selection_refuses_a_content_addressed_output() -> None:
    floating = Derivation("/nix/store/ca.drv", {"out": ""}, {}, (), "/nix/store/tools/bin/sh")
    top = _drv("top", {"/nix/store/ca.drv": ("out",)})
    with pytest.raises(InvalidInput, match="content-addressed"):
        config_selection({floating.path: floating, top.path: top}, ["/nix/store/top"])


def test_derivation_reader() -> None:
    text = ('Derive([("dev","/nix/store/a-x-dev","",""),("out","/nix/store/b-x","","")],'
            '[("/nix/store/c-y.drv",["lib","out"]),("/nix/store/d-z.drv",["out"])],["/nix/store/e-src"],'
            '"x86_64-linux","/nix/store/f-sh/bin/sh",["-c","echo \\"hi\\"\\n"],[("name","x"),("q","a\\\\b")])')
    d = Derivation.parse(text, "/nix/store/g-x.drv")
    assert d.outputs == {"dev": "/nix/store/a-x-dev", "out": "/nix/store/b-x"}
    assert d.input_drvs == {"/nix/store/c-y.drv": ("lib", "out"), "/nix/store/d-z.drv": ("out",)}
    assert d.input_srcs == ("/nix/store/e-src",)
    assert d.builder == "/nix/store/f-sh/bin/sh"
    with pytest.raises(InvalidInput, match="g-x.drv: not a derivation"):
        Derivation.parse("DrvWithVersion(" + text[7:], "/nix/store/g-x.drv")
    with pytest.raises(InvalidInput, match="unterminated string"):
        Derivation.parse('Derive([("out","/nix/store/b-x', "/nix/store/g-x.drv")


def test_profile_rebuild_setting(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[media]\nrebuild = "config"\n')
    assert load_profile(profile).media.rebuild is RebuildLevel.CONFIG
    profile.write_text('[media]\nrebuild = "all"\n')
    with pytest.raises(InvalidInput, match=r"p.toml: media.rebuild: 'all' is not one of none, config, full"):
        load_profile(profile)
