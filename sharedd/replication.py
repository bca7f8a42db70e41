"""Share replication (Manila's replica methods) between backends of one
replication_domain.

A replicated share has one replica row per copy: the active one (its
placement is the share row's; it serves read-write) and the replicas,
brought up to date by the active copy's driver (`replica_sync`): at
creation (a Job), every `replication_interval` of the active's backend, on
Resync (a Job), and right after a snapshot or a revert of the share.
For the driver a replica is a share of its own (`view`): its id, backend and
placement. A `readable` replica is exported read-only with the share's
rules; a `dr` one is not exported.

Locks: operations on the share take its lock and every replica's
(`keys`); a sync takes only its replica's, so that denies go on meanwhile.
The readable copies' exports follow every rule change (`copies`), under the
share's lock, and a sync serves its replica again under that lock too, with
the rules of that moment: a deny can never be undone by a sync.

Promote (`promote_share_replica`, share status replication_change, phases in
the share's task): `syncing` makes the active read-only and syncs the replica
a last time; `switching` (no way back) stops the old active serving, serves
the replica with the share's rules as the share, and swaps the roles in one
commit: the old active becomes a replica synced the other way round (or
`error` if its backend could not be reached). Start-up recovery rolls
`syncing` back and `switching` forward; creating and deleting replicas are
removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Set, Tuple

from . import access, validation
from . import constants as C
from .backend import Backend
from .errors import (AlreadyExists, CapacityExceeded, InvalidArgument, InvalidState, NotFound,
                     NotSupported, SharedError)
from .jobs import Job, Jobs
from .models import Replica, Share, ShareUpdate, Snapshot, fields_of
from .operation import Operation, Runner, isolated
from .states import Changes
from .store import Store, new_id
from .util import now_us

log = logging.getLogger(__name__)

#: syncs (first ones included) moving data at once; more wait for a turn
PARALLEL_SYNCS = 4
#: seconds between two looks for replicas due a sync
TICK_MIN, TICK_MAX = 0.5, 30.0
SYNCING, SWITCHING = "syncing", "switching"
PROMOTE = "promote_share_replica"


def view(share: Share, replica: Replica) -> Share:
    """The replica as its driver sees it: a share of its own."""
    return dataclasses.replace(share, id=replica.id, backend=replica.backend,
                               provider_location=replica.provider_location,
                               export_locations=list(replica.export_locations),
                               driver_data={}, share_server_id=None)


def _no_progress(done: int, expected: Optional[int]) -> None:
    return None


class Replications:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 jobs: Jobs, spawn: Callable[[Awaitable[Any]], None],
                 check_capacity: Callable[[Backend, int], Awaitable[None]]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.jobs = jobs
        self.spawn = spawn
        self.check_capacity = check_capacity
        self._syncing: Set[str] = set()        # replica ids with a sync queued or running
        self._slots = asyncio.Semaphore(PARALLEL_SYNCS)

    # --- reads ------------------------------------------------------------------------
    def get(self, replica_id: str) -> Replica:
        replica = self.store.get_replica(replica_id)
        if replica is None:
            raise NotFound(f"no replica with id {replica_id[:80]}")
        return replica

    def of_share(self, share_id: Optional[str] = None) -> List[Replica]:
        return self.store.replicas(share_id)

    def keys(self, share_id: str) -> List[str]:
        """The locks of an operation on the whole replicated share."""
        return [share_id] + [_key(r) for r in self.store.replica_ids(share_id)]

    def is_replicated(self, share_id: str) -> bool:
        return bool(self.store.replica_ids(share_id))

    # --- CreateReplica -------------------------------------------------------------------
    async def create(self, share_id: str, backend: str, options: Dict[str, Any],
                     uid: int) -> Job:
        validation.options(options, {"style": str})
        style = options.get("style", C.REPLICATION_STYLES[0])
        if style not in C.REPLICATION_STYLES:
            raise InvalidArgument(f"style must be one of {', '.join(C.REPLICATION_STYLES)}")
        if not isinstance(backend, str) or not backend or len(backend) > 128:
            raise InvalidArgument("the replica's backend must be a backend's name")
        self.jobs.check_room()

        async def plan(started: "asyncio.Future[Job]") -> Operation:
            share = self._share(share_id)
            src, dest = self._usable(share.backend), self._usable(backend)
            self._check(share, src, dest, style)
            await self.check_capacity(dest, share.size_gib)
            now = now_us()
            replica = Replica(id=new_id(), share_id=share.id, backend=dest.name,
                              role=C.ROLE_REPLICA, status=C.STATUS_CREATING,
                              state=C.REPLICA_OUT_OF_SYNC, style=style, created_at=now)
            active = None if self.store.replica_ids(share.id) else Replica(
                id=new_id(), share_id=share.id, backend=src.name, role=C.ROLE_ACTIVE,
                status=C.STATUS_AVAILABLE, state=C.REPLICA_IN_SYNC, style=style,
                created_at=now, provider_location=share.provider_location)
            snaps = self._snapshots(share.id)

            def intent(tx: Changes) -> None:
                if active is not None:
                    tx.add_replica(active)
                tx.add_replica(replica, task={"op": "create_share_replica"})

            def gone(tx: Changes) -> None:
                tx.remove_replica(replica)
                self._drop_lone_active(tx, share.id)

            async def call() -> Tuple[Dict[str, Any], Optional[ShareUpdate]]:
                job = self.jobs.create("create_share_replica", [share.id], uid)
                started.set_result(job)
                async with self._slots:        # queued (Bytes 0) behind other copies
                    state = dict(await src.call("replica_sync", share, view(share, replica),
                                                dest.driver, {}, snaps, self.jobs.reporter(job),
                                                job.cancel_event) or {})
                replica.provider_location = str(state.pop("provider_location", ""))
                return state, await self._serve(share, replica)

            def done(tx: Changes, result: Tuple[Dict[str, Any], Optional[ShareUpdate]]) -> None:
                state, update = result
                tx.replica(replica, C.STATUS_AVAILABLE, state=C.REPLICA_IN_SYNC,
                           last_sync=now_us(), driver_data=state,
                           provider_location=replica.provider_location,
                           export_locations=list(fields_of(update).get("export_locations", [])))
            return Operation("create_share_replica", dest, share=share, replica=replica,
                             call_unlocked=True, intent=intent, call=call, done=done,
                             compensate=lambda: self._remove_data(share, replica, snaps, {}),
                             failed=lambda tx, undone: gone(tx) if undone
                             else tx.replica(replica, C.STATUS_ERROR),
                             undo=gone)

        async def body(started: "asyncio.Future[Job]") -> None:
            await self.runner.run([share_id], lambda: plan(started))
        return await self.jobs.background(self.spawn, body)

    def _check(self, share: Share, src: Backend, dest: Backend, style: str) -> None:
        if dest is src:
            raise InvalidArgument(f"share {share.name} is on backend {dest.name} already")
        domain = src.config.replication_domain
        if not domain or dest.config.replication_domain != domain:
            raise NotSupported(f"backends {src.name} and {dest.name} are not in one "
                               "replication_domain")
        src.require("replication_support", "replicate shares")
        dest.require("replication_support", "hold replicas")
        if style == "readable" and not dest.driver.serves_exports:
            raise NotSupported(f"backend {dest.name} exports nothing: it holds dr replicas only")
        dest.require_protocol(share.protocol)
        if share.share_server_id or src.config.driver_handles_share_servers \
                or dest.config.driver_handles_share_servers:
            raise NotSupported("replicating shares of backends that handle share servers is "
                               "not implemented")
        replicas = self.store.replicas(share.id)
        if any(r.backend == dest.name for r in replicas):
            raise AlreadyExists(f"share {share.name} has a copy on backend {dest.name} already")
        if len(replicas) > C.MAX_REPLICAS_PER_SHARE:
            raise CapacityExceeded(f"share {share.name} has {C.MAX_REPLICAS_PER_SHARE} "
                                   "replicas, the limit")
        for rule in self.store.rules(share.id):
            dest.driver.validate_rule(share, rule)

    # --- syncs ---------------------------------------------------------------------------
    async def resync(self, replica_id: str, options: Dict[str, Any], uid: int) -> Job:
        """Resync: a sync now, as a Job (also brings a replica in error back)."""
        validation.options(options, {})
        replica = self.get(replica_id)
        if replica.role != C.ROLE_REPLICA or replica.status not in (C.STATUS_AVAILABLE,
                                                                      C.STATUS_ERROR):
            raise InvalidState(f"replica {replica.id} is the {replica.role} copy, "
                               f"{replica.status}; only an available replica or one in error "
                               "can be synced")
        self.jobs.check_room()

        async def body(started: "asyncio.Future[Job]") -> None:
            job = self.jobs.create("update_share_replica", [replica.share_id], uid)
            started.set_result(job)
            await self.sync(replica_id, job)
        return await self.jobs.background(self.spawn, body)

    async def sync(self, replica_id: str, job: Optional[Job] = None) -> None:
        """One update_share_replica: the replica brought up to the share now.
        Only the replica's lock is held while data moves."""
        replica = self.get(replica_id)
        share_id = replica.share_id

        async def plan() -> Optional[Operation]:
            r = self.store.get_replica(replica_id)
            share = self.store.get_share(share_id)
            if r is None or share is None or r.role != C.ROLE_REPLICA or r.status not in (
                    C.STATUS_AVAILABLE, C.STATUS_ERROR) or share.status != C.STATUS_AVAILABLE:
                if job is not None:
                    raise InvalidState(f"replica {replica_id} cannot be synced now")
                return None
            return self._sync_operation(share, r, job)
        op = await self.runner.run_if([_key(replica_id)], plan)
        if op is None or op.share is None:
            return
        # Served again under the share's lock with the rules of this moment.
        async with self.runner.locked([share_id, _key(replica_id)]):
            await self._reserve(share_id, replica_id)

    def _sync_operation(self, share: Share, r: Replica, job: Optional[Job]) -> Operation:
        src, dest = self._usable(share.backend), self._usable(r.backend)
        snaps = self._snapshots(share.id)
        previous = r.status
        progress = self.jobs.reporter(job) if job else _no_progress
        cancel = job.cancel_event if job else threading.Event()

        async def call() -> Dict[str, Any]:
            async with self._slots:
                state = dict(await src.call("replica_sync", share, view(share, r), dest.driver,
                                            dict(r.driver_data), snaps, progress, cancel) or {})
            state.pop("provider_location", None)
            return state
        return Operation("update_share_replica", dest, share=share, replica=r, restorable=True,
                         intent=lambda tx: tx.replica(r, task={"op": "update_share_replica"}),
                         call=call,
                         done=lambda tx, state: tx.replica(
                             r, C.STATUS_AVAILABLE, state=C.REPLICA_IN_SYNC,
                             last_sync=now_us(), driver_data=state),
                         failed=lambda tx, _: tx.replica(r, previous,
                                                         state=C.REPLICA_OUT_OF_SYNC),
                         undo=lambda tx: tx.replica(r))

    async def sync_share(self, share_id: str) -> None:
        """Every replica of the share now (after a snapshot or a revert); a
        replica that fails is out_of_sync and catches up later."""
        for replica in self.store.replicas(share_id):
            if replica.role == C.ROLE_REPLICA and replica.status == C.STATUS_AVAILABLE:
                try:
                    await self.sync(replica.id)
                except SharedError as exc:
                    log.warning("share %s: replica %s could not follow: %s", share_id,
                                replica.id, exc)

    async def run_periodic(self) -> None:
        """Sync every replica when its share's backend's replication_interval
        has passed since its last sync; mark it out_of_sync when it is late."""
        while True:
            await asyncio.sleep(self._tick())
            try:
                await self._due()
            except Exception:
                log.exception("replication: looking for replicas due a sync failed")

    def _tick(self) -> float:
        intervals = [float(b.config.replication_interval) for b in self.backends.values()
                     if b.config.replication_domain]
        return max(TICK_MIN, min([TICK_MAX] + [i / 4 for i in intervals]))

    async def _due(self) -> None:
        now = now_us()
        shares: Dict[str, Optional[Share]] = {}
        late: List[Replica] = []
        for r in self.store.replicas():
            if r.role != C.ROLE_REPLICA or r.status != C.STATUS_AVAILABLE \
                    or r.id in self._syncing:
                continue
            if r.share_id not in shares:
                shares[r.share_id] = self.store.get_share(r.share_id)
            share = shares[r.share_id]
            b = self.backends.get(share.backend) if share else None
            if b is None:
                continue
            interval_us = float(b.config.replication_interval) * 1e6
            if r.state == C.REPLICA_IN_SYNC and now - r.last_sync > 2 * interval_us:
                late.append(r)
            if now - r.last_sync >= interval_us:
                self._syncing.add(r.id)
                self.spawn(self._periodic_sync(r.id))
        if late:
            # One commit for all, with no await since the look above: the
            # rows written are the ones read (a sync or promote that ends
            # meanwhile is not written over).
            async with self.runner.durably() as tx:
                for r in late:
                    tx.replica(r, state=C.REPLICA_OUT_OF_SYNC)

    async def _periodic_sync(self, replica_id: str) -> None:
        try:
            await self.sync(replica_id)
        except SharedError as exc:
            log.warning("replica %s: sync failed: %s", replica_id, exc)
        finally:
            self._syncing.discard(replica_id)

    # --- Promote -------------------------------------------------------------------------
    async def promote(self, replica_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {"force": bool})
        force = bool(options.get("force", False))
        share_id = self.get(replica_id).share_id

        async def plan() -> Operation:
            share = self._share(share_id)
            r = self.get(replica_id)
            if r.role != C.ROLE_REPLICA or r.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"replica {r.id} is the {r.role} copy, {r.status}; an "
                                   "available replica can be promoted")
            active = self._active(share.id)
            dest = self._usable(r.backend)
            if not dest.driver.serves_exports:
                raise NotSupported(f"backend {dest.name} cannot serve share {share.name}: its "
                                   "copy is on another host (serve it there)")
            task = {"op": PROMOTE, "replica": r.id, "active": active.id, "phase": SYNCING,
                    "state": dict(r.driver_data)}

            async def call() -> Tuple[Optional[ShareUpdate], Dict[str, Any], bool]:
                state, synced = await self._final_sync(share, r, dest, task, force)
                async with self.runner.durably() as tx:
                    tx.share(share, C.STATUS_REPLICATION_CHANGE,
                             task=dict(task, phase=SWITCHING, state=state, synced=synced))
                return await self._switch(share, r, dest, synced), state, synced

            def done(tx: Changes, result: Tuple[Optional[ShareUpdate], Dict[str, Any], bool]
                     ) -> None:
                update, state, synced = result
                self._swap(tx, share, r, active, update, state, synced)

            def failed(tx: Changes, _: bool) -> None:
                # Before the switch the old active is still the share (ensure
                # serves it writable again); during it, error until ensure.
                phase = self.store.share_task(share.id).get("phase")
                tx.share(share, C.STATUS_ERROR if phase == SWITCHING else C.STATUS_AVAILABLE)
            return Operation(PROMOTE, dest, share=share, replica=r,
                             intent=lambda tx: tx.share(share, C.STATUS_REPLICATION_CHANGE,
                                                        task=task),
                             call=call, done=done, failed=failed,
                             undo=lambda tx: tx.share(share, C.STATUS_AVAILABLE))
        op = await self.runner.run(self.keys(share_id), plan)
        log.info("share %s: replica %s on backend %s is the active copy now", share_id,
                 replica_id, op.backend.name)
        self._after_promote(share_id)

    async def _final_sync(self, share: Share, r: Replica, dest: Backend,
                          task: Dict[str, Any], force: bool) -> Tuple[Dict[str, Any], bool]:
        """The active made read-only and synced a last time, if its backend
        can be reached; (the sync state, whether it was synced). A failure
        refuses the promote, unless forced: then it goes on from the last
        sync (the active's data may be what failed)."""
        src = self.backends.get(share.backend)
        as_is = dict(task["state"]), False
        if src is None or src.setup_error:
            log.warning("share %s: backend %s cannot be reached; promoting replica %s as it "
                        "is (last sync %s)", share.name, share.backend, r.id,
                        time.ctime(r.last_sync / 1e6))
            return as_is
        rules = access.granting(self.store, share.id)
        try:
            await src.call("update_access", share, access.read_only(rules), [], [])
            state = dict(await src.call("replica_sync", share, view(share, r), dest.driver,
                                        dict(task["state"]), self._snapshots(share.id),
                                        _no_progress, threading.Event()) or {})
        except SharedError as exc:
            if not force:
                await src.call("update_access", share, rules, [], [])    # writable again
                raise
            log.warning("share %s: the last sync to replica %s failed (%s); promoting it as "
                        "it is (force; last sync %s)", share.name, r.id, exc,
                        time.ctime(r.last_sync / 1e6))
            return as_is
        state.pop("provider_location", None)
        return state, True

    async def _switch(self, share: Share, r: Replica, dest: Backend,
                      reachable: bool) -> Optional[ShareUpdate]:
        """The old active stops serving; the replica serves as the share.
        Idempotent (recovery replays it)."""
        src = self.backends.get(share.backend)
        if src is not None and not src.setup_error:
            try:
                await src.call("replica_unserve", share)
            except SharedError as exc:
                if reachable:
                    raise
                # Not synced: the old copy is in error, and ensure stops
                # serving it once its backend works again.
                log.error("share %s: the old active on backend %s could not be unexported: "
                          "%s", share.name, src.name, exc)
        await dest.call("replica_unserve", view(share, r))
        new = dataclasses.replace(share, backend=dest.name,
                                  provider_location=r.provider_location, export_locations=[],
                                  driver_data={}, share_server_id=None)
        update: Optional[ShareUpdate] = await dest.call("ensure_share", new,
                                                        access.granting(self.store, share.id))
        return update

    def _swap(self, tx: Changes, share: Share, r: Replica, active: Replica,
              update: Optional[ShareUpdate], state: Dict[str, Any], synced: bool) -> None:
        old_location = share.provider_location
        fields = fields_of(update)
        fields.pop("size_gib", None)
        fields.setdefault("provider_location", r.provider_location)
        tx.share(share, C.STATUS_AVAILABLE, backend=r.backend, driver_data={}, **fields)
        tx.replica(r, role=C.ROLE_ACTIVE, state=C.REPLICA_IN_SYNC, export_locations=[],
                   provider_location=share.provider_location, driver_data={},
                   last_sync=now_us())
        tx.replica(active, role=C.ROLE_REPLICA, style=r.style, export_locations=[],
                   provider_location=old_location, driver_data=state,
                   state=C.REPLICA_OUT_OF_SYNC if synced else C.STATUS_ERROR,
                   last_sync=now_us() if synced else active.last_sync)

    def _after_promote(self, share_id: str) -> None:
        """The old active follows the new one at once (when it can be reached)."""
        for r in self.store.replicas(share_id):
            if r.role == C.ROLE_REPLICA and r.state == C.REPLICA_OUT_OF_SYNC:
                self.spawn(self._periodic_sync(r.id))

    # --- Delete -------------------------------------------------------------------------
    async def delete(self, replica_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        share_id = self.get(replica_id).share_id

        async def plan() -> Operation:
            r = self.get(replica_id)
            share = self._share(share_id, any_status=True)
            if r.role != C.ROLE_REPLICA:
                raise InvalidState(f"replica {r.id} is the active copy of share {share.name}; "
                                   "promote another replica first, or delete the replicas")
            if r.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                raise InvalidState(f"replica {r.id} is {r.status}; it can be deleted when "
                                   "available or in error")
            dest = self._usable(r.backend)
            snaps = self._snapshots(share.id)
            previous = r.status

            def done(tx: Changes, _: Any) -> None:
                tx.remove_replica(r)
                self._drop_lone_active(tx, share.id)
            # A readable replica's exports are a grant: their removal is a revocation.
            return Operation("delete_share_replica", dest, share=share, replica=r,
                             unblockable=True,
                             intent=lambda tx: tx.replica(r, C.STATUS_DELETING,
                                                          task={"op": "delete_share_replica",
                                                                "previous": previous}),
                             call=lambda: self._remove_data(share, r, snaps,
                                                            dict(r.driver_data)),
                             done=done,
                             failed=lambda tx, _: tx.replica(r, C.STATUS_ERROR))
        await self.runner.run(self.keys(share_id), plan)
        self.runner.forget_lock(_key(replica_id))

    async def _remove_data(self, share: Share, r: Replica, snaps: List[Snapshot],
                           state: Dict[str, Any]) -> None:
        dest = self.backends[r.backend]
        src = self.backends.get(share.backend)
        source = src.driver if src is not None and not src.setup_error else None
        await dest.call("replica_remove", share, view(share, r), state, snaps, source)

    def _drop_lone_active(self, tx: Changes, share_id: str) -> None:
        """The active copy's row goes with the share's last replica."""
        rows = self.store.replicas(share_id)
        if all(r.role == C.ROLE_ACTIVE for r in rows):
            for r in rows:
                tx.remove_replica(r)

    # --- what share operations ask of the replicas ------------------------------------
    async def copies(self, share: Share) -> None:
        """The readable replicas take the share's rules (read-only): called
        after every rule change, under the share's lock."""
        for r in self.store.replicas(share.id):
            if r.role == C.ROLE_REPLICA and r.style == "readable" \
                    and r.status == C.STATUS_AVAILABLE:
                dest = self._usable(r.backend)
                await dest.call("update_access", view(share, r),
                                access.read_only(access.granting(self.store, share.id)), [], [])

    async def delete_snapshot(self, share: Share, snap: Snapshot) -> None:
        """delete_replicated_snapshot: the snapshot's copy on each replica."""
        for r in self.store.replicas(share.id):
            if r.role == C.ROLE_REPLICA:
                dest = self._usable(r.backend)
                await dest.call("delete_snapshot", snap, view(share, r))

    async def _serve(self, share: Share, r: Replica) -> Optional[ShareUpdate]:
        """A readable replica exported read-only with the share's rules."""
        if r.style != "readable":
            return None
        dest = self._usable(r.backend)
        update: Optional[ShareUpdate] = await dest.call(
            "ensure_share", view(share, r),
            access.read_only(access.granting(self.store, share.id)))
        return update

    async def _reserve(self, share_id: str, replica_id: str) -> None:
        share, r = self.store.get_share(share_id), self.store.get_replica(replica_id)
        if share is None or r is None or r.status != C.STATUS_AVAILABLE or r.style != "readable":
            return
        try:
            update = await self._serve(share, r)
        except SharedError as exc:
            log.error("replica %s: cannot export it: %s", replica_id, exc)
            async with self.runner.durably() as tx:
                tx.replica(r, C.STATUS_ERROR)
            return
        locations = list(fields_of(update).get("export_locations", r.export_locations))
        if locations != r.export_locations:
            async with self.runner.durably() as tx:
                tx.replica(r, export_locations=locations)

    # --- start-up ------------------------------------------------------------------------
    async def recover(self, only: Optional[str] = None) -> None:
        """Settle what a crash interrupted: replicas being made or removed,
        promotes (see the module's docstring)."""
        for share_id in self.store.replicated_share_ids():
            share = self.store.get_share(share_id)
            if share is None:
                continue
            await isolated(f"share {share.name} ({share.id})", self._recover_locked(share, only),
                           step="replication recovery")

    async def _recover_locked(self, share: Share, only: Optional[str]) -> None:
        async with self.runner.locked(self.keys(share.id)):
            await self._recover_share(share, only)

    async def _recover_share(self, share: Share, only: Optional[str]) -> None:
        if share.status == C.STATUS_REPLICATION_CHANGE:
            await self._recover_promote(share)
        snaps = self._snapshots(share.id)
        for r in self.store.replicas(share.id):
            if r.status not in (C.STATUS_CREATING, C.STATUS_DELETING) or (
                    only and only not in (r.backend, share.backend)):
                continue
            dest = self.backends.get(r.backend)
            if dest is None or dest.setup_error:
                log.warning("replica %s waits: backend %s is not usable", r.id, r.backend)
                continue
            log.info("recovery: replica %s of share %s was %s; removing it", r.id, share.name,
                     r.status)
            await self._remove_data(share, r, snaps, dict(r.driver_data))
            async with self.runner.durably() as tx:
                tx.remove_replica(r)
                self._drop_lone_active(tx, share.id)

    async def _recover_promote(self, share: Share) -> None:
        task = self.store.share_task(share.id)
        r = self.store.get_replica(str(task.get("replica", "")))
        active = self.store.get_replica(str(task.get("active", "")))
        if task.get("phase") != SWITCHING or r is None or active is None:
            log.info("recovery: share %s was being promoted (%s); it stays on backend %s",
                     share.name, task.get("phase"), share.backend)
            async with self.runner.durably() as tx:
                tx.share(share, C.STATUS_AVAILABLE)     # ensure serves it writable again
            return
        dest = self.backends.get(r.backend)
        if dest is None or dest.setup_error:
            log.warning("share %s: its promote waits: backend %s is not usable", share.name,
                        r.backend)
            return
        log.info("recovery: finishing the promote of share %s to backend %s", share.name,
                 r.backend)
        synced = bool(task.get("synced"))
        update = await self._switch(share, r, dest, synced)
        async with self.runner.durably() as tx:
            self._swap(tx, share, r, active, update, dict(task.get("state") or {}), synced)

    async def ensure(self, backends: List[str]) -> None:
        """Readable replicas on these backends exported again (at start, or
        when their export service came back); a former active demoted while
        its backend was away (state error) no longer served as the share."""
        for r in self.store.replicas():
            if r.backend in backends and r.role == C.ROLE_REPLICA:
                await isolated(f"replica {r.id}", self._ensure_replica(r), step="ensure")

    async def _ensure_replica(self, r: Replica) -> None:
        async with self.runner.locked([r.share_id, _key(r.id)]):
            share = self.store.get_share(r.share_id)
            if share is None:
                return
            if r.state == C.STATUS_ERROR:
                try:
                    await self.backends[r.backend].call("replica_unserve", dataclasses.replace(
                        share, backend=r.backend, provider_location=r.provider_location))
                except SharedError as exc:
                    log.error("replica %s: cannot stop its old exports: %s", r.id, exc)
            if r.style == "readable" and r.status == C.STATUS_AVAILABLE:
                await self._reserve(r.share_id, r.id)

    # --- helpers ----------------------------------------------------------------------
    def _share(self, share_id: str, any_status: bool = False) -> Share:
        share = self.store.get_share(share_id)
        if share is None:
            raise NotFound(f"no share with id {share_id[:80]}")
        if share.status != C.STATUS_AVAILABLE and not any_status:
            raise InvalidState(f"share {share.name} is {share.status}; its replicas can be "
                               "changed when it is available")
        return share

    def _active(self, share_id: str) -> Replica:
        for r in self.store.replicas(share_id):
            if r.role == C.ROLE_ACTIVE:
                return r
        raise InvalidState(f"share {share_id} has no active replica")

    def _usable(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise NotFound(f"no backend named {name[:80]!r} (enabled: {', '.join(self.backends)})")
        return b.usable()

    def _snapshots(self, share_id: str) -> List[Snapshot]:
        return [s for s in self.store.snapshots(share_id) if s.status == C.STATUS_AVAILABLE]


def _key(replica_id: str) -> str:
    return f"replica:{replica_id}"
