"""The volume driver on a real loop-backed image pool (ext4 and xfs).

Exports go to a recording fake helper (the Samba/NFS helpers have their own
tests); everything below the export is real: sparse images, loop devices,
mkfs, mount, resize2fs/xfs_growfs, fsfreeze, e2fsck/tune2fs/xfs_admin.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from sharedd import errors
from sharedd.config import BackendConfig
from sharedd.drivers import driver_class
from sharedd.drivers.volume import VolumeDriver
from sharedd.helpers.base import ExportHelper
from sharedd.models import AccessRule, Share, Snapshot
from sharedd.mountinfo import is_mounted, read_mountinfo, top_mounts
from tests.support import components

GiB = 1 << 30


class RecordingHelper(ExportHelper):
    """Stands in for the NFS helper: records what the driver asks for."""
    helper_name = "recording"
    protocol = "NFS"
    access_levels = {"ip": ("rw", "ro")}

    def __init__(self):
        super().__init__(None, "", 10)
        self.exports = {}       # share id -> (path, [rule ids])
        self.calls = []

    def export(self, share, path, rules):
        assert is_mounted(path), f"export of {path} before it is mounted"
        self.exports[share.id] = (path, sorted(r.id for r in rules))
        self.calls.append(("export", share.id))
        return [f"10.73.0.1:/{share.name}"]

    def unexport(self, share, path):
        self.exports.pop(share.id, None)
        self.calls.append(("unexport", share.id))

    def update_access(self, share, path, access_rules, add_rules, delete_rules):
        gone = {r.id for r in delete_rules}
        ids = {r.id for r in access_rules if r.id not in gone} | {r.id for r in add_rules}
        self.exports[share.id] = (path, sorted(ids))
        self.calls.append(("update_access", share.id))

    def mount_hints(self, share, path):
        return {"fstype": "nfs4", "export": f"10.73.0.1:/{share.name}"}


class Env:
    def __init__(self, root: str, fs: str):
        self.root = root
        self.fs = fs
        self.pool = os.path.join(root, "pool")
        self.state = os.path.join(root, "state")
        os.makedirs(self.state)
        self.helper = RecordingHelper()
        self.driver = self.new_driver()
        self.driver.do_setup()
        self.driver.check_for_setup_error()

    def new_driver(self) -> VolumeDriver:
        cfg = BackendConfig("vol73", {"volume_pool_path": self.pool, "volume_fs_type": self.fs,
                                      "volume_mount_dir": "", "volume_provider": "loopfile",
                                      "share_backend_name": "vol73"})
        return driver_class("volume")("vol73", cfg, {"NFS": self.helper}, self.state, 60)

    def share(self, size: int = 1, name: str = "") -> Share:
        sid = uuid.uuid4().hex
        return Share(id=sid, name=name or f"s{sid[:8]}", backend="vol73", protocol="NFS",
                     size_gib=size, status="creating")

    def apply(self, share: Share, update) -> Share:
        if update.provider_location is not None:
            share.provider_location = update.provider_location
        if update.driver_data is not None:
            share.driver_data = update.driver_data
        if update.size_gib is not None:
            share.size_gib = update.size_gib
        if update.export_locations is not None:
            share.export_locations = update.export_locations
        return share

    def create(self, size: int = 1) -> Share:
        share = self.share(size)
        return self.apply(share, self.driver.create_share(share))

    def mp(self, share: Share) -> str:
        return os.path.join(self.state, "mounts", share.id)

    def image(self, share: Share) -> str:
        return os.path.join(self.pool, share.provider_location)

    def loops(self, path: str):
        out = subprocess.run(["losetup", "-j", path], capture_output=True, text=True).stdout
        return [l.split(":")[0] for l in out.splitlines() if l.startswith("/dev/")]

    def cleanup(self) -> None:
        for mp in sorted(top_mounts(read_mountinfo()), reverse=True):
            if mp.startswith(self.root + "/"):
                subprocess.run(["fsfreeze", "-u", mp], capture_output=True)
                subprocess.run(["umount", "-l", mp], capture_output=True)
        if os.path.isdir(self.pool):
            for name in os.listdir(self.pool):
                for dev in self.loops(os.path.join(self.pool, name)):
                    subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module", params=["ext4", "xfs"])
def venv(request):
    root = tempfile.mkdtemp(prefix=f"shd-vol73-{os.getpid()}-")
    env = None
    try:
        env = Env(root, request.param)
        components.used(f"loop-device image pool ({request.param})")
        yield env
    finally:
        if env is not None:
            env.cleanup()
        else:
            shutil.rmtree(root, ignore_errors=True)


def wait_for(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def write_data(directory: str, name: str, size: int = 4 << 20) -> str:
    data = os.urandom(size)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def fs_uuid(path: str) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", path],
                          capture_output=True, text=True, check=True).stdout.strip()


def rule(share: Share, to: str, level: str = "rw") -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id=share.id, access_type="ip",
                      access_to=to, access_level=level, state="active")


def test_declared_contract():
    cls = driver_class("volume")
    assert cls is VolumeDriver
    assert cls.supported_protocols == ("NFS", "CIFS")
    assert cls.access_types == {"NFS": ("ip",), "CIFS": ("ip", "user")}
    assert cls.uses_export_helpers and not cls.thin_provisioning
    names = {o.name: o for o in cls.OPTIONS}
    assert names["volume_pool_path"].required
    assert names["volume_fs_type"].default == "ext4" and names["volume_fs_type"].choices == ("ext4", "xfs")
    assert names["volume_provider"].default == "loopfile"


def test_lifecycle_keeps_data(venv):
    drv, share = venv.driver, venv.create(1)
    mp, img = venv.mp(share), venv.image(share)
    assert is_mounted(mp) and os.path.isfile(img)
    assert share.export_locations == [f"10.73.0.1:/{share.name}"]
    assert share.driver_data == {"fs_type": venv.fs}
    assert fs_uuid(img)  # a real file system on the image
    assert os.stat(img).st_blocks * 512 < os.stat(img).st_size  # sparse
    rules = [rule(share, "10.73.0.11")]
    drv.update_access(share, rules, rules, [])
    assert venv.helper.exports[share.id][1] == [rules[0].id]
    sum1 = write_data(mp, "one")

    # replaying create (crash recovery) must not reformat
    assert drv.create_share(share).provider_location == share.provider_location
    assert digest(os.path.join(mp, "one")) == sum1

    snap = Snapshot(id=uuid.uuid4().hex, name="snap", share_id=share.id, size_gib=1, status="creating")
    snap.provider_location = drv.create_snapshot(snap, share)
    assert os.path.isfile(os.path.join(venv.pool, snap.provider_location))
    assert fs_uuid(os.path.join(venv.pool, snap.provider_location)) != fs_uuid(img)
    sum2 = write_data(mp, "two")

    # online extend: same mount, bigger file system, data intact
    drv.extend_share(share, 2)
    share.size_gib = 2
    assert os.stat(img).st_size == 2 * GiB
    assert fs_size(mp) > 1.5 * GiB
    assert digest(os.path.join(mp, "one")) == sum1 and digest(os.path.join(mp, "two")) == sum2
    drv.extend_share(share, 2)  # replay is harmless
    assert fs_size(mp) > 1.5 * GiB

    # revert: back to the snapshot's content, extended size kept, rules re-applied
    update = drv.revert_to_snapshot(share, snap, rules)
    assert update.size_gib == 2
    assert digest(os.path.join(mp, "one")) == sum1
    assert not os.path.exists(os.path.join(mp, "two"))
    assert fs_size(mp) > 1.5 * GiB
    assert venv.helper.exports[share.id] == (mp, [rules[0].id])
    assert not [n for n in os.listdir(venv.pool) if n.startswith(".")]

    # simulated restart: mounts and loop devices gone, a new driver instance
    venv.helper.exports.clear()
    subprocess.run(["umount", mp], check=True)
    for dev in venv.loops(img):
        subprocess.run(["losetup", "-d", dev], check=True)
    # (a namespace another process cloned meanwhile may hold the device briefly)
    assert wait_for(lambda: not venv.loops(img)) and not is_mounted(mp)
    fresh = venv.new_driver()
    fresh.do_setup()
    update = fresh.ensure_share(share, rules)
    assert update.export_locations == share.export_locations
    assert is_mounted(mp) and venv.helper.exports[share.id] == (mp, [rules[0].id])
    assert digest(os.path.join(mp, "one")) == sum1

    if venv.fs == "ext4":
        venv.helper.exports.clear()
        fresh.shrink_share(share, 1)
        share.size_gib = 1
        assert os.stat(img).st_size == 1 * GiB
        assert fs_size(mp) <= 1 * GiB
        assert digest(os.path.join(mp, "one")) == sum1
        # re-exported with the rules last applied, though shrink was not given them
        assert venv.helper.exports[share.id] == (mp, [rules[0].id])
        fresh.shrink_share(share, 1)  # replay
        assert digest(os.path.join(mp, "one")) == sum1
    else:
        before = os.stat(img).st_size
        with pytest.raises(errors.NotSupported, match="xfs"):
            fresh.shrink_share(share, 1)
        assert os.stat(img).st_size == before and is_mounted(mp)

    fresh.delete_snapshot(snap, share)
    assert not os.path.exists(os.path.join(venv.pool, snap.provider_location))
    fresh.delete_share(share)
    assert not is_mounted(mp) and not os.path.exists(mp)
    assert not os.path.exists(img) and not venv.loops(img)
    assert share.id not in venv.helper.exports
    assert not [l for l in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
                if venv.pool in l]
    fresh.delete_share(share)  # idempotent
    fresh.delete_snapshot(snap, share)


def test_snapshot_mounts_beside_origin(venv):
    drv, share = venv.driver, venv.create(1)
    mp = venv.mp(share)
    sum1 = write_data(mp, "data")
    snap = Snapshot(id=uuid.uuid4().hex, name="s", share_id=share.id, size_gib=1, status="creating")
    snap.provider_location = drv.create_snapshot(snap, share)
    path = os.path.join(venv.pool, snap.provider_location)
    assert fs_uuid(path) != fs_uuid(venv.image(share))
    # the origin is not left frozen: it still takes writes
    write_data(mp, "after", 4096)
    side = os.path.join(venv.root, "side-" + snap.id)
    os.mkdir(side)
    dev = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", dev, side], check=True)  # no nouuid needed
        try:
            assert digest(os.path.join(side, "data")) == sum1
            assert not os.path.exists(os.path.join(side, "after"))
        finally:
            subprocess.run(["umount", side], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)

    # a new share from the snapshot: same data, its own UUID, bigger size
    clone = venv.share(2)
    clone = venv.apply(clone, drv.create_share_from_snapshot(clone, snap, share))
    cmp_ = venv.mp(clone)
    assert digest(os.path.join(cmp_, "data")) == sum1
    assert fs_size(cmp_) > 1.5 * GiB
    uuids = {fs_uuid(venv.image(share)), fs_uuid(venv.image(clone)), fs_uuid(path)}
    assert len(uuids) == 3
    with pytest.raises(errors.InvalidArgument):
        drv.create_share_from_snapshot(venv.share(0), snap, share)
    for s in (clone, share):
        drv.delete_share(s)
    drv.delete_snapshot(snap, share)
    assert not os.listdir(venv.pool)


def test_snapshot_released_and_adopted_again(venv):
    drv, share = venv.driver, venv.create(1)
    mp = venv.mp(share)
    before = write_data(mp, "data")
    snap = Snapshot(id=uuid.uuid4().hex, name="s", share_id=share.id, size_gib=1, status="creating")
    snap.provider_location = drv.create_snapshot(snap, share)
    image = os.path.join(venv.pool, snap.provider_location)
    drv.unmanage_snapshot(snap, share)
    assert os.path.isfile(image), "released, not deleted"
    write_data(mp, "data")                  # the share moves on
    again = Snapshot(id=uuid.uuid4().hex, name="a", share_id=share.id, size_gib=0,
                     status="manage_starting")
    assert drv.check_manage_snapshot(share, snap.provider_location) == snap.provider_location
    assert drv.manage_existing_snapshot(again, share, image) == 1
    again.provider_location = snap.provider_location
    drv.revert_to_snapshot(share, again, [])
    assert digest(os.path.join(venv.mp(share), "data")) == before
    # refusals: a share's image, outside the pool, not snap-*, another fs type, missing
    other_fs = os.path.join(venv.pool, "snap-otherfs.img")
    subprocess.run(["truncate", "-s", "16M", other_fs], check=True)
    subprocess.run(["mkfs.ext2", "-q", "-F", other_fs], check=True, capture_output=True)
    for bad, why in ((venv.image(share), "not a snapshot image"),
                     ("../snap-x.img", "not a snapshot image"), ("/etc/passwd", "not a snapshot"),
                     ("snap-missing.img", "not an existing regular file"),
                     ("snap-otherfs.img", "file system")):
        with pytest.raises(errors.InvalidArgument, match=why):
            drv.check_manage_snapshot(share, bad)
    os.unlink(other_fs)
    drv.delete_snapshot(again, share)
    assert not os.path.exists(image)
    drv.delete_share(share)


def read_from_image(venv, image: str, name: str) -> bytes:
    """A file of a snapshot image, mounted read-only beside everything."""
    side = tempfile.mkdtemp(dir=venv.root)
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", image],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", dev, side], check=True)
        try:
            with open(os.path.join(side, name), "rb") as f:
                return f.read()
        finally:
            subprocess.run(["umount", side], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
        os.rmdir(side)


def test_group_snapshot_is_one_point_in_time(venv):
    """A writer counts up in two shares in turn (A gets n, then B gets n),
    each write fsynced; the group snapshot freezes both file systems before
    copying either, so the copies differ by at most the one write in
    between: A - B is 0 or 1. (Taken one after another, B would be far
    behind or ahead: each copy takes tens of milliseconds.)"""
    import threading
    drv = venv.driver
    a, b = venv.create(1), venv.create(1)
    stop = threading.Event()
    count = [0]

    def put(share, n):
        path = os.path.join(venv.mp(share), "counter")
        with open(path + ".new", "w") as f:
            f.write(str(n))
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".new", path)

    def writer():
        while not stop.is_set():
            count[0] += 1
            put(a, count[0])
            put(b, count[0])
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        snaps = [Snapshot(id=uuid.uuid4().hex, name="g", share_id=s.id, size_gib=1,
                          status="creating") for s in (a, b)]
        names = drv.create_share_group_snapshot(list(zip(snaps, (a, b))))
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    assert count[0] > 10, "the writer was running"
    got = [int(read_from_image(venv, os.path.join(venv.pool, n), "counter")) for n in names]
    assert got[0] - got[1] in (0, 1), got
    assert drv.capabilities()["consistent_group_snapshot_support"] is True
    for snap, share, name in zip(snaps, (a, b), names):
        snap.provider_location = name
        drv.delete_snapshot(snap, share)
    for share in (a, b):
        drv.delete_share(share)


def test_shrink_refusals_change_nothing(venv):
    drv, share = venv.driver, venv.create(2)
    mp, img = venv.mp(share), venv.image(share)
    sum1 = write_data(mp, "keep")
    # allocate 1.5 GiB of real blocks in the share (no data written to the image)
    subprocess.run(["fallocate", "-l", str(3 * GiB // 2), os.path.join(mp, "big")], check=True)
    venv.helper.calls.clear()
    expected = errors.NotSupported if venv.fs == "xfs" else errors.InvalidArgument
    with pytest.raises(expected) as exc:
        drv.shrink_share(share, 1)
    if venv.fs == "ext4":
        assert "uses 1.5" in str(exc.value)
    assert os.stat(img).st_size == 2 * GiB
    assert is_mounted(mp) and fs_size(mp) > 1.5 * GiB
    assert digest(os.path.join(mp, "keep")) == sum1
    assert ("unexport", share.id) not in venv.helper.calls
    assert share.id in venv.helper.exports
    drv.delete_share(share)


def test_manage_unmanage_and_stats(venv):
    drv = venv.driver
    img = os.path.join(venv.pool, "legacy.img")
    with open(img, "wb") as f:
        f.truncate(GiB + 4096)       # not a whole GiB: size rounds up
    subprocess.run(["mkfs.ext4" if venv.fs == "ext4" else "mkfs.xfs", "-q", img], check=True)
    stats = drv.get_share_stats()
    assert stats["provisioned_capacity_gb"] == pytest.approx((GiB + 4096) / GiB, abs=0.01)
    assert 0 < stats["free_capacity_gb"] <= stats["total_capacity_gb"]
    assert stats["snapshot_support"] and stats["revert_to_snapshot_support"]
    assert stats["thin_provisioning"] is False

    share = venv.share(0)
    for bad in ("/etc/passwd", os.path.join(venv.pool, "missing.img"), "../pool/legacy.img"):
        with pytest.raises(errors.InvalidArgument):
            drv.manage_existing(share, bad, {})
    assert not venv.loops(img)
    update = drv.manage_existing(share, img, {})
    assert update.size_gib == 2 and update.provider_location == "legacy.img"
    assert update.driver_data == {"fs_type": venv.fs}
    share = venv.apply(share, update)
    mp = venv.mp(share)
    assert is_mounted(mp) and share.id in venv.helper.exports
    sum1 = write_data(mp, "x")
    drv.unmanage(share)
    assert os.path.isfile(img) and not venv.loops(img) and not is_mounted(mp)
    assert share.id not in venv.helper.exports
    share2 = venv.share(0)
    share2 = venv.apply(share2, drv.manage_existing(share2, "legacy.img", {}))
    assert digest(os.path.join(venv.mp(share2), "x")) == sum1
    # crash recovery releases an interrupted manage by share id alone
    bare = Share(id=share2.id, name=share2.name, backend="vol73", protocol="NFS",
                 size_gib=0, status="manage_starting")
    drv.unmanage(bare)
    assert os.path.isfile(img) and not venv.loops(img) and not is_mounted(venv.mp(share2))
    share3 = venv.share(0)
    share3 = venv.apply(share3, drv.manage_existing(share3, "legacy.img", {}))
    drv.delete_share(share3)
    assert not os.path.exists(img) and not venv.loops(img)


def test_interrupted_revert_is_finished_by_ensure(venv):
    drv, share = venv.driver, venv.create(1)
    mp = venv.mp(share)
    sum_old = write_data(mp, "f")
    snap = Snapshot(id=uuid.uuid4().hex, name="s", share_id=share.id, size_gib=1, status="creating")
    snap.provider_location = drv.create_snapshot(snap, share)
    write_data(mp, "f")   # new content after the snapshot
    # the state a crash leaves after step 1 of a revert: a complete staging copy,
    # plus an incomplete one from an earlier attempt
    drv._copy_with_new_uuid(snap.provider_location, "." + share.provider_location + ".revert", venv.fs)
    junk = os.path.join(venv.pool, "." + share.provider_location + ".revert.new")
    with open(junk, "wb") as f:
        f.write(b"partial")
    fresh = venv.new_driver()
    fresh.ensure_share(share, [])
    assert digest(os.path.join(mp, "f")) == sum_old
    assert not [n for n in os.listdir(venv.pool) if n.startswith(".")]
    fresh.delete_snapshot(snap, share)
    fresh.delete_share(share)


def test_a_volume_device_is_found_without_listing_every_loop_device(tmp_path, monkeypatch):
    """The provider looks at every loop device once (a new instance: a
    restart), then knows each volume's device, checked in sysfs at each use:
    an operation on an attached volume runs no losetup. A device detached
    behind its back is noticed, and a renamed volume keeps its device."""
    from sharedd.drivers.volume_providers import LoopfileProvider
    pool = str(tmp_path / "pool")
    p = LoopfileProvider(pool, 30)
    p.setup()
    components.used("loop devices (losetup, sysfs)")
    p.create("a.img", 8 << 20)
    p.create("b.img", 8 << 20)
    try:
        dev = p.attach("a.img")
        runs = []
        real = p._run
        monkeypatch.setattr(p, "_run", lambda argv, **kw: runs.append(argv) or real(argv, **kw))
        assert p.attach("a.img") == dev and p.device("a.img") == dev and p.device("b.img") is None
        assert runs == [], runs

        again = LoopfileProvider(pool, 30)        # a restart: one look at every device
        monkeypatch.setattr(again, "_run", lambda argv, **kw: runs.append(argv) or real(argv, **kw))
        assert again.device("a.img") == dev and runs == []

        subprocess.run(["losetup", "-d", dev], check=True)   # behind its back
        assert wait_for(lambda: p._backing(dev[5:]) is None)
        assert p.device("a.img") is None
        dev = p.attach("a.img")
        p.rename("a.img", "c.img")
        runs.clear()
        assert p.device("c.img") == dev and p.device("a.img") is None and runs == []
    finally:
        for name in ("a.img", "b.img", "c.img"):
            p.delete(name)
    assert not [ln for ln in subprocess.run(["losetup", "-a"], capture_output=True, text=True
                                            ).stdout.splitlines() if pool in ln]


def test_detach_lists_the_loop_devices_once_and_waits_for_a_holder(tmp_path, monkeypatch):
    """Detach finds every device of the image with one losetup -j (one
    attached by hand too), then reads only those devices in sysfs; a device
    listed that is another image's by then (detached and taken again) is
    left alone. A device held open elsewhere is only marked for auto-clear:
    detach waits, names it in its error, and the device goes once its
    holder lets go."""
    from sharedd.drivers import volume_providers
    pool = str(tmp_path / "pool")
    p = volume_providers.LoopfileProvider(pool, 30)
    p.setup()
    components.used("loop devices (losetup, sysfs)")
    p.create("a.img", 8 << 20)
    p.create("b.img", 8 << 20)
    holder = None
    try:
        ours = p.attach("a.img")
        other = p.attach("b.img")
        by_hand = subprocess.run(["losetup", "--find", "--show", p.path("a.img")], check=True,
                                 capture_output=True, text=True).stdout.strip()
        assert by_hand != ours
        runs = []
        real = p._run
        monkeypatch.setattr(p, "_run", lambda argv, **kw: runs.append(argv) or real(argv, **kw))
        listed = p._devices
        monkeypatch.setattr(p, "_devices", lambda name: listed(name) + [other])   # taken again
        p.detach("a.img")
        monkeypatch.setattr(p, "_devices", listed)
        assert p._backing(ours[5:]) is None and p._backing(by_hand[5:]) is None
        assert p._backing(other[5:]) == os.path.realpath(p.path("b.img"))
        assert [a for a in runs if a[:2] == ["losetup", "-j"]] == [["losetup", "-j", p.path("a.img")]]
        assert ["losetup", "-d", other] not in runs

        dev = p.attach("a.img")
        holder = os.open(dev, os.O_RDONLY)
        monkeypatch.setattr(volume_providers, "DETACH_WAIT", 0.3)
        with pytest.raises(errors.BackendFailure, match="still in use"):
            p.detach("a.img")
        assert p._backing(dev[5:]) == os.path.realpath(p.path("a.img"))   # marked, kept
        os.close(holder)
        holder = None
        assert wait_for(lambda: p._backing(dev[5:]) is None)   # auto-clear on the last close
    finally:
        if holder is not None:
            os.close(holder)
        p.delete("a.img")
        p.delete("b.img")
    assert not [ln for ln in subprocess.run(["losetup", "-a"], capture_output=True, text=True
                                            ).stdout.splitlines() if pool in ln]


def test_the_device_of_a_mount_is_read_without_the_mount_table(tmp_path, monkeypatch):
    """mounted_device names a loop device's mount from the device number
    (sysfs) without reading /proc/self/mountinfo; a mount with no block
    device (tmpfs) falls back to the table; nothing mounted is None."""
    from sharedd import mountinfo
    from sharedd.drivers.volume_providers import LoopfileProvider
    p = LoopfileProvider(str(tmp_path / "pool"), 30)
    p.setup()
    p.create("m.img", 16 << 20)
    mp, tmpfs = tmp_path / "mp", tmp_path / "tmpfs"
    mp.mkdir()
    tmpfs.mkdir()
    try:
        dev = p.attach("m.img")
        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        subprocess.run(["mount", dev, str(mp)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "shd-tmpfs73", str(tmpfs)], check=True)
        reads = []
        real = mountinfo.read_mountinfo
        monkeypatch.setattr(mountinfo, "read_mountinfo", lambda *a: reads.append(1) or real(*a))
        assert mountinfo.mounted_device(str(mp)) == dev and reads == []
        assert mountinfo.mounted_device(str(tmpfs)) == "shd-tmpfs73" and reads == [1]
        assert mountinfo.mounted_device(str(tmp_path)) is None
    finally:
        for m in (mp, tmpfs):
            subprocess.run(["umount", str(m)], capture_output=True)
        p.delete("m.img")
