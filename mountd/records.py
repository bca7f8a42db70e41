"""The records mountd knows, per sharedd host: spool files (read through
spool_reader, cached by file identity) plus records received as D-Bus
Fired signals. Produces the folded share state of every host.

Fail safe, not open: only records withdraw access. A spool that cannot be
listed, a spool directory or host directory that disappears, or a host
directory that is suddenly empty (an empty file system mounted over the
spool, a network spool whose server went away) changes nothing: the host's
last verified state stands and the host is reported as unavailable until
its records can be read again."""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, List, Optional, Tuple

from sharedd.constants import PHASE_PERIODIC

from . import spool_reader
from .reconcile import current_epoch, fold

log = logging.getLogger(__name__)

#: records received over D-Bus kept per host (spool files are the durable copy)
MAX_BUS_RECORDS = 10000


def _meta(record: dict) -> dict:
    return {k: record[k] for k in ("epoch", "seq", "timestamp", "phase", "backend")}


class _Host:
    def __init__(self, name: str):
        self.name = name
        # file name -> (stat key, meta or None if rejected, record or None once superseded)
        self.files: Dict[str, Tuple[tuple, Optional[dict], Optional[dict]]] = {}
        self.bus: Dict[Tuple[str, int], dict] = {}
        self.bases: Dict[str, str] = {}   # backend -> file name of its newest periodic


class RecordSource:
    def __init__(self, spool_dir: str, allowed_uids):
        self.spool_dir = spool_dir
        self.allowed_uids = tuple(allowed_uids)
        self.hosts: Dict[str, _Host] = {}
        self.rejected = 0          # spool files refused so far (each logged once)
        self._lock = threading.Lock()
        # host -> its last verified folded state; hosts whose records mountd
        # relies on (set from its own mounts at start, and by every read)
        self.last: Dict[str, Dict[str, dict]] = {}
        self.known_hosts: set = set()
        # host ("" for the spool itself) -> why its records cannot be read now
        self.faults: Dict[str, str] = {}

    def add_bus_record(self, record: dict) -> None:
        """A validated record from a Fired signal."""
        with self._lock:
            host = self.hosts.setdefault(record["host"], _Host(record["host"]))
            host.bus[(record["epoch"], record["seq"])] = record
            while len(host.bus) > MAX_BUS_RECORDS:
                del host.bus[min(host.bus, key=lambda k: (host.bus[k]["timestamp"], k[1]))]

    def _fault(self, host: str, why: str) -> None:
        if self.faults.get(host) != why:
            log.error("%s; keeping the last verified state (%s)", why,
                      "of every host" if not host else f"of host {host}")
        self.faults[host] = why

    def _scan_host(self, host: _Host, host_dir: str) -> bool:
        """Read new files of one host; False if they cannot be read (or are
        all gone at once, which only a fault or a wiped spool does)."""
        try:
            paths = [rf.path for rf in spool_reader.list_records(host_dir, missing_ok=False)]
        except OSError as exc:
            self._fault(host.name, f"cannot list {host_dir}: {exc.strerror or exc}")
            return False
        if not paths and host.files:
            self._fault(host.name, f"{host_dir} is suddenly empty")
            return False
        present = {}
        for path in paths:
            name = os.path.basename(path)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            present[name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid)
        vanished = set(host.files) - set(present)
        if vanished & set(host.bases.values()):
            # The base of some superseded records went away: read them again.
            host.files.clear()
        for name in vanished:
            host.files.pop(name, None)
        for path in paths:
            name = os.path.basename(path)
            key = present.get(name)
            if key is None:
                continue
            cached = host.files.get(name)
            if cached is not None and cached[0] == key:
                continue
            try:
                record = spool_reader.read_record(path, self.allowed_uids)
            except spool_reader.SpoolFileRejected as exc:
                log.error("spool file rejected: %s", exc)
                self.rejected += 1
                host.files[name] = (key, None, None)
                continue
            host.files[name] = (key, _meta(record), record)
        return True

    def _records(self, host: _Host) -> List[dict]:
        metas = [m for _, m, _ in host.files.values() if m is not None]
        metas += [_meta(r) for r in host.bus.values()]
        epoch = current_epoch(metas)
        # Newest periodic per backend in the current epoch; older records of
        # that backend are superseded: drop their content (keep the stat key).
        base_seq: Dict[str, int] = {}
        host.bases = {}
        for name, (_, m, _) in host.files.items():
            if m and m["epoch"] == epoch and m["phase"] == PHASE_PERIODIC \
                    and m["seq"] >= base_seq.get(m["backend"], 0):
                base_seq[m["backend"]] = m["seq"]
                host.bases[m["backend"]] = name
        for r in host.bus.values():
            if r["epoch"] == epoch and r["phase"] == PHASE_PERIODIC:
                base_seq[r["backend"]] = max(base_seq.get(r["backend"], 0), r["seq"])
        out: Dict[Tuple[str, int], dict] = {}
        for name, (key, m, rec) in list(host.files.items()):
            if m is None or rec is None:
                continue
            if m["epoch"] != epoch or m["seq"] < base_seq.get(m["backend"], 0):
                host.files[name] = (key, m, None)
                continue
            out[(m["epoch"], m["seq"])] = rec
        for k, r in list(host.bus.items()):
            if r["epoch"] != epoch or r["seq"] < base_seq.get(r["backend"], 0):
                del host.bus[k]
                continue
            out.setdefault(k, r)
        # Metas of superseded files still count for the epoch decision.
        return list(out.values()) + [_superseded(m) for _, m, rec in
                                     host.files.values() if m and rec is None]

    def expect_hosts(self, hosts) -> None:
        """Hosts whose records mountd's existing mounts came from (at start):
        their absence from the spool is a fault, not a withdrawal."""
        self.known_hosts.update(hosts)

    def unavailable(self) -> Dict[str, str]:
        """host ("" for the whole spool) -> why its records cannot be read."""
        with self._lock:
            return dict(self.faults)

    def scan(self) -> Dict[str, Dict[str, dict]]:
        """Read new spool files; return host -> share id -> share (for an
        unreadable host: its last verified state)."""
        with self._lock:
            try:
                dirs: Optional[List[str]] = spool_reader.list_host_dirs(self.spool_dir,
                                                                        missing_ok=False)
                self.faults.pop("", None)
            except OSError as exc:
                if not self.known_hosts and isinstance(exc, FileNotFoundError):
                    dirs = []          # a spool that never had records: nothing to keep
                else:
                    self._fault("", f"cannot list spool directory {self.spool_dir}: "
                                    f"{exc.strerror or exc}")
                    dirs = None
            failed = set()
            if dirs is not None:
                for name in self.known_hosts - set(dirs):
                    self._fault(name, f"spool directory of host {name} is gone")
                    failed.add(name)
                for name in dirs:
                    host = self.hosts.setdefault(name, _Host(name))
                    if self._scan_host(host, os.path.join(self.spool_dir, name)):
                        self.faults.pop(name, None)
                    else:
                        failed.add(name)
            else:
                failed = set(self.known_hosts) | set(self.hosts)
            result: Dict[str, Dict[str, dict]] = {}
            for name, host in self.hosts.items():
                if name in failed:
                    continue
                result[name] = fold(self._records(host))[1]
                if host.files or host.bus:
                    self.known_hosts.add(name)
                    self.last[name] = result[name]
            for name in failed:
                if name in self.last:
                    result[name] = self.last[name]
            return result


def _superseded(meta: dict) -> dict:
    """A placeholder that only takes part in the epoch decision."""
    return dict(meta, phase="superseded", share=None)
