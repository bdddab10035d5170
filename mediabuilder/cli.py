"""The command line: parse, load the profile, apply flags over it, run one command, and turn
every error into one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mediabuilder import __version__, interrupts, nixcli, ui
from mediabuilder.cache.layout import BinaryCache, default_key_name, load_or_create_key
from mediabuilder.cache.writer import fill
from mediabuilder.errors import InternalError, InvalidInput, InvalidMedia, MediabuilderError
from mediabuilder.profile import (
    CacheSettings,
    Compression,
    Layout,
    MediaFormat,
    PartitionTable,
    Profile,
    RebuildLevel,
    load_profile,
    override,
    parse_size,
)
from mediabuilder.store.keys import PublicKey, write_key_pair
from mediabuilder.store.storepath import StorePath

if TYPE_CHECKING:
    from mediabuilder.cache.verify import Report
    from mediabuilder.media.source import MediaSource


def trusted_key(text: str) -> PublicKey:
    """A `--trusted-key`: a key ('name:base64') or a file holding one."""
    if os.path.isfile(text):
        return PublicKey.load(Path(text))
    if ":" in text:
        return PublicKey.parse(text, source="--trusted-key")
    raise InvalidInput(f"--trusted-key {text}: neither a key (NAME:BASE64) nor a key file")


# Commands


def cmd_keygen(args: argparse.Namespace, profile: Profile) -> int:
    secret = Path(args.secret or f"{args.name}.sec")
    public = Path(args.public or f"{args.name}.pub")
    write_key_pair(args.name, secret, public)
    ui.info(f"wrote secret key {secret} (keep it private) and public key {public}")
    return 0


def cache_settings(args: argparse.Namespace, profile: Profile) -> CacheSettings:
    """The profile's [cache] with the command line's flags over it."""
    settings = override(
        profile.cache,
        dir=Path(args.cache) if args.cache else None,
        compression=Compression(args.compression) if args.compression else None,
        key=Path(args.key) if args.key else None,
        jobs=args.jobs,
    )
    # Absolute from here on: programs run elsewhere (git -C, nix) get paths that still hold.
    key = Path(os.path.abspath(settings.key)) if settings.key is not None else None
    return replace(settings, dir=Path(os.path.abspath(settings.dir)), key=key)


def cmd_cache(args: argparse.Namespace, profile: Profile) -> int:
    settings = cache_settings(args, profile)
    refs = args.flake or ([] if args.store_path else list(profile.flake.hosts))
    if not refs and not args.store_path:
        raise InvalidInput("no host given",
                           hint="pass --flake PATH#HOST, --store-path PATH or a profile with flake.hosts")
    nixcli.ensure_available()
    nixcli.check_store_access()
    store_paths = [_store_path_arg(p) for p in args.store_path]
    if settings.key is not None and not settings.key.is_file():
        raise InvalidInput(f"{settings.key}: no such key file", hint="make one with `mediabuilder keygen NAME`")
    cache = BinaryCache(settings.dir)
    cache.create()
    ui.info(f"Filling binary cache {settings.dir}")
    key, created = load_or_create_key(cache, settings.key, default_key_name())
    if created:
        ui.info(f"  created signing key {settings.dir / 'signing-key.sec'} ({key.name})")
    toplevels: dict[str, StorePath] = {}
    if refs:
        with ui.step("Resolving hosts") as step:
            hosts = nixcli.resolve_hosts(refs)
            step.detail = ", ".join(h.host for h in hosts)
        with ui.step("Building toplevels") as step:
            toplevels = nixcli.build_toplevels(hosts)
            step.detail = f"{len(toplevels)} system(s)"
    with ui.step("Reading closure") as step:
        infos = nixcli.closure([*toplevels.values(), *store_paths])
        step.detail = f"{len(infos)} paths, {ui.human_bytes(sum(i.nar_size for i in infos))} of NAR"
    with ui.step("Exporting NARs") as step:
        result = fill(cache, infos, key, settings.compression.value, settings.jobs)
        step.detail = (f"{result.exported} exported ({ui.human_bytes(result.nar_bytes)} → "
                       f"{ui.human_bytes(result.file_bytes)}), {result.present} already present")
    for host, path in toplevels.items():
        print(f"{host}\t{path}")
    return 0


def _store_path_arg(text: str, must_exist: bool = True) -> StorePath:
    try:
        path = StorePath.parse(os.path.realpath(text) if os.path.islink(text) else text)
    except MediabuilderError:
        raise InvalidInput(f"{text}: not a store path", hint="pass /nix/store/HASH-NAME") from None
    if must_exist and not os.path.exists(path.full):
        raise InvalidInput(f"{text}: not in the local Nix store", hint="build or copy it first")
    return path


_HOST_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_'-]*")


def _system_arg(text: str, must_exist: bool) -> tuple[str, StorePath]:
    """`--system NAME=PATH`: NAME a plain attribute name (checked against the flake's hosts when
    the build evaluates it), PATH a NixOS toplevel — checked here when it is in the local store,
    else once it is in the cache (build.check_systems)."""
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise InvalidInput(f"--system {text}: expected NAME=/nix/store/...", hint="e.g. --system laptop=/nix/store/...")
    if not _HOST_NAME.fullmatch(name):
        raise InvalidInput(f"--system {text}: {name!r} is not a host name (letters, digits, _ ' -)",
                           hint="NAME is the flake's nixosConfigurations attribute")
    store_path = _store_path_arg(path, must_exist)
    if os.path.exists(store_path.full):
        missing = [f for f in nixcli.TOPLEVEL_FILES if not os.path.isfile(os.path.join(store_path.full, f))]
        if missing:
            raise InvalidInput(f"--system {name}={path}: not a NixOS system (no {missing[0]} in it)",
                               hint=nixcli.TOPLEVEL_HINT)
    return name, store_path


def _key_text(text: str) -> str:
    return trusted_key(text).render()


def _print_report(report: Report, target: Path, as_json: bool) -> int:
    if as_json:
        print(json.dumps({
            "target": str(target),
            "ok": report.ok,
            "paths": report.paths,
            "nar_bytes": report.nar_bytes,
            "faults": [{"path": f.path, "fault": f.fault} for f in report.faults],
        }, indent=2))
    else:
        for fault in report.faults:
            print(fault)
        verdict = "ok" if report.ok else f"{len(report.faults)} fault(s)"
        ui.info(f"{target}: {report.paths} paths, {ui.human_bytes(report.nar_bytes)} of NAR: {verdict}")
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace, profile: Profile) -> int:
    from mediabuilder.cache.verify import verify_cache_on
    from mediabuilder.media.verify import first_line, verify_media

    target = Path(args.target)
    trusted = [trusted_key(k) for k in args.trusted_key]
    with open_target(target) as source:
        is_media = source.kind != "dir" or not source.is_file("nix-cache-info")  # else a cache itself
        if not trusted:
            own_file = "media-key.pub" if is_media else "signing-key.pub"
            if not source.is_file(own_file):
                raise InvalidInput(f"{target}: no trusted key (no {own_file} on it)",
                                   hint="pass --trusted-key NAME:BASE64 or a .pub file")
            try:
                own = PublicKey.parse(first_line(source.read_bytes(own_file, 4096)), f"{target}/{own_file}")
            except MediabuilderError:
                if not is_media:
                    raise
                trusted = []  # verify_media reports the damaged key file as a fault
            else:
                ui.warn(f"trusting the key the medium carries ({own.name}, {own.fingerprint()}): "
                        "pass --trusted-key to check who signed it")
                trusted = [own]
        started = time.monotonic()
        if is_media:
            report = verify_media(source, trusted, args.jobs or 0)
        else:
            report = verify_cache_on(source, "", trusted, args.jobs or 0)
        ui.debug(f"verified in {time.monotonic() - started:.1f} s")
        status = _print_report(report, target, args.json)
        if args.against is not None:
            status = max(status, _compare(source, Path(args.against)))
    return status


def _compare(source: MediaSource, other_path: Path) -> int:
    """`verify --against`: 0 when `other_path` holds the same medium, else 1 and the first
    difference on one line."""
    from mediabuilder.media.compare import first_difference

    with open_target(other_path) as other:
        difference = first_difference(source, other)
    if difference is not None:
        print(f"{source.path} differs from {other_path}: {difference}")
        return 1
    same = "byte for byte" if source.kind == other.kind and source.kind != "dir" else "file for file"
    ui.info(f"{source.path}: the same as {other_path}, {same}")
    return 0


def _summary_hosts(target: Path, hosts: object) -> dict[str, dict[str, Any]]:
    """The manifest's hosts, as far as inspect shows them; InvalidMedia for absurd values."""
    if not isinstance(hosts, dict):
        raise InvalidMedia(f"{target}: manifest.json: hosts is not an object")
    for host, entry in hosts.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and 0 <= entry[k] < 1 << 60
            for k in ("paths", "nar_bytes"))
        if not ok or not isinstance(entry.get("toplevel"), str):
            raise InvalidMedia(f"{target}: manifest.json: hosts.{host}: not a toplevel with a path count and a "
                               "size of 0 or more bytes (damaged media; run `mediabuilder verify`)")
    return hosts


