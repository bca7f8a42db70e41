"""Long lists of paths (ListShares, ListSnapshots at 10,000 shares) are
read aside and written in slices of the loop's time, other callbacks
running between them, and are still as of the step that sends them: the
ids touched meanwhile are looked at again. Here on a listing in memory;
tests/test_share_listing.py runs the same on the state database."""

import asyncio

import pytest
from dbus_next import DBusError
from dbus_next.constants import ErrorType

from sharedd.bus import audit, slices, wire
from tests.support.lists import marshalled, path, run_beside, sent


class State:
    """A listing in memory: ids in the order of their keys, a log of the
    ids touched; every read is counted."""

    def __init__(self, n):
        self.made = 0
        self.ids, self.log = [], []
        self.reads = self.heads = self.asides = 0
        for _ in range(n):
            self.add()

    def add(self):
        self.made += 1
        self.ids.append(f"{self.made:032x}")
        self.log.append(self.ids[-1])

    def drop(self, i):
        self.ids.remove(i)
        self.log.append(i)

    def touch(self, i):                 # (e.g. an Extend: same ids)
        self.log.append(i)

    def read(self, *, limit):
        if limit >= 0:
            self.heads += 1          # (the first few, to learn whether the list is short)
            return self.ids[:limit]
        self.reads += 1
        return list(self.ids)

    async def aside(self):
        self.asides += 1
        version, keys = len(self.log), [(int(i, 16), i) for i in self.ids]
        return version, await asyncio.to_thread(lambda: keys)

    def changed_since(self, version):
        return len(self.log), set(self.log[version:])

    def key(self, i):
        return (int(i, 16), i) if i in self.ids else None


def test_a_short_list_is_answered_in_one_step():
    state = State(slices.ONE_STEP_PATHS)
    got, steps = run_beside(slices.listed_paths(state, path), lambda n: None)
    assert got == [path(i) for i in state.ids]
    assert steps == 1 and state.heads == 1 and state.asides == 0 and state.reads == 0


def test_a_long_list_is_read_aside_and_written_in_slices_as_the_library_would(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)          # a pause after every chunk
    state = State(slices.ONE_STEP_PATHS + 5)
    got, steps = run_beside(slices.listed_paths(state, path), lambda n: None)
    assert sent(got) == marshalled([path(i) for i in state.ids])
    assert steps >= 4                 # the other task ran between the slices
    assert state.asides == 1 and state.reads == 0


def test_a_change_that_leaves_the_ids_is_looked_at_not_read_again(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)
    got, _ = run_beside(slices.listed_paths(state, path), lambda n: state.touch(state.ids[n % len(state.ids)]))
    assert sent(got) == marshalled([path(i) for i in state.ids])
    assert state.asides == 1 and state.reads == 0


def under_constant_change(state):
    """The answer, while a share comes and one goes at every step, and the
    ids when it went out."""
    answered = []

    def change(n):
        state.drop(state.ids[n % len(state.ids)])
        state.add()

    async def answer():
        got = await slices.listed_paths(state, path)
        answered.append(list(state.ids))      # the state when the answer goes out
        return got
    got, _ = run_beside(answer(), change)
    return got, answered[0]


def test_under_constant_change_the_answer_is_current_when_it_goes(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)
    got, ids = under_constant_change(state)
    assert sent(got) == marshalled([path(i) for i in ids])
    assert state.asides == 1 and state.reads == 0


def test_a_list_that_cannot_catch_up_is_read_again_then_on_the_loop(monkeypatch):
    """More changes than it can look at (CATCH_UP_SLICES slices of them, or
    more than are remembered): read aside again; after ROUNDS reads, one
    read on the loop, answered in its own step."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    monkeypatch.setattr(slices, "CATCH_UP_SLICES", 1)
    state = State(slices.ONE_STEP_PATHS + 1)

    def busy(n):                        # (more than a slice looks at)
        for k in range(2 * slices.LOOKS):
            state.touch(state.ids[(n + k) % len(state.ids)])
    got, _ = run_beside(slices.listed_paths(state, path), busy)
    assert got == [path(i) for i in state.ids]
    assert state.asides == slices.ROUNDS and state.reads == 1

    state = State(slices.ONE_STEP_PATHS + 1)
    state.changed_since = lambda version: None          # (forgotten)
    got, ids = under_constant_change(state)
    assert got == [path(i) for i in ids]
    assert state.asides == slices.ROUNDS and state.reads == 1


def test_a_string_with_nul_is_refused_not_written():
    with pytest.raises(ValueError):
        wire.write_strings(bytearray(), ["ok", "b\0d"])
    with pytest.raises(ValueError):
        wire.string_element("b\0d")


def test_long_lists_are_written_a_few_at_a_time(monkeypatch):
    """A hundred callers at once hold LIST_TURNS lists, not a hundred."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    state = State(slices.ONE_STEP_PATHS + 1)
    writing, most = 0, 0
    real = slices._kept

    async def kept(*args):
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        try:
            return await real(*args)
        finally:
            writing -= 1
    monkeypatch.setattr(slices, "_kept", kept)

    async def main():
        return await asyncio.gather(*(slices.listed_paths(state, path) for _ in range(20)))
    answers = asyncio.run(main())
    assert most == slices.LIST_TURNS
    assert all(sent(a) == sent(answers[0]) for a in answers)


def test_a_short_list_does_not_wait_behind_long_ones(monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    long, short = State(slices.ONE_STEP_PATHS + 1), State(3)
    done = []

    async def one(state, name):
        await slices.listed_paths(state, path)
        done.append(name)

    async def main():
        longs = [asyncio.ensure_future(one(long, "long")) for _ in range(4)]
        await asyncio.sleep(0)           # the long ones have taken the turns
        await one(short, "short")
        await asyncio.gather(*longs)
    asyncio.run(main())
    assert done[0] == "short"


async def ask(state, caller):
    """listed_paths as a call over the bus from caller (a unique name)."""
    token = audit.CALL.set((None, caller))
    try:
        return await slices.listed_paths(state, path)
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
    assert all(sent(a) == marshalled([path(i) for i in long.ids]) for a in [*answered, other])
    assert long.asides == len(answered) + 1    # (the refused read only the first few)
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
    assert sent(asyncio.run(main())) == marshalled([path(i) for i in long.ids])
