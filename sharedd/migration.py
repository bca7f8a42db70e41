"""Share migration to another backend (Manila's migration_* methods), as Jobs.

Phases, each an intent in the share's task (status `migrating` throughout,
the share's backend the source until the switch):

- `copying`: `migration_start` on the source driver makes the destination
  share and fills it while the source serves read-write. The share's lock is
  free meanwhile (denies go on; every other change is refused by the status).
  A failure or Cancel removes the copy (`migration_cancel`): available again.
- `copied`: with the option `wait_for_complete` the job ends here and the
  share waits for `CompleteMigration` or `CancelMigration`; otherwise phase 2
  follows at once in the same job.
- `completing` (under the share's lock): the source's exports become
  read-only, `migration_complete` copies the last changes; a failure makes the
  source writable again and returns to `copied`; a Cancel removes the copy.
- `switching` (no longer cancelable): the source stops serving, the
  destination is exported with the share's rules, the source is deleted, and
  the share's backend, locations and driver data become the destination's in
  one commit: available.

Only one copy is ever writable: the destination is exported after the source
became read-only and stopped serving, and the source is never made writable
again after that.
Start-up recovery (`recover`) settles an interrupted migration from its
phase: copying and cancelling roll back, completing and switching roll
forward (every driver step is idempotent; completing rolls back if the last
copy cannot be made); copied waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Tuple

from . import access, validation
from . import constants as C
from .backend import Backend
from .errors import (Cancelled, InvalidArgument, InvalidState, NotFound, NotSupported,
                     SharedError)
from .jobs import Job, Jobs
from .models import Share, ShareUpdate, fields_of
from .operation import Operation, Runner
from .store import Store

log = logging.getLogger(__name__)

OP = "migration"
#: phase-1 copies running at once; further migrations wait for a turn
PARALLEL_COPIES = 4
COPYING, COPIED, COMPLETING, SWITCHING, CANCELLING = (
    "copying", "copied", "completing", "switching", "cancelling")


def dest_share(share: Share, dest: str) -> Share:
    """The share as it will be on the destination: same id, nothing of the
    source's placement."""
    return dataclasses.replace(share, backend=dest, provider_location="", export_locations=[],
                               driver_data={}, share_server_id=None)


def _phase(task: Dict[str, Any]) -> str:
    return str(task.get("phase", "")) if task.get("op") == OP else ""


def source_serves(task: Dict[str, Any]) -> bool:
    """The source serves read-write in this phase (ensure may re-export it)."""
    return _phase(task) in (COPYING, COPIED)