_REBUILD_SAYS = {
    "none": "the systems only",
    "config": "what configuration-only changes need",
    "full": "the whole build closure",
}
_REBUILD_LINE = re.compile(r'^  "rebuild": "([a-z]+)",?$', re.MULTILINE)  # how install.sh reads it
_SHOWN = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_.:/'-]*")  # a host or a device path, printable as it is
_LAYOUTS = frozenset(x.value for x in Layout)
_DISKO_EXE = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+(/bin/[A-Za-z0-9+._-]+)?")


def _signed_settings(target: Path, signed: dict[str, bytes]) -> tuple[str, dict[str, Any] | None]:
    """The rebuild level and the install record as install.sh reads them from the signed manifest
    (`"rebuild"` of its manifest.json, its `install` file): media made before either existed have
    level none and no record. InvalidMedia for what install.sh would refuse or what could not be
    shown as it is."""
    where = f"{target}: the signed manifest"
    try:
        data = json.loads(signed["manifest.json"])
        rebuild = data.get("rebuild", "none")
    except (ValueError, AttributeError):
        raise InvalidMedia(f"{where}: manifest.json is not a JSON object") from None
    said = set(_REBUILD_LINE.findall(signed["manifest.json"].decode("utf-8", "replace")))
    if rebuild not in _REBUILD_SAYS:
        raise InvalidMedia(f"{where}: manifest.json: rebuild {str(rebuild)[:40]!r} is not one of none, config, full")
    if said - {rebuild}:
        raise InvalidMedia(f"{where}: manifest.json: rebuild given more than once ({', '.join(sorted(said))})")
    if "install" not in signed:
        return rebuild, None
    from mediabuilder.installer.layout import is_device_path

    record: dict[str, Any] = {"unattended": None, "disk": None, "layout": None, "hosts": {}}
    for line in signed["install"].decode("utf-8", "replace").splitlines():
        key, a, b, c = (line.split("\t", 3) + ["", "", ""])[:4]
        if key in ("unattended", "disk") and _SHOWN.fullmatch(a):
            record[key] = a
        elif key == "host" and _HOST_NAME.fullmatch(a) and b in _LAYOUTS and (not c or _DISKO_EXE.fullmatch(c)):
            record["hosts"][a] = {"layout": b, "disko": c or None}
        elif key == "disko-device" and a in record["hosts"] and is_device_path(b):
            record["hosts"][a].setdefault("disko_devices", []).append(b)
        elif key:
            raise InvalidMedia(f"{where}: install: line {line[:60]!r} is not an install record's "
                               "(damaged media; run `mediabuilder verify`)")
    host = record["unattended"]
    if (host is None) != (record["disk"] is None) or (host is not None and host not in record["hosts"]):
        raise InvalidMedia(f"{where}: install: the unattended host {host!r} and disk {record['disk']!r} are not "
                           "one of its hosts and a disk (damaged media; run `mediabuilder verify`)")
    record["layout"] = record["hosts"][host]["layout"] if host is not None else None
    return rebuild, record


