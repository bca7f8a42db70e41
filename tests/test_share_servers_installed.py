"""Share servers of the installed packages under a real systemd (PID 1 in
systemd-nspawn): each server's daemons run as instances of the shipped
template units sharedd-server-bus@ID.service and sharedd-server-nfs@ID.service.

The packages built from this checkout (tools/build-debs) are installed into
a booted container of the cached bookworm base (tests/fixtures/nspawn.py,
--private-network: nothing leaves the container), exactly as
tests/test_system_integration.py does, and configured by a sharedd.conf.d
drop-in: one backend with driver_handles_share_servers = true (btrfs, its
own pool image, NFS through ganesha) and share_server_launcher = auto, so
the launcher an installed system picks by itself is the one under test.

Inside the container: a Linux bridge with no uplink and no address, two
client namespaces with a veth port on it each (10.88.0.51 with an access
rule, 10.88.0.52 without). The share network is created on that bridge,
a share on it; its server is driven the way an administrator would (busctl,
systemctl) and reached with nfs-ls from the client namespaces.

Checked: both unit instances active, ganesha (the unit's MainPID) in the
server's network namespace yet in the host's mount namespace and in its own
unit's cgroup, not sharedd's; the export reaches the client with the rule
only; systemd restarts a SIGKILLed ganesha and sharedd re-adds the exports;
`systemctl restart sharedd` adopts the running server (same PIDs, exports
kept); deleting the last share stops both instances and removes the
namespace, the host's veth and the server's files.

The host-side distribution nfs-ganesha.service is stopped throughout: the
share server's own ganesha serves alone.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.fixtures import nspawn
from tests.support import components
from tests.test_system_integration import (BUS, MANAGER, ROOT, SHARE, _release_loop_devices,
                                           busctl, call, main_pid, prop, wait_active)

NET_IFACE = "org.sharedd.Sharedd1.ShareNetwork"
SRV_IFACE = "org.sharedd.Sharedd1.ShareServer"
SRV_PREFIX = f"{ROOT}/share_server/"

TAG = uuid.uuid4().hex[:6]
BRIDGE = f"sdib{TAG}"                     # at most 15 characters
SUBNET = "10.88.0"
CLIENTS = {                                # namespace -> (host veth end, address)
    f"sdi-ok-{TAG}": (f"sdiok{TAG}", f"{SUBNET}.51"),
    f"sdi-no-{TAG}": (f"sdino{TAG}", f"{SUBNET}.52"),
}
CLIENT_OK, CLIENT_NO = list(CLIENTS)
BACKEND = "tenants"
POOL_IMAGE = f"/var/lib/sharedd/images/{BACKEND}-{TAG}.img"

DROPIN = f"""\
# Written by tests/test_share_servers_installed.py.
[DEFAULT]
enabled_share_backends = {BACKEND}
share_server_launcher = auto

[{BACKEND}]
share_driver = btrfs
driver_handles_share_servers = true
nfs_helper = ganesha
enabled_share_protocols = NFS
btrfs_pool_path = /var/lib/sharedd/pools/{BACKEND}
btrfs_pool_image = {POOL_IMAGE}
btrfs_pool_image_size_gib = 2
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
"""

#: upper bound for anything asynchronous (a bound, never asserted as a timing)
WAIT = 90


# ------------------------------------------------------------------ helpers
def units(sid):
    return f"sharedd-server-bus@{sid}.service", f"sharedd-server-nfs@{sid}.service"


def is_active(c, unit) -> str:
    return c.run("systemctl", "is-active", unit, check=False).stdout.strip()


def nfs_ls(c, client_ns, export, timeout=60):
    """(ok, output) of nfs-ls of export (host:/path) from the client's namespace."""
    host, _, path = export.partition(":")
    proc = c.run("timeout", str(timeout), "ip", "netns", "exec", client_ns, "nfs-ls",
                 f"nfs://{host}{path}?version=4", check=False, timeout=timeout + 30)
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "NFS4ERR" not in out, out


def share_mount(c, share_id) -> str:
    mounts = c.sh_out("findmnt", "-rn", "-o", "TARGET").split()
    hits = [m for m in mounts if m.rstrip("/").endswith(share_id)]
    assert hits, f"no mount for share {share_id} in PID 1's namespace: {mounts}"
    return hits[0]


def managed_servers(c):
    out = busctl(c, "call", BUS, ROOT, "org.freedesktop.DBus.ObjectManager",
                 "GetManagedObjects").stdout
    return [p for p in json.loads(out)["data"][0] if p.startswith(SRV_PREFIX)]


def ns_inode(c, path) -> str:
    return c.sh_out("stat", "-L", "-c", "%d:%i", path).strip()


def diagnostics(c, sid=None) -> str:
    parts = [c.journal("sharedd.service", 80)]
    if sid:
        for unit in units(sid):
            parts.append(c.journal(unit, 30))
        parts.append(c.run("sh", "-c", f"tail -n 30 /var/lib/sharedd/servers/{sid}/ganesha.log",
                           check=False).stdout)
    return "\n".join(parts)


