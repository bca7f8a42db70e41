"""Validation and canonicalisation of everything that crosses the API.

IP rules: a single address is stored bare (IPv6 compressed, lower case);
a CIDR must name a network: host bits set (10.0.0.5/24) is rejected with the
network it probably meant, /32 and /128 are stored as bare addresses, and
0.0.0.0/0 or ::/0 mean every client of that family. A single address never
widens: 0.0.0.0 and :: (which export services read as "everyone") and IPv4
addresses written as IPv6 (::ffff:a.b.c.d) are refused.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, Tuple

import netaddr

from . import constants as C
from .constants import ACCESS_LEVELS, ACCESS_TYPES, PROTOCOLS, SHARE_NAME_PATTERN
from .errors import InvalidArgument

_NAME_RE = re.compile(SHARE_NAME_PATTERN)
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")
# Certificate CNs: also what GlusterFS auth.ssl-allow can list safely.
CN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_META_KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,%d}$" % C.MAX_METADATA_KEY_LENGTH)
MAX_SIZE_GIB = 1 << 20   # 1 PiB: anything above is a typo


def name(value: str, what: str = "share") -> str:
    """A share or snapshot name: also a directory, SMB share and path element."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} name {str(value)[:80]!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return value


def object_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument(f"invalid {what} {value[:80]!r}: expected 32 hex digits")
    return value


def protocol(value: str) -> str:
    up = value.upper() if isinstance(value, str) else ""
    if up not in PROTOCOLS:
        raise InvalidArgument(f"invalid protocol {value[:40]!r}: use one of {', '.join(PROTOCOLS)}")
    return up


def size_gib(value: int, what: str = "size") -> int:
    if not isinstance(value, int) or value <= 0:
        raise InvalidArgument(f"invalid {what} {value!r}: must be a whole number of GiB above 0")
    if value > MAX_SIZE_GIB:
        raise InvalidArgument(f"invalid {what} {value} GiB: above the limit of {MAX_SIZE_GIB} GiB")
    return value


def description(value: str, max_length: int = C.MAX_DESCRIPTION_LENGTH) -> str:
    if not isinstance(value, str) or len(value) > max_length or any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"invalid description: at most {max_length} printable characters "
                              "(max_description_length)")
    return value


def metadata(value: dict, max_entries: int = C.MAX_METADATA_ENTRIES) -> dict:
    if not isinstance(value, dict) or len(value) > max_entries:
        raise InvalidArgument(f"invalid metadata: at most {max_entries} string pairs "
                              "(max_metadata_entries)")
    for k, v in value.items():
        if not isinstance(k, str) or not _META_KEY_RE.fullmatch(k):
            raise InvalidArgument(f"invalid metadata key {str(k)[:80]!r}: 1-"
                                  f"{C.MAX_METADATA_KEY_LENGTH} of letters, digits, '_.:-'")
        if not isinstance(v, str) or len(v) > C.MAX_METADATA_VALUE_LENGTH:
            raise InvalidArgument(f"invalid metadata value for {k!r}: at most "
                                  f"{C.MAX_METADATA_VALUE_LENGTH} characters")
    return dict(value)


def export_path(value: str) -> str:
    """What ManageShare names: a path or server:/volume, checked by the driver too."""
    if not isinstance(value, str) or not value or len(value) > 1024 \
            or any(ord(c) < 32 or ord(c) == 127 for c in value) or value.startswith("-"):
        raise InvalidArgument(f"invalid export path {str(value)[:80]!r}: 1-1024 printable "
                              "characters, not starting with '-'")
    return value


def access_type(value: str) -> str:
    low = value.lower() if isinstance(value, str) else ""
    if low not in ACCESS_TYPES:
        raise InvalidArgument(f"invalid access type {value[:40]!r}: use one of {', '.join(ACCESS_TYPES)}")
    return low


def access_level(value: str) -> str:
    low = value.lower() if isinstance(value, str) else ""
    if low not in ACCESS_LEVELS:
        raise InvalidArgument(f"invalid access level {value[:40]!r}: use rw or ro")
    return low


def _address(text: str) -> netaddr.IPAddress:
    # INET_PTON: refuse legacy forms such as 01.2.3.4 or 10.1
    return netaddr.IPAddress(text, flags=netaddr.INET_PTON if ":" not in text else 0)


def _not_mapped(ip: netaddr.IPAddress, text: str) -> None:
    # Export services read ::ffff:a.b.c.d in their own ways: grant the IPv4 form.
    if ip.version == 6 and (ip.is_ipv4_mapped() or ip.is_ipv4_compat()) and int(ip) > 1:
        raise InvalidArgument(f"invalid address {text!r}: an IPv4 address written as IPv6; "
                              f"write it as IPv4 ({ip.ipv4()})")


