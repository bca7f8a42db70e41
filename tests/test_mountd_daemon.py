"""The sharedd-mountd process on a real private system bus: readiness via
sd_notify, Mounts/Rescan over busctl, spool and Fired records, SIGHUP, SIGTERM.

No NFS or GlusterFS client works on this machine, so a matching share ends
in state 'failed' with mount(8)'s error: proof that the record reached the
mounter; real mounts are covered by the lead's GlusterFS/qemu tests."""

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

from sharedd import record as recordlib
from sharedd.constants import BUS_NAME, IFACE_HOOKS, MOUNTD_BUS_NAME, ROOT_PATH
from tests.support import components
from tests.fixtures.mountd_env import (CLIENT4, make_record, make_share, rule,
                                       write_record)

REPO = pathlib.Path(__file__).resolve().parent.parent
M = ["org.sharedd.Mountd1", "/org/sharedd/Mountd1", "org.sharedd.Mountd1"]


class Mountd:
    def __init__(self, tmp, bus=None, extra="", args=(), prefix=(), interval=3,
                 addresses=CLIENT4, env=None):
        self.interval, self.addresses = interval, addresses
        self.tmp = tmp
        self.spool = os.path.join(tmp, "spool")
        os.makedirs(self.spool, mode=0o755, exist_ok=True)
        self.conf = os.path.join(tmp, "mountd.conf")
        self.write_conf(extra)
        self.notify_path = os.path.join(tmp, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages = []
        self._drain = threading.Thread(target=self._read_notify, daemon=True)
        self.log_path = os.path.join(tmp, "mountd.log")
        env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=self.notify_path,
                   WATCHDOG_USEC="400000", **(env or {}))
        if bus is not None:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*prefix, "/usr/bin/python3", "-X", "faulthandler", "-m", "mountd", "--config", self.conf,
                                      *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), env=env)
        self._drain.start()
        components.used("sharedd-mountd daemon (python3 -m mountd)")

    def _read_notify(self):
        while True:
            try:
                data = self.notify.recv(4096)
            except OSError:
                return
            self.messages += data.decode().split("\n")

    def write_conf(self, extra=""):
        pathlib.Path(self.conf).write_text(
            f"[mountd]\nspool_dir = {self.spool}\nmount_dir = {self.tmp}/mnt\n"
            f"state_path = {self.tmp}/state\nconsume_interval = {self.interval}\n"
            f"expected_ip_addresses = {self.addresses}\nmount_timeout = 20\n{extra}")

    def wait_notify(self, needle, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if needle in m:
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} from sd_notify; got {self.messages}; log:\n{self.text()}")

    def text(self):
        return pathlib.Path(self.log_path).read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.shutdown(socket.SHUT_RDWR)
        self.notify.close()
        self.log.close()
        return self.proc.returncode


def mounts(bus):
    out = bus.busctl("--json=short", "get-property", *M, "Mounts").stdout
    return [tuple(row) for row in json.loads(out)["data"]]


