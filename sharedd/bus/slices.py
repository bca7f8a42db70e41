"""Answers too long for one step of the event loop, written in slices.

At 10,000 shares, writing every object's entry (GetManagedObjects,
managed.py) or every share's path (ListShares) takes tens of milliseconds of
Python; done in one callback, every other caller waits that long. Written
in slices of about SLICE seconds, other callbacks run between them.

An answer written in slices is still as of one moment, the moment it is
sent: what changed meanwhile is looked at again, and the answer goes out in the
same step as its last read (the bus's async methods are answered in the
step in which they return: service.py). So every signal a caller received
before the answer is about a state the answer already shows.

The ids of a long list (ListShares, all or filtered; ListSnapshots) are
read in the state's reader thread (the query is 5-9 ms at 10,000), as of
the step that asks; each path is written once, and the rows touched since
are looked at again on the loop, one indexed row each, in the step that
answers: the list stays current however often statuses change, and no
step reads all its ids on the loop (the answer's joins the paths, and one
step indexes the keys read, about 1 ms at 10,000).

Lists are written one or two at a time (LIST_TURNS): each holds its ids and
its body (2-4 MB at 10,000 shares) while written, and a hundred callers
at once would otherwise hold a hundred of them. One caller (a connection to
the bus, as for GetManagedObjects) has at most LISTS_PER_CALLER long lists
waiting or being written, whether or not others wait: one asking for many
at once cannot take every turn from the others (the turns go in the order
asked); beyond that it is told to try again.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple, Union

from dbus_next.errors import DBusError
from dbus_next.constants import ErrorType

from .audit import CALL
from .wire import Marshalled, string_array, string_element

#: a slice of the loop's time, other callbacks running between two
SLICE = 0.002
#: a list of paths up to this long is written in one step (about 1 ms)
ONE_STEP_PATHS = 1000
#: paths written between two looks at the clock
CHUNK = 256
#: rows looked at again between two looks at the clock (an indexed read
#: each: about 1 ms)
LOOKS = 32
#: a list's ids or paths freed in one step, after its answer
FREED = 1024
#: a list read aside while more changed than it can catch up with is read
#: aside again, at most this many times; then in one step
ROUNDS = 3
#: slices a list read aside spends catching up with what changed meanwhile
#: before it is read again (changes came faster than it looked at them)
CATCH_UP_SLICES = 50
#: lists being written at once (the others wait their turn, holding nothing)
LIST_TURNS = 2
#: long lists one caller may have waiting or being written; one more is
#: refused (LimitsExceeded) before any long work (the first ids are read to
#: know the list is long)
LISTS_PER_CALLER = 2
TOO_MANY_LISTS = "too many long lists of yours are waiting to be written; try again in a moment"


class Listing(Protocol):
    """Ids kept up to date from what changed (sharedd.store.Listing)."""
    def read(self, *, limit: int) -> List[str]:
        """At most limit ids (-1: all), read on the loop."""

    async def aside(self) -> Tuple[int, List[Tuple[Any, str]]]:
        """The version now, and the (key, id) of each in order, as of this
        call."""

    def changed_since(self, version: int) -> Optional[Tuple[int, Set[str]]]:
        """The version now, and the ids changed since `version` (None: not
        known)."""

    def key(self, id: str) -> Optional[Tuple[Any, str]]:
        """The id's (key, id) now, if listed."""


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


async def listed_paths(listing: Listing, path: Callable[[str], str]
                       ) -> Union[List[str], Marshalled]:
    """An `ao` answer: the path of each id the listing lists. A short list
    (the first ONE_STEP_PATHS + 1 ids, read on the loop, tell) is answered
    at once, needing no turn; a long one is read aside in its turn (_kept),
    if its caller has not too many waiting or being written."""
    turns = _turn()
    call = CALL.get()               # (None: not asked over the bus)
    caller = (call[1] or "") if call is not None else None     # (as connection.py counts)
    ids = listing.read(limit=ONE_STEP_PATHS + 1)
    if len(ids) <= ONE_STEP_PATHS:
        return [path(i) for i in ids]
    del ids
    if caller is not None and turns.of.get(caller, 0) >= LISTS_PER_CALLER:
        raise DBusError(  # type: ignore[no-untyped-call]
            ErrorType.LIMITS_EXCEEDED, TOO_MANY_LISTS)
    if caller is not None:
        turns.of[caller] = turns.of.get(caller, 0) + 1
    try:
        # (a long list holds nothing while it waits for its turn; a read
        # aside is made in a turn only: each holds a view of the state, a
        # connection that also holds back the WAL's checkpoints)
        async with turns.free:
            return await _kept(listing, path)
    finally:
        if caller is not None:
            left = turns.of.pop(caller) - 1
            if left:
                turns.of[caller] = left


async def _kept(listing: Listing, path: Callable[[str], str]) -> Union[List[str], Marshalled]:
    """Read aside, each path written once, then brought up to date: each
    row touched since the read is looked at again (an indexed read of one),
    in slices while many are; the answer goes in the step that looked
    at the last. Read aside again when too much changed meanwhile (more than
    is remembered, or CATCH_UP_SLICES slices' worth); after ROUNDS reads,
    one read on the loop."""
    elements: Dict[str, bytes] = {}
    keys: List[Tuple[Any, str]] = []
    at: Dict[str, Tuple[Any, str]] = {}
    for _ in range(ROUNDS):
        _free_later(keys, at)
        version, keys = await listing.aside()
        at = {k[1]: k for k in keys}
        since = time.perf_counter()
        for n, (_, i) in enumerate(keys):
            if i not in elements:
                elements[i] = string_element(path(i))
            if n % CHUNK == CHUNK - 1 and time.perf_counter() - since > SLICE:
                await next_slice()
                since = time.perf_counter()
        pending: Set[str] = set()
        for _ in range(CATCH_UP_SLICES):
            news = listing.changed_since(version)
            if news is None:
                break
            version, changed = news
            pending |= changed
            while pending:
                for _ in range(min(LOOKS, len(pending))):
                    i = pending.pop()
                    old = at.pop(i, None)
                    if old is not None:
                        del keys[bisect.bisect_left(keys, old)]
                    new = listing.key(i)
                    if new is not None:
                        bisect.insort(keys, new)
                        at[i] = new
                        if i not in elements:
                            elements[i] = string_element(path(i))
                if time.perf_counter() - since > SLICE:
                    break
            if not pending:
                answer = Marshalled("ao", string_array([elements[k[1]] for k in keys]))
                _free_later(keys, at, elements)
                return answer
            await next_slice()
            since = time.perf_counter()
    _free_later(keys, at, elements)
    return [path(i) for i in listing.read(limit=-1)]


#: the tasks freeing lists' leftovers (the loop keeps only weak references)
_freeing: Set["asyncio.Task[None]"] = set()


def _free_later(*heaps: Union[List[Any], Dict[Any, Any]]) -> None:
    """A long list's keys and paths freed in slices after its answer, not
    all at once as the answer goes (tens of thousands of objects: 3-6 ms of
    the loop at 10,000 shares)."""
    if any(heaps):
        task = asyncio.ensure_future(_free(heaps))
        _freeing.add(task)
        task.add_done_callback(_freeing.discard)


async def _free(heaps: Tuple[Union[List[Any], Dict[Any, Any]], ...]) -> None:
    for heap in heaps:
        while heap:
            if isinstance(heap, list):
                del heap[-FREED:]
            else:
                for _ in range(min(FREED, len(heap))):
                    heap.popitem()
            await next_slice()
