"""The three kinds of failure mediabuilder knows, turned into one line by `cli.main`."""

from __future__ import annotations


class MediabuilderError(Exception):
    """Base class: a message for the user and an optional hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InvalidInput(MediabuilderError):
    """Input the user can fix: a profile, a flag, a flake, a path."""


class InvalidMedia(MediabuilderError):
    """Media, a cache or a file on it that is damaged, truncated or forged."""


class FormatError(InvalidMedia):
    """Bytes that do not parse as the Nix format they claim to be (NAR, narinfo, key, ...)."""


class ExternalError(MediabuilderError):
    """An external program (nix, git, ...) failed."""


class InternalError(MediabuilderError):
    """A bug in mediabuilder."""

    exit_code = 3
