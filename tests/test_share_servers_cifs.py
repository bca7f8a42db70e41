"""CIFS share servers end to end: the real daemon with a btrfs backend that
handles share servers and serves CIFS through Samba; two tenants' share
networks on two Linux bridges of this host, each tenant's clients in network
namespaces on its own bridge (no route between the bridges, none out), and
each share server's own smbd, with a registry, passdb and locks of its own
in the server's private mount namespace, reached with smbclient.

Samba's accounts exist only inside each server's mount namespace: the test
bind-mounts its own /etc/passwd, /etc/group (with the group sharedd-cifs,
no members) and /etc/shadow there, and adds the Samba users with smbpasswd
run through nsenter --mount=<the server's namespace file>.

Share mounts must reach the servers' mount namespaces (slaves of the
host's): on this machine kind / is a private mount, so the test makes the
backend's share mount directory a shared mount first, as systemd makes
every mount on a real host.

Also: the host's own /var/lib/samba is untouched, a killed smbd is started
again and serves the share, and the server goes with its last share with
nothing left (processes, namespaces, mounts, files).
"""

import glob
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd
from tests.support import components
from tests.support.tenants import TenantLab, cleanup, server_of, wait_for
from tests.support.tenants import network as make_network

SRV_IFACE = "org.sharedd.Sharedd1.ShareServer"

CONFIG = """
[DEFAULT]
enabled_share_backends = tenants
state_path = {work}/state
spool_dir = {work}/spool
host_id = storage1
share_server_launcher = child
share_server_run_dir = {work}/run

[tenants]
share_driver = btrfs
enabled_share_protocols = CIFS
cifs_helper = samba
driver_handles_share_servers = true
btrfs_pool_path = {work}/pool
btrfs_pool_image = {work}/pool.img
btrfs_pool_image_size_gib = 4
btrfs_share_mount_dir = {work}/mounts
"""

TENANTS = {"a": "10.87.1", "b": "10.87.2"}
# Accounts of the servers' mount namespaces only (never the host's).
USERS = {"smbrw87": 48701, "smbro87": 48702}
PASSWORD = "Sharedd-87-pass"
GROUPS = {"sharedd-cifs": 48710}
UNREACHABLE = ("NT_STATUS_NETWORK_UNREACHABLE", "NT_STATUS_HOST_UNREACHABLE",
               "NT_STATUS_IO_TIMEOUT", "NT_STATUS_CONNECTION_REFUSED")
HOST_SAMBA = "/var/lib/samba"


def sh(*argv, check=True, input=None, timeout=60):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, input=input,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()} "
                             f"{proc.stdout.strip()}")
    return proc


class Tenants(TenantLab):
    """Two tenants' bridges and clients, and smbclient's files."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix=f"sdk-cifs-clients-{os.getpid()}-")
        try:
            super().__init__(TENANTS, "sdk")
            self.conf = os.path.join(self.tmp, "smb.conf")
            state = os.path.join(self.tmp, "state")
            os.makedirs(state)
            pathlib.Path(self.conf).write_text(
                "[global]\n  client min protocol = SMB2\n"
                + "".join(f"  {key} = {state}\n" for key in
                          ("lock directory", "state directory", "cache directory",
                           "private dir", "ncalrpc dir", "pid directory")))
            for user in USERS:
                pathlib.Path(self.tmp, f"{user}.auth").write_text(
                    f"username = {user}\npassword = {PASSWORD}\ndomain = SHAREDD\n")
            self.payload = os.path.join(self.tmp, "payload.txt")
            pathlib.Path(self.payload).write_text("written over CIFS\n")
        except BaseException:
            self.close()
            raise

    def smbclient(self, tenant, n, host, share, user, commands, timeout=30):
        """One smbclient run from a client namespace: (ok, output)."""
        argv = ["ip", "netns", "exec", self.clients[(tenant, n)], "smbclient", "-s", self.conf,
                "-m", "SMB3", "-A", os.path.join(self.tmp, f"{user}.auth"),
                f"//{host}/{share}", "-c", commands]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.tmp)
        except subprocess.TimeoutExpired:
            return False, f"smbclient timed out after {timeout}s"
        out = proc.stdout + proc.stderr
        return proc.returncode == 0 and "NT_STATUS_" not in out, out

    def list_shares(self, tenant, n, host, user, timeout=30):
        """smbclient -L (an RPC call: smbd starts samba-dcerpcd for it)."""
        argv = ["ip", "netns", "exec", self.clients[(tenant, n)], "smbclient", "-s", self.conf,
                "-m", "SMB3", "-A", os.path.join(self.tmp, f"{user}.auth"), "-L", f"//{host}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp)
        return proc.returncode == 0, proc.stdout + proc.stderr

    def close(self):
        super().close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def tenants():
    t = Tenants()
    try:
        yield t
    finally:
        t.close()


# ------------------------------------------------------------ the servers' side
def _server_ids(h):
    base = os.path.join(h.state_path, "servers")
    return set(os.listdir(base)) if os.path.isdir(base) else set()


def _mount_ns_file(h, sid):
    return os.path.join(h.workdir, "run", sid, "ns", "mnt")


def _smb_conf(h, sid):
    return os.path.join(h.state_path, "servers", sid, "smb.conf")


def _in_server_mount_ns(pid, sid):
    """pid sees the server's /var/lib/samba (its mount namespace), read from
    /proc/PID/mountinfo."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    return any(len(w) > 4 and w[4] == HOST_SAMBA and w[3].endswith(f"/{sid}/samba/lib")
               for w in map(str.split, lines))


