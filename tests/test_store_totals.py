"""The per-backend and per-status totals kept by triggers (read by every
create's capacity check and by the status line instead of aggregating
every share) always equal an aggregate over the shares, through inserts,
resizes, status and backend changes, deletes, rollbacks and a reopen."""

import contextlib
import os
import random

import pytest

from sharedd.store import SCHEMA_VERSION, Store


def aggregate(db, backend):
    return tuple(db.execute("SELECT COUNT(*), COALESCE(SUM(size_gib), 0) FROM shares "
                            "WHERE backend=?", (backend,)).fetchone())


def test_totals_follow_every_change(tmp_path):
    path = os.path.join(tmp_path, "state", "sharedd.db")
    st = Store(path)
    rng = random.Random(11)
    ids = []
    for i in range(200):
        with st.tx():
            st.db.execute("INSERT INTO shares(id, name, backend, protocol, size_gib, status, "
                          "created_at) VALUES (?, ?, ?, 'NFS', ?, ?, 0)",
                          (f"i{i}", f"n{i}", rng.choice("ab"), rng.randint(1, 9),
                           rng.choice(["creating", "available"])))
        ids.append(f"i{i}")
    for _ in range(600):
        i = rng.choice(ids)
        r = rng.random()
        with pytest.raises(RuntimeError) if r > 0.95 else contextlib.nullcontext():
            with st.tx():
                if r < 0.3:
                    st.db.execute("UPDATE shares SET size_gib=? WHERE id=?", (rng.randint(1, 9), i))
                elif r < 0.6:
                    st.db.execute("UPDATE shares SET status=? WHERE id=?",
                                  (rng.choice(["deleting", "available", "error"]), i))
                elif r < 0.7:
                    st.db.execute("UPDATE shares SET backend=? WHERE id=?", (rng.choice("ab"), i))
                elif r < 0.8:
                    st.db.execute("DELETE FROM shares WHERE id=?", (i,))
                elif r < 0.95:
                    st.db.execute("UPDATE shares SET description='x' WHERE id=?", (i,))
                else:           # a transaction that fails takes its totals with it
                    st.db.execute("UPDATE shares SET size_gib=size_gib+5 WHERE id=?", (i,))
                    raise RuntimeError("rolled back")
    by_status = dict(st.db.execute("SELECT status, COUNT(*) FROM shares GROUP BY status"))
    for _ in range(2):
        for b in "abc":
            assert st.backend_totals(b) == aggregate(st.db, b)
        assert st.count_shares_by_status() == by_status
        st.close()
        st = Store(path)
    st.close()



