"""One backend: its driver, the export helpers the driver uses, its hooks,
and its capacity figures. No D-Bus here.

Driver calls are synchronous; `call` runs them in a worker thread so the
event loop (and the bus) keeps answering, and turns an unexpected exception
(a driver bug, a tool that failed oddly) into BackendFailure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from . import constants as C
from .config import BackendConfig
from .drivers import driver_class, load_class
from .drivers.base import ShareDriver
from .errors import BackendFailure, CapacityExceeded, NotSupported, SharedError
from .helpers import CIFS_HELPERS, NFS_HELPERS
from .helpers.base import BusCall
from .hooks import records
from .hooks.base import HookContext
from .hooks.manager import HookManager
from .models import AccessRule, Share, Snapshot, snapshot_as_share
from .util import now_us, private_dir, public_text

log = logging.getLogger(__name__)

#: options that a reload applies at once
RELOADABLE = ("hook_drivers", "enable_pre_hooks", "enable_post_hooks", "enable_periodic_hooks",
              "suppress_pre_hooks_errors", "suppress_post_hooks_errors",
              "periodic_hooks_interval", "hook_timeout", "reserved_share_percentage",
              "max_over_subscription_ratio", "snapshot_schedule", "snapshot_retention")


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What the API shows of a backend."""
    name: str
    driver: str
    protocols: List[str]
    access_types: List[str]
    stats: Dict[str, Any]


