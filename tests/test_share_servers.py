"""Share servers end to end: the real daemon with a btrfs backend that
handles share servers, two tenants' share networks on two Linux bridges of
this host, each tenant's clients in network namespaces on its own bridge
(no route between the bridges, none out), and each share server's own
NFS-Ganesha in its own namespace, reached with libnfs.

Also: named errors for bad networks, the server removed with its last share
(no namespace, process or file left), a server's ganesha killed and its
exports re-added, and SIGKILL of sharedd before and after the set-up and
teardown of a server, then a restart: converged, nothing orphaned.
"""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

import pytest

from tests.crashdriver import crash_during
from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd
from tests.support import components
from tests.support.tenants import (NET_IFACE, TenantLab, cleanup, ip, object_paths, server_of,
                                   server_entry, wait_for)
from tests.support.tenants import network as make_network

SRV_IFACE = "org.sharedd.Sharedd1.ShareServer"

CONFIG = """
[DEFAULT]
enabled_share_backends = tenants, vols
state_path = {work}/state
spool_dir = {work}/spool
host_id = storage1
share_server_launcher = child
share_server_run_dir = {work}/run

[tenants]
share_driver = {driver}
nfs_helper = ganesha
driver_handles_share_servers = true
btrfs_pool_path = {work}/pool
btrfs_pool_image = {work}/pool.img
btrfs_pool_image_size_gib = 4
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true

[vols]
share_driver = volume
nfs_helper = ganesha
driver_handles_share_servers = true
volume_pool_path = {work}/vpool
volume_fs_type = ext4
"""

# Tenant A and B: a bridge each, a client with a rule, a client without.
TENANTS = {"a": "10.86.1", "b": "10.86.2"}


