"""Every form the API accepts for an ip rule, for the round-trip tests of the
export helpers (what NFS-Ganesha's and exportfs's own parsers read back must
cover exactly the granted network)."""

from __future__ import annotations

import ipaddress
from typing import Dict, Iterable, List

# As callers write them; validation.ip_rule makes the canonical forms.
ACCEPTED_FORMS = ["10.71.0.11", "10.71.0.11/32", "10.71.0.0/24", "10.0.0.0/8", "10.71.0.128/25",
                  "192.168.1.0/30", "0.0.0.0/1", "0.0.0.0/0", "fd71::21", "fd71::21/128",
                  "fd71::/64", "fd00::/8", "fd71:0:0:1::/99", "2001:db8::/32", "::/0"]


def addresses(networks: Iterable[str]) -> Dict[int, List]:
    """The addresses networks cover, as collapsed networks per family."""
    nets = [ipaddress.ip_network(n, strict=True) for n in networks]
    return {v: sorted(ipaddress.collapse_addresses(n for n in nets if n.version == v))
            for v in (4, 6)}
