"""Start-up recovery: finish or roll back what a crash interrupted.

Every operation records its intent (a transitional status, and for a share
the task) before the driver acts, so the status alone says what to do. The
tables below map each transitional status to the driver call that settles
it; drivers' destructive methods are idempotent, so replaying is safe.
Afterwards the engine ensures every share (mounted, exported, full rule set),
which also finishes reverts, applies rules caught mid-apply and completes
denies caught mid-deny.

A share that cannot be recovered - the driver fails, or its state cannot
even be read back (a bug) - is isolated: it goes to `error` with a log line
naming it, and the others are served. Nothing here makes start-up fail but
a state database that cannot be written any more (StateLost): then it stops
at once, as nothing it did could be recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from . import constants as C
from . import access, migration
from .backend import Backend
from .models import AccessRule, Share, Snapshot
from .operation import Operation, Runner, isolated
from .store import Store

log = logging.getLogger(__name__)

#: shares ensured at once (start-up, an export service's restart)
ENSURE_PARALLEL = 4

#: a share step returns None (the share is gone) or the fields it settles on
ShareStep = Callable[[Backend, Share, Dict[str, Any]], Awaitable[Optional[Dict[str, Any]]]]


async def _remove(b: Backend, share: Share, task: Dict[str, Any]) -> None:
    await b.call("delete_share", share)      # creating or deleting: the share goes


async def _release(b: Backend, share: Share, task: Dict[str, Any]) -> None:
    # Being managed or unmanaged: stop serving, keep the data. The driver may
    # have mounted and exported it before its location was recorded, so it
    # releases by share id.
    await b.call("unmanage", share)


async def _finish_extend(b: Backend, share: Share, task: Dict[str, Any]) -> Dict[str, Any]:
    new = int(task.get("new", share.size_gib))   # growing never loses data: finish it
    await b.call("extend_share", share, new)
    return {"size_gib": new}


async def _undo_shrink(b: Backend, share: Share, task: Dict[str, Any]) -> Dict[str, Any]:
    old = int(task.get("old", share.size_gib))   # the share may hold more than the new size
    await b.call("extend_share", share, old)
    return {"size_gib": old}


async def _settle_revert(b: Backend, share: Share, task: Dict[str, Any]) -> Dict[str, Any]:
    return {}   # ensure_share completes or rolls back the driver's crash-safe swap


SHARE_STEPS: Mapping[str, ShareStep] = {
    C.STATUS_CREATING: _remove,
    C.STATUS_DELETING: _remove,
    C.STATUS_MANAGE_STARTING: _release,
    C.STATUS_UNMANAGE_STARTING: _release,
    C.STATUS_EXTENDING: _finish_extend,
    C.STATUS_SHRINKING: _undo_shrink,
    C.STATUS_REVERTING: _settle_revert,
}

#: snapshots caught creating or deleting are removed; caught being adopted
#: or released, they are released (their data stays on the backend)
SNAPSHOT_STEPS: Mapping[str, str] = {C.STATUS_CREATING: "delete_snapshot", C.STATUS_DELETING: "delete_snapshot",
                  C.STATUS_MANAGE_STARTING: "unmanage_snapshot",
                  C.STATUS_UNMANAGE_STARTING: "unmanage_snapshot"}

#: rules: a deny caught in flight is queued again (ensure or the retry loop
#: finishes it); applies are re-applied by ensure; errors are retried there.
RULE_STEPS: Mapping[str, str] = {C.RULE_DENYING: C.RULE_QUEUED_TO_DENY}


async def recover(store: Store, runner: Runner, backends: Mapping[str, Backend],
                  only: Optional[str] = None) -> None:
    """Recover every usable backend's objects (only: just that backend's,
    when it comes up late). What is unsettled is read aside (the loop goes
    on at 10,000 shares); each is looked at again under its lock."""
    if only is not None:
        backends = {only: backends[only]}
    snaps, shares, unknown, rules = await store.read(_unsettled)
    for snap in snaps:
        await isolated(f"snapshot {snap.id}", _still(
            runner, snap.share_id, lambda: store.snapshot_status(snap.id), snap.status,
            functools.partial(_recover_snapshot, store, runner, backends, snap)),
            step="recovery", to_error=lambda: _snapshot_error(runner, snap))
    if only is None:
        for name, count in unknown.items():
            if name not in backends:
                log.warning("%d share(s) are on backend %s, which is not enabled", count, name)
    for share in shares:
        b = backends.get(share.backend)
        if b is None:
            continue
        if share.status == C.STATUS_MIGRATING and not b.setup_error:
            await isolated(f"share {share.name} ({share.id})",
                           migration.recover(store, runner, backends, share),
                           step="recovery", to_error=lambda: _share_error(runner, share))
            continue
        if b.setup_error or share.status not in SHARE_STEPS:
            continue
        await isolated(f"share {share.name} ({share.id})", _still(
            runner, share.id, lambda: store.share_status(share.id), share.status,
            functools.partial(_recover_share, store, runner, b, share)),
            step="recovery", to_error=lambda: _share_error(runner, share))
    async with runner.durably() as tx:       # one commit (and fsync) for every rule
        for rule in rules:
            owner = store.get_share(rule.share_id)
            if owner is None or owner.backend not in backends \
                    or store.rule_state(rule.id) != rule.state:
                continue      # gone, not ours, or settled since it was read
            tx.rule(owner, rule, RULE_STEPS[rule.state])


async def _still(runner: Runner, key: str, status: Callable[[], Optional[str]], was: str,
                 work: Callable[[], Awaitable[None]]) -> None:
    """work(), under key's lock, if the object is still in the status it was
    read in: a backend that comes up late takes calls before its recovery
    has read, and an operation in flight then is not one to finish."""
    async with runner.locked([key]):
        if status() == was:
            await work()


def _unsettled(view: Store) -> Tuple[List[Snapshot], List[Share], Dict[str, int],
                                     List[AccessRule]]:
    """What recovery finishes: snapshots and shares in a transitional
    status, and rules caught in flight (by index, not every row); and the
    number of shares of each backend."""
    snaps = sorted((s for status in SNAPSHOT_STEPS for s in view.snapshots_in(status)),
                   key=lambda s: (s.created_at, s.id))
    shares = sorted((s for status in (*SHARE_STEPS, C.STATUS_MIGRATING)
                     for s in view.shares_in(status)), key=lambda s: (s.created_at, s.id))
    return snaps, shares, view.share_counts(), view.rules_in(list(RULE_STEPS))


async def ensure_all(store: Store, runner: Runner, revoker: access.Revoker,
                     backends: List[Backend], progress: Callable[[int, int], None],
                     server: Optional[str] = None) -> None:
    """Ensure every available or error share of these backends: mounted,
    exported, exactly its granting rules applied, pending denies completed
    (access.ensure_operation). A few at a time: drivers run commands. The
    shares are read aside (at 10,000 that is 100-200 ms of work)."""
    by_name = {b.name: b for b in backends}

    def ensurable(view: Store) -> List[Share]:
        return [share for name in by_name for share in view.shares(name)
                if _ensurable(view, share)
                and (server is None or share.share_server_id == server)]
    todo = [(by_name[share.backend], share) for share in await store.read(ensurable)]
    queue, done = iter(todo), [0]

    async def ensure(b: Backend, share_id: str) -> None:
        async def plan() -> Optional[Operation]:
            share = store.get_share(share_id)
            if share is None or share.backend != b.name or not _ensurable(store, share):
                return None     # gone, moved to another backend, or in a migration's switch
            return access.ensure_operation(store, b, share)
        await runner.run_if([share_id], plan)

    async def worker() -> None:
        for b, share in queue:
            if store.failure:
                return        # another worker met StateLost: start-up stops
            await isolated(f"share {share.name} ({share.id})", ensure(b, share.id),
                           step="ensure", to_error=functools.partial(_share_error, runner, share))
            if access.pending_denies(store, share.id):
                revoker.retry_later(share.id)
            done[0] += 1
            progress(done[0], len(todo))
    progress(0, len(todo))
    await asyncio.gather(*(worker() for _ in range(min(ENSURE_PARALLEL, len(todo)))))
    progress(len(todo), len(todo))


def _ensurable(store: Store, share: Share) -> bool:
    """Available or error shares, and migrating ones whose source still
    serves read-write (copying, copied)."""
    if share.status == C.STATUS_MIGRATING:
        return migration.source_serves(store.share_task(share.id))
    return share.status in (C.STATUS_AVAILABLE, C.STATUS_ERROR)


async def _recover_share(store: Store, runner: Runner, b: Backend, share: Share) -> None:
    log.info("recovery: share %s (%s) was %s", share.name, share.id, share.status)
    fields = await SHARE_STEPS[share.status](b, share, store.share_task(share.id))
    async with runner.durably() as tx:
        if fields is None:
            tx.remove_share(share)
        else:
            tx.share(share, C.STATUS_AVAILABLE, **fields)


async def _recover_snapshot(store: Store, runner: Runner, backends: Mapping[str, Backend],
                            snap: Snapshot) -> None:
    share = store.get_share(snap.share_id)
    b = backends.get(share.backend) if share else None
    if share is None or b is None or b.setup_error:
        return
    step = SNAPSHOT_STEPS[snap.status]
    log.info("recovery: snapshot %s was %s: %s", snap.id, snap.status,
             "removing it" if step == "delete_snapshot" else "releasing it, its data kept")
    await b.call(step, snap, share)
    async with runner.durably() as tx:
        tx.remove_snapshot(snap)


async def _share_error(runner: Runner, share: Share) -> None:
    if runner.store.share_status(share.id) is None:
        return   # gone meanwhile: nothing to mark
    async with runner.durably() as tx:
        tx.share(share, C.STATUS_ERROR)


async def _snapshot_error(runner: Runner, snap: Snapshot) -> None:
    async with runner.durably() as tx:
        tx.snapshot(snap, C.STATUS_ERROR)
