"""A probe, loaded only by the daemon that `bench/api --loop-steps` starts
(this directory is put first on its PYTHONPATH): every event-loop callback
is timed, and each that held the loop for more than 1 ms is written to the
file named by SHAREDD_BENCH_LOOP_STEPS as "<end> <seconds> <what>", <end>
on CLOCK_MONOTONIC (the bench's clock too). <what> also says how much of
the step Python's cycle collector took (a collection runs inside whatever
allocates when it is due, in any thread, and holds the loop meanwhile).
A thread looks at the loop every millisecond: while a step has run for
more than 2 ms, it notes the loop thread's two innermost Python frames, and
the line of a slow step ends with the three noted most, with how often
("where ..."): the line that was running, or the line that called C code
that was (a SQLite COMMIT, a write). Looking needs the GIL, so a step that runs Python for
more than 5 ms (sys.getswitchinterval()) hands it over once every 5 ms.
The line also gives the loop thread's CPU time in the step: far less than
the step means it waited (for the disk, for the GIL held by another
thread, for the VM's CPU).
The timing costs about a microsecond per callback; the figures are the
probe's, not the daemon's.
"""

import asyncio.events
import collections
import gc
import os
import sys
import threading
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
    _step = [0.0, 0]              # the running step's start (0: none), and its thread
    _seen: "collections.Counter[str]" = collections.Counter()    # where it was, if slow

    def _look() -> None:
        while True:
            time.sleep(0.001)
            started, thread = _step
            if started and time.monotonic() - started > 0.002:
                frame = sys._current_frames().get(thread)
                where = []
                while frame is not None and len(where) < 2:
                    where.append(f"{os.path.basename(frame.f_code.co_filename)}:"
                                 f"{frame.f_lineno} {frame.f_code.co_name}")
                    frame = frame.f_back
                if _step[0] == started:         # (still the same step)
                    _seen[" < ".join(where)] += 1
    threading.Thread(target=_look, name="loop-steps-probe", daemon=True).start()

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
        _seen.clear()
        _step[0], _step[1] = started, threading.get_ident()
        cpu = time.thread_time()
        try:
            _real(self)
        finally:
            _step[0] = 0.0
        now = time.monotonic()
        if now - started > 0.001:
            what = f"{_what(self)}; CPU {(time.thread_time() - cpu) * 1e3:.1f} ms"
            if _gc[2] >= 0:
                what += f"; {_gc[1] * 1e3:.1f} ms of it collecting, generation {_gc[2]}"
            seen = collections.Counter(dict(_seen))  # (copied in C: the thread adds)
            if seen:
                what += "; where " + ", ".join(f"{where} ({times}x)"
                                                for where, times in seen.most_common(3))
            _out.write(f"{now:.6f} {now - started:.6f} {what}\n")

    asyncio.events.Handle._run = _run
