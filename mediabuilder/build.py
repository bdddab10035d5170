"""`mediabuilder build`: the recipe that turns a flake's hosts into an offline install medium.

    resolve hosts → check the repository → build toplevels → archive inputs → add tools →
    read closures → fill the cache → assemble the tree → sign the manifest → write the image
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mediabuilder import __version__, nixcli, ui
from mediabuilder import run as runner
from mediabuilder.cache.layout import CACHE_INFO, SUBDIRS, BinaryCache, default_key_name, load_or_create_key
from mediabuilder.cache.writer import export_tree, fill
from mediabuilder.errors import ExternalError, InvalidInput
from mediabuilder.media import fat32, flakerepo, fsinfo, iso, registry, split
from mediabuilder.media.label import validate_label
from mediabuilder.media.manifest import FileEntry, HostEntry, Manifest, collect_files, trust_path
from mediabuilder.profile import CacheSettings, MediaFormat, MediaSettings, PartitionTable
from mediabuilder.store import nix32
from mediabuilder.store.keys import PublicKey, SecretKey
from mediabuilder.store.narinfo import NarInfo
from mediabuilder.store.pathinfo import PathInfo
from mediabuilder.store.storepath import StorePath
from mediabuilder.substituter.client import Substituter
from mediabuilder.substituter.prefetch import default_jobs as download_jobs
from mediabuilder.substituter.prefetch import prefetch

README = """\
This medium installs a NixOS system with no network.

Boot the NixOS installer, partition and mount the target at /mnt, then run:

    bash /iso/install.sh            (or the directory this file is in)

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


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        if output.is_dir() and not any(output.iterdir()):
            return
        raise InvalidInput(f"{output}: already exists and is not empty", hint="choose another --output or pass --force")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise InvalidInput(f"{parent}: no such directory for --output")
    if not os.access(parent, os.W_OK):
        raise InvalidInput(f"{parent}: not writable")


@contextlib.contextmanager
def staging_dir(output: Path, where: Path) -> Iterator[Path]:
    """A temporary directory in `where`, removed unless the build renamed it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=where))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_output(tree: Path, output: Path) -> None:
    """Move the finished `tree` to `output`, replacing an existing output (checked earlier)."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.rename(output, old)
    os.rename(tree, output)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def build_tools(flake: str, tools: tuple[str, ...]) -> dict[str, StorePath]:
    """Each tool from the flake's own locked nixpkgs input; a tool that cannot be built is
    reported and left out (install.sh then uses the installer's)."""
    found: dict[str, StorePath] = {}
    for tool in tools:
        # Through the flake's own lock (not `--inputs-from`, which consults the global registry).
        expr = (f"(builtins.getFlake {json.dumps(flake)}).inputs.nixpkgs.legacyPackages"
                f".${{builtins.currentSystem}}.{json.dumps(tool)}")
        try:
            proc = runner.run([*nixcli.NIX, "build", "--no-link", "--json", "--impure", "--expr", expr])
        except ExternalError:
            ui.warn(f"could not build `{tool}` from the flake's nixpkgs: install.sh will use the installer's")
            continue
        found[tool] = StorePath.parse(json.loads(proc.stdout)[0]["outputs"]["out"])
    return found


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def assemble_cache(local: BinaryCache, media: Path, paths: list[StorePath]) -> dict[str, FileEntry]:
    """Copy the narinfos and NARs of `paths` from the local cache into `media/cache`; returns the
    manifest entries of the NAR files, whose sha256 the narinfos already give."""
    root = media / "cache"
    root.mkdir()
    for sub in SUBDIRS:
        (root / sub).mkdir()
    (root / "nix-cache-info").write_text(CACHE_INFO)
    known: dict[str, FileEntry] = {}
    infos: list[NarInfo] = [local.read_narinfo(p) for p in paths]
    with ui.progress(sum(i.file_size or 0 for i in infos), "copying cache") as bar:

        def link_or_copy_nar(src: Path, dst: Path) -> None:
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
                    return int(start + dst.stat().st_size)
                return int(start)

            with ui.ticking(bar, copied):
                shutil.copyfile(src, dst)
            bar.update(start - bar.n)  # the whole file is counted by the caller

        for info in infos:
            link_or_copy(local.narinfo_path(info.store_path), root / f"{info.store_path.hash_part}.narinfo")
            if (root / info.url).exists():  # two paths with the same NAR
                continue
            link_or_copy_nar(local.file_path(info.url), root / info.url)
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