class Tenants(TenantLab):
    """Two tenants' bridges and clients, reached over NFS with libnfs."""

    def __init__(self):
        super().__init__(TENANTS, "sdt")

    def nfs_ls(self, tenant, n, host, path, timeout=30):
        ns = self.clients[(tenant, n)]
        try:
            proc = subprocess.run(["ip", "netns", "exec", ns, "nfs-ls",
                                   f"nfs://{host}{path}?version=4"],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            neigh = ip("-n", ns, "neigh", "show", check=False).stdout
            return False, f"nfs-ls timed out after {timeout}s; neighbours of {ns}:\n{neigh}"
        ok = proc.returncode == 0 and "NFS4ERR" not in proc.stderr
        return ok, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tenants():
    t = Tenants()
    try:
        yield t
    finally:
        t.close()


def _make_host(bus, root, driver="btrfs"):
    work = tempfile.mkdtemp(prefix="tenants-", dir=root)
    os.chmod(work, 0o755)
    conf = os.path.join(work, "sharedd.conf")
    pathlib.Path(conf).write_text(CONFIG.format(work=work, driver=driver))
    host = Sharedd(bus, work, conf)
    host.state_path = os.path.join(work, "state")
    host.spool_dir = os.path.join(work, "spool")
    host.pool_image = os.path.join(work, "pool.img")
    return host


def _server_ids_in(state_path):
    base = os.path.join(state_path, "servers")
    return set(os.listdir(base)) if os.path.isdir(base) else set()


def _destroy(host):
    """Stop the daemon, then remove every server it left (by its pid files
    and namespaces), its mounts and its loop device."""
    try:
        host.stop()
    finally:
        for sid in _server_ids_in(host.state_path):
            for pid in _processes_of(sid):
                _kill(pid)
            ip("netns", "delete", f"sharedd-{sid}", check=False)
        teardown_tree(host.workdir, [host.pool_image]
                      + glob.glob(os.path.join(host.workdir, "vpool", "**"), recursive=True))


@pytest.fixture(scope="module")
def host(system_bus, tenants):
    root = tempfile.mkdtemp(prefix=f"sharedd-servers-{os.getpid()}-")
    os.chmod(root, 0o755)
    h = _make_host(system_bus, root, driver="tests.crashdriver:CrashingBtrfsDriver")
    try:
        h.start()
        components.used("share servers (network namespaces with their own NFS-Ganesha)")
        yield h
    finally:
        _destroy(h)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------- helpers
def _processes_of(server_id):
    """PIDs whose command line names the server (its ganesha and its bus)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(os.path.join(d, "cmdline"), "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if server_id in cmd:
            pids.append(int(os.path.basename(d)))
    return pids


def _ganesha_pid(server_id):
    for pid in _processes_of(server_id):
        try:
            if open(f"/proc/{pid}/comm").read().strip().startswith("ganesha"):
                return pid
        except OSError:
            pass
    return None


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _netns_exists(server_id):
    return os.path.exists(f"/run/netns/sharedd-{server_id}")


def network(h, tenants, tenant, name=None):
    return make_network(h, tenants, tenant, name or f"net-{tenant}")


def no_leftovers(h, server_id):
    return (not _netns_exists(server_id) and not _processes_of(server_id)
            and server_id not in _server_ids_in(h.state_path)
            and not os.path.exists(os.path.join(h.workdir, "run", server_id)))


# --------------------------------------------------------------------- tests
def test_bad_networks_are_refused_by_name(host, tenants):
    h = host
    br = tenants.bridges["a"]

    def err(*args):
        return h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager",
                       "CreateShareNetwork", "sa{sv}", "bad", *args)
    assert "InvalidArgument" in err(1, "subnet", "s", "10.86.9.0/24")            # no attachment
    assert "not a bridge" in err(2, "bridge", "s", "lo", "subnet", "s", "10.86.9.0/24") \
        or "InvalidArgument" in err(2, "bridge", "s", "lo", "subnet", "s", "10.86.9.0/24")
    missing = err(2, "bridge", "s", "sdnosuchbr0", "subnet", "s", "10.86.9.0/24")
    assert missing.startswith("org.sharedd.Sharedd1.Error.InvalidArgument"), missing
    assert "sdnosuchbr0" in missing
    assert "InvalidArgument" in err(2, "bridge", "s", br, "subnet", "s", "10.86.9.1/24")
    assert "outside the subnet" in err(3, "bridge", "s", br, "subnet", "s", "10.86.9.0/24",
                                       "gateway", "s", "10.86.8.1")
    assert "outside the subnet" in err(3, "bridge", "s", br, "subnet", "s", "10.86.9.0/24",
                                       "allocation_range", "s", "10.86.9.10-10.86.10.5")
    assert "InvalidArgument" in err(3, "parent", "s", "lo", "vlan", "q", 5000,
                                    "subnet", "s", "10.86.9.0/24")
    assert "unknown option" in err(2, "bridge", "s", br, "color", "s", "red")
    a = network(h, tenants, "a")
    try:
        overlap = h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager",
                          "CreateShareNetwork", "sa{sv}", "other", 2,
                          "bridge", "s", tenants.bridges["b"], "subnet", "s", "10.86.0.0/16")
        assert "overlaps" in overlap, overlap
        same = h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager",
                       "CreateShareNetwork", "sa{sv}", "other", 2,
                       "bridge", "s", br, "subnet", "s", "10.86.7.0/24")
        assert "already carries" in same, same
        dup = h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager",
                      "CreateShareNetwork", "sa{sv}", "net-a", 2,
                      "bridge", "s", tenants.bridges["b"], "subnet", "s", "10.86.6.0/24")
        assert "AlreadyExists" in dup, dup
        # A backend that handles share servers needs the network.
        need = h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
                       "ssta{sv}", "nonet", "NFS", 1, 0)
        assert "InvalidArgument" in need and "share_network" in need, need
        assert h.manager("ListShares", "a{sv}", 0) == []
        assert h.get(a, NET_IFACE, "Attachment") == f"bridge:{br}"
        assert h.get(a, NET_IFACE, "Subnet") == "10.86.1.0/24"
    finally:
        h.call(a, NET_IFACE, "Delete", "a{sv}", 0)


def test_each_tenant_reaches_only_its_own_server(host, tenants):
    h = host
    net_a, net_b = network(h, tenants, "a"), network(h, tenants, "b")
    a1 = h.create_share("tenant-a-1", share_network=net_a)
    b1 = h.create_share("tenant-b-1", share_network=net_b)
    srv_a, sid_a = server_of(h, a1)
    srv_b, sid_b = server_of(h, b1)
    assert sid_a != sid_b
    addr_a, addr_b = h.get(srv_a, SRV_IFACE, "Addresses")[0], h.get(srv_b, SRV_IFACE, "Addresses")[0]
    assert addr_a == "10.86.1.10" and addr_b == "10.86.2.10"
    assert h.get(srv_a, SRV_IFACE, "Status") == "active"
    assert h.get(srv_a, SRV_IFACE, "Shares") == [a1]
    assert h.get(srv_a, SRV_IFACE, "ShareNetwork") == net_a
    assert h.get(srv_a, SRV_IFACE, "Backend") == "tenants"
    assert h.get(net_a, NET_IFACE, "ShareServers") == [srv_a]
    assert _netns_exists(sid_a) and _netns_exists(sid_b)
    id_a, id_b = a1.rsplit("/", 1)[1], b1.rsplit("/", 1)[1]
    assert h.share_prop(a1, "ExportLocations") == [f"{addr_a}:/shares/{id_a}"]
    h.share(a1, "AllowAccess", "sssa{sv}", "ip", tenants.addr("a", 1), "rw", 0)
    h.share(b1, "AllowAccess", "sssa{sv}", "ip", tenants.addr("b", 1), "rw", 0)
    # A's client reaches A's share at A's server; A's other client has no rule.
    ok, out = tenants.nfs_ls("a", 1, addr_a, f"/shares/{id_a}")
    assert ok, out
    ok, out = tenants.nfs_ls("a", 2, addr_a, f"/shares/{id_a}")
    assert not ok, out
    # B's share is not exported by A's server at all, even to B's client's address.
    ok, out = tenants.nfs_ls("a", 1, addr_a, f"/shares/{id_b}")
    assert not ok, out
    # A's client cannot even reach B's server, nor B's client A's server.
    ok, out = tenants.nfs_ls("a", 1, addr_b, f"/shares/{id_b}")
    assert not ok, out
    ok, out = tenants.nfs_ls("b", 1, addr_a, f"/shares/{id_a}")
    assert not ok, out
    ok, out = tenants.nfs_ls("b", 1, addr_b, f"/shares/{id_b}")
    assert ok, out
    # The server is not on the host's own network: the host has no address
    # on either bridge, and nothing listens for NFS in the host's namespace.
    assert ":2049" not in subprocess.run(["ss", "-Hltn", "sport", "=", ":2049"],
                                         capture_output=True, text=True).stdout
    # Records: the set-up ran inside hooks, and share records name their server.
    recs = [json.load(open(f)) for f in glob.glob(os.path.join(h.spool_dir, "*", "*.json"))]
    setups = [r for r in recs if r["method"] == "setup_server" and r["phase"] == "post"]
    assert {r["share_server"]["id"] for r in setups} >= {sid_a, sid_b}
    creates = [r for r in recs if r["method"] == "create_share" and r["phase"] == "post"
               and r["share"]["id"] == id_a]
    assert creates and creates[0]["share"]["share_server"] == sid_a
    assert addr_a in creates[0]["server_addresses"]

    # The second share of a network goes on the same server.
    a2 = h.create_share("tenant-a-2", share_network=net_a)
    assert server_of(h, a2)[1] == sid_a
    assert sorted(h.get(srv_a, SRV_IFACE, "Shares")) == sorted([a1, a2])
    assert sorted(server_entry(h, srv_a)["Shares"]) == sorted([a1, a2])   # (a kept entry)
    assert "InvalidState" in h.error(srv_a, SRV_IFACE, "Delete", "a{sv}", 0)
    assert "InvalidState" in h.error(net_a, NET_IFACE, "Delete", "a{sv}", 0)

    # A server's ganesha dies: it is started again and its exports re-added.
    pid = _ganesha_pid(sid_a)
    assert pid
    _kill(pid)
    wait_for("ganesha restarted", lambda: (_ganesha_pid(sid_a) or pid) != pid)
    wait_for("exports re-added",
             lambda: tenants.nfs_ls("a", 1, addr_a, f"/shares/{id_a}")[0], timeout=90)

    # The last share of a network removes its server: nothing is left.
    h.share(a1, "Delete", "a{sv}", 0)
    assert _netns_exists(sid_a)
    assert server_entry(h, srv_a)["Shares"] == [a2] == h.get(srv_a, SRV_IFACE, "Shares")
    h.share(a2, "Delete", "a{sv}", 0)
    wait_for("server A removed", lambda: no_leftovers(h, sid_a))
    assert srv_a not in object_paths(h, "share_server")
    assert h.get(net_a, NET_IFACE, "ShareServers") == []
    ok, out = tenants.nfs_ls("b", 1, addr_b, f"/shares/{id_b}")
    assert ok, out
    recs = [json.load(open(f)) for f in glob.glob(os.path.join(h.spool_dir, "*", "*.json"))]
    assert any(r["method"] == "delete_share_server" and r["share_server"]["id"] == sid_a
               for r in recs)
    cleanup(h)
    assert no_leftovers(h, sid_b)


def test_each_backend_serves_a_network_from_a_server_of_its_own(host, tenants):
    """One server per network and backend: a volume-backed share of tenant A
    gets its own server at the range's next address."""
    h = host
    net = network(h, tenants, "a", name="two-backends")
    p1 = h.create_share("on-btrfs", share_network=net)
    p2 = h.create_share("on-volume", share_network=net, backend="vols")
    srv1, sid1 = server_of(h, p1)
    srv2, sid2 = server_of(h, p2)
    assert sid1 != sid2
    assert h.get(srv2, SRV_IFACE, "Backend") == "vols"
    assert h.get(srv1, SRV_IFACE, "Addresses") == ["10.86.1.10"]
    assert h.get(srv2, SRV_IFACE, "Addresses") == ["10.86.1.11"]
    assert sorted(h.get(net, NET_IFACE, "ShareServers")) == sorted([srv1, srv2])
    id2 = p2.rsplit("/", 1)[1]
    h.share(p2, "AllowAccess", "sssa{sv}", "ip", tenants.addr("a", 1), "rw", 0)
    ok, out = tenants.nfs_ls("a", 1, "10.86.1.11", f"/shares/{id2}")
    assert ok, out
    ok, out = tenants.nfs_ls("a", 1, "10.86.1.10", f"/shares/{id2}")
    assert not ok, out
    # The shipped interface descriptions match these live objects too.
    proc = subprocess.run(["/usr/bin/python3", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "gen-dbus-xml"), "--check"],
        capture_output=True, text=True, env=dict(os.environ,
                                                 DBUS_SYSTEM_BUS_ADDRESS=h.bus.address))
    assert proc.returncode == 0, proc.stderr
    cleanup(h)
    for sid in (sid1, sid2):
        wait_for("no leftovers", lambda: no_leftovers(h, sid))


