"""sd_notify for both daemons, never blocking the event loop.

sdnotify writes on a blocking datagram socket: when the supervisor stops
reading (the kernel queue holds only a few messages), a plain send blocks
the whole daemon. Here the socket is non-blocking; what cannot be sent now
waits, in order, and is retried shortly. Only the newest STATUS= and one
WATCHDOG=1 are kept waiting, so the backlog stays a handful of messages.
"""

from __future__ import annotations

import asyncio
import logging
from typing import List, Optional

import sdnotify

log = logging.getLogger(__name__)

RETRY_SECONDS = 0.2


class Notifier:
    def __init__(self) -> None:
        self._sock = sdnotify.SystemdNotifier().socket   # None without NOTIFY_SOCKET
        if self._sock is not None:
            self._sock.setblocking(False)
        self._pending: List[str] = []
        self._retry: Optional[asyncio.TimerHandle] = None

    def notify(self, text: str) -> None:
        if self._sock is None:
            return
        for prefix in ("STATUS=", "WATCHDOG="):
            if text.startswith(prefix):
                self._pending = [p for p in self._pending if not p.startswith(prefix)]
        self._pending.append(text)
        self._flush()

    def _flush(self) -> None:
        self._retry = None
        while self._pending:
            try:
                self._sock.send(self._pending[0].encode())
            except (BlockingIOError, InterruptedError):
                self._later()
                return
            except OSError as exc:   # no supervisor any more: nothing to tell
                log.debug("sd_notify: %s; dropping %d message(s)", exc, len(self._pending))
                self._pending.clear()
                return
            self._pending.pop(0)

    def _later(self) -> None:
        if self._retry is not None:
            return
        try:
            self._retry = asyncio.get_running_loop().call_later(RETRY_SECONDS, self._flush)
        except RuntimeError:   # no loop (start-up or shutdown): the next notify retries
            pass