def _processes_of(sid):
    """PIDs that name the server on their command line or live in its mount namespace."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(os.path.basename(d))
        if pid == os.getpid():
            continue
        try:
            cmd = open(os.path.join(d, "cmdline"), "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if sid in cmd or _in_server_mount_ns(pid, sid):
            pids.append(pid)
    return pids


def _samba_helpers_of(sid):
    """smbd, samba-dcerpcd and rpcd_* processes of the server."""
    out = []
    for pid in _processes_of(sid):
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        if comm.startswith(("smbd", "samba-dcerpcd", "rpcd_", "cleanupd", "notifyd")):
            out.append(pid)
    return out


def _comms(sid):
    out = []
    for pid in _processes_of(sid):
        try:
            out.append(open(f"/proc/{pid}/comm").read().strip())
        except OSError:
            pass
    return out


def _smbd_pid(h, sid):
    try:
        with open(os.path.join(h.workdir, "run", sid, "smb.pid")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mounts_naming(sid):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if sid in line]


def no_leftovers(h, sid):
    return (not os.path.exists(f"/run/netns/sharedd-{sid}") and not _processes_of(sid)
            and sid not in _server_ids(h) and not _mounts_naming(sid)
            and not os.path.lexists(os.path.join(h.workdir, "run", sid)))


def in_server(h, sid, *argv, input=None, check=True):
    """A command inside the server's mount namespace (its registry, its accounts)."""
    return sh("nsenter", f"--mount={_mount_ns_file(h, sid)}", "--", *argv, input=input,
              check=check)


def add_accounts(h, sid):
    """The test's users and groups in the server's mount namespace only."""
    etc = os.path.join(h.workdir, "etc-" + sid[:8])
    os.makedirs(etc)
    passwd = pathlib.Path("/etc/passwd").read_text()
    group = "".join(line for line in pathlib.Path("/etc/group").read_text().splitlines(True)
                    if line.split(":", 1)[0] not in GROUPS)
    shadow = pathlib.Path("/etc/shadow").read_text()
    for user, uid in USERS.items():
        passwd += f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"
        group += f"{user}:x:{uid}:\n"
        shadow += f"{user}:!:19000:0:99999:7:::\n"
    for name, gid in GROUPS.items():
        group += f"{name}:x:{gid}:\n"          # no members, as the helper requires
    for name, text in (("passwd", passwd), ("group", group), ("shadow", shadow)):
        path = os.path.join(etc, name)
        pathlib.Path(path).write_text(text)
        os.chmod(path, 0o640 if name == "shadow" else 0o644)
        in_server(h, sid, "mount", "--bind", path, f"/etc/{name}")
    for user in USERS:
        in_server(h, sid, "smbpasswd", "-c", _smb_conf(h, sid), "-s", "-a", user,
                  input=f"{PASSWORD}\n{PASSWORD}\n")
    assert "smbrw87" not in pathlib.Path("/etc/passwd").read_text()


