"""Snapshots (Manila's snapshot methods): create, delete, revert to, and
adopt or release existing ones (manage_existing_snapshot, unmanage_snapshot).

A snapshot belongs to one share and lives on the share's backend; on a
replicated share it exists on every copy (the replications follow each
change). Adopting is bounded like ManageShare: the driver accepts only what
lies in the share's snapshot area and is a snapshot of that share, refused
before anything is recorded. Releasing keeps the data; a crash while adopting
or releasing leaves the data in place and the snapshot unmanaged.

Schedules (`Scheduler`): a share's snapshot_schedule (its own, else its
backend's) names when it gets a snapshot called after the elapse
(auto-YYYYMMDDTHHMMSSZ, UTC); after each, its snapshot_retention prunes the
scheduled snapshots no rule keeps, never one in use. Shares with the same
schedule are taken together at each elapse; an elapse missed while sharedd
was down is taken once at start. Scheduled snapshots are created and
deleted by the same operations as any other (hooks included), so a crash
in the middle is recovered the same way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from . import access, validation
from . import constants as C
from .backend import Backend
from .errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, SharedError
from .models import Share, Snapshot, fields_of
from .operation import Operation, Runner, isolated
from .replication import Replications
from .schedule import NAME_PREFIX, Retention, Schedule, name_time, scheduled_name
from .store import Store, new_id
from .util import now_us

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 replications: Replications, spawn: Callable[[Awaitable[Any]], None],
                 share_in: Callable[[str, Tuple[str, ...], str], Share]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.replications = replications
        self.spawn = spawn
        self.share_in = share_in      # the share, refused unless in one of the statuses
        # share id -> (schedule, retention, visibility) of its own ("": its backend's)
        self._policies: Dict[str, Tuple[str, str, str]] = {}
        # how many shares have each schedule text of their own: the texts in
        # use, known without reading the shares
        self._own_schedules: "collections.Counter[str]" = collections.Counter()
        for share_id, policy in store.snapshot_policies().items():
            self._remember(share_id, policy)
        self._parsed: Dict[str, Schedule] = {}
        self.scheduler = Scheduler(self)

    def get(self, snapshot_id: str) -> Snapshot:
        s = self.store.get_snapshot(snapshot_id)
        if s is None:
            raise NotFound(f"no snapshot with id {snapshot_id[:80]}")
        return s

    def _share(self, share_id: str) -> Share:
        share = self.store.get_share(share_id)
        if share is None:
            raise NotFound(f"no share with id {share_id[:80]}")
        return share

    def _backend(self, share: Share) -> Backend:
        return self.backends[share.backend].usable()

    def _settled(self, snapshot_id: str, share_id: str,
                 verb: str) -> Tuple[Snapshot, Share, Backend]:
        """A snapshot that may be deleted or unmanaged now, its share and
        backend: available or in error, and not a group snapshot's member."""
        snap = self.get(snapshot_id)
        share = self._share(share_id)
        b = self._backend(share)
        if snap.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
            raise InvalidState(f"snapshot {snap.name} is {snap.status}; it can be {verb} "
                               "when available or in error")
        if snap.group_snapshot_id:
            raise InvalidState(f"snapshot {snap.name} is a member of share group snapshot "
                               f"{snap.group_snapshot_id}: it is {verb} with that one")
        rules = self.store.count_snapshot_rules(snap.id)
        if rules:
            raise InvalidState(f"snapshot {snap.name} has {rules} access rule(s): clients may "
                               f"mount it; deny them before it is {verb}")
        return snap, share, b

    def _unique_name(self, share: Share, name: str) -> None:
        if any(s.name == name for s in self.store.snapshots(share.id)):
            raise AlreadyExists(f"share {share.name} already has a snapshot named {name!r}")

    # ----------------------------------------------------------------- create
    async def create(self, share_id: str, name: str, options: Dict[str, Any]) -> Snapshot:
        validation.options(options, {})
        name = validation.name(name, "snapshot")

        snap = Snapshot(id=new_id(), name=name, share_id=share_id, size_gib=0,
                        status=C.STATUS_CREATING, created_at=now_us())

        async def plan() -> Operation:
            share = self.share_in(share_id, (C.STATUS_AVAILABLE,), "snapshotted")
            b = self._backend(share)
            b.require("snapshot_support", "take snapshots")
            self._unique_name(share, name)
            snap.size_gib = share.size_gib
            method = "create_replicated_snapshot" if self.replications.is_replicated(share.id) \
                else "create_snapshot"
            async def call() -> Any:
                location = await b.call("create_snapshot", snap, share)
                await self.view(b, share)
                return location
            return Operation(method, b, share=share, snapshot=snap,
                             intent=lambda tx: tx.add_snapshot(snap),
                             call=call,
                             done=lambda tx, loc: tx.snapshot(snap, C.STATUS_AVAILABLE,
                                                              provider_location=loc or ""),
                             compensate=lambda: b.call("delete_snapshot", snap, share),
                             failed=lambda tx, undone: tx.remove_snapshot(snap) if undone
                             else tx.snapshot(snap, C.STATUS_ERROR),
                             undo=lambda tx: tx.remove_snapshot(snap))
        await self.runner.run(self.replications.keys(share_id), plan)
        # Every replica holds it when this returns (one that cannot catches up).
        await self.replications.sync_share(share_id)
        return self.get(snap.id)

    # ----------------------------------------------------------------- delete
    async def delete(self, snapshot_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        share_id = self.get(snapshot_id).share_id

        async def plan() -> Operation:
            snap, share, b = self._settled(snapshot_id, share_id, "deleted")
            previous = snap.status
            replicated = self.replications.is_replicated(share.id)

            async def call() -> None:
                # out of the view first: a mounted subvolume cannot be deleted
                await self.view(b, share)
                await b.call("delete_snapshot", snap, share)
                if replicated:
                    await self.replications.delete_snapshot(share, snap)
            return Operation("delete_replicated_snapshot" if replicated else "delete_snapshot",
                             b, share=share, snapshot=snap,
                             intent=lambda tx: tx.snapshot(snap, C.STATUS_DELETING),
                             call=call,
                             done=lambda tx, _: tx.remove_snapshot(snap),
                             failed=lambda tx, _: tx.snapshot(snap, C.STATUS_ERROR),
                             undo=lambda tx: tx.snapshot(snap, previous))
        await self.runner.run(self.replications.keys(share_id), plan)

    # ----------------------------------------------------------------- revert
    async def revert(self, share_id: str, snapshot_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})

        async def plan() -> Operation:
            share = self.share_in(share_id, (C.STATUS_AVAILABLE,), "reverted")
            snap = self.get(snapshot_id)
            if snap.share_id != share.id:
                raise InvalidArgument(f"snapshot {snap.name} belongs to another share")
            if snap.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"snapshot {snap.name} is {snap.status}, not available")
            b = self._backend(share)
            b.require("revert_to_snapshot_support", "revert shares to snapshots")
            method = "revert_to_replicated_snapshot" \
                if self.replications.is_replicated(share.id) else "revert_to_snapshot"
            return Operation(method, b, share=share, snapshot=snap,
                             intent=lambda tx: tx.share(share, C.STATUS_REVERTING,
                                                        task={"op": "revert_to_snapshot",
                                                              "snapshot": snap.id}),
                             call=lambda: b.call("revert_to_snapshot", share, snap,
                                                 access.granting(self.store, share.id)),
                             done=lambda tx, update: tx.share(share, C.STATUS_AVAILABLE,
                                                              **fields_of(update)),
                             failed=lambda tx, _: tx.share(share, C.STATUS_ERROR),
                             undo=lambda tx: tx.share(share, C.STATUS_AVAILABLE))
        await self.runner.run(self.replications.keys(share_id), plan)
        self.spawn(self.replications.sync_share(share_id))   # the replicas follow

    # ----------------------------------------------------------------- manage
    async def manage(self, share_id: str, provider_location: str,
                     options: Dict[str, Any]) -> Snapshot:
        """Adopt a snapshot the backend holds (made by hand, or released
        by unmanage) as a snapshot of the share."""
        validation.options(options, {"name": str})
        location = validation.export_path(provider_location)
        name = validation.name(options.get("name") or validation.name_from_path(location),
                               "snapshot")
        snap = Snapshot(id=new_id(), name=name, share_id=share_id, size_gib=0,
                        status=C.STATUS_MANAGE_STARTING, created_at=now_us())

        def owned(share: Share, found: str) -> None:
            other = self.store.snapshot_at(share.id, found)
            if other is not None and other.id != snap.id:
                raise AlreadyExists(f"{location} is already snapshot {other.name}")

        async def plan() -> Operation:
            share = self.share_in(share_id, (C.STATUS_AVAILABLE,), "given a snapshot")
            b = self._backend(share)
            b.require("manage_snapshot_support", "manage existing snapshots")
            if self.replications.is_replicated(share.id):
                raise InvalidState(f"share {share.name} has replicas: a snapshot adopted on one "
                                   "copy would be missing on the others; delete them first")
            self._unique_name(share, name)
            # Every check that can refuse runs before anything is recorded.
            found = await b.call("check_manage_snapshot", share, location)
            owned(share, found)
            snap.provider_location = found

            async def call() -> int:
                size: int = await b.call("manage_existing_snapshot", snap, share, location)
                await self.view(b, share)
                return size
            return Operation("manage_existing_snapshot", b, share=share, snapshot=snap,
                             intent=lambda tx: tx.add_snapshot(snap),
                             call=call,
                             done=lambda tx, size: tx.snapshot(snap, C.STATUS_AVAILABLE,
                                                               size_gib=int(size)),
                             # adopting changes nothing on the backend: no undo there
                             failed=lambda tx, _: tx.remove_snapshot(snap),
                             undo=lambda tx: tx.remove_snapshot(snap))
        await self.runner.run(self.replications.keys(share_id), plan)
        return self.get(snap.id)

    async def unmanage(self, snapshot_id: str, options: Dict[str, Any]) -> None:
        """Forget the snapshot, keep its data on the backend."""
        validation.options(options, {})
        share_id = self.get(snapshot_id).share_id

        async def plan() -> Operation:
            snap, share, b = self._settled(snapshot_id, share_id, "unmanaged")
            b.require("manage_snapshot_support", "unmanage snapshots")
            if self.replications.is_replicated(share.id):
                raise InvalidState(f"share {share.name} has replicas, which hold this snapshot "
                                   "too; delete them first")
            previous = snap.status

            async def call() -> None:
                await self.view(b, share)
                await b.call("unmanage_snapshot", snap, share)
            return Operation("unmanage_snapshot", b, share=share, snapshot=snap,
                             intent=lambda tx: tx.snapshot(snap, C.STATUS_UNMANAGE_STARTING),
                             call=call,
                             done=lambda tx, _: tx.remove_snapshot(snap),
                             failed=lambda tx, _: tx.snapshot(snap, C.STATUS_ERROR),
                             undo=lambda tx: tx.snapshot(snap, previous))
        await self.runner.run(self.replications.keys(share_id), plan)

    # -------------------------------------------------------------- policies
    def policy(self, share: Share) -> Tuple[str, str]:
        """(schedule, retention) in force for the share: its own, else its
        backend's; "" for no schedule, and for keeping every snapshot."""
        own_schedule, own_retention, _ = self._policies.get(share.id, ("", "", ""))
        b = self.backends.get(share.backend)
        defaults = (str(getattr(b.config, "snapshot_schedule", "") or ""),
                    str(getattr(b.config, "snapshot_retention", "") or "")) if b else ("", "")
        schedule = "" if own_schedule == NONE else own_schedule or defaults[0]
        retention = "" if own_retention == ALL else own_retention or defaults[1]
        return schedule, retention

    def own_policy(self, share_id: str) -> Tuple[str, str, str]:
        return self._policies.get(share_id, ("", "", ""))

    def visibility(self, share: Share) -> str:
        """visible or hidden: do the share's clients see its snapshots (its
        own setting, else its backend's; auto: CIFS shares do)?"""
        own = self._policies.get(share.id, ("", "", ""))[2]
        b = self.backends.get(share.backend)
        value = own or (str(getattr(b.config, "snapshot_visibility", "") or "auto") if b
                        else C.SNAPSHOTS_HIDDEN)
        if value == "auto":
            value = C.SNAPSHOTS_VISIBLE if share.protocol == "CIFS" else C.SNAPSHOTS_HIDDEN
        return value

    @staticmethod
    def check_policy(options: Dict[str, Any]
                     ) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        """(schedule, retention, visibility) named by options (None: not
        named), checked."""
        schedule = options.get("snapshot_schedule")
        retention = options.get("snapshot_retention")
        visibility = options.get("snapshot_visibility")
        if visibility is not None:
            visibility = str(visibility).strip()
            if visibility not in ("",) + C.SNAPSHOT_VISIBILITIES:
                raise InvalidArgument(f"snapshot_visibility {visibility[:40]!r}: say visible, "
                                      "hidden, or \"\" for the backend's")
        if schedule is not None:
            schedule = str(schedule).strip()
            if schedule not in ("", NONE):
                Schedule.parse(schedule)
        if retention is not None:
            retention = str(retention).strip()
            if retention not in ("", ALL):
                Retention.parse(retention)
        return schedule, retention, visibility

    async def set_policy(self, share: Share, schedule: Optional[str], retention: Optional[str],
                         visibility: Optional[str] = None) -> bool:
        """Record the share's own schedule, retention and/or visibility
        (checked); True if what its clients see changes."""
        old = self._policies.get(share.id, ("", "", ""))
        new = (old[0] if schedule is None else schedule, old[1] if retention is None else retention,
               old[2] if visibility is None else visibility)
        if new == old:
            return False
        shown = self.visibility(share)
        async with self.runner.durably() as tx:
            self.store.set_snapshot_policy(share.id, *new)
            tx.share_touched(share)
            # memory follows the commit at once: a caller during the fsync reads it
            tx.after_write.append(lambda: self._remember(share.id, new))
        self.scheduler.changed()
        return self.visibility(share) != shown

    def _remember(self, share_id: str, policy: Tuple[str, str, str]) -> None:
        old = self._policies.pop(share_id, None)
        if old is not None:
            self._own_schedules[old[0]] -= 1
            if not self._own_schedules[old[0]]:
                del self._own_schedules[old[0]]
        if policy != ("", "", ""):
            self._policies[share_id] = policy
            self._own_schedules[policy[0]] += 1

    # ------------------------------------------------------------ snapshot view
    async def view(self, b: Backend, share: Share) -> None:
        """Make the share's clients see its snapshots, or none, as its
        visibility says (inside an operation of the share, or under its lock)."""
        if self.visibility(share) == C.SNAPSHOTS_VISIBLE:
            await b.snapshot_view(share, self.store.snapshots(share.id),
                                  access.granting(self.store, share.id))
        else:
            await b.snapshot_view(share, [], [])

    async def show(self, share_id: str) -> None:
        """After a visibility change: the view follows, under the share's lock."""
        async with self.runner.locked([share_id]):
            share = self.store.get_share(share_id)
            if share is not None and share.status == C.STATUS_AVAILABLE:
                await self.view(self.backends[share.backend], share)

    async def ensure_views(self, backends: List[str], server: Optional[str] = None) -> None:
        """At ensure: every share whose driver can show snapshots shows
        exactly what its visibility says (one that shows none and has no
        view costs a directory lookup). The shares are read aside and
        looked at in a worker thread: 10,000 of them are not one step."""
        wanted = set(backends)

        def available(view: Store) -> List[Share]:
            return [share for share in view.shares_in(C.STATUS_AVAILABLE)
                    if share.backend in wanted
                    and (server is None or share.share_server_id == server)]

        def to_show(shares: List[Share]) -> List[Share]:
            out = []
            for share in shares:
                b = self.backends[share.backend]
                try:
                    if not b.driver.shows_snapshots(share) or (
                            self.visibility(share) == C.SNAPSHOTS_HIDDEN
                            and not b.driver.has_snapshot_view(share)):
                        continue
                except Exception:     # (show() says what is wrong, for this share alone)
                    pass
                out.append(share)
            return out
        for share in await asyncio.to_thread(to_show, await self.store.read(available)):
            await isolated(f"share {share.name}: snapshot view not ensured", self.show(share.id),
                           step="ensure", level=logging.WARNING)

    def share_removed(self, share_id: str) -> None:
        """The share is gone, its policy row with it (a Runner listener)."""
        self._remember(share_id, ("", "", ""))

    def schedule_of(self, text: str) -> Schedule:
        sched = self._parsed.get(text)
        if sched is None:
            sched = self._parsed[text] = Schedule.parse(text)
        return sched

    # ------------------------------------------------------ scheduled snapshots
    async def take_scheduled(self, share_id: str, elapse: float) -> None:
        """The share's snapshot of this elapse (once), then its pruning."""
        share = self.store.get_share(share_id)
        if share is None:
            return
        name = scheduled_name(elapse)
        if share.status != C.STATUS_AVAILABLE:
            log.warning("share %s is %s: no scheduled snapshot %s", share.name, share.status, name)
            return
        if not any(s.name == name for s in self.store.snapshots(share.id)):
            try:
                await self.create(share.id, name, {})
            except SharedError as exc:
                log.warning("share %s: scheduled snapshot %s not taken: %s", share.name, name, exc)
                return
        await self.prune(share_id)

    async def prune(self, share_id: str, now: Optional[float] = None) -> List[str]:
        """Delete the share's scheduled snapshots its retention lets go,
        except those in use; the ids deleted."""
        share = self.store.get_share(share_id)
        if share is None or share.status != C.STATUS_AVAILABLE:
            return []
        retention = Retention.parse(self.policy(share)[1])
        scheduled = [(s, name_time(s.name)) for s in self.store.snapshots(share.id)]
        created = [(s.id, at) for s, at in scheduled if at is not None]
        deleted = []
        for sid in retention.doomed(created, time.time() if now is None else now):
            snap = self.store.get_snapshot(sid)
            if snap is None or self.in_use(snap):
                continue
            try:
                await self.delete(sid, {})
                deleted.append(sid)
            except SharedError as exc:
                log.warning("share %s: scheduled snapshot %s not pruned: %s",
                            share.name, snap.name, exc)
        return deleted

    def in_use(self, snap: Snapshot) -> bool:
        """Kept whatever the retention says: not settled, a member of a
        share group snapshot, exported (it has access rules), or a share is
        being made from it."""
        return snap.status != C.STATUS_AVAILABLE or bool(snap.group_snapshot_id) \
            or self.store.share_made_from(snap.id) or self.store.count_snapshot_rules(snap.id) > 0

    def schedules_in_use(self) -> Set[str]:
        """Every schedule text some share may follow: the backends' defaults
        and the shares' own (from memory: a policy change reads no share)."""
        texts = {str(getattr(b.config, "snapshot_schedule", "") or "")
                 for b in self.backends.values()}
        texts.update(self._own_schedules)
        return texts - {"", NONE}

    async def scheduled_shares(self) -> Dict[str, List[str]]:
        """schedule text -> ids of the shares it applies to, oldest first
        (every share of a backend with a default schedule, else only those
        with a schedule of their own), read aside: at an elapse, never on a
        policy change."""
        defaults = {name: str(getattr(b.config, "snapshot_schedule", "") or "")
                    for name, b in self.backends.items()}
        defaults = {name: text for name, text in defaults.items() if text}
        return await self.store.read(lambda view: _by_schedule(
            view.share_schedules(every=bool(defaults)), defaults))


