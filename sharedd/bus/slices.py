"""Answers too long for one step of the event loop, written in slices.

At 10,000 shares, writing every object's entry (GetManagedObjects,
managed.py) or every share's path (ListShares) takes tens of milliseconds of
Python; done in one callback, every other caller waits that long. Written
in slices of about SLICE seconds, other callbacks run between them.

An answer written in slices is still as of one moment, the moment it is
sent: what changed meanwhile is read again, and the answer goes out in the
same step as its last read (the bus's async methods are answered in the
step in which they return: service.py). So every signal a caller received
before the answer is about a state the answer already shows.

The ids of a long list of all shares or all snapshots are read in the
state's reader thread (the query is 5-9 ms at 10,000), as of the step that
asks: they are current while no share (snapshot) came or went since
(Store.share_list_version, snapshot_list_version), whatever else changed.

Lists are written one or two at a time (LIST_TURNS): each holds its ids and
its body (about 2 MB at 10,000 shares) while written, and a hundred callers
at once would otherwise hold a hundred of them. One caller (a connection to
the bus, as for GetManagedObjects) has at most LISTS_PER_CALLER long lists
waiting or being written, whether or not others wait: one asking for many
at once cannot take every turn from the others (the turns go in the order
asked); beyond that it is told to try again.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Awaitable, Callable, Dict, List, Optional, Protocol, Union

from dbus_next.errors import DBusError
from dbus_next.constants import ErrorType

from .audit import CALL
from .wire import Marshalled, write_strings

#: a slice of the loop's time, other callbacks running between two
SLICE = 0.002
#: a list of paths up to this long is written in one step (about 1 ms)
ONE_STEP_PATHS = 1000
#: paths written between two looks at the clock
CHUNK = 256
#: a list whose ids changed while it was written is written again, at most
#: this many times; then in one step
ROUNDS = 3
#: lists being written at once (the others wait their turn, holding nothing)
LIST_TURNS = 2
#: long lists one caller may have waiting or being written; one more is
#: refused (LimitsExceeded) before any long work (the first ids are read to
#: know the list is long)
LISTS_PER_CALLER = 2
TOO_MANY_LISTS = "too many long lists of yours are waiting to be written; try again in a moment"


class Read(Protocol):
    """Reads at most limit ids (-1: all) on the loop."""
    def __call__(self, *, limit: int) -> List[str]: ...


class _Turns:
    """The running loop's turns (a semaphore is bound to one loop), and
    how many long lists each caller has waiting or being written."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.free = asyncio.Semaphore(LIST_TURNS)
        self.of: Dict[str, int] = {}


_turns: Optional[_Turns] = None


def _turn() -> _Turns:
    global _turns
    loop = asyncio.get_running_loop()
    if _turns is None or _turns.loop is not loop:
        _turns = _Turns(loop)
    return _turns


async def next_slice() -> None:
    """Between two slices of an answer: the loop runs everything else due."""
    await asyncio.sleep(0)


async def object_paths(read: Read, path: Callable[[str], str],
                       changes: Callable[[], int],
                       aside: Optional[Callable[[], Awaitable[List[str]]]] = None
                       ) -> Union[List[str], Marshalled]:
    """An `ao` answer: the path of each id read(limit=...) gives (at most
    limit of them; -1: all), written in slices when there are many. changes()
    counts the changes that could change the ids: if it moved while the
    paths were written, the ids are read again, and the answer is written
    again only if they differ.

    read() runs on the loop (one indexed SQL query: 5-9 ms for all of
    10,000). aside(), if given, reads all the ids in another thread, as of
    the step in which it is called; read() of all is then the last resort,
    after ROUNDS reads that changes meanwhile made stale."""
    turns = _turn()
    call = CALL.get()               # (None: not asked over the bus)
    caller = (call[1] or "") if call is not None else None     # (as connection.py counts)
    full = caller is not None and turns.of.get(caller, 0) >= LISTS_PER_CALLER
    if full or turns.free.locked() or aside is not None:
        ids = read(limit=ONE_STEP_PATHS + 1)  # a short list is answered now, needing no turn
        if len(ids) <= ONE_STEP_PATHS:
            return [path(i) for i in ids]
        del ids
        if full:
            raise DBusError(  # type: ignore[no-untyped-call]
                ErrorType.LIMITS_EXCEEDED, TOO_MANY_LISTS)
    if caller is not None:
        turns.of[caller] = turns.of.get(caller, 0) + 1
    try:
        # (a long list holds nothing while it waits for its turn; a read
        # aside is made in a turn only: each holds a view of the state, a
        # connection that also holds back the WAL's checkpoints)
        async with turns.free:
            return await _written(read, path, changes, aside)
    finally:
        if caller is not None:
            left = turns.of.pop(caller) - 1
            if left:
                turns.of[caller] = left


async def _written(read: Read, path: Callable[[str], str],
                   changes: Callable[[], int],
                   aside: Optional[Callable[[], Awaitable[List[str]]]]
                   ) -> Union[List[str], Marshalled]:
    ids: Optional[List[str]] = None
    body = bytearray()
    for _ in range(ROUNDS):
        seen = changes()
        again = read(limit=-1) if aside is None else await aside()
        if changes() != seen:
            continue             # (read aside while the ids changed: stale)
        if again == ids:
            return Marshalled("ao", bytes(body))     # what is written is current
        ids = again
        if len(ids) <= ONE_STEP_PATHS:
            return [path(i) for i in ids]
        body = bytearray(4)          # the array's length, filled in below
        since = time.perf_counter()
        for start in range(0, len(ids), CHUNK):
            write_strings(body, [path(i) for i in ids[start:start + CHUNK]])
            if time.perf_counter() - since > SLICE and start + CHUNK < len(ids):
                await next_slice()
                since = time.perf_counter()
        struct.pack_into("<I", body, 0, len(body) - 4)
        if changes() == seen:
            return Marshalled("ao", bytes(body))
    return [path(i) for i in read(limit=-1)]
