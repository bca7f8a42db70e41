"""The bus never goes deaf: a full socket buffer is a pause, not a lost
connection (shown against the stock dbus-next as well, which drops it); a
flood of large refused calls from several connections leaves the daemon
answering with a quiet log; a lost connection makes sharedd exit non-zero
for systemd; an unread notify socket never blocks the daemon; read-only
methods are open to everyone; Properties.GetAll("") answers."""

import asyncio
import os
import signal
import time

import pytest
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from sharedd.bus.connection import Connection
from tests.fixtures.bus import private_bus
from tests.fixtures.sharedd_daemon import Sharedd
from tests.support import configs

MGR = "org.sharedd.Sharedd1.Manager"
ROOT = "/org/sharedd/Sharedd1"




class FullOnce:
    """A socket whose first sends find the buffer full (EAGAIN), as under a
    burst of large replies; then it is the real socket."""

    def __init__(self, sock, fails=3):
        self.sock, self.fails = sock, fails

    def _full(self):
        if self.fails:
            self.fails -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")

    def send(self, data):                   # the library's writer
        self._full()
        return self.sock.send(data)

    def sendmsg(self, buffers, *anc):       # sharedd's
        self._full()
        return self.sock.sendmsg(buffers, *anc)

    def __getattr__(self, name):
        return getattr(self.sock, name)


async def _ping_through_a_full_buffer(address, bus_class):
    bus = await bus_class(bus_address=address).connect()
    bus._writer.sock = FullOnce(bus._writer.sock)
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetId")), 5)
        return reply.message_type == MessageType.METHOD_RETURN and bus.connected
    except Exception:
        return False
    finally:
        bus.disconnect()


def test_a_full_socket_buffer_is_a_pause(system_bus):
    assert asyncio.run(_ping_through_a_full_buffer(system_bus.address, Connection))


def test_the_stock_library_drops_the_connection_on_a_full_buffer(system_bus):
    """Why sharedd.bus.connection exists: if this ever passes (Debian fixed
    dbus-next), the workaround can go."""
    assert not asyncio.run(_ping_through_a_full_buffer(system_bus.address, MessageBus))


@pytest.fixture
def d(sharedd_factory):
    return sharedd_factory(configs.MEMORY)


async def _flood(address, connections=4, calls=200, name_size=64 * 1024):
    """Properties.GetAll with huge unknown interface names, from several
    connections at once, without waiting for each answer (any local user may)."""
    async def one():
        # (the flooding clients need the fixed writer too: the stock one
        # drops its own connection under this burst)
        bus = await Connection(bus_address=address).connect()
        msgs = [Message(destination="org.sharedd.Sharedd1", path=ROOT,
                        interface="org.freedesktop.DBus.Properties", member="GetAll",
                        signature="s", body=["x" * name_size + f"\n{i}"]) for i in range(calls)]
        replies = await asyncio.gather(*(bus.call(m) for m in msgs), return_exceptions=True)
        bus.disconnect()
        return sum(1 for r in replies if isinstance(r, Message)
                   and r.message_type == MessageType.ERROR)
    return await asyncio.gather(*(one() for _ in range(connections)))


def test_flood_of_large_refused_calls_then_a_normal_call(d):
    log_before = os.path.getsize(d.log_path)
    answered = asyncio.run(_flood(d.bus.address))
    assert answered == [200] * 4, "every refused call got its error reply"
    assert d.manager("ListShares", "a{sv}", 0) == []          # still answering
    assert d.create_share("after-flood")
    grown = os.path.getsize(d.log_path) - log_before
    assert grown < 64 * 1024, f"the flood grew the log by {grown} bytes"
    assert "Traceback" not in d.log_tail(400)
    assert "\nxxxx" not in open(d.log_path).read()[log_before:], "a forged log line"


