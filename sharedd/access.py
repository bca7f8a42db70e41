"""Access rules as Manila keeps them: which rules the backend enforces, and
revocation as an intent that is never lost.

A deny is recorded (denying) and announced before the backend acts. If the
backend fails, or cannot act at all, the rule stays queued_to_deny: it is
retried with backoff, and every ensure completes it, because ensure applies
exactly the granting rules. No state of a rule being denied leads back to a
grant (states.RULE), so a failed revocation can never turn into access.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Set, Tuple

from . import constants as C
from .backend import Backend
from .errors import BackendFailure, SharedError, StateLost
from .models import AccessRule, Share, ShareUpdate, fields_of
from .operation import Operation, Runner
from .states import DENY_PENDING, GRANTING, Changes
from .store import Store

__all__ = ["DENY_PENDING", "GRANTING", "Revoker", "granting", "read_only", "pending_denies",
           "applied_state", "ensure_sets", "ensure_operation"]

log = logging.getLogger(__name__)

#: seconds between deny retries: doubling up to the cap
RETRY_FIRST, RETRY_CAP = 1.0, 60.0


def granting(store: Store, share_id: str) -> List[AccessRule]:
    """The rules the backend must enforce: active or being applied."""
    return store.rules(share_id, GRANTING)


def read_only(rules: List[AccessRule]) -> List[AccessRule]:
    """The rules as a read-only copy enforces them (a migration's source
    while its last changes are copied, a readable replica)."""
    return [dataclasses.replace(r, access_level=C.ACCESS_LEVELS[1]) for r in rules]


def pending_denies(store: Store, share_id: str) -> List[AccessRule]:
    return store.rules(share_id, DENY_PENDING)


def applied_state(states: Optional[Dict[str, str]], rule: AccessRule) -> str:
    """What update_access said of a new rule (drivers may report 'error')."""
    state = (states or {}).get(rule.id, C.RULE_ACTIVE)
    return C.RULE_ACTIVE if state == C.RULE_ACTIVE else C.RULE_ERROR


class Revoker:
    def __init__(self, store: Store, runner: Runner, backends: Mapping[str, Backend],
                 spawn: Callable[[Awaitable[Any]], None],
                 copies: Callable[[Share], Awaitable[None]]):
        self.store = store
        self.runner = runner
        self.backends = backends
        self.spawn = spawn
        # The share's other exported copies (readable replicas) take the same
        # rules; a copy that cannot keeps the deny pending (retried).
        self.copies = copies
        self._retrying: Set[str] = set()

    async def operation(self, share: Share, rules: List[AccessRule]) -> Operation:
        """Revoke rules (a revocation: no hook holds it back)."""
        found = self.backends.get(share.backend)
        if found is None or found.setup_error:
            # The backend cannot act now: record the intent; the retry applies it.
            async with self.runner.durably() as tx:
                for r in rules:
                    tx.rule(share, r, C.RULE_QUEUED_TO_DENY)
            raise BackendFailure(f"backend {share.backend} is not usable now")
        b = found

        def move(tx: Changes, _: Any = None, state: Optional[str] = C.RULE_QUEUED_TO_DENY) -> None:
            for r in rules:
                tx.rule(share, r, state)

        async def call() -> None:
            await b.call("update_access", share, granting(self.store, share.id), [], rules)
            await self.copies(share)
        return Operation("deny_access", b, share=share, rules=rules, is_allow=False,
                         unblockable=True,
                         intent=lambda tx: move(tx, state=C.RULE_DENYING),
                         call=call,
                         done=lambda tx, _: move(tx, state=None),   # gone
                         failed=move)                                # queued again

    async def deny(self, share_id: str, plan: Callable[[], Awaitable[Operation]],
                   access_id: str) -> None:
        try:
            await self.runner.run([share_id], plan)
        except SharedError as exc:
            if any(r.id == access_id for r in pending_denies(self.store, share_id)):
                self.retry_later(share_id)
                raise BackendFailure(f"the deny of rule {access_id} is queued and will be "
                                     "retried until applied; the rule no longer grants "
                                     f"access ({exc})") from None
            raise

    def retry_later(self, share_id: str) -> None:
        if share_id not in self._retrying:
            self._retrying.add(share_id)
            self.spawn(self._retry(share_id))

    async def _retry(self, share_id: str) -> None:
        delay = RETRY_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP)

                async def plan() -> Optional[Operation]:
                    share = self.store.get_share(share_id)
                    pending = pending_denies(self.store, share_id)
                    return await self.operation(share, pending) if share and pending else None
                try:
                    await self.runner.run_if([share_id], plan)
                except StateLost:
                    return        # nothing can be recorded: sharedd is exiting
                except SharedError as exc:
                    log.warning("share %s: deny still pending, retrying in %gs: %s",
                                share_id, delay, exc)
                    continue
                if not pending_denies(self.store, share_id):
                    return
        finally:
            self._retrying.discard(share_id)


def ensure_sets(rules: List[AccessRule]
                ) -> Tuple[List[AccessRule], List[AccessRule], List[AccessRule]]:
    """What an ensure does with rules: (in error: retried, pending denies:
    completed, applied: the granting ones and the retried)."""
    retried = [r for r in rules if r.state == C.RULE_ERROR]
    pending = [r for r in rules if r.state in DENY_PENDING]
    applied = [r for r in rules if r.state in GRANTING or r.state == C.RULE_ERROR]
    return retried, pending, applied


def ensure_operation(store: Store, b: Backend, share: Share) -> Operation:
    """Mount, export and apply exactly the granting rules (recovery mode).

    Rules in error after a failed allow are retried (through queued_to_apply,
    their state telling the truth); pending denies are completed, since the
    backend then enforces only the granting set. No hook holds ensure back:
    it restores what was granted and finishes revocations.
    """
    # One read: the share's lock is held from here to the end, so no rule
    # changes meanwhile (this runs for every share at start-up).
    retried, pending, applied = ensure_sets(store.rules(share.id))

    def intent(tx: Changes) -> None:
        for r in retried:
            tx.rule(share, r, C.RULE_QUEUED_TO_APPLY)

    # A migrating share stays so (ensure re-exports its source meanwhile).
    settled = C.STATUS_MIGRATING if share.status == C.STATUS_MIGRATING else C.STATUS_AVAILABLE

    def done(tx: Changes, update: Optional[ShareUpdate]) -> None:
        tx.share(share, settled, **fields_of(update))
        for r in applied:
            tx.rule(share, r, C.RULE_ACTIVE)
        for r in pending:
            tx.rule(share, r, None)

    def failed(tx: Changes, _: bool) -> None:
        tx.share(share, C.STATUS_ERROR if settled == C.STATUS_AVAILABLE else settled)
        for r in store.rules(share.id):   # not known to be applied: retried next time
            if r.state in (C.RULE_QUEUED_TO_APPLY, C.RULE_APPLYING):
                tx.rule(share, r, C.RULE_ERROR)
    # Restorable: ensure is what puts a share back after a crash, so its
    # intent (rules retried) need not be on disk before the driver acts.
    return Operation("ensure_share", b, share=share, intent=intent, unblockable=True,
                     restorable=True, call=lambda: b.call("ensure_share", share, applied),
                     done=done, failed=failed)
