"""mountd end to end on the host with real FUSE mounts: the real sharedd
daemon on the GlusterFS backend (TLS certificate access) writes spool
records; real sharedd-mountd daemons on two client hosts (namespaces), one
holding alice's certificate and one mallory's, react through inotify (the
periodic rescan is set to an hour): grant -> alice has it mounted rw,
mallory mounts nothing; deny -> alice's mount goes."""

import os
import pathlib
import subprocess
import tempfile
import time

import pytest

from mountd.state import read_mountinfo, top_mounts
from tests.fixtures.gluster import SERVER_IP
from tests.fixtures.sharedd_daemon import PY, REPO, Sharedd
from tests.support import components

SHAREDD_CONF = """
[DEFAULT]
enabled_share_backends = gluster1
state_path = {work}/state
spool_dir = {work}/spool
host_id = storage72

[gluster1]
share_driver = glusterfs_native
enabled_share_protocols = GLUSTERFS
glusterfs_targets = {ip}:/gv1, {ip}:/gv2
glusterfs_glusterd_socket = {socket}
glusterfs_ssl_own_cert = {tls}/server.pem
glusterfs_ssl_private_key = {tls}/server.key
glusterfs_ssl_ca_list = {tls}/ca.pem
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
enable_periodic_hooks = true
"""

MOUNTD_CONF = """
[mountd]
spool_dir = {spool}
mount_dir = {dir}/mnt
state_path = {dir}/state
consume_interval = 3600
protocols = GLUSTERFS
glusterfs_client_cert = {tls}/{cn}.pem
glusterfs_client_key = {tls}/{cn}.key
glusterfs_ca = {tls}/ca.pem
mount_timeout = 30
"""


def mounts_under(path):
    return {mp: e for mp, e in top_mounts(read_mountinfo()).items() if mp.startswith(path + "/")}


def wait(cond, timeout, what, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


@pytest.fixture
def storage72(system_bus, gluster_lab, tmp_path):
    work = tempfile.mkdtemp(prefix="sharedd72-", dir=tmp_path)
    os.chmod(work, 0o755)
    conf = os.path.join(work, "sharedd.conf")
    tls = os.path.dirname(gluster_lab.cert("server")["cert"])
    pathlib.Path(conf).write_text(SHAREDD_CONF.format(work=work, ip=SERVER_IP, tls=tls,
                                                      socket=gluster_lab.socket))
    d = Sharedd(system_bus, work, conf)
    d.argv_prefix = gluster_lab.lab.server_argv([])
    d.start()
    d.tls = tls
    yield d
    d.stop()


class Mountd:
    def __init__(self, lab, ns, cn, spool, tls, tmp):
        self.dir = tempfile.mkdtemp(prefix=f"mountd-{cn}-", dir=tmp)
        self.conf = os.path.join(self.dir, "mountd.conf")
        pathlib.Path(self.conf).write_text(MOUNTD_CONF.format(spool=spool, dir=self.dir, tls=tls, cn=cn))
        self.log_path = os.path.join(self.dir, "mountd.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", PY, "-m", "mountd", "--config", self.conf, "--no-bus"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.mount_dir = os.path.join(self.dir, "mnt")

    def tail(self):
        return open(self.log_path).read()[-3000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for mp in sorted(mounts_under(self.mount_dir), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        self.log.close()


def test_grant_mounts_through_inotify_and_deny_unmounts(storage72, gluster_lab, tmp_path):
    d = storage72
    mallory_ns = gluster_lab.lab.add_client("mallory72", ip4="10.72.0.12")
    spool = os.path.join(d.workdir, "spool")
    alice = Mountd(gluster_lab.lab, gluster_lab.client_ns, "alice", spool, d.tls, str(tmp_path))
    mallory = Mountd(gluster_lab.lab, mallory_ns, "mallory", spool, d.tls, str(tmp_path))
    path = None
    try:
        path = d.create_share("glshare", "GLUSTERFS", 1)
        assert d.share_prop(path, "ExportLocations")[0].startswith(f"{SERVER_IP}:/gv")
        time.sleep(1)
        assert mounts_under(alice.mount_dir) == {}, "no rule yet: nothing mounted"
        rid = d.share(path, "AllowAccess", "sssa{sv}", "cert", "alice", "rw", 0)
        # The rescan interval is an hour: only inotify can make this happen.
        wait(lambda: mounts_under(alice.mount_dir), 30, "alice's mount", alice.tail)
        components.used("sharedd-mountd daemons (inotify) with GlusterFS FUSE mounts from sharedd")
        (mp, entry), = mounts_under(alice.mount_dir).items()
        assert entry.fstype == "fuse.glusterfs" and not entry.read_only
        assert {"nosuid", "nodev"} <= set(entry.mount_options)
        proc = subprocess.run(["sh", "-c", f"echo from-alice > {mp}/hello"], capture_output=True,
                              timeout=20)
        assert proc.returncode == 0, proc.stderr
        vol = d.share_prop(path, "ExportLocations")[0].rsplit("/", 1)[1]
        assert open(os.path.join(gluster_lab.brick_dir(vol), "hello")).read() == "from-alice\n"
        assert mounts_under(mallory.mount_dir) == {}, "mallory's CN has no rule: nothing mounted"
        # Mallory trying by hand with her certificate: the server refuses her.
        mmp = gluster_lab.client_mount(vol, "mallory")
        usable = gluster_lab.is_mounted(mmp) and gluster_lab.io(["stat", mmp], timeout=5).returncode == 0
        gluster_lab.client_umount(mmp)
        assert not usable, "a certificate without a rule must be refused by the server"
        d.share(path, "DenyAccess", "sa{sv}", rid, 0)
        wait(lambda: not mounts_under(alice.mount_dir), 30, "alice's unmount", alice.tail)
        assert "hello" not in os.listdir(alice.mount_dir) if os.path.isdir(alice.mount_dir) else True
        d.share(path, "Delete", "a{sv}", 0)
        path = None
        # The volume went back to the pool empty: stopped, no data, no owner mark.
        assert [n for n in os.listdir(gluster_lab.brick_dir(vol)) if not n.startswith(".")] == []
        info = gluster_lab.volume_info(vol)
        assert "user.sharedd.share-id" not in info["options"], info
        assert info["status"] in ("Stopped", "Created"), info
        assert alice.proc.poll() is None and mallory.proc.poll() is None
    finally:
        alice.stop()
        mallory.stop()
        if path:
            d.call(path, "org.sharedd.Sharedd1.Share", "Delete", "a{sv}", 0, check=False)
