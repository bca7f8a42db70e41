"""The cycle collector's pauses (sharedd/collector.py): survivors of a full
collection are frozen, so the next walks only what was made since; cyclic
garbage through frozen objects is found by a thaw, which comes when the
frozen objects grew by a quarter (or after an hour)."""

import asyncio
import gc
import weakref

from sharedd import collector


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
        assert collector.thaw()
        assert watch() is None          # the thaw finds it
        assert gc.get_freeze_count() > 0     # and freezes the survivors again
    assert gc.get_freeze_count() == 0
    assert collector._freeze_survivors not in gc.callbacks


def test_a_thaw_comes_when_the_frozen_objects_grew_by_a_quarter(monkeypatch):
    thaws = []
    monkeypatch.setattr(collector, "thaw", lambda: thaws.append(gc.get_freeze_count()) or True)

    async def grow_then_wait():
        with collector.short_pauses():
            task = asyncio.ensure_future(collector.thaw_when_due(check=0.01))
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