def wait(c, pred, what, sid=None):
    """c.wait_for with WAIT as the bound; the journals come with a timeout."""
    try:
        return c.wait_for(pred, timeout=WAIT, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics(c, sid)}") from None


def _lab(c) -> None:
    """The tenant's bridge (no uplink, no address) and the client namespaces."""
    c.run("ip", "link", "add", BRIDGE, "type", "bridge")
    c.run("ip", "link", "set", BRIDGE, "up")
    for ns, (host_end, addr) in CLIENTS.items():
        c.run("ip", "netns", "add", ns)
        c.run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        c.run("ip", "link", "set", host_end, "master", BRIDGE, "up")
        c.run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        c.run("ip", "-n", ns, "link", "set", "eth0", "up")
        c.run("ip", "-n", ns, "link", "set", "lo", "up")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ct(built_debs, nspawn_base):
    """A booted container with the packages installed, configured for share servers."""
    debs = built_debs[0]
    with nspawn.boot(nspawn_base, bind_ro={str(debs): "/mnt/debs"}) as c:
        try:
            # The distribution's ganesha is not used by share servers.
            c.run("systemctl", "stop", "nfs-ganesha.service", check=False)
            c.write(f"/etc/sharedd/sharedd.conf.d/50-share-servers-{TAG}.conf", DROPIN)
            debfiles = sorted(p.name for p in debs.glob("*.deb"))
            c.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                  "--no-install-recommends", *[f"/mnt/debs/{d}" for d in debfiles],
                  timeout=300)
            c.run("sharedd", "--check-config", "--config", "/etc/sharedd/sharedd.conf")
            _lab(c)
            # The daemon restarted with the tenant network in place (as an
            # administrator would after setting the network up).
            c.run("systemctl", "restart", "sharedd.service", timeout=360)
            wait_active(c)
            yield c
        finally:
            # Share server instances first: their ganesha must not pin the pool.
            c.run("systemctl", "stop", "sharedd-server-nfs@*.service",
                  "sharedd-server-bus@*.service", check=False)
            _release_loop_devices(c)


@pytest.fixture(scope="module")
def server(ct):
    """The share network on the bridge, a share on it with a rule for one client."""
    net = call(ct, ROOT, MANAGER, "CreateShareNetwork", "sa{sv}", f"tenant-{TAG}", "3",
               "bridge", "s", BRIDGE, "subnet", "s", f"{SUBNET}.0/24",
               "allocation_range", "s", f"{SUBNET}.10-{SUBNET}.20")[0]
    share = call(ct, ROOT, MANAGER, "CreateShare", "ssta{sv}", f"share-{TAG}", "NFS", "1",
                 "1", "share_network", "o", net)[0]
    share_id = prop(ct, share, SHARE, "Id")
    srv = prop(ct, share, SHARE, "ShareServer")
    assert srv.startswith(SRV_PREFIX), srv
    sid = srv[len(SRV_PREFIX):]
    call(ct, share, SHARE, "AllowAccess", "sssa{sv}", "ip", CLIENTS[CLIENT_OK][1], "rw", "0")
    ct.write(f"{share_mount(ct, share_id)}/hello-tenant.txt", "from the storage host\n")
    components.used("share servers as template-unit instances (installed, nspawn)")
    info = {"net": net, "share": share, "share_id": share_id, "srv": srv, "sid": sid,
            "export": prop(ct, share, SHARE, "ExportLocations")[0]}
    try:
        yield info
    finally:
        # Best effort (the container is thrown away; ct's finalizer releases
        # the loop device whatever is left): must not hide a test's failure.
        listed = busctl(ct, "call", BUS, ROOT, MANAGER, "ListShares", "a{sv}", "0", check=False)
        if listed.returncode == 0:
            for p in json.loads(listed.stdout)["data"][0]:
                busctl(ct, "call", BUS, p, SHARE, "Delete", "a{sv}", "0", check=False)
        try:
            ct.wait_for(lambda: not managed_servers(ct), timeout=WAIT, what="servers removed")
        except AssertionError:
            pass
        busctl(ct, "call", BUS, net, NET_IFACE, "Delete", "a{sv}", "0", check=False)


def served(ct, info, client=CLIENT_OK):
    ok, out = nfs_ls(ct, client, info["export"])
    return ok and "hello-tenant.txt" in out


