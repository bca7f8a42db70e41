"""The spool and dbus hook drivers, on real files with real inotify."""

import json
import logging
import os
import pathlib
import shutil
import stat
import threading

import pyinotify
import pytest

from sharedd import record as rec
from sharedd.errors import InvalidArgument
from sharedd.hooks import HOOK_DRIVERS, spool
from sharedd.hooks.base import HookContext
from sharedd.hooks.dbus_signal import DbusSignalHook
from sharedd.hooks.spool import SpoolConflict, SpoolHook
from tests.support import components

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "schema" / "examples"
HOST = "storage1"
EPOCH = "3b5e0c7a9d2f4e6a8b1c0d2e4f6a8b0c"


def golden(name):
    return json.loads((EXAMPLES / name).read_text())


def make(seq, kind="post-allow_access", backend="main", epoch=EPOCH, host=HOST):
    r = golden(kind + ".json")
    r.update(seq=seq, backend=backend, epoch=epoch, host=host)
    return r


def periodic(seq, backend="main", nshares=2):
    r = make(seq, "periodic", backend)
    template = r["shares"]
    shares = []
    for i in range(nshares):
        s = json.loads(json.dumps(template[i % len(template)]))
        s["id"] = f"{i:032x}"
        s["name"] = f"share{i}"
        shares.append(s)
    r["shares"] = shares
    return r


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    yield str(d)
    hs = spool._SPOOLS.pop(os.path.abspath(os.path.join(str(d), HOST)), None)
    if hs is not None:
        hs.settle()


def hook(spool_dir, backend="main", count=0, seconds=0, emit=None):
    ctx = HookContext(HOST, spool_dir, emit_signal=emit,
                      retention_seconds=seconds, retention_count=count)
    return SpoolHook(backend, None, ctx)


def names(spool_dir):
    """The record files, as readers list them (dot names are skipped)."""
    return sorted(n for n in os.listdir(os.path.join(spool_dir, HOST)) if not n.startswith("."))


def restart():
    """As a new process: every host directory's index forgotten, rebuilt by
    the next hook (after the old one's spares are made)."""
    for hs in spool._SPOOLS.values():
        hs.settle()
    spool._SPOOLS.clear()


def temp_files(host_dir):
    """Dot files other than the spares made ahead: records being written."""
    return [n for n in os.listdir(host_dir)
            if n.startswith(".") and not spool.SPARE_RE.fullmatch(n)]


def seqs(spool_dir):
    return [int(n[:20]) for n in names(spool_dir)]


def test_registered_as_builtins():
    assert HOOK_DRIVERS["spool"] == "sharedd.hooks.spool:SpoolHook"
    assert HOOK_DRIVERS["dbus"] == "sharedd.hooks.dbus_signal:DbusSignalHook"


def test_every_entry_point_writes_one_file(spool_dir):
    h = hook(spool_dir)
    assert h.execute_pre_hook(make(1, "pre-allow_access")) is None
    assert h.execute_post_hook(make(2, "post-allow_access"), None) is None
    assert h.execute_periodic_hook(periodic(3)) is None
    assert names(spool_dir) == [
        "00000000000000000001-pre-allow_access.json",
        "00000000000000000002-post-allow_access.json",
        "00000000000000000003-periodic-periodic.json"]
    host_dir = os.path.join(spool_dir, HOST)
    assert stat.S_IMODE(os.stat(host_dir).st_mode) == 0o755
    for n in names(spool_dir):
        st = os.stat(os.path.join(host_dir, n))
        assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0 and st.st_gid == 0
        with open(os.path.join(host_dir, n), "rb") as f:
            obj = rec.loads(f.read())
        assert rec.file_name(obj) == n


def test_file_names_sort_in_seq_order(spool_dir):
    h = hook(spool_dir)
    order = [1000000, 9, 100, 10, 12345678901234567, 2]
    for s in order:
        h.execute_post_hook(make(s), None)
    assert seqs(spool_dir) == sorted(order)


def _check_whole(path, errors, seen):
    """What a reader does: open a new non-dot file and parse it whole."""
    name = os.path.basename(path)
    if name.startswith(".") or name in seen:
        return
    try:
        with open(path, "rb") as f:
            obj = rec.loads(f.read())
        if rec.file_name(obj) != name:
            errors.append(f"{name}: content is for {rec.file_name(obj)}")
    except FileNotFoundError:
        return                      # (not expected: retention is off here)
    except Exception as exc:        # noqa: BLE001 - every failure is a finding
        errors.append(f"{name}: {exc}")
    seen.add(name)


