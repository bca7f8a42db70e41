"""A share network on a VLAN, end to end: the real daemon makes a share
server whose interface is an 802.1Q sub-interface of a trunk, and a tenant's
client on that VLAN mounts the share with the kernel NFS client.

This machine's kernel has no 802.1Q support (no 8021q module), so here a VLAN
attachment can only be refused (tests/test_service_instance.py checks that
refusal). The qemu guest's Debian kernel has it: the whole test runs there
(tests/fixtures/qemu_guest.py), sharedd from the 9p repo share, on a private
dbus-daemon, driven with busctl the way an administrator would. The guest has
no NIC: every packet stays between namespaces the script makes.

Inside the guest:

- the trunk: a veth pair, one end in the guest's root namespace (the share
  network's ``parent``, sharedd's side), the other in a "switch" namespace
  where a Linux bridge without VLAN filtering carries tagged frames as they
  are to four client namespaces, each on a veth port of its own:
  ``ok`` (VLAN 100, 10.96.0.51: gets the access rule), ``norule`` (VLAN 100,
  10.96.0.52: no rule), ``vlan200`` (VLAN 200, 10.96.0.51: the rule's own
  address on another VLAN) and ``untagged`` (no VLAN, 10.96.0.51). A
  client's VLAN interface is a sub-interface of its veth end.
- sharedd: one backend with driver_handles_share_servers = true (btrfs on a
  loop image, nfs_helper = ganesha, share_server_launcher = child).

Checked: CreateShareNetwork(parent, vlan=100, subnet, allocation_range) and
CreateShare(share_network) make a server at the range's first address whose
namespace ``sharedd-<id>`` holds eth0, ``vlan protocol 802.1Q id 100`` on the
parent, carrying that address; nothing of the server is left in the root
namespace (no VLAN interface, no host veth), while VLAN 100 on the parent is
taken (a second VLAN 100 on it is refused); the server's ganesha runs in the
server's namespace. With AllowAccess(ip 10.96.0.51, rw) the VLAN 100 client
mounts the reported export location, writes a file (found in the share on
the storage side), mounts again and reads it back; the VLAN 100 client
without a rule reaches the server's port but its mount is refused; the
VLAN 200 and untagged clients, at the rule's very address, cannot even
reach the server (no ARP answer: a TCP connect fails within seconds).
DenyAccess: the same client's next mount is refused. Delete of the share
tears the server down: namespace gone, no ganesha or bus of it left, no
VLAN interface of it anywhere (VLAN 100 can be made on the parent again),
its files gone.

The guest script is kept here rather than in tests/guest/: every file there
is part of the guest image's cache key.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Dict

from tests.support import components

NET = "10.96.0"
SERVER_ADDR = f"{NET}.10"

GUEST_SCRIPT = r'''#!/usr/bin/python3
"""Runs inside the guest: a VLAN share network served by sharedd's share
server (see tests/test_share_servers_vlan.py)."""
import json, os, pathlib, re, shutil, signal, socket, subprocess, sys, time
sys.path.insert(0, "/mnt/repo")
from tests.support.guestlib import run_main, sh


def _alarm(signum, frame):
    raise TimeoutError("the guest script ran out of time (signal.alarm)")


# Well inside the host's timeout: fail with diagnostics, don't hang.
signal.signal(signal.SIGALRM, _alarm)
signal.alarm(780)

TAG = "@TAG@"
NET = "@NET@"
VLAN, OTHER_VLAN = 100, 200
WORK = f"/var/tmp/sdv-{TAG}"
PARENT = f"sdvp{TAG}"              # the storage host's trunk port
SWITCH = f"sdv-sw-{TAG}"           # the trunk's far end and the bridge
CLIENTS = {                        # key -> (namespace, VLAN or 0, address)
    "ok": (f"sdv-ok-{TAG}", VLAN, f"{NET}.51"),
    "norule": (f"sdv-no-{TAG}", VLAN, f"{NET}.52"),
    "vlan200": (f"sdv-200-{TAG}", OTHER_VLAN, f"{NET}.51"),
    "untagged": (f"sdv-un-{TAG}", 0, f"{NET}.51"),
}
BUS_NAME = "org.sharedd.Sharedd1"
ROOT = "/org/sharedd/Sharedd1"
MANAGER = "org.sharedd.Sharedd1.Manager"
SHARE = "org.sharedd.Sharedd1.Share"
NET_IFACE = "org.sharedd.Sharedd1.ShareNetwork"
SRV_IFACE = "org.sharedd.Sharedd1.ShareServer"
MOUNT_OPTS = "vers=4.1,proto=tcp,soft,timeo=50,retrans=2,retry=0"
CONTENT = f"written over VLAN {VLAN} by {TAG}\n"
T0 = time.monotonic()
STATE = {"bus": "", "bus_pid": 0, "daemon": None, "sid": "", "mounted": []}


def say(key, value):
    print(f"RESULT {key}=" + json.dumps(value, sort_keys=True), flush=True)


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def ip(*args, check=True):
    return sh("ip", *args, check=check, timeout=30)


def wait_for(what, fn, timeout=120.0, step=0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


# --- the trunk, the switch and the clients ----------------------------------------
def make_lab():
    ip("netns", "add", SWITCH)
    ip("link", "add", PARENT, "type", "veth", "peer", "name", "uplink", "netns", SWITCH)
    ip("link", "set", PARENT, "addrgenmode", "none")      # no address of its own
    ip("link", "set", PARENT, "up")
    # No VLAN filtering: the bridge forwards tagged frames untouched, a trunk.
    ip("-n", SWITCH, "link", "add", "sw", "type", "bridge")
    ip("-n", SWITCH, "link", "set", "uplink", "master", "sw", "up")
    ip("-n", SWITCH, "link", "set", "sw", "up")
    for key, (ns, vlan, addr) in CLIENTS.items():
        ip("netns", "add", ns)
        port = "p" + key[:8]
        ip("-n", SWITCH, "link", "add", port, "type", "veth", "peer", "name", "wire",
           "netns", ns)
        ip("-n", SWITCH, "link", "set", port, "master", "sw", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "wire", "up")
        dev = "wire"
        if vlan:
            ip("-n", ns, "link", "add", "link", "wire", "name", "eth0", "type", "vlan", "id",
               str(vlan))
            dev = "eth0"
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")


def remove_lab():
    for ns, _, _ in CLIENTS.values():
        ip("netns", "delete", ns, check=False)
    ip("netns", "delete", SWITCH, check=False)
    ip("link", "delete", PARENT, check=False)


# --- the private bus and the daemon ----------------------------------------------
def start_bus():
    """A system-type bus like tests/fixtures/bus.py's: Debian's system.conf
    on a socket of ours, with the project's policy files."""
    d = f"{WORK}/bus"
    os.makedirs(f"{d}/system.d")
    conf = pathlib.Path("/usr/share/dbus-1/system.conf").read_text()
    conf = re.sub(r"<listen>.*?</listen>", f"<listen>unix:path={d}/socket</listen>", conf)
    for tag in ("user", "pidfile", "servicehelper"):
        conf = re.sub(rf"<{tag}>.*?</{tag}>", "", conf)
    conf = conf.replace("<syslog/>", "")
    for policy in pathlib.Path("/mnt/repo/dbus").glob("*.conf"):
        shutil.copy(policy, f"{d}/system.d")
    conf = re.sub(r"<includedir>system.d</includedir>",
                  f"<includedir>{d}/system.d</includedir>", conf)
    conf = re.sub(r"<includedir>/etc/dbus-1/system.d</includedir>", "", conf)
    conf = re.sub(r"<include[^>]*>[^<]*system-local.conf</include>", "", conf)
    pathlib.Path(f"{d}/bus.conf").write_text(conf)
    out = sh("dbus-daemon", f"--config-file={d}/bus.conf", "--fork", "--print-address=1",
             "--print-pid=1").stdout.split()
    STATE["bus_pid"] = int(out[1])
    return out[0]