async def _churn(address, connections=150, at_once=15, finds=200):
    """Refused calls as any local user can make them: one unknown member and
    one FindShareByName of no share per new connection, then many such finds
    on one connection."""
    def find(name):
        return Message(destination="org.sharedd.Sharedd1", path=ROOT, interface=MGR,
                       member="FindShareByName", signature="s", body=[name])

    async def one(i):
        bus = await Connection(bus_address=address).connect()
        try:
            replies = [await bus.call(Message(destination="org.sharedd.Sharedd1", path=ROOT,
                                              interface=MGR, member=f"NoSuch{i}")),
                       await bus.call(find(f"none-{i}"))]
        finally:
            bus.disconnect()
        return [r.error_name for r in replies]
    names = []
    for k in range(0, connections, at_once):
        for got in await asyncio.gather(*(one(i) for i in range(k, k + at_once))):
            names += got
    bus = await Connection(bus_address=address).connect()
    try:
        for k in range(0, finds, 50):      # (the bus allows a connection 128 calls unanswered)
            names += [r.error_name for r in await asyncio.gather(
                *(bus.call(find(f"none\nforged {i}")) for i in range(k, k + 50)))]
    finally:
        bus.disconnect()
    return names


def test_refusals_from_many_connections_are_a_few_log_lines(d):
    """A caller that opens a new connection per refused call is a new caller
    each time: all callers together get at most REFUSAL_LOG_LINES lines an
    interval, not one line (or one per call) each."""
    from sharedd.refusals import REFUSAL_LOG_LINES
    before = os.path.getsize(d.log_path)
    names = asyncio.run(_churn(d.bus.address))
    assert names.count("org.freedesktop.DBus.Error.UnknownMethod") == 150
    assert names.count("org.sharedd.Sharedd1.Error.NotFound") == 150 + 200, set(names)
    assert d.create_share("after-churn")      # still answering
    grown = open(d.log_path).read()[before:]
    lines = [ln for ln in grown.splitlines() if "refused" in ln]
    assert len(lines) == REFUSAL_LOG_LINES, \
        f"{len(lines)} refusal lines for 500 refusals:\n" + "\n".join(lines[:40])
    assert all("message(s) from :" in ln for ln in lines), lines
    assert "\nforged" not in grown, "a forged log line"


def test_refusals_beyond_an_intervals_lines_are_told_in_one_line_at_its_end(monkeypatch, caplog):
    """Each caller's first refusal in an interval is a line while the
    interval has lines left; the rest are counted: a caller's into its next
    line, the others' into one line when the interval ends."""
    import logging
    from sharedd import refusals as module

    monkeypatch.setattr(module, "REFUSAL_LOG_INTERVAL", 0.5)
    monkeypatch.setattr(module, "REFUSAL_LOG_LINES", 3)

    async def main():
        refusals = module.RefusalLog("message")
        for round_ in range(2):
            for i in range(10):
                for _ in range(2):
                    refusals.refused(f":1.{i}", "Find", "Err", f"no\nsuch {round_}")
            await asyncio.sleep(0.7)    # the interval ends: the held ones are told
    with caplog.at_level(logging.INFO, logger="sharedd.refusals"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8, lines
    for told in (lines[:3], lines[4:7]):
        assert [ln.split(" from ")[1].split(" ")[0] for ln in told] == [":1.0", ":1.1", ":1.2"]
    assert all("refused 1 message(s)" in ln and "no\\nsuch" in ln for ln in lines[:3])
    # the second round: the first three callers' lines count their second
    # refusal of the first round too
    assert all("refused 2 message(s)" in ln for ln in lines[4:7]), lines[4:7]
    assert "refused 7 more message(s) from 7 sender(s), not logged" in lines[3], lines[3]
    # the other seven: their second refusal of the first round and the
    # first of the second (each one's last is still counted, for its next line)
    assert "refused 14 more message(s) from 7 sender(s), not logged" in lines[7], lines[7]
    assert not any("\n" in ln for ln in lines)


def test_getall_with_an_empty_interface_and_list_snapshots_for_everyone(d):
    path = d.create_share("props")
    d.share(path, "CreateSnapshot", "sa{sv}", "s1", 0)
    proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", path,
                        "org.freedesktop.DBus.Properties", "GetAll", "s", "")
    assert '"Name"' in proc.stdout and '"Status"' in proc.stdout
    proc = d.bus.busctl("call", "org.sharedd.Sharedd1", ROOT, MGR, "ListSnapshots",
                        "a{sv}", "0", user=65534)
    assert "/org/sharedd/Sharedd1/snapshot/" in proc.stdout


def test_unread_notify_socket_never_blocks_the_daemon(d):
    """A supervisor that stops reading: watchdog pings every 50 ms fill the
    datagram queue at once; the daemon must go on answering."""
    d.stop()
    d.start(extra_env={"WATCHDOG_USEC": "100000"})
    time.sleep(3)        # about 60 pings that nobody reads
    started = time.monotonic()
    assert d.manager("ListShares", "a{sv}", 0) is not None
    assert d.create_share("still-here")
    assert time.monotonic() - started < 10


