"""End to end, as an administrator would: busctl against the real sharedd,
real btrfs on a loop device, real NFS-Ganesha, and real NFS clients (libnfs)
in client network namespaces with their own addresses proving rw, ro and no
access after every rule change."""

import hashlib
import json
import os
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
