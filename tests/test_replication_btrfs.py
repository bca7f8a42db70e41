"""Replication with real storage and real clients: the sharedd daemon with two
btrfs backends in one replication domain (two pool images on loop devices),
both exported by the lab's real NFS-Ganesha, the second one at a second
address of the storage host, and a libnfs client in its own namespace.

Proves, with checksums of every file:
- CreateReplica returns a Job; the replica (readable) holds the share's data
  and its snapshots, is exported read-only with the share's rules (a client
  reads, its writes are refused) and follows later writes by the periodic
  incremental sync (LastSync advances);
- Promote makes the replica the share: every file written before it is
  there, the export location changes to the second backend's address, the
  client writes through it; the old active becomes a readable replica synced
  the other way round;
- snapshots are replicated (a snapshot taken after the promote is on both
  pools) and revert works on the active, the replica following;
- the hooks ran for every replica method (spool records with the seed's
  names);
- Delete removes the replica's data, snapshots and sync points;
- SIGKILL of sharedd during the first sync, then a restart: the half-made
  replica is gone from the database and from the second pool; replicating
  again works.
"""

import glob
import json
import os
import pathlib
import subprocess

import pytest

from sharedd.mountinfo import read_mountinfo, top_mounts
from tests.fixtures.storage_host import multi_backend_host
from tests.support import components
from tests.support.signals import SignalCollector
from tests.support.tenants import wait_for
from tests.test_migration_btrfs import fill, nfs_write, on_pool, tree_sums

REPLICA = "org.sharedd.Sharedd1.Replica"
ROOT = "/org/sharedd/Sharedd1"
BACKENDS = ("btrfs1", "btrfs2")
SECOND_IP = "10.71.0.2"
CLIENT_IP = "10.71.0.52"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOMAIN = """replication_domain = lab
replication_interval = 3
"""
MORE = """
[btrfs2]
share_driver = btrfs
share_export_ip = {ip}
nfs_helper = ganesha
btrfs_pool_path = {work}/pool2
btrfs_pool_image = {work}/pool2.img
btrfs_pool_image_size_gib = 4
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
""" + DOMAIN


@pytest.fixture(scope="module")
def host(request, system_bus, netlab, ganesha):
    """Also used by other modules, which may set REPLICATION_EXTRA: more
    [DEFAULT] lines."""
    # The second backend's exports are announced at a second address of the
    # storage host (ganesha listens on every address of its namespace).
    subprocess.run(["ip", "-n", netlab.server_ns, "addr", "add", f"{SECOND_IP}/24", "dev", "br0"],
                   check=True, timeout=30)
    try:
        with multi_backend_host(system_bus, netlab, ganesha, "replicate", BACKENDS,
                                DOMAIN + MORE.replace("{ip}", SECOND_IP),
                                extra=getattr(request.module, "REPLICATION_EXTRA", ""),
                                images=("pool.img", "pool2.img")) as h:
            components.used("share replication (btrfs send/receive, incremental) with NFS "
                            "clients")
            yield h
    finally:
        subprocess.run(["ip", "-n", netlab.server_ns, "addr", "del", f"{SECOND_IP}/24",
                        "dev", "br0"], timeout=30)


@pytest.fixture(scope="module")
def client(netlab):
    return netlab.add_client("rep-rw", ip4=CLIENT_IP)


def mount_of(h, backend, object_id):
    mp = os.path.join(h.state_path, "backends", backend, "mounts", object_id)
    assert mp in top_mounts(read_mountinfo()), f"{mp} is not mounted"
    return mp


