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

import dataclasses
import errno
import json
import logging
import os
import threading
from typing import Dict, List, Optional, Tuple

from sharedd import record as rec
from sharedd.constants import PHASE_PERIODIC
from sharedd.refusals import Lines
from sharedd.util import atomic_write

from . import spool_reader
from .reconcile import Folded, fold_records, record_key
from .trust import Trust, Untrusted

log = logging.getLogger(__name__)

#: records received over D-Bus kept per host (spool files are the durable copy)
MAX_BUS_RECORDS = 10000


def _view(record: dict) -> dict:
    """What folding needs of a record before deciding to read it whole."""
    view = {k: record[k] for k in ("epoch", "seq", "timestamp", "phase", "method", "backend")}
    view["part"], view["parts"] = record.get("part", 1), record.get("parts", 1)
    share = record.get("share")
    view["share"] = None if share is None else {"id": share["id"], "status": share["status"]}
    return view


@dataclasses.dataclass
class _File:
    key: tuple                   # (inode, size, mtime, ctime, uid, mode): changes mean re-read
    view: Optional[dict]         # None: rejected
    record: Optional[dict] = None   # the whole record, kept only while it decides something
    verified: bool = False       # validated in full and trusted


class _Host:
    def __init__(self, name: str):
        self.name = name
        self.files: Dict[str, _File] = {}
        self.bus: Dict[Tuple[str, int], dict] = {}      # verified on arrival
        self.used: set = set()   # file names the last fold decided something with


