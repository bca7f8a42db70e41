"""Share servers' runtime: one network namespace, one private D-Bus and one
NFS-Ganesha per server (Manila's Generic driver "service instance").

Per server (id = 32 hex digits):

- the network namespace ``sharedd-<id>`` with eth0 on the tenant network
  (sharedd.netns);
- a private ``dbus-daemon`` (system-type bus, socket ``<run_dir>/<id>/bus``
  in a 0700 root directory; only root may own org.ganesha.nfsd and call
  it): ganesha always takes that one bus name, so each instance needs a bus
  of its own, and the export helper reaches it by address;
- ``ganesha.nfsd -F`` (NFSv4 only, no rpcbind) inside the namespace, entered
  with ``nsenter --net`` only: it keeps the host's mount namespace, so
  shares mounted after it started can be exported. Its config, recovery
  directory and log live in ``<base_dir>/<id>/``; everything volatile (bus
  socket, pid files, the systemd environment file) in ``<run_dir>/<id>/``.

Two ways to run the processes:

- ``child``: sharedd spawns them (posix_spawn, own session, no parent-death
  signal) so that they keep serving while sharedd restarts. A supervisor
  thread watches every process through a pidfd (children and processes
  adopted after a restart alike: a pidfd becomes readable when its process
  exits, whoever its parent is, and pins its identity, so signals never hit
  a reused PID), reaps its own children, restarts the dead with backoff
  (1 s doubling to 30 s; reset after a minute of good service) and calls
  ``on_restart(server_id)``.
- ``systemd``: instances of the shipped template units
  sharedd-server-bus@<id>.service and sharedd-server-nfs@<id>.service,
  started over systemd's D-Bus API on the real system bus (sharedd's own
  tests point DBUS_SYSTEM_BUS_ADDRESS elsewhere, which is why the private
  bus address reaches ganesha through the units' EnvironmentFile, never
  through sharedd's environment). systemd restarts them; the same pidfd
  watch notices a new ganesha and calls ``on_restart``. Units survive
  sharedd's own restart; children of sharedd.service would not (its
  KillMode=mixed kills the rest of its cgroup), hence "auto" prefers units.

A process is "ours" when its command line names this server's config file
(``--config-file=<base>/<id>/bus.conf``, ``-f <base>/<id>/ganesha.conf``):
pid files are only a fast path, always checked against /proc/PID/cmdline,
and a scan of /proc finds what a crash left without a pid file. A ganesha
in another network namespace than the server's current one is not adopted.

Readiness (setup, ensure, restarts): ganesha's PID owns org.ganesha.nfsd on
the private bus and a socket is listening on TCP 2049 in its namespace
(/proc/PID/net/tcp{,6} show the namespace of PID). Ganesha's runtime exports
die with it: every (re)start is reported (ensure's result, on_restart). A
bus that dies takes ganesha with it (its connection is gone for good). The
pid files (<run>/<id>/{bus,nfs}.pid: PID and start time) name the
processes last handed out; ensure reports a ganesha it cannot match to
them as restarted, because nobody knows which exports it has.

Measured here (Debian 12, 2 cores): setup of a server 150-180 ms
(namespace ~45 ms, bus ~25 ms, ganesha ready ~85 ms), teardown 60-140 ms
(ganesha exits on SIGTERM at once); a killed ganesha serves again about a
second later (the first backoff step).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from xml.sax.saxutils import escape as xml_escape

from . import netns
from .errors import BackendFailure, ConfigError, InvalidArgument
from .util import atomic_write, private_dir, run

log = logging.getLogger(__name__)

MODES = ("auto", "child", "systemd")
BUS_UNIT = "sharedd-server-bus@{}.service"
NFS_UNIT = "sharedd-server-nfs@{}.service"
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
#: the units' EnvironmentFile= is /run/sharedd/servers/%i/env
SYSTEMD_RUN_DIR = "/run/sharedd/servers"
#: systemd's API is on the real system bus, whatever DBUS_SYSTEM_BUS_ADDRESS says
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
GANESHA_BUS_NAME = "org.ganesha.nfsd"
NFS_PORT = 2049

CHILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: seconds for a server's processes to become ready (ganesha: ~30 ms here)
START_TIMEOUT = 30.0
#: seconds between SIGTERM and SIGKILL, and after SIGKILL
STOP_TIMEOUT = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: a process that served this long before dying starts the backoff afresh
BACKOFF_RESET = 60.0
#: a log larger than this at a (re)start is moved to <log>.1 (one generation)
LOG_MAX = 16 << 20

_ID_RE = re.compile(r"[0-9a-f]{32}")
# Paths end up in ganesha's config (quoted), XML, systemd environment files
# and command lines: keep them to characters none of those treat specially.
_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./+@=,-]*")


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
    server_id: str                 # 32 hex
    attachment: Dict[str, Any]     # {"bridge": "br-x"} or {"parent": "eth1", "vlan": 100}
    address: str                   # "10.80.0.10/24"
    gateway: str = ""
    mtu: int = 0


def _check_id(server_id: Any) -> str:
    if not isinstance(server_id, str) or not _ID_RE.fullmatch(server_id):
        raise InvalidArgument(f"share server id {str(server_id)[:80]!r} is not 32 lowercase "
                              "hex digits")
    return server_id


def _cmdline(pid: int) -> List[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(1 << 16)
    except OSError:
        return []
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def _listening(pid: int, port: int = NFS_PORT) -> bool:
    """A TCP socket listens on port in PID's network namespace."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(want):
                        return True
        except OSError:
            continue
    return False


