"""Offline rebuilds (`media.rebuild`, `--rebuild`): what a medium ships beyond the installed
system so that the machine can build a changed configuration with no network (docs/rebuild.md).

    none    the system's closure only
    config  the .drv closure of the toplevel, and the outputs of the direct inputs of every
            derivation whose output is part of the installed system (its builders, stdenv,
            compilers, sources): any change that rebuilds only such derivations, from inputs
            the graph already has, builds offline
    full    the whole build closure (`nix-store -qR --include-outputs`): every .drv and the
            output of every derivation in it

Each level's paths are roots for the cache like the toplevel itself: their closures (by
references) go onto the medium, into each host's store paths, and install.sh copies them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from mediabuilder import run as runner
from mediabuilder.errors import InternalError, InvalidInput
from mediabuilder.profile import RebuildLevel
from mediabuilder.store.derivation import Derivation
from mediabuilder.store.storepath import StorePath

NO_SUBSTITUTERS_HINT = "set nix.settings.substituters = lib.mkForce [ ]; in the host's configuration"


def config_selection(drvs: Mapping[str, Derivation], runtime: Iterable[str]) -> set[str]:
    """The outputs (and input sources) a configuration-only change needs, besides the .drv
    closure: for every derivation that produced a path of the installed system (`runtime`), the
    outputs of its direct inputs that it uses and its input sources. `drvs` is the whole .drv
    closure of the toplevel, by path."""
    producers = {out: d for d in drvs.values() for out in d.outputs.values() if out}
    chosen: set[str] = set()
    for path in runtime:
        made_by = producers.get(path)
        if made_by is None:  # a source (builtins.path, a path literal): no inputs
            continue
        for drv, names in made_by.input_drvs.items():
            chosen.update(output_paths(drvs, drv, names))
        chosen.update(made_by.input_srcs)
    return chosen


def full_selection(drvs: Mapping[str, Derivation]) -> set[str]:
    """Every output of every derivation in the .drv closure (`--include-outputs`)."""
    return {p for drv, d in drvs.items() for p in output_paths(drvs, drv, tuple(d.outputs))}


def output_paths(drvs: Mapping[str, Derivation], drv: str, names: Iterable[str]) -> list[str]:
    if drv not in drvs:
        raise InternalError(f"{drv} is an input of the .drv closure but not in it")
    found = []
    for name in names:
        path = drvs[drv].outputs.get(name)
        if not path:
            raise InvalidInput(f"{drv}: output {name} has no fixed store path (a content-addressed derivation)",
                               hint="--rebuild supports input-addressed and fixed-output derivations only")
        found.append(path)
    return found


def drv_closure(drv: str) -> dict[str, Derivation]:
    """Every derivation in the closure of `drv`, read from the local store."""
    paths = runner.output(["nix-store", "--query", "--requisites", drv]).split()
    return {p: Derivation.read(p) for p in paths if p.endswith(".drv")}


def toplevel_drv(host: str, toplevel: StorePath) -> str:
    """The .drv that built `toplevel`, which must be in the local store."""
    drv = runner.output(["nix-store", "--query", "--deriver", str(toplevel)]).strip()
    if not drv.startswith("/") or not os.path.exists(drv):
        raise InvalidInput(f"{host}: the derivation of its toplevel {toplevel} is not in the local store, "
                           "so its build closure cannot be read",
                           hint="build the host from the flake on this machine (not --system), or pass --rebuild none")
    return drv


def select(level: RebuildLevel, host: str, toplevel: StorePath, runtime: Iterable[StorePath]) -> list[StorePath]:
    """The paths `level` adds for one host (their closures are the caller's): for `config` and
    `full` the .drv closure and the chosen outputs, built or substituted first when the local
    store lacks them."""
    if level is RebuildLevel.NONE:
        return []
    drvs = drv_closure(toplevel_drv(host, toplevel))
    full = level is RebuildLevel.FULL
    outputs = full_selection(drvs) if full else config_selection(drvs, (str(p) for p in runtime))
    realise_missing(drvs, outputs)
    return sorted(StorePath.parse(p) for p in {*drvs, *outputs})


def realise_missing(drvs: Mapping[str, Derivation], outputs: set[str]) -> None:
    """Outputs the local store lacks (a system substituted whole never had its build inputs)
    are built or substituted now, by their derivations."""
    proc = runner.run(["nix-store", "--check-validity", "--print-invalid", *sorted(outputs)])
    invalid = set(proc.stdout.decode().split())
    if not invalid:
        return
    wanted = sorted({drv for drv, d in drvs.items() if invalid & set(d.outputs.values())})
    runner.run(["nix-store", "--realise", *wanted])


def check_no_substituters(host: str, toplevel: StorePath, level: RebuildLevel) -> None:
    """With a rebuild level, the system must not want a substituter: the installed machine has no
    network, and Nix would try (and wait for) the one its /etc/nix/nix.conf names, or Nix's
    default (https://cache.nixos.org) when it names none."""
    if level is RebuildLevel.NONE:
        return
    conf = Path(str(toplevel)) / "etc" / "nix" / "nix.conf"
    try:
        text = conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise InvalidInput(f"{host}: the system has no /etc/nix/nix.conf ({conf}), so Nix on the installed machine "
                           f"would use its default substituter https://cache.nixos.org (--rebuild {level.value})",
                           hint=NO_SUBSTITUTERS_HINT) from None
    settings = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#"):
            settings[key.strip()] = value.split("#", 1)[0].strip()
    wanted = [f"{k} = {settings[k]}" for k in ("substituters", "extra-substituters") if settings.get(k)]
    if "substituters" not in settings:
        wanted.append("no substituters line (Nix's default: https://cache.nixos.org)")
    if wanted:
        raise InvalidInput(f"{host}: {conf} wants a substituter ({wanted[0]}), which the offline machine cannot reach "
                           f"(--rebuild {level.value})", hint=NO_SUBSTITUTERS_HINT)
