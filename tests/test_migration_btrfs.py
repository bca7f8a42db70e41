"""Migration with real storage and real clients: the sharedd daemon with two
btrfs backends (two pool images on loop devices) and a volume backend (ext4
images), all exported by the real NFS-Ganesha of the lab, and libnfs clients
in their own network namespace.

Proves, with checksums of every file:
- btrfs -> btrfs (btrfs send/receive, incremental at the end) with
  wait_for_complete: files written by a client over NFS after the copy are on
  the destination after CompleteMigration; the client reads everything from
  the new export location; the source subvolume and its exports are gone;
- btrfs -> volume (file copy) with a client writing during phase 1: every
  write that succeeded is on the destination; writes refused while the source
  was read-only are the only ones missing;
- Job.Cancel leaves the source intact and serving and nothing on the
  destination pool; Job progress rises to 1 over D-Bus;
- SIGKILL of sharedd during phase 1, then a restart: the share serves from its
  source, the destination holds nothing; the migration can be done again.
"""

import hashlib
import os
import threading
import time

import pytest

from sharedd.mountinfo import read_mountinfo, top_mounts
from tests.fixtures.storage_host import multi_backend_host
from tests.support import components
from tests.support.signals import SignalCollector
from tests.support.tenants import wait_for

JOB = "org.sharedd.Sharedd1.Job"
BACKENDS = ("btrfs1", "btrfs2", "vol")

MORE = """
[btrfs2]
share_driver = btrfs
share_export_ip = {ip}
nfs_helper = ganesha
btrfs_pool_path = {work}/pool2
btrfs_pool_image = {work}/pool2.img
btrfs_pool_image_size_gib = 4

[vol]
share_driver = volume
share_export_ip = {ip}
nfs_helper = ganesha
volume_pool_path = {work}/vpool
volume_fs_type = ext4
"""


@pytest.fixture(scope="module")
def host(system_bus, netlab, ganesha):
    with multi_backend_host(system_bus, netlab, ganesha, "migrate", BACKENDS, MORE,
                            images=("pool.img", "pool2.img")) as h:
        components.used("share migration (btrfs send/receive, file copy) with NFS clients")
        yield h


@pytest.fixture(scope="module")
def client(netlab):
    return netlab.add_client("mig-rw", ip4="10.71.0.41")


def mount_point(path):
    share_id = path.rsplit("/", 1)[1]
    found = [mp for mp in top_mounts(read_mountinfo()) if mp.endswith("/" + share_id)]
    assert len(found) == 1, found
    return found[0]


def tree_sums(root):
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fill(root, n=40, size=512 * 1024):
    """Local files (too big for the libnfs writer) with known contents."""
    os.makedirs(os.path.join(root, "local"), exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, "local", f"f{i:03d}"), "wb") as f:
            f.write(os.urandom(size))
    os.link(os.path.join(root, "local", "f000"), os.path.join(root, "local", "hardlink"))
    os.symlink("f001", os.path.join(root, "local", "symlink"))


def pseudo(h, path):
    return h.share_prop(path, "ExportLocations")[0].partition(":")[2]


def nfs_write(h, ns, path, name, data: bytes):
    local = os.path.join(h.workdir, f"upload-{time.monotonic_ns()}")
    with open(local, "wb") as f:
        f.write(data)
    try:
        return h.ganesha.nfs_cp_to(ns, local, f"{pseudo(h, path)}/{name}")
    finally:
        os.unlink(local)


def completed(msgs, job):
    return [m.body for m in msgs if m.member == "Completed" and m.path == job]


def on_pool(h, pool, share_id):
    """Paths of the pool that name the share (subvolumes, received copies)."""
    found = []
    for dirpath, dirs, files in os.walk(os.path.join(h.workdir, pool)):
        for name in dirs + files:
            if share_id in name:
                found.append(os.path.join(dirpath, name))
        dirs[:] = [d for d in dirs if share_id not in d]
    return found


