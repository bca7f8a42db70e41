"""Long lists of paths (ListShares, ListSnapshots at 10,000 shares) are
written in slices of the loop's time, other callbacks running between
them, and are still as of the step that sends them: the ids are read again
when the state changed meanwhile, and written again only if they differ."""

import asyncio

import pytest
from dbus_next import DBusError
from dbus_next.constants import ErrorType

from sharedd.bus import audit, slices, wire


def path(i):
    return f"/org/sharedd/Sharedd1/share/{i}"


def marshalled(paths):
    buf = bytearray()
    wire.writer("ao")(buf, paths)
    return bytes(buf)


class State:
    """ids and a change counter; every read is counted."""

    def __init__(self, n):
        self.ids, self.count, self.reads, self.heads = [f"{i:032x}" for i in range(n)], 0, 0, 0

    def read(self, *, limit):
        if limit >= 0:
            self.heads += 1          # (the first few, to learn whether the list is short)
            return self.ids[:limit]
        self.reads += 1
        return list(self.ids)

    def changes(self):
        return self.count


def run_beside(coro, other):
    """coro, with other(n) called at every step of the loop meanwhile;
    returns coro's result and how many steps other ran in."""
    async def main():
        steps = 0
        done = False

        async def beside():
            nonlocal steps
            while not done:
                steps += 1
                other(steps)
                await asyncio.sleep(0)
        task = asyncio.ensure_future(beside())
        await asyncio.sleep(0)
        try:
            return await coro, steps
        finally:
            done = True
            await task
    return asyncio.run(main())


def test_a_short_list_is_answered_in_one_step():
    state = State(slices.ONE_STEP_PATHS)
    got, steps = run_beside(slices.object_paths(state.read, path, state.changes), lambda n: None)
    assert got == [path(i) for i in state.ids]
    assert steps == 1 and state.reads == 1


def test_a_long_list_is_written_in_slices_as_the_library_would(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)          # a pause after every chunk
    state = State(slices.ONE_STEP_PATHS + 5)
    got, steps = run_beside(slices.object_paths(state.read, path, state.changes), lambda n: None)
    assert isinstance(got, wire.Marshalled) and got.signature == "ao"
    assert got.body == marshalled([path(i) for i in state.ids])
    assert steps >= 4                 # the other task ran between the slices
    assert state.reads == 1           # nothing changed: read once


def test_a_change_that_leaves_the_ids_keeps_the_writing(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)

    def change(n):
        state.count += 1              # e.g. an Extend: committed, same ids
    got, _ = run_beside(slices.object_paths(state.read, path, state.changes), change)
    assert state.reads == 2           # read again once, found equal
    assert got.body == marshalled([path(i) for i in state.ids])


def test_ids_that_change_meanwhile_are_written_again(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)

    def change(n):
        if n == 2:                    # one share gone, one new, while written
            state.ids = state.ids[1:] + ["f" * 32]
            state.count += 1
    got, _ = run_beside(slices.object_paths(state.read, path, state.changes), change)
    assert state.reads == 2           # read, read again (changed), written again
    assert got.body == marshalled([path(i) for i in state.ids])


def under_constant_change(state, aside=None):
    """The answer, while a share comes and one goes at every step, and the
    ids when it went out."""
    answered = []

    def change(n):
        state.ids = state.ids[1:] + [f"{n:032d}"]
        state.count += 1

    async def answer():
        got = await slices.object_paths(state.read, path, state.changes, aside)
        answered.append(list(state.ids))      # the state when the answer goes out
        return got
    got, _ = run_beside(answer(), change)
    return got, answered[0]


def test_under_constant_change_the_last_read_is_answered_in_its_own_step(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)
    got, ids = under_constant_change(state)
    assert state.reads == slices.ROUNDS + 1
    assert got == [path(i) for i in ids]


def test_a_string_with_nul_is_refused_not_written():
    with pytest.raises(ValueError):
        wire.write_strings(bytearray(), ["ok", "b\0d"])


