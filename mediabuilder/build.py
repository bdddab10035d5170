"""`mediabuilder build`: the recipe that turns a flake's hosts into an offline install medium.

    resolve hosts → check the repository → build toplevels → archive inputs → add tools →
    read closures → fill the cache → assemble the tree → sign the manifest → write the image
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mediabuilder import __version__, flakelock, nixcli, rebuild, ui
from mediabuilder import run as runner
from mediabuilder.cache.compression import decompressing_reader
from mediabuilder.cache.layout import CACHE_INFO, SECRET_KEY, SUBDIRS, BinaryCache, default_key_name, load_or_create_key
from mediabuilder.cache.writer import export_tree, fill
from mediabuilder.errors import ExternalError, InvalidInput
from mediabuilder.installer import layout as layouts
from mediabuilder.media import flakerepo, fsinfo, output, registry, reproducible, scripts, split
from mediabuilder.media.label import DEFAULT_LABEL, validate_label
from mediabuilder.media.manifest import FileEntry, HostEntry, Manifest, collect_files, trust_path
from mediabuilder.profile import (
    CacheSettings,
    InstallSettings,
    MediaFormat,
    MediaSettings,
    PartitionTable,
    RebuildLevel,
)
from mediabuilder.store import nar, nix32
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.pathinfo import PathInfo
from mediabuilder.store.storepath import StorePath

if TYPE_CHECKING:
    from mediabuilder.media import delta

README = """\
This medium installs a NixOS system with no network.

Boot the NixOS installer, partition and mount the target at /mnt, then run (from /iso, or the
directory this file is in):

    bash /iso/install.sh --expect-key abcd:ef01:2345:6789:abcd:ef01:2345:6789

with the fingerprint of the media key that the medium's maker gave you (`mediabuilder build`
printed it). Take it from the maker, never from this medium: install.sh is on the medium too, so
only a key checked out of band tells a forged medium from a real one. Without --expect-key,
install.sh shows the fingerprint and asks you to confirm it.

It checks the medium first (signatures and sha256 of every file), then copies the system,
installs the boot loader and puts the flake repository with its history in /etc/nixos.
Options: install.sh --help. What is on the medium: manifest.json.
"""


@dataclass(frozen=True)
class BuildRequest:
    refs: tuple[str, ...]
    cache: CacheSettings
    media: MediaSettings
    output: Path
    force: bool = False
    allow_dirty: bool = False
    tools: tuple[str, ...] = ("git",)
    # Extra store paths (with their closures) put on the media and installed with every host.
    extra_paths: tuple[StorePath, ...] = ()
    # Prebuilt systems (host name, toplevel): no evaluation, no local Nix needed.
    systems: tuple[tuple[str, StorePath], ...] = ()
    substituters: tuple[str, ...] = ()
    substituter_keys: tuple[str, ...] = ()
    # A delta medium: only what OLD (an older medium or its manifest) lacks.
    since: Path | None = None
    install: InstallSettings = InstallSettings()


@dataclass
class Target:
    """Where the medium goes (absolute), how, and the lock that keeps other builds out."""

    path: Path
    inside: bool  # write inside an existing directory (an empty one, a mounted stick)
    replace: bool  # an existing image or medium is replaced (--force)
    lock: output.Lock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def protected_paths(req: BuildRequest, repo: flakerepo.FlakeRepo) -> list[output.Protected]:
    """The cache, the key and the flake's repository: no output may hold or lie in them."""
    found = [output.Protected(req.cache.dir, "the cache"), output.Protected(repo.top, "the flake repository")]
    if req.cache.key is not None:
        found.append(output.Protected(req.cache.key, "the signing key"))
    return found


def check_output(req: BuildRequest, repo: flakerepo.FlakeRepo) -> Target:
    """Everything about the output that can be known before any work; locks an existing one."""
    out = Path(os.path.abspath(req.output))
    is_dir_format = req.media.format is MediaFormat.DIR
    if is_dir_format and out.is_symlink() and out.is_dir():  # ~/stick -> /media/me/STICK
        out = Path(os.path.realpath(out))
    if not is_dir_format and out.is_dir():
        fmt = req.media.format.value
        raise InvalidInput(f"{req.output}: is a directory, but --format {fmt} writes an image file",
                           hint=f"name the file, e.g. --output {req.output}/media.{fmt}")
    output.check_not_protected(out, protected_paths(req, repo))
    if os.path.lexists(out):
        if is_dir_format:
            return _existing_directory(out, req.force)
        if not out.is_file() or out.is_symlink():
            raise InvalidInput(f"{req.output}: exists and is not a regular file", hint="choose another --output")
        if not req.force:
            raise InvalidInput(f"{req.output}: already exists", hint="choose another --output or pass --force")
        _check_writable(out.parent)
        return Target(out, inside=False, replace=True, lock=output.Lock(out, "this image"))
    _check_writable(out.parent)
    return Target(out, inside=False, replace=False)


