"""A probe, loaded only by the daemon that `bench/api --loop-steps` starts
(this directory is put first on its PYTHONPATH): every event-loop callback
is timed, and each that held the loop for more than 1 ms is written to the
file named by SHAREDD_BENCH_LOOP_STEPS as "<end> <seconds> <what>", <end>
on CLOCK_MONOTONIC (the bench's clock too). <what> also says how much of
the step Python's cycle collector took (a collection runs inside whatever
allocates when it is due, in any thread, and holds the loop meanwhile).
The timing costs about a microsecond per callback; the figures are the
probe's, not the daemon's.
"""

import asyncio.events
import gc
import os
import time

_PATH = os.environ.pop("SHAREDD_BENCH_LOOP_STEPS", None)     # (not the daemon's children)


def _what(handle: asyncio.events.Handle) -> str:
    callback = handle._callback
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):       # (the bus names a call's task after its method)
        name = task.get_name()
        return f"task {task.get_coro().__qualname__ if name.startswith('Task-') else name}"
    return getattr(callback, "__qualname__", type(callback).__name__)


if _PATH:
    _out = open(_PATH, "a", buffering=1)
    _real = asyncio.events.Handle._run
    _gc = [0.0, 0.0, -1]          # a collection's start; their seconds, and oldest generation

    def _collection(phase: str, info: dict) -> None:
        if phase == "start":
            _gc[0] = time.monotonic()
        else:
            _gc[1] += time.monotonic() - _gc[0]
            _gc[2] = max(_gc[2], info.get("generation", 0))
    gc.callbacks.append(_collection)

    def _run(self: asyncio.events.Handle) -> None:
        _gc[1], _gc[2] = 0.0, -1
        started = time.monotonic()
        _real(self)
        now = time.monotonic()
        if now - started > 0.001:
            what = _what(self)
            if _gc[2] >= 0:
                what += f"; {_gc[1] * 1e3:.1f} ms of it collecting, generation {_gc[2]}"
            _out.write(f"{now:.6f} {now - started:.6f} {what}\n")

    asyncio.events.Handle._run = _run
