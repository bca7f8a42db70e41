"""Who changed what: one audit record per state-changing call, refused or not
(a uid's refused calls beyond REFUSED_RECORDS a minute are counted into one;
a call refused unread, its body too large to decode, is not a call here:
it is logged with the other refusals, sharedd.bus.reading).

The caller is whoever the bus says sent the message: its uid and pid from
the bus daemon (org.freedesktop.DBus.GetConnectionCredentials, asked once
per connection: a unique name is never reused), and the systemd unit that
pid runs in (read from /proc/<pid>/cgroup). The record goes to journald as
structured fields over its native socket::

    MESSAGE=CreateShare /org/sharedd/Sharedd1 by uid 1001 (pid 4242, unit
            ssh.service): ok
    SHAREDD_CALLER_UID=1001  SHAREDD_CALLER_PID=4242
    SHAREDD_CALLER_UNIT=ssh.service  SHAREDD_METHOD=CreateShare
    SHAREDD_OBJECT=/org/sharedd/Sharedd1  SHAREDD_ARGS=...  SHAREDD_RESULT=ok

(``journalctl -u sharedd SHAREDD_CALLER_UID=1001``). Without a journal (a
test bus, a container without journald) the same text goes to the log.
Arguments are the caller's: escaped and cut short, never trusted as text.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import os
import re
import socket
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dbus_next.constants import MessageType
from dbus_next.message import Message

from ..refusals import printable

log = logging.getLogger("sharedd.audit")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: connections whose credentials are kept (a busy host has few callers)
MAX_CALLERS = 1024
#: refused calls of one uid recorded one by one in an interval; the others
#: are counted into one record at its end (any local user may be refused
#: as fast as the bus carries calls: journald's rate limit would then drop
#: the records of real changes)
REFUSED_RECORDS = 10
REFUSED_INTERVAL = 60.0
_UNIT_RE = re.compile(r"/([A-Za-z0-9:_.@\\-]{1,200}\.(?:service|scope))(?:/|$)")

#: (connection, sender) of the method call being handled: set by the
#: connection around each incoming message, read by the interfaces' wrapper
CALL: contextvars.ContextVar[Optional[Tuple[Any, str]]] = contextvars.ContextVar(
    "sharedd_call", default=None)


def unit_of(pid: int) -> str:
    """The systemd unit (service or scope) a process runs in; "" if unknown."""
    try:
        with open(f"/proc/{int(pid)}/cgroup", "rb") as f:
            return unit_in(f.read(8192).decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        return ""


def unit_in(cgroups: str) -> str:
    """The outermost unit of a /proc/<pid>/cgroup text: the one the system's
    manager made. The cgroups under it may be delegated to the unit's user
    (user@1000.service/app.slice/cron.service is user 1000's own manager's
    naming, not the system's cron)."""
    for line in cgroups.splitlines():
        if line.startswith("0::"):
            units: List[str] = _UNIT_RE.findall(line[3:])
            return units[0] if units else ""
    return ""


def describe_args(args: Sequence[Any]) -> str:
    """The call's arguments, bounded: text escaped, options as key=value."""
    parts = []
    for a in list(args)[:8]:
        if isinstance(a, dict):
            inner = []
            for k, v in list(a.items())[:8]:
                value = getattr(v, "value", v)
                if isinstance(value, (str, int, float, bool)):
                    inner.append(f"{printable(k, 40)}={printable(value, 80)}")
                else:
                    inner.append(f"{printable(k, 40)}=...")
            parts.append("{" + ", ".join(inner) + "}")
        elif isinstance(a, (str, int, float, bool)):
            parts.append(printable(a, 120))
        else:
            parts.append("...")
    return " ".join(parts)


class Auditor:
    """Writes audit records for one bus connection's callers."""

    def __init__(self, bus: Any, journal: str = JOURNAL_SOCKET):
        self.bus = bus
        self.journal = journal
        self._creds: "collections.OrderedDict[str, Tuple[int, int, str]]" = \
            collections.OrderedDict()
        self._sock: Optional[socket.socket] = None
        # uid: [interval's start, recorded, held back, the latest held back]
        self._refused: Dict[int, List[Any]] = {}

    async def caller(self, sender: str) -> Tuple[int, int, str]:
        """(uid, pid, unit) of a unique bus name; (-1, -1, "") if the bus
        cannot say (the caller is gone)."""
        known = self._creds.get(sender)
        if known is not None:
            self._creds.move_to_end(sender)
            return known
        uid = pid = -1
        try:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionCredentials",
                signature="s", body=[sender]))
            if reply.message_type == MessageType.METHOD_RETURN:
                creds: Dict[str, Any] = reply.body[0]
                uid = int(getattr(creds.get("UnixUserID"), "value", -1))
                pid = int(getattr(creds.get("ProcessID"), "value", -1))
        except Exception as exc:   # the record still goes out, without credentials
            log.warning("no credentials for %s: %s", printable(sender, 80), exc)
        found = (uid, pid, unit_of(pid) if pid > 0 else "")
        if uid >= 0:
            self._creds[sender] = found
            while len(self._creds) > MAX_CALLERS:
                self._creds.popitem(last=False)
        return found

    async def record(self, sender: str, method: str, obj: str, args: Sequence[Any],
                     result: str) -> None:
        """One call's record; a refused call's only while its uid has had
        fewer than REFUSED_RECORDS this interval (the rest are counted)."""
        uid, pid, unit = await self.caller(sender)
        if result.startswith("refused") and not self._one_by_one(uid, f"{method} {obj}: {result}"):
            return
        arguments = describe_args(args)
        text = (f"{method} {obj} by uid {uid} (pid {pid}, unit {unit or '?'}, "
                f"{printable(sender, 40)}): {printable(result, 300)}")
        self._write({"MESSAGE": text, "SHAREDD_CALLER_UID": str(uid),
                     "SHAREDD_CALLER_PID": str(pid), "SHAREDD_CALLER_UNIT": unit,
                     "SHAREDD_CALLER_BUS_NAME": printable(sender, 80), "SHAREDD_METHOD": method,
                     "SHAREDD_OBJECT": obj, "SHAREDD_ARGS": arguments,
                     "SHAREDD_RESULT": printable(result, 300)})

    def _write(self, fields: Dict[str, str]) -> None:
        fields = {"PRIORITY": "5", "SYSLOG_IDENTIFIER": "sharedd", **fields}
        if not self._to_journal(fields):
            log.info("audit: %s; args: %s", fields["MESSAGE"], fields.get("SHAREDD_ARGS", ""))

    def _one_by_one(self, uid: int, what: str) -> bool:
        """Whether uid's refused call is recorded now; if not, it is counted
        into the record at its interval's end."""
        now = time.monotonic()
        state = self._refused.get(uid)
        if state is None or now - state[0] >= REFUSED_INTERVAL:
            if state is not None:
                self._held_back(uid, state)
            state = self._refused[uid] = [now, 0, 0, ""]
            self._at_end(uid, state)
        if state[1] < REFUSED_RECORDS:
            state[1] += 1
            return True
        state[2] += 1
        state[3] = what
        return False

    def _at_end(self, uid: int, state: List[Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:       # (told when the uid is next refused)
            return
        loop.call_later(REFUSED_INTERVAL, self._held_back, uid, state)

    def _held_back(self, uid: int, state: List[Any]) -> None:
        """uid's refused calls of the interval state counts that were not
        recorded one by one, in one record."""
        if self._refused.get(uid) is state:
            del self._refused[uid]
        if not state[2] or state[1] < 0:
            return
        state[1] = -1              # (told once)
        self._write({"MESSAGE": f"{state[2]} more refused call(s) by uid {uid} in "
                                f"{REFUSED_INTERVAL:g}s, not recorded one by one; the latest: "
                                f"{printable(state[3], 300)}",
                     "SHAREDD_CALLER_UID": str(uid), "SHAREDD_RESULT": f"refused: {state[2]} more",
                     "SHAREDD_REFUSED_NOT_RECORDED": str(state[2])})

    def _to_journal(self, fields: Dict[str, str]) -> bool:
        """One datagram in journald's native format (every value is one
        escaped line). False if there is no journal or it cannot take it now."""
        if not os.path.exists(self.journal):
            return False
        data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)   # the event loop never waits for journald
            self._sock.sendto(data, self.journal)
            return True
        except OSError as exc:
            log.debug("journal socket refused an audit record: %s", exc)
            return False
