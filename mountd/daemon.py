"""The mountd main loop (asyncio): watches, reconciles, reports.

Reconcile passes run one at a time in a worker thread; external commands
inside them carry timeouts. Triggers (inotify, D-Bus records, address
changes, Rescan, the periodic timer, retry times) wake the loop; a pass takes
in everything that arrived before it started, so a burst costs few passes.
"""

from __future__ import annotations

import asyncio
import datetime
import concurrent.futures
import logging
import os
import signal
import threading
import time
from typing import Dict, List, Optional


from sharedd import metrics
from sharedd.errors import ConfigError
from sharedd.notify import Notifier

from . import config as configlib
from .addresses import AddressMonitor
from .matching import certificate_cn
from .mounter import Mounter
from .reconcile import Identity, Reconciler, desired_mounts
from .records import RecordSource
from .remote_spool import SpoolPoller, ensure_mounted
from .state import StateStore
from .trust import describe
from .watcher import SpoolWatcher

log = logging.getLogger("mountd")

RECONNECT_DELAY = 2.0   # seconds between attempts to reach a restarted bus
SETTLE_MAX = 1.0        # seconds a pass may keep reading a burst before it acts


class Daemon:
    def __init__(self, config_path: str, *, optional_config: bool = False, use_bus: bool = True,
                 mounter_factory=None):
        self.config_path = config_path
        self.optional_config = optional_config
        self.use_bus = use_bus
        self.mounter_factory = mounter_factory or _real_mounter
        self.cfg = configlib.load(config_path, optional=optional_config)
        self.notifier = Notifier()   # never blocks the loop (sharedd/notify.py)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mountd-work")
        self.bus = None
        self.watcher: Optional[SpoolWatcher] = None
        self.poller: Optional[SpoolPoller] = None
        self.monitor: Optional[AddressMonitor] = None
        self._wake: Optional[asyncio.Event] = None
        # set by every trigger, from any thread: a pass reads on while it is set
        self._dirty = threading.Event()
        self._waiters: List[asyncio.Future] = []
        self._stopping = False
        self._reload = False
        self._next_retry: Optional[float] = None
        self._build()
        self._table = self.reconciler.mounts_table()

    # --- construction and reload ---------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        old_source = getattr(self, "source", None)
        self.source = RecordSource(cfg.spool_dir, cfg.spool_owners(), cfg.trust, cfg.state_path)
        if old_source is not None:
            self.source.last = old_source.last
            self.source.expect_hosts(old_source.known_hosts)
            # Records that came over the bus have no spool copy: keep them.
            for host in old_source.hosts.values():
                for rec in host.bus.values():
                    self.source.add_bus_record(rec)
        self.cert_cn = certificate_cn(cfg.glusterfs_client_cert) if cfg.glusterfs_client_cert else None
        if cfg.glusterfs_client_cert and not self.cert_cn:
            log.error("no CN found in %s: cert rules will not match", cfg.glusterfs_client_cert)
        store = StateStore(cfg.state_path)
        old = getattr(self, "reconciler", None)
        if old is not None:
            old.close(wait=True)     # its commands end (timeouts) before the state is handed on
        self.reconciler = Reconciler(cfg.mount_dir, self.mounter_factory(cfg), store,
                                     on_done=self._mount_finished)
        if old is not None and old.store.path != store.path:
            # Keep responsibility for the mounts already made.
            self.reconciler.mounts = old.mounts
            store.save(old.mounts)
        # The hosts the mounts came from: a spool without them is a fault.
        self.source.expect_hosts({m.host for m in self.reconciler.mounts.values()})

    def _notify(self, text: str) -> None:
        self.notifier.notify(text)

    def _start_monitor(self) -> None:
        self.monitor = AddressMonitor(
            lambda addrs: self.loop.call_soon_threadsafe(self.trigger, "address change"),
            interfaces=self.cfg.interfaces, expected=self.cfg.expected_ip_addresses,
            loopback=self.cfg.match_loopback)
        self.monitor.start()

    def _start_watcher(self) -> None:
        self.watcher = SpoolWatcher(self.cfg.spool_dir, lambda p: self.trigger("spool"), self.loop,
                                    allowed_uids=self.cfg.spool_owners())
        self.watcher.start()
        self.poller = SpoolPoller(self.cfg.spool_dir, self._spool_polled,
                                  self.cfg.spool_poll_interval)
        self.poller.start()

    def _spool_polled(self) -> None:
        """A network spool's directories changed (poller thread)."""
        self._dirty.set()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.trigger, "network spool changed")

    def _do_reload(self) -> None:
        try:
            new = configlib.load(self.config_path, optional=self.optional_config)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        old, self.cfg = self.cfg, new
        logging.getLogger().setLevel(new.log_level.upper())
        self._build()
        if (old.interfaces, old.expected_ip_addresses, old.match_loopback) != \
                (new.interfaces, new.expected_ip_addresses, new.match_loopback):
            self.monitor.stop()
            self._start_monitor()
        if (old.spool_dir, old.spool_owners(), old.spool_poll_interval) != \
                (new.spool_dir, new.spool_owners(), new.spool_poll_interval):
            self.watcher.stop()
            self.poller.stop()
            self._start_watcher()
        log.info("configuration reloaded")

    # --- triggers ----------------------------------------------------------
    def trigger(self, reason: str = "") -> None:
        if reason:
            log.debug("reconcile requested: %s", reason)
        self._dirty.set()
        if self._wake is not None:
            self._wake.set()

    def _mount_finished(self) -> None:
        """A mount command a pass stopped waiting for has ended (any thread)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.trigger, "mount command finished")

    def accept_record(self, record: dict) -> None:
        """A schema-valid record from the bus: same path as a spool record."""
        if self.source.add_bus_record(record):
            self.trigger("Fired signal")

    async def rescan(self) -> None:
        fut = self.loop.create_future()
        self._waiters.append(fut)
        self.trigger("Rescan")
        await fut

    def mounts_table(self):
        return self._table

    # --- one pass ------------------------------------------------------------
    def _pass(self, quick: bool = False):
        cfg = self.cfg
        # A burst still arriving is read on before anything is mounted (each
        # read costs little, a mount made for a state already superseded
        # costs a mount and an unmount); acting waits at most SETTLE_MAX
        # after the first read.
        settle_until = None
        reads = 0
        while True:
            self._dirty.clear()
            problem = ensure_mounted(cfg.spool_source, cfg.spool_dir, cfg.mount_timeout) \
                if cfg.spool_source else None
            if problem:
                shares = self.source.unreadable(problem)
                break
            shares = self.source.scan(quick)
            reads += 1
            settle_until = settle_until or time.monotonic() + SETTLE_MAX
            if not self._dirty.is_set() or time.monotonic() > settle_until:
                break
        if reads > 1:
            log.debug("read the spool %d times before acting", reads)
        identity = Identity(addresses=self.monitor.addresses(), cert_cn=self.cert_cn)
        desired = desired_mounts(
            shares, identity, cfg.protocols,
            {"NFS": cfg.nfs_mount_options, "GLUSTERFS": cfg.glusterfs_mount_options},
            have_client_cert=bool(cfg.glusterfs_client_cert and cfg.glusterfs_client_key),
            owners=self.reconciler.owners())
        faults = self.source.unavailable()
        keep = frozenset(self.reconciler.hosts()) if "" in faults else frozenset(faults)
        outcome = self.reconciler.run(desired, keep)
        self._faults = faults
        # The bus reads a snapshot taken between passes, never a half-done pass.
        self._table = self.reconciler.mounts_table()
        return outcome

    async def _run_pass(self, quick: bool = False) -> None:
        started = time.monotonic()
        try:
            outcome = await self.loop.run_in_executor(self.executor, self._pass, quick)
        except Exception:
            log.exception("reconcile pass failed")
            return
        log.debug("pass: %.3fs, %d events", time.monotonic() - started, len(outcome.events))
        self._next_retry = outcome.next_retry
        if self.bus is not None and outcome.changed:
            self.bus.mounts_changed(outcome.events)
        failed = sum(1 for m in self.reconciler.mounts.values() if m.state != "mounted")
        n = self.reconciler.mounted_count()
        faults = getattr(self, "_faults", {})
        self._notify(f"STATUS={n} share{'s' if n != 1 else ''} mounted"
                     + (f", {failed} failing" if failed else "")
                     + (f"; spool unavailable ({len(faults)}), mounts kept" if faults else ""))
        if self.bus is not None and faults != getattr(self, "_faults_shown", {}):
            self.bus.spool_changed()
        self._faults_shown = faults

    def spool_status(self) -> Dict[str, str]:
        """host ("" for the whole spool) -> why its records cannot be read."""
        return dict(getattr(self, "_faults", {}))

    # --- main loop -----------------------------------------------------------
    async def _watchdog(self, usec: int) -> None:
        while True:
            await asyncio.sleep(usec / 2e6)
            self._notify("WATCHDOG=1")

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, self._signal_stop)
        self.loop.add_signal_handler(signal.SIGINT, self._signal_stop)
        self.loop.add_signal_handler(signal.SIGHUP, self._signal_reload)
        watchdog = bus_keeper = metrics_writer = None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
            if usec > 0:
                watchdog = asyncio.ensure_future(self._watchdog(usec))
            self._start_monitor()
            self._start_watcher()
            if self.use_bus:
                from .bus import MountdBus   # only here: --no-bus needs no D-Bus library
                self.bus = MountdBus(self, self.accept_record)
                await self.bus.start()
                bus_keeper = asyncio.ensure_future(self._keep_bus(MountdBus))
            await self._run_pass()
            metrics_writer = asyncio.ensure_future(self._write_metrics_every())
            self._notify("READY=1")
            log.info("sharedd-mountd ready: spool %s, mounts under %s; %s", self.cfg.spool_dir,
                     self.cfg.mount_dir, describe(self.cfg.trust))
            if self.cfg.trust.accept_unsigned:
                log.warning("records without a trusted signature are accepted on file ownership "
                            "alone: only safe for a spool no other host writes (trusted_keys)")
            await self._loop()
            return 0
        finally:
            self._notify("STOPPING=1")
            for task in (watchdog, bus_keeper, metrics_writer):
                if task is not None:
                    task.cancel()
            if self.watcher is not None:
                self.watcher.stop()
            if self.poller is not None:
                self.poller.stop()
            if self.monitor is not None:
                self.monitor.stop()
            if self.bus is not None:
                self.bus.close()
            self.executor.shutdown(wait=True)
            self.reconciler.close()
            for fut in self._waiters:
                if not fut.done():
                    fut.cancel()

    # --- metrics ------------------------------------------------------------
    def metrics_text(self) -> str:
        """The mounts by state (as of the last pass), the mount failures so
        far, and per storage host the newest record applied and its age."""
        states: Dict[str, int] = {}
        for row in self._table:
            states[row[4]] = states.get(row[4], 0) + 1
        now = time.time()
        seqs, ages = [], []
        for host, meta in sorted(self.source.applied.hosts.items()):
            seqs.append(({"host": host}, meta["seq"]))
            text = meta["timestamp"].rstrip("Z")
            try:
                stamp = datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc)
            except ValueError:
                continue
            ages.append(({"host": host}, max(0.0, now - stamp.timestamp())))
        fams = [
            metrics.gauge("sharedd_mountd_mounts", "Shares this host should mount, by state.",
                          [({"state": s}, n) for s, n in sorted(states.items())]),
            metrics.gauge("sharedd_mountd_record_seq", "The newest record applied, per "
                          "storage host.", seqs),
            metrics.gauge("sharedd_mountd_record_age_seconds", "Age of the newest record "
                          "applied, per storage host (from the record's timestamp).", ages),
        ]
        failures = metrics.Family("sharedd_mountd_mount_failures_total", "counter",
                                  "Mount attempts that failed since mountd started.")
        failures.add(self.reconciler.failures_total)
        return metrics.exposition(fams + [failures])

    async def _write_metrics_every(self) -> None:
        while self.cfg.metrics_interval > 0:
            try:
                text = self.metrics_text()
                await self.loop.run_in_executor(None, metrics.write, self.cfg.metrics_path, text)
            except OSError as exc:
                log.warning("cannot write the metrics to %s: %s", self.cfg.metrics_path, exc)
            await asyncio.sleep(self.cfg.metrics_interval)

    async def _keep_bus(self, bus_class) -> None:
        """The system bus may restart: reconnect and own the name again."""
        while not self._stopping:
            await self.bus.wait_closed()
            if self._stopping:
                return
            log.error("lost the system bus connection; reconnecting")
            old, self.bus = self.bus, None
            old.close()   # the old connection's name must go before a new one asks for it
            while not self._stopping:
                await asyncio.sleep(RECONNECT_DELAY)
                candidate = bus_class(self, self.accept_record)
                try:
                    await candidate.start()
                except Exception as exc:
                    log.warning("cannot reconnect to the system bus yet: %s", exc)
                    candidate.close()
                    continue
                self.bus = candidate
                log.info("reconnected to the system bus")
                self.trigger("bus reconnected")
                break

    async def _loop(self) -> None:
        next_periodic = time.monotonic() + self.cfg.consume_interval
        next_health = time.monotonic() + (self.cfg.health_check_interval or float("inf"))
        while not self._stopping:
            timeout = max(0.0, min(next_periodic, next_health) - time.monotonic())
            if self._next_retry is not None:
                timeout = min(timeout, max(0.0, self._next_retry - time.time()) + 0.05)
            try:
                # asyncio.timeout: Python 3.11's wait_for can drop a cancellation
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
                # No fixed delay: events already queued join this pass, and
                # whatever arrives while it runs is folded into the next one.
                await asyncio.sleep(0)
            except TimeoutError:
                pass
            if self._stopping:
                break
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            if self._reload:
                self._reload = False
                self._notify("RELOADING=1")
                await self.loop.run_in_executor(self.executor, self._do_reload)
                self._notify("READY=1")
            # Between full rescans a network spool is read by new names only.
            quick = self.poller is not None and self.poller.active
            if time.monotonic() >= next_periodic:
                next_periodic = time.monotonic() + self.cfg.consume_interval
                quick = False
            if time.monotonic() >= next_health:
                next_health = time.monotonic() + (self.cfg.health_check_interval or float("inf"))
                # results arrive as later passes (on_done)
                self.reconciler.check_health(self.cfg.health_check_timeout)
            self.watcher.ensure_watches()
            await self._run_pass(quick)
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _signal_stop(self) -> None:
        if self._stopping:
            return
        log.info("stopping (mounts stay in place)")
        self._stopping = True
        self._wake.set()

    def _signal_reload(self) -> None:
        log.info("SIGHUP: reloading configuration")
        self._reload = True
        self._wake.set()


def _real_mounter(cfg) -> Mounter:
    return Mounter(timeout=cfg.mount_timeout, nosuid_nodev=cfg.mount_nosuid_nodev,
                   mount_dir=cfg.mount_dir,
                   glusterfs_cert=cfg.glusterfs_client_cert,
                   glusterfs_key=cfg.glusterfs_client_key, glusterfs_ca=cfg.glusterfs_ca)