# ------------------------------------------------------------------ tests
def test_launcher_auto_picks_the_template_units(ct, server):
    sid = server["sid"]
    assert prop(ct, server["srv"], SRV_IFACE, "Status") == "active"
    assert prop(ct, server["srv"], SRV_IFACE, "Backend") == BACKEND
    assert prop(ct, server["srv"], SRV_IFACE, "ShareNetwork") == server["net"]
    assert prop(ct, server["srv"], SRV_IFACE, "Shares") == [server["share"]]
    addr = prop(ct, server["srv"], SRV_IFACE, "Addresses")
    assert addr == [f"{SUBNET}.10"], addr
    assert server["export"] == f"{SUBNET}.10:/shares/{server['share_id']}", server["export"]
    for unit in units(sid):
        assert is_active(ct, unit) == "active", f"{unit}\n{diagnostics(ct, sid)}"
        assert main_pid(ct, unit) > 0, unit
    bus_unit, nfs_unit = units(sid)
    pid = main_pid(ct, nfs_unit)
    assert "ganesha" in ct.sh_out("cat", f"/proc/{pid}/comm")
    # In the server's network namespace (by inode, and as ip(8) names it) ...
    nspath = f"/run/netns/sharedd-{sid}"
    assert ns_inode(ct, f"/proc/{pid}/ns/net") == ns_inode(ct, nspath)
    assert ct.sh_out("ip", "netns", "identify", str(pid)).split() == [f"sharedd-{sid}"]
    assert ns_inode(ct, f"/proc/{pid}/ns/net") != ns_inode(ct, "/proc/1/ns/net")
    # ... but the host's mount namespace (shares mounted later are exportable).
    assert ns_inode(ct, f"/proc/{pid}/ns/mnt") == ns_inode(ct, "/proc/1/ns/mnt")
    # Its own unit's cgroup, not sharedd.service's (survives sharedd's restart).
    cgroup = ct.sh_out("cat", f"/proc/{pid}/cgroup")
    assert f"sharedd-server-nfs@{sid}.service" in cgroup, cgroup
    assert "sharedd.service" not in cgroup, cgroup
    bus_pid = main_pid(ct, bus_unit)
    assert "dbus-daemon" in ct.sh_out("cat", f"/proc/{bus_pid}/comm")
    assert f"sharedd-server-bus@{sid}.service" in ct.sh_out("cat", f"/proc/{bus_pid}/cgroup")
    # Nothing serves NFS in the container's own network namespace.
    assert not ct.run("ss", "-Hltn", "sport", "=", ":2049", check=False).stdout.strip()


def test_only_the_client_with_a_rule_reaches_the_export(ct, server):
    wait(ct, lambda: served(ct, server), "nfs-ls from the client with a rule", server["sid"])
    ok, out = nfs_ls(ct, CLIENT_NO, server["export"])
    assert not ok and "hello-tenant.txt" not in out, out


def test_killed_ganesha_is_restarted_by_systemd_and_exports_re_added(ct, server):
    sid = server["sid"]
    _, nfs_unit = units(sid)
    pid = main_pid(ct, nfs_unit)
    ct.run("systemctl", "kill", "-s", "KILL", nfs_unit)
    wait(ct, lambda: main_pid(ct, nfs_unit) not in (0, pid) and is_active(ct, nfs_unit) == "active",
         f"{nfs_unit} restarted by systemd", sid)
    wait(ct, lambda: served(ct, server), "exports re-added after the restart", sid)
    new = main_pid(ct, nfs_unit)
    assert ns_inode(ct, f"/proc/{new}/ns/net") == ns_inode(ct, f"/run/netns/sharedd-{sid}")
    ok, out = nfs_ls(ct, CLIENT_NO, server["export"])
    assert not ok, out


def test_sharedd_restart_adopts_the_running_server(ct, server):
    sid = server["sid"]
    wait(ct, lambda: served(ct, server), "export before the restart", sid)
    pids = {u: main_pid(ct, u) for u in units(sid)}
    before = main_pid(ct)
    ct.run("systemctl", "restart", "sharedd.service", timeout=360)
    wait_active(ct)
    assert main_pid(ct) != before
    # The same processes: adopted, not restarted (so their exports stayed).
    assert {u: main_pid(ct, u) for u in units(sid)} == pids, diagnostics(ct, sid)
    assert all(is_active(ct, u) == "active" for u in units(sid))
    assert served(ct, server), diagnostics(ct, sid)
    assert managed_servers(ct) == [server["srv"]]
    assert prop(ct, server["srv"], SRV_IFACE, "Status") == "active"
    assert prop(ct, server["share"], SHARE, "ShareServer") == server["srv"]


def test_deleting_the_last_share_removes_the_server(ct, server):
    sid = server["sid"]
    call(ct, server["share"], SHARE, "Delete", "a{sv}", "0")

    def gone():
        return (all(is_active(ct, u) in ("inactive", "unknown") for u in units(sid))
                and not managed_servers(ct)
                and ct.run("test", "-e", f"/run/netns/sharedd-{sid}", check=False).returncode != 0)
    wait(ct, gone, f"server {sid} removed", sid)
    for unit in units(sid):
        assert is_active(ct, unit) == "inactive", unit
    for path in (f"/run/sharedd/servers/{sid}", f"/var/lib/sharedd/servers/{sid}"):
        assert ct.run("test", "-e", path, check=False).returncode != 0, path
    assert f"sharedd-{sid}" not in ct.sh_out("ip", "netns", "list")
    assert ct.run("ip", "link", "show", f"sdh{sid[:12]}", check=False).returncode != 0
    assert sid not in ct.sh_out("ps", "-eo", "args")
    assert prop(ct, server["net"], NET_IFACE, "ShareServers") == []
    # The tenant's bridge itself is the administrator's: it stays.
    ct.run("ip", "link", "show", BRIDGE)
