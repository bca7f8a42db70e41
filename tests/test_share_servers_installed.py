"""Share servers of the installed packages under a real systemd (PID 1 in
systemd-nspawn): each server's daemons run as instances of the shipped
template units sharedd-server-bus@ID.service and sharedd-server-nfs@ID.service
(NFS) and sharedd-server-smb@ID.service (CIFS).

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

CIFS: a second backend (its own pool image, enabled_share_protocols = CIFS,
cifs_helper = samba) and a second tenant network on a bridge of its own
with two client namespaces (10.89.0.51, 10.89.0.52). Its server runs smbd
as sharedd-server-smb@ID (the distribution's smbd, nmbd and samba-ad-dc are
masked in the container). Checked: the instance is active, smbd (its
MainPID) is in the server's network namespace and in the server's mount
namespace (the file /run/sharedd/servers/ID/ns/mnt), not the host's, in its
own unit's cgroup; the share is in the server's registry and not in the
container's /var/lib/samba; a Samba account made inside the server's mount
namespace (private /etc/passwd, /etc/group, /etc/shadow bind-mounted there,
smbpasswd through nsenter --mount) with a user rule writes and lists over
smbclient from the client with an ip rule, the other client and a user
without a rule are refused; systemd restarts a SIGKILLed smbd and the share
is served again; `systemctl restart sharedd` adopts smbd (same PID);
deleting the share stops the instance and removes the namespaces, the
namespace file, the mounts and the server's files. And a CIFS server is made
whichever CPU sharedd runs on (Linux 6.18's per-CPU namespace ids: see that
test).
"""

from __future__ import annotations

import json
import os
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

# CIFS: a backend of its own, a tenant network on a bridge of its own.
CIFS_BACKEND = "cifstenants"
CIFS_POOL_IMAGE = f"/var/lib/sharedd/images/{CIFS_BACKEND}-{TAG}.img"
# smbd opens a share as the connecting user, who must traverse to it: not
# under /var/lib/sharedd (0750). sharedd makes this directory 0711.
CIFS_MOUNT_DIR = f"/srv/sharedd-cifs-{TAG}"
CIFS_BRIDGE = f"sdic{TAG}"
CIFS_SUBNET = "10.89.0"
CIFS_CLIENTS = {
    f"sdc-ok-{TAG}": (f"sdcok{TAG}", f"{CIFS_SUBNET}.51"),
    f"sdc-no-{TAG}": (f"sdcno{TAG}", f"{CIFS_SUBNET}.52"),
}
CIFS_OK, CIFS_NO = list(CIFS_CLIENTS)
CIFS_SHARE = f"cifs-{TAG}"
# Accounts of the server's mount namespace only (never the container's).
SMB_USERS = {"smbrw89": 48901, "smbno89": 48902}
SMB_USER, SMB_NORULE = list(SMB_USERS)
SMB_PASSWORD = "Sharedd-89-pass"
SMB_GROUPS = {"sharedd-cifs": 48910}     # the helper's ip group, no members
CLIENT_DIR = f"/root/cifs-client-{TAG}"  # smbclient's config, state and files

DROPIN = f"""\
# Written by tests/test_share_servers_installed.py.
[DEFAULT]
enabled_share_backends = {BACKEND}, {CIFS_BACKEND}
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

[{CIFS_BACKEND}]
share_driver = btrfs
driver_handles_share_servers = true
cifs_helper = samba
enabled_share_protocols = CIFS
btrfs_pool_path = /var/lib/sharedd/pools/{CIFS_BACKEND}
btrfs_pool_image = {CIFS_POOL_IMAGE}
btrfs_pool_image_size_gib = 2
btrfs_share_mount_dir = {CIFS_MOUNT_DIR}
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
"""

#: upper bound for anything asynchronous (a bound, never asserted as a timing)
WAIT = 90


# ------------------------------------------------------------------ helpers
def units(sid):
    return f"sharedd-server-bus@{sid}.service", f"sharedd-server-nfs@{sid}.service"


