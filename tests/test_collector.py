"""The cycle collector's pauses (sharedd/collector.py): survivors of a full
collection are frozen, so the next walks only what was made since; cyclic
garbage through frozen objects is found by a thaw, which comes when the
frozen objects grew by a quarter (or after an hour). A refused bus call and
a failed job, both common, leave no such cycle."""

import asyncio
import contextlib
import gc
import time
import weakref

import pytest

from sharedd import collector


@contextlib.contextmanager
def collector_off():
    """Python's cycle collector off inside (what is freed is freed by
    reference counting alone), back as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Node:
    def __init__(self):
        self.other = None


def _cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_survivors_of_a_full_collection_are_left_out_of_the_next_and_a_thaw_finds_their_garbage():
    garbage = _cycle()
    dead = weakref.ref(garbage)
    del garbage
    with collector.short_pauses():
        assert dead() is None                   # what was garbage on entry is collected
        kept = [_cycle() for _ in range(100)]
        frozen = gc.get_freeze_count()
        gc.collect(0)
        gc.collect(1)
        assert gc.get_freeze_count() == frozen  # young collections freeze nothing
        gc.collect()
        assert gc.get_freeze_count() >= frozen + 200     # the survivors of a full one
        assert not [o for o in gc.get_objects() if isinstance(o, Node)]   # not walked again
        watch = weakref.ref(kept[0])
        del kept
        gc.collect()
        assert watch() is not None      # frozen cyclic garbage: a full collection misses it
        found = sum(collector.collected)
        assert collector.thaw()
        assert watch() is None          # the thaw finds it
        assert sum(collector.collected) >= found + 200      # and counts it (a metric)
        assert gc.get_freeze_count() > 0     # and freezes the survivors again
    assert gc.get_freeze_count() == 0
    assert collector._after_collection not in gc.callbacks


def test_a_thaw_comes_when_the_frozen_objects_grew_by_a_quarter(monkeypatch):
    thaws = []
    monkeypatch.setattr(collector, "thaw", lambda: thaws.append(gc.get_freeze_count()) or True)

    async def grow_then_wait():
        with collector.short_pauses():
            task = asyncio.ensure_future(collector.thaw_when_due(lambda: 60.0, check=0.01))
            await asyncio.sleep(0.1)
            assert thaws == []                  # no growth, and the hour is not up
            base = gc.get_freeze_count()
            kept = [_cycle() for _ in range(base)]     # twice the objects
            gc.collect()
            await asyncio.sleep(0.1)
            task.cancel()
            del kept
            return base
    base = asyncio.run(grow_then_wait())
    assert thaws and thaws[0] >= base * 1.25


def test_a_due_thaw_waits_for_a_quiet_moment_but_not_for_ever(monkeypatch):
    """Due, a thaw waits until no call came for `quiet` seconds; under
    constant calls it comes after `quiet_wait` anyway."""
    thaws = []
    monkeypatch.setattr(collector, "thaw", lambda: thaws.append(time.monotonic()) or True)

    async def run(calls_for, quiet_wait):
        started = time.monotonic()
        calls_until = started + calls_for

        def idle():                      # calls keep coming until calls_until
            now = time.monotonic()
            return now - min(now, calls_until)
        task = asyncio.ensure_future(collector.thaw_when_due(
            idle, check=0.01, every=0.0, quiet=0.2, quiet_wait=quiet_wait))
        async with asyncio.timeout(30):
            while not thaws:
                await asyncio.sleep(0.01)
        task.cancel()
        return started, calls_until, thaws.pop()

    started, calls_until, thawed = asyncio.run(run(0.5, quiet_wait=60))
    assert thawed >= calls_until + 0.2          # after the calls stopped, and a quiet 0.2 s
    started, calls_until, thawed = asyncio.run(run(60, quiet_wait=0.3))
    assert started + 0.3 <= thawed < calls_until     # calls never stopped: it came anyway


class Boom(Exception):
    """An error that can be watched (weakref) to see what frees it."""


def test_a_failed_job_leaves_no_reference_cycle_behind():
    """Its error goes with reference counting alone: nothing waits for the
    collector (which, with survivors frozen, may not look for an hour)."""
    from sharedd.jobs import Jobs

    class Quiet:
        def __getattr__(self, name):
            return lambda arg: None
    watch = []

    async def main():
        jobs = Jobs(Quiet())
        done = asyncio.get_running_loop().create_future()

        def boom():
            error = Boom("failed")
            watch.append(weakref.ref(error))
            return error

        async def body(started):
            started.set_result(jobs.create("test", [], 0))
            done.set_result(None)
            raise boom()
        tasks = []
        await jobs.background(lambda coro: tasks.append(asyncio.ensure_future(coro)), body)
        await done
        await asyncio.gather(*tasks)
    with collector_off():
        asyncio.run(main())
        assert watch and watch[0]() is None


def test_a_job_refused_before_it_starts_leaves_no_reference_cycle_behind():
    """A background operation refused before it makes its job: the caller
    gets the refusal, and the error goes with reference counting alone (it
    used to sit in the future that run()'s frame, held by its traceback,
    held)."""
    from sharedd.errors import InvalidState
    from sharedd.jobs import Jobs
    watch, caught = [], []

    async def main():
        jobs = Jobs(None)

        def refusal():
            error = InvalidState("not now")
            watch.append(weakref.ref(error))
            return error

        async def body(started):
            raise refusal()
        tasks = []
        try:
            await jobs.background(lambda coro: tasks.append(asyncio.ensure_future(coro)), body)
        except InvalidState as exc:
            caught.append(str(exc))
        await asyncio.gather(*tasks)
    with collector_off():
        asyncio.run(main())
        assert caught == ["not now"]
        assert watch and watch[0]() is None


def test_a_refusal_after_its_caller_left_leaves_no_reference_cycle_behind():
    """The caller is cancelled while the body still works; the body is
    then refused: nobody reads the error, and nothing keeps it."""
    from sharedd.errors import InvalidState
    from sharedd.jobs import Jobs
    watch = []

    async def main():
        jobs = Jobs(None)
        go = asyncio.get_running_loop().create_future()

        def refusal():
            error = InvalidState("too late")
            watch.append(weakref.ref(error))
            return error

        async def body(started):
            await go
            raise refusal()
        tasks = []
        caller = asyncio.ensure_future(
            jobs.background(lambda coro: tasks.append(asyncio.ensure_future(coro)), body))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        go.set_result(None)
        await asyncio.gather(*tasks)
        await asyncio.sleep(0)          # the done callback that drops it
    with collector_off():
        asyncio.run(main())
        assert watch and watch[0]() is None


def test_a_job_body_that_makes_no_job_is_refused():
    from sharedd.jobs import Jobs

    async def main():
        jobs = Jobs(None)

        async def body(started):
            return None
        tasks = []
        with pytest.raises(RuntimeError, match="without starting its job"):
            await asyncio.wait_for(
                jobs.background(lambda coro: tasks.append(asyncio.ensure_future(coro)), body), 10)
        await asyncio.gather(*tasks)
    asyncio.run(main())


def test_a_refused_bus_call_leaves_no_reference_cycle_behind():
    """The reply to a call whose method raised a D-Bus error: the error goes
    with reference counting alone (it used to be raised again in the reply
    callback, whose frame then held the task that held the error)."""
    from dbus_next import DBusError, Message
    from dbus_next.service import ServiceInterface, method
    from sharedd.bus.service import _Bus
    watch, replies = [], []

    def refusal():
        error = DBusError("org.sharedd.Sharedd1.Error.InvalidState", "no")
        watch.append(weakref.ref(error))
        return error

    class Iface(ServiceInterface):
        @method()
        async def Refuse(self) -> "s":   # noqa: F821 (a D-Bus signature)
            raise refusal()

    async def main():
        iface = Iface("org.sharedd.Test")
        [refuse] = ServiceInterface._get_methods(iface)
        handler = _Bus._make_method_handler(None, iface, refuse)
        msg = Message(destination="org.sharedd.Test", path="/", interface="org.sharedd.Test",
                      member="Refuse", serial=1)
        handler(msg, replies.append)
        while not replies:
            await asyncio.sleep(0)
    with collector_off():
        asyncio.run(main())
        assert replies[0].error_name == "org.sharedd.Sharedd1.Error.InvalidState"
        assert watch and watch[0]() is None


def _cyclic_garbage_of(work) -> int:
    """How many objects work() leaves that only the cycle collector frees."""
    gc.collect()
    with collector_off():
        work()
        return gc.collect()


def test_engine_operations_leave_no_cyclic_garbage():
    """Creates, grants, extends, denies, deletes and refusals through the
    engine, with the spool hook (records staged in worker threads, checked
    against the schema and written): reference counting frees all they
    leave. A schema check used to keep each failed oneOf form with its
    traceback, and each record's JSON was indented (json's Python encoder,
    a cycle per call): hundreds of objects per operation for the collector,
    and, with survivors frozen, kept until the next thaw."""
    from sharedd.errors import InvalidArgument
    from tests.test_engine import CONFIG, Harness
    h = Harness(config=CONFIG.replace("tests.testhooks:RecordingHook", "spool"))
    try:
        async def refused(share):
            # caught in the loop, as the adapter does (run_until_complete
            # raising a task's error is itself a cycle: frame, task, error)
            try:
                await h.engine.allow_access(share.id, "ip", "not an address", "rw", {})
            except InvalidArgument:
                return True
            return False

        def rounds(n):
            for i in range(n):
                share = h.create(f"g{i}")
                rule = h.allow(share, f"10.0.{i}.1")
                h.run(h.engine.extend_share(share.id, 2, {}))
                assert h.run(refused(share))
                h.deny(share, rule)
                h.settle()
                h.run(h.engine.delete_share(share.id, {}))
                h.settle()
        rounds(2)                       # caches, pools and threads made once
        assert _cyclic_garbage_of(lambda: rounds(10)) == 0
    finally:
        h.close()


def test_bus_calls_leave_no_cyclic_garbage(session_bus):
    """Calls answered and refused, property reads and signals between two
    of our connections leave nothing for the collector. dbus-next defined a
    class per call for its reply and made a fresh unmarshaller per message
    whose table of its own bound methods held it (and the message's bytes):
    a few dozen objects per message until a collection."""
    from dbus_next import DBusError, Message, MessageType
    from dbus_next.service import ServiceInterface, dbus_property, method, signal as dsignal
    from sharedd.bus.connection import Connection

    class Iface(ServiceInterface):
        @method()
        def Echo(self, text: "s") -> "s":          # noqa: F821 (a D-Bus signature)
            return text

        @method()
        def Refuse(self) -> "s":                   # noqa: F821
            raise DBusError("org.sharedd.Test.Error.No", "no")

        @dbus_property()
        def Size(self) -> "t":                     # noqa: F821
            return 7

        @Size.setter
        def Size(self, value: "t"):                # noqa: F821
            pass

        @dsignal()
        def Changed(self) -> "s":                  # noqa: F821
            return "x"

    async def main():
        server = await Connection(bus_address=session_bus).connect()
        client = await Connection(bus_address=session_bus).connect()
        iface = Iface("org.sharedd.Test")
        server.export("/t", iface)
        heard = []
        client.add_message_handler(
            lambda msg: heard.append(msg.member) if msg.member == "Changed" else None)
        await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                  interface="org.freedesktop.DBus", member="AddMatch",
                                  signature="s",
                                  body=["type='signal',interface='org.sharedd.Test'"]))

        async def call(member, sig="", body=(), iface_name="org.sharedd.Test"):
            return await client.call(Message(destination=server.unique_name, path="/t",
                                             interface=iface_name, member=member,
                                             signature=sig, body=list(body)))

        async def rounds(n):
            for i in range(n):
                assert (await call("Echo", "s", [f"hello {i}"])).body == [f"hello {i}"]
                assert (await call("Refuse")).message_type == MessageType.ERROR
                reply = await call("Get", "ss", ["org.sharedd.Test", "Size"],
                                   "org.freedesktop.DBus.Properties")
                assert reply.body[0].value == 7
                iface.Changed()
                await call("Echo", "s", ["after the signal"])   # it arrives first
                assert heard.pop() == "Changed"
        try:
            await rounds(3)
            gc.collect()
            with collector_off():
                await rounds(30)
                return gc.collect()
        finally:
            for c in (client, server):
                c.disconnect()
                await asyncio.wait_for(c.wait_for_disconnect(), 10)
    assert asyncio.run(main()) == 0
