"""SIGKILL sharedd before and after every driver operation, restart it, and
check that nothing is orphaned or lost: no subvolume, mount or export without
a share, no share without its storage, no transitional state left, rules as
the backend enforces them, and the data (checksums) intact."""

import hashlib
import os
import subprocess
import tempfile

import pytest

from sharedd.mountinfo import is_mounted, read_mountinfo, top_mounts
from sharedd.config import BACKEND_OPTIONS, BackendConfig
from sharedd.helpers.ganesha import GaneshaHelper
from sharedd.hooks import HOOK_OPTIONS
from tests import crashdriver
from tests.fixtures.storage_host import destroy_storage_host, make_storage_host
from tests.support import components

SNAP = "org.sharedd.Sharedd1.Snapshot"


@pytest.fixture(scope="module")
def host(system_bus, netlab, ganesha):
    tmp_root = tempfile.mkdtemp(prefix=f"sharedd-crash-{os.getpid()}-")
    os.chmod(tmp_root, 0o755)
    h = make_storage_host(system_bus, netlab, ganesha, tmp_root,
                          driver="tests.crashdriver:CrashingBtrfsDriver")
    h.client = netlab.add_client("crash", ip4="10.71.0.51")
    try:
        h.start()
        components.used("sharedd crash recovery (SIGKILL at driver boundaries)")
        yield h
    finally:
        destroy_storage_host(h)