def _check_writable(parent: Path) -> None:
    if not parent.is_dir():
        raise InvalidInput(f"{parent}: no such directory for --output")
    if not os.access(parent, os.W_OK):
        raise InvalidInput(f"{parent}: not writable", hint="choose another --output")


def _existing_directory(out: Path, force: bool) -> Target:
    """An existing directory as the output of --format dir: written inside when it is empty or
    holds only an earlier medium (--force); anything else in it is the user's."""
    if not out.is_dir():
        raise InvalidInput(f"{out}: exists and is not a directory", hint="choose another --output")
    if not os.access(out, os.W_OK):
        raise InvalidInput(f"{out}: not writable", hint="mount the stick writable or choose another --output")
    lock = output.Lock(out, "this medium")
    try:
        output.remove_stale(out, output.TMP_PREFIX)
        foreign = output.foreign_entries(out)
        if foreign:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise InvalidInput(f"{out}: holds files that are not part of a medium ({listed})",
                               hint="choose an empty directory; mediabuilder never deletes what it did not write")
        old = output.media_entries(out)
        if old and not force:
            raise InvalidInput(f"{out}: already holds a medium", hint="pass --force to replace it")
    except BaseException:
        lock.release()
        raise
    return Target(out, inside=True, replace=bool(old), lock=lock)


def start_tools(flake: str, tools: tuple[str, ...]) -> dict[str, runner.Started]:
    """Start building each tool from the flake's own locked nixpkgs input (`finish_tools`
    takes the answers)."""
    started = {}
    for tool in tools:
        # Through the flake's own lock (not `--inputs-from`, which consults the global registry).
        expr = (f"(builtins.getFlake {json.dumps(flake)}).inputs.nixpkgs.legacyPackages"
                f".${{builtins.currentSystem}}.{json.dumps(tool)}")
        started[tool] = runner.start([*nixcli.NIX, "build", "--no-link", "--json", "--impure", "--expr", expr])
    return started


def finish_tools(started: dict[str, runner.Started]) -> dict[str, StorePath]:
    """Each tool `start_tools` began; a tool that could not be built is reported and left out
    (install.sh then uses the installer's)."""
    found: dict[str, StorePath] = {}
    for tool, job in started.items():
        try:
            proc = job.result()
        except ExternalError:
            ui.warn(f"could not build `{tool}` from the flake's nixpkgs: install.sh will use the installer's")
            continue
        (built,) = json.loads(proc.stdout)  # one installable, one answer
        found[tool] = StorePath.parse(built["outputs"]["out"])
    return found


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def assemble_cache(local: BinaryCache, media: Path, paths: list[StorePath]) -> dict[str, FileEntry]:
    """Copy the narinfos and NARs of `paths` from the local cache into `media/cache`; returns the
    manifest entries of the NAR files, whose sha256 the narinfos already give, and of the
    narinfos linked to the very files that were parsed (hashed as they were read)."""
    root = media / "cache"
    root.mkdir()
    for sub in SUBDIRS:
        (root / sub).mkdir()
    (root / "nix-cache-info").write_text(CACHE_INFO)
    known: dict[str, FileEntry] = {}
    infos: list[NarInfo] = [local.read_narinfo(p) for p in paths]
    with ui.progress(sum(i.file_size or 0 for i in infos), "copying cache") as bar:

        def link_or_copy_nar(src: Path, dst: str) -> None:
            """A hard link; across filesystems a copy, the bar following its bytes."""
            try:
                os.link(src, dst)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
            start = bar.n

            def copied() -> int:
                with contextlib.suppress(FileNotFoundError):
                    return int(start + os.stat(dst).st_size)
                return int(start)

            with ui.ticking(bar, copied):
                shutil.copyfile(src, dst)
            bar.update(start - bar.n)  # the whole file is counted by the caller

        top = str(root)  # strings, not Paths: pathlib's joins were a third of this loop
        for info in infos:
            name = f"{info.store_path.hash_part}.narinfo"
            narinfo = f"{top}/{name}"
            link_or_copy(local.narinfo_file(info.store_path), narinfo)
            parsed = local.narinfo_digest(info.store_path, narinfo)  # a link to what was parsed
            if parsed is not None:
                known[f"cache/{name}"] = FileEntry(*parsed)
            nar_file = f"{top}/{info.url}"
            if os.path.exists(nar_file):  # two paths with the same NAR
                continue
            link_or_copy_nar(local.file_path(info.url), nar_file)
            assert info.file_hash is not None and info.file_size is not None
            digest = nix32.decode(info.file_hash.removeprefix("sha256:"))
            known[f"cache/{info.url}"] = FileEntry(info.file_size, digest.hex())
            bar.update(info.file_size)
    return known


