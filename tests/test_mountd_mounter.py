"""mountd.mounter: argument vectors, refusals, and the real mount/umount
commands where this machine can run them (bind mounts; no NFS client here)."""

import os
import subprocess
import time

import pytest

from mountd.mounter import (Mounter, NestedMounts, check_no_symlinks, glusterfs_argv,
                            mounts_below, nfs_argv, restrict_argv)
from mountd.reconcile import Desired
from mountd.state import read_mountinfo, top_mounts
from sharedd.errors import BackendFailure, InvalidArgument
from tests.support import components


def test_nfs_argv():
    assert nfs_argv("10.74.0.1:/shares/a", "/mnt/shares/a-12345678", "ro", ["vers=4.1", "hard"]) == [
        "mount", "-t", "nfs4", "-o", "ro,nosuid,nodev,vers=4.1,hard", "--",
        "10.74.0.1:/shares/a", "/mnt/shares/a-12345678"]
    assert nfs_argv("[fd74::1]:/a", "/m", "rw", [], nosuid_nodev=False)[4] == "rw"


@pytest.mark.parametrize("export", ["-o suid 10.74.0.1:/x", "10.74.0.1:/x,suid", "10.74.0.1:x",
                                    "host:/a b", "-x:/a", "10.74.0.1:/x\n", ""])
def test_bad_exports_refused(export):
    with pytest.raises(InvalidArgument):
        nfs_argv(export, "/m", "rw", [])
    with pytest.raises(InvalidArgument):
        glusterfs_argv(export, "/m", "rw", [])


@pytest.mark.parametrize("opt", ["suid", "dev", "exec,suid", "remount", "bind", "vers=4,suid",
                                 "x-systemd.automount", "helper=/bin/sh", "uid=0", "hard\n"])
def test_options_outside_the_allow_list_refused(opt):
    with pytest.raises(InvalidArgument):
        nfs_argv("10.74.0.1:/x", "/m", "rw", [opt])


def test_glusterfs_argv_with_certificate_and_read_only():
    argv = glusterfs_argv("10.74.0.1:/vol1/sub", "/mnt/shares/vol1-a0b1c2d3", "ro",
                          ["log-level=WARNING"], True, "/etc/c.pem", "/etc/c.key", "/etc/ca.pem")
    assert argv == [
        "glusterfs", "--volfile-server=10.74.0.1", "--volfile-id=vol1", "--subdir-mount=/sub",
        "--read-only", "--log-level=WARNING",
        "--xlator-option=*-client-*.transport.socket.ssl-own-cert=/etc/c.pem",
        "--xlator-option=*-client-*.transport.socket.ssl-private-key=/etc/c.key",
        "--xlator-option=*-client-*.transport.socket.ssl-ca-list=/etc/ca.pem",
        "/mnt/shares/vol1-a0b1c2d3"]
    rw = glusterfs_argv("[fd74::1]:/vol1", "/m", "rw", [])
    assert rw == ["glusterfs", "--volfile-server=fd74::1", "--volfile-id=vol1", "/m"]
    with pytest.raises(InvalidArgument):
        glusterfs_argv("10.74.0.1:/vol1", "/m", "rw", [], cert_required=True)
    with pytest.raises(InvalidArgument):
        glusterfs_argv("10.74.0.1:/vol1", "/m", "rw", ["volfile-server=evil"])


def test_restrict_argv():
    assert restrict_argv("/m", "ro", True) == ["mount", "-o", "remount,bind,ro,nosuid,nodev", "--", "/m"]


def _desired(fstype="nfs4", export="10.74.0.1:/x"):
    return Desired("a" * 32, "x", "h", "NFS", fstype, export, "rw", ())


def test_real_nfs_mount_failure_is_an_error(mountd_tmp):
    # No kernel NFS client on these machines: mount(8) fails, and says so.
    mp = os.path.join(mountd_tmp, "m")
    os.mkdir(mp)
    with pytest.raises(BackendFailure):
        Mounter(timeout=30).mount(_desired(export="127.0.0.1:/nonexistent"), mp)
    assert top_mounts(read_mountinfo()).get(mp) is None


