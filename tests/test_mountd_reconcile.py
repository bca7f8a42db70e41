"""Reconciliation against the real kernel mount table: a RecordingMounter
makes real bind mounts; mountinfo is parsed from /proc/self/mountinfo."""

import dataclasses
import json
import logging
import os
import pathlib
import stat
import subprocess
import threading

from mountd.reconcile import Identity, Reconciler, desired_mounts
from mountd.records import RecordSource
from mountd.state import StateStore, read_mountinfo, top_mounts
from tests.fixtures.mountd_env import (CLIENT4, HOST, RecordingMounter, make_record, make_share,
                                       mounts_under, rule, write_record)

EXTRA = {"NFS": [], "GLUSTERFS": []}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def make_rec(tmp, fail=None, clock=None):
    mounter = RecordingMounter(os.path.join(tmp, "src"), fail=fail)
    rec = Reconciler(os.path.join(tmp, "mnt"), mounter, StateStore(os.path.join(tmp, "state")),
                     clock=clock or Clock())
    return mounter, rec


def desired(*shares, addrs=(CLIENT4,)):
    return desired_mounts({HOST: {s["id"]: s for s in shares}}, Identity(addrs), ("NFS",),
                          EXTRA, False)


def entry(mp):
    return top_mounts(read_mountinfo()).get(mp)


def test_mount_is_idempotent_and_survives_a_restart(mountd_tmp):
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule("10.74.0.0/24", "ro")])
    mounter, rec = make_rec(mountd_tmp)
    out = rec.run(desired(a, b))
    mp_a = os.path.join(mountd_tmp, "mnt", f"alpha-{a['id'][:8]}")
    mp_b = os.path.join(mountd_tmp, "mnt", f"beta-{b['id'][:8]}")
    assert sorted(e[:3] for e in out.events) == sorted([("Mounted", a["id"], mp_a),
                                                       ("Mounted", b["id"], mp_b)])
    assert entry(mp_a) is not None and not entry(mp_a).read_only
    assert entry(mp_b).read_only
    assert {"nosuid", "nodev"} <= set(entry(mp_a).mount_options)
    assert stat.S_IMODE(os.stat(os.path.join(mountd_tmp, "mnt")).st_mode) == 0o755
    before = len(mounter.calls)
    assert rec.run(desired(a, b)).events == []
    assert len(mounter.calls) == before
    # Restart: a new reconciler reads the persisted state and changes nothing.
    mounter2, rec2 = make_rec(mountd_tmp)
    assert rec2.run(desired(a, b)).events == []
    assert mounter2.calls == []
    assert mounts_under(os.path.join(mountd_tmp, "mnt")).count(mp_a) == 1
    state = json.loads(pathlib.Path(mountd_tmp, "state", "mounts.json").read_text())
    assert {m["share_id"]: m["state"] for m in state["mounts"]} == {a["id"]: "mounted",
                                                                    b["id"]: "mounted"}
    assert rec2.mounts_table()[0][4] == "mounted"


def test_level_changes_remount_and_withdrawal_unmounts(mountd_tmp):
    r_rw = rule(CLIENT4, "rw")
    a = make_share(name="alpha", rules=[r_rw, rule("10.74.0.0/24", "ro")])
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired(a))
    mp = rec.mounts[a["id"]].mount_point
    assert not entry(mp).read_only
    # pre deny_access: the rw rule is 'denying' -> ro
    a_deny = dict(a, access_rules=[dict(r_rw, state="denying"), a["access_rules"][1]])
    out = rec.run(desired(a_deny))
    assert out.events == [("Mounted", a["id"], mp, "ro")]
    assert entry(mp).read_only and "remount" in mounter.actions()
    # and back to rw
    rec.run(desired(a))
    assert not entry(mp).read_only
    # no rule left: unmounted, mount point removed, forgotten
    out = rec.run(desired(dict(a, access_rules=[])))
    assert out.events == [("Unmounted", a["id"], mp)]
    assert entry(mp) is None and not os.path.exists(mp)
    assert rec.mounts == {}