@dataclass(frozen=True)
class Source:
    """What the flake gives the media: systems, repository, inputs, pins and tools."""

    toplevels: dict[str, StorePath]
    repo: flakerepo.FlakeRepo
    flake_dir: Path
    input_paths: tuple[StorePath, ...]
    pins: registry.Registry
    self_source: str | None
    tools: dict[str, StorePath]
    layouts: dict[str, layouts.HostLayout]


def build_media(req: BuildRequest) -> dict[str, str]:
    """The recipe. Returns host → toplevel."""
    check_media_settings(req.media)
    reproducible.source_date_epoch(None)  # a bad SOURCE_DATE_EPOCH is refused before any work
    if req.media.installer is not None:
        check_installer_hosts(req)
    have_nix = check_nix(req)
    if req.media.rebuild is not RebuildLevel.NONE and not have_nix:
        raise InvalidInput(f"--rebuild {req.media.rebuild.value}: needs a local Nix, which reads the build closure "
                           "from the derivations", hint="build on a machine with Nix, or pass --rebuild none")
    layouts.check_settings(req.install, request_hosts(req), req.media.installer is not None, req.media.boot_default)
    runner.require("git")
    if req.cache.key is not None:
        if not req.cache.key.is_file():
            raise InvalidInput(f"{req.cache.key}: no such key file", hint="make one with `mediabuilder keygen NAME`")
        SecretKey.load(req.cache.key)  # a broken key is refused before anything is made
    repo = check_source(req)  # the repository, before the cache and key are created and before any evaluation
    if have_nix:
        check_lock(req)
    target = check_output(req, repo)
    try:
        return _build(req, target, have_nix, repo)
    finally:
        target.release()


def check_nix(req: BuildRequest) -> bool:
    """Whether a local Nix is there to use; without one only prebuilt `--system`s can be shipped."""
    if shutil.which("nix") is not None:
        nixcli.ensure_available()
        nixcli.check_store_access()
        return True
    if not req.systems:
        raise InvalidInput("could not find `nix`, which is needed to evaluate the flake's hosts",
                           hint="install nix-bin, or pass --system NAME=/nix/store/... with --substituter URL")
    return False


def _build(req: BuildRequest, target: Target, have_nix: bool, repo: flakerepo.FlakeRepo) -> dict[str, str]:
    cache = BinaryCache(req.cache.dir)
    cache.create()
    output.remove_stale(cache.root, output.TMP_PREFIX)
    output.remove_stale(target.path.parent, output.TMP_PREFIX)
    key, created = load_or_create_key(cache, req.cache.key, default_key_name())
    if created:
        ui.info(f"  created signing key {cache.root / 'signing-key.sec'} ({key.name})")

    ui.info(f"Building media {req.output} ({req.media.format.value})")
    base = read_base(req, key)
    source = resolve_source(req, have_nix, repo)
    build_inputs = select_rebuild_paths(req.media.rebuild, source.toplevels)
    extra = [*source.input_paths, *source.tools.values(), *req.extra_paths]
    roots = {host: [toplevel, *extra, *build_inputs.get(host, [])] for host, toplevel in source.toplevels.items()}
    for host, chosen in source.layouts.items():
        if chosen.disko is not None:  # the host's disko script and the tools in its closure
            roots[host].append(chosen.disko)
    fill_cache(req, cache, key, sorted({p for r in roots.values() for p in r}), have_nix)
    check_systems(req, cache)
    with ui.step("Reading closures") as step:
        closures = {host: cache_closure(cache, r) for host, r in roots.items()}
        union = sorted({i.store_path for infos in closures.values() for i in infos})
        nar_bytes = sum(cache.read_narinfo(p).nar_size for p in union)
        step.detail = f"{len(union)} paths, {ui.human_bytes(nar_bytes)} of NAR"

    try:
        write_media(req, target, cache, key, source, closures, union, have_nix, base)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = " (the medium that was there is untouched)" if target.inside and target.replace else ""
            raise InvalidInput(f"{req.output}: no space left on device while writing the media{kept}",
                               hint="free some space or choose another --output") from None
        raise
    return {h: str(t) for h, t in source.toplevels.items()}


