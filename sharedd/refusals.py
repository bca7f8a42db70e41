"""Refusals logged sparingly: whoever may send us something we refuse
(any local user on the bus, a writer of the spool) may send it as fast as
they like, and a log line each would flood the journal, whose rate limit
then drops the daemon's other lines too."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Dict, Optional, Set, Tuple

log = logging.getLogger(__name__)

#: at most one log line per caller per this many seconds
REFUSAL_LOG_INTERVAL = 60.0
#: callers remembered (oldest forgotten first)
REFUSAL_LOG_CALLERS = 1024
#: lines per interval for all callers together; the rest are told in one
#: line at the interval's end (a caller that opens a new connection for
#: each call is a new caller each time)
REFUSAL_LOG_LINES = 20


def printable(text: Any, limit: int = 160) -> str:
    """Caller-supplied text for a log line: control characters escaped, cut short."""
    s = str(text)
    cut = s[:limit].encode("unicode_escape").decode("ascii")
    return cut + (f"... ({len(s)} characters)" if len(s) > limit else "")


class Lines:
    """At most REFUSAL_LOG_LINES lines an interval for everything refused of
    one kind; the refusals beyond are told in one line at the interval's end
    (where no event loop runs: at the first tick() or line after it)."""

    def __init__(self, noun: str, level: int = logging.INFO) -> None:
        self.noun = noun                # what is refused ("message", "spool file")
        self.level = level
        self._began = float("-inf")     # this interval's first line
        self._lines = 0
        self._held = 0                  # refusals beyond this interval's lines
        self._held_from: Set[str] = set()
        self._flush: Optional[asyncio.TimerHandle] = None

    def take(self, sender: str, count: int = 1) -> bool:
        """Whether a line about count refusals of sender's may be logged now;
        if not, they are counted into the interval's last line."""
        now = time.monotonic()
        if now - self._began >= REFUSAL_LOG_INTERVAL:
            self.flush()
            self._began, self._lines = now, 0
        self._lines += 1
        if self._lines <= REFUSAL_LOG_LINES:
            return True
        self._held += count
        if len(self._held_from) < REFUSAL_LOG_CALLERS:
            self._held_from.add(sender)
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False
            self._flush = loop.call_later(
                max(0.0, self._began + REFUSAL_LOG_INTERVAL - time.monotonic()), self.flush)
        return False

    def tick(self) -> None:
        """Where no event loop runs (a thread's work): the refusals held back,
        once their interval is over."""
        if self._held and time.monotonic() - self._began >= REFUSAL_LOG_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """The refusals held back, in one line."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._held:
            senders = len(self._held_from)
            log.log(self.level, "refused %d more %s(s) from %s sender(s), not logged one by "
                    "one (at most %d lines every %gs)", self._held, self.noun,
                    f"{senders}+" if senders >= REFUSAL_LOG_CALLERS else senders,
                    REFUSAL_LOG_LINES, REFUSAL_LOG_INTERVAL)
            self._held = 0
            self._held_from.clear()


class RefusalLog:
    """Refused calls, logged sparingly. A caller's first refusal in an
    interval is a line and its later ones are counted into its next line;
    all callers together have Lines' few lines an interval."""

    def __init__(self, noun: str) -> None:
        self.lines = Lines(noun)
        self._callers: Dict[str, Tuple[float, int]] = {}   # caller: (its last line, since)

    def refused(self, caller: str, what: str, error: str, text: str) -> None:
        """caller: who sent it (a unique bus name); what: the call; error:
        the error's name; text: the error's (caller-supplied parts are
        escaped here)."""
        now = time.monotonic()
        last, count = self._callers.pop(caller, (float("-inf"), 0))
        count += 1
        if now - last < REFUSAL_LOG_INTERVAL:
            self._callers[caller] = (last, count)      # told in its next line
        else:
            if self.lines.take(caller, count):
                log.info("refused %d %s(s) from %s in the last %gs; the latest %s: %s: %s",
                         count, self.lines.noun, printable(caller, 40), REFUSAL_LOG_INTERVAL,
                         what, printable(error, 120), printable(text, 400))
            self._callers[caller] = (now, 0)
        while len(self._callers) > REFUSAL_LOG_CALLERS:
            self._callers.pop(next(iter(self._callers)))
