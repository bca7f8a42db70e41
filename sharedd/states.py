"""The state machine of shares, snapshots and access rules, in one table.

Every status change in sharedd goes through `Changes` (one database
transaction): it checks the change against the table below, writes it, and
collects what observers must hear once the transaction has committed. A
change the table does not allow is a bug: it raises IllegalTransition (not a
SharedError, so it can never pass for a refusal) and rolls the whole
transaction back.

`None` stands for "no such row": (None, "creating") is an insert,
("deleting", None) a removal.

Access rules follow Manila's states. A rule being denied (queued_to_deny,
denying) has no way back to a granting state: a deny is an intent that is
retried until applied and is never re-granted. A rule in error after a
failed allow is retried through queued_to_apply, never promoted directly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

from . import constants as C
from .models import (AccessRule, Replica, Share, ShareGroup, ShareGroupSnapshot, ShareNetwork,
                     ShareServer, Snapshot)
from .store import Store

Edge = Tuple[Optional[str], Optional[str]]

SHARE: FrozenSet[Edge] = frozenset({
    (None, C.STATUS_CREATING), (None, C.STATUS_MANAGE_STARTING),
    (C.STATUS_CREATING, C.STATUS_AVAILABLE), (C.STATUS_CREATING, C.STATUS_ERROR),
    (C.STATUS_CREATING, None),
    (C.STATUS_MANAGE_STARTING, C.STATUS_AVAILABLE), (C.STATUS_MANAGE_STARTING, None),
    (C.STATUS_MANAGE_STARTING, C.STATUS_ERROR),
    (C.STATUS_AVAILABLE, C.STATUS_EXTENDING), (C.STATUS_AVAILABLE, C.STATUS_SHRINKING),
    (C.STATUS_AVAILABLE, C.STATUS_REVERTING), (C.STATUS_AVAILABLE, C.STATUS_DELETING),
    (C.STATUS_AVAILABLE, C.STATUS_UNMANAGE_STARTING), (C.STATUS_AVAILABLE, C.STATUS_ERROR),
    (C.STATUS_ERROR, C.STATUS_AVAILABLE), (C.STATUS_ERROR, C.STATUS_DELETING),
    (C.STATUS_ERROR, C.STATUS_UNMANAGE_STARTING),
    (C.STATUS_EXTENDING, C.STATUS_AVAILABLE), (C.STATUS_EXTENDING, C.STATUS_ERROR),
    (C.STATUS_SHRINKING, C.STATUS_AVAILABLE), (C.STATUS_SHRINKING, C.STATUS_ERROR),
    (C.STATUS_REVERTING, C.STATUS_AVAILABLE), (C.STATUS_REVERTING, C.STATUS_ERROR),
    (C.STATUS_DELETING, None), (C.STATUS_DELETING, C.STATUS_ERROR),
    (C.STATUS_UNMANAGE_STARTING, None), (C.STATUS_UNMANAGE_STARTING, C.STATUS_ERROR),
    # Migration: the share serves from its source until the switch; a
    # failure or cancel leaves it available there; error only if neither
    # side can be trusted (recovery could not settle it).
    (C.STATUS_AVAILABLE, C.STATUS_MIGRATING),
    (C.STATUS_MIGRATING, C.STATUS_AVAILABLE), (C.STATUS_MIGRATING, C.STATUS_ERROR),
    # Promote: the active copy changes; back to available on either side.
    (C.STATUS_AVAILABLE, C.STATUS_REPLICATION_CHANGE),
    (C.STATUS_REPLICATION_CHANGE, C.STATUS_AVAILABLE),
    (C.STATUS_REPLICATION_CHANGE, C.STATUS_ERROR),
})

REPLICA: FrozenSet[Edge] = frozenset({
    (None, C.STATUS_CREATING),
    (C.STATUS_CREATING, C.STATUS_AVAILABLE), (C.STATUS_CREATING, C.STATUS_ERROR),
    (C.STATUS_CREATING, None),                  # undone (failure, pre hook, cancel)
    # The active copy's row: made with the share's first replica, removed
    # with its last (the share is then an ordinary share again).
    (None, C.STATUS_AVAILABLE), (C.STATUS_AVAILABLE, None),
    (C.STATUS_AVAILABLE, C.STATUS_DELETING), (C.STATUS_ERROR, C.STATUS_DELETING),
    (C.STATUS_DELETING, None), (C.STATUS_DELETING, C.STATUS_ERROR),
    (C.STATUS_AVAILABLE, C.STATUS_ERROR), (C.STATUS_ERROR, C.STATUS_AVAILABLE),   # resync
})

SNAPSHOT: FrozenSet[Edge] = frozenset({
    (None, C.STATUS_CREATING),
    (C.STATUS_CREATING, C.STATUS_AVAILABLE), (C.STATUS_CREATING, C.STATUS_ERROR),
    (C.STATUS_CREATING, None),
    (C.STATUS_AVAILABLE, C.STATUS_DELETING), (C.STATUS_ERROR, C.STATUS_DELETING),
    (C.STATUS_DELETING, None), (C.STATUS_DELETING, C.STATUS_ERROR),
    (C.STATUS_DELETING, C.STATUS_AVAILABLE),   # a pre hook refused the deletion
    # adopting existing storage (manage_existing_snapshot) and releasing it
    (None, C.STATUS_MANAGE_STARTING),
    (C.STATUS_MANAGE_STARTING, C.STATUS_AVAILABLE), (C.STATUS_MANAGE_STARTING, None),
    (C.STATUS_AVAILABLE, C.STATUS_UNMANAGE_STARTING), (C.STATUS_ERROR, C.STATUS_UNMANAGE_STARTING),
    (C.STATUS_UNMANAGE_STARTING, None), (C.STATUS_UNMANAGE_STARTING, C.STATUS_ERROR),
    (C.STATUS_UNMANAGE_STARTING, C.STATUS_AVAILABLE),   # a pre hook refused
})

RULE: FrozenSet[Edge] = frozenset({
    (None, C.RULE_APPLYING),
    (C.RULE_QUEUED_TO_APPLY, C.RULE_ACTIVE), (C.RULE_QUEUED_TO_APPLY, C.RULE_ERROR),
    (C.RULE_APPLYING, C.RULE_ACTIVE), (C.RULE_APPLYING, C.RULE_ERROR),
    (C.RULE_APPLYING, None),                    # a pre hook refused the grant
    (C.RULE_ERROR, C.RULE_QUEUED_TO_APPLY),     # retried
    # Every state may be denied (at once, or queued while the backend is
    # away); no deny state leads back to a grant.
    *((s, d) for s in (C.RULE_QUEUED_TO_APPLY, C.RULE_APPLYING, C.RULE_ACTIVE, C.RULE_ERROR)
      for d in (C.RULE_DENYING, C.RULE_QUEUED_TO_DENY)),
    (C.RULE_QUEUED_TO_DENY, C.RULE_DENYING),
    (C.RULE_DENYING, C.RULE_QUEUED_TO_DENY),    # the backend failed: retried later
    (C.RULE_DENYING, None), (C.RULE_QUEUED_TO_DENY, None),
})

SERVER: FrozenSet[Edge] = frozenset({
    (None, C.STATUS_CREATING),
    (C.STATUS_CREATING, C.SERVER_ACTIVE), (C.STATUS_CREATING, C.STATUS_ERROR),
    (C.STATUS_CREATING, None),                  # set-up undone (failure, pre hook)
    (C.SERVER_ACTIVE, C.STATUS_DELETING), (C.STATUS_ERROR, C.STATUS_DELETING),
    (C.SERVER_ACTIVE, C.STATUS_ERROR), (C.STATUS_ERROR, C.SERVER_ACTIVE),   # ensure
    (C.STATUS_DELETING, None), (C.STATUS_DELETING, C.STATUS_ERROR),
})

#: share groups and group snapshots: made, removed (a pre hook may refuse either)
GROUP: FrozenSet[Edge] = frozenset({
    (None, C.STATUS_CREATING),
    (C.STATUS_CREATING, C.STATUS_AVAILABLE), (C.STATUS_CREATING, C.STATUS_ERROR),
    (C.STATUS_CREATING, None),
    (C.STATUS_AVAILABLE, C.STATUS_DELETING), (C.STATUS_ERROR, C.STATUS_DELETING),
    (C.STATUS_DELETING, None), (C.STATUS_DELETING, C.STATUS_ERROR),
    (C.STATUS_DELETING, C.STATUS_AVAILABLE),
})

#: rules the backend must enforce (Manila's "active or being applied")
GRANTING = (C.RULE_QUEUED_TO_APPLY, C.RULE_APPLYING, C.RULE_ACTIVE)
#: rules whose revocation is pending: never enforced, never re-granted
DENY_PENDING = (C.RULE_QUEUED_TO_DENY, C.RULE_DENYING)

TABLES: Dict[str, FrozenSet[Edge]] = {"share": SHARE, "snapshot": SNAPSHOT, "rule": RULE,
                                      "server": SERVER, "replica": REPLICA,
                                      "group": GROUP, "group_snapshot": GROUP}


class IllegalTransition(AssertionError):
    """A change the state table forbids: a bug, never a caller's mistake."""