def select_rebuild_paths(level: RebuildLevel, toplevels: dict[str, StorePath]) -> dict[str, list[StorePath]]:
    """Each host's paths for offline rebuilds beyond its system (docs/rebuild.md); a system that
    wants a substituter is refused first."""
    if level is RebuildLevel.NONE:
        return {}
    with ui.step(f"Selecting what rebuilds need (--rebuild {level.value})") as step:
        found = {}
        for host, toplevel in toplevels.items():
            rebuild.check_no_substituters(host, toplevel, level)
            runtime = [i.path for i in nixcli.closure([toplevel])]
            found[host] = rebuild.select(level, host, toplevel, runtime)
        step.detail = ", ".join(f"{h}: {len(p)} roots" for h, p in found.items())
    return found


def read_base(req: BuildRequest, key: SecretKey) -> delta.Base | None:
    """OLD of `--since`, before any evaluation: a medium signed by this build's key, or a manifest."""
    if req.since is None:
        return None
    from mediabuilder.media import delta

    with ui.step("Reading the base (--since)") as step:
        base = delta.load_base(req.since, [key.public()])
        step.detail = (f"{'signed medium' if base.signed else 'unsigned manifest'} at {base.rev[:12]}, "
                       f"{len(base.paths)} paths")
    return base


def leave_out_base(closures: dict[str, list[NarInfo]], union: list[StorePath],
                   base: delta.Base | None) -> tuple[list[StorePath], list[str]]:
    """The paths the medium ships and those it relies on: all and none, or for a delta medium
    what the base lacks and what it holds."""
    if base is None:
        return union, []
    from mediabuilder.media import delta

    with ui.step("Leaving out what the base holds") as step:
        ships, relied = delta.split({h: [str(i.store_path) for i in c] for h, c in closures.items()}, base)
        step.detail = f"{len(ships)} of {len(union)} paths shipped, {len(relied)} relied on"
    return [StorePath.parse(p) for p in ships], relied


def staging_place(req: BuildRequest, target: Target, cache: BinaryCache) -> Path:
    """Where the tree is assembled: a directory beside the output (renamed into place) or inside
    it (moved in); an image's tree beside the cache (hard links, no copies), so that the output's
    disk holds only the image."""
    if req.media.format is not MediaFormat.DIR:
        return cache.root
    return target.path if target.inside else target.path.parent


def write_media(req: BuildRequest, target: Target, cache: BinaryCache, key: SecretKey, source: Source,
                closures: dict[str, list[NarInfo]], union: list[StorePath], have_nix: bool,
                base: delta.Base | None = None) -> None:
    """Assemble the tree, sign its manifest, and write it in the output format."""
    union, relied = leave_out_base(closures, union, base)
    with output.temporary(staging_place(req, target, cache), directory=True) as staging:
        tree = staging / "media"
        tree.mkdir()
        with ui.step("Assembling the media tree") as step:
            known = assemble_cache(cache, tree, union)
            shipped = flakerepo.write_bundle(source.repo, tree / "flake" / "repo.bundle", req.allow_dirty)
            (tree / "registry.json").write_text(source.pins.render())
            (tree / "media-key.pub").write_text(key.public().render() + "\n")
            # install.sh, its parts, and what the unattended boot entry runs (docs/installer.md).
            scripts.write_scripts(tree, unattended=bool(req.install.unattended))
            (tree / "README.txt").write_text(README)
            step.detail = f"{len(known)} NAR files"
        with ui.step("Signing the manifest") as step:
            epoch = reproducible.source_date_epoch(flakerepo.commit_time(source.repo))
            manifest = make_manifest(req, source, shipped, closures, key, nixcli.version() if have_nix else "none",
                                     epoch)
            manifest.rebuild = req.media.rebuild.value
            manifest.base = base.to_json(relied) if base is not None else None
            manifest.files = collect_files(tree, known=known)
            limit = split_limit(req, target)
            # A directory medium, and the installer's tree that xorriso maps, hold the parts as files.
            in_place = req.media.format is MediaFormat.DIR or req.media.installer is not None
            split, slices = split_large_files(tree, manifest.files, limit, in_place, cache) if limit else (0, {})
            sign_manifest(manifest, tree, key, req.cache.compression.value, staging / "trust")
            step.detail = f"{len(manifest.files)} files, key {key.public().fingerprint()}"
            if split:
                step.detail += f", {split} file(s) split at {ui.human_bytes(limit or 0)}"
        with ui.step("Writing the medium") as step:
            write_output(tree, target, req, epoch, slices, tuple(sorted(source.toplevels)))
            # What the operator checks the medium against, out of band (install.sh --expect-key).
            step.detail = (f"{req.output}, media key fingerprint {key.public().fingerprint()}, "
                           f"install.sh sha256 {manifest.files['install.sh'].sha256}")


