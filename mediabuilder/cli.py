"""The command line: parse, load the profile, apply flags over it, run one command, and turn
every error into one line."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from mediabuilder import __version__, nixcli, ui
from mediabuilder.cache.layout import BinaryCache, load_or_create_key
from mediabuilder.cache.verify import Report, verify_cache
from mediabuilder.cache.writer import fill
from mediabuilder.errors import InternalError, InvalidInput, MediabuilderError
from mediabuilder.profile import Compression, Profile, load_profile, override
from mediabuilder.store.keys import PublicKey, write_key_pair
from mediabuilder.store.storepath import StorePath


def default_key_name() -> str:
    return f"{socket.gethostname().split('.')[0] or 'mediabuilder'}-mediabuilder-1"


def trusted_key(text: str) -> PublicKey:
    """A `--trusted-key`: a key ('name:base64') or a file holding one."""
    if os.path.isfile(text) or "/" in text:
        return PublicKey.load(Path(text))
    return PublicKey.parse(text, source="--trusted-key")


# Commands


def cmd_keygen(args: argparse.Namespace, profile: Profile) -> int:
    secret = Path(args.secret or f"{args.name}.sec")
    public = Path(args.public or f"{args.name}.pub")
    write_key_pair(args.name, secret, public)
    ui.info(f"wrote secret key {secret} (keep it private) and public key {public}")
    return 0


def cmd_cache(args: argparse.Namespace, profile: Profile) -> int:
    settings = override(
        profile.cache,
        dir=Path(args.cache) if args.cache else None,
        compression=Compression(args.compression) if args.compression else None,
        key=Path(args.key) if args.key else None,
        jobs=args.jobs,
    )
    refs = args.flake or ([] if args.store_path else list(profile.flake.hosts))
    if not refs and not args.store_path:
        raise InvalidInput("no host given",
                           hint="pass --flake PATH#HOST, --store-path PATH or a profile with flake.hosts")
    nixcli.ensure_available()
    store_paths = [_store_path_arg(p) for p in args.store_path]
    cache = BinaryCache(settings.dir)
    cache.create()
    if settings.key is not None and not settings.key.is_file():
        raise InvalidInput(f"{settings.key}: no such key file", hint="make one with `mediabuilder keygen NAME`")
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


def _store_path_arg(text: str) -> StorePath:
    try:
        path = StorePath.parse(os.path.realpath(text) if os.path.islink(text) else text)
    except MediabuilderError:
        raise InvalidInput(f"{text}: not a store path", hint="pass /nix/store/HASH-NAME") from None
    if not os.path.exists(path.full):
        raise InvalidInput(f"{text}: not in the local Nix store", hint="build or copy it first")
    return path


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
    target = Path(args.target)
    if not target.exists():
        raise InvalidInput(f"{target}: no such file or directory")
    trusted = [trusted_key(k) for k in args.trusted_key]
    if not trusted:
        own = BinaryCache(target).public_key() if target.is_dir() else None
        if own is None:
            raise InvalidInput(f"{target}: no trusted key", hint="pass --trusted-key NAME:BASE64 or a .pub file")
        ui.info(f"trusting the cache's own key {own.name} ({target / 'signing-key.pub'})")
        trusted = [own]
    started = time.monotonic()
    report = verify_cache(target, trusted, args.jobs or 0)
    ui.debug(f"verified in {time.monotonic() - started:.1f} s")
    return _print_report(report, target, args.json)


# Parser


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
    p.add_argument("--cache", metavar="DIR", help="local binary cache (default: ./cache)")
    p.add_argument("--compression", choices=[c.value for c in Compression],
                   help="NAR compression (default: zstd)")
    p.add_argument("--key", metavar="FILE",
                   help="secret signing key (default: the cache's own, created when missing)")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel workers (default: one per core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
                                   "cache, incrementally and in parallel.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    _add_cache_flags(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("verify", help="verify a binary cache (no Nix needed)",
                       description="Check every narinfo, signature, NAR hash and reference. Exit 0 when "
                                   "all hold, 1 with one line per bad path otherwise, 2 on bad input.")
    _add_common(p)
    p.add_argument("target", metavar="CACHE", help="binary cache directory")
    p.add_argument("--trusted-key", action="append", default=[], metavar="KEY",
                   help="public key (NAME:BASE64) or a file holding one (repeatable; default: the "
                        "cache's own signing-key.pub)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel workers (default: one per core)")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
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