def test_a_commit_reaches_the_disk_by_an_fsync_of_the_wal_now_or_with_synced(tmp_path,
                                                                            monkeypatch):
    """tx() fdatasyncs the WAL before it returns (what synchronous=FULL adds
    in WAL mode); tx(durable=False) does not, and synced() then puts every
    such commit on disk with one fdatasync. A transaction that fails commits
    nothing and leaves nothing to sync. The WAL is the one beside the file
    the database's path leads to (here through a symlink)."""
    import asyncio
    real = os.path.join(tmp_path, "real", "sharedd.db")
    os.makedirs(os.path.dirname(real))
    link = os.path.join(tmp_path, "state", "sharedd.db")
    os.makedirs(os.path.dirname(link))
    os.symlink(real, link)
    st = Store(link)
    assert st.db.execute("PRAGMA synchronous").fetchone()[0] == 1      # NORMAL
    wal = os.stat(real + "-wal")
    assert (os.fstat(st._wal_fd).st_dev, os.fstat(st._wal_fd).st_ino) == (wal.st_dev, wal.st_ino)
    assert not os.path.exists(link + "-wal")
    synced = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        synced.append(fd)
        real_fdatasync(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with st.tx():
        st._set_meta("probe", "1")
    assert synced == [st._wal_fd]
    for value in ("2", "3"):
        with st.tx(durable=False):
            st._set_meta("probe", value)
    assert len(synced) == 1 and st._synced < st._commits
    asyncio.run(st.synced())
    assert synced == [st._wal_fd] * 2 and st._synced == st._commits
    asyncio.run(st.synced())                  # nothing new: no fsync
    with pytest.raises(RuntimeError):
        with st.tx(durable=False):
            st._set_meta("probe", "4")
            raise RuntimeError("driver")
    asyncio.run(st.synced())
    assert len(synced) == 2 and st._meta("probe") == "3"
    st.close()
    assert Store(link)._meta("probe") == "3"


def test_a_database_from_before_squash_opens_and_one_from_the_future_does_not(tmp_path):
    """Rules stored before squash existed get the new columns (empty squash:
    the backend's default_squash applies to them); a database written by a
    newer schema is refused rather than misread."""
    import sqlite3
    from sharedd.store import StoreError
    path = os.path.join(tmp_path, "state", "sharedd.db")
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('epoch', 'e1'), ('seq', '7'), ('schema_version', '1');
        CREATE TABLE shares (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            backend TEXT NOT NULL, protocol TEXT NOT NULL, size_gib INTEGER NOT NULL,
            status TEXT NOT NULL, created_at INTEGER NOT NULL,
            description TEXT NOT NULL DEFAULT '', metadata TEXT NOT NULL DEFAULT '{}',
            export_locations TEXT NOT NULL DEFAULT '[]',
            provider_location TEXT NOT NULL DEFAULT '', snapshot_id TEXT,
            driver_data TEXT NOT NULL DEFAULT '{}', task TEXT NOT NULL DEFAULT '{}');
        CREATE TABLE rules (id TEXT PRIMARY KEY, share_id TEXT NOT NULL REFERENCES shares(id),
            access_type TEXT NOT NULL, access_to TEXT NOT NULL, access_level TEXT NOT NULL,
            state TEXT NOT NULL, created_at INTEGER NOT NULL,
            UNIQUE (share_id, access_type, access_to));
        INSERT INTO shares(id, name, backend, protocol, size_gib, status, created_at)
            VALUES ('s1', 'old', 'b', 'NFS', 1, 'available', 0);
        INSERT INTO rules VALUES ('r1', 's1', 'ip', '10.0.0.1', 'rw', 'active', 0);
    """)
    db.close()
    st = Store(path)
    (r,) = st.rules("s1")
    assert (r.squash, r.anonuid, r.anongid, r.options()) == ("", 65534, 65534, {})
    assert st.last_seq() == 7 and st.epoch == "e1"
    assert st._meta("schema_version") == str(SCHEMA_VERSION)
    # An old share has no share server and no replica; the new tables exist and are empty.
    assert st.get_share("s1").share_server_id is None
    assert st.networks() == [] and st.servers() == [] and st.replicas() == []
    with st.tx():
        st._set_meta("schema_version", "99")
    st.close()
    with pytest.raises(StoreError, match="newer sharedd"):
        Store(path)


def test_per_operation_lookups_read_no_whole_table(tmp_path):
    """Whether a share is being made from a snapshot (each snapshot delete)
    and which shares migrate to a backend (each capacity check while one
    migrates) are index searches, not scans of every share."""
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    with st.tx():
        for i, status in enumerate(["available"] * 50 + ["migrating"]):
            st.db.execute("INSERT INTO shares(id, name, backend, protocol, size_gib, status, "
                          "created_at, task) VALUES (?, ?, 'a', 'NFS', 1, ?, 0, ?)",
                          (f"i{i}", f"n{i}", status, '{"dest": "b"}'))
    statements = []
    st.db.set_trace_callback(statements.append)
    assert st.share_made_from("nope") is False
    assert st.gib_arriving("b") == 1
    st.db.set_trace_callback(None)
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "shares" in s]
    assert len(reads) >= 2, statements
    for sql in reads:
        plan = " ".join(str(tuple(r)) for r in st.db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "SCAN shares" not in plan, (sql, plan)
    st.close()


def test_lists_are_read_from_an_index_alone(tmp_path):
    """ListShares (all, or filtered by backend, protocol, status), a share
    server's shares and ListSnapshots of all read their ids from an index
    in listing order (no row of the table read, nothing sorted), the first
    1,001 too; one share's snapshots are an index search."""
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    statements = []
    st.db.set_trace_callback(statements.append)
    st.share_ids(), st.share_ids(limit=1001), st.share_ids(status="available")
    st.share_ids(backend="a"), st.share_ids(protocol="NFS", limit=1001)
    st.share_ids(share_server_id="v1"), st.snapshot_ids(), st.snapshot_ids(limit=1001)
    st.snapshot_ids("s1")
    st.db.set_trace_callback(None)
    assert len(statements) == 9, statements
    for sql in statements:
        plan = " ".join(str(tuple(r)) for r in st.db.execute("EXPLAIN QUERY PLAN " + sql))
        if "share_id=" in sql:
            assert "SEARCH snapshots USING" in plan, (sql, plan)
        else:
            assert "COVERING INDEX" in plan and "TEMP B-TREE" not in plan, (sql, plan)
    st.close()


def test_a_database_of_an_earlier_release_gets_the_listing_indexes(tmp_path):
    """The indexes by backend alone and by server alone (earlier releases)
    are replaced at open by the listing ones, which serve the same lookups
    (no insert or delete writes to two indexes by backend)."""
    path = os.path.join(tmp_path, "state", "sharedd.db")
    st = Store(path)
    for column in ("backend", "protocol", "status", "share_server_id"):
        st.db.execute(f"DROP INDEX shares_by_{column}_age")
    st.db.execute("CREATE INDEX shares_by_backend ON shares(backend)")
    st.db.execute("CREATE INDEX shares_by_server ON shares(share_server_id)")
    st.close()
    st = Store(path)
    names = {r[0] for r in st.db.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                         "AND tbl_name='shares'")}
    assert {"shares_by_backend_age", "shares_by_protocol_age", "shares_by_status_age",
            "shares_by_share_server_id_age"} <= names
    assert not names & {"shares_by_backend", "shares_by_server"}, names
    plan = " ".join(str(tuple(r)) for r in st.db.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM shares WHERE backend=? AND provider_location=?",
        ("a", "/p")))
    assert "shares_by_location" in plan, plan
    st.close()


