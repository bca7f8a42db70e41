"""GetManagedObjects answered from kept, marshalled entries (sharedd.bus.
managed): the bytes are the library's own, and the answer follows every
change a caller can make."""

import random
import string

from dbus_next._private.marshaller import Marshaller
from dbus_next.signature import Variant

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from sharedd.bus.managed import SIGNATURE, object_entry
from sharedd.bus.wire import assemble_array
from tests.test_bus_wire import random_value
from tests.support.configs import MEMORY

MGR, SHARE = "org.sharedd.Sharedd1.Manager", "org.sharedd.Sharedd1.Share"
ROOT = "/org/sharedd/Sharedd1"


def _entry(path, interfaces):
    m = Marshaller("(oa{sa{sv}})", [[path, interfaces]])
    m.marshall()
    return bytes(m.buffer)


class Thing(ServiceInterface):
    def __init__(self, values):
        super().__init__("org.example.Thing")
        self.values = values

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.values["Name"]

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":
        return self.values["Size"]

    @dbus_property(access=PropertyAccess.READ)
    def Rules(self) -> "a(sssss)":
        return self.values["Rules"]

    @dbus_property(access=PropertyAccess.READ)
    def Meta(self) -> "a{ss}":
        return self.values["Meta"]


def test_entries_and_bodies_are_the_librarys_bytes():
    rng = random.Random(3)
    sigs = {"Name": "s", "Size": "t", "Rules": "a(sssss)", "Meta": "a{ss}"}
    for _ in range(200):
        tree = {}
        for k in range(rng.randint(0, 6)):
            vals = {n: random_value(rng, sig) for n, sig in sigs.items()}
            # in the order the library reads them
            tree[f"/o/n{k}"] = {p.name: Variant(sigs[p.name], vals[p.name])
                                for p in ServiceInterface._get_properties(Thing(vals))}
            assert object_entry(f"/o/n{k}", [Thing(vals)]) == \
                _entry(f"/o/n{k}", {"org.example.Thing": tree[f"/o/n{k}"]})
        whole = Marshaller(SIGNATURE, [{p: {"org.example.Thing": v} for p, v in tree.items()}])
        whole.marshall()
        entries = [object_entry(p, [Thing({n: x.value for n, x in v.items()})])
                   for p, v in tree.items()]
        assembled = assemble_array(entries)
        assert b"".join(assembled.parts) == bytes(whole.buffer) and \
            assembled.size == len(whole.buffer)


def test_answers_follow_changes(sharedd_factory):
    import json
    d = sharedd_factory(MEMORY)

    def objects():
        proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", ROOT,
                            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return json.loads(proc.stdout)["data"][0]

    def prop(objs, path, name):
        return objs[path][SHARE][name]["data"]
    p = d.create_share("a", size=1)
    objs = objects()
    assert prop(objs, p, "SizeGiB") == 1 and prop(objs, p, "AccessRules") == []
    objects()                                     # served from the kept entry
    rid = d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.1.2.3", "ro", 0)
    objs = objects()
    assert [r[2] for r in prop(objs, p, "AccessRules")] == ["10.1.2.3"]
    d.share(p, "Extend", "ta{sv}", 3, 0)
    assert prop(objects(), p, "SizeGiB") == 3
    d.share(p, "DenyAccess", "sa{sv}", rid, 0)
    assert prop(objects(), p, "AccessRules") == []
    q = d.create_share("b", size=2)
    objs = objects()
    assert prop(objs, q, "Name") == "b" and prop(objs, p, "Name") == "a"
    d.share(p, "Delete", "a{sv}", 0)
    objs = objects()
    assert p not in objs and q in objs
    # every object's answer equals what Properties.GetAll says about it
    for path, ifaces in objs.items():
        for name, props in ifaces.items():
            proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", path,
                                "org.freedesktop.DBus.Properties", "GetAll", "s", name)
            assert json.loads(proc.stdout)["data"][0] == props, (path, name)


class Counted(ServiceInterface):
    """An object whose GetManagedObjects entry is kept until its generation
    moves, as sharedd's shares are."""

    def __init__(self, size):
        super().__init__("org.example.Counted")
        self.size, self.generation = size, 0

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":                                     # noqa: F821
        return self.size

    def resize(self, size):
        self.size, self.generation = size, self.generation + 1
        self.emit_properties_changed({"Size": size})


