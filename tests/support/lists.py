"""Helpers for the tests of long lists (tests/test_bus_slices.py on a
listing in memory, tests/test_share_listing.py on the state database)."""

import asyncio

from sharedd.bus import wire


def path(i):
    return f"/org/sharedd/Sharedd1/share/{i}"


def marshalled(paths):
    """An `ao` body as the project's writer (checked against the library's
    in test_bus_wire) writes it."""
    buf = bytearray()
    wire.writer("ao")(buf, paths)
    return bytes(buf)


def joined(pieces):
    """A body in pieces as sent, checked against its counted size."""
    raw = b"".join(pieces.parts)
    assert len(raw) == pieces.size
    return raw


def sent(got):
    """A long list's answer as sent."""
    assert isinstance(got, wire.Marshalled) and got.signature == "ao"
    return joined(got.body)


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
