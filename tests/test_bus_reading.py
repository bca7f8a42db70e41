"""Incoming messages decoded with bounded work (sharedd.bus.reading): a
call's or a signal's body with arrays or variants beyond MAX_BODY bytes or
MAX_ELEMENTS elements is not decoded (its header is, and the caller is told
LimitsExceeded); bodies of strings and replies are decoded whole; a message
that arrives in pieces reads the same. Then the same against the running
daemon, from a user that is not root."""

import asyncio

from dbus_next import Message, MessageType, Variant
from dbus_next.constants import ErrorType

from sharedd.bus import reading
from sharedd.bus.connection import Connection

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
                     (call("ay", [b"x" * (reading.MAX_BODY + 1)]), "bytes")):
        reader, got = read(msg)
        assert reader.refused and why in reader.refused, reader.refused
        # the header is read: the caller can be answered
        assert (got.member, got.serial, got.destination, got.body) == \
            ("NoSuch", 7, "org.sharedd.Sharedd1", [])
        assert got.message_type == MessageType.METHOD_CALL


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


def test_a_message_in_pieces_reads_the_same():
    for msg in (call("ai", [list(range(2000))]), call("ai", [list(range(9000))]),
                call("s", ["y" * 100_000])):
        whole, expect = read(msg)
        pieces, got = read(msg, step=333)
        assert (pieces.refused, got.body, got.serial) == (whole.refused, expect.body, 7)


async def _large_calls(address):
    """A non-root caller's large calls (as any local user may send), then a
    normal one: (the errors' names and texts, the normal answer)."""
    bus = await Connection(bus_address=address).connect()
    try:
        answers = []
        for signature, body in (("ai", [list(range(2_000_000))]),      # 8 MB
                                ("a{sv}", [{f"k{i}": Variant("b", True) for i in range(6000)}])):
            reply = await bus.call(Message(destination="org.sharedd.Sharedd1", path=ROOT,
                                           interface=MGR, member="ListShares",
                                           signature=signature, body=body))
            answers.append((reply.error_name, reply.body[0]))
        await bus.send(Message(message_type=MessageType.SIGNAL, destination="org.sharedd.Sharedd1",
                               path=ROOT, interface=MGR, member="Huge", signature="ai",
                               body=[list(range(1_000_000))]))
        reply = await bus.call(Message(destination="org.sharedd.Sharedd1", path=ROOT,
                                       interface=MGR, member="ListShares", signature="a{sv}",
                                       body=[{}]))
        return answers, reply.body
    finally:
        bus.disconnect()


def test_the_daemon_refuses_large_bodies_unread_and_answers_on(sharedd_factory, system_bus):
    import os
    import subprocess
    import sys
    import json
    from tests.support import configs
    d = sharedd_factory(configs.MEMORY)
    # as a user that is not root (setpriv), in a process of its own
    code = ("import asyncio, json, sys; sys.path.insert(0, %r); "
            "from tests.test_bus_reading import _large_calls; "
            "print(json.dumps(asyncio.run(_large_calls(%r))))"
            % (os.getcwd(), system_bus.address))
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [a[0] for a in answers] == [ErrorType.LIMITS_EXCEEDED.value] * 2, answers
    assert "bytes" in answers[0][1] and "elements" in answers[1][1], answers
    assert after == [[]]
    assert d.create_share("after-large")
    log = d.log_tail(400)
    assert "refused unread" in log and "Traceback" not in log


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