def _source_flake(req: BuildRequest) -> tuple[str, Path]:
    """The one flake of the request and its local directory (no evaluation)."""
    flakes = {nixcli.parse_flake_ref(r)[0] for r in req.refs}
    if len(flakes) != 1:
        raise InvalidInput("the media needs exactly one flake (its repository goes on the media)",
                           hint=f"got {', '.join(sorted(flakes)) or 'none'}: pass --flake PATH")
    flake = flakes.pop()
    local_dir = nixcli.local_flake_dir(flake)
    if local_dir is None:
        raise InvalidInput(f"{flake}: only a local git checkout of a flake can be put on media",
                           hint="clone the flake and pass --flake PATH#HOST")
    return flake, local_dir


def _not_changes(req: BuildRequest) -> tuple[Path, ...]:
    """What never counts as the user's changes: the cache and the signing key."""
    return (req.cache.dir, req.cache.key or req.cache.dir / SECRET_KEY)


def check_source(req: BuildRequest) -> flakerepo.FlakeRepo:
    """The flake's repository, checked before any work (no evaluation, nothing created): a
    repository state that cannot be shipped, a missing lock or a dirty tree is refused here."""
    _, local_dir = _source_flake(req)
    repo = flakerepo.open_repo(local_dir, ignore=_not_changes(req))
    if repo.dirty and not req.allow_dirty:
        raise flakerepo.dirty_error(repo)
    return repo


def check_lock(req: BuildRequest) -> None:
    """The flake's lock, read before any evaluation: one the local Nix cannot read is refused
    with what to do (Nix's own message would come from deep inside its evaluation)."""
    _, local_dir = _source_flake(req)
    flakelock.FlakeLock.read(local_dir / "flake.lock").check_readable(nixcli.version())


def resolve_source(req: BuildRequest, have_nix: bool, repo: flakerepo.FlakeRepo | None = None) -> Source:
    """Hosts, repository, inputs and tools: evaluated with the local Nix, or, without Nix, from
    `--system` toplevels and the flake's lock file. `repo`: the repository as `check_source`
    found it moments before (else it is checked here)."""
    with ui.step("Resolving hosts") as step:
        flake, local_dir = _source_flake(req)
        hosts = [] if req.systems else nixcli.resolve_hosts(req.refs)
        if req.systems and have_nix:
            check_system_names(flake, [name for name, _ in req.systems])
        step.detail = ", ".join(dict(req.systems) if req.systems else (h.host for h in hosts))
    with ui.step("Checking the repository") as step:
        repo = repo or check_source(req)
        if repo.dirty:  # --allow-dirty: built from the commit the media ships, as /etc/nixos will be
            repo = flakerepo.snapshot(repo)
            flake = flakerepo.snapshot_ref(repo)
            hosts = [nixcli.HostRef(flake, h.host) for h in hosts]
        step.detail = f"{repo.branch or 'detached'} at {repo.rev[:12]}" + (" (dirty)" if repo.dirty else "")
    # The inputs' archive and the install tools do not depend on the evaluations: they run
    # beside them (stopped if the build fails first).
    archiving = nixcli.start_flake_archive(flake) if have_nix else None
    building = start_tools(flake, req.tools) if have_nix else {}
    try:
        facts = None
        if req.systems:
            toplevels = dict(req.systems)
        else:
            with ui.step("Building toplevels") as step:
                toplevels, evaluated = nixcli.build_hosts(hosts, also=layouts.facts_expr())
                facts = {h: layouts.facts_of(v) for h, v in evaluated.items()}
                step.detail = f"{len(toplevels)} system(s)"
        with ui.step("Archiving flake inputs") as step:
            lock = local_dir / "flake.lock"
            archive = nixcli.flake_archive(archiving) if archiving else registry.archive_from_lock(lock)
            input_paths = tuple(StorePath.parse(p) for p in registry.archived_paths(archive))
            pins = registry.from_lock(lock, archive)
            step.detail = f"{len(input_paths)} sources, {len(pins.pins)} pinned"
        tools: dict[str, StorePath] = {}
        if have_nix:
            with ui.step("Adding install tools") as step:
                tools = finish_tools(building)
                step.detail = ", ".join(tools) or "none"
    finally:
        for job in [*([archiving] if archiving else []), *building.values()]:
            job.stop()
    with ui.step("Choosing disk layouts") as step:
        chosen = choose_layouts(req, flake, sorted(toplevels), have_nix, facts)
        step.detail = ", ".join(f"{h} {c.layout.value}" for h, c in chosen.items())
    return Source(toplevels, repo, local_dir, input_paths, pins, archive.get("path"), tools, chosen)