def _by_schedule(rows: Iterable[Tuple[str, str, str]],
                 defaults: Mapping[str, str]) -> Dict[str, List[str]]:
    """(share id, backend, own schedule) rows grouped by the schedule in
    force (as Snapshots.policy says)."""
    out: Dict[str, List[str]] = {}
    for share_id, backend, own in rows:
        text = "" if own == NONE else own or defaults.get(backend, "")
        if text:
            out.setdefault(text, []).append(share_id)
    return out


#: a share's own schedule "none": no scheduled snapshots, whatever its backend says
NONE = "none"
#: a share's own retention "all": keep every scheduled snapshot
ALL = "all"


class Scheduler:
    """Takes the scheduled snapshots: one task, asleep until the next elapse
    of any schedule in use (or a change)."""

    #: longest sleep between two looks (a policy change wakes it at once)
    TICK_MAX = 3600.0
    #: scheduled snapshots taken at once
    PARALLEL = 4

    def __init__(self, snapshots: Snapshots):
        self.snapshots = snapshots
        self._wake = asyncio.Event()
        self._done: Dict[str, float] = {}      # schedule text -> elapse last taken

    def changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await self.catch_up()
        while True:
            self._wake.clear()
            texts = self.snapshots.schedules_in_use()
            for text in set(self._done) - texts:
                del self._done[text]          # a text used again starts afresh
            now = time.time()
            due: Dict[str, float] = {}
            for text in texts:
                last = self.snapshots.schedule_of(text).last_at_or_before(now)
                if last is None:
                    continue
                done = self._done.setdefault(text, last)   # new: from its next elapse on
                if last > done:
                    due[text] = last
            if due:
                groups = await self.snapshots.scheduled_shares()
                for text, last in due.items():
                    self._done[text] = last
                    await self._take(groups.get(text, []), last)
            nexts = [self.snapshots.schedule_of(t).next_after(time.time()) for t in texts]
            delay = min([n - time.time() for n in nexts] + [self.TICK_MAX])
            try:
                async with asyncio.timeout(max(0.01, delay + 0.01)):   # (see hooks.manager)
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def catch_up(self) -> None:
        """An elapse missed while sharedd was down: taken once, now."""
        if not self.snapshots.schedules_in_use():
            return
        now = time.time()
        newest_names = await self.snapshots.store.read(lambda view: view.newest_named(NAME_PREFIX))
        for text, share_ids in (await self.snapshots.scheduled_shares()).items():
            last = self.snapshots.schedule_of(text).last_at_or_before(now)
            if last is None:
                continue
            self._done[text] = last
            behind = []
            for share_id in share_ids:
                newest = name_time(newest_names.get(share_id, ""))
                if newest is None or newest < last:
                    behind.append(share_id)
            if behind:
                log.info("taking %d scheduled snapshot(s) missed while sharedd was down "
                         "(schedule %s)", len(behind), text)
                await self._take(behind, last)

    async def _take(self, share_ids: List[str], elapse: float) -> None:
        """PARALLEL workers through the shares (not a task per share: one
        step would make 10,000)."""
        queue = iter(share_ids)

        async def worker() -> None:
            for share_id in queue:
                try:
                    await self.snapshots.take_scheduled(share_id, elapse)
                except Exception:   # one share's trouble must not stop the schedule
                    log.exception("scheduled snapshot of share %s failed", share_id)
        await asyncio.gather(*(worker() for _ in range(self.PARALLEL)))
