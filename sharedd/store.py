"""Persistent state in SQLite (WAL): shares, snapshots, access rules, and the
hook sequence counter.

Used from the event-loop thread only, but for views (Store.view): read-only
snapshots that a worker thread reads while the loop goes on writing. Every
state change is one transaction (`with store.tx():`); a hook record's
sequence number is taken inside the same transaction as the change it
reports (next_seq).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import threading
import urllib.parse
import uuid
import weakref
from collections import deque
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar,
                    cast)

from . import constants as C
from .errors import ConfigError, SharedError, StateLost
from .util import fsync_dir
from .models import (AccessRule, Replica, Share, ShareGroup, ShareGroupSnapshot, ShareNetwork,
                     ShareServer, Snapshot)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 6   # 2: rules have squash, anonuid, anongid; 3: share networks and servers;
#                      4: replicas; 5: snapshot policies, share groups; 6: snapshot access

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shares (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    protocol TEXT NOT NULL,
    size_gib INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    export_locations TEXT NOT NULL DEFAULT '[]',
    provider_location TEXT NOT NULL DEFAULT '',
    snapshot_id TEXT,
    driver_data TEXT NOT NULL DEFAULT '{}',
    -- the operation in flight (JSON), for start-up recovery
    task TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    share_id TEXT NOT NULL REFERENCES shares(id),
    size_gib INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    provider_location TEXT NOT NULL DEFAULT '',
    UNIQUE (share_id, name)
);
CREATE INDEX IF NOT EXISTS shares_by_location ON shares(backend, provider_location);
-- shares and GiB per (backend, status), kept by the triggers below: the
-- capacity check of every create and the status line read these rows
-- instead of aggregating every share
CREATE TABLE IF NOT EXISTS share_totals (
    backend TEXT NOT NULL,
    status TEXT NOT NULL,
    shares INTEGER NOT NULL,
    gib INTEGER NOT NULL,
    PRIMARY KEY (backend, status)
);
CREATE TABLE IF NOT EXISTS share_networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    subnet TEXT NOT NULL,
    attachment TEXT NOT NULL,
    allocation_range TEXT NOT NULL,
    gateway TEXT NOT NULL DEFAULT '',
    mtu INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS share_servers (
    id TEXT PRIMARY KEY,
    network_id TEXT NOT NULL REFERENCES share_networks(id),
    backend TEXT NOT NULL,
    status TEXT NOT NULL,
    addresses TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    details TEXT NOT NULL DEFAULT '{}',
    task TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS servers_by_network ON share_servers(network_id, backend);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    share_id TEXT NOT NULL REFERENCES shares(id),
    backend TEXT NOT NULL,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    state TEXT NOT NULL,
    style TEXT NOT NULL,
    last_sync INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    export_locations TEXT NOT NULL DEFAULT '[]',
    provider_location TEXT NOT NULL DEFAULT '',
    driver_data TEXT NOT NULL DEFAULT '{}',
    task TEXT NOT NULL DEFAULT '{}',
    UNIQUE (share_id, backend)
);
CREATE INDEX IF NOT EXISTS replicas_by_backend ON replicas(backend);
CREATE TABLE IF NOT EXISTS share_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    backend TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    source_group_snapshot_id TEXT
);
CREATE TABLE IF NOT EXISTS group_snapshots (
    id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL REFERENCES share_groups(id),
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (group_id, name)
);
CREATE TABLE IF NOT EXISTS snapshot_policies (
    share_id TEXT PRIMARY KEY REFERENCES shares(id),
    schedule TEXT NOT NULL DEFAULT '',
    retention TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY,
    share_id TEXT NOT NULL REFERENCES shares(id),
    access_type TEXT NOT NULL,
    access_to TEXT NOT NULL,
    access_level TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    squash TEXT NOT NULL DEFAULT '',
    anonuid INTEGER NOT NULL DEFAULT 65534,
    anongid INTEGER NOT NULL DEFAULT 65534,
    UNIQUE (share_id, access_type, access_to)
);
CREATE TABLE IF NOT EXISTS snapshot_rules (
    id TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id),
    share_id TEXT NOT NULL REFERENCES shares(id),
    access_type TEXT NOT NULL,
    access_to TEXT NOT NULL,
    access_level TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    squash TEXT NOT NULL DEFAULT '',
    anonuid INTEGER NOT NULL DEFAULT 65534,
    anongid INTEGER NOT NULL DEFAULT 65534,
    UNIQUE (snapshot_id, access_type, access_to)
);
CREATE INDEX IF NOT EXISTS snapshot_rules_by_share ON snapshot_rules(share_id);
"""

# Columns added after a table was first released: (table, column, definition).
# A database made before them gets them at open (their defaults fill old rows).
_ADDED_COLUMNS = [
    ("rules", "squash", "TEXT NOT NULL DEFAULT ''"),
    ("rules", "anonuid", "INTEGER NOT NULL DEFAULT 65534"),
    ("rules", "anongid", "INTEGER NOT NULL DEFAULT 65534"),
    ("shares", "share_server_id", "TEXT"),
    ("shares", "share_group_id", "TEXT"),
    ("snapshots", "group_snapshot_id", "TEXT"),
    ("snapshots", "export_locations", "TEXT NOT NULL DEFAULT '[]'"),
    ("snapshot_policies", "visibility", "TEXT NOT NULL DEFAULT ''"),
]

#: the columns ListShares (and a share server's Shares) filter by, each with
#: an index that lists its shares oldest first (a name is unique)
_LISTED_BY = (*(k for k in C.SHARE_FILTERS if k != "name"), "share_server_id")
#: the tables listed oldest first (Listing), and the columns a list of each
#: may pick its rows by
_LISTS = {"shares": {*_LISTED_BY, *C.SHARE_FILTERS, "id"}, "snapshots": {"share_id", "id"}}

_TOTAL_PLUS = ("INSERT INTO share_totals VALUES (NEW.backend, NEW.status, 1, NEW.size_gib) "
               "ON CONFLICT(backend, status) DO UPDATE SET shares = shares + 1, "
               "gib = gib + NEW.size_gib;")
_TOTAL_MINUS = ("UPDATE share_totals SET shares = shares - 1, gib = gib - OLD.size_gib "
                "WHERE backend = OLD.backend AND status = OLD.status;")
_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS share_totals_insert AFTER INSERT ON shares "
    f"BEGIN {_TOTAL_PLUS} END",
    f"CREATE TRIGGER IF NOT EXISTS share_totals_delete AFTER DELETE ON shares "
    f"BEGIN {_TOTAL_MINUS} END",
    f"CREATE TRIGGER IF NOT EXISTS share_totals_update AFTER UPDATE OF backend, status, size_gib "
    f"ON shares BEGIN {_TOTAL_MINUS} {_TOTAL_PLUS} END",
]


#: commits between two checkpoints of the WAL (a few MB of it; see _checkpoint),
#: and passes of one checkpoint at most while commits keep coming
CHECKPOINT_COMMITS = 256
CHECKPOINT_PASSES = 4
#: a WAL larger than this is checkpointed on the loop (the thread's never
#: caught up); one that starts over is cut back to this size
WAL_MAX_BYTES = 64 << 20
#: ... and a WAL larger than this is cut to nothing once no commit came for
#: WAL_TRIM_QUIET seconds (by the checkpoint thread: _trim)
WAL_KEEP_BYTES = 16 << 20
WAL_TRIM_QUIET = 60.0
#: read-only connections kept between two read()s: a new one costs the loop
#: 0.3-0.4 ms (it parses the schema), a kept one's BEGIN 0.01 ms (bench/state)
VIEW_CONNECTIONS = 2
#: statements remembered per listed table (each the id of a row it inserted,
#: updated or deleted): a list read aside is brought up to date from them
#: (changed_since); one read while more came is read aside again
ROW_CHANGES_KEPT = 4096


