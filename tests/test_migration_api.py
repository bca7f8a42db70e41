"""Migration and Job objects over D-Bus, against the real daemon on a private
bus with two in-memory backends (no storage; the copy advances in steps
whose pace the test sets through the driver's control file). Storage-backed
migrations are tested in test_migration_btrfs.py.

Proves: Migrate returns a job object at once; its properties (Operation,
Objects, StartedByUID from the bus daemon, Progress rising monotonically in
PropertiesChanged, Cancelable); Completed fires once and the object is
removed (InterfacesRemoved); Cancel and CancelMigration leave the source
serving; wait_for_complete and CompleteMigration; refusals are named errors
that change nothing; the shipped Job and Share XML match the live objects.
"""

import json
import os
import subprocess
import time

from tests.support.signals import SignalCollector
from tests.support.tenants import wait_for
from tests.test_api_memory import CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = "org.sharedd.Sharedd1.Job"
SHARE = "org.sharedd.Sharedd1.Share"
ERR = "org.sharedd.Sharedd1.Error."


def pace(d, seconds):
    """Each of the memory driver's ten copy steps takes this long (both backends)."""
    for b in ("mem1", "mem2"):
        path = os.path.join(d.workdir, "state", "backends", b, "control.json")
        with open(path, "w") as f:
            json.dump({"sleep": {"migration_step": seconds}}, f)


def completed(msgs, job):
    return [m.body for m in msgs if m.member == "Completed" and m.path == job]


def test_migrate_returns_a_job_that_reports_progress_and_completes_once(sharedd_factory,
                                                                         system_bus):
    d = sharedd_factory(CONFIG)
    path = d.create_share("moving", "NFS", 1)
    rid = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.6.0.1", "rw", 0)
    pace(d, 0.3)
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = d.share(path, "Migrate", "sa{sv}", "mem2", 0)
        assert job.startswith("/org/sharedd/Sharedd1/job/")
        assert d.get(job, JOB, "Operation") == "migration_start"
        assert d.get(job, JOB, "Objects") == [path]
        assert d.get(job, JOB, "StartedByUID") == 0          # root, as the bus daemon says
        assert d.get(job, JOB, "Cancelable") is True
        assert d.get(job, JOB, "StartTime") > 0
        assert d.share_prop(path, "Status") == "migrating"
        # The shipped interface descriptions match the live objects, the job's too.
        proc = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "tools", "gen-dbus-xml"),
                               "--check"], capture_output=True, text=True,
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address))
        assert proc.returncode == 0, proc.stderr
        # A revocation goes on while the copy runs.
        d.share(path, "DenyAccess", "sa{sv}", rid, 0)
        assert d.share_prop(path, "AccessRules") == []
        wait_for("Completed", lambda: completed(sig.messages, job))
        time.sleep(0.3)
        msgs = list(sig.messages)
    finally:
        sig.close()
    assert completed(msgs, job) == [[True, "done"]]
    progress = [m.body[1]["Progress"].value for m in msgs
                if m.member == "PropertiesChanged" and m.path == job and "Progress" in m.body[1]]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 1.0
    removed = [m.body[0] for m in msgs if m.member == "InterfacesRemoved"]
    assert job in removed
    # The object is gone (dbus-next answers for a path without it).
    assert "org.freedesktop.DBus.Error.Unknown" in d.error(job, JOB, "Cancel", "a{sv}", 0)
    assert d.share_prop(path, "Backend") == "mem2"
    assert d.share_prop(path, "Status") == "available"
    assert d.share_prop(path, "ExportLocations") == [f"mem:/{path.rsplit('/', 1)[1]}"]


