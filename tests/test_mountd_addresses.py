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

from mountd.addresses import AddressMonitor, read_addresses
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