def test_long_lists_are_written_a_few_at_a_time(monkeypatch):
    """A hundred callers at once hold LIST_TURNS lists, not a hundred."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)
    writing, most = 0, 0
    real = slices._written

    async def written(*args):
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        try:
            return await real(*args)
        finally:
            writing -= 1
    monkeypatch.setattr(slices, "_written", written)

    async def main():
        return await asyncio.gather(*(slices.object_paths(state.read, path, state.changes)
                                      for _ in range(20)))
    answers = asyncio.run(main())
    assert most == slices.LIST_TURNS
    assert all(a.body == answers[0].body for a in answers)


def test_a_short_list_does_not_wait_behind_long_ones(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    long, short = State(slices.ONE_STEP_PATHS + 1), State(3)
    done = []

    async def one(state, name):
        await slices.object_paths(state.read, path, state.changes)
        done.append(name)

    async def main():
        longs = [asyncio.ensure_future(one(long, "long")) for _ in range(4)]
        await asyncio.sleep(0)           # the long ones have taken the turns
        await one(short, "short")
        await asyncio.gather(*longs)
    asyncio.run(main())
    assert done[0] == "short"


async def ask(state, caller):
    """object_paths as a call over the bus from caller (a unique name)."""
    token = audit.CALL.set((None, caller))
    try:
        return await slices.object_paths(state.read, path, state.changes)
    finally:
        audit.CALL.reset(token)


def test_a_caller_has_a_few_long_lists_at_once_the_rest_are_refused(monkeypatch):
    """One caller asking for many long lists at once cannot take every
    turn from the others: beyond LISTS_PER_CALLER it is told to try again,
    before any long work; its short lists and other callers' lists are answered."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    long, short = State(slices.ONE_STEP_PATHS + 1), State(3)

    async def main():
        hostile = [asyncio.ensure_future(ask(long, ":1.66")) for _ in range(10)]
        other = asyncio.ensure_future(ask(long, ":1.7"))
        await asyncio.sleep(0)
        mine_short = await ask(short, ":1.66")
        got = await asyncio.gather(*hostile, return_exceptions=True)
        return got, await other, mine_short
    got, other, mine_short = asyncio.run(main())
    refused = [g for g in got if isinstance(g, DBusError)]
    assert len(refused) == 10 - slices.LISTS_PER_CALLER
    assert all(r.type == ErrorType.LIMITS_EXCEEDED.value for r in refused)
    answered = [g for g in got if not isinstance(g, DBusError)]
    assert all(a.body == marshalled([path(i) for i in long.ids]) for a in [*answered, other])
    assert long.reads == len(answered) + 1    # (the refused read only the first few)
    assert mine_short == [path(i) for i in short.ids]
    assert not slices._turns.of               # (nothing left counted)


def test_a_cancelled_list_is_no_longer_counted_against_its_caller(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    long = State(slices.ONE_STEP_PATHS + 1)

    async def main():
        lists = [asyncio.ensure_future(ask(long, f":1.{i}")) for i in range(4)]
        await asyncio.sleep(0)              # two writing, two waiting for a turn
        for task in lists:
            task.cancel()
        await asyncio.gather(*lists, return_exceptions=True)
        assert not slices._turns.of
        return await ask(long, ":1.0")
    assert asyncio.run(main()).body == marshalled([path(i) for i in long.ids])


class Aside(State):
    """State whose ids are also read in another thread, as of the call
    (as Store.read's view is opened when it is called)."""

    def __init__(self, n):
        super().__init__(n)
        self.asides = 0

    async def aside(self):
        self.asides += 1
        ids = list(self.ids)
        return await asyncio.to_thread(lambda: ids)


def test_ids_read_aside_are_written_without_a_read_on_the_loop(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = Aside(slices.ONE_STEP_PATHS + 1)

    def extend(n):
        pass                          # (an Extend moves no membership count)
    got, _ = run_beside(slices.object_paths(state.read, path, state.changes, state.aside),
                        extend)
    assert got.body == marshalled([path(i) for i in state.ids])
    assert state.asides == 1 and state.reads == 0


def test_ids_read_aside_while_shares_came_are_read_again(monkeypatch):
    """A read aside is as of its call: a share that came while it ran (or
    while the paths were written) makes it stale, and it is read again; under
    constant change, the last resort is one read on the loop, answered in
    its own step."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = Aside(slices.ONE_STEP_PATHS + 1)

    def once(n):
        if n == 2:                    # (the aside read has begun)
            state.ids = state.ids + ["e" * 32]
            state.count += 1
    got, _ = run_beside(slices.object_paths(state.read, path, state.changes, state.aside), once)
    assert got.body == marshalled([path(i) for i in state.ids])
    assert state.asides == 2 and state.reads == 0

    state = Aside(slices.ONE_STEP_PATHS + 1)
    got, ids = under_constant_change(state, state.aside)
    assert state.asides == slices.ROUNDS and state.reads == 1
    assert got == [path(i) for i in ids]


def test_a_short_list_of_all_is_answered_at_once_on_the_loop():
    """A list of all shares is read aside only when it is long: the first
    ONE_STEP_PATHS + 1 ids, read on the loop, tell (one step, no turn, no
    view of the state held)."""
    state = Aside(slices.ONE_STEP_PATHS)
    got, steps = run_beside(slices.object_paths(state.read, path, state.changes, state.aside),
                            lambda n: None)
    assert got == [path(i) for i in state.ids]
    assert steps == 1 and state.heads == 1 and state.asides == 0 and state.reads == 0