def test_btrfs_to_btrfs_waits_for_complete_and_keeps_every_byte(host, client, system_bus):
    h = host
    path = h.create_share("mig-b2b", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.41", "rw", 0)
    src_mp = mount_point(path)
    fill(src_mp)
    assert nfs_write(h, client, path, "before.txt", b"written before the copy\n").ok
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "Migrate", "sa{sv}", "btrfs2", 1, "wait_for_complete", "b", "true")
        wait_for("phase 1", lambda: completed(sig.messages, job), timeout=300)
        assert completed(sig.messages, job) == [[True, "done"]]
        assert h.share_prop(path, "Status") == "migrating"
        # The source still serves read-write: a client writes after the copy.
        assert nfs_write(h, client, path, "after.txt", b"written after the copy\n").ok
        expected = tree_sums(src_mp)
        done = h.share(path, "CompleteMigration", "a{sv}", 0)
        wait_for("phase 2", lambda: completed(sig.messages, done), timeout=300)
        assert completed(sig.messages, done) == [[True, "done"]]
        progress = [m.body[1]["Progress"].value for m in sig.messages
                    if m.member == "PropertiesChanged" and m.path in (job, done)
                    and "Progress" in m.body[1]]
    finally:
        sig.close()
    assert progress and progress[-1] == 1.0
    assert h.share_prop(path, "Backend") == "btrfs2"
    assert h.share_prop(path, "Status") == "available"
    dst_mp = mount_point(path)
    assert dst_mp != src_mp and "btrfs2" in dst_mp
    assert tree_sums(dst_mp) == expected
    assert os.stat(os.path.join(dst_mp, "local", "hardlink")).st_ino == \
        os.stat(os.path.join(dst_mp, "local", "f000")).st_ino
    assert os.readlink(os.path.join(dst_mp, "local", "symlink")) == "f001"
    got = h.ganesha.nfs_cat(client, f"{pseudo(h, path)}/after.txt")
    assert got.ok and got.stdout == "written after the copy\n"
    assert nfs_write(h, client, path, "moved.txt", b"written on the destination\n").ok
    assert on_pool(h, "pool", sid) == [], "nothing of the share left on the source pool"
    assert [p for p in on_pool(h, "pool2", sid) if "/migrate" in p] == []
    h.share(path, "Delete", "a{sv}", 0)


def test_btrfs_to_volume_with_a_client_writing_during_the_copy(host, client, system_bus):
    h = host
    path = h.create_share("mig-b2v", "NFS", 1)
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.41", "rw", 0)
    src_mp = mount_point(path)
    fill(src_mp, n=200)
    written, refused, stop = {}, [], threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            data = f"live write {i}\n".encode()
            res = nfs_write(h, client, path, f"live{i:04d}.txt", data)
            if res.ok:
                written[f"live{i:04d}.txt"] = data
            else:
                refused.append(res)
            i += 1
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    t = threading.Thread(target=writer)
    try:
        job = h.share(path, "Migrate", "sa{sv}", "vol", 0)
        t.start()
        wait_for("the migration", lambda: completed(sig.messages, job), timeout=300)
    finally:
        stop.set()
        t.join(120)
        sig.close()
    assert completed(sig.messages, job) == [[True, "done"]]
    assert len(written) >= 1, "the client wrote during the migration"
    assert h.share_prop(path, "Backend") == "vol"
    dst_mp = mount_point(path)
    for name, data in written.items():
        # Written before the switch (to the source) or after it (to the
        # destination, at its new location): every successful write is there.
        with open(os.path.join(dst_mp, name), "rb") as f:
            assert f.read() == data, name
    h.share(path, "Delete", "a{sv}", 0)


def test_cancel_and_a_crash_during_the_copy_leave_the_source_serving(host, client, system_bus):
    h = host
    path = h.create_share("mig-cancel", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.41", "rw", 0)
    src_mp = mount_point(path)
    fill(src_mp, n=300)
    expected = tree_sums(src_mp)
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "Migrate", "sa{sv}", "vol", 0)
        h.call(job, JOB, "Cancel", "a{sv}", 0)
        wait_for("cancel", lambda: completed(sig.messages, job), timeout=300)
        ok, message = completed(sig.messages, job)[0]
    finally:
        sig.close()
    if ok:
        pytest.fail("the copy finished before Cancel reached it; make the data bigger")
    assert "cancelled" in message
    assert h.share_prop(path, "Backend") == "btrfs1"
    assert h.share_prop(path, "Status") == "available"
    assert tree_sums(mount_point(path)) == expected
    assert on_pool(h, "vpool", sid) == []
    assert nfs_write(h, client, path, "still.txt", b"still writable\n").ok

    # SIGKILL while copying, then a restart: rolled back.
    h.share(path, "Migrate", "sa{sv}", "btrfs2", 0)
    h.kill()
    h.start()
    assert h.share_prop(path, "Status") == "available"
    assert h.share_prop(path, "Backend") == "btrfs1"
    assert on_pool(h, "pool2", sid) == []
    assert nfs_write(h, client, path, "after-crash.txt", b"served again\n").ok
    # And it can be migrated afterwards.
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        job = h.share(path, "Migrate", "sa{sv}", "btrfs2", 0)
        wait_for("migration", lambda: completed(sig.messages, job), timeout=300)
        assert completed(sig.messages, job) == [[True, "done"]]
    finally:
        sig.close()
    assert h.share_prop(path, "Backend") == "btrfs2"
    sums = tree_sums(mount_point(path))
    assert {k: v for k, v in sums.items() if k in expected} == expected
    h.share(path, "Delete", "a{sv}", 0)