def wait_mounts(bus, pred, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        rows = mounts(bus)
        if pred(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"Mounts never matched: {rows}")
        time.sleep(0.2)


async def _fire(address, records, own_name, to=None):
    """Fired signals, broadcast or sent to one destination (to)."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        if own_name:
            await bus.request_name(BUS_NAME)
        for rec in records:
            await bus.send(Message(message_type=MessageType.SIGNAL, destination=to,
                                   path=ROOT_PATH, interface=IFACE_HOOKS, member="Fired",
                                   signature="sss", body=[rec["phase"], rec["method"],
                                                          recordlib.dumps(rec).decode()]))
        # A round trip makes sure the signals left before we disconnect.
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="GetId"))
    finally:
        bus.disconnect()


def fire(bus, records, own_name, to=None):
    asyncio.run(_fire(bus.address, records, own_name, to))


def test_daemon_on_the_bus(mountd_bus, mountd_tmp, mountd_cert):
    cert, key, cn = mountd_cert
    d = Mountd(mountd_tmp, mountd_bus,
               extra=f"glusterfs_client_cert = {cert}\nglusterfs_client_key = {key}\n")
    try:
        d.wait_notify("READY=1")
        # READY=1 means the name is owned and the first pass ran.
        assert mounts(mountd_bus) == []
        d.wait_notify("STATUS=0 shares mounted")
        d.wait_notify("WATCHDOG=1")
        intro = mountd_bus.busctl("introspect", *M[:2]).stdout
        for member in ("Mounts", "Rescan", "Mounted", "Unmounted"):
            assert member in intro
        # A spool record granting this host rw on an NFS share.
        a = make_share(name="alpha", rules=[rule(CLIENT4, "rw")], export="127.0.0.1:/shares/alpha")
        write_record(d.spool, make_record(1, "post", "allow_access", share=a))
        rows = wait_mounts(mountd_bus, lambda r: len(r) == 1 and r[0][4] != "mounting")
        assert rows[0][:4] == (a["id"], f"{mountd_tmp}/mnt/alpha-{a['id'][:8]}",
                               "127.0.0.1:/shares/alpha", "rw")
        assert rows[0][4] == "failed"          # no NFS client here
        assert "mount.nfs4: No such device" in d.text() or "failed" in d.text()
        d.wait_notify("1 failing")
        # A GlusterFS share granted to our certificate's CN.
        g = make_share(name="vol74", protocol="GLUSTERFS", rules=[rule(cn, "ro", kind="cert")],
                       export="127.0.0.1:/vol74")
        write_record(d.spool, make_record(2, "post", "allow_access", share=g))
        mountd_bus.busctl("call", *M, "Rescan")
        rows = mounts(mountd_bus)
        assert (g["id"], "ro") in [(r[0], r[3]) for r in rows]

        # Fired from a connection that does not own org.sharedd.Sharedd1:
        # broadcast, the bus does not pass it on; sent to mountd by name
        # (300 times), ignored, in one log line.
        imp = make_share(name="impostor", rules=[rule(CLIENT4, "rw")], export="127.0.0.1:/imp")
        fire(mountd_bus, [make_record(3, "post", "allow_access", share=imp)], own_name=False)
        fire(mountd_bus, [make_record(3, "post", "allow_access", share=imp)] * 300,
             own_name=False, to=MOUNTD_BUS_NAME)
        # Fired from the owner: taken like a spool record.
        b = make_share(name="bussed", rules=[rule("10.74.0.0/24", "ro")], export="127.0.0.1:/b")
        fire(mountd_bus, [make_record(4, "post", "allow_access", share=b)], own_name=True)
        rows = wait_mounts(mountd_bus, lambda r: b["id"] in [x[0] for x in r])
        assert imp["id"] not in [x[0] for x in rows]
        ignored = [ln for ln in d.text().splitlines() if "Hooks.Fired signal: ignored" in ln]
        assert len(ignored) == 1 and "refused 1 message(s)" in ignored[0], ignored

        # Withdraw alpha (pre deny): it leaves Mounts.
        write_record(d.spool, make_record(5, "pre", "deny_access",
                                          share=dict(a, access_rules=[dict(a["access_rules"][0],
                                                                           state="denying")])))
        mountd_bus.busctl("call", *M, "Rescan")
        assert a["id"] not in [x[0] for x in mounts(mountd_bus)]

        # SIGHUP with a broken file keeps running; with a good one reloads.
        pathlib.Path(d.conf).write_text("[mountd]\nbogus = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload refused" in d.text() and "bogus: unknown option" in d.text()
        d.write_conf("protocols = NFS\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        mountd_bus.busctl("call", *M, "Rescan")
        assert g["id"] not in [x[0] for x in mounts(mountd_bus)]   # GLUSTERFS no longer wanted
    finally:
        rc = d.stop()
    assert rc == 0, d.text()
    state = json.loads(pathlib.Path(mountd_tmp, "state", "mounts.json").read_text())
    assert b["id"] in [m["share_id"] for m in state["mounts"]]


def test_daemon_without_bus_and_second_instance(mountd_bus, mountd_tmp):
    d = Mountd(os.path.join(mountd_tmp, "a"), None, args=("--no-bus",)) if os.makedirs(
        os.path.join(mountd_tmp, "a")) is None else None
    try:
        d.wait_notify("READY=1")
        assert d.proc.poll() is None
        listed = mountd_bus.busctl("list", "--no-legend").stdout
        assert "org.sharedd.Mountd1" not in listed
    finally:
        assert d.stop() == 0
    # Two bus instances: the second cannot own the name and says so.
    os.makedirs(os.path.join(mountd_tmp, "b"))
    os.makedirs(os.path.join(mountd_tmp, "c"))
    first = Mountd(os.path.join(mountd_tmp, "b"), mountd_bus)
    try:
        first.wait_notify("READY=1")
        second = Mountd(os.path.join(mountd_tmp, "c"), mountd_bus)
        assert second.proc.wait(20) == 1
        second.stop()
        assert "cannot own org.sharedd.Mountd1" in second.text()
    finally:
        assert first.stop() == 0


def own_state(tmp):
    try:
        data = json.loads(pathlib.Path(tmp, "state", "mounts.json").read_text())
    except FileNotFoundError:
        return {}
    return {m["share_id"]: m for m in data["mounts"]}


def wait_state(tmp, pred, timeout):
    deadline = time.monotonic() + timeout
    while True:
        st = own_state(tmp)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"state never matched: {st}")
        time.sleep(0.1)


def test_inotify_is_fast_and_periodic_rescan_finds_a_late_spool(mountd_tmp):
    # consume_interval 60: a reaction within seconds comes from inotify.
    fast = os.path.join(mountd_tmp, "fast")
    os.makedirs(fast)
    d = Mountd(fast, None, args=("--no-bus",), interval=60)
    try:
        d.wait_notify("READY=1")
        a = make_share(name="fast", rules=[rule(CLIENT4, "ro")], export="127.0.0.1:/f")
        write_record(d.spool, make_record(1, "post", "allow_access", share=a))
        wait_state(fast, lambda st: a["id"] in st, 5)
        # A sharedd host directory that appears later is watched too.
        b = make_share(name="other", rules=[rule(CLIENT4, "ro")], export="127.0.0.1:/o")
        write_record(d.spool, make_record(1, "post", "allow_access", share=b, host="storage75"))
        wait_state(fast, lambda st: b["id"] in st, 5)
    finally:
        assert d.stop() == 0
    # The spool directory does not exist at start (e.g. its network mount
    # comes later): the periodic rescan (every 2 s here) picks it up.
    late = os.path.join(mountd_tmp, "late")
    os.makedirs(late)
    d = Mountd(late, None, args=("--no-bus",), interval=2)
    try:
        os.rmdir(d.spool)
        d.wait_notify("READY=1")
        c = make_share(name="late", rules=[rule(CLIENT4, "rw")], export="127.0.0.1:/l")
        write_record(d.spool, make_record(1, "post", "allow_access", share=c))
        st = wait_state(late, lambda st: c["id"] in st, 8)
        assert st[c["id"]]["level"] == "rw"
    finally:
        assert d.stop() == 0


def test_address_change_in_a_namespace_reevaluates(mountd_tmp):
    ns = f"mountd74d-{os.getpid()}-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    d = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "v74a", "type", "veth", "peer", "name",
                        "v74b"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "v74a", "up"], check=True)
        a = make_share(name="addr", rules=[rule("10.74.0.31", "rw"), rule("fd74::/64", "ro")],
                       export="127.0.0.1:/a")
        spool = os.path.join(mountd_tmp, "spool")
        write_record(spool, make_record(1, "post", "allow_access", share=a))
        d = Mountd(mountd_tmp, None, args=("--no-bus",), interval=60, addresses="",
                   prefix=("ip", "netns", "exec", ns), extra="interfaces = v74a\n")
        d.wait_notify("READY=1")
        assert own_state(mountd_tmp) == {}
        subprocess.run(["ip", "-n", ns, "addr", "add", "fd74::31/64", "dev", "v74a", "nodad"],
                       check=True)
        st = wait_state(mountd_tmp, lambda st: a["id"] in st, 8)
        assert st[a["id"]]["level"] == "ro"
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.74.0.31/24", "dev", "v74a"], check=True)
        wait_state(mountd_tmp, lambda st: st.get(a["id"], {}).get("level") == "rw", 8)
        subprocess.run(["ip", "-n", ns, "addr", "flush", "dev", "v74a"], check=True)
        wait_state(mountd_tmp, lambda st: a["id"] not in st, 8)
        assert "host addresses changed" in d.text()
    finally:
        if d is not None:
            assert d.stop() == 0
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def _watch_properties(address, seconds, out):
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                               body=["type='signal',sender='org.sharedd.Mountd1',"
                                     "path='/org/sharedd/Mountd1'"]))

        def handler(msg):
            if msg.member in ("PropertiesChanged", "Mounted", "Unmounted"):
                out.append((msg.member, msg.body))
        bus.add_message_handler(handler)
        out.append(("ready", None))
        await asyncio.sleep(seconds)
    finally:
        bus.disconnect()


def test_properties_changed_on_mounts(mountd_bus, mountd_tmp):
    d = Mountd(mountd_tmp, mountd_bus)
    seen = []
    watcher = threading.Thread(target=lambda: asyncio.run(
        _watch_properties(mountd_bus.address, 6, seen)), daemon=True)
    try:
        d.wait_notify("READY=1")
        watcher.start()
        while not seen:
            time.sleep(0.05)
        a = make_share(name="pc", rules=[rule(CLIENT4, "rw")], export="127.0.0.1:/pc")
        write_record(d.spool, make_record(1, "post", "allow_access", share=a))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(m == "PropertiesChanged" for m, _ in seen):
            time.sleep(0.1)
        changed = [b for m, b in seen if m == "PropertiesChanged"]
        assert changed, seen
        iface, props, _inv = changed[0]
        assert iface == "org.sharedd.Mountd1"
        rows = props["Mounts"].value
        assert rows[0][0] == a["id"] and rows[0][3] == "rw"
    finally:
        watcher.join(10)
        assert d.stop() == 0


def _start_bus(tmp):
    from tests.fixtures.bus import _bus_config
    if not os.path.isdir(os.path.join(tmp, "system.d")):
        conf = _bus_config(tmp)
    else:
        conf = os.path.join(tmp, "bus.conf")
    proc = subprocess.run(["dbus-daemon", f"--config-file={conf}", "--fork",
                           "--print-address=1", "--print-pid=1"],
                          capture_output=True, text=True, timeout=30, check=True)
    address, pid = proc.stdout.split()[:2]
    # Like the real system bus address: no guid, so a restarted bus matches.
    return address.split(",guid=")[0], int(pid)


class _BusHandle:
    def __init__(self, address):
        self.address = address

    def busctl(self, *args):
        proc = subprocess.run(["busctl", "--system", "--no-pager", *map(str, args)],
                              capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address))
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
        return proc


def test_reconnects_when_the_bus_restarts(mountd_tmp):
    bus_tmp = os.path.join(mountd_tmp, "bus")
    os.makedirs(bus_tmp, mode=0o755)
    address, pid = _start_bus(bus_tmp)
    pids = [pid]
    d = None
    try:
        bus = _BusHandle(address)
        d = Mountd(os.path.join(mountd_tmp, "d"), bus) if not os.makedirs(
            os.path.join(mountd_tmp, "d")) else None
        d.wait_notify("READY=1")
        assert mounts(bus) == []
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "lost the system bus connection" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "lost the system bus connection" in d.text()
        sock = os.path.join(bus_tmp, "system_bus_socket")
        if os.path.exists(sock):
            os.unlink(sock)
        address2, pid2 = _start_bus(bus_tmp)
        pids.append(pid2)
        assert address2 == address
        deadline = time.monotonic() + 15
        while "reconnected to the system bus" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mounts(bus) == [] and d.proc.poll() is None
    finally:
        if d is not None:
            assert d.stop() == 0
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_an_unreadable_spool_withdraws_nothing(mountd_bus, mountd_tmp):
    """Fail safe, not open: an empty file system over the spool, a vanished
    host directory or spool directory, or a restart without the spool keep
    every mount mountd is responsible for (reported in SpoolStatus and
    STATUS=); a verified deny record still withdraws at once."""
    from tests.fixtures.mountd_env import HOST

    def status():
        out = mountd_bus.busctl("--json=short", "get-property", *M, "SpoolStatus").stdout
        return json.loads(out)["data"]

    def ids():
        mountd_bus.busctl("call", *M, "Rescan")
        return [x[0] for x in mounts(mountd_bus)]

    d = Mountd(mountd_tmp, mountd_bus)
    try:
        d.wait_notify("READY=1")
        a = make_share(name="kept", rules=[rule(CLIENT4, "rw")], export="127.0.0.1:/kept")
        write_record(d.spool, make_record(1, "post", "allow_access", share=a))
        wait_mounts(mountd_bus, lambda r: a["id"] in [x[0] for x in r])
        assert status() == {}
        # An empty file system mounted over the spool (a network spool whose
        # server went away, say): the host's records are gone, not withdrawn.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d.spool], check=True,
                       timeout=30)
        try:
            assert a["id"] in ids()
            assert "is gone" in status()[HOST], status()
            d.wait_notify("spool unavailable")
        finally:
            subprocess.run(["umount", d.spool], check=True, timeout=30)
        assert a["id"] in ids() and status() == {}
        # A host directory with every record gone at once.
        host_dir, moved = os.path.join(d.spool, HOST), os.path.join(d.spool, ".moved")
        os.rename(host_dir, moved)          # (a dot name is never a host)
        os.makedirs(host_dir)
        assert a["id"] in ids() and "suddenly empty" in status()[HOST]
        os.rmdir(host_dir)
        os.rename(moved, host_dir)
        # The spool directory itself gone.
        os.rename(d.spool, d.spool + ".away")
        assert a["id"] in ids() and "cannot list spool directory" in status()[""]
        os.rename(d.spool + ".away", d.spool)
        assert a["id"] in ids() and status() == {}
    finally:
        assert d.stop() == 0, d.text()
    # A restart with the host's records gone: the persisted mounts name their
    # host, so the absence is a fault too.
    os.rename(os.path.join(d.spool, HOST), os.path.join(mountd_tmp, "away"))
    os.unlink(d.notify_path)
    d = Mountd(mountd_tmp, mountd_bus)
    try:
        d.wait_notify("READY=1")
        assert a["id"] in ids() and HOST in status()
        os.rename(os.path.join(mountd_tmp, "away"), os.path.join(d.spool, HOST))
        assert a["id"] in ids() and status() == {}
        # Only a verified record withdraws.
        write_record(d.spool, make_record(2, "pre", "deny_access",
                                          share=dict(a, access_rules=[dict(a["access_rules"][0],
                                                                           state="denying")])))
        assert a["id"] not in ids()
    finally:
        assert d.stop() == 0, d.text()


def test_a_granted_snapshot_is_wanted_read_only_on_its_own_mount_point(mountd_bus, mountd_tmp):
    """Mountable snapshots through the real daemon: a record whose share
    lists a snapshot granted to this host makes mountd mount it read-only
    (whatever the rule says) at <share>@<snapshot>-<id>; the next record
    without it withdraws it. (The mount itself fails here: no NFS client.)"""
    root = os.path.join(mountd_tmp, "snap")
    os.makedirs(root)
    d = Mountd(root, mountd_bus)
    try:
        d.wait_notify("READY=1")
        share = make_share(name="alpha", rules=[], export="127.0.0.1:/shares/alpha")
        sid = "5" * 32
        share["snapshots"] = [{"id": sid, "name": "monday",
                               "export_locations": [f"127.0.0.1:/shares/{sid}"],
                               "access_rules": [rule(CLIENT4, "rw")],
                               "mount_hints": {"fstype": "nfs4",
                                               "export": f"127.0.0.1:/shares/{sid}",
                                               "options": ["vers=4.1"]}}]
        write_record(d.spool, make_record(1, "post", "snapshot_update_access", share=share))
        rows = wait_mounts(mountd_bus, lambda r: len(r) == 1)
        assert rows[0][:4] == (sid, f"{root}/mnt/alpha@monday-{sid[:8]}",
                               f"127.0.0.1:/shares/{sid}", "ro")
        del share["snapshots"]
        write_record(d.spool, make_record(2, "post", "snapshot_update_access", share=share))
        wait_mounts(mountd_bus, lambda r: r == [])
    finally:
        assert d.stop() == 0
