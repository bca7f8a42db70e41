"""Jobs: long operations (copies of data) that reply at once, UDisks2's model.

A Job is created by the operation that copies (migration, and later the
initial sync of a replica); it reports bytes done and expected from the
worker thread that copies, can be cancelled (a threading.Event the copy
checks), and completes once. Observers hear of a new job, of its progress
(at most every PROGRESS_INTERVAL seconds, the last figures always) and of
its completion, after which the job is gone. Jobs live in memory only: after
a crash, start-up recovery settles the operation from its stored intent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional

from .errors import Cancelled, CapacityExceeded, InvalidState, NotFound, SharedError
from .store import new_id
from .util import now_us

log = logging.getLogger(__name__)

#: seconds between two progress announcements of one job
PROGRESS_INTERVAL = 0.5
#: jobs running at once; more are refused (each holds a copy in flight)
MAX_JOBS = 64


@dataclasses.dataclass
class Job:
    id: str
    operation: str                       # the hook method name of what it does
    objects: List[str]                   # share ids
    started_by_uid: int
    start_time: int                      # microseconds since the epoch
    cancelable: bool = True
    bytes: int = 0
    expected: Optional[int] = None       # bytes the copy expects to move
    rate: int = 0                        # bytes per second, on average
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    _started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def progress_valid(self) -> bool:
        return bool(self.expected)

    @property
    def progress(self) -> float:
        if not self.expected:
            return 0.0
        return min(1.0, self.bytes / self.expected)

    @property
    def expected_end_time(self) -> int:
        """Microseconds since the epoch, 0 while it cannot be told."""
        p = self.progress
        if not 0.0 < p < 1.0:
            return 0
        elapsed = time.monotonic() - self._started
        return now_us() + int(elapsed * (1.0 - p) / p * 1e6)


class Jobs:
    def __init__(self, observer: Any):
        self.observer = observer
        self._jobs: Dict[str, Job] = {}
        self._last: Dict[str, float] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id[:80]}")
        return job

    def all(self) -> List[Job]:
        return list(self._jobs.values())

    def check_room(self) -> None:
        if len(self._jobs) >= MAX_JOBS:
            raise CapacityExceeded(f"{MAX_JOBS} jobs are running, the limit; wait for some "
                                   "to complete")

    def create(self, operation: str, objects: List[str], uid: int) -> Job:
        self.check_room()
        self._loop = asyncio.get_running_loop()
        job = Job(id=new_id(), operation=operation, objects=list(objects),
                  started_by_uid=uid, start_time=now_us())
        self._jobs[job.id] = job
        self._tell("job_added", job)
        return job

    def reporter(self, job: Job) -> Callable[[int, Optional[int]], None]:
        """progress(bytes done, bytes expected) for the copying thread."""
        def report(done: int, expected: Optional[int]) -> None:
            job.bytes = max(job.bytes, int(done))      # progress only rises
            if expected:
                job.expected = max(int(expected), job.bytes)
            elapsed = time.monotonic() - job._started
            job.rate = int(job.bytes / elapsed) if elapsed > 0 else 0
            now = time.monotonic()
            if now - self._last.get(job.id, 0.0) >= PROGRESS_INTERVAL:
                self._last[job.id] = now
                self._soon(job)
        return report

    def _soon(self, job: Job) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._changed, job)

    def _changed(self, job: Job) -> None:
        if job.id in self._jobs:
            self._tell("job_changed", job)

    def not_cancelable(self, job: Job) -> None:
        """From here on the job finishes what it started (a switch of copies)."""
        if job.cancelable:
            job.cancelable = False
            self._tell("job_changed", job)

    def cancel(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.cancelable:
            raise InvalidState(f"job {job.id} ({job.operation}) can no longer be cancelled")
        job.cancel_event.set()

    def finish(self, job: Job, error: Optional[BaseException]) -> None:
        """Completed once: the last figures, then the result; then it is gone."""
        if self._jobs.pop(job.id, None) is None:
            return
        self._last.pop(job.id, None)
        if error is None and job.expected:
            job.bytes = max(job.bytes, job.expected)
        self._tell("job_changed", job)
        if error is None:
            message = "done"
        elif isinstance(error, Cancelled):
            message = f"cancelled: {error}" if str(error) else "cancelled"
        elif isinstance(error, SharedError):
            message = f"{error.name}: {error}"
        else:
            message = f"failed: {type(error).__name__}"
        self._tell("job_completed", (job, error is None, message[:4000]))

    async def background(self, spawn: Callable[[Awaitable[Any]], None],
                         body: Callable[["asyncio.Future[Job]"], Awaitable[None]],
                         settled: Callable[[Job], None] = lambda job: None) -> Job:
        """Run body in the background and return the job it makes, as soon
        as it hands it to the future it is given (an error before that, a
        refusal, is the caller's). The job completes with body's outcome;
        settled(job) runs just before."""
        started: "asyncio.Future[Job]" = asyncio.get_running_loop().create_future()
        # A refusal reaches the caller through this list, not the future:
        # the error's traceback holds run()'s frame, which holds the future,
        # so a future holding the error would be a reference cycle.
        refusal: List[BaseException] = []

        def made() -> Optional[Job]:
            if not started.done() or started.cancelled():
                return None
            return started.result()

        async def run() -> None:
            try:
                await body(started)
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else Cancelled("sharedd is stopping")
                try:
                    job = made()
                    if not started.done():
                        refusal.append(error)
                        started.set_result(None)    # type: ignore[arg-type]
                    if job is not None:
                        settled(job)
                        self.finish(job, error)
                finally:
                    del error      # its traceback holds this frame: no cycle left behind
                if not isinstance(exc, Exception):
                    raise
                return
            job = made()
            if job is not None:
                settled(job)
                self.finish(job, None)
            elif not started.done():        # a body that made no job: the caller must hear
                refusal.append(RuntimeError("the operation ended without starting its job"))
                started.set_result(None)    # type: ignore[arg-type]
        spawn(run())
        try:
            job = await asyncio.shield(started)
        except asyncio.CancelledError:    # a refusal that comes now has no reader
            started.add_done_callback(lambda _: refusal.clear())
            raise
        if job is None:
            raise refusal.pop()
        return job

    def _tell(self, name: str, arg: Any) -> None:
        try:
            getattr(self.observer, name)(arg)
        except Exception:   # the adapter's problem: never the job's
            log.exception("observer %s failed", name)
