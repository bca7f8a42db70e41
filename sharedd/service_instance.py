"""Share servers' runtime: one network namespace per server, with a private
D-Bus and NFS-Ganesha for NFS, its own smbd in a mount namespace of its own
for CIFS (Manila's Generic driver "service instance").

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

CIFS (NetworkInfo.protocols holds "CIFS"; a server serving only CIFS has
no bus and no ganesha):

- Samba keeps its registry, passdb and locks in /var/lib/samba,
  /var/cache/samba and /run/samba whatever smb.conf says, so each such
  server has a persistent mount namespace of its own, the file
  ``<run_dir>/<id>/ns/mnt`` (made with ``unshare --mount=FILE --propagation
  slave`` on ``ns/``, a private bind mount of itself: the namespace file may
  not sit on a mount that propagates). In it those directories and
  /var/log/samba are bind mounts of ``<base_dir>/<id>/samba/{lib,cache,run,
  log}``. It is a slave of the host's namespace: shares mounted later on the
  host reach smbd when mounted under a shared mount (every mount is shared
  under systemd; where / is private, the share mount directory must be made
  shared, and the Samba helper refuses to export a share smbd cannot see).
  Anyone with CAP_SYS_ADMIN and CAP_SYS_CHROOT enters it with ``nsenter
  --mount=FILE``, no access to any process needed (the Samba helper runs
  net, smbcontrol, setfacl, getent there: sharedd.helpers.samba.for_server).
- ``smbd --foreground --no-process-group -s <base>/<id>/smb.conf`` (a
  standalone server on the server's address only, ``include = registry``)
  runs in the server's network namespace and that mount namespace. Registry
  shares persist across its restarts; a restart is reported through
  on_restart all the same. Its helpers samba-dcerpcd and rpcd_* (started on
  demand, in a session of their own, outliving smbd) are found by their
  ``--configfile=`` and, with anything else in the namespace, by
  /proc/PID/mountinfo, which shows the server's /var/lib/samba bind mount
  (mount ids are unique on the host, and mountinfo needs no ptrace access,
  unlike /proc/PID/ns/). Teardown ends them all, then unmounts the file.

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
  sharedd-server-bus@<id>.service, sharedd-server-nfs@<id>.service and
  sharedd-server-smb@<id>.service (KillMode=control-group: smbd's helpers
  stop with it),
  started over systemd's D-Bus API on the real system bus (sharedd's own
  tests point DBUS_SYSTEM_BUS_ADDRESS elsewhere, which is why the private
  bus address reaches ganesha through the units' EnvironmentFile, never
  through sharedd's environment). systemd restarts them; the same pidfd
  watch notices a new ganesha and calls ``on_restart``. Units survive
  sharedd's own restart; children of sharedd.service would not (its
  KillMode=mixed kills the rest of its cgroup), hence "auto" prefers units.

A process is "ours" when its command line names this server's config file
(``--config-file=<base>/<id>/bus.conf``, ``-f <base>/<id>/ganesha.conf``,
``-s <base>/<id>/smb.conf``; smbd's children share its command line, the
main one is the one whose parent is not among them):
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

Measured here (Debian 12, 2 cores): a CIFS-only server's setup ~0.4 s
(namespaces, smbd listening), teardown ~0.3 s. NFS: setup of a server 150-180 ms
(namespace ~45 ms, bus ~25 ms, ganesha ready ~85 ms), teardown 60-140 ms
(ganesha exits on SIGTERM at once); a killed ganesha serves again about a
second later (the first backoff step).
"""

from __future__ import annotations

import contextlib
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
from .mountinfo import MountEntry, parse_mountinfo, read_mountinfo, top_mounts
from .errors import BackendFailure, ConfigError, InvalidArgument
from .util import atomic_write, private_dir, run

log = logging.getLogger(__name__)