class _ViewConnection(sqlite3.Connection):
    """A view's connection (Store.read), which knows its open cursors: a
    statement left unfinished (a read that failed or stopped early) keeps
    its snapshot past ROLLBACK, and the connection, kept for the next view,
    would show that old state and hold back the WAL. Views read by
    execute() alone."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cursors: "weakref.WeakSet[sqlite3.Cursor]" = weakref.WeakSet()

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        # (the Store's read methods make every cursor by execute())
        cur = self.cursor()
        self.cursors.add(cur)
        return cur.execute(sql, parameters)

    def end_read(self) -> None:
        """Every statement reset, then the read transaction ended."""
        for cur in list(self.cursors):
            cur.close()
        super().execute("ROLLBACK")


class StoreError(ConfigError):
    """The state database cannot be used by this version."""


def new_id() -> str:
    return uuid.uuid4().hex


class Store:
    def __init__(self, path: str):
        self.path = path
        # Group commit (synced): commits made, and how many of them an fsync
        # of the WAL is known to have put on disk; the fsyncs have a thread
        # of their own (never queued behind driver calls or hook writes).
        self._commits = self._synced = 0
        # Statements run on each listed table (its version), and the last
        # rows they touched (changed_since).
        self._rows = {table: 0 for table in _LISTS}
        self._touched: Dict[str, "deque[str]"] = {
            table: deque(maxlen=ROW_CHANGES_KEPT) for table in _LISTS}
        self._sync: Optional["asyncio.Future[None]"] = None
        self._sync_error = ""   # why nothing commits any more (a failed write, closed)
        self._broken = False    # the disk failed us (see _break)
        # Set (on the event loop) once the disk failed us: sharedd exits for
        # systemd to restart it, and start-up reads what the disk holds.
        self.lost = asyncio.Event()
        self._syncer: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # Large reads of a view (read()) have their own thread too, not
        # queued behind driver calls: an open view holds back checkpoints.
        self._reader: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # ... and the connections read() keeps for its views, not in a read
        # (taken on the loop, given back by the reader thread: list.pop and
        # list.append are atomic, and _give_back's count then append is
        # safe only while that thread is the one giving back)
        self._idle_views: List[_ViewConnection] = []
        # One fdatasync at a time: the kernel reports a writeback error to
        # the first caller only, so a second one running beside it could
        # return 0 for pages that were lost.
        self._fsync_lock = threading.Lock()
        self._wal_fd = -1
        # The checkpoint thread's own connection, the commits made when the
        # last checkpoint began, and the checkpoint under way (_sync_wal).
        self._checkpointer: Optional[sqlite3.Connection] = None
        self._checkpointed = 0
        self._checkpoints: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._checkpointing: Optional["asyncio.Future[None]"] = None
        self._trim_timer: Optional[asyncio.TimerHandle] = None     # (see _trim)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open(path)
        except BaseException as exc:
            self.db.close()
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
            if isinstance(exc, (OSError, SharedError)):
                raise StoreError(f"{path}: cannot open the state database: {exc}") from None
            raise

    def _open(self, path: str) -> None:
        """Schema, pragmas and the WAL's descriptor (Store() closes the
        connection if this fails)."""
        self.db.row_factory = sqlite3.Row
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot use write-ahead logging (journal mode {mode})")
        # A commit is made durable by an fdatasync of the WAL (tx, synced),
        # which is what FULL adds to NORMAL in WAL mode. The WAL lives beside
        # the file a symlink leads to, and stays while this connection is
        # open: the one descriptor kept also sees every writeback error.
        self.db.execute("PRAGMA synchronous=NORMAL")
        # SQLite would copy the WAL into the database (and fsync it) inside
        # whichever COMMIT crosses 1,000 pages: 10-140 ms on the event loop
        # at 10,000 shares. A thread of the store's checkpoints instead.
        # Under steady commits the WAL grows past 16 MiB before a checkpoint
        # catches up; the COMMIT that then starts it over would cut it back
        # to journal_size_limit, an ftruncate on the loop of 1-20 ms (seen
        # by bench/loopsteps and strace). So it is cut there only past
        # WAL_MAX_BYTES, and otherwise when the store is quiet (_trim).
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_MAX_BYTES}")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.tx(durable=False):
            for statement in _DDL.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            made_by = int(self._meta("schema_version") or 0)
            if made_by > SCHEMA_VERSION:
                raise StoreError(f"{path}: made by a newer sharedd (schema {made_by}; this one "
                                 f"knows {SCHEMA_VERSION}); refusing to open it")
            for table, column, definition in _ADDED_COLUMNS:
                have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            self.db.execute("CREATE INDEX IF NOT EXISTS shares_by_group ON shares(share_group_id)")
            self.db.execute("CREATE INDEX IF NOT EXISTS snapshots_by_group "
                            "ON snapshots(group_snapshot_id)")
            # per operation, without reading every share: is a share being
            # made from this snapshot (snapshot deletes), which shares are
            # migrating (every create's capacity check while one is)
            self.db.execute("CREATE INDEX IF NOT EXISTS shares_by_source ON shares(snapshot_id)")
            self.db.execute("CREATE INDEX IF NOT EXISTS shares_migrating ON shares(status) "
                            f"WHERE status = '{C.STATUS_MIGRATING}'")
            # lists in the order they are listed, without a sort of every row
            # (ListShares, ListSnapshots: a call of any local user)
            self.db.execute("CREATE INDEX IF NOT EXISTS shares_by_age ON shares(created_at, id)")
            # ... and by what they are filtered by, oldest first: their ids are
            # read from the index alone (at 10,000 shares 4-8 ms of the loop,
            # not 9-11). A status change writes two more pages to the WAL (6,
            # not 4, per commit, and no time measured: BENCHMARKS.md), an
            # insert or delete two more index entries; protocol and server
            # change seldom. They replace the indexes by backend and by server
            # alone, which served the same lookups.
            for column in _LISTED_BY:
                self.db.execute(f"CREATE INDEX IF NOT EXISTS shares_by_{column}_age "
                                f"ON shares({column}, created_at, id)")
            self.db.execute("DROP INDEX IF EXISTS shares_by_backend")
            self.db.execute("DROP INDEX IF EXISTS shares_by_server")
            self.db.execute("CREATE INDEX IF NOT EXISTS snapshots_by_age "
                            "ON snapshots(created_at, id)")
            for statement in _TRIGGERS:
                self.db.execute(statement)
            # Recounted at every open (one scan): totals can never drift.
            self.db.execute("DELETE FROM share_totals")
            self.db.execute("INSERT INTO share_totals SELECT backend, status, COUNT(*), "
                            "SUM(size_gib) FROM shares GROUP BY backend, status")
            if self._meta("epoch") is None:
                # A new database: a new epoch tells clients that seq restarts.
                self._set_meta("epoch", new_id())
                self._set_meta("seq", "0")
            self._set_meta("schema_version", str(SCHEMA_VERSION))
        self.epoch: str = self._meta("epoch") or ""
        # The WAL exists now (that commit wrote it). A new database's and
        # WAL's names reach the disk here, not with a later checkpoint.
        self._wal_fd = os.open(os.path.realpath(path) + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        self._fsync_wal()
        fsync_dir(os.path.dirname(os.path.realpath(path)))
        self._synced = self._commits

    def close(self) -> None:
        # An operation still running (stop's wait timed out) gets a named
        # error from tx() and synced(), not one from a closed connection.
        with self._fsync_lock:     # (a failing fsync's reason is kept)
            self._sync_error = self._sync_error or \
                "the state database is closed (sharedd is stopping)"
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        # The last connection to close checkpoints the WAL and deletes it:
        # the kept views' go first (a read still running closes its own).
        self._close_idle_views()
        self.db.close()
        for pool in (self._syncer, self._reader, self._checkpoints):
            if pool is not None:
                pool.shutdown(wait=True)
        self._close_idle_views()    # (one given back as close() began)
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1

    def _view(self) -> "Store":
        """A read-only Store of the state as it is now, for read(): only its
        read methods and its connection (given back by read()) are usable.
        WAL: the view's snapshot is taken here, by its first read, and later
        commits of this Store are not seen; tx() refuses. An open view holds
        back WAL checkpoints."""
        view = Store.__new__(Store)
        view.path, view.epoch = self.path, self.epoch
        view._sync_error = "a view is read-only"
        try:
            view.db = self._idle_views.pop()
        except IndexError:
            view.db = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=ro", uri=True,
                                      isolation_level=None, check_same_thread=False,
                                      factory=_ViewConnection)
            view.db.row_factory = sqlite3.Row
        try:
            view.db.execute("BEGIN")
            view._meta("seq")
        except BaseException:
            view.db.close()
            raise
        return view

    def _close_idle_views(self) -> None:
        while self._idle_views:
            self._idle_views.pop().close()

    def _give_back(self, db: _ViewConnection) -> None:
        """A view's connection after its read (any thread): its read
        transaction ended (the WAL may be checkpointed past it), then kept
        for the next view, or closed."""
        try:
            db.end_read()
        except sqlite3.Error:
            db.close()
            return
        if len(self._idle_views) < VIEW_CONNECTIONS and not self._sync_error:
            self._idle_views.append(db)
        else:
            db.close()

    async def read(self, fn: Callable[["Store"], T]) -> T:
        """fn(view) in the store's reader thread, on a view of the state as
        it is when read() is called (it opens the view before its first
        await: await it right after the transaction it must follow); the
        view ends after, whatever happens."""
        if self._sync_error:
            raise StateLost(self._sync_error)
        view = self._view()
        try:
            if self._reader is None:
                self._reader = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="sharedd-state-read")
            read = asyncio.get_running_loop().run_in_executor(
                self._reader, _read_and_give_back, self, view, fn)
        except BaseException:
            view.db.close()
            raise
        # A cancelled caller leaves the read to finish: the thread ends the view.
        read.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(read)

    @contextlib.contextmanager
    def tx(self, durable: bool = True) -> Iterator[None]:
        """A transaction; durable: on disk when it returns (the WAL fsynced
        here, as synchronous=FULL would). Otherwise it survives a crash of
        the process (WAL) and reaches the disk with the next durable commit
        or synced(). Once the disk failed a write, a read or an fsync, nothing
        commits (StateLost)."""
        if self._sync_error:
            raise StateLost(self._sync_error)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except sqlite3.Error as exc:
            # A read or write error of the disk (not a full one): as final
            # as a failed fsync, since what reached the disk is unknown.
            if not _io_error(exc):
                raise
            self._break(str(exc))
            self._lost_if_failed()
            raise StateLost(self._sync_error) from None
        self._commits += 1
        if durable:
            upto = self._commits
            try:
                self._fsync_wal()
            finally:
                self._lost_if_failed()
            self._synced = max(self._synced, upto)

    def rows_version(self, table: str) -> int:
        """Moves with every statement that inserts, updates or deletes a row
        of a listed table (as it runs, in the step of its transaction: none
        is open across an await; one rolled back moves it too)."""
        return self._rows[table]

    def changed_since(self, table: str, version: int) -> Optional[Set[str]]:
        """The ids of the table's rows that statements touched since
        rows_version(table) was `version` (None: more than are remembered):
        a list read at that version is current once these are looked at
        again."""
        n = self._rows[table] - version
        touched = self._touched[table]
        if n > len(touched):
            return None
        return set(itertools.islice(reversed(touched), n))

    def _row_touched(self, table: str, row_id: str) -> None:
        self._rows[table] += 1
        self._touched[table].append(row_id)

    async def synced(self) -> None:
        """Wait until every commit made so far is on disk. One fsync of the
        WAL, in the store's own thread, serves every commit made before it
        starts (a group commit): the event loop is not held by the disk, and
        concurrent operations share the wait. A failed fsync is final (the
        kernel may have dropped the pages): StateLost now and ever after,
        and no more commits, until sharedd is restarted and reads what the
        disk holds."""
        want = self._commits
        while True:
            if self._sync_error:
                raise StateLost(self._sync_error)
            if self._synced >= want:
                return
            if self._sync is None or self._sync.done():   # (one cancelled before it ran)
                self._sync = asyncio.ensure_future(self._sync_wal(self._commits))
                # read here if every waiter was cancelled meanwhile
                self._sync.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.shield(self._sync)

    async def _sync_wal(self, upto: int) -> None:
        """One fsync covering the first upto commits, in the store's thread;
        then, every CHECKPOINT_COMMITS commits, a checkpoint."""
        try:
            if self._syncer is None:
                self._syncer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="sharedd-wal-sync")
            await asyncio.get_running_loop().run_in_executor(self._syncer, self._fsync_wal)
            self._synced = max(self._synced, upto)
        finally:
            self._sync = None
            self._lost_if_failed()
        if self._sync_error or self._checkpointing is not None or \
                upto - self._checkpointed < CHECKPOINT_COMMITS:
            return               # (closed meanwhile; one under way; not due)
        self._checkpointed = upto
        if os.fstat(self._wal_fd).st_size > WAL_MAX_BYTES:
            # The thread's checkpoints never caught up (writes without a
            # pause): one here, between two commits, always does; the next
            # commit then starts the WAL over. It holds the loop, rarely.
            log.info("state database WAL over %d MiB: checkpoint on the loop",
                     WAL_MAX_BYTES >> 20)
            self._passive(self.db, 1)
            self._lost_if_failed()
        else:
            if self._checkpoints is None:
                self._checkpoints = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="sharedd-wal-checkpoint")
            self._checkpointing = asyncio.get_running_loop().run_in_executor(
                self._checkpoints, self._checkpoint)
            self._checkpointing.add_done_callback(self._checkpoint_done)

    def _checkpoint(self) -> None:
        """In a thread of its own (the fsyncs go on meanwhile): what the WAL
        holds copied into the database. Commits go on meanwhile, so it
        passes again while it has not caught up: the WAL starts over only
        once a checkpoint has copied it all."""
        if self._sync_error:
            return
        if self._checkpointer is None:
            try:
                self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                     check_same_thread=False)
                # the WAL fsynced before pages are copied, the database after
                self._checkpointer.execute("PRAGMA synchronous=FULL")
                # its TRUNCATE (_truncate) never waits for readers while it
                # holds the write lock (PASSIVE never waits anyway)
                self._checkpointer.execute("PRAGMA busy_timeout=0")
            except sqlite3.Error as exc:
                log.warning("cannot open the state database to checkpoint it: %s", exc)
                return
        self._passive(self._checkpointer, CHECKPOINT_PASSES)

    def _passive(self, db: sqlite3.Connection, passes: int) -> bool:
        """PASSIVE checkpoints on db (they wait for no reader or writer and
        copy what they can), until one copied it all; whether one did."""
        for _ in range(passes):
            done = self._wal_checkpoint(db, "PASSIVE")
            if done is None or done[0]:
                return False
            if done[2] >= done[1]:
                return True
        return False

    def _wal_checkpoint(self, db: sqlite3.Connection, mode: str) -> Optional[Tuple[int, int, int]]:
        """A checkpoint: (busy, frames in the WAL, frames copied), or None if
        it failed. One the disk fails breaks the store, like any failed write."""
        try:
            busy, frames, copied = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            return int(busy), int(frames), int(copied)
        except sqlite3.Error as exc:
            if not _io_error(exc):
                log.warning("checkpoint of the state database failed: %s", exc)
                return None
            with self._fsync_lock:
                self._break(str(exc))
            return None

    def _checkpoint_done(self, done: "asyncio.Future[None]") -> None:
        self._checkpointing = None
        if not done.cancelled() and done.exception() is not None:
            log.error("checkpoint of the state database failed: %r", done.exception())
        self._lost_if_failed()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        if not self._sync_error:
            self._trim_timer = asyncio.get_running_loop().call_later(
                WAL_TRIM_QUIET, self._trim, self._commits)

    def _trim(self, seen: int) -> None:
        """On the loop, WAL_TRIM_QUIET seconds after a checkpoint (or after
        its own last look): if no commit came since, a WAL over
        WAL_KEEP_BYTES is cut to nothing, in the checkpoint thread
        (_truncate). It waits for no reader or writer (busy_timeout 0: busy,
        it is tried again later); a commit that comes while it holds the
        write lock waits, on the loop, for SQLite's busy handler's next look
        (1-10 ms), once."""
        self._trim_timer = None
        if self._sync_error or self._checkpointing is not None:
            return                     # (closed; the checkpoint's end re-arms)
        loop = asyncio.get_running_loop()
        if self._commits != seen:
            self._trim_timer = loop.call_later(WAL_TRIM_QUIET, self._trim, self._commits)
            return
        if os.fstat(self._wal_fd).st_size <= WAL_KEEP_BYTES:
            return
        assert self._checkpoints is not None     # (a checkpoint ran before)
        self._checkpointing = loop.run_in_executor(self._checkpoints, self._truncate, seen)
        self._checkpointing.add_done_callback(self._checkpoint_done)

    def _truncate(self, seen: int) -> None:
        """In the checkpoint thread (_trim). TRUNCATE holds the write lock
        while it copies what is left, fsyncs the database and cuts the WAL:
        so it runs only once a PASSIVE checkpoint (no lock) copied it all and
        no commit came since, and all it then does under the lock is the cut."""
        if self._sync_error or self._checkpointer is None:
            return
        if self._passive(self._checkpointer, 1) and self._commits == seen:
            done = self._wal_checkpoint(self._checkpointer, "TRUNCATE")
            log.debug("state database WAL cut to nothing: %s", done)
        # (otherwise tried again WAL_TRIM_QUIET later)

    def _lost_if_failed(self) -> None:
        if self._broken:
            self.lost.set()

    @property
    def failure(self) -> str:
        """Why the disk failed us ("" while it has not; see lost)."""
        return self._sync_error if self._broken else ""

    def _fsync_wal(self) -> None:
        """fdatasync the WAL (thread-safe). A failure is kept: see synced()."""
        with self._fsync_lock:
            if self._sync_error:
                raise StateLost(self._sync_error)
            try:
                os.fdatasync(self._wal_fd)
            except OSError as exc:
                self._break(str(exc))
                raise StateLost(self._sync_error) from None

    def _rollback(self) -> None:
        """After a failed statement or COMMIT. SQLite has rolled back by
        itself after an I/O error or a full disk; a ROLLBACK the disk fails
        breaks the store (the first error is the one raised)."""
        if not self.db.in_transaction:
            return
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if not _io_error(exc):
                raise
            self._break(str(exc))
            self._lost_if_failed()

    def _break(self, why: str) -> None:
        """The disk failed a write or a read (any thread): nothing commits
        any more; the loop's caller then sets lost (_lost_if_failed)."""
        self._broken = True
        self._sync_error = f"writing the state database to disk failed ({why}); restart sharedd"
        log.critical("%s", self._sync_error)

    def _meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def next_seq(self) -> int:
        """Take the next hook sequence number (call inside tx())."""
        assert self.db.in_transaction, "next_seq outside a transaction"
        seq = int(self._meta("seq") or 0) + 1
        self._set_meta("seq", str(seq))
        return seq

    def last_seq(self) -> int:
        return int(self._meta("seq") or 0)

    def raise_seq(self, seq: int) -> bool:
        """Never hand out seq again: a durable hook holds it (a power cut
        lost the commit that took it). True if the counter moved."""
        with self.tx():
            if seq <= self.last_seq():
                return False
            self._set_meta("seq", str(seq))
            return True

    # --- shares --------------------------------------------------------------
    @staticmethod
    def _share(row: sqlite3.Row) -> Share:
        return Share(id=row["id"], name=row["name"], backend=row["backend"],
                     protocol=row["protocol"], size_gib=row["size_gib"], status=row["status"],
                     created_at=row["created_at"], description=row["description"],
                     metadata=json.loads(row["metadata"]),
                     export_locations=json.loads(row["export_locations"]),
                     provider_location=row["provider_location"], snapshot_id=row["snapshot_id"],
                     driver_data=json.loads(row["driver_data"]),
                     share_server_id=row["share_server_id"],
                     share_group_id=row["share_group_id"])

    def insert_share(self, s: Share, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute(
            "INSERT INTO shares(id, name, backend, protocol, size_gib, status, created_at, description,"
            " metadata, export_locations, provider_location, snapshot_id, driver_data, task,"
            " share_server_id, share_group_id) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (s.id, s.name, s.backend, s.protocol, s.size_gib, s.status, s.created_at, s.description,
             json.dumps(s.metadata), json.dumps(s.export_locations), s.provider_location,
             s.snapshot_id, json.dumps(s.driver_data), json.dumps(task or {}), s.share_server_id,
             s.share_group_id))
        self._row_touched("shares", s.id)

    def update_share(self, s: Share, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute(
            "UPDATE shares SET backend=?, size_gib=?, status=?, export_locations=?,"
            " provider_location=?, driver_data=?, task=? WHERE id=?",
            (s.backend, s.size_gib, s.status, json.dumps(s.export_locations), s.provider_location,
             json.dumps(s.driver_data), json.dumps(task or {}), s.id))
        self._row_touched("shares", s.id)

    def delete_share(self, share_id: str) -> None:
        self.db.execute("DELETE FROM snapshot_policies WHERE share_id=?", (share_id,))
        self.db.execute("DELETE FROM replicas WHERE share_id=?", (share_id,))
        self.db.execute("DELETE FROM rules WHERE share_id=?", (share_id,))
        for (snapshot_id,) in self.db.execute("DELETE FROM snapshots WHERE share_id=? RETURNING id",
                                              (share_id,)).fetchall():
            self._row_touched("snapshots", snapshot_id)
        self.db.execute("DELETE FROM shares WHERE id=?", (share_id,))
        self._row_touched("shares", share_id)

    def get_share(self, share_id: str) -> Optional[Share]:
        row = self.db.execute("SELECT * FROM shares WHERE id=?", (share_id,)).fetchone()
        return self._share(row) if row else None

    def share_status(self, share_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM shares WHERE id=?", (share_id,)).fetchone()
        return row[0] if row else None

    def count_shares_by_status(self) -> Dict[str, int]:
        return dict(self.db.execute("SELECT status, SUM(shares) FROM share_totals GROUP BY status "
                                    "HAVING SUM(shares) > 0").fetchall())

    def tallies(self) -> Dict[str, List[Tuple[str, str, int]]]:
        """(backend, status or state, count) of shares, snapshots and rules,
        each by one aggregate query (the metrics)."""
        return {
            "shares": self.db.execute("SELECT backend, status, shares FROM share_totals "
                                      "WHERE shares > 0 ORDER BY 1, 2").fetchall(),
            "snapshots": self.db.execute(
                "SELECT s.backend, n.status, COUNT(*) FROM snapshots n JOIN shares s "
                "ON n.share_id = s.id GROUP BY 1, 2 ORDER BY 1, 2").fetchall(),
            "rules": self.db.execute(
                "SELECT s.backend, r.state, COUNT(*) FROM rules r JOIN shares s "
                "ON r.share_id = s.id GROUP BY 1, 2 ORDER BY 1, 2").fetchall(),
        }

    def share_sizes(self) -> List[Tuple[str, str, str, int]]:
        """(id, name, backend, size GiB) of every share."""
        return self.db.execute("SELECT id, name, backend, size_gib FROM shares "
                               "ORDER BY backend, name").fetchall()

    def backend_totals(self, backend: str) -> Tuple[int, int]:
        """(shares, provisioned GiB) of a backend, without loading the shares."""
        count, total = self.db.execute("SELECT COALESCE(SUM(shares), 0), COALESCE(SUM(gib), 0) "
                                       "FROM share_totals WHERE backend=?", (backend,)).fetchone()
        return int(count), int(total)

    def gib_arriving(self, backend: str) -> int:
        """GiB of shares being migrated to backend: counted against its room
        from the start of the copy (they count for their source until the
        switch). The shares are read only while some migrate (the totals say)."""
        total = 0
        migrating = self.db.execute("SELECT COALESCE(SUM(shares), 0) FROM share_totals "
                                    "WHERE status=?", (C.STATUS_MIGRATING,)).fetchone()[0]
        if not migrating:
            return 0
        for size, task in self.db.execute("SELECT size_gib, task FROM shares "
                                          f"WHERE status = '{C.STATUS_MIGRATING}'"):
            if json.loads(task).get("dest") == backend:
                total += int(size)
        return total

    def share_task(self, share_id: str) -> Dict[str, Any]:
        row = self.db.execute("SELECT task FROM shares WHERE id=?", (share_id,)).fetchone()
        task: Dict[str, Any] = json.loads(row[0]) if row else {}
        return task

    def find_share(self, name: str) -> Optional[Share]:
        row = self.db.execute("SELECT * FROM shares WHERE name=?", (name,)).fetchone()
        return self._share(row) if row else None

    def share_at(self, backend: str, provider_location: str) -> Optional[Share]:
        """The share of a backend that holds this provider location, if any."""
        row = self.db.execute("SELECT * FROM shares WHERE backend=? AND provider_location=?",
                              (backend, provider_location)).fetchone()
        return self._share(row) if row else None

    def shares(self, backend: Optional[str] = None) -> List[Share]:
        if backend is None:
            rows = self.db.execute("SELECT * FROM shares ORDER BY created_at, id")
        else:
            rows = self.db.execute("SELECT * FROM shares WHERE backend=? ORDER BY created_at, id", (backend,))
        return [self._share(r) for r in rows]

    def shares_in(self, status: str) -> List[Share]:
        """The shares in one status, oldest first (by index)."""
        return [self._share(r) for r in self._listed("shares", "*", {"status": status}, -1)]

    def share_counts(self) -> Dict[str, int]:
        """backend -> its number of shares (from the totals, no share read)."""
        return dict(self.db.execute("SELECT backend, SUM(shares) FROM share_totals "
                                    "GROUP BY backend HAVING SUM(shares) > 0").fetchall())

    def share_ids(self, *, limit: int = -1, **equal: str) -> List[str]:
        """Ids of the shares whose columns equal the given values, oldest first
        (nothing but ids is read, whatever the number of shares),
        at most limit of them (-1: all)."""
        return self.list_ids("shares", limit=limit, **equal)

    # --- lists (ListShares, ListSnapshots) ------------------------------------
    def list_ids(self, table: str, *, limit: int = -1, **equal: str) -> List[str]:
        """Ids of the table's rows whose columns equal the given values,
        oldest first, at most limit of them (-1: all)."""
        cur = self._listed(table, "id", equal, limit)
        cur.row_factory = None            # (tuples: a third faster than Rows)
        return [r[0] for r in cur]

    def list_keys(self, table: str, **equal: str) -> List[Tuple[int, str]]:
        """list_ids() with the order's key of each: (created_at, id)."""
        cur = self._listed(table, "created_at, id", equal, -1)
        cur.row_factory = None
        return cur.fetchall()

    def list_key(self, table: str, row_id: str, **equal: str) -> Optional[Tuple[int, str]]:
        """The row's (created_at, id) if it is one list_ids(table, **equal) lists."""
        row = self._listed(table, "created_at, id", {**equal, "id": row_id}, 1).fetchone()
        return (row[0], row[1]) if row else None

    def _listed(self, table: str, columns: str, equal: Dict[str, str],
                limit: int) -> sqlite3.Cursor:
        assert set(equal) <= _LISTS[table]
        where = " AND ".join(f"{k}=?" for k in sorted(equal)) or "1"
        return self.db.execute(f"SELECT {columns} FROM {table} WHERE {where} "
                               "ORDER BY created_at, id LIMIT ?",
                               (*(equal[k] for k in sorted(equal)), limit))

    # --- share networks and servers ---------------------------------------------
    @staticmethod
    def _network(row: sqlite3.Row) -> ShareNetwork:
        return ShareNetwork(id=row["id"], name=row["name"], subnet=row["subnet"],
                            attachment=json.loads(row["attachment"]),
                            allocation_range=row["allocation_range"], gateway=row["gateway"],
                            mtu=row["mtu"], created_at=row["created_at"])

    def insert_network(self, n: ShareNetwork) -> None:
        self.db.execute(
            "INSERT INTO share_networks(id, name, subnet, attachment, allocation_range, gateway,"
            " mtu, created_at) VALUES(?,?,?,?,?,?,?,?)",
            (n.id, n.name, n.subnet, json.dumps(n.attachment, sort_keys=True), n.allocation_range,
             n.gateway, n.mtu, n.created_at))

    def delete_network(self, network_id: str) -> None:
        self.db.execute("DELETE FROM share_networks WHERE id=?", (network_id,))

    def get_network(self, network_id: str) -> Optional[ShareNetwork]:
        row = self.db.execute("SELECT * FROM share_networks WHERE id=?", (network_id,)).fetchone()
        return self._network(row) if row else None

    def find_network(self, name: str) -> Optional[ShareNetwork]:
        row = self.db.execute("SELECT * FROM share_networks WHERE name=?", (name,)).fetchone()
        return self._network(row) if row else None

    def networks(self) -> List[ShareNetwork]:
        rows = self.db.execute("SELECT * FROM share_networks ORDER BY created_at, id")
        return [self._network(r) for r in rows]

    @staticmethod
    def _server(row: sqlite3.Row) -> ShareServer:
        return ShareServer(id=row["id"], network_id=row["network_id"], backend=row["backend"],
                           status=row["status"], addresses=json.loads(row["addresses"]),
                           created_at=row["created_at"], details=json.loads(row["details"]))

    def insert_server(self, s: ShareServer, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute(
            "INSERT INTO share_servers(id, network_id, backend, status, addresses, created_at,"
            " details, task) VALUES(?,?,?,?,?,?,?,?)",
            (s.id, s.network_id, s.backend, s.status, json.dumps(s.addresses), s.created_at,
             json.dumps(s.details), json.dumps(task or {})))

    def update_server(self, s: ShareServer, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute("UPDATE share_servers SET status=?, addresses=?, details=?, task=? "
                        "WHERE id=?", (s.status, json.dumps(s.addresses), json.dumps(s.details),
                                      json.dumps(task or {}), s.id))

    def delete_server(self, server_id: str) -> None:
        self.db.execute("DELETE FROM share_servers WHERE id=?", (server_id,))

    def get_server(self, server_id: str) -> Optional[ShareServer]:
        row = self.db.execute("SELECT * FROM share_servers WHERE id=?", (server_id,)).fetchone()
        return self._server(row) if row else None

    def server_status(self, server_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM share_servers WHERE id=?",
                              (server_id,)).fetchone()
        return row[0] if row else None

    def server_task(self, server_id: str) -> Dict[str, Any]:
        row = self.db.execute("SELECT task FROM share_servers WHERE id=?", (server_id,)).fetchone()
        task: Dict[str, Any] = json.loads(row[0]) if row else {}
        return task

    def servers(self, network_id: Optional[str] = None,
                backend: Optional[str] = None) -> List[ShareServer]:
        where, args = [], []
        for column, value in (("network_id", network_id), ("backend", backend)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        rows = self.db.execute("SELECT * FROM share_servers WHERE " + (" AND ".join(where) or "1")
                               + " ORDER BY created_at, id", tuple(args))
        return [self._server(r) for r in rows]

    def count_server_shares(self, server_id: str) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM shares WHERE share_server_id=?",
                              (server_id,)).fetchone()
        return int(row[0])

    # --- replicas ----------------------------------------------------------------
    @staticmethod
    def _replica(row: sqlite3.Row) -> Replica:
        return Replica(id=row["id"], share_id=row["share_id"], backend=row["backend"],
                       role=row["role"], status=row["status"], state=row["state"],
                       style=row["style"], last_sync=row["last_sync"],
                       created_at=row["created_at"],
                       export_locations=json.loads(row["export_locations"]),
                       provider_location=row["provider_location"],
                       driver_data=json.loads(row["driver_data"]))

    def insert_replica(self, r: Replica, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute(
            "INSERT INTO replicas(id, share_id, backend, role, status, state, style, last_sync,"
            " created_at, export_locations, provider_location, driver_data, task)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.share_id, r.backend, r.role, r.status, r.state, r.style, r.last_sync,
             r.created_at, json.dumps(r.export_locations), r.provider_location,
             json.dumps(r.driver_data), json.dumps(task or {})))

    def update_replica(self, r: Replica, task: Optional[Dict[str, Any]] = None) -> None:
        self.db.execute(
            "UPDATE replicas SET backend=?, role=?, status=?, state=?, style=?, last_sync=?,"
            " export_locations=?, provider_location=?, driver_data=?, task=? WHERE id=?",
            (r.backend, r.role, r.status, r.state, r.style, r.last_sync,
             json.dumps(r.export_locations), r.provider_location, json.dumps(r.driver_data),
             json.dumps(task or {}), r.id))

    def delete_replica(self, replica_id: str) -> None:
        self.db.execute("DELETE FROM replicas WHERE id=?", (replica_id,))

    def get_replica(self, replica_id: str) -> Optional[Replica]:
        row = self.db.execute("SELECT * FROM replicas WHERE id=?", (replica_id,)).fetchone()
        return self._replica(row) if row else None

    def replica_status(self, replica_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM replicas WHERE id=?", (replica_id,)).fetchone()
        return row[0] if row else None

    def replica_task(self, replica_id: str) -> Dict[str, Any]:
        row = self.db.execute("SELECT task FROM replicas WHERE id=?", (replica_id,)).fetchone()
        task: Dict[str, Any] = json.loads(row[0]) if row else {}
        return task

    def replicas(self, share_id: Optional[str] = None) -> List[Replica]:
        """A share's replicas (every replica if None), the active first."""
        order = "ORDER BY role = 'replica', created_at, id"
        if share_id is None:
            rows = self.db.execute(f"SELECT * FROM replicas {order}")
        else:
            rows = self.db.execute(f"SELECT * FROM replicas WHERE share_id=? {order}",
                                   (share_id,))
        return [self._replica(r) for r in rows]

    def replica_ids(self, share_id: str) -> List[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM replicas WHERE share_id=? "
                                              "ORDER BY created_at, id", (share_id,))]

    def replicated_share_ids(self) -> List[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT share_id FROM replicas "
                                              "ORDER BY share_id")]

    # --- snapshots -------------------------------------------------------------
    @staticmethod
    def _snapshot(row: sqlite3.Row) -> Snapshot:
        return Snapshot(id=row["id"], name=row["name"], share_id=row["share_id"],
                        size_gib=row["size_gib"], status=row["status"],
                        created_at=row["created_at"], provider_location=row["provider_location"],
                        group_snapshot_id=row["group_snapshot_id"],
                        export_locations=json.loads(row["export_locations"]))

    def insert_snapshot(self, s: Snapshot) -> None:
        self.db.execute(
            "INSERT INTO snapshots(id, name, share_id, size_gib, status, created_at, provider_location,"
            " group_snapshot_id) VALUES(?,?,?,?,?,?,?,?)",
            (s.id, s.name, s.share_id, s.size_gib, s.status, s.created_at, s.provider_location,
             s.group_snapshot_id))
        self._row_touched("snapshots", s.id)

    def update_snapshot(self, s: Snapshot) -> None:
        self.db.execute("UPDATE snapshots SET status=?, provider_location=?, size_gib=?, "
                        "export_locations=? WHERE id=?",
                        (s.status, s.provider_location, s.size_gib,
                         json.dumps(list(s.export_locations)), s.id))
        self._row_touched("snapshots", s.id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
        self._row_touched("snapshots", snapshot_id)

    def get_snapshot(self, snapshot_id: str) -> Optional[Snapshot]:
        row = self.db.execute("SELECT * FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return self._snapshot(row) if row else None

    def snapshot_status(self, snapshot_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return row[0] if row else None

    # --- share groups and their snapshots ---------------------------------------
    @staticmethod
    def _group(row: sqlite3.Row) -> ShareGroup:
        return ShareGroup(id=row["id"], name=row["name"], backend=row["backend"],
                          status=row["status"], created_at=row["created_at"],
                          source_group_snapshot_id=row["source_group_snapshot_id"])

    def insert_group(self, g: ShareGroup) -> None:
        self.db.execute("INSERT INTO share_groups VALUES(?,?,?,?,?,?)",
                        (g.id, g.name, g.backend, g.status, g.created_at,
                         g.source_group_snapshot_id))

    def update_group(self, g: ShareGroup) -> None:
        self.db.execute("UPDATE share_groups SET status=? WHERE id=?", (g.status, g.id))

    def delete_group(self, group_id: str) -> None:
        self.db.execute("DELETE FROM share_groups WHERE id=?", (group_id,))

    def get_group(self, group_id: str) -> Optional[ShareGroup]:
        row = self.db.execute("SELECT * FROM share_groups WHERE id=?", (group_id,)).fetchone()
        return self._group(row) if row else None

    def group_status(self, group_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM share_groups WHERE id=?", (group_id,)).fetchone()
        return row[0] if row else None

    def find_group(self, name: str) -> Optional[ShareGroup]:
        row = self.db.execute("SELECT * FROM share_groups WHERE name=?", (name,)).fetchone()
        return self._group(row) if row else None

    def groups(self) -> List[ShareGroup]:
        return [self._group(r) for r in
                self.db.execute("SELECT * FROM share_groups ORDER BY created_at, id")]

    def group_members(self, group_id: str) -> List[Share]:
        return [self._share(r) for r in self.db.execute(
            "SELECT * FROM shares WHERE share_group_id=? ORDER BY created_at, id", (group_id,))]

    @staticmethod
    def _group_snapshot(row: sqlite3.Row) -> ShareGroupSnapshot:
        return ShareGroupSnapshot(id=row["id"], name=row["name"], group_id=row["group_id"],
                                  status=row["status"], created_at=row["created_at"])

    def insert_group_snapshot(self, g: ShareGroupSnapshot) -> None:
        self.db.execute("INSERT INTO group_snapshots VALUES(?,?,?,?,?)",
                        (g.id, g.group_id, g.name, g.status, g.created_at))

    def update_group_snapshot(self, g: ShareGroupSnapshot) -> None:
        self.db.execute("UPDATE group_snapshots SET status=? WHERE id=?", (g.status, g.id))

    def delete_group_snapshot(self, gs_id: str) -> None:
        self.db.execute("DELETE FROM group_snapshots WHERE id=?", (gs_id,))

    def get_group_snapshot(self, gs_id: str) -> Optional[ShareGroupSnapshot]:
        row = self.db.execute("SELECT * FROM group_snapshots WHERE id=?", (gs_id,)).fetchone()
        return self._group_snapshot(row) if row else None

    def group_snapshot_status(self, gs_id: str) -> Optional[str]:
        row = self.db.execute("SELECT status FROM group_snapshots WHERE id=?", (gs_id,)).fetchone()
        return row[0] if row else None

    def group_snapshots(self, group_id: Optional[str] = None) -> List[ShareGroupSnapshot]:
        if group_id is None:
            rows = self.db.execute("SELECT * FROM group_snapshots ORDER BY created_at, id")
        else:
            rows = self.db.execute("SELECT * FROM group_snapshots WHERE group_id=? "
                                   "ORDER BY created_at, id", (group_id,))
        return [self._group_snapshot(r) for r in rows]

    def group_snapshot_members(self, gs_id: str) -> List[Snapshot]:
        return [self._snapshot(r) for r in self.db.execute(
            "SELECT * FROM snapshots WHERE group_snapshot_id=? ORDER BY created_at, id", (gs_id,))]

    # --- snapshot policies: a share's own schedule and retention ("": the
    # backend's default; "none": no schedule for this share) ---------------
    def set_snapshot_policy(self, share_id: str, schedule: str, retention: str,
                            visibility: str = "") -> None:
        if not schedule and not retention and not visibility:
            self.db.execute("DELETE FROM snapshot_policies WHERE share_id=?", (share_id,))
            return
        self.db.execute("INSERT INTO snapshot_policies(share_id, schedule, retention, visibility) "
                        "VALUES(?,?,?,?) ON CONFLICT(share_id) DO UPDATE SET "
                        "schedule=excluded.schedule, retention=excluded.retention, "
                        "visibility=excluded.visibility",
                        (share_id, schedule, retention, visibility))

    def snapshot_policies(self) -> Dict[str, Tuple[str, str, str]]:
        """share id -> its own (schedule, retention, visibility)."""
        return {r[0]: (r[1], r[2], r[3]) for r in self.db.execute(
            "SELECT share_id, schedule, retention, visibility FROM snapshot_policies")}

    def share_schedules(self, every: bool) -> List[Tuple[str, str, str]]:
        """(share id, backend, its own schedule) oldest first: of every
        share (every), else only of those with a schedule of their own."""
        if every:
            sql = ("SELECT s.id, s.backend, COALESCE(p.schedule, '') FROM shares s "
                   "LEFT JOIN snapshot_policies p ON p.share_id = s.id")
        else:
            sql = ("SELECT s.id, s.backend, p.schedule FROM snapshot_policies p "
                   "JOIN shares s ON s.id = p.share_id WHERE p.schedule != ''")
        cur = self.db.execute(sql + " ORDER BY s.created_at, s.id")
        cur.row_factory = None
        return cur.fetchall()

    def newest_named(self, prefix: str) -> Dict[str, str]:
        """share id -> the greatest snapshot name starting with prefix (one
        query for every share: scheduled names sort by their time)."""
        return dict(self.db.execute(
            "SELECT share_id, MAX(name) FROM snapshots WHERE substr(name, 1, ?) = ? "
            "GROUP BY share_id", (len(prefix), prefix)).fetchall())

    def share_made_from(self, snapshot_id: str) -> bool:
        """Whether a share is being created from the snapshot now."""
        return self.db.execute("SELECT 1 FROM shares WHERE snapshot_id=? AND status=? LIMIT 1",
                               (snapshot_id, C.STATUS_CREATING)).fetchone() is not None

    def snapshot_at(self, share_id: str, location: str) -> Optional[Snapshot]:
        """The snapshot of share_id whose storage is at location, if any."""
        row = self.db.execute("SELECT * FROM snapshots WHERE share_id=? AND provider_location=?",
                              (share_id, location)).fetchone()
        return self._snapshot(row) if row else None

    def snapshots(self, share_id: Optional[str] = None) -> List[Snapshot]:
        """The snapshots (of one share), oldest first."""
        return [self._snapshot(r) for r in self._listed("snapshots", "*", snapshots_of(share_id), -1)]

    def snapshots_in(self, status: str) -> List[Snapshot]:
        """The snapshots in one status, oldest first."""
        return [self._snapshot(r) for r in self.db.execute(
            "SELECT * FROM snapshots WHERE status=? ORDER BY created_at, id", (status,))]

    def snapshot_ids(self, share_id: Optional[str] = None, *, limit: int = -1) -> List[str]:
        """snapshots(share_id)'s ids, and nothing else read,
        at most limit (-1: all)."""
        return self.list_ids("snapshots", limit=limit, **snapshots_of(share_id))

    # --- rules -------------------------------------------------------------------
    # Rules are read in bulk (a share may have thousands): plain tuples in
    # column order are several times faster than sqlite3.Row lookups by name.
    _RULE_COLUMNS = ("id, share_id, access_type, access_to, access_level, state, created_at, "
                     "squash, anonuid, anongid")

    def _rules_where(self, where: str, args: Tuple[Any, ...],
                     table: str = "rules") -> List[AccessRule]:
        cur = self.db.execute(f"SELECT {self._RULE_COLUMNS} FROM {table} WHERE {where} "
                              "ORDER BY created_at, id", args)
        cur.row_factory = None
        return [AccessRule(*row) for row in cur]

    def insert_rule(self, r: AccessRule) -> None:
        self.db.execute(
            f"INSERT INTO rules({self._RULE_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.share_id, r.access_type, r.access_to, r.access_level, r.state, r.created_at,
             r.squash, r.anonuid, r.anongid))

    def set_rule_state(self, rule_id: str, state: str) -> None:
        self.db.execute("UPDATE rules SET state=? WHERE id=?", (state, rule_id))

    def delete_rule(self, rule_id: str) -> None:
        self.db.execute("DELETE FROM rules WHERE id=?", (rule_id,))

    def get_rule(self, rule_id: str) -> Optional[AccessRule]:
        found = self._rules_where("id=?", (rule_id,))
        return found[0] if found else None

    def find_rule(self, share_id: str, access_type: str, access_to: str) -> Optional[AccessRule]:
        """The rule for (type, to) on a share, by the table's unique index."""
        found = self._rules_where("share_id=? AND access_type=? AND access_to=?",
                                  (share_id, access_type, access_to))
        return found[0] if found else None

    def rule_state(self, rule_id: str) -> Optional[str]:
        row = self.db.execute("SELECT state FROM rules WHERE id=?", (rule_id,)).fetchone()
        return row[0] if row else None

    def count_rules(self, share_id: str) -> int:
        count: int = self.db.execute("SELECT COUNT(*) FROM rules WHERE share_id=?",
                                     (share_id,)).fetchone()[0]
        return count

    def rules(self, share_id: str, states: Optional[Sequence[str]] = None) -> List[AccessRule]:
        """A share's rules (only those in states, if given), oldest first."""
        if states is None:
            return self._rules_where("share_id=?", (share_id,))
        marks = ",".join("?" * len(states))
        return self._rules_where(f"share_id=? AND state IN ({marks})", (share_id, *states))

    def rules_in(self, states: Sequence[str]) -> List[AccessRule]:
        """Every share's rules in these states, oldest first."""
        marks = ",".join("?" * len(states))
        return self._rules_where(f"state IN ({marks})", tuple(states))

    def all_rules(self) -> Dict[str, List[AccessRule]]:
        result: Dict[str, List[AccessRule]] = {}
        for rule in self._rules_where("1", ()):
            result.setdefault(rule.share_id, []).append(rule)
        return result

    # --- snapshot access rules (mountable snapshots) --------------------------------
    # Their own table: no query of a share's rules can ever see them.
    def insert_snapshot_rule(self, snapshot_id: str, r: AccessRule) -> None:
        self.db.execute(
            f"INSERT INTO snapshot_rules(snapshot_id, {self._RULE_COLUMNS}) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (snapshot_id, r.id, r.share_id, r.access_type, r.access_to, r.access_level, r.state,
             r.created_at, r.squash, r.anonuid, r.anongid))

    def set_snapshot_rule_state(self, rule_id: str, state: str) -> None:
        self.db.execute("UPDATE snapshot_rules SET state=? WHERE id=?", (state, rule_id))

    def delete_snapshot_rule(self, rule_id: str) -> None:
        self.db.execute("DELETE FROM snapshot_rules WHERE id=?", (rule_id,))

    def snapshot_rule_state(self, rule_id: str) -> Optional[str]:
        row = self.db.execute("SELECT state FROM snapshot_rules WHERE id=?",
                              (rule_id,)).fetchone()
        return row[0] if row else None

    def snapshot_rules(self, snapshot_id: str,
                       states: Optional[Sequence[str]] = None) -> List[AccessRule]:
        """A snapshot's rules (only those in states, if given), oldest first."""
        if states is None:
            return self._rules_where("snapshot_id=?", (snapshot_id,), "snapshot_rules")
        marks = ",".join("?" * len(states))
        return self._rules_where(f"snapshot_id=? AND state IN ({marks})",
                                 (snapshot_id, *states), "snapshot_rules")

    def get_snapshot_rule(self, snapshot_id: str, rule_id: str) -> Optional[AccessRule]:
        found = self._rules_where("snapshot_id=? AND id=?", (snapshot_id, rule_id),
                                  "snapshot_rules")
        return found[0] if found else None

    def find_snapshot_rule(self, snapshot_id: str, access_type: str,
                           access_to: str) -> Optional[AccessRule]:
        found = self._rules_where("snapshot_id=? AND access_type=? AND access_to=?",
                                  (snapshot_id, access_type, access_to), "snapshot_rules")
        return found[0] if found else None

    def count_snapshot_rules(self, snapshot_id: str) -> int:
        count: int = self.db.execute("SELECT COUNT(*) FROM snapshot_rules WHERE snapshot_id=?",
                                     (snapshot_id,)).fetchone()[0]
        return count

    def snapshots_with_rules(self, share_id: Optional[str] = None) -> List[str]:
        """Ids of the snapshots (of one share) that have access rules."""
        if share_id is None:
            cur = self.db.execute("SELECT DISTINCT snapshot_id FROM snapshot_rules")
        else:
            cur = self.db.execute("SELECT DISTINCT snapshot_id FROM snapshot_rules "
                                  "WHERE share_id=?", (share_id,))
        return sorted(row[0] for row in cur)

    def periodic_counts(self, backend: str) -> Dict[str, int]:
        """The counts a periodic state's size is estimated from
        (hooks.records.periodic_parts), on the event loop, so without a
        join: the backend's shares exactly (share_totals); the rules,
        snapshots with rules and snapshot rules of every backend (a count
        of one table each), so exact when one backend holds every share and
        an upper bound otherwise (parts smaller than they need be)."""
        shares = self.backend_totals(backend)[0]
        rules = self.db.execute("SELECT COUNT(*) FROM rules").fetchone()[0]
        exported, exported_rules = self.db.execute(
            "SELECT COUNT(DISTINCT snapshot_id), COUNT(*) FROM snapshot_rules").fetchone()
        return {"shares": shares, "rules": int(rules), "exported": int(exported),
                "exported_rules": int(exported_rules)}

    def periodic_state(self, backend: str) -> Tuple[
            List[Share], Dict[str, List[AccessRule]],
            Dict[str, List[Tuple[Snapshot, List[AccessRule]]]]]:
        """A backend's shares, every rule, and the exported snapshots of its
        shares (by share id): a periodic hook's state, read from a view."""
        shares = self.shares(backend)
        with_exports = self.shares_with_snapshot_rules()
        return (shares, self.all_rules(),
                {s.id: self.snapshot_exports(s.id) for s in shares if s.id in with_exports})

    def shares_with_snapshot_rules(self) -> Set[str]:
        """Ids of the shares with an exported snapshot (one query)."""
        return {row[0] for row in self.db.execute("SELECT DISTINCT share_id FROM snapshot_rules")}

    def snapshot_exports(self, share_id: str
                         ) -> List[Tuple[Snapshot, List[AccessRule]]]:
        """The share's snapshots that have rules, each with them (records)."""
        out = []
        for snapshot_id in self.snapshots_with_rules(share_id):
            snap = self.get_snapshot(snapshot_id)
            if snap is not None:
                out.append((snap, self.snapshot_rules(snapshot_id)))
        return out


def snapshots_of(share_id: Optional[str]) -> Dict[str, str]:
    """A list of snapshots: one share's, or all."""
    return {} if share_id is None else {"share_id": share_id}


class Listing:
    """The rows a list shows (those of `table` whose columns equal `equal`,
    oldest first), for an answer written in slices (sharedd.bus.slices):
    read on the loop when short; otherwise read aside, then brought up to
    date on the loop from the few rows touched meanwhile (however many
    other changes came)."""

    def __init__(self, store: Store, table: str, equal: Dict[str, str]) -> None:
        assert set(equal) <= _LISTS[table]
        self.store, self.table, self.equal = store, table, equal

    def read(self, *, limit: int) -> List[str]:
        return self.store.list_ids(self.table, limit=limit, **self.equal)

    async def aside(self) -> Tuple[int, List[Tuple[int, str]]]:
        """The (created_at, id) of each, oldest first, as of this call, read
        in the reader thread, and the rows_version they are as of."""
        version = self.store.rows_version(self.table)
        # (the view is taken in this step: read() runs up to its first await)
        return version, await self.store.read(
            functools.partial(Store.list_keys, table=self.table, **self.equal))

    def changed_since(self, version: int) -> Optional[Tuple[int, Set[str]]]:
        """The version now, and the rows touched since `version` (None:
        more than are remembered)."""
        changed = self.store.changed_since(self.table, version)
        return None if changed is None else (self.store.rows_version(self.table), changed)

    def key(self, row_id: str) -> Optional[Tuple[int, str]]:
        """The row's key, if it is listed now."""
        return self.store.list_key(self.table, row_id, **self.equal)


def _io_error(exc: sqlite3.Error) -> bool:
    """SQLITE_IOERR, with any extended code."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xff == sqlite3.SQLITE_IOERR


def _read_and_give_back(store: Store, view: Store, fn: Callable[[Store], T]) -> T:
    """In the reader thread (Store.read)."""
    try:
        return fn(view)
    finally:
        db = cast(_ViewConnection, view.db)     # (as _view made it)
        del view.db       # (a view kept by fn fails loudly, not on another's read)
        store._give_back(db)