def replicas(h, share_path):
    """{replica object path: its properties} of a share."""
    objects = h.call(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return {p: {k: v["data"] for k, v in ifaces[REPLICA].items()}
            for p, ifaces in objects.items()
            if REPLICA in ifaces and ifaces[REPLICA]["Share"]["data"] == share_path}


def by_role(h, share_path, role):
    found = [p for p, props in replicas(h, share_path).items() if props["ReplicaRole"] == role]
    assert len(found) == 1, replicas(h, share_path)
    return found[0]


def rprop(h, path, name):
    return h.get(path, REPLICA, name)


def completed(msgs, job):
    return [m.body for m in msgs if m.member == "Completed" and m.path == job]


def run_job(h, sig, job, timeout=300):
    wait_for(f"job {job}", lambda: completed(sig.messages, job), timeout=timeout)
    assert completed(sig.messages, job) == [[True, "done"]]


def replicate(h, bus, path, backend, *options):
    """CreateReplica (options: busctl words of the a{sv}) and wait for its
    job; the replica's object path."""
    sig = SignalCollector(bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "CreateReplica", "sa{sv}", backend, len(options) // 3, *options)
        assert job.startswith(f"{ROOT}/job/")
        run_job(h, sig, job)
    finally:
        sig.close()
    return by_role(h, path, "replica")


def location(export):
    host, _, pseudo = export.partition(":")
    return host, pseudo


def spool_methods(h):
    methods = set()
    for name in os.listdir(os.path.join(h.workdir, "spool", "storage1")):
        if name.endswith(".json") and "-periodic-" not in name:
            methods.add(name.split("-", 2)[2][:-len(".json")])
    return methods


def test_a_readable_replica_follows_is_promoted_and_syncs_back(host, client, system_bus):
    h = host
    path = h.create_share("rep-a", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", CLIENT_IP, "rw", 0)
    src = mount_of(h, "btrfs1", sid)
    fill(src, n=20)
    assert nfs_write(h, client, path, "before.txt", b"written before replication\n").ok
    snap = h.share(path, "CreateSnapshot", "sa{sv}", "s1", 0)
    snap_id = snap.rsplit("/", 1)[1]
    s1_sums = tree_sums(src)

    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "CreateReplica", "sa{sv}", "btrfs2", 1, "style", "s", "readable")
        assert job.startswith(f"{ROOT}/job/")
        run_job(h, sig, job)
        progress = [m.body[1]["Progress"].value for m in sig.messages
                    if m.member == "PropertiesChanged" and m.path == job
                    and "Progress" in m.body[1]]
        assert progress and progress[-1] == 1.0
        assert progress == sorted(progress), "Progress only rises"
        # The shipped interface descriptions match the live objects (a Replica exists now).
        proc = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "tools", "gen-dbus-xml"),
                               "--check"], capture_output=True, text=True,
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address))
        assert proc.returncode == 0, proc.stderr
    finally:
        sig.close()
    rp, ap = by_role(h, path, "replica"), by_role(h, path, "active")
    rid, aid = rp.rsplit("/", 1)[1], ap.rsplit("/", 1)[1]
    props = replicas(h, path)[rp]
    assert (props["Backend"], props["ReplicaState"], props["Status"], props["Style"]) == (
        "btrfs2", "in_sync", "available", "readable")
    assert replicas(h, path)[ap]["Backend"] == "btrfs1"
    # Every byte, and the snapshot, on the second pool.
    rmp = mount_of(h, "btrfs2", rid)
    assert tree_sums(rmp) == tree_sums(src)
    assert tree_sums(os.path.join(h.workdir, "pool2", "snapshots", snap_id)) == s1_sums
    # Readable: the client reads at the replica's location and cannot write.
    [export] = props["ExportLocations"]
    rhost, rpseudo = location(export)
    assert rhost == SECOND_IP
    listed = wait_for("a listing of the replica", lambda: (lambda r: r if r.ok else None)(
        h.ganesha.nfs_ls(client, rpseudo, host=rhost)), timeout=60)
    assert "before.txt" in listed.stdout, listed
    got = wait_for("a read from the replica", lambda: (lambda r: r if r.ok else None)(
        h.ganesha.nfs_cat(client, f"{rpseudo}/before.txt", host=rhost)), timeout=60)
    assert got.stdout == "written before replication\n"
    local = os.path.join(h.workdir, "w.txt")
    pathlib.Path(local).write_text("must not land\n")
    assert not h.ganesha.nfs_cp_to(client, local, f"{rpseudo}/refused.txt", host=rhost).ok
    assert not os.path.exists(os.path.join(rmp, "refused.txt"))

    # Later writes reach the replica with the periodic sync.
    last = rprop(h, rp, "LastSync")
    assert nfs_write(h, client, path, "later.txt", b"written after the first sync\n").ok
    wait_for("a periodic sync", lambda: rprop(h, rp, "LastSync") > last, timeout=120)
    # The sync is recorded, then the replica is served again (under the
    # share's lock, with the rules of that moment): wait for its mount.
    rmp = os.path.join(h.state_path, "backends", "btrfs2", "mounts", rid)
    wait_for("the replica served again", lambda: rmp in top_mounts(read_mountinfo()), timeout=60)
    assert open(os.path.join(rmp, "later.txt")).read() == "written after the first sync\n"

    # Promote: written right before, there right after; a new location.
    assert nfs_write(h, client, path, "last.txt", b"the last write on btrfs1\n").ok
    expected = tree_sums(src)
    h.call(rp, REPLICA, "Promote", "a{sv}", 0)
    assert h.share_prop(path, "Backend") == "btrfs2"
    assert h.share_prop(path, "Status") == "available"
    [new_export] = h.share_prop(path, "ExportLocations")
    nhost, npseudo = location(new_export)
    assert nhost == SECOND_IP
    dst = mount_of(h, "btrfs2", sid)
    assert tree_sums(dst) == expected
    assert rprop(h, rp, "ReplicaRole") == "active" and rprop(h, ap, "ReplicaRole") == "replica"
    assert nfs_write(h, client, path, "on-btrfs2.txt", b"written to the new active\n").ok
    got = h.ganesha.nfs_cat(client, f"{npseudo}/on-btrfs2.txt", host=nhost)
    assert got.ok and got.stdout == "written to the new active\n"
    assert open(os.path.join(dst, "on-btrfs2.txt")).read() == "written to the new active\n"
    # The old active is a readable replica now, synced from the new one.
    wait_for("the old active in sync", lambda: rprop(h, ap, "ReplicaState") == "in_sync",
             timeout=120)
    # (its data: the old share subvolume, replaced at each sync)
    old_copy = os.path.join(h.workdir, "pool", "shares", sid)
    wait_for("the old active following",
             lambda: os.path.exists(os.path.join(old_copy, "on-btrfs2.txt")), timeout=120)
    [old_export] = rprop(h, ap, "ExportLocations")
    ohost, opseudo = location(old_export)
    assert ohost == h.lab.server_ip4
    # (each sync re-exports a readable replica: a read may meet that moment)
    got = wait_for("a read from the old active's export", lambda: (lambda r: r if r.ok else None)(
        h.ganesha.nfs_cat(client, f"{opseudo}/last.txt", host=ohost)), timeout=60)
    assert got.stdout == "the last write on btrfs1\n"

    # Replicated snapshots, and a revert on the active that the replica follows.
    snap2 = h.share(path, "CreateSnapshot", "sa{sv}", "s2", 0)
    snap2_id = snap2.rsplit("/", 1)[1]
    for pool in ("pool", "pool2"):
        assert os.path.exists(os.path.join(h.workdir, pool, "snapshots", snap2_id, "last.txt"))
    h.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    for pool in ("pool", "pool2"):
        assert not os.path.exists(os.path.join(h.workdir, pool, "snapshots", snap_id))
    assert nfs_write(h, client, path, "after-s2.txt", b"undone by the revert\n").ok
    wait_for("the replica following", lambda: os.path.exists(
        os.path.join(old_copy, "after-s2.txt")), timeout=120)
    h.share(path, "RevertToSnapshot", "oa{sv}", snap2, 0)
    reverted = mount_of(h, "btrfs2", sid)
    assert not os.path.exists(os.path.join(reverted, "after-s2.txt"))
    assert os.path.exists(os.path.join(reverted, "last.txt"))
    wait_for("the replica reverted too",
             lambda: not os.path.exists(os.path.join(old_copy, "after-s2.txt")), timeout=120)

    # Every replica method ran inside the hooks, with the seed's names.
    assert {"create_share_replica", "update_share_replica", "promote_share_replica",
            "create_replicated_snapshot", "delete_replicated_snapshot",
            "revert_to_replicated_snapshot"} <= spool_methods(h)
    promoted = [json.load(open(f)) for f in sorted(glob.glob(
        os.path.join(os.path.join(h.workdir, "spool", "storage1"), "*-post-promote_share_replica.json")))][-1]
    assert promoted["share"]["backend"] == "btrfs2"
    assert promoted["share"]["export_locations"] == [new_export]
    assert promoted["replica"]["id"] == rid and promoted["replica"]["role"] == "active"

    # Delete the replica: nothing of it stays on the first pool.
    h.call(ap, REPLICA, "Delete", "a{sv}", 0)
    assert replicas(h, path) == {}
    assert "delete_share_replica" in spool_methods(h)
    h.call(snap2, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    assert on_pool(h, "pool", sid) == [] and on_pool(h, "pool", aid) == []
    assert os.listdir(os.path.join(h.workdir, "pool", "snapshots")) == []
    h.share(path, "Delete", "a{sv}", 0)
    assert on_pool(h, "pool2", sid) == [] and on_pool(h, "pool2", rid) == []


def test_cancel_and_a_crash_during_the_first_sync_leave_nothing_and_it_can_be_redone(
        host, client, system_bus):
    h = host
    path = h.create_share("rep-crash", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", CLIENT_IP, "rw", 0)
    src = mount_of(h, "btrfs1", sid)
    fill(src, n=400)
    expected = tree_sums(src)
    # Job.Cancel during the first sync: the replica and its data are gone.
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "CreateReplica", "sa{sv}", "btrfs2", 0)
        h.call(job, "org.sharedd.Sharedd1.Job", "Cancel", "a{sv}", 0)
        wait_for("the cancel", lambda: completed(sig.messages, job), timeout=300)
        ok, message = completed(sig.messages, job)[0]
    finally:
        sig.close()
    if ok:
        pytest.fail("the first sync finished before Cancel reached it; make the data bigger")
    assert "cancelled" in message, message
    assert replicas(h, path) == {} and on_pool(h, "pool2", sid) == []
    # SIGKILL during the first sync, then a restart.
    h.share(path, "CreateReplica", "sa{sv}", "btrfs2", 0)
    h.kill()
    h.start()
    assert replicas(h, path) == {}, "the half-made replica is gone"
    assert on_pool(h, "pool2", sid) == []
    assert h.share_prop(path, "Status") == "available"
    assert nfs_write(h, client, path, "after-crash.txt", b"still served\n").ok
    rp = replicate(h, system_bus, path, "btrfs2")
    rid = rp.rsplit("/", 1)[1]
    assert rprop(h, rp, "ExportLocations") == []          # dr: not exported
    assert not os.path.exists(os.path.join(h.state_path, "backends", "btrfs2", "mounts", rid))
    copy = os.path.join(h.workdir, "pool2", "shares", rid)
    sums = tree_sums(copy)
    assert {k: v for k, v in sums.items() if k in expected} == expected
    assert "after-crash.txt" in sums
    h.call(rp, REPLICA, "Delete", "a{sv}", 0)
    assert not os.path.exists(copy)
    h.share(path, "Delete", "a{sv}", 0)


def test_a_forced_promote_when_the_active_copy_is_lost(host, client, system_bus):
    h = host
    path = h.create_share("rep-lost", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", CLIENT_IP, "rw", 0)
    src = mount_of(h, "btrfs1", sid)
    fill(src, n=10)
    rp = replicate(h, system_bus, path, "btrfs2")
    synced = tree_sums(src)
    # The active copy's data is lost, behind sharedd's back.
    lost = os.path.join(h.workdir, "pool", "shares", sid)
    os.rename(lost, lost + ".lost")
    try:
        err = h.error(rp, REPLICA, "Promote", "a{sv}", 0)
        assert err.startswith("org.sharedd.Sharedd1.Error.BackendFailure"), err
        assert h.share_prop(path, "Backend") == "btrfs1"
        # Forced: from the last sync. The old active becomes a replica in
        # error (not synced); the periodic sync (every 3 s here) may bring it
        # back before the next look, so its states are read from the signals.
        ap = by_role(h, path, "active")
        changes = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1',"
                                  f"member='PropertiesChanged',path='{ap}'")
        try:
            h.call(rp, REPLICA, "Promote", "a{sv}", 1, "force", "b", "true")
            states = wait_for("the old active's new state", lambda: [
                m.body[1]["ReplicaState"].value for m in changes.messages
                if "ReplicaState" in m.body[1]])
        finally:
            changes.close()
        assert states[0] == "error", states
        assert h.share_prop(path, "Backend") == "btrfs2"
        assert by_role(h, path, "replica") == ap
        assert tree_sums(mount_of(h, "btrfs2", sid)) == synced
        assert nfs_write(h, client, path, "after.txt", b"on the promoted copy\n").ok
        assert not os.path.exists(os.path.join(h.state_path, "backends", "btrfs1", "mounts",
                                               sid)), "the old active no longer served"
        # Resync makes the old copy again from the new active.
        sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
        try:
            run_job(h, sig, h.call(ap, REPLICA, "Resync", "a{sv}", 0))
        finally:
            sig.close()
        assert rprop(h, ap, "ReplicaState") == "in_sync"
        assert tree_sums(lost) == tree_sums(mount_of(h, "btrfs2", sid))
        h.call(ap, REPLICA, "Delete", "a{sv}", 0)
        h.share(path, "Delete", "a{sv}", 0)
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", lost + ".lost"], capture_output=True,
                       timeout=60)