def test_a_reboot_brings_every_server_back_before_its_shares(host, tenants):
    """sharedd stopped, the server's processes, namespace and volatile files
    gone (as after a reboot): the next start makes them again, then exports."""
    h = host
    net = network(h, tenants, "a", name="reboot")
    p = h.create_share("rebooted", share_network=net)
    sid = server_of(h, p)[1]
    share_id = p.rsplit("/", 1)[1]
    h.share(p, "AllowAccess", "sssa{sv}", "ip", tenants.addr("a", 1), "rw", 0)
    assert tenants.nfs_ls("a", 1, "10.86.1.10", f"/shares/{share_id}")[0]
    assert h.stop() == 0
    assert _ganesha_pid(sid), "a server keeps serving while sharedd is stopped"
    for pid in _processes_of(sid):
        _kill(pid)
    wait_for("processes gone", lambda: not _processes_of(sid))
    ip("netns", "delete", f"sharedd-{sid}")
    shutil.rmtree(os.path.join(h.workdir, "run", sid))
    h.start()
    assert _netns_exists(sid) and _ganesha_pid(sid)
    ok, out = tenants.nfs_ls("a", 1, "10.86.1.10", f"/shares/{share_id}")
    assert ok, out
    cleanup(h)
    wait_for("no leftovers", lambda: no_leftovers(h, sid))