def _on_its_own_bus(bus, tmp_path):
    """A started sharedd (in-memory driver) on a bus of the test's own."""
    work = str(tmp_path)
    os.chmod(work, 0o755)
    conf = os.path.join(work, "sharedd.conf")
    with open(conf, "w") as f:
        f.write(configs.MEMORY.replace("@WORK@", work))
    d = Sharedd(bus, work, conf)
    d.start()
    return d


def test_lost_bus_connection_exits_non_zero(tmp_path):
    """The bus goes away under the daemon: it must exit (non-zero) so systemd
    restarts it, not linger deaf with its watchdog happy."""
    with private_bus() as bus:
        d = _on_its_own_bus(bus, tmp_path)
        try:
            os.kill(bus.pid, signal.SIGKILL)
            rc = d.proc.wait(timeout=30)
            assert rc != 0, d.log_tail()
            assert "lost the connection to the system bus" in d.log_tail(), d.log_tail()
        finally:
            d.stop()


def test_a_forged_name_owner_change_is_not_an_export_service_restart(tmp_path):
    """Any local user may send a signal named NameOwnerChanged to sharedd;
    only the bus's own says that NFS-Ganesha (re)started (each makes sharedd
    re-add every export)."""
    restarted = "NFS-Ganesha (re)started on the bus"
    with private_bus() as bus:
        d = _on_its_own_bus(bus, tmp_path)
        try:
            for to in ("--destination=org.sharedd.Sharedd1", None):
                bus.busctl(*([to] if to else []), "emit", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "NameOwnerChanged", "sss",
                           "org.ganesha.nfsd", "", ":1.4242", user=65534)
            assert d.manager("ListShares", "a{sv}", 0) == []   # after the signals, in order
            assert restarted not in d.log_tail(400)

            async def own_ganesha_name():       # the bus's own NameOwnerChanged
                conn = await Connection(bus_address=bus.address).connect()
                try:
                    await conn.request_name("org.ganesha.nfsd")
                finally:
                    conn.disconnect()
            asyncio.run(own_ganesha_name())
            deadline = time.monotonic() + 10
            while restarted not in d.log_tail(400):
                assert time.monotonic() < deadline, d.log_tail()
                time.sleep(0.1)
            assert d.log_tail(400).count(restarted) == 1
        finally:
            d.stop()


def test_oversized_options_and_filters_are_refused_unread(d):
    err = "org.sharedd.Sharedd1.Error.InvalidArgument"
    assert err in d.error(ROOT, MGR, "ListShares", "a{sv}", 1, "name", "s", "x" * 10000)
    many = []
    for i in range(40):
        many += [f"k{i}", "s", "v"]
    assert err in d.error(ROOT, MGR, "CreateShare", "ssta{sv}", "x", "NFS", 1, 40, *many)
    assert d.manager("ListShares", "a{sv}", 0) == []


def test_a_failing_property_getter_answers_without_internals_or_a_flood(session_bus, caplog):
    """dbus-next catches a getter's exception itself and hands it to the
    reply sender: sharedd's refusal comes back under its own name, a bug as
    its kind only (no path or SQL for the caller), and 50 reads of it give
    one traceback and one refusal line, not 50."""
    import logging
    from dbus_next.service import ServiceInterface, dbus_property
    from dbus_next.constants import PropertyAccess
    from sharedd.errors import NotFound

    class Iface(ServiceInterface):
        @dbus_property(access=PropertyAccess.READ)
        def Gone(self) -> "s":                      # noqa: F821 (a D-Bus signature)
            raise NotFound("share s1 is gone")

        @dbus_property(access=PropertyAccess.READ)
        def Broken(self) -> "s":                    # noqa: F821
            raise OSError(5, "I/O error on /var/lib/sharedd/secret.db")

    async def main():
        server = await Connection(bus_address=session_bus).connect()
        client = await Connection(bus_address=session_bus).connect()
        server.export("/t", Iface("org.sharedd.Test"))

        async def get(name):
            return await client.call(Message(
                destination=server.unique_name, path="/t",
                interface="org.freedesktop.DBus.Properties", member="Get", signature="ss",
                body=["org.sharedd.Test", name]))
        try:
            gone = await get("Gone")
            assert gone.message_type == MessageType.ERROR
            assert gone.error_name == "org.sharedd.Sharedd1.Error.NotFound"
            assert "gone" in gone.body[0]
            for _ in range(50):
                broken = await get("Broken")
                assert broken.message_type == MessageType.ERROR
                assert broken.error_name == "com.dubstepdish.dbus.next.ServiceError"  # the library's
                assert "OSError" in broken.body[0] and "secret" not in broken.body[0]
        finally:
            for c in (client, server):
                c.disconnect()
                await asyncio.wait_for(c.wait_for_disconnect(), 10)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    tracebacks = [r for r in caplog.records if r.name == "sharedd.bus.connection" and r.exc_info]
    refusals = [r for r in caplog.records if r.name == "sharedd.refusals"
                and r.getMessage().startswith("refused")]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


