"""Runs a backend's hooks with the seed's enable/suppress semantics.

Each hook call runs in a worker thread with a timeout, so a slow hook never
stalls the event loop (the bus keeps answering). Records of one share are
delivered in order because the engine serialises operations per share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import constants as C
from .. import record as record_schema
from ..drivers import load_class
from ..errors import BackendFailure, ConfigError
from . import HOOK_DRIVERS
from .base import Hook, HookContext

log = logging.getLogger(__name__)


class HookFailed(BackendFailure):
    """A pre hook refused the operation, or a post hook failed."""


def hook_class(spec: str) -> type:
    """The Hook subclass a hook_drivers entry names (ConfigError if none)."""
    try:
        cls = load_class(HOOK_DRIVERS.get(spec, spec))
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot load {spec!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Hook)):
        raise ConfigError(f"{spec!r} is not a sharedd Hook class")
    return cls


class Staged:
    """A hook record the first hook takes while the transaction that took its
    seq commits (HookManager.stage); written() says its COMMIT is done (its
    fsync may still run), committed() how the commit went, once published."""

    def __init__(self) -> None:
        self.record: Dict[str, Any] = {}
        self.future: Optional["asyncio.Future[Any]"] = None   # the first hook's call
        self._written = threading.Event()
        self._done = threading.Event()
        self._ok = False

    def written(self) -> None:
        self._written.set()

    def committed(self, ok: bool) -> None:
        self._ok = ok
        self._written.set()
        self._done.set()

    def wait(self, timeout: float) -> bool:
        """In the hook's worker thread: whether the transaction was done
        (TimeoutError if its COMMIT is still running after timeout seconds).
        The wait for its fsync is not bounded by hook_timeout (which bounds
        the hook's call from publication on, not the disk): the fsync is
        shared with every operation's commits, and committed() ends the wait
        on every path (the runner withdraws on failure and cancellation)."""
        if not self._written.wait(timeout):
            raise TimeoutError(f"the transaction was not done after {timeout:g} s")
        if not self._done.wait(C.STAGED_FSYNC_WAIT):
            raise TimeoutError(f"the transaction was not on disk after "
                               f"{C.STAGED_FSYNC_WAIT:g} s")
        return self._ok


_STAGED: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _staged_writers() -> concurrent.futures.ThreadPoolExecutor:
    """The staged records' threads. Each waits for its commit's fsync: not
    in the default pool, where driver and hook calls would queue behind the
    disk. One pool for the process (threads come and go as needed)."""
    global _STAGED
    if _STAGED is None:
        _STAGED = concurrent.futures.ThreadPoolExecutor(
            C.STAGED_THREADS, thread_name_prefix="sharedd-staged")
    return _STAGED


class HookManager:
    def __init__(self, backend_name: str, bconfig, context: HookContext,
                 addresses: Callable[[], Sequence[str]] = lambda: ()):
        self.backend_name = backend_name
        self.config = bconfig
        self.context = context
        # the backend's served addresses now (share servers come and go),
        # declared in (and signed with) every record
        self.addresses = addresses
        self.hooks: List[Hook] = []
        for spec in bconfig.hook_drivers:
            try:
                cls = hook_class(spec)
            except ConfigError as exc:
                raise ConfigError(f"[{backend_name}] hook_drivers: {exc}") from None
            self.hooks.append(cls(backend_name, bconfig, context))

    def enabled(self, phase: str) -> bool:
        if not self.hooks:
            return False
        return bool({"pre": self.config.enable_pre_hooks,
                     "post": self.config.enable_post_hooks,
                     "periodic": self.config.enable_periodic_hooks}[phase])

    def keeps_seq(self) -> bool:
        """Whether a pre record's seq is on disk before anything else sees it
        (the first hook is durable and its failure refuses the call): then an
        intent need not be fsynced for its seq's sake, as start-up raises the
        store's counter past last_seq()."""
        return bool(self.hooks) and self.hooks[0].durable and \
            not self.config.suppress_pre_hooks_errors

    def last_seq(self, epoch: str) -> int:
        """The highest seq of epoch the hooks hold on disk."""
        seqs = [0]
        for hook in self.hooks:
            try:
                seqs.append(int(hook.last_seq(epoch)))
            except Exception as exc:   # hooks are third-party code
                log.warning("hook %s: last_seq failed: %s", self._name(hook), _describe(exc))
        return max(seqs)

    def _count(self, name: str, help_text: str, phase: str) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.inc(name, help_text, backend=self.backend_name, phase=phase)

    def _failed(self, phase: str) -> None:
        self._count("sharedd_hook_failures_total", "Hook calls that failed (or timed out), "
                    "suppressed ones included.", phase)

    def finish(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record as hooks get it: with the served addresses (unless the
        record names those of the backend its share lives on), signed, and
        checked against the schema, once (RecordError if it does not match)."""
        return self._finished(self._counted(record))

    def _counted(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """On the event loop: record counted, with the served addresses."""
        self._count("sharedd_hook_records_total", "Hook records handed to the hooks.",
                    str(record.get("phase", "")))
        addresses = list(self.addresses())
        if addresses and "server_addresses" not in record:
            record = dict(record, server_addresses=addresses)
        return record

    def _finished(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Signed and checked (thread-safe: a staged record is finished in
        its first hook's worker thread)."""
        signer = self.context.signer
        return record_schema.checked(signer.sign(record) if signer is not None else record)

    def stage(self, record: Dict[str, Any], staged: Staged) -> None:
        """Inside the transaction that took record's seq, before COMMIT: the
        record handed to the hooks. If the first hook stages (the spool), a
        worker thread signs and checks the record, then writes and fsyncs
        its file, while the transaction commits; pre() or post() then take
        the Staged instead of a record, and a record that does not match
        the schema reaches them as RecordError."""
        staged.record = record = self._counted(record)
        if not (self.hooks and self.hooks[0].stages):
            staged.record = self._finished(record)
            return
        first = self.hooks[0]

        def finish_and_write() -> Any:
            staged.record = self._finished(record)
            return first.write_staged(staged.record, staged.wait)

        staged.future = asyncio.get_running_loop().run_in_executor(_staged_writers(),
                                                                   finish_and_write)
        # read by pre()/post(); after a failed commit by nobody
        staged.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _limit(self, timeout: Optional[float]) -> float:
        return self.config.hook_timeout if timeout is None else min(timeout, self.config.hook_timeout)

    async def _call(self, hook: Hook, fn, *args, timeout: Optional[float] = None,
                    started: Optional["asyncio.Future[Any]"] = None,
                    large: bool = False) -> Any:
        """fn(*args), in a worker thread unless hook never blocks and the
        record is not large (a periodic part: the dbus hook's JSON of it
        alone takes milliseconds); started: the call is already running (a
        staged write)."""
        if started is None and not hook.blocking and not large:
            return fn(*args)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a
        # cancellation that arrives as the future completes, and a loop of
        # operations (a deny's retries) then outlives its cancelled task.
        async with asyncio.timeout(self._limit(timeout)):
            if started is not None:
                return await started
            return await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(fn, *args))

    def _unstage(self, record: Union[Dict[str, Any], Staged]
                 ) -> Tuple[Staged, Optional["asyncio.Future[Any]"]]:
        """The Staged (a record not staged is finished here) and the first
        hook's call if it is already running; .record is the finished
        record once that call is done."""
        if isinstance(record, Staged):
            return record, record.future
        staged = Staged()
        staged.record = self.finish(record)
        return staged, None

    def _settled(self, staged: Staged, i: int) -> Dict[str, Any]:
        """The record for hook i: for the hooks after the first, finished
        even if the staged call timed out before its thread finished it
        (signatures are deterministic: the same record either way); a
        RecordError from that is the caller's, as if the call had raised it."""
        if i > 0 and not isinstance(staged.record, record_schema.Checked):
            staged.record = self._finished(staged.record)
        return staged.record

    @staticmethod
    def _unfinished(i: int, started: Optional["asyncio.Future[Any]"],
                    exc: Exception) -> bool:
        """Whether the staged call failed on its record (the schema), not
        in the hook: the runner handles that as a record error."""
        return i == 0 and started is not None and isinstance(exc, record_schema.RecordError)

    @staticmethod
    def _name(hook: Hook) -> str:
        return type(hook).__name__

    async def pre(self, record: Union[Dict[str, Any], Staged],
                  timeout: Optional[float] = None) -> List[Any]:
        """timeout: a shorter limit than hook_timeout (revocations)."""
        staged, started = self._unstage(record)
        data = []
        for i, hook in enumerate(self.hooks):
            finished = self._settled(staged, i)   # RecordError: the runner's, not the hook's
            try:
                data.append(await self._call(hook, hook.execute_pre_hook, finished,
                                             timeout=timeout,
                                             started=started if i == 0 else None))
            except Exception as exc:  # hooks are third-party code
                if self._unfinished(i, started, exc):
                    raise
                self._failed("pre")
                msg = (f"pre hook {self._name(hook)} failed for {staged.record['method']}: "
                       f"{_describe(exc)}")
                if self.config.suppress_pre_hooks_errors:
                    log.warning("%s (suppressed)", msg)
                    data.append(None)
                else:
                    log.error("%s", msg)   # the runner refuses the call, or goes on (revocations)
                    raise HookFailed(msg) from None
        return data

    async def post(self, record: Union[Dict[str, Any], Staged],
                   pre_data: Optional[List[Any]]) -> Dict[str, Any]:
        updates: Dict[str, Any] = {}
        errors = []
        staged, started = self._unstage(record)
        for i, hook in enumerate(self.hooks):
            pdata = pre_data[i] if pre_data and i < len(pre_data) else None
            finished = self._settled(staged, i)   # RecordError: the runner's, not the hook's
            try:
                result = await self._call(hook, hook.execute_post_hook, finished, pdata,
                                          started=started if i == 0 else None)
                if isinstance(result, dict):
                    updates.update(result)
            except Exception as exc:
                if self._unfinished(i, started, exc):
                    raise
                self._failed("post")
                msg = (f"post hook {self._name(hook)} failed for {staged.record['method']}: "
                       f"{_describe(exc)}")
                if self.config.suppress_post_hooks_errors:
                    log.warning("%s (suppressed)", msg)
                else:
                    log.error("%s", msg)
                    errors.append(msg)
        if errors:
            raise HookFailed("; ".join(errors))
        return updates

    async def periodic(self, record: Dict[str, Any]) -> None:
        # hundreds of shares to sign and check: in a thread, not on the loop
        record = await asyncio.to_thread(self._finished, self._counted(record))
        for hook in self.hooks:
            try:
                await self._call(hook, hook.execute_periodic_hook, record, large=True)
            except Exception as exc:
                self._failed("periodic")
                log.error("periodic hook %s failed: %s", self._name(hook), _describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
