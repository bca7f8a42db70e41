"""Large periodic states in parts, and fold's order.

A periodic state is split into records of bounded size with consecutive
seqs (sharedd.hooks.records.periodic_parts); the spool keeps every part of
the newest complete state; mountd uses a periodic state only when it holds
every part. The engine runs in-process with the real spool hook; the part
size is made small so a few shares need several parts.
"""

import asyncio
import contextlib
import json
import os
import threading

import pytest

from mountd.reconcile import fold
from mountd.records import RecordSource
from mountd.trust import Trust
from sharedd import config as config_mod
from sharedd import constants as C
from sharedd import record as recordlib
from sharedd.engine import Engine
from tests.fixtures.mountd_env import make_record, make_share, rule

CONFIG = """
[DEFAULT]
enabled_share_backends = mem
state_path = {root}/state
spool_dir = {root}/spool
host_id = storage1
spool_retention_count = 3

[mem]
share_driver = tests.memdriver:MemoryDriver
share_export_ip = 192.0.2.1
hook_drivers = {hooks}
enable_post_hooks = true
enable_periodic_hooks = true
periodic_hooks_interval = 3600
"""


def spool_files(root):
    d = os.path.join(root, "spool", "storage1")
    out = {}
    for name in sorted(n for n in os.listdir(d) if not n.startswith(".")):
        with open(os.path.join(d, name)) as f:
            out[name] = json.load(f)
    return out


def held_periodic_reads(monkeypatch):
    """Store.periodic_state, held until go_on is set: (reading, go_on, reads),
    reads listing (thread, seq of the view) of each."""
    from sharedd.store import Store
    reading, go_on = threading.Event(), threading.Event()
    reads = []
    real = Store.periodic_state

    def periodic_state(self, backend):
        reads.append((threading.current_thread(), int(self._meta("seq"))))
        reading.set()
        assert go_on.wait(30)
        return real(self, backend)
    monkeypatch.setattr(Store, "periodic_state", periodic_state)
    return reading, go_on, reads


async def a_run_reading_while(engine, reading, name):
    """A periodic run, started; once it reads (held), share name is made."""
    periodic = asyncio.ensure_future(engine.run_periodic_hooks({}))
    assert await asyncio.to_thread(reading.wait, 30)
    await engine.create_share(name, "NFS", 1, {})
    return periodic


@contextlib.contextmanager
def engine_with_shares(root: str, n: int, hooks: str = "spool"):
    """An in-process engine (memory driver, these hooks) with n shares."""
    with open(os.path.join(root, "sharedd.conf"), "w") as f:
        f.write(CONFIG.format(root=root, hooks=hooks))
    loop = asyncio.new_event_loop()
    engine = Engine(config_mod.load(os.path.join(root, "sharedd.conf")))
    try:
        loop.run_until_complete(engine.start())
        for i in range(n):
            loop.run_until_complete(engine.create_share(f"s{i}", "NFS", 1, {}))
        yield loop, engine
    finally:
        loop.run_until_complete(engine.stop(timeout=5))
        loop.close()


def test_a_large_periodic_state_goes_in_parts_and_is_used_only_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "PERIODIC_PART_BYTES", 3 * C.PERIODIC_SHARE_BYTES)
    root = str(tmp_path)
    with engine_with_shares(root, 7) as (loop, engine):
        loop.run_until_complete(engine.run_periodic_hooks({}))
        first = [r for r in spool_files(root).values() if r["phase"] == "periodic"]
        assert [(r["part"], r["parts"]) for r in first] == [(1, 3), (2, 3), (3, 3)]
        assert [r["seq"] for r in first] == list(range(first[0]["seq"], first[0]["seq"] + 3))
        assert sum(len(r["shares"]) for r in first) == 7
        # Retention (3 records) keeps every part of the newest complete state.
        assert len(spool_files(root)) == 3
        loop.run_until_complete(engine.create_share("s7", "NFS", 1, {}))
        loop.run_until_complete(engine.run_periodic_hooks({}))
        files = spool_files(root)
        periodic = [r for r in files.values() if r["phase"] == "periodic"]
        assert [(r["part"], r["parts"]) for r in periodic] == [(1, 3), (2, 3), (3, 3)]
        assert sum(len(r["shares"]) for r in periodic) == 8, [(n, r["seq"], len(r["shares"])) for n, r in files.items()]
        trust = Trust({"storage1": engine.signer.public}, accept_unsigned=False)
        spool = os.path.join(root, "spool")
        shares = RecordSource(spool, (0,), trust).scan()["storage1"]
        assert sorted(s["name"] for s in shares.values()) == [f"s{i}" for i in range(8)]
        # Without its middle part the state is not used: nothing is known whole.
        middle = next(n for n, r in files.items() if r.get("part") == 2)
        os.unlink(os.path.join(spool, "storage1", middle))
        assert RecordSource(spool, (0,), trust).scan()["storage1"] == {}