def choose_layouts(req: BuildRequest, flake: str, hosts: list[str], have_nix: bool,
                   facts: dict[str, layouts.Facts] | None = None) -> dict[str, layouts.HostLayout]:
    """Each host's layout (--layout, else disko when it has disko, else uefi), checked against
    its fileSystems (`facts`: as the evaluation of the toplevels gave them, else evaluated here);
    a disko host's script built, to go into the media cache with its closure."""
    if req.install.unattended and req.install.unattended not in hosts:
        raise InvalidInput(f"--unattended {req.install.unattended}: not one of the hosts ({', '.join(hosts)})",
                           hint="name one of the hosts given with --flake PATH#HOST")
    if facts is None:
        facts = layouts.evaluate(flake, hosts) if have_nix else {}
    chosen = {h: layouts.choose(h, req.install.layout, facts.get(h)) for h in hosts}
    layouts.build_disko([facts[h].disko[attr]["drv"] for h, (_, attr) in chosen.items() if attr])
    found = {}
    for host, (layout, attr) in chosen.items():
        if attr:
            script = StorePath.parse(facts[host].disko[attr]["out"])
            devices = layouts.disko_devices(host, facts[host])
            if host == req.install.unattended:
                layouts.check_disko_disk(host, req.install.disk, devices)
                if not devices:
                    ui.warn(f"host {host}: its disko script names no config.disko.devices: install.sh's disk guard "
                            f"checks {req.install.disk}, not what the script erases")
            found[host] = layouts.HostLayout(layout, script, layouts.disko_program(script), devices)
        else:
            found[host] = layouts.HostLayout(layout)
    return found


def check_system_names(flake: str, names: list[str]) -> None:
    """Each `--system NAME=...` must name one of the flake's hosts: its repository goes on the
    media and the installed /etc/nixos is evaluated as nixosConfigurations.NAME."""
    hosts = nixcli.list_hosts(flake)
    for name in names:
        if name not in hosts:
            raise InvalidInput(f"--system {name}=...: the flake {flake} does not define nixosConfigurations.{name}",
                               hint=f"hosts it defines: {', '.join(hosts) or 'none'}")


class _FileList:
    """A NAR sink that keeps the names of the regular files."""

    def __init__(self) -> None:
        self.files: set[str] = set()

    def directory(self, path: tuple[bytes, ...]) -> None:
        pass

    def symlink(self, path: tuple[bytes, ...], target: bytes) -> None:
        pass

    def file(self, path: tuple[bytes, ...], executable: bool, size: int) -> Callable[[bytes], object]:
        self.files.add(b"/".join(path).decode(errors="replace"))
        return lambda data: None


def check_systems(req: BuildRequest, cache: BinaryCache) -> None:
    """Each `--system` that was not in the local store (cli checked those) is a NixOS toplevel:
    read from its NAR, now in the cache."""
    for name, path in req.systems:
        if os.path.exists(path.full):
            continue
        info = cache.read_narinfo(path)
        listing = _FileList()
        with open(cache.file_path(info.url), "rb") as f:
            nar.NarParser(decompressing_reader(info.compression, f, info.url), info.url).parse(listing)
        missing = [f for f in nixcli.TOPLEVEL_FILES if f not in listing.files]
        if missing:
            raise InvalidInput(f"--system {name}={path}: not a NixOS system (no {missing[0]} in it)",
                               hint=nixcli.TOPLEVEL_HINT)


