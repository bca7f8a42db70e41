"""Network plumbing of share servers: one Linux network namespace each.

A share server lives in the namespace ``sharedd-<server id>`` (the file
/run/netns/sharedd-<id>, made and removed with iproute2's ``ip netns``, so
``ip -n`` and ``nsenter --net`` reach it). Inside, its one interface is
always ``eth0``, carrying the server's one address:

- bridge attachment: a veth pair made in one call with its inner end born
  inside the namespace (``peer name eth0 netns NS``): no moment where the
  inner end sits in the host under a name that could clash. The host end,
  ``sdh`` + the first 12 hex digits of the id (the kernel allows 15
  characters), is enslaved to the tenant's bridge.
- VLAN attachment: a VLAN interface on the parent made directly inside the
  namespace (``ip link add link PARENT name eth0 netns NS type vlan``): the
  parent is looked up in the host, the new device is registered in the
  namespace, so nothing of ours ever sits outside. (The project's build
  machines' kernel lacks 802.1Q: there the refusal names the missing 8021q
  module; tests/test_share_servers_vlan.py runs the whole path in a qemu
  guest.)

Everything is idempotent: ``create`` finishes whatever a crash left half
made (a namespace file not mounted, a namespace without eth0, a host veth
whose peer died with an old namespace) and converges addresses, MTU and
route; ``destroy`` removes what is there. Both touch only names built from
a validated server id (32 lowercase hex digits), never anything else.

Kernel facts that shaped this: a namespace stays alive while any process
or open file holds it, with its interfaces, even after ``ip netns delete``;
so ``destroy`` deletes the host veth and the inner eth0 explicitly before
the namespace, and a tenant's bridge never keeps a port of a server that is
gone. IPv6 addresses are added with ``nodad`` (usable at once; sharedd
allocates them, so there is nothing to detect), and router advertisements
are ignored inside the namespace: a server's addresses are sharedd's alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from typing import Any, Dict, Optional, Set, Tuple

from .errors import BackendFailure, InvalidArgument
from .util import run

NETNS_DIR = "/run/netns"
PREFIX = "sharedd-"
HOST_PREFIX = "sdh"
INNER_IFNAME = "eth0"
#: seconds for one ip(8) command (netlink calls take milliseconds; a stuck
#: rtnl lock is the only way to get near this)
IP_TIMEOUT = 30.0

_ID_RE = re.compile(r"[0-9a-f]{32}")
_NETNS_RE = re.compile(re.escape(PREFIX) + r"([0-9a-f]{32})")
_IFNAME_MAX = 15          # IFNAMSIZ - 1


# ------------------------------------------------------------------ names
def check_server_id(server_id: Any) -> str:
    if not isinstance(server_id, str) or not _ID_RE.fullmatch(server_id):
        raise InvalidArgument(f"share server id {str(server_id)[:80]!r} is not 32 lowercase "
                              "hex digits")
    return server_id


def netns_name(server_id: str) -> str:
    return PREFIX + check_server_id(server_id)


def netns_path(server_id: str) -> str:
    return os.path.join(NETNS_DIR, netns_name(server_id))


def host_ifname(server_id: str) -> str:
    return HOST_PREFIX + check_server_id(server_id)[:12]


def valid_ifname(name: Any) -> str:
    """name if the kernel would accept it as an interface name."""
    if (not isinstance(name, str) or not 1 <= len(name) <= _IFNAME_MAX or name in (".", "..")
            or "/" in name or ":" in name or any(c.isspace() for c in name)
            or not name.isprintable()):
        raise InvalidArgument(f"{str(name)[:80]!r} is not a valid interface name (1-15 "
                              "printable characters, no '/', ':' or white space, not '.' "
                              "or '..')")
    return name


def check_bridge(name: Any) -> None:
    """An existing Linux bridge in sharedd's network namespace."""
    valid_ifname(name)
    if not os.path.exists(f"/sys/class/net/{name}"):
        raise InvalidArgument(f"no network interface {name!r} on this host (the share "
                              "network's bridge must exist before servers attach to it)")
    if not os.path.isdir(f"/sys/class/net/{name}/bridge"):
        raise InvalidArgument(f"interface {name!r} is not a Linux bridge")


