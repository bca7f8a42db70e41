"""Who may change what: every state-changing call is checked here before
the engine sees it; the bus policy lets every local user call (as UDisks2's
does) and reading needs no check.

The caller is the bus's unique name of the message. Root is always allowed.
Anyone else is asked about of polkit (org.freedesktop.PolicyKit1.Authority
CheckAuthorization, subject system-bus-name) for the method's action
(constants.METHOD_ACTIONS): the shipped rules file grants the admin group's
members the manage actions, the defaults ask for an administrator's
password (auth_admin_keep), and `auth.no_user_interaction` in the call's
a{sv} says not to ask. Where polkit is not installed (authorization =
auto), or when told (group), a member of admin_group is allowed and nobody
else. Anything that goes wrong refuses: polkit failing in polkit mode, an
unknown uid, a method without an action (admin), a check polkit does not
answer in time (it is cancelled). A user has at most CHECKS_PER_USER checks
in progress, and all users CHECKS_MAX (a user's own authentication agent
may never answer, and each check holds one of the bus's unanswered calls
of sharedd's connection); one more is told LimitsExceeded, try again.
"""

from __future__ import annotations

import asyncio
import collections
import grp
import itertools
import logging
import os
import pwd
import time
from typing import Any, Dict, Optional, Tuple

from dbus_next import Message, MessageType, Variant
from dbus_next.constants import ErrorType, MessageFlag
from dbus_next.errors import DBusError

from .. import constants as C
from ..errors import NotAuthorized

log = logging.getLogger(__name__)

AUTHORITY = ("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
             "org.freedesktop.PolicyKit1.Authority")
#: CheckAuthorization flags
ALLOW_USER_INTERACTION = 1
#: seconds a caller's group membership is remembered
GROUP_CACHE_SECONDS = 60.0
MAX_CACHED = 1024
#: polkit checks in progress for one uid, and for all: each holds one of
#: the bus's 128 unanswered calls of sharedd's connection, which NFS-Ganesha's
#: calls (revocations among them) need too, and a user's own authentication
#: agent may never answer
CHECKS_PER_USER = 4
CHECKS_MAX = 32
#: seconds polkit has to answer: a dialog asks a person; without one, polkit
#: alone decides
CHECK_SECONDS_INTERACTIVE = 300.0
CHECK_SECONDS = 25.0
TOO_MANY_CHECKS = "too many authorization checks of yours are in progress; try again later"


def action_for(interface: str, member: str) -> str:
    return C.METHOD_ACTIONS.get((interface.rsplit(".", 1)[-1], member), C.ACTION_ADMIN)


