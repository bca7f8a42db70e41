"""Replication to a btrfs pool on another host over ssh (share_driver =
btrfs_remote): the "remote host" is a real OpenSSH sshd in a network
namespace of its own (reached over a veth pair with addresses this test
assigns) and a mount namespace of its own, in which its btrfs pool (a loop
image) is mounted: the pool is invisible to sharedd's side but through ssh.

Proves:
- host keys are checked as for the GlusterFS remote targets: a backend whose
  known_hosts holds another key is not usable (ssh's own refusal named);
- CreateReplica to the remote pool: the first sync (btrfs send here, btrfs
  receive there over ssh) and an incremental Resync carry every byte
  (checksums read inside the remote host's mount namespace); a snapshot of
  the share is on the remote pool too;
- what a remote pool cannot do is refused with named errors, nothing
  changed: a readable replica, a promote;
- Delete leaves nothing of the replica there;
- SIGKILL of sharedd during the first sync, then a restart: nothing of the
  half-made replica stays on the remote pool.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import uuid

import pytest

from tests.fixtures.storage_host import multi_backend_host
from tests.support import components
from tests.support.signals import SignalCollector
from tests.support.tenants import wait_for
from tests.test_migration_btrfs import fill, tree_sums
from tests.test_replication_btrfs import REPLICA, mount_of, replicas, replicate, run_job

ERR = "org.sharedd.Sharedd1.Error."


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=check)


class RemoteHost:
    """sshd in its own network and mount namespaces, with a btrfs pool."""

    def __init__(self, tmp):
        self.tmp = tmp
        tag = uuid.uuid4().hex[:6]
        self.ns, self.veth = f"shd-rh-{tag}", f"shdrh{tag}"
        # A /30 of its own (a second run on the machine takes another one).
        net = f"10.79.{int(tag[:2], 16)}"
        self.here, self.ip = f"{net}.1", f"{net}.2"
        self.pool = os.path.join(tmp, "remote-pool")
        self.image = os.path.join(tmp, "remote-pool.img")
        self.sshd = None
        d = self.ssh_dir = os.path.join(tmp, "ssh")
        os.makedirs(d, mode=0o700)
        os.makedirs(self.pool)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/host_key")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/other_key")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/id_ed25519")
        shutil.copy(f"{d}/id_ed25519.pub", f"{d}/authorized_keys")
        for name, key in (("known_hosts", "host_key"), ("wrong_known_hosts", "other_key")):
            with open(f"{d}/{key}.pub") as f:
                pub = " ".join(f.read().split()[:2])
            with open(f"{d}/{name}", "w") as f:
                f.write(f"{self.ip} {pub}\n")
        with open(f"{d}/sshd_config", "w") as f:
            f.write(f"Port 22\nListenAddress {self.ip}\nHostKey {d}/host_key\n"
                    f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "PrintMotd no\n")
        sh("truncate", "-s", "3G", self.image)
        sh("mkfs.btrfs", "-q", self.image)

    def start(self):
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)
        sh("ip", "addr", "add", f"{self.here}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ip}/30", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege separation
        # The pool is mounted in sshd's own mount namespace only.
        script = (f"mount -o loop {self.image} {self.pool} && "
                  f"exec /usr/sbin/sshd -D -e -f {self.ssh_dir}/sshd_config")
        out = open(os.path.join(self.tmp, "sshd.out"), "wb")
        self.sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
             "--", "sh", "-c", script], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        out.close()
        wait_for("sshd listening", lambda: self.sshd.poll() is None and sh(
            "ip", "netns", "exec", self.ns, "bash", "-c",
            f"exec 3<>/dev/tcp/{self.ip}/22", check=False).returncode == 0, timeout=30)
        components.used("OpenSSH sshd in its own network and mount namespaces (a remote host)")

    def path(self, rel=""):
        """A path of the remote pool, as seen from the remote host."""
        return os.path.join(f"/proc/{self.sshd.pid}/root", self.pool.lstrip("/"), rel)

    def stop(self):
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.send_signal(signal.SIGTERM)
            try:
                self.sshd.wait(30)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait(30)
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)
        # The loop device went with the namespace's mount (autoclear); make sure.
        for line in sh("losetup", "-j", self.image, check=False).stdout.splitlines():
            sh("losetup", "-d", line.split(":")[0], check=False)


REMOTE = """replication_domain = lab
replication_interval = 3600

