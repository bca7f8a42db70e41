"""mountd's D-Bus adapter (the only module that imports dbus_next).

Exports org.sharedd.Mountd1 and listens to sharedd's Hooks.Fired signal,
accepting it only from the current owner of org.sharedd.Sharedd1.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

from dbus_next import BusType, Message, MessageType, PropertyAccess
from dbus_next.constants import NameFlag, RequestNameReply
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from sharedd import record as recordlib
from sharedd.bus.connection import Connection
from sharedd.constants import (BUS_NAME, IFACE_HOOKS, MOUNTD_BUS_NAME, MOUNTD_IFACE,
                               MOUNTD_ROOT_PATH, ROOT_PATH)

log = logging.getLogger(__name__)

_DBUS = "org.freedesktop.DBus"
_DBUS_PATH = "/org/freedesktop/DBus"


class MountdInterface(ServiceInterface):
    def __init__(self, daemon):
        super().__init__(MOUNTD_IFACE)
        self._daemon = daemon

    @dbus_property(access=PropertyAccess.READ)
    def Mounts(self) -> "a(sssss)":
        return [list(row) for row in self._daemon.mounts_table()]

    @dbus_property(access=PropertyAccess.READ)
    def SpoolStatus(self) -> "a{ss}":
        """Sharedd hosts ("" for the spool itself) whose records cannot be read
        now, and why; their mounts are kept as last verified. Empty: all well."""
        return self._daemon.spool_status()

    @method()
    async def Rescan(self):
        await self._daemon.rescan()

    @signal()
    def Mounted(self, share_id: "s", mount_point: "s", level: "s") -> "sss":
        return [share_id, mount_point, level]

    @signal()
    def Unmounted(self, share_id: "s", mount_point: "s") -> "ss":
        return [share_id, mount_point]


class MountdBus:
    """Connects, exports, owns the name and relays hook signals."""

    def __init__(self, daemon, on_record: Callable[[dict], None]):
        self.daemon = daemon
        self.on_record = on_record
        self.bus: Optional[Connection] = None
        self.iface = MountdInterface(daemon)
        self.sharedd_owner: Optional[str] = None   # unique name of sharedd, if running

    async def start(self) -> None:
        self.bus = await Connection(bus_type=BusType.SYSTEM).connect()
        self.bus.export(MOUNTD_ROOT_PATH, self.iface)
        self.bus.add_message_handler(self._on_message)
        for rule in (f"type='signal',sender='{_DBUS}',interface='{_DBUS}',"
                     f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
                     # (the bus passes on only the name's owner's; a signal
                     # sent to us by name still comes, and is checked below)
                     f"type='signal',sender='{BUS_NAME}',interface='{IFACE_HOOKS}',"
                     f"member='Fired',path='{ROOT_PATH}'"):
            await self._call("AddMatch", "s", [rule])
        reply = await self.bus.call(Message(destination=_DBUS, path=_DBUS_PATH, interface=_DBUS,
                                            member="GetNameOwner", signature="s", body=[BUS_NAME]))
        if reply.message_type == MessageType.METHOD_RETURN:
            self.sharedd_owner = reply.body[0]
        log.info("sharedd on the bus: %s", self.sharedd_owner or "not running")
        result = await self.bus.request_name(MOUNTD_BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if result not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(f"cannot own {MOUNTD_BUS_NAME} on the system bus ({result.name}):"
                               " is another sharedd-mountd running?")

    async def _call(self, member: str, signature: str, body: list) -> Message:
        reply = await self.bus.call(Message(destination=_DBUS, path=_DBUS_PATH, interface=_DBUS,
                                            member=member, signature=signature, body=body))
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, str(reply.body))
        return reply

    def _on_message(self, msg: Message):
        if msg.message_type != MessageType.SIGNAL:
            return None
        if (msg.interface == _DBUS and msg.member == "NameOwnerChanged"
                and msg.sender == _DBUS and msg.body and msg.body[0] == BUS_NAME):
            self.sharedd_owner = msg.body[2] or None
            log.info("sharedd bus owner is now %s", self.sharedd_owner or "nobody")
            return None
        if msg.interface == IFACE_HOOKS and msg.member == "Fired" and msg.path == ROOT_PATH:
            if not self.sharedd_owner or msg.sender != self.sharedd_owner:
                # (any local user may send one to us: logged as refused calls are)
                self.bus.refusals.refused(msg.sender or "", "Hooks.Fired signal", "ignored",
                                          f"not sent by the owner of {BUS_NAME}")
                return None
            if msg.signature != "sss":
                log.warning("ignoring a Fired signal with signature %r", msg.signature)
                return None
            phase, method_name, text = msg.body
            try:
                rec = recordlib.loads(text.encode("utf-8"))
            except recordlib.RecordError as exc:
                log.error("ignoring an invalid Fired record (%s %s): %s", phase, method_name, exc)
                return None
            if rec["phase"] != phase or rec["method"] != method_name:
                log.error("ignoring a Fired record whose phase/method disagree with the signal")
                return None
            self.on_record(rec)
        return None

    def mounts_changed(self, events: List[tuple]) -> None:
        for ev in events:
            if ev[0] == "Mounted":
                self.iface.Mounted(ev[1], ev[2], ev[3])
            elif ev[0] == "Unmounted":
                self.iface.Unmounted(ev[1], ev[2])
        self.iface.emit_properties_changed(
            {"Mounts": [list(r) for r in self.daemon.mounts_table()]})

    def spool_changed(self) -> None:
        self.iface.emit_properties_changed({"SpoolStatus": self.daemon.spool_status()})

    async def wait_closed(self) -> None:
        """Returns when the bus connection is gone (e.g. the bus restarted)."""
        try:
            await self.bus.wait_for_disconnect()
        except Exception as exc:   # disconnect with an error is still a disconnect
            log.debug("bus connection ended: %s", exc)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