def test_reader_check_catches_a_partial_file(tmp_path):
    # The check used below is able to fail: half a record is reported.
    data = rec.dumps(make(7))
    p = tmp_path / "00000000000000000007-post-allow_access.json"
    p.write_bytes(data[:len(data) // 2])
    errors, seen = [], set()
    _check_whole(str(p), errors, seen)
    assert errors and "not valid JSON" in errors[0]


def test_concurrent_writes_appear_atomically(spool_dir):
    h = hook(spool_dir)
    host_dir = os.path.join(spool_dir, HOST)
    total, nthreads = 500, 4
    stop = threading.Event()
    ino_errors, ino_seen = [], set()
    poll_errors, poll_seen = [], set()

    components.used("Linux inotify (pyinotify)")
    wm = pyinotify.WatchManager()
    wm.add_watch(host_dir, pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE)

    class Handler(pyinotify.ProcessEvent):
        def process_default(self, event):
            _check_whole(event.pathname, ino_errors, ino_seen)

    notifier = pyinotify.Notifier(wm, Handler(), timeout=50)

    def inotify_reader():
        # Writers are done when stop is set: every event is queued by then,
        # so one quiet poll after stop means there is nothing more to come.
        while len(ino_seen) < total:
            stopped = stop.is_set()
            if notifier.check_events():
                notifier.read_events()
                notifier.process_events()
            elif stopped:
                break

    def polling_reader():
        # Like mountd's rescan of a network spool: no events, just listings.
        while len(poll_seen) < total:
            stopped = stop.is_set()     # a full pass after this sees everything
            for n in os.listdir(host_dir):
                _check_whole(os.path.join(host_dir, n), poll_errors, poll_seen)
            if stopped:
                break

    counter = iter(range(1, total + 1))
    lock = threading.Lock()
    write_errors = []

    def writer():
        while True:
            with lock:
                seq = next(counter, None)
            if seq is None:
                return
            try:
                if seq % 25 == 0:      # some big ones: more time mid-write
                    h.execute_periodic_hook(periodic(seq, nshares=200))
                else:
                    h.execute_post_hook(make(seq), None)
            except Exception as exc:  # noqa: BLE001
                write_errors.append(repr(exc))

    readers = [threading.Thread(target=inotify_reader), threading.Thread(target=polling_reader)]
    writers = [threading.Thread(target=writer) for _ in range(nthreads)]
    try:
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(120)
    finally:
        stop.set()
        for t in readers:
            t.join(60)
        notifier.stop()
    assert write_errors == []
    assert ino_errors == [] and poll_errors == []
    expected = {rec.file_name(make(s)) if s % 25 else rec.file_name(periodic(s))
                for s in range(1, total + 1)}
    assert ino_seen == expected
    assert poll_seen == expected
    assert seqs(spool_dir) == list(range(1, total + 1))
    assert temp_files(host_dir) == []
    hs = spool._host_spool(host_dir)
    hs.settle()
    spares = {os.path.join(host_dir, n) for n in os.listdir(host_dir) if n.startswith(".")}
    assert spares == set(hs._spares)                 # every spare left is known, and empty
    assert all(os.stat(p).st_size == 0 for p in spares)


def test_refuses_to_overwrite(spool_dir):
    h = hook(spool_dir)
    first = make(5)
    path = h.write(first)
    before = pathlib.Path(path).read_bytes()
    h.write(make(5))                       # same content again: a no-op
    other = make(5)
    other["share"]["size_gib"] = 99
    with pytest.raises(SpoolConflict, match="refusing to overwrite"):
        h.write(other)
    with pytest.raises(SpoolConflict, match="already used"):
        h.write(make(5, "pre-allow_access"))
    assert pathlib.Path(path).read_bytes() == before
    assert names(spool_dir) == [os.path.basename(path)]


def test_invalid_record_writes_nothing(spool_dir):
    h = hook(spool_dir)
    bad = make(1, "post-create_share")
    bad["share"]["mount_hints"]["export"] = "10.0.0.1:/x,suid"
    with pytest.raises(InvalidArgument, match="mount_hints.export"):
        h.execute_post_hook(bad, None)
    with pytest.raises(InvalidArgument, match="host 'other'"):
        h.execute_post_hook(make(2, host="other"), None)
    with pytest.raises(InvalidArgument, match="20-digit|seq: above"):
        h.execute_post_hook(make(10 ** 20), None)
    assert names(spool_dir) == []


def test_oversized_record_refused(spool_dir):
    h = hook(spool_dir)
    big = periodic(1, nshares=9000)
    assert len(rec.dumps(big)) > rec.MAX_RECORD_BYTES
    with pytest.raises(InvalidArgument, match="more than"):
        h.execute_periodic_hook(big)
    assert names(spool_dir) == []


def test_bad_host_id_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="host id"):
        SpoolHook("main", None, HookContext("../x", str(tmp_path)))
    with pytest.raises(InvalidArgument, match="host id"):
        SpoolHook("main", None, HookContext("host\n", str(tmp_path)))
    assert not os.listdir(tmp_path)


def test_symlinked_host_dir_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "spool").mkdir()
    os.symlink(target, tmp_path / "spool" / HOST)
    with pytest.raises(Exception, match="not a directory"):
        SpoolHook("main", None, HookContext(HOST, str(tmp_path / "spool")))