def test_deleted_share_is_unmounted_from_pre_record(mountd_tmp):
    spool = os.path.join(mountd_tmp, "spool")
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    write_record(spool, make_record(1, "post", "allow_access", share=a))
    src = RecordSource(spool, (0,))
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired_mounts(src.scan(), Identity((CLIENT4,)), ("NFS",), EXTRA, False))
    assert rec.mounted_count() == 1
    write_record(spool, make_record(2, "pre", "delete_share", share=dict(a, status="deleting")))
    out = rec.run(desired_mounts(src.scan(), Identity((CLIENT4,)), ("NFS",), EXTRA, False))
    assert [e[0] for e in out.events] == ["Unmounted"]
    assert rec.mounted_count() == 0


def test_touches_only_mounts_it_made(mountd_tmp):
    mnt = os.path.join(mountd_tmp, "mnt")
    foreign_src = os.path.join(mountd_tmp, "foreign")
    os.makedirs(foreign_src)
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule(CLIENT4, "rw")])
    mp_b = os.path.join(mnt, f"beta-{b['id'][:8]}")
    # Someone else's mounts: one beside mountd's, one exactly where beta would go.
    for mp in (os.path.join(mnt, "admin mount"), mp_b):
        os.makedirs(mp)
        subprocess.run(["mount", "--bind", foreign_src, mp], check=True)
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired(a, b))
    assert rec.mounts[a["id"]].state == "mounted"
    assert rec.mounts[b["id"]].state == "failed"
    assert "did not make" in rec.mounts[b["id"]].error
    assert ("mount", b["id"]) not in [c[:2] for c in mounter.calls]
    # Withdraw everything: mountd unmounts alpha only.
    rec.run({})
    assert entry(os.path.join(mnt, "admin mount")) is not None
    assert entry(mp_b) is not None
    assert [c for c in mounter.calls if c[0] == "unmount"] == [
        ("unmount", os.path.join(mnt, f"alpha-{a['id'][:8]}"))]
    # A state file that names a mount it did not make (wrong mount id): left alone.
    store = StateStore(os.path.join(mountd_tmp, "state"))
    mounter2, rec2 = make_rec(mountd_tmp)
    rec2.run(desired(a))
    own = rec2.mounts[a["id"]]
    own.mount_id += 100000
    store.save(rec2.mounts)
    mounter3, rec3 = make_rec(mountd_tmp)
    rec3.run({})
    assert entry(own.mount_point) is not None
    assert mounter3.calls == []


def test_mount_removed_behind_its_back_is_mounted_again(mountd_tmp):
    a = make_share(name="alpha", rules=[rule(CLIENT4, "ro")])
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired(a))
    mp = rec.mounts[a["id"]].mount_point
    subprocess.run(["umount", mp], check=True)
    out = rec.run(desired(a))
    assert out.events == [("Mounted", a["id"], mp, "ro")]
    assert entry(mp).read_only


def test_a_mount_id_given_to_another_mount_is_not_taken_for_ours(mountd_tmp):
    """The kernel hands a freed mount id to the next mount made anywhere (a
    share mounted beside in the pool, often). The reuse is made certain
    here: mountinfo reports a real foreign mount under our old id."""
    foreign_src = os.path.join(mountd_tmp, "foreign")
    foreign_mp = os.path.join(mountd_tmp, "elsewhere")
    os.makedirs(foreign_src)
    os.makedirs(foreign_mp)
    reuse = {}

    def mountinfo():
        out = []
        for e in read_mountinfo():
            if e.mount_point == foreign_mp and reuse:
                e = dataclasses.replace(e, mount_id=reuse["id"])
            out.append(e)
        return out

    class Reusing(RecordingMounter):
        def unmount(self, mount_point, revoking=False):
            result = super().unmount(mount_point, revoking)
            subprocess.run(["mount", "--bind", foreign_src, foreign_mp], check=True)
            return result

    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    mounter = Reusing(os.path.join(mountd_tmp, "src"))
    rec = Reconciler(os.path.join(mountd_tmp, "mnt"), mounter,
                     StateStore(os.path.join(mountd_tmp, "state")), mountinfo=mountinfo)
    rec.run(desired(a))
    mp = rec.mounts[a["id"]].mount_point
    reuse["id"] = rec.mounts[a["id"]].mount_id
    # Withdrawn: the unmount worked although the old id is in the table again.
    out = rec.run({})
    assert out.events == [("Unmounted", a["id"], mp)] and rec.mounts == {}
    subprocess.run(["umount", foreign_mp], check=True)
    # Removed behind mountd's back while the id lives on elsewhere: not
    # "covered by another mount" but gone, so mounted again.
    rec.run(desired(a))
    reuse["id"] = rec.mounts[a["id"]].mount_id
    subprocess.run(["umount", mp], check=True)
    subprocess.run(["mount", "--bind", foreign_src, foreign_mp], check=True)
    out = rec.run(desired(a))
    assert out.events == [("Mounted", a["id"], mp, "rw")]
    assert rec.mounts[a["id"]].owns(entry(mp))
    rec.close(wait=True)


