"""The state database's WAL is copied into the database file by a thread
of the store's, every CHECKPOINT_COMMITS commits, never inside a commit on
the event loop (SQLite's automatic checkpoint fsyncs the database file in
whichever COMMIT crosses 1,000 pages: 10-140 ms of the loop at 10,000
shares); a WAL that thread could not keep small is checkpointed on the
loop, between two commits. A WAL that starts over is not cut on the loop
(an ftruncate of 1-20 ms), but once the store is quiet, in that thread."""

import asyncio
import os
import sqlite3
import threading
import time
import urllib.parse

from sharedd import store as store_mod
from sharedd.store import Store


def rows_in_database_file(path):
    """The shares the database file itself holds, the WAL left unread."""
    db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?immutable=1", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
    except sqlite3.OperationalError:          # (not even the tables yet)
        return 0
    finally:
        db.close()


async def commits(st, n, start):
    for i in range(start, start + n):
        with st.tx(durable=False):
            st.db.execute("INSERT INTO shares(id, name, backend, protocol, size_gib, status, "
                          "created_at) VALUES (?, ?, 'a', 'NFS', 1, 'available', 0)",
                          (f"i{i}", f"n{i}" + "x" * 2000))
        await st.synced()
    if st._checkpointing is not None:
        await st._checkpointing


def test_checkpoints_run_in_their_thread_not_in_commits(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "state", "sharedd.db")
    st = Store(path)
    assert st.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    threads = []
    real = store_mod.sqlite3.connect

    def connect(*args, **kw):                 # the checkpointer's connection, and where
        if args[0] == path:
            threads.append(threading.current_thread().name)
        return real(*args, **kw)
    monkeypatch.setattr(store_mod.sqlite3, "connect", connect)
    try:
        before = rows_in_database_file(path)
        asyncio.run(commits(st, store_mod.CHECKPOINT_COMMITS - 10, 0))
        # no checkpoint yet: the 4,000 pages or so are in the WAL only
        assert rows_in_database_file(path) == before
        asyncio.run(commits(st, 20, store_mod.CHECKPOINT_COMMITS))
        assert rows_in_database_file(path) >= store_mod.CHECKPOINT_COMMITS - 10
        assert threads and all(t.startswith("sharedd-wal-checkpoint") for t in threads), threads
    finally:
        st.close()


def test_a_wal_too_large_is_checkpointed_on_the_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "WAL_MAX_BYTES", 0)            # every WAL is too large
    monkeypatch.setattr(store_mod, "CHECKPOINT_COMMITS", 1)
    path = os.path.join(tmp_path, "state", "sharedd.db")
    st = Store(path)
    try:
        asyncio.run(commits(st, 5, 0))
        assert rows_in_database_file(path) == 5
        assert st._checkpoints is None       # the thread never ran
    finally:
        st.close()


async def big_commits(st, n):
    for i in range(n):
        with st.tx(durable=False):
            st.db.execute("INSERT INTO shares(id, name, backend, protocol, size_gib, status, "
                          "created_at, description) VALUES (?, ?, 'a', 'NFS', 1, 'available', 0,"
                          " ?)", (f"b{i}", f"b{i}", "x" * (1 << 20)))
    await st.synced()


def test_a_wal_that_starts_over_is_not_cut_in_a_commit(tmp_path):
    """Past WAL_KEEP_BYTES, the COMMIT that starts the WAL over leaves its
    file as it is (journal_size_limit is WAL_MAX_BYTES)."""
    st = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    try:
        asyncio.run(big_commits(st, 20))
        wal = os.fstat(st._wal_fd).st_size
        assert store_mod.WAL_KEEP_BYTES < wal < store_mod.WAL_MAX_BYTES
        busy, frames, copied = st.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, copied) == (0, frames)
        with st.tx(durable=False):       # (starts the WAL over)
            st._set_meta("probe", "1")
        assert st.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] < 10
        assert os.fstat(st._wal_fd).st_size == wal
    finally:
        st.close()


def test_a_quiet_store_cuts_its_wal_in_the_checkpoint_thread(tmp_path, monkeypatch):
    """WAL_TRIM_QUIET seconds after a checkpoint with no commit since, a WAL
    over WAL_KEEP_BYTES is cut to nothing; commits coming more often than
    that keep it."""
    monkeypatch.setattr(store_mod, "WAL_TRIM_QUIET", 1.0)
    monkeypatch.setattr(store_mod, "WAL_KEEP_BYTES", 0)
    monkeypatch.setattr(store_mod, "CHECKPOINT_COMMITS", 1)
    path = os.path.join(tmp_path, "state", "sharedd.db")
    st = Store(path)
    threads = []
    real = st._truncate
    monkeypatch.setattr(st, "_truncate",
                        lambda seen: threads.append(threading.current_thread().name) or real(seen))

    async def run():
        for i in range(12):                # one every 0.05 s: never quiet
            await commits(st, 1, i)
            await asyncio.sleep(0.05)
            assert os.fstat(st._wal_fd).st_size > 0, i
        deadline = time.monotonic() + 20
        while os.fstat(st._wal_fd).st_size and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert os.fstat(st._wal_fd).st_size == 0
        await commits(st, 1, 100)          # (a cut WAL is written as before)
    try:
        asyncio.run(run())
        assert threads and all(t.startswith("sharedd-wal-checkpoint") for t in threads), threads
        assert rows_in_database_file(path) == 13
    finally:
        st.close()
