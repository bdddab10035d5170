"""The local Nix: build a flake's hosts and read closures from the store, through `run()`."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediabuilder import run as runner
from mediabuilder.errors import ExternalError, InternalError, InvalidInput
from mediabuilder.store.pathinfo import PathInfo, parse_path_info_json
from mediabuilder.store.storepath import StorePath

# Flakes and the new CLI are experimental in the Nix versions users have; ask for them.
NIX = ["nix", "--extra-experimental-features", "nix-command flakes"]
# Never let Nix write or stage a lock file in the user's repository: a flake whose lock is missing
# or out of date is refused (the media ships the committed lock, so it must be complete).
LOCKED = ["--no-update-lock-file"]
# What every NixOS toplevel holds (nixpkgs nixos/modules/system/activation/top-level.nix).
TOPLEVEL_FILES = ("init", "nixos-version", "bin/switch-to-configuration")
TOPLEVEL_HINT = "pass a toplevel: nix build FLAKE#nixosConfigurations.NAME.config.system.build.toplevel"


@functools.cache
def version() -> str:
    """'2.8.0' — the local Nix's version."""
    return runner.output(["nix", "--version"]).rsplit(" ", 1)[-1]


@dataclass(frozen=True)
class HostRef:
    """One `--flake FLAKE#HOST`: a flake reference and a nixosConfigurations attribute."""

    flake: str
    host: str

    @property
    def toplevel_attr(self) -> str:
        return f"nixosConfigurations.{json.dumps(self.host)}.config.system.build.toplevel"

    @property
    def installable(self) -> str:
        return f"{self.flake}#{self.toplevel_attr}"

    @property
    def local_path(self) -> Path | None:
        """The flake's directory when it is local (a plain path or `git+file:`, `?dir=` applied)."""
        return local_flake_dir(self.flake)


def local_flake_dir(flake: str) -> Path | None:
    """The directory of a local flake reference: a plain path, or `git+file:` with at most a
    `dir=` parameter; None for a remote reference. `path:` and other parameters are refused:
    the media ships the git repository, which must evaluate to the systems built from it."""
    if flake.startswith("path:"):
        raise InvalidInput(f"{flake}: a path: flake has no git revision, so /etc/nixos (the repository) "
                           "would not evaluate to the system built from it",
                           hint=f"pass the directory itself: --flake {flake.removeprefix('path:').split('?')[0]}#HOST")
    if flake.startswith("git+file:"):
        base, _, query = flake.removeprefix("git+file:").partition("?")
        base = "/" + base.lstrip("/") if base.startswith("//") else base
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(params) - {"dir"})
        if unknown:
            raise InvalidInput(f"{flake}: the parameter {unknown[0]}= is not supported: the media ships the "
                               "checked-out tree of the repository", hint="check out what you mean to ship and "
                               "pass the directory (or git+file://DIR?dir=SUB)")
        sub = params.get("dir", [""])[-1]
        if sub.startswith("/") or ".." in Path(sub).parts:
            raise InvalidInput(f"{flake}: dir={sub} must be a relative path inside the repository")
        return (Path(urllib.parse.unquote(base)) / sub).resolve()
    if ":" in flake:
        return None
    return Path(flake).resolve()


def parse_flake_ref(text: str) -> tuple[str, str | None]:
    """'.#alpha' -> ('/abs/path', 'alpha'); a local path must exist and hold a flake.nix."""
    flake, _, host = text.partition("#")
    flake = flake or "."
    if host.startswith("nixosConfigurations."):
        host = host.removeprefix("nixosConfigurations.").split(".", 1)[0].strip('"')
    if ":" in flake:
        local = local_flake_dir(flake)  # refuses path: and unsupported parameters
        if local is not None and not (local / "flake.nix").is_file():
            raise InvalidInput(f"{flake}: no flake.nix in {local}", hint="pass --flake PATH#HOST")
    else:
        path = Path(flake).expanduser()
        if not path.is_dir():
            raise InvalidInput(f"{flake}: no such flake directory", hint="pass --flake PATH#HOST")
        if not (path / "flake.nix").is_file():
            raise InvalidInput(f"{flake}: no flake.nix in this directory", hint="pass --flake PATH#HOST")
        flake = str(path.resolve())
    return flake, host or None


def list_hosts(flake: str) -> list[str]:
    """The names under `nixosConfigurations` of `flake`."""
    proc = runner.run(
        [*NIX, "eval", *LOCKED, "--json", f"{flake}#nixosConfigurations", "--apply", "builtins.attrNames"],
        check=False,
    )
    if proc.returncode != 0:
        check_lock_readable(flake)
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise InvalidInput(f"{flake}: cannot evaluate nixosConfigurations: {' '.join(tail)}")
    names: list[str] = json.loads(proc.stdout)
    return names