class Gate:
    """Holds every GetManagedObjects reply at its first pause between
    slices (SLICE 0: a pause after every object) until opened."""

    def __init__(self, monkeypatch):
        import asyncio
        from sharedd.bus import managed, slices
        monkeypatch.setattr(slices, "SLICE", 0.0)
        self.opened, self.paused = asyncio.Event(), asyncio.Event()
        self.writings = 0
        self.held = set()               # the writings held at the gate
        self.pauses_after = 0           # their pauses once it opened
        real = managed.ObjectIndex._write_body

        async def write_body(index, root, answers):
            self.writings += 1
            return await real(index, root, answers)

        async def next_slice():
            self.paused.set()
            if self.opened.is_set():
                self.pauses_after += asyncio.current_task() in self.held
            else:
                self.held.add(asyncio.current_task())
                await self.opened.wait()
            await asyncio.sleep(0)
        monkeypatch.setattr(slices, "next_slice", next_slice)
        monkeypatch.setattr(managed.ObjectIndex, "_write_body", write_body)


async def _counted_tree(session_bus, count):
    from sharedd.bus.connection import Connection
    server = await Connection(bus_address=session_bus).connect()
    client = await Connection(bus_address=session_bus).connect()
    things = {f"/t/n{i}": Counted(i) for i in range(count)}
    for path, thing in things.items():
        server.export(path, thing)
    await server.warm()            # every entry kept, as after start-up
    return server, client, things


def _gmo(client, server):
    from dbus_next import Message
    return client.call(Message(destination=server.unique_name, path="/t",
                               interface="org.freedesktop.DBus.ObjectManager",
                               member="GetManagedObjects"))


async def _held(session_bus, count, gate):
    """count objects, and a GetManagedObjects held at the gate (one object
    written)."""
    import asyncio
    server, client, things = await _counted_tree(session_bus, count)
    gmo = asyncio.ensure_future(_gmo(client, server))
    await asyncio.wait_for(gate.paused.wait(), 10)
    return server, client, things, gmo


def _sizes(reply):
    from dbus_next import MessageType
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    return {p: v["org.example.Counted"]["Size"].value for p, v in reply.body[0].items()}


async def _close(*buses):
    import asyncio
    for c in buses:
        c.disconnect()
        await asyncio.wait_for(c.wait_for_disconnect(), 10)


def test_a_long_answer_is_written_in_slices_and_as_of_its_sending(session_bus, monkeypatch):
    """A GetManagedObjects over many objects leaves the loop to other calls
    while it is written (here held at its first pause). What came, went or
    changed meanwhile, and was signalled before the reply went out, is in
    the reply as it is when sent: a caller that applies the signals it saw
    before the reply never meets a state older than them."""
    import asyncio
    from dbus_next import Message, MessageType
    count = 600
    gate = Gate(monkeypatch)

    async def main():
        server, client, things, gmo = await _held(session_bus, count, gate)
        try:
            ping = await asyncio.wait_for(client.call(Message(
                destination=server.unique_name, path="/t", interface="org.freedesktop.DBus.Peer",
                member="Ping")), 10)
            assert ping.message_type == MessageType.METHOD_RETURN
            assert not gmo.done()
            # Meanwhile: the first and last objects change (one is written
            # already, one not yet), one goes, one comes.
            things["/t/n0"].resize(1000)
            things[f"/t/n{count - 1}"].resize(2000)
            server.unexport("/t/n1")
            server.export("/t/new", Counted(3000))
            gate.opened.set()
            got = _sizes(await asyncio.wait_for(gmo, 30))
            assert got["/t/n0"] == 1000 and got[f"/t/n{count - 1}"] == 2000
            assert "/t/n1" not in got and got["/t/new"] == 3000
            assert len(got) == count
            assert all(got[f"/t/n{i}"] == i for i in range(2, count - 1))
            assert not server._touched and not server._next_answers   # nothing left behind
            assert not server._answers_for
        finally:
            await _close(client, server)
    asyncio.run(main())


