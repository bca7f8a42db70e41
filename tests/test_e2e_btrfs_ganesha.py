"""End to end, as an administrator would: busctl against the real sharedd,
real btrfs on a loop device, real NFS-Ganesha, and real NFS clients (libnfs)
in client network namespaces with their own addresses proving rw, ro and no
access after every rule change."""

import hashlib
import json
import os
import re
import subprocess
import time

import pytest

from sharedd.mountinfo import read_mountinfo, top_mounts

SHARE = "org.sharedd.Sharedd1.Share"
ERR = "org.sharedd.Sharedd1.Error."


@pytest.fixture(scope="module")
def clients(netlab):
    return {
        "rw": netlab.add_client("e2e-rw", ip4="10.71.0.21", ip6="fd71::21"),
        "ro": netlab.add_client("e2e-ro", ip4="10.71.0.22"),
        "none": netlab.add_client("e2e-none", ip4="10.71.0.23"),
        "net": netlab.add_client("e2e-net", ip4="10.71.0.130"),
    }


def pseudo(host, path):
    loc = host.share_prop(path, "ExportLocations")[0]
    ip, _, pseudo_path = loc.partition(":")
    assert ip == host.lab.server_ip4
    return pseudo_path


def write(host, ns, pseudo_path, name, data: bytes):
    local = os.path.join(host.workdir, f"upload-{time.monotonic_ns()}")
    with open(local, "wb") as f:
        f.write(data)
    return host.ganesha.nfs_cp_to(ns, local, f"{pseudo_path}/{name}")


def access(host, ns, pseudo_path) -> str:
    """'rw', 'ro' or 'none', as a real NFS client experiences it."""
    if not host.ganesha.nfs_ls(ns, pseudo_path).ok:
        return "none"
    res = write(host, ns, pseudo_path, f"probe-{time.monotonic_ns()}", b"probe")
    if res.ok:
        return "rw"
    assert res.rofs, f"write failed for another reason: {res}"
    return "ro"


