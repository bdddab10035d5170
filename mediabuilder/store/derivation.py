"""Store derivations (`.drv` files): the ATerm they are written in, read into what an offline
rebuild needs to know of each: its outputs, the outputs of other derivations it is built from,
and its input sources.

    Derive([("out","/nix/store/…-x","","")],[("/nix/store/…-y.drv",["out"])],["/nix/store/…-src"],
           "x86_64-linux","/nix/store/…/bin/sh",["-c","…"],[("name","x"),…])

The format has not changed since Nix 1.x (only experimental dynamic derivations, written as
`DrvWithVersion(…)`, differ; they are refused). Reading the files ourselves keeps us clear of
`nix show-derivation`'s JSON, whose shape changed in 2.19 (inputDrvs as objects) and whose name
changed in 2.15 (`nix derivation show`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mediabuilder.errors import InvalidInput

T = TypeVar("T")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}


@dataclass(frozen=True)
class Derivation:
    path: str
    outputs: dict[str, str]  # output name -> store path ("" for a content-addressed floating one)
    input_drvs: dict[str, tuple[str, ...]]  # .drv path -> the names of its outputs used
    input_srcs: tuple[str, ...]
    builder: str

    @classmethod
    def parse(cls, text: str, path: str) -> Derivation:
        reader = _Reader(text, path)
        reader.expect("Derive(")
        outputs = {name: out for name, out, _, _ in reader.items(lambda: reader.tuple(4))}
        reader.expect(",")
        input_drvs = dict(reader.items(lambda: _input_drv(reader)))
        reader.expect(",")
        input_srcs = tuple(reader.items(reader.string))
        reader.expect(",")
        reader.string()  # system
        reader.expect(",")
        builder = reader.string()
        # The arguments and environment are not needed here.
        return cls(path, outputs, input_drvs, input_srcs, builder)

    @classmethod
    def read(cls, path: str) -> Derivation:
        try:
            with open(path, encoding="utf-8") as f:
                return cls.parse(f.read(), path)
        except OSError as e:
            raise InvalidInput(f"{path}: cannot read the derivation: {e.strerror}") from None


def _input_drv(reader: _Reader) -> tuple[str, tuple[str, ...]]:
    reader.expect("(")
    drv = reader.string()
    reader.expect(",")
    names = tuple(reader.items(reader.string))
    reader.expect(")")
    return drv, names


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> InvalidInput:
        return InvalidInput(f"{self.source}: not a derivation Nix writes ({what} at byte {self.pos})",
                            hint="dynamic derivations (DrvWithVersion) are not supported")

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise self.fail(f"expected {token!r}")
        self.pos += len(token)

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            end = self.text.find('"', self.pos)
            slash = self.text.find("\\", self.pos)
            if end < 0:
                raise self.fail("unterminated string")
            if 0 <= slash < end:
                out.append(self.text[self.pos:slash])
                escaped = self.text[slash + 1:slash + 2]
                out.append(_ESCAPES.get(escaped, escaped))
                self.pos = slash + 2
                continue
            out.append(self.text[self.pos:end])
            self.pos = end + 1
            return "".join(out)

    def tuple(self, n: int) -> tuple[str, ...]:
        self.expect("(")
        found: list[str] = []
        for i in range(n):
            if i:
                self.expect(",")
            found.append(self.string())
        self.expect(")")
        return tuple(found)

    def items(self, item: Callable[[], T]) -> list[T]:
        self.expect("[")
        items: list[T] = []
        while not self.text.startswith("]", self.pos):
            if items:
                self.expect(",")
            items.append(item())
        self.pos += 1
        return items