def build_media(req: BuildRequest) -> dict[str, str]:
    """The recipe. Returns host → toplevel."""
    check_output(req.output, req.force)
    check_media_settings(req.media)
    have_nix = shutil.which("nix") is not None
    if have_nix:
        nixcli.ensure_available()
    elif not req.systems:
        raise InvalidInput("could not find `nix`, which is needed to evaluate the flake's hosts",
                           hint="install nix-bin, or pass --system NAME=/nix/store/... with --substituter URL")
    runner.require("git")
    if req.cache.key is not None and not req.cache.key.is_file():
        raise InvalidInput(f"{req.cache.key}: no such key file", hint="make one with `mediabuilder keygen NAME`")
    cache = BinaryCache(req.cache.dir)
    cache.create()
    key, created = load_or_create_key(cache, req.cache.key, default_key_name())
    if created:
        ui.info(f"  created signing key {cache.root / 'signing-key.sec'} ({key.name})")

    ui.info(f"Building media {req.output} ({req.media.format.value})")
    source = resolve_source(req, have_nix)
    extra = [*source.input_paths, *source.tools.values(), *req.extra_paths]
    roots = {host: [toplevel, *extra] for host, toplevel in source.toplevels.items()}
    fill_cache(req, cache, key, sorted({p for r in roots.values() for p in r}), have_nix)
    with ui.step("Reading closures") as step:
        closures = {host: cache_closure(cache, r) for host, r in roots.items()}
        union = sorted({i.store_path for infos in closures.values() for i in infos})
        nar_bytes = sum(cache.read_narinfo(p).nar_size for p in union)
        step.detail = f"{len(union)} paths, {ui.human_bytes(nar_bytes)} of NAR"

    try:
        write_media(req, cache, key, source, closures, union, have_nix)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InvalidInput(f"{req.output}: no space left on device while writing the media",
                               hint="free some space or choose another --output") from None
        raise
    return {h: str(t) for h, t in source.toplevels.items()}


def write_media(req: BuildRequest, cache: BinaryCache, key: SecretKey, source: Source,
                closures: dict[str, list[NarInfo]], union: list[StorePath], have_nix: bool) -> None:
    """Assemble the tree beside the output, sign its manifest, and write it in the output format."""
    # A directory is assembled beside the output and renamed into place; an image's tree is
    # assembled beside the cache (hard links, no copies) so the output's disk holds only the image.
    where = req.output.resolve().parent if req.media.format is MediaFormat.DIR else cache.root
    with staging_dir(req.output, where) as staging:
        tree = staging / "media"
        tree.mkdir()
        with ui.step("Assembling the media tree") as step:
            known = assemble_cache(cache, tree, union)
            shipped = flakerepo.write_bundle(source.repo, tree / "flake" / "repo.bundle", req.allow_dirty)
            (tree / "registry.json").write_text(source.pins.render())
            (tree / "media-key.pub").write_text(key.public().render() + "\n")
            install_sh = tree / "install.sh"
            install_sh.write_bytes(resources.files("mediabuilder.media").joinpath("install.sh").read_bytes())
            install_sh.chmod(0o755)
            (tree / "README.txt").write_text(README)
            step.detail = f"{len(known)} NAR files"
        with ui.step("Signing the manifest") as step:
            manifest = make_manifest(source, shipped, closures, key, nixcli.version() if have_nix else "none")
            manifest.files = collect_files(tree, known=known)
            limit = split_limit(req)
            split = split_large_files(tree, manifest.files, limit) if limit else 0
            sign_manifest(manifest, tree, key, req.cache.compression.value)
            step.detail = f"{len(manifest.files)} files, key {key.public().fingerprint()}"
            if split:
                step.detail += f", {split} file(s) split at {ui.human_bytes(limit or 0)}"
        with ui.step("Writing the medium") as step:
            write_output(tree, staging, req)
            step.detail = str(req.output)


