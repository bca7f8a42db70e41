"""Short pauses of Python's cycle collector, at any number of shares.

A full collection walks every object the collector tracks, in whichever
thread set it off, holding the interpreter: with 10,000 shares (about a
quarter of a million objects) that stops the event loop for about 100 ms,
and under load a full collection comes every few seconds. So what survives
a full collection is frozen (gc.freeze: left out of later collections;
reference counting still frees it), and each full collection walks only
what was made since the last one.

Garbage in a reference cycle through a frozen object is not found until
everything is thawed and collected once: when the frozen objects have grown
by a quarter since the last such collection (the rule CPython itself uses
for full collections), and at least once an hour. That walk stops the loop
for 200-300 ms at 10,000 shares, so a thaw that is due waits for a quiet
moment (no call for QUIET seconds), for at most QUIET_WAIT: while shares
are being made one after another the thaws they make due come after the
burst, not in the middle of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Callable, Dict, Iterator

log = logging.getLogger(__name__)

#: how often the frozen objects are counted (a walk of the list: ~1 ms at 250,000)
CHECK_INTERVAL = 60.0
#: a full collection of everything at least this often
THAW_INTERVAL = 3600.0
#: ... and as soon as the frozen objects grew by this much since the last
THAW_GROWTH = 1.25
#: a due thaw waits until no call came for this many seconds ...
QUIET = 2.0
#: ... for at most this many (under constant load it comes anyway)
QUIET_WAIT = 600.0


#: objects the collections of each generation found unreachable (freed),
#: while short_pauses() is on: 0 on ordinary paths, where reference counting
#: frees everything (the metric sharedd_gc_collected_objects_total)
collected = [0, 0, 0]
#: the frozen objects when last counted (every CHECK_INTERVAL: the count walks
#: them all, too long for every metrics write; sharedd_gc_frozen_objects)
frozen = 0


def _after_collection(phase: str, info: Dict[str, int]) -> None:
    # A gc callback: runs in the thread that set the collection off, after it.
    if phase != "stop":
        return
    generation = info.get("generation", 0)
    collected[generation] += info.get("collected", 0)
    if generation == 2:
        gc.freeze()


def thaw() -> bool:
    """One full collection of everything, frozen objects included; what
    survives it is frozen again. False if it could not run (another
    thread's collection was under way: gc.collect() then does nothing)."""
    before = gc.get_stats()[2]["collections"]
    started = time.monotonic()
    gc.unfreeze()
    found = gc.collect()
    if gc.get_stats()[2]["collections"] == before:
        return False
    log.debug("full collection of %d frozen objects: %d unreachable, %.0f ms",
              gc.get_freeze_count(), found, (time.monotonic() - started) * 1e3)
    return True


@contextlib.contextmanager
def short_pauses() -> Iterator[None]:
    """For the daemon's life: what start-up made is collected and frozen on
    entry, the survivors of every full collection after it too."""
    gc.callbacks.append(_after_collection)
    try:
        gc.collect()
        yield
    finally:
        gc.unfreeze()
        if _after_collection in gc.callbacks:
            gc.callbacks.remove(_after_collection)


def _count() -> int:
    global frozen
    frozen = gc.get_freeze_count()
    return frozen


async def thaw_when_due(idle: Callable[[], float], check: float = CHECK_INTERVAL,
                        every: float = THAW_INTERVAL, growth: float = THAW_GROWTH,
                        quiet: float = QUIET, quiet_wait: float = QUIET_WAIT) -> None:
    """Thaws when due, each at a quiet moment: idle() is how many seconds
    ago the last call came."""
    last, base = time.monotonic(), max(_count(), 1)
    while True:
        await asyncio.sleep(check)
        if time.monotonic() - last < every and _count() <= base * growth:
            continue
        until = time.monotonic() + quiet_wait
        while idle() < quiet and time.monotonic() < until:
            await asyncio.sleep(max(quiet - idle(), 0.01))
        if thaw():
            last, base = time.monotonic(), max(_count(), 1)
