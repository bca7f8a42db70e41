"""Tenant networks for share-server tests, and the D-Bus steps they share.

`TenantLab(prefixes, tag)`: one Linux bridge per tenant in this host's
network namespace (no address, no uplink) and two client namespaces on each
(`<prefix>.51` and `.52`, a veth into the tenant's bridge, no route out).
Names carry a random tag; `close()` removes everything and may run twice.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any, Callable, Dict, List, Tuple

NET_IFACE = "org.sharedd.Sharedd1.ShareNetwork"
SERVER_PREFIX = "/org/sharedd/Sharedd1/share_server/"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def wait_for(what: str, fn: Callable[[], object], timeout: float = 60.0) -> object:
    """Poll fn until it returns something true; timeout is an upper bound
    for asynchronous work, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class TenantLab:
    def __init__(self, prefixes: Dict[str, str], tag_prefix: str):
        tag = uuid.uuid4().hex[:6]
        self.prefixes = prefixes
        self.bridges = {t: f"{tag_prefix}b{t}{tag}" for t in prefixes}
        self.clients: Dict[Tuple[str, int], str] = {}
        self.links: List[str] = []
        try:
            for br in self.bridges.values():
                ip("link", "add", br, "type", "bridge")
                self.links.append(br)
                ip("link", "set", br, "addrgenmode", "none")
                ip("link", "set", br, "up")
            for t, prefix in prefixes.items():
                for n in (1, 2):
                    ns, port = f"{tag_prefix}c{t}{n}-{tag}", f"{tag_prefix}{t}{n}{tag}"
                    ip("netns", "add", ns)
                    self.clients[(t, n)] = ns
                    ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                    self.links.append(port)
                    ip("link", "set", port, "master", self.bridges[t], "up")
                    ip("-n", ns, "addr", "add", f"{self.addr(t, n)}/24", "dev", "eth0")
                    ip("-n", ns, "link", "set", "eth0", "up")
                    ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def addr(self, tenant: str, n: int) -> str:
        return f"{self.prefixes[tenant]}.{50 + n}"

    def close(self) -> None:
        for ns in self.clients.values():
            ip("netns", "delete", ns, check=False)
        for link in self.links:
            ip("link", "delete", link, check=False)
        self.clients, self.links = {}, []


# ------------------------------------------------------------ the daemon's side
def network(h, lab: TenantLab, tenant: str, name: str) -> str:
    """A share network on the tenant's bridge, its range .10-.20: its path."""
    prefix = lab.prefixes[tenant]
    return h.manager("CreateShareNetwork", "sa{sv}", name, 3,
                     "bridge", "s", lab.bridges[tenant],
                     "subnet", "s", f"{prefix}.0/24",
                     "allocation_range", "s", f"{prefix}.10-{prefix}.20")


def server_of(h, share_path: str) -> Tuple[str, str]:
    """The share's server: (object path, id)."""
    path = h.share_prop(share_path, "ShareServer")
    assert path.startswith(SERVER_PREFIX), path
    return path, path.rsplit("/", 1)[1]


def object_paths(h, kind: str) -> List[str]:
    """Paths of every object of a kind ("share_server", "share_network")."""
    out = h.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1",
                       "org.freedesktop.DBus.ObjectManager", "GetManagedObjects").stdout
    return [p for p in json.loads(out)["data"][0] if f"/{kind}/" in p]


def server_entry(h, server: str) -> Dict[str, Any]:
    """The share server's properties as GetManagedObjects gives them."""
    out = h.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1",
                       "org.freedesktop.DBus.ObjectManager", "GetManagedObjects").stdout
    props = json.loads(out)["data"][0][server]["org.sharedd.Sharedd1.ShareServer"]
    return {k: v["data"] for k, v in props.items()}


def cleanup(h) -> None:
    """Every share deleted, the servers gone with them, the networks deleted."""
    for p in h.manager("ListShares", "a{sv}", 0):
        h.share(p, "Delete", "a{sv}", 0)
    wait_for("every server removed", lambda: not object_paths(h, "share_server"))
    for p in object_paths(h, "share_network"):
        h.call(p, NET_IFACE, "Delete", "a{sv}", 0)