def cmd_inspect(args: argparse.Namespace, profile: Profile) -> int:
    from mediabuilder.media.verify import signed_manifest

    target = Path(args.target)
    with open_target(target) as source:
        names = dict(source.files())
        if "manifest.json" not in names:
            raise InvalidMedia(f"{target}: no manifest.json: not mediabuilder media")
        try:
            manifest = json.loads(source.read_bytes("manifest.json", 64 * 1024 * 1024))
            if not isinstance(manifest, dict):
                raise ValueError("not an object")
        except ValueError:
            raise InvalidMedia(f"{target}/manifest.json: not a JSON object") from None
        key, flake = manifest.get("key"), manifest.get("flake")
        hosts = _summary_hosts(target, manifest.get("hosts", {}))
        # What install.sh acts on (the disk it erases, what it keeps for rebuilds) only as signed.
        rebuild, install = _signed_settings(target, signed_manifest(source))
        summary: dict[str, Any] = {
            "target": str(target),
            "kind": source.kind,
            "created": manifest.get("created"),
            "mediabuilder": manifest.get("mediabuilder"),
            "nix": manifest.get("nix"),
            "key": key if isinstance(key, dict) else {},
            "hosts": hosts,
            "flake": {k: flake.get(k) if isinstance(flake, dict) else None
                      for k in ("rev", "branch", "dirty", "remotes")},
            "rebuild": rebuild,
            "install": install,
            "files": len(names),
            "bytes": sum(names.values()),
            "free_bytes": source.free_bytes,
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{target}: {source.kind}, made {summary['created']} by mediabuilder {summary['mediabuilder']} "
          f"(nix {summary['nix']})")
    key = summary["key"]
    print(f"key: {key.get('name')} ({key.get('fingerprint')})")
    for host, entry in sorted(summary["hosts"].items()):
        print(f"host {host}: {entry.get('toplevel')} ({entry.get('paths')} paths, "
              f"{ui.human_bytes(entry.get('nar_bytes', 0))} of NAR)")
    flake = summary["flake"]
    dirty = " (dirty)" if flake["dirty"] else ""
    print(f"flake: {flake['branch'] or 'detached'} at {str(flake['rev'])[:12]}{dirty}")
    print(f"rebuild: {rebuild} ({_REBUILD_SAYS[rebuild]})")
    _print_install(install)
    size, free = ui.human_bytes(summary["bytes"]), ui.human_bytes(summary["free_bytes"])
    print(f"files: {summary['files']}, {size}; free: {free}")
    return 0