def smb_unit(sid):
    return f"sharedd-server-smb@{sid}.service"


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
        for unit in units(sid) + (smb_unit(sid),):
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


def _lab(c, bridge=BRIDGE, clients=CLIENTS) -> None:
    """A tenant's bridge (no uplink, no address) and its client namespaces."""
    c.run("ip", "link", "add", bridge, "type", "bridge")
    c.run("ip", "link", "set", bridge, "up")
    for ns, (host_end, addr) in clients.items():
        c.run("ip", "netns", "add", ns)
        c.run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        c.run("ip", "link", "set", host_end, "master", bridge, "up")
        c.run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        c.run("ip", "-n", ns, "link", "set", "eth0", "up")
        c.run("ip", "-n", ns, "link", "set", "lo", "up")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ct(built_debs, nspawn_base):
    """A booted container with the packages installed, configured for share servers."""
    debs = built_debs[0]
    # On the CPU whose new mount namespaces get the highest ids: see
    # test_cifs_server_is_made_whichever_cpu_sharedd_runs_on.
    with nspawn.boot(nspawn_base, bind_ro={str(debs): "/mnt/debs"},
                     cpu=nspawn.newest_mount_ns_cpu()) as c:
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
            _lab(c, CIFS_BRIDGE, CIFS_CLIENTS)
            # The daemon restarted with the tenant network in place (as an
            # administrator would after setting the network up).
            c.run("systemctl", "restart", "sharedd.service", timeout=360)
            wait_active(c)
            yield c
        finally:
            # Share server instances first: their ganesha must not pin the pool.
            c.run("systemctl", "stop", "sharedd-server-smb@*.service",
                  "sharedd-server-nfs@*.service", "sharedd-server-bus@*.service", check=False)
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


# ------------------------------------------------------------------ CIFS
def mount_ns_file(sid) -> str:
    return f"/run/sharedd/servers/{sid}/ns/mnt"


def smb_conf(sid) -> str:
    return f"/var/lib/sharedd/servers/{sid}/smb.conf"


def in_server(c, sid, *argv, **kw):
    """A command inside the server's mount namespace (its registry, its accounts)."""
    return c.run("nsenter", f"--mount={mount_ns_file(sid)}", "--", *argv, **kw)


def _add_accounts(c, sid) -> None:
    """The test's users and groups in the server's mount namespace only:
    private copies of the container's /etc/passwd, /etc/group, /etc/shadow
    bind-mounted there, and the Samba accounts added with smbpasswd there."""
    etc = f"{CLIENT_DIR}/etc-{sid[:8]}"
    passwd = c.sh_out("cat", "/etc/passwd")
    group = "".join(line for line in c.sh_out("cat", "/etc/group").splitlines(True)
                    if line.split(":", 1)[0] not in SMB_GROUPS)
    shadow = c.sh_out("cat", "/etc/shadow")
    for user, uid in SMB_USERS.items():
        passwd += f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"
        group += f"{user}:x:{uid}:\n"
        shadow += f"{user}:!:19000:0:99999:7:::\n"
    for name, gid in SMB_GROUPS.items():
        group += f"{name}:x:{gid}:\n"
    for name, text in (("passwd", passwd), ("group", group), ("shadow", shadow)):
        c.write(f"{etc}/{name}", text, mode="0640" if name == "shadow" else "0644")
        in_server(c, sid, "mount", "--bind", f"{etc}/{name}", f"/etc/{name}")
    for user in SMB_USERS:
        in_server(c, sid, "smbpasswd", "-c", smb_conf(sid), "-s", "-a", user,
                  input=f"{SMB_PASSWORD}\n{SMB_PASSWORD}\n")
    # The container's own account database knows nothing of them.
    assert SMB_USER not in c.sh_out("cat", "/etc/passwd")
    assert SMB_USER in in_server(c, sid, "getent", "passwd", SMB_USER).stdout