CONFIG = """
[DEFAULT]
enabled_share_backends = vlan
state_path = {work}/state
spool_dir = {work}/spool
host_id = guest-{tag}
share_server_launcher = child
share_server_run_dir = {work}/run

[vlan]
share_driver = btrfs
nfs_helper = ganesha
driver_handles_share_servers = true
btrfs_pool_path = {work}/pool
btrfs_pool_image = {work}/pool.img
btrfs_pool_image_size_gib = 1
"""


def start_daemon(bus):
    conf = f"{WORK}/sharedd.conf"
    pathlib.Path(conf).write_text(CONFIG.format(work=WORK, tag=TAG))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{WORK}/notify")
    notify.settimeout(1.0)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "DBUS_SYSTEM_BUS_ADDRESS": bus, "NOTIFY_SOCKET": f"{WORK}/notify",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    out = open(f"{WORK}/sharedd.log", "ab")
    STATE["daemon"] = proc = subprocess.Popen(
        ["/usr/bin/python3", "-m", "sharedd", "--config", conf, "--log-level", "debug"],
        cwd="/mnt/repo", env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if b"READY=1" in notify.recv(4096):
                notify.close()
                return
        except socket.timeout:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"sharedd exited with {proc.returncode}")
    raise RuntimeError("no READY=1 from sharedd within 240 s")