def test_failed_mount_is_retried_with_backoff(mountd_tmp):
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    clock = Clock()
    fail = {a["id"]}
    mounter, rec = make_rec(mountd_tmp, fail=fail, clock=clock)
    out = rec.run(desired(a))
    own = rec.mounts[a["id"]]
    assert own.state == "failed" and own.failures == 1 and "simulated" in own.error
    assert out.next_retry == own.next_attempt > clock.now
    first_delay = own.next_attempt - clock.now
    rec.run(desired(a))
    assert mounter.actions().count("mount") == 1          # not before the retry time
    clock.now = own.next_attempt + 1
    rec.run(desired(a))
    assert mounter.actions().count("mount") == 2
    assert own.failures == 2 and own.next_attempt - clock.now == 2 * first_delay
    # Survives a restart: the failure is remembered, not forgotten.
    _, rec2 = make_rec(mountd_tmp, clock=clock)
    assert rec2.mounts[a["id"]].state == "failed"
    fail.clear()
    clock.now = own.next_attempt + 1
    rec.run(desired(a))
    assert rec.mounts[a["id"]].state == "mounted" and rec.mounts[a["id"]].failures == 0


def test_interrupted_mount_is_adopted_not_doubled(mountd_tmp):
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired(a))
    own = rec.mounts[a["id"]]
    # As if mountd crashed after mounting but before recording the result.
    own.state, own.mount_id = "mounting", None
    rec.store.save(rec.mounts)
    mounter2, rec2 = make_rec(mountd_tmp)
    rec2.run(desired(a))
    assert mounter2.actions() == []
    assert rec2.mounts[a["id"]].state == "mounted"
    assert mounts_under(own.mount_point) == [own.mount_point]


def test_name_clash_gets_distinct_mount_points(mountd_tmp):
    sid1 = "abcdef01" + "0" * 24
    sid2 = "abcdef01" + "1" * 24
    a = make_share(sid1, name="same", rules=[rule(CLIENT4)])
    b = make_share(sid2, name="same", rules=[rule(CLIENT4)])
    _, rec = make_rec(mountd_tmp)
    rec.run(desired(a, b))
    mps = {m.mount_point for m in rec.mounts.values()}
    assert len(mps) == 2 and all(entry(mp) is not None for mp in mps)


def test_hostile_spool_files_are_logged_and_mount_nothing(mountd_tmp, caplog):
    spool = os.path.join(mountd_tmp, "spool")
    host = os.path.join(spool, HOST)
    os.makedirs(host, mode=0o755)
    grant = make_share(name="evil", rules=[rule(CLIENT4, "rw")])
    good = json.dumps(make_record(1, "post", "allow_access", share=grant)).encode()
    name = lambda seq: os.path.join(host, f"{seq:020d}-post-allow_access.json")
    # a symlink to a valid record elsewhere
    elsewhere = os.path.join(mountd_tmp, "elsewhere.json")
    pathlib.Path(elsewhere).write_bytes(good)
    os.symlink(elsewhere, name(1))
    # valid record owned by a user mountd does not trust
    pathlib.Path(name(2)).write_bytes(good.replace(b'"seq": 1', b'"seq": 2'))
    os.chown(name(2), 65534, 65534)
    # not JSON; too large; a FIFO; schema-invalid (option injection in the export)
    pathlib.Path(name(3)).write_bytes(b"{not json")
    pathlib.Path(name(4)).write_bytes(b" " * (4 * 1024 * 1024 + 10))
    os.mkfifo(name(5))
    bad = make_record(6, "post", "allow_access", share=grant)
    bad["share"]["mount_hints"]["export"] = "-o suid,dev 10.74.0.1:/x"
    pathlib.Path(name(6)).write_text(json.dumps(bad))
    # a dot-file (temporary) is skipped without a word
    pathlib.Path(host, f".{1:020d}-post-allow_access.json.tmp").write_bytes(good)
    src = RecordSource(spool, (0,))
    mounter, rec = make_rec(mountd_tmp)
    with caplog.at_level(logging.ERROR):
        shares = src.scan()
        rec.run(desired_mounts(shares, Identity((CLIENT4,)), ("NFS",), EXTRA, False))
    assert shares.get(HOST, {}) == {}
    assert mounter.calls == [] and rec.mounts == {}
    rejected = [r.getMessage() for r in caplog.records if "spool file rejected" in r.getMessage()]
    assert len(rejected) == 6, rejected
    assert src.rejected == 6
    # Each rejection is logged once, not on every rescan.
    caplog.clear()
    src.scan()
    assert not [r for r in caplog.records if "spool file rejected" in r.getMessage()]