def _print_install(install: dict[str, Any] | None) -> None:
    if install is None:  # install.sh then lays out uefi unless told otherwise
        print("layout: uefi for every host (no install record)")
        print("unattended: no")
        return
    for host, entry in sorted(install["hosts"].items()):
        erases = f"; erases {', '.join(entry['disko_devices'])}" if entry.get("disko_devices") else ""
        disko = f" ({entry['disko']}{erases})" if entry.get("disko") else ""
        print(f"layout {host}: {entry['layout']}{disko}")
    if install["unattended"] is None:
        print("unattended: no")
    else:
        print(f"unattended: {install['unattended']} onto {install['disk']} (layout {install['layout']}): "
              "the disk is erased without a question")


@contextlib.contextmanager
def open_target(target: Path) -> Iterator[MediaSource]:
    """The medium at `target`, read in place: a directory as it is, an ISO or FAT32 image through
    its own structures. Nothing is extracted or written anywhere."""
    from mediabuilder.media.source import open_source

    if not target.exists():
        raise InvalidInput(f"{target}: no such file or directory")
    from mediabuilder.installer.medium import MEDIUM_DIR, SubdirSource, is_remastered

    with open_source(target) as source:
        if is_remastered(source):  # an installer ISO mediabuilder remastered: its medium under /mediabuilder
            yield SubdirSource(source, MEDIUM_DIR)
            return
        yield source