def registry_shares(h, sid):
    out = in_server(h, sid, "net", "-s", _smb_conf(h, sid), "conf", "listshares").stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


# ------------------------------------------------------------------ the daemon
def _make_host(bus, root):
    work = tempfile.mkdtemp(prefix="tenants-", dir=root)
    os.chmod(work, 0o755)
    # Share mounts must propagate into the servers' mount namespaces (slaves
    # of the host's): a shared mount for the backend's share mounts.
    mounts = os.path.join(work, "mounts")
    os.makedirs(mounts)
    sh("mount", "--bind", mounts, mounts)
    sh("mount", "--make-shared", mounts)
    conf = os.path.join(work, "sharedd.conf")
    pathlib.Path(conf).write_text(CONFIG.format(work=work))
    host = Sharedd(bus, work, conf)
    host.state_path = os.path.join(work, "state")
    host.pool_image = os.path.join(work, "pool.img")
    host.mounts = mounts
    return host


def _destroy(h):
    """Stop the daemon, then remove every server it left: processes by PID
    (found by command line and by mount namespace), namespaces; then the
    mounts (the servers' namespace files among them) and the loop device."""
    try:
        h.stop()
    finally:
        run_dir = os.path.join(h.workdir, "run")
        sids = _server_ids(h) | (set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set())
        for sid in sids:
            for _ in range(3):
                pids = _processes_of(sid)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.2)
            sh("ip", "netns", "delete", f"sharedd-{sid}", check=False)
        teardown_tree(h.workdir, [h.pool_image])


@pytest.fixture(scope="module")
def host(system_bus, tenants):
    root = tempfile.mkdtemp(prefix=f"sharedd-cifs-servers-{os.getpid()}-")
    os.chmod(root, 0o755)
    had_registry = os.path.exists(os.path.join(HOST_SAMBA, "registry.tdb"))
    h = _make_host(system_bus, root)
    h.had_registry = had_registry
    try:
        h.start()
        components.used("CIFS share servers (their own smbd and registry in a private mount "
                        "namespace)")
        yield h
    finally:
        _destroy(h)
        shutil.rmtree(root, ignore_errors=True)


def network(h, tenants, tenant, name=None):
    return make_network(h, tenants, tenant, name or f"cifs-net-{tenant}")


