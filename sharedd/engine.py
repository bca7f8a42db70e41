"""The share engine: what sharedd can do, as one short method per operation,
and its life cycle. No D-Bus here.

Each operation validates its arguments (a refused call leaves no row, no
signal, no record), then hands a description to the runner (operation.py),
which owns intent, hooks, driver call, outcome and notification. Every
status change passes the state table (states.py); start-up recovery is in
recovery.py; a backend's driver, helpers, hooks and capacity in backend.py.

Operations on one share are serialised; on different shares they run
concurrently. A deny is an intent that is never lost: if the backend fails,
the rule stays queued_to_deny, is retried with backoff and at every ensure,
and is never enforced again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Set, Tuple

from . import constants as C
from . import access, collector, metrics, netns, recovery, signing, validation
from .backend import Backend, BackendInfo
from .config import Config
from .errors import (AlreadyExists, BackendFailure, CapacityExceeded,
                     InvalidArgument, InvalidState, NotFound, NotSupported, StateLost)
from .hooks import records
from .hooks.base import HookContext
from .jobs import Job, Jobs
from .migration import Migrations
from .models import (AccessRule, Replica, Share, ShareGroup, ShareGroupSnapshot, ShareNetwork,
                     ShareServer, ShareUpdate, Snapshot, fields_of)
from .operation import Operation, Runner, isolated
from .replication import Replications
from .states import Observer
from .service_instance import ServiceInstances
from .share_servers import ShareServers
from .share_groups import ShareGroups
from .snapshot_access import SnapshotAccess
from .snapshots import Snapshots
from .spool_export import SpoolExport
from .store import Listing, Store, new_id, snapshots_of
from .util import lock_state_dir, now_us, private_dir

log = logging.getLogger(__name__)

#: seconds between set-up attempts of a backend that failed: doubling up to the cap
SETUP_RETRY_FIRST, SETUP_RETRY_CAP = 2.0, 60.0


class Engine:
    def __init__(self, config: Config, observer: Optional[Observer] = None):
        self.config = config
        self.observer = observer or Observer()
        self.backends: Dict[str, Backend] = {}
        # store, runner and revoker exist from start() on
        self.store: Store
        self.runner: Runner
        self.revoker: access.Revoker
        self.servers: ShareServers
        self.migrations: Migrations
        self.replications: Replications
        self.snapshot_ops: Snapshots
        self.groups: ShareGroups
        self.jobs = Jobs(self.observer)
        self.metrics = metrics.Registry()
        self.instances: Optional[ServiceInstances] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._started = False
        self._ensuring = (0, 0)   # (done, of) while shares are being ensured
        self._usage: Dict[str, float] = {}     # share id -> bytes used, for the metrics
        self._usage_at = 0.0
        self._tasks: Set["asyncio.Future[Any]"] = set()
        # export services being handled as (re)started: whether once more
        self._appearing: Dict[str, bool] = {}
        # per backend: the periodic run waiting to start, and the lock of runs
        self._periodic_next: Dict[str, "asyncio.Future[Any]"] = {}
        self._periodic_locks: Dict[str, asyncio.Lock] = {}
        self._lock_fd: Optional[int] = None
        self.signer: signing.SigningKey
        self.spool_export = SpoolExport(config.host_id, config.spool_dir,
                                        config.spool_export_clients, self.backends)

    # ------------------------------------------------------------ life cycle
    async def start(self) -> None:
        cfg = self.config
        private_dir(cfg.state_path, 0o750)
        os.makedirs(cfg.spool_dir, mode=0o755, exist_ok=True)
        self._lock_fd = lock_state_dir(cfg.state_path)   # before the database is touched
        self.store = Store(os.path.join(cfg.state_path, "sharedd.db"))
        self.runner = Runner(self.store, self.observer, cfg.host_id, self.backends)
        self.replications = Replications(self.store, self.runner, self.backends, self.jobs,
                                         self._spawn, self._check_capacity)
        self.revoker = access.Revoker(self.store, self.runner, self.backends, self._spawn,
                                      self.replications.copies)
        self.servers = ShareServers(self.store, self.runner, self.backends, self._spawn,
                                    netns.check_bridge, netns.check_parent)
        self.migrations = Migrations(self.store, self.runner, self.backends, self.jobs,
                                     self._spawn, self._check_capacity)
        self.snapshot_ops = Snapshots(self.store, self.runner, self.backends, self.replications,
                                      self._spawn, self._share_in)
        self.runner.listeners.append(self.snapshot_ops)
        self.groups = ShareGroups(self.store, self.runner, self.backends, self.create_share,
                                  self.snapshot_ops.view)
        self.snapshot_access = SnapshotAccess(self.store, self.runner, self.backends,
                                              self._share_in)
        self._loop = asyncio.get_running_loop()
        self._started = True
        self.signer = signing.open_key(cfg.record_signing_key, cfg.host_id)
        self.runner.metrics = self.metrics
        context = HookContext(cfg.host_id, cfg.spool_dir, emit_signal=self.observer.hook_fired,
                              retention_seconds=cfg.spool_retention_seconds,
                              retention_count=cfg.spool_retention_count, signer=self.signer,
                              metrics=self.metrics)
        for name, bconf in cfg.backends.items():
            self.backends[name] = Backend(name, bconf, cfg.state_path, cfg.command_timeout, context,
                                          self.observer.bus_call)
        if any(b.config.driver_handles_share_servers and b.driver.uses_export_helpers
               for b in self.backends.values()):
            self.instances = ServiceInstances(
                os.path.join(cfg.state_path, "servers"), cfg.share_server_run_dir,
                mode=cfg.share_server_launcher, command_timeout=cfg.command_timeout,
                on_restart=self._server_restarted)
            for b in self.backends.values():
                if b.config.driver_handles_share_servers and b.driver.uses_export_helpers:
                    b.driver.service_instances = self.instances
        for b in self.backends.values():
            # a power cut may have lost a commit whose seq a hook kept
            kept = b.hooks.last_seq(self.store.epoch)
            if self.store.raise_seq(kept):
                log.warning("hook records of backend %s reach seq %d, past the state "
                            "database's counter (a lost commit): going on after it", b.name, kept)
        for b in self.backends.values():
            await b.setup()
        await self._recover_servers()
        await recovery.recover(self.store, self.runner, self.backends)
        await self.replications.recover()
        await self.groups.recover()
        await self.ensure_all()
        await self.spool_export.ensure()
        for b in self.backends.values():
            await self._refresh(b)
            await self._publish_capabilities(b)
            self._spawn(self._every(self._stats_interval, self._refresh, b))
            self._spawn(self._every(self._periodic_interval, self.periodic, b))
            if b.setup_error:
                self._spawn(self._setup_retries(b))
        self._spawn(self.replications.run_periodic())
        self._spawn(self.snapshot_ops.scheduler.run())
        self._spawn(self._write_metrics_every())

    async def _setup_retries(self, b: Backend) -> None:
        """A backend whose set-up failed (its export service not running yet,
        say) is tried again with backoff until it works."""
        delay = SETUP_RETRY_FIRST
        while b.setup_error:
            await asyncio.sleep(delay)
            delay = min(delay * 2, SETUP_RETRY_CAP)
            await self._bring_up(b)

    async def _bring_up(self, b: Backend) -> None:
        async with self.runner.locked([f"setup:{b.name}"]):
            if not b.setup_error:
                return
            await b.setup()
            if b.setup_error:
                return
            log.info("backend %s is usable now: recovering and ensuring its shares", b.name)
            await self.servers.recover(backend=b.name)
            await recovery.recover(self.store, self.runner, self.backends, only=b.name)
            await self.replications.recover(only=b.name)
            await self.groups.recover(only=b.name)
        await self.ensure_all(backend=b.name)
        await self.spool_export.ensure()
        await self._refresh(b)
        await self._publish_capabilities(b)

    def export_service_appeared(self, helper: str) -> None:
        """An export service (NFS-Ganesha) (re)started: set up the backends
        that were waiting for it, and re-add the exports it lost, in the
        background. It appearing again meanwhile (restarted in a loop) is
        handled once more after that, not by a second run beside it."""
        if helper in self._appearing:
            self._appearing[helper] = True
            return
        self._appearing[helper] = False
        self._spawn(self._service_appeared(helper))

    async def _service_appeared(self, helper: str) -> None:
        try:
            again = True
            while again:
                self._appearing[helper] = False
                try:
                    for b in self.backends.values():
                        if helper in b.helper_names():
                            if b.setup_error:
                                await self._bring_up(b)
                            else:
                                await self.ensure_all(backend=b.name)
                                await self.spool_export.ensure()
                except StateLost:
                    raise
                except Exception as exc:   # (the next appearance is still handled)
                    log.error("%s (re)started, but its exports could not all be added "
                              "again: %s", helper, exc)
                again = self._appearing[helper]
        finally:
            del self._appearing[helper]

    async def _recover_servers(self) -> None:
        """Share servers before shares: finish or undo set-ups and teardowns
        a crash interrupted, bring the others back, remove what nothing owns."""
        await self.servers.recover()
        instances = self.instances
        if instances is None:
            return
        owned = await asyncio.to_thread(instances.leftovers, True)
        for server_id in self.servers.orphans(sorted(owned)):
            log.warning("removing share server %s: left behind, unknown to the database",
                        server_id)
            try:
                await asyncio.to_thread(instances.teardown, server_id)
            except Exception as exc:
                log.error("share server %s: cannot remove what is left of it: %s", server_id, exc)

    def _server_restarted(self, server_id: str) -> None:
        """A share server's export daemon came back (from the supervisor's
        thread): it lost its runtime exports; ensure its shares again."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(
                lambda: self._spawn(self.ensure_all(server=server_id)))

    def _stats_interval(self, b: Backend) -> float:
        return float(self.config.stats_refresh_interval)

    def _periodic_interval(self, b: Backend) -> float:
        return float(b.config.periodic_hooks_interval)

    async def stop(self, timeout: float = 60.0) -> None:
        # Copies end now (their worker threads would hold up the exit);
        # start-up recovery settles each from its stored phase.
        for job in self.jobs.all():
            job.cancel_event.set()
        # Tasks spawned meanwhile (a deny's retry) are cancelled too, and one
        # that swallowed its cancellation is asked again: stop never waits
        # for background work forever.
        for _ in range(50):
            if not self._tasks:
                break
            for t in list(self._tasks):
                t.cancel()
            await asyncio.wait(list(self._tasks), timeout=0.2)
        else:
            log.warning("stopping with %d background task(s) still running", len(self._tasks))
        if self._started:
            await self.runner.wait_idle(timeout)
            self.runner.withdraw_staged()
            self.store.close()
        if self.instances is not None:
            self.instances.close()   # the servers keep serving while sharedd is away
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reload(self, new: Config) -> List[str]:
        """Apply what can change at run time; return what needs a restart."""
        pending = []
        if list(new.backends) != list(self.config.backends):
            pending.append("enabled_share_backends")
        for name, b in self.backends.items():
            if name in new.backends:
                pending += b.reload(new.backends[name])
        for key in ("log_level", "stats_refresh_interval", "max_access_rules_per_share",
                    "max_metadata_entries", "max_description_length", "metrics_path",
                    "metrics_usage_interval"):
            self.config.values[key] = new.values[key]
        pending += [k for k in ("state_path", "spool_dir", "host_id")
                    if new.values[k] != self.config.values[k]]
        if self._started:
            self.snapshot_ops.scheduler.changed()   # a backend's schedule may have changed
        return pending

    async def state_lost(self) -> str:
        """Returns once the state database cannot be written safely any more
        (its disk failed a write or an fsync), saying why: the daemon then
        exits for systemd to restart it, and start-up recovery goes on from
        what the disk holds."""
        await self.store.lost.wait()
        return self.store.failure

    def state_failure(self) -> str:
        """Why the state database's disk failed ("" if it has not)."""
        return self.store.failure if self._started else ""

    def status(self) -> str:
        if not self._started:
            return "starting"
        counts = self.store.count_shares_by_status()
        line = f"serving {sum(counts.values())} share(s) on {len(self.backends)} backend(s)"
        if self._ensuring[1]:
            line = f"ensuring {self._ensuring[0]:,}/{self._ensuring[1]:,} share(s); " + line
        if counts.get(C.STATUS_ERROR):
            line += f", {counts[C.STATUS_ERROR]} in error"
        broken = [b.name for b in self.backends.values() if b.setup_error]
        if broken:
            line += f"; backend(s) not usable: {', '.join(broken)}"
        return line

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """Background work, cancelled by stop; a failure is logged (a lost
        state database quietly: the daemon logs it and exits)."""
        task = asyncio.ensure_future(coro)
        self._track(task)
        task.add_done_callback(_log_failure)

    def _track(self, task: "asyncio.Future[Any]") -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _every(interval: Callable[[Backend], float],
                     fn: Callable[[Backend], Awaitable[Any]], b: Backend) -> None:
        while True:
            await asyncio.sleep(interval(b))
            try:
                await fn(b)
            except Exception:
                log.exception("backend %s: %s failed", b.name, getattr(fn, "__name__", fn))

    # --------------------------------------------------------------- metrics
    async def _share_usage(self) -> Dict[str, float]:
        """Bytes each available share uses, as its driver reads them: one
        read per share (a worker thread's work), so at most every
        metrics_usage_interval seconds; the figures of the last read between."""
        interval = float(self.config.metrics_usage_interval)
        now = time.monotonic()
        if interval <= 0 or (self._usage_at and now - self._usage_at < interval):
            return self._usage
        self._usage_at = now
        usage: Dict[str, float] = {}
        for b in self.backends.values():
            if b.setup_error:
                continue
            shares = await self.store.read(functools.partial(_available, backend=b.name))
            try:
                usage.update(await asyncio.to_thread(b.driver.get_share_usages, shares))
            except Exception as exc:        # a figure missing, never the metrics file
                log.warning("backend %s: cannot read the shares' usage: %s", b.name, exc)
        self._usage = usage
        return usage

    async def _metrics_state(self) -> Dict[str, Any]:
        """What the metrics show, rendered elsewhere. The store's part is
        read in its reader thread: aggregate queries and a row per share
        for the sizes, tens of milliseconds at 10,000 shares."""
        def read(view: Store) -> Dict[str, Any]:
            return {"tallies": view.tallies(), "sizes": view.share_sizes(),
                    "seq": view.last_seq()}
        state = await self.store.read(read)
        state.update(usage=dict(self._usage),
                     backends=[(b.name, bool(b.setup_error), dict(b.stats))
                               for b in self.backends.values()],
                     jobs=len(self.jobs.all()), counters=self.metrics.families(),
                     collected=list(collector.collected), frozen=collector.frozen)
        return state

    @staticmethod
    def _metrics_render(state: Dict[str, Any]) -> str:
        """The Prometheus text of _metrics_state (no I/O: a worker thread's
        work at 10,000 shares)."""
        GiB = 1 << 30
        tallies = state["tallies"]
        capacity = []
        for name, _, stats in state["backends"]:
            for kind in ("total", "free", "provisioned"):
                value = stats.get(f"{kind}_capacity_gb")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    capacity.append(({"backend": name, "kind": kind}, float(value) * GiB))
        fams = [
            metrics.gauge("sharedd_shares", "Shares by backend and status.",
                          metrics.by_label(tallies["shares"], "backend", "status")),
            metrics.gauge("sharedd_snapshots", "Snapshots by backend and status.",
                          metrics.by_label(tallies["snapshots"], "backend", "status")),
            metrics.gauge("sharedd_access_rules", "Access rules by backend and state.",
                          metrics.by_label(tallies["rules"], "backend", "state")),
            metrics.gauge("sharedd_backend_up", "1 if the backend is usable, 0 if its set-up "
                          "failed (it is retried).",
                          [({"backend": name}, 0 if broken else 1)
                           for name, broken, _ in state["backends"]]),
            metrics.gauge("sharedd_backend_capacity_bytes",
                          "Backend capacity: total and free as the driver reports them, "
                          "provisioned as the sum of the share sizes.", capacity),
            metrics.gauge("sharedd_share_provisioned_bytes", "The size of each share (its quota).",
                          [({"share": i, "name": n, "backend": b}, size * GiB)
                           for i, n, b, size in state["sizes"]]),
            metrics.gauge("sharedd_share_used_bytes", "The space each share uses, as its "
                          "driver reads it (every metrics_usage_interval seconds).",
                          [({"share": i, "name": n, "backend": b}, int(state["usage"][i]))
                           for i, n, b, _ in state["sizes"] if i in state["usage"]]),
            metrics.gauge("sharedd_hook_last_seq", "The newest hook record's sequence "
                          "number (clients compare it with what they applied).",
                          [({}, state["seq"])]),
            metrics.gauge("sharedd_jobs", "Jobs (long operations) running.",
                          [({}, state["jobs"])]),
            metrics.gauge("sharedd_gc_frozen_objects", "Objects left out of Python's cycle "
                          "collections until the next thaw (sharedd.collector), as "
                          "counted each minute.",
                          [({}, state["frozen"])]),
        ]
        freed = metrics.Family("sharedd_gc_collected_objects_total", "counter",
                               "Objects Python's cycle collector found unreachable, by "
                               "generation: garbage in reference cycles (none on ordinary "
                               "paths; a rise is a leak the collector hides).")
        for generation, count in enumerate(state["collected"]):
            freed.add(count, generation=str(generation))
        fams.append(freed)
        return metrics.exposition(fams + state["counters"])

    async def write_metrics(self) -> bool:
        """Write metrics_path now (False: its directory does not exist)."""
        if os.path.isdir(os.path.dirname(self.config.metrics_path) or "."):
            await self._share_usage()
        state = await self._metrics_state()
        path = self.config.metrics_path

        def render_and_write() -> bool:
            return metrics.write(path, self._metrics_render(state))
        return await asyncio.to_thread(render_and_write)

    async def _write_metrics_every(self) -> None:
        while self.config.metrics_interval > 0:
            try:
                await self.write_metrics()
            except OSError as exc:
                log.warning("cannot write the metrics to %s: %s", self.config.metrics_path, exc)
            await asyncio.sleep(self.config.metrics_interval)

    # ----------------------------------------------------------------- reads
    @property
    def spool_export_location(self) -> str:
        """host:/path clients mount the spool from ("" if not exported)."""
        return self.spool_export.location

    @property
    def record_public_key(self) -> str:
        """The public key line clients trust (sharedd.signing)."""
        return self.signer.public.line()

    @property
    def host_id(self) -> str:
        return str(self.config.host_id)

    @property
    def spool_dir(self) -> str:
        return str(self.config.spool_dir)

    def backend_names(self) -> List[str]:
        return list(self.backends)

    def backend_info(self, name: str) -> BackendInfo:
        return self._backend(name).info()

    def get_share(self, share_id: str) -> Optional[Share]:
        return self.store.get_share(share_id)

    def share(self, share_id: str) -> Share:
        s = self.store.get_share(share_id)
        if s is None:
            raise NotFound(f"no share with id {share_id[:80]}")
        return s

    def shares(self, backend: Optional[str] = None) -> List[Share]:
        return self.store.shares(backend)

    def share_listing(self, **equal: str) -> Listing:
        """ListShares: the shares by backend, protocol (any case), status,
        name, for an answer written in slices."""
        return Listing(self.store, "shares", _share_filter(equal))

    def find_share_by_name(self, name: str) -> Share:
        s = self.store.find_share(name)
        if s is None:
            raise NotFound(f"no share named {name[:80]!r}")
        return s

    def rules(self, share_id: str) -> List[AccessRule]:
        return self.store.rules(share_id)

    def get_snapshot(self, snapshot_id: str) -> Optional[Snapshot]:
        return self.store.get_snapshot(snapshot_id)

    def snapshot(self, snapshot_id: str) -> Snapshot:
        s = self.store.get_snapshot(snapshot_id)
        if s is None:
            raise NotFound(f"no snapshot with id {snapshot_id[:80]}")
        return s

    def snapshots(self, share_id: Optional[str] = None) -> List[Snapshot]:
        return self.store.snapshots(share_id)

    def snapshot_listing(self, share_id: Optional[str] = None) -> Listing:
        """ListSnapshots: the snapshots (of one share), for an answer
        written in slices."""
        return Listing(self.store, "snapshots", snapshots_of(share_id))

    # -------------------------------------------------- share networks, servers
    async def create_share_network(self, name: str, options: Dict[str, Any]) -> ShareNetwork:
        return await self.servers.create_network(name, options)

    async def delete_share_network(self, network_id: str, options: Dict[str, Any]) -> None:
        await self.servers.delete_network(network_id, options)

    def share_network(self, network_id: str) -> ShareNetwork:
        return self.servers.network(network_id)

    def share_networks(self) -> List[ShareNetwork]:
        return self.servers.networks()

    def share_server(self, server_id: str) -> ShareServer:
        return self.servers.server(server_id)

    def share_servers(self, network_id: Optional[str] = None) -> List[ShareServer]:
        return self.servers.servers(network_id)

    def share_server_share_ids(self, server_id: str) -> List[str]:
        return self.servers.server_share_ids(server_id)

    async def delete_share_server(self, server_id: str, options: Dict[str, Any]) -> None:
        await self.servers.delete_server(server_id, options)

    def _backend(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            raise NotFound(f"no backend named {name[:80]!r} (enabled: {', '.join(self.backends)})")
        return b

    def _labels(self, options: Dict[str, Any]) -> Tuple[str, Dict[str, str]]:
        """A new share's description and metadata, within the configured limits."""
        return (validation.description(options.get("description", ""),
                                       self.config.max_description_length),
                validation.metadata(options.get("metadata", {}), self.config.max_metadata_entries))

    def _share_in(self, share_id: str, statuses: Tuple[str, ...], verb: str) -> Share:
        share = self.share(share_id)
        if share.status not in statuses:
            raise InvalidState(f"share {share.name} is {share.status}; it can be {verb} when "
                               f"{' or '.join(statuses)}")
        return share

    # -------------------------------------------------------------- capacity
    async def _refresh(self, b: Backend, max_age: float = 0.0) -> None:
        if await b.refresh_stats(*self.store.backend_totals(b.name), max_age=max_age):
            self.observer.backend_changed(b.name)

    async def _check_capacity(self, b: Backend, extra_gib: int) -> None:
        await self._refresh(b, C.CAPACITY_STATS_MAX_AGE)
        b.check_capacity(extra_gib + self.store.gib_arriving(b.name))

    # ------------------------------------------------------------------ hooks
    async def periodic(self, b: Backend) -> None:
        """A periodic state of b, taken after this call began. Callers that
        come while one is waiting to start share it: with 100 callers at
        once, one run goes on and one waits, not 100 reads of every share."""
        if not b.hooks.enabled(C.PHASE_PERIODIC):
            return
        waiting = self._periodic_next.get(b.name)
        if waiting is None or waiting.done():     # (cancelled by a stop)
            waiting = self._periodic_next[b.name] = asyncio.ensure_future(
                self._periodic_when_free(b))
            self._track(waiting)          # stop cancels it; its callers hear how it went
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(waiting)

    async def _periodic_when_free(self, b: Backend) -> None:
        async with self._periodic_locks.setdefault(b.name, asyncio.Lock()):
            self._periodic_next.pop(b.name, None)   # later callers wait for the next run
            await self._periodic_run(b)

    async def _periodic_run(self, b: Backend) -> None:
        # A record must never show an older state than a record with a lower
        # seq: the seqs are taken and a view of the state at that moment is
        # opened with no await between them (Store.read opens it before its
        # first await). Their number comes from counts; the state itself
        # (about 25 ms per 1,000 shares) is read from the view in the store's
        # reader thread while the loop goes on.
        with self.store.tx(durable=False):
            seqs = [self.store.next_seq()
                    for _ in range(records.periodic_parts(**self.store.periodic_counts(b.name)))]
        shares, rules, exports = await self.store.read(
            functools.partial(Store.periodic_state, backend=b.name))
        exported = {s.id: b.snapshot_exports(s, exports[s.id]) for s in shares if s.id in exports}
        await self.store.synced()    # the seqs on disk before a record shows them
        await b.periodic(self.host_id, self.store.epoch, seqs, shares, rules, exported)

    async def run_periodic_hooks(self, options: Dict[str, Any]) -> None:
        validation.options(options, {"backend": str})
        targets = [self._backend(options["backend"])] if "backend" in options \
            else list(self.backends.values())
        for b in targets:
            await self.periodic(b)

    async def _publish_capabilities(self, b: Backend) -> None:
        async def call() -> None:
            if b.setup_error:
                raise BackendFailure(b.setup_error)

        async def plan() -> Operation:
            return Operation("publish_service_capabilities", b, intent=_nothing, call=call,
                             done=_nothing, failed=_nothing)
        await isolated(f"backend {b.name}", self.runner.run([f"backend:{b.name}"], plan),
                       step="capabilities")

    # ---------------------------------------------------------------- shares
    async def create_share(self, name: str, protocol: str, size_gib: int,
                           options: Dict[str, Any]) -> Share:
        validation.options(options, {"backend": str, "snapshot": str, "description": str,
                                 "metadata": dict, "share_network": str,
                                 "snapshot_schedule": str, "snapshot_retention": str,
                                 "snapshot_visibility": str, "share_group": str})
        schedule, retention, visibility = self.snapshot_ops.check_policy(options)
        name = validation.name(name)
        protocol = validation.protocol(protocol)
        size_gib = validation.size_gib(size_gib)
        description, metadata = self._labels(options)
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
        b = self._backend(options.get("backend") or (parent.backend if parent
                                                     else next(iter(self.backends)))).usable()
        b.require_protocol(protocol)
        if snap:
            b.require("create_share_from_snapshot_support", "create shares from snapshots")
        network = self._share_network_for(b, options)
        group = self.groups.for_new_share(options["share_group"], b.name) \
            if "share_group" in options else None
        share = Share(id=new_id(), name=name, backend=b.name, protocol=protocol, size_gib=size_gib,
                      status=C.STATUS_CREATING, created_at=now_us(), description=description,
                      metadata=metadata, snapshot_id=snap.id if snap else None,
                      share_group_id=group.id if group else None)
        method = "create_share_from_snapshot" if snap else "create_share"

        async def plan() -> Operation:
            if self.store.find_share(name) is not None:
                raise AlreadyExists(f"a share named {name!r} exists already")
            await self._check_capacity(b, size_gib)
            return _new_share(method, b, share, (lambda: b.call(method, share, snap, parent))
                              if snap else (lambda: b.call(method, share)),
                              compensate=lambda: b.call("delete_share", share), snapshot=snap)
        keys = [share.id, f"name:{name}"] + ([parent.id] if parent else [])
        if network is None:
            await self.runner.run(keys, plan)
        else:
            async with self.servers.serving(b, network) as server:
                share.share_server_id = server.id
                await self.runner.run(keys, plan)
        if schedule or retention or visibility:
            await self.snapshot_ops.set_policy(self.share(share.id), schedule, retention, visibility)
        self._spawn(self._refresh(b, C.CAPACITY_STATS_MAX_AGE))
        return self.share(share.id)

    def _share_network_for(self, b: Backend, options: Dict[str, Any]) -> Optional[ShareNetwork]:
        """The share network a new share on b goes on: required where b
        handles share servers, refused elsewhere."""
        if not b.config.driver_handles_share_servers:
            if "share_network" in options:
                raise InvalidArgument(f"backend {b.name} does not handle share servers: "
                                      "drop the share_network option")
            return None
        if "share_network" not in options:
            raise InvalidArgument(f"backend {b.name} serves every share from its share "
                                  "network's server: give the share_network option")
        return self.servers.network(options["share_network"])

    async def manage_share(self, backend: str, protocol: str, export_path: str,
                           options: Dict[str, Any]) -> Share:
        validation.options(options, {"name": str, "description": str, "metadata": dict,
                                 "size_gib": int})
        b = self._backend(backend).usable()
        protocol = validation.protocol(protocol)
        b.require_protocol(protocol)
        b.require("manage_support", "manage existing shares")
        if b.config.driver_handles_share_servers:
            raise NotSupported(f"backend {b.name} handles share servers: adopting existing "
                               "storage into a share network's server is not implemented")
        export_path = validation.export_path(export_path)
        name = validation.name(options.get("name") or validation.name_from_path(export_path))
        drv_options = {}
        if "size_gib" in options:
            drv_options["size_gib"] = validation.size_gib(options["size_gib"])
        description, metadata = self._labels(options)
        share = Share(id=new_id(), name=name, backend=b.name, protocol=protocol, size_gib=0,
                      status=C.STATUS_MANAGE_STARTING, created_at=now_us(),
                      description=description, metadata=metadata)

        def owned(location: Optional[str]) -> None:
            other = self.store.share_at(b.name, location) if location else None
            if other is not None and other.id != share.id:
                raise AlreadyExists(f"{export_path} is already share {other.name}")

        async def call() -> ShareUpdate:
            update: ShareUpdate = await b.call("manage_existing", share, export_path, drv_options)
            owned(update.provider_location)
            if not update.size_gib:
                raise BackendFailure("the driver did not report the managed share's size")
            return update

        async def plan() -> Operation:
            if self.store.find_share(name) is not None:
                raise AlreadyExists(f"a share named {name!r} exists already")
            # Every check that can refuse runs before anything is recorded.
            owned(await b.call("check_manage", export_path, drv_options))
            return _new_share("manage_share", b, share, call,
                              compensate=lambda: b.call("unmanage", share))
        await self.runner.run([share.id, f"name:{name}"], plan)
        self._spawn(self._refresh(b, C.CAPACITY_STATS_MAX_AGE))
        return self.share(share.id)

    async def delete_share(self, share_id: str, options: Dict[str, Any]) -> None:
        await self._removal(share_id, options, "delete_share", "delete_share", C.STATUS_DELETING,
                            "deleted", None)

    async def unmanage_share(self, share_id: str, options: Dict[str, Any]) -> None:
        await self._removal(share_id, options, "unmanage_share", "unmanage",
                            C.STATUS_UNMANAGE_STARTING, "unmanaged", "manage_support")

    async def _removal(self, share_id: str, options: Dict[str, Any], method: str,
                       driver_method: str, transitional: str, verb: str,
                       capability: Optional[str]) -> None:
        """Delete or unmanage: a revocation, announced in the pre hook (clients
        unmount first) and never held back by a hook."""
        validation.options(options, {})

        async def plan() -> Operation:
            share = self._share_in(share_id, (C.STATUS_AVAILABLE, C.STATUS_ERROR), verb)
            b = self._backend(share.backend).usable()
            if capability:
                b.require(capability, f"{method.split('_')[0]} shares")
            snaps = self.store.snapshots(share.id)
            if snaps:
                raise InvalidState(f"share {share.name} has {len(snaps)} snapshot(s); "
                                   "delete them first")
            if self.replications.is_replicated(share.id):
                raise InvalidState(f"share {share.name} has replicas; delete them first")
            return Operation(method, b, share=share, unblockable=True,
                             intent=lambda tx: tx.share(share, transitional,
                                                        task={"op": method,
                                                              "previous": share.status}),
                             call=lambda: b.call(driver_method, share),
                             done=lambda tx, _: tx.remove_share(share),
                             failed=lambda tx, _: tx.share(share, C.STATUS_ERROR))
        op = await self.runner.run([share_id], plan)
        self.runner.forget_lock(share_id)
        self._spawn(self._refresh(op.backend, C.CAPACITY_STATS_MAX_AGE))
        if op.share is not None:
            self.servers.released(op.share.share_server_id)

    async def extend_share(self, share_id: str, new_size: int, options: Dict[str, Any]) -> None:
        await self._resize(share_id, new_size, options, grow=True)

    async def shrink_share(self, share_id: str, new_size: int, options: Dict[str, Any]) -> None:
        await self._resize(share_id, new_size, options, grow=False)

    async def _resize(self, share_id: str, new_size: int, options: Dict[str, Any],
                      grow: bool) -> None:
        validation.options(options, {})
        new_size = validation.size_gib(new_size, "new size")
        method, verb = ("extend_share", "extend") if grow else ("shrink_share", "shrink")

        async def plan() -> Operation:
            share = self._share_in(share_id, (C.STATUS_AVAILABLE,),
                                   "extended" if grow else "shrunk")
            b = self._backend(share.backend).usable()
            old = share.size_gib
            if (new_size <= old) if grow else (new_size >= old):
                raise InvalidArgument(f"new size {new_size} GiB must be "
                                      f"{'larger' if grow else 'smaller'} than the current {old} GiB")
            b.require(f"{verb}_support", f"{verb} shares")
            if grow:
                await self._check_capacity(b, new_size - old)
            # Drivers change the size in one step: a failure leaves the old size.
            return Operation(method, b, share=share, restorable=True,
                             intent=lambda tx: tx.share(share, C.STATUS_EXTENDING if grow
                                                        else C.STATUS_SHRINKING,
                                                        task={"op": method, "old": old,
                                                              "new": new_size}),
                             call=lambda: b.call(method, share, new_size),
                             done=lambda tx, _: tx.share(share, C.STATUS_AVAILABLE,
                                                         size_gib=new_size),
                             failed=lambda tx, _: tx.share(share, C.STATUS_AVAILABLE),
                             undo=lambda tx: tx.share(share, C.STATUS_AVAILABLE))
        op = await self.runner.run([share_id], plan)
        self._spawn(self._refresh(op.backend, C.CAPACITY_STATS_MAX_AGE))

    # ---------------------------------------------------------------- access
    async def allow_access(self, share_id: str, access_type: str, access_to: str,
                           access_level: str, options: Dict[str, Any]) -> str:
        validation.options(options, validation.RULE_OPTIONS)
        kind, to, level = validation.access_rule(access_type, access_to, access_level)
        rule = AccessRule(id=new_id(), share_id=share_id, access_type=kind, access_to=to,
                          access_level=level, state=C.RULE_APPLYING, created_at=now_us())

        async def plan() -> Operation:
            share = self._share_in(share_id, (C.STATUS_AVAILABLE,), "given new access rules")
            b = self._backend(share.backend).usable()
            bc = b.config
            rule.squash, rule.anonuid, rule.anongid = validation.rule_squash(
                options, share.protocol == "NFS",
                (bc.default_squash, bc.default_anonuid, bc.default_anongid))
            b.driver.validate_rule(share, rule)
            limit = self.config.max_access_rules_per_share
            if self.store.count_rules(share.id) >= limit:
                raise CapacityExceeded(f"share {share.name} has {limit} access rules, the limit "
                                       "(max_access_rules_per_share); deny some first")
            r = self.store.find_rule(share.id, kind, to)
            if r is not None:
                raise AlreadyExists(
                    f"share {share.name} already has a {kind} rule for {to} "
                    f"({r.access_level}, {r.state}, id {r.id}); "
                    + ("wait until its deny is applied" if r.state in access.DENY_PENDING
                       else "deny it first"))

            async def call() -> Any:
                states = await b.call("update_access", share,
                                      access.granting(self.store, share.id), [rule], [])
                await self.replications.copies(share)
                return states
            return Operation("allow_access", b, share=share, rules=[rule], is_allow=True,
                             restorable=True,
                             intent=lambda tx: tx.add_rule(share, rule),
                             call=call,
                             done=lambda tx, result: tx.rule(share, rule,
                                                              access.applied_state(result, rule)),
                             failed=lambda tx, _: tx.rule(share, rule, C.RULE_ERROR),
                             undo=lambda tx: tx.rule(share, rule, None))
        op = await self.runner.run([share_id], plan)
        if rule.squash == "no_root_squash":
            log.warning("share %s: rule %s gives root on %s root's rights (no_root_squash, "
                        "as asked)", op.share.name if op.share else share_id, rule.id, to)
        if rule.state == C.RULE_ERROR:
            raise BackendFailure(f"backend {op.backend.name} could not apply the rule for {to}")
        return rule.id

    async def deny_access(self, share_id: str, access_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        access_id = validation.object_id(access_id, "access id")

        async def plan() -> Operation:
            # A migrating share's rules can still be revoked (on its source).
            share = self._share_in(share_id, (C.STATUS_AVAILABLE, C.STATUS_ERROR,
                                              C.STATUS_MIGRATING), "changed")
            rule = self.store.get_rule(access_id)
            if rule is None or rule.share_id != share.id:
                raise NotFound(f"share {share.name} has no access rule {access_id}")
            return await self.revoker.operation(share, [rule])
        await self.revoker.deny(share_id, plan, access_id)

    # ------------------------------------------------------------- snapshots
    async def create_snapshot(self, share_id: str, name: str, options: Dict[str, Any]) -> Snapshot:
        return await self.snapshot_ops.create(share_id, name, options)

    async def delete_snapshot(self, snapshot_id: str, options: Dict[str, Any]) -> None:
        await self.snapshot_ops.delete(snapshot_id, options)

    async def revert_to_snapshot(self, share_id: str, snapshot_id: str,
                                 options: Dict[str, Any]) -> None:
        await self.snapshot_ops.revert(share_id, snapshot_id, options)

    async def manage_snapshot(self, share_id: str, provider_location: str,
                              options: Dict[str, Any]) -> Snapshot:
        return await self.snapshot_ops.manage(share_id, provider_location, options)

    async def unmanage_snapshot(self, snapshot_id: str, options: Dict[str, Any]) -> None:
        await self.snapshot_ops.unmanage(snapshot_id, options)

    async def allow_snapshot_access(self, snapshot_id: str, access_type: str, access_to: str,
                                    options: Dict[str, Any]) -> str:
        return await self.snapshot_access.allow(snapshot_id, access_type, access_to, options)

    async def deny_snapshot_access(self, snapshot_id: str, access_id: str,
                                   options: Dict[str, Any]) -> None:
        await self.snapshot_access.deny(snapshot_id, access_id, options)

    def snapshot_rules(self, snapshot_id: str) -> List[AccessRule]:
        return self.store.snapshot_rules(snapshot_id)

    # ----------------------------------------------------------- share groups
    async def create_share_group(self, name: str, options: Dict[str, Any]) -> ShareGroup:
        return await self.groups.create(name, options)

    async def delete_share_group(self, group_id: str, options: Dict[str, Any]) -> None:
        await self.groups.delete(group_id, options)

    async def create_share_group_snapshot(self, group_id: str, name: str,
                                          options: Dict[str, Any]) -> ShareGroupSnapshot:
        return await self.groups.create_snapshot(group_id, name, options)

    async def delete_share_group_snapshot(self, gs_id: str, options: Dict[str, Any]) -> None:
        await self.groups.delete_snapshot(gs_id, options)

    def share_group(self, group_id: str) -> ShareGroup:
        return self.groups.get(group_id)

    def share_groups(self) -> List[ShareGroup]:
        return self.store.groups()

    def group_members(self, group_id: str) -> List[Share]:
        return self.groups.members(group_id)

    def share_group_snapshot(self, gs_id: str) -> ShareGroupSnapshot:
        return self.groups.get_snapshot(gs_id)

    def share_group_snapshots(self, group_id: Optional[str] = None) -> List[ShareGroupSnapshot]:
        return self.store.group_snapshots(group_id)

    def group_snapshot_members(self, gs_id: str) -> List[Snapshot]:
        return self.groups.snapshot_members(gs_id)

    async def set_snapshot_policy(self, share_id: str, options: Dict[str, Any]) -> None:
        """The share's own snapshot_schedule, snapshot_retention and/or
        snapshot_visibility ("": its backend's; schedule "none": no
        schedule; retention "all": keep all); the snapshot view follows."""
        validation.options(options, {"snapshot_schedule": str, "snapshot_retention": str,
                                     "snapshot_visibility": str})
        schedule, retention, visibility = self.snapshot_ops.check_policy(options)
        if await self.snapshot_ops.set_policy(self.share(share_id), schedule, retention, visibility):
            await self.snapshot_ops.show(share_id)

    def snapshot_visibility(self, share: Share) -> str:
        return self.snapshot_ops.visibility(share)

    def snapshot_policy(self, share: Share) -> Tuple[str, str]:
        """(schedule, retention) in force for the share."""
        return self.snapshot_ops.policy(share)

    # ------------------------------------------------------------ replication
    async def create_replica(self, share_id: str, backend: str, options: Dict[str, Any],
                             uid: int) -> Job:
        return await self.replications.create(share_id, backend, options, uid)

    async def promote_replica(self, replica_id: str, options: Dict[str, Any]) -> None:
        await self.replications.promote(replica_id, options)

    async def resync_replica(self, replica_id: str, options: Dict[str, Any], uid: int) -> Job:
        return await self.replications.resync(replica_id, options, uid)

    async def delete_replica(self, replica_id: str, options: Dict[str, Any]) -> None:
        await self.replications.delete(replica_id, options)

    def replica(self, replica_id: str) -> Replica:
        return self.replications.get(replica_id)

    def replicas(self, share_id: Optional[str] = None) -> List[Replica]:
        """A share's copies, the active first (every share's if None)."""
        return self.replications.of_share(share_id)

    # -------------------------------------------------------- migration, jobs
    async def migrate_share(self, share_id: str, backend: str, options: Dict[str, Any],
                            uid: int) -> Job:
        return await self.migrations.start(share_id, backend, options, uid)

    async def complete_migration(self, share_id: str, options: Dict[str, Any], uid: int) -> Job:
        return await self.migrations.complete(share_id, options, uid)

    async def cancel_migration(self, share_id: str, options: Dict[str, Any]) -> None:
        await self.migrations.cancel(share_id, options)

    def job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def all_jobs(self) -> List[Job]:
        return self.jobs.all()

    def cancel_job(self, job_id: str, options: Dict[str, Any]) -> None:
        validation.options(options, {})
        self.jobs.cancel(job_id)

    # ---------------------------------------------------------------- ensure
    async def ensure_all(self, backend: Optional[str] = None, helper: Optional[str] = None,
                         server: Optional[str] = None) -> None:
        """Ensure every available or error share (mounted, exported, exactly its
        granting rules); helper: only backends using that export helper;
        server: only the shares of that share server."""
        chosen = [b for b in self.backends.values() if not (
            b.setup_error or (backend and b.name != backend)
            or (helper and helper not in b.helper_names()))]

        def progress(done: int, total: int) -> None:
            self._ensuring = (done, total) if done < total else (0, 0)
        await recovery.ensure_all(self.store, self.runner, self.revoker, chosen, progress,
                                  server)
        if server is None:
            await self.replications.ensure([b.name for b in chosen])
        await self.snapshot_access.ensure_all([b.name for b in chosen], server)
        await self.snapshot_ops.ensure_views([b.name for b in chosen], server)


def _log_failure(task: "asyncio.Future[Any]") -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    if isinstance(exc, StateLost):
        log.debug("background task stopped: %s", exc)
    else:
        log.error("background task failed: %s", exc, exc_info=exc)


def _share_filter(equal: Dict[str, str]) -> Dict[str, str]:
    """ListShares' filter as the store compares it: protocols are kept in
    upper case."""
    if "protocol" in equal:
        return {**equal, "protocol": equal["protocol"].upper()}
    return equal


def _nothing(*_: Any) -> None:
    return None


def _new_share(method: str, b: Backend, share: Share, call: Callable[[], Awaitable[Any]],
               compensate: Callable[[], Awaitable[Any]],
               snapshot: Optional[Snapshot] = None) -> Operation:
    """Create, create from a snapshot, or manage: a share that did not exist.
    After a failure it is gone if the driver undid its work, else in error."""
    return Operation(method, b, share=share, snapshot=snapshot, call=call, compensate=compensate,
                     intent=lambda tx: tx.add_share(share, {"op": method}),
                     done=lambda tx, update: tx.share(share, C.STATUS_AVAILABLE,
                                                      **fields_of(update)),
                     failed=lambda tx, undone: tx.remove_share(share) if undone
                     else tx.share(share, C.STATUS_ERROR),
                     undo=lambda tx: tx.remove_share(share))


def _available(view: Store, backend: str) -> List[Share]:
    """The available shares of backend (Engine._share_usage, in the store's
    reader thread)."""
    return [s for s in view.shares(backend) if s.status == C.STATUS_AVAILABLE]
