"""inotify on the spool directory and every host subdirectory (pyinotify,
driven by the asyncio loop). The periodic rescan lives in the daemon: inotify
sees nothing written by another host on a network file system.

The spool directory's parent is watched for the spool directory's name, so a
spool directory created (again) after start is watched at once. Whoever may
write the spool directory must not be able to spend root's inotify watches:
only host directories that could hold records mountd reads (trusted owner,
not group/other-writable, not a symlink, a valid host id as name) are
watched, and at most max_watches in all; the rescan still covers the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from typing import Callable, Dict, Optional, Sequence, Set

import pyinotify

from sharedd.record import HOST_ID_RE

from .remote_spool import on_network_fs

log = logging.getLogger(__name__)

# IN_MOVED_FROM lets pyinotify follow renames between watched directories.
_DIR_MASK = (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_MOVED_FROM
             | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_ONLYDIR
             | pyinotify.IN_DONT_FOLLOW)
_HOST_MASK = (pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE_SELF
              | pyinotify.IN_MOVE_SELF | pyinotify.IN_ONLYDIR | pyinotify.IN_DONT_FOLLOW)
_PARENT_MASK = (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_MOVED_FROM
                | pyinotify.IN_ONLYDIR)
_ARRIVED = pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO
_GONE = pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED
#: refused host directories named in the log (more are refused silently)
_REFUSED_LOGGED = 10

#: default cap on the watches one SpoolWatcher holds (spool dir + host dirs)
MAX_WATCHES = 1024


class SpoolWatcher:
    def __init__(self, spool_dir: str, on_change: Callable[[str], None],
                 loop: asyncio.AbstractEventLoop, *,
                 allowed_uids: Optional[Sequence[int]] = None,
                 max_watches: int = MAX_WATCHES):
        """allowed_uids: owners a host directory must have to be watched
        (None: any owner); max_watches: watches on the spool directory and
        host directories together."""
        self.spool_dir = os.path.normpath(os.path.abspath(spool_dir))
        self.parent_dir = os.path.dirname(self.spool_dir)
        self.on_change = on_change
        self.loop = loop
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.max_watches = max_watches
        self.wm = pyinotify.WatchManager()
        self.notifier: Optional[pyinotify.AsyncioNotifier] = None
        self.watched: Dict[str, int] = {}     # path -> watch descriptor
        self._parent_wd: Optional[int] = None
        self._cap_warned = False
        self._refused: Set[str] = set()       # host dirs already logged as not watched

    def start(self) -> None:
        self.notifier = pyinotify.AsyncioNotifier(self.wm, self.loop,
                                                  default_proc_fun=self._event)
        self.ensure_watches()

    def stop(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
            self.notifier = None
        self.watched.clear()
        self._parent_wd = None

    def _add(self, path: str, mask: int) -> None:
        if path in self.watched:
            return
        if len(self.watched) >= self.max_watches:
            if not self._cap_warned:
                self._cap_warned = True
                log.warning("not watching more than %d directories in %s (max_watches); "
                            "the periodic rescan covers %s and the rest",
                            self.max_watches, self.spool_dir, path)
            return
        result = self.wm.add_watch(path, mask, quiet=True)
        wd = result.get(path, -1)
        if wd < 0:
            log.warning("cannot watch %s (the periodic rescan still covers it)", path)
            return
        self.watched[path] = wd

    def _trusted_host_dir(self, name: str, path: str) -> bool:
        """Could the records in path be read at all? Else a watch on it only
        spends a watch (the reader refuses such directories anyway)."""
        if re.fullmatch(HOST_ID_RE, name) is None:
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False        # a symlink, or a file
        why = ""
        if self.allowed_uids is not None and st.st_uid not in self.allowed_uids:
            why = f"owned by uid {st.st_uid}"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            why = f"writable by group or others (mode {st.st_mode & 0o7777:o})"
        if why:
            if path not in self._refused and len(self._refused) <= _REFUSED_LOGGED:
                self._refused.add(path)
                if len(self._refused) > _REFUSED_LOGGED:
                    log.warning("not watching further untrusted host directories in %s "
                                "(not logged)", self.spool_dir)
                else:
                    log.warning("not watching host directory %s: %s", path, why)
            return False
        return True

    def _watch_parent(self) -> None:
        # pyinotify logs every failed add_watch: try only what exists.
        if self._parent_wd is not None or not os.path.isdir(self.parent_dir):
            return
        result = self.wm.add_watch(self.parent_dir, _PARENT_MASK, quiet=True)
        wd = result.get(self.parent_dir, -1)
        if wd >= 0:
            self._parent_wd = wd

    def ensure_watches(self) -> None:
        """Watch the spool dir's parent, the spool dir and every trusted host
        dir; called at start and on rescans. Not on a network file system:
        inotify sees nothing there, and listing it from the event loop would
        block the loop while its server is away."""
        self._watch_parent()
        if on_network_fs(self.spool_dir) or not os.path.isdir(self.spool_dir):
            return
        self._add(self.spool_dir, _DIR_MASK)
        try:
            names = os.listdir(self.spool_dir)
        except OSError:
            return
        for name in sorted(names):
            path = os.path.join(self.spool_dir, name)
            if path not in self.watched and self._trusted_host_dir(name, path):
                self._add(path, _HOST_MASK)

    def _forget(self, wd: int, moved: bool) -> None:
        """The watch wd is gone (deleted directory) or follows a directory
        moved elsewhere (the kernel keeps that watch: remove it)."""
        path = next((p for p, w in self.watched.items() if w == wd), None)
        if path is None:
            return
        del self.watched[path]
        drop = [wd] if moved else []
        if path == self.spool_dir:
            # Host dirs of a moved spool dir are no longer in the spool dir.
            for host_path, host_wd in list(self.watched.items()):
                if os.path.dirname(host_path) == self.spool_dir:
                    del self.watched[host_path]
                    drop.append(host_wd)
        if drop:
            self.wm.rm_watch(drop, quiet=True)
        if path == self.spool_dir:
            log.info("spool directory %s went away; watching for it to come back",
                     self.spool_dir)
            if os.path.isdir(self.spool_dir):   # replaced already (renamed over it)
                self._spool_appeared()

    def _spool_appeared(self) -> None:
        self.ensure_watches()
        self.on_change(self.spool_dir)

    def _event(self, event: pyinotify.Event) -> None:
        mask = event.mask
        if mask & pyinotify.IN_Q_OVERFLOW:
            self.on_change(self.spool_dir)     # events were lost: rescan
            return
        if event.wd == self._parent_wd:
            if mask & pyinotify.IN_IGNORED:
                self._parent_wd = None         # the parent went; rescans retry
            elif (mask & _ARRIVED and event.dir
                  and event.name == os.path.basename(self.spool_dir)):
                self._spool_appeared()
            return
        if mask & _GONE:
            self._forget(event.wd, moved=bool(mask & pyinotify.IN_MOVE_SELF))
            return
        name = event.name or ""
        if not name or name.startswith("."):
            return
        if event.wd == self.watched.get(self.spool_dir):
            if event.dir:
                if mask & _ARRIVED and self._trusted_host_dir(name, event.pathname):
                    self._add(event.pathname, _HOST_MASK)   # a new sharedd host
                self.on_change(event.pathname)
            return
        if not event.dir:
            self.on_change(event.pathname)