# --------------------------------------------------------------------- tests
def test_each_tenant_reaches_only_its_own_cifs_server(host, tenants):
    h = host
    net_a, net_b = network(h, tenants, "a"), network(h, tenants, "b")
    try:
        a1 = h.create_share("cifs-a", protocol="CIFS", share_network=net_a)
        b1 = h.create_share("cifs-b", protocol="CIFS", share_network=net_b)
        srv_a, sid_a = server_of(h, a1)
        srv_b, sid_b = server_of(h, b1)
        assert sid_a != sid_b
        addr_a = h.get(srv_a, SRV_IFACE, "Addresses")[0]
        addr_b = h.get(srv_b, SRV_IFACE, "Addresses")[0]
        assert (addr_a, addr_b) == ("10.87.1.10", "10.87.2.10")
        assert h.share_prop(a1, "ExportLocations") == [f"\\\\{addr_a}\\cifs-a"]
        # Each server's registry holds its own share only.
        assert "cifs-a" in registry_shares(h, sid_a) and "cifs-b" not in registry_shares(h, sid_a)
        assert "cifs-b" in registry_shares(h, sid_b) and "cifs-a" not in registry_shares(h, sid_b)
        for sid in (sid_a, sid_b):
            add_accounts(h, sid)
            # CIFS only: the server runs smbd, no NFS-Ganesha and no bus.
            assert "smbd" in _comms(sid) and not any(c.startswith(("ganesha", "dbus"))
                                                      for c in _comms(sid)), _comms(sid)

        # A: a user rule (rw) and an ip rule for A's first client: both checks.
        h.share(a1, "AllowAccess", "sssa{sv}", "user", "smbrw87", "rw", 0)
        h.share(a1, "AllowAccess", "sssa{sv}", "ip", tenants.addr("a", 1), "rw", 0)
        ok, out = tenants.smbclient("a", 1, addr_a, "cifs-a", "smbrw87",
                                    f"put {tenants.payload} from-a1.txt")
        assert ok, out
        ok, out = tenants.smbclient("a", 1, addr_a, "cifs-a", "smbrw87", "ls")
        assert ok and "from-a1.txt" in out, out
        # The file is in the share's mount on the host: smbd saw the mount
        # sharedd made after the server's namespace.
        a_id = a1.rsplit("/", 1)[1]
        assert os.path.exists(os.path.join(h.mounts, a_id, "from-a1.txt"))
        # A user without a rule, and A's other client (no ip rule), are refused.
        ok, out = tenants.smbclient("a", 1, addr_a, "cifs-a", "smbro87", "ls")
        assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out
        ok, out = tenants.smbclient("a", 2, addr_a, "cifs-a", "smbrw87", "ls")
        assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out

        # B: an ip rule only (writable through the group sharedd-cifs of B's
        # namespace, which has no members).
        h.share(b1, "AllowAccess", "sssa{sv}", "ip", tenants.addr("b", 1), "rw", 0)
        ok, out = tenants.smbclient("b", 1, addr_b, "cifs-b", "smbro87",
                                    f"put {tenants.payload} from-b1.txt")
        assert ok, out

        # B's clients cannot even reach A's server, nor A's clients B's.
        ok, out = tenants.smbclient("b", 1, addr_a, "cifs-a", "smbrw87", "ls")
        assert not ok and any(s in out for s in UNREACHABLE), out
        ok, out = tenants.smbclient("a", 1, addr_b, "cifs-b", "smbrw87", "ls")
        assert not ok and any(s in out for s in UNREACHABLE), out
        # A's share is not offered by B's server (whose accounts are valid).
        ok, out = tenants.smbclient("b", 1, addr_b, "cifs-a", "smbrw87", "ls")
        assert not ok and "NT_STATUS_BAD_NETWORK_NAME" in out, out

        # Nothing of it on the host: no smbd listens in the host's network
        # namespace on a tenant address, the host's registry is untouched.
        listening = sh("ss", "-Hltn", "sport", "=", ":445").stdout
        assert "10.87." not in listening, listening
        host_registry = os.path.join(HOST_SAMBA, "registry.tdb")
        if not h.had_registry:
            assert not os.path.exists(host_registry)
        else:
            assert b"cifs-a" not in pathlib.Path(host_registry).read_bytes()
        assert not os.path.exists(os.path.join(HOST_SAMBA, "private", "passdb.tdb")) or \
            b"smbrw87" not in pathlib.Path(HOST_SAMBA, "private", "passdb.tdb").read_bytes()

        # A killed smbd is started again; the share persists in the registry.
        pid = _smbd_pid(h, sid_a)
        assert pid and pid in _samba_helpers_of(sid_a)
        os.kill(pid, signal.SIGKILL)
        wait_for("smbd restarted", lambda: (_smbd_pid(h, sid_a) or pid) != pid)
        wait_for("share served again", lambda: tenants.smbclient(
            "a", 1, addr_a, "cifs-a", "smbrw87", "ls")[0], timeout=90)
        ok, out = tenants.smbclient("a", 2, addr_a, "cifs-a", "smbrw87", "ls")
        assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out

        # The last share removes the server: nothing of it is left, not even
        # smbd's RPC helpers (started for the share list; they outlive smbd).
        ok, out = tenants.list_shares("a", 1, addr_a, "smbrw87")
        assert ok, out
        wait_for("samba-dcerpcd started", lambda: "samba-dcerpcd" in _comms(sid_a))
        h.share(a1, "Delete", "a{sv}", 0)
        wait_for("server A removed", lambda: no_leftovers(h, sid_a))
        assert not _samba_helpers_of(sid_a)
        # B's namespace (made after A's) holds no copy of A's namespace file
        # either: A's namespace is gone, not merely out of sight.
        seen_by_b = in_server(h, sid_b, "cat", "/proc/self/mountinfo").stdout
        assert sid_a not in seen_by_b, seen_by_b
        ok, out = tenants.smbclient("b", 1, addr_b, "cifs-b", "smbro87", "ls")
        assert ok and "from-b1.txt" in out, out
        h.share(b1, "Delete", "a{sv}", 0)
        wait_for("server B removed", lambda: no_leftovers(h, sid_b))
        if not h.had_registry:
            assert not os.path.exists(os.path.join(HOST_SAMBA, "registry.tdb"))
    finally:
        cleanup(h)