def test_mountinfo_parser_handles_escapes_on_a_real_mount(mountd_tmp):
    src = os.path.join(mountd_tmp, "src dir")
    mp = os.path.join(mountd_tmp, "mount point\twith\\odd")
    os.makedirs(src)
    os.makedirs(mp)
    subprocess.run(["mount", "--bind", "-o", "ro", src, mp], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", mp], check=True)
    e = entry(mp)
    assert e is not None and e.mount_point == mp and e.read_only
    assert e.root.endswith("/src dir") or e.root == "/"


class HangingMounter(RecordingMounter):
    """Mounting the shares in `hang` blocks until `release` is set (a dead
    server), the others are real bind mounts."""

    def __init__(self, source_dir, hang):
        super().__init__(source_dir)
        self.hang = hang
        self.release = threading.Event()

    def mount(self, d, mount_point):
        if d.share_id in self.hang:
            self.calls.append(("hanging", d.share_id))
            assert self.release.wait(60), "never released"
            raise RuntimeError("server did not answer")
        super().mount(d, mount_point)


def test_a_hanging_mount_delays_no_other_share_and_no_revoke(mountd_tmp):
    dead = make_share(name="dead", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule(CLIENT4, "rw")])
    c = make_share(name="gamma", rules=[rule(CLIENT4, "ro")])
    mounter = HangingMounter(os.path.join(mountd_tmp, "src"), {dead["id"]})
    finished = threading.Event()
    rec = Reconciler(os.path.join(mountd_tmp, "mnt"), mounter,
                     StateStore(os.path.join(mountd_tmp, "state")), clock=Clock(),
                     pass_wait=0.5, on_done=finished.set)
    try:
        rec.run(desired(b, c))
        mp_c = rec.mounts[c["id"]].mount_point
        # The dead server's mount hangs; beta's level change and gamma's
        # revoke in the same pass, and a new share in the next, go on.
        b_ro = dict(b, access_rules=[rule(CLIENT4, "ro")])
        out = rec.run(desired(dead, b_ro))
        assert ("Unmounted", c["id"], mp_c) in out.events and entry(mp_c) is None
        assert entry(rec.mounts[b["id"]].mount_point).read_only
        assert rec.busy() == [dead["id"]] and not finished.is_set()
        d = make_share(name="delta", rules=[rule(CLIENT4, "rw")])
        out = rec.run(desired(dead, b_ro, d))
        assert [e[:2] for e in out.events] == [("Mounted", d["id"])]
        assert [c for c in mounter.calls if c[0] == "hanging"] == [("hanging", dead["id"])], \
            "a pass leaves a share whose command still runs alone"
        # The dead server answers at last (a failure): the caller is told.
        mounter.release.set()
        assert finished.wait(10)
        rec.run(desired(dead, b_ro, d))
        assert rec.busy() == [] and rec.mounts[dead["id"]].state == "failed"
        assert "did not answer" in rec.mounts[dead["id"]].error
    finally:
        mounter.release.set()
        rec.close(wait=True)


class ProbedMounter(RecordingMounter):
    """Bind mounts whose health probe answers as told (the real probe is
    `stat -f` in a child; see the guest test for a real dead server)."""

    def __init__(self, source_dir):
        super().__init__(source_dir)
        self.answer = None        # None: fine; else the error text

    def probe(self, mount_point, timeout):
        self.calls.append(("probe", mount_point))
        if self.answer:
            raise RuntimeError(self.answer)