def check_parent(name: Any) -> None:
    """An existing interface that VLAN interfaces can be stacked on."""
    valid_ifname(name)
    if not os.path.exists(f"/sys/class/net/{name}"):
        raise InvalidArgument(f"no network interface {name!r} on this host (the VLAN "
                              "parent must exist)")
    if name == "lo":
        raise InvalidArgument("the loopback interface cannot carry VLANs")


def check_vlan(vlan: Any) -> int:
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 1 <= vlan <= 4094:
        raise InvalidArgument(f"vlan {str(vlan)[:20]!r} must be a VLAN id 1-4094")
    return vlan


IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_address(address: Any) -> IpInterface:
    """A host address with its prefix length ("10.80.0.10/24", "fd80::10/64")."""
    text = str(address).strip()
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        iface = None
    if iface is None or "/" not in text:
        raise InvalidArgument(f"address {text[:80]!r} must be an IP address with its prefix "
                              "length (10.80.0.10/24, fd80::10/64)")
    net = iface.network
    if iface.ip == net.network_address and net.num_addresses > 2:
        raise InvalidArgument(f"address {text} is its subnet's network address")
    if iface.version == 4 and iface.ip == net.broadcast_address and net.num_addresses > 2:
        raise InvalidArgument(f"address {text} is its subnet's broadcast address")
    if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified \
            or iface.ip.is_link_local:
        raise InvalidArgument(f"address {text} cannot be a server's address")
    return iface


def _check_gateway(gateway: str, iface: IpInterface) -> str:
    if not gateway:
        return ""
    try:
        gw = ipaddress.ip_address(str(gateway).strip())
    except ValueError:
        raise InvalidArgument(f"gateway {str(gateway)[:80]!r} is not an IP address") from None
    if gw.version != iface.version:
        raise InvalidArgument(f"gateway {gw} and address {iface} are of different IP versions")
    if gw == iface.ip:
        raise InvalidArgument(f"gateway {gw} is the server's own address")
    return str(gw)


def _check_mtu(mtu: Any, version: int) -> int:
    low = 1280 if version == 6 else 68
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not (mtu == 0 or low <= mtu <= 65535):
        raise InvalidArgument(f"mtu {str(mtu)[:20]!r} must be 0 (the interface's default) or "
                              f"{low}-65535")
    return mtu


def check_attachment(attachment: Any) -> Dict[str, Any]:
    """{"bridge": NAME} or {"parent": NAME, "vlan": ID}, checked against this host."""
    if not isinstance(attachment, dict):
        raise InvalidArgument("attachment must be {'bridge': NAME} or {'parent': NAME, "
                              "'vlan': ID}")
    keys = set(attachment)
    if keys == {"bridge"}:
        check_bridge(attachment["bridge"])
        return {"bridge": attachment["bridge"]}
    if keys == {"parent", "vlan"}:
        check_parent(attachment["parent"])
        return {"parent": attachment["parent"], "vlan": check_vlan(attachment["vlan"])}
    raise InvalidArgument(f"attachment {sorted(keys)} must be either bridge, or parent "
                          "and vlan")


# ------------------------------------------------------------------ helpers
def _ip(*args: str, ns: str = "", check: bool = True) -> Any:
    """ip(8), in namespace ns if given.

    Entered with nsenter --net, not ip -n: ip -n also unshares a mount
    namespace (to remount /sys), which sharedd.service's
    RestrictNamespaces=net forbids; netlink needs only the network one.
    """
    argv = ["ip", *args]
    if ns:
        argv = ["nsenter", f"--net={os.path.join(NETNS_DIR, ns)}", "--", *argv]
    return run(argv, timeout=IP_TIMEOUT, check=check)


