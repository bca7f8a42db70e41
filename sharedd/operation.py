"""The operation runner: every state-changing driver call goes through here.

An Operation describes one call declaratively; `Runner.run` owns the
sequence, so that each step is the same for every operation and a crash at
any point can be finished or rolled back at the next start (recovery.py):

1. under the locks of the objects concerned, `plan()` loads and checks them
   and returns the Operation (or raises: a refused call changes nothing);
2. one transaction records the intent and takes the pre record's number;
   the record is built in it and the first hook, if it stages (the spool),
   writes it while the transaction commits, showing it only after. Unless
   start-up can put the intent back, the commit is made durable first (an
   fsync of the WAL shared by concurrent operations, Store.synced);
3. pre hooks run. A refusal undoes the intent (net change: nothing), except
   for revocations (deny, delete, unmanage) and ensure, which go on:
   revocation never waits for a hook's consent;
4. the driver acts, in a worker thread;
5. one transaction records the outcome (or, after a failure and an optional
   compensating driver call, the truthful state) and takes the post number
   (its record staged as in 2), made durable as in 2;
6. observers hear each change after its commit (a durable one: once on
   disk); post hooks run; the caller gets the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, Iterator, List,
                    Mapping, Optional, Sequence, Set, Union)

from . import constants as C
from . import record as record_schema
from .backend import Backend
from .errors import SharedError, StateLost
from .hooks import records
from .hooks.manager import HookFailed, Staged
from .models import AccessRule, Replica, Share, ShareGroup, ShareGroupSnapshot, ShareServer, Snapshot
from .states import Changes, deliver
from .store import Store
from .util import public_text

log = logging.getLogger(__name__)

#: a transaction's hook record: staged, refused by the schema, or none (no hooks)
Pending = Union[Staged, record_schema.RecordError, None]


@dataclasses.dataclass
class Operation:
    method: str                                  # the hook method name (C.HOOK_METHODS)
    backend: Backend
    intent: Callable[[Changes], None]            # record the transitional state
    call: Callable[[], Awaitable[Any]]           # the driver call(s)
    done: Callable[[Changes, Any], None]         # record the outcome
    failed: Callable[[Changes, bool], None]      # truthful state; the flag: compensated
    undo: Callable[[Changes], None] = lambda tx: None   # a pre hook refused
    compensate: Optional[Callable[[], Awaitable[Any]]] = None   # remove partial work
    # Revocations (deny, delete, unmanage) and ensure go on whatever their pre
    # hooks say, waiting at most revocation_hook_timeout for them.
    unblockable: bool = False
    # The driver's effect is one that ensure_share puts back to the committed
    # state (a quota, an export's client list): its intent need not reach the
    # disk before the driver acts, the outcome's commit flushes both. With
    # pre hooks the record's number is in it: it must, unless the first hook
    # puts the record on disk (HookManager.keeps_seq).
    restorable: bool = False
    share: Optional[Share] = None                # what the records describe
    snapshot: Optional[Snapshot] = None
    server: Optional[ShareServer] = None         # setup_server, delete_share_server
    replica: Optional[Replica] = None            # the replica methods
    group: Optional[ShareGroup] = None           # the share group methods
    group_snapshot: Optional[ShareGroupSnapshot] = None
    rules: Sequence[AccessRule] = ()             # the rules concerned
    is_allow: Optional[bool] = None
    # The call copies data for a long time: the objects' locks are released
    # while it runs (the intent's status refuses other operations meanwhile).
    call_unlocked: bool = False


class Runner:
    def __init__(self, store: Store, observer: Any, host_id: str,
                 backends: Optional[Mapping[str, Backend]] = None):
        self.store = store
        # the backends by name: a record's share is described by its own
        # backend (a replica operation runs on another one)
        self.backends: Mapping[str, Backend] = backends if backends is not None else {}
        self.observer = observer
        self.host_id = host_id
        self._locks: Dict[str, asyncio.Lock] = {}
        self._inflight = 0
        self._staged: Set[Staged] = set()    # staged records not yet told of their commit
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics: Any = None    # a sharedd.metrics.Registry, if counted
        # engine parts that keep rows in memory: told of committed changes
        # after the observer, each only of those it has a method for
        self.listeners: List[Any] = []

    # --- plumbing ----------------------------------------------------------
    @contextlib.asynccontextmanager
    async def durably(self) -> AsyncIterator[Changes]:
        """One checked transaction, on disk before observers hear of it; the
        fsync is off the event loop (Store.synced), so a slow disk holds this
        caller only. The body is the transaction: no await inside it."""
        with self._commit(durable=False) as changes:
            yield changes
        await self._synced(changes)

    @contextlib.contextmanager
    def tx(self, durable: bool = True) -> Iterator[Changes]:
        """The same, with the fsync on the calling thread: for tests'
        synchronous code (the daemon uses durably)."""
        with self._commit(durable) as changes:
            yield changes
        self._publish(changes)

    @contextlib.contextmanager
    def _commit(self, durable: bool) -> Iterator[Changes]:
        """The transaction, told to no one yet (_publish, _synced)."""
        changes = Changes(self.store)
        try:
            with self.store.tx(durable):
                yield changes
        except BaseException:
            self._withdraw(changes)
            raise
        for written in changes.after_write:
            written()

    def _publish(self, changes: Changes) -> None:
        """Staged records shown, observers told."""
        for told in changes.after_commit:
            told(True)
        def failed(name: str, exc: BaseException) -> None:
            log.error("observer %s failed: %s", name, exc)
        deliver(changes.events, self.observer, failed)
        for listener in self.listeners:
            deliver([e for e in changes.events if hasattr(listener, e[0])], listener, failed)

    @staticmethod
    def _withdraw(changes: Changes) -> None:
        for told in changes.after_commit:
            told(False)

    async def _synced(self, changes: Changes) -> None:
        """A commit made with _commit(durable=False), published once it is
        on disk (Store.synced: an fsync shared with concurrent operations,
        off the event loop). No record and no signal ever shows a change a
        power cut can take back; if the fsync fails or the wait is cancelled,
        its staged records are dropped (the next periodic state tells)."""
        try:
            await self.store.synced()
        except BaseException:
            self._withdraw(changes)
            raise
        self._publish(changes)

    def _stage(self, tx: Changes, op: Operation, phase: str, seq: Optional[int],
               result: Optional[Dict[str, Any]] = None) -> Pending:
        """In the transaction that took seq: op's hook record, staged (see
        HookManager.stage), or the RecordError that stops it."""
        if seq is None:
            return None
        staged = Staged()
        try:
            op.backend.hooks.stage(self.record(op, phase, seq, result), staged)
        except record_schema.RecordError as exc:
            return exc
        self._staged.add(staged)
        tx.after_write.append(staged.written)
        tx.after_commit.append(functools.partial(self._told, staged))
        return staged

    def _told(self, staged: Staged, ok: bool) -> None:
        self._staged.discard(staged)
        staged.committed(ok)

    def withdraw_staged(self) -> None:
        """At stop, after the wait for operations: the staged records of
        those still running are dropped, so their threads end now (the next
        periodic state tells what they would have)."""
        for staged in list(self._staged):
            self._told(staged, False)

    @contextlib.asynccontextmanager
    async def locked(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Serialise work on these objects (in a fixed order: no deadlock)."""
        self._inflight += 1
        self._idle.clear()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for key in sorted(set(keys)):
                    lock = self._locks.setdefault(key, asyncio.Lock())
                    await stack.enter_async_context(lock)
                yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def forget_lock(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("stopping with %d operation(s) still running; "
                        "start-up recovery will finish them", self._inflight)
            return False

    # --- the sequence ---------------------------------------------------------
    async def run(self, keys: Iterable[str], plan: Callable[[], Awaitable[Operation]]) -> Operation:
        """Run what plan() describes under the locks of keys."""
        op = await self.run_if(keys, plan)
        assert op is not None
        return op

    async def run_if(self, keys: Iterable[str],
                     plan: Callable[[], Awaitable[Optional[Operation]]]) -> Optional[Operation]:
        """run(), for plans that may find nothing to do (None)."""
        started = time.monotonic()
        ran: List[Operation] = []
        outcome = "failed"
        try:
            op = await self._run_if(keys, plan, ran)
            outcome = "ok"
            return op
        except HookFailed:
            outcome = "hook_failed"
            raise
        finally:
            if ran and self.metrics is not None:
                self.metrics.inc("sharedd_operations_total",
                                 "Driver operations run, by hook method and outcome "
                                 "(refusals before the plan is made are not counted).",
                                 method=ran[0].method, outcome=outcome)
                self.metrics.observe("sharedd_operation_duration_seconds",
                                     "How long operations took, locks included.",
                                     time.monotonic() - started, method=ran[0].method)

    async def _run_if(self, keys: Iterable[str],
                      plan: Callable[[], Awaitable[Optional[Operation]]],
                      ran: List[Operation]) -> Optional[Operation]:
        async with self.locked(keys):
            op = await plan()
            if op is None:
                return None
            ran.append(op)
            b = op.backend
            pre = b.hooks.enabled(C.PHASE_PRE)
            # A restorable change needs no fsync before the driver acts; its
            # pre record's seq does, unless a durable first hook keeps it.
            durable = not op.restorable or (pre and not b.hooks.keeps_seq())
            with self._commit(durable=False) as tx:
                op.intent(tx)
                staged = self._stage(tx, op, C.PHASE_PRE, tx.next_seq() if pre else None)
            if durable:
                await self._synced(tx)
            else:
                self._publish(tx)
            warnings: List[str] = []
            pre_data = await self._pre(op, staged, warnings)
            if not op.call_unlocked:
                await self._call_and_settle(op, pre_data, warnings)
                return op
        # A long copy: the locks are free meanwhile, so revocations (denies)
        # of the share go on; the intent's status keeps every other change out.
        try:
            result = await op.call()
        except SharedError as exc:
            async with self.locked(keys):
                await self._failed(op, exc, pre_data, warnings)
            raise
        async with self.locked(keys):
            await self._settle(op, result, pre_data, warnings)
        return op

    async def _call_and_settle(self, op: Operation, pre_data: Any, warnings: List[str]) -> None:
        try:
            result = await op.call()
        except SharedError as exc:
            await self._failed(op, exc, pre_data, warnings)
            raise
        await self._settle(op, result, pre_data, warnings)

    async def _settle(self, op: Operation, result: Any, pre_data: Any,
                      warnings: List[str]) -> None:
        with self._commit(durable=False) as tx:
            op.done(tx, result)
            staged = self._stage(tx, op, C.PHASE_POST, self._post_seq(tx, op),
                                 _result({"ok": True}, warnings))
        await self._synced(tx)   # on disk before its record, the post hooks and the reply
        try:
            await self.post(op, staged, pre_data)
        except HookFailed as exc:
            if not op.unblockable:
                raise   # reported after the change, as the seed's hooks do
            log.warning("%s of %s was applied; %s", op.method, _what(op), exc)

    @staticmethod
    def _post_seq(tx: Changes, op: Operation) -> Optional[int]:
        return tx.next_seq() if op.backend.hooks.enabled(C.PHASE_POST) else None

    async def _pre(self, op: Operation, staged: Pending, warnings: List[str]) -> Any:
        if staged is None:
            return None
        b = op.backend
        timeout = b.config.revocation_hook_timeout if op.unblockable else None
        try:
            if isinstance(staged, record_schema.RecordError):
                raise staged
            return await b.hooks.pre(staged, timeout=timeout)
        except (HookFailed, record_schema.RecordError) as exc:
            if op.unblockable:
                # Revocation wins over notification: log, report in the post record.
                log.warning("%s of %s goes on despite its pre hooks: %s", op.method,
                            _what(op), exc)
                warnings.append(str(exc)[:1000])
                return None
            async with self.durably() as tx:
                op.undo(tx)
            if isinstance(exc, record_schema.RecordError):
                log.error("%s: cannot build the hook record: %s", op.method, exc)
                exc = HookFailed(f"cannot build the pre-hook record for {op.method}: {exc}")
            raise HookFailed(f"{exc}; nothing was changed") from None

    async def _failed(self, op: Operation, exc: SharedError, pre_data: Any,
                      warnings: List[str]) -> None:
        log.error("%s of %s failed: %s", op.method, _what(op), exc)
        compensated = False
        if op.compensate is not None:
            try:
                await op.compensate()
                compensated = True
            except SharedError as exc2:
                log.error("%s of %s: cannot undo the partial work, leaving it in error: %s",
                          op.method, _what(op), exc2)
        with self._commit(durable=False) as tx:
            op.failed(tx, compensated)
            staged = self._stage(tx, op, C.PHASE_POST, self._post_seq(tx, op),
                                 _result({"ok": False, "error": public_text(str(exc), 4000)},
                                         warnings))
        await self._synced(tx)
        try:
            await self.post(op, staged, pre_data)
        except HookFailed as hexc:
            log.error("%s", hexc)

    async def post(self, op: Operation, staged: Pending, pre_data: Any) -> None:
        """Post hooks; a hook may update the share's export locations."""
        if staged is None:
            return
        try:
            if isinstance(staged, record_schema.RecordError):
                raise staged
            updates = await op.backend.hooks.post(staged, pre_data)
        except record_schema.RecordError as exc:
            log.error("%s of %s: cannot build the post-hook record: %s", op.method, _what(op), exc)
            return
        locations = updates.get("export_locations")
        share = op.share
        if (share is not None and isinstance(locations, list) and locations
                and all(isinstance(x, str) for x in locations)
                and self.store.share_status(share.id) is not None):
            async with self.durably() as tx:
                tx.share(share, export_locations=locations)

    def record(self, op: Operation, phase: str, seq: int,
               result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The hook record of op as the store has it now; the hooks' finish
        checks it (RecordError if it does not match the schema: a bug,
        handled by the caller, never a crash)."""
        b = op.backend
        share = snapshot = None
        addresses: Optional[List[str]] = None
        if op.share is not None:
            current = self.store.get_share(op.share.id)
            if current is None:
                share = records.share_dict(op.share, [], {}, "deleted")
            else:
                home = self.backends.get(current.backend, b)
                share = records.share_dict(
                    current, self.store.rules(current.id), home.mount_hints(current),
                    snapshots=home.snapshot_exports(current,
                                                    self.store.snapshot_exports(current.id)))
                if home is not b:
                    addresses = list(home.driver.served_addresses())
        if op.snapshot is not None:
            current_snap = self.store.get_snapshot(op.snapshot.id)
            snapshot = records.snapshot_dict(current_snap or op.snapshot,
                                             None if current_snap else "deleted")
        server = None
        if op.server is not None:
            current_server = self.store.get_server(op.server.id)
            server = records.server_dict(current_server or op.server,
                                         None if current_server else "deleted")
        replica = None
        if op.replica is not None:
            current_replica = self.store.get_replica(op.replica.id)
            replica = records.replica_dict(current_replica or op.replica,
                                           None if current_replica else "deleted")
        group = group_snapshot = None
        if op.group is not None:
            current_group = self.store.get_group(op.group.id)
            group = records.group_dict(current_group or op.group,
                                       [s.id for s in self.store.group_members(op.group.id)],
                                       None if current_group else "deleted")
        if op.group_snapshot is not None:
            gs = op.group_snapshot
            current_gs = self.store.get_group_snapshot(gs.id)
            group_snapshot = records.group_snapshot_dict(
                current_gs or gs, self.store.group_snapshot_members(gs.id),
                None if current_gs else "deleted")
        return records.build(host=self.host_id, epoch=self.store.epoch, seq=seq, phase=phase,
                             method=op.method, backend=b.name, share=share, snapshot=snapshot,
                             rules=list(op.rules), is_allow=op.is_allow, result=result,
                             server=server, replica=replica, server_addresses=addresses,
                             group=group, group_snapshot=group_snapshot)


async def isolated(what: str, work: Awaitable[Any], *, step: str,
                   to_error: Optional[Callable[[], Awaitable[None]]] = None,
                   level: int = logging.ERROR) -> bool:
    """One object's part of a sweep over many (start-up recovery, an
    ensure): its failure is its own. A SharedError is logged (a bug with its
    traceback: it must not become a crash loop at every start), to_error()
    records the object in error, and the sweep goes on with the others.
    StateLost is raised: nothing can be recorded any more, so the sweep
    stops. Returns whether work succeeded."""
    left = "; it is left in error" if to_error is not None else ""
    try:
        await work
        return True
    except StateLost:
        raise
    except SharedError as exc:
        log.log(level, "%s: %s: %s%s", step, what, exc, left)
    except Exception:
        log.exception("%s: %s failed%s", step, what, left)
    if to_error is not None:
        try:
            await to_error()
        except StateLost:
            raise
        except Exception:
            log.exception("%s: %s: cannot even record the error", step, what)
    return False


def _result(result: Dict[str, Any], warnings: Sequence[str]) -> Dict[str, Any]:
    """A post record's result, with the warnings of a revocation that went on."""
    if warnings:
        return dict(result, warnings=list(warnings)[:C.MAX_RECORD_WARNINGS])
    return result


def _what(op: Operation) -> str:
    if op.share is not None:
        return f"share {op.share.name} ({op.share.id})"
    if op.server is not None:
        return f"share server {op.server.id}"
    if op.group is not None:
        return f"share group {op.group.name} ({op.group.id})"
    return f"backend {op.backend.name}"