def resolve_source(req: BuildRequest, have_nix: bool) -> Source:
    """Hosts, repository, inputs and tools: evaluated with the local Nix, or, without Nix, from
    `--system` toplevels and the flake's lock file."""
    with ui.step("Resolving hosts") as step:
        if req.systems:
            flake_dirs = {nixcli.parse_flake_ref(r)[0] for r in req.refs}
            hosts: list[nixcli.HostRef] = []
        else:
            hosts = nixcli.resolve_hosts(req.refs)
            flake_dirs = {h.flake for h in hosts}
        if len(flake_dirs) != 1:
            raise InvalidInput("the media needs exactly one flake (its repository goes on the media)",
                               hint=f"got {', '.join(sorted(flake_dirs)) or 'none'}: pass --flake PATH")
        flake = flake_dirs.pop()
        local_dir = nixcli.HostRef(flake, "").local_path
        if local_dir is None:
            raise InvalidInput(f"{flake}: only a local git checkout of a flake can be put on media",
                               hint="clone the flake and pass --flake PATH#HOST")
        step.detail = ", ".join(dict(req.systems) if req.systems else (h.host for h in hosts))
    with ui.step("Checking the repository") as step:
        repo = flakerepo.open_repo(local_dir)
        if repo.dirty and not req.allow_dirty:
            raise InvalidInput(f"{repo.top}: the git tree has uncommitted changes",
                               hint="commit them, or pass --allow-dirty to ship them as a labelled commit on top")
        step.detail = f"{repo.branch or 'detached'} at {repo.rev[:12]}" + (" (dirty)" if repo.dirty else "")
    if req.systems:
        toplevels = dict(req.systems)
    else:
        with ui.step("Building toplevels") as step:
            toplevels = nixcli.build_toplevels(hosts)
            step.detail = f"{len(toplevels)} system(s)"
    with ui.step("Archiving flake inputs") as step:
        lock = local_dir / "flake.lock"
        archive = nixcli.flake_archive(flake) if have_nix else registry.archive_from_lock(lock)
        input_paths = tuple(StorePath.parse(p) for p in registry.archived_paths(archive))
        pins = registry.from_lock(lock, archive) if lock.exists() else registry.Registry(())
        step.detail = f"{len(input_paths)} sources, {len(pins.pins)} pinned"
    tools: dict[str, StorePath] = {}
    if have_nix:
        with ui.step("Adding install tools") as step:
            tools = build_tools(flake, req.tools)
            step.detail = ", ".join(tools) or "none"
    return Source(toplevels, repo, local_dir, input_paths, pins, archive.get("path"), tools)


def fill_cache(req: BuildRequest, cache: BinaryCache, key: SecretKey, roots: list[StorePath], have_nix: bool) -> None:
    """Every root's closure into the local cache: from the substituters as they are, and what
    they lack from the local store."""
    local = roots
    if req.substituters:
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


def make_manifest(source: Source, shipped: flakerepo.FlakeRepo, closures: dict[str, list[NarInfo]],
                  key: SecretKey, nix_version: str) -> Manifest:
    public = key.public()
    return Manifest(
        mediabuilder=__version__,
        nix=nix_version,
        created=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
    )


def sign_manifest(manifest: Manifest, tree: Path, key: SecretKey, compression: str) -> StorePath:
    """Write manifest.json, and the signed manifest store path into the media cache."""
    (tree / "manifest.json").write_text(manifest.render())
    with tempfile.TemporaryDirectory() as tmp:
        trust = Path(tmp) / "manifest"
        manifest.write_trust_dir(trust)
        path, nar_hash, nar_size = trust_path(trust)
        export_tree(BinaryCache(tree / "cache"), trust, PathInfo(path, nar_hash, nar_size, ()), key, compression)
        os.chmod(trust, 0o755)
    (tree / "manifest.storepath").write_text(f"{path}\n")
    return path


def split_limit(req: BuildRequest) -> int | None:
    """The largest file the output can hold: images always split at one part size that every
    reader handles (docs/images.md); a directory only when its filesystem needs it (FAT32)."""
    if req.media.format is not MediaFormat.DIR:
        return split.PART_SIZE
    limit = fsinfo.max_file_size(req.output.resolve().parent)
    return None if limit is None else min(limit, split.PART_SIZE)


def split_large_files(tree: Path, files: dict[str, FileEntry], limit: int) -> int:
    """Replace each file over `limit` by numbered parts beside it; record them in `files`."""
    count = 0
    for name, entry in sorted(files.items()):
        if not split.needs_split(entry.size, limit):
            continue
        src = tree / name
        parts = split.split_file(src, src.parent, limit)
        src.unlink()
        prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        files[name] = FileEntry(entry.size, entry.sha256, tuple((prefix + p.name, p.size, p.sha256) for p in parts))
        count += 1
    return count


def check_media_settings(media: MediaSettings) -> None:
    """What can be checked before any work: the label and size for the format, its tools."""
    if media.format in (MediaFormat.ISO, MediaFormat.FAT32):
        validate_label(media.label, media.format.value)
    if media.format is MediaFormat.FAT32 and media.size is not None:
        fat32.check_size(media.size, media.partition_table.value)
    if media.format is MediaFormat.FAT32 and media.partition_table is not PartitionTable.NONE:
        runner.require("sfdisk", "to write a partition table")


def write_output(tree: Path, staging: Path, req: BuildRequest) -> None:
    if req.media.format is MediaFormat.DIR:
        replace_output(tree, req.output)
    elif req.media.format is MediaFormat.ISO:
        iso.write_iso(tree, req.output, label=req.media.label)
    else:
        fat32.write_fat32(tree, req.output, label=req.media.label, size=req.media.size,
                          partition_table=req.media.partition_table.value)
