"""ListShares, all or filtered, on the real state database while shares
change at every step of the loop: the ids are read aside (never all of
them on the loop), each path is written once, and the answer is brought up
to date from the shares touched meanwhile, in the step that sends it."""

import asyncio
import os
import random

import pytest

from sharedd import store as store_mod
from sharedd.bus import slices, wire
from sharedd.models import Share, Snapshot
from sharedd.store import Listing, Store
from tests.support.lists import joined, marshalled, path, run_beside, sent

STATUSES = ("available", "extending", "error")


def grown(tmp_path, n):
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    with st.tx():
        for k in range(n):
            st.insert_share(Share(id=f"{k:032x}", name=f"n{k}", backend="a" if k % 3 else "b",
                                  protocol="NFS", size_gib=1, status="available",
                                  created_at=k // 7))     # (ties: ordered by id)
    return st


class Counted(Listing):
    """Counts the reads of all the ids on the loop, and the shares looked
    at again."""
    whole = again = 0

    def read(self, *, limit):
        if limit < 0:
            Counted.whole += 1
        return super().read(limit=limit)

    def key(self, share_id):
        Counted.again += 1
        return super().key(share_id)


def listed_while(st, equal, change, table="shares"):
    """A list of the table's rows (equal) with change(rng, step) run at
    every step of the loop meanwhile; returns the answer, the ids the store
    lists in the step that answered, and how many steps ran beside."""
    rng = random.Random(11)

    async def answer():
        got = await slices.listed_paths(Counted(st, table, equal), path)
        return got, st.list_ids(table, **equal)      # (the same step)
    (got, now), steps = run_beside(answer(), lambda n: change(rng, n))
    return got, now, steps


def churn(st, created):
    """Statuses flip, shares come (some with an older created_at) and go,
    a few statements at every step, and now and then one rolled back."""
    def change(rng, step):
        ids = st.share_ids(limit=4000)
        with st.tx(durable=False):
            for _ in range(3):
                s = st.get_share(rng.choice(ids))
                s.status = rng.choice(STATUSES)
                st.update_share(s)
            if step % 5 == 0:
                created[0] += 1
                st.insert_share(Share(id=f"new{created[0]:029x}", name=f"new{created[0]}",
                                      backend="a", protocol="NFS", size_gib=1,
                                      status="available", created_at=rng.randint(0, 400)))
            if step % 7 == 0:
                st.delete_share(rng.choice(ids))
        if step % 11 == 0:
            with pytest.raises(RuntimeError):
                with st.tx(durable=False):
                    s = st.get_share(rng.choice(ids))
                    s.status = "error" if s.status != "error" else "available"
                    st.update_share(s)
                    raise RuntimeError("rolled back")
    return change


@pytest.mark.parametrize("equal", [{}, {"status": "available"},
                                   {"backend": "a", "status": "available"}])
def test_a_long_list_under_constant_change_is_current_when_sent(tmp_path, monkeypatch, equal):
    monkeypatch.setattr(slices, "SLICE", 0.0005)   # (a few chunks of paths per slice)
    st = grown(tmp_path, 3 * slices.ONE_STEP_PATHS)
    try:
        Counted.whole = Counted.again = 0
        got, now, steps = listed_while(st, equal, churn(st, [0]))
        assert isinstance(got, wire.Marshalled) and got.signature == "ao"
        assert sent(got) == marshalled([path(i) for i in now])
        assert len(now) > slices.ONE_STEP_PATHS and steps > 3 and Counted.again > 10
        assert Counted.whole == 0          # never all the ids on the loop
    finally:
        st.close()


@pytest.mark.parametrize("of", [None, "s0"])
def test_a_long_list_of_snapshots_under_constant_change_is_current_when_sent(
        tmp_path, monkeypatch, of):
    """ListSnapshots, all or one share's, while snapshots come and go and
    shares are deleted with theirs (one statement for all of a share's)."""
    monkeypatch.setattr(slices, "SLICE", 0.0005)
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    made = [0]

    def snapshot(share_id, rng):
        made[0] += 1
        st.insert_snapshot(Snapshot(id=f"p{made[0]:031x}", name=f"p{made[0]}", share_id=share_id,
                                    size_gib=1, status="available",
                                    created_at=rng.randint(0, 10 ** 6)))
    rng = random.Random(3)
    with st.tx():
        for k in range(40):
            st.insert_share(Share(id=f"s{k}", name=f"n{k}", backend="a", protocol="NFS",
                                  size_gib=1, status="available", created_at=k))
        for k in range(3 * slices.ONE_STEP_PATHS):
            snapshot("s0" if k % 2 else f"s{k % 40}", rng)

    def change(rng, step):
        with st.tx(durable=False):
            snapshot(rng.choice(["s0", rng.choice(st.share_ids())]), rng)
            gone = st.snapshot_ids(limit=50)
            st.delete_snapshot(gone[rng.randrange(len(gone))])
            if step % 9 == 0:
                live = [i for i in st.share_ids() if i != "s0"]
                if live:
                    st.delete_share(rng.choice(live))
    equal = {} if of is None else {"share_id": of}
    try:
        Counted.whole = Counted.again = 0
        got, now, steps = listed_while(st, equal, change, "snapshots")
        assert sent(got) == marshalled([path(i) for i in now])
        assert len(now) > slices.ONE_STEP_PATHS and steps > 3 and Counted.again > 10
        assert Counted.whole == 0
    finally:
        st.close()


def test_a_list_read_while_more_changed_than_is_remembered_is_read_again(tmp_path, monkeypatch):
    """A burst of more share statements than are remembered: read aside
    again. Under constant bursts: after ROUNDS reads, read on the loop."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    monkeypatch.setattr(store_mod, "ROW_CHANGES_KEPT", 8)
    st = grown(tmp_path, slices.ONE_STEP_PATHS + 50)
    asides = []
    monkeypatch.setattr(Counted, "aside", lambda self: asides.append(1) or Listing.aside(self))
    try:
        Counted.whole = 0
        burst = churn(st, [0])
        got, now, _ = listed_while(st, {"status": "available"},
                                   lambda rng, step: step == 2 and [burst(rng, k) for k in range(5)])
        assert sent(got) == marshalled([path(i) for i in now])
        assert Counted.whole == 0 and len(asides) == 2

        asides.clear()
        got, now, _ = listed_while(st, {"status": "available"}, churn(st, [100]))
        assert got == [path(i) for i in now]
        assert Counted.whole == 1 and len(asides) == slices.ROUNDS
    finally:
        st.close()


def test_a_quiet_list_is_read_once_aside_and_each_path_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(slices, "SLICE", 0.0)
    st = grown(tmp_path, 2 * slices.ONE_STEP_PATHS)
    written = []
    monkeypatch.setattr(slices, "string_element",
                        lambda p: written.append(p) or wire.string_element(p))
    try:
        Counted.whole = 0
        got, now, _ = listed_while(st, {"backend": "a"}, lambda rng, step: None)
        assert sent(got) == marshalled([path(i) for i in now])
        assert sorted(written) == sorted(path(i) for i in now) and Counted.whole == 0
    finally:
        st.close()


def test_a_lists_leftovers_are_freed_after_its_answer_a_slice_at_a_time(tmp_path):
    """Freeing 10,000 keys and paths in the step that answers held the
    loop 3-6 ms: they are freed later, FREED at a time."""
    st = grown(tmp_path, 3 * slices.FREED)

    async def main():
        got = await slices.listed_paths(Listing(st, "shares", {}), path)
        (task,) = slices._freeing                    # (nothing freed yet)
        steps = 0
        while not task.done():
            steps += 1
            await asyncio.sleep(0)
        return got, steps
    try:
        got, steps = asyncio.run(main())
        assert sent(got) == marshalled([path(i) for i in st.share_ids()])
        assert steps >= 3 * 3 and not slices._freeing      # (keys, at and paths: 3 slices each)
    finally:
        st.close()


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_string_elements_make_the_array_the_writer_of_ao_writes(n):
    strings = [path("x" * k) for k in range(n)] + ["", "abc", "abcd"][:n]
    assert joined(wire.string_array([wire.string_element(x) for x in strings])) == marshalled(strings)
    with pytest.raises(ValueError):
        wire.string_element("a\0b")
