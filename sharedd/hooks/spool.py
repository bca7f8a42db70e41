"""The `spool` hook driver: every record becomes one JSON file.

Layout: <spool_dir>/<host_id>/<seq, 20 digits>-<phase>-<method>.json
(sharedd.record.file_name). A file is written under a name starting with '.'
in the same directory (a spare made ahead, or a new file), fsynced, then
renamed into place and the directory fsynced, so a reader that skips dot
names never sees a partial record. A
staged record (Hook.write_staged) is written and fsynced while the
transaction that took its seq commits, and renamed once that is done.

Several backends of one daemon write into the same host directory, each with
its own hook instance; they share one _HostSpool (lock + index) per directory.
The index lives in memory, is rebuilt by one directory scan when the first
hook for a directory starts, and carries what retention needs (seq, name,
phase, write time, and for periodic records the backend), so pruning never
re-reads the directory or parses records it already knows. Pruning looks at
the oldest records only (records are written in seq order) and keeps the
newest periodic record of each backend in a table: its cost per record does
not grow with the number of records kept.

Retention (documented in doc/spool-records.md):
* age: a record's age counts from when it was written to the spool (the
  file's mtime for records found at start); older than retention_seconds
  goes, 0 disables the age limit (oldest seq first: a record found at start
  whose mtime is older than that of an earlier seq goes when that one does);
* count: at most retention_count records stay, oldest seq removed first;
  0 disables the count limit;
* the newest periodic record of every backend is never removed (it counts
  toward retention_count), so a client can always converge from it.

A record for a new epoch (the state database was recreated and seq started
again) clears the records of the old epoch first: their larger sequence
numbers would otherwise sort after the new ones.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import record as rec
from ..errors import InvalidArgument, InvalidState
from ..util import fsync_dir
from .base import Hook, HookContext

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755
# Empty files made ahead for the records to come: creating a file allocates
# an inode, which waits behind a flush in progress on the file system (the
# state database commits while a record is written) and, on ext4 without a
# journal, scans past every recently deleted inode (retention deletes one
# record per record written). Made ahead, in a thread of their own, that is
# off the operation's path.
SPARE_PREFIX = ".spare-"
SPARE_TOKEN_BYTES = 8   # the name's random part: twice as many hex digits
SPARE_RE = re.compile(re.escape(SPARE_PREFIX) + f"[0-9a-f]{{{2 * SPARE_TOKEN_BYTES}}}")
SPARES_LOW = 4          # a refill starts when fewer are left
SPARES_BATCH = 16       # files made per refill
SPARES_RETRY = 60.0     # seconds without refills after one failed


def _now() -> float:
    """Wall clock for retention; a module function so tests can replace it."""
    return time.time()


class SpoolConflict(InvalidState):
    """The spool already holds a different record with this sequence number."""


@dataclasses.dataclass
class _Entry:
    seq: int
    name: str
    phase: str
    written: float                  # seconds since the epoch
    backend: Optional[str] = None   # periodic records only; None: not known yet
    epoch: Optional[str] = None     # known for records written by this process
    part: Tuple[int, int] = (1, 1)  # periodic records: (part, parts)


class _HostSpool:
    """One host directory: the lock, the in-memory index, writing and pruning."""

    def __init__(self, directory: str):
        self.directory = directory
        self.lock = threading.Lock()
        self.entries: Dict[int, _Entry] = {}
        self.seqs: List[int] = []        # sorted keys of entries
        self.epoch: Optional[str] = None
        self._epoch_known = False
        # backend -> seqs of its newest complete periodic state (every part);
        # None until first needed
        self._newest_periodic: Optional[Dict[str, range]] = None
        # seqs of periodic parts written after it (a state being written)
        self._partial: Dict[int, str] = {}
        self._spares: List[str] = []
        self._spare_lock = threading.Lock()
        self._refilling: Optional[threading.Thread] = None
        self._refill_after = 0.0         # monotonic time: no refill before (after a failure)
        with self.lock:
            self._prepare_dir()
            self._scan()

    # --- start-up ---------------------------------------------------------
    def _prepare_dir(self) -> None:
        os.makedirs(os.path.dirname(self.directory), mode=DIR_MODE, exist_ok=True)
        try:
            os.mkdir(self.directory, DIR_MODE)
        except FileExistsError:
            pass
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode):
            # A symlink here could send root's writes anywhere.
            raise InvalidState(f"spool directory {self.directory} is not a directory")
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_gid != 0):
            os.chown(self.directory, 0, 0, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.chmod(self.directory, DIR_MODE)

    def _scan(self) -> None:
        """Rebuild the index from the directory; drop leftover temp files.

        Only called while no write can be in progress in this process (the
        one writer per host directory), so every dot file is a crash leftover.
        """
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    # ours: "." + record file name + "." + a random suffix,
                    # or a spare
                    if (rec.FILE_NAME_RE.fullmatch(entry.name[1:].rpartition(".")[0])
                            or SPARE_RE.fullmatch(entry.name)) \
                            and entry.is_file(follow_symlinks=False):
                        log.info("removing leftover temporary spool file %s", entry.path)
                        _unlink(entry.path)
                    continue
                m = rec.FILE_NAME_RE.fullmatch(entry.name)
                if not m or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                self._add(_Entry(int(m.group(1)), entry.name, m.group(2), mtime))

    def _add(self, entry: _Entry) -> None:
        if entry.seq not in self.entries:
            bisect.insort(self.seqs, entry.seq)
        self.entries[entry.seq] = entry
        newest = self._newest_periodic
        if newest is not None and entry.phase == "periodic" and entry.backend:
            seqs = self._complete(entry)
            if seqs is not None and entry.seq > newest.get(entry.backend, range(0)).stop - 1:
                newest[entry.backend] = seqs
                # parts of older, never completed states of this backend are not kept
                self._partial = {q: b for q, b in self._partial.items()
                                 if b != entry.backend or q > entry.seq}
            elif seqs is None:
                self._partial[entry.seq] = entry.backend

    def _complete(self, last: _Entry) -> Optional[range]:
        """The seqs of the periodic state whose last part is `last`, if every
        part of it is here (parts are written in order, with consecutive seqs)."""
        part, parts = last.part
        if part != parts:
            return None
        seqs = range(last.seq - parts + 1, last.seq + 1)
        for seq in seqs[:-1]:
            e = self.entries.get(seq)
            if e is None or e.phase != "periodic" or e.part[1] != parts:
                return None
        return seqs

    def _remove(self, seq: int) -> None:
        self._partial.pop(seq, None)
        entry = self.entries.pop(seq)
        del self.seqs[bisect.bisect_left(self.seqs, seq)]
        _unlink(os.path.join(self.directory, entry.name))

    def _read_field(self, entry: _Entry, field: str) -> Any:
        """One field of a record found at start (callers cache it)."""
        raw = _read_regular(os.path.join(self.directory, entry.name), rec.MAX_RECORD_BYTES)
        try:
            data = json.loads(raw) if raw is not None else None
            return data.get(field) if isinstance(data, dict) else None
        except (ValueError, RecursionError):
            return None

    def _learn_periodic(self, entry: _Entry) -> None:
        """backend and part of a periodic record found at start."""
        raw = _read_regular(os.path.join(self.directory, entry.name), rec.MAX_RECORD_BYTES)
        try:
            data = json.loads(raw) if raw is not None else None
        except (ValueError, RecursionError):
            data = None
        data = data if isinstance(data, dict) else {}
        backend, part, parts = data.get("backend"), data.get("part", 1), data.get("parts", 1)
        entry.backend = backend if isinstance(backend, str) else ""
        if isinstance(part, int) and isinstance(parts, int) and 1 <= part <= parts:
            entry.part = (part, parts)

    def _current_epoch(self) -> Optional[str]:
        if not self._epoch_known:
            # The newest readable record found at start tells the epoch.
            for seq in reversed(self.seqs[-5:]):
                entry = self.entries[seq]
                epoch = entry.epoch or self._read_field(entry, "epoch")
                entry.epoch = epoch if isinstance(epoch, str) else None
                if entry.epoch:
                    self.epoch = entry.epoch
                    break
            self._epoch_known = True
        return self.epoch

    def last_seq(self, epoch: str) -> int:
        """The newest seq here if the spool is of this epoch (else 0)."""
        with self.lock:
            if not self.seqs or self._current_epoch() != epoch:
                return 0
            return self.seqs[-1]

    # --- writing ------------------------------------------------------------
    def write(self, record: Dict[str, Any], data: bytes, retention_seconds: int,
              retention_count: int, committed: Optional[Callable[[], bool]] = None
              ) -> Optional[str]:
        """Write data (record's file) and return its path. committed: the
        record is staged: written under its temporary name, then put in
        place only if committed() says its transaction is done (else None)."""
        name = rec.file_name(record)
        tmp = self._temp(name, data)
        placed = False
        try:
            if committed is not None and not committed():
                return None
            with self.lock:
                path, placed = self._place(record, name, tmp, data)
                if placed:
                    self._prune(retention_seconds, retention_count)
            if placed:
                self._want_spares()
            return path
        finally:
            if not placed:
                _unlink(tmp)

    def _temp(self, name: str, data: bytes) -> str:
        spare = self._take_spare()
        if spare is not None:
            fd = _open_spare(spare)
            if fd is None:
                # gone or replaced behind our back (the directory too,
                # perhaps): the others are not trusted either
                with self._spare_lock:
                    dropped, self._spares = self._spares, []
                for path in [spare] + dropped:
                    _unlink(path)
            else:
                try:
                    _write_fd(fd, data)
                except BaseException:
                    _unlink(spare)
                    raise
                return spare
        try:
            return _write_temp(self.directory, name, data)
        except FileNotFoundError:
            with self.lock:
                if not os.path.isdir(self.directory):
                    # Removed under us (an administrator cleaning up): start
                    # a fresh one, forget the old index.
                    log.warning("spool directory %s vanished; recreating it", self.directory)
                    self.entries.clear()
                    self.seqs.clear()
                    self._newest_periodic, self._partial = None, {}
                    with self._spare_lock:
                        self._spares.clear()
                    self._prepare_dir()
            return _write_temp(self.directory, name, data)

    # --- spare files ----------------------------------------------------------
    def _take_spare(self) -> Optional[str]:
        """An empty file made ahead (None if none is ready)."""
        with self._spare_lock:
            return self._spares.pop() if self._spares else None

    def _want_spares(self) -> None:
        """After a record is placed: refill in a thread if few are left.
        Never raises (the record is in place)."""
        with self._spare_lock:
            if len(self._spares) >= SPARES_LOW or self._refilling is not None \
                    or time.monotonic() < self._refill_after:
                return
            self._refilling = threading.Thread(target=self._refill, name="spool-spares",
                                               daemon=True)
            try:
                self._refilling.start()
            except RuntimeError as exc:      # no thread to be had: records make their own
                log.warning("spool %s: cannot start making spare files: %s", self.directory, exc)
                self._refilling = None
                self._refill_after = time.monotonic() + SPARES_RETRY

    def settle(self, timeout: float = 30.0) -> None:
        """Wait for a refill in progress (tests: a second writer of the
        directory, as a new process would be, must not race it)."""
        thread = self._refilling
        if thread is not None:
            thread.join(timeout)

    def _refill(self) -> None:
        made: List[str] = []
        try:
            for _ in range(SPARES_BATCH):
                path = os.path.join(self.directory,
                                    SPARE_PREFIX + secrets.token_hex(SPARE_TOKEN_BYTES))
                os.close(_create(path))
                made.append(path)
        except OSError as exc:
            # records are then made the usual way (and fail there, visibly)
            log.warning("spool %s: cannot make spare files: %s", self.directory, exc)
            with self._spare_lock:
                self._refill_after = time.monotonic() + SPARES_RETRY
        finally:
            with self._spare_lock:
                self._spares.extend(made)
                self._refilling = None

    def _place(self, record: Dict[str, Any], name: str, tmp: str,
               data: bytes) -> Tuple[str, bool]:
        """Under the lock: rename tmp into place (path, True), or find the
        same record there already (path, False: a retried write)."""
        path = os.path.join(self.directory, name)
        epoch = self._current_epoch()
        if epoch is not None and epoch != record["epoch"] and self.seqs:
            log.warning("spool %s: epoch changed from %s to %s (state database "
                        "recreated); removing %d records of the old epoch",
                        self.directory, epoch, record["epoch"], len(self.seqs))
            for seq in list(self.seqs):
                self._remove(seq)
            self._newest_periodic, self._partial = None, {}
        self.epoch = record["epoch"]
        known = self.entries.get(record["seq"])
        if known is not None and known.name != name:
            raise SpoolConflict(f"spool {self.directory}: sequence number {record['seq']}"
                                f" is already used by {known.name}")
        if os.path.lexists(path):
            if _same_content(path, data):
                return path, False
            raise SpoolConflict(f"spool {path} already exists with different content;"
                                " refusing to overwrite (sequence numbers must be unique)")
        os.rename(tmp, path)
        self._add(_Entry(record["seq"], name, record["phase"], _now(),
                         record["backend"] if record["phase"] == "periodic" else None,
                         record["epoch"], (record.get("part", 1), record.get("parts", 1))))
        fsync_dir(self.directory)
        return path, True

    # --- retention -------------------------------------------------------------
    def _protected(self) -> Set[int]:
        """Seqs of the newest complete periodic state of every backend."""
        if self._newest_periodic is None:      # once: records found at start
            for seq in self.seqs:
                entry = self.entries[seq]
                if entry.phase == "periodic" and entry.backend is None:
                    self._learn_periodic(entry)
            newest: Dict[str, range] = {}
            for seq in reversed(self.seqs):
                entry = self.entries[seq]
                if entry.phase != "periodic" or not entry.backend or entry.backend in newest:
                    continue
                seqs = self._complete(entry)
                if seqs is not None:
                    newest[entry.backend] = seqs
                else:
                    self._partial[seq] = entry.backend
            self._newest_periodic = newest
        return {seq for seqs in self._newest_periodic.values() for seq in seqs} | set(self._partial)

    def _prune(self, retention_seconds: int, retention_count: int) -> None:
        """Remove from the oldest end what is too old or over the count;
        the newest periodic record of each backend counts but stays."""
        cutoff = _now() - retention_seconds if retention_seconds > 0 else None
        excess = len(self.seqs) - retention_count if retention_count > 0 else 0
        protected: Optional[Set[int]] = None
        doomed: List[int] = []
        for seq in self.seqs:                  # oldest first; stops early
            aged = cutoff is not None and self.entries[seq].written < cutoff
            if not aged and excess <= 0:
                break
            if protected is None:
                protected = self._protected()
            if seq not in protected:
                doomed.append(seq)
                excess -= 1
        for seq in doomed:
            self._remove(seq)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_regular(path: str, limit: int) -> Optional[bytes]:
    """Up to limit + 1 bytes of a regular file; None for anything else
    (a FIFO or device planted in the spool must not block or act)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _same_content(path: str, data: bytes) -> bool:
    return _read_regular(path, len(data)) == data


def _create(path: str) -> int:
    """A new empty file, root's and mode FILE_MODE; its descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)     # not the group of a setgid dir
        os.fchmod(fd, FILE_MODE)    # whatever the umask
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    return fd


def _open_spare(path: str) -> Optional[int]:
    """A spare opened for writing, or None unless it is still what we made:
    an empty regular file of ours with one name (a FIFO must not block, and
    nothing else may end up in the spool)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != 0 or st.st_nlink != 1 \
            or st.st_uid != os.geteuid():
        os.close(fd)
        return None
    return fd


def _write_fd(fd: int, data: bytes) -> None:
    """data written at fd's start and fsynced; fd closed."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: str, name: str, data: bytes) -> str:
    """data in a new file of directory under a dot name (readers skip it),
    fsynced; its path."""
    tmp = os.path.join(directory, "." + name + "." + secrets.token_hex(4))
    fd = _create(tmp)
    try:
        _write_fd(fd, data)
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


_SPOOLS: Dict[str, _HostSpool] = {}
_SPOOLS_LOCK = threading.Lock()


def _host_spool(directory: str) -> _HostSpool:
    key = os.path.abspath(directory)
    with _SPOOLS_LOCK:
        spool = _SPOOLS.get(key)
        if spool is None:
            spool = _SPOOLS[key] = _HostSpool(key)
        return spool


class SpoolHook(Hook):
    """Writes pre, post and periodic records as spool files."""

    durable = True   # fsynced file and directory before the call returns
    stages = True    # the file is written while the transaction commits

    def __init__(self, backend_name: str, backend_config, context: HookContext):
        super().__init__(backend_name, backend_config, context)
        if not isinstance(context.host_id, str) or \
                not re.fullmatch(rec.HOST_ID_RE, context.host_id):
            raise InvalidArgument(f"spool hook: host id {context.host_id!r} may only use"
                                  " letters, digits, '.', '_' and '-'")
        if not context.spool_dir or not os.path.isabs(context.spool_dir):
            raise InvalidArgument(f"spool hook: spool_dir {context.spool_dir!r} is not"
                                  " an absolute path")
        self.directory = os.path.join(context.spool_dir, context.host_id)
        self._spool = _host_spool(self.directory)

    def write(self, record: Dict[str, Any],
              committed: Optional[Callable[[], bool]] = None) -> Optional[str]:
        """Write one record; return its path. Raises InvalidArgument for a
        record that does not validate, SpoolConflict for a reused seq.
        committed: see _HostSpool.write."""
        try:
            data = rec.dumps(record)
        except rec.RecordError as exc:
            raise InvalidArgument(f"spool hook: invalid record: {exc}") from None
        if record["host"] != self.context.host_id:
            raise InvalidArgument(f"spool hook: record for host {record['host']!r} in the"
                                  f" spool of {self.context.host_id!r}")
        if not rec.FILE_NAME_RE.fullmatch(rec.file_name(record)):
            raise InvalidArgument(f"spool hook: seq {record['seq']} does not fit the"
                                  " 20-digit file name")
        if len(data) > rec.MAX_RECORD_BYTES:
            # Readers refuse such files unread; fail here where it is visible.
            raise InvalidArgument(f"spool hook: record {rec.file_name(record)} is {len(data)}"
                                  f" bytes, more than {rec.MAX_RECORD_BYTES}")
        return self._spool.write(record, data, int(self.context.retention_seconds or 0),
                                 int(self.context.retention_count or 0), committed)

    def write_staged(self, record: Dict[str, Any], committed: Callable[[float], bool]) -> Any:
        # The file is written and fsynced while the transaction commits; the
        # rename that shows it waits for the commit.
        self.write(record, lambda: committed(float(self.config.hook_timeout)))
        return None

    def last_seq(self, epoch: str) -> int:
        return self._spool.last_seq(epoch)

    def execute_pre_hook(self, record: Dict[str, Any]) -> Any:
        self.write(record)
        return None

    def execute_post_hook(self, record: Dict[str, Any], pre_hook_data: Any) -> Optional[Dict[str, Any]]:
        self.write(record)
        return None

    def execute_periodic_hook(self, record: Dict[str, Any]) -> None:
        self.write(record)
