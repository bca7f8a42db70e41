"""Share networks and share servers: tenant isolation at the network level,
as Manila's Generic driver gives it with one service VM per share network.
No D-Bus here.

A share network is the administrator's description of a tenant's network:
where servers attach (an existing bridge, or a VLAN on a parent interface),
its subnet, gateway and the range sharedd may take addresses from. Networks
do not overlap and do not share an attachment, so two tenants never meet on
one layer-2 segment through sharedd.

A share server is one network's server on one backend (a backend with
driver_handles_share_servers): the driver's setup_server makes it (a network
namespace with its own export daemons, sharedd.service_instance) when the
first share of the network is created there, and teardown_server removes it
when its last share is gone (after share_server_idle_seconds). Set-up and
teardown are operations like any other: intent, hooks (setup_server,
delete_share_server), driver call, outcome; a crash in between is finished
or rolled back at the next start (recover), before any share is touched.

Concurrency: `serving` holds a network's slot on a backend while it finds
or sets up the server and counts the caller as a user until its share
exists, so a server is never torn down under a share being created on it;
teardown takes the same slot and re-checks that the server is empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
from typing import Any, AsyncIterator, Callable, Dict, List, Mapping, Optional, Tuple

from . import constants as C
from . import validation
from .backend import Backend
from .errors import (AlreadyExists, BackendFailure, InvalidArgument, InvalidState, NotFound,
                     NotSupported, SharedError)
from .models import ShareNetwork, ShareServer
from .operation import Operation, Runner, isolated
from .service_instance import NetworkInfo
from .store import Store, new_id
from .util import now_us

log = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------ network checks
def _network_of(text: Any) -> IpNetwork:
    try:
        net = ipaddress.ip_network(str(text).strip(), strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"subnet {str(text)[:80]!r} is not a network in CIDR form "
                              f"(10.80.0.0/24, fd80::/64): {exc}") from None
    limit = 30 if net.version == 4 else 126
    if net.prefixlen > limit:
        raise InvalidArgument(f"subnet {net} is too small for a server and a client "
                              f"(at most /{limit})")
    return net


def _address_in(text: Any, net: IpNetwork, what: str) -> IpAddress:
    try:
        addr = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise InvalidArgument(f"{what} {str(text)[:80]!r} is not an IP address") from None
    if addr not in net:
        raise InvalidArgument(f"{what} {addr} is outside the subnet {net}")
    if addr == net.network_address or (net.version == 4 and addr == net.broadcast_address):
        raise InvalidArgument(f"{what} {addr} is the subnet's network or broadcast address")
    return addr


def _addr(value: int, net: IpNetwork) -> IpAddress:
    """An address of net's family from its integer."""
    return ipaddress.IPv4Address(value) if net.version == 4 else ipaddress.IPv6Address(value)


def allocation_bounds(text: str, net: IpNetwork) -> Tuple[int, int]:
    """The first and last address (as integers) of an allocation range
    ("A-B" or a CIDR inside the subnet); the default, "", is every host
    address of the subnet."""
    text = (text or "").strip()
    low = int(net.network_address) + 1
    high = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    if not text:
        first, last = low, high
    elif "-" in text:
        a, _, b = text.partition("-")
        first = int(_address_in(a, net, "allocation_range start"))
        last = int(_address_in(b, net, "allocation_range end"))
    else:
        try:
            part = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"allocation_range {text[:80]!r}: use FIRST-LAST or a CIDR "
                                  f"inside the subnet: {exc}") from None
        inside = int(part.network_address) >= int(net.network_address) and \
            int(part.broadcast_address) <= int(net.broadcast_address)
        if part.version != net.version or not inside:
            raise InvalidArgument(f"allocation_range {part} is not inside the subnet {net}")
        first = max(int(part.network_address), low)
        last = min(int(part.broadcast_address), high)
    if first > last:
        raise InvalidArgument(f"allocation_range {text!r} is empty")
    return first, last


