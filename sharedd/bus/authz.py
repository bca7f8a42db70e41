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
unknown uid, a method without an action (admin).
"""

from __future__ import annotations

import collections
import grp
import logging
import os
import pwd
import time
from typing import Any, Optional, Tuple

from dbus_next import Message, MessageType, Variant

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
            answer = await self._polkit(sender, action, interactive)
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

    async def _polkit(self, sender: str, action: str,
                      interactive: bool) -> Optional[Tuple[bool, bool]]:
        """(authorized, challenge), or None where no authority answers."""
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        flags = ALLOW_USER_INTERACTION if interactive else 0
        try:
            reply = await self.bus.call(Message(
                destination=AUTHORITY[0], path=AUTHORITY[1], interface=AUTHORITY[2],
                member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                body=[subject, action, {}, flags, ""]))
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