def test_callers_at_once_share_a_writing_and_many_changes_are_read_again(session_bus,
                                                                       monkeypatch):
    """21 callers while the replies are held cost at most three writings:
    two go on at once, and whoever asks before a writing begins shares it
    (the answers are sent in the step that read the body last).
    Every object changed while the replies were held: the changes are read
    again in slices (more than LAST_PATHS of them), and every reply has
    them."""
    import asyncio
    from sharedd.bus import managed
    from sharedd.bus.connection import Connection
    count = 400
    gate = Gate(monkeypatch)

    async def main():
        server, client, things, first = await _held(session_bus, count, gate)
        others = [await Connection(bus_address=session_bus).connect() for _ in range(20)]
        try:
            rest = [asyncio.ensure_future(_gmo(other, server)) for other in others]
            async with asyncio.timeout(10):
                while sum(server._answers_for.values()) < 21:   # every call has come in
                    await asyncio.sleep(0.01)
            writings = gate.writings
            assert 2 <= writings <= 3        # (the first began before the others asked)
            for i, thing in enumerate(things.values()):
                thing.resize(10000 + i)
            gate.opened.set()
            replies = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
            assert gate.writings == writings
            # the held writings read the 400 changes again in slices
            assert gate.pauses_after >= managed.LAST_PATHS
            for reply in replies:
                assert _sizes(reply) == {f"/t/n{i}": 10000 + i for i in range(count)}
        finally:
            await _close(*others, client, server)
    asyncio.run(main())


class Trickle:
    """A socket that takes at most `most` bytes a send, and finds the buffer
    full every third send: every piece boundary is met mid-send."""

    def __init__(self, sock, most=7919):
        self.sock, self.most, self.sends, self.widest = sock, most, 0, 0

    def sendmsg(self, buffers, *anc):
        self.sends += 1
        self.widest = max(self.widest, len(buffers))
        if self.sends % 3 == 0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        data = bytearray()
        for b in buffers:
            data += b
            if len(data) >= self.most:
                break
        return self.sock.sendmsg([bytes(data[:self.most])], *anc)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_body_of_thousands_of_pieces_is_sent_as_it_is(session_bus):
    """The reply's body goes to sendmsg in its entries, never joined into
    one buffer (10-25 ms of the loop at 10 MB), at most IOV_MAX of them a
    call, through partial sends and a full buffer, and arrives whole."""
    import asyncio
    from sharedd.bus import connection
    count = 1500

    async def main():
        server, client, things = await _counted_tree(session_bus, count)
        server._writer.sock = trickle = Trickle(server._writer.sock)
        try:
            got = _sizes(await asyncio.wait_for(_gmo(client, server), 30))
            assert got == {f"/t/n{i}": i for i in range(count)}
            assert trickle.widest == connection.IOV_MAX      # thousands of pieces
        finally:
            server._writer.sock = trickle.sock
            await _close(client, server)
    asyncio.run(main())