def test_retention_by_count_keeps_newest_periodic_per_backend(spool_dir):
    a, b = hook(spool_dir, "a", count=5), hook(spool_dir, "b", count=5)
    a.execute_periodic_hook(periodic(1, "a"))
    b.execute_periodic_hook(periodic(2, "b"))
    a.execute_periodic_hook(periodic(3, "a"))
    for s in range(4, 21):
        (a if s % 2 else b).execute_post_hook(make(s), None)
    # 5 records: the newest periodic of a (3) and b (2) count, plus 3 newest.
    assert seqs(spool_dir) == [2, 3, 18, 19, 20]
    a.execute_periodic_hook(periodic(21, "a"))
    assert seqs(spool_dir) == [2, 18, 19, 20, 21]   # 3 is no longer a's newest


def test_retention_by_age(spool_dir, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(spool, "_now", lambda: clock[0])
    h = hook(spool_dir, "a", seconds=100)
    h.execute_post_hook(make(1), None)
    h.execute_periodic_hook(periodic(2, "a"))
    h.execute_periodic_hook(periodic(3, "b"))
    h.execute_post_hook(make(4), None)
    clock[0] = 1050.0
    h.execute_post_hook(make(5), None)
    assert seqs(spool_dir) == [1, 2, 3, 4, 5]
    clock[0] = 1101.0
    h.execute_post_hook(make(6), None)
    # 1 and 4 are too old; 2 and 3 are the newest periodic of a and of b.
    assert seqs(spool_dir) == [2, 3, 5, 6]
    clock[0] = 5000.0
    h.execute_periodic_hook(periodic(7, "a"))
    assert seqs(spool_dir) == [3, 7]


def test_restart_rebuilds_index_from_one_scan(spool_dir, monkeypatch):
    h = hook(spool_dir, "a")
    h.execute_periodic_hook(periodic(1, "a"))
    h.execute_periodic_hook(periodic(2, "b"))
    h.execute_periodic_hook(periodic(3, "a"))
    for s in range(4, 9):
        h.execute_post_hook(make(s), None)
    host_dir = os.path.join(spool_dir, HOST)
    old = 1_000_000.0
    for n in names(spool_dir):
        if int(n[:20]) <= 6:
            os.utime(os.path.join(host_dir, n), (old, old))
    pathlib.Path(host_dir, ".00000000000000000009-post-allow_access.json.x1").write_bytes(b"{")
    pathlib.Path(host_dir, ".keep").write_bytes(b"")          # not ours: stays
    os.mkdir(os.path.join(host_dir, "00000000000000000000-periodic-periodic.json"))
    os.mkfifo(os.path.join(host_dir, "00000000000000099999-periodic-periodic.json"))
    # A new process: forget everything, rebuild from the directory.
    restart()
    reads = []
    real = spool._HostSpool._read_field
    monkeypatch.setattr(spool._HostSpool, "_read_field",
                        lambda self, e, f: reads.append((e.seq, f)) or real(self, e, f))
    monkeypatch.setattr(spool, "_now", lambda: old + 3600)
    h2 = hook(spool_dir, "a", seconds=600)
    assert [n for n in os.listdir(host_dir) if n.startswith(".")] == [".keep"]
    h2.execute_post_hook(make(9), None)
    h2.execute_post_hook(make(10), None)
    # mtime says 1..6 are an hour old; 2 and 3 are the newest periodic of b, a.
    # Entries that are not regular record files are left alone.
    assert os.path.exists(os.path.join(host_dir, ".keep"))
    assert names(spool_dir) == sorted(
        ["00000000000000000000-periodic-periodic.json",
         "00000000000000099999-periodic-periodic.json"]
        + [rec.file_name(periodic(2)), rec.file_name(periodic(3))]
        + [rec.file_name(make(s)) for s in (7, 8, 9, 10)])
    # Only the epoch (newest record) and periodic backends were parsed, once each.
    fields = sorted(reads)
    assert ("epoch" in {f for _, f in fields}) and len(fields) == len(set(fields))
    assert {s for s, f in fields if f == "backend"} <= {1, 2, 3}


def test_new_epoch_clears_old_records(spool_dir):
    h = hook(spool_dir)
    for s in (40, 41, 42):
        h.execute_post_hook(make(s), None)
    h.execute_periodic_hook(periodic(43))
    restart()                              # the epoch is read from disk
    h2 = hook(spool_dir)
    h2.execute_post_hook(make(1, epoch="f" * 32), None)
    assert seqs(spool_dir) == [1]
    with open(os.path.join(spool_dir, HOST, names(spool_dir)[0]), "rb") as f:
        assert rec.loads(f.read())["epoch"] == "f" * 32


def test_removed_host_dir_is_recreated(spool_dir):
    h = hook(spool_dir, count=3)
    h.execute_post_hook(make(1), None)
    spool._host_spool(os.path.join(spool_dir, HOST)).settle()   # its spares made
    shutil.rmtree(spool_dir)
    h.execute_post_hook(make(2), None)
    h.execute_post_hook(make(3), None)
    assert seqs(spool_dir) == [2, 3]
    assert stat.S_IMODE(os.stat(os.path.join(spool_dir, HOST)).st_mode) == 0o755


def test_records_are_written_into_files_made_ahead(spool_dir, monkeypatch):
    """A record's file is one of the spares made ahead by a thread of their
    own: writing it allocates no inode (that waits behind flushes in
    progress and, on ext4 without a journal, scans recently deleted
    inodes). Spares are dot files, skipped by readers; the ones a crashed
    process left are removed at start; a spare that is no longer an empty
    file of ours (here a FIFO) is dropped with the others, and the record
    goes into a new file."""
    h = hook(spool_dir)
    host_dir = os.path.join(spool_dir, HOST)
    h.execute_post_hook(make(1), None)           # no spares yet: a new file; a refill starts
    spool._host_spool(host_dir).settle()
    spares = {n: os.stat(os.path.join(host_dir, n)).st_ino for n in os.listdir(host_dir)
              if spool.SPARE_RE.fullmatch(n)}
    assert len(spares) == spool.SPARES_BATCH
    assert all(os.stat(os.path.join(host_dir, n)).st_size == 0 for n in spares)
    assert temp_files(host_dir) == [] and names(spool_dir) == [rec.file_name(make(1))]

    created = []
    real_create = spool._create
    monkeypatch.setattr(spool, "_create", lambda p: created.append(p) or real_create(p))
    path = h.write(make(2))
    assert created == []                         # nothing made on the record's path
    left = {n for n in os.listdir(host_dir) if spool.SPARE_RE.fullmatch(n)}
    (used,) = set(spares) - left
    assert os.stat(path).st_ino == spares[used]
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o644)
    assert rec.loads(pathlib.Path(path).read_bytes())["seq"] == 2

    hs = spool._host_spool(host_dir)
    nxt = hs._spares[-1]                         # replaced by a FIFO: must not block
    os.unlink(nxt)
    os.mkfifo(nxt, 0o644)
    h.execute_post_hook(make(3), None)
    hs.settle()
    assert not os.path.lexists(nxt)              # dropped, with every other spare
    assert not (left - {os.path.basename(nxt)}) & set(os.listdir(host_dir))
    assert len(hs._spares) == spool.SPARES_BATCH  # and made anew
    assert names(spool_dir) == [rec.file_name(make(s)) for s in (1, 2, 3)]
    assert temp_files(host_dir) == []

    restart()                                    # a new process: the spares go
    hook(spool_dir)
    assert [n for n in os.listdir(host_dir) if n.startswith(".")] == []
    assert names(spool_dir) == [rec.file_name(make(s)) for s in (1, 2, 3)]