def test_a_closed_store_refuses_a_commit_with_a_named_error(tmp_path):
    """An operation still running when stop closes the store (its wait timed
    out) gets sharedd's error, not the closed connection's."""
    import asyncio
    from sharedd.errors import SharedError
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    st.close()
    with pytest.raises(SharedError, match="closed"):
        with st.tx(durable=False):
            pass
    st._commits += 1   # a commit made before the close, not yet synced
    with pytest.raises(SharedError, match="closed"):
        asyncio.run(st.synced())


def test_a_disk_error_inside_a_commit_is_final_and_a_full_disk_is_not(tmp_path):
    """SQLite's own read or write of the disk failing (SQLITE_IOERR, at
    COMMIT or in a statement, after which SQLite has rolled back by itself)
    leaves what reached the disk unknown, as a failed fsync does: nothing
    commits after it and lost is set (sharedd exits for a restart). A full
    disk (SQLITE_FULL) at COMMIT is only that commit's error: it is rolled
    back and the next commit works."""
    import sqlite3
    from sharedd.errors import SharedError
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    real = st.db

    class Failing:
        fail_on, code, rolled_back = "COMMIT", sqlite3.SQLITE_FULL, False

        def execute(self, sql, *args):
            if sql == self.fail_on:
                if self.rolled_back:
                    real.execute("ROLLBACK")     # as SQLite does on an I/O error
                exc = sqlite3.OperationalError("disk trouble")
                exc.sqlite_errorcode = self.code
                raise exc
            return real.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real, name)
    try:
        st.db = Failing()
        with pytest.raises(sqlite3.OperationalError, match="disk trouble"):
            with st.tx(durable=False):
                st.next_seq()
        assert not real.in_transaction
        assert not st.lost.is_set() and st.failure == ""
        st.db = real
        with st.tx(durable=False):
            st.next_seq()
        st.db = Failing()
        Failing.fail_on, Failing.rolled_back = "SELECT value FROM meta WHERE key=?", True
        Failing.code = sqlite3.SQLITE_IOERR | (1 << 8)     # SQLITE_IOERR_READ
        with pytest.raises(SharedError, match="writing the state database to disk failed"):
            with st.tx(durable=False):
                st.next_seq()
        assert st.lost.is_set() and "disk trouble" in st.failure
        st.db = real
        with pytest.raises(SharedError, match="restart sharedd"):
            with st.tx(durable=False):
                pass
    finally:
        st.db = real
        st.close()


