"""mountd.addresses over real netlink: a probe inside a network namespace we
create sees address additions and removals on a veth interface."""

import json
import os
import pathlib
import selectors
import subprocess
import time
import uuid

import pytest

from pyroute2 import NetNS

from mountd.addresses import AddressMonitor, address_flags, read_addresses, usable
from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, threading
from mountd.addresses import AddressMonitor, read_addresses
iface = sys.argv[1]
def changed(addrs):
    print(json.dumps({"event": list(addrs)}), flush=True)
mon = AddressMonitor(changed, interfaces=[iface])
mon.start()
print(json.dumps({"ready": list(mon.addresses()), "all": list(read_addresses(loopback=True)),
                  "identity": list(read_addresses())}), flush=True)
sys.stdin.read()      # until the test closes stdin
mon.stop()
"""


def nonlocal_(addrs):
    """Without the kernel's automatic IPv6 link-local addresses."""
    return [a for a in addrs if not a.startswith("fe80:")]


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    name = f"mountd74-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        # This kernel has no dummy driver; a veth pair inside the namespace
        # serves as two local interfaces.
        _ip("-n", name, "link", "add", "dum74", "type", "veth", "peer", "name", "other74")
        _ip("-n", name, "link", "set", "dum74", "up")
        _ip("-n", name, "link", "set", "other74", "up")
        components.used("network namespace + veth pair (netlink)")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


class Probe:
    def __init__(self, ns, iface):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/bin/python3", "-c", PROBE, iface],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def line(self, timeout=10.0):
        if not self.sel.select(timeout):
            raise AssertionError("probe printed nothing in time")
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"probe ended: {self.proc.stderr.read()}")
        return json.loads(text)

    def wait_for(self, pred, timeout=10.0):
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            msg = self.line(max(0.1, deadline - time.monotonic()))
            seen.append(msg)
            if pred(msg.get("event", [])):
                return msg["event"]
        raise AssertionError(f"no matching event; saw {seen}")

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_probe_sees_address_add_and_remove(netns):
    probe = Probe(netns, "dum74")
    try:
        first = probe.line()
        assert nonlocal_(first["ready"]) == []
        assert "127.0.0.1" in first["all"] and "127.0.0.1" not in first["identity"]
        _ip("-n", netns, "addr", "add", "10.74.0.21/24", "dev", "dum74")
        assert nonlocal_(probe.wait_for(lambda a: "10.74.0.21" in a)) == ["10.74.0.21"]
        _ip("-n", netns, "addr", "add", "fd74::21/64", "dev", "dum74", "nodad")
        assert "fd74::21" in probe.wait_for(lambda a: "fd74::21" in a)
        # An address on an interface outside the filter changes nothing visible.
        _ip("-n", netns, "addr", "add", "10.74.0.99/24", "dev", "other74")
        _ip("-n", netns, "addr", "del", "10.74.0.21/24", "dev", "dum74")
        event = probe.wait_for(lambda a: "10.74.0.21" not in a)
        assert "10.74.0.99" not in event and "fd74::21" in event
    finally:
        probe.close()


def test_expected_addresses_override_netlink():
    mon = AddressMonitor(lambda a: None, expected=["fd74::5", "10.74.0.5"])
    mon.start()
    assert mon.addresses() == ("10.74.0.5", "fd74::5")
    assert mon._thread is None
    mon.stop()


def test_read_addresses_on_this_host():
    """Loopback is every host's address: it identifies this one only when asked."""
    assert "127.0.0.1" not in read_addresses() and "::1" not in read_addresses()
    assert read_addresses(["lo"]) == ()
    assert "127.0.0.1" in read_addresses(loopback=True)
    lo = read_addresses(["lo"], loopback=True)
    assert lo and all(a in ("127.0.0.1", "::1") for a in lo)
    assert AddressMonitor(lambda a: None, expected=["127.0.0.1"]).addresses() == ("127.0.0.1",)


def _slow_dad(ns, iface, transmits=2, retrans_ms=2000):
    """DAD on iface takes transmits * retrans_ms (plus up to 1 s delay)."""
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                    f"net.ipv6.conf.{iface}.dad_transmits={transmits}",
                    f"net.ipv6.neigh.{iface}.retrans_time_ms={retrans_ms}"],
                   check=True, capture_output=True, timeout=30)


def _ip_flags(ns, iface, addr):
    """The words `ip` prints after the address (scope, tentative, dadfailed...)."""
    out = subprocess.run(["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", iface],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        words = line.split()
        if f"{addr}/64" in words:
            return set(words[words.index(f"{addr}/64") + 1:])
    return None


def _wait_flags(ns, iface, addr, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flags = _ip_flags(ns, iface, addr)
        if flags is not None and pred(flags):
            return flags
        time.sleep(0.1)
    raise AssertionError(f"{addr} on {iface}: flags {_ip_flags(ns, iface, addr)}")


def test_tentative_and_dadfailed_addresses_do_not_count(netns):
    _slow_dad(netns, "dum74")
    _ip("-n", netns, "addr", "add", "fd74::51/64", "dev", "dum74", "nodad")
    _ip("-n", netns, "addr", "add", "fd74::31/64", "dev", "dum74")
    # The same address on the peer answers dum74's DAD probe: DAD fails.
    _ip("-n", netns, "addr", "add", "fd74::41/64", "dev", "other74", "nodad")
    _ip("-n", netns, "addr", "add", "fd74::41/64", "dev", "dum74")
    _ip("-n", netns, "addr", "add", "10.74.0.31/24", "dev", "dum74")
    ipr = NetNS(netns)
    try:
        assert "tentative" in _ip_flags(netns, "dum74", "fd74::31")
        during = read_addresses(["dum74"], ipr=ipr)
        assert "tentative" in _ip_flags(netns, "dum74", "fd74::31")   # still, after reading
        assert "fd74::31" not in during
        assert "fd74::51" in during and "10.74.0.31" in during
        _wait_flags(netns, "dum74", "fd74::41", lambda f: "dadfailed" in f)
        _wait_flags(netns, "dum74", "fd74::31", lambda f: "tentative" not in f)
        after = read_addresses(["dum74"], ipr=ipr)
        assert nonlocal_(after) == ["10.74.0.31", "fd74::31", "fd74::51"]
        # On the peer the same address is valid: it counts there.
        assert "fd74::41" in read_addresses(["other74"], ipr=ipr)
    finally:
        ipr.close()


def test_flags_from_ifa_flags_or_the_header():
    """IFA_FLAGS carries all 32 bits; without it the header's 8 bits count."""
    assert address_flags({"flags": 0, "attrs": [("IFA_FLAGS", 0x40)]}) == 0x40
    assert address_flags({"flags": 0xc8, "attrs": []}) == 0xc8
    assert not usable(0x40) and not usable(0x08) and not usable(0x44)
    assert usable(0x80) and usable(0x200) and usable(0x20)


def test_monitor_counts_an_address_once_dad_is_done(netns):
    _slow_dad(netns, "dum74")
    probe = Probe(netns, "dum74")
    try:
        assert nonlocal_(probe.line()["ready"]) == []
        _ip("-n", netns, "addr", "add", "fd74::61/64", "dev", "dum74")
        assert "tentative" in _ip_flags(netns, "dum74", "fd74::61")
        # The first event naming it comes when DAD is done (RTM_NEWADDR again).
        event = probe.wait_for(lambda a: "fd74::61" in a, timeout=20)
        assert "tentative" not in _ip_flags(netns, "dum74", "fd74::61")
        assert nonlocal_(event) == ["fd74::61"]
    finally:
        probe.close()