def _link(name: str, ns: str = "") -> Optional[Dict[str, Any]]:
    """The interface's details (ip -j -d link show), or None if it does not exist."""
    proc = _ip("-j", "-d", "link", "show", "dev", name, ns=ns, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        if "does not exist" in err or "Cannot find device" in err:
            return None
        raise BackendFailure(f"ip link show {name} failed: {err.strip()[-300:]}")
    links = json.loads(proc.stdout or b"[]")
    return links[0] if links else None


def _kind(link: Dict[str, Any]) -> str:
    return str(link.get("linkinfo", {}).get("info_kind", ""))


def _is_netns_mount(path: str) -> bool:
    """A bind mount of a network namespace (not the empty file a crash
    between ip netns add's create and mount leaves): nsfs files all live
    on one device, the one /proc/self/ns/net is on."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ lifecycle
def exists(server_id: str) -> bool:
    return os.path.lexists(netns_path(server_id))


def list_servers() -> Set[str]:
    """Ids of every sharedd-<id> namespace on this host (live or orphaned)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return set()
    return {m.group(1) for m in map(_NETNS_RE.fullmatch, names) if m}


def _ensure_netns(server_id: str) -> None:
    name, path = netns_name(server_id), netns_path(server_id)
    if _is_netns_mount(path):
        return
    if os.path.lexists(path):
        # Half made: a file that is not a namespace. ip netns delete unmounts
        # (a no-op here) and unlinks it.
        _ip("netns", "delete", name, check=False)
    # A host veth outliving its namespace (held open by a process when the
    # namespace file went away) would block the new pair's name.
    if _link(host_ifname(server_id)) is not None:
        _ip("link", "delete", "dev", host_ifname(server_id), check=False)
    _ip("netns", "add", name)


def check(server_id: str, attachment: Dict[str, Any], address: str, gateway: str = "",
          mtu: int = 0) -> Tuple[Dict[str, Any], IpInterface, str, int]:
    """Everything create() takes, checked (InvalidArgument) before anything is made."""
    check_server_id(server_id)
    iface = parse_address(address)
    return (check_attachment(attachment), iface, _check_gateway(gateway, iface),
            _check_mtu(mtu, iface.version))


def create(server_id: str, attachment: Dict[str, Any], address: str, gateway: str = "",
           mtu: int = 0) -> Dict[str, Any]:
    """Make (or finish making) the server's namespace and its eth0; idempotent."""
    attachment, iface, gateway, mtu = check(server_id, attachment, address, gateway, mtu)
    ns, path = netns_name(server_id), netns_path(server_id)
    host = host_ifname(server_id)

    # Host names keep 12 of the id's 32 digits (48 random bits): refuse the
    # improbable twin rather than take another server's interface.
    twins = [o for o in list_servers() if o != server_id and o[:12] == server_id[:12]]
    if twins:
        raise BackendFailure(f"share server {server_id} would share the host interface "
                             f"name {host} with server {twins[0]}")
    _ensure_netns(server_id)
    _ip("link", "set", "lo", "up", ns=ns)
    # Before eth0 exists, so that it inherits the defaults: no router
    # advertisement or autoconfigured address from the tenant network; and
    # announce the address when eth0 comes up (gratuitous ARP, unsolicited
    # NA): a server made again at an address another one had (the range's
    # first free address) is reachable at once, not after clients' stale
    # neighbour entries time out. (sysctl writes under /proc/sys/net act on
    # the writer's namespace.)
    run(["nsenter", f"--net={path}", "--", "sysctl", "-q", "-e", "-w",
         "net.ipv6.conf.default.accept_ra=0", "net.ipv6.conf.all.accept_ra=0",
         "net.ipv6.conf.default.autoconf=0", "net.ipv6.conf.all.autoconf=0",
         "net.ipv4.conf.default.arp_notify=1", "net.ipv4.conf.all.arp_notify=1",
         "net.ipv6.conf.default.ndisc_notify=1", "net.ipv6.conf.all.ndisc_notify=1"],
        timeout=IP_TIMEOUT)

    inner = _link(INNER_IFNAME, ns)
    if "bridge" in attachment:
        outer = _link(host)
        if inner is None or _kind(inner) != "veth" or outer is None or _kind(outer) != "veth":
            if inner is not None:
                _ip("link", "delete", "dev", INNER_IFNAME, ns=ns, check=False)
            if outer is not None:
                _ip("link", "delete", "dev", host, check=False)
            _ip("link", "add", host, "type", "veth", "peer", "name", INNER_IFNAME, "netns", ns)
        # A bridge port needs no address of its own: no IPv6 link-local,
        # which would announce the host (DAD, MLD) on the tenant network.
        _ip("link", "set", "dev", host, "addrgenmode", "none", check=False)
        _ip("link", "set", "dev", host, "master", attachment["bridge"])
        if mtu:
            _ip("link", "set", "dev", host, "mtu", str(mtu))
        _ip("link", "set", "dev", host, "up")
        host_name = host
    else:
        data = (inner or {}).get("linkinfo", {}).get("info_data", {})
        if inner is None or _kind(inner) != "vlan" or data.get("id") != attachment["vlan"]:
            if inner is not None:
                _ip("link", "delete", "dev", INNER_IFNAME, ns=ns, check=False)
            if _link(host) is not None:         # from an earlier bridge attachment
                _ip("link", "delete", "dev", host, check=False)
            proc = _ip("link", "add", "link", attachment["parent"], "name", INNER_IFNAME,
                       "netns", ns, "type", "vlan", "id", str(attachment["vlan"]),
                       check=False)
            if proc.returncode != 0:
                err = proc.stderr.decode(errors="replace").strip()
                if "Unknown device type" in err:
                    raise BackendFailure("this kernel has no 802.1Q VLAN support (module "
                                         "8021q): cannot attach to VLAN "
                                         f"{attachment['parent']}.{attachment['vlan']}")
                raise BackendFailure(f"cannot make VLAN {attachment['vlan']} on "
                                     f"{attachment['parent']}: {err[-300:]}")
        host_name = ""

    if mtu:
        _ip("link", "set", "dev", INNER_IFNAME, "mtu", str(mtu), ns=ns)
    # The MAC follows the address: a server made again at an address an
    # earlier one had keeps its MAC, so clients' neighbour entries stay
    # right (a gratuitous ARP at link-up is lost while the bridge port is
    # still coming up: measured, clients then kept the old MAC for minutes).
    _ip("link", "set", "dev", INNER_IFNAME, "address", mac_for(iface), ns=ns)
    _converge_address(ns, iface)
    _ip("link", "set", "dev", INNER_IFNAME, "up", ns=ns)
    family = "-6" if iface.version == 6 else "-4"
    if gateway:
        _ip(family, "route", "replace", "default", "via", gateway, "dev", INNER_IFNAME, ns=ns)
    else:
        _ip(family, "route", "delete", "default", ns=ns, check=False)
    return {"netns": ns, "netns_path": path, "host_ifname": host_name,
            "ifname": INNER_IFNAME, "address": str(iface.ip), "cidr": str(iface),
            "gateway": gateway, "mtu": mtu}


def mac_for(iface: IpInterface) -> str:
    """A locally administered unicast MAC derived from the address."""
    digest = hashlib.sha256(f"sharedd-share-server:{iface.ip}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02,) + tuple(digest[:5]))


def _converge_address(ns: str, iface: IpInterface) -> None:
    """eth0 carries exactly this global address (an older one is removed)."""
    proc = _ip("-j", "addr", "show", "dev", INNER_IFNAME, ns=ns)
    for link in json.loads(proc.stdout or b"[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") != "global":
                continue
            if a.get("local") == str(iface.ip) and a.get("prefixlen") == iface.network.prefixlen:
                continue
            _ip("addr", "delete", f"{a.get('local')}/{a.get('prefixlen')}", "dev",
                INNER_IFNAME, ns=ns, check=False)
    extra = ["nodad"] if iface.version == 6 else []
    _ip("addr", "replace", str(iface), "dev", INNER_IFNAME, *extra, ns=ns)


def destroy(server_id: str) -> None:
    """Remove the server's interfaces and namespace; no error if already gone."""
    ns, path = netns_name(server_id), netns_path(server_id)
    host = host_ifname(server_id)
    if _link(host) is not None:
        _ip("link", "delete", "dev", host, check=False)
    if os.path.lexists(path):
        if _is_netns_mount(path):
            # The namespace may outlive its file (a process still in it):
            # its address must leave the tenant network now, not then.
            _ip("link", "delete", "dev", INNER_IFNAME, ns=ns, check=False)
        _ip("netns", "delete", ns, check=False)
    if os.path.lexists(path) or _link(host) is not None:
        raise BackendFailure(f"could not remove network namespace {ns} or its interface "
                             f"{host}")
