"""Incoming messages decoded with bounded work (sharedd.bus.reading): a
call's or a signal's body with arrays or variants beyond MAX_BODY bytes or
MAX_ELEMENTS elements is not decoded (its header is, and the caller is told
LimitsExceeded); a header beyond MAX_FIELDS bytes (a long object path) is
not decoded either; bodies of strings and replies are decoded whole; a
message that arrives in pieces reads the same. Then the same against the
running daemon, from a user that is not root."""

import asyncio

from dbus_next import Message, MessageType, Variant
from dbus_next.constants import ErrorType

from sharedd.bus import reading
from sharedd.bus.connection import MESSAGE_MAX, Connection

ROOT = "/org/sharedd/Sharedd1"
MGR = "org.sharedd.Sharedd1.Manager"


class Trickle:
    """A non-blocking stream that has only what was given so far."""

    def __init__(self, data=b"", step=None):
        self.data, self.step = bytearray(data), step

    def read(self, n):
        if not self.data:
            return None                  # (would block)
        n = min(n, self.step or n)
        out = bytes(self.data[:n])
        del self.data[:n]
        return out


def call(signature, body, **kw):
    return Message(destination="org.sharedd.Sharedd1", path=ROOT, interface=MGR,
                   member="NoSuch", signature=signature, body=body, serial=7, **kw)


def read(msg, step=None):
    data = msg._marshall()
    reader = reading.BoundedUnmarshaller(Trickle(data, step))
    while (got := reader.unmarshall()) is None:
        pass
    return reader, got


def test_small_and_string_bodies_are_decoded_whole():
    for msg in (call("ai", [list(range(500))]),
                call("a{sv}", [{f"k{i}": Variant("s", "v" * 1000) for i in range(64)}]),
                Message.new_signal(ROOT, "org.sharedd.Sharedd1.Hooks", "Fired", "sss",
                                   ["post", "allow_access", "x" * (4 << 20)])):
        reader, got = read(msg)
        assert reader.refused is None and got.body == msg.body


def test_a_reply_is_decoded_whatever_its_size():
    msg = Message(message_type=MessageType.METHOD_RETURN, reply_serial=3, serial=9,
                  destination=":1.1", signature="ai", body=[list(range(100_000))])
    reader, got = read(msg)
    assert reader.refused is None and got.body == msg.body


def test_too_many_elements_or_bytes_are_not_decoded():
    for msg, why in ((call("ai", [list(range(reading.MAX_ELEMENTS + 10))]), "elements"),
                     (call("av", [[Variant("y", 1)] * 3000]), "elements"),
                     (call("ay", [b"x" * (reading.MAX_BODY + 1)]), "bytes"),
                     (call("s", ["x" * (reading.MAX_BODY + 1)]), "a method call's")):
        reader, got = read(msg)
        assert reader.refused and why in reader.refused, reader.refused
        # the header is read: the caller can be answered
        assert (got.member, got.serial, got.destination, got.body) == \
            ("NoSuch", 7, "org.sharedd.Sharedd1", [])
        assert got.message_type == MessageType.METHOD_CALL


def test_a_signal_of_strings_is_decoded_up_to_its_bound():
    def fired(size):
        return Message.new_signal(ROOT, "org.sharedd.Sharedd1.Hooks", "Fired", "sss",
                                  ["post", "allow_access", "x" * size])
    reader, got = read(fired(reading.MAX_SIGNAL_BODY - 64))
    assert reader.refused is None and len(got.body[2]) == reading.MAX_SIGNAL_BODY - 64
    reader, got = read(fired(reading.MAX_SIGNAL_BODY))
    assert "a signal's" in reader.refused and got.body == [] and got.member == "Fired"


def test_long_variant_signatures_count_and_are_not_all_kept():
    """A variant's signature is parsed (and dbus-next keeps it): its length
    counts against the elements, and the kept ones are bounded."""
    import random
    from dbus_next.signature import SignatureTree
    types = "ybnqiuxtds"
    rng = random.Random(7)
    variants = [Variant("a(" + "".join(rng.choice(types) for _ in range(200)) + ")", [])
                for _ in range(40)]
    reader, got = read(call("av", [variants]))
    assert reader.refused and "elements" in reader.refused
    for i in range(reading.SIGNATURES_KEPT * 2):
        read(call("av", [[Variant("a(" + "".join(rng.choice(types) for _ in range(20)) + ")",
                                  [])]]))
        assert len(SignatureTree._cache) <= reading.SIGNATURES_KEPT + 8