[remote]
share_driver = btrfs_remote
btrfs_remote_target = root@{ip}:{pool}
btrfs_remote_ssh_key = {ssh}/id_ed25519
btrfs_remote_known_hosts_file = {ssh}/known_hosts
replication_domain = lab
hook_drivers = spool
enable_pre_hooks = true
enable_post_hooks = true

[badkey]
share_driver = btrfs_remote
btrfs_remote_target = root@{ip}:{pool}
btrfs_remote_ssh_key = {ssh}/id_ed25519
btrfs_remote_known_hosts_file = {ssh}/wrong_known_hosts
replication_domain = lab
"""


@pytest.fixture(scope="module")
def remote(system_bus, netlab, ganesha):
    tmp = tempfile.mkdtemp(prefix=f"sharedd-remote-host-{os.getpid()}-")
    rh = RemoteHost(tmp)
    try:
        rh.start()
        more = REMOTE.format(ip=rh.ip, pool=rh.pool, ssh=rh.ssh_dir)
        with multi_backend_host(system_bus, netlab, ganesha, "remote",
                                ("btrfs1", "remote", "badkey"), more) as h:
            h.rh = rh
            yield h
    finally:
        rh.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_remote_host_key_is_checked(remote):
    h = remote
    path = h.create_share("rem-key", "NFS", 1)
    err = h.error(path, "org.sharedd.Sharedd1.Share", "CreateReplica", "sa{sv}", "badkey", 0)
    assert err.startswith(ERR + "BackendFailure"), err
    assert "badkey" in err and "Host key verification failed" in err, err
    assert replicas(h, path) == {}
    h.share(path, "Delete", "a{sv}", 0)


def test_a_replica_on_another_host_over_ssh(remote, system_bus):
    h, rh = remote, remote.rh
    path = h.create_share("rem-a", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    src = mount_of(h, "btrfs1", sid)
    fill(src, n=30)
    snap = h.share(path, "CreateSnapshot", "sa{sv}", "s1", 0)
    snap_id = snap.rsplit("/", 1)[1]
    # What a pool on another host cannot do: refused before anything is made.
    err = h.error(path, "org.sharedd.Sharedd1.Share", "CreateReplica", "sa{sv}", "remote", 1,
                  "style", "s", "readable")
    assert err.startswith(ERR + "NotSupported"), err
    rp = replicate(h, system_bus, path, "remote")
    rid = rp.rsplit("/", 1)[1]
    assert h.get(rp, REPLICA, "Backend") == "remote"
    assert tree_sums(rh.path(f"shares/{rid}")) == tree_sums(src)
    assert tree_sums(rh.path(f"snapshots/{snap_id}")) == tree_sums(src)
    assert not os.listdir(rh.pool), "the pool is not visible outside the remote host"
    # An incremental sync carries a change.
    with open(os.path.join(src, "changed.txt"), "w") as f:
        f.write("changed after the first sync\n")
    os.unlink(os.path.join(src, "local", "f003"))
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        run_job(h, sig, h.call(rp, REPLICA, "Resync", "a{sv}", 0))
    finally:
        sig.close()
    assert tree_sums(rh.path(f"shares/{rid}")) == tree_sums(src)
    assert h.get(rp, REPLICA, "ReplicaState") == "in_sync"
    err = h.error(rp, REPLICA, "Promote", "a{sv}", 0)
    assert err.startswith(ERR + "NotSupported"), err
    assert h.share_prop(path, "Backend") == "btrfs1"
    # The sync points: one left on each side, the same snapshot.
    area = rh.path(f"replication/{sid}")
    assert len(os.listdir(area)) == 1
    h.call(rp, REPLICA, "Delete", "a{sv}", 0)
    assert replicas(h, path) == {}
    assert not os.path.exists(rh.path(f"shares/{rid}"))
    assert not os.path.exists(rh.path(f"snapshots/{snap_id}"))
    assert not os.path.exists(area)
    h.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    h.share(path, "Delete", "a{sv}", 0)


def test_a_crash_during_a_remote_first_sync_leaves_nothing_there(remote):
    h, rh = remote, remote.rh
    path = h.create_share("rem-crash", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    fill(mount_of(h, "btrfs1", sid), n=300)
    h.share(path, "CreateReplica", "sa{sv}", "remote", 0)
    h.kill()
    h.start()
    assert replicas(h, path) == {}
    assert not os.path.exists(rh.path(f"replication/{sid}"))
    left = os.listdir(rh.path("shares")) if os.path.isdir(rh.path("shares")) else []
    assert left == [], left
    h.share(path, "Delete", "a{sv}", 0)