def test_a_periodic_state_is_built_signed_and_checked_off_the_event_loop(tmp_path, monkeypatch):
    """A part holds hundreds of shares at scale (tens of milliseconds to
    build, sign, check and turn into the dbus hook's JSON): the event loop's
    thread does none of it, so it goes on answering calls meanwhile."""
    from sharedd.hooks import dbus_signal
    from sharedd.hooks import records as hook_records
    seen = []
    real_build, real_checked = hook_records.build, recordlib.checked
    real_json = dbus_signal.record_json

    def record_json(record):
        seen.append(("json", threading.current_thread()))
        return real_json(record)

    def build(*args, **kwargs):
        seen.append(("build", threading.current_thread()))
        return real_build(*args, **kwargs)

    def checked(record):
        seen.append(("checked", threading.current_thread()))
        return real_checked(record)
    monkeypatch.setattr(hook_records, "build", build)
    monkeypatch.setattr(recordlib, "checked", checked)
    monkeypatch.setattr(dbus_signal, "record_json", record_json)
    monkeypatch.setattr(C, "PERIODIC_PART_BYTES", 2 * C.PERIODIC_SHARE_BYTES)
    root = str(tmp_path)
    with engine_with_shares(root, 3, hooks="spool, dbus") as (loop, engine):
        seen.clear()
        loop.run_until_complete(engine.run_periodic_hooks({}))
        kinds = [kind for kind, _ in seen]
        assert kinds.count("build") == 2 and kinds.count("json") == 2   # two parts
        assert set(kinds) == {"build", "checked", "json"}
        assert all(t is not threading.main_thread() for _, t in seen), seen
        periodic = [r for r in spool_files(root).values() if r["phase"] == "periodic"]
        assert [(r["part"], r["parts"]) for r in periodic] == [(1, 2), (2, 2)]
        assert all(r["signature"] for r in periodic)


def test_the_newest_word_on_a_share_wins_whatever_its_backend():
    sid = "a" * 32
    granted = make_share(sid=sid, backend="a", rules=[rule("10.74.0.11", "rw")])
    stale = make_share(sid=sid, backend="b", rules=[])
    # backend "b" sorts after "a" but spoke earlier (seq 3): it must not win.
    records = [make_record(5, "periodic", shares=[granted], backend="a"),
               make_record(3, "periodic", shares=[stale], backend="b")]
    assert fold(records)[1][sid]["access_rules"][0]["access_level"] == "rw"
    # A later record of the other backend is newer: it wins.
    moved = make_share(sid=sid, backend="b", rules=[rule("10.74.0.11", "ro")])
    records.append(make_record(6, "post", "allow_access", share=moved, backend="b"))
    assert fold(records)[1][sid]["access_rules"][0]["access_level"] == "ro"


def test_parts_are_only_for_periodic_records():
    rec = make_record(4, "post", "allow_access", share=make_share())
    with pytest.raises(recordlib.RecordError, match="only periodic"):
        recordlib.validate(dict(rec, part=1, parts=2))
    per = make_record(4, "periodic", shares=[])
    with pytest.raises(recordlib.RecordError, match="part 3 of 2"):
        recordlib.validate(dict(per, part=3, parts=2))