class AlwaysFull(FullOnce):
    def __init__(self, sock):
        super().__init__(sock, fails=10 ** 9)


def test_short_replies_go_ahead_of_large_ones_to_other_callers(session_bus):
    """Behind a queued reply of megabytes (GetManagedObjects at 10,000
    shares) a short reply to another caller need not wait: it goes first.
    Nothing passes a signal, a call, or a large reply to its own caller."""
    from sharedd.bus import connection
    big = connection.LARGE_REPLY
    # (who, kind, size): in the order sent
    plan = [(":9.1", "reply", big), (":9.2", "reply", big), (":9.3", "reply", 10),
            ("signal", "signal", 10), (":9.4", "reply", 10), (":9.5", "reply", big),
            (":9.2", "reply", 10), (":9.5", "reply", 10), ("call", "call", 10),
            (":9.7", "reply", big), (":9.8", "reply", big), (":9.9", "reply", 10)]

    def message(i, who, kind, size):
        text = f"<{i}>" + "x" * size
        if kind == "signal":
            return Message.new_signal("/t", "org.example.T", "Changed", "s", [text])
        if kind == "call":
            return Message(destination=":9.6", path="/t", interface="org.example.T",
                           member="Do", signature="s", body=[text])
        return Message(message_type=MessageType.METHOD_RETURN, destination=who,
                       reply_serial=7, signature="s", body=[text])

    def which(item):
        data = b"".join(item.parts)
        return next(i for i in range(len(plan)) if f"<{i}>".encode() in data)

    async def main():
        bus = await Connection(bus_address=session_bus).connect()
        writer = bus._writer
        writer.sock = AlwaysFull(writer.sock)      # everything stays queued
        try:
            for i, step in enumerate(plan):
                bus.send(message(i, *step))
            assert which(writer.current) == 0              # begun: not in the queue
            assert [plan[which(q)][0] for q in writer.queue] == [
                ":9.3", ":9.2", "signal", ":9.4", ":9.2", ":9.5", ":9.5", "call", ":9.9",
                ":9.7", ":9.8"]
        finally:
            writer.sock = writer.sock.sock
            bus.disconnect()
    asyncio.run(main())


def test_large_replies_beyond_the_bounds_become_limits_exceeded(session_bus, caplog):
    """Whatever the method (a ListShares of 10,000 shares is 0.7 MB), a
    caller has at most LARGE_PER_CALLER large replies queued, and none is
    queued while LARGE_QUEUED_MAX bytes are: the reply becomes a short
    LimitsExceeded (try again), which is queued in its place, and counted
    with the caller's refusals."""
    import logging
    from sharedd.bus import connection

    def reply(who, serial):
        return Message(message_type=MessageType.METHOD_RETURN, destination=who,
                       reply_serial=serial, signature="s", body=["x" * connection.LARGE_REPLY])

    def kinds(writer):
        items = ([writer.current] if writer.current is not None else []) + list(writer.queue)
        return [(MessageType(item.parts[0][1]).name, item.size < 1024) for item in items]

    async def main():
        bus = await Connection(bus_address=session_bus).connect()
        writer = bus._writer
        writer.sock = AlwaysFull(writer.sock)      # everything stays queued
        try:
            for serial in range(1, connection.LARGE_PER_CALLER + 2):
                bus.send(reply(":9.1", serial))
            assert kinds(writer) == [("METHOD_RETURN", False)] * connection.LARGE_PER_CALLER \
                + [("ERROR", True)]
            writer.large_bytes += connection.LARGE_QUEUED_MAX       # as if queued
            bus.send(reply(":9.2", 9))
            assert kinds(writer)[-1] == ("ERROR", True)
            writer.large_bytes -= connection.LARGE_QUEUED_MAX
            bus.send(reply(":9.2", 10))
            assert kinds(writer)[-1] == ("METHOD_RETURN", False)
            error = writer.queue[-2]
            assert b"org.freedesktop.DBus.Error.LimitsExceeded" in error.parts[0]
        finally:
            writer.sock = writer.sock.sock
            bus.disconnect()
    with caplog.at_level(logging.INFO, logger="sharedd.refusals"):
        asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(logged) == 2 and ":9.1" in logged[0] and ":9.2" in logged[1], logged
    assert "LimitsExceeded" in logged[0] and "reply to call 3" in logged[0]