class Backend:
    def __init__(self, name: str, config: BackendConfig, state_path: str,
                 command_timeout: float, context: HookContext,
                 bus_call: Optional[BusCall] = None):
        cls = driver_class(config.share_driver)
        bdir = os.path.join(state_path, "backends", name)
        private_dir(os.path.dirname(bdir), 0o700)
        private_dir(bdir, 0o700)
        helpers = {}
        if cls.uses_export_helpers:
            for proto in config.enabled_share_protocols:
                registry, hname = {"NFS": (NFS_HELPERS, config.nfs_helper),
                                   "CIFS": (CIFS_HELPERS, config.cifs_helper)}[proto]
                hdir = os.path.join(bdir, hname)
                private_dir(hdir, 0o700)
                helpers[proto] = load_class(registry[hname])(config, hdir, command_timeout)
                helpers[proto].bus_call = bus_call   # the daemon's connection, if any
                helpers[proto].isolate_subtrees = cls.shares_share_a_file_system
        self.name = name
        self.config = config
        self.context = context
        self.driver: ShareDriver = cls(name, config, helpers, bdir, command_timeout)
        self.hooks = HookManager(name, config, context, self.driver.served_addresses)
        self.stats: Dict[str, Any] = {}
        self._driver_stats: Optional[Dict[str, Any]] = None   # and when read:
        self._driver_stats_at = 0.0
        self.setup_error: Optional[str] = None

    # --- life cycle --------------------------------------------------------
    async def setup(self) -> None:
        def work() -> None:
            if self.config.driver_handles_share_servers:
                pass   # each share server has its own address and export daemons
            elif self.driver.helpers and not self.config.share_export_ip:
                raise BackendFailure("share_export_ip is not set: name the address clients "
                                     "reach this host on in the backend's section")
            else:
                for helper in self.driver.helpers.values():
                    helper.setup()
            self.driver.do_setup()
            self.driver.check_for_setup_error()
        try:
            await asyncio.to_thread(work)
            self.setup_error = None
        except Exception as exc:
            self.setup_error = str(exc) or type(exc).__name__
            log.error("backend %s: set-up failed: %s", self.name, self.setup_error)

    def reload(self, new: BackendConfig) -> List[str]:
        """Apply the reloadable options of new; return those needing a restart."""
        pending = []
        for key, value in new.values.items():
            if key in RELOADABLE:
                self.config.values[key] = value
            elif self.config.values.get(key) != value:
                pending.append(f"[{self.name}] {key}")
        self.hooks = HookManager(self.name, self.config, self.context,
                                 self.driver.served_addresses)
        return pending

    # --- what it offers ------------------------------------------------------
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

    def helper_names(self) -> List[str]:
        return [h.helper_name for h in self.driver.helpers.values()]

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.driver.driver_name, self.protocols,
                           self.access_types, dict(self.stats))

    def usable(self) -> "Backend":
        if self.setup_error:
            raise BackendFailure(f"backend {self.name} is not usable: {self.setup_error}")
        return self

    def require(self, capability: str, what: str) -> None:
        if not self.driver.capabilities()[capability]:
            raise NotSupported(f"backend {self.name} cannot {what}")

    def require_protocol(self, protocol: str) -> None:
        if protocol not in self.protocols:
            raise NotSupported(f"backend {self.name} does not serve {protocol} "
                               f"(it serves {', '.join(self.protocols)})")

    # --- driver calls ----------------------------------------------------------
    async def call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.driver, method)
        try:
            return await asyncio.to_thread(fn, *args)
        except SharedError:
            raise
        except Exception as exc:
            log.exception("backend %s: %s failed", self.name, method)
            raise BackendFailure(f"{method} failed on backend {self.name}: {exc}") from None

    def mount_hints(self, share: Share) -> Dict[str, Any]:
        """On the event loop: hints are computed from the share and the
        configuration only (DriverBase.get_mount_hints)."""
        try:
            return self.driver.get_mount_hints(share) or {}
        except Exception as exc:
            log.warning("share %s: no mount hints: %s", share.id, exc)
            return {}

    async def snapshot_view(self, share: Share, snapshots: List[Snapshot],
                            rules: List[AccessRule]) -> None:
        """Where the driver shows a share's snapshots to its clients (Previous
        Versions over SMB, .snapshots over NFS), make it show the settled and
        new ones of snapshots, to the clients rules grant (read-only). A
        failure is logged, not raised: the snapshot itself is fine, and the
        next ensure shows it."""
        if self.setup_error is not None or not self.driver.shows_snapshots(share):
            return
        shown = [s for s in snapshots if s.status in (C.STATUS_AVAILABLE, C.STATUS_CREATING)]
        if not shown and not self.driver.has_snapshot_view(share):
            return          # nothing shown, nothing to show: no worker-thread round
        try:
            await self.call("update_snapshot_view", share, shown, rules)
        except SharedError as exc:
            log.warning("share %s: its snapshot view is not up to date: %s", share.id, exc)

    def snapshot_exports(self, share: Share,
                         exports: List[Tuple[Snapshot, List[AccessRule]]]) -> List[Dict[str, Any]]:
        """The record form of the share's snapshots that have rules."""
        return [records.snapshot_export_dict(snap, rules,
                                             self.mount_hints(snapshot_as_share(snap, share)))
                for snap, rules in exports]

    async def periodic(self, host: str, epoch: str, seqs: List[int], shares: List[Share],
                       rules: Dict[str, List[AccessRule]],
                       snapshots: Optional[records.Exports] = None) -> None:
        """The periodic hook: every share of this backend with its rules, in
        len(seqs) records (consecutive seqs, records.periodic_parts)."""
        data: Dict[str, Dict[str, Any]] = {}
        if self.setup_error is None:
            try:
                data = await asyncio.to_thread(self.driver.get_periodic_hook_data, shares) or {}
            except Exception as exc:
                log.warning("backend %s: get_periodic_hook_data failed: %s", self.name, exc)
        runs = await asyncio.to_thread(records.split, shares, rules, len(seqs), snapshots)

        def build(i: int, seq: int, run: List[Share]) -> Dict[str, Any]:
            return records.build(host=host, epoch=epoch, seq=seq, phase=C.PHASE_PERIODIC,
                                 method="periodic", backend=self.name, part=(i, len(seqs)),
                                 shares=[records.share_dict(s, rules.get(s.id, []),
                                                            data.get(s.id, {}),
                                                            snapshots=(snapshots or {}).get(
                                                                s.id, ()))
                                         for s in run])
        for i, (seq, run) in enumerate(zip(seqs, runs), 1):
            # A part holds hundreds of shares: split and built in threads, so
            # that the event loop goes on answering calls meanwhile.
            await self.hooks.periodic(await asyncio.to_thread(build, i, seq, run))

    # --- capacity ---------------------------------------------------------------
    async def refresh_stats(self, share_count: int, provisioned_gib: int,
                            max_age: float = 0.0) -> bool:
        """Read the driver's figures (unless read less than max_age seconds
        ago: every create and extend checks capacity, and the pool's size
        and free space do not need a driver call each time); True if the
        backend's stats changed (updated_at aside)."""
        stats: Dict[str, Any] = {}
        now = time.monotonic()
        if self.setup_error is None and self._driver_stats is not None \
                and now - self._driver_stats_at < max_age:
            stats = dict(self._driver_stats)
        elif self.setup_error is None:
            try:
                stats = dict(await asyncio.to_thread(self.driver.get_share_stats))
                self._driver_stats, self._driver_stats_at = dict(stats), now
            except Exception as exc:
                log.warning("backend %s: stats failed: %s", self.name, exc)
                stats = {"error": public_text(f"reading the figures failed: {exc}")}
                self._driver_stats = None
        stats.update(self.driver.capabilities())
        stats.update({
            "share_backend_name": self.config.share_backend_name,
            "driver_name": self.driver.driver_name,
            "driver_version": self.driver.driver_version,
            "storage_protocol": "_".join(self.protocols),
            "provisioned_capacity_gb": float(provisioned_gib),
            "share_count": share_count,
            "reserved_percentage": float(self.config.reserved_share_percentage),
            "max_over_subscription_ratio": float(self.config.max_over_subscription_ratio),
            "thin_provisioning": bool(self.driver.thin_provisioning),
            "available": self.setup_error is None,
            "updated_at": now_us(),
        })
        if self.setup_error:
            stats["error"] = public_text(self.setup_error)
        old = {k: v for k, v in self.stats.items() if k != "updated_at"}
        self.stats = stats
        return old != {k: v for k, v in stats.items() if k != "updated_at"}

    def check_capacity(self, extra_gib: int) -> None:
        """Refuse extra_gib more if the (just refreshed) figures say so."""
        stats = self.stats
        total = stats.get("total_capacity_gb")
        free = stats.get("free_capacity_gb")
        if not isinstance(total, (int, float)) or not isinstance(free, (int, float)):
            return  # the driver cannot tell; it enforces its own limits
        reserved = total * self.config.reserved_share_percentage / 100.0
        provisioned = stats["provisioned_capacity_gb"]
        if self.driver.thin_provisioning:
            limit = (total - reserved) * self.config.max_over_subscription_ratio
            if provisioned + extra_gib > limit:
                raise CapacityExceeded(
                    f"backend {self.name}: {extra_gib} GiB more would provision "
                    f"{provisioned + extra_gib:g} GiB, above the limit of {limit:g} GiB "
                    f"(total {total:g} GiB, {self.config.reserved_share_percentage:g}% reserved, "
                    f"over-subscription ratio {self.config.max_over_subscription_ratio:g})")
        elif extra_gib > free - reserved:
            raise CapacityExceeded(
                f"backend {self.name}: {extra_gib} GiB requested but only "
                f"{max(free - reserved, 0):g} GiB free after the reserve")