def fill_cache(req: BuildRequest, cache: BinaryCache, key: SecretKey, roots: list[StorePath], have_nix: bool) -> None:
    """Every root's closure into the local cache: from the substituters as they are, and what
    they lack from the local store."""
    local = roots
    if req.substituters:
        from mediabuilder.substituter.client import Substituter
        from mediabuilder.substituter.prefetch import default_jobs as download_jobs
        from mediabuilder.substituter.prefetch import prefetch

        with ui.step("Prefetching from substituters") as step:
            trusted = [PublicKey.parse(k, source="--trusted-key") for k in req.substituter_keys]
            jobs = req.cache.jobs or download_jobs()
            subs = [Substituter(url, trusted, jobs=jobs) for url in req.substituters]
            try:
                result = prefetch(roots, subs, cache, key, jobs)
            finally:
                for sub in subs:
                    sub.close()
            local = list(result.missing)
            step.detail = (f"{result.downloaded} downloaded ({ui.human_bytes(result.file_bytes)}), "
                           f"{result.present} already present, {len(local)} not on any substituter")
    if not local:
        return
    if not have_nix:
        listed = "\n  ".join(str(p) for p in local)
        raise InvalidInput(f"{len(local)} path(s) are on no substituter and there is no local Nix:\n  {listed}",
                           hint="add a --substituter that has them, or build on a machine with Nix")
    with ui.step("Filling binary cache") as step:
        infos = nixcli.closure(local)
        result_fill = fill(cache, infos, key, req.cache.compression.value, req.cache.jobs)
        step.detail = f"{result_fill.exported} exported, {result_fill.present} already present"


def cache_closure(cache: BinaryCache, roots: list[StorePath]) -> list[NarInfo]:
    """The closure of `roots` as the cache's narinfos describe it."""
    seen: dict[StorePath, NarInfo] = {}
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        info = cache.read_narinfo(path)
        seen[path] = info
        todo.extend(r for r in info.reference_paths() if r not in seen)
    return [seen[p] for p in sorted(seen)]


def make_manifest(req: BuildRequest, source: Source, shipped: flakerepo.FlakeRepo, closures: dict[str, list[NarInfo]],
                  key: SecretKey, nix_version: str, epoch: int) -> Manifest:
    public = key.public()
    return Manifest(
        mediabuilder=__version__,
        nix=nix_version,
        created=reproducible.iso_date(epoch),
        key={"name": key.name, "public": public.render(), "fingerprint": public.fingerprint()},
        hosts={
            host: HostEntry(
                toplevel=str(toplevel),
                flake_attr=f"nixosConfigurations.{host}",
                store_paths=tuple(str(i.store_path) for i in closures[host]),
                nar_bytes=sum(i.nar_size for i in closures[host]),
            )
            for host, toplevel in source.toplevels.items()
        },
        flake={
            "bundle": "flake/repo.bundle",
            "rev": shipped.rev,
            "branch": shipped.branch,
            "dirty": shipped.dirty,
            "subdir": shipped.subdir,
            "remotes": shipped.remotes,
            "source": source.self_source,
            "inputs": {p.id: {"path": p.path, "narHash": p.nar_hash} for p in source.pins.pins},
        },
        tools={name: str(path) for name, path in source.tools.items()},
        install=layouts.InstallRecord(req.install.unattended, req.install.disk, source.layouts),
    )


def sign_manifest(manifest: Manifest, tree: Path, key: SecretKey, compression: str, scratch: Path) -> StorePath:
    """Write manifest.json, and the signed manifest store path into the media cache (its files
    are laid out in `scratch`, an empty directory that the caller removes)."""
    rendered = manifest.render()
    (tree / "manifest.json").write_text(rendered, encoding="utf-8")
    scratch.mkdir()
    trust = scratch / "manifest"
    manifest.write_trust_dir(trust, rendered)
    path, nar_hash, nar_size = trust_path(trust)
    export_tree(BinaryCache(tree / "cache"), trust, PathInfo(path, nar_hash, nar_size, ()), key, compression)
    os.chmod(trust, 0o755)
    (tree / "manifest.storepath").write_text(f"{path}\n")
    return path


def split_limit(req: BuildRequest, target: Target) -> int | None:
    """The largest file the output can hold: images always split at one part size that every
    reader handles (docs/images.md); a directory only when its filesystem needs it (FAT32)."""
    if req.media.format is not MediaFormat.DIR:
        return split.PART_SIZE
    limit = fsinfo.max_file_size(target.path if target.inside else target.path.parent)
    return None if limit is None else min(limit, split.PART_SIZE)