def test_health_checks_report_stale_and_mount_a_stale_handle_again(mountd_tmp):
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    mounter = ProbedMounter(os.path.join(mountd_tmp, "src"))
    rec = Reconciler(os.path.join(mountd_tmp, "mnt"), mounter,
                     StateStore(os.path.join(mountd_tmp, "state")), clock=Clock())
    try:
        rec.run(desired(a))
        mp = rec.mounts[a["id"]].mount_point

        def check():
            rec.check_health(5)
            assert rec.wait_idle(10)      # the probes have run
            return rec.run(desired(a))
        mounter.answer = "stat -f timed out after 5s"
        out = check()
        assert rec.mounts[a["id"]].state == "stale" and out.changed
        assert entry(mp) is not None, "a share that does not answer stays mounted"
        assert rec.mounted_count() == 0
        mounter.answer = None
        check()
        assert rec.mounts[a["id"]].state == "mounted"
        mounter.answer = "stat: cannot read file system information: Stale file handle"
        out = check()
        assert ("Unmounted", a["id"], mp) in out.events
        assert ("Mounted", a["id"], mp, "rw") in out.events, "mounted again by the same pass"
        assert rec.mounts[a["id"]].state == "mounted"
    finally:
        rec.close(wait=True)


def test_a_flood_of_rejected_spool_files_is_a_few_log_lines(mountd_tmp, caplog, monkeypatch):
    """A writer of the spool may make thousands of files mountd refuses:
    each is refused, at most REFUSAL_LOG_LINES of them a minute in a line
    of its own."""
    from sharedd import refusals
    from sharedd.refusals import REFUSAL_LOG_LINES
    spool = os.path.join(mountd_tmp, "flooded")
    host = os.path.join(spool, HOST)
    os.makedirs(host)
    for seq in range(1, 301):
        pathlib.Path(host, f"{seq:020d}-post-allow_access.json").write_text("{not json")
    src = RecordSource(spool, (0,))
    with caplog.at_level(logging.ERROR):
        src.scan()
    assert src.rejected == 300
    lines = [r.getMessage() for r in caplog.records if "spool file rejected" in r.getMessage()]
    assert len(lines) == REFUSAL_LOG_LINES, len(lines)
    # the rest in one line, at the first scan after the interval (the scans
    # run in a thread: no timer)
    monkeypatch.setattr(refusals, "REFUSAL_LOG_INTERVAL", 0.0)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        src.scan()
    assert [r.getMessage() for r in caplog.records] == [
        f"refused {300 - REFUSAL_LOG_LINES} more spool file(s) from 1 sender(s), not logged "
        f"one by one (at most {REFUSAL_LOG_LINES} lines every 0s)"]


def test_mounts_a_user_puts_on_a_share_do_not_hold_back_its_revocation(mountd_tmp):
    """Any local user who may write in a share may mount something in it or
    over it (FUSE; here tmpfs stands for it): write access that is lowered,
    and access that is withdrawn, go anyway, with those mounts."""
    a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")])
    b = make_share(name="beta", rules=[rule(CLIENT4, "rw")])
    mounter, rec = make_rec(mountd_tmp)
    rec.run(desired(a, b))
    mp_a, mp_b = rec.mounts[a["id"]].mount_point, rec.mounts[b["id"]].mount_point

    def tmpfs(where):
        os.makedirs(where, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where], check=True,
                       capture_output=True, timeout=30)
    # alpha: covered twice (a mount on the share, and one on that); beta: a
    # mount inside it, kept busy
    tmpfs(mp_a)
    tmpfs(mp_a)
    tmpfs(os.path.join(mp_b, "inner"))
    busy = subprocess.Popen(["sleep", "60"], cwd=os.path.join(mp_b, "inner"))
    try:
        lowered = make_share(a["id"], name="alpha", rules=[rule(CLIENT4, "ro")])
        out = rec.run(desired(lowered, b))
        assert ("Mounted", a["id"], mp_a, "ro") in out.events
        assert entry(mp_a).read_only and rec.mounts[a["id"]].owns(entry(mp_a))
        tmpfs(mp_a)
        out = rec.run({})          # both withdrawn
        assert sorted(e[:2] for e in out.events) == sorted([("Unmounted", a["id"]),
                                                            ("Unmounted", b["id"])])
        assert rec.mounts == {}
        left = {e.mount_point for e in read_mountinfo()}
        assert not {mp_a, mp_b, os.path.join(mp_b, "inner")} & left
    finally:
        busy.kill()
        busy.wait()
    rec.close(wait=True)