def test_introspection_lists_children_from_the_tree(session_bus):
    """Introspect names a node's children from the connection's tree: the
    node's own part (its interfaces) is the library's XML line for line; the
    children are those the library finds, except the false one it makes of
    a sibling whose name starts with the node's (and evenly indented: the
    library indents the first child of a node without interfaces less)."""
    import asyncio
    import xml.etree.ElementTree as ET
    from dbus_next import Message
    from dbus_next.message_bus import BaseMessageBus
    from sharedd.bus.connection import Connection

    paths = ["/r/share/a1", "/r/share/b2", "/r/share/b2/deep/er", "/r/share_network/n1",
             "/r/job/j1", "/r"]

    def children(xml):
        return sorted(n.get("name") for n in ET.fromstring(xml.split("\n", 2)[2])
                      if n.tag == "node")

    def own(xml):                     # the node's own lines (children are indented)
        return [line for line in xml.splitlines() if not line.lstrip().startswith("<node ")
                or not line[0].isspace()]

    async def main():
        bus = await Connection(bus_address=session_bus).connect()
        try:
            for p in paths:
                bus.export(p, Counted(1))
            bus.unexport("/r/job/j1")
            for node in ["/", "/r", "/r/share", "/r/share/b2", "/r/share/b2/deep",
                         "/r/share_network", "/r/job", "/r/share/a1"]:
                ours = bus.introspection(node)
                theirs = BaseMessageBus._introspect_export_path(bus, node).tostring()
                expected = children(theirs)
                if node == "/r/share":
                    assert expected == ["_network", "a1", "b2"]    # the library's mistake
                    expected = ["a1", "b2"]
                assert children(ours) == expected, node
                assert own(ours) == own(theirs), node
            assert children(bus.introspection("/r/job")) == []
            bus.unexport("/r/share/b2")
            assert children(bus.introspection("/r/share")) == ["a1", "b2"]   # b2/deep/er is there
            bus.unexport("/r/share/b2/deep/er")
            assert children(bus.introspection("/r/share")) == ["a1"]
            assert bus._children.get("/r/share/b2") is None
            # children that come and go in any order stay sorted, and what a
            # caller receives (sent in pieces) is that XML
            rng, live = random.Random(5), set()
            for _ in range(400):
                name = f"/r/share/s{rng.randrange(60)}" + rng.choice(["", "/x"])
                if name in live:
                    bus.unexport(name)
                    live.discard(name)
                else:
                    bus.export(name, Counted(1))
                    live.add(name)
                assert bus._names["/r/share"] == sorted(bus._children["/r/share"])
            expected = sorted({"a1"} | {n.split("/")[3] for n in live})
            assert children(bus.introspection("/r/share")) == expected
            client = await Connection(bus_address=session_bus).connect()
            for node in ["/r/share", "/r", "/r/share/a1"]:
                reply = await client.call(Message(
                    destination=bus.unique_name, path=node,
                    interface="org.freedesktop.DBus.Introspectable", member="Introspect"))
                assert reply.body == [bus.introspection(node)], node
            client.disconnect()
        finally:
            bus.disconnect()
            await asyncio.wait_for(bus.wait_for_disconnect(), 10)
    asyncio.run(main())


def test_getmanagedobjects_is_refused_while_too_much_waits_to_be_written(session_bus,
                                                                         monkeypatch):
    """A caller has at most LARGE_PER_CALLER GetManagedObjects waiting or
    queued, and nobody gets one while LARGE_QUEUED_MAX bytes of large
    replies wait to be written (every signal and call waits behind them):
    LimitsExceeded, try again. The others are answered."""
    import asyncio
    from dbus_next import MessageType
    from sharedd.bus import connection
    gate = Gate(monkeypatch)

    async def main():
        server, client, things, first = await _held(session_bus, 50, gate)
        other = await connection.Connection(bus_address=session_bus).connect()
        try:
            second = asyncio.ensure_future(_gmo(client, server))
            third = await asyncio.wait_for(_gmo(client, server), 10)
            assert third.message_type == MessageType.ERROR
            assert third.error_name == "org.freedesktop.DBus.Error.LimitsExceeded"
            theirs = asyncio.ensure_future(_gmo(other, server))    # another caller's
            async with asyncio.timeout(10):
                while sum(server._answers_for.values()) < 3:
                    await asyncio.sleep(0.01)
            server._writer.large_bytes += connection.LARGE_QUEUED_MAX   # as if queued
            refused = await asyncio.wait_for(_gmo(other, server), 10)
            assert refused.error_name == "org.freedesktop.DBus.Error.LimitsExceeded"
            server._writer.large_bytes -= connection.LARGE_QUEUED_MAX
            gate.opened.set()
            for reply in await asyncio.wait_for(asyncio.gather(first, second, theirs), 30):
                assert len(_sizes(reply)) == 50
            assert not server._answers_for
        finally:
            await _close(other, client, server)
    asyncio.run(main())


def test_nothing_is_written_after_the_connection_is_gone(session_bus):
    """A reply finished after the connection was lost is not written, and
    the writer does not watch the closed socket's number (a new connection
    may have it)."""
    import asyncio
    from dbus_next import Message, MessageType
    from sharedd.bus.connection import Connection

    async def main():
        bus = await Connection(bus_address=session_bus).connect()
        bus.disconnect()
        await asyncio.wait_for(bus.wait_for_disconnect(), 10)
        watched = []
        bus._writer.loop = type("Loop", (), {"add_writer": lambda *a: watched.append(a)})()
        bus._writer.schedule_write(Message(message_type=MessageType.METHOD_RETURN,
                                           destination=":9.1", reply_serial=1))
        assert not bus._writer.queue and bus._writer.current is None and not watched
    asyncio.run(main())
