"""Share groups (Manila's share group methods): shares of one backend that
are snapshotted together, and groups made again from such a snapshot.

A share joins a group when it is created (CreateShare option share_group)
and leaves it when it is deleted. A group snapshot is one snapshot of every
member, taken by the driver's create_share_group_snapshot in one call: the
volume driver freezes every member's file system for the copies (one point
in time), btrfs takes them one after another (each atomic, a few
milliseconds apart; Stats: consistent_group_snapshot_support). The member
snapshots are ordinary snapshots of their shares (revert, clone), except
that only the group snapshot deletes them. CreateShareGroup with
source_group_snapshot makes a new group whose shares are created from the
members, each by its own create_share_from_snapshot operation inside the
group's create_share_group_from_share_group_snapshot.

Start-up recovery: a group snapshot caught creating or deleting is removed
with its member snapshots; a group caught creating is kept in error if it
has members by then (their own recovery settles each), else removed; one
caught deleting is removed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from . import constants as C
from . import validation
from .backend import Backend
from .errors import AlreadyExists, CapacityExceeded, InvalidArgument, InvalidState, NotFound
from .models import Share, ShareGroup, ShareGroupSnapshot, Snapshot
from .operation import Operation, Runner, isolated
from .store import Store, new_id
from .util import now_us

log = logging.getLogger(__name__)


class ShareGroups:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 create_share: Callable[..., Awaitable[Share]],
                 view: Callable[[Backend, Share], Awaitable[None]]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.create_share = create_share    # the engine's, for groups made from a snapshot
        self.view = view                    # Snapshots.view: what clients see of snapshots

    # ------------------------------------------------------------------ reads
    def get(self, group_id: str) -> ShareGroup:
        g = self.store.get_group(group_id)
        if g is None:
            raise NotFound(f"no share group with id {group_id[:80]}")
        return g

    def get_snapshot(self, gs_id: str) -> ShareGroupSnapshot:
        gs = self.store.get_group_snapshot(gs_id)
        if gs is None:
            raise NotFound(f"no share group snapshot with id {gs_id[:80]}")
        return gs

    def members(self, group_id: str) -> List[Share]:
        return self.store.group_members(group_id)

    def snapshot_members(self, gs_id: str) -> List[Snapshot]:
        return self.store.group_snapshot_members(gs_id)

    def for_new_share(self, group_id: str, backend: str) -> ShareGroup:
        """The group a new share joins: available, on the share's backend,
        not full (CreateShare option share_group)."""
        g = self.get(validation.object_id(group_id, "share group id"))
        # a group being made from a group snapshot takes its members meanwhile
        allowed = (C.STATUS_AVAILABLE,) + ((C.STATUS_CREATING,) if g.source_group_snapshot_id
                                           else ())
        if g.status not in allowed:
            raise InvalidState(f"share group {g.name} is {g.status}, not available")
        if g.backend != backend:
            raise InvalidArgument(f"share group {g.name} holds shares of backend {g.backend}, "
                                  f"not {backend}")
        if len(self.members(g.id)) >= C.MAX_GROUP_MEMBERS:
            raise CapacityExceeded(f"share group {g.name} has {C.MAX_GROUP_MEMBERS} shares, "
                                   "the most a group may have")
        return g

    def _backend(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise NotFound(f"no backend named {name[:80]!r}")
        return b.usable()

    # ----------------------------------------------------------------- groups
    async def create(self, name: str, options: Dict[str, Any]) -> ShareGroup:
        validation.options(options, {"backend": str, "source_group_snapshot": str})
        name = validation.name(name, "share group")
        source: Optional[ShareGroupSnapshot] = None
        members: List[Tuple[Snapshot, Share]] = []
        if "source_group_snapshot" in options:
            source = self.get_snapshot(validation.object_id(options["source_group_snapshot"],
                                                            "share group snapshot id"))
            if source.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"share group snapshot {source.name} is {source.status}, "
                                   "not available")
            origin = self.get(source.group_id)
            if options.get("backend", origin.backend) != origin.backend:
                raise InvalidArgument(f"the group snapshot lives on backend {origin.backend}")
            for snap in self.snapshot_members(source.id):
                parent = self.store.get_share(snap.share_id)
                if parent is None:
                    raise InvalidState(f"share {snap.share_id} of the group snapshot is gone")
                members.append((snap, parent))
            backend_name = origin.backend
        else:
            backend_name = options.get("backend") or next(iter(self.backends))
        b = self._backend(backend_name)
        if source is not None:
            b.require("create_share_from_snapshot_support", "create shares from snapshots")
        group = ShareGroup(id=new_id(), name=name, backend=b.name, status=C.STATUS_CREATING,
                           created_at=now_us(),
                           source_group_snapshot_id=source.id if source else None)
        new_names = [self._member_name(name, parent.name) for _, parent in members]

        async def call() -> None:
            await b.call("create_share_group", group)
            for (snap, parent), share_name in zip(members, new_names):
                await self.create_share(share_name, parent.protocol, parent.size_gib,
                                        {"snapshot": snap.id, "share_group": group.id,
                                         "backend": b.name})

        async def plan() -> Operation:
            if self.store.find_group(name) is not None:
                raise AlreadyExists(f"a share group named {name!r} exists already")
            for share_name in new_names:
                if self.store.find_share(share_name) is not None:
                    raise AlreadyExists(f"a share named {share_name!r} exists already")
            method = "create_share_group_from_share_group_snapshot" if source \
                else "create_share_group"
            return Operation(method, b, group=group, group_snapshot=source,
                             intent=lambda tx: tx.add_group(group),
                             call=call,
                             done=lambda tx, _: tx.group(group, C.STATUS_AVAILABLE),
                             failed=lambda tx, _: self._settle_failed_group(tx, group),
                             undo=lambda tx: tx.remove_group(group))
        await self.runner.run([f"group:{group.id}", f"groupname:{name}"], plan)
        return self.get(group.id)

    @staticmethod
    def _member_name(group_name: str, share_name: str) -> str:
        """A share made from a group snapshot: <group>-<original share>."""
        return validation.name(f"{group_name}-{share_name}"[:63].rstrip("-._"), "share")

    def _settle_failed_group(self, tx: Any, group: ShareGroup) -> None:
        # members made before the failure stay, in a group in error
        if self.store.group_members(group.id):
            tx.group(group, C.STATUS_ERROR)
        else:
            tx.remove_group(group)

    async def delete(self, group_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})

        async def plan() -> Operation:
            group = self.get(group_id)
            if group.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                raise InvalidState(f"share group {group.name} is {group.status}")
            shares = self.members(group.id)
            if shares:
                raise InvalidState(f"share group {group.name} has {len(shares)} share(s); "
                                   "delete them first")
            snaps = self.store.group_snapshots(group.id)
            if snaps:
                raise InvalidState(f"share group {group.name} has {len(snaps)} group "
                                   "snapshot(s); delete them first")
            b = self._backend(group.backend)
            previous = group.status
            return Operation("delete_share_group", b, group=group,
                             intent=lambda tx: tx.group(group, C.STATUS_DELETING),
                             call=lambda: b.call("delete_share_group", group),
                             done=lambda tx, _: tx.remove_group(group),
                             failed=lambda tx, _: tx.group(group, C.STATUS_ERROR),
                             undo=lambda tx: tx.group(group, previous))
        await self.runner.run([f"group:{group_id}"], plan)

    # -------------------------------------------------------- group snapshots
    async def create_snapshot(self, group_id: str, name: str,
                              options: Dict[str, Any]) -> ShareGroupSnapshot:
        validation.options(options, {})
        name = validation.name(name, "share group snapshot")
        group = self.get(group_id)
        shares = self.members(group.id)
        gs = ShareGroupSnapshot(id=new_id(), name=name, group_id=group.id,
                                status=C.STATUS_CREATING, created_at=now_us())
        snaps = [Snapshot(id=new_id(), name=name, share_id=s.id, size_gib=s.size_gib,
                          status=C.STATUS_CREATING, created_at=gs.created_at,
                          group_snapshot_id=gs.id) for s in shares]

        async def call() -> List[Optional[str]]:
            current = [self.store.get_share(s.id) or s for s in shares]
            made: List[Optional[str]] = await b.call("create_share_group_snapshot",
                                                     list(zip(snaps, current)))
            for share in current:
                await self.view(b, share)
            return made

        def intent(tx: Any) -> None:
            tx.add_group_snapshot(gs)
            for snap in snaps:
                tx.add_snapshot(snap)

        def done(tx: Any, locations: List[Optional[str]]) -> None:
            for snap, location in zip(snaps, locations):
                tx.snapshot(snap, C.STATUS_AVAILABLE, provider_location=location or "")
            tx.group_snapshot(gs, C.STATUS_AVAILABLE)

        def failed(tx: Any, _: bool) -> None:
            # the driver removed what it made (or its failure left it in error)
            for snap in snaps:
                tx.remove_snapshot(snap)
            tx.remove_group_snapshot(gs)

        def undo(tx: Any) -> None:
            for snap in snaps:
                tx.remove_snapshot(snap)
            tx.remove_group_snapshot(gs)

        b = self._backend(group.backend)

        async def plan() -> Operation:
            current = self.get(group_id)
            if current.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"share group {current.name} is {current.status}, "
                                   "not available")
            now_members = self.members(group_id)
            if not now_members:
                raise InvalidState(f"share group {current.name} has no shares to snapshot")
            if [s.id for s in now_members] != [s.id for s in shares]:
                raise InvalidState(f"share group {current.name} changed meanwhile; try again")
            for s in now_members:
                if s.status != C.STATUS_AVAILABLE:
                    raise InvalidState(f"share {s.name} of the group is {s.status}, "
                                       "not available")
                if any(x.name == name for x in self.store.snapshots(s.id)):
                    raise AlreadyExists(f"share {s.name} already has a snapshot named {name!r}")
            if any(x.name == name for x in self.store.group_snapshots(group_id)):
                raise AlreadyExists(f"share group {current.name} already has a snapshot "
                                    f"named {name!r}")
            b.require("snapshot_support", "take snapshots")
            return Operation("create_share_group_snapshot", b, group=current, group_snapshot=gs,
                             intent=intent, call=call, done=done, failed=failed, undo=undo)
        await self.runner.run([f"group:{group_id}"] + [s.id for s in shares], plan)
        return self.get_snapshot(gs.id)

    async def delete_snapshot(self, gs_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        gs = self.get_snapshot(gs_id)
        members = self.snapshot_members(gs.id)

        async def plan() -> Operation:
            current = self.get_snapshot(gs_id)
            if current.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                raise InvalidState(f"share group snapshot {current.name} is {current.status}")
            group = self.get(current.group_id)
            b = self._backend(group.backend)
            snaps = self.snapshot_members(current.id)
            exported = [s.name for s in snaps if self.store.count_snapshot_rules(s.id)]
            if exported:
                raise InvalidState(f"share group snapshot {current.name}: member snapshots of "
                                   f"{len(exported)} share(s) have access rules; deny them first")
            pairs = []
            for snap in snaps:
                share = self.store.get_share(snap.share_id)
                if share is not None:
                    pairs.append((snap, share))
            previous = current.status

            def intent(tx: Any) -> None:
                tx.group_snapshot(current, C.STATUS_DELETING)
                for snap in snaps:
                    tx.snapshot(snap, C.STATUS_DELETING)

            def done(tx: Any, _: Any) -> None:
                for snap in snaps:
                    tx.remove_snapshot(snap)
                tx.remove_group_snapshot(current)

            def failed(tx: Any, _: bool) -> None:
                for snap in snaps:
                    tx.snapshot(snap, C.STATUS_ERROR)
                tx.group_snapshot(current, C.STATUS_ERROR)

            def undo(tx: Any) -> None:
                for snap in snaps:
                    tx.snapshot(snap, previous)
                tx.group_snapshot(current, previous)
            async def call() -> None:
                for _, share in pairs:       # out of the views before they go
                    await self.view(b, share)
                await b.call("delete_share_group_snapshot", pairs)
            return Operation("delete_share_group_snapshot", b, group=group,
                             group_snapshot=current, intent=intent, call=call,
                             done=done, failed=failed, undo=undo)
        await self.runner.run([f"group:{gs.group_id}"] + [s.share_id for s in members], plan)

    # --------------------------------------------------------------- recovery
    async def recover(self, only: Optional[str] = None) -> None:
        for gs in self.store.group_snapshots():
            group = self.store.get_group(gs.group_id)
            if group is None or (only and group.backend != only) \
                    or gs.status not in (C.STATUS_CREATING, C.STATUS_DELETING):
                continue
            b = self.backends.get(group.backend)
            if b is None or b.setup_error:
                continue
            snaps = self.snapshot_members(gs.id)
            pairs = [(s, sh) for s in snaps for sh in [self.store.get_share(s.share_id)] if sh]
            log.info("recovery: share group snapshot %s was %s: removing it", gs.id, gs.status)
            if not await isolated(f"share group snapshot {gs.id}",
                                  b.call("delete_share_group_snapshot", pairs), step="recovery",
                                  to_error=functools.partial(self._group_snapshot_error, gs, snaps)):
                continue
            async with self.runner.durably() as tx:
                for snap in snaps:
                    tx.remove_snapshot(snap)
                tx.remove_group_snapshot(gs)
        async with self.runner.durably() as tx:     # one commit for every group
            for group in self.store.groups():
                if (only and group.backend != only) \
                        or group.status not in (C.STATUS_CREATING, C.STATUS_DELETING):
                    continue
                log.info("recovery: share group %s was %s", group.id, group.status)
                if group.status == C.STATUS_CREATING and self.store.group_members(group.id):
                    tx.group(group, C.STATUS_ERROR)
                else:
                    tx.remove_group(group)

    async def _group_snapshot_error(self, gs: ShareGroupSnapshot, snaps: List[Snapshot]) -> None:
        async with self.runner.durably() as tx:
            for snap in snaps:
                tx.snapshot(snap, C.STATUS_ERROR)
            tx.group_snapshot(gs, C.STATUS_ERROR)
