"""sharectl against a running sharedd (in-memory driver, private system bus):
tables and JSON, names and ids, every noun's main verbs, jobs followed to
the end, and the documented exit statuses with D-Bus error names."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from tests.support import components
from tests.test_api_memory import CONFIG

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def ctl(sharedd_factory, system_bus):
    d = sharedd_factory(CONFIG)

    def run(*args, check=True, expect=0):
        proc = subprocess.run(["/usr/bin/python3", "-m", "sharedd.sharectl", *args],
                              capture_output=True, text=True, timeout=120, cwd=str(REPO),
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address,
                                       PYTHONPATH=str(REPO)))
        components.used("sharectl (python3 -m sharedd.sharectl)")
        if check:
            assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc
    run.daemon = d
    return run


def js(proc):
    return json.loads(proc.stdout)


def test_shares_access_and_snapshots(ctl):
    out = ctl("share", "create", "projects", "--size", "2", "--schedule", "daily",
              "--retention", "7").stdout
    assert out.startswith("share projects created: /org/sharedd/Sharedd1/share/")
    ctl("share", "create", "other", "--backend", "mem2")
    table = ctl("share", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "BACKEND", "PROTOCOL", "GIB", "STATUS", "EXPORT"]
    assert [l.split()[0] for l in table[1:]] == ["other", "projects"]
    listed = js(ctl("--json", "share", "list", "--backend", "mem1"))
    assert [s["Name"] for s in listed] == ["projects"] and listed[0]["SizeGiB"] == 2
    share_id = listed[0]["Id"]
    # by name, by id, by path
    for ref in ("projects", share_id, f"/org/sharedd/Sharedd1/share/{share_id}"):
        assert js(ctl("share", "show", ref, "--json"))["Id"] == share_id
    assert js(ctl("share", "show", "projects", "--json"))["SnapshotSchedule"] == "daily"
    rid = js(ctl("--json", "access", "allow", "projects", "ip", "10.0.0.0/24", "--rw"))["access_id"]
    ctl("access", "allow", "projects", "ip", "10.0.1.7", "--ro", "--squash", "all_squash",
        "--anonuid", "1000", "--anongid", "1000")
    rules = js(ctl("--json", "access", "list", "projects"))
    assert {(r["access_to"], r["access_level"]) for r in rules} == {("10.0.0.0/24", "rw"),
                                                                  ("10.0.1.7", "ro")}
    assert [r["options"] for r in rules if r["access_to"] == "10.0.1.7"][0]["squash"] == "all_squash"
    ctl("access", "deny", "projects", rid)
    ctl("share", "extend", "projects", "3")
    assert "is now 2 GiB" in ctl("share", "shrink", "projects", "2").stdout
    ctl("snapshot", "create", "projects", "before")
    snaps = js(ctl("--json", "snapshot", "list", "projects"))
    assert [s["Name"] for s in snaps] == ["before"]
    assert ctl("snapshot", "list").stdout.splitlines()[1].split()[:2] == ["projects", "before"]
    ctl("snapshot", "revert", "projects/before")
    ctl("share", "create", "clone", "--snapshot", "projects/before", "--size", "2")
    ctl("share", "delete", "clone")
    ctl("snapshot", "delete", f"{snaps[0]['Id']}")
    out = ctl("share", "schedule", "projects", "--schedule", "none").stdout
    assert "SnapshotSchedule" in out
    for name in ("projects", "other"):
        ctl("share", "delete", name)
    assert js(ctl("--json", "share", "list")) == []


def test_groups_backends_and_jobs(ctl):
    ctl("group", "create", "app")
    ctl("share", "create", "db", "--group", "app")
    ctl("group", "snapshot", "app", "nightly")
    shown = js(ctl("--json", "group", "show", "app"))
    assert shown["Snapshots"] == ["nightly"] and len(shown["Shares"]) == 1
    ctl("group", "create", "restored", "--source", "app/nightly")
    assert [g["Name"] for g in js(ctl("--json", "group", "list"))] == ["app", "restored"]
    backends = ctl("backend", "list").stdout.splitlines()
    assert backends[0].split()[:2] == ["NAME", "DRIVER"] and len(backends) == 3
    assert js(ctl("--json", "backend", "show", "mem2"))["Name"] == "mem2"
    # a migration job followed to its end
    ctl("share", "create", "moving", "--backend", "mem1")
    done = js(ctl("--json", "share", "migrate", "moving", "mem2", "--wait"))
    assert done["success"] is True
    assert js(ctl("--json", "share", "show", "moving"))["Backend"] == "mem2"
    assert js(ctl("--json", "job", "list")) == []
    for share in ("restored-db", "moving"):
        ctl("share", "delete", share)
    ctl("group", "delete-snapshot", "app/nightly")
    ctl("share", "delete", "db")
    for g in ("app", "restored"):
        ctl("group", "delete", g)


def test_a_job_is_followed_by_sharedds_completed_only(ctl, system_bus):
    """--wait takes a job's outcome from sharedd's own Completed signal:
    one sent to sharectl's connection by another (any local user may) is
    not taken, and one sent before the job starts is not missed."""
    import asyncio
    from dbus_next import Message, MessageType
    from dbus_next.aio import MessageBus
    from sharedd import constants as C
    from sharedd import sharectl

    ctl("share", "create", "followed", "--backend", "mem1")

    async def main():
        mine = await MessageBus(bus_address=system_bus.address).connect()
        other = await MessageBus(bus_address=system_bus.address).connect()
        try:
            c = sharectl.Client(mine)
            watch = await sharectl.completions(c, True)
            forged = f"{C.JOB_PATH}/" + "0" * 32
            for to in (mine.unique_name, None):
                await other.send(Message(message_type=MessageType.SIGNAL, destination=to,
                                         path=forged, interface=C.IFACE_JOB,
                                         member="Completed", signature="bs",
                                         body=[True, "forged"]))
            await mine.call(Message(destination="org.freedesktop.DBus",   # (after them)
                                    path="/org/freedesktop/DBus",
                                    interface="org.freedesktop.DBus", member="GetId"))
            await other.call(Message(destination="org.freedesktop.DBus",
                                     path="/org/freedesktop/DBus",
                                     interface="org.freedesktop.DBus", member="GetId"))
            assert watch.done == {}
            share = await c.share("followed")
            (job,) = await c.call(share, C.IFACE_SHARE, "Migrate", "sa{sv}", "mem2", {})
            out = sharectl.Out(True)
            await sharectl.follow(c, out, job, watch)
            assert watch.done == {job: (True, watch.done[job][1])}
            assert forged not in watch.done
        finally:
            mine.disconnect()
            other.disconnect()
    asyncio.run(main())
    assert js(ctl("--json", "share", "show", "followed"))["Backend"] == "mem2"


def test_errors_and_exit_statuses(ctl, system_bus):
    ctl("share", "create", "keep")
    refused = ctl("share", "extend", "keep", "1", expect=1)
    assert "org.sharedd.Sharedd1.Error.InvalidArgument: new size 1 GiB" in refused.stderr
    missing = ctl("share", "show", "nosuch", expect=4)
    assert "no share named 'nosuch'" in missing.stderr
    assert "org.sharedd.Sharedd1.Error.NotFound" in missing.stderr
    ctl("snapshot", "show", "keep/none", expect=4)
    ctl("snapshot", "show", "noslash", expect=2)
    usage = ctl("share", "frobnicate", expect=2)
    assert "usage:" in usage.stderr
    ctl("access", "allow", "keep", "ip", "10.0.0.1", expect=2)     # --rw or --ro
    # the no-dialog option reaches sharedd with every call (root: allowed)
    ctl("--no-user-interaction", "access", "allow", "keep", "ip", "10.0.0.1", "--ro")
    ctl.daemon.stop()
    gone = ctl("share", "list", expect=3)
    assert "sharedd is not running" in gone.stderr


def test_snapshot_access(ctl):
    ctl("share", "create", "data")
    ctl("snapshot", "create", "data", "monday")
    out = js(ctl("--json", "snapshot", "allow", "data/monday", "ip", "10.0.0.0/24"))
    snap_id = js(ctl("--json", "snapshot", "show", "data/monday"))["Id"]
    assert out["export_locations"] == [f"mem:/{snap_id}"]
    rules = js(ctl("--json", "snapshot", "access", "data/monday"))
    assert [(r["id"], r["access_to"], r["access_level"], r["state"]) for r in rules] == \
        [(out["access_id"], "10.0.0.0/24", "ro", "active")]
    assert js(ctl("--json", "access", "list", "data")) == []
    refused = ctl("snapshot", "delete", "data/monday", expect=1)
    assert "org.sharedd.Sharedd1.Error.InvalidState" in refused.stderr
    ctl("snapshot", "deny", "data/monday", out["access_id"])
    assert js(ctl("--json", "snapshot", "show", "data/monday"))["ExportLocations"] == []
    ctl("snapshot", "delete", "data/monday")
    ctl("share", "delete", "data")


def test_snapshot_visibility(ctl):
    ctl("share", "create", "seen", "--visibility", "visible")
    assert js(ctl("--json", "share", "show", "seen"))["SnapshotVisibility"] == "visible"
    out = js(ctl("--json", "share", "schedule", "seen", "--visibility", ""))
    assert out["SnapshotVisibility"] == "hidden", "an NFS share's default (auto)"
    ctl("share", "schedule", "seen", "--visibility", "maybe", expect=2)
    ctl("share", "delete", "seen")