def from_the_bus(msg, sender):
    """msg's bytes as the bus passes them on: with a SENDER field (the bus
    sets it; dbus-next leaves it out), after every other field."""
    from dbus_next._private.constants import HeaderField
    from dbus_next._private.marshaller import Marshaller
    body = Marshaller(msg.signature, msg.body)
    body.marshall()
    fields = [[HeaderField.PATH.value, Variant("o", msg.path)],
              [HeaderField.MEMBER.value, Variant("s", msg.member)],
              [HeaderField.REPLY_SERIAL.value, Variant("u", 5)],
              [HeaderField.SIGNATURE.value, Variant("g", msg.signature or "s")]]
    if msg.interface:
        fields.insert(1, [HeaderField.INTERFACE.value, Variant("s", msg.interface)])
    if sender is not None:
        fields.append([HeaderField.SENDER.value, Variant("s", sender)])
    header = Marshaller("yyyyuua(yv)", [ord("l"), msg.message_type.value, msg.flags.value, 1,
                                        len(body.buffer), msg.serial, fields])
    header.marshall()
    header.align(8)
    return bytes(header.buffer + body.buffer)


def read_bytes(data, step=None):
    reader = reading.BoundedUnmarshaller(Trickle(data, step))
    while (got := reader.unmarshall()) is None:
        pass
    return reader, got


def test_a_long_header_is_not_decoded_and_its_sender_is_found():
    for path in ("/" + "a" * (reading.MAX_FIELDS + 1), "/a" * 500_000):
        for kind, extra in ((MessageType.METHOD_CALL, {}),
                            (MessageType.SIGNAL, {"interface": "org.sharedd.Test"})):
            msg = Message(path=path, member="Introspect", message_type=kind, serial=11,
                          signature="s", body=["x"], **extra)
            reader, got = read_bytes(from_the_bus(msg, ":1.42"), step=4096)
            assert reader.refused and "header" in reader.refused, reader.refused
            assert (got.message_type, got.serial, got.sender, got.path, got.body) == \
                (kind, 11, ":1.42", None, [])
    # no sender, or one that is not a bus name: refused all the same
    for sender in (None, "not a name", "x" * 300):
        msg = Message(path="/" + "b" * 9000, member="X", serial=3)
        reader, got = read_bytes(from_the_bus(msg, sender))
        assert reader.refused and got.sender is None
    # a header just within the bound is read as usual
    path = "/" + "c" * (reading.MAX_FIELDS - 200)
    reader, got = read_bytes(from_the_bus(Message(path=path, member="X", serial=4), ":1.9"))
    assert reader.refused is None and (got.path, got.sender) == (path, ":1.9")


def test_a_message_in_pieces_reads_the_same():
    for msg in (call("ai", [list(range(2000))]), call("ai", [list(range(9000))]),
                call("s", ["y" * 100_000])):
        whole, expect = read(msg)
        pieces, got = read(msg, step=333)
        assert (pieces.refused, got.body, got.serial) == (whole.refused, expect.body, 7)


async def list_shares(bus):
    """A normal call's answer (after the hostile ones)."""
    reply = await bus.call(Message(destination="org.sharedd.Sharedd1", path=ROOT, interface=MGR,
                                   member="ListShares", signature="a{sv}", body=[{}]))
    return reply.body


async def _large_calls(address):
    """A non-root caller's large calls (as any local user may send), then a
    normal one: (the errors' names and texts, the normal answer)."""
    bus = await Connection(bus_address=address).connect()
    try:
        answers = []
        for signature, body in (("ai", [list(range(2_000_000))]),      # 8 MB
                                ("a{sv}", [{f"k{i}": Variant("b", True) for i in range(6000)}]),
                                ("s", ["x" * (20 << 20)])):              # 20 MB
            reply = await bus.call(Message(destination="org.sharedd.Sharedd1", path=ROOT,
                                           interface=MGR, member="ListShares",
                                           signature=signature, body=body))
            answers.append((reply.error_name, reply.body[0]))
        await bus.send(Message(message_type=MessageType.SIGNAL, destination="org.sharedd.Sharedd1",
                               path=ROOT, interface=MGR, member="Huge", signature="ai",
                               body=[list(range(1_000_000))]))
        return answers, await list_shares(bus)
    finally:
        bus.disconnect()


def as_nobody(function, address):
    """function(address), a coroutine function of this module, run by a
    user that is not root (setpriv) in a process of its own: its result."""
    import json
    import os
    import subprocess
    import sys
    code = ("import asyncio, json, sys; sys.path.insert(0, %r); "
            "from tests.test_bus_reading import %s; "
            "print(json.dumps(asyncio.run(%s(%r))))"
            % (os.getcwd(), function.__name__, function.__name__, address))
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_daemon_refuses_large_bodies_unread_and_answers_on(sharedd_factory, system_bus):
    from tests.support import configs
    d = sharedd_factory(configs.MEMORY)
    answers, after = as_nobody(_large_calls, system_bus.address)
    assert [a[0] for a in answers] == [ErrorType.LIMITS_EXCEEDED.value] * 3, answers
    assert "bytes" in answers[0][1] and "elements" in answers[1][1], answers
    assert "a method call's" in answers[2][1], answers
    assert after == [[]]
    assert d.create_share("after-large")
    log = d.log_tail(400)
    assert "refused unread" in log and "Traceback" not in log