def _single(ip: netaddr.IPAddress, text: str) -> str:
    """One client. The unspecified address is not one: export services read
    it as "every client", so it must be asked for as a network."""
    if int(ip) == 0:
        everyone = "0.0.0.0/0" if ip.version == 4 else "::/0"
        raise InvalidArgument(f"invalid address {text!r}: it names no client; write "
                              f"{everyone} to admit every {'IPv4' if ip.version == 4 else 'IPv6'}"
                              " client")
    _not_mapped(ip, text)
    return str(ip)


def ip_rule(value: str) -> str:
    text = value if isinstance(value, str) else ""
    if not text or len(text) > 64 or not re.fullmatch(r"^[0-9A-Fa-f.:/]+$", text):
        raise InvalidArgument(f"invalid IP address or CIDR {value[:80]!r}")
    return _ip_rule(text)


# Every hook record's rules are checked again on each write and read: the
# same few addresses, parsed once (a refusal is not kept: it raises).
@functools.lru_cache(maxsize=4096)
def _ip_rule(text: str) -> str:
    try:
        if "/" in text:
            addr_part, _, plen = text.partition("/")
            if not plen.isdigit():
                raise ValueError("bad prefix")
            net = netaddr.IPNetwork(str(_address(addr_part)) + "/" + plen)
            if net.ip != net.network:
                raise InvalidArgument(
                    f"invalid CIDR {text!r}: host bits are set (did you mean {net.cidr}?)")
            full = 32 if net.version == 4 else 128
            if net.prefixlen == full:
                return _single(net.ip, text)
            _not_mapped(net.ip, text)
            return str(net.cidr)
        return _single(_address(text), text)
    except InvalidArgument:
        raise
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidArgument(f"invalid IP address or CIDR {text[:80]!r}") from None


def access_to(kind: str, value: str) -> str:
    if kind == "ip":
        return ip_rule(value)
    if kind == "user":
        if not isinstance(value, str) or not _USER_RE.fullmatch(value):
            raise InvalidArgument(f"invalid user name {value[:80]!r}: letters, digits, '_', '.', '@', '-'")
        return value
    if not isinstance(value, str) or not CN_RE.fullmatch(value):
        raise InvalidArgument(f"invalid certificate CN {value[:80]!r}: letters, digits, '.', '_', '@', '-' "
                              "(no commas, wildcards or spaces)")
    return value


def access_rule(kind: str, to: str, level: str) -> Tuple[str, str, str]:
    kind = access_type(kind)
    return kind, access_to(kind, to), access_level(level)


#: AllowAccess's options and their types
RULE_OPTIONS: Dict[str, type] = {"squash": str, "anonuid": int, "anongid": int}


def rule_squash(given: Dict[str, Any], nfs: bool, default: Tuple[str, int, int]
                ) -> Tuple[str, int, int]:
    """(squash, anonuid, anongid) of a new rule from AllowAccess's options
    over the backend's defaults; ("", default ids) where squash means nothing."""
    options(given, RULE_OPTIONS)
    if not nfs:
        if given:
            raise InvalidArgument(f"option {sorted(given)[0]!r} applies to NFS shares only")
        return "", C.DEFAULT_ANON_ID, C.DEFAULT_ANON_ID
    squash = given.get("squash", default[0])
    if squash not in C.SQUASH_MODES:
        raise InvalidArgument(f"invalid squash {str(squash)[:40]!r}: use one of "
                              f"{', '.join(C.SQUASH_MODES)}")
    ids = []
    for key, fallback in (("anonuid", default[1]), ("anongid", default[2])):
        value = given.get(key, fallback)
        if not 0 <= value <= C.MAX_ANON_ID:
            raise InvalidArgument(f"invalid {key} {value}: 0 to {C.MAX_ANON_ID}")
        ids.append(value)
    return squash, ids[0], ids[1]


def options(given: Dict[str, Any], allowed: Dict[str, type]) -> None:
    """A call's a{sv} options: known keys of the right type only."""
    for key, value in given.items():
        if key not in allowed:
            raise InvalidArgument(f"unknown option {key[:40]!r}"
                                  + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else
                                     " (this call takes none)"))
        want = allowed[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise InvalidArgument(f"option {key!r} has the wrong type")


def name_from_path(path: str) -> str:
    """A share name for ManageShare without a name option: the path's last element."""
    base = path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip("._-")
    return (clean or "managed")[:63]