def cmd_build(args: argparse.Namespace, profile: Profile) -> int:
    # Imported here: image writers and the HTTP client cost a start-up that `cache` need not pay.
    from mediabuilder.build import BuildRequest, build_media

    cache = cache_settings(args, profile)
    media = override(
        profile.media,
        format=MediaFormat(args.format) if args.format else None,
        output=Path(os.path.abspath(args.output)) if args.output else None,
        label=args.label,
        size=_size_arg(args.size) if args.size else None,
        partition_table=PartitionTable(args.partition_table) if args.partition_table else None,
        installer=Path(os.path.abspath(args.installer)) if args.installer else None,
        boot_default=args.boot_default,
        rebuild=RebuildLevel(args.rebuild) if args.rebuild else None,
    )
    if args.size and media.format is not MediaFormat.FAT32:  # (a profile's size may meet a --format)
        raise InvalidInput(f"--size {args.size}: only a fat32 image has a size to choose, not --format "
                           f"{media.format.value}", hint="pass --format fat32, or leave --size out")
    install = override(
        profile.install,
        unattended=args.unattended,
        disk=args.install_disk,
        layout=Layout(args.layout) if args.layout else None,
    )
    refs = tuple(args.flake or profile.flake.hosts)
    if not refs:
        raise InvalidInput("no host given", hint="pass --flake PATH#HOST or a profile with flake.hosts")
    substituters = tuple(args.substituter or profile.substituters.urls)
    local_only = not substituters  # without substituters, every path must be in the local store
    if media.output is None:
        raise InvalidInput("no output given", hint="pass --output PATH or set media.output in the profile")
    request = BuildRequest(
        refs=refs,
        cache=cache,
        media=media,
        output=media.output,
        force=args.force,
        allow_dirty=args.allow_dirty or profile.flake.allow_dirty,
        extra_paths=tuple(_store_path_arg(p, local_only) for p in args.store_path),
        systems=tuple(_system_arg(s, local_only) for s in args.system),
        substituters=substituters,
        substituter_keys=tuple(_key_text(k) for k in (args.trusted_key or profile.substituters.trusted_keys)),
        since=Path(os.path.abspath(args.since)) if args.since else None,
        install=install,
    )
    started = time.monotonic()
    toplevels = build_media(request)
    for host, path in toplevels.items():
        print(f"{host}\t{path}")
    ui.info(f"Done: {media.output} in {time.monotonic() - started:.1f} s")
    return 0


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise InvalidInput(f"--size {text}: not a size",
                           hint="e.g. 8G or 8GiB (binary), 8GB (decimal), 700M, or a number of bytes") from None


# Parser

MAX_JOBS = 256


