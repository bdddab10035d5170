"""Nix-compatible ed25519 signing keys: `name:base64(seed + public)` and `name:base64(public)`."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from mediabuilder.errors import FormatError, InvalidInput

SECRET_LEN = 64
PUBLIC_LEN = 32
SIGNATURE_LEN = 64
# Key names go into nix.conf's space-separated trusted-public-keys and into install.sh's
# arguments: ASCII letters, digits and . _ + - only, as every public cache's key name is.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
KEY_NAME_RULE = "1-100 ASCII letters, digits, '.', '_', '+' or '-', starting with a letter or digit"


def check_key_name(name: str) -> bool:
    return KEY_NAME.fullmatch(name) is not None


def _split(text: str, size: int, what: str, source: str) -> tuple[str, bytes]:
    where = f"{source}: " if source else ""
    name, sep, b64 = text.strip().partition(":")
    if not sep or not name:
        raise FormatError(f"{where}{what} is not 'name:base64'")
    if not check_key_name(name):
        raise FormatError(f"{where}{what} name {name!r} is not {KEY_NAME_RULE}")
    try:
        data = base64.b64decode(b64, validate=True)
    except ValueError:  # binascii.Error, or a str with non-ASCII characters
        raise FormatError(f"{where}{what} {name!r} is not valid base64") from None
    if len(data) != size:
        raise FormatError(f"{where}{what} {name!r} has {len(data)} bytes, not {size}")
    return name, data


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read key file ({what}): {e}") from None


@dataclass(frozen=True)
class PublicKey:
    """A public key that checks the Sig lines of narinfo files."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str, source: str = "") -> PublicKey:
        return cls(*_split(text, PUBLIC_LEN, "public key", source))

    @classmethod
    def load(cls, path: Path) -> PublicKey:
        return cls.parse(_read(path, "public key"), str(path))

    def render(self) -> str:
        """`name:base64`, as `trusted-public-keys` wants it."""
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: bytes, sig: str) -> bool:
        """Whether `sig` ("name:base64") is this key's signature of `fingerprint`."""
        name, _, b64 = sig.partition(":")
        if name != self.name:
            return False
        try:
            signature = base64.b64decode(b64, validate=True)
        except ValueError:  # binascii.Error, or a str with non-ASCII characters
            return False
        if len(signature) != SIGNATURE_LEN:
            return False
        try:
            nacl.signing.VerifyKey(self.key).verify(fingerprint, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def fingerprint(self) -> str:
        """The form people compare: the first 128 bits of the key's sha256 as 32 hex digits in
        groups of four, long enough that no one can grind a key with the same fingerprint
        (install.sh's key_fingerprint computes the same)."""
        digest = hashlib.sha256(self.key).hexdigest()[:32]
        return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class SecretKey:
    """A secret key: 32 bytes of seed followed by the 32 bytes of its public key."""

    name: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_LEN:
            raise FormatError(f"secret key {self.name!r} has {len(self.key)} bytes, not {SECRET_LEN}")
        signing = nacl.signing.SigningKey(self.key[:32])
        if bytes(signing.verify_key) != self.key[32:]:
            raise FormatError(f"secret key {self.name!r}: its public half does not match its seed")

    @classmethod
    def parse(cls, text: str, source: str = "") -> SecretKey:
        name, key = _split(text, SECRET_LEN, "secret key", source)
        try:
            return cls(name, key)
        except FormatError as e:
            raise FormatError(f"{source}: {e}" if source else str(e)) from None

    @classmethod
    def load(cls, path: Path) -> SecretKey:
        return cls.parse(_read(path, "secret key"), str(path))

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not check_key_name(name):
            raise InvalidInput(f"key name {name!r}: must be {KEY_NAME_RULE}", hint="e.g. mymedia-1")
        signing = nacl.signing.SigningKey.generate()
        return cls(name, bytes(signing) + bytes(signing.verify_key))

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key[32:])

    def sign(self, fingerprint: bytes) -> str:
        """`name:base64(signature)`, as a narinfo Sig line carries it (ed25519 is deterministic)."""
        # libsodium's secret key is seed + public key, as ours (checked to match when made), so
        # no key pair is derived again for each signature.
        signature = nacl.bindings.crypto_sign(fingerprint, self.key)[: nacl.bindings.crypto_sign_BYTES]
        return f"{self.name}:{base64.b64encode(signature).decode()}"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `path` atomically (temporary name, then link) and never over an existing file."""
    if os.path.lexists(path):
        raise InvalidInput(f"{path}: already exists; not overwriting a key file")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if `path` appeared meanwhile, unlike rename
        except FileExistsError:
            raise InvalidInput(f"{path}: already exists; not overwriting a key file") from None
        except OSError:
            if os.path.lexists(path):
                raise InvalidInput(f"{path}: already exists; not overwriting a key file") from None
            os.rename(tmp, path)  # file systems without hard links
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_key_pair(name: str, secret_path: Path, public_path: Path) -> SecretKey:
    """Generate a key pair like `nix-store --generate-binary-cache-key` and write both files."""
    for path in (secret_path, public_path):
        if os.path.lexists(path):
            raise InvalidInput(f"{path}: already exists; not overwriting a key file")
    secret = SecretKey.generate(name)
    _write_new(secret_path, secret.render(), 0o600)
    _write_new(public_path, secret.public().render(), 0o644)
    return secret
