"""Share servers' runtime (sharedd.service_instance, sharedd.netns) with real
components: child mode on this host, systemd mode in a booted container.

The lab: a Linux bridge in the root network namespace (no address, no
uplink, no IPv6 on it), and a client namespace whose eth0 is a veth port of
that bridge. Servers made by ServiceInstances attach to the bridge; the
client reaches them with libnfs (nfs-ls) after an export is added over the
server's private bus with busctl. Traffic flows only between addresses the
tests assign, inside namespaces they create; nothing has a route out.

Every test's finalizer kills what its servers may have left (by PID, found
through /proc command lines that name the test's own directory), deletes
their namespaces and its interfaces, whatever the code under test did.

systemd mode runs in systemd-nspawn (tests/fixtures/nspawn.py: cached
bookworm base, volatile overlay, private network): the template units from
systemd/, a script driving ServiceInstances in "auto" mode inside, its
results checked here.

This machine kind's kernel has no 802.1Q support: the VLAN test then checks
the clear refusal; on a kernel with it, it checks the whole path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from sharedd import netns
from sharedd.errors import BackendFailure, ConfigError, InvalidArgument
from sharedd.service_instance import SYSTEMD_RUN_DIR, NetworkInfo, ServiceInstances
from tests.fixtures import nspawn
from tests.support import components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_MGR = ("org.ganesha.nfsd", "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr")
WAIT = 60.0          # upper bound for anything asynchronous (never asserted as timing)


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def wait_for(what: str, cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    """No such process, not even a zombie (a zombie would mean nobody reaped it)."""
    return not os.path.exists(f"/proc/{pid}")


def mountinfo(pid: Any = "self") -> List[List[str]]:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return [line.split() for line in f.read().splitlines()]
    except OSError:
        return []


def mounts_under(path: str) -> List[str]:
    return sorted({w[4] for w in mountinfo() if w[4] == path or w[4].startswith(path + "/")})


def in_mount_ns_of(sid: str) -> List[int]:
    """Processes that see a CIFS server's /var/lib/samba: its mount namespace."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and any(
                w[4] == "/var/lib/samba" and w[3].endswith(f"/{sid}/samba/lib")
                for w in mountinfo(name)):
            out.append(int(name))
    return out


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------ the lab
class Lab:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"sdtb{self.tag}"
        self.client_ns = f"sdtc{self.tag}"
        self.client_port = f"sdtv{self.tag}"
        self.octet = 100 + int(self.tag[:2], 16) % 100
        self.subnet = f"10.84.{self.octet}"
        self.client_ip = f"{self.subnet}.20"
        self.subnet6 = f"fd84:{self.octet}:"
        self.client_ip6 = f"{self.subnet6}:20"
        self.made_links: List[str] = []
        self.made_ns: List[str] = []

    def link(self, *args: str) -> None:
        sh("ip", "link", *args)

    def make(self) -> None:
        self.link("add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self.made_links.append(self.bridge)
        self.link("set", self.bridge, "addrgenmode", "none")
        self.link("set", self.bridge, "up")
        self.add_ns(self.client_ns)
        self.link("add", self.client_port, "type", "veth", "peer", "name", "eth0",
                  "netns", self.client_ns)
        self.made_links.append(self.client_port)
        self.link("set", self.client_port, "addrgenmode", "none")
        self.link("set", self.client_port, "master", self.bridge, "up")
        sh("ip", "-n", self.client_ns, "addr", "add", f"{self.client_ip}/24", "dev", "eth0")
        sh("ip", "-n", self.client_ns, "addr", "add", f"{self.client_ip6}/64", "dev", "eth0",
           "nodad")
        sh("ip", "-n", self.client_ns, "link", "set", "eth0", "up")
        components.used("network namespaces (share servers on a bridge)")

    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.made_ns.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.accept_ra=0",
           "net.ipv6.conf.default.accept_ra=0")

    def close(self) -> None:
        for name in reversed(self.made_ns):
            sh("ip", "netns", "delete", name, check=False)
        for name in reversed(self.made_links):
            if os.path.exists(f"/sys/class/net/{name}"):
                sh("ip", "link", "delete", name, check=False)
        self.made_ns.clear()
        self.made_links.clear()

    def nfs_ls(self, ns: str, host: str, path: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, "nfs-ls", f"nfs://{host}{path}?version=4",
                  check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.make()
        yield lab
    finally:
        lab.close()


# ------------------------------------------------------------------ the runtime
class Runtime:
    """ServiceInstances over one temp directory, and the ids the test used."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.tmp = tempfile.mkdtemp(prefix="sharedd-si-test-")
        self.base = os.path.join(self.tmp, "servers")
        self.run = os.path.join(self.tmp, "run")
        self.ids: List[str] = []
        self.instances: List[ServiceInstances] = []
        self.restarts: List[str] = []
        self.restarted = threading.Event()

    def on_restart(self, server_id: str) -> None:
        self.restarts.append(server_id)
        self.restarted.set()

    def new(self) -> ServiceInstances:
        si = ServiceInstances(self.base, self.run, mode="child", command_timeout=60,
                              on_restart=self.on_restart)
        self.instances.append(si)
        return si

    def server(self, host: int, attachment: Optional[dict] = None,
               address: Optional[str] = None,
               protocols: Tuple[str, ...] = ("NFS",)) -> NetworkInfo:
        sid = uuid.uuid4().hex
        self.ids.append(sid)
        return NetworkInfo(sid, attachment or {"bridge": self.lab.bridge},
                           address or f"{self.lab.subnet}.{host}/24", protocols=protocols)

    def our_pids(self) -> Dict[int, str]:
        """Every process whose command line names this runtime's directory."""
        found = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        cmd = f.read().decode(errors="replace")
                except OSError:
                    continue
                if self.tmp in cmd:
                    found[int(name)] = cmd.replace("\0", " ")
        return found

    def close(self) -> None:
        for si in self.instances:
            si.close()
        left = list(self.our_pids()) + [pid for sid in self.ids for pid in in_mount_ns_of(sid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        for pid in left:                 # reap our children (spawned by the runtime)
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
        for sid in self.ids:
            with contextlib.suppress(Exception):
                netns.destroy(sid)
            sh("ip", "netns", "delete", netns.netns_name(sid), check=False)
        # The CIFS servers' namespace files and the tests' own mounts, deepest first.
        for _ in range(8):
            targets = mounts_under(self.tmp)
            if not targets:
                break
            for target in sorted(targets, key=len, reverse=True):
                if sh("umount", target, check=False).returncode != 0:
                    sh("umount", "-l", target, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def rt(lab: Lab) -> Iterator[Runtime]:
    rt = Runtime(lab)
    try:
        yield rt
    finally:
        rt.close()


def busctl(details: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("busctl", f"--address={details['bus_address']}", "--timeout=30", *args,
              check=check)


def bus_owner(details: dict) -> int:
    out = busctl(details, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                 "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                 "org.ganesha.nfsd", check=False).stdout.split()
    return int(out[1]) if len(out) == 2 else 0


def add_export(rt: Runtime, details: dict, export_id: int, name: str,
               client: str = "") -> str:
    """Export a new directory holding <name>.txt to the lab's client; its pseudo path."""
    path = os.path.join(rt.tmp, f"export-{name}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{name}.txt"), "w") as f:
        f.write(name)
    conf = os.path.join(rt.tmp, f"export-{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""EXPORT {{
    Export_Id = {export_id}; Path = "{path}"; Pseudo = "/{name}";
    Protocols = 4; Transports = TCP; SecType = sys; Squash = No_Root_Squash;
    Access_Type = None;
    FSAL {{ Name = VFS; }}
    CLIENT {{ Clients = {client or rt.lab.client_ip}; Access_Type = RW; Protocols = 4; }}
}}
""")
    busctl(details, "call", *EXPORT_MGR, "AddExport", "ss", conf,
           f"EXPORT(Export_Id={export_id})")
    return f"/{name}"


def global6(ns: str) -> List[str]:
    """eth0's usable (not tentative) global IPv6 addresses in namespace ns."""
    out = sh("ip", "-n", ns, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
    return [line.split()[3] for line in out.splitlines() if "tentative" not in line]


def pids(rt: Runtime, sid: str) -> Dict[str, int]:
    """The server's processes, from its pid files (<run>/<id>/{bus,nfs}.pid)."""
    out = {}
    for kind in ("bus", "nfs"):
        with open(os.path.join(rt.run, sid, f"{kind}.pid")) as f:
            out[kind] = int(f.read().split()[0])
    return out


def ganesha_count(rt: Runtime, sid: str) -> int:
    return sum(1 for cmd in rt.our_pids().values()
               if "ganesha.nfsd" in cmd and f"/{sid}/ganesha.conf" in cmd)


# ------------------------------------------------------------------ tests
def test_servers_serve_nfs_to_a_tenant_client_each_on_its_own_bus(rt: Runtime):
    si = rt.new()
    a = rt.server(10)
    b = rt.server(0, address=f"{rt.lab.subnet6}:11/64")       # IPv6 (nodad)
    da, db = si.setup(a), si.setup(b)
    components.used("NFS-Ganesha share servers (one namespace and private bus each)")

    for net, d in ((a, da), (b, db)):
        sid = net.server_id
        assert d["server_id"] == sid
        assert d["address"] == net.address.split("/")[0]
        assert d["netns"] == f"sharedd-{sid}" and d["netns_path"] == f"/run/netns/sharedd-{sid}"
        assert d["host_ifname"] == f"sdh{sid[:12]}" and d["ifname"] == "eth0"
        assert d["bus_address"] == f"unix:path={rt.run}/{sid}/bus"
        assert os.stat(os.path.join(rt.run, sid)).st_mode & 0o777 == 0o700
        assert si.running(sid)
        nfs = pids(rt, sid)["nfs"]
        # ganesha: in the server's network namespace, in the host's mount namespace
        assert os.stat(f"/proc/{nfs}/ns/net").st_ino == os.stat(d["netns_path"]).st_ino
        assert os.stat(f"/proc/{nfs}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
        assert bus_owner(d) == nfs
        master = os.path.basename(os.readlink(f"/sys/class/net/{d['host_ifname']}/master"))
        assert master == rt.lab.bridge
        assert netns.exists(sid) and sid in netns.list_servers()

    pa = add_export(rt, da, 101, "alpha")
    pb = add_export(rt, db, 101, "beta", rt.lab.client_ip6)   # same id: another ganesha
    res = rt.lab.nfs_ls(rt.lab.client_ns, da["address"], pa)
    assert res.returncode == 0 and "alpha.txt" in res.stdout, res.stdout + res.stderr
    res = rt.lab.nfs_ls(rt.lab.client_ns, db["address"], pb)    # libnfs: no [] for IPv6
    assert res.returncode == 0 and "beta.txt" in res.stdout, res.stdout + res.stderr
    assert global6(db["netns"]) == [f"{rt.lab.subnet6}:11/64"]     # usable: not tentative
    # Each bus reaches its own ganesha only.
    assert "/beta" not in busctl(da, "call", *EXPORT_MGR, "ShowExports").stdout
    res = rt.lab.nfs_ls(rt.lab.client_ns, da["address"], pb)
    assert "beta.txt" not in res.stdout

    # setup again: idempotent, same processes
    before = pids(rt, a.server_id)
    assert si.setup(a) == da
    assert pids(rt, a.server_id) == before


def test_killed_ganesha_is_restarted_and_reported(rt: Runtime):
    si = rt.new()
    net = rt.server(12)
    d = si.setup(net)
    sid = net.server_id
    old = pids(rt, sid)
    pseudo = add_export(rt, d, 7, "gamma")

    os.kill(old["nfs"], signal.SIGKILL)
    assert rt.restarted.wait(WAIT), "on_restart was not called"
    assert rt.restarts == [sid]
    new = pids(rt, sid)
    assert new["nfs"] != old["nfs"] and new["bus"] == old["bus"]
    wait_for("the killed ganesha to be reaped", lambda: pid_gone(old["nfs"]))
    assert bus_owner(d) == new["nfs"]
    assert ganesha_count(rt, sid) == 1
    # Its runtime exports died with it; re-adding works.
    assert "gamma.txt" not in rt.lab.nfs_ls(rt.lab.client_ns, d["address"], pseudo).stdout
    add_export(rt, d, 7, "gamma")
    res = rt.lab.nfs_ls(rt.lab.client_ns, d["address"], pseudo)
    assert "gamma.txt" in res.stdout, res.stdout + res.stderr


def test_killed_bus_restarts_bus_and_ganesha(rt: Runtime):
    si = rt.new()
    net = rt.server(13)
    d = si.setup(net)
    sid = net.server_id
    old = pids(rt, sid)

    os.kill(old["bus"], signal.SIGKILL)
    assert rt.restarted.wait(WAIT), "on_restart was not called"
    new = pids(rt, sid)
    assert new["bus"] != old["bus"] and new["nfs"] != old["nfs"]
    wait_for("the old processes to be gone", lambda: pid_gone(old["bus"]) and
             pid_gone(old["nfs"]))
    assert bus_owner(d) == new["nfs"]
    assert si.running(sid)


def test_restarted_sharedd_adopts_running_servers(rt: Runtime):
    si = rt.new()
    net = rt.server(14)
    d = si.setup(net)
    sid = net.server_id
    old = pids(rt, sid)
    pseudo = add_export(rt, d, 9, "delta")

    si.close()                                     # sharedd stops: servers keep serving
    assert all(not pid_gone(p) for p in old.values())
    res = rt.lab.nfs_ls(rt.lab.client_ns, d["address"], pseudo)
    assert "delta.txt" in res.stdout, res.stdout + res.stderr

    si2 = rt.new()
    assert si2.running(sid)
    assert si2.ensure(net) is False                # adopted: its exports are still there
    assert pids(rt, sid) == old
    assert ganesha_count(rt, sid) == 1
    assert "delta.txt" in rt.lab.nfs_ls(rt.lab.client_ns, d["address"], pseudo).stdout

    # As after a crash right after spawning: no pid files. The processes are
    # found through /proc and adopted; ensure cannot tell whether that
    # ganesha was ever handed out, so it says to re-add the exports.
    si2.close()
    for kind in ("bus", "nfs"):
        os.unlink(os.path.join(rt.run, sid, f"{kind}.pid"))
    si3 = rt.new()
    assert si3.ensure(net) is True
    assert pids(rt, sid) == old and ganesha_count(rt, sid) == 1

    # The adopted ganesha is watched like a child.
    os.kill(old["nfs"], signal.SIGKILL)
    assert rt.restarted.wait(WAIT), "on_restart was not called for an adopted server"
    assert rt.restarts == [sid]
    assert pids(rt, sid)["nfs"] != old["nfs"]
    wait_for("the killed ganesha to be reaped", lambda: pid_gone(old["nfs"]))

    # A new runtime whose ganesha died meanwhile: ensure starts it and says so.
    si3.close()
    dead = pids(rt, sid)["nfs"]
    os.kill(dead, signal.SIGKILL)
    wait_for("the killed ganesha to exit", lambda: zombie(dead) or pid_gone(dead))
    si4 = rt.new()
    assert si4.ensure(net) is True
    assert ganesha_count(rt, sid) == 1 and bus_owner(d) == pids(rt, sid)["nfs"]
    # Nobody watched it die (its runtime was closed); it is reaped all the same.
    wait_for("the unwatched ganesha to be reaped", lambda: pid_gone(dead))


def test_teardown_leaves_nothing(rt: Runtime):
    si = rt.new()
    net = rt.server(15)
    d = si.setup(net)
    sid = net.server_id
    procs = pids(rt, sid)

    si.teardown(sid)
    assert all(pid_gone(p) for p in procs.values())
    assert not os.path.lexists(d["netns_path"])
    assert not os.path.exists(f"/sys/class/net/{d['host_ifname']}")
    assert not rt.our_pids()
    assert os.listdir(rt.base) == [] and os.listdir(rt.run) == []
    assert sid not in si.leftovers() and sid not in netns.list_servers()
    assert not si.running(sid)
    si.teardown(sid)                               # idempotent
    si.teardown(uuid.uuid4().hex)                  # never existed


def test_teardown_removes_orphans_and_leftovers_finds_them(rt: Runtime):
    si = rt.new()
    net = rt.server(16)
    si.setup(net)
    sid = net.server_id
    si.close()                                     # as if sharedd forgot the server
    si2 = rt.new()
    assert sid in si2.leftovers()
    si2.teardown(sid)
    assert sid not in si2.leftovers() and not rt.our_pids()


def test_ensure_finishes_half_made_servers(rt: Runtime):
    si = rt.new()
    # A namespace without eth0, and a pid file naming someone else's process.
    a = rt.server(17)
    sh("ip", "netns", "add", netns.netns_name(a.server_id))
    os.makedirs(os.path.join(rt.run, a.server_id), mode=0o700)
    with open(os.path.join(rt.run, a.server_id, "nfs.pid"), "w") as f:
        f.write(f"{os.getpid()} 1\n")
    # A namespace file that was never mounted (crash inside ip netns add).
    b = rt.server(18)
    open(netns.netns_path(b.server_id), "w").close()

    for net in (a, b):
        assert si.ensure(net) is True
        d = si.setup(net)
        assert bus_owner(d) == pids(rt, net.server_id)["nfs"]
        addrs = sh("ip", "-n", d["netns"], "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert net.address in addrs
    assert not pid_gone(os.getpid())               # the stale pid file's process untouched

    # A changed address replaces the old one; gateway and MTU are applied
    # (the gateway is the lab's client: nothing leads out of the lab).
    moved = NetworkInfo(a.server_id, a.attachment, f"{rt.lab.subnet}.19/24",
                        gateway=rt.lab.client_ip, mtu=1400)
    assert si.ensure(moved) is False
    ns = netns.netns_name(a.server_id)
    addrs = sh("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"{rt.lab.subnet}.19/24" in addrs and a.address not in addrs
    assert f"default via {rt.lab.client_ip} dev eth0" in sh("ip", "-n", ns, "route").stdout
    assert "mtu 1400" in sh("ip", "-n", ns, "link", "show", "dev", "eth0").stdout
    assert "mtu 1400" in sh("ip", "link", "show", "dev", netns.host_ifname(a.server_id)).stdout
    # ... and the gateway goes again when no longer given.
    assert si.ensure(NetworkInfo(a.server_id, a.attachment, moved.address)) is False
    assert "default" not in sh("ip", "-n", ns, "route").stdout


def _kernel_has_vlans(lab: Lab) -> bool:
    ns = f"sdtq{lab.tag}"
    lab.add_ns(ns)
    try:
        sh("ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        return sh("ip", "-n", ns, "link", "add", "link", "p0", "name", "v5", "type", "vlan",
                  "id", "5", check=False).returncode == 0
    finally:
        sh("ip", "netns", "delete", ns, check=False)
        lab.made_ns.remove(ns)


def test_vlan_attachment(rt: Runtime, lab: Lab):
    # The parent: the host end of a veth whose other end is in a "switch"
    # namespace (this kernel kind may lack the dummy driver).
    parent, switch = f"sdtp{lab.tag}", f"sdts{lab.tag}"
    lab.add_ns(switch)
    lab.link("add", parent, "type", "veth", "peer", "name", "eth0", "netns", switch)
    lab.made_links.append(parent)
    lab.link("set", parent, "addrgenmode", "none")
    lab.link("set", parent, "up")
    sh("ip", "-n", switch, "link", "set", "eth0", "up")
    si = rt.new()
    net = rt.server(0, attachment={"parent": parent, "vlan": 100},
                    address=f"fd84:{lab.octet}::10/64")
    sid = net.server_id

    if not _kernel_has_vlans(lab):
        # This machine kind's kernel has no 802.1Q support: the refusal is
        # clear and teardown leaves nothing behind.
        with pytest.raises(BackendFailure, match="8021q"):
            si.setup(net)
        si.teardown(sid)
        assert not netns.exists(sid) and not rt.our_pids()
        components.used("VLAN attachment (refused: kernel without 8021q)")
        return

    d = si.setup(net)
    assert d["host_ifname"] == "" and d["address"] == f"fd84:{lab.octet}::10"
    link = sh("ip", "-n", d["netns"], "-d", "-o", "link", "show", "dev", "eth0").stdout
    assert "vlan" in link and "id 100" in link
    assert global6(d["netns"]) == [f"fd84:{lab.octet}::10/64"]
    # A client on VLAN 100 of the switch side reaches the server.
    sh("ip", "-n", switch, "link", "add", "link", "eth0", "name", "v100", "type", "vlan",
       "id", "100")
    sh("ip", "-n", switch, "addr", "add", f"fd84:{lab.octet}::20/64", "dev", "v100", "nodad")
    sh("ip", "-n", switch, "link", "set", "v100", "up")
    res = lab.nfs_ls(switch, d["address"], "/")
    assert res.returncode == 0, res.stdout + res.stderr
    si.teardown(sid)
    assert not netns.exists(sid) and not rt.our_pids()
    components.used("VLAN attachment")


@pytest.mark.parametrize("bad", ["", "ABCDEF0123456789abcdef0123456789", "0" * 31, "0" * 33,
                                 "../../../../etc/passwd", "0" * 30 + "/x", None, 42])
def test_bad_server_ids_are_refused(rt: Runtime, bad):
    si = rt.new()
    for call in (netns.check_server_id, netns.netns_name, netns.netns_path,
                 netns.host_ifname, netns.exists, netns.destroy, si.teardown, si.running):
        with pytest.raises(InvalidArgument):
            call(bad)
    with pytest.raises(InvalidArgument):
        si.setup(NetworkInfo(bad, {"bridge": rt.lab.bridge}, "10.84.0.10/24"))
    with pytest.raises(InvalidArgument):
        netns.create(bad, {"bridge": rt.lab.bridge}, "10.84.0.10/24")


def test_bad_names_and_networks_are_refused(rt: Runtime):
    for name in ("", "a" * 16, "a/b", "a b", "a\tb", ".", "..", "a:1", None, 3):
        with pytest.raises(InvalidArgument):
            netns.valid_ifname(name)
    assert netns.valid_ifname("a" * 15) == "a" * 15
    with pytest.raises(InvalidArgument, match="no network interface"):
        netns.check_bridge(f"sdtx{rt.lab.tag}")
    with pytest.raises(InvalidArgument, match="not a Linux bridge"):
        netns.check_bridge(rt.lab.client_port)
    netns.check_bridge(rt.lab.bridge)
    with pytest.raises(InvalidArgument):
        netns.check_parent(f"sdtx{rt.lab.tag}")
    netns.check_parent(rt.lab.client_port)

    si = rt.new()
    bridge: Dict[str, Any] = {"bridge": rt.lab.bridge}
    bad: List[Tuple[Dict[str, Any], str, str]] = [
        ({"bridge": "no/such"}, "10.84.0.10/24", ""),
        ({"bridge": f"sdtx{rt.lab.tag}"}, "10.84.0.10/24", ""),
        ({"bridge": rt.lab.bridge, "vlan": 3}, "10.84.0.10/24", ""),
        ({"parent": rt.lab.client_port, "vlan": 0}, "10.84.0.10/24", ""),
        ({"parent": rt.lab.client_port, "vlan": True}, "10.84.0.10/24", ""),
        ({"parent": rt.lab.client_port, "vlan": 4095}, "10.84.0.10/24", ""),
        ({}, "10.84.0.10/24", ""),
        (bridge, "10.84.0.10", ""),                    # no prefix length
        (bridge, "10.84.0.0/24", ""),                  # the network address
        (bridge, "10.84.0.255/24", ""),                # broadcast
        (bridge, "127.0.0.2/8", ""),
        (bridge, "fe80::1/64", ""),
        (bridge, "not-an-address/24", ""),
        (bridge, "10.84.0.10/24", "fd84::1"),          # gateway of another family
        (bridge, "10.84.0.10/24", "10.84.0.10"),       # itself
        (bridge, "10.84.0.10/24", "gw; rm -rf /"),
    ]
    for attachment, address, gateway in bad:
        net = rt.server(0, attachment=attachment, address=address)
        net = NetworkInfo(net.server_id, attachment, address, gateway)
        with pytest.raises(InvalidArgument):
            si.setup(net)
        assert not netns.exists(net.server_id)
        assert not os.path.exists(os.path.join(rt.base, net.server_id))
    with pytest.raises(InvalidArgument):
        si.setup(NetworkInfo(uuid.uuid4().hex, bridge, "10.84.0.10/24", mtu=40))
    with pytest.raises(InvalidArgument):
        si.setup({"server_id": uuid.uuid4().hex})      # type: ignore[arg-type]


def test_runtime_configuration_is_checked(tmp_path):
    for base in ("relative/dir", "/tmp/with space", '/tmp/quote"d', "/tmp/$HOME", ""):
        with pytest.raises(ConfigError):
            ServiceInstances(base, "/run/sharedd/servers", mode="child")
    with pytest.raises(ConfigError):
        ServiceInstances(str(tmp_path), str(tmp_path), mode="bogus")
    with pytest.raises(ConfigError, match=SYSTEMD_RUN_DIR):
        ServiceInstances(str(tmp_path), str(tmp_path / "run"), mode="systemd")
    # auto: child here (no systemd as PID 1, or a run dir the units cannot find)
    si = ServiceInstances(str(tmp_path), str(tmp_path / "run"), mode="auto")
    assert si.mode == "child"
    si.close()


def test_systemd_units_verify_and_match_the_environment_file(rt: Runtime, tmp_path):
    """The template units load (systemd-analyze verify) and read exactly the
    variables ServiceInstances writes to their EnvironmentFile."""
    units = {kind: open(os.path.join(REPO, "systemd", f"sharedd-server-{kind}@.service")).read()
             for kind in ("bus", "nfs", "smb")}
    sid = "0123456789abcdef0123456789abcdef"
    for kind, text in units.items():
        (tmp_path / f"sharedd-server-{kind}@.service").write_text(text)
        assert f"EnvironmentFile={SYSTEMD_RUN_DIR}/%i/env" in text
    res = sh("systemd-analyze", "verify", "--man=no",
             *[str(tmp_path / f"sharedd-server-{k}@{sid}.service") for k in units],
             check=False, timeout=120)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    nfs, smb = units["nfs"], units["smb"]
    assert "BindsTo=sharedd-server-bus@%i.service" in nfs
    # smbd: the server's mount namespace through nsenter; the whole cgroup
    # (samba-dcerpcd, rpcd_*) stops with the unit.
    assert "--mount=${SHAREDD_MOUNT_NS}" in smb and "-s ${SHAREDD_SMB_CONF}" in smb
    assert "KillMode=control-group" in smb
    for unit in (nfs, smb):
        assert "NetworkNamespacePath=/run/netns/sharedd-%i" in unit
        assert "PrivateMounts=no" in unit
        for forbidden in ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=",
                          "ReadWritePaths=", "ProtectKernel", "ProtectControlGroups=",
                          "ProtectProc=", "PrivateIPC=", "PrivateNetwork="):
            assert not any(line.startswith(forbidden) for line in unit.splitlines()), forbidden
    install = open(os.path.join(REPO, "packaging", "debian", "sharedd.install")).read()
    assert all(f"systemd/sharedd-server-{k}@.service lib/systemd/system" in install
               for k in units)

    si = rt.new()
    net = rt.server(21, protocols=("NFS", "CIFS"))
    si.setup(net)
    with open(os.path.join(rt.run, net.server_id, "env")) as f:
        env = dict(line.split("=", 1) for line in f.read().splitlines())
    used = {word[2:-1] for text in units.values() for word in
            re.findall(r"\$\{[A-Z_]+\}", text)}
    assert used <= set(env), used - set(env)
    assert env["DBUS_SYSTEM_BUS_ADDRESS"] == f"unix:path={rt.run}/{net.server_id}/bus"
    assert all(os.path.exists(env[k]) for k in ("SHAREDD_BUS_CONF", "SHAREDD_GANESHA_CONF",
                                                "SHAREDD_SMB_CONF", "SHAREDD_MOUNT_NS"))
    components.used("systemd-analyze verify (share server units)")


# ------------------------------------------------------------------ CIFS
def smb_pid(rt: Runtime, sid: str) -> int:
    with open(os.path.join(rt.run, sid, "smb.pid")) as f:
        return int(f.read().split()[0])


def smb_listening(d: dict) -> bool:
    out = sh("ip", "netns", "exec", d["netns"], "ss", "-Hltn", "sport", "=", ":445").stdout
    return f"{d['address']}:445" in out


def in_ns(d: dict, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("nsenter", f"--mount={d['mount_ns']}", "--", *argv, check=check)


def samba_processes(rt: Runtime, sid: str) -> List[str]:
    """Names of the server's smbd, samba-dcerpcd and rpcd_* (by their config path)."""
    conf = os.path.join(rt.base, sid, "smb.conf")
    return [cmd.split()[0] for cmd in rt.our_pids().values() if conf in cmd]


def smb_client_conf(rt: Runtime) -> str:
    d = os.path.join(rt.tmp, "smbclient")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "smb.conf")
    with open(conf, "w") as f:
        f.write("[global]\n  client min protocol = SMB2\n" + "".join(
            f"  {k} = {d}\n" for k in ("lock directory", "state directory", "cache directory",
                                       "private dir", "ncalrpc dir", "pid directory")))
    return conf


def list_shares(rt: Runtime, d: dict) -> subprocess.CompletedProcess:
    """An anonymous share list from the lab's client (srvsvc: smbd starts samba-dcerpcd)."""
    return sh("ip", "netns", "exec", rt.lab.client_ns, "smbclient", "-s", smb_client_conf(rt),
              "-N", "-L", f"//{d['address']}", check=False)


def test_cifs_server_has_its_own_smbd_registry_and_mount_namespace(rt: Runtime):
    # Mounts made on the host after the server exist reach its smbd from a
    # shared mount (as every mount under systemd); / is private here.
    shared = os.path.join(rt.tmp, "shared")
    private = os.path.join(rt.tmp, "private")
    for d_ in (shared, private):
        os.makedirs(d_)
    sh("mount", "--bind", shared, shared)
    sh("mount", "--make-shared", shared)
    host_registry = os.path.exists("/var/lib/samba/registry.tdb")

    si = rt.new()
    net = rt.server(30, protocols=("NFS", "CIFS"))
    sid = net.server_id
    d = si.setup(net)
    components.used("CIFS share servers (smbd in a private mount namespace)")
    assert d["protocols"] == ["NFS", "CIFS"]
    assert d["samba_conf"] == os.path.join(rt.base, sid, "smb.conf")
    assert d["mount_ns"] == os.path.join(rt.run, sid, "ns", "mnt")
    assert d["bus_address"] == f"unix:path={rt.run}/{sid}/bus"
    # The namespace lives in a file (an nsfs bind mount), not in a process.
    mine = {w[4]: w[w.index("-", 6) + 1] for w in mountinfo()}
    assert mine[d["mount_ns"]] == "nsfs" and os.path.dirname(d["mount_ns"]) in mine
    assert si.running(sid) and smb_listening(d)
    pid = smb_pid(rt, sid)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(d["netns_path"]).st_ino
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(d["mount_ns"]).st_ino
    assert pids(rt, sid)["nfs"] and ganesha_count(rt, sid) == 1   # NFS beside it
    conf = open(d["samba_conf"]).read()
    for line in (f"interfaces = {d['address']}", "bind interfaces only = yes",
                 "disable netbios = yes", "include = registry", "passdb backend = tdbsam"):
        assert line in conf, line

    # Samba's directories are the server's own inside; the host's are untouched.
    inside = {w[4]: w[3] for w in (line.split() for line in
                                   in_ns(d, "cat", "/proc/self/mountinfo").stdout.splitlines())}
    for name, target in (("lib", "/var/lib/samba"), ("cache", "/var/cache/samba"),
                         ("run", "/run/samba"), ("log", "/var/log/samba")):
        assert inside[target].endswith(f"/{sid}/samba/{name}"), (target, inside.get(target))
    os.makedirs(os.path.join(shared, "late"))
    sh("mount", "-t", "tmpfs", "late", os.path.join(shared, "late"))
    with open(os.path.join(shared, "late", "late.txt"), "w") as f:
        f.write("late")
    in_ns(d, "net", "-s", d["samba_conf"], "conf", "addshare", "late",
          os.path.join(shared, "late"), "writeable=n", "guest_ok=y")
    assert os.path.exists(os.path.join(rt.base, sid, "samba", "lib", "registry.tdb"))
    assert os.path.exists("/var/lib/samba/registry.tdb") == host_registry
    assert "late" in in_ns(d, "net", "-s", d["samba_conf"], "conf", "listshares").stdout
    res = list_shares(rt, d)
    assert res.returncode == 0 and "late" in res.stdout, res.stdout + res.stderr

    # The Samba helper for this server runs its commands in the namespace.
    from types import SimpleNamespace
    from sharedd.helpers.samba import SambaHelper
    base_helper = SambaHelper(SimpleNamespace(share_export_ip="192.0.2.1"),
                              os.path.join(rt.tmp, "samba-state"))
    helper = base_helper.for_server(sid, d)
    assert helper.export_ip == d["address"] and helper.conf_file == d["samba_conf"]
    assert helper.prefix == ["nsenter", f"--mount={d['mount_ns']}", "--"]
    assert helper.state_dir == os.path.join(rt.tmp, "samba-state", "servers", sid)
    helper.setup()
    assert "late" in helper._net("listshares").stdout.decode() and os.path.isdir(helper.state_dir)
    # A share mounted later under the shared mount is seen by smbd; one
    # mounted where mounts do not propagate is refused by name.
    helper._check_visible(os.path.join(shared, "late"))
    os.makedirs(os.path.join(private, "hidden"))
    sh("mount", "-t", "tmpfs", "hidden", os.path.join(private, "hidden"))
    with pytest.raises(BackendFailure, match="propagate"):
        helper._check_visible(os.path.join(private, "hidden"))
    helper.forget()
    assert not os.path.exists(helper.state_dir)
    with pytest.raises(BackendFailure, match="samba_conf"):
        base_helper.for_server(sid, {"address": d["address"]})

    # A restarted runtime adopts the running smbd (and its namespace).
    si.close()
    si2 = rt.new()
    assert si2.running(sid)
    assert si2.setup(net) == d and smb_pid(rt, sid) == pid

    # A killed smbd comes back in the same namespaces, with the registry's shares.
    wait_for("samba-dcerpcd", lambda: "/usr/libexec/samba/samba-dcerpcd"
             in samba_processes(rt, sid))
    os.kill(pid, signal.SIGKILL)
    assert rt.restarted.wait(WAIT), "on_restart was not called"
    assert rt.restarts == [sid]
    new = smb_pid(rt, sid)
    assert new != pid and os.stat(f"/proc/{new}/ns/mnt").st_ino == os.stat(d["mount_ns"]).st_ino
    wait_for("smbd listening again", lambda: smb_listening(d))
    wait_for("the killed smbd to be reaped", lambda: pid_gone(pid))
    res = list_shares(rt, d)
    assert res.returncode == 0 and "late" in res.stdout, res.stdout + res.stderr
    assert pids(rt, sid)["nfs"] and ganesha_count(rt, sid) == 1

    # Teardown: no smbd, samba-dcerpcd, rpcd_* nor anything in the namespace;
    # the namespace file and its directory unmounted; no file left.
    assert samba_processes(rt, sid)
    si2.teardown(sid)
    assert not samba_processes(rt, sid) and not in_mount_ns_of(sid) and not rt.our_pids()
    assert not [m for m in mounts_under(rt.tmp) if sid in m]
    assert not os.path.exists(os.path.join(rt.base, sid))
    assert not os.path.exists(os.path.join(rt.run, sid))
    assert sid not in si2.leftovers()
    assert os.path.exists("/var/lib/samba/registry.tdb") == host_registry


def test_cifs_only_server_and_protocol_changes(rt: Runtime):
    si = rt.new()
    net = rt.server(31, protocols=("CIFS",))
    sid = net.server_id
    d = si.setup(net)
    # No bus and no ganesha for a server that serves CIFS only.
    assert "bus_address" not in d and d["protocols"] == ["CIFS"]
    assert ganesha_count(rt, sid) == 0 and smb_listening(d)
    assert not os.path.exists(os.path.join(rt.run, sid, "nfs.pid"))
    assert si.running(sid)

    # The namespace file lost behind sharedd's back: ensure makes a new
    # namespace and moves smbd into it (the old one is out of reach).
    old = smb_pid(rt, sid)
    sh("umount", d["mount_ns"])
    si.ensure(net)
    new = smb_pid(rt, sid)
    assert new != old and os.stat(f"/proc/{new}/ns/mnt").st_ino == os.stat(d["mount_ns"]).st_ino
    wait_for("the old smbd gone", lambda: pid_gone(old))
    assert smb_listening(d)

    # NFS added: ganesha starts beside smbd; CIFS dropped: smbd, its
    # namespace and its config go.
    both = NetworkInfo(sid, net.attachment, net.address, protocols=("CIFS", "NFS"))
    assert si.ensure(both) is True                 # a new ganesha: exports to add
    d2 = si.setup(both)
    assert "bus_address" in d2 and ganesha_count(rt, sid) == 1 and smb_pid(rt, sid) == new
    nfs_only = NetworkInfo(sid, net.attachment, net.address)
    d3 = si.setup(nfs_only)
    assert "mount_ns" not in d3 and ganesha_count(rt, sid) == 1
    wait_for("smbd stopped", lambda: pid_gone(new))
    assert not samba_processes(rt, sid) and not in_mount_ns_of(sid)
    assert not [m for m in mounts_under(rt.tmp) if sid in m]
    assert not os.path.exists(os.path.join(rt.base, sid, "smb.conf"))
    assert si.running(sid)
    si.teardown(sid)
    assert not rt.our_pids() and not os.path.exists(os.path.join(rt.base, sid))

    with pytest.raises(InvalidArgument):
        si.setup(NetworkInfo(uuid.uuid4().hex, net.attachment, net.address,
                             protocols=("GLUSTERFS",)))
    with pytest.raises(InvalidArgument):
        si.setup(NetworkInfo(uuid.uuid4().hex, net.attachment, net.address, protocols=()))


# ------------------------------------------------------------------ systemd mode
# Run inside a booted container (real systemd as PID 1): the template units
# installed from systemd/, ServiceInstances in "auto" mode (which must pick
# systemd), a bridge and a client namespace of the container's own network.
SYSTEMD_SCRIPT = r'''
import json, os, signal, subprocess, sys, threading, time
sys.path.insert(0, "/mnt/src")
from sharedd import netns
from sharedd.service_instance import NetworkInfo, ServiceInstances

def sh(*argv, check=True):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise SystemExit(f"{argv}: {p.stderr}")
    return p.stdout.strip()

def prop(unit, name):
    return sh("systemctl", "show", "-P", name, unit)

def wait(cond, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True

sh("ip", "link", "add", "br0", "type", "bridge")
sh("ip", "link", "set", "br0", "up")
sh("ip", "netns", "add", "client")
sh("ip", "link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns", "client")
sh("ip", "link", "set", "vc0", "master", "br0", "up")
sh("ip", "-n", "client", "addr", "add", "10.85.0.20/24", "dev", "eth0")
sh("ip", "-n", "client", "link", "set", "eth0", "up")

restarted = threading.Event()
def on_restart(sid):
    restarted.set()
def runtime():
    return ServiceInstances("/var/lib/sharedd/servers", "/run/sharedd/servers", mode="auto",
                            on_restart=on_restart)

out = {}
sid = "0123456789abcdef0123456789abcdef"
nfs_unit, bus_unit = f"sharedd-server-nfs@{sid}.service", f"sharedd-server-bus@{sid}.service"
net = NetworkInfo(sid, {"bridge": "br0"}, "10.85.0.10/24")
si = runtime()
out["mode"] = si.mode
d = si.setup(net)
out["active"] = [prop(u, "ActiveState") for u in (bus_unit, nfs_unit)]
pid = int(prop(nfs_unit, "MainPID"))
out["in_netns"] = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(d["netns_path"]).st_ino
out["host_mounts"] = os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino

# A file system mounted after ganesha started is exportable (no private
# mount namespace for the unit).
os.makedirs("/srv/late", exist_ok=True)
sh("mount", "-t", "tmpfs", "late", "/srv/late")
open("/srv/late/late.txt", "w").write("late")
open("/srv/late.conf", "w").write(
    'EXPORT { Export_Id = 5; Path = "/srv/late"; Pseudo = "/late"; Protocols = 4; '
    'Transports = TCP; SecType = sys; Squash = No_Root_Squash; Access_Type = None; '
    'FSAL { Name = VFS; } CLIENT { Clients = 10.85.0.20; Access_Type = RW; Protocols = 4; } }\n')
def add_export():
    return subprocess.run(["busctl", f"--address={d['bus_address']}", "call", "org.ganesha.nfsd",
                           "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                           "AddExport", "ss", "/srv/late.conf", "EXPORT(Export_Id=5)"],
                          capture_output=True, text=True, timeout=60)
def ls():
    return subprocess.run(["ip", "netns", "exec", "client", "nfs-ls",
                           "nfs://10.85.0.10/late?version=4"],
                          capture_output=True, text=True, timeout=60)
out["add_export"] = add_export().returncode
out["nfs_ls"] = ls().stdout

# systemd restarts a killed ganesha; sharedd notices and reports it.
os.kill(pid, signal.SIGKILL)
out["on_restart"] = restarted.wait(60)
pid2 = int(prop(nfs_unit, "MainPID"))
out["new_pid"] = pid2 not in (0, pid)

# sharedd restarts: the running units are adopted, nothing is restarted.
si.close()
si = runtime()
out["ensure_adopted"] = si.ensure(net)
out["same_pid"] = int(prop(nfs_unit, "MainPID")) == pid2

# ganesha restarted by systemd while sharedd was away: ensure says so.
si.close()
os.kill(pid2, signal.SIGKILL)
wait(lambda: int(prop(nfs_unit, "MainPID") or 0) not in (0, pid2)
     and prop(nfs_unit, "ActiveState") == "active")
time.sleep(0.5)
si = runtime()
out["ensure_after_restart"] = si.ensure(net)
out["add_export_again"] = add_export().returncode

si.teardown(sid)
out["after_teardown"] = [prop(u, "ActiveState") for u in (bus_unit, nfs_unit)]
out["netns_left"] = netns.exists(sid)
out["leftovers"] = sorted(si.leftovers())
si.close()
sh("umount", "/srv/late")
print("RESULT " + json.dumps(out))
'''


def test_systemd_mode_under_a_real_systemd(nspawn_base):
    with nspawn.boot(nspawn_base, bind_ro={REPO: "/mnt/src"}) as ct:
        for kind in ("bus", "nfs", "smb"):
            ct.run("cp", f"/mnt/src/systemd/sharedd-server-{kind}@.service",
                   "/etc/systemd/system/")
        ct.run("systemctl", "daemon-reload")
        ct.write("/root/systemd_mode.py", SYSTEMD_SCRIPT)
        proc = ct.run("python3", "/root/systemd_mode.py", check=False, timeout=600)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and line, (
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
            + ct.journal("sharedd-server-nfs@0123456789abcdef0123456789abcdef.service"))
    out = json.loads(line[0][len("RESULT "):])
    assert out["mode"] == "systemd"
    assert out["active"] == ["active", "active"]
    assert out["in_netns"] and out["host_mounts"]
    assert out["add_export"] == 0 and "late.txt" in out["nfs_ls"], out
    assert out["on_restart"] and out["new_pid"], out
    assert out["ensure_adopted"] is False and out["same_pid"], out
    assert out["ensure_after_restart"] is True and out["add_export_again"] == 0, out
    assert out["after_teardown"] == ["inactive", "inactive"], out
    assert out["netns_left"] is False and out["leftovers"] == [], out
    components.used("share server units under systemd (nspawn)")