def test_a_periodic_state_is_read_from_a_view_while_the_loop_goes_on(tmp_path, monkeypatch):
    """The state of 10,000 shares takes a quarter of a second to read: it is
    read in a worker thread, from a read-only view opened as its seqs are
    taken. A share made while it is read is not in it, and that share's own
    records come after it: no record shows a state older than a lower seq."""
    reading, go_on, readers = held_periodic_reads(monkeypatch)
    root = str(tmp_path)
    with engine_with_shares(root, 2) as (loop, engine):
        async def run():
            # The loop goes on while the state is read, and commits.
            periodic = await a_run_reading_while(engine, reading, "late")
            go_on.set()
            await periodic
        loop.run_until_complete(run())
        files = list(spool_files(root).values())
        periodic = [r for r in files if r["phase"] == "periodic"]
        assert len(periodic) == 1
        # read in a worker thread, from the state right after its seq was taken
        assert readers == [(readers[0][0], periodic[0]["seq"])]
        assert readers[0][0].name.startswith("sharedd-state-read")
        assert sorted(s["name"] for s in periodic[0]["shares"]) == ["s0", "s1"]
        late = [r for r in files if (r.get("share") or {}).get("name") == "late"]
        assert [r["phase"] for r in late] == ["post"]
        assert all(r["seq"] > periodic[0]["seq"] for r in late)
        # The view is closed: nothing holds back a full checkpoint.
        busy = engine.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0


def test_a_periodic_state_takes_as_many_seqs_as_its_counts_need(tmp_path, monkeypatch):
    """The number of parts comes from counts read before the state
    (Store.periodic_counts), exact with one backend: rules count."""
    monkeypatch.setattr(C, "PERIODIC_PART_BYTES",
                        C.PERIODIC_SHARE_BYTES + 4 * C.PERIODIC_RULE_BYTES)
    root = str(tmp_path)
    with engine_with_shares(root, 3) as (loop, engine):
        shares = engine.store.shares()
        for i in range(4):
            loop.run_until_complete(engine.allow_access(shares[0].id, "ip", f"192.0.2.{i + 10}",
                                                        "rw", {}))
        assert engine.store.periodic_counts("mem") == {"shares": 3, "rules": 4, "exported": 0,
                                                       "exported_rules": 0}
        loop.run_until_complete(engine.run_periodic_hooks({}))
        periodic = [r for r in spool_files(root).values() if r["phase"] == "periodic"]
        # 3 shares and 4 rules: 3 * 2048 + 4 * 320 bytes in parts of 3328: 3.
        assert [len(r["shares"]) for r in periodic] == [1, 1, 1]
        assert len(periodic[0]["shares"][0]["access_rules"]) == 4


def test_no_part_is_empty_while_there_are_shares_enough():
    """Costs of uneven shares, or a part count from an upper bound (rules
    of other backends counted): every part still gets a share, in order."""
    from types import SimpleNamespace
    from sharedd.hooks import records
    shares = [SimpleNamespace(id=f"s{i}") for i in range(5)]
    heavy = {"s0": [object()] * 40}           # split counts a share's rules
    for parts in range(1, 6):
        for rules in ({}, heavy):
            runs = records.split(shares, rules, parts)
            assert len(runs) == parts and all(runs), (parts, [len(r) for r in runs])
            assert [s for run in runs for s in run] == shares
    assert [len(r) for r in records.split(shares[:2], {}, 3)] == [1, 1, 0]


def test_callers_at_once_share_the_periodic_run_that_has_not_started(tmp_path, monkeypatch):
    """While one periodic run reads the state, twenty more callers come: they
    share one run taken after them (each gets a state newer than its call),
    not twenty reads of every share."""
    reading, go_on, reads = held_periodic_reads(monkeypatch)
    root = str(tmp_path)
    with engine_with_shares(root, 2) as (loop, engine):
        async def run():
            first = await a_run_reading_while(engine, reading, "between")
            more = [asyncio.ensure_future(engine.run_periodic_hooks({})) for _ in range(20)]
            await asyncio.sleep(0.1)
            go_on.set()
            await asyncio.gather(first, *more)
        loop.run_until_complete(run())
        periodic = [r for r in spool_files(root).values() if r["phase"] == "periodic"]
    assert len(reads) == 2
    # the second run began after the share made while the first was read
    assert sorted(s["name"] for s in periodic[-1]["shares"]) == ["between", "s0", "s1"]
