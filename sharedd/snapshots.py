"""Snapshots (Manila's snapshot methods): create, delete, revert to, and
adopt or release existing ones (manage_existing_snapshot, unmanage_snapshot).

A snapshot belongs to one share and lives on the share's backend; on a
replicated share it exists on every copy (the replications follow each
change). Adopting is bounded like ManageShare: the driver accepts only what
lies in the share's snapshot area and is a snapshot of that share, refused
before anything is recorded. Releasing keeps the data; a crash while adopting
or releasing leaves the data in place and the snapshot unmanaged.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Dict, Mapping, Tuple

from . import access, validation
from . import constants as C
from .backend import Backend
from .errors import AlreadyExists, InvalidArgument, InvalidState, NotFound
from .models import Share, Snapshot, fields_of
from .operation import Operation, Runner
from .replication import Replications
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
            return Operation(method, b, share=share, snapshot=snap,
                             intent=lambda tx: tx.add_snapshot(snap),
                             call=lambda: b.call("create_snapshot", snap, share),
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
            snap = self.get(snapshot_id)
            share = self._share(share_id)
            b = self._backend(share)
            if snap.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                raise InvalidState(f"snapshot {snap.name} is {snap.status}; it can be deleted "
                                   "when available or in error")
            previous = snap.status
            replicated = self.replications.is_replicated(share.id)

            async def call() -> None:
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
            snap = self.get(snapshot_id)
            share = self._share(share_id)
            b = self._backend(share)
            b.require("manage_snapshot_support", "unmanage snapshots")
            if snap.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                raise InvalidState(f"snapshot {snap.name} is {snap.status}; it can be unmanaged "
                                   "when available or in error")
            if self.replications.is_replicated(share.id):
                raise InvalidState(f"share {share.name} has replicas, which hold this snapshot "
                                   "too; delete them first")
            previous = snap.status
            return Operation("unmanage_snapshot", b, share=share, snapshot=snap,
                             intent=lambda tx: tx.snapshot(snap, C.STATUS_UNMANAGE_STARTING),
                             call=lambda: b.call("unmanage_snapshot", snap, share),
                             done=lambda tx, _: tx.remove_snapshot(snap),
                             failed=lambda tx, _: tx.snapshot(snap, C.STATUS_ERROR),
                             undo=lambda tx: tx.snapshot(snap, previous))
        await self.runner.run(self.replications.keys(share_id), plan)