def test_every_row_a_list_could_gain_or_lose_is_named_as_changed(tmp_path):
    """ListShares and ListSnapshots (all, or one share's) read aside are
    current once the rows Store.changed_since names are looked at again:
    every statement on a share or snapshot names it (a share's deletion,
    its snapshots too), and nothing else does."""
    from sharedd.models import Share, Snapshot
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    rng = random.Random(5)
    shares, snaps = {}, {}

    def versions():
        return st.rows_version("shares"), st.rows_version("snapshots")

    def lists(of):
        return st.share_ids(), (st.snapshot_ids(), {s: st.snapshot_ids(s) for s in of})
    for n in range(400):
        had = sorted(shares)
        before, count = lists(had), versions()
        r = rng.random()
        with st.tx():
            if r < 0.3 or not shares:
                s = Share(id=f"s{n}", name=f"n{n}", backend="a", protocol="NFS", size_gib=1,
                          status="available", created_at=n)
                st.insert_share(s)
                shares[s.id] = s
                did, touched = "share", s.id
            elif r < 0.5:
                sid = rng.choice(sorted(shares))
                snap = Snapshot(id=f"p{n}", name=f"p{n}", share_id=sid, size_gib=1,
                                status="available", created_at=n)
                st.insert_snapshot(snap)
                snaps[snap.id] = snap
                did, touched = "snapshot", snap.id
            elif r < 0.6 and snaps:
                st.delete_snapshot(snaps.pop(rng.choice(sorted(snaps))).id)
                did = "snapshot"
            elif r < 0.7:
                sid = rng.choice(sorted(shares))
                st.delete_share(sid)
                del shares[sid]
                snaps = {k: v for k, v in snaps.items() if v.share_id != sid}
                did, touched = "share", sid
            else:
                s = shares[rng.choice(sorted(shares))]
                s.size_gib, s.status = rng.randint(1, 9), rng.choice(["available", "extending"])
                st.update_share(s)
                did, touched = "update", s.id
        after = lists(had)
        for status in ("available", "extending"):     # (read from their index)
            assert st.share_ids(status=status) == [
                i for i in after[0] if shares[i].status == status], (n, status)
        changed = [st.changed_since(table, count[k])
                   for k, table in enumerate(("shares", "snapshots"))]
        assert set(after[0]) ^ set(before[0]) <= changed[0], n
        assert set(after[1][0]) ^ set(before[1][0]) <= changed[1], n
        for s in had:
            assert set(after[1][1][s]) ^ set(before[1][1][s]) <= changed[1], (n, s)
        assert changed[0] == (set() if did == "snapshot" else {touched})
        if did == "update":
            assert changed[1] == set()          # (no snapshot came or went)
    assert len(st.share_ids()) > 3 and len(st.snapshot_ids()) > 2
    assert st.share_ids(limit=3) == st.share_ids()[:3]
    assert st.share_ids(limit=2, backend="a") == st.share_ids(backend="a")[:2]
    assert st.snapshot_ids(limit=2) == st.snapshot_ids()[:2]
    some = next(s for s in shares if len(st.snapshot_ids(s)) > 1)
    assert st.snapshot_ids(some, limit=1) == st.snapshot_ids(some)[:1]