MODES = ("auto", "child", "systemd")
BUS_UNIT = "sharedd-server-bus@{}.service"
NFS_UNIT = "sharedd-server-nfs@{}.service"
SMB_UNIT = "sharedd-server-smb@{}.service"
UNITS = {"bus": BUS_UNIT, "nfs": NFS_UNIT, "smb": SMB_UNIT}
#: protocols a server serves -> the kinds of process it runs for them
PROTOCOL_KINDS = {"NFS": ("bus", "nfs"), "CIFS": ("smb",)}
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
#: the units' EnvironmentFile= is /run/sharedd/servers/%i/env
SYSTEMD_RUN_DIR = "/run/sharedd/servers"
#: systemd's API is on the real system bus, whatever DBUS_SYSTEM_BUS_ADDRESS says
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
GANESHA_BUS_NAME = "org.ganesha.nfsd"
NFS_PORT = 2049
SMB_PORT = 445
#: Samba's compiled-in directories (its registry, passdb, locks, logs live
#: there whatever smb.conf says): in a CIFS server's mount namespace each is
#: a bind mount of <base>/<id>/samba/<name>.
SAMBA_DIRS = (("lib", "/var/lib/samba"), ("cache", "/var/cache/samba"),
              ("run", "/run/samba"), ("log", "/var/log/samba"))

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
    protocols: Tuple[str, ...] = ("NFS",)   # of PROTOCOL_KINDS


def _kinds(protocols: Any) -> Tuple[str, ...]:
    """The process kinds serving these protocols, in start order."""
    if isinstance(protocols, str) or not isinstance(protocols, (tuple, list)) or not protocols:
        raise InvalidArgument("a share server's protocols must be a non-empty tuple of "
                              f"{', '.join(PROTOCOL_KINDS)}")
    wanted = set()
    for proto in protocols:
        if not isinstance(proto, str) or proto.upper() not in PROTOCOL_KINDS:
            raise InvalidArgument(f"share servers cannot serve {str(proto)[:40]!r} (only "
                                  f"{', '.join(PROTOCOL_KINDS)})")
        wanted.add(proto.upper())
    return tuple(k for proto in PROTOCOL_KINDS if proto in wanted for k in PROTOCOL_KINDS[proto])


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