def check_lock_readable(flake: str) -> None:
    """Refuse, in one line naming this Nix's version, a local flake's lock that this Nix cannot read.

    Asked of Nix by exit status, not by its messages (they differ between versions): a scratch
    flake with no inputs and a copy of the lock. Nix parses every node of the lock before it finds
    the copy out of date and rewrites it, and fetches nothing. Nix 2.8, for one, refuses the
    `lastModified` that newer versions write into tarball inputs (FIELD-NOTES)."""
    local = local_flake_dir(flake)
    lock = local / "flake.lock" if local else None
    if lock is None or not lock.is_file():
        return
    try:
        json.loads(lock.read_bytes())
    except (ValueError, OSError) as e:
        raise InvalidInput(f"{lock}: not a readable lock file: {e}",
                           hint="restore it from git, or re-lock: nix flake lock") from None
    with tempfile.TemporaryDirectory(prefix="mediabuilder-lock-") as scratch:
        Path(scratch, "flake.nix").write_text("{ outputs = _: { }; }\n")
        shutil.copyfile(lock, Path(scratch, "flake.lock"))
        proc = runner.run([*NIX, "flake", "metadata", "--json", f"path:{scratch}"], check=False)
    if proc.returncode != 0:
        raise InvalidInput(
            f"{lock}: Nix {version()} cannot read this lock file (a newer Nix wrote it, or it was edited)",
            hint="build with a Nix at least as new as the one that locked the flake "
                 "(or re-lock with this one, which changes the pinned inputs: nix flake lock --recreate-lock-file)")


def resolve_hosts(refs: Iterable[str]) -> list[HostRef]:
    """Every `FLAKE#HOST` given, checked against the flake; `FLAKE` alone means all its hosts."""
    result: list[HostRef] = []
    known: dict[str, list[str]] = {}
    for text in refs:
        flake, host = parse_flake_ref(text)
        if flake not in known:
            known[flake] = list_hosts(flake)
        hosts = known[flake]
        if host is None:
            if not hosts:
                raise InvalidInput(f"{flake}: the flake defines no nixosConfigurations")
            result.extend(HostRef(flake, h) for h in hosts)
        elif host not in hosts:
            raise InvalidInput(
                f"{flake}: the flake does not define nixosConfigurations.{host}",
                hint=f"hosts it defines: {', '.join(hosts) or 'none'}",
            )
        else:
            result.append(HostRef(flake, host))
    names = [r.host for r in result]
    duplicate = {n for n in names if names.count(n) > 1}
    if duplicate:
        raise InvalidInput(f"host given twice: {', '.join(sorted(duplicate))}")
    return result


def _attr_list(names: Iterable[str]) -> str:
    return "[ " + " ".join(json.dumps(n) for n in names) + " ]"


def build_toplevels(hosts: list[HostRef]) -> dict[str, StorePath]:
    """Build every host's toplevel (build_hosts)."""
    return build_hosts(hosts)[0]


def build_hosts(hosts: list[HostRef], also: str = "") -> tuple[dict[str, StorePath], dict[str, Any]]:
    """Build every host's toplevel; each is known by what one evaluation says it is (its .drv and
    output path), never by the position of an answer: `nix build A B` does not answer in the order
    asked (2.8 sorts). One evaluation of all hosts, then `nix-store --realise` of their .drv files
    (no second evaluation). Returns the toplevels and, with `also` (evaluate_toplevels), each
    host's value of it from the same evaluation."""
    toplevels: dict[str, StorePath] = {}
    extra: dict[str, Any] = {}
    by_flake: dict[str, list[str]] = {}
    for h in hosts:
        by_flake.setdefault(h.flake, []).append(h.host)
    for flake, names in by_flake.items():
        evaluated = evaluate_toplevels(flake, names, also)
        proc = runner.run(["nix-store", "--realise", *sorted({v["drv"] for v in evaluated.values()})])
        built = set(proc.stdout.decode().split())
        for name in names:
            drv, out = evaluated[name]["drv"], evaluated[name]["out"]
            if out not in built:
                raise InternalError(f"nix-store --realise {drv} did not give {out} (the toplevel of {name})")
            toplevels[name] = StorePath.parse(out)
            if also:
                extra[name] = evaluated[name]["also"]
    return {h.host: toplevels[h.host] for h in hosts}, extra