def test_real_restrict_and_busy_unmount_falls_back_to_lazy(mountd_tmp, caplog):
    src, mp = os.path.join(mountd_tmp, "src"), os.path.join(mountd_tmp, "mp")
    os.makedirs(os.path.join(src, "d"))
    os.mkdir(mp)
    subprocess.run(["mount", "--bind", src, mp], check=True)
    m = Mounter(timeout=20)
    m.restrict(mp, "ro")
    e = top_mounts(read_mountinfo())[mp]
    assert e.read_only and {"nosuid", "nodev"} <= set(e.mount_options)
    # A process working inside the mount keeps it busy.
    busy = subprocess.Popen(["sleep", "60"], cwd=os.path.join(mp, "d"))
    try:
        time.sleep(0.2)
        assert m.unmount(mp) == "lazy"
        assert "lazily" in caplog.text
        assert top_mounts(read_mountinfo()).get(mp) is None
    finally:
        busy.kill()
        busy.wait()
    os.rmdir(mp)
    assert os.path.isdir(os.path.join(src, "d"))


def test_real_clean_unmount(mountd_tmp):
    src, mp = os.path.join(mountd_tmp, "src"), os.path.join(mountd_tmp, "mp")
    os.makedirs(src)
    os.mkdir(mp)
    subprocess.run(["mount", "--bind", src, mp], check=True)
    assert Mounter().unmount(mp) == "clean"
    assert top_mounts(read_mountinfo()).get(mp) is None


def _tmpfs(path):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], check=True,
                   capture_output=True, timeout=30)
    components.used("tmpfs mounts (nested)")


def _busy(cwd):
    """A process working inside cwd keeps its mount busy."""
    proc = subprocess.Popen(["sleep", "60"], cwd=cwd)
    time.sleep(0.2)
    return proc


def test_busy_mount_with_nested_mounts_is_not_detached_lazily(mountd_tmp, caplog):
    mnt = os.path.join(mountd_tmp, "mnt")
    a = os.path.join(mnt, "a-12345678")
    _tmpfs(a)
    os.mkdir(os.path.join(a, "work"))
    _tmpfs(os.path.join(a, "sub"))
    _tmpfs(a + "0")               # a sibling whose name starts like a: not nested
    assert mounts_below(a) == [os.path.join(a, "sub")]
    m = Mounter(timeout=20, mount_dir=mnt)
    busy = _busy(os.path.join(a, "work"))
    try:
        with pytest.raises(NestedMounts) as err:
            m.unmount(a)
        assert os.path.join(a, "sub") in str(err.value)
        assert err.value.nested == (os.path.join(a, "sub"),)
        top = top_mounts(read_mountinfo())
        assert top[a].fstype == "tmpfs" and top[os.path.join(a, "sub")].fstype == "tmpfs"
        assert "lazily" not in caplog.text.replace("not detaching it lazily", "")
        # Without the nested mount the busy share is detached lazily, and says so.
        assert m.unmount(os.path.join(a, "sub")) == "clean"
        caplog.clear()
        assert m.unmount(a) == "lazy"
        lazy = [r for r in caplog.records if "detached it lazily" in r.getMessage()]
        assert len(lazy) == 1 and lazy[0].levelname == "WARNING"
        assert top_mounts(read_mountinfo()).get(a) is None
        assert top_mounts(read_mountinfo())[a + "0"].fstype == "tmpfs"
    finally:
        busy.kill()
        busy.wait()


def _mount_count():
    return len(read_mountinfo())