def _stat_field(pid: int, field: int) -> int:
    """Field number `field` (1-based, as proc(5) counts) of /proc/PID/stat, 0 if
    gone; the fields after the command name, which may hold spaces, counted
    from its closing parenthesis."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[field - 3])
    except (OSError, ValueError, IndexError):
        return 0


def _ppid(pid: int) -> int:
    return _stat_field(pid, 4)


def _mounts_of(pid: Any = "self") -> List[MountEntry]:
    """The mounts PID sees, [] if it is gone.

    /proc/PID/mountinfo needs no ptrace access to PID (unlike /proc/PID/ns/),
    and its mount ids are unique on the host: a mount belongs to exactly one
    mount namespace, so a mount id seen there names the namespace."""
    try:
        return read_mountinfo(f"/proc/{pid}/mountinfo")
    except OSError:
        return []


def _top_mount(mounts: List[MountEntry], point: str) -> Optional[MountEntry]:
    """The mount on top at point."""
    return top_mounts(mounts).get(point)


def _start_time(pid: int) -> int:
    """The process's start time (field 22 of /proc/PID/stat), 0 if gone."""
    return _stat_field(pid, 22)


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
        self.kind = kind            # "bus", "nfs", "smb" (or "aux": one of smbd's helpers)
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
        self.procs: Dict[str, Optional[_Proc]] = {k: None for k in _kinds(net.protocols)}
        self.smb_started = False                 # smbd (re)started by the last _start_missing
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
                                   + rb"/([0-9a-f]{32})/(bus|ganesha|smb)\.conf")
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
                   for unit in UNITS.values())

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
                "nfs.pid": os.path.join(run_, "nfs.pid"),
                # CIFS: smbd's config and output, Samba's directories (bound
                # at SAMBA_DIRS in the mount namespace), the namespace file
                # (an nsfs bind mount in a private bind mount of ns/)
                "smb_conf": os.path.join(base, "smb.conf"),
                "smb_out": os.path.join(base, "smb.out"),
                "samba": os.path.join(base, "samba"),
                "ns_dir": os.path.join(run_, "ns"),
                "mount_ns": os.path.join(run_, "ns", "mnt"),
                "smb.pid": os.path.join(run_, "smb.pid")}

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
            self._stop(sid, srv, ("smb", "nfs", "bus"))
            netns.destroy(sid)
            _reap_spawned()
            for d in (self._base(sid), self._run(sid)):
                shutil.rmtree(d, ignore_errors=True)
                if os.path.lexists(d):
                    raise BackendFailure(f"share server {sid}: could not remove {d}")
        log.info("share server %s torn down", sid)

    def running(self, server_id: str) -> bool:
        """All of the server's processes are alive (not a readiness check)."""
        sid = _check_id(server_id)
        with self._lock:
            srv = self._servers.get(sid)
        if srv is not None:
            return all(p is not None and not p.exited() for p in srv.procs.values())
        found = [self._find(sid, kind) for kind in self._configured(sid)]
        alive = bool(found) and all(p is not None and not p.exited() for p in found)
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
        kinds = _kinds(net.protocols)
        if self._closed:
            raise BackendFailure("share server runtime is closed")
        _reap_spawned()
        with self._server_lock(sid):
            # Files first (once the network is known to be valid): a
            # namespace of ours always has its directory, so
            # leftovers(owned_only=True) finds what a crash left.
            netns.check(sid, net.attachment, net.address, net.gateway, net.mtu)
            had = self._configured(sid)
            self._write_files(sid, net, kinds)
            ndetails = netns.create(sid, net.attachment, net.address, net.gateway, net.mtu)
            with self._lock:
                srv = self._servers.get(sid) or _Server(net)
            srv.net = net
            # A protocol the server no longer serves: its processes go.
            dropped = tuple(k for k in ("smb", "nfs", "bus") if k not in kinds
                            and (k in srv.procs or k in had))
            if dropped:
                log.info("share server %s: no longer serving %s; stopping it", sid,
                         ", ".join(dropped))
                self._stop(sid, srv, dropped)
            for k in kinds:
                srv.procs.setdefault(k, None)
            recorded = self._recorded(sid, "nfs")
            started = self._start_missing(srv, None)
            nfs = srv.procs.get("nfs")
            # A ganesha other than the one recorded when it was last handed
            # out (systemd restarted it while sharedd was away) has lost its
            # exports as surely as one started now.
            if "nfs" in kinds:
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
        details = dict(ndetails, server_id=sid, mode=self.mode,
                       protocols=[p for p in PROTOCOL_KINDS if set(PROTOCOL_KINDS[p]) <= set(kinds)])
        if "nfs" in kinds:
            details["bus_address"] = self.bus_address(sid)
        if "smb" in kinds:
            p = self._paths(sid)
            details.update(samba_conf=p["smb_conf"], mount_ns=p["mount_ns"])
        return details, started

    def _configured(self, sid: str) -> Tuple[str, ...]:
        """The kinds of process the server's files say it runs."""
        p = self._paths(sid)
        return tuple((["bus", "nfs"] if os.path.exists(p["ganesha_conf"]) else [])
                     + (["smb"] if os.path.exists(p["smb_conf"]) else []))

    def _write_files(self, sid: str, net: NetworkInfo, kinds: Tuple[str, ...]) -> None:
        p = self._paths(sid)
        os.makedirs(self.base_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        private_dir(self._base(sid))
        private_dir(self._run(sid))
        files = {
            p["env"]: (f"SHAREDD_SERVER_ID={sid}\n"
                       f"SHAREDD_BUS_CONF={p['bus_conf']}\n"
                       f"SHAREDD_GANESHA_CONF={p['ganesha_conf']}\n"
                       f"SHAREDD_GANESHA_LOG={p['ganesha_log']}\n"
                       f"SHAREDD_GANESHA_PID={p['ganesha_pid']}\n"
                       f"SHAREDD_SMB_CONF={p['smb_conf']}\n"
                       f"SHAREDD_MOUNT_NS={p['mount_ns']}\n"
                       f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={p['socket']}\n"),
        }
        if "nfs" in kinds:
            private_dir(p["recovery"])
            files[p["ganesha_conf"]] = self._ganesha_conf(p)
            files[p["bus_conf"]] = self._bus_conf(p)
        else:
            for path in (p["ganesha_conf"], p["bus_conf"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if "smb" in kinds:
            files[p["smb_conf"]] = self._smb_conf(net)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p["smb_conf"])
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
    def _smb_conf(net: NetworkInfo) -> str:
        address = net.address.split("/", 1)[0]
        return f"""# Written by sharedd for one share server; rewritten at each start.
# smbd runs in the server's network namespace and in a mount namespace of
# its own, where /var/lib/samba, /var/cache/samba, /run/samba and
# /var/log/samba are this server's directories: its registry (shares, added
# at run time with net conf), passdb and locks are nobody else's.
[global]
  server role = standalone server
  workgroup = SHAREDD
  interfaces = {address}
  bind interfaces only = yes
  disable netbios = yes
  smb ports = {SMB_PORT}
  passdb backend = tdbsam
  map to guest = never
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  log level = 1
  include = registry
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
        """Adopt or start the server's processes; wait until they serve.
        True if ganesha was started (its runtime exports are gone); whether
        smbd was (its registry shares persist) is left in srv.smb_started."""
        srv.smb_started = False
        started = False
        if "nfs" in srv.procs:
            started = self._start_missing_nfs(srv, stop)
        if "smb" in srv.procs:
            srv.smb_started = self._start_missing_smb(srv, stop)
        return started

    def _start_missing_smb(self, srv: _Server, stop: Optional[threading.Event]) -> bool:
        sid = srv.net.server_id
        mnt_id = self._ensure_mount_ns(sid)
        smb = self._alive(srv, "smb")
        if smb is not None and not self._in_mount_ns(smb.pid, mnt_id):
            # The namespace was made anew (its file was lost): this smbd
            # serves an old one that sharedd's commands no longer reach.
            log.warning("share server %s: smbd %s is in another mount namespace; "
                        "restarting it", sid, smb)
            self._drop(srv, "smb", smb)
            smb = None
        if smb is not None and not self._smb_serving(smb, stop, min(5.0, self.start_timeout)):
            log.warning("share server %s: smbd %s does not serve; restarting it", sid, smb)
            self._drop(srv, "smb", smb)
            smb = None
        if smb is not None:
            return False
        srv.procs["smb"] = self._start(sid, "smb", stop)
        return True

    def _drop(self, srv: _Server, kind: str, proc: _Proc) -> None:
        """Forget the server's process of this kind (first: its exit is then
        no news to recover) and stop it."""
        srv.procs[kind] = None
        self._terminate([proc])
        self._retire([proc])

    def _smb_serving(self, proc: _Proc, stop: Optional[threading.Event], grace: float) -> bool:
        deadline = time.monotonic() + grace
        while True:
            if proc.exited():
                return False
            if _listening(proc.pid, SMB_PORT):
                return True
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.05)

    def _start_missing_nfs(self, srv: _Server, stop: Optional[threading.Event]) -> bool:
        sid = srv.net.server_id
        bus = self._alive(srv, "bus")
        nfs = self._alive(srv, "nfs")
        if bus is None:
            if nfs is not None:
                # Its bus connection died with the old bus: it cannot be
                # reached for exports any more.
                log.warning("share server %s: bus gone, restarting ganesha %s", sid, nfs)
                self._drop(srv, "nfs", nfs)
                nfs = None
            bus = srv.procs["bus"] = self._start(sid, "bus", stop)
        grace = min(5.0, self.start_timeout)
        if nfs is not None and not self._serving(sid, nfs, stop, grace):
            log.warning("share server %s: ganesha %s does not serve; restarting it", sid, nfs)
            self._drop(srv, "nfs", nfs)
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
            if proc is not None and kind in ("nfs", "smb") \
                    and not self._in_server_netns(sid, proc.pid):
                log.warning("share server %s: %s is in another network namespace; "
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

    # ------------------------------------------------------------ mount namespace (CIFS)
    def _cmd(self, argv: List[str], check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        return run(argv, timeout=self.command_timeout, check=check, env={"PATH": CHILD_PATH})

    def _ensure_mount_ns(self, sid: str) -> int:
        """The server's mount namespace, made or completed; the mount id of
        its /var/lib/samba bind mount (which names the namespace).

        The namespace lives as long as the file <run>/<id>/ns/mnt is a bind
        mount of it (no process holds it): sharedd and units enter it with
        nsenter --mount=FILE, which needs no access to any process. unshare
        can bind it only onto a mount that does not propagate (else the new
        namespace would receive a mount of itself), hence ns/ is a private
        bind mount of itself. The namespace is a slave of the host's: shares
        mounted later on the host under a shared mount reach smbd (under
        systemd every mount is shared), its own bind mounts never leave it."""
        p = self._paths(sid)
        for name, target in SAMBA_DIRS:
            d = os.path.join(p["samba"], name)
            os.makedirs(d, mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)              # smbd checks the modes of its directories
            os.makedirs(target, mode=0o755, exist_ok=True)   # the mount point
        private_dir(os.path.join(p["samba"], "lib", "private"))
        private_dir(p["ns_dir"])
        host = _mounts_of()
        if _top_mount(host, p["ns_dir"]) is None:
            self._cmd(["mount", "--bind", p["ns_dir"], p["ns_dir"]])
        # Always: a crash between the two commands leaves it shared.
        self._cmd(["mount", "--make-private", p["ns_dir"]])
        top = _top_mount(host, p["mount_ns"])
        if top is None or top.fstype != "nsfs":
            with open(p["mount_ns"], "a"):
                pass
            self._make_mount_ns(sid, p["mount_ns"])
            log.info("share server %s: mount namespace %s made", sid, p["mount_ns"])
        inside = self._ns_mountinfo(sid)
        for name, target in SAMBA_DIRS:
            top = _top_mount(inside, target)
            if top is None or not top.root.endswith(f"/{sid}/samba/{name}"):
                self._cmd([self._executable("nsenter"), f"--mount={p['mount_ns']}", "--",
                           "mount", "--bind", os.path.join(p["samba"], name), target])
                inside = self._ns_mountinfo(sid)
        top = _top_mount(inside, SAMBA_DIRS[0][1])
        if top is None:
            raise BackendFailure(f"share server {sid}: {SAMBA_DIRS[0][1]} is not bound in its "
                                 "mount namespace")
        return top.mount_id

    def _make_mount_ns(self, sid: str, path: str) -> None:
        """A new mount namespace (a slave of this one), bound at path.

        The kernel binds a mount namespace's file only in a namespace with a
        lower id (mnt_ns_loop; EINVAL otherwise). Since Linux 6.18 namespace
        ids come from per-CPU batches (gen_cookie_next): they grow on each
        CPU but not across CPUs, so a namespace unshare makes now on another
        CPU than the one that made sharedd's may get a lower id and the bind
        fails. sharedd's namespace is the initial one (lowest id) on a real
        host, not in a container. On the CPU that made sharedd's namespace
        every new id is higher, so after a refused bind the command is
        retried pinned to each CPU in turn (taskset; only that short-lived
        command, whatever CPUAffinity= sharedd has)."""
        argv = [self._executable("unshare"), f"--mount={path}", "--propagation", "slave",
                "true"]
        try:
            self._cmd(argv)
            return
        except BackendFailure as exc:
            if "Invalid argument" not in str(exc):
                raise
            first = exc
        for cpu in range(os.cpu_count() or 1):
            if self._cmd([self._executable("taskset"), "--cpu-list", str(cpu)] + argv,
                         check=False).returncode == 0:
                log.info("share server %s: mount namespace bound from CPU %d (per-CPU "
                         "namespace ids, Linux 6.18)", sid, cpu)
                return
        raise first

    def _ns_mountinfo(self, sid: str) -> List[MountEntry]:
        proc = self._cmd([self._executable("nsenter"), f"--mount={self._paths(sid)['mount_ns']}",
                          "--", "cat", "/proc/self/mountinfo"])
        return parse_mountinfo(proc.stdout.decode(errors="surrogateescape"))

    @staticmethod
    def _in_mount_ns(pid: int, mnt_id: int) -> bool:
        return any(m.mount_id == mnt_id and m.mount_point == SAMBA_DIRS[0][1]
                   for m in _mounts_of(pid))

    @staticmethod
    def _in_any_mount_ns_of(pid: int, sid: str) -> bool:
        """pid sees a /var/lib/samba of this server: it is in one of its
        mount namespaces (the current one, or one whose file was lost)."""
        suffix = f"/{sid}/samba/{SAMBA_DIRS[0][0]}"
        return any(m.mount_point == SAMBA_DIRS[0][1] and m.root.endswith(suffix)
                   for m in _mounts_of(pid))

    def _ns_members(self, sid: str, known: List[_Proc]) -> List[_Proc]:
        """Every process (not in known) in one of the server's mount namespaces."""
        pids = {p.pid for p in known}
        out = []
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in pids or pid == me or not self._in_any_mount_ns_of(pid, sid):
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except (ProcessLookupError, OSError):
                continue
            if not self._in_any_mount_ns_of(pid, sid):     # the PID was reused meanwhile
                os.close(pidfd)
                continue
            out.append(_Proc("aux", pid, pidfd, time.monotonic()))
        return out

    def _remove_mount_ns(self, sid: str) -> None:
        """Unmount the namespace file and its private directory (the
        namespace dies with its last process and mount)."""
        p = self._paths(sid)
        for path in (p["mount_ns"], p["ns_dir"]):
            for _ in range(16):          # stacked by repeated half-done set-ups
                if _top_mount(_mounts_of(), path) is None:
                    break
                self._cmd(["umount", path], check=False)
            if _top_mount(_mounts_of(), path) is not None:
                raise BackendFailure(f"share server {sid}: could not unmount {path}")

    def _stop(self, sid: str, srv: Optional[_Server], kinds: Tuple[str, ...]) -> None:
        """Stop the server's processes of these kinds: units, known ones and
        strays; for smb also its helpers (samba-dcerpcd, rpcd_*) and whatever
        else runs in its mount namespace, and the namespace itself."""
        if self.mode == "systemd":
            self._systemd_stop(sid, kinds)
        procs = []
        if srv is not None:
            for kind in kinds:
                proc = srv.procs.pop(kind, None)
                if proc is not None:
                    procs.append(proc)
        for kind in kinds:
            procs += self._strays(sid, kind, procs)
        if "smb" in kinds:
            smb = [p for p in procs if p.kind == "smb"]
            self._terminate(smb)
            # smbd's helpers outlive it (samba-dcerpcd starts a session of
            # its own): by their command line, then by their namespace.
            rest = self._strays(sid, "aux", procs)
            paths = self._paths(sid)
            if smb or rest or os.path.lexists(paths["ns_dir"]) \
                    or os.path.lexists(paths["samba"]):
                rest += self._ns_members(sid, procs + rest)
            procs += rest
            self._terminate(rest)
            if os.path.lexists(paths["ns_dir"]):
                self._remove_mount_ns(sid)
        # ganesha first: it must not outlive its bus by long, nor the bus it.
        self._terminate([p for p in procs if p.kind == "nfs"])
        self._terminate([p for p in procs if p.kind == "bus"])
        self._retire(procs)
        _reap_spawned()

    # ------------------------------------------------------------ processes
    def _executable(self, name: str) -> str:
        if name not in self._exe:
            path = shutil.which(name, path=CHILD_PATH)
            if path is None:
                pkg = {"ganesha.nfsd": "nfs-ganesha and nfs-ganesha-vfs",
                       "dbus-daemon": "dbus", "nsenter": "util-linux", "unshare": "util-linux",
                       "taskset": "util-linux",
                       "smbd": "samba"}.get(name, name)
                raise BackendFailure(f"{name} is not installed (package {pkg})")
            self._exe[name] = path
        return self._exe[name]

    def _argv(self, sid: str, kind: str) -> List[str]:
        p = self._paths(sid)
        if kind == "bus":
            return [self._executable("dbus-daemon"), "--nofork", "--nopidfile",
                    f"--config-file={p['bus_conf']}"]
        if kind == "smb":
            # Both namespaces: the network's and the server's own mount
            # namespace (its registry). nsenter execs smbd: the PID is smbd's.
            return [self._executable("nsenter"), f"--net={netns.netns_path(sid)}",
                    f"--mount={p['mount_ns']}", "--",
                    self._executable("smbd"), "--foreground", "--no-process-group",
                    "--debug-stdout", "-s", p["smb_conf"]]
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
        if kind == "smb" and self.mode == "child":
            # A dead smbd's samba-dcerpcd and rpcd_* would serve the new one
            # with the old one's state: a fresh start.
            strays += self._strays(sid, "aux", strays)
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
        out = {"bus": p["bus_log"], "nfs": p["ganesha_out"], "smb": p["smb_out"]}[kind]
        for path in ([out, p["ganesha_log"]] if kind == "nfs" else [out]):
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
        names = {"bus": "dbus-daemon", "nfs": "ganesha.nfsd", "smb": "smbd"}
        while True:
            if proc.kind == "bus":
                if self._bus_ready(sid):
                    return
            elif proc.kind == "smb":
                if self._smb_serving(proc, stop, grace=0):
                    return
            elif self._serving(sid, proc, stop, grace=0):
                return
            logs = {"bus": [p["bus_log"]], "nfs": [p["ganesha_out"], p["ganesha_log"]],
                    "smb": [p["smb_out"]]}[proc.kind]
            if proc.exited():
                name = names[proc.kind]
                raise BackendFailure(f"share server {sid}: {name} exited at start:\n"
                                     f"{_log_tail(logs)}")
            if stop is not None and stop.is_set():
                raise BackendFailure(f"share server {sid}: start of {proc} interrupted")
            if time.monotonic() >= deadline:
                what = {"bus": "its private bus did not accept connections",
                        "nfs": f"ganesha did not own {GANESHA_BUS_NAME} and listen on TCP "
                               f"{NFS_PORT}",
                        "smb": f"smbd did not listen on TCP {SMB_PORT}"}[proc.kind]
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
        # smbd's children share its command line: the main one has no
        # parent among them.
        pids = self._scan().get((sid, kind), [])
        for pid in sorted(pids, key=lambda pid: _ppid(pid) in pids):
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
        elif exe in (b"ganesha.nfsd", b"smbd", b"nsenter"):   # nsenter: just before its exec
            for i, a in enumerate(argv[1:-1], 1):
                if a in (b"-f", b"-s"):
                    m = self._conf_re.fullmatch(argv[i + 1])
                    if m and (a, m.group(2)) == (b"-f", b"ganesha"):
                        return m.group(1).decode(), "nfs"
                    if m and (a, m.group(2)) == (b"-s", b"smb"):
                        return m.group(1).decode(), "smb"
        elif exe == b"samba-dcerpcd" or exe.startswith(b"rpcd_"):
            # smbd's RPC helpers (started on demand; they outlive smbd)
            for a in argv[1:]:
                if a.startswith(b"--configfile="):
                    m = self._conf_re.fullmatch(a[len(b"--configfile="):])
                    if m and m.group(2) == b"smb":
                        return m.group(1).decode(), "aux"
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
        return UNITS[kind].format(sid)

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
        logs = [p["ganesha_log"]] if kind == "nfs" else []
        raise BackendFailure(f"share server {sid}: {unit} did not start (see journalctl -u "
                             f"{unit}):\n{_log_tail(logs)}")

    def _systemd_stop(self, sid: str, kinds: Tuple[str, ...] = ("smb", "nfs", "bus")) -> None:
        # KillMode=control-group: a unit's stop ends every process of its
        # cgroup (smbd's samba-dcerpcd and rpcd_* too).
        for kind in kinds:
            unit = self._unit(sid, kind)
            self._manager("StopUnit", "ss", unit, "replace", check=False)
        deadline = time.monotonic() + 3 * STOP_TIMEOUT
        for kind in kinds:
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
                # ganesha's death loses its exports; smbd's loses nothing (its
                # shares are in the registry), but reporting it is harmless.
                died = any(p is None or p.exited()
                           for p in (srv.procs[k] for k in ("nfs", "smb") if k in srv.procs))
                try:
                    if not netns.exists(sid):        # removed behind our back
                        net = srv.net
                        netns.create(sid, net.attachment, net.address, net.gateway, net.mtu)
                    # systemd may have brought a new ganesha up by itself: that
                    # one has no exports either.
                    started = self._start_missing(srv, srv.stop) or srv.smb_started or died
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