def _create(h, name, net):
    return lambda: h.manager("CreateShare", "ssta{sv}", name, "NFS", 1, 1,
                             "share_network", "o", net, check=False)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", ["setup_server", "teardown_server"])
def test_sigkill_around_server_setup_and_teardown(host, tenants, method, when):
    h = host
    net = network(h, tenants, "a", name=f"crash-{method}-{when}".replace("_", "-"))
    if method == "setup_server":
        before = _server_ids_in(h.state_path)
        crash_during(h, "tenants", method, when, _create(h, "crashshare", net))
        # The set-up is rolled back (no share was made on it): nothing left.
        assert h.manager("ListShares", "a{sv}", 0) == []
        assert not object_paths(h, "share_server")
        for sid in _server_ids_in(h.state_path) - before:
            wait_for("no leftovers", lambda: no_leftovers(h, sid))
        assert not [n for n in os.listdir("/run/netns") if n.startswith("sharedd-")
                    and n[8:] in (_server_ids_in(h.state_path) - before)]
        # And the network works afterwards.
        p = h.create_share("aftercrash", share_network=net)
        sid = server_of(h, p)[1]
        h.share(p, "AllowAccess", "sssa{sv}", "ip", tenants.addr("a", 1), "rw", 0)
        ok, out = tenants.nfs_ls("a", 1, "10.86.1.10", f"/shares/{p.rsplit('/', 1)[1]}")
        assert ok, out
    else:
        p = h.create_share("crashshare", share_network=net)
        sid = server_of(h, p)[1]
        # Deleting the last share tears the server down in the background;
        # the crash comes there, so wait for the daemon to die.
        with open(os.path.join(h.state_path, "backends", "tenants", "crash.json"), "w") as f:
            json.dump({"method": method, "when": when}, f)
        h.share(p, "Delete", "a{sv}", 0)
        h.proc.wait(timeout=60)
        assert h.proc.returncode == -9
        h._close()
        h.start()
        wait_for("server removed after restart", lambda: no_leftovers(h, sid))
        assert not object_paths(h, "share_server")
    cleanup(h)
    wait_for("no leftovers", lambda: no_leftovers(h, sid))
