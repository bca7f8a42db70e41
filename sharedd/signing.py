"""Ed25519 signatures on hook records: sharedd signs, mountd verifies.

python3-cryptography does the cryptography (OpenSSL's Ed25519): Debian
ships and patches it, and most Debian hosts already have it installed.

What is signed is the record's canonical form: the record without its
"signature" member, serialised as JSON with sorted keys, no whitespace and
ASCII only (canonical() below). Records hold only strings, integers,
booleans, null, lists and objects, so every parser that refuses duplicate
keys reads the same canonical form back, whatever layout the file uses.

Keys:
* the private key is a PKCS#8 PEM file (what `openssl genpkey -algorithm
  ed25519` writes), owned by root, mode 0600;
* a public key is published as one line, "sharedd-ed25519 <base64> <host id>",
  binding the key to the host id the records carry (PUBLIC_LINE_RE);
* mountd's inline form is "<host id>:<base64>".
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import re
import stat
from typing import Any, Dict, NamedTuple, Tuple

from .errors import ConfigError, InvalidArgument
from .record import HOST_ID

log = logging.getLogger(__name__)

KEY_TYPE = "sharedd-ed25519"
ALGORITHM = "ed25519"
KEY_FILE_NAME = "record-signing.key"
MAX_KEY_FILE_BYTES = 4096
_B64_KEY = r"[A-Za-z0-9+/]{43}="                 # 32 bytes
PUBLIC_LINE_RE = re.compile(rf"{KEY_TYPE} ({_B64_KEY}) ({HOST_ID})", re.ASCII)
INLINE_RE = re.compile(rf"({HOST_ID}):({_B64_KEY})", re.ASCII)


class SignatureError(InvalidArgument):
    """A record is unsigned, signed by an unknown key, or forged."""


def canonical(record: Dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class PublicKey(NamedTuple):
    host: str
    raw: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        return f"{KEY_TYPE} {base64.b64encode(self.raw).decode()} {self.host}"

    def inline(self) -> str:
        """The form mountd's trusted_keys option takes (parse_inline)."""
        return f"{self.host}:{base64.b64encode(self.raw).decode()}"

    def verify(self, record: Dict[str, Any]) -> None:
        """Raise SignatureError unless record is this key's, for its host."""
        from cryptography.exceptions import InvalidSignature
        sig = record.get("signature")
        if not isinstance(sig, dict):
            raise SignatureError("record is not signed")
        if record.get("host") != self.host:
            raise SignatureError(f"record names host {record.get('host')!r}; the key is {self.host}'s")
        if sig.get("key_id") != self.key_id:
            raise SignatureError(f"signed by key {str(sig.get('key_id'))[:16]}, not by "
                                 f"{self.host}'s trusted key {self.key_id}")
        try:
            value = base64.b64decode(str(sig.get("value")), validate=True)
            _verifier(self.raw).verify(value, canonical(record))
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"signature does not verify with {self.host}'s key "
                                 f"{self.key_id}") from None


@functools.lru_cache(maxsize=64)
def _verifier(raw: bytes) -> Any:
    """One OpenSSL key object per trusted key, not one per record verified."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    return Ed25519PublicKey.from_public_bytes(raw)


def _raw(b64: str) -> bytes:
    raw = base64.b64decode(b64, validate=True)
    if len(raw) != 32:
        raise ValueError("not 32 bytes")
    return raw


def parse_public_line(line: str) -> PublicKey:
    """'sharedd-ed25519 <base64> <host id>' -> PublicKey (ValueError if not)."""
    m = PUBLIC_LINE_RE.fullmatch(line.strip())
    if not m:
        raise ValueError(f"not '{KEY_TYPE} <base64 key> <host id>'")
    return PublicKey(m.group(2), _raw(m.group(1)))


def parse_inline(entry: str) -> PublicKey:
    """'<host id>:<base64>' -> PublicKey (ValueError if not)."""
    m = INLINE_RE.fullmatch(entry.strip())
    if not m:
        raise ValueError("not '<host id>:<base64 key>'")
    return PublicKey(m.group(1), _raw(m.group(2)))


def read_small_file(path: str, limit: int = MAX_KEY_FILE_BYTES, *,
                    private: bool = False) -> bytes:
    """A key file: a regular file (no symlink), owned by root when we are
    root, not writable by others (not readable either if private)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if os.geteuid() == 0 and st.st_uid != 0:
            raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by root")
        loose = stat.S_IRWXG | stat.S_IRWXO if private else stat.S_IWGRP | stat.S_IWOTH
        if st.st_mode & loose:
            raise ConfigError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} is too open"
                              f" (at most {'0600' if private else '0644'})")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit} bytes")
    return data


class SigningKey:
    """sharedd's private key; signs records for one host id."""

    def __init__(self, private, host: str, path: str = ""):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        self._private = private
        self.path = path
        self.public = PublicKey(host, private.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def load(cls, path: str, host: str) -> "SigningKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        data = read_small_file(path, private=True)
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 key")
        return cls(key, host, path)

    @classmethod
    def generate(cls, path: str, host: str) -> Tuple["SigningKey", bool]:
        """Load the key at path, or make one there (0600, O_EXCL: never
        replaces a key); (key, created)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding, NoEncryption, PrivateFormat)
        if os.path.lexists(path):
            return cls.load(path, host), False
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        tmp = f"{path}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)          # fails if another process made one meanwhile
        os.unlink(tmp)
        return cls(key, host, path), True

    def sign(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """A copy of record with its "signature" member."""
        value = self._private.sign(canonical(record))
        out = dict(record)
        out["signature"] = {"algorithm": ALGORITHM, "key_id": self.public.key_id,
                            "value": base64.b64encode(value).decode()}
        return out


def default_key_path(config_path: str) -> str:
    """Beside the main configuration file (/etc/sharedd/record-signing.key)."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), KEY_FILE_NAME)


def open_key(path: str, host: str) -> SigningKey:
    """sharedd's key, made on first use (an installed system makes it in
    postinst, so its public key is known before the first start)."""
    try:
        key, created = SigningKey.generate(path, host)
    except OSError as exc:
        raise ConfigError(f"record_signing_key {path}: {exc.strerror or exc}") from None
    if created:
        log.warning("made a new record signing key %s; clients must trust its public key "
                    "(sharedd --print-public-key): %s", path, key.public.line())
    return key
