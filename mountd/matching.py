"""Which access level this host gets on a share (pure functions).

Only rules in state `active` grant access. `ip` rules match one of the
host's addresses (single address or CIDR, IPv4 or IPv6); `cert` rules match
the CN of the host's client certificate; `user` rules concern CIFS logins
and never match here. Several matches: rw wins.
"""

from __future__ import annotations

import logging
import re
import subprocess
from typing import Iterable, Optional, Sequence

import netaddr

from sharedd.constants import RULE_ACTIVE

log = logging.getLogger(__name__)


def parse_addresses(addresses: Iterable[str]) -> list:
    out = []
    for a in addresses:
        try:
            out.append(netaddr.IPAddress(str(a).split("%")[0]))
        except (netaddr.AddrFormatError, ValueError):
            log.warning("ignoring invalid host address %r", a)
    return out


def _network(access_to: str) -> Optional[netaddr.IPNetwork]:
    try:
        return netaddr.IPNetwork(access_to.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None


def rule_matches(rule: dict, addresses: Sequence[netaddr.IPAddress],
                 cert_cn: Optional[str]) -> bool:
    if rule.get("state") != RULE_ACTIVE:
        return False
    kind = rule.get("access_type")
    to = rule.get("access_to", "")
    if kind == "ip":
        net = _network(to)
        if net is None:
            return False
        return any(addr.version == net.version and addr in net for addr in addresses)
    if kind == "cert":
        return bool(cert_cn) and to == cert_cn
    return False


def access_level(rules: Iterable[dict], addresses: Sequence[netaddr.IPAddress],
                 cert_cn: Optional[str]) -> Optional[str]:
    """'rw', 'ro' or None for this host under rules."""
    level = None
    for rule in rules:
        if rule_matches(rule, addresses, cert_cn):
            if rule.get("access_level") == "rw":
                return "rw"
            level = "ro"
    return level


_CN_RE = re.compile(r"(?:^|,)CN=((?:\\.|[^,\\])*)")


def certificate_cn(pem_path: str, timeout: float = 10.0) -> Optional[str]:
    """The subject CN of a PEM certificate (None if unreadable or absent)."""
    try:
        proc = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253",
                               "-in", pem_path], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("cannot read certificate %s: %s", pem_path, exc)
        return None
    if proc.returncode != 0:
        log.error("cannot read certificate %s: %s", pem_path, proc.stderr.strip()[-300:])
        return None
    subject = proc.stdout.strip()
    if subject.startswith("subject="):
        subject = subject[len("subject="):]
    return subject_cn(subject)


def subject_cn(subject: str) -> Optional[str]:
    """CN from an RFC 2253 subject string (most specific RDN comes first)."""
    m = _CN_RE.search(subject.strip())
    if not m:
        return None
    return re.sub(r"\\(.)", r"\1", m.group(1))