def evaluate_toplevels(flake: str, names: list[str], also: str = "") -> dict[str, dict[str, Any]]:
    """Host name -> {"drv": its toplevel's .drv (written to the store), "out": its output path}
    and, with `also` (a Nix expression of the host's `c`, its config), "also": its value: a real
    host is evaluated once, not once for each question asked of it."""
    extra = f"also = {also}; " if also else ""
    apply = (f"cs: builtins.listToAttrs (map (n: let c = cs.${{n}}.config; t = c.system.build.toplevel; in "
             f"{{ name = n; value = {{ drv = t.drvPath; out = t.outPath; {extra}}}; }}) {_attr_list(names)})")
    proc = runner.run([*NIX, "eval", *LOCKED, "--json", f"{flake}#nixosConfigurations", "--apply", apply])
    evaluated: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    return evaluated


def closure(paths: Iterable[StorePath]) -> list[PathInfo]:
    """Every path in the closure of `paths`, with NarHash, NarSize, references, deriver, sigs, CA.
    A `.drv` is the store derivation itself (offline rebuilds ship them), not its outputs: those
    are asked with `--derivation`, the others without (2.26 maps an output to its deriver then)."""
    args = [str(p) for p in paths]
    found: dict[StorePath, PathInfo] = {}
    for drvs in (False, True):
        chosen = [a for a in args if a.endswith(".drv") == drvs]
        if chosen:
            flags = ["--derivation"] if drvs else []
            proc = runner.run([*NIX, "path-info", "--json", "--recursive", *flags, *chosen])
            found.update((i.path, i) for i in parse_path_info_json(proc.stdout))
    return [found[p] for p in sorted(found)]


def flake_archive(flake: str | runner.Started) -> dict[str, Any]:
    """`nix flake archive --json`: the flake's own source path and its inputs, recursively
    (`flake`: the flake, or the command `start_flake_archive` began)."""
    started = start_flake_archive(flake) if isinstance(flake, str) else flake
    data: dict[str, Any] = json.loads(started.result().stdout)
    return data


def start_flake_archive(flake: str) -> runner.Started:
    return runner.start([*NIX, "flake", "archive", *LOCKED, "--json", flake])


def flake_metadata(flake: str) -> dict[str, object]:
    proc = runner.run([*NIX, "flake", "metadata", *LOCKED, "--json", flake])
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def ensure_available() -> None:
    """Fail early, before any work, when the local Nix is missing or too old to read."""
    runner.require("nix")
    try:
        major, minor = (int(x) for x in version().split(".")[:2])
    except ValueError:
        return
    if (major, minor) < (2, 4):
        raise ExternalError(f"nix {version()} is too old: mediabuilder needs Nix 2.4 or newer for flakes")


DAEMON_SOCKET = Path("/nix/var/nix/daemon-socket/socket")
NIX_DB = Path("/nix/var/nix/db")


def _store_setting() -> str:
    """The `store` Nix uses ('auto' when not set): from NIX_REMOTE, else Nix's own settings."""
    if os.environ.get("NIX_REMOTE"):
        return os.environ["NIX_REMOTE"]
    # `nix config show` from 2.20; `show-config`, its older name, is deprecated there (a warning).
    for command in (["config", "show"], ["show-config"]):
        proc = runner.run(["nix", "--extra-experimental-features", "nix-command", *command, "--json"], check=False)
        if proc.returncode == 0:
            break
    try:
        value = json.loads(proc.stdout)["store"]["value"]
    except (ValueError, KeyError, TypeError):
        return "auto"
    return str(value) or "auto"


def _reachable(socket: Path) -> bool:
    try:
        return socket.is_socket() and os.access(socket, os.W_OK)
    except OSError:  # a directory this user may not enter
        return False


def check_store_access() -> None:
    """Fail before any work when Nix could not build here: not root, no daemon to ask, and a
    store this user cannot write (Debian's nix-bin without nix-daemon, run as a user)."""
    if os.geteuid() == 0:
        return
    store = _store_setting()
    if store not in ("auto", "local", "daemon") and not store.startswith("unix://"):
        return  # a store of the user's own (a chroot store, ssh-ng://...): Nix answers for it
    socket = Path(os.environ.get("NIX_DAEMON_SOCKET_PATH") or DAEMON_SOCKET)
    if store.startswith("unix://"):
        socket = Path(store.removeprefix("unix://").split("?", 1)[0] or socket)
    if store != "local" and _reachable(socket):
        return
    if store in ("auto", "local") and os.access(NIX_DB, os.W_OK):
        return
    user = pwd.getpwuid(os.geteuid()).pw_name
    raise InvalidInput(
        f"{NIX_DB}: user {user} cannot write the Nix store and cannot reach a nix-daemon at {socket}",
        hint="run mediabuilder as root (sudo), or start the daemon: systemctl start nix-daemon",
    )