def split_large_files(tree: Path, files: dict[str, FileEntry], limit: int, in_place: bool,
                      cache: BinaryCache | None = None) -> tuple[int, dict[Path, list[split.Slice]]]:
    """Give each file over `limit` numbered parts, recorded in `files`: a directory gets them as
    files beside it (`in_place`), copied and hashed in one pass, in place of the whole file; an
    image gets them as slices of the whole file, returned, that its writer reads straight from
    it (nothing is copied). An image's parts of a NAR are hashed when it entered `cache` (the
    local cache the tree's NARs are linked from), else in one read of it here. Returns (files
    split, slices)."""
    count = 0
    slices: dict[Path, list[split.Slice]] = {}
    for name, entry in sorted(files.items()):
        if not split.needs_split(entry.size, limit):
            continue
        src = tree / name
        recorded = None
        if cache is not None and name.startswith("cache/nar/"):
            recorded = cache.read_parts(name.removeprefix("cache/"), limit)
        if in_place:
            parts = split.split_file(src, src.parent, limit)
            src.unlink()
        elif recorded is not None:
            parts, slices[src] = split.slices_of(src, limit, recorded)
        else:
            parts, slices[src] = split.slice_file(src, limit)
        prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        files[name] = FileEntry(entry.size, entry.sha256, tuple((prefix + p.name, p.size, p.sha256) for p in parts))
        count += 1
    return count, slices


def check_media_settings(media: MediaSettings) -> None:
    """What can be checked before any work: the label and size for the format, its tools, the
    installer ISO to remaster."""
    if media.installer is not None:
        check_installer(media)
    elif media.boot_default:
        raise InvalidInput(f"--boot-default {media.boot_default}: only with --installer ISO",
                           hint="pass the NixOS installer ISO to remaster, or leave --boot-default out")
    if media.format in (MediaFormat.ISO, MediaFormat.FAT32):
        validate_label(media.label, media.format.value)
    if media.format is MediaFormat.FAT32 and media.size is not None:
        from mediabuilder.media import fat32

        fat32.check_size(media.size, media.partition_table.value)
    if media.format is MediaFormat.FAT32 and media.partition_table is not PartitionTable.NONE:
        runner.require("sfdisk", "to write a partition table")


def check_installer(media: MediaSettings) -> None:
    """--installer: an ISO output, the tools, and an ISO that is a NixOS installer (refused before any work)."""
    from mediabuilder.installer.remaster import Installer

    if media.format is not MediaFormat.ISO:
        raise InvalidInput(f"--installer {media.installer}: needs --format iso, not {media.format.value}",
                           hint="pass --format iso (the remastered installer is an ISO image)")
    if media.label != DEFAULT_LABEL:
        raise InvalidInput(f"--label {media.label}: the remastered installer keeps the installer's own label",
                           hint="leave --label out (the live system finds itself by its label)")
    for tool in ("xorriso", "mdir", "mtype", "mcopy"):
        runner.require(tool, "to remaster the installer ISO")
    assert media.installer is not None
    Installer.inspect(media.installer)


def request_hosts(req: BuildRequest) -> list[str]:
    """The hosts named on the command line (a bare --flake PATH names none: all of its hosts)."""
    return [name for name, _ in req.systems] or [h for h in (nixcli.parse_flake_ref(r)[1] for r in req.refs) if h]


def check_installer_hosts(req: BuildRequest) -> None:
    """Every host can name a boot menu entry, and --boot-default is one of them (before any work)."""
    from mediabuilder.installer.menus import check_host

    hosts = request_hosts(req)
    for host in hosts:
        check_host(host)
    if req.media.boot_default and req.media.boot_default not in hosts:
        raise InvalidInput(f"--boot-default {req.media.boot_default}: not one of the hosts ({', '.join(hosts)})",
                           hint="name one of the hosts given with --flake PATH#HOST")


def write_output(tree: Path, target: Target, req: BuildRequest, epoch: int,
                 slices: dict[Path, list[split.Slice]], hosts: tuple[str, ...]) -> None:
    """The finished tree into place: renamed, moved into a directory, or written as an image
    (every date in it `epoch`; each file in `slices` as its parts, read from it) under a
    temporary name beside the output and renamed over it when complete."""
    if req.media.format is MediaFormat.DIR:
        if target.inside:
            output.move_in(tree, target.path)
        else:
            output.place(tree, target.path, replace=False)
        return
    with output.temporary(target.path.parent, directory=False) as image:
        if req.media.installer is not None:
            from mediabuilder.installer.remaster import remaster

            with output.temporary(tree.parent, directory=True) as scratch:
                remaster(req.media.installer, tree, image, hosts, scratch, default=req.media.boot_default or None,
                         epoch=epoch, unattended=req.install.unattended or None)
        elif req.media.format is MediaFormat.ISO:
            from mediabuilder.media import iso

            iso.write_iso(tree, target.path, label=req.media.label, into=image, epoch=epoch, slices=slices)
        else:
            from mediabuilder.media import fat32

            fat32.write_fat32(tree, target.path, label=req.media.label, size=req.media.size,
                              partition_table=req.media.partition_table.value, into=image, epoch=epoch,
                              slices=slices)
        output.place(image, target.path, replace=target.replace)