class Applied:
    """host -> (epoch, seq, timestamp) of the newest record applied, kept in
    state_path/applied.json (no path: in memory only)."""

    FILE = "applied.json"

    def __init__(self, state_path: str = ""):
        self.path = os.path.join(state_path, self.FILE) if state_path else ""
        self.hosts: Dict[str, dict] = {}
        self._failing: Optional[int] = None
        if self.path:
            try:
                with open(self.path, "rb") as f:
                    data = json.loads(f.read(1 << 20))
                self.hosts = {h: {"epoch": str(v["epoch"]), "seq": int(v["seq"]),
                                  "timestamp": str(v["timestamp"])}
                              for h, v in data.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                log.error("%s unreadable (%s): replay protection starts afresh", self.path, exc)

    def get(self, host: str) -> Optional[dict]:
        return self.hosts.get(host)

    def update(self, host: str, meta: dict) -> None:
        new = {k: meta[k] for k in ("epoch", "seq", "timestamp")}
        if self.hosts.get(host) == new:
            return
        self.hosts[host] = new
        if not self.path:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
            atomic_write(self.path, json.dumps(self.hosts, sort_keys=True).encode(), 0o644)
            if self._failing is not None:
                log.info("%s is written again", self.path)
            self._failing = None
        except OSError as exc:
            if self._failing != exc.errno:      # once per cause, not every pass
                log.error("cannot write %s: %s", self.path, exc.strerror or exc)
            self._failing = exc.errno or errno.EIO


class RecordSource:
    def __init__(self, spool_dir: str, allowed_uids, trust: Optional[Trust] = None,
                 state_path: str = ""):
        self.spool_dir = spool_dir
        # None: any owner (a network spool where only signatures count)
        self.allowed_uids = None if allowed_uids is None else tuple(allowed_uids)
        # default: every host's records count (tests of folding alone)
        self.trust = trust or Trust({}, True)
        self.applied = Applied(state_path)
        self.hosts: Dict[str, _Host] = {}
        self.rejected = 0          # spool files refused so far (each logged once, sparingly)
        self._rejections = Lines("spool file", logging.ERROR)
        self._lock = threading.Lock()
        # host -> its last verified folded state; hosts whose records mountd
        # relies on (set from its own mounts at start, and by every read)
        self.last: Dict[str, Dict[str, dict]] = {}
        self.known_hosts: set = set()
        # host ("" for the spool itself) -> why its records cannot be read now
        self.faults: Dict[str, str] = {}

    def add_bus_record(self, record: dict) -> bool:
        """A schema-valid record from a Fired signal; False if untrusted."""
        try:
            self.trust.check(record)
        except Untrusted as exc:
            log.error("record %s of host %s from the bus rejected: %s", record["seq"],
                      record["host"], exc)
            self.rejected += 1
            return False
        with self._lock:
            host = self.hosts.setdefault(record["host"], _Host(record["host"]))
            host.bus[(record["epoch"], record["seq"])] = record
            while len(host.bus) > MAX_BUS_RECORDS:
                del host.bus[min(host.bus, key=lambda k: record_key(host.bus[k]))]
        return True

    def _fault(self, host: str, why: str) -> None:
        if self.faults.get(host) != why:
            log.error("%s; keeping the last verified state (%s)", why,
                      "of every host" if not host else f"of host {host}")
        self.faults[host] = why

    def _scan_host(self, host: _Host, host_dir: str, quick: bool = False) -> bool:
        """Read new files of one host (order and fold fields only: records
        are verified when a fold needs them); False if they cannot be read
        (or are all gone at once, which only a fault or a wiped spool does)."""
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
            if quick and name in host.files:
                present[name] = host.files[name].key    # a quick scan reads new names only
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            # ctime too: a rewrite that restores the old mtime still changes it
            present[name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid,
                             st.st_mode)
        vanished = set(host.files) - set(present)
        if vanished & host.used:
            # A record that decided something went away: what it superseded
            # may count again, and its content was dropped: read all again.
            host.files.clear()
        for name in vanished:
            host.files.pop(name, None)
        no_key = host.name not in self.trust.keys and not self.trust.accept_unsigned
        for path in paths:
            name = os.path.basename(path)
            key = present.get(name)
            if key is None:
                continue
            cached = host.files.get(name)
            if cached is not None and cached.key == key:
                continue
            try:
                if no_key:       # nothing of this host can count: do not even read it
                    raise Untrusted(f"no trusted key for host {host.name!r} "
                                    "(trusted_keys, trusted_keys_dir)")
                record = spool_reader.read_record(path, self.allowed_uids, full=False)
            except (spool_reader.SpoolFileRejected, Untrusted) as exc:
                self._reject(host, name, key, exc)
                continue
            host.files[name] = _File(key, _view(record))
        return True

    def _reject(self, host: _Host, name: str, key: tuple, why: Exception) -> None:
        path = os.path.join(self.spool_dir, host.name, name)
        if self._rejections.take(host.name):     # (a spool writer may make thousands)
            log.error("spool file rejected: %s%s", "" if path in str(why) else f"{path}: ", why)
        self.rejected += 1
        host.files[name] = _File(key, None, None)

    def _load(self, host: _Host, name: str) -> Optional[dict]:
        """The whole record of one spool file, validated in full and trusted
        (read again if its content was dropped); None if it is rejected."""
        f = host.files[name]
        if f.view is None:
            return None
        if f.record is not None and f.verified:
            return f.record
        path = os.path.join(self.spool_dir, host.name, name)
        try:
            record = spool_reader.read_record(path, self.allowed_uids, full=False)
            if _view(record) != f.view:
                raise spool_reader.SpoolFileRejected(path, "changed while being read")
            rec.validate(record)
            self.trust.check(record)
        except (rec.RecordError, spool_reader.SpoolFileRejected, Untrusted) as exc:
            self._reject(host, name, f.key, exc)
            return None
        f.record, f.verified = record, True
        return record

    def _fold(self, host: _Host) -> Optional[Folded]:
        """Fold the host's records, reading and verifying in full those that
        decide something; None if they end before what was applied (a fault)."""
        applied = self.applied.get(host.name)

        def replayed(m: dict) -> bool:
            # another epoch, not newer than what was applied: an old epoch put back
            return applied is not None and m["epoch"] != applied["epoch"] \
                and record_key(m) <= record_key(applied)
        for name, f in list(host.files.items()):
            if f.view is not None and replayed(f.view):
                self._reject(host, name, f.key, Untrusted(
                    f"epoch {f.view['epoch']} is older than the applied epoch {applied['epoch']}"))
        for k in [k for k, r in host.bus.items() if replayed(r)]:
            del host.bus[k]
        views: List[dict] = []
        origin: Dict[int, str] = {}        # id(view) -> file name
        for name, f in host.files.items():
            if f.view is not None:
                origin[id(f.view)] = name
                views.append(f.view)
        views += host.bus.values()         # whole records, verified on arrival

        def load(view: dict) -> Optional[dict]:
            name = origin.get(id(view))
            return view if name is None else self._load(host, name)
        folded = fold_records(views, load)
        epoch = folded.epoch
        newest = next((v for v in sorted((v for v in views if v["epoch"] == epoch),
                                         key=lambda v: v["seq"], reverse=True)
                       if load(v) is not None), None)
        if newest is not None and applied is not None and newest["epoch"] == applied["epoch"] \
                and newest["seq"] < applied["seq"]:
            self._fault(host.name, f"the records of host {host.name} end at seq "
                                   f"{newest['seq']}, before seq {applied['seq']} which was "
                                   "applied (rolled back or removed)")
            return None
        if newest is not None:
            self.applied.update(host.name, newest)
        # Keep whole only the records that decide something now.
        host.used = set()
        for name, f in host.files.items():
            v = f.view
            if v is None or f.record is None:
                continue
            base = folded.bases.get(v["backend"])
            sid = (v["share"] or {}).get("id")
            if v["phase"] == PHASE_PERIODIC:
                keep = base is not None and v["seq"] in base and v["epoch"] == epoch
            else:
                keep = v["epoch"] == epoch and sid is not None and \
                    folded.latest.get(sid) == v["seq"]
            if keep:
                host.used.add(name)
            else:
                f.record = None
        for k, r in list(host.bus.items()):
            base = folded.bases.get(r["backend"])
            if r["epoch"] != epoch or (base is not None and r["seq"] < base[0]):
                del host.bus[k]
        return folded

    def expect_hosts(self, hosts) -> None:
        """Hosts whose records mountd's existing mounts came from (at start):
        their absence from the spool is a fault, not a withdrawal."""
        self.known_hosts.update(hosts)

    def unreadable(self, why: str) -> Dict[str, Dict[str, dict]]:
        """The spool cannot be reached at all (its mount failed): every
        host's last verified state stands."""
        with self._lock:
            self._fault("", why)
            return dict(self.last)

    def unavailable(self) -> Dict[str, str]:
        """host ("" for the whole spool) -> why its records cannot be read."""
        with self._lock:
            return dict(self.faults)

    def scan(self, quick: bool = False) -> Dict[str, Dict[str, dict]]:
        """Read new spool files; return host -> share id -> share (for an
        unreadable host: its last verified state). quick: look only at names
        not seen before (a network spool between full rescans)."""
        with self._lock:
            self._rejections.tick()     # (the pass runs in a thread: no timer)
            try:
                dirs: Optional[List[str]] = spool_reader.list_host_dirs(
                    self.spool_dir, missing_ok=False, allowed_uids=self.allowed_uids)
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
                    if not self._scan_host(host, os.path.join(self.spool_dir, name), quick):
                        failed.add(name)
            else:
                failed = set(self.known_hosts) | set(self.hosts)
            result: Dict[str, Dict[str, dict]] = {}
            for name, host in self.hosts.items():
                if name in failed:
                    continue
                folded = self._fold(host)
                if folded is None:
                    failed.add(name)
                    continue
                self.faults.pop(name, None)
                result[name] = folded.shares
                if host.files or host.bus:
                    self.known_hosts.add(name)
                    self.last[name] = result[name]
            for name in failed:
                if name in self.last:
                    result[name] = self.last[name]
            return result