def check(kind: str, old: Optional[str], new: Optional[str]) -> None:
    if old == new and new is not None:
        return   # rewriting other fields in the same state
    if (old, new) not in TABLES[kind]:
        raise IllegalTransition(f"{kind}: {old or '(none)'} -> {new or '(removed)'} "
                                "is not an allowed transition")


class Changes:
    """One transaction's changes, each checked against the table.

    Objects passed in are updated in place, so the caller's copies tell the
    new state. `events` lists (observer method, argument) pairs to deliver
    after COMMIT; `after_commit` callables are told, first, whether the
    COMMIT was done (once it is on disk, for a commit published after its
    fsync); `after_write` ones when the COMMIT is done, before that fsync.
    """

    def __init__(self, store: Store):
        self.store = store
        self.events: List[Tuple[str, Any]] = []
        self.after_commit: List[Callable[[bool], None]] = []
        self.after_write: List[Callable[[], None]] = []

    def _event(self, name: str, arg: Any) -> None:
        if (name, arg) not in self.events:
            self.events.append((name, arg))

    def next_seq(self) -> int:
        return self.store.next_seq()

    # --- shares ----------------------------------------------------------
    def add_share(self, share: Share, task: Optional[Dict[str, Any]] = None) -> None:
        check("share", None, share.status)
        self.store.insert_share(share, task)
        self._event("share_added", share)

    def share(self, share: Share, status: Optional[str] = None, *,
              task: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        """Change a share's status (and other fields) in one checked step."""
        current = self.store.share_status(share.id)
        target = share.status if status is None else status
        check("share", current, target)
        if task is None and target == C.STATUS_MIGRATING:
            task = self.store.share_task(share.id)   # a migration's intent outlives other writes
        if (current == target and task is None and share.status == target
                and all(getattr(share, k) == v for k, v in fields.items())):
            return   # nothing changes (an ensure of a healthy share): no write, no event
        for key, value in fields.items():
            setattr(share, key, value)
        share.status = target
        self.store.update_share(share, task)
        self._event("share_changed", share)

    def remove_share(self, share: Share) -> None:
        check("share", self.store.share_status(share.id), None)
        for snap in self.store.snapshots(share.id):
            self._event("snapshot_removed", snap.id)
        for replica_id in self.store.replica_ids(share.id):
            self._event("replica_removed", replica_id)
        self.store.delete_share(share.id)   # its rules go with it
        self._event("share_removed", share.id)

    # --- snapshots ---------------------------------------------------------
    def add_snapshot(self, snap: Snapshot) -> None:
        check("snapshot", None, snap.status)
        self.store.insert_snapshot(snap)
        self._event("snapshot_added", snap)

    def snapshot(self, snap: Snapshot, status: str, **fields: Any) -> None:
        check("snapshot", self.store.snapshot_status(snap.id), status)
        for key, value in fields.items():
            setattr(snap, key, value)
        snap.status = status
        self.store.update_snapshot(snap)
        self._event("snapshot_changed", snap)

    def snapshot_exports(self, snap: Snapshot, locations: List[str]) -> None:
        """Where clients mount the snapshot now (no state change)."""
        if list(snap.export_locations) == locations:
            return
        snap.export_locations = locations
        self.store.update_snapshot(snap)
        self._event("snapshot_changed", snap)

    def share_touched(self, share: Share) -> None:
        """Something the share's object shows changed, not its state."""
        self._event("share_changed", share)

    def remove_snapshot(self, snap: Snapshot) -> None:
        check("snapshot", self.store.snapshot_status(snap.id), None)
        self.store.delete_snapshot(snap.id)
        self._event("snapshot_removed", snap.id)

    # --- share groups and group snapshots ---------------------------------------
    def add_group(self, group: ShareGroup) -> None:
        check("group", None, group.status)
        self.store.insert_group(group)
        self._event("group_added", group)

    def group(self, group: ShareGroup, status: str) -> None:
        check("group", self.store.group_status(group.id), status)
        group.status = status
        self.store.update_group(group)
        self._event("group_changed", group)

    def remove_group(self, group: ShareGroup) -> None:
        check("group", self.store.group_status(group.id), None)
        self.store.delete_group(group.id)
        self._event("group_removed", group.id)

    def add_group_snapshot(self, gs: ShareGroupSnapshot) -> None:
        check("group_snapshot", None, gs.status)
        self.store.insert_group_snapshot(gs)
        self._event("group_snapshot_added", gs)

    def group_snapshot(self, gs: ShareGroupSnapshot, status: str) -> None:
        check("group_snapshot", self.store.group_snapshot_status(gs.id), status)
        gs.status = status
        self.store.update_group_snapshot(gs)
        self._event("group_snapshot_changed", gs)

    def remove_group_snapshot(self, gs: ShareGroupSnapshot) -> None:
        check("group_snapshot", self.store.group_snapshot_status(gs.id), None)
        self.store.delete_group_snapshot(gs.id)
        self._event("group_snapshot_removed", gs.id)

    # --- replicas --------------------------------------------------------------
    def add_replica(self, replica: Replica, task: Optional[Dict[str, Any]] = None) -> None:
        check("replica", None, replica.status)
        self.store.insert_replica(replica, task)
        self._event("replica_added", replica)

    def replica(self, replica: Replica, status: Optional[str] = None, *,
                task: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        """Change a replica's status, role, state or placement in one checked step."""
        target = replica.status if status is None else status
        check("replica", self.store.replica_status(replica.id), target)
        for key, value in fields.items():
            setattr(replica, key, value)
        replica.status = target
        self.store.update_replica(replica, task)
        self._event("replica_changed", replica)

    def remove_replica(self, replica: Replica) -> None:
        check("replica", self.store.replica_status(replica.id), None)
        self.store.delete_replica(replica.id)
        self._event("replica_removed", replica.id)

    # --- share networks and servers ------------------------------------------
    def add_network(self, network: ShareNetwork) -> None:
        self.store.insert_network(network)
        self._event("network_added", network)

    def remove_network(self, network: ShareNetwork) -> None:
        self.store.delete_network(network.id)
        self._event("network_removed", network.id)

    def add_server(self, server: ShareServer, task: Optional[Dict[str, Any]] = None) -> None:
        check("server", None, server.status)
        self.store.insert_server(server, task)
        self._event("server_added", server)
        self._event("network_changed", server.network_id)

    def server(self, server: ShareServer, status: str, *,
               task: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        check("server", self.store.server_status(server.id), status)
        for key, value in fields.items():
            setattr(server, key, value)
        server.status = status
        self.store.update_server(server, task)
        self._event("server_changed", server)

    def remove_server(self, server: ShareServer) -> None:
        check("server", self.store.server_status(server.id), None)
        self.store.delete_server(server.id)
        self._event("server_removed", server.id)
        self._event("network_changed", server.network_id)

    # --- rules -------------------------------------------------------------
    def add_rule(self, share: Share, rule: AccessRule) -> None:
        check("rule", None, rule.state)
        self.store.insert_rule(rule)
        self._event("rules_changed", share)

    def rule(self, share: Share, rule: AccessRule, state: Optional[str]) -> None:
        """Move a rule to state (None: remove it)."""
        current = self.store.rule_state(rule.id)
        check("rule", current, state)
        if current == state:
            return   # already so: no write, no event
        if state is None:
            self.store.delete_rule(rule.id)
        else:
            rule.state = state
            self.store.set_rule_state(rule.id, state)
        self._event("rules_changed", share)

    def snapshot_rule(self, snap: Snapshot, rule: AccessRule, state: Optional[str]) -> None:
        """Move a snapshot's rule to state (None: remove it); the same
        states and edges as a share's rules."""
        current = self.store.snapshot_rule_state(rule.id)
        check("rule", current, state)
        if current == state:
            return
        if state is None:
            self.store.delete_snapshot_rule(rule.id)
        elif current is None:
            rule.state = state
            self.store.insert_snapshot_rule(snap.id, rule)
        else:
            rule.state = state
            self.store.set_snapshot_rule_state(rule.id, state)
        self._event("snapshot_changed", snap)


class Observer:
    """Hears every committed change (the D-Bus adapter implements this)."""

    def share_added(self, share: Share) -> None: ...
    def share_changed(self, share: Share) -> None: ...
    def share_removed(self, share_id: str) -> None: ...
    def rules_changed(self, share: Share) -> None: ...
    def snapshot_added(self, snapshot: Snapshot) -> None: ...
    def snapshot_changed(self, snapshot: Snapshot) -> None: ...
    def snapshot_removed(self, snapshot_id: str) -> None: ...
    def backend_changed(self, name: str) -> None: ...
    def network_added(self, network: ShareNetwork) -> None: ...
    def network_changed(self, network_id: str) -> None: ...
    def network_removed(self, network_id: str) -> None: ...
    def server_added(self, server: ShareServer) -> None: ...
    def server_changed(self, server: ShareServer) -> None: ...
    def server_removed(self, server_id: str) -> None: ...
    def replica_added(self, replica: Replica) -> None: ...
    def replica_changed(self, replica: Replica) -> None: ...
    def replica_removed(self, replica_id: str) -> None: ...
    def group_added(self, group: ShareGroup) -> None: ...
    def group_changed(self, group: ShareGroup) -> None: ...
    def group_removed(self, group_id: str) -> None: ...
    def group_snapshot_added(self, gs: ShareGroupSnapshot) -> None: ...
    def group_snapshot_changed(self, gs: ShareGroupSnapshot) -> None: ...
    def group_snapshot_removed(self, gs_id: str) -> None: ...
    def job_added(self, job: Any) -> None: ...
    def job_changed(self, job: Any) -> None: ...
    def job_completed(self, outcome: Tuple[Any, bool, str]) -> None:
        """(job, success, message): the job is gone afterwards."""

    def hook_fired(self, phase: str, method: str, record_json: str) -> None:
        """The dbus hook's record; called from worker threads."""

    #: helpers.base.BusCall over the daemon's own connection, or None
    bus_call: Optional[Callable[..., List[Any]]] = None


def deliver(events: List[Tuple[str, Any]], observer: Any,
            on_error: Callable[[str, BaseException], None]) -> None:
    """Tell the observer, in order; an observer bug never undoes a commit."""
    for name, arg in events:
        try:
            getattr(observer, name)(arg)
        except Exception as exc:   # the adapter's problem, logged by the caller
            on_error(name, exc)
