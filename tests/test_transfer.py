"""sharedd.transfer (rsync and btrfs send/receive with progress and cancel)
and the btrfs driver's send/receive migration, against real rsync and two
real btrfs pools on loop devices (run as root).

Nothing here measures time: a cancel is "prompt" when the copy it stopped
had not finished and no process of it is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import threading
import uuid
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from sharedd import transfer
from sharedd.drivers import btrfs_kernel as kernel
from sharedd.drivers.base import ShareDriver
from sharedd.drivers.btrfs import GiB, BtrfsDriver
from sharedd.errors import BackendFailure, Cancelled, NotSupported
from sharedd.helpers.base import ExportHelper
from sharedd.models import AccessRule, Share
from sharedd.mountinfo import is_mounted
from tests.fixtures.btrfs_pool import BtrfsPool, btrfs_pool_env
from tests.support import components

MiB = 1 << 20


# --- environment -------------------------------------------------------------------
class Helper(ExportHelper):
    """Remembers exports; the real helpers are tested elsewhere."""

    helper_name = "recording"
    access_levels = {"ip": ("rw", "ro")}

    def __init__(self) -> None:
        super().__init__(None, "")
        self.exports: Dict[str, str] = {}

    def export(self, share, path, rules):
        assert os.path.ismount(path)
        self.exports[share.id] = path
        return [f"127.0.0.1:/{share.id}"]

    def unexport(self, share, path):
        self.exports.pop(share.id, None)

    def update_access(self, share, path, access_rules, add_rules, delete_rules):
        pass

    def export_locations(self, share, path):
        return [f"127.0.0.1:/{share.id}"]


@dataclasses.dataclass
class Side:
    pool: BtrfsPool
    driver: BtrfsDriver
    helper: Helper


@pytest.fixture(scope="module")
def pools() -> Iterator[Tuple[Side, Side]]:
    subprocess.run(["rsync", "--version"], check=True, capture_output=True, timeout=60)
    components.used("rsync")
    with contextlib.ExitStack() as stack:
        sides = []
        for name in ("mig_src", "mig_dst"):
            pool = stack.enter_context(btrfs_pool_env(size_gib=8))
            pool.name = name
            helper = Helper()
            drv = pool.driver({"NFS": helper})
            drv.do_setup()
            sides.append(Side(pool, drv, helper))
        components.used("btrfs send/receive between two pools")
        yield sides[0], sides[1]


@pytest.fixture
def workdir(pools) -> Iterator[str]:
    """A fresh directory in the source pool (xattrs, ACLs, reflinks)."""
    path = os.path.join(pools[0].pool.path, f"t-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if is_subvolume(full):
                kernel.delete_subvolume(full)
        shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """A progress callback that keeps every report."""

    def __init__(self, on_first=None) -> None:
        self.calls: List[Tuple[int, Optional[int]]] = []
        self.on_first = on_first

    def __call__(self, done: int, expected: Optional[int]) -> None:
        self.calls.append((done, expected))
        if self.on_first is not None and done > 0:
            fn, self.on_first = self.on_first, None
            fn()

    def check(self, total: int) -> None:
        assert self.calls, "no progress was reported"
        dones = [d for d, _ in self.calls]
        assert dones == sorted(dones), f"progress went back: {self.calls}"
        assert self.calls[-1] == (total, total)
        for d, e in self.calls:
            assert e is None or e >= d


# --- trees ---------------------------------------------------------------------------
def is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == kernel.SUBVOL_INO


def write(path: str, nbytes: int, seed: str = "x") -> None:
    block = hashlib.sha256(seed.encode()).digest() * 32768       # 1 MiB, not zeros
    with open(path, "wb") as f:
        left = nbytes
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))


def write_random(path: str, nbytes: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(block)
        f.write(block[:nbytes % MiB])


def posix_acl(entries: List[Tuple[int, int, int]]) -> bytes:
    """The system.posix_acl_access value (version 2; tag, perm, id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 1, 2, 4, 16, 32
UNDEFINED = 0xFFFFFFFF


def make_tree(root: str) -> None:
    """Every kind of thing a share holds."""
    os.makedirs(os.path.join(root, "dir/sub"))
    write(os.path.join(root, "big"), 5 * MiB + 17, "big")
    write(os.path.join(root, "dir/small"), 1000, "small")
    os.chmod(os.path.join(root, "dir/small"), 0o640)
    os.chown(os.path.join(root, "dir/small"), 1234, 5678)
    os.chown(os.path.join(root, "dir/sub"), 4321, 8765)
    os.chmod(os.path.join(root, "dir/sub"), 0o2750)
    write(os.path.join(root, "dir/sub/exec"), 10, "exec")
    os.chmod(os.path.join(root, "dir/sub/exec"), 0o4755)
    os.setxattr(os.path.join(root, "dir/small"), "user.colour", b"blue")
    os.setxattr(os.path.join(root, "dir"), "trusted.origin", b"share")
    os.setxattr(os.path.join(root, "big"), "system.posix_acl_access", posix_acl(
        [(ACL_USER_OBJ, 6, UNDEFINED), (ACL_USER, 4, 2001), (ACL_GROUP_OBJ, 4, UNDEFINED),
         (ACL_MASK, 4, UNDEFINED), (ACL_OTHER, 0, UNDEFINED)]))
    os.link(os.path.join(root, "dir/small"), os.path.join(root, "hardlink"))
    os.symlink("dir/small", os.path.join(root, "rel-link"))
    os.symlink("/etc/passwd", os.path.join(root, "abs-link"))
    os.symlink("/etc", os.path.join(root, "dir-link-out"))
    os.symlink("../../nowhere", os.path.join(root, "dangling"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.mkdir(os.path.join(root, "empty"))
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(b"middle")
    os.utime(os.path.join(root, "dir/small"), ns=(1_600_000_000_123_456_789,) * 2)
    os.utime(os.path.join(root, "rel-link"), ns=(1_500_000_000_000_000_000,) * 2,
             follow_symlinks=False)


def describe(root: str) -> Dict[str, tuple]:
    """Everything copy_tree must keep, per path (hard links as link groups).
    Directory times are left out where the walk itself may change them."""
    result: Dict[str, tuple] = {}
    inodes: Dict[Tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            xattrs = tuple(sorted((k, os.getxattr(full, k, follow_symlinks=False))
                                  for k in os.listxattr(full, follow_symlinks=False)))
            if stat.S_ISLNK(st.st_mode):
                # rsync sends a symlink's time in whole seconds
                body = ("link", os.readlink(full), st.st_mtime_ns // 10**9)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                body = ("file", st.st_size, digest, st.st_mtime_ns, first)
            else:
                body = (stat.S_IFMT(st.st_mode),)
            result[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs) + body
    return result


def same_tree(a: str, b: str) -> None:
    da, db = describe(a), describe(b)
    assert sorted(da) == sorted(db)
    for rel in da:
        assert da[rel] == db[rel], rel


def pids_of(marker: str) -> List[int]:
    """Processes whose command line names marker (a unique path)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


# --- copy_tree ---------------------------------------------------------------------------
def test_copy_tree_copies_everything_and_then_only_changes(workdir):
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    make_tree(src)
    write(os.path.join(dst, "stale"), 100)          # dst's own: goes
    os.mkdir(os.path.join(dst, "stale-dir"))

    rec = Recorder()
    copied = transfer.copy_tree(src, dst, progress=rec, cancel=threading.Event())
    same_tree(src, dst)
    # each file's data once (the hard link is a link, the fifo and links have none)
    assert copied == (5 * MiB + 17) + 1000 + 10 + 64 * MiB
    rec.check(copied)
    # symlinks stay links: nothing outside the tree was followed
    assert os.readlink(os.path.join(dst, "dir-link-out")) == "/etc"
    assert os.path.islink(os.path.join(dst, "abs-link"))
    st_dst, st_src = os.stat(os.path.join(dst, "sparse")), os.stat(os.path.join(src, "sparse"))
    assert st_dst.st_blocks <= st_src.st_blocks + 8           # still sparse
    assert os.stat(os.path.join(dst, "hardlink")).st_ino == \
        os.stat(os.path.join(dst, "dir/small")).st_ino

    # second run: only the changes
    with open(os.path.join(src, "dir/small"), "ab") as f:      # 1000 -> 1500 bytes
        f.write(b"y" * 500)
    write(os.path.join(src, "dir/new"), 3000, "new")
    os.unlink(os.path.join(src, "big"))
    shutil.rmtree(os.path.join(src, "empty"))
    os.chmod(os.path.join(src, "dir/sub/exec"), 0o700)        # metadata only
    os.setxattr(os.path.join(src, "dir/sub/exec"), "user.tag", b"1")
    rec2 = Recorder()
    copied2 = transfer.copy_tree(src, dst, progress=rec2, cancel=threading.Event())
    assert copied2 == 1500 + 3000
    rec2.check(copied2)
    same_tree(src, dst)
    assert not os.path.exists(os.path.join(dst, "big"))

    # nothing changed: nothing copied
    assert transfer.copy_tree(src, dst, progress=Recorder(), cancel=threading.Event()) == 0
    same_tree(src, dst)


def test_copy_tree_refuses_what_is_not_a_directory(workdir):
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    os.mkdir(src)
    os.symlink(src, os.path.join(workdir, "link-to-src"))
    write(os.path.join(workdir, "file"), 10)
    cancel = threading.Event()
    for s, d in ((src, dst), (os.path.join(workdir, "missing"), src),
                 (os.path.join(workdir, "link-to-src"), src),
                 (os.path.join(workdir, "file"), src), (src, os.path.join(workdir, "file"))):
        with pytest.raises(BackendFailure):
            transfer.copy_tree(s, d, progress=Recorder(), cancel=cancel)
    assert not os.path.exists(dst)


def test_copy_tree_cancel_stops_rsync_and_its_children(workdir):
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    write_random(os.path.join(src, "huge"), 1536 * MiB)
    cancel = threading.Event()
    seen: List[int] = []

    def first_progress() -> None:
        seen.extend(pids_of(src))           # rsync and the children it forked
        cancel.set()

    rec = Recorder(on_first=first_progress)
    with pytest.raises(Cancelled):
        transfer.copy_tree(src, dst, progress=rec, cancel=cancel)
    assert len(seen) >= 2, seen
    assert all(gone(pid) for pid in seen), [(p, gone(p)) for p in seen]
    assert not pids_of(src)
    # the copy had not finished; rsync removed its temporary file
    assert os.listdir(dst) == []


def test_copy_tree_stall_is_a_failure(workdir):
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    write_random(os.path.join(src, "huge"), 1024 * MiB)
    seen: List[int] = []

    def freeze() -> None:
        seen.extend(pids_of(src))
        for pid in seen:
            os.kill(pid, 19)                  # SIGSTOP: no output, no CPU, no I/O

    with pytest.raises(BackendFailure, match="no progress"):
        transfer.copy_tree(src, dst, progress=Recorder(on_first=freeze),
                           cancel=threading.Event(), stall_timeout=2)
    assert seen and all(gone(pid) for pid in seen)


# --- btrfs send/receive ------------------------------------------------------------------
def subvol_show(path: str) -> Dict[str, str]:
    out = subprocess.run(["btrfs", "subvolume", "show", path], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    fields = {}
    for line in out.splitlines()[1:]:
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def ro_snapshot(subvol: str, dest: str) -> str:
    kernel.snapshot(subvol, dest, True)
    return dest


@pytest.fixture
def area(pools) -> Iterator[str]:
    """A fresh receive directory in the destination pool."""
    path = os.path.join(pools[1].pool.path, f"r-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            if is_subvolume(os.path.join(path, name)):
                kernel.delete_subvolume(os.path.join(path, name))
        shutil.rmtree(path, ignore_errors=True)


def test_send_receive_full_incremental_and_replay(workdir, area):
    vol = os.path.join(workdir, "vol")
    kernel.create_subvolume(vol)
    make_tree(vol)
    write(os.path.join(vol, "bulk"), 40 * MiB, "bulk")
    s1 = ro_snapshot(vol, os.path.join(workdir, "s1"))

    rec = Recorder()
    got = transfer.btrfs_send_receive(s1, area, progress=rec, cancel=threading.Event(),
                                      expected=50 * MiB)
    assert got == os.path.join(area, "s1")
    same_tree(s1, got)
    full = rec.calls[-1][0]
    assert full > 45 * MiB
    rec.check(full)
    # what the kernel says agrees with btrfs-progs
    info, shown = transfer.subvolume_info(got), subvol_show(got)
    assert info.readonly and "readonly" in shown["Flags"]
    assert info.uuid == shown["UUID"]
    assert info.received_uuid == shown["Received UUID"] == subvol_show(s1)["UUID"]
    assert transfer.is_received(got, s1)

    # incremental: only the difference travels
    write(os.path.join(vol, "later"), 2 * MiB, "later")
    os.unlink(os.path.join(vol, "bulk"))
    os.chmod(os.path.join(vol, "dir/small"), 0o600)
    s2 = ro_snapshot(vol, os.path.join(workdir, "s2"))
    rec2 = Recorder()
    got2 = transfer.btrfs_send_receive(s2, area, parent=s1, progress=rec2,
                                       cancel=threading.Event())
    same_tree(s2, got2)
    assert 2 * MiB < rec2.calls[-1][0] < 10 * MiB
    rec2.check(rec2.calls[-1][0])
    assert transfer.subvolume_info(got2).parent_uuid == transfer.subvolume_info(got).uuid

    # replay: the complete receive is returned as it is
    before = transfer.subvolume_info(got2).uuid
    rec3 = Recorder()
    assert transfer.btrfs_send_receive(s2, area, parent=s1, progress=rec3,
                                       cancel=threading.Event()) == got2
    assert transfer.subvolume_info(got2).uuid == before
    assert rec3.calls == [(0, 0)]

    # a partial receive left by a crash (writable, no received uuid) is redone
    kernel.delete_subvolume(got2)
    kernel.create_subvolume(got2)
    write(os.path.join(got2, "junk"), 10)
    assert not transfer.is_received(got2, s2)
    got2 = transfer.btrfs_send_receive(s2, area, parent=s1, progress=Recorder(),
                                       cancel=threading.Event())
    same_tree(s2, got2)
    assert transfer.is_received(got2, s2)

    # behind a receive prefix (as ssh would be): the same, checked with btrfs-progs
    area2 = os.path.join(area, "prefixed")
    os.mkdir(area2)
    got3 = transfer.btrfs_send_receive(s1, area2, progress=Recorder(), cancel=threading.Event(),
                                       receive_prefix=["env", "--"])
    same_tree(s1, got3)
    assert transfer.btrfs_send_receive(s1, area2, progress=Recorder(), cancel=threading.Event(),
                                       receive_prefix=["env", "--"]) == got3
    kernel.delete_subvolume(got3)


def test_send_receive_failure_removes_the_partial(workdir, area):
    vol = os.path.join(workdir, "vol")
    kernel.create_subvolume(vol)
    write(os.path.join(vol, "a"), MiB)
    s1 = ro_snapshot(vol, os.path.join(workdir, "s1"))
    s2 = ro_snapshot(vol, os.path.join(workdir, "s2"))
    # the parent was never received there: btrfs receive refuses
    with pytest.raises(BackendFailure, match="receive"):
        transfer.btrfs_send_receive(s2, area, parent=s1, progress=Recorder(),
                                    cancel=threading.Event())
    assert os.listdir(area) == []
    # a stream cut short, anywhere (even just before its end command), leaves
    # a writable subvolume without a received uuid: never taken as complete
    stream = subprocess.run(["btrfs", "send", "-q", s1], check=True, capture_output=True,
                            timeout=120).stdout
    for cut in (100, len(stream) // 2, len(stream) - 10):
        proc = subprocess.run(["btrfs", "receive", area], input=stream[:cut],
                              capture_output=True, timeout=120)
        assert proc.returncode != 0
        target = os.path.join(area, "s1")
        info = transfer.subvolume_info(target)
        assert not info.readonly and info.received_uuid == ""
        assert not transfer.is_received(target, s1)
        kernel.delete_subvolume(target)
    # a writable subvolume cannot be sent
    with pytest.raises(BackendFailure, match="read-only"):
        transfer.btrfs_send_receive(vol, area, progress=Recorder(), cancel=threading.Event())
    assert os.listdir(area) == []


def test_send_receive_cancel_removes_the_partial(workdir, area):
    vol = os.path.join(workdir, "vol")
    kernel.create_subvolume(vol)
    write_random(os.path.join(vol, "huge"), 1536 * MiB)
    s1 = ro_snapshot(vol, os.path.join(workdir, "s1"))
    cancel = threading.Event()
    seen: List[int] = []

    def first_progress() -> None:
        seen.extend(pids_of(s1) + pids_of(area))
        cancel.set()

    with pytest.raises(Cancelled):
        transfer.btrfs_send_receive(s1, area, progress=Recorder(on_first=first_progress),
                                    cancel=cancel)
    assert len(seen) == 2, seen                # btrfs send, btrfs receive
    assert all(gone(pid) for pid in seen)
    assert os.listdir(area) == []


# --- the btrfs driver's migration ------------------------------------------------------------
def new_share(size_gib: int = 1) -> Share:
    sid = uuid.uuid4().hex
    return Share(id=sid, name="m" + sid[:8], backend="mig_src", protocol="NFS",
                 size_gib=size_gib, status="available")


def dest_of(share: Share) -> Share:
    return dataclasses.replace(share, backend="mig_dst", provider_location="",
                               export_locations=[], driver_data={})


def fill(root: str) -> None:
    write(os.path.join(root, "data"), 20 * MiB, "data")
    os.makedirs(os.path.join(root, "d/e"))
    write(os.path.join(root, "d/e/f"), 1234, "f")
    os.chown(os.path.join(root, "d/e/f"), 1001, 1002)
    os.setxattr(os.path.join(root, "d/e/f"), "user.k", b"v")
    os.link(os.path.join(root, "d/e/f"), os.path.join(root, "d/hard"))
    os.symlink("e/f", os.path.join(root, "d/soft"))


def qgroup_limit(drv: BtrfsDriver, path: str) -> Optional[int]:
    return drv._qgroup(path).max_referenced


def leftovers(side: Side, share_id: str) -> List[str]:
    """What of a migration is in a pool: its snapshots or receive area and,
    on the destination, the share's mount point."""
    left = []
    mig = os.path.join(side.pool.path, "migrate")
    if os.path.isdir(mig):
        left += [os.path.join(mig, n) for n in os.listdir(mig) if n.startswith(share_id)]
    mp = os.path.join(side.pool.mount_dir, share_id)
    if side.pool.name == "mig_dst" and os.path.lexists(mp):
        left.append(mp)
    return left


@pytest.fixture
def migrating(pools) -> Iterator[Tuple[Side, Side, Share]]:
    src, dst = pools
    share = new_share()
    share.provider_location = src.driver.create_share(share).provider_location
    try:
        yield src, dst, share
    finally:
        dest = dest_of(share)
        with contextlib.suppress(Exception):
            src.driver.migration_cancel(share, dest, dst.driver, {})
        with contextlib.suppress(Exception):
            dst.driver.delete_share(dest)
        src.driver.delete_share(share)


def test_migration_send_receive(migrating):
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    assert mp == os.path.join(src.pool.mount_dir, share.id) and os.path.ismount(mp)
    fill(mp)

    caps = src.driver.migration_check_compatibility(share, dst.driver)
    assert caps["driver_assisted"] is True and caps["compatible"] is True
    rec = Recorder()
    state = src.driver.migration_start(share, dest, dst.driver, rec, threading.Event())
    assert state == {"method": "btrfs-send", "base": f"{share.id}.1",
                     "source_dir": "migrate", "dest_dir": f"migrate/{share.id}"}
    rec.check(rec.calls[-1][0])
    assert rec.calls[-1][0] > 20 * MiB
    dpath = os.path.join(dst.pool.path, "shares", share.id)
    same_tree(mp, dpath)
    assert qgroup_limit(dst.driver, dpath) == GiB
    assert not transfer.subvolume_info(dpath).readonly
    assert dst.driver.local_path(dest) is None           # not mounted
    assert share.id not in dst.helper.exports            # not exported

    # the share goes on changing during phase 1
    write(os.path.join(mp, "later"), 3 * MiB, "later")
    os.unlink(os.path.join(mp, "data"))
    with open(os.path.join(mp, "d/e/f"), "ab") as f:
        f.write(b"more")
    rec2 = Recorder()
    src.driver.migration_complete(share, dest, dst.driver, state, rec2, threading.Event())
    same_tree(mp, dpath)
    assert rec2.calls[-1][0] < 10 * MiB                  # only the difference travelled
    assert qgroup_limit(dst.driver, dpath) == GiB
    # the snapshots stay until the clean-up after the switch
    assert leftovers(src, share.id) != []
    src.driver.migration_cleanup(share, dest, dst.driver, state)
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []

    # a replay (crash after it returned) changes nothing
    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    same_tree(mp, dpath)

    # then the engine serves the destination and deletes the source
    update = dst.driver.ensure_share(dest, [])
    assert update.export_locations == [f"127.0.0.1:/{share.id}"]
    dmp = dst.driver.local_path(dest)
    assert dmp and dst.helper.exports[share.id] == dmp
    same_tree(dpath, dmp)
    with open(os.path.join(dmp, "d/e/f"), "ab") as f:       # writable
        f.write(b"!")
    # a replay of complete after the destination was mounted keeps it
    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    assert os.path.ismount(dmp)


def test_migration_complete_replays_after_crashes(migrating, monkeypatch):
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    state = src.driver.migration_start(share, dest, dst.driver, Recorder(), threading.Event())
    write(os.path.join(mp, "phase2"), MiB, "p2")
    dpath = os.path.join(dst.pool.path, "shares", share.id)

    class Crash(Exception):
        pass

    # 1. a crash right after the final receive
    real = transfer.btrfs_send_receive

    def receive_then_crash(*args, **kw):
        real(*args, **kw)
        raise Crash()
    monkeypatch.setattr(transfer, "btrfs_send_receive", receive_then_crash)
    with pytest.raises(Crash):
        src.driver.migration_complete(share, dest, dst.driver, state, Recorder(),
                                      threading.Event())
    monkeypatch.setattr(transfer, "btrfs_send_receive", real)
    assert os.path.isdir(os.path.join(dst.pool.path, "migrate", share.id, f"{share.id}.2"))

    # 2. the replay converges
    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    same_tree(mp, dpath)
    assert qgroup_limit(dst.driver, dpath) == GiB

    # 3. the clean-up after the switch crashes after the base went
    real_delete = BtrfsDriver._delete_subvolume

    def delete_then_crash(self, path, commit=True):
        real_delete(self, path, commit)
        if path.endswith(f"{share.id}.1"):
            raise Crash()
    monkeypatch.setattr(BtrfsDriver, "_delete_subvolume", delete_then_crash)
    with pytest.raises(Crash):
        src.driver.migration_cleanup(share, dest, dst.driver, state)
    monkeypatch.setattr(BtrfsDriver, "_delete_subvolume", real_delete)
    assert leftovers(src, share.id) == [os.path.join(src.pool.path, "migrate", f"{share.id}.2")]

    # 4. its replay converges; a replay of the copy then changes nothing
    src.driver.migration_cleanup(share, dest, dst.driver, state)
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []
    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    same_tree(mp, dpath)


def test_migration_cancel_leaves_nothing(migrating):
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    before = describe(mp)
    state = src.driver.migration_start(share, dest, dst.driver, Recorder(), threading.Event())
    dpath = os.path.join(dst.pool.path, "shares", share.id)
    assert is_subvolume(dpath)
    dst.driver.ensure_share(dest, [])          # even mounted and exported
    src.driver.migration_cancel(share, dest, dst.driver, state)
    src.driver.migration_cancel(share, dest, dst.driver, state)     # idempotent
    src.driver.migration_cancel(share, dest, dst.driver, {})
    assert not os.path.lexists(dpath)
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []
    assert share.id not in dst.helper.exports
    assert describe(mp) == before and os.path.ismount(mp)
    assert src.helper.exports[share.id] == mp


def test_migration_cancel_after_a_crash_in_phase_one(migrating):
    """state {}: migration_start never returned; a base snapshot and a
    partial receive are all there is."""
    src, dst, share = migrating
    dest = dest_of(share)
    fill(src.driver.local_path(share))
    for path in (os.path.join(src.pool.path, "migrate"),
                 os.path.join(dst.pool.path, "migrate", share.id)):
        os.makedirs(path, exist_ok=True)
    base = ro_snapshot(os.path.join(src.pool.path, "shares", share.id),
                       os.path.join(src.pool.path, "migrate", f"{share.id}.1"))
    partial = os.path.join(dst.pool.path, "migrate", share.id, f"{share.id}.1")
    kernel.create_subvolume(partial)
    src.driver.migration_cancel(share, dest, dst.driver, {})
    assert not os.path.lexists(base) and not os.path.lexists(partial)
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []
    src.driver.migration_cancel(share, dest, dst.driver, {})


def test_migration_start_cancelled(migrating):
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    write_random(os.path.join(mp, "huge"), 768 * MiB)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        src.driver.migration_start(share, dest, dst.driver, Recorder(on_first=cancel.set),
                                   cancel)
    assert not os.path.lexists(os.path.join(dst.pool.path, "shares", share.id))
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []
    assert os.path.getsize(os.path.join(mp, "huge")) == 768 * MiB


def test_migration_compatibility(migrating, pools):
    src, dst, share = migrating
    other = src.pool.driver({"NFS": Helper()})          # another backend, same pool
    with pytest.raises(NotSupported):
        src.driver.migration_check_compatibility(share, other)
    with pytest.raises(NotSupported):
        src.driver.migration_check_compatibility(share, src.driver)


def test_host_assisted_copy_between_btrfs_mounts(migrating):
    """The base class's path (the one a non-btrfs destination takes), run
    between two btrfs shares: copy_tree between their local mounts."""
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    state = ShareDriver.migration_start(src.driver, share, dest, dst.driver, Recorder(),
                                        threading.Event())
    assert state == {"method": "copy"}
    dmp = dst.driver.local_path(dest)
    same_tree(mp, dmp)
    write(os.path.join(mp, "late"), 1000, "late")
    # the btrfs driver sees the copy method and keeps to it
    rec = Recorder()
    src.driver.migration_complete(share, dest, dst.driver, state, rec, threading.Event())
    assert rec.calls[-1] == (1000, 1000)
    same_tree(mp, dmp)
    src.driver.migration_cancel(share, dest, dst.driver, state)
    assert dst.driver.local_path(dest) is None
    assert not os.path.lexists(os.path.join(dst.pool.path, "shares", share.id))


def test_migration_complete_after_a_failed_one_takes_later_writes(migrating, monkeypatch):
    """A failed migration_complete makes the engine open the source for
    writing again; the next one must carry those writes too."""
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    state = src.driver.migration_start(share, dest, dst.driver, Recorder(), threading.Event())
    dpath = os.path.join(dst.pool.path, "shares", share.id)
    real_limit = BtrfsDriver._set_limit

    def failing_limit(self, path, size_gib):
        raise BackendFailure("no limit today")
    # fails after the final copy landed on the destination
    monkeypatch.setattr(BtrfsDriver, "_set_limit", failing_limit)
    with pytest.raises(BackendFailure, match="no limit"):
        src.driver.migration_complete(share, dest, dst.driver, state, Recorder(),
                                      threading.Event())
    monkeypatch.setattr(BtrfsDriver, "_set_limit", real_limit)
    write(os.path.join(mp, "written-in-between"), 4096, "between")
    os.unlink(os.path.join(mp, "data"))

    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    same_tree(mp, dpath)
    assert os.path.exists(os.path.join(dpath, "written-in-between"))
    assert qgroup_limit(dst.driver, dpath) == GiB

    # the clean-up (after the switch) does not fail on what it cannot delete
    real_delete = BtrfsDriver._delete_subvolume
    base = os.path.join(src.pool.path, "migrate", f"{share.id}.1")

    def stubborn(self, path, commit=True):
        if path.endswith(f"/{share.id}.2") and not os.path.lexists(base):
            raise BackendFailure("busy")
        real_delete(self, path, commit)
    monkeypatch.setattr(BtrfsDriver, "_delete_subvolume", stubborn)
    src.driver.migration_cleanup(share, dest, dst.driver, state)
    monkeypatch.setattr(BtrfsDriver, "_delete_subvolume", real_delete)
    assert not os.path.lexists(base)
    for path in (os.path.join(src.pool.path, "migrate", f"{share.id}.2"),
                 os.path.join(dst.pool.path, "migrate", share.id, f"{share.id}.2")):
        kernel.delete_subvolume(path)       # what was left, by hand
    src.driver.migration_complete(share, dest, dst.driver, state, Recorder(), threading.Event())
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []


def test_migration_complete_cancelled_then_cancel(migrating):
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    state = src.driver.migration_start(share, dest, dst.driver, Recorder(), threading.Event())
    write_random(os.path.join(mp, "huge"), 768 * MiB)
    before = describe(mp)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        src.driver.migration_complete(share, dest, dst.driver, state,
                                      Recorder(on_first=cancel.set), cancel)
    # the step's own work is gone; phase 1's is still there
    assert not os.path.lexists(os.path.join(src.pool.path, "migrate", f"{share.id}.2"))
    assert os.listdir(os.path.join(dst.pool.path, "migrate", share.id)) == [f"{share.id}.1"]
    dpath = os.path.join(dst.pool.path, "shares", share.id)
    assert is_subvolume(dpath) and not os.path.exists(os.path.join(dpath, "huge"))
    src.driver.migration_cancel(share, dest, dst.driver, state)
    assert not os.path.lexists(dpath)
    assert leftovers(src, share.id) == [] and leftovers(dst, share.id) == []
    assert describe(mp) == before


def test_a_share_holding_subvolumes_is_copied_file_by_file(migrating):
    """btrfs send would carry a nested subvolume as an empty directory."""
    src, dst, share = migrating
    dest = dest_of(share)
    mp = src.driver.local_path(share)
    fill(mp)
    nested = os.path.join(src.pool.path, "shares", share.id, "d", "nested")
    kernel.create_subvolume(nested)
    write(os.path.join(nested, "inside"), 5000, "inside")
    try:
        caps = src.driver.migration_check_compatibility(share, dst.driver)
        assert caps["driver_assisted"] is False
        state = src.driver.migration_start(share, dest, dst.driver, Recorder(),
                                           threading.Event())
        assert state == {"method": "copy"}
        src.driver.migration_complete(share, dest, dst.driver, state, Recorder(),
                                      threading.Event())
        dmp = dst.driver.local_path(dest)
        same_tree(mp, dmp)
        assert os.path.getsize(os.path.join(dmp, "d", "nested", "inside")) == 5000
        assert not is_subvolume(os.path.join(dmp, "d", "nested"))
        src.driver.migration_cancel(share, dest, dst.driver, state)
        assert dst.driver.local_path(dest) is None
    finally:
        kernel.delete_subvolume(nested)


def test_cancel_without_state_removes_a_host_assisted_copy(migrating):
    """A crash before migration_start returned leaves no state; the copy it
    was making (here the file-by-file one: the destination share created and
    mounted, not exported before the switch) must go all the same."""
    src, dst, share = migrating
    dest = dest_of(share)
    fill(src.driver.local_path(share))
    ShareDriver.migration_start(src.driver, share, dest, dst.driver, Recorder(),
                                threading.Event())
    assert dst.driver.local_path(dest) is not None and share.id not in dst.helper.exports
    src.driver.migration_cancel(share, dest, dst.driver, {})
    assert not os.path.lexists(os.path.join(dst.pool.path, "shares", share.id))
    assert share.id not in dst.helper.exports
    assert leftovers(dst, share.id) == []