def _client_files(c) -> None:
    """smbclient's own smb.conf (its state off the container's Samba
    directories), an authentication file per user, a file to put."""
    state = f"{CLIENT_DIR}/state"
    c.run("mkdir", "-p", state)
    c.write(f"{CLIENT_DIR}/smb.conf",
            "[global]\n  client min protocol = SMB2\n"
            + "".join(f"  {key} = {state}\n" for key in
                      ("lock directory", "state directory", "cache directory",
                       "private dir", "ncalrpc dir", "pid directory")))
    for user in SMB_USERS:
        c.write(f"{CLIENT_DIR}/{user}.auth",
                f"username = {user}\npassword = {SMB_PASSWORD}\ndomain = SHAREDD\n", mode="0600")
    c.write(f"{CLIENT_DIR}/payload.txt", "written over CIFS\n")


def smbclient(c, client_ns, address, user, commands, timeout=30):
    """One smbclient run from a tenant client namespace: (ok, output)."""
    proc = c.run("timeout", str(timeout), "ip", "netns", "exec", client_ns, "smbclient",
                 "-s", f"{CLIENT_DIR}/smb.conf", "-m", "SMB3",
                 "-A", f"{CLIENT_DIR}/{user}.auth", f"//{address}/{CIFS_SHARE}",
                 "-c", commands, check=False, timeout=timeout + 30)
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "NT_STATUS_" not in out, out


def processes_in_mount_ns(c, ns_id) -> list:
    """PIDs whose /proc/PID/ns/mnt is ns_id (device:inode)."""
    script = ("for p in /proc/[0-9]*; do "
              "[ \"$(stat -L -c %d:%i $p/ns/mnt 2>/dev/null)\" = \"$1\" ] && echo ${p#/proc/}; "
              "done; true")
    return c.sh_out("sh", "-c", script, "sh", ns_id).split()


@pytest.fixture(scope="module")
def cifs_server(ct):
    """A second tenant network, a CIFS share on the CIFS backend, the
    server's Samba accounts, rules for one account and one client."""
    net = call(ct, ROOT, MANAGER, "CreateShareNetwork", "sa{sv}", f"cifs-tenant-{TAG}", "3",
               "bridge", "s", CIFS_BRIDGE, "subnet", "s", f"{CIFS_SUBNET}.0/24",
               "allocation_range", "s", f"{CIFS_SUBNET}.10-{CIFS_SUBNET}.20")[0]
    try:
        share = call(ct, ROOT, MANAGER, "CreateShare", "ssta{sv}", CIFS_SHARE, "CIFS", "1",
                     "2", "share_network", "o", net, "backend", "s", CIFS_BACKEND)[0]
        share_id = prop(ct, share, SHARE, "Id")
        srv = prop(ct, share, SHARE, "ShareServer")
        assert srv.startswith(SRV_PREFIX), srv
        sid = srv[len(SRV_PREFIX):]
        _client_files(ct)
        _add_accounts(ct, sid)
        call(ct, share, SHARE, "AllowAccess", "sssa{sv}", "user", SMB_USER, "rw", "0")
        call(ct, share, SHARE, "AllowAccess", "sssa{sv}", "ip", CIFS_CLIENTS[CIFS_OK][1],
             "rw", "0")
        components.used("CIFS share servers as template-unit instances (installed, nspawn)")
        info = {"net": net, "share": share, "share_id": share_id, "srv": srv, "sid": sid,
                "address": f"{CIFS_SUBNET}.10",
                "export": prop(ct, share, SHARE, "ExportLocations")[0]}
    except BaseException:
        busctl(ct, "call", BUS, net, NET_IFACE, "Delete", "a{sv}", "0", check=False)
        raise
    try:
        yield info
    finally:
        # Best effort, as in server(): must not hide a test's failure.
        busctl(ct, "call", BUS, info["share"], SHARE, "Delete", "a{sv}", "0", check=False)
        try:
            ct.wait_for(lambda: info["srv"] not in managed_servers(ct), timeout=WAIT,
                        what="CIFS server removed")
        except AssertionError:
            pass
        busctl(ct, "call", BUS, net, NET_IFACE, "Delete", "a{sv}", "0", check=False)