def test_a_staged_record_whose_call_timed_out_is_finished_for_the_next_hooks(tmp_path):
    """The staged call signs and checks its record in its thread. If it
    times out first (errors suppressed), the next hook still gets the record
    finished (checked); one that does not match the schema reaches the
    runner as RecordError, as when the record is built, never as that
    hook's failure."""
    import asyncio
    from types import SimpleNamespace

    from sharedd.hooks.base import Hook
    from sharedd.hooks.manager import HookManager, Staged

    cfg = SimpleNamespace(hook_drivers=[], hook_timeout=0.05, suppress_pre_hooks_errors=True,
                          suppress_post_hooks_errors=True)
    ctx = HookContext(HOST, str(tmp_path))
    seen = []

    class Later(Hook):
        blocking = False

        def execute_pre_hook(self, record):
            seen.append(record)

    mgr = HookManager("main", cfg, ctx)
    mgr.hooks = [Hook("main", cfg, ctx), Later("main", cfg, ctx)]

    async def pre(record):
        staged = Staged()
        staged.record = record
        staged.future = asyncio.get_running_loop().create_future()   # never done
        return await mgr.pre(staged)

    assert asyncio.run(pre(make(1))) == [None, None]
    assert isinstance(seen[0], rec.Checked) and seen[0]["seq"] == 1
    bad = make(2)
    bad["share"]["mount_hints"]["export"] = "10.0.0.1:/x,suid"
    with pytest.raises(rec.RecordError, match="mount_hints.export"):
        asyncio.run(pre(bad))
    assert len(seen) == 1