def test_a_large_reply_refused_on_the_bus_keeps_the_connection(session_bus):
    """The LimitsExceeded that replaces a large reply reaches its caller
    through dbus-daemon (a valid message: dbus-daemon drops a connection
    that sends a message without a serial), and the next call is answered."""
    from dbus_next.service import ServiceInterface, method
    from sharedd.bus import connection

    class Big(ServiceInterface):
        @method()
        def List(self) -> "as":                    # noqa: F821 (a D-Bus signature)
            return ["x" * 1024] * (connection.LARGE_REPLY // 1024 + 1)

    async def main():
        server = await Connection(bus_address=session_bus).connect()
        client = await Connection(bus_address=session_bus).connect()
        server.export("/t", Big("org.sharedd.Test"))

        async def call():
            return await asyncio.wait_for(client.call(Message(
                destination=server.unique_name, path="/t", interface="org.sharedd.Test",
                member="List")), 10)
        try:
            assert len((await call()).body[0]) > 64
            server._writer.large_bytes += connection.LARGE_QUEUED_MAX    # as if queued
            refused = await call()
            assert refused.error_name == "org.freedesktop.DBus.Error.LimitsExceeded", refused.body
            server._writer.large_bytes -= connection.LARGE_QUEUED_MAX
            assert len((await call()).body[0]) > 64
            assert not server._disconnected
        finally:
            for c in (client, server):
                c.disconnect()
                await asyncio.wait_for(c.wait_for_disconnect(), 10)
    asyncio.run(main())


def test_lists_nobody_reads_are_not_made(session_bus):
    """ListShares, ListSnapshots and FindShareByName sent with no reply
    expected (no bound on how many a caller may send) are not run; any
    other method is, reply or not."""
    from dbus_next.constants import MessageFlag
    from dbus_next.service import ServiceInterface, method

    from sharedd.bus.service import _Bus

    class Counting(ServiceInterface):
        def __init__(self):
            super().__init__("org.example.Counting")
            self.ran = []

        @method()
        async def ListShares(self, f: "a{sv}") -> "ao":             # noqa: F821
            self.ran.append("ListShares")
            return []

        @method()
        async def FindShareByName(self, name: "s") -> "o":           # noqa: F821
            self.ran.append("FindShareByName")
            return "/"

        @method()
        async def Extend(self, size: "t"):                           # noqa: F821
            self.ran.append("Extend")

    async def main():
        server = await _Bus(bus_address=session_bus).connect()
        client = await MessageBus(bus_address=session_bus).connect()
        counting = Counting()
        server.export("/c", counting)
        try:
            def call(member, sig, body, flags=MessageFlag.NO_REPLY_EXPECTED):
                return Message(destination=server.unique_name, path="/c",
                               interface="org.example.Counting", member=member,
                               signature=sig, body=body, flags=flags)
            await client.send(call("ListShares", "a{sv}", [{}]))
            await client.send(call("FindShareByName", "s", ["x"]))
            await client.send(call("Extend", "t", [2]))
            reply = await asyncio.wait_for(client.call(
                call("ListShares", "a{sv}", [{}], MessageFlag.NONE)), 10)
            assert reply.message_type == MessageType.METHOD_RETURN, reply.body
            # (tasks run in the order the calls came: Extend's ran first)
            assert counting.ran == ["Extend", "ListShares"]
        finally:
            client.disconnect()
            server.disconnect()
    asyncio.run(main())
