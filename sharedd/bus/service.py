"""Connects the engine to the system bus: exports objects, keeps them in step
with the engine (ObjectManager and PropertiesChanged signals), takes the bus
name, and watches NFS-Ganesha's name so its lost runtime exports are re-added.
"""

import asyncio
import concurrent.futures
import logging
import threading
from typing import Optional

from dbus_next import BusType, DBusError, Message, MessageType
from dbus_next.constants import MessageFlag, NameFlag, RequestNameReply
from dbus_next.service import ServiceInterface

from .. import constants as C
from ..engine import Engine, Observer
from ..helpers.base import BusCallError
from . import interfaces as I
from .audit import Auditor
from .authz import Authorizer
from .connection import Connection

log = logging.getLogger(__name__)

GANESHA_BUS_NAME = "org.ganesha.nfsd"


class StartupError(Exception):
    """The daemon cannot start (message says why; no traceback needed)."""


class _Bus(Connection):
    """ObjectManager signals come from the manager's path (the root object),
    where clients subscribe, not from each object's own path."""

    def _make_method_handler(self, interface, method):
        # dbus-next 0.2.3 sends the error reply of a failed async method but
        # then lets the exception escape into asyncio's log as a traceback;
        # reply here instead, once, and keep the log to one line per refusal.
        # The reply goes out in the step in which the method returns (the
        # library's done-callback ran a step later, when another operation's
        # signal could already have gone out ahead of an older answer).
        if not asyncio.iscoroutinefunction(method.fn):
            return super()._make_method_handler(interface, method)

        async def answer(msg, send_reply):
            # An error's reply is made inside its except clause, which drops
            # the error after: kept, its traceback would hold this frame (a
            # reference cycle, left to the collector, on every refused call).
            try:
                result = await method.fn(interface, *ServiceInterface._msg_body_to_args(msg))
                body, fds = ServiceInterface._fn_result_to_body(result, method.out_signature_tree)
                reply = Message.new_method_return(msg, method.out_signature, body, fds)
            except DBusError as exc:
                reply = exc._as_message(msg)
            except Exception as exc:
                log.error("%s.%s failed", interface.name, method.name, exc_info=exc)
                reply = Message.new_error(msg, C.ERROR_PREFIX + "BackendFailure",
                                          f"internal error: {type(exc).__name__}")
            try:                     # (cancelled: sharedd is stopping, no reply)
                send_reply(reply)
            except Exception as exc:     # a result that cannot be written
                send_reply.send_error(exc)

        def handler(msg, send_reply):
            if msg.flags & MessageFlag.NO_REPLY_EXPECTED and method.name in C.READ_ONLY_METHODS:
                return       # a list nobody reads (and no limit on such calls) is not made
            asyncio.create_task(answer(msg, send_reply), name=method.name)
        return handler

    #: False while the initial objects are exported, before the name is owned:
    #: nobody can be listening yet, and 10,000 signals would only load the bus
    announce = True

    def _emit_interface_added(self, path, interface):
        if self._disconnected or not self.announce or not path.startswith(C.ROOT_PATH + "/"):
            return

        def got(iface, values, _user, err):
            if err is not None:
                log.error("InterfacesAdded for %s: %s", path, err)
                return
            self.send(Message.new_signal(path=C.ROOT_PATH,
                                         interface="org.freedesktop.DBus.ObjectManager",
                                         member="InterfacesAdded", signature="oa{sa{sv}}",
                                         body=[path, {iface.name: values}]))
        ServiceInterface._get_all_property_values(interface, got)

    def _emit_interface_removed(self, path, removed_interfaces):
        if self._disconnected or not path.startswith(C.ROOT_PATH + "/"):
            return
        self.send(Message.new_signal(path=C.ROOT_PATH,
                                     interface="org.freedesktop.DBus.ObjectManager",
                                     member="InterfacesRemoved", signature="oas",
                                     body=[path, removed_interfaces]))


