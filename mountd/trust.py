"""Which records mountd believes: signatures, host binding, declared addresses.

A record counts only if it verifies against the trusted key of the host it
names (sharedd.signing), and every export a client would mount from it
names one of the addresses the record declares its server serves from.
Records of a host without a trusted key count only with accept_unsigned (a
local spool written by root on this host), and are never mixed with signed
ones: a host with a key is judged by the key alone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from typing import Any, Dict, Iterable, Optional

from sharedd import record as rec
from sharedd import signing
from sharedd.errors import ConfigError
from sharedd.signing import PublicKey, SignatureError

#: key files read from trusted_keys_dir, and the most keys mountd holds
KEY_FILE_SUFFIX = ".pub"
MAX_TRUSTED_KEYS = 1024


class Untrusted(SignatureError):
    """A record mountd must not act on (the message says why)."""


def _address(text: str) -> str:
    text = text.strip("[]")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.lower()


class Trust:
    def __init__(self, keys: Dict[str, PublicKey], accept_unsigned: bool):
        self.keys = dict(keys)
        self.accept_unsigned = accept_unsigned

    def check(self, record: Dict[str, Any]) -> None:
        """Raise Untrusted unless mountd may act on record (schema-valid)."""
        key = self.keys.get(record["host"])
        if key is None:
            if not self.accept_unsigned:
                raise Untrusted(f"no trusted key for host {record['host']!r}"
                                " (trusted_keys, trusted_keys_dir)")
            return
        try:
            key.verify(record)
        except SignatureError as exc:
            raise Untrusted(str(exc)) from None
        declared = {_address(a) for a in record.get("server_addresses", ())}
        for share in _shares(record):
            export = rec.mount_export(share)
            if export and _address(rec.export_host(export)) not in declared:
                raise Untrusted(f"share {share['id']}: export {export[:100]!r} is not on an "
                                f"address the server declares ({', '.join(sorted(declared)) or 'none'})")


def _shares(record: Dict[str, Any]) -> Iterable[Dict[str, Any]]:
    """Every mountable thing a record names: its shares and their exported
    snapshots."""
    shares = ([record["share"]] if record.get("share") else []) + list(record.get("shares", ()))
    for share in shares:
        yield share
        yield from share.get("snapshots", ())


def load_keys(inline: Iterable[str], directory: str, where_inline: str,
              where_dir: str) -> Dict[str, PublicKey]:
    """host id -> key from the trusted_keys entries and the *.pub files of
    directory (a missing directory holds none). One key per host."""
    keys: Dict[str, PublicKey] = {}
    origin: Dict[str, str] = {}

    def add(key: PublicKey, where: str) -> None:
        if key.host in keys and keys[key.host] != key:
            raise ConfigError(f"{where}: a second, different key for host {key.host} "
                              f"(first in {origin[key.host]})")
        if len(keys) >= MAX_TRUSTED_KEYS:
            raise ConfigError(f"{where}: more than {MAX_TRUSTED_KEYS} trusted keys")
        keys[key.host] = key
        origin[key.host] = where

    for entry in inline:
        try:
            add(signing.parse_inline(entry), where_inline)
        except ValueError as exc:
            raise ConfigError(f"{where_inline}: {entry[:80]!r}: {exc}") from None
    for path in _key_files(directory, where_dir):
        text = signing.read_small_file(path).decode("ascii", "replace")
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if len(lines) != 1:
            raise ConfigError(f"{path}: holds {len(lines)} keys, not one")
        try:
            add(signing.parse_public_line(lines[0]), path)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return keys


def _key_files(directory: str, where: str) -> list:
    if not directory:
        return []
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{where}: {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: {directory} is not a directory")
    if (os.geteuid() == 0 and st.st_uid != 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{where}: {directory} must be owned by root and writable "
                          "by root alone")
    names = sorted(n for n in os.listdir(directory)
                   if n.endswith(KEY_FILE_SUFFIX) and re.fullmatch(r"[A-Za-z0-9._-]{1,255}", n)
                   and not n.startswith("."))
    if len(names) > MAX_TRUSTED_KEYS:
        raise ConfigError(f"{where}: {directory} holds more than {MAX_TRUSTED_KEYS} key files")
    return [os.path.join(directory, n) for n in names]


def describe(trust: Optional[Trust]) -> str:
    if trust is None:
        return "no trust configured"
    hosts = ", ".join(sorted(trust.keys)) or "none"
    return (f"trusted keys for: {hosts}; unsigned records "
            f"{'accepted from hosts without a key' if trust.accept_unsigned else 'refused'}")
