"""Store.read(): a read-only view of the state as it is when read() is
called, read in the store's reader thread. Its connection is kept for the
next view (opening one costs the loop 0.25 ms at every read: it parses the
schema), at most VIEW_CONNECTIONS of them, and a kept one neither shows an
old state nor holds back the WAL."""

import asyncio
import os
import sqlite3
import threading

import pytest

from sharedd import store as store_mod
from sharedd.store import Store


def insert(st, i):
    with st.tx(durable=False):
        st.db.execute("INSERT INTO shares(id, name, backend, protocol, size_gib, status, "
                      "created_at) VALUES (?, ?, 'a', 'NFS', 1, 'available', ?)",
                      (f"i{i}", f"n{i}", i))


@pytest.fixture
def st(tmp_path, monkeypatch):
    opened = []
    real = store_mod.sqlite3.connect

    def connect(*args, **kw):                 # (counts the views' connections)
        if "mode=ro" in str(args[0]):
            opened.append(args[0])
        return real(*args, **kw)
    monkeypatch.setattr(store_mod.sqlite3, "connect", connect)
    s = Store(os.path.join(tmp_path, "state", "sharedd.db"))
    s.opened = opened
    yield s
    s.close()


def test_each_read_sees_what_was_committed_before_it_and_nothing_after(st):
    async def main():
        for i in range(40):
            insert(st, i)
            assert await st.read(Store.share_ids) == [f"i{j}" for j in range(i + 1)]
        # the view is taken when read() starts, not when the thread reads it
        pending = [asyncio.ensure_future(st.read(Store.share_ids)) for _ in range(3)]
        await asyncio.sleep(0)                # (each up to its first await)
        insert(st, 40)
        for got in await asyncio.gather(*pending):
            assert len(got) == 40
        assert len(await st.read(Store.share_ids)) == 41
    asyncio.run(main())


def test_connections_are_kept_for_the_next_views_at_most_a_few(st):
    async def main():
        for i in range(30):
            insert(st, i)
            await st.read(Store.last_seq)
        assert len(st.opened) == 1, "a new connection per read"
        # ten views open together (the reader thread held up by the first),
        # then only a few kept
        go = threading.Event()
        first = asyncio.ensure_future(st.read(lambda view: go.wait(10)))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(st.read(Store.share_ids)) for _ in range(9)]
        await asyncio.sleep(0)
        go.set()
        await asyncio.gather(first, *rest)
        assert len(st.opened) == 10
        assert len(st._idle_views) == store_mod.VIEW_CONNECTIONS
    asyncio.run(main())


def test_a_kept_connection_does_not_hold_back_the_wal(st):
    async def main():
        for i in range(20):
            insert(st, i)
            await st.read(Store.share_ids)
    asyncio.run(main())
    assert st._idle_views
    busy, frames, copied = st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and frames == copied == 0
    assert os.path.getsize(st.path + "-wal") == 0


def test_a_statement_left_unfinished_does_not_keep_its_snapshot(st):
    """A read that fails or returns halfway leaves a statement running,
    which would keep its snapshot past ROLLBACK: the next view on that
    connection would show the old state, and the WAL would be held."""
    left = []                                 # (the cursors stay alive)

    def fails(view):
        cur = view.db.execute("SELECT id FROM shares")
        cur.fetchone()
        left.append(cur)
        raise RuntimeError("boom")

    def stops_early(view):
        cur = view.db.execute("SELECT id FROM shares")
        left.append(cur)
        return cur.fetchone()[0]

    async def main():
        for i in range(3):
            insert(st, i)
        with pytest.raises(RuntimeError):
            await st.read(fails)
        insert(st, 3)
        assert len(await st.read(Store.share_ids)) == 4
        assert await st.read(stops_early) == "i0"
        insert(st, 4)
        assert len(await st.read(Store.share_ids)) == 5
        assert len(st.opened) == 1
    asyncio.run(main())
    busy, frames, copied = st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0 and frames == copied == 0


def test_a_view_kept_past_its_read_fails_loudly(st):
    kept = []

    async def main():
        insert(st, 0)
        await st.read(kept.append)
        await st.read(Store.share_ids)
    asyncio.run(main())
    with pytest.raises(AttributeError):
        kept[0].share_ids()                   # (not on the next view's connection)


def test_close_closes_the_kept_connections(st):
    async def main():
        insert(st, 0)
        await asyncio.gather(*(st.read(Store.share_ids) for _ in range(2)))
    asyncio.run(main())
    kept = list(st._idle_views)
    assert kept
    st.close()
    assert not st._idle_views
    for db in kept:
        with pytest.raises(sqlite3.ProgrammingError):
            db.execute("SELECT 1")
    # closed before the store's own connection, which, the last, copied
    # the WAL into the database and removed it (a stopped daemon's state
    # is its one file)
    assert not os.path.exists(st.path + "-wal")


def test_a_read_running_as_the_store_closes_closes_its_connection(st):
    go, running = threading.Event(), threading.Event()

    def slow(view):
        running.set()
        go.wait(10)
        return view.share_ids()

    async def main():
        insert(st, 0)
        read = asyncio.ensure_future(st.read(slow))
        await asyncio.to_thread(running.wait, 10)
        threading.Timer(0.2, go.set).start()
        st.close()                            # (waits for the read)
        return await read
    assert asyncio.run(main()) == ["i0"]
    assert not st._idle_views