class BusService(Observer):
    """The engine's observer on the bus. Until publish() it only listens:
    start-up recovery happens before any object is exported."""

    def __init__(self):
        self.engine: Optional[Engine] = None
        self.bus = None
        self.loop = None
        self.shares = {}
        self.snapshots = {}
        self.backends = {}
        self.networks = {}
        self.servers = {}
        self.jobs = {}
        self.replicas = {}
        self.groups = {}
        self.group_snapshots = {}
        self.cache = {}
        self.hooks = None
        # Backend Stats change with every share operation: announced at most
        # once per BACKEND_SIGNAL_INTERVAL, the last state always.
        self._backend_due = {}
        self._backend_timers = {}

    async def connect(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.bus = await _Bus(bus_type=BusType.SYSTEM).connect()
        self.bus.auditor = Auditor(self.bus)

    async def publish(self, engine: Engine) -> None:
        """Export every object, then take the bus name (we are ready to serve)."""
        bus = self.bus
        self.engine = engine
        bus.authorizer = Authorizer(bus, bus.auditor, engine.config.authorization,
                                    engine.config.admin_group)
        bus.announce = False   # clients read GetManagedObjects once we own the name
        bus.export(C.ROOT_PATH, I.Manager(engine))
        self.hooks = I.Hooks(engine)
        bus.export(C.ROOT_PATH, self.hooks)
        for name in engine.backend_names():
            iface = I.Backend(engine, name)
            self.backends[name] = iface
            bus.export(I.backend_path(name), iface)
            self.cache[I.backend_path(name)] = iface.props()
        for network in engine.share_networks():
            self.network_added(network)
        for server in engine.share_servers():
            self.server_added(server)
        for share in engine.shares():
            self.share_added(share)
        for snap in engine.snapshots():
            self.snapshot_added(snap)
        for replica in engine.replicas():
            self.replica_added(replica)
        for group in engine.share_groups():
            self.group_added(group)
        for gs in engine.share_group_snapshots():
            self.group_snapshot_added(gs)
        await bus.warm()
        await self._watch_ganesha()
        reply = await bus.request_name(C.BUS_NAME, NameFlag.DO_NOT_QUEUE)
        bus.announce = True
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise StartupError(f"the bus name {C.BUS_NAME} is owned by another process "
                               f"(is another sharedd running?)")

    async def _watch_ganesha(self) -> None:
        rule = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{GANESHA_BUS_NAME}'")
        await self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                    interface="org.freedesktop.DBus", member="AddMatch",
                                    signature="s", body=[rule]))

        def handler(msg):
            # Only the bus itself sends as org.freedesktop.DBus; any local
            # user may send a signal of this name to us (each would re-add
            # every export).
            if (msg.message_type == MessageType.SIGNAL and msg.sender == "org.freedesktop.DBus"
                    and msg.interface == "org.freedesktop.DBus"
                    and msg.member == "NameOwnerChanged" and msg.signature == "sss"
                    and msg.body[0] == GANESHA_BUS_NAME and msg.body[2]):
                log.info("NFS-Ganesha (re)started on the bus: re-adding exports")
                self.engine.export_service_appeared("ganesha")
            return None
        self.bus.add_message_handler(handler)

    def bus_call(self, destination: str, path: str, interface: str, member: str,
                 signature: str, body: list, timeout: float) -> list:
        """helpers.base.BusCall: a blocking call from a worker thread over our
        own connection (the loop sends and receives; no process per call)."""
        if self.loop is None or threading.current_thread() is threading.main_thread():
            raise BusCallError("no bus call from the event loop's own thread")
        future = asyncio.run_coroutine_threadsafe(self.bus.call(Message(
            destination=destination, path=path, interface=interface, member=member,
            signature=signature, body=body)), self.loop)
        try:
            reply = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BusCallError(f"{destination} did not answer {member} within {timeout:g}s") from None
        except Exception as exc:
            raise BusCallError(f"{member}: {exc}") from None
        if reply.message_type == MessageType.ERROR:
            raise BusCallError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return list(reply.body)

    async def alive(self, timeout: float) -> bool:
        """Our own round trip to the bus daemon works and we still own our
        name (for the watchdog)."""
        try:
            reply = await asyncio.wait_for(self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetNameOwner", signature="s",
                body=[C.BUS_NAME])), timeout)
        except Exception as exc:
            log.error("the system bus does not answer: %s", exc)
            return False
        if reply.message_type != MessageType.METHOD_RETURN or reply.body != [self.bus.unique_name]:
            log.error("we no longer own %s on the system bus", C.BUS_NAME)
            return False
        return True

    async def close(self) -> None:
        if self.bus is not None and self.bus.connected:
            try:
                await asyncio.wait_for(self.bus.release_name(C.BUS_NAME), 5)
            except Exception:
                pass   # the name goes with the connection anyway
            self.bus.disconnect()

    # --- signals ------------------------------------------------------------
    def hook_fired(self, phase: str, method: str, text: str) -> None:
        """Hooks run in worker threads; the bus is the loop's."""
        if self.hooks is None or self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.hooks.Fired, phase, method, text)

    def _changed(self, path: str, iface, members: bool = False) -> None:
        """members: the object's list of members changed (iface.listed)."""
        if iface.generation is not None:
            iface.generation += 1       # its GetManagedObjects entry is stale
        new = iface.props()
        old = self.cache.get(path, {})
        diff = {k: v for k, v in new.items() if old.get(k) != v}
        self.cache[path] = new
        invalidated = list(iface.listed) if members else []
        if diff or invalidated:
            iface.emit_properties_changed(diff, invalidated)

    # --- Observer -----------------------------------------------------------
    def share_added(self, share) -> None:
        if self.engine is None:
            return
        path = I.share_path(share.id)
        if share.id in self.shares:
            return self.share_changed(share)
        iface = I.Share(self.engine, share)
        self.shares[share.id] = iface
        self.cache[path] = iface.props()
        self.bus.export(path, iface)
        self._server_touched(share.share_server_id, members=True)
        self._group_touched(share.share_group_id)

    def share_changed(self, share, rules: bool = False) -> None:
        if self.engine is None:
            return
        iface = self.shares.get(share.id)
        if iface is None:
            return self.share_added(share)
        iface.update(share, rules=rules)
        self._changed(I.share_path(share.id), iface)

    def rules_changed(self, share) -> None:
        self.share_changed(share, rules=True)

    def share_removed(self, share_id: str) -> None:
        if self.engine is None:
            return
        path = I.share_path(share_id)
        iface = self.shares.pop(share_id, None)
        if iface is not None:
            self.cache.pop(path, None)
            self.bus.unexport(path)
            self._server_touched(iface.cache.share_server_id, members=True)
            self._group_touched(iface.cache.share_group_id)

    def snapshot_added(self, snap) -> None:
        if self.engine is None:
            return
        if snap.id in self.snapshots:
            return self.snapshot_changed(snap)
        path = I.snapshot_path(snap.id)
        iface = I.Snapshot(self.engine, snap)
        self.snapshots[snap.id] = iface
        self.cache[path] = iface.props()
        self.bus.export(path, iface)

    def snapshot_changed(self, snap) -> None:
        if self.engine is None:
            return
        iface = self.snapshots.get(snap.id)
        if iface is None:
            return self.snapshot_added(snap)
        iface.update(snap)
        self._changed(I.snapshot_path(snap.id), iface)

    def snapshot_removed(self, snapshot_id: str) -> None:
        if self.engine is None:
            return
        path = I.snapshot_path(snapshot_id)
        if self.snapshots.pop(snapshot_id, None) is not None:
            self.cache.pop(path, None)
            self.bus.unexport(path)

    # share networks and servers: few objects, exported and announced as they change
    def _export(self, table, key, path, iface) -> None:
        table[key] = iface
        self.cache[path] = iface.props()
        self.bus.export(path, iface)

    def _unexport(self, table, key, path) -> None:
        if table.pop(key, None) is not None:
            self.cache.pop(path, None)
            self.bus.unexport(path)

    def network_added(self, network) -> None:
        if self.engine is not None and network.id not in self.networks:
            self._export(self.networks, network.id, I.share_network_path(network.id),
                         I.ShareNetwork(self.engine, network))

    def network_changed(self, network_id: str) -> None:
        iface = self.networks.get(network_id)
        if self.engine is not None and iface is not None:
            self._changed(I.share_network_path(network_id), iface)

    def network_removed(self, network_id: str) -> None:
        if self.engine is not None:
            self._unexport(self.networks, network_id, I.share_network_path(network_id))

    def server_added(self, server) -> None:
        if self.engine is not None and server.id not in self.servers:
            self._export(self.servers, server.id, I.share_server_path(server.id),
                         I.ShareServer(self.engine, server))

    def server_changed(self, server) -> None:
        if self.engine is None:
            return
        iface = self.servers.get(server.id)
        if iface is None:
            return self.server_added(server)
        iface.update(server)
        self._server_touched(server.id)

    def _server_touched(self, server_id, members: bool = False) -> None:
        iface = self.servers.get(server_id) if server_id else None
        if iface is not None and self.engine is not None:
            self._changed(I.share_server_path(server_id), iface, members)

    def _group_touched(self, group_id) -> None:
        """A share joined or left the group."""
        iface = self.groups.get(group_id) if group_id else None
        if iface is not None and self.engine is not None:
            self._changed(I.share_group_path(group_id), iface, members=True)

    def server_removed(self, server_id: str) -> None:
        if self.engine is not None:
            self._unexport(self.servers, server_id, I.share_server_path(server_id))

    def replica_added(self, replica) -> None:
        if self.engine is not None and replica.id not in self.replicas:
            self._export(self.replicas, replica.id, I.replica_path(replica.id),
                         I.Replica(self.engine, replica))

    def replica_changed(self, replica) -> None:
        iface = self.replicas.get(replica.id)
        if self.engine is None:
            return
        if iface is None:
            return self.replica_added(replica)
        iface.update(replica)
        self._changed(I.replica_path(replica.id), iface)

    def replica_removed(self, replica_id: str) -> None:
        if self.engine is not None:
            self._unexport(self.replicas, replica_id, I.replica_path(replica_id))

    def group_added(self, group) -> None:
        if self.engine is not None and group.id not in self.groups:
            self._export(self.groups, group.id, I.share_group_path(group.id),
                         I.ShareGroup(self.engine, group))

    def group_changed(self, group) -> None:
        iface = self.groups.get(group.id)
        if self.engine is None:
            return
        if iface is None:
            return self.group_added(group)
        iface.update(group)
        self._changed(I.share_group_path(group.id), iface)

    def group_removed(self, group_id: str) -> None:
        if self.engine is not None:
            self._unexport(self.groups, group_id, I.share_group_path(group_id))

    def group_snapshot_added(self, gs) -> None:
        if self.engine is not None and gs.id not in self.group_snapshots:
            self._export(self.group_snapshots, gs.id, I.group_snapshot_path(gs.id),
                         I.ShareGroupSnapshot(self.engine, gs))

    def group_snapshot_changed(self, gs) -> None:
        iface = self.group_snapshots.get(gs.id)
        if self.engine is None:
            return
        if iface is None:
            return self.group_snapshot_added(gs)
        iface.update(gs)
        self._changed(I.group_snapshot_path(gs.id), iface)

    def group_snapshot_removed(self, gs_id: str) -> None:
        if self.engine is not None:
            self._unexport(self.group_snapshots, gs_id, I.group_snapshot_path(gs_id))

    # jobs: exported while they run; Completed, then removed
    def job_added(self, job) -> None:
        if self.engine is not None and job.id not in self.jobs:
            self._export(self.jobs, job.id, I.job_path(job.id), I.Job(self.engine, job))

    def job_changed(self, job) -> None:
        iface = self.jobs.get(job.id)
        if self.engine is not None and iface is not None:
            self._changed(I.job_path(job.id), iface)

    def job_completed(self, outcome) -> None:
        job, success, message = outcome
        iface = self.jobs.get(job.id)
        if self.engine is None or iface is None:
            return
        iface.Completed(success, message)
        self._unexport(self.jobs, job.id, I.job_path(job.id))

    def backend_changed(self, name: str) -> None:
        if self.engine is None or name in self._backend_timers:
            return   # a later announcement is already due
        wait = self._backend_due.get(name, 0.0) - self.loop.time()
        if wait > 0:
            self._backend_timers[name] = self.loop.call_later(wait, self._backend_announce, name)
        else:
            self._backend_announce(name)

    def _backend_announce(self, name: str) -> None:
        self._backend_timers.pop(name, None)
        self._backend_due[name] = self.loop.time() + C.BACKEND_SIGNAL_INTERVAL
        iface = self.backends.get(name)
        if iface is not None and self.engine is not None:
            self._changed(I.backend_path(name), iface)
