"""The per-backend and per-status totals kept by triggers (read by every
create's capacity check and by the status line instead of aggregating
every share) always equal an aggregate over the shares, through inserts,
resizes, status and backend changes, deletes, rollbacks and a reopen."""

import contextlib
import os
import random

import pytest

from sharedd.store import Store


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