def cifs_served(ct, info, client=CIFS_OK, user=SMB_USER, want="from-client.txt"):
    ok, out = smbclient(ct, client, info["address"], user, "ls")
    return ok and want in out


def test_cifs_server_runs_smbd_in_its_own_namespaces(ct, cifs_server):
    info, sid = cifs_server, cifs_server["sid"]
    assert prop(ct, info["srv"], SRV_IFACE, "Status") == "active"
    assert prop(ct, info["srv"], SRV_IFACE, "Backend") == CIFS_BACKEND
    assert prop(ct, info["srv"], SRV_IFACE, "ShareNetwork") == info["net"]
    assert prop(ct, info["srv"], SRV_IFACE, "Addresses") == [info["address"]]
    assert info["export"] == f"\\\\{info['address']}\\{CIFS_SHARE}", info["export"]
    unit = smb_unit(sid)
    assert is_active(ct, unit) == "active", f"{unit}\n{diagnostics(ct, sid)}"
    # CIFS only: no private bus, no ganesha.
    for other in units(sid):
        assert is_active(ct, other) == "inactive", other
    pid = main_pid(ct, unit)
    assert pid > 0 and ct.sh_out("cat", f"/proc/{pid}/comm").strip() == "smbd"
    # The server's network namespace ...
    assert ns_inode(ct, f"/proc/{pid}/ns/net") == ns_inode(ct, f"/run/netns/sharedd-{sid}")
    assert ct.sh_out("ip", "netns", "identify", str(pid)).split() == [f"sharedd-{sid}"]
    # ... and the server's own mount namespace (the file sharedd enters), not the host's.
    ct.run("findmnt", "-n", mount_ns_file(sid))
    assert ns_inode(ct, f"/proc/{pid}/ns/mnt") == ns_inode(ct, mount_ns_file(sid))
    assert ns_inode(ct, f"/proc/{pid}/ns/mnt") != ns_inode(ct, "/proc/1/ns/mnt")
    # There /var/lib/samba is the server's own directory.
    seen = ct.sh_out("findmnt", "-n", "-N", str(pid), "-o", "SOURCE", "/var/lib/samba")
    assert f"/var/lib/sharedd/servers/{sid}/samba/lib" in seen, seen
    cgroup = ct.sh_out("cat", f"/proc/{pid}/cgroup")
    assert unit in cgroup and "sharedd.service" not in cgroup, cgroup
    # The share is in the server's registry, and not in the container's.
    listed = in_server(ct, sid, "net", "-s", smb_conf(sid), "conf", "listshares").stdout.split()
    assert CIFS_SHARE in listed, listed
    server_registry = f"/var/lib/sharedd/servers/{sid}/samba/lib/registry.tdb"
    assert ct.run("grep", "-qai", CIFS_SHARE, server_registry, check=False).returncode == 0
    host_registry = "/var/lib/samba/registry.tdb"
    if ct.run("test", "-e", host_registry, check=False).returncode == 0:
        assert ct.run("grep", "-qai", CIFS_SHARE, host_registry, check=False).returncode == 1
    assert ct.run("grep", "-rqai", SMB_USER, "/var/lib/samba", check=False).returncode != 0
    # Nothing serves SMB in the container's own network namespace.
    assert not ct.run("ss", "-Hltn", "sport", "=", ":445", check=False).stdout.strip()


