"""The records mountd knows, per sharedd host: spool files (read through
spool_reader, cached by file identity) plus records received as D-Bus
Fired signals. Produces the folded share state of every host."""

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

    def add_bus_record(self, record: dict) -> None:
        """A validated record from a Fired signal."""
        with self._lock:
            host = self.hosts.setdefault(record["host"], _Host(record["host"]))
            host.bus[(record["epoch"], record["seq"])] = record
            while len(host.bus) > MAX_BUS_RECORDS:
                del host.bus[min(host.bus, key=lambda k: (host.bus[k]["timestamp"], k[1]))]

    def _scan_host(self, host: _Host, host_dir: str) -> None:
        try:
            paths = [rf.path for rf in spool_reader.list_records(host_dir)]
        except OSError as exc:
            log.error("cannot list %s: %s", host_dir, exc)
            return
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

    def scan(self) -> Dict[str, Dict[str, dict]]:
        """Read new spool files; return host -> share id -> share."""
        with self._lock:
            try:
                dirs = spool_reader.list_host_dirs(self.spool_dir)
            except OSError as exc:
                log.error("cannot list spool directory %s: %s", self.spool_dir, exc)
                dirs = []
            seen = set()
            for name in dirs:
                seen.add(name)
                host = self.hosts.setdefault(name, _Host(name))
                self._scan_host(host, os.path.join(self.spool_dir, name))
            for name in list(self.hosts):
                if name not in seen:
                    self.hosts[name].files.clear()
                    if not self.hosts[name].bus:
                        del self.hosts[name]
            result = {}
            for name, host in self.hosts.items():
                result[name] = fold(self._records(host))[1]
            return result


def _superseded(meta: dict) -> dict:
    """A placeholder that only takes part in the epoch decision."""
    return dict(meta, phase="superseded", share=None)
