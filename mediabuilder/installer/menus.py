"""The installer's boot menus, parsed and given one "Install HOST offline" entry per host.

Two formats: SYSLINUX's `isolinux.cfg` (BIOS) and GRUB's `grub.cfg` (UEFI; the ISO9660
`EFI/BOOT/grub.cfg` and the copy inside `efi.img`). Nothing is templated: the stock default
entry is found by parsing, and each new entry is a copy of it — its kernel, its initrd, its
kernel line — with the parameters the install needs appended. Every original line stays as it
was; the new entries go right after the stock entry they copy, so the stock default stays the
default unless `default` names a host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mediabuilder.errors import InvalidInput, InvalidMedia

# Hosts become syslinux labels, GRUB ids and kernel parameters: no spaces, no quotes.
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")
_SYSLINUX_KEY = re.compile(r"\s*(\S+)\s*(.*)$")
_GRUB_ENTRY = re.compile(r"\s*(menuentry|submenu)\b")


def check_host(host: str) -> str:
    if not _HOST.fullmatch(host):
        raise InvalidInput(f"host {host!r}: cannot name a boot menu entry (letters, digits, _ and -, at most 63)",
                           hint="rename the host in the flake's nixosConfigurations")
    return host


def entry_id(host: str, unattended: bool = False) -> str:
    return f"install-{host}" + ("-unattended" if unattended else "")


def entry_title(host: str, unattended: bool = False) -> str:
    return f"Install {host} offline" + (" (unattended)" if unattended else "")


@dataclass(frozen=True)
class Entry:
    id: str
    title: str
    params: str  # what is appended to the stock kernel line


@dataclass(frozen=True)
class Install:
    """What the new entries carry: the hosts, the kernel parameters each adds, the default; with
    `unattended`, one more entry for that host (kernel parameters `unattended_params`) that is
    the default of every menu."""

    hosts: tuple[str, ...]
    params: dict[str, str]  # host → what is appended to the stock kernel line
    default: str | None = None
    unattended: str | None = None
    unattended_params: str = ""

    def entries(self) -> list[Entry]:
        found = [Entry(entry_id(h), entry_title(h), self.params[h]) for h in self.hosts]
        if self.unattended is not None:
            u = self.unattended
            found.append(Entry(entry_id(u, True), entry_title(u, True), self.unattended_params))
        return found

    def default_id(self) -> str | None:
        if self.unattended is not None:
            return entry_id(self.unattended, True)
        return None if self.default is None else entry_id(self.default)


# SYSLINUX


@dataclass(frozen=True)
class _Block:
    start: int  # index of its LABEL line
    end: int  # one past its last line (trailing blank lines and comments belong to the next)
    label: str


def _syslinux_blocks(lines: list[str]) -> list[_Block]:
    starts = [i for i, ln in enumerate(lines) if _syslinux_key(ln)[0] == "label"]
    blocks = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        blocks.append(_Block(start, end, _syslinux_key(lines[start])[1]))
    return blocks


def _syslinux_key(line: str) -> tuple[str, str]:
    found = _SYSLINUX_KEY.match(line)
    if found is None or line.lstrip().startswith("#"):
        return "", ""
    return found.group(1).lower(), found.group(2).strip()


def edit_isolinux(text: str, install: Install, where: str) -> str:
    """isolinux.cfg with an entry per host after the stock default entry (DEFAULT, else the first
    LABEL that boots a kernel with an initrd and `init=`)."""
    lines = text.splitlines()
    blocks = _syslinux_blocks(lines)
    default = next((v for k, v in map(_syslinux_key, lines) if k == "default"), None)
    bootable = [b for b in blocks if _syslinux_boots(lines[b.start:b.end])]
    if not bootable:
        raise InvalidMedia(f"{where}: no boot entry of a NixOS installer "
                           "(LABEL with LINUX, INITRD and APPEND init=...)")
    stock = next((b for b in bootable if b.label == default), bootable[0])
    taken = {b.label.lower() for b in blocks}
    new: list[str] = []
    for entry in install.entries():
        if entry.id.lower() in taken:
            raise InvalidMedia(f"{where}: already has an entry {entry.id} (remastered before?)",
                               hint="give the stock NixOS installer ISO")
        new += ["", f"# {entry.title} (mediabuilder)"]
        for line in lines[stock.start:stock.end]:
            key, value = _syslinux_key(line)
            if key == "label":
                new.append(f"LABEL {entry.id}")
            elif key == "menu" and value.lower().startswith("label"):
                new.append(f"MENU LABEL {entry.title}")
            elif key == "menu" and value.lower() == "default":
                continue
            elif key == "append":
                new.append(f"{line.rstrip()} {entry.params}")
            else:
                new.append(line)
    out = lines[:stock.end] + new + lines[stock.end:]
    default = install.default_id()
    if default is not None:
        out = _syslinux_default(out, default)
    return "\n".join(out) + "\n"


def _syslinux_boots(block: list[str]) -> bool:
    keys = dict(_syslinux_key(ln) for ln in block)
    kernel = "linux" in keys or "kernel" in keys
    append = keys.get("append", "")
    initrd = "initrd" in keys or re.search(r"(^|\s)initrd=", append) is not None
    return kernel and initrd and re.search(r"(^|\s)init=", append) is not None


def _syslinux_default(lines: list[str], label: str) -> list[str]:
    """DEFAULT and ONTIMEOUT name `label`, and only its block carries MENU DEFAULT."""
    out = []
    has_default = False
    for line in lines:
        key, value = _syslinux_key(line)
        if key in ("default", "ontimeout"):
            has_default = has_default or key == "default"
            out.append(f"{line.split()[0]} {label}")
        elif key == "menu" and value.lower() == "default":
            continue
        else:
            out.append(line)
            if key == "label" and value == label:
                out.append("MENU DEFAULT")
    return out if has_default else [f"DEFAULT {label}", *out]


# GRUB


@dataclass(frozen=True)
class _Entry:
    start: int  # offset of the `menuentry` keyword
    open: int  # offset of its `{`
    end: int  # one past its `}`
    kind: str  # menuentry or submenu


def _grub_entries(text: str, where: str) -> list[_Entry]:
    """The top-level `menuentry` and `submenu` blocks, by a scanner that knows GRUB's quoting
    ('…', "…", backslash) and comments well enough to match braces."""
    entries: list[_Entry] = []
    depth = 0
    i = 0
    start = opening = -1
    kind = ""
    line_start = True
    while i < len(text):
        c = text[i]
        if c == "#" and (i == 0 or text[i - 1] in " \t\n;{"):
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        if depth == 0 and line_start and start < 0:
            found = _GRUB_ENTRY.match(text, i)
            if found:
                start, kind = found.start(1), found.group(1)
        if c == "\\":
            i += 2
            continue
        if c in "'\"":
            close = text.find(c, i + 1) if c == "'" else _dquote_end(text, i + 1)
            if close < 0:
                raise InvalidMedia(f"{where}: unterminated quote at byte {i}")
            i = close + 1
            line_start = False
            continue
        if c == "{":
            if depth == 0 and start >= 0:
                opening = i
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise InvalidMedia(f"{where}: unbalanced '}}' at byte {i}")
            if depth == 0 and start >= 0:
                entries.append(_Entry(start, opening, i + 1, kind))
                start = -1
        line_start = c == "\n" or (line_start and c in " \t")
        i += 1
    if depth != 0:
        raise InvalidMedia(f"{where}: unbalanced '{{': {depth} block(s) left open")
    return entries


def _dquote_end(text: str, i: int) -> int:
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


_LINUX = re.compile(r"^(\s*linux(?:efi|16)?\s+\S.*?)\s*$", re.MULTILINE)
_INITRD = re.compile(r"^\s*initrd(?:efi|16)?\s+\S", re.MULTILINE)
_UNIQUE_OPTION = re.compile(r"\s--(?:id|hotkey)(?:=|\s+)(?:'[^']*'|\"[^\"]*\"|\S+)")
_TITLE = re.compile(r"menuentry\s+('[^']*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def edit_grub(text: str, install: Install, where: str) -> str:
    """grub.cfg with an entry per host after the first top-level menuentry that boots a kernel
    (`linux … init=…`) with an initrd; with a default, `set default=` at the very end (the last
    assignment is the one the menu uses)."""
    entries = _grub_entries(text, where)
    stock = next((e for e in entries if e.kind == "menuentry" and _grub_boots(text[e.open:e.end])), None)
    if stock is None:
        raise InvalidMedia(f"{where}: no boot entry of a NixOS installer "
                           "(menuentry with linux ... init=... and initrd)")
    new = []
    for entry in install.entries():
        if re.search(rf"--id[ =]['\"]?{re.escape(entry.id)}(?![\w-])", text):
            raise InvalidMedia(f"{where}: already has an entry {entry.id} (remastered before?)",
                               hint="give the stock NixOS installer ISO")
        head = text[stock.start:stock.open]
        head = _TITLE.sub(f"menuentry '{entry.title}'", head, count=1)
        head = _UNIQUE_OPTION.sub("", head).rstrip()  # the stock entry's --id and --hotkey stay its own
        head += f" --id {entry.id} "
        body = _append_to_linux(text[stock.open:stock.end], entry.params)
        new.append(f"\n\n# {entry.title} (mediabuilder)\n{head}{body}")
    out = text[:stock.end] + "".join(new) + text[stock.end:]
    default = install.default_id()
    if default is not None:
        out = out.rstrip("\n") + f"\n\n# mediabuilder: the default entry\nset default={default}\n"
    return out


def _append_to_linux(body: str, params: str) -> str:
    return _LINUX.sub(lambda m: f"{m.group(1)} {params}", body, count=1)


def _grub_boots(body: str) -> bool:
    linux = _LINUX.search(body)
    return linux is not None and " init=" in linux.group(1) and _INITRD.search(body) is not None
