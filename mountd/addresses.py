"""This host's IPv4/IPv6 addresses over netlink (pyroute2), and a thread that
follows RTM_NEWADDR/RTM_DELADDR events.

Loopback addresses (127.0.0.0/8, ::1) are every host's: they identify this
host in access rules only where the configuration says so (match_loopback),
else a rule for 127.0.0.1 would make every client mount the share.

Only usable addresses count: an IPv6 address still in duplicate address
detection (tentative) or that failed it belongs to this host only perhaps,
or to another one; the kernel announces the end of DAD with another
RTM_NEWADDR, and the monitor reads the addresses again then."""

from __future__ import annotations

import ipaddress
import logging
import select
import threading
from typing import Callable, Optional, Sequence, Tuple

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

log = logging.getLogger(__name__)

# linux/if_addr.h
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def _attr(msg, name: str):
    return msg.get_attr(name) if hasattr(msg, "get_attr") else dict(msg["attrs"]).get(name)


def _link_names(ipr: IPRoute) -> dict:
    return {link["index"]: _attr(link, "IFLA_IFNAME") for link in ipr.get_links()}


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def address_flags(msg) -> int:
    """The address flags: IFA_FLAGS holds all 32 bits, the header's field
    only the low 8 (kernels before 3.14 send no IFA_FLAGS)."""
    flags = _attr(msg, "IFA_FLAGS")
    return int(flags) if flags is not None else int(msg["flags"])


def usable(flags: int) -> bool:
    """Neither tentative nor DAD-failed. Optimistic DAD (RFC 4429) lets the
    kernel use a tentative address already, but until DAD ends it may be
    another host's: it does not identify this one yet."""
    return not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)


def read_addresses(interfaces: Sequence[str] = (), ipr: Optional[IPRoute] = None,
                   loopback: bool = False) -> Tuple[str, ...]:
    """Sorted usable addresses of every interface (or only of `interfaces`),
    without loopback addresses unless asked for."""
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        names = _link_names(ipr) if interfaces else {}
        out = set()
        for msg in ipr.get_addr():
            if interfaces and names.get(msg["index"]) not in interfaces:
                continue
            if not usable(address_flags(msg)):
                continue
            addr = _attr(msg, "IFA_LOCAL") or _attr(msg, "IFA_ADDRESS")
            if addr and (loopback or not is_loopback(addr)):
                out.add(addr)
        return tuple(sorted(out))
    finally:
        if own:
            ipr.close()


class AddressMonitor:
    """Calls on_change(addresses) from its own thread when the set changes.

    With fixed `expected` addresses there is nothing to follow: addresses()
    returns them and no thread runs.
    """

    def __init__(self, on_change: Callable[[Tuple[str, ...]], None],
                 interfaces: Sequence[str] = (), expected: Sequence[str] = (),
                 loopback: bool = False):
        self.on_change = on_change
        self.interfaces = tuple(interfaces)
        self.expected = tuple(sorted(expected))
        self.loopback = loopback
        self._current = self.expected or read_addresses(self.interfaces, loopback=loopback)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def addresses(self) -> Tuple[str, ...]:
        return self._current

    def start(self) -> None:
        if self.expected or self._thread is not None:
            return
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mountd-netlink", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        events = IPRoute()
        try:
            events.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK)
            # Re-read after subscribing so no change between the two is lost.
            self._update()
            self._ready.set()
            while not self._stop.is_set():
                ready, _, _ = select.select([events.fileno()], [], [], 0.5)
                if not ready:
                    continue
                interesting = False
                for msg in events.get():
                    if msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWLINK",
                                            "RTM_DELLINK"):
                        interesting = True
                if interesting:
                    self._update()
        except Exception:
            log.exception("netlink address monitor stopped")
        finally:
            self._ready.set()
            events.close()

    def _update(self) -> None:
        try:
            new = read_addresses(self.interfaces, loopback=self.loopback)
        except Exception as exc:
            log.error("cannot read interface addresses: %s", exc)
            return
        if new != self._current:
            log.info("host addresses changed: %s", ", ".join(new) or "(none)")
            self._current = new
            try:
                self.on_change(new)
            except Exception:
                log.exception("address change callback failed")