#: dbus-daemon's longest message (its default, and the test bus's)
BUS_MESSAGE_MAX = MESSAGE_MAX


async def _long_paths(address):
    """A non-root caller's Introspect of an object path of a million
    elements, and of one path so long that its answer (the path and some
    XML) would be longer than the bus carries; then a normal call."""
    bus = await Connection(bus_address=address).connect()
    try:
        def introspect(path):
            return Message(destination="org.sharedd.Sharedd1", path=path,
                           interface="org.freedesktop.DBus.Introspectable", member="Introspect")
        base = len(introspect("/")._marshall()) - 1
        longest = "/" + "a" * (BUS_MESSAGE_MAX - 48 - base)
        assert BUS_MESSAGE_MAX - 64 < len(introspect(longest)._marshall()) <= BUS_MESSAGE_MAX - 40
        answers = []
        for path in ("/a" * 1_000_000, longest):
            reply = await bus.call(introspect(path))
            answers.append((reply.error_name, reply.body[0][:200]))
        return answers, await list_shares(bus)
    finally:
        bus.disconnect()


def test_the_daemon_refuses_long_paths_unread_and_stays_on_the_bus(sharedd_factory, system_bus):
    """An Introspect of a path of the bus's own length would be answered
    with a message longer than the bus carries, and the bus drops a
    connection that sends one: sharedd would be off the bus at one call of
    any local user. A long header is refused before it is read."""
    from tests.support import configs
    d = sharedd_factory(configs.MEMORY)
    answers, after = as_nobody(_long_paths, system_bus.address)
    assert [a[0] for a in answers] == [ErrorType.LIMITS_EXCEEDED.value] * 2, answers
    assert all("header" in a[1] for a in answers), answers
    assert after == [[]]
    assert d.proc.poll() is None, "sharedd left the bus"
    assert d.create_share("after-long-paths")
    log = d.log_tail(400)
    assert "refused unread" in log and "Traceback" not in log


def test_an_answer_longer_than_the_bus_carries_is_never_sent(session_bus):
    """The system bus drops a connection that sends a message over its
    longest: such an answer is replaced by LimitsExceeded. (This bus would
    carry it: its limit is higher, and it lets any call through.)"""
    async def main():
        server = await Connection(bus_address=session_bus).connect()
        client = await Connection(bus_address=session_bus).connect()

        def answer(msg):
            if msg.member == "Big":
                return Message.new_method_return(msg, "s", ["x" * (BUS_MESSAGE_MAX + 10)])
            if msg.member == "Small":
                return Message.new_method_return(msg, "s", ["fine"])
        server.add_message_handler(answer)
        try:
            replies = []
            for member in ("Big", "Small"):
                reply = await client.call(Message(destination=server.unique_name, path="/t",
                                                  interface="org.sharedd.Test", member=member))
                replies.append((reply.error_name, reply.body[0][:60]))
            return replies, server.connected
        finally:
            client.disconnect()
            server.disconnect()
    replies, connected = asyncio.run(main())
    assert replies[0][0] == ErrorType.LIMITS_EXCEEDED.value and "bytes" in replies[0][1], replies
    assert replies[1] == (None, "fine") and connected


def test_a_flood_is_read_in_slices_with_one_continuation_at_a_time(session_bus, monkeypatch):
    """Reading stops after READ_SLICE and goes on in a later step; while it
    waits to, the socket's own callback does not start a second reading
    (a steady flood would otherwise pile continuations up, one a step)."""
    from sharedd.bus import connection
    monkeypatch.setattr(connection, "READ_SLICE", 0.0002)
    pending, most, steps = [0], [0], [0]
    real = Connection._read_on

    def read_on(self):
        pending[0] -= 1
        steps[0] += 1
        real(self)
    monkeypatch.setattr(Connection, "_read_on", read_on)

    async def main():
        loop = asyncio.get_running_loop()
        soon = loop.call_soon

        def counted(callback, *args, **kw):
            if getattr(callback, "__name__", "") == "read_on":
                pending[0] += 1
                most[0] = max(most[0], pending[0])
            return soon(callback, *args, **kw)
        loop.call_soon = counted
        server = await Connection(bus_address=session_bus).connect()
        client = await Connection(bus_address=session_bus).connect()
        got = []
        server.add_message_handler(lambda m: got.append(m) if m.member == "Tick" else None)
        try:
            for burst in range(20):
                for i in range(200):
                    client.send(Message(message_type=MessageType.SIGNAL,
                                        destination=server.unique_name, path="/t",
                                        interface="org.sharedd.Test", member="Tick",
                                        signature="u", body=[i]))
                await asyncio.sleep(0)
            for _ in range(500):
                if len(got) == 4000:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.call_soon = soon
            client.disconnect()
            server.disconnect()
        return len(got)
    assert asyncio.run(main()) == 4000
    assert steps[0] > 5, "the flood was read in one step"
    assert most[0] == 1, (most[0], steps[0])