def test_cifs_account_with_a_rule_writes_from_the_client_with_a_rule(ct, cifs_server):
    info, sid = cifs_server, cifs_server["sid"]
    commands = f"put {CLIENT_DIR}/payload.txt from-client.txt; ls"
    try:
        ok, out = ct.wait_for(lambda: (lambda r: r[0] and r)(
            smbclient(ct, CIFS_OK, info["address"], SMB_USER, commands)),
            timeout=WAIT, what="smbclient put; ls")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics(ct, sid)}") from None
    assert "from-client.txt" in out, out
    # smbd wrote into the share's mount of the host (mounted after smbd's
    # namespace was made: propagation reached it).
    mnt = share_mount(ct, info["share_id"])
    assert mnt.startswith(CIFS_MOUNT_DIR + "/"), mnt
    assert ct.sh_out("cat", f"{mnt}/from-client.txt") == "written over CIFS\n"
    assert ct.sh_out("stat", "-c", "%u", f"{mnt}/from-client.txt").strip() == \
        str(SMB_USERS[SMB_USER])      # the writer, unknown to the container's passwd
    # The client without a rule is refused, so is a user without a rule.
    ok, out = smbclient(ct, CIFS_NO, info["address"], SMB_USER, "ls")
    assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out
    ok, out = smbclient(ct, CIFS_OK, info["address"], SMB_NORULE, "ls")
    assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out


def test_killed_smbd_is_restarted_by_systemd_and_serves_again(ct, cifs_server):
    info, sid = cifs_server, cifs_server["sid"]
    unit = smb_unit(sid)
    wait(ct, lambda: cifs_served(ct, info), "the share before the kill", sid)
    pid = main_pid(ct, unit)
    ct.run("systemctl", "kill", "-s", "KILL", unit)
    wait(ct, lambda: main_pid(ct, unit) not in (0, pid) and is_active(ct, unit) == "active",
         f"{unit} restarted by systemd", sid)
    new = main_pid(ct, unit)
    assert ns_inode(ct, f"/proc/{new}/ns/mnt") == ns_inode(ct, mount_ns_file(sid))
    assert ns_inode(ct, f"/proc/{new}/ns/net") == ns_inode(ct, f"/run/netns/sharedd-{sid}")
    wait(ct, lambda: cifs_served(ct, info), "the share served again after the restart", sid)
    ok, out = smbclient(ct, CIFS_NO, info["address"], SMB_USER, "ls")
    assert not ok and "NT_STATUS_ACCESS_DENIED" in out, out
    assert prop(ct, info["srv"], SRV_IFACE, "Status") == "active"


def test_sharedd_restart_adopts_the_running_smbd(ct, cifs_server):
    info, sid = cifs_server, cifs_server["sid"]
    unit = smb_unit(sid)
    wait(ct, lambda: cifs_served(ct, info), "the share before sharedd's restart", sid)
    pid = main_pid(ct, unit)
    before = main_pid(ct)
    ct.run("systemctl", "restart", "sharedd.service", timeout=360)
    wait_active(ct)
    assert main_pid(ct) != before
    assert main_pid(ct, unit) == pid, diagnostics(ct, sid)
    assert is_active(ct, unit) == "active"
    assert cifs_served(ct, info), diagnostics(ct, sid)
    assert info["srv"] in managed_servers(ct)
    assert prop(ct, info["srv"], SRV_IFACE, "Status") == "active"
    assert prop(ct, info["share"], SHARE, "ShareServer") == info["srv"]


