"""BtrfsDriver against a real btrfs pool on a loop device (run as root).

Exports go to a recording fake helper: the real NFS-Ganesha and Samba helpers
are tested on their own and combined with this driver end to end elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import subprocess
import uuid
from typing import Dict, List

import pytest

from sharedd.mountinfo import read_mountinfo, top_mounts
from sharedd.errors import (AlreadyExists, BackendFailure, ConfigError, InvalidArgument)
from sharedd.drivers.btrfs import GiB, BtrfsDriver, parse_qgroup_show
from sharedd.helpers.base import ExportHelper
from sharedd.models import AccessRule, Share, Snapshot
from tests.fixtures.btrfs_pool import btrfs_pool_env


class RecordingHelper(ExportHelper):
    """Remembers what is exported where, and checks the path is a mount."""

    helper_name = "recording"
    access_levels = {"ip": ("rw", "ro"), "user": ("rw", "ro")}

    def __init__(self, protocol: str):
        super().__init__(None, "")
        self.protocol = protocol
        self.exports: Dict[str, tuple] = {}
        self.calls: List[tuple] = []

    def _location(self, share: Share) -> str:
        return f"127.0.0.1:/{share.id}" if self.protocol == "NFS" else f"//127.0.0.1/{share.name}"

    def export(self, share, path, rules):
        assert os.path.ismount(path), f"export of {path}, which is not a mount point"
        self.calls.append(("export", share.id, path, [r.access_to for r in rules]))
        self.exports[share.id] = (path, [(r.access_to, r.access_level) for r in rules])
        return [self._location(share)]

    def unexport(self, share, path):
        self.calls.append(("unexport", share.id, path))
        self.exports.pop(share.id, None)

    def update_access(self, share, path, access_rules, add_rules, delete_rules):
        self.calls.append(("update_access", share.id, path, [r.access_to for r in access_rules],
                           [r.access_to for r in add_rules], [r.access_to for r in delete_rules]))

    def export_locations(self, share, path):
        return [self._location(share)]

    def mount_hints(self, share, path):
        if self.protocol != "NFS":
            return {}
        return {"fstype": "nfs4", "export": self._location(share), "options": ["vers=4.1"]}


# --- helpers -------------------------------------------------------------------------
def new_share(size_gib: int = 1, protocol: str = "NFS", **kw) -> Share:
    sid = uuid.uuid4().hex
    return Share(id=sid, name="s" + sid[:8], backend="btrfs_test", protocol=protocol,
                 size_gib=size_gib, status="creating", **kw)


def new_snapshot(share: Share) -> Snapshot:
    return Snapshot(id=uuid.uuid4().hex, name="snap", share_id=share.id,
                    size_gib=share.size_gib, status="creating")


def rule(to: str, level: str = "rw") -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id="", access_type="ip",
                      access_to=to, access_level=level, state="active")


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def mountinfo_line(mp: str):
    """(root, super options) of the topmost mount at mp, or None."""
    e = top_mounts(read_mountinfo()).get(mp)
    return (e.root, ",".join(e.super_options)) if e else None


def qgroup_limit(path: str) -> int:
    """max_rfer of the subvolume at path, read back with btrfs itself."""
    sid = sh("btrfs", "inspect-internal", "rootid", path).strip()
    out = sh("btrfs", "qgroup", "show", "-r", "--raw", os.path.dirname(path))
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == f"0/{sid}":
            return -1 if fields[3] == "none" else int(fields[3])
    raise AssertionError(f"no qgroup 0/{sid} in {out}")


def is_subvolume(path: str) -> bool:
    return subprocess.run(["btrfs", "subvolume", "show", path], capture_output=True,
                          timeout=60).returncode == 0


def write_file(path: str, nbytes: int, seed: bytes = b"x") -> str:
    data = (hashlib.sha256(seed).digest() * (nbytes // 32 + 1))[:nbytes]
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def checksum(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def env(btrfs_pool):
    helpers = {"NFS": RecordingHelper("NFS"), "CIFS": RecordingHelper("CIFS")}
    drv = btrfs_pool.driver(helpers)
    drv.do_setup()          # on an already mounted pool: must just check it
    return btrfs_pool, drv, helpers


# --- tests ------------------------------------------------------------------------------
def test_setup_created_pool_from_image(btrfs_pool):
    m = top_mounts(read_mountinfo())[os.path.realpath(btrfs_pool.path)]
    assert m.fstype == "btrfs" and m.source.startswith("/dev/loop")
    assert os.path.getsize(btrfs_pool.image) == btrfs_pool.size_gib * GiB
    # sparse: far fewer blocks than its size
    assert os.stat(btrfs_pool.image).st_blocks * 512 < btrfs_pool.size_gib * GiB / 4
    assert os.path.isdir(os.path.join(btrfs_pool.path, "shares"))
    assert os.path.isdir(os.path.join(btrfs_pool.path, "snapshots"))
    assert "0/5" in sh("btrfs", "qgroup", "show", btrfs_pool.path)   # quotas are on


def test_share_lifecycle(env):
    pool, drv, helpers = env
    share = new_share(size_gib=2)
    upd = drv.create_share(share)
    sub = os.path.join(pool.path, "shares", share.id)
    mp = os.path.join(pool.mount_dir, share.id)
    assert upd.export_locations == [f"127.0.0.1:/{share.id}"]
    assert upd.provider_location == f"shares/{share.id}"
    assert is_subvolume(sub)
    root, opts = mountinfo_line(mp)
    assert root == f"/shares/{share.id}" and f"subvol=/shares/{share.id}" in opts.split(",")
    assert qgroup_limit(sub) == 2 * GiB
    assert helpers["NFS"].exports[share.id] == (mp, [])
    share.export_locations = upd.export_locations

    # replay of create (crash after the subvolume was made) is harmless
    assert drv.create_share(share).export_locations == upd.export_locations
    digest = write_file(os.path.join(mp, "data.bin"), 3 << 20, b"v1")
    assert checksum(os.path.join(sub, "data.bin")) == digest

    # snapshot: read-only
    snap = new_snapshot(share)
    snap.provider_location = drv.create_snapshot(snap, share)
    snap_path = os.path.join(pool.path, snap.provider_location)
    assert snap.provider_location == f"snapshots/{snap.id}"
    assert sh("btrfs", "property", "get", "-ts", snap_path, "ro").strip() == "ro=true"
    with pytest.raises(OSError) as exc:
        write_file(os.path.join(snap_path, "nope"), 10)
    assert exc.value.errno == errno.EROFS
    assert drv.create_snapshot(snap, share) == snap.provider_location   # replay

    # a share from the snapshot has the data, in its own writable subvolume
    clone = new_share(size_gib=1)
    cupd = drv.create_share_from_snapshot(clone, snap, share)
    cmp_ = os.path.join(pool.mount_dir, clone.id)
    assert checksum(os.path.join(cmp_, "data.bin")) == digest
    write_file(os.path.join(cmp_, "extra"), 100)
    assert not os.path.exists(os.path.join(mp, "extra"))
    assert qgroup_limit(os.path.join(pool.path, "shares", clone.id)) == 1 * GiB
    assert cupd.export_locations == [f"127.0.0.1:/{clone.id}"]

    # modify, then revert: the data comes back, re-exported with the given rules
    write_file(os.path.join(mp, "data.bin"), 1 << 20, b"v2")
    write_file(os.path.join(mp, "new-file"), 10, b"v2")
    assert checksum(os.path.join(mp, "data.bin")) != digest
    rules = [rule("10.70.0.5"), rule("10.70.0.6", "ro")]
    rupd = drv.revert_to_snapshot(share, snap, rules)
    assert checksum(os.path.join(mp, "data.bin")) == digest
    assert not os.path.exists(os.path.join(mp, "new-file"))
    assert rupd.export_locations == upd.export_locations
    assert helpers["NFS"].exports[share.id] == (mp, [("10.70.0.5", "rw"), ("10.70.0.6", "ro")])
    assert qgroup_limit(sub) == 2 * GiB
    assert not os.path.lexists(sub + ".revert-new") and not os.path.lexists(sub + ".revert-old")
    write_file(os.path.join(mp, "after-revert"), 10)      # writable again
    assert os.path.exists(os.path.join(sub, "after-revert"))   # mount shows the live subvolume

    # access changes go to the helper with the mount point
    drv.update_access(share, rules, [rules[0]], [])
    assert helpers["NFS"].calls[-1] == ("update_access", share.id, mp,
                                        ["10.70.0.5", "10.70.0.6"], ["10.70.0.5"], [])

    # delete: no subvolume, no mount, no export; twice is fine
    for s in (clone, share):
        drv.delete_share(s)
        assert not os.path.lexists(os.path.join(pool.path, "shares", s.id))
        assert mountinfo_line(os.path.join(pool.mount_dir, s.id)) is None
        assert not os.path.exists(os.path.join(pool.mount_dir, s.id))
        assert s.id not in helpers["NFS"].exports
        drv.delete_share(s)
    drv.delete_snapshot(snap, share)
    assert not os.path.lexists(snap_path)
    drv.delete_snapshot(snap, share)


def test_extend_shrink_and_refused_shrink(env):
    pool, drv, _ = env
    share = new_share(size_gib=1)
    drv.create_share(share)
    sub = os.path.join(pool.path, "shares", share.id)
    mp = os.path.join(pool.mount_dir, share.id)
    drv.extend_share(share, 3)
    assert qgroup_limit(sub) == 3 * GiB
    share.size_gib = 3
    digest = write_file(os.path.join(mp, "big"), (1 << 30) + (64 << 20), b"big")
    usage = drv.get_share_usage_gib(share)
    assert 1.0 < usage < 1.2, usage            # seen at once, despite the qgroup lag
    with pytest.raises(InvalidArgument) as exc:
        drv.shrink_share(share, 1)
    assert "uses 1.0" in str(exc.value) and "2 GiB needed" in str(exc.value)
    assert qgroup_limit(sub) == 3 * GiB           # nothing changed
    assert checksum(os.path.join(mp, "big")) == digest
    drv.shrink_share(share, 2)
    assert qgroup_limit(sub) == 2 * GiB
    with pytest.raises(InvalidArgument):
        drv.extend_share(share, 0)
    drv.delete_share(share)


def test_quota_is_enforced(env):
    pool, drv, _ = env
    share = new_share(size_gib=1)
    drv.create_share(share)
    mp = os.path.join(pool.mount_dir, share.id)
    chunk = b"\x5a" * (4 << 20)
    written = 0
    with pytest.raises(OSError) as exc:
        with open(os.path.join(mp, "fill"), "wb") as f:
            while written < (3 << 29):          # stop at 1.5 GiB whatever happens
                f.write(chunk)
                written += len(chunk)
            os.fsync(f.fileno())
    assert exc.value.errno == errno.EDQUOT
    assert (1 << 30) - (64 << 20) <= written <= (1 << 30)
    drv.delete_share(share)


def test_manage_and_unmanage(env):
    pool, default, helpers = env
    # Only the pool's shares directory and btrfs_manage_paths may be adopted
    # from: a subvolume anywhere else in the pool (where it shares a btrfs
    # with the OS: anything) is refused before anything happens.
    os.makedirs(os.path.join(pool.path, "adopt"), exist_ok=True)
    rel = f"adopt/manual-{uuid.uuid4().hex[:8]}"
    path = os.path.join(pool.path, rel)
    sh("btrfs", "subvolume", "create", path)
    digest = write_file(os.path.join(path, "keep"), 5 << 20, b"m")
    stray = os.path.join(pool.path, f"os-{uuid.uuid4().hex[:6]}")
    sh("btrfs", "subvolume", "create", stray)
    for drv_, bad in ((default, rel), (default, stray)):
        with pytest.raises(InvalidArgument, match="outside what backend"):
            drv_.check_manage(bad, {})
        with pytest.raises(InvalidArgument, match="outside what backend"):
            drv_.manage_existing(new_share(), bad, {})
    sh("btrfs", "subvolume", "delete", stray)
    drv = pool.driver(helpers, btrfs_manage_paths=["adopt"])
    assert drv.check_manage(rel, {}) == rel

    share = new_share(size_gib=0)
    upd = drv.manage_existing(share, rel, {})
    assert upd.provider_location == rel and upd.size_gib == 1   # usage rounded up, min 1
    share.provider_location, share.size_gib = upd.provider_location, upd.size_gib
    mp = os.path.join(pool.mount_dir, share.id)
    assert mountinfo_line(mp)[0] == "/" + rel
    assert checksum(os.path.join(mp, "keep")) == digest
    assert qgroup_limit(path) == 1 * GiB
    assert helpers["NFS"].exports[share.id][0] == mp

    # the same subvolume for another share: refused, nothing changed
    other = new_share()
    with pytest.raises(AlreadyExists):
        drv.manage_existing(other, path, {})
    assert not os.path.exists(os.path.join(pool.mount_dir, other.id))

    # unmanage keeps the data, stops serving it
    drv.unmanage(share)
    assert mountinfo_line(mp) is None and share.id not in helpers["NFS"].exports
    assert checksum(os.path.join(path, "keep")) == digest

    # manage again (absolute path): size from the existing limit, then from options
    sh("btrfs", "qgroup", "limit", str(3 * GiB - 5), path)
    again = new_share(size_gib=0)
    assert drv.manage_existing(again, path, {}).size_gib == 3
    drv.unmanage(again)
    third = new_share(size_gib=0)
    assert drv.manage_existing(third, path + "/", {"size_gib": 2}).size_gib == 2
    assert qgroup_limit(path) == 2 * GiB
    drv.unmanage(third)

    # refusals
    plain = os.path.join(pool.path, f"plain-{uuid.uuid4().hex[:6]}")
    os.mkdir(plain)
    snap_parent = new_share()
    drv.create_share(snap_parent)
    snap = new_snapshot(snap_parent)
    drv.create_snapshot(snap, snap_parent)
    for bad in ("/tmp", "../outside", plain, rel + "-missing", "", pool.path,
                f"snapshots/{snap.id}"):
        with pytest.raises(InvalidArgument):
            drv.manage_existing(new_share(), bad, {})
    for size in (0, -1, "x", True):
        with pytest.raises(InvalidArgument):
            drv.manage_existing(new_share(), rel, {"size_gib": size})
    big = os.path.join(path, "big")
    write_file(big, (1 << 30) + (1 << 20))
    with pytest.raises(InvalidArgument) as exc:
        drv.manage_existing(new_share(), rel, {"size_gib": 1})
    assert "too small" in str(exc.value)
    assert os.listdir(pool.mount_dir) == [d for d in os.listdir(pool.mount_dir)
                                          if os.path.ismount(os.path.join(pool.mount_dir, d))]
    drv.delete_snapshot(snap, snap_parent)
    drv.delete_share(snap_parent)
    sh("btrfs", "subvolume", "delete", path)


def test_manage_and_unmanage_snapshots(env):
    """A read-only snapshot of the share made by hand is adopted, reverted
    to and cloned; release keeps it; everything else is refused unchanged."""
    pool, drv, helpers = env
    share = new_share(size_gib=1)
    share.provider_location = drv.create_share(share).provider_location or ""
    mp = os.path.join(pool.mount_dir, share.id)
    digest = write_file(os.path.join(mp, "f"), 3 << 20, b"before")
    sub = os.path.join(pool.path, "shares", share.id)
    name = f"handmade-{uuid.uuid4().hex[:6]}"
    rel = f"snapshots/{name}"
    sh("btrfs", "subvolume", "snapshot", "-r", sub, os.path.join(pool.path, rel))
    write_file(os.path.join(mp, "f"), 100, b"after")

    snap = new_snapshot(share)
    assert drv.check_manage_snapshot(share, rel) == rel
    assert drv.check_manage_snapshot(share, os.path.join(pool.path, rel) + "/") == rel
    assert drv.manage_existing_snapshot(snap, share, rel) == 1      # 3 MiB, rounded up
    snap.provider_location = rel
    # an adopted snapshot is one like any other: revert, clone
    drv.revert_to_snapshot(share, snap, [])
    assert checksum(os.path.join(mp, "f")) == digest
    clone = new_share(size_gib=1)
    drv.create_share_from_snapshot(clone, snap, share)
    assert checksum(os.path.join(pool.mount_dir, clone.id, "f")) == digest
    drv.delete_share(clone)
    # released: the subvolume stays, read-only
    drv.unmanage_snapshot(snap, share)
    assert subprocess.run(["btrfs", "property", "get", os.path.join(pool.path, rel), "ro"],
                          capture_output=True, text=True).stdout.strip() == "ro=true"

    # refusals: not in the snapshot area, writable, another share's, not a subvolume
    other = new_share(size_gib=1)
    drv.create_share(other)
    other_snap = f"snapshots/other-{uuid.uuid4().hex[:6]}"
    sh("btrfs", "subvolume", "snapshot", "-r", os.path.join(pool.path, "shares", other.id),
       os.path.join(pool.path, other_snap))
    writable = f"snapshots/rw-{uuid.uuid4().hex[:6]}"
    sh("btrfs", "subvolume", "snapshot", sub, os.path.join(pool.path, writable))
    plain = f"snapshots/plain-{uuid.uuid4().hex[:6]}"
    os.mkdir(os.path.join(pool.path, plain))
    for bad, why in ((f"shares/{share.id}", "outside what backend"),
                     ("../outside", "not inside the btrfs pool"), ("/etc", "not inside"),
                     ("", "empty"), (pool.path, "not inside"),
                     (writable, "writable subvolume"),
                     (other_snap, "not a snapshot of share"),
                     (plain, "not a btrfs subvolume"), (rel + "-missing", "not a btrfs subvolume")):
        with pytest.raises(InvalidArgument, match=why):
            drv.check_manage_snapshot(share, bad)
        with pytest.raises(InvalidArgument, match=why):
            drv.manage_existing_snapshot(new_snapshot(share), share, bad)
    for path in (rel, other_snap, writable):
        sh("btrfs", "subvolume", "delete", os.path.join(pool.path, path))
    os.rmdir(os.path.join(pool.path, plain))
    drv.delete_share(other)
    drv.delete_share(share)


def test_ensure_share_recovers_interrupted_reverts(env):
    pool, drv, helpers = env
    share = new_share(size_gib=1)
    drv.create_share(share)
    sub = os.path.join(pool.path, "shares", share.id)
    mp = os.path.join(pool.mount_dir, share.id)
    write_file(os.path.join(mp, "f"), 100, b"old")
    rules = [rule("10.70.0.9")]

    def make_copy(suffix: str, seed: bytes) -> str:
        sh("btrfs", "subvolume", "create", sub + suffix)
        return write_file(os.path.join(sub + suffix, "f"), 100, seed)

    def settled(expect_digest: str):
        assert checksum(os.path.join(mp, "f")) == expect_digest
        assert checksum(os.path.join(sub, "f")) == expect_digest
        assert not os.path.lexists(sub + ".revert-new")
        assert not os.path.lexists(sub + ".revert-old")
        assert qgroup_limit(sub) == 1 * GiB
        assert helpers["NFS"].exports[share.id] == (mp, [("10.70.0.9", "rw")])

    # crash after "rename old away", before "rename new in": finish
    helpers["NFS"].unexport(share, mp)
    subprocess.run(["umount", mp], check=True)
    new_digest = make_copy(".revert-new", b"new")
    os.rename(sub, sub + ".revert-old")
    drv.ensure_share(share, rules)
    settled(new_digest)

    # crash before the swap: both live and new exist -> roll back
    live = checksum(os.path.join(sub, "f"))
    make_copy(".revert-new", b"other")
    drv.ensure_share(share, rules)
    settled(live)

    # crash after the swap, before the old copy was deleted
    make_copy(".revert-old", b"stale")
    drv.ensure_share(share, rules)
    settled(live)

    # ensure remounts an unmounted share and restores its limit
    helpers["NFS"].exports.clear()
    subprocess.run(["umount", mp], check=True)
    sh("btrfs", "qgroup", "limit", "none", sub)
    drv.ensure_share(share, rules)
    settled(live)

    # a vanished subvolume is an error, not silently recreated
    drv.delete_share(share)
    with pytest.raises(BackendFailure):
        drv.ensure_share(share, rules)


def test_restart_keeps_data():
    """Pool unmounted (as after a reboot): do_setup mounts the same image again."""
    with btrfs_pool_env(size_gib=2) as pool:
        helpers = {"NFS": RecordingHelper("NFS")}
        drv = pool.driver(helpers)
        share = new_share()
        drv.create_share(share)
        mp = os.path.join(pool.mount_dir, share.id)
        digest = write_file(os.path.join(mp, "d"), 1 << 20, b"r")
        uuid_before = sh("blkid", "-p", "-s", "UUID", "-o", "value", pool.image).strip()
        subprocess.run(["umount", mp], check=True)
        subprocess.run(["umount", pool.path], check=True)
        assert not os.path.ismount(pool.path)

        drv2 = pool.driver({"NFS": RecordingHelper("NFS")})
        drv2.do_setup()
        assert os.path.ismount(pool.path)
        assert sh("blkid", "-p", "-s", "UUID", "-o", "value", pool.image).strip() == uuid_before
        drv2.ensure_share(share, [])
        assert checksum(os.path.join(mp, "d")) == digest
        assert drv2.helpers["NFS"].exports[share.id][0] == mp
        drv2.delete_share(share)


def test_existing_non_btrfs_image_is_never_formatted(tmp_path):
    from tests.fixtures.btrfs_pool import BtrfsPool
    pool = BtrfsPool(str(tmp_path), size_gib=1)
    with open(pool.image, "wb") as f:
        f.write(b"precious" * 1000)
    with pytest.raises(BackendFailure) as exc:
        pool.driver().do_setup()
    assert "refusing to format" in str(exc.value)
    with open(pool.image, "rb") as f:
        assert f.read() == b"precious" * 1000
    assert not os.path.ismount(pool.path)


def test_stats_and_hints(env):
    pool, drv, _ = env
    stats = drv.get_share_stats()
    assert isinstance(stats["total_capacity_gb"], float)
    assert pool.size_gib * 0.9 <= stats["total_capacity_gb"] <= pool.size_gib
    assert 0 < stats["free_capacity_gb"] <= stats["total_capacity_gb"]
    assert stats["pool_path"] == os.path.realpath(pool.path)
    assert stats["snapshot_support"] and stats["revert_to_snapshot_support"]

    share = new_share()
    hints = drv.get_mount_hints(share)
    assert hints == {"fstype": "nfs4", "export": f"127.0.0.1:/{share.id}", "options": ["vers=4.1"]}
    cifs = new_share(protocol="CIFS", export_locations=["//127.0.0.1/x"])
    assert drv.get_mount_hints(cifs) == {"fstype": "cifs", "export": "//127.0.0.1/x",
                                         "options": []}


def test_cifs_share_uses_cifs_helper(env):
    pool, drv, helpers = env
    share = new_share(protocol="CIFS")
    upd = drv.create_share(share)
    assert upd.export_locations == [f"//127.0.0.1/{share.name}"]
    assert share.id in helpers["CIFS"].exports and share.id not in helpers["NFS"].exports
    drv.delete_share(share)
    assert share.id not in helpers["CIFS"].exports


def test_bad_ids_are_refused(env):
    pool, drv, _ = env
    for bad in ("../x", "a/b", "", ".hidden", "x.revert-new", "a,b"):
        with pytest.raises(InvalidArgument):
            drv.create_share(dataclasses.replace(new_share(), id=bad))
    with pytest.raises(InvalidArgument):
        drv.delete_share(new_share(provider_location="../../etc"))
    assert not os.path.exists(os.path.join(pool.path, "shares", "x.revert-new"))
    assert not os.path.exists(os.path.join(pool.path, "shares", "a,b"))


# --- unit tests (no pool) ---------------------------------------------------------------
QGROUP_NEW = """\
Qgroupid    Referenced    Exclusive  Max referenced  Max exclusive   Path 
--------    ----------    ---------  --------------  -------------   ---- 
0/5              16384        16384            none           none   <toplevel>
0/256        104841216    104841216       104857600           none   shares/abc
1/100            16384        16384            none           none   
"""
QGROUP_OLD = """\
qgroupid         rfer         excl     max_rfer     max_excl
--------         ----         ----     --------     --------
0/5             16384        16384         none         none
0/257            4096         4096   1073741824         none
"""


def test_parse_qgroup_show():
    groups = parse_qgroup_show(QGROUP_NEW)
    assert set(groups) == {5, 256}
    assert groups[256].referenced == 104841216 and groups[256].max_referenced == 104857600
    assert groups[5].max_referenced is None
    old = parse_qgroup_show(QGROUP_OLD)
    assert old[257].max_referenced == 1 << 30 and old[257].referenced == 4096


@pytest.mark.parametrize("text", [
    "",
    "ERROR: can't list qgroups: quotas not enabled\n",
    QGROUP_NEW.replace("104841216    104841216", "100.00MiB    100.00MiB"),
    QGROUP_NEW.replace("Max referenced", "Max whatever"),
    QGROUP_NEW + "0/300 12\n",
    QGROUP_NEW + "garbage line here x y\n",
])
def test_parse_qgroup_show_rejects_surprises(text):
    with pytest.raises(BackendFailure):
        parse_qgroup_show(text)


def test_check_config(btrfs_pool):
    def check(**over):
        BtrfsDriver.check_config(btrfs_pool.config(**over), lambda o: "sharedd.conf",
                                 lambda o: "b")
    check()
    check(btrfs_manage_paths=["adopt", "old/shares"])
    for over in ({"btrfs_pool_path": "/"},
                 {"btrfs_pool_image": os.path.join(btrfs_pool.path, "img")},
                 {"btrfs_share_mount_dir": os.path.join(btrfs_pool.path, "m")},
                 {"btrfs_manage_paths": ["/srv"]}, {"btrfs_manage_paths": ["../x"]},
                 {"btrfs_manage_paths": ["snapshots"]}, {"btrfs_manage_paths": ["."]}):
        with pytest.raises(ConfigError) as exc:
            check(**over)
        assert "sharedd.conf: [b] btrfs_" in str(exc.value)


def test_id_and_quota_reads_agree_with_btrfs_progs(env):
    """The ioctl and sysfs reads the driver does per operation (no process,
    no listing of every subvolume) give what btrfs-progs gives."""
    from sharedd.drivers.btrfs_kernel import subvolume_id
    pool, drv, _ = env
    share = new_share(size_gib=3)
    drv.create_share(share)
    sub = os.path.join(pool.path, "shares", share.id)
    write_file(os.path.join(pool.mount_dir, share.id, "f"), 2 << 20)
    sh("btrfs", "filesystem", "sync", pool.path)   # quota accounting follows a commit
    assert subvolume_id(sub) == int(sh("btrfs", "inspect-internal", "rootid", sub))
    assert subvolume_id(pool.path) == 5
    group = drv._qgroup(sub)
    listed = parse_qgroup_show(sh("btrfs", "qgroup", "show", "-r", "-e", "--raw", pool.path))
    want = listed[subvolume_id(sub)]
    assert (group.referenced, group.exclusive, group.max_referenced) == \
        (want.referenced, want.exclusive, 3 * GiB)
    assert group.referenced >= 2 << 20
    # ensure puts back a limit changed behind its back, and keeps a right one
    sh("btrfs", "qgroup", "limit", str(5 * GiB), sub)
    drv.ensure_share(share, [])
    assert qgroup_limit(sub) == 3 * GiB
    sh("btrfs", "qgroup", "limit", "none", sub)
    drv.ensure_share(share, [])
    assert qgroup_limit(sub) == 3 * GiB
    drv.delete_share(share)
    assert not os.path.lexists(sub)


def test_kernel_refusals_are_named_failures_and_replay_works(env):
    """The steps are system calls now: a refusal (a subvolume inside the
    share) is a BackendFailure that says what and why, nothing half-done
    stays wrong, and the replay after the obstacle is gone completes."""
    from sharedd.drivers import btrfs_kernel
    pool, drv, helpers = env
    share = new_share()
    drv.create_share(share)
    sub = os.path.join(pool.path, "shares", share.id)
    sh("btrfs", "subvolume", "create", os.path.join(sub, "inner"))
    with pytest.raises(BackendFailure, match=r"subvolume delete .*(not empty|Directory)"):
        drv.delete_share(share)
    assert is_subvolume(sub)
    sh("btrfs", "subvolume", "delete", os.path.join(sub, "inner"))
    drv.delete_share(share)
    assert not os.path.lexists(sub) and share.id not in helpers["NFS"].exports
    for bad in ("..", "a/b", "", "x" * 5000):
        with pytest.raises(OSError):
            btrfs_kernel.create_subvolume(os.path.join(pool.path, "shares", bad) if bad != "a/b"
                                          else os.path.join(pool.path, "nope", "a", "b"))


def test_share_content_cannot_act_on_the_storage_host(env):
    """What clients write (a setuid binary, a device node) is inert on the
    storage host: every share mount is nosuid,nodev,noexec, the pool's share
    and snapshot areas and the mount directory are closed to local users, and
    an NFS share's root is writable for squashed clients."""
    pool, drv, _ = env
    share = new_share()
    drv.create_share(share)
    cifs = new_share(protocol="CIFS")
    drv.create_share(cifs)
    try:
        mp = drv._mount_point(share)
        opts = set(top_mounts(read_mountinfo())[mp].mount_options)
        assert {"nosuid", "nodev", "noexec"} <= opts, opts
        assert oct(os.stat(mp).st_mode & 0o7777) == "0o777"            # NFS share root
        assert oct(os.stat(drv._mount_point(cifs)).st_mode & 0o7777) == "0o755"
        for sub in ("shares", "snapshots"):
            assert oct(os.stat(os.path.join(pool.path, sub)).st_mode & 0o777) == "0o700"
        # The fixture's backend serves CIFS too: smbd's users may only traverse.
        assert oct(os.stat(drv.mount_dir).st_mode & 0o777) == "0o711"
        # A backend that serves no CIFS lets nobody traverse.
        only_nfs = os.path.join(pool.state_dir, f"nfs-only-{uuid.uuid4().hex[:6]}")
        pool.driver({"NFS": RecordingHelper("NFS")}).prepare_mount_dir(only_nfs)
        assert oct(os.stat(only_nfs).st_mode & 0o777) == "0o700"
        os.rmdir(only_nfs)
        # A setuid-root copy of id(1) and a block device node, as a client
        # with no_root_squash could make them.
        binary = os.path.join(mp, "suid-id")
        with open("/usr/bin/id", "rb") as src, open(binary, "wb") as dst:
            dst.write(src.read())
        os.chown(binary, 0, 0)
        os.chmod(binary, 0o4755)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               binary, "-u"], capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
        node = os.path.join(mp, "disk")
        os.mknod(node, 0o666 | 0o060000, os.makedev(7, 0))     # like /dev/loop0
        with pytest.raises(PermissionError):
            open(node, "rb")
    finally:
        for s in (share, cifs):
            drv.delete_share(s)