def _attachment(options: Dict[str, Any], check_bridge: Callable[[str], None],
                check_parent: Callable[[str], None]) -> Dict[str, Any]:
    if "bridge" in options and ("parent" in options or "vlan" in options):
        raise InvalidArgument("give either bridge, or parent and vlan, not both")
    if "bridge" in options:
        bridge = str(options["bridge"])
        check_bridge(bridge)
        return {"bridge": bridge}
    if "parent" in options and "vlan" in options:
        vlan = options["vlan"]
        if not isinstance(vlan, int) or isinstance(vlan, bool) or not 1 <= vlan <= 4094:
            raise InvalidArgument(f"vlan {vlan!r} must be a VLAN id 1-4094")
        parent = str(options["parent"])
        check_parent(parent)
        return {"parent": parent, "vlan": int(vlan)}
    raise InvalidArgument("a share network needs its attachment: bridge (an existing Linux "
                          "bridge), or parent (an interface) and vlan (1-4094)")


def describe(attachment: Dict[str, Any]) -> str:
    """The attachment as the API shows it: bridge:NAME or vlan:PARENT.ID."""
    if "bridge" in attachment:
        return f"bridge:{attachment['bridge']}"
    return f"vlan:{attachment.get('parent')}.{attachment.get('vlan')}"


NETWORK_OPTIONS = {"bridge": str, "parent": str, "vlan": int, "subnet": str, "gateway": str,
                   "allocation_range": str, "mtu": int}