def sha_file(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def share_mount(h, share_id):
    mp = os.path.join(h.state_path, "backends", "btrfs1", "mounts", share_id)
    return mp if is_mounted(mp) else None


def check_invariants(h):
    """The backend matches sharedd's state exactly."""
    shares = {p.rsplit("/", 1)[1]: p for p in h.manager("ListShares", "a{sv}", 0)}
    for sid, p in shares.items():
        assert h.share_prop(p, "Status") == "available", (sid, h.share_prop(p, "Status"))
        for r in h.share_prop(p, "AccessRules"):
            assert r[4] == "active", r
    snaps = {p.rsplit("/", 1)[1] for p in h.manager("ListSnapshots", "a{sv}", 0)}
    for p in h.manager("ListSnapshots", "a{sv}", 0):
        assert h.get(p, SNAP, "Status") == "available"
    # (subvolumes the tests placed there for ManageShare to adopt excepted)
    pool_shares = {n for n in os.listdir(os.path.join(h.pool_path, "shares"))
                   if not n.startswith("legacy")}
    created = {sid for sid in shares if os.path.isdir(os.path.join(h.pool_path, "shares", sid))}
    assert pool_shares == created, f"orphan or missing subvolumes: {pool_shares ^ created}"
    assert set(os.listdir(os.path.join(h.pool_path, "snapshots"))) == snaps
    mdir = os.path.join(h.state_path, "backends", "btrfs1", "mounts")
    mounted = {m.rsplit("/", 1)[1] for m in top_mounts(read_mountinfo()) if m.startswith(mdir + "/")}
    assert mounted == set(shares), f"mount mismatch: {mounted ^ set(shares)}"
    values = {o.name: o.default for o in BACKEND_OPTIONS + GaneshaHelper.OPTIONS + HOOK_OPTIONS}
    helper = GaneshaHelper(BackendConfig("btrfs1", values),
                           os.path.join(h.state_path, "backends", "btrfs1", "ganesha"), 60)
    assert set(helper.exported_share_ids()) == set(shares), "export files mismatch"
    assert len(helper._active_ids()) >= len(shares)
    return shares, snaps


def crash_during(h, method, when, call):
    crashdriver.crash_during(h, "btrfs1", method, when, call)


def setup_share(h, name, with_snapshot=False):
    p = h.create_share(name, "NFS", 1)
    sid = p.rsplit("/", 1)[1]
    mp = share_mount(h, sid)
    with open(os.path.join(mp, "data.bin"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    digest = sha_file(os.path.join(mp, "data.bin"))
    rid = h.share(p, "AllowAccess", "sssa{sv}", "ip", "10.71.0.51", "rw", 0)
    snap = h.share(p, "CreateSnapshot", "sa{sv}", "s1", 0) if with_snapshot else None
    return p, sid, digest, rid, snap


def cleanup(h):
    for s in h.manager("ListSnapshots", "a{sv}", 0):
        h.call(s, SNAP, "Delete", "a{sv}", 0)
    for p in h.manager("ListShares", "a{sv}", 0):
        h.share(p, "Delete", "a{sv}", 0)


def nfs_ok(h, sid):
    return h.ganesha.nfs_ls(h.client, f"/shares/{sid}").ok


CASES = ["create_share", "create_share_from_snapshot", "delete_share", "create_snapshot",
         "delete_snapshot", "revert_to_snapshot", "allow_access", "deny_access",
         "extend_share", "shrink_share", "manage_existing", "unmanage"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_restart(host, case, when):
    h = host
    p, sid, digest, rid, snap = setup_share(h, f"c-{case[:20]}-{when}".replace("_", "-"),
                                            with_snapshot=True)
    busctl = lambda *a: h.call(*a, check=False)   # noqa: E731
    share_if = "org.sharedd.Sharedd1.Share"
    if case == "create_share":
        crash_during(h, case, when, lambda: h.manager("CreateShare", "ssta{sv}", "newshare", "NFS", 1,
                                                      0, check=False))
        expect_gone = "newshare"
    elif case == "create_share_from_snapshot":
        crash_during(h, case, when, lambda: h.manager("CreateShare", "ssta{sv}", "clone", "NFS", 1,
                                                      1, "snapshot", "o", snap, check=False))
        expect_gone = "clone"
    elif case == "delete_share":
        h.call(snap, SNAP, "Delete", "a{sv}", 0)
        crash_during(h, "delete_share", when, lambda: busctl(p, share_if, "Delete", "a{sv}", 0))
        shares, _ = check_invariants(h)
        assert sid not in shares, "an interrupted delete is finished"
        cleanup(h)
        return
    elif case == "create_snapshot":
        crash_during(h, case, when, lambda: busctl(p, share_if, "CreateSnapshot", "sa{sv}", "s2", 0))
    elif case == "delete_snapshot":
        crash_during(h, case, when, lambda: busctl(snap, SNAP, "Delete", "a{sv}", 0))
        _, snaps = check_invariants(h)
        assert snap.rsplit("/", 1)[1] not in snaps
    elif case == "revert_to_snapshot":
        mp = share_mount(h, sid)
        with open(os.path.join(mp, "data.bin"), "wb") as f:
            f.write(b"changed after the snapshot")
        changed = sha_file(os.path.join(mp, "data.bin"))
        crash_during(h, case, when, lambda: busctl(p, share_if, "RevertToSnapshot", "oa{sv}", snap, 0))
        got = sha_file(os.path.join(share_mount(h, sid), "data.bin"))
        assert got == (changed if when == "before" else digest)
        digest = got
    elif case == "allow_access":
        h.share(p, "DenyAccess", "sa{sv}", rid, 0)
        crash_during(h, "update_access", when,
                     lambda: busctl(p, share_if, "AllowAccess", "sssa{sv}", "ip", "10.71.0.51", "rw", 0))
        rules = h.share_prop(p, "AccessRules")
        # The intent was recorded before the crash: recovery applies it.
        assert [(r[2], r[4]) for r in rules] == [("10.71.0.51", "active")]
        assert nfs_ok(h, sid)
    elif case == "deny_access":
        crash_during(h, "update_access", when, lambda: busctl(p, share_if, "DenyAccess", "sa{sv}", rid, 0))
        assert h.share_prop(p, "AccessRules") == []
        assert not nfs_ok(h, sid), "a denied client must not get in after recovery"
    elif case == "extend_share":
        crash_during(h, case, when, lambda: busctl(p, share_if, "Extend", "ta{sv}", 3, 0))
        assert h.share_prop(p, "SizeGiB") == 3, "an interrupted extend is finished"
    elif case == "shrink_share":
        h.share(p, "Extend", "ta{sv}", 2, 0)
        crash_during(h, case, when, lambda: busctl(p, share_if, "Shrink", "ta{sv}", 1, 0))
        assert h.share_prop(p, "SizeGiB") == 2, "an interrupted shrink is rolled back"
    elif case == "manage_existing":
        legacy = os.path.join(h.pool_path, "shares", f"legacy-{when}")   # where adoption may be
        subprocess.run(["btrfs", "subvolume", "create", legacy], check=True, capture_output=True)
        crash_during(h, case, when, lambda: h.manager("ManageShare", "sssa{sv}", "btrfs1", "NFS",
                                                      legacy, 1, "name", "s", "legacy", check=False))
        expect_gone = "legacy"
        assert os.path.isdir(legacy), "manage never destroys the existing data"
    elif case == "unmanage":
        legacy = os.path.join(h.pool_path, "shares", f"legacy-u-{when}")
        subprocess.run(["btrfs", "subvolume", "create", legacy], check=True, capture_output=True)
        with open(os.path.join(legacy, "keep"), "w") as f:
            f.write("keep me")
        mp = h.manager("ManageShare", "sssa{sv}", "btrfs1", "NFS", legacy, 1, "name", "s", f"legacy-u-{when}")
        crash_during(h, case, when, lambda: busctl(mp, share_if, "Unmanage", "a{sv}", 0))
        assert open(os.path.join(legacy, "keep")).read() == "keep me"
        expect_gone = f"legacy-u-{when}"
    shares, _ = check_invariants(h)
    if case in ("create_share", "create_share_from_snapshot", "manage_existing", "unmanage"):
        names = [h.share_prop(x, "Name") for x in shares.values()]
        assert expect_gone not in names, f"{expect_gone} should have been rolled back/finished"
    # The original share and its data are intact, and served.
    assert sid in shares
    assert sha_file(os.path.join(share_mount(h, sid), "data.bin")) == digest
    if case != "deny_access":
        assert nfs_ok(h, sid)
    cleanup(h)


GROUP, GSNAP = "org.sharedd.Sharedd1.ShareGroup", "org.sharedd.Sharedd1.ShareGroupSnapshot"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("case", ["create_share_group_snapshot", "delete_share_group_snapshot",
                                  "allow_snapshot_access", "deny_snapshot_access"])
def test_sigkill_in_group_snapshots_and_snapshot_exports(host, case, when):
    """A group snapshot (also what a schedule's run does per share: one
    create_snapshot, the case above) or a snapshot export cut by SIGKILL:
    after the restart no snapshot subvolume, mount or export is orphaned,
    the shares' data is intact, and a snapshot's export is there exactly
    if its rule is."""
    h = host
    tag = f"{case[:14]}-{when}".replace("_", "-")
    group = h.manager("CreateShareGroup", "sa{sv}", f"g-{tag}", 0)
    members = [setup_share_in(h, f"m{i}-{tag}", group) for i in range(2)]
    busctl = lambda *a: h.call(*a, check=False)   # noqa: E731
    if case == "create_share_group_snapshot":
        crash_during(h, case, when, lambda: busctl(group, GROUP, "CreateSnapshot", "sa{sv}",
                                                   "g1", 0))
    elif case == "delete_share_group_snapshot":
        gs = h.call(group, GROUP, "CreateSnapshot", "sa{sv}", "g1", 0)
        crash_during(h, case, when, lambda: busctl(gs, GSNAP, "Delete", "a{sv}", 0))
    else:
        snap = h.share(members[0][0], "CreateSnapshot", "sa{sv}", "exported", 0)
        snap_id = snap.rsplit("/", 1)[1]
        if case == "allow_snapshot_access":
            crash_during(h, "snapshot_update_access", when, lambda: busctl(
                snap, SNAP, "AllowAccess", "ssa{sv}", "ip", "10.71.0.51", 0))
        else:
            rid = h.call(snap, SNAP, "AllowAccess", "ssa{sv}", "ip", "10.71.0.51", 0)
            crash_during(h, "snapshot_update_access", when, lambda: busctl(
                snap, SNAP, "DenyAccess", "sa{sv}", rid, 0))
        rules = h.get(snap, SNAP, "AccessRules")
        # the intent was recorded before the crash: recovery completes it
        assert [(r[2], r[4]) for r in rules] == \
            ([("10.71.0.51", "active")] if case == "allow_snapshot_access" else [])
        exported = h.ganesha.nfs_ls(h.client, f"/shares/{snap_id}").ok
        assert exported == (case == "allow_snapshot_access")
        if rules:
            h.call(snap, SNAP, "DenyAccess", "sa{sv}", rules[0][0], 0)
        h.call(snap, SNAP, "Delete", "a{sv}", 0)
    # no group snapshot is left half made or half deleted
    managed = h.call("/org/sharedd/Sharedd1", "org.freedesktop.DBus.ObjectManager",
                     "GetManagedObjects")
    for path, ifaces in managed.items():
        if GSNAP in ifaces and ifaces[GSNAP]["ShareGroup"]["data"] == group:
            assert ifaces[GSNAP]["Status"]["data"] == "available", (path, ifaces[GSNAP])
            h.call(path, GSNAP, "Delete", "a{sv}", 0)
    shares, _ = check_invariants(h)
    for p, sid, digest in members:
        assert sid in shares and nfs_ok(h, sid)
        assert sha_file(os.path.join(share_mount(h, sid), "data.bin")) == digest
        h.share(p, "Delete", "a{sv}", 0)
    h.call(group, GROUP, "Delete", "a{sv}", 0)


def setup_share_in(h, name, group):
    p = h.create_share(name, "NFS", 1, share_group=group)
    sid = p.rsplit("/", 1)[1]
    with open(os.path.join(share_mount(h, sid), "data.bin"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    h.share(p, "AllowAccess", "sssa{sv}", "ip", "10.71.0.51", "rw", 0)
    return p, sid, sha_file(os.path.join(share_mount(h, sid), "data.bin"))