class Authorizer:
    def __init__(self, bus: Any, auditor: Any, mode: str = "auto", admin_group: str = "sharedd"):
        self.bus = bus
        self.auditor = auditor            # (uid, pid, unit) of a caller, cached per name
        self.mode = mode                  # auto | polkit | group
        self.admin_group = admin_group
        self._groups: "collections.OrderedDict[int, Tuple[float, bool]]" = \
            collections.OrderedDict()
        self._warned = -60.0
        self._checking: Dict[int, int] = {}      # uid: its polkit checks in progress
        self._cancellations = itertools.count(1)

    async def check(self, sender: str, interface: str, member: str,
                    interactive: bool = True) -> None:
        """Return if sender may call member; raise NotAuthorized if not."""
        action = action_for(interface, member)
        uid = (await self.auditor.caller(sender))[0]
        if uid == 0:
            return
        if uid < 0:
            raise NotAuthorized(f"{member}: the caller's identity is unknown; refused")
        if self.mode in ("auto", "polkit"):
            answer = await self._polkit_for(uid, sender, action, interactive)
            if answer is not None:
                authorized, challenge = answer
                if authorized:
                    return
                raise NotAuthorized(
                    f"{member} needs {action}" + (", which asks for authentication"
                                                  if challenge else "")
                    + (" (the call said auth.no_user_interaction)" if challenge and not interactive
                       else ""))
            if self.mode == "polkit":
                raise NotAuthorized(f"{member}: polkit cannot be asked; refused")
        if self._in_admin_group(uid):
            return
        raise NotAuthorized(f"{member} is for root and members of group {self.admin_group}")

    async def _polkit_for(self, uid: int, sender: str, action: str,
                          interactive: bool) -> Optional[Tuple[bool, bool]]:
        """_polkit, if uid and everyone have not too many checks in progress
        (LimitsExceeded, try again, if they have)."""
        if self._checking.get(uid, 0) >= CHECKS_PER_USER or \
                sum(self._checking.values()) >= CHECKS_MAX:
            raise DBusError(ErrorType.LIMITS_EXCEEDED, TOO_MANY_CHECKS)
        self._checking[uid] = self._checking.get(uid, 0) + 1
        try:
            return await self._polkit(sender, action, interactive)
        finally:
            left = self._checking.pop(uid) - 1
            if left:
                self._checking[uid] = left

    async def _polkit(self, sender: str, action: str,
                      interactive: bool) -> Optional[Tuple[bool, bool]]:
        """(authorized, challenge), or None where no authority answers. A
        check not answered in time is cancelled, and refused."""
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        flags = ALLOW_USER_INTERACTION if interactive else 0
        cancellation = f"sharedd-{next(self._cancellations)}"
        seconds = CHECK_SECONDS_INTERACTIVE if interactive else CHECK_SECONDS
        try:
            reply = await asyncio.wait_for(self.bus.call(Message(
                destination=AUTHORITY[0], path=AUTHORITY[1], interface=AUTHORITY[2],
                member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                body=[subject, action, {}, flags, cancellation])), seconds)
        except asyncio.TimeoutError:
            # (polkit then answers the call, which frees its place on the bus)
            self.bus.send(Message(
                destination=AUTHORITY[0], path=AUTHORITY[1], interface=AUTHORITY[2],
                member="CancelCheckAuthorization", signature="s", body=[cancellation],
                flags=MessageFlag.NO_REPLY_EXPECTED))
            raise NotAuthorized(f"{action}: polkit did not answer within {seconds:g}s "
                                "(the authentication was not completed); refused") from None
        except Exception as exc:     # the connection failed: no answer
            self._warn(f"polkit: {exc}")
            return None
        if reply is None or reply.message_type == MessageType.ERROR:
            name = getattr(reply, "error_name", "") or ""
            if name not in ("org.freedesktop.DBus.Error.ServiceUnknown",
                            "org.freedesktop.DBus.Error.NameHasNoOwner"):
                self._warn(f"polkit cannot answer for {action}: {name}")
            # auto: as where polkit is not installed (the group decides);
            # polkit: the caller refuses
            return None
        result = reply.body[0]
        return bool(result[0]), bool(result[1])

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._warned >= 60:      # once a minute at most
            self._warned = now
            log.warning("%s", text)

    def _in_admin_group(self, uid: int) -> bool:
        now = time.monotonic()
        known = self._groups.get(uid)
        if known is not None and now - known[0] < GROUP_CACHE_SECONDS:
            return known[1]
        member = False
        try:
            user = pwd.getpwuid(uid)
            gid = grp.getgrnam(self.admin_group).gr_gid
            member = gid in os.getgrouplist(user.pw_name, user.pw_gid)
        except (KeyError, OSError):
            member = False           # no such user or group: refused
        self._groups[uid] = (now, member)
        while len(self._groups) > MAX_CACHED:
            self._groups.popitem(last=False)
        return member


def no_user_interaction(args: Any) -> bool:
    """Whether a call's a{sv} (any dict argument) asks for no dialog."""
    for arg in args:
        if isinstance(arg, dict):
            value = arg.get(C.OPTION_NO_USER_INTERACTION)
            if value is not None and getattr(value, "value", value) is True:
                return True
    return False