class ShareServers:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 spawn: Callable[[Any], None],
                 check_bridge: Callable[[str], None], check_parent: Callable[[str], None]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self._spawn = spawn
        self._check_bridge = check_bridge
        self._check_parent = check_parent
        # server id -> callers creating a share on it right now
        self._users: Dict[str, int] = collections.Counter()

    # -------------------------------------------------------------- networks
    def network(self, network_id: str) -> ShareNetwork:
        n = self.store.get_network(validation.object_id(network_id, "share network id"))
        if n is None:
            raise NotFound(f"no share network with id {network_id[:80]}")
        return n

    def networks(self) -> List[ShareNetwork]:
        return self.store.networks()

    async def create_network(self, name: str, options: Dict[str, Any]) -> ShareNetwork:
        validation.options(options, NETWORK_OPTIONS)
        name = validation.name(name, "share network")
        if "subnet" not in options:
            raise InvalidArgument("a share network needs its subnet (CIDR)")
        net = _network_of(options["subnet"])
        gateway = ""
        if options.get("gateway"):
            gateway = str(_address_in(options["gateway"], net, "gateway"))
        first, last = allocation_bounds(options.get("allocation_range", ""), net)
        if gateway and first == last == int(ipaddress.ip_address(gateway)):
            raise InvalidArgument(f"allocation_range holds only the gateway {gateway}")
        mtu = options.get("mtu", 0)
        low = 1280 if net.version == 6 else 576
        if mtu and not low <= mtu <= 65535:
            raise InvalidArgument(f"mtu {mtu} must be {low}-65535 (0: the link's)")
        attachment = _attachment(options, self._check_bridge, self._check_parent)
        if self.store.find_network(name) is not None:
            raise AlreadyExists(f"a share network named {name!r} exists already")
        for other in self.store.networks():
            if other.attachment == attachment:
                raise InvalidArgument(f"{describe(attachment)} already carries share network "
                                      f"{other.name}: tenants must not share a segment")
            theirs = ipaddress.ip_network(other.subnet)
            if theirs.version == net.version and theirs.overlaps(net):
                raise InvalidArgument(f"subnet {net} overlaps {theirs} of share network "
                                      f"{other.name}")
        network = ShareNetwork(id=new_id(), name=name, subnet=str(net), attachment=attachment,
                               allocation_range=f"{_addr(first, net)}-{_addr(last, net)}",
                               gateway=gateway,
                               mtu=int(mtu), created_at=now_us())
        async with self.runner.durably() as tx:
            tx.add_network(network)
        log.info("share network %s (%s) created: %s on %s", name, network.id, net,
                 describe(attachment))
        return network

    async def delete_network(self, network_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        network = self.network(network_id)
        servers = self.store.servers(network_id=network.id)
        if servers:
            raise InvalidState(f"share network {network.name} has {len(servers)} share "
                               "server(s); delete its shares first")
        async with self.runner.durably() as tx:
            tx.remove_network(network)

    # --------------------------------------------------------------- servers
    def server(self, server_id: str) -> ShareServer:
        s = self.store.get_server(validation.object_id(server_id, "share server id"))
        if s is None:
            raise NotFound(f"no share server with id {server_id[:80]}")
        return s

    def servers(self, network_id: Optional[str] = None) -> List[ShareServer]:
        return self.store.servers(network_id=network_id)

    def server_share_ids(self, server_id: str) -> List[str]:
        return self.store.share_ids(share_server_id=server_id)

    def network_info(self, server: ShareServer) -> NetworkInfo:
        network = self.store.get_network(server.network_id)
        if network is None:   # the foreign key forbids it; a bug if seen
            raise BackendFailure(f"share server {server.id} has no share network")
        return self.network_info_for(server, network)

    def _free_address(self, network: ShareNetwork) -> str:
        """The lowest address of the range no server of the network holds."""
        net = ipaddress.ip_network(network.subnet)
        first, last = allocation_bounds(network.allocation_range, net)
        taken = {int(ipaddress.ip_address(a))
                 for s in self.store.servers(network_id=network.id) for a in s.addresses}
        if network.gateway:
            taken.add(int(ipaddress.ip_address(network.gateway)))
        for addr in range(first, min(last, first + C.MAX_ALLOCATION_RANGE) + 1):
            if addr not in taken:
                return str(_addr(addr, net))
        raise InvalidState(f"share network {network.name}: no free address left in "
                           f"{network.allocation_range}")

    @staticmethod
    def _slot(network_id: str, backend: str) -> str:
        return f"netslot:{network_id}:{backend}"

    @contextlib.asynccontextmanager
    async def serving(self, b: Backend, network: ShareNetwork) -> AsyncIterator[ShareServer]:
        """The active server of network on b, set up if there is none; it is
        not torn down while the caller (creating a share on it) runs."""
        b.require("share_server_support", "handle share servers")
        async with self.runner.locked([self._slot(network.id, b.name)]):
            found = [s for s in self.store.servers(network_id=network.id, backend=b.name)
                     if s.status in (C.SERVER_ACTIVE, C.STATUS_ERROR)]
            if found and found[0].status == C.STATUS_ERROR and not self._busy(found[0].id):
                # A failed server nothing uses: replaced, not left in the way.
                await self._teardown(b, found[0])
                found = []
            server = found[0] if found else await self._setup(b, network)
            if server.status != C.SERVER_ACTIVE:
                raise InvalidState(f"share server {server.id} of network {network.name} is "
                                   f"{server.status}; see the log, or delete its shares")
            self._users[server.id] += 1
        try:
            yield server
        finally:
            self._users[server.id] -= 1
            if not self._users[server.id]:
                del self._users[server.id]
            self.released(server.id)

    async def _setup(self, b: Backend, network: ShareNetwork) -> ShareServer:
        server = ShareServer(id=new_id(), network_id=network.id, backend=b.name,
                             status=C.STATUS_CREATING, addresses=[self._free_address(network)],
                             created_at=now_us())
        info = self.network_info_for(server, network)

        async def plan() -> Operation:
            return Operation(
                "setup_server", b, server=server,
                intent=lambda tx: tx.add_server(server, task={"op": "setup_server"}),
                call=lambda: b.call("setup_server", server, info),
                done=lambda tx, details: tx.server(server, C.SERVER_ACTIVE,
                                                   details=dict(details or {})),
                compensate=lambda: b.call("teardown_server", server),
                failed=lambda tx, undone: tx.remove_server(server) if undone
                else tx.server(server, C.STATUS_ERROR),
                undo=lambda tx: tx.remove_server(server))
        await self.runner.run([f"server:{server.id}"], plan)
        log.info("share server %s of network %s on backend %s is active at %s", server.id,
                 network.name, b.name, server.addresses[0])
        return server

    @staticmethod
    def network_info_for(server: ShareServer, network: ShareNetwork) -> NetworkInfo:
        prefix = ipaddress.ip_network(network.subnet).prefixlen
        return NetworkInfo(server_id=server.id, attachment=dict(network.attachment),
                           address=f"{server.addresses[0]}/{prefix}",
                           gateway=network.gateway, mtu=network.mtu)

    def released(self, server_id: Optional[str]) -> None:
        """A share of server_id is gone (or was never made): tear the server
        down once it is empty and has been idle for share_server_idle_seconds."""
        if not server_id:
            return
        server = self.store.get_server(server_id)
        b = self.backends.get(server.backend) if server else None
        if server is None or b is None or self._busy(server_id):
            return
        self._spawn(self._teardown_when_idle(b, server_id,
                                             float(b.config.share_server_idle_seconds)))

    def _busy(self, server_id: str) -> bool:
        return bool(self._users.get(server_id)) or self.store.count_server_shares(server_id) > 0

    async def _teardown_when_idle(self, b: Backend, server_id: str, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await self.delete_server(server_id, {}, only_if_idle=True)
        except SharedError as exc:
            log.error("share server %s: teardown failed: %s", server_id, exc)

    async def delete_server(self, server_id: str, options: Dict[str, Any],
                            only_if_idle: bool = False) -> None:
        """Tear a server down: only when no share uses it (ShareServer.Delete)."""
        validation.options(options, {})
        server = self.server(server_id)
        b = self.backends.get(server.backend)
        if b is None:
            raise NotSupported(f"share server {server.id} is on backend {server.backend}, "
                               "which is not enabled")
        async with self.runner.locked([self._slot(server.network_id, server.backend)]):
            if self.store.get_server(server.id) is None:
                return   # gone meanwhile
            if self._busy(server.id):
                if only_if_idle:
                    return
                raise InvalidState(f"share server {server.id} still serves "
                                   f"{self.store.count_server_shares(server.id)} share(s)")
            await self._teardown(b.usable(), server)

    async def _teardown(self, b: Backend, server: ShareServer) -> None:
        previous = server.status

        async def plan() -> Operation:
            return Operation(
                "delete_share_server", b, server=server, unblockable=True,
                intent=lambda tx: tx.server(server, C.STATUS_DELETING,
                                            task={"op": "delete_share_server",
                                                  "previous": previous}),
                call=lambda: b.call("teardown_server", server),
                done=lambda tx, _: tx.remove_server(server),
                failed=lambda tx, _: tx.server(server, C.STATUS_ERROR))
        await self.runner.run([f"server:{server.id}"], plan)
        self.runner.forget_lock(f"server:{server.id}")
        log.info("share server %s of backend %s removed", server.id, b.name)

    # -------------------------------------------------------------- recovery
    async def recover(self, backend: Optional[str] = None) -> None:
        """Before shares are recovered or ensured: finish or roll back servers
        caught in set-up or teardown, bring every other server back (namespace
        and daemons), and remove what no server owns any more."""
        for server in self.store.servers(backend=backend):
            b = self.backends.get(server.backend)
            if b is None or b.setup_error:
                continue
            await isolated(f"share server {server.id}", self._recover(b, server),
                           step="recovery",
                           to_error=functools.partial(self._server_error, server))

    async def _server_error(self, server: ShareServer) -> None:
        if self.store.get_server(server.id) is not None:
            async with self.runner.durably() as tx:
                tx.server(server, C.STATUS_ERROR)

    async def _recover(self, b: Backend, server: ShareServer) -> None:
        if server.status == C.STATUS_CREATING and not self.store.count_server_shares(server.id):
            log.info("recovery: share server %s was being set up: removing it", server.id)
            await b.call("teardown_server", server)
            async with self.runner.durably() as tx:
                tx.remove_server(server)
            return
        if server.status == C.STATUS_DELETING:
            log.info("recovery: share server %s was being removed: finishing", server.id)
            await b.call("teardown_server", server)
            async with self.runner.durably() as tx:
                tx.remove_server(server)
            return
        details = await b.call("ensure_server", server, self.network_info(server))
        async with self.runner.durably() as tx:
            tx.server(server, C.SERVER_ACTIVE, details=dict(details or server.details))
        if not self.store.count_server_shares(server.id):
            self.released(server.id)

    def orphans(self, known: List[str]) -> List[str]:
        """Server ids something is left of (namespace, files, processes) that
        the store does not know."""
        return sorted(set(known) - {s.id for s in self.store.servers()})