def test_symlinked_path_to_a_mount_point_is_refused(mountd_tmp):
    mnt = os.path.join(mountd_tmp, "mnt")
    elsewhere = os.path.join(mountd_tmp, "elsewhere")
    os.makedirs(os.path.join(mnt, "real", "x-12345678"))
    os.makedirs(os.path.join(elsewhere, "x-12345678"))
    src = os.path.join(mountd_tmp, "src")
    os.mkdir(src)
    # A directory below mount_dir replaced by a symlink to somewhere else,
    # where a mount sits that must not be touched.
    target = os.path.join(elsewhere, "x-12345678")
    subprocess.run(["mount", "--bind", src, target], check=True, capture_output=True, timeout=30)
    os.symlink(elsewhere, os.path.join(mnt, "link"))
    via_link = os.path.join(mnt, "link", "x-12345678")
    m = Mounter(timeout=20, mount_dir=mnt)
    before = _mount_count()
    with pytest.raises(InvalidArgument, match="symlink"):
        m.mount(_desired(export="127.0.0.1:/x"), via_link)
    with pytest.raises(InvalidArgument, match="symlink"):
        m.restrict(via_link, "ro")
    with pytest.raises(InvalidArgument, match="symlink"):
        m.remount(_desired(), via_link)
    with pytest.raises(InvalidArgument, match="symlink"):
        m.unmount(via_link)
    assert _mount_count() == before
    entry = top_mounts(read_mountinfo())[target]
    assert not entry.read_only
    # The mount point itself a symlink: refused too.
    os.symlink(target, os.path.join(mnt, "y-12345678"))
    with pytest.raises(InvalidArgument, match="symlink"):
        m.restrict(os.path.join(mnt, "y-12345678"), "ro")
    # Outside mount_dir: refused, except that an unmount may come off
    # (a mount made under an earlier mount_dir).
    with pytest.raises(InvalidArgument, match="not below"):
        m.restrict(target, "ro")
    assert _mount_count() == before
    assert m.unmount(target) == "clean"
    assert top_mounts(read_mountinfo()).get(target) is None


def test_mount_dir_replaced_by_a_symlink_is_refused(mountd_tmp):
    mnt = os.path.join(mountd_tmp, "mnt")
    mp = os.path.join(mnt, "x-12345678")
    os.makedirs(mp)
    src = os.path.join(mountd_tmp, "src")
    os.mkdir(src)
    m = Mounter(timeout=20, mount_dir=mnt)
    # Through a good path everything works.
    subprocess.run(["mount", "--bind", src, mp], check=True, capture_output=True, timeout=30)
    m.restrict(mp, "ro")
    assert top_mounts(read_mountinfo())[mp].read_only
    assert m.unmount(mp) == "clean"
    # The mount point's parent (mount_dir) swapped for a symlink elsewhere.
    os.rename(mnt, os.path.join(mountd_tmp, "old"))
    other = os.path.join(mountd_tmp, "other")
    os.makedirs(os.path.join(other, "x-12345678"))
    os.symlink(other, mnt)
    before = _mount_count()
    for call in (lambda: m.mount(_desired(export="127.0.0.1:/x"), mp),
                 lambda: m.restrict(mp, "ro"), lambda: m.unmount(mp)):
        with pytest.raises(InvalidArgument):
            call()
    assert _mount_count() == before


def test_check_no_symlinks(mountd_tmp):
    mnt = os.path.join(mountd_tmp, "mnt")
    os.makedirs(os.path.join(mnt, "a", "b"))
    check_no_symlinks(mnt, os.path.join(mnt, "a", "b"))
    # A symlinked mount_dir itself is resolved (as the Reconciler does).
    os.symlink(mnt, os.path.join(mountd_tmp, "alias"))
    check_no_symlinks(os.path.join(mountd_tmp, "alias"), os.path.join(mnt, "a"))
    os.symlink("b", os.path.join(mnt, "a", "c"))
    with pytest.raises(InvalidArgument, match="symlink"):
        check_no_symlinks(mnt, os.path.join(mnt, "a", "c"))
    with open(os.path.join(mnt, "f"), "w"):
        pass
    with pytest.raises(InvalidArgument, match="not a directory"):
        check_no_symlinks(mnt, os.path.join(mnt, "f"))
    for bad in (mnt, "/etc", "/", "relative"):
        with pytest.raises(InvalidArgument, match="not below"):
            check_no_symlinks(mnt, bad)
    # ".." after a symlink would be resolved by the kernel past the walk.
    for bad in (os.path.join(mnt, "a", "c", "..", "b"), os.path.join(mnt, "..", "x"),
                mnt + "//a", os.path.join(mnt, "a") + "/"):
        with pytest.raises(InvalidArgument, match="normalized"):
            check_no_symlinks(mnt, bad)
