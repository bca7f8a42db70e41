"""The share engine: state, drivers, hooks, recovery. No D-Bus here.

Every operation follows one pattern so that a crash at any point can be
finished or rolled back at the next start:

1. validate (a refused call changes nothing);
2. one transaction records the intent (transitional status, the task) and
   takes the pre-hook record's sequence number;
3. pre hooks (may refuse: the intent is rolled back);
4. the driver acts, in a worker thread;
5. one transaction records the outcome and takes the post record's number;
6. observers are told (PropertiesChanged), post hooks run, the caller gets
   the reply.

Operations on one share are serialised by a per-share lock; operations on
different shares run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable, Dict, List, Optional

from . import constants as C
from . import validation
from .config import BackendConfig, Config
from .drivers import driver_class, load_class
from .drivers.base import ShareDriver
from .errors import (AlreadyExists, BackendFailure, CapacityExceeded, InvalidArgument,
                     InvalidState, NotFound, NotSupported, SharedError)
from .helpers import CIFS_HELPERS, NFS_HELPERS
from .hooks import records
from .hooks.base import HookContext
from .hooks.manager import HookFailed, HookManager
from .models import AccessRule, Share, ShareUpdate, Snapshot
from .store import Store, new_id
from .util import now_us

log = logging.getLogger(__name__)

#: rule states that the backend should enforce
LIVE_RULE_STATES = (C.RULE_QUEUED_TO_APPLY, C.RULE_APPLYING, C.RULE_ACTIVE)


class Observer:
    """Receives state changes (the D-Bus layer implements this)."""

    def share_added(self, share: Share) -> None: ...
    def share_changed(self, share: Share) -> None: ...
    def share_removed(self, share_id: str) -> None: ...
    def snapshot_added(self, snapshot: Snapshot) -> None: ...
    def snapshot_changed(self, snapshot: Snapshot) -> None: ...
    def snapshot_removed(self, snapshot_id: str) -> None: ...
    def backend_changed(self, name: str) -> None: ...


class Backend:
    def __init__(self, name: str, config: BackendConfig, driver: ShareDriver,
                 hooks: HookManager):
        self.name = name
        self.config = config
        self.driver = driver
        self.hooks = hooks
        self.stats: Dict[str, Any] = {}
        self.setup_error: Optional[str] = None

    @property
    def protocols(self) -> List[str]:
        return list(self.config.enabled_share_protocols)

    @property
    def access_types(self) -> List[str]:
        types: List[str] = []
        for proto in self.protocols:
            for t in self.driver.access_types.get(proto, ()):
                if t not in types:
                    types.append(t)
        return types


class Engine:
    def __init__(self, config: Config, observer: Optional[Observer] = None):
        self.config = config
        self.observer = observer or Observer()
        #: set by the D-Bus layer: emit_signal(phase, method, record_json)
        self.emit_signal: Optional[Callable[[str, str, str], None]] = None
        self.backends: Dict[str, Backend] = {}
        self.store: Optional[Store] = None
        self._locks: Dict[str, asyncio.Lock] = {}
        self._tasks: List[asyncio.Task] = []
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.status_line = "starting"

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        cfg = self.config
        os.makedirs(cfg.state_path, mode=0o755, exist_ok=True)
        os.makedirs(cfg.spool_dir, mode=0o755, exist_ok=True)
        self.store = Store(os.path.join(cfg.state_path, "sharedd.db"))
        self.hook_context = HookContext(cfg.host_id, cfg.spool_dir,
                                        emit_signal=self._emit_signal,
                                        retention_seconds=cfg.spool_retention_seconds,
                                        retention_count=cfg.spool_retention_count)
        for name, bconf in cfg.backends.items():
            self.backends[name] = self._make_backend(name, bconf, self.hook_context)
        for b in self.backends.values():
            try:
                await asyncio.to_thread(self._setup_backend, b)
            except Exception as exc:
                b.setup_error = str(exc)
                log.error("backend %s: set-up failed: %s", b.name, exc)
        self.status_line = "recovering"
        await self.recover()
        for b in self.backends.values():
            await self.refresh_stats(b)
            await self._backend_event(b, "publish_service_capabilities")
            self._tasks.append(asyncio.create_task(self._stats_loop(b)))
            self._tasks.append(asyncio.create_task(self._periodic_loop(b)))
        self._update_status()

    def _make_backend(self, name: str, bconf: BackendConfig, context: HookContext) -> Backend:
        cls = driver_class(bconf.share_driver)
        bdir = os.path.join(self.config.state_path, "backends", name)
        os.makedirs(bdir, mode=0o755, exist_ok=True)
        helpers = {}
        if cls.uses_export_helpers:
            for proto in bconf.enabled_share_protocols:
                registry, hname = {"NFS": (NFS_HELPERS, bconf.nfs_helper),
                                   "CIFS": (CIFS_HELPERS, bconf.cifs_helper)}[proto]
                hdir = os.path.join(bdir, hname)
                os.makedirs(hdir, mode=0o755, exist_ok=True)
                helpers[proto] = load_class(registry[hname])(bconf, hdir, self.config.command_timeout)
        driver = cls(name, bconf, helpers, bdir, self.config.command_timeout)
        return Backend(name, bconf, driver, HookManager(name, bconf, context))

    @staticmethod
    def _setup_backend(b: Backend) -> None:
        for helper in b.driver.helpers.values():
            helper.setup()
        b.driver.do_setup()
        b.driver.check_for_setup_error()

    async def stop(self, timeout: float = 60.0) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("stopping with %d operation(s) still running; "
                        "start-up recovery will finish them", self._inflight)
        if self.store:
            self.store.close()

    def reload(self, new: Config) -> List[str]:
        """Apply what can change at run time; return what needs a restart."""
        needs_restart = []
        if list(new.backends) != list(self.config.backends):
            needs_restart.append("enabled_share_backends")
        for name, b in self.backends.items():
            nb = new.backends.get(name)
            if nb is None:
                continue
            hook_keys = ("hook_drivers", "enable_pre_hooks", "enable_post_hooks",
                         "enable_periodic_hooks", "suppress_pre_hooks_errors",
                         "suppress_post_hooks_errors", "periodic_hooks_interval", "hook_timeout",
                         "reserved_share_percentage", "max_over_subscription_ratio")
            for key, value in nb.values.items():
                if key in hook_keys:
                    b.config.values[key] = value
                elif b.config.values.get(key) != value:
                    needs_restart.append(f"[{name}] {key}")
            b.hooks = HookManager(name, b.config, self.hook_context)
        for key in ("log_level", "stats_refresh_interval"):
            self.config.values[key] = new.values[key]
        for key in ("state_path", "spool_dir", "host_id"):
            if new.values[key] != self.config.values[key]:
                needs_restart.append(key)
        return needs_restart

    def _emit_signal(self, phase: str, method: str, text: str) -> None:
        if self.emit_signal is not None:
            self.emit_signal(phase, method, text)

    # --------------------------------------------------------------- plumbing
    def _lock(self, share_id: str) -> asyncio.Lock:
        lock = self._locks.get(share_id)
        if lock is None:
            lock = self._locks[share_id] = asyncio.Lock()
        return lock

    def _busy(self):
        engine = self

        class _Busy:
            def __enter__(self):
                engine._inflight += 1
                engine._idle.clear()

            def __exit__(self, *exc):
                engine._inflight -= 1
                if engine._inflight == 0:
                    engine._idle.set()
        return _Busy()

    def _backend(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise NotFound(f"no backend named {name!r} (enabled: {', '.join(self.backends)})")
        return b

    def _usable(self, b: Backend) -> Backend:
        if b.setup_error:
            raise BackendFailure(f"backend {b.name} is not usable: {b.setup_error}")
        return b

    async def _driver(self, b: Backend, method: str, *args) -> Any:
        fn = getattr(b.driver, method)
        try:
            return await asyncio.to_thread(fn, *args)
        except SharedError:
            raise
        except Exception as exc:  # a driver bug or an unexpected tool failure
            log.exception("backend %s: %s failed", b.name, method)
            raise BackendFailure(f"{method} failed on backend {b.name}: {exc}") from None

    def share(self, share_id: str) -> Share:
        s = self.store.get_share(share_id)
        if s is None:
            raise NotFound(f"no share with id {share_id}")
        return s

    def snapshot(self, snapshot_id: str) -> Snapshot:
        s = self.store.get_snapshot(snapshot_id)
        if s is None:
            raise NotFound(f"no snapshot with id {snapshot_id}")
        return s

    def rules(self, share_id: str) -> List[AccessRule]:
        return self.store.rules(share_id)

    def shares(self, backend: Optional[str] = None) -> List[Share]:
        return self.store.shares(backend)

    def snapshots(self, share_id: Optional[str] = None) -> List[Snapshot]:
        return self.store.snapshots(share_id)

    def find_share_by_name(self, name: str) -> Share:
        s = self.store.find_share(name)
        if s is None:
            raise NotFound(f"no share named {name[:80]!r}")
        return s

    # ---------------------------------------------------------------- hooks
    async def _record(self, b: Backend, phase: str, method: str, seq: Optional[int], *,
                      share: Optional[Share] = None, share_status: Optional[str] = None,
                      gone: bool = False, snapshot: Optional[Snapshot] = None,
                      snapshot_status: Optional[str] = None,
                      rules: Optional[List[AccessRule]] = None, is_allow: Optional[bool] = None,
                      result: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        if seq is None:
            return None
        sd = None
        if share is not None:
            current = [] if gone else self.store.rules(share.id)
            hints = {} if gone else await self._hints(b, share)
            sd = records.share_dict(share, current, hints, share_status)
        snap = records.snapshot_dict(snapshot, snapshot_status) if snapshot else None
        return records.build(host=self.config.host_id, epoch=self.store.epoch, seq=seq,
                             phase=phase, method=method, backend=b.name, share=sd,
                             snapshot=snap, rules=rules, is_allow=is_allow, result=result)

    async def _hints(self, b: Backend, share: Share) -> Dict[str, Any]:
        try:
            return await asyncio.to_thread(b.driver.get_mount_hints, share) or {}
        except Exception as exc:
            log.warning("share %s: no mount hints: %s", share.id, exc)
            return {}

    def _seq(self, b: Backend, phase: str) -> Optional[int]:
        """Inside a transaction: the record's sequence number, if hooks run."""
        return self.store.next_seq() if b.hooks.enabled(phase) else None

    async def _pre(self, b: Backend, rec: Optional[Dict[str, Any]]) -> Optional[List[Any]]:
        if rec is None:
            return None
        return await b.hooks.pre(rec)

    async def _post(self, b: Backend, rec: Optional[Dict[str, Any]], pre_data) -> Dict[str, Any]:
        if rec is None:
            return {}
        return await b.hooks.post(rec, pre_data)

    async def _announce(self, b: Backend, method: str, change: Callable[[], None],
                        notify: Callable[[], None], undo: Callable[[], None],
                        **record: Any) -> Optional[List[Any]]:
        """Record an intent and announce it: `change` runs in one transaction
        with the pre record's sequence number, observers are told, the pre
        hooks run. A hook's refusal runs `undo` (the net change is nothing)."""
        with self.store.tx():
            change()
            seq = self._seq(b, C.PHASE_PRE)
        notify()
        rec = await self._record(b, C.PHASE_PRE, method, seq, **record)
        try:
            return await self._pre(b, rec)
        except HookFailed:
            undo()
            raise

    async def _backend_event(self, b: Backend, method: str) -> None:
        """Backend-wide records (publish_service_capabilities)."""
        pre_data = None
        for phase in (C.PHASE_PRE, C.PHASE_POST):
            with self.store.tx():
                seq = self._seq(b, phase)
            rec = await self._record(b, phase, method, seq,
                                     result={"ok": b.setup_error is None,
                                             **({"error": b.setup_error} if b.setup_error else {})}
                                     if phase == C.PHASE_POST else None)
            try:
                if phase == C.PHASE_PRE:
                    pre_data = await self._pre(b, rec)
                else:
                    await self._post(b, rec, pre_data)
            except HookFailed as exc:
                log.error("backend %s: %s", b.name, exc)

    # ------------------------------------------------------------ capacity
    async def refresh_stats(self, b: Backend) -> Dict[str, Any]:
        stats: Dict[str, Any] = {}
        if b.setup_error is None:
            try:
                stats = dict(await asyncio.to_thread(b.driver.get_share_stats))
            except Exception as exc:
                log.warning("backend %s: stats failed: %s", b.name, exc)
                stats = {"error": str(exc)}
        shares = self.store.shares(b.name)
        stats.update(b.driver.capabilities())
        stats.update({
            "share_backend_name": b.config.share_backend_name,
            "driver_name": b.driver.driver_name,
            "driver_version": b.driver.driver_version,
            "storage_protocol": "_".join(b.protocols),
            "provisioned_capacity_gb": float(sum(s.size_gib for s in shares)),
            "share_count": len(shares),
            "reserved_percentage": float(b.config.reserved_share_percentage),
            "max_over_subscription_ratio": float(b.config.max_over_subscription_ratio),
            "thin_provisioning": bool(b.driver.thin_provisioning),
            "available": b.setup_error is None,
            "updated_at": now_us(),
        })
        if b.setup_error:
            stats["error"] = b.setup_error
        old = {k: v for k, v in b.stats.items() if k != "updated_at"}
        b.stats = stats
        if old != {k: v for k, v in stats.items() if k != "updated_at"}:
            self.observer.backend_changed(b.name)
        return stats

    async def _check_capacity(self, b: Backend, extra_gib: int) -> None:
        stats = await self.refresh_stats(b)
        total = stats.get("total_capacity_gb")
        free = stats.get("free_capacity_gb")
        if not isinstance(total, (int, float)) or not isinstance(free, (int, float)):
            return  # the driver cannot tell; it enforces its own limits
        reserved = total * b.config.reserved_share_percentage / 100.0
        provisioned = stats["provisioned_capacity_gb"]
        if b.driver.thin_provisioning:
            limit = (total - reserved) * b.config.max_over_subscription_ratio
            if provisioned + extra_gib > limit:
                raise CapacityExceeded(
                    f"backend {b.name}: {extra_gib} GiB more would provision "
                    f"{provisioned + extra_gib:g} GiB, above the limit of {limit:g} GiB "
                    f"(total {total:g} GiB, {b.config.reserved_share_percentage:g}% reserved, "
                    f"over-subscription ratio {b.config.max_over_subscription_ratio:g})")
        elif extra_gib > free - reserved:
            raise CapacityExceeded(
                f"backend {b.name}: {extra_gib} GiB requested but only "
                f"{max(free - reserved, 0):g} GiB free after the reserve")

    async def _stats_loop(self, b: Backend) -> None:
        while True:
            await asyncio.sleep(self.config.stats_refresh_interval)
            await self.refresh_stats(b)

    async def _periodic_loop(self, b: Backend) -> None:
        while True:
            await asyncio.sleep(b.config.periodic_hooks_interval)
            try:
                await self.periodic(b)
            except Exception:
                log.exception("backend %s: periodic hook failed", b.name)

    async def periodic(self, b: Backend) -> None:
        if not b.hooks.enabled(C.PHASE_PERIODIC):
            return
        with self.store.tx():
            seq = self.store.next_seq()
            shares = self.store.shares(b.name)
            rules = self.store.all_rules()
        data: Dict[str, Dict[str, Any]] = {}
        if b.setup_error is None:
            try:
                data = await asyncio.to_thread(b.driver.get_periodic_hook_data, shares) or {}
            except Exception as exc:
                log.warning("backend %s: get_periodic_hook_data failed: %s", b.name, exc)
        rec = records.build(host=self.config.host_id, epoch=self.store.epoch, seq=seq,
                            phase=C.PHASE_PERIODIC, method="periodic", backend=b.name,
                            shares=[records.share_dict(s, rules.get(s.id, []), data.get(s.id, {}))
                                    for s in shares])
        await b.hooks.periodic(rec)

    async def run_periodic_hooks(self, options: Dict[str, Any]) -> None:
        _check_options(options, {"backend": str})
        targets = [self._backend(options["backend"])] if "backend" in options \
            else list(self.backends.values())
        for b in targets:
            await self.periodic(b)

    # ---------------------------------------------------------------- shares
    async def create_share(self, name: str, protocol: str, size_gib: int,
                           options: Dict[str, Any]) -> Share:
        _check_options(options, {"backend": str, "snapshot": str, "description": str,
                                 "metadata": dict})
        name = validation.name(name)
        protocol = validation.protocol(protocol)
        size_gib = validation.size_gib(size_gib)
        description = validation.description(options.get("description", ""))
        metadata = validation.metadata(options.get("metadata", {}))
        snap = parent = None
        if "snapshot" in options:
            snap = self.snapshot(validation.object_id(options["snapshot"], "snapshot id"))
            parent = self.share(snap.share_id)
            if snap.status != C.STATUS_AVAILABLE:
                raise InvalidState(f"snapshot {snap.id} is {snap.status}, not available")
            if size_gib < snap.size_gib:
                raise InvalidArgument(f"size {size_gib} GiB is smaller than the snapshot "
                                      f"({snap.size_gib} GiB)")
            if protocol != parent.protocol:
                raise InvalidArgument(f"a share made from a snapshot of a {parent.protocol} share "
                                      f"must also be {parent.protocol}")
            if "backend" in options and options["backend"] != parent.backend:
                raise InvalidArgument(f"the snapshot lives on backend {parent.backend}")
        bname = options.get("backend") or (parent.backend if parent else next(iter(self.backends)))
        b = self._usable(self._backend(bname))
        if protocol not in b.protocols:
            raise NotSupported(f"backend {b.name} does not serve {protocol} "
                               f"(it serves {', '.join(b.protocols)})")
        if snap and not b.driver.capabilities()["create_share_from_snapshot_support"]:
            raise NotSupported(f"backend {b.name} cannot create shares from snapshots")
        if self.store.find_share(name) is not None:
            raise AlreadyExists(f"a share named {name!r} exists already")
        await self._check_capacity(b, size_gib)
        share = Share(id=new_id(), name=name, backend=b.name, protocol=protocol,
                      size_gib=size_gib, status=C.STATUS_CREATING, created_at=now_us(),
                      description=description, metadata=metadata,
                      snapshot_id=snap.id if snap else None)
        method = "create_share_from_snapshot" if snap else "create_share"
        with self._busy():
            parent_lock = self._lock(parent.id) if parent else _NoLock()
            async with parent_lock, self._lock(share.id):
                def insert():
                    if self.store.find_share(name) is not None:
                        raise AlreadyExists(f"a share named {name!r} exists already")
                    self.store.insert_share(share, {"op": method})
                pre_data = await self._announce(
                    b, method, insert, lambda: self.observer.share_added(share),
                    lambda: self._forget_share(share), share=share, snapshot=snap)
                try:
                    if snap:
                        update = await self._driver(b, "create_share_from_snapshot", share, snap, parent)
                    else:
                        update = await self._driver(b, "create_share", share)
                except SharedError as exc:
                    await self._rollback_create(b, share, exc)
                    await self._fire_post(b, method, share, pre_data, exc, gone=True,
                                          share_status="deleted", snapshot=snap)
                    raise
                _apply_update(share, update)
                share.status = C.STATUS_AVAILABLE
                await self._finish(b, method, share, pre_data, snapshot=snap)
        asyncio.create_task(self.refresh_stats(b))
        return self.share(share.id)

    async def _rollback_create(self, b: Backend, share: Share, exc: Exception) -> None:
        log.error("share %s (%s): create failed: %s; rolling back", share.name, share.id, exc)
        try:
            await self._driver(b, "delete_share", share)
        except SharedError as exc2:
            log.error("share %s: rollback failed, leaving it in error: %s", share.id, exc2)
            self._set_status(share, C.STATUS_ERROR)
            return
        self._forget_share(share)

    def _forget_share(self, share: Share) -> None:
        with self.store.tx():
            self.store.delete_share(share.id)
        self.observer.share_removed(share.id)

    async def _finish(self, b: Backend, method: str, share: Share, pre_data, *,
                      snapshot: Optional[Snapshot] = None,
                      rules: Optional[List[AccessRule]] = None,
                      is_allow: Optional[bool] = None,
                      apply: Optional[Callable[[], None]] = None) -> None:
        """Record success (one transaction), tell observers, run post hooks."""
        with self.store.tx():
            if apply:
                apply()
            self.store.update_share(share)
            seq = self._seq(b, C.PHASE_POST)
        self.observer.share_changed(share)
        rec = await self._record(b, C.PHASE_POST, method, seq, share=share, snapshot=snapshot,
                                 rules=rules, is_allow=is_allow, result={"ok": True})
        updates = await self._post(b, rec, pre_data)
        if updates.get("export_locations"):
            locations = updates["export_locations"]
            if isinstance(locations, list) and all(isinstance(x, str) for x in locations):
                share.export_locations = locations
                with self.store.tx():
                    self.store.update_share(share)
                self.observer.share_changed(share)

    async def _fire_post(self, b: Backend, method: str, share: Optional[Share], pre_data,
                         exc: Exception, **kw) -> None:
        """Post hooks after a failed driver call (result ok=false)."""
        with self.store.tx():
            seq = self._seq(b, C.PHASE_POST)
        rec = await self._record(b, C.PHASE_POST, method, seq, share=share,
                                 result={"ok": False, "error": str(exc)[:4000]}, **kw)
        try:
            await self._post(b, rec, pre_data)
        except HookFailed as hexc:
            log.error("%s", hexc)

    async def delete_share(self, share_id: str, options: Dict[str, Any]) -> None:
        _check_options(options, {})
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE, C.STATUS_ERROR), "deleted")
                snaps = self.store.snapshots(share.id)
                if snaps:
                    raise InvalidState(f"share {share.name} has {len(snaps)} snapshot(s); "
                                       "delete them first")
                previous = share.status
                await self._removal(b, share, "delete_share", "delete_share", previous,
                                    C.STATUS_DELETING)
        asyncio.create_task(self.refresh_stats(b))

    async def unmanage_share(self, share_id: str, options: Dict[str, Any]) -> None:
        _check_options(options, {})
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE, C.STATUS_ERROR), "unmanaged")
                if not b.driver.capabilities()["manage_support"]:
                    raise NotSupported(f"backend {b.name} cannot unmanage shares")
                if self.store.snapshots(share.id):
                    raise InvalidState(f"share {share.name} has snapshots; delete them first")
                await self._removal(b, share, "unmanage", "unmanage_share", share.status,
                                    C.STATUS_UNMANAGE_STARTING)
        asyncio.create_task(self.refresh_stats(b))

    async def _removal(self, b: Backend, share: Share, driver_method: str, method: str,
                       previous: str, transitional: str) -> None:
        share.status = transitional
        # The removal is announced in the pre hook: clients unmount first.
        pre_data = await self._announce(
            b, method, lambda: self.store.update_share(share, {"op": method, "previous": previous}),
            lambda: self.observer.share_changed(share),
            lambda: self._set_status(share, previous), share=share)
        try:
            await self._driver(b, driver_method, share)
        except SharedError as exc:
            self._set_status(share, C.STATUS_ERROR)
            await self._fire_post(b, method, share, pre_data, exc)
            raise
        with self.store.tx():
            self.store.delete_share(share.id)
            seq = self._seq(b, C.PHASE_POST)
        self.observer.share_removed(share.id)
        self._locks.pop(share.id, None)
        rec = await self._record(b, C.PHASE_POST, method, seq, share=share,
                                 share_status="deleted", gone=True, result={"ok": True})
        await self._post(b, rec, pre_data)

    async def manage_share(self, backend: str, protocol: str, export_path: str,
                           options: Dict[str, Any]) -> Share:
        _check_options(options, {"name": str, "description": str, "metadata": dict,
                                 "size_gib": int})
        b = self._usable(self._backend(backend))
        protocol = validation.protocol(protocol)
        if protocol not in b.protocols:
            raise NotSupported(f"backend {b.name} does not serve {protocol}")
        if not b.driver.capabilities()["manage_support"]:
            raise NotSupported(f"backend {b.name} cannot manage existing shares")
        if not isinstance(export_path, str) or not export_path or len(export_path) > 1024 \
                or any(ord(c) < 32 for c in export_path):
            raise InvalidArgument("invalid export path")
        name = options.get("name") or _name_from_path(export_path)
        name = validation.name(name)
        if "size_gib" in options:
            validation.size_gib(options["size_gib"])
        if self.store.find_share(name) is not None:
            raise AlreadyExists(f"a share named {name!r} exists already")
        share = Share(id=new_id(), name=name, backend=b.name, protocol=protocol, size_gib=0,
                      status=C.STATUS_MANAGE_STARTING, created_at=now_us(),
                      description=validation.description(options.get("description", "")),
                      metadata=validation.metadata(options.get("metadata", {})))
        with self._busy():
            async with self._lock(share.id):
                pre_data = await self._announce(
                    b, "manage_share", lambda: self.store.insert_share(share, {"op": "manage_share"}),
                    lambda: self.observer.share_added(share),
                    lambda: self._forget_share(share), share=share)
                drv_options = {k: v for k, v in options.items() if k == "size_gib"}
                try:
                    update = await self._driver(b, "manage_existing", share, export_path, drv_options)
                    _apply_update(share, update)
                    taken = [s for s in self.store.shares(b.name)
                             if s.id != share.id and share.provider_location
                             and s.provider_location == share.provider_location]
                    if taken:
                        await self._driver(b, "unmanage", share)
                        raise AlreadyExists(f"{export_path} is already share {taken[0].name}")
                    if not share.size_gib:
                        raise BackendFailure("the driver did not report the managed share's size")
                except SharedError as exc:
                    self._forget_share(share)
                    await self._fire_post(b, "manage_share", share, pre_data, exc,
                                          gone=True, share_status="deleted")
                    raise
                share.status = C.STATUS_AVAILABLE
                await self._finish(b, "manage_share", share, pre_data)
        asyncio.create_task(self.refresh_stats(b))
        return self.share(share.id)

    async def _resize(self, share_id: str, new_size: int, options: Dict[str, Any],
                      grow: bool) -> None:
        _check_options(options, {})
        new_size = validation.size_gib(new_size, "new size")
        method = "extend_share" if grow else "shrink_share"
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE,), "extended" if grow else "shrunk")
                if grow and new_size <= share.size_gib:
                    raise InvalidArgument(f"new size {new_size} GiB must be larger than the "
                                          f"current {share.size_gib} GiB")
                if not grow and new_size >= share.size_gib:
                    raise InvalidArgument(f"new size {new_size} GiB must be smaller than the "
                                          f"current {share.size_gib} GiB")
                cap = "extend_support" if grow else "shrink_support"
                if not b.driver.capabilities()[cap]:
                    raise NotSupported(f"backend {b.name} cannot {'extend' if grow else 'shrink'} shares")
                if grow:
                    await self._check_capacity(b, new_size - share.size_gib)
                old = share.size_gib
                share.status = C.STATUS_EXTENDING if grow else C.STATUS_SHRINKING
                pre_data = await self._announce(
                    b, method,
                    lambda: self.store.update_share(share, {"op": method, "old": old, "new": new_size}),
                    lambda: self.observer.share_changed(share),
                    lambda: self._set_status(share, C.STATUS_AVAILABLE), share=share)
                try:
                    await self._driver(b, method, share, new_size)
                except SharedError as exc:
                    # Drivers change size in one step: a failure leaves the old size.
                    self._set_status(share, C.STATUS_AVAILABLE)
                    await self._fire_post(b, method, share, pre_data, exc)
                    raise
                share.size_gib = new_size
                share.status = C.STATUS_AVAILABLE
                await self._finish(b, method, share, pre_data)
        asyncio.create_task(self.refresh_stats(b))

    async def extend_share(self, share_id: str, new_size: int, options: Dict[str, Any]) -> None:
        await self._resize(share_id, new_size, options, grow=True)

    async def shrink_share(self, share_id: str, new_size: int, options: Dict[str, Any]) -> None:
        await self._resize(share_id, new_size, options, grow=False)

    def _set_rule(self, share: Share, rule: AccessRule, state: Optional[str]) -> None:
        """Set a rule's state (None: remove it) and tell observers."""
        rule.state = state or rule.state
        with self.store.tx():
            if state is None:
                self.store.delete_rule(rule.id)
            else:
                self.store.set_rule_state(rule.id, state)
        self.observer.share_changed(share)

    def _set_snapshot_status(self, snap: Snapshot, status: str) -> None:
        snap.status = status
        with self.store.tx():
            self.store.update_snapshot(snap)
        self.observer.snapshot_changed(snap)

    def _set_status(self, share: Share, status: str) -> None:
        share.status = status
        with self.store.tx():
            self.store.update_share(share)
        self.observer.share_changed(share)

    # ---------------------------------------------------------------- access
    async def allow_access(self, share_id: str, access_type: str, access_to: str,
                           access_level: str, options: Dict[str, Any]) -> str:
        _check_options(options, {})
        kind, to, level = validation.access_rule(access_type, access_to, access_level)
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE,), "given new access rules")
                rule = AccessRule(id=new_id(), share_id=share.id, access_type=kind,
                                  access_to=to, access_level=level, state=C.RULE_APPLYING,
                                  created_at=now_us())
                b.driver.validate_rule(share, rule)
                for r in self.store.rules(share.id):
                    if r.access_type == kind and r.access_to == to:
                        raise AlreadyExists(
                            f"share {share.name} already has a {kind} rule for {to} "
                            f"({r.access_level}, {r.state}, id {r.id}); deny it first")
                pre_data = await self._announce(
                    b, "allow_access", lambda: self.store.insert_rule(rule),
                    lambda: self.observer.share_changed(share),
                    lambda: self._set_rule(share, rule, None),
                    share=share, rules=[rule], is_allow=True)
                live = [r for r in self.store.rules(share.id) if r.state in LIVE_RULE_STATES]
                try:
                    states = await self._driver(b, "update_access", share, live, [rule], [])
                except SharedError as exc:
                    self._set_rule(share, rule, C.RULE_ERROR)
                    await self._fire_post(b, "allow_access", share, pre_data, exc,
                                          rules=[rule], is_allow=True)
                    raise
                rule.state = (states or {}).get(rule.id, C.RULE_ACTIVE)
                if rule.state not in C.RULE_STATES:
                    rule.state = C.RULE_ERROR
                await self._finish(b, "allow_access", share, pre_data, rules=[rule], is_allow=True,
                                   apply=lambda: self.store.set_rule_state(rule.id, rule.state))
                if rule.state == C.RULE_ERROR:
                    raise BackendFailure(f"backend {b.name} could not apply the rule for {to}")
                return rule.id

    async def deny_access(self, share_id: str, access_id: str, options: Dict[str, Any]) -> None:
        _check_options(options, {})
        access_id = validation.object_id(access_id, "access id")
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                rule = self.store.get_rule(access_id)
                if rule is None or rule.share_id != share.id:
                    raise NotFound(f"share {share.name} has no access rule {access_id}")
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE, C.STATUS_ERROR), "changed")
                previous = rule.state
                rule.state = C.RULE_DENYING
                # The deny is announced in the pre hook: clients unmount first.
                pre_data = await self._announce(
                    b, "deny_access", lambda: self.store.set_rule_state(rule.id, rule.state),
                    lambda: self.observer.share_changed(share),
                    lambda: self._set_rule(share, rule, previous),
                    share=share, rules=[rule], is_allow=False)
                live = [r for r in self.store.rules(share.id)
                        if r.state in LIVE_RULE_STATES and r.id != rule.id]
                try:
                    await self._driver(b, "update_access", share, live, [], [rule])
                except SharedError as exc:
                    self._set_rule(share, rule, C.RULE_ERROR)
                    await self._fire_post(b, "deny_access", share, pre_data, exc,
                                          rules=[rule], is_allow=False)
                    raise
                await self._finish(b, "deny_access", share, pre_data, rules=[rule], is_allow=False,
                                   apply=lambda: self.store.delete_rule(rule.id))

    # ------------------------------------------------------------- snapshots
    async def create_snapshot(self, share_id: str, name: str, options: Dict[str, Any]) -> Snapshot:
        _check_options(options, {})
        name = validation.name(name, "snapshot")
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE,), "snapshotted")
                if not b.driver.capabilities()["snapshot_support"]:
                    raise NotSupported(f"backend {b.name} does not support snapshots")
                if any(s.name == name for s in self.store.snapshots(share.id)):
                    raise AlreadyExists(f"share {share.name} already has a snapshot named {name!r}")
                snap = Snapshot(id=new_id(), name=name, share_id=share.id, size_gib=share.size_gib,
                                status=C.STATUS_CREATING, created_at=now_us())
                pre_data = await self._announce(
                    b, "create_snapshot", lambda: self.store.insert_snapshot(snap),
                    lambda: self.observer.snapshot_added(snap),
                    lambda: self._forget_snapshot(snap), share=share, snapshot=snap)
                try:
                    location = await self._driver(b, "create_snapshot", snap, share)
                except SharedError as exc:
                    try:
                        await self._driver(b, "delete_snapshot", snap, share)
                        self._forget_snapshot(snap)
                    except SharedError:
                        self._set_snapshot_status(snap, C.STATUS_ERROR)
                    await self._fire_post(b, "create_snapshot", share, pre_data, exc,
                                          snapshot=snap, snapshot_status="deleted")
                    raise
                snap.provider_location = location or ""
                snap.status = C.STATUS_AVAILABLE
                with self.store.tx():
                    self.store.update_snapshot(snap)
                    seq = self._seq(b, C.PHASE_POST)
                self.observer.snapshot_changed(snap)
                rec = await self._record(b, C.PHASE_POST, "create_snapshot", seq, share=share,
                                         snapshot=snap, result={"ok": True})
                await self._post(b, rec, pre_data)
                return snap

    def _forget_snapshot(self, snap: Snapshot) -> None:
        with self.store.tx():
            self.store.delete_snapshot(snap.id)
        self.observer.snapshot_removed(snap.id)

    async def delete_snapshot(self, snapshot_id: str, options: Dict[str, Any]) -> None:
        _check_options(options, {})
        snap = self.snapshot(snapshot_id)
        with self._busy():
            async with self._lock(snap.share_id):
                snap = self.snapshot(snapshot_id)
                share = self.share(snap.share_id)
                b = self._usable(self._backend(share.backend))
                if snap.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                    raise InvalidState(f"snapshot {snap.name} is {snap.status}; it can be deleted "
                                       "when available or in error")
                previous = snap.status
                snap.status = C.STATUS_DELETING
                pre_data = await self._announce(
                    b, "delete_snapshot", lambda: self.store.update_snapshot(snap),
                    lambda: self.observer.snapshot_changed(snap),
                    lambda: self._set_snapshot_status(snap, previous), share=share, snapshot=snap)
                try:
                    await self._driver(b, "delete_snapshot", snap, share)
                except SharedError as exc:
                    self._set_snapshot_status(snap, C.STATUS_ERROR)
                    await self._fire_post(b, "delete_snapshot", share, pre_data, exc, snapshot=snap)
                    raise
                with self.store.tx():
                    self.store.delete_snapshot(snap.id)
                    seq = self._seq(b, C.PHASE_POST)
                self.observer.snapshot_removed(snap.id)
                rec = await self._record(b, C.PHASE_POST, "delete_snapshot", seq, share=share,
                                         snapshot=snap, snapshot_status="deleted", result={"ok": True})
                await self._post(b, rec, pre_data)

    async def revert_to_snapshot(self, share_id: str, snapshot_id: str,
                                 options: Dict[str, Any]) -> None:
        _check_options(options, {})
        with self._busy():
            async with self._lock(share_id):
                share = self.share(share_id)
                snap = self.snapshot(snapshot_id)
                if snap.share_id != share.id:
                    raise InvalidArgument(f"snapshot {snap.name} belongs to another share")
                b = self._usable(self._backend(share.backend))
                _require(share, (C.STATUS_AVAILABLE,), "reverted")
                if snap.status != C.STATUS_AVAILABLE:
                    raise InvalidState(f"snapshot {snap.name} is {snap.status}, not available")
                if not b.driver.capabilities()["revert_to_snapshot_support"]:
                    raise NotSupported(f"backend {b.name} cannot revert shares to snapshots")
                share.status = C.STATUS_REVERTING
                pre_data = await self._announce(
                    b, "revert_to_snapshot",
                    lambda: self.store.update_share(share, {"op": "revert_to_snapshot",
                                                           "snapshot": snap.id}),
                    lambda: self.observer.share_changed(share),
                    lambda: self._set_status(share, C.STATUS_AVAILABLE), share=share, snapshot=snap)
                live = [r for r in self.store.rules(share.id) if r.state in LIVE_RULE_STATES]
                try:
                    update = await self._driver(b, "revert_to_snapshot", share, snap, live)
                except SharedError as exc:
                    self._set_status(share, C.STATUS_ERROR)
                    await self._fire_post(b, "revert_to_snapshot", share, pre_data, exc, snapshot=snap)
                    raise
                _apply_update(share, update)
                share.status = C.STATUS_AVAILABLE
                await self._finish(b, "revert_to_snapshot", share, pre_data, snapshot=snap)

    # -------------------------------------------------------------- recovery
    async def recover(self) -> None:
        """Finish or roll back what a crash interrupted, then ensure shares."""
        for snap in self.store.snapshots():
            if snap.status not in (C.STATUS_CREATING, C.STATUS_DELETING):
                continue
            share = self.store.get_share(snap.share_id)
            b = self.backends.get(share.backend) if share else None
            if b is None or b.setup_error:
                continue
            log.info("recovery: snapshot %s was %s: removing it", snap.id, snap.status)
            try:
                await self._driver(b, "delete_snapshot", snap, share)
                with self.store.tx():
                    self.store.delete_snapshot(snap.id)
            except SharedError as exc:
                log.error("recovery: snapshot %s: %s", snap.id, exc)
                snap.status = C.STATUS_ERROR
                with self.store.tx():
                    self.store.update_snapshot(snap)
        for share in self.store.shares():
            b = self.backends.get(share.backend)
            if b is None:
                log.warning("share %s (%s) is on backend %s, which is not enabled",
                            share.name, share.id, share.backend)
                continue
            if b.setup_error:
                continue
            try:
                await self._recover_share(b, share)
            except SharedError as exc:
                log.error("recovery: share %s (%s): %s", share.name, share.id, exc)
                share.status = C.STATUS_ERROR
                with self.store.tx():
                    self.store.update_share(share)
        # Rules caught mid-change: denies are finished, applies are re-applied.
        for share_id, rules in self.store.all_rules().items():
            for r in rules:
                if r.state in (C.RULE_DENYING, C.RULE_QUEUED_TO_DENY):
                    with self.store.tx():
                        self.store.delete_rule(r.id)
        await self.ensure_all()

    async def _recover_share(self, b: Backend, share: Share) -> None:
        task = self.store.share_task(share.id)
        status = share.status
        if status in (C.STATUS_CREATING, C.STATUS_DELETING):
            log.info("recovery: share %s was %s: removing it", share.id, status)
            await self._driver(b, "delete_share", share)
            with self.store.tx():
                self.store.delete_share(share.id)
        elif status == C.STATUS_MANAGE_STARTING:
            # The driver may have mounted and exported it before the crash,
            # even if its location was never recorded: release by share id.
            log.info("recovery: share %s was being managed: releasing it", share.id)
            await self._driver(b, "unmanage", share)
            with self.store.tx():
                self.store.delete_share(share.id)
        elif status == C.STATUS_UNMANAGE_STARTING:
            log.info("recovery: share %s was being unmanaged: finishing", share.id)
            await self._driver(b, "unmanage", share)
            with self.store.tx():
                self.store.delete_share(share.id)
        elif status == C.STATUS_EXTENDING:
            # Growing never loses data: finish it.
            new = int(task.get("new", share.size_gib))
            await self._driver(b, "extend_share", share, new)
            share.size_gib, share.status = new, C.STATUS_AVAILABLE
            with self.store.tx():
                self.store.update_share(share)
        elif status == C.STATUS_SHRINKING:
            # Roll back to the old size: the share may hold more than the new one.
            old = int(task.get("old", share.size_gib))
            await self._driver(b, "extend_share", share, old)
            share.size_gib, share.status = old, C.STATUS_AVAILABLE
            with self.store.tx():
                self.store.update_share(share)
        elif status == C.STATUS_REVERTING:
            # ensure_share finishes or rolls back a half-done revert.
            share.status = C.STATUS_AVAILABLE
            with self.store.tx():
                self.store.update_share(share)

    async def ensure_all(self, backend: Optional[str] = None,
                         helper: Optional[str] = None) -> None:
        """Ensure every available (or error) share: mounted, exported, rules applied.

        helper: only backends that use that export helper (e.g. after ganesha
        restarted and lost its runtime exports).
        """
        for b in self.backends.values():
            if b.setup_error or (backend and b.name != backend):
                continue
            if helper and helper not in {h.helper_name for h in b.driver.helpers.values()}:
                continue
            for share in self.store.shares(b.name):
                if share.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
                    continue
                with self._busy():
                    async with self._lock(share.id):
                        await self._ensure_share(b, share.id)

    async def _ensure_share(self, b: Backend, share_id: str) -> None:
        share = self.store.get_share(share_id)
        if share is None or share.status not in (C.STATUS_AVAILABLE, C.STATUS_ERROR):
            return
        rules = [r for r in self.store.rules(share.id) if r.state in LIVE_RULE_STATES + (C.RULE_ERROR,)]
        with self.store.tx():
            seq = self._seq(b, C.PHASE_PRE)
        rec = await self._record(b, C.PHASE_PRE, "ensure_share", seq, share=share)
        try:
            pre_data = await self._pre(b, rec)
        except HookFailed as exc:
            log.error("share %s: %s", share.id, exc)
            return
        try:
            update = await self._driver(b, "ensure_share", share, rules)
        except SharedError as exc:
            log.error("share %s (%s): ensure failed: %s", share.name, share.id, exc)
            if share.status != C.STATUS_ERROR:
                self._set_status(share, C.STATUS_ERROR)
            await self._fire_post(b, "ensure_share", share, pre_data, exc)
            return
        _apply_update(share, update)
        share.status = C.STATUS_AVAILABLE

        def apply():
            for r in rules:
                if r.state != C.RULE_ACTIVE:
                    self.store.set_rule_state(r.id, C.RULE_ACTIVE)
        try:
            await self._finish(b, "ensure_share", share, pre_data, apply=apply)
        except HookFailed as exc:
            log.error("share %s: %s", share.id, exc)

    def _update_status(self) -> None:
        shares = self.store.shares()
        errors = sum(1 for s in shares if s.status == C.STATUS_ERROR)
        broken = [b.name for b in self.backends.values() if b.setup_error]
        line = f"serving {len(shares)} share(s) on {len(self.backends)} backend(s)"
        if errors:
            line += f", {errors} in error"
        if broken:
            line += f"; backend(s) not usable: {', '.join(broken)}"
        self.status_line = line


class _NoLock:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _require(share: Share, statuses, verb: str) -> None:
    if share.status not in statuses:
        raise InvalidState(f"share {share.name} is {share.status}; it can be {verb} when "
                           f"{' or '.join(statuses)}")


def _apply_update(share: Share, update: Optional[ShareUpdate]) -> None:
    if update is None:
        return
    if update.export_locations is not None:
        share.export_locations = list(update.export_locations)
    if update.provider_location is not None:
        share.provider_location = update.provider_location
    if update.size_gib is not None:
        share.size_gib = int(update.size_gib)
    if update.driver_data is not None:
        share.driver_data = dict(update.driver_data)


def _check_options(options: Dict[str, Any], allowed: Dict[str, type]) -> None:
    for key, value in options.items():
        if key not in allowed:
            raise InvalidArgument(f"unknown option {key[:40]!r}"
                                  + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else
                                     " (this call takes none)"))
        want = allowed[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise InvalidArgument(f"option {key!r} has the wrong type")


def _name_from_path(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip("._-")
    return (clean or "managed")[:63]