def _jobs_arg(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= jobs <= MAX_JOBS:
        raise argparse.ArgumentTypeError(f"{jobs} is not between 1 and {MAX_JOBS}")
    return jobs



def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the commands run and tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                   help="print only errors and results")
    p.add_argument("--profile", metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML profile (see profiles/); flags override its values")


def _add_cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flake", action="append", metavar="FLAKE#HOST",
                   help="host to put on the media, e.g. .#laptop (repeatable; FLAKE alone: all hosts)")
    p.add_argument("--store-path", action="append", default=[], metavar="PATH",
                   help="a store path (and its closure) to include, e.g. a system CI built (repeatable)")
    p.add_argument("--cache", metavar="DIR", help="local binary cache (default: $XDG_CACHE_HOME/mediabuilder, "
                                                       "i.e. ~/.cache/mediabuilder)")
    p.add_argument("--compression", choices=[c.value for c in Compression],
                   help="NAR compression (default: zstd)")
    p.add_argument("--key", metavar="FILE",
                   help="secret signing key (default: the cache's own, created when missing)")
    p.add_argument("--jobs", "-j", type=_jobs_arg, metavar="N",
                   help="parallel workers: exports (default: one per core) and downloads from "
                        "substituters (default: 4 per core, at most 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mediabuilder",
        description="Turn a NixOS flake into install media that installs it with no network.",
    )
    parser.add_argument("--version", action="version", version=f"mediabuilder {__version__}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("keygen", help="write a signing key pair in Nix's format",
                       description="Write a Nix binary-cache signing key pair: NAME.sec and NAME.pub.")
    _add_common(p)
    p.add_argument("name", metavar="NAME", help="key name, e.g. mymedia-1")
    p.add_argument("--secret", metavar="FILE", help="secret key file (default: NAME.sec)")
    p.add_argument("--public", metavar="FILE", help="public key file (default: NAME.pub)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("cache", help="export hosts' closures into a signed local binary cache",
                       description="Build each host and export its closure into a signed file:// binary "
                                   "cache, incrementally and in parallel.")
    _add_common(p)
    _add_cache_flags(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("build", help="build offline install media for one or more hosts",
                       description="Build the hosts, fill the signed cache and write the media: the cache, "
                                   "the flake repository with its history, the pinned registry, the manifest "
                                   "and install.sh.")
    _add_common(p)
    _add_cache_flags(p)
    p.add_argument("--format", choices=[f.value for f in MediaFormat], help="output format (default: dir)")
    p.add_argument("--output", "-o", metavar="PATH", help="where to write the media (a directory or image file)")
    p.add_argument("--label", help="volume label: iso 1-32 of A-Z 0-9 _, fat32 1-11 of A-Z 0-9 and "
                                  "!#$%%&'()-@^_`{}~, lower case upper-cased (default: NIXOS_MEDIA)")
    p.add_argument("--size", help="fat32 image size, 33M (35M with gpt) to 2T-1M: K/M/G/T or KiB/MiB/GiB/TiB "
                                  "are binary (8G = 8GiB = 8*1024^3), KB/MB/GB/TB decimal as disks are sold "
                                  "(8GB = 8*10^9) (default: content plus headroom)")
    p.add_argument("--partition-table", choices=[t.value for t in PartitionTable],
                   help="wrap a fat32 image in a partition table (default: none)")
    p.add_argument("--installer", metavar="ISO",
                   help="a NixOS installer ISO to remaster (with --format iso): the medium goes under its "
                        "/mediabuilder directory and every boot menu gets an \"Install HOST offline\" entry "
                        "per host (default: none, a medium of its own)")
    p.add_argument("--boot-default", metavar="HOST",
                   help="with --installer: make \"Install HOST offline\" the boot menus' default entry "
                        "(default: the installer's own)")
    p.add_argument("--unattended", metavar="HOST",
                   help="record an unattended install of HOST: `install.sh --unattended` then asks nothing, and with "
                        "--installer the menus' default entry \"Install HOST offline (unattended)\" runs it after the "
                        "menu's timeout and powers off (needs --install-disk) (default: none)")
    p.add_argument("--install-disk", metavar="DEVICE|auto",
                   help="with --unattended: the disk it installs onto, e.g. /dev/vda, or auto: the single internal "
                        "disk that is not the boot medium (refused on the target when there are several)")
    p.add_argument("--layout", choices=[x.value for x in Layout],
                   help="how install.sh partitions the disk: uefi (GPT, ESP `boot` 512 MiB + ext4 `nixos`), bios "
                        "(GPT, BIOS boot partition + ext4 `nixos`), disko (the host's own disko script) "
                        "(default: disko when the host has disko, else uefi)")
    p.add_argument("--system", action="append", default=[], metavar="NAME=PATH",
                   help="a prebuilt system toplevel for host NAME, e.g. one CI built and pushed: no evaluation, "
                        "no local Nix needed (repeatable; --flake PATH then only gives the repository)")
    p.add_argument("--substituter", action="append", metavar="URL",
                   help="binary cache to prefetch from, http(s):// or file:// (repeatable); NARs are copied as "
                        "they are, and what no substituter has comes from the local store")
    p.add_argument("--trusted-key", action="append", metavar="KEY",
                   help="public key (NAME:BASE64 or a file) trusted for the substituters (repeatable)")
    p.add_argument("--since", metavar="OLD",
                   help="a delta medium: only the store paths OLD lacks, for `install.sh --upgrade` of machines "
                        "installed from OLD; OLD is an older medium (directory or image, signed by this build's "
                        "key), its manifest.json, or /var/lib/mediabuilder of an installed machine "
                        "(default: a full medium)")
    p.add_argument("--rebuild", choices=[r.value for r in RebuildLevel], metavar="LEVEL",
                   help="what the installed machine needs to rebuild offline: none (the system only), config "
                        "(what a configuration-only change needs) or full (the whole build closure); "
                        "docs/rebuild.md (default: none, the smallest medium)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--allow-dirty", action="store_true",
                   help="ship uncommitted changes as a labelled commit on top (default: refuse a dirty tree)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("inspect", help="show what is on a medium (directory, ISO or FAT32 image)",
                       description="Show the hosts, key, sizes, rebuild level, disk layouts, unattended install "
                                   "and free space of a medium without mounting or extracting it: what its "
                                   "manifest.json says, checked against the copy signed by the medium's own key (run "
                                   "verify for the rest and for who signed it). "
                                   "Exit 0, or 2 with one error: line when it is not readable as a medium.")
    _add_common(p)
    p.add_argument("target", metavar="MEDIA", help="a media directory, ISO image or FAT32 image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="verify media or a binary cache (no Nix needed)",
                       description="Check a medium (directory, ISO or FAT32 image, read in place: nothing is "
                                   "extracted) for everything install.sh checks before it installs, and a binary "
                                   "cache for every narinfo, signature, NAR hash and reference. Exit 0 when every "
                                   "check holds; 1 when the medium was read and faults were found (one line each); "
                                   "2 when it is not readable as a medium at all (not an image, truncated, damaged "
                                   "structure) or on bad arguments (one error: line).")
    _add_common(p)
    p.add_argument("target", metavar="TARGET", help="a media tree, an ISO or FAT32 image, or a binary cache directory")
    p.add_argument("--trusted-key", action="append", default=[], metavar="KEY",
                   help="public key (NAME:BASE64) or a file holding one (repeatable; default: the "
                        "cache's own signing-key.pub)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--jobs", "-j", type=_jobs_arg, metavar="N", help="parallel workers (default: one per core)")
    p.add_argument("--against", metavar="OTHER",
                   help="also compare with another medium (directory or image) and name the first difference: "
                        "files by path, then, for two images of one format, every byte (exit 1 when they differ)")
    p.set_defaults(func=cmd_verify)
    return parser


class _TrialFailed(Exception):
    """A parse of a shortened command line failed: parse the real one, for its own error."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line, a hint and exit 2, like every other."""

    trial = False  # during `parse_repeated`'s first parse: errors raise _TrialFailed

    def error(self, message: str) -> NoReturn:
        if Parser.trial:
            raise _TrialFailed(message)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        print(f"hint: see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


REPEATED = ("--store-path", "store_path")


def parse_repeated(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with long runs of one repeated flag not shown to argparse.

    argparse's work grows with the square of the options given (2,200 arguments of
    `--store-path` took 0.05 s). Each run of consecutive `--store-path VALUE` pairs goes to it as
    its first pair only, the others put back in place after the parse: the same result, since a
    pair between an option's value and the next argument touches nothing else. Whenever that
    cannot be shown (a pair written otherwise, another command, any error), argv is parsed whole."""
    flag, dest = REPEATED
    shown: list[str] = []
    runs: list[list[str]] = []  # the values left out, after each pair shown
    i, in_run = 0, False
    while i < len(argv):
        token = argv[i]
        if token == "--":
            shown.extend(argv[i:])
            break
        if token == flag and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            if in_run:
                runs[-1].append(argv[i + 1])
            else:
                shown.extend(argv[i:i + 2])
                runs.append([])
                in_run = True
            i += 2
            continue
        shown.append(token)
        in_run = False
        i += 1
    if not any(runs):
        return parser.parse_args(argv)
    Parser.trial = True
    try:
        args = parser.parse_args(shown)
    except _TrialFailed:
        args = None
    finally:
        Parser.trial = False
    heads = getattr(args, dest, None)
    if args is None or heads is None or len(heads) != len(runs):
        return parser.parse_args(argv)
    setattr(args, dest, [value for head, rest in zip(heads, runs, strict=True) for value in (head, *rest)])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    interrupts.install()
    parser = build_parser()
    args = parse_repeated(parser, list(sys.argv[1:] if argv is None else argv))
    debug = getattr(args, "debug", False)
    ui.configure(debug=debug, quiet=getattr(args, "quiet", False))
    try:
        profile_file = getattr(args, "profile", None)
        profile = load_profile(Path(profile_file)) if profile_file else Profile()
        code: int = args.func(args, profile)
        return code
    except MediabuilderError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        number = e.signum if isinstance(e, interrupts.Interrupted) else int(signal.SIGINT)
        print(f"error: interrupted ({signal.Signals(number).name}); temporary files removed", file=sys.stderr)
        return 128 + number
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so, with the traceback only under --debug
        if debug:
            traceback.print_exc()
        error = InternalError(f"internal error: {e!r}")
        print(f"error: {error}", file=sys.stderr)
        print("hint: run again with --debug and report the traceback", file=sys.stderr)
        return error.exit_code
