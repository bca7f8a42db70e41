"""Short pauses of Python's cycle collector, at any number of shares.

A full collection walks every object the collector tracks, in whichever
thread set it off, holding the interpreter: with 10,000 shares (about a
quarter of a million objects) that stops the event loop for about 100 ms,
and under load a full collection comes every few seconds. So what survives
a full collection is frozen (gc.freeze: left out of later collections;
reference counting still frees it), and each full collection walks only
what was made since the last one.

Garbage in a reference cycle among frozen objects would never be found:
once an hour everything is thawed and collected once (one full pause an
hour, in place of one every few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Dict, Iterator

#: how often frozen objects are collected too (cyclic garbage among them)
THAW_INTERVAL = 3600.0


def _freeze_survivors(phase: str, info: Dict[str, int]) -> None:
    # A gc callback: runs in the thread that set the collection off, after it.
    if phase == "stop" and info.get("generation") == 2:
        gc.freeze()


def thaw() -> None:
    """One full collection of everything, frozen objects included; what
    survives it is frozen again."""
    gc.unfreeze()
    gc.collect()


@contextlib.contextmanager
def short_pauses() -> Iterator[None]:
    """For the daemon's life: what start-up made is collected and frozen on
    entry, the survivors of every full collection after it too."""
    gc.callbacks.append(_freeze_survivors)
    try:
        gc.collect()
        yield
    finally:
        gc.callbacks.remove(_freeze_survivors)
        gc.unfreeze()


async def thaw_every(interval: float = THAW_INTERVAL) -> None:
    while True:
        await asyncio.sleep(interval)
        thaw()