def mount_of(host, share_path):
    share_id = share_path.rsplit("/", 1)[1]
    return [mp for mp in top_mounts(read_mountinfo()) if mp.endswith("/" + share_id)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_share_lifecycle_with_real_clients(storage_host, clients):
    h = storage_host
    path = h.create_share("projects", "NFS", 1)
    p = pseudo(h, path)
    assert h.share_prop(path, "Status") == "available"
    assert len(mount_of(h, path)) == 1, "share subvolume mounted on its own mount point"
    # No rule yet: nobody gets in.
    assert access(h, clients["rw"], p) == "none"

    rw_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.21", "rw", 0)
    ro_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.22", "ro", 0)
    assert access(h, clients["rw"], p) == "rw"
    assert access(h, clients["ro"], p) == "ro"
    assert access(h, clients["none"], p) == "none"

    # Data written over NFS, read back over NFS by another client, checksummed.
    # (libnfs' nfs-cp here cannot write files of 4 KiB or more to ganesha 4.3,
    # whatever the file system, so the NFS payload is small text.)
    payload = os.urandom(1500).hex().encode()
    assert write(h, clients["rw"], p, "data.bin", payload).ok
    got = h.ganesha.nfs_cat(clients["ro"], f"{p}/data.bin")
    assert got.ok and got.stdout.encode() == payload
    mp = mount_of(h, path)[0]
    assert sha(open(os.path.join(mp, "data.bin"), "rb").read()) == sha(payload)

    # Level change: deny, then grant again at the other level.
    h.share(path, "DenyAccess", "sa{sv}", ro_id, 0)
    assert access(h, clients["ro"], p) == "none"
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.22", "rw", 0)
    assert access(h, clients["ro"], p) == "rw"
    # A CIDR rule admits a whole network; rw wins over ro when both match.
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.128/25", "ro", 0)
    assert access(h, clients["net"], p) == "ro"
    # Revoke: the client loses access at once.
    h.share(path, "DenyAccess", "sa{sv}", rw_id, 0)
    assert access(h, clients["rw"], p) == "none"
    rules = h.share_prop(path, "AccessRules")
    assert sorted((r[2], r[3], r[4]) for r in rules) == [
        ("10.71.0.128/25", "ro", "active"), ("10.71.0.22", "rw", "active")]

    # Snapshot, change the data, revert: the checksum comes back.
    snap = h.share(path, "CreateSnapshot", "sa{sv}", "before", 0)
    with open(os.path.join(mp, "data.bin"), "wb") as f:
        f.write(b"overwritten")
    h.share(path, "RevertToSnapshot", "oa{sv}", snap, 0)
    mp = mount_of(h, path)[0]
    assert sha(open(os.path.join(mp, "data.bin"), "rb").read()) == sha(payload)
    assert access(h, clients["ro"], p) == "rw", "rules re-applied after revert"

    # Extend keeps data; a shrink below what is used is refused and changes nothing.
    h.share(path, "Extend", "ta{sv}", 2, 0)
    assert h.share_prop(path, "SizeGiB") == 2
    with open(os.path.join(mp, "big.bin"), "wb") as f:
        f.write(os.urandom(1200 * 1024 * 1024 // 8) * 8)   # 1.2 GiB, incompressible blocks
    text = h.error(path, SHARE, "Shrink", "ta{sv}", 1, 0)
    assert ERR + "InvalidArgument" in text and "use" in text
    assert h.share_prop(path, "SizeGiB") == 2
    assert h.share_prop(path, "Status") == "available"
    os.unlink(os.path.join(mp, "big.bin"))

    # A share created from the snapshot has the snapshot's data.
    clone = h.create_share("projects-clone", "NFS", 1, snapshot=snap)
    cmp_ = mount_of(h, clone)[0]
    assert sha(open(os.path.join(cmp_, "data.bin"), "rb").read()) == sha(payload)

    # Data survives a daemon restart; exports come back with their rules.
    h.restart()
    assert access(h, clients["ro"], p) == "rw"
    assert sha(open(os.path.join(mount_of(h, path)[0], "data.bin"), "rb").read()) == sha(payload)

    # Delete: no subvolume, mount or export remains.
    h.share(clone, "Delete", "a{sv}", 0)
    assert ERR + "InvalidState" in h.error(path, SHARE, "Delete", "a{sv}", 0)
    h.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    h.share(path, "Delete", "a{sv}", 0)
    assert mount_of(h, path) == [] and mount_of(h, clone) == []
    assert os.listdir(os.path.join(h.pool_path, "shares")) == []
    assert os.listdir(os.path.join(h.pool_path, "snapshots")) == []
    assert access(h, clients["ro"], p) == "none"


def test_ganesha_restart_readds_exports(storage_host, clients):
    h = storage_host
    path = h.create_share("survivor", "NFS", 1)
    p = pseudo(h, path)
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.21", "rw", 0)
    assert access(h, clients["rw"], p) == "rw"
    h.ganesha.restart()          # runtime exports are gone with the old process
    deadline = time.monotonic() + 30
    while access(h, clients["rw"], p) != "rw":
        assert time.monotonic() < deadline, "sharedd did not re-add its export\n" + h.log_tail()
        time.sleep(0.5)
    h.share(path, "Delete", "a{sv}", 0)


def test_quota_enforced_and_stats(storage_host):
    h = storage_host
    path = h.create_share("small", "NFS", 1)
    mp = mount_of(h, path)[0]
    proc = subprocess.run(["dd", "if=/dev/urandom", f"of={mp}/fill", "bs=1M", "count=1400"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "quota" in proc.stderr.lower(), proc.stderr
    stats = h.get("/org/sharedd/Sharedd1/backend/btrfs1", "org.sharedd.Sharedd1.Backend", "Stats")
    assert 3.0 < stats["total_capacity_gb"]["data"] <= 4.0
    assert stats["provisioned_capacity_gb"]["data"] >= 1.0
    assert stats["snapshot_support"]["data"] is True
    h.share(path, "Delete", "a{sv}", 0)


def test_spool_records_for_real_operations(storage_host, clients):
    h = storage_host
    path = h.create_share("spooled", "NFS", 1)
    rid = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.0/24", "ro", 0)
    h.manager("RunPeriodicHooks", "a{sv}", 0)
    spool = os.path.join(h.spool_dir, "storage1")
    recs = [json.load(open(os.path.join(spool, n))) for n in sorted(os.listdir(spool))
            if not n.startswith(".")]
    share_id = path.rsplit("/", 1)[1]
    post_allow = [r for r in recs if r["method"] == "allow_access" and r["phase"] == "post"
                  and r["share"]["id"] == share_id][-1]
    hints = post_allow["share"]["mount_hints"]
    assert hints["fstype"] == "nfs4"
    assert hints["export"] == h.share_prop(path, "ExportLocations")[0]
    periodic = [r for r in recs if r["phase"] == "periodic"][-1]
    mine = [s for s in periodic["shares"] if s["id"] == share_id][0]
    assert [(r["access_to"], r["access_level"], r["state"]) for r in mine["access_rules"]] == [
        ("10.71.0.0/24", "ro", "active")]
    h.share(path, "DenyAccess", "sa{sv}", rid, 0)
    h.share(path, "Delete", "a{sv}", 0)


def test_a_snapshot_made_by_hand_is_adopted_over_the_bus(storage_host, clients):
    """ManageSnapshot adopts a read-only snapshot of the share an
    administrator made with btrfs; revert to it restores what a client then
    reads over NFS; Snapshot.Unmanage keeps the subvolume; bad locations are
    refused with a named error."""
    h = storage_host
    path = h.create_share("handmade", "NFS", 1)
    share_id = path.rsplit("/", 1)[1]
    p = pseudo(h, path)
    rid = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.22", "ro", 0)
    mp = mount_of(h, path)[0]
    with open(os.path.join(mp, "data.bin"), "wb") as f:
        f.write(b"as it was")
    sub = os.path.join(h.pool_path, "shares", share_id)
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", sub,
                    os.path.join(h.pool_path, "snapshots", "before-upgrade")],
                   check=True, capture_output=True)
    with open(os.path.join(mp, "data.bin"), "wb") as f:
        f.write(b"changed")
    MGR, SNAP = "org.sharedd.Sharedd1.Manager", "org.sharedd.Sharedd1.Snapshot"
    for location, error in (("shares/" + share_id, "InvalidArgument"),
                            ("../../etc", "InvalidArgument"),
                            ("snapshots/none", "InvalidArgument")):
        assert h.error("/org/sharedd/Sharedd1", MGR, "ManageSnapshot", "osa{sv}", path,
                       location, 0).startswith(ERR + error), location
    snap = h.manager("ManageSnapshot", "osa{sv}", path, "snapshots/before-upgrade", 0)
    assert h.get(snap, SNAP, "Name") == "before-upgrade"
    assert h.get(snap, SNAP, "Status") == "available" and h.get(snap, SNAP, "SizeGiB") == 1
    assert h.manager("ListSnapshots", "a{sv}", 1, "share", "o", path) == [snap]
    h.share(path, "RevertToSnapshot", "oa{sv}", snap, 0)
    got = h.ganesha.nfs_cat(clients["ro"], f"{p}/data.bin")
    assert got.ok and got.output == "as it was", got
    h.call(snap, SNAP, "Unmanage", "a{sv}", 0)
    assert h.manager("ListSnapshots", "a{sv}", 1, "share", "o", path) == []
    assert os.path.isdir(os.path.join(h.pool_path, "snapshots", "before-upgrade"))
    spool = os.path.join(h.spool_dir, "storage1")
    methods = {(r["phase"], r["method"]) for r in
               (json.load(open(os.path.join(spool, n))) for n in os.listdir(spool)
                if not n.startswith("."))}
    for m in ("manage_existing_snapshot", "unmanage_snapshot"):
        assert ("pre", m) in methods and ("post", m) in methods
    # adopted again, then deleted for good with the share
    snap = h.manager("ManageSnapshot", "osa{sv}", path,
                     os.path.join(h.pool_path, "snapshots", "before-upgrade"), 1, "name", "s", "v1")
    assert h.get(snap, SNAP, "Name") == "v1"
    h.call(snap, SNAP, "Delete", "a{sv}", 0)
    assert not os.path.exists(os.path.join(h.pool_path, "snapshots", "before-upgrade"))
    h.share(path, "DenyAccess", "sa{sv}", rid, 0)
    h.share(path, "Delete", "a{sv}", 0)


def test_a_client_granted_on_a_snapshot_reads_it_and_cannot_write(storage_host, clients):
    """Mountable snapshots: Snapshot.AllowAccess exports the snapshot
    read-only through its own ganesha export (mounted read-only on the
    storage host); a granted client reads the data as it was, cannot write,
    another client is refused; ganesha restarts keep it; DenyAccess cuts it
    off; an exported snapshot cannot be deleted."""
    h = storage_host
    SNAP = "org.sharedd.Sharedd1.Snapshot"
    path = h.create_share("mountable", "NFS", 1)
    mp = mount_of(h, path)[0]
    with open(os.path.join(mp, "report.txt"), "w") as f:
        f.write("as it was")
    snap = h.share(path, "CreateSnapshot", "sa{sv}", "monday", 0)
    snap_id = snap.rsplit("/", 1)[1]
    with open(os.path.join(mp, "report.txt"), "w") as f:
        f.write("changed since")
    assert h.get(snap, SNAP, "ExportLocations") == []
    rid = h.call(snap, SNAP, "AllowAccess", "ssa{sv}", "ip", "10.71.0.22", 0)
    [loc] = h.get(snap, SNAP, "ExportLocations")
    assert loc == f"{h.lab.server_ip4}:/shares/{snap_id}"
    assert [r[0] for r in h.get(snap, SNAP, "AccessRules")] == [rid]
    assert h.share_prop(path, "AccessRules") == [], "not a rule of the share"
    snap_mp = [m for m in top_mounts(read_mountinfo()) if m.endswith("/" + snap_id)]
    assert len(snap_mp) == 1
    assert "ro" in [e for e in read_mountinfo() if e.mount_point == snap_mp[0]][0] \
        .mount_options, "mounted read-only on the storage host"
    spath = loc.partition(":")[2]
    got = h.ganesha.nfs_cat(clients["ro"], f"{spath}/report.txt")
    assert got.ok and got.output == "as it was", got
    assert access(h, clients["ro"], spath) == "ro"
    assert access(h, clients["rw"], spath) == "none"
    assert h.ganesha.nfs_cat(clients["ro"], f"{pseudo(h, path)}/report.txt").ok is False
    # in use while exported
    assert h.error(snap, SNAP, "Delete", "a{sv}", 0).startswith(ERR + "InvalidState")
    # a ganesha restart loses runtime exports: ensure brings the snapshot's back
    h.ganesha.restart()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not h.ganesha.nfs_ls(clients["ro"], spath).ok:
        time.sleep(0.5)
    assert h.ganesha.nfs_cat(clients["ro"], f"{spath}/report.txt").output == "as it was"
    spool = os.path.join(h.spool_dir, "storage1")
    recs = [json.load(open(os.path.join(spool, n))) for n in sorted(os.listdir(spool))
            if n.endswith("-post-snapshot_update_access.json")]
    assert recs and recs[-1]["share"]["snapshots"][0]["id"] == snap_id
    h.call(snap, SNAP, "DenyAccess", "sa{sv}", rid, 0)
    assert access(h, clients["ro"], spath) == "none"
    assert h.get(snap, SNAP, "ExportLocations") == []
    assert not [m for m in top_mounts(read_mountinfo()) if m.endswith("/" + snap_id)]
    h.call(snap, SNAP, "Delete", "a{sv}", 0)
    h.share(path, "Delete", "a{sv}", 0)


def test_an_nfs_share_shows_its_snapshots_in_a_snapshots_directory(storage_host, clients):
    """snapshot_visibility = visible on an NFS share: its clients find each
    snapshot read-only at .snapshots/<name> (NFS-Ganesha exports nested in
    the share's pseudo path), with the share's own clients only; a deny of
    the share takes the snapshots away too; revert, a ganesha restart and
    hiding them again all keep it right."""
    h = storage_host
    SHARE_IF = "org.sharedd.Sharedd1.Share"
    path = h.create_share("shown", "NFS", 1, snapshot_visibility="visible")
    assert h.share_prop(path, "SnapshotVisibility") == "visible"
    p = pseudo(h, path)
    rid = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.21", "rw", 0)
    mp = mount_of(h, path)[0]
    with open(os.path.join(mp, "report.txt"), "w") as f:
        f.write("monday's")
    snap = h.share(path, "CreateSnapshot", "sa{sv}", "monday", 0)
    with open(os.path.join(mp, "report.txt"), "w") as f:
        f.write("tuesday's")
    shown = f"{p}/.snapshots/monday"

    def sees(ns):
        got = h.ganesha.nfs_cat(ns, f"{shown}/report.txt")
        return got.output if got.ok else None
    listing = h.ganesha.nfs_ls(clients["rw"], f"{p}/.snapshots")
    assert listing.ok and "monday" in listing.output, listing
    assert sees(clients["rw"]) == "monday's"
    assert h.ganesha.nfs_cat(clients["rw"], f"{p}/report.txt").output == "tuesday's"
    res = write(h, clients["rw"], shown, "new.txt", b"x")
    assert not res.ok and res.rofs, res
    assert sees(clients["ro"]) is None, "only the share's clients"
    # a deny of the share is a deny of what it shows
    h.share(path, "DenyAccess", "sa{sv}", rid, 0)
    assert sees(clients["rw"]) is None
    rid = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.22", "ro", 0)
    assert sees(clients["ro"]) == "monday's" and sees(clients["rw"]) is None
    # revert (the share's export goes and comes back) keeps it shown
    h.share(path, "RevertToSnapshot", "oa{sv}", snap, 0)
    assert sees(clients["ro"]) == "monday's"
    assert h.ganesha.nfs_cat(clients["ro"], f"{p}/report.txt").output == "monday's"
    # a ganesha restart: the share's export, then the nested one, come back
    h.ganesha.restart()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sees(clients["ro"]) is None:
        time.sleep(0.5)
    assert sees(clients["ro"]) == "monday's"
    # a reboot: every mount and every ganesha export gone, then sharedd
    # starts; the nested export serves the snapshot, never the empty
    # directory its mount point is until ensure mounts it again
    h.stop()
    h.ganesha.stop()
    view = os.path.join(os.path.dirname(mp), ".previous", os.path.basename(mp))
    for name in os.listdir(view):
        subprocess.run(["umount", os.path.join(view, name)], check=True)
    subprocess.run(["umount", mp], check=True)
    h.ganesha.start()
    h.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sees(clients["ro"]) is None:
        time.sleep(0.5)
    assert sees(clients["ro"]) == "monday's"
    # hidden: gone, junction directory included; visible again: back
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_visibility", "s", "hidden")
    assert sees(clients["ro"]) is None and not os.path.exists(os.path.join(mp, ".snapshots"))
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_visibility", "s", "")
    assert h.share_prop(path, "SnapshotVisibility") == "hidden", "an NFS share's default"
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_visibility", "s", "visible")
    assert sees(clients["ro"]) == "monday's"
    # a client's file where the junctions go: the snapshots are withdrawn
    # (fail closed), the share itself stays served
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_visibility", "s", "hidden")
    with open(os.path.join(mp, ".snapshots"), "w") as f:
        f.write("a client's")
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_visibility", "s", "visible")
    assert sees(clients["ro"]) is None
    assert h.share_prop(path, "Status") == "available"
    assert h.ganesha.nfs_cat(clients["ro"], f"{p}/.snapshots").output == "a client's"
    os.unlink(os.path.join(mp, ".snapshots"))
    h.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    assert h.ganesha.nfs_ls(clients["ro"], f"{p}/.snapshots/monday").ok is False
    h.share(path, "DenyAccess", "sa{sv}", rid, 0)
    h.call(path, SHARE_IF, "Delete", "a{sv}", 0)


def test_a_snapshot_schedule_keeps_the_newest_three(storage_host):
    """A schedule every 2 s with retention 3 over the bus: real btrfs
    snapshots appear, named by their elapse, and exactly the three newest
    stay, in the store and in the pool."""
    h = storage_host
    path = h.create_share("scheduled", "NFS", 1, snapshot_schedule="2s", snapshot_retention="3")
    assert h.share_prop(path, "SnapshotSchedule") == "2s"
    assert h.share_prop(path, "SnapshotRetention") == "3"
    spool = os.path.join(h.spool_dir, "storage1")

    def records(method):
        out = []
        for n in os.listdir(spool):
            if n.startswith(".") or method not in n or "-post-" not in n:
                continue
            try:
                rec = json.load(open(os.path.join(spool, n)))
            except (OSError, ValueError):
                continue
            if rec["share"] and rec["share"]["name"] == "scheduled":
                out.append(rec)
        return out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(records("-delete_snapshot")) < 2:
        time.sleep(0.2)
    assert len(records("-delete_snapshot")) >= 2
    h.share(path, "SetSnapshotPolicy", "a{sv}", 1, "snapshot_schedule", "s", "none")
    time.sleep(0.5)                                  # an elapse in flight settles
    snaps = h.manager("ListSnapshots", "a{sv}", 1, "share", "o", path)
    names = sorted(h.get(p, "org.sharedd.Sharedd1.Snapshot", "Name") for p in snaps)
    assert len(names) == 3 and all(re.fullmatch(r"auto-\d{8}T\d{6}Z", n) for n in names)
    created = sorted(r["snapshot"]["name"] for r in records("-create_snapshot"))
    assert names == created[-3:], "the three newest are kept"
    ids = {p.rsplit("/", 1)[1] for p in snaps}
    pool_snaps = set(os.listdir(os.path.join(h.pool_path, "snapshots")))
    assert ids <= pool_snaps
    gone = {r["snapshot"]["id"] for r in records("-delete_snapshot")}
    assert not gone & pool_snaps, "pruned snapshots are gone from the pool"
    for p in snaps:
        h.call(p, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    h.share(path, "Delete", "a{sv}", 0)


def tree_digest(root: str) -> dict:
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = sha(f.read())
    return out


def test_a_share_group_snapshot_restored_into_a_new_group(storage_host, clients):
    """Three shares in a group, a client writing to all three over NFS while
    the group snapshot is taken; a new group made from it holds, share by
    share, exactly what each member snapshot holds (checksums)."""
    import threading
    h = storage_host
    GROUP, GSNAP = "org.sharedd.Sharedd1.ShareGroup", "org.sharedd.Sharedd1.ShareGroupSnapshot"
    g = h.manager("CreateShareGroup", "sa{sv}", "trio", 0)
    paths = [h.create_share(f"trio{i}", "NFS", 1, share_group=g) for i in range(3)]
    assert sorted(h.get(g, GROUP, "Shares")) == sorted(paths)
    assert h.share_prop(paths[0], "ShareGroup") == g
    rids = [h.share(p, "AllowAccess", "sssa{sv}", "ip", "10.71.0.21", "rw", 0) for p in paths]
    pseudos = [pseudo(h, p) for p in paths]
    for p in pseudos:
        assert write(h, clients["rw"], p, "before", b"written before").ok
    stop, written = threading.Event(), []

    def writer():
        i = 0
        while not stop.is_set():
            for p in pseudos:
                if write(h, clients["rw"], p, f"w{i}", f"during {i}".encode()).ok:
                    written.append((p, i))
            i += 1
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.5)
        gs = h.call(g, GROUP, "CreateSnapshot", "sa{sv}", "point", 0)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(60)
    assert written, "the client wrote during the snapshot"
    members = h.get(gs, GSNAP, "Snapshots")
    assert len(members) == 3 and h.get(gs, GSNAP, "ShareGroup") == g
    by_share = {h.get(m, "org.sharedd.Sharedd1.Snapshot", "Share"): m for m in members}
    assert set(by_share) == set(paths)
    # restore into a new group: one share per member, made from it
    g2 = h.manager("CreateShareGroup", "sa{sv}", "trio2", 1, "source_group_snapshot", "o", gs)
    made = h.get(g2, GROUP, "Shares")
    assert len(made) == 3 and h.get(g2, GROUP, "SourceGroupSnapshot") == gs
    for new in made:
        source = h.share_prop(new, "SourceSnapshot")
        origin = h.get(source, "org.sharedd.Sharedd1.Snapshot", "Share")
        assert by_share[origin] == source
        snap_dir = os.path.join(h.pool_path, "snapshots", source.rsplit("/", 1)[1])
        restored = tree_digest(mount_of(h, new)[0])
        assert restored == tree_digest(snap_dir), "the new share holds its member snapshot"
        assert restored["before"] == sha(b"written before")
    spool = os.path.join(h.spool_dir, "storage1")
    recs = [json.load(open(os.path.join(spool, n))) for n in os.listdir(spool)
            if "share_group" in n and "-post-" in n]
    assert {r["method"] for r in recs} >= {"create_share_group", "create_share_group_snapshot",
                                           "create_share_group_from_share_group_snapshot"}
    # member snapshots go with their group snapshot only
    err = h.error(members[0], "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    assert err.startswith(ERR + "InvalidState")
    for p in made:
        h.share(p, "Delete", "a{sv}", 0)
    h.call(gs, GSNAP, "Delete", "a{sv}", 0)
    for p, rid in zip(paths, rids):
        h.share(p, "DenyAccess", "sa{sv}", rid, 0)
        h.share(p, "Delete", "a{sv}", 0)
    for group in (g, g2):
        h.call(group, GROUP, "Delete", "a{sv}", 0)
    assert not [n for n in os.listdir(os.path.join(h.pool_path, "snapshots"))
                if n in {m.rsplit("/", 1)[1] for m in members}]


def test_nothing_sharedd_creates_is_open_to_local_users(storage_host):
    """Every directory under the state path and the pool is private (the
    state path 0750, the rest 0700; the mount directory of a backend that
    serves no CIFS too), whatever the umask; every share mount is
    nosuid,nodev,noexec. Share contents (below mount points) are the
    clients' and not looked at."""
    import stat
    h = storage_host
    path = h.create_share("private-paths", "NFS", 1)
    try:
        assert stat.S_IMODE(os.stat(h.state_path).st_mode) == 0o750
        for root in (h.state_path, h.pool_path):
            for top, dirs, _ in os.walk(root):
                dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
                if top == h.state_path:
                    continue
                mode = stat.S_IMODE(os.stat(top).st_mode)
                assert mode & 0o077 == 0, (top, oct(mode))
        mp = mount_of(h, path)[0]
        from sharedd.mountinfo import mount_at
        assert {"nosuid", "nodev", "noexec"} <= set(mount_at(mp).mount_options)
    finally:
        h.share(path, "Delete", "a{sv}", 0)


# --- issue 12: a client's root is not the storage host's root ---------------------------
# A client with an rw rule is root on its own machine and sends, over NFS
# through NFS-Ganesha, what a hostile root would: a program made setuid root
# and a block device node. With the default rule (root_squash) the server
# makes it the anonymous user; with no_root_squash the writes land as root,
# and the storage host still refuses to honour them: every share mount is
# nosuid,nodev,noexec.

# The payload: a 184-byte static x86-64 ELF that does what `id -u` does
# (prints its effective uid in decimal and a newline, exits 0; arguments
# ignored). /usr/bin/id itself is over 4 KiB, which libnfs' nfs-cp cannot
# write to ganesha 4.3 (see test_share_lifecycle_with_real_clients).
#   mov eax,107 (geteuid); syscall; mov rsi,rsp; dec rsi; mov byte [rsi],10
#   mov ecx,10; 1: xor edx,edx; div ecx; add dl,'0'; dec rsi; mov [rsi],dl
#   test eax,eax; jnz 1b; mov rdx,rsp; sub rdx,rsi; mov edi,1; mov eax,1 (write)
#   syscall; xor edi,edi; mov eax,60 (exit); syscall
_EUID_CODE = bytes.fromhex(
    "b86b0000000f054889e648ffcec6060ab90a00000031d2f7f180c23048ffce881685c075f0"
    "4889e24829f2bf01000000b8010000000f0531ffb83c0000000f05")


def euid_program() -> bytes:
    """The ELF: header, one PT_LOAD (R+X) segment of the whole file at
    0x400000, the code right after the headers."""
    import struct
    base, headers = 0x400000, 64 + 56
    size = headers + len(_EUID_CODE)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 0x3E, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + _EUID_CODE


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Run in the client's namespace: nfs4wire as uid 0 (AUTH_SYS), privileged port.
HOSTILE_ROOT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.support import nfs4wire as w
server, pseudo, fname, node = sys.argv[2:6]
rdev = (int(sys.argv[6]), int(sys.argv[7]))
out = {}
with w.Nfs4Client(server, uid=0, gid=0, machine="hostile-root", timeout=30) as c:
    base = [w.putrootfh()] + [w.lookup(p) for p in pseudo.strip("/").split("/")]
    def run(key, ops):
        res = c.compound(ops, tag=key)
        got = {"status": res.describe(), "ok": res.ok}
        for r in res.results:
            if r.name == "GETATTR" and r.ok:
                got["attrs"] = r.value
        out[key] = got
    attrs = ["type", "mode", "owner", "owner_group"]
    # chown first: a chown clears the setuid bit, so an attacker does it first.
    run("chown_root", base + [w.lookup(fname), w.setattr_({"owner": "0", "owner_group": "0"}),
                              w.getattr_(attrs)])
    run("setuid", base + [w.lookup(fname), w.setattr_({"mode": 0o4755}), w.getattr_(attrs)])
    run("mknod", base + [w.create(node, "BLK", {"mode": 0o666}, rdev=rdev),
                         w.getattr_(attrs + ["rawdev"])])
print(json.dumps(out))
"""


def hostile_root(h, ns, pseudo_path, fname, node, rdev):
    """The statuses (and attributes) the server answered the hostile root."""
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = h.lab.run(ns, [sys.executable, "-c", HOSTILE_ROOT, repo, h.lab.server_ip4,
                          pseudo_path, fname, node, str(os.major(rdev)), str(os.minor(rdev))],
                     timeout=90)
    assert proc.returncode == 0, proc.stderr + h.ganesha.log_tail()
    return json.loads(proc.stdout)


def run_as_nobody_by_fd(path):
    """Exec path as uid 65534 through /proc/self/fd (an fd root opened): the
    directories above path play no part, only the file and its mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return subprocess.run(NOBODY + [f"/proc/self/fd/{fd}", "-u"], pass_fds=(fd,),
                              capture_output=True, text=True, timeout=30)
    finally:
        os.close(fd)


def test_client_root_is_not_storage_root(storage_host, clients, capsys):
    """Issue 12. As uid 0 over NFS (nfs-cp, then nfs4wire): chown a copy of an
    `id -u` program to root, SETATTR it to 04755, CREATE a block device node
    with /dev/loop0's numbers, mode 0666. root_squash: all of it is the
    anonymous user's (or refused). no_root_squash: it lands as root, and the
    host neither runs the program (noexec, nosuid) nor opens the node (nodev)."""
    import shutil
    import stat
    import tempfile
    import uuid
    from sharedd.mountinfo import mount_at
    h, ns, ip = storage_host, clients["rw"], "10.71.0.21"
    tag = uuid.uuid4().hex[:8]
    program = euid_program()
    rdev = os.stat("/dev/loop0").st_rdev
    # Controls, on the host outside any share: the payload and the device
    # numbers work, so a refusal below is the share mount's doing.
    ctl = tempfile.mkdtemp(prefix="hostile-ctl-", dir=h.workdir)
    ctl_prog, ctl_node = os.path.join(ctl, "id"), os.path.join(ctl, "blk")
    with open(ctl_prog, "wb") as f:
        f.write(program)
    os.chown(ctl_prog, 0, 0)
    os.chmod(ctl_prog, 0o4755)
    got = run_as_nobody_by_fd(ctl_prog)
    assert (got.returncode, got.stdout) == (0, "0\n"), \
        f"control: the setuid payload does not run as root on this host: {got}"
    os.mknod(ctl_node, stat.S_IFBLK | 0o600, rdev)
    os.close(os.open(ctl_node, os.O_RDONLY))

    squashed = h.create_share(f"hostile-squash-{tag}", "NFS", 1)
    trusted = None
    report = {}
    try:
        trusted = h.create_share(f"hostile-nosquash-{tag}", "NFS", 1)
        h.share(squashed, "AllowAccess", "sssa{sv}", "ip", ip, "rw", 0)
        h.share(trusted, "AllowAccess", "sssa{sv}", "ip", ip, "rw", 1,
                "squash", "s", "no_root_squash")
        conf_dir = os.path.join(h.state_path, "backends", "btrfs1", "ganesha")
        for share, squash in ((squashed, "Root_Squash"), (trusted, "No_Root_Squash")):
            conf = open(os.path.join(conf_dir, share.rsplit("/", 1)[1] + ".conf")).read()
            assert f"Clients = {ip}; Access_Type = RW; Protocols = 4; Squash = {squash};" \
                in conf, conf

        results, mps = {}, {}
        for key, share in (("root_squash", squashed), ("no_root_squash", trusted)):
            p = pseudo(h, share)
            assert access(h, ns, p) == "rw"
            up = write(h, ns, p, "id", program)            # nfs-cp, as root (uid 0)
            assert up.ok, str(up)
            results[key] = hostile_root(h, ns, p, "id", "blk", rdev)
            [mps[key]] = mount_of(h, share)
            assert {"nosuid", "nodev", "noexec"} <= set(mount_at(mps[key]).mount_options)
            report[key] = {k: (v["status"].split()[0],
                               {a: oct(x) if a == "mode" else x
                                for a, x in v.get("attrs", {}).items()})
                           for k, v in results[key].items()}

        # --- root_squash: root is the anonymous user on the server ------------------
        mp, res = mps["root_squash"], results["root_squash"]
        st = os.lstat(os.path.join(mp, "id"))
        assert (st.st_uid, st.st_gid) == (65534, 65534), (st, res)
        # A chown to root is refused, or (ganesha) squashed too: owner 0 becomes the
        # anonymous uid, and the answer is NFS4_OK with nothing changed.
        assert res["chown_root"].get("attrs", {}).get("owner") != "0", res
        assert res["setuid"].get("attrs", {}).get("owner") != "0", res
        for top, _, names in os.walk(mp):
            for name in names:
                s = os.lstat(os.path.join(top, name))
                assert not (s.st_mode & (stat.S_ISUID | stat.S_ISGID) and
                            (s.st_uid == 0 or s.st_gid == 0)), (name, oct(s.st_mode), s.st_uid)
        report["root_squash: the copy on the host"] = f"uid {st.st_uid} mode {oct(st.st_mode)}"
        node = os.path.join(mp, "blk")
        if res["mknod"]["ok"]:
            s = os.lstat(node)
            assert s.st_uid == 65534, s
            with pytest.raises(PermissionError):
                os.close(os.open(node, os.O_RDONLY))
        else:
            assert not os.path.lexists(node), res

        # --- no_root_squash: the writes land as root, and the host ignores them -------
        mp, res = mps["no_root_squash"], results["no_root_squash"]
        assert all(v["ok"] for v in res.values()), res
        prog = os.path.join(mp, "id")
        st = os.lstat(prog)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and \
            stat.S_IMODE(st.st_mode) == 0o4755, (oct(st.st_mode), st.st_uid)
        with open(prog, "rb") as f:
            assert f.read() == program
        node = os.path.join(mp, "blk")
        st = os.lstat(node)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev and st.st_uid == 0, st
        assert stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)
        # noexec: not even root may run it.
        with pytest.raises(PermissionError):
            subprocess.run([prog, "-u"], capture_output=True, timeout=30)
        # An unprivileged user on the host cannot run it, so never as root.
        for how, got in (("path", subprocess.run(NOBODY + [prog, "-u"], capture_output=True,
                                                 text=True, timeout=30)),
                         ("fd", run_as_nobody_by_fd(prog))):
            assert got.returncode != 0 and got.stdout.strip() != "0", (how, got)
            assert "Permission denied" in got.stderr, (how, got)
            report[f"exec as 65534 by {how}"] = f"rc {got.returncode}: {got.stderr.strip()}"
        # nodev: the node is there, and opening it is refused even to root.
        with pytest.raises(PermissionError) as denied:
            os.close(os.open(node, os.O_RDONLY))
        report["open device node as root"] = str(denied.value)
    finally:
        with capsys.disabled():
            for key, val in report.items():
                print(f"\n[client root] {key}: {val}", end="")
            print()
        for share in (squashed, trusted):
            if share is not None:
                h.share(share, "Delete", "a{sv}", 0)
        shutil.rmtree(ctl, ignore_errors=True)
