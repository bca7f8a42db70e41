"""Mountable snapshots (Manila's snapshot_update_access): clients granted on
a snapshot mount it read-only, through an export of its own that the
share's export helper serves.

Rules on a snapshot have the states and edges of a share's rules and live
in their own table (no query of a share's rules can see them). Every rule
is read-only, whatever a client asks. A snapshot with rules is in use: it
is not deleted, released or pruned until they are denied. Revocation is
never lost: a deny the backend cannot apply leaves the rule
queued_to_deny, granting nothing, and the next ensure completes it, since
ensure exports exactly the granting rules (as for shares).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import access, validation
from . import constants as C
from .backend import Backend
from .errors import (AlreadyExists, BackendFailure, CapacityExceeded, InvalidState, NotFound,
                     SharedError)
from .models import AccessRule, Share, Snapshot
from .operation import Operation, Runner, isolated
from .states import DENY_PENDING, GRANTING, Changes
from .store import Store, new_id
from .util import now_us


class SnapshotAccess:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 share_in: Callable[[str, Tuple[str, ...], str], Share]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.share_in = share_in      # the share, refused unless in one of the statuses

    def _snapshot(self, snapshot_id: str) -> Snapshot:
        snap = self.store.get_snapshot(snapshot_id)
        if snap is None:
            raise NotFound(f"no snapshot with id {snapshot_id[:80]}")
        return snap

    def rules(self, snapshot_id: str) -> List[AccessRule]:
        return self.store.snapshot_rules(snapshot_id)

    @staticmethod
    def _exported(tx: Changes, snap: Snapshot, locations: Optional[Sequence[str]]) -> None:
        tx.snapshot_exports(snap, list(locations or []))

    # ----------------------------------------------------------------- allow
    async def allow(self, snapshot_id: str, access_type: str, access_to: str,
                    options: Dict[str, Any]) -> str:
        validation.options(options, {})
        kind, to, level = validation.access_rule(access_type, access_to, C.ACCESS_LEVELS[1])
        share_id = self._snapshot(snapshot_id).share_id
        rule = AccessRule(id=new_id(), share_id=share_id, access_type=kind, access_to=to,
                          access_level=level, state=C.RULE_APPLYING, created_at=now_us())

        async def plan() -> Operation:
            snap = self._snapshot(snapshot_id)
            if snap.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"snapshot {snap.name} is {snap.status}; it can be given "
                                   "access rules when available")
            share = self.share_in(share_id, (C.STATUS_AVAILABLE,), "have its snapshots exported")
            b = self.backends[share.backend].usable()
            b.require("mount_snapshot_support", "export snapshots")
            bc = b.config
            # The backend's default squash, as for the share's own new rules.
            rule.squash, rule.anonuid, rule.anongid = validation.rule_squash(
                {}, share.protocol == "NFS",
                (bc.default_squash, bc.default_anonuid, bc.default_anongid))
            b.driver.validate_rule(share, rule)
            if self.store.count_snapshot_rules(snap.id) >= C.MAX_SNAPSHOT_ACCESS_RULES:
                raise CapacityExceeded(f"snapshot {snap.name} has {C.MAX_SNAPSHOT_ACCESS_RULES} "
                                       "access rules, the limit; deny some first")
            exported = self.store.snapshots_with_rules(share.id)
            if snap.id not in exported and len(exported) >= C.MAX_EXPORTED_SNAPSHOTS:
                raise CapacityExceeded(f"share {share.name} has {len(exported)} exported "
                                       "snapshots, the limit; deny the rules of one first")
            r = self.store.find_snapshot_rule(snap.id, kind, to)
            if r is not None:
                raise AlreadyExists(f"snapshot {snap.name} already has a {kind} rule for {to} "
                                    f"({r.state}, id {r.id}); "
                                    + ("wait until its deny is applied" if r.state in DENY_PENDING
                                       else "deny it first"))
            granting = self.store.snapshot_rules(snap.id, GRANTING)

            def done(tx: Changes, locations: Optional[List[str]]) -> None:
                tx.snapshot_rule(snap, rule, C.RULE_ACTIVE)
                self._exported(tx, snap, locations)
            return Operation("snapshot_update_access", b, share=share, snapshot=snap,
                             rules=[rule], is_allow=True,
                             intent=lambda tx: tx.snapshot_rule(snap, rule, C.RULE_APPLYING),
                             call=lambda: b.call("snapshot_update_access", snap, share,
                                                 granting + [rule], [rule], []),
                             done=done,
                             failed=lambda tx, _: tx.snapshot_rule(snap, rule, C.RULE_ERROR),
                             undo=lambda tx: tx.snapshot_rule(snap, rule, None))
        await self.runner.run([share_id], plan)
        if rule.state == C.RULE_ERROR:
            raise BackendFailure(f"the backend could not export the snapshot to {to}")
        return rule.id

    # ------------------------------------------------------------------ deny
    async def deny(self, snapshot_id: str, access_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        access_id = validation.object_id(access_id, "access id")
        share_id = self._snapshot(snapshot_id).share_id

        async def plan() -> Operation:
            snap = self._snapshot(snapshot_id)
            found_rule = self.store.get_snapshot_rule(snap.id, access_id)
            if found_rule is None:
                raise NotFound(f"snapshot {snap.name} has no access rule {access_id}")
            rule = found_rule
            share = self.store.get_share(share_id)
            found = self.backends.get(share.backend) if share else None
            if share is None or found is None or found.setup_error:
                async with self.runner.durably() as tx:     # the intent, kept for the next ensure
                    tx.snapshot_rule(snap, rule, C.RULE_QUEUED_TO_DENY)
                raise BackendFailure(f"the backend of snapshot {snap.name} is not usable now")
            b = found
            remaining = [r for r in self.store.snapshot_rules(snap.id, GRANTING)
                         if r.id != rule.id]

            def done(tx: Changes, locations: Optional[List[str]]) -> None:
                tx.snapshot_rule(snap, rule, None)
                self._exported(tx, snap, locations)
            return Operation("snapshot_update_access", b, share=share, snapshot=snap,
                             rules=[rule], is_allow=False, unblockable=True,
                             intent=lambda tx: tx.snapshot_rule(snap, rule, C.RULE_DENYING),
                             call=lambda: b.call("snapshot_update_access", snap, share,
                                                 remaining, [], [rule]),
                             done=done,
                             failed=lambda tx, _: tx.snapshot_rule(snap, rule,
                                                                   C.RULE_QUEUED_TO_DENY))
        try:
            await self.runner.run([share_id], plan)
        except SharedError as exc:
            if self.store.snapshot_rule_state(access_id) in DENY_PENDING:
                raise BackendFailure(f"the deny of rule {access_id} is queued and is completed "
                                     "at the next ensure; the rule no longer grants access "
                                     f"({exc})") from None
            raise

    # ---------------------------------------------------------------- ensure
    def ensure_operation(self, b: Backend, share: Share, snap: Snapshot) -> Operation:
        """Export the snapshot to exactly its granting rules (and the rules
        in error, retried); complete pending denies. No hook holds it back."""
        retried, pending, applied = access.ensure_sets(self.store.snapshot_rules(snap.id))

        def intent(tx: Changes) -> None:
            for r in retried:
                tx.snapshot_rule(snap, r, C.RULE_QUEUED_TO_APPLY)

        def done(tx: Changes, locations: Optional[List[str]]) -> None:
            for r in applied:
                tx.snapshot_rule(snap, r, C.RULE_ACTIVE)
            for r in pending:
                tx.snapshot_rule(snap, r, None)
            self._exported(tx, snap, locations)

        def failed(tx: Changes, _: bool) -> None:
            for r in self.store.snapshot_rules(snap.id):
                if r.state in (C.RULE_QUEUED_TO_APPLY, C.RULE_APPLYING):
                    tx.snapshot_rule(snap, r, C.RULE_ERROR)
        return Operation("snapshot_update_access", b, share=share, snapshot=snap,
                         unblockable=True, intent=intent,
                         call=lambda: b.call("snapshot_update_access", snap, share,
                                             applied, [], []),
                         done=done, failed=failed)

    async def ensure_all(self, backends: Sequence[str], server: Optional[str] = None) -> None:
        """Ensure every exported snapshot of an available share on backends
        (only server's shares, if named): those with rules, read aside, each
        looked at again under its share's lock."""
        wanted = set(backends)

        def exported(view: Store) -> List[Tuple[Snapshot, Share]]:
            out = []
            for snapshot_id in view.snapshots_with_rules():
                snap = view.get_snapshot(snapshot_id)
                share = view.get_share(snap.share_id) if snap else None
                if snap is not None and share is not None and share.backend in wanted \
                        and share.status == C.STATUS_AVAILABLE \
                        and (server is None or share.share_server_id == server):
                    out.append((snap, share))
            return out
        for snap, share in await self.store.read(exported):
            b = self.backends[share.backend]

            async def plan(b: Backend = b, share_id: str = share.id,
                           snapshot_id: str = snap.id) -> Optional[Operation]:
                now, of = self.store.get_snapshot(snapshot_id), self.store.get_share(share_id)
                if now is None or of is None or of.status != C.STATUS_AVAILABLE:
                    return None      # gone or busy since it was read
                return self.ensure_operation(b, of, now)
            await isolated(f"snapshot {snap.name} of share {share.name}: exports not ensured",
                           self.runner.run_if([share.id], plan), step="ensure",
                           level=logging.WARNING)