def test_cancel_wait_for_complete_and_refusals(sharedd_factory, system_bus):
    d = sharedd_factory(CONFIG)
    path = d.create_share("staying", "NFS", 1)
    other = d.create_share("other", "NFS", 1)
    d.share(other, "CreateSnapshot", "sa{sv}", "snap", 0)
    for args, error in [(("mem1", 0), "InvalidArgument"), (("nosuch", 0), "NotFound"),
                        (("mem2", 1, "wait_for_complete", "s", "yes"), "InvalidArgument"),
                        (("mem2", 1, "bogus", "b", "true"), "InvalidArgument")]:
        assert ERR + error in d.error(path, SHARE, "Migrate", "sa{sv}", *args)
    assert ERR + "InvalidState" in d.error(other, SHARE, "Migrate", "sa{sv}", "mem2", 0)
    assert ERR + "InvalidState" in d.error(path, SHARE, "CompleteMigration", "a{sv}", 0)
    assert ERR + "InvalidState" in d.error(path, SHARE, "CancelMigration", "a{sv}", 0)
    assert d.share_prop(path, "Status") == "available"

    # Job.Cancel while copying: the source stays, nothing on mem2.
    pace(d, 0.5)
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = d.share(path, "Migrate", "sa{sv}", "mem2", 0)
        assert ERR + "InvalidState" in d.error(path, SHARE, "Migrate", "sa{sv}", "mem2", 0)
        d.call(job, JOB, "Cancel", "a{sv}", 0)
        wait_for("Completed", lambda: completed(sig.messages, job))
        ok, message = completed(sig.messages, job)[0]
        assert not ok and "cancelled" in message
        assert d.share_prop(path, "Status") == "available"
        assert d.share_prop(path, "Backend") == "mem1"

        # wait_for_complete: the job ends after the copy; the share waits.
        pace(d, 0.02)
        job = d.share(path, "Migrate", "sa{sv}", "mem2", 1, "wait_for_complete", "b", "true")
        wait_for("Completed", lambda: completed(sig.messages, job))
        assert completed(sig.messages, job) == [[True, "done"]]
        assert d.share_prop(path, "Status") == "migrating"
        assert ERR + "InvalidState" in d.error(path, SHARE, "AllowAccess", "sssa{sv}", "ip",
                                               "10.6.0.9", "rw", 0)
        d.share(path, "CancelMigration", "a{sv}", 0)
        assert d.share_prop(path, "Status") == "available"
        assert d.share_prop(path, "Backend") == "mem1"

        job = d.share(path, "Migrate", "sa{sv}", "mem2", 1, "wait_for_complete", "b", "true")
        wait_for("Completed", lambda: completed(sig.messages, job))
        done = d.share(path, "CompleteMigration", "a{sv}", 0)
        assert d.get(done, JOB, "Operation") == "migration_complete"
        wait_for("Completed", lambda: completed(sig.messages, done))
        assert completed(sig.messages, done) == [[True, "done"]]
    finally:
        sig.close()
    assert d.share_prop(path, "Backend") == "mem2"
    assert d.share_prop(path, "Status") == "available"
    # Only the backend with hooks (mem1, the source) wrote migration records.
    methods = [(r["method"], r["phase"]) for r in spool_records(d)
               if r["method"].startswith("migration")]
    assert ("migration_cancel", "post") in methods
    assert ("migration_complete", "post") in methods


def spool_records(d):
    from sharedd import record as recordlib
    out = []
    for root, _dirs, files in os.walk(os.path.join(d.workdir, "spool")):
        for name in sorted(files):
            if name.endswith(".json"):
                with open(os.path.join(root, name), "rb") as f:
                    out.append(recordlib.loads(f.read()))
    return out


def test_stopping_sharedd_ends_a_copy_and_the_restart_rolls_it_back(sharedd_factory):
    d = sharedd_factory(CONFIG)
    path = d.create_share("interrupted", "NFS", 1)
    pace(d, 3600)                 # the copy would take ten hours
    job = d.share(path, "Migrate", "sa{sv}", "mem2", 0)
    assert d.get(job, JOB, "Operation") == "migration_start"
    assert d.stop(timeout=60) == 0, "SIGTERM ends the copy instead of waiting for it"
    pace(d, 0)
    d.start()
    assert d.share_prop(path, "Status") == "available"
    assert d.share_prop(path, "Backend") == "mem1"
    with open(os.path.join(d.workdir, "state", "backends", "mem2", "memory.json")) as f:
        assert path.rsplit("/", 1)[1] not in json.load(f)["shares"]
