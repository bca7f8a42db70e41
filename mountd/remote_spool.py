"""A spool on another host: mounting it, and noticing new records on it.

spool_source (host:/path, the storage host's Manager.SpoolExport) is mounted
read-only at spool_dir with nosuid,nodev,noexec, soft (a dead server makes
reads fail, which mountd treats as "spool unavailable, keep every mount",
instead of hanging) and actimeo=0 (a directory's change time is asked of
the server each time, so a new record shows at once).

inotify sees nothing a remote writer does, so SpoolPoller looks at the
change time of the spool directory and of each host directory a few times a
second (a handful of GETATTRs, not one per record) and asks for a pass when
one changed; the pass then reads only names it has not seen (quick scan).
The full rescan every consume_interval stays the safety net.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from sharedd.errors import BackendFailure
from sharedd.mountinfo import MountEntry, read_mountinfo
from sharedd.util import run

from .mounter import nfs_argv

log = logging.getLogger(__name__)

SPOOL_MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "noexec", "soft", "timeo=20", "retrans=2",
                       "actimeo=0", "lookupcache=positive")
#: file system types on which inotify does not see other hosts' writes
NETWORK_FSTYPES = ("nfs", "nfs4", "9p", "cifs", "smb3", "ceph", "afs", "glusterfs")


def mount_of(path: str) -> Optional[MountEntry]:
    """The mount path lives on (the longest mount point above it). Reads
    only /proc: resolving the path could block on a dead server."""
    path = os.path.normpath(os.path.abspath(path))
    best = None
    for e in read_mountinfo():
        mp = e.mount_point
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (
                best is None or len(mp) >= len(best.mount_point)):
            best = e
    return best


def on_network_fs(path: str) -> bool:
    e = mount_of(path)
    return e is not None and (e.fstype in NETWORK_FSTYPES or e.fstype.startswith("fuse."))


def spool_argv(source: str, spool_dir: str) -> List[str]:
    # nfs_argv checks source, mount point and options as for a share
    return nfs_argv(source, spool_dir, "ro", [o for o in SPOOL_MOUNT_OPTIONS
                                              if o not in ("ro", "nosuid", "nodev")])


def ensure_mounted(source: str, spool_dir: str, timeout: float) -> Optional[str]:
    """Mount source at spool_dir unless it is there; None, or why not."""
    spool_dir = os.path.normpath(os.path.abspath(spool_dir))
    e = mount_of(spool_dir)
    if e is not None and e.mount_point == spool_dir:
        if e.fstype in ("nfs", "nfs4") and e.source == source:
            return None
        return f"{spool_dir} is already a mount point ({e.fstype} {e.source}), not of {source}"
    try:
        os.makedirs(spool_dir, mode=0o755, exist_ok=True)
        run(spool_argv(source, spool_dir), timeout=timeout, new_session=True)
    except (OSError, BackendFailure) as exc:
        return f"cannot mount the spool {source} at {spool_dir}: {exc}"
    log.info("mounted the spool %s at %s (read-only)", source, spool_dir)
    return None


class SpoolPoller:
    """Calls on_change (from its own thread) when the spool directory or a
    host directory under it changes; only while the spool is on a network
    file system (checked again every RECHECK seconds)."""

    RECHECK = 5.0

    def __init__(self, spool_dir: str, on_change: Callable[[], None], interval: float):
        self.spool_dir = spool_dir
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: Dict[str, Tuple[int, int, int]] = {}
        self.active = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mountd-spool-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # A thread stuck in a stat of a dead server ends with the soft mount's
        # timeout; it is a daemon thread and never holds up the exit.

    def _snapshot(self) -> Dict[str, Tuple[int, int, int]]:
        out = {}
        st = os.stat(self.spool_dir)
        out[""] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        with os.scandir(self.spool_dir) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    s = entry.stat(follow_symlinks=False)
                    out[entry.name] = (s.st_ino, s.st_mtime_ns, s.st_ctime_ns)
        return out

    def _run(self) -> None:
        next_check = 0.0
        while not self._stop.wait(self.interval if self.active else min(self.RECHECK, 1.0)):
            now = time.monotonic()
            if now >= next_check:
                try:
                    self.active = on_network_fs(self.spool_dir)
                except OSError:
                    self.active = False
                next_check = now + self.RECHECK
            if not self.active:
                continue
            try:
                seen = self._snapshot()
            except OSError:
                seen = {}
            if seen != self._seen:
                self._seen = seen
                self.on_change()
