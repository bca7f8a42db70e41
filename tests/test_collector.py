"""The cycle collector's pauses (sharedd/collector.py): survivors of a full
collection are frozen, so the next walks only what was made since; cyclic
garbage among frozen objects is found by the hourly thaw."""

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


def test_survivors_of_a_full_collection_are_left_out_of_the_next_and_the_thaw_finds_their_garbage():
    garbage = _cycle()
    dead = weakref.ref(garbage)
    del garbage
    with collector.short_pauses():
        assert dead() is None                   # what was garbage on entry is collected
        kept = [_cycle() for _ in range(100)]
        frozen = gc.get_freeze_count()
        gc.collect()
        assert gc.get_freeze_count() >= frozen + 200     # the survivors, frozen
        assert not [o for o in gc.get_objects() if isinstance(o, Node)]   # not walked again
        watch = weakref.ref(kept[0])
        del kept
        gc.collect()
        assert watch() is not None      # frozen cyclic garbage: a full collection misses it
        collector.thaw()
        assert watch() is None          # the thaw finds it
        assert gc.get_freeze_count() > 0     # and freezes the survivors again
    assert gc.get_freeze_count() == 0
    assert collector._freeze_survivors not in gc.callbacks
