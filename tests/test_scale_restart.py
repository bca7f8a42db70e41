"""A restart with a few thousand shares (the CI-sized form of the 10,000
share benchmark): the daemon re-ensures every share, reports its progress in
STATUS=, takes its bus name without flooding the bus with one
InterfacesAdded per object, sends READY=1, and answers GetManagedObjects
and ListShares with every object - on one connection that never drops."""

import asyncio
import os
import time

from dbus_next import Message, MessageType

from sharedd.bus import slices
from sharedd.bus.connection import Connection
from tests.support import components, configs
from tests.support.signals import SignalCollector

SHARES = int(os.environ.get("SHAREDD_SCALE_SHARES", "2000"))



async def create_many(address, count, in_flight=16):
    bus = await Connection(bus_address=address).connect()
    gate = asyncio.Semaphore(in_flight)
    failed = []

    async def one(i):
        async with gate:
            reply = await bus.call(Message(
                destination="org.sharedd.Sharedd1", path="/org/sharedd/Sharedd1",
                interface="org.sharedd.Sharedd1.Manager", member="CreateShare",
                signature="ssta{sv}", body=[f"scale-{i}", "NFS", 1, {}]))
            if reply.message_type == MessageType.ERROR:
                failed.append(reply.body)
    await asyncio.gather(*(one(i) for i in range(count)))
    bus.disconnect()
    return failed


async def managed_objects(address):
    bus = await Connection(bus_address=address).connect()
    started = time.monotonic()
    reply = await bus.call(Message(destination="org.sharedd.Sharedd1", path="/org/sharedd/Sharedd1",
                                   interface="org.freedesktop.DBus.ObjectManager",
                                   member="GetManagedObjects"))
    elapsed = time.monotonic() - started
    bus.disconnect()
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return reply.body[0], elapsed


def test_restart_with_thousands_of_shares(sharedd_factory, system_bus):
    d = sharedd_factory(configs.MEMORY)
    assert asyncio.run(create_many(system_bus.address, SHARES)) == []
    d.stop()
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    started = time.monotonic()
    try:
        d.start(timeout=600)
        ready = time.monotonic() - started
        time.sleep(1)
    finally:
        sig.close()
    components.used(f"sharedd restart with {SHARES} shares")
    added = [m for m in sig.messages if m.member == "InterfacesAdded"]
    assert len(added) < 10, f"{len(added)} InterfacesAdded signals at start-up"
    objects, took = asyncio.run(managed_objects(system_bus.address))
    shares = [p for p in objects if p.startswith("/org/sharedd/Sharedd1/share/")]
    assert len(shares) == SHARES
    assert all(objects[p]["org.sharedd.Sharedd1.Share"]["Status"].value == "available"
               for p in shares)
    started = time.monotonic()
    system_bus.busctl("--quiet", "call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1",
                      "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    by_busctl = time.monotonic() - started
    print(f"\nrestart with {SHARES} shares: READY after {ready:.1f}s; GetManagedObjects "
          f"{by_busctl * 1e3:.0f} ms by busctl, {took * 1e3:.0f} ms by a dbus-next client "
          "(which unmarshals in Python)")
    assert any("ensuring" in n for n in d.notifications) or ready < 2, d.notifications[:5]
    assert d.manager("FindShareByName", "s", f"scale-{SHARES - 1}")
    # more paths than one step writes (sharedd.bus.slices): written in slices
    listed = d.manager("ListShares", "a{sv}", 0)
    assert len(listed) == SHARES and set(listed) == set(shares)
    assert d.manager("ListShares", "a{sv}", 1, "status", "s", "available") == listed
    # one caller asking for many long lists at once gets two of them at a
    # time and is told to try again for the rest; another caller is answered
    refused, answered, theirs = asyncio.run(lists_at_once(system_bus.address))
    # (refused before any work: not a reply made and then refused for the
    # caller's large replies already queued, which connection.py also does)
    assert any(r.body == [slices.TOO_MANY_LISTS] for r in refused), \
        f"a caller got every long list it asked for at once: {[r.body for r in refused]}"
    assert all(a == listed for a in answered) and answered
    assert theirs == listed


async def lists_at_once(address, at_once=10, bursts=5):
    """Bursts of ListShares sent together on one connection (whether some
    reach the daemon in separate reads is up to the kernel: a few bursts),
    then one on another connection: (the errors, the answers, the other's)."""
    mine, other = [await Connection(bus_address=address).connect() for _ in range(2)]
    refused, answered = [], []
    try:
        for _ in range(bursts):
            replies = await asyncio.gather(*(mine.call(Message(
                destination="org.sharedd.Sharedd1", path="/org/sharedd/Sharedd1",
                interface="org.sharedd.Sharedd1.Manager", member="ListShares",
                signature="a{sv}", body=[{}])) for _ in range(at_once)))
            for reply in replies:
                if reply.message_type == MessageType.ERROR:
                    assert reply.error_name == "org.freedesktop.DBus.Error.LimitsExceeded", \
                        reply.body
                    refused.append(reply)
                else:
                    answered.append(reply.body[0])
            if any(r.body == [slices.TOO_MANY_LISTS] for r in refused):
                break
        reply = await other.call(Message(
            destination="org.sharedd.Sharedd1", path="/org/sharedd/Sharedd1",
            interface="org.sharedd.Sharedd1.Manager", member="ListShares",
            signature="a{sv}", body=[{}]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        return refused, answered, reply.body[0]
    finally:
        mine.disconnect()
        other.disconnect()