def stop_daemon():
    proc = STATE["daemon"]
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if STATE["bus_pid"]:
        try:
            os.kill(STATE["bus_pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def busctl(*args, timeout=300):
    p = sh("busctl", f"--address={STATE['bus']}", "--no-pager", "--json=short",
           f"--timeout={timeout}", *map(str, args), check=False, timeout=timeout + 30)
    if p.returncode:
        raise RuntimeError(f"busctl {' '.join(map(str, args[:5]))}: {p.stderr.strip()}")
    return json.loads(p.stdout)["data"] if p.stdout.strip() else None


def call(path, iface, member, sig="", *args):
    data = busctl("call", BUS_NAME, path, iface, member, *([sig, *args] if sig else []))
    return data[0] if isinstance(data, list) and len(data) == 1 else data


def prop(path, iface, name):
    return busctl("get-property", BUS_NAME, path, iface, name)


def object_paths(kind):
    objs = call(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return sorted(p for p in objs if f"/{kind}/" in p)


# --- probes -----------------------------------------------------------------------
def root_vlans():
    """VLAN interfaces in the guest's root namespace (the storage host's)."""
    links = json.loads(ip("-j", "-d", "link", "show").stdout)
    return [l["ifname"] for l in links if l.get("linkinfo", {}).get("info_kind") == "vlan"]


def vlan_taken():
    """Whether VLAN 100 on the parent exists anywhere: the kernel allows one
    such device per parent, whatever namespace it is in (EEXIST)."""
    name = f"sdvq{TAG}"
    p = ip("link", "add", "link", PARENT, "name", name, "type", "vlan", "id", str(VLAN),
           check=False)
    if p.returncode == 0:
        ip("link", "delete", name)
        return {"taken": False}
    return {"taken": "exists" in p.stderr, "err": p.stderr.strip()}


def server_procs(sid):
    """(pid, comm) of every process whose command line names the server."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if sid in cmd and comm not in ("busctl", "ip", "nsenter", "ss"):
            out.append([int(d), comm])
    return sorted(out)


def reach(ns, addr, port=2049, timeout=3.0):
    """A TCP connect from the client's namespace: "ok" or why not."""
    code = ("import socket,sys\n"
            "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
            "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
            "except OSError as e:\n print(type(e).__name__ + ': ' + str(e))\n")
    p = sh("nsenter", f"--net=/run/netns/{ns}", "--", "/usr/bin/python3", "-c", code, addr,
           str(port), str(timeout), check=False, timeout=30)
    return (p.stdout.strip() or p.stderr.strip())[-200:]


def neighbour(ns, addr):
    p = ip("-n", ns, "neigh", "show", addr, check=False)
    return p.stdout.strip()


def mount(ns, export, target):
    """The kernel NFS client in the client's namespace: nsenter --net keeps
    the guest's mount namespace, the superblock's network is the client's."""
    os.makedirs(target, exist_ok=True)
    t = time.monotonic()
    p = sh("timeout", "-k", "5", "90", "nsenter", f"--net=/run/netns/{ns}", "--",
           "mount", "-t", "nfs4", "-o", MOUNT_OPTS, export, target, check=False, timeout=120)
    if p.returncode == 0:
        STATE["mounted"].append(target)
    return {"rc": p.returncode, "err": p.stderr.strip()[-300:],
            "seconds": round(time.monotonic() - t, 1)}


def umount(target):
    sh("timeout", "60", "umount", target, check=False, timeout=90)
    if target in STATE["mounted"] and not os.path.ismount(target):
        STATE["mounted"].remove(target)


def storage_path(share_id):
    """Where the btrfs driver mounted the share on the storage side."""
    out = sh("findmnt", "-rn", "-t", "btrfs", "-o", "TARGET").stdout.split()
    found = [t for t in out if t.endswith("/" + share_id)]
    return found[0] if found else None


def timed(name, t):
    print(f"TIME {name} {int((time.monotonic() - t) * 1000)} ms", flush=True)


# --- the test ---------------------------------------------------------------------
def run():
    os.makedirs(WORK)
    say("kernel", os.uname().release)
    say("ganesha", sh("dpkg-query", "-W", "-f=${Version}", "nfs-ganesha", check=False).stdout)
    make_lab()
    say("parent_ifindex", int(pathlib.Path(f"/sys/class/net/{PARENT}/ifindex").read_text()))
    t = time.monotonic()
    STATE["bus"] = start_bus()
    start_daemon(STATE["bus"])
    timed("daemon_ready", t)
    log("sharedd ready")

    t = time.monotonic()
    net = call(ROOT, MANAGER, "CreateShareNetwork", "sa{sv}", f"vlan-{TAG}", 4,
               "parent", "s", PARENT, "vlan", "q", VLAN, "subnet", "s", f"{NET}.0/24",
               "allocation_range", "s", f"{NET}.10-{NET}.20")
    say("attachment", prop(net, NET_IFACE, "Attachment"))
    share = call(ROOT, MANAGER, "CreateShare", "ssta{sv}", f"vlan-share-{TAG}", "NFS", 1, 1,
                 "share_network", "o", net)
    wait_for("the share available", lambda: prop(share, SHARE, "Status") == "available")
    timed("create_share_with_server", t)
    log(f"share {share} available")
    share_id = prop(share, SHARE, "Id")
    server = prop(share, SHARE, "ShareServer")
    sid = STATE["sid"] = server.rsplit("/", 1)[1]
    exports = prop(share, SHARE, "ExportLocations")
    ns = f"sharedd-{sid}"
    say("share_id", share_id)
    say("server", {"sid": sid, "status": prop(server, SRV_IFACE, "Status"),
                   "addresses": prop(server, SRV_IFACE, "Addresses"),
                   "network": prop(server, SRV_IFACE, "ShareNetwork") == net})
    say("exports", exports)

    # The server's namespace and its one interface.
    say("server_link", ip("-n", ns, "-d", "link", "show", "dev", "eth0").stdout)
    say("server_addrs", ip("-n", ns, "-4", "-o", "addr", "show", "dev", "eth0").stdout)
    say("server_links", [l["ifname"] for l in
                         json.loads(ip("-n", ns, "-j", "link", "show").stdout)])
    say("root_vlans", root_vlans())
    say("root_host_veth", os.path.exists(f"/sys/class/net/sdh{sid[:12]}"))
    say("vlan_taken_while_serving", vlan_taken())
    ns_ino = os.stat(f"/run/netns/{ns}").st_ino
    procs = server_procs(sid)
    say("server_procs", procs)
    say("ganesha_in_server_netns",
        [os.stat(f"/proc/{pid}/ns/net").st_ino == ns_ino
         for pid, comm in procs if comm.startswith("ganesha")])
    say("server_listening", sh("nsenter", f"--net=/run/netns/{ns}", "--", "ss", "-Hltn",
                               check=False).stdout)

    # Who reaches the server at all (before any rule: reaching is layer 2 and 3).
    addr = prop(server, SRV_IFACE, "Addresses")[0]
    t = time.monotonic()
    say("reach", {key: reach(cns, addr) for key, (cns, _, _) in CLIENTS.items()})
    timed("reach_probes", t)
    for key in ("vlan200", "untagged"):
        say(f"neigh_{key}", neighbour(CLIENTS[key][0], addr))

    # The rule, then the kernel NFS client on VLAN 100.
    ok_ns, _, ok_addr = CLIENTS["ok"]
    rule = call(share, SHARE, "AllowAccess", "sssa{sv}", "ip", ok_addr, "rw", 0)
    wait_for("the rule active",
             lambda: any(r[0] == rule and r[4] == "active"
                         for r in prop(share, SHARE, "AccessRules")))
    say("rules", prop(share, SHARE, "AccessRules"))
    target = f"{WORK}/client"
    t = time.monotonic()
    attempts = []
    for _ in range(3):
        attempts.append(mount(ok_ns, exports[0], target))
        if attempts[-1]["rc"] == 0:
            break
        time.sleep(2)
    say("mount_ok_attempts", attempts)
    if attempts[-1]["rc"] != 0:
        raise RuntimeError("the VLAN 100 client with a rule could not mount")
    timed("mount_ok", t)
    say("client_mount", sh("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", target).stdout.strip())
    name = f"hello-{TAG}.txt"
    with open(f"{target}/{name}", "w") as f:
        f.write(CONTENT)
        f.flush()
        os.fsync(f.fileno())
    say("written_owner", os.stat(f"{target}/{name}").st_uid)
    umount(target)
    where = storage_path(share_id)
    say("storage_path", where)
    say("storage_content", open(f"{where}/{name}").read() if where else None)
    again = mount(ok_ns, exports[0], target)
    say("mount_again", again)
    if again["rc"] == 0:
        say("read_back", open(f"{target}/{name}").read())
        umount(target)

    # VLAN 100 without a rule: reaches the server, the mount is refused.
    no_ns = CLIENTS["norule"][0]
    say("mount_norule", mount(no_ns, exports[0], f"{WORK}/norule"))
    umount(f"{WORK}/norule")

    # DenyAccess: the client that had the rule is refused next time.
    call(share, SHARE, "DenyAccess", "sa{sv}", rule, 0)
    wait_for("the rule gone", lambda: not prop(share, SHARE, "AccessRules"))
    say("mount_after_deny", mount(ok_ns, exports[0], target))
    umount(target)

    # Delete: the share's server goes with its last share.
    t = time.monotonic()
    call(share, SHARE, "Delete", "a{sv}", 0)
    wait_for("the share gone", lambda: not call(ROOT, MANAGER, "ListShares", "a{sv}", 0))
    wait_for("the server gone", lambda: not object_paths("share_server"))
    wait_for("the namespace gone", lambda: not os.path.exists(f"/run/netns/{ns}"))
    timed("teardown", t)
    log("server torn down")
    say("after", {"netns": os.path.exists(f"/run/netns/{ns}"),
                  "procs": server_procs(sid),
                  "ganesha_anywhere": sh("pgrep", "-a", "ganesha",
                                         check=False).stdout.splitlines(),
                  "root_vlans": root_vlans(),
                  "vlan_taken": vlan_taken(),
                  "files": [p for p in (f"{WORK}/state/servers/{sid}", f"{WORK}/run/{sid}")
                            if os.path.exists(p)],
                  "servers": object_paths("share_server")})
    call(net, NET_IFACE, "Delete", "a{sv}", 0)
    say("networks_left", object_paths("share_network"))
    log("done")


def diagnostics():
    """On failure: the logs, then the interfaces (what the host's assertion
    message, the output's end, shows first)."""
    sid = STATE["sid"]
    print("--- diagnostics ---", flush=True)
    logs = {f"{WORK}/sharedd.log": 5000}
    if sid:
        logs.update({f"{WORK}/state/servers/{sid}/{n}": 2000
                     for n in ("bus.log", "ganesha.out", "ganesha.log")})
    for path, size in logs.items():
        try:
            text = open(path, errors="replace").read()
        except OSError as exc:
            text = str(exc)
        print(f"--- {path} (end) ---\n{text[-size:]}", flush=True)
    cmds = [["ps", "-eo", "pid,ppid,comm,args"], ["findmnt", "-rn", "-t", "btrfs,nfs4"],
            ["ip", "netns", "list"], ["ip", "-d", "link", "show"]]
    if sid:
        cmds += [["ip", "-d", "-n", f"sharedd-{sid}", "link", "show"],
                 ["ip", "-n", f"sharedd-{sid}", "addr", "show"]]
    for cmd in cmds:
        p = sh(*cmd, check=False)
        print(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}", flush=True)


def main():
    try:
        run()
    except BaseException:
        diagnostics()          # run_main prints the traceback after them
        raise
    finally:
        for target in list(STATE["mounted"]):
            sh("umount", "-f", "-l", target, check=False)
        stop_daemon()
        remove_lab()


run_main(main)
'''


def _results(output: str) -> Dict[str, Any]:
    return {m.group(1): json.loads(m.group(2))
            for m in re.finditer(r"^RESULT (\w+)=(.*)$", output, re.M)}


def test_vlan_share_server_in_guest(qemu_guest_image, capsys):
    from tests.fixtures.qemu_guest import run_in_guest

    tag = uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    res = run_in_guest(GUEST_SCRIPT.replace("@TAG@", tag).replace("@NET@", NET),
                       hostname=f"sdv-{tag}", image=qemu_guest_image, timeout=900)
    total = time.monotonic() - t0
    r = _results(res.output)
    d = res.describe()
    print(res.output)          # pytest shows it when the test fails
    with capsys.disabled():
        print(f"\n[vlan share server] boot {res.boot_seconds} s, cycle {res.seconds:.1f} s, "
              f"total {total:.1f} s, kernel {r.get('kernel')}, ganesha {r.get('ganesha')}; "
              "steps (ms): " + ", ".join(f"{k} {v}" for k, v in
                                         re.findall(r"^TIME (\w+) (\d+) ms$", res.output, re.M)))
        for key in ("server_link", "reach", "mount_ok_attempts", "mount_norule",
                    "mount_after_deny", "after"):
            if key in r:
                print(f"[vlan share server] {key} = {json.dumps(r[key])}")
    assert res.returncode == 0 and not res.timed_out, d
    sid = r["server"]["sid"]
    share_id = r["share_id"]

    # The network and its server: the range's first address, the export there.
    assert r["attachment"] == f"vlan:sdvp{tag}.100", d
    assert r["server"] == {"sid": sid, "status": "active", "addresses": [SERVER_ADDR],
                           "network": True}, d
    assert r["exports"] == [f"{SERVER_ADDR}:/shares/{share_id}"], d

    # eth0 in the server's namespace is VLAN 100 on the parent, with the address;
    # the namespace holds nothing else, and the root namespace nothing of it.
    assert re.search(r"\bvlan protocol 802\.1Q id 100\b", r["server_link"]), d
    assert f"eth0@if{r['parent_ifindex']}:" in r["server_link"], d     # on the parent
    assert f"inet {SERVER_ADDR}/24" in r["server_addrs"], d
    assert sorted(r["server_links"]) == ["eth0", "lo"], d
    assert r["root_vlans"] == [] and r["root_host_veth"] is False, d
    assert r["vlan_taken_while_serving"]["taken"] is True, d
    comms = sorted(c for _, c in r["server_procs"])
    assert any(c.startswith("ganesha") for c in comms) and "dbus-daemon" in comms, d
    assert r["ganesha_in_server_netns"] == [True], d
    assert re.search(r"(\*|0\.0\.0\.0|\[::\]|" + re.escape(SERVER_ADDR) + r"):2049\b",
                     r["server_listening"]), d

    # Layer 2: VLAN 100 reaches the server; VLAN 200 and untagged frames do
    # not, even from the address the rule will name.
    reach = r["reach"]
    assert reach["ok"] == "ok" and reach["norule"] == "ok", d
    for key in ("vlan200", "untagged"):
        assert reach[key] != "ok" and any(why in reach[key].lower() for why in (
            "no route to host", "unreachable", "timed out")), (key, d)
        assert "lladdr" not in r[f"neigh_{key}"], (key, d)

    # The VLAN 100 client with the rule: a kernel NFS mount, a write that
    # lands in the share, a read back through a fresh mount.
    assert r["mount_ok_attempts"][-1]["rc"] == 0, d
    assert r["client_mount"].split()[:2] == [r["exports"][0], "nfs4"], d
    assert r["written_owner"] == 65534, d                 # root_squash: root's file is nobody's
    assert r["storage_path"] and r["storage_path"].endswith("/" + share_id), d
    assert r["storage_content"] == f"written over VLAN 100 by {tag}\n", d
    assert r["mount_again"]["rc"] == 0 and r["read_back"] == r["storage_content"], d
    # The VLAN 100 client without a rule, and the first one after DenyAccess: refused.
    for key in ("mount_norule", "mount_after_deny"):
        assert r[key]["rc"] not in (0, 124, 137), (key, d)    # refused, not timed out

    # Teardown: nothing of the server left, VLAN 100 free on the parent again.
    after = r["after"]
    assert after["netns"] is False and after["procs"] == [], d
    assert after["ganesha_anywhere"] == [], d
    assert after["root_vlans"] == [] and after["vlan_taken"] == {"taken": False}, d
    assert after["files"] == [] and after["servers"] == [], d
    assert r["networks_left"] == [], d
    components.used("VLAN share server (802.1Q in the qemu guest)")
