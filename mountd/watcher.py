"""inotify on the spool directory and every host subdirectory (pyinotify,
driven by the asyncio loop). The periodic rescan lives in the daemon: inotify
sees nothing written by another host on a network file system."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Optional

import pyinotify

log = logging.getLogger(__name__)

_DIR_MASK = (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO | pyinotify.IN_DELETE_SELF
             | pyinotify.IN_MOVE_SELF | pyinotify.IN_ONLYDIR)
_HOST_MASK = (pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE | pyinotify.IN_DELETE_SELF
              | pyinotify.IN_ONLYDIR)


class SpoolWatcher:
    def __init__(self, spool_dir: str, on_change: Callable[[str], None],
                 loop: asyncio.AbstractEventLoop):
        self.spool_dir = spool_dir
        self.on_change = on_change
        self.loop = loop
        self.wm = pyinotify.WatchManager()
        self.notifier: Optional[pyinotify.AsyncioNotifier] = None
        self.watched: dict = {}       # path -> watch descriptor

    def start(self) -> None:
        self.notifier = pyinotify.AsyncioNotifier(self.wm, self.loop,
                                                  default_proc_fun=self._event)
        self.ensure_watches()

    def stop(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
            self.notifier = None
        self.watched.clear()

    def _add(self, path: str, mask: int) -> None:
        if path in self.watched:
            return
        result = self.wm.add_watch(path, mask, quiet=True)
        wd = result.get(path, -1)
        if wd < 0:
            log.warning("cannot watch %s (the periodic rescan still covers it)", path)
            return
        self.watched[path] = wd

    def ensure_watches(self) -> None:
        """Watch the spool dir and every host dir; called at start and on rescans."""
        if not os.path.isdir(self.spool_dir):
            return
        self._add(self.spool_dir, _DIR_MASK)
        try:
            names = os.listdir(self.spool_dir)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.spool_dir, name)
            if not name.startswith(".") and os.path.isdir(path) and not os.path.islink(path):
                self._add(path, _HOST_MASK)

    def _event(self, event: pyinotify.Event) -> None:
        if event.mask & (pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED):
            self.watched.pop(event.path, None)
            return
        name = event.name or ""
        if not name or name.startswith("."):
            return
        if event.path == self.spool_dir:
            if event.dir:
                self._add(event.pathname, _HOST_MASK)   # a new sharedd host
                self.on_change(event.pathname)
            return
        if not event.dir:
            self.on_change(event.pathname)
