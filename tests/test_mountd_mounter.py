"""mountd.mounter: argument vectors, refusals, and the real mount/umount
commands where this machine can run them (bind mounts; no NFS client here)."""

import os
import subprocess
import time

import pytest

from mountd.mounter import Mounter, glusterfs_argv, nfs_argv, restrict_argv
from mountd.reconcile import Desired
from mountd.state import read_mountinfo, top_mounts
from sharedd.errors import BackendFailure, InvalidArgument


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