class Migrations:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 jobs: Jobs, spawn: Callable[[Awaitable[Any]], None],
                 check_capacity: Callable[[Backend, int], Awaitable[None]]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.jobs = jobs
        self.spawn = spawn
        self.check_capacity = check_capacity
        self._running: Dict[str, Job] = {}      # share id -> its migration's job
        # Full copies at once (each reads and writes a whole share); the
        # final copies are incremental and run as they come.
        self._copies = asyncio.Semaphore(PARALLEL_COPIES)

    # --- the engine's entry points ----------------------------------------------
    async def start(self, share_id: str, backend: str, options: Dict[str, Any], uid: int) -> Job:
        validation.options(options, {"wait_for_complete": bool})
        wait = bool(options.get("wait_for_complete", False))
        if not isinstance(backend, str) or not backend or len(backend) > 128:
            raise InvalidArgument("the destination backend must be a backend's name")

        async def plan(started: "asyncio.Future[Job]") -> Operation:
            share = self._share(share_id, (C.STATUS_AVAILABLE,), "migrated")
            src, dest = self._usable(share.backend), self._usable(backend)
            if dest is src:
                raise InvalidArgument(f"share {share.name} is on backend {backend} already")
            self._check(share, src, dest)
            await self.check_capacity(dest, share.size_gib)
            await src.call("migration_check_compatibility", share, dest.driver)
            target = dest_share(share, dest.name)
            task = {"op": OP, "dest": dest.name, "phase": COPYING, "wait": wait}

            async def call() -> Dict[str, Any]:
                job = self._job("migration_start", share, uid, started)
                async with self._copies:      # queued (Bytes 0) behind other copies
                    if job.cancel_event.is_set():
                        raise Cancelled(f"the migration of share {share.name} was cancelled")
                    return dict(await src.call("migration_start", share, target, dest.driver,
                                               self.jobs.reporter(job), job.cancel_event) or {})

            def done(tx: Any, state: Dict[str, Any]) -> None:
                task.update(phase=COPIED, state=state)
                tx.share(share, C.STATUS_MIGRATING, task=task)
            # Any failure of phase 1 leaves the source as it was, serving.
            return Operation("migration_start", src, share=share, call_unlocked=True,
                             intent=lambda tx: tx.share(share, C.STATUS_MIGRATING, task=task),
                             call=call, done=done,
                             compensate=lambda: src.call("migration_cancel", share, target,
                                                         dest.driver, {}),
                             failed=lambda tx, _: tx.share(share, C.STATUS_AVAILABLE),
                             undo=lambda tx: tx.share(share, C.STATUS_AVAILABLE))
        self.jobs.check_room()

        async def body(started: "asyncio.Future[Job]") -> None:
            await self.runner.run([share_id], lambda: plan(started))
            if not wait:
                await self._complete(share_id, self._running[share_id])
        return await self.jobs.background(self.spawn, body, self._forget)

    async def complete(self, share_id: str, options: Dict[str, Any], uid: int) -> Job:
        """CompleteMigration: phase 2 of a migration that waits (copied), or
        the retry of one whose switch failed."""
        validation.options(options, {})
        share = self._share(share_id, (C.STATUS_MIGRATING,), "completed")
        if self._running.get(share_id) is not None or _phase(self.store.share_task(share_id)) \
                not in (COPIED, SWITCHING):
            raise InvalidState(f"share {share.name}'s migration is still copying; it can be "
                               "completed once copied")
        # Made before anything is awaited: a second CompleteMigration now finds it.
        job = self.jobs.create("migration_complete", [share.id], uid)
        self._running[share.id] = job

        async def body(started: "asyncio.Future[Job]") -> None:
            started.set_result(job)
            await self._complete(share_id, job)
        return await self.jobs.background(self.spawn, body, self._forget)

    async def cancel(self, share_id: str, options: Dict[str, Any]) -> None:
        """CancelMigration: a running copy is stopped (its job completes as
        cancelled); a copied one is removed. The source stays and serves."""
        validation.options(options, {})
        share = self._share(share_id, (C.STATUS_MIGRATING,), "cancelled")
        job = self._running.get(share_id)
        if job is not None:
            self.jobs.cancel(job.id)
            return

        async def plan() -> Operation:
            share = self._share(share_id, (C.STATUS_MIGRATING,), "cancelled")
            task = self.store.share_task(share_id)
            if _phase(task) != COPIED:
                raise InvalidState(f"share {share.name}'s migration is {_phase(task) or 'unknown'}"
                                   "; only a copied one can be cancelled")
            src, dest = self._usable(share.backend), self._usable(str(task["dest"]))
            return Operation("migration_cancel", src, share=share,
                             intent=lambda tx: tx.share(share, C.STATUS_MIGRATING,
                                                        task=dict(task, phase=CANCELLING)),
                             call=lambda: src.call("migration_cancel", share,
                                                   dest_share(share, dest.name), dest.driver,
                                                   dict(task.get("state") or {})),
                             done=lambda tx, _: tx.share(share, C.STATUS_AVAILABLE),
                             failed=lambda tx, _: tx.share(share, C.STATUS_MIGRATING, task=task),
                             undo=lambda tx: tx.share(share, C.STATUS_MIGRATING, task=task))
        await self.runner.run([share_id], plan)
        log.info("share %s: migration cancelled; it stays on backend %s", share.name,
                 share.backend)

    # --- phase 2 -------------------------------------------------------------------
    async def _complete(self, share_id: str, job: Job) -> None:
        async def plan() -> Operation:
            share = self._share(share_id, (C.STATUS_MIGRATING,), "completed")
            task = self.store.share_task(share_id)
            if _phase(task) not in (COPIED, SWITCHING):
                raise InvalidState(f"share {share.name}'s migration is {_phase(task)}")
            src, dest = self._usable(share.backend), self._usable(str(task["dest"]))
            target = dest_share(share, dest.name)
            switched = _phase(task) == SWITCHING
            progress, cancel = self.jobs.reporter(job), job.cancel_event

            async def call() -> Optional[ShareUpdate]:
                if not switched:
                    await self._final_copy(share, target, src, dest, task, progress, cancel)
                self.jobs.not_cancelable(job)
                async with self.runner.durably() as tx:
                    tx.share(share, C.STATUS_MIGRATING, task=dict(task, phase=SWITCHING))
                return await switch(share, target, src, dest, self.store,
                                    dict(task.get("state") or {}))

            def failed(tx: Any, _: bool) -> None:
                if cancel.is_set() and _phase(self.store.share_task(share_id)) == COMPLETING:
                    tx.share(share, C.STATUS_AVAILABLE)     # cancelled: the copy is gone
                else:   # another try (CompleteMigration) or CancelMigration
                    now = self.store.share_task(share_id)
                    tx.share(share, C.STATUS_MIGRATING,
                             task=dict(task, phase=SWITCHING if _phase(now) == SWITCHING
                                       else COPIED))
            return Operation("migration_complete", src, share=share,
                             intent=lambda tx: tx.share(share, C.STATUS_MIGRATING,
                                                        task=dict(task, phase=SWITCHING
                                                                  if switched else COMPLETING)),
                             call=call,
                             done=lambda tx, update: tx.share(share, C.STATUS_AVAILABLE,
                                                              backend=dest.name,
                                                              **_placement(update)),
                             failed=failed,
                             undo=lambda tx: tx.share(share, C.STATUS_MIGRATING, task=task))
        await self.runner.run([share_id], plan)

    async def _final_copy(self, share: Share, target: Share, src: Backend, dest: Backend,
                          task: Dict[str, Any], progress: Any, cancel: threading.Event) -> None:
        rules = access.granting(self.store, share.id)
        # Read-only first, so that the last copy is final (no write is lost).
        await src.call("update_access", share, access.read_only(rules), [], [])
        try:
            await src.call("migration_complete", share, target, dest.driver,
                           dict(task.get("state") or {}), progress, cancel)
        except SharedError as exc:
            if isinstance(exc, Cancelled) or cancel.is_set():
                await src.call("migration_cancel", share, target, dest.driver,
                               dict(task.get("state") or {}))
            await src.call("update_access", share, rules, [], [])   # writable again
            raise

    # --- helpers ------------------------------------------------------------------------
    def _forget(self, job: Job) -> None:
        """The job is over: the share's next migration step makes its own."""
        for share_id in job.objects:
            if self._running.get(share_id) is job:
                del self._running[share_id]

    def _job(self, operation: str, share: Share, uid: int,
             started: "asyncio.Future[Job]") -> Job:
        """The share's job (made by the first step that copies), handed to
        the caller waiting in Jobs.background."""
        job = self._running.get(share.id)
        if job is None:
            job = self.jobs.create(operation, [share.id], uid)
            self._running[share.id] = job
        if not started.done():
            started.set_result(job)
        return job

    def _share(self, share_id: str, statuses: Tuple[str, ...], verb: str) -> Share:
        share = self.store.get_share(share_id)
        if share is None:
            raise NotFound(f"no share with id {share_id[:80]}")
        if share.status not in statuses:
            raise InvalidState(f"share {share.name} is {share.status}; it can be {verb} when "
                               f"{' or '.join(statuses)}")
        return share

    def _usable(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise NotFound(f"no backend named {name[:80]!r} (enabled: {', '.join(self.backends)})")
        return b.usable()

    def _check(self, share: Share, src: Backend, dest: Backend) -> None:
        """migration_check_compatibility, the engine's part: what the
        destination must offer for the share to be the same share there."""
        dest.require_protocol(share.protocol)
        if src.config.driver_handles_share_servers or dest.config.driver_handles_share_servers:
            raise NotSupported("migrating shares of backends that handle share servers is not "
                               "implemented")
        if self.store.replica_ids(share.id):
            raise InvalidState(f"share {share.name} has replicas; delete them first (or promote "
                               "the replica on the destination instead)")
        snaps = self.store.snapshots(share.id)
        if snaps:
            raise InvalidState(f"share {share.name} has {len(snaps)} snapshot(s); snapshots are "
                               "not migrated: delete them first")
        for rule in self.store.rules(share.id):
            if rule.state in access.DENY_PENDING:
                raise InvalidState(f"share {share.name} has a deny still pending (rule "
                                   f"{rule.id}); migrate it once the deny is applied")
            dest.driver.validate_rule(share, rule)


def _placement(update: Optional[ShareUpdate]) -> Dict[str, Any]:
    fields = fields_of(update)
    fields.pop("size_gib", None)
    fields.setdefault("provider_location", "")
    fields.setdefault("driver_data", {})
    return fields


async def switch(share: Share, target: Share, src: Backend, dest: Backend,
                 store: Store, state: Dict[str, Any]) -> Optional[ShareUpdate]:
    """The source stops serving, the destination serves with the share's
    rules, the source is deleted, then what the copy left. Idempotent. The
    source goes first: both backends may export through one service (one
    NFS-Ganesha), which serves a share's pseudo path once; its data stays
    until the destination serves."""
    try:
        await src.call("unmanage", share)
    except NotSupported:
        await src.call("delete_share", share)
    update: Optional[ShareUpdate] = await dest.call("ensure_share", target,
                                                    access.granting(store, share.id))
    await src.call("delete_share", share)
    try:
        await src.call("migration_cleanup", share, target, dest.driver, state)
    except SharedError as exc:      # switched: only space is lost
        log.warning("share %s: what its migration left could not all be removed: %s",
                    share.name, exc)
    return update


async def recover(store: Store, runner: Runner, backends: Mapping[str, Backend],
                  share: Share) -> None:
    """Settle a migration a crash interrupted (see the module's docstring)."""
    task = store.share_task(share.id)
    phase = _phase(task)
    src, dest = backends.get(share.backend), backends.get(str(task.get("dest", "")))
    if src is None or dest is None or src.setup_error or dest.setup_error:
        log.warning("share %s: its migration (%s) waits: backend %s or %s is not usable",
                    share.name, phase or "?", share.backend, task.get("dest"))
        return
    target = dest_share(share, dest.name)
    state = dict(task.get("state") or {})
    log.info("recovery: share %s (%s) was migrating (%s)", share.name, share.id, phase)
    if phase == COPIED:
        return                      # waits for CompleteMigration or CancelMigration
    if phase in (COPYING, CANCELLING) or not phase:
        await src.call("migration_cancel", share, target, dest.driver, state)
        async with runner.durably() as tx:
            tx.share(share, C.STATUS_AVAILABLE)
        return
    if phase == COMPLETING:
        await src.call("update_access", share, access.read_only(access.granting(store, share.id)),
                       [], [])
        try:
            await src.call("migration_complete", share, target, dest.driver, state,
                           lambda done, expected: None, threading.Event())
        except SharedError as exc:
            # Not switched yet: the read-only source holds everything. Back to
            # it (ensure makes it writable again); error only if that fails too.
            log.error("share %s: the interrupted migration cannot be completed (%s); "
                      "it stays on backend %s", share.name, exc, share.backend)
            await src.call("migration_cancel", share, target, dest.driver, state)
            async with runner.durably() as tx:
                tx.share(share, C.STATUS_AVAILABLE)
            return
        async with runner.durably() as tx:
            tx.share(share, C.STATUS_MIGRATING, task=dict(task, phase=SWITCHING))
    update = await switch(share, target, src, dest, store, state)
    async with runner.durably() as tx:
        tx.share(share, C.STATUS_AVAILABLE, backend=dest.name, **_placement(update))