def _start_time(pid: int) -> int:
    """The process's start time (field 22 of /proc/PID/stat), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _log_tail(paths: List[str], limit: int = 1500) -> str:
    parts = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                text = f.read().decode(errors="replace").strip()
        except OSError:
            continue
        if text:
            parts.append(f"[{os.path.basename(path)}] {text}")
    return "\n".join(parts) or "(no log)"


def _unit_path(unit: str) -> str:
    """systemd's object path of a unit (sd_bus_path_encode)."""
    label = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in unit)
    return "/org/freedesktop/systemd1/unit/" + label


# Processes this Python process spawned and has not reaped yet. A child that
# dies when no pidfd watches it (after close(), or replaced meanwhile) is
# reaped from here; a PID cannot be reused before its zombie is reaped, so
# waiting for these PIDs never takes another child's status.
_SPAWNED: Set[int] = set()
_SPAWNED_LOCK = threading.Lock()


def _reap_spawned() -> None:
    with _SPAWNED_LOCK:
        for pid in list(_SPAWNED):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                _SPAWNED.discard(pid)


class _Proc:
    """One process of a server, held by a pidfd (identity pinned)."""

    def __init__(self, kind: str, pid: int, pidfd: int, started: float):
        self.kind = kind            # "bus" or "nfs"
        self.pid = pid
        self.pidfd = pidfd
        self.started = started      # monotonic time we started or adopted it
        self.dead = False           # seen dead (by anyone)
        self.handled = False        # its exit went through the supervisor

    def exited(self, timeout: float = 0.0) -> bool:
        if self.dead or self.pidfd < 0:
            return True
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        if p.poll(max(0, int(timeout * 1000))):
            self.dead = True
            self.reap()
        return self.dead

    def reap(self) -> None:
        """Collect the exit status if the process is our child (no zombie)."""
        with _SPAWNED_LOCK:
            try:
                if os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG) is not None:
                    _SPAWNED.discard(self.pid)
            except ChildProcessError:
                pass                  # adopted: its parent is someone else
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise

    def send(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def __repr__(self) -> str:
        return f"{self.kind}[{self.pid}]"


class _Server:
    def __init__(self, net: NetworkInfo):
        self.net = net
        self.procs: Dict[str, Optional[_Proc]] = {"bus": None, "nfs": None}
        self.failures = 0
        self.pending = False                     # a death not handled yet
        self.worker: Optional[threading.Thread] = None
        self.stop = threading.Event()            # torn down or closing


class ServiceInstances:
    def __init__(self, base_dir: str, run_dir: str, mode: str = "auto",
                 command_timeout: float = 120.0,
                 on_restart: Optional[Callable[[str], None]] = None):
        for what, path in (("base_dir", base_dir), ("run_dir", run_dir)):
            if not isinstance(path, str) or not _SAFE_PATH_RE.fullmatch(path) \
                    or len(path) > 200:
                raise ConfigError(f"share servers' {what} {str(path)[:80]!r} must be an "
                                  "absolute path of letters, digits and _./+@=,- (at most 200)")
        self.base_dir = os.path.normpath(base_dir)
        self.run_dir = os.path.normpath(run_dir)
        if mode not in MODES:
            raise ConfigError(f"service instance mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "auto":
            mode = "systemd" if self.systemd_available(self.run_dir) else "child"
        elif mode == "systemd" and self.run_dir != SYSTEMD_RUN_DIR:
            raise ConfigError(f"systemd mode needs the servers' run directory "
                              f"{SYSTEMD_RUN_DIR} (the units read their environment there), "
                              f"not {self.run_dir}")
        self.mode = mode
        self.command_timeout = float(command_timeout)
        self.start_timeout = min(START_TIMEOUT, self.command_timeout)
        self.on_restart = on_restart
        self._conf_re = re.compile(re.escape(self.base_dir).encode()
                                   + rb"/([0-9a-f]{32})/(bus|ganesha)\.conf")
        self._lock = threading.Lock()                 # _servers, _retired, workers
        self._servers: Dict[str, _Server] = {}
        self._server_locks: Dict[str, threading.RLock] = {}
        self._retired: List[_Proc] = []               # pidfds to close (supervisor's job)
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._supervisor: Optional[threading.Thread] = None
        self._exe: Dict[str, str] = {}

    @staticmethod
    def systemd_available(run_dir: str = SYSTEMD_RUN_DIR) -> bool:
        """systemd runs this host and the template units are installed."""
        if not os.path.isdir("/run/systemd/system") \
                or os.path.normpath(run_dir) != SYSTEMD_RUN_DIR:
            return False
        return all(any(os.path.exists(os.path.join(d, unit.format(""))) for d in UNIT_DIRS)
                   for unit in (BUS_UNIT, NFS_UNIT))

    # ------------------------------------------------------------ paths
    def _base(self, sid: str) -> str:
        return os.path.join(self.base_dir, sid)

    def _run(self, sid: str) -> str:
        return os.path.join(self.run_dir, sid)

    def bus_address(self, server_id: str) -> str:
        return "unix:path=" + os.path.join(self._run(_check_id(server_id)), "bus")

    def _paths(self, sid: str) -> Dict[str, str]:
        base, run_ = self._base(sid), self._run(sid)
        return {"bus_conf": os.path.join(base, "bus.conf"),
                "ganesha_conf": os.path.join(base, "ganesha.conf"),
                "ganesha_log": os.path.join(base, "ganesha.log"),
                "ganesha_out": os.path.join(base, "ganesha.out"),
                "bus_log": os.path.join(base, "bus.log"),
                "recovery": os.path.join(base, "recovery"),
                "socket": os.path.join(run_, "bus"),
                "ganesha_pid": os.path.join(run_, "ganesha.pid"),
                "env": os.path.join(run_, "env"),
                "bus.pid": os.path.join(run_, "bus.pid"),
                "nfs.pid": os.path.join(run_, "nfs.pid")}

    # ------------------------------------------------------------ public API
    def setup(self, net: NetworkInfo) -> Dict[str, Any]:
        """Make the server (idempotent); return when ganesha serves."""
        details, _ = self._bring_up(net)
        return details

    def ensure(self, net: NetworkInfo) -> bool:
        """After a restart or crash: everything back, running processes
        adopted. True if ganesha was (re)started, or is not the one last
        handed out: its exports must be added. on_restart is not called
        for what ensure reports."""
        _, started = self._bring_up(net)
        return started

    def teardown(self, server_id: str) -> None:
        """Stop the server's processes, remove its namespace and files; idempotent."""
        sid = _check_id(server_id)
        with self._lock:
            srv = self._servers.pop(sid, None)
        if srv is not None:
            # A restart in progress gives up; one that holds the server lock
            # finishes first, and finds the server gone once it is released.
            srv.stop.set()
        with self._server_lock(sid):
            if self.mode == "systemd":
                self._systemd_stop(sid)
            procs = [p for p in (srv.procs.values() if srv else ()) if p is not None]
            procs += self._strays(sid, "nfs", procs) + self._strays(sid, "bus", procs)
            # ganesha first: it must not outlive its bus by long, nor the bus it.
            self._terminate([p for p in procs if p.kind == "nfs"])
            self._terminate([p for p in procs if p.kind == "bus"])
            self._retire(procs)
            netns.destroy(sid)
            _reap_spawned()
            for d in (self._base(sid), self._run(sid)):
                shutil.rmtree(d, ignore_errors=True)
                if os.path.lexists(d):
                    raise BackendFailure(f"share server {sid}: could not remove {d}")
        log.info("share server %s torn down", sid)

    def running(self, server_id: str) -> bool:
        """Both of the server's processes are alive (not a readiness check)."""
        sid = _check_id(server_id)
        with self._lock:
            srv = self._servers.get(sid)
        if srv is not None:
            return all(p is not None and not p.exited() for p in srv.procs.values())
        found = [self._find(sid, kind) for kind in ("bus", "nfs")]
        alive = all(p is not None and not p.exited() for p in found)
        self._retire([p for p in found if p is not None])
        return alive

    def leftovers(self, owned_only: bool = False) -> Set[str]:
        """Ids of servers with anything on this host: namespace, directory,
        process. owned_only: only those with a directory or process of this
        runtime (another sharedd's namespaces are not ours to remove; ours
        always get their directory before their namespace)."""
        _reap_spawned()
        ids = set() if owned_only else netns.list_servers()
        for d in (self.base_dir, self.run_dir):
            try:
                ids.update(n for n in os.listdir(d) if _ID_RE.fullmatch(n))
            except FileNotFoundError:
                pass
        ids.update(sid for sid, _ in self._scan())
        return ids

    def close(self) -> None:
        """Stop supervising; the servers keep running (adopted by the next ensure)."""
        with self._lock:
            self._closed = True
            servers = list(self._servers.values())
            self._servers.clear()
        for srv in servers:
            srv.stop.set()
        self._wake()
        if self._supervisor is not None:
            self._supervisor.join(5.0)
        for srv in servers:
            worker = srv.worker
            if worker is not None and worker is not threading.current_thread():
                worker.join(5.0)     # it may be in on_restart; it is a daemon thread
        self._retire([p for srv in servers for p in srv.procs.values() if p is not None])
        self._close_retired()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------ bring up
    def _server_lock(self, sid: str) -> threading.RLock:
        with self._lock:
            return self._server_locks.setdefault(sid, threading.RLock())

    def _bring_up(self, net: NetworkInfo) -> Tuple[Dict[str, Any], bool]:
        if not isinstance(net, NetworkInfo):
            raise InvalidArgument("share server network must be a NetworkInfo")
        sid = _check_id(net.server_id)
        if self._closed:
            raise BackendFailure("share server runtime is closed")
        _reap_spawned()
        with self._server_lock(sid):
            # Files first (once the network is known to be valid): a
            # namespace of ours always has its directory, so
            # leftovers(owned_only=True) finds what a crash left.
            netns.check(sid, net.attachment, net.address, net.gateway, net.mtu)
            self._write_files(sid)
            ndetails = netns.create(sid, net.attachment, net.address, net.gateway, net.mtu)
            with self._lock:
                srv = self._servers.get(sid) or _Server(net)
            srv.net = net
            recorded = self._recorded(sid, "nfs")
            started = self._start_missing(srv, None)
            nfs = srv.procs["nfs"]
            # A ganesha other than the one recorded when it was last handed
            # out (systemd restarted it while sharedd was away) has lost its
            # exports as surely as one started now.
            started = started or nfs is None or recorded != (nfs.pid, _start_time(nfs.pid))
            for proc in srv.procs.values():
                if proc is not None:
                    self._record(sid, proc)
            with self._lock:
                if self._closed:
                    raise BackendFailure("share server runtime is closed")
                self._servers[sid] = srv
            self._ensure_supervisor()
            self._wake()          # watch the new pidfds
        details = dict(ndetails, server_id=sid, bus_address=self.bus_address(sid),
                       mode=self.mode)
        return details, started

    def _write_files(self, sid: str) -> None:
        p = self._paths(sid)
        os.makedirs(self.base_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        private_dir(self._base(sid))
        private_dir(self._run(sid))
        private_dir(p["recovery"])
        files = {
            p["ganesha_conf"]: self._ganesha_conf(p),
            p["bus_conf"]: self._bus_conf(p),
            p["env"]: (f"SHAREDD_SERVER_ID={sid}\n"
                       f"SHAREDD_BUS_CONF={p['bus_conf']}\n"
                       f"SHAREDD_GANESHA_CONF={p['ganesha_conf']}\n"
                       f"SHAREDD_GANESHA_LOG={p['ganesha_log']}\n"
                       f"SHAREDD_GANESHA_PID={p['ganesha_pid']}\n"
                       f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={p['socket']}\n"),
        }
        for path, text in files.items():
            try:
                with open(path) as f:
                    if f.read() == text:
                        continue
            except FileNotFoundError:
                pass
            atomic_write(path, text.encode(), 0o600)

    @staticmethod
    def _ganesha_conf(p: Dict[str, str]) -> str:
        return f"""# Written by sharedd for one share server; rewritten at each start.
# NFSv4 only (no rpcbind, NLM, RQUOTA or UDP); exports are added at run time
# over the server's private bus.
NFS_CORE_PARAM {{
    Protocols = 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSv4 {{
    Graceless = true;
    Only_Numeric_Owners = true;
    RecoveryBackend = fs;
    RecoveryRoot = "{p['recovery']}";
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
"""

    @staticmethod
    def _bus_conf(p: Dict[str, str]) -> str:
        sock = xml_escape(p["socket"])
        # A system-type bus with one service: root may connect, own
        # org.ganesha.nfsd and call it; nobody else may connect at all.
        return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Written by sharedd: the private bus of one share server's NFS-Ganesha. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <deny user="*"/>
    <allow user="root"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow own="{GANESHA_BUS_NAME}"/>
    <allow send_destination="{GANESHA_BUS_NAME}"/>
  </policy>
</busconfig>
"""

    def _start_missing(self, srv: _Server, stop: Optional[threading.Event]) -> bool:
        """Adopt or start the bus, then ganesha; wait until ganesha serves.
        True if ganesha was started (its runtime exports are gone)."""
        sid = srv.net.server_id
        bus = self._alive(srv, "bus")
        nfs = self._alive(srv, "nfs")
        if bus is None:
            if nfs is not None:
                # Its bus connection died with the old bus: it cannot be
                # reached for exports any more.
                log.warning("share server %s: bus gone, restarting ganesha %s", sid, nfs)
                srv.procs["nfs"] = None          # first: its exit is no news to recover
                self._terminate([nfs])
                self._retire([nfs])
                nfs = None
            bus = srv.procs["bus"] = self._start(sid, "bus", stop)
        grace = min(5.0, self.start_timeout)
        if nfs is not None and not self._serving(sid, nfs, stop, grace):
            log.warning("share server %s: ganesha %s does not serve; restarting it", sid, nfs)
            srv.procs["nfs"] = None
            self._terminate([nfs])
            self._retire([nfs])
            nfs = None
        if nfs is not None:
            return False
        srv.procs["nfs"] = self._start(sid, "nfs", stop)
        return True

    def _alive(self, srv: _Server, kind: str) -> Optional[_Proc]:
        """The server's live process of this kind: known, or found and adopted."""
        sid = srv.net.server_id
        proc = srv.procs[kind]
        if proc is not None and proc.exited():
            srv.procs[kind] = None
            self._retire([proc])
            proc = None
        if proc is None:
            proc = self._find(sid, kind)
            if proc is not None and kind == "nfs" and not self._in_server_netns(sid, proc.pid):
                log.warning("share server %s: ganesha %s is in another network namespace; "
                            "stopping it", sid, proc)
                self._terminate([proc])
                self._retire([proc])
                proc = None
            if proc is not None:
                log.info("share server %s: adopted running %s", sid, proc)
            srv.procs[kind] = proc
        return proc

    def _in_server_netns(self, sid: str, pid: int) -> bool:
        """pid runs in the server's current network namespace.

        Not by /proc/PID/ns/net: that needs ptrace access to PID, which a
        process without CAP_SYS_PTRACE (sharedd.service's bounding set) has
        only to processes whose permitted capabilities are a subset of its
        own; ganesha's are not (a unit's full set), so under sharedd.service
        the stat fails with EACCES. /proc/PID/net/ needs no ptrace access and
        shows PID's namespace, whose entries have inode numbers of their own
        (proc_alloc_inum, per namespace): compare /proc/PID/net/dev's with
        that seen from inside the namespace file."""
        try:
            ino = os.stat(f"/proc/{pid}/net/dev").st_ino
        except OSError:
            return False
        proc = run(["nsenter", f"--net={netns.netns_path(sid)}", "--", "stat", "-L", "-c", "%i",
                    "/proc/self/net/dev"], timeout=netns.IP_TIMEOUT, check=False,
                   env={"PATH": CHILD_PATH})
        return proc.returncode == 0 and proc.stdout.strip() == str(ino).encode()

    def _serving(self, sid: str, proc: _Proc, stop: Optional[threading.Event],
                 grace: float) -> bool:
        """ganesha proc owns its bus name and listens on 2049, within grace seconds."""
        deadline = time.monotonic() + grace
        while True:
            if proc.exited():
                return False
            if _listening(proc.pid) and self._bus_owner(sid) == proc.pid:
                return True
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.05)

    def _bus_owner(self, sid: str) -> int:
        proc = run(["busctl", f"--address={self.bus_address(sid)}", "--timeout=5", "call",
                    "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                    "GetConnectionUnixProcessID", "s", GANESHA_BUS_NAME],
                   timeout=10, check=False, env={"PATH": CHILD_PATH})
        words = proc.stdout.split()
        if proc.returncode == 0 and len(words) == 2 and words[1].isdigit():
            return int(words[1])
        return 0

    def _bus_ready(self, sid: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect(self._paths(sid)["socket"])
            except OSError:
                return False
        return True

    # ------------------------------------------------------------ processes
    def _executable(self, name: str) -> str:
        if name not in self._exe:
            path = shutil.which(name, path=CHILD_PATH)
            if path is None:
                pkg = {"ganesha.nfsd": "nfs-ganesha and nfs-ganesha-vfs",
                       "dbus-daemon": "dbus", "nsenter": "util-linux"}.get(name, name)
                raise BackendFailure(f"{name} is not installed (package {pkg})")
            self._exe[name] = path
        return self._exe[name]

    def _argv(self, sid: str, kind: str) -> List[str]:
        p = self._paths(sid)
        if kind == "bus":
            return [self._executable("dbus-daemon"), "--nofork", "--nopidfile",
                    f"--config-file={p['bus_conf']}"]
        # nsenter --net, not ip netns exec: same mount namespace as the host,
        # so shares mounted later are visible to ganesha. nsenter execs
        # ganesha (no fork without --pid), so the PID is ganesha's.
        return [self._executable("nsenter"), f"--net={netns.netns_path(sid)}", "--",
                self._executable("ganesha.nfsd"), "-F", "-f", p["ganesha_conf"],
                "-L", p["ganesha_log"], "-p", p["ganesha_pid"], "-N", "NIV_EVENT"]

    def _start(self, sid: str, kind: str, stop: Optional[threading.Event]) -> _Proc:
        """Start one process (nothing of this kind may be running) and wait until ready."""
        # systemd mode: systemd owns the unit's processes (and may be
        # restarting one right now); strays outside units are teardown's.
        strays = self._strays(sid, kind, []) if self.mode == "child" else []
        if strays:
            log.warning("share server %s: stopping stray %s", sid, strays)
            self._terminate(strays)
            self._retire(strays)
        if self.mode == "systemd":
            proc = self._systemd_start(sid, kind)
        else:
            proc = self._spawn(sid, kind)
        try:
            self._wait_ready(sid, proc, stop)
        except BaseException:
            if self.mode == "systemd":       # a kill alone would be restarted
                self._manager("StopUnit", "ss", self._unit(sid, kind), "replace", check=False)
            self._terminate([proc])
            self._retire([proc])
            raise
        log.info("share server %s: started %s", sid, proc)
        return proc

    def _spawn(self, sid: str, kind: str) -> _Proc:
        p = self._paths(sid)
        out = p["bus_log"] if kind == "bus" else p["ganesha_out"]
        for path in ([out] if kind == "bus" else [out, p["ganesha_log"]]):
            try:
                if os.stat(path).st_size > LOG_MAX:
                    os.replace(path, path + ".1")
            except FileNotFoundError:
                pass
        if kind == "bus":
            # A socket file left by a dead bus would be taken for a live one.
            try:
                os.unlink(p["socket"])
            except FileNotFoundError:
                pass
        env = {"PATH": CHILD_PATH, "LANG": "C.UTF-8"}
        if kind == "nfs":
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus_address(sid)
        argv = self._argv(sid, kind)
        # posix_spawn, own session: not killed with sharedd's process group or
        # terminal, no parent-death signal; reaped through its pidfd.
        with _SPAWNED_LOCK:          # no reaping (and PID reuse) before the pidfd
            pid = self._posix_spawn(argv, env, out)
            _SPAWNED.add(pid)
            pidfd = os.pidfd_open(pid)
        proc = _Proc(kind, pid, pidfd, time.monotonic())
        self._record(sid, proc)          # at once: a crash now must not lose it
        return proc

    @staticmethod
    def _posix_spawn(argv: List[str], env: Dict[str, str], out: str) -> int:
        return os.posix_spawn(argv[0], argv, env, setsid=True,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP,
                                         signal.SIGINT, signal.SIGTERM),
                              setsigmask=(),
                              file_actions=[
                                  (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                  (os.POSIX_SPAWN_OPEN, 1, out,
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                                  (os.POSIX_SPAWN_DUP2, 1, 2)])

    def _record(self, sid: str, proc: _Proc) -> None:
        """<run>/<id>/<kind>.pid: PID and start time (clock ticks since boot)."""
        atomic_write(self._paths(sid)[f"{proc.kind}.pid"],
                     f"{proc.pid} {_start_time(proc.pid)}\n".encode(), 0o600)

    def _recorded(self, sid: str, kind: str) -> Optional[Tuple[int, int]]:
        try:
            with open(self._paths(sid)[f"{kind}.pid"]) as f:
                pid, start = (int(w) for w in f.read().split())
        except (OSError, ValueError):
            return None
        return pid, start

    def _wait_ready(self, sid: str, proc: _Proc, stop: Optional[threading.Event]) -> None:
        p = self._paths(sid)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.kind == "bus":
                if self._bus_ready(sid):
                    return
            elif self._serving(sid, proc, stop, grace=0):
                return
            logs = [p["bus_log"]] if proc.kind == "bus" else [p["ganesha_out"], p["ganesha_log"]]
            if proc.exited():
                name = "dbus-daemon" if proc.kind == "bus" else "ganesha.nfsd"
                raise BackendFailure(f"share server {sid}: {name} exited at start:\n"
                                     f"{_log_tail(logs)}")
            if stop is not None and stop.is_set():
                raise BackendFailure(f"share server {sid}: start of {proc} interrupted")
            if time.monotonic() >= deadline:
                what = ("its private bus did not accept connections" if proc.kind == "bus"
                        else f"ganesha did not own {GANESHA_BUS_NAME} and listen on TCP "
                             f"{NFS_PORT}")
                raise BackendFailure(f"share server {sid}: {what} within "
                                     f"{self.start_timeout:g}s:\n{_log_tail(logs)}")
            time.sleep(0.02 if proc.kind == "bus" else 0.05)

    def _adopt(self, sid: str, kind: str, pid: int) -> Optional[_Proc]:
        """A pidfd for pid if it is this server's process of this kind."""
        if pid <= 0 or pid == os.getpid() or self._identify(_cmdline(pid)) != (sid, kind):
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # Checked again through the pinned process: the PID was not reused
        # between the first look and pidfd_open.
        if self._identify(_cmdline(pid)) != (sid, kind):
            os.close(pidfd)
            return None
        proc = _Proc(kind, pid, pidfd, time.monotonic())
        if proc.exited():
            os.close(pidfd)
            return None
        return proc

    def _find(self, sid: str, kind: str) -> Optional[_Proc]:
        """The server's running process of this kind, by pid file or unit."""
        if self.mode == "systemd":
            return self._adopt(sid, kind, self._main_pid(sid, kind))
        recorded = self._recorded(sid, kind)
        if recorded is not None and _start_time(recorded[0]) == recorded[1]:
            proc = self._adopt(sid, kind, recorded[0])
            if proc is not None:
                return proc
        # No valid pid file (a crash right after spawning): the scan finds it.
        for pid in self._scan().get((sid, kind), []):
            proc = self._adopt(sid, kind, pid)
            if proc is not None:
                return proc
        return None

    def _identify(self, argv: List[bytes]) -> Optional[Tuple[str, str]]:
        """(server id, kind) if argv is one of our servers' processes."""
        if not argv:
            return None
        exe = os.path.basename(argv[0])
        if exe == b"dbus-daemon":
            for a in argv[1:]:
                if a.startswith(b"--config-file="):
                    m = self._conf_re.fullmatch(a[len(b"--config-file="):])
                    if m and m.group(2) == b"bus":
                        return m.group(1).decode(), "bus"
        elif exe in (b"ganesha.nfsd", b"nsenter"):     # nsenter: just before its exec
            for i, a in enumerate(argv[1:-1], 1):
                if a == b"-f":
                    m = self._conf_re.fullmatch(argv[i + 1])
                    if m and m.group(2) == b"ganesha":
                        return m.group(1).decode(), "nfs"
        return None

    def _scan(self) -> Dict[Tuple[str, str], List[int]]:
        """Every process of our servers on this host, from /proc."""
        found: Dict[Tuple[str, str], List[int]] = {}
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            ident = self._identify(_cmdline(int(entry.name)))
            if ident is not None:
                found.setdefault(ident, []).append(int(entry.name))
        return found

    def _strays(self, sid: str, kind: str, known: List[_Proc]) -> List[_Proc]:
        """Processes of this server and kind that are not in known."""
        pids = {p.pid for p in known}
        out = []
        for pid in self._scan().get((sid, kind), []):
            if pid not in pids:
                proc = self._adopt(sid, kind, pid)
                if proc is not None:
                    out.append(proc)
        return out

    def _terminate(self, procs: List[_Proc]) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; by pidfd, never by name."""
        live = [p for p in procs if not p.exited()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                p.send(sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            for p in live:
                p.exited(max(0.0, deadline - time.monotonic()))
            live = [p for p in live if not p.dead]
            if not live:
                return
            log.warning("%s did not stop on %s", live, signal.Signals(sig).name)
        raise BackendFailure(f"could not stop {live} even with SIGKILL")

    # ------------------------------------------------------------ systemd
    def _busctl_systemd(self, *args: str,
                        check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        # The real system bus, not DBUS_SYSTEM_BUS_ADDRESS (tests move that).
        return run(["busctl", f"--address={SYSTEM_BUS}",
                    f"--timeout={max(1, int(self.command_timeout))}", *args],
                   timeout=self.command_timeout + 5, check=check, env={"PATH": CHILD_PATH})

    def _manager(self, method: str, signature: str, *args: str,
                 check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        return self._busctl_systemd("call", "org.freedesktop.systemd1",
                                    "/org/freedesktop/systemd1",
                                    "org.freedesktop.systemd1.Manager", method, signature,
                                    *args, check=check)

    def _unit_property(self, unit: str, iface: str, prop: str) -> str:
        proc = self._busctl_systemd("get-property", "org.freedesktop.systemd1",
                                    _unit_path(unit), iface, prop, check=False)
        words = proc.stdout.decode(errors="replace").split()
        return words[1].strip('"') if proc.returncode == 0 and len(words) >= 2 else ""

    def _unit(self, sid: str, kind: str) -> str:
        return (BUS_UNIT if kind == "bus" else NFS_UNIT).format(sid)

    def _main_pid(self, sid: str, kind: str) -> int:
        value = self._unit_property(self._unit(sid, kind), "org.freedesktop.systemd1.Service",
                                    "MainPID")
        return int(value) if value.isdigit() else 0

    def _systemd_start(self, sid: str, kind: str) -> _Proc:
        unit = self._unit(sid, kind)
        self._manager("ResetFailedUnit", "s", unit, check=False)   # a hit start limit
        self._manager("StartUnit", "ss", unit, "replace")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            proc = self._adopt(sid, kind, self._main_pid(sid, kind))
            if proc is not None:
                return proc
            state = self._unit_property(unit, "org.freedesktop.systemd1.Unit", "ActiveState")
            if state == "failed":
                break
            time.sleep(0.1)
        p = self._paths(sid)
        raise BackendFailure(f"share server {sid}: {unit} did not start (see journalctl -u "
                             f"{unit}):\n{_log_tail([p['ganesha_log']])}")

    def _systemd_stop(self, sid: str) -> None:
        for kind in ("nfs", "bus"):
            unit = self._unit(sid, kind)
            self._manager("StopUnit", "ss", unit, "replace", check=False)
        deadline = time.monotonic() + 3 * STOP_TIMEOUT
        for kind in ("nfs", "bus"):
            unit = self._unit(sid, kind)
            while time.monotonic() < deadline:
                state = self._unit_property(unit, "org.freedesktop.systemd1.Unit",
                                            "ActiveState")
                if state in ("", "inactive", "failed"):
                    break
                time.sleep(0.1)
            self._manager("ResetFailedUnit", "s", unit, check=False)

    # ------------------------------------------------------------ supervision
    def _ensure_supervisor(self) -> None:
        with self._lock:
            if self._supervisor is None and not self._closed:
                self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                    name="sharedd-servers")
                self._supervisor.start()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass              # pipe full (a wake-up is pending anyway) or closed

    def _retire(self, procs: List[_Proc]) -> None:
        """Hand pidfds to the supervisor to close: it may be polling them."""
        with self._lock:
            self._retired.extend(procs)
            polling = self._supervisor is not None
        if polling:
            self._wake()
        else:
            self._close_retired()

    def _close_retired(self) -> None:
        with self._lock:
            live = {id(p) for srv in self._servers.values() for p in srv.procs.values() if p}
            retired = [p for p in self._retired if id(p) not in live]
            self._retired = [p for p in self._retired if id(p) in live]
        for p in retired:
            if p.pidfd >= 0:
                p.reap()
                os.close(p.pidfd)
                p.pidfd = -1
                p.dead = True

    def _supervise(self) -> None:
        while True:
            self._close_retired()
            _reap_spawned()
            with self._lock:
                if self._closed:
                    return
                watch = {p.pidfd: (srv, p) for srv in self._servers.values()
                         for p in srv.procs.values()
                         if p is not None and p.pidfd >= 0 and not p.handled}
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd in watch:
                poller.register(fd, select.POLLIN)
            try:
                events = poller.poll(1000)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif fd in watch:
                    self._exited(*watch[fd])

    def _exited(self, srv: _Server, proc: _Proc) -> None:
        sid = srv.net.server_id
        proc.dead = proc.handled = True
        proc.reap()
        with self._lock:
            if self._servers.get(sid) is not srv or srv.procs.get(proc.kind) is not proc:
                return                 # stopped on purpose, or already replaced
            log.warning("share server %s: %s exited", sid, proc)
            if time.monotonic() - proc.started >= BACKOFF_RESET:
                srv.failures = 0
            srv.pending = True
            if srv.worker is None:
                srv.worker = threading.Thread(target=self._recover, args=(srv,), daemon=True,
                                              name=f"sharedd-server-{sid[:8]}")
                srv.worker.start()

    def _recover(self, srv: _Server) -> None:
        """Bring a server's dead processes back, with backoff; report restarts."""
        sid = srv.net.server_id
        while True:
            with self._lock:
                if not srv.pending or self._servers.get(sid) is not srv:
                    srv.worker = None
                    return
                srv.pending = False
                delay = min(BACKOFF_FIRST * 2 ** srv.failures, BACKOFF_MAX)
                srv.failures += 1
            if srv.stop.wait(delay):
                with self._lock:
                    srv.worker = None
                return
            started = False
            with self._server_lock(sid):
                with self._lock:
                    if self._servers.get(sid) is not srv:
                        srv.worker = None
                        return
                nfs = srv.procs["nfs"]
                nfs_died = nfs is None or nfs.exited()
                try:
                    if not netns.exists(sid):        # removed behind our back
                        net = srv.net
                        netns.create(sid, net.attachment, net.address, net.gateway, net.mtu)
                    # systemd may have brought a new ganesha up by itself: that
                    # one has no exports either.
                    started = self._start_missing(srv, srv.stop) or nfs_died
                    for proc in srv.procs.values():
                        if proc is not None:
                            self._record(sid, proc)
                except Exception as exc:     # noqa: BLE001 - retried with backoff
                    log.error("share server %s: restart failed: %s", sid, exc)
                    with self._lock:
                        srv.pending = True
                self._wake()
            if started and self.on_restart is not None and not srv.stop.is_set():
                try:
                    self.on_restart(sid)
                except Exception:            # noqa: BLE001 - the callback's own bug
                    log.exception("share server %s: on_restart failed", sid)