# --- dbus hook ---------------------------------------------------------------

def test_dbus_hook_emits_the_spool_record(spool_dir):
    calls = []
    ctx = HookContext(HOST, spool_dir, emit_signal=lambda *a: calls.append(a))
    d, s = DbusSignalHook("main", None, ctx), SpoolHook("main", None, ctx)
    records = [make(1, "pre-deny_access"), make(2, "post-deny_access"), periodic(3)]
    assert d.execute_pre_hook(records[0]) is None
    assert d.execute_post_hook(records[1], None) is None
    assert d.execute_periodic_hook(records[2]) is None
    s.execute_pre_hook(records[0])
    s.execute_post_hook(records[1], None)
    s.execute_periodic_hook(records[2])
    assert [c[:2] for c in calls] == [("pre", "deny_access"), ("post", "deny_access"),
                                      ("periodic", "periodic")]
    for (phase, method, text), r in zip(calls, records):
        assert text == json.dumps(r, sort_keys=True)
        with open(os.path.join(spool_dir, HOST, rec.file_name(r)), "rb") as f:
            assert json.loads(text) == rec.loads(f.read())


def test_dbus_hook_without_bus_logs_once(caplog, tmp_path):
    ctx = HookContext(HOST, str(tmp_path))
    d = DbusSignalHook("main", None, ctx)
    with caplog.at_level(logging.DEBUG, logger="sharedd.hooks.dbus_signal"):
        d.execute_pre_hook(make(1, "pre-allow_access"))
        d.execute_post_hook(make(2), None)
    assert len([r for r in caplog.records if "no bus" in r.getMessage()]) == 1
    calls = []
    ctx.emit_signal = lambda *a: calls.append(a)     # the bus attaches later
    d.execute_post_hook(make(3), None)
    assert len(calls) == 1


def test_dbus_hook_refuses_invalid_record(tmp_path):
    calls = []
    d = DbusSignalHook("main", None, HookContext(HOST, str(tmp_path),
                                                 emit_signal=lambda *a: calls.append(a)))
    bad = make(1)
    bad["password"] = "x"
    with pytest.raises(InvalidArgument, match="unexpected key 'password'"):
        d.execute_post_hook(bad, None)
    assert calls == []