def test_deleting_the_cifs_share_removes_the_server(ct, cifs_server):
    info, sid = cifs_server, cifs_server["sid"]
    ns_id = ns_inode(ct, mount_ns_file(sid))
    call(ct, info["share"], SHARE, "Delete", "a{sv}", "0")

    def gone():
        return (all(is_active(ct, u) in ("inactive", "unknown")
                    for u in units(sid) + (smb_unit(sid),))
                and info["srv"] not in managed_servers(ct)
                and ct.run("test", "-e", f"/run/netns/sharedd-{sid}", check=False).returncode != 0)
    wait(ct, gone, f"server {sid} removed", sid)
    for unit in units(sid) + (smb_unit(sid),):
        assert is_active(ct, unit) == "inactive", unit
    for path in (mount_ns_file(sid), f"/run/sharedd/servers/{sid}",
                 f"/var/lib/sharedd/servers/{sid}"):
        assert ct.run("test", "-e", path, check=False).returncode != 0, path
    assert sid not in ct.sh_out("cat", "/proc/self/mountinfo")
    assert f"sharedd-{sid}" not in ct.sh_out("ip", "netns", "list")
    assert sid not in ct.sh_out("ps", "-eo", "args")
    assert processes_in_mount_ns(ct, ns_id) == []
    assert prop(ct, info["net"], NET_IFACE, "ShareServers") == []
    assert not ct.run("findmnt", "-rn", "-o", "TARGET", check=False).stdout.count(info["share_id"])


def test_cifs_server_is_made_whichever_cpu_sharedd_runs_on(ct):
    """sharedd binds each CIFS server's new mount namespace at ns/mnt
    (unshare --mount=FILE). Linux refuses that bind (EINVAL, mnt_ns_loop)
    unless the new namespace's id is above that of sharedd's namespace, and
    since Linux 6.18 those ids come from per-CPU batches: they grow on each
    CPU, not across CPUs. The container was booted on the CPU that hands out
    the highest ids (nspawn.newest_mount_ns_cpu), so its mount namespace,
    sharedd's, has an id above what the other CPUs hand out next; on a real
    host sharedd's is the initial namespace (the lowest id) and this never
    shows. sharedd pinned to each CPU in turn must still make the server."""
    bridge = f"sdip{TAG}"
    dropin = "/run/systemd/system/sharedd.service.d/test-cpu.conf"
    ct.run("ip", "link", "add", bridge, "type", "bridge")
    ct.run("ip", "link", "set", bridge, "up")
    net = call(ct, ROOT, MANAGER, "CreateShareNetwork", "sa{sv}", f"cpu-tenant-{TAG}", "3",
               "bridge", "s", bridge, "subnet", "s", "10.90.0.0/24",
               "allocation_range", "s", "10.90.0.10-10.90.0.20")[0]
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            ct.write(dropin, f"[Service]\nCPUAffinity={cpu}\n")
            ct.run("systemctl", "daemon-reload")
            ct.run("systemctl", "restart", "sharedd.service", timeout=360)
            wait_active(ct)
            status = ct.sh_out("cat", f"/proc/{main_pid(ct)}/status")
            assert f"Cpus_allowed_list:\t{cpu}\n" in status, status
            made = busctl(ct, "call", BUS, ROOT, MANAGER, "CreateShare", "ssta{sv}",
                          f"cpu{cpu}-{TAG}", "CIFS", "1", "2", "share_network", "o", net,
                          "backend", "s", CIFS_BACKEND, check=False)
            assert made.returncode == 0, f"sharedd on CPU {cpu}: {made.stderr}"
            share = json.loads(made.stdout)["data"][0]
            srv = prop(ct, share, SHARE, "ShareServer")
            sid = srv[len(SRV_PREFIX):]
            assert is_active(ct, smb_unit(sid)) == "active", diagnostics(ct, sid)
            pid = main_pid(ct, smb_unit(sid))
            assert ns_inode(ct, f"/proc/{pid}/ns/mnt") == ns_inode(ct, mount_ns_file(sid))
            call(ct, share, SHARE, "Delete", "a{sv}", "0")
            wait(ct, lambda: srv not in managed_servers(ct)
                 and is_active(ct, smb_unit(sid)) == "inactive", f"server {sid} removed", sid)
    finally:
        ct.run("rm", "-f", dropin)
        ct.run("systemctl", "daemon-reload")
        ct.run("systemctl", "restart", "sharedd.service", timeout=360)
        wait_active(ct)
        busctl(ct, "call", BUS, net, NET_IFACE, "Delete", "a{sv}", "0", check=False)
        ct.run("ip", "link", "delete", bridge, check=False)
