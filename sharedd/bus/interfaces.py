"""D-Bus interfaces of sharedd (API version 1): a thin adapter over the engine.

Methods translate arguments, call the engine, and translate engine errors
into named D-Bus errors. No `from __future__ import annotations` here:
dbus-next reads the signature strings from the annotations.
"""

import dataclasses
import functools
import logging
import time
from typing import List, Tuple

from dbus_next import DBusError, Variant
from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from .. import __version__
from .. import constants as C
from ..errors import InvalidArgument, NotAuthorized, SharedError
from ..share_servers import describe as describe_attachment
from . import audit, authz, slices

log = logging.getLogger(__name__)

# Names of output and signal arguments for introspection (dbus-next leaves them unnamed).
OUT_NAMES = {
    "CreateShare": ["share"], "ManageShare": ["share"], "ListShares": ["shares"],
    "ListSnapshots": ["snapshots"], "FindShareByName": ["share"],
    "AllowAccess": ["access_id"], "CreateSnapshot": ["snapshot"], "ManageSnapshot": ["snapshot"],
    "CreateShareNetwork": ["share_network"],
    "Migrate": ["job"], "CompleteMigration": ["job"], "CreateReplica": ["job"],
    "Resync": ["job"], "CreateShareGroup": ["share_group"],
    "Fired": ["phase", "method", "record"],     # a signal's arguments
    "Completed": ["success", "message"],
}


def share_path(share_id: str) -> str:
    return f"{C.SHARE_PATH}/{share_id}"


def snapshot_path(snapshot_id: str) -> str:
    return f"{C.SNAPSHOT_PATH}/{snapshot_id}"


def share_network_path(network_id: str) -> str:
    return f"{C.SHARE_NETWORK_PATH}/{network_id}"


def share_server_path(server_id: str) -> str:
    return f"{C.SHARE_SERVER_PATH}/{server_id}"


def job_path(job_id: str) -> str:
    return f"{C.JOB_PATH}/{job_id}"


def replica_path(replica_id: str) -> str:
    return f"{C.REPLICA_PATH}/{replica_id}"


def share_group_path(group_id: str) -> str:
    return f"{C.SHARE_GROUP_PATH}/{group_id}"


def group_snapshot_path(gs_id: str) -> str:
    return f"{C.SHARE_GROUP_SNAPSHOT_PATH}/{gs_id}"


#: StartedByUID when the caller's uid is unknown (uid_t's "no id")
NO_UID = 2**32 - 1


async def caller_uid() -> int:
    """The uid of the bus client whose call is being handled (the bus
    daemon says; never the caller's own claim)."""
    call = audit.CALL.get()
    auditor = getattr(call[0], "auditor", None) if call else None
    if auditor is None:
        return NO_UID
    uid = (await auditor.caller(call[1]))[0]
    return uid if 0 <= uid < NO_UID else NO_UID


def backend_path(name: str) -> str:
    return f"{C.BACKEND_PATH}/{name}"


def _id_from_path(path: str, prefix: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith(prefix + "/"):
        raise InvalidArgument(f"{path!r} is not a {what} object path ({prefix}/<id>)")
    return path[len(prefix) + 1:]


def translate(fn):
    """Run an engine call; engine errors become named D-Bus errors. A call
    that may change state leaves an audit record, whatever its outcome."""
    audited = fn.__name__ not in C.READ_ONLY_METHODS

    @functools.wraps(fn)
    async def wrapper(self, *args):
        started = time.monotonic()
        outcome = "interrupted"       # cancelled (the daemon is stopping)
        try:
            if audited:
                await _authorize(self, fn.__name__, args)
            result = await fn(self, *args)
            outcome = "ok"
        except SharedError as exc:
            _log_refusal(fn.__name__, exc)
            outcome = f"refused: {exc.name}: {exc}"
            raise DBusError(C.ERROR_PREFIX + exc.name, str(exc)) from None
        except DBusError as exc:
            outcome = f"refused: {exc.type}"
            raise
        except Exception as exc:  # a bug: say so without leaking internals
            log.exception("%s failed", fn.__name__)
            outcome = f"failed: {type(exc).__name__}"
            raise DBusError(C.ERROR_PREFIX + "BackendFailure",
                            f"internal error in {fn.__name__}: {type(exc).__name__}") from None
        finally:
            if audited:
                await _audit(self, fn.__name__, args, outcome)
        log.debug("%s done in %.3fs", fn.__name__, time.monotonic() - started)
        return result
    return wrapper


def _log_refusal(method_name: str, exc: SharedError) -> None:
    """Logged as the connection logs refused calls (any local user may call
    the read-only methods, thousands of times a second): sparingly."""
    call = audit.CALL.get()
    refusals = getattr(call[0], "refusals", None) if call else None
    if refusals is None:    # not called over the bus
        log.info("%s refused: %s: %s", method_name, exc.name, audit.printable(exc, 400))
    else:
        refusals.refused(call[1], method_name, C.ERROR_PREFIX + exc.name, str(exc))


async def _authorize(iface, method_name, args):
    """Refuse (NotAuthorized) a state-changing call its caller may not make."""
    call = audit.CALL.get()
    if call is None:
        return   # not called over the bus (the engine's own tests)
    authorizer = getattr(call[0], "authorizer", None)
    if authorizer is None:
        raise NotAuthorized(f"{method_name}: no authorization is set up on this connection")
    await authorizer.check(call[1], iface.name, method_name,
                           interactive=not authz.no_user_interaction(args))


async def _audit(iface, method_name, args, outcome):
    call = audit.CALL.get()
    auditor = getattr(call[0], "auditor", None) if call else None
    if auditor is None:
        return   # not called over the bus (or nobody audits this connection)
    try:
        await auditor.record(call[1], f"{iface.name.rsplit('.', 1)[-1]}.{method_name}",
                             iface.object_path(), args, outcome)
    except Exception:   # an audit failure must not turn a done call into an error
        log.exception("audit record for %s failed", method_name)


#: a string option or filter value longer than this is refused unread
MAX_OPTION_TEXT = 4096


def unpack_options(options, spec):
    """a{sv} -> dict, checking each option's D-Bus signature against spec,
    and bounding what a caller can make us hold or compare. The
    authorization option (auth.no_user_interaction, b) is every call's."""
    flag = options.get(C.OPTION_NO_USER_INTERACTION)
    if flag is not None:
        if flag.signature != "b":
            raise InvalidArgument(f"option {C.OPTION_NO_USER_INTERACTION!r} must have type b")
        options = {k: v for k, v in options.items() if k != C.OPTION_NO_USER_INTERACTION}
    if len(options) > len(spec):
        raise InvalidArgument(f"{len(options)} options given; this call takes at most "
                              f"{len(spec)} ({', '.join(sorted(spec)) or 'none'})")
    result = {}
    for key, variant in options.items():
        want = spec.get(key)
        if want is None:
            allowed = ", ".join(sorted(spec)) or "none"
            raise InvalidArgument(f"unknown option {key[:40]!r} (allowed: {allowed})")
        if variant.signature not in want:
            raise InvalidArgument(f"option {key!r} must have type {' or '.join(want)}, "
                                  f"not {variant.signature}")
        if isinstance(variant.value, str) and len(variant.value) > MAX_OPTION_TEXT:
            raise InvalidArgument(f"option {key!r} is longer than {MAX_OPTION_TEXT} characters")
        result[key] = variant.value
    return result


def to_variant_dict(values):
    """Python dict -> a{sv} with natural D-Bus types."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = Variant("b", value)
        elif isinstance(value, int):
            out[key] = Variant("x", value)
        elif isinstance(value, float):
            out[key] = Variant("d", value)
        elif isinstance(value, str):
            out[key] = Variant("s", value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = Variant("as", list(value))
    return out


#: class -> its D-Bus members, as dbus-next's constructor collects them
_MEMBERS: dict = {}


class _Base(ServiceInterface):
    def __init__(self, name, engine):
        # dbus-next scans the class with inspect.getmembers for every new
        # object (0.1 ms; 10,000 shares at start-up): scan once per class and
        # share the member lists, which nothing changes per object.
        known = _MEMBERS.get(type(self))
        if known is None:
            super().__init__(name)
            for m in ServiceInterface._get_methods(self):
                for arg, out_name in zip(m.introspection.out_args, OUT_NAMES.get(m.name, [])):
                    arg.name = out_name
            for sig in ServiceInterface._get_signals(self):
                for arg, arg_name in zip(sig.introspection.args, OUT_NAMES.get(sig.name, [])):
                    arg.name = arg_name
            _MEMBERS[type(self)] = (self._ServiceInterface__methods,
                                    self._ServiceInterface__properties,
                                    self._ServiceInterface__signals)
        else:
            self.name = name
            (self._ServiceInterface__methods, self._ServiceInterface__properties,
             self._ServiceInterface__signals) = known
            self._ServiceInterface__buses = set()
        self.engine = engine

    #: None: properties are read afresh for every GetManagedObjects; an int,
    #: bumped by the bus service whenever the object changes, lets the
    #: connection keep the object's marshalled entry (sharedd.bus.managed)
    generation = None

    #: properties holding a list of members: left out of props() and named
    #: in PropertiesChanged (invalidated) when the members change, so that a
    #: change costs no re-read and no signal as long as the list
    listed: Tuple[str, ...] = ()

    def props(self):
        """Current property values (for PropertiesChanged diffs)."""
        return {}

    def object_path(self):
        return C.ROOT_PATH


class Manager(_Base):
    def __init__(self, engine):
        super().__init__(C.IFACE_MANAGER, engine)

    @method()
    @translate
    async def CreateShare(self, name: "s", protocol: "s", size_gib: "t", options: "a{sv}") -> "o":
        opts = unpack_options(options, {"backend": ("s",), "snapshot": ("o",),
                                        "description": ("s",), "metadata": ("a{ss}",),
                                        "share_network": ("o",), "snapshot_schedule": ("s",),
                                        "snapshot_visibility": ("s",),
                                        "snapshot_retention": ("s",), "share_group": ("o",)})
        if "snapshot" in opts:
            opts["snapshot"] = _id_from_path(opts["snapshot"], C.SNAPSHOT_PATH, "snapshot")
        if "share_group" in opts:
            opts["share_group"] = _id_from_path(opts["share_group"], C.SHARE_GROUP_PATH,
                                                "share group")
        if "share_network" in opts:
            opts["share_network"] = _id_from_path(opts["share_network"], C.SHARE_NETWORK_PATH,
                                                  "share network")
        share = await self.engine.create_share(name, protocol, size_gib, opts)
        return share_path(share.id)

    @method()
    @translate
    async def ManageShare(self, backend: "s", protocol: "s", export_path: "s",
                          options: "a{sv}") -> "o":
        opts = unpack_options(options, {"name": ("s",), "description": ("s",),
                                        "metadata": ("a{ss}",), "size_gib": ("t", "u", "x", "i")})
        share = await self.engine.manage_share(backend, protocol, export_path, opts)
        return share_path(share.id)

    @method()
    @translate
    async def CreateShareGroup(self, name: "s", options: "a{sv}") -> "o":
        opts = unpack_options(options, {"backend": ("s",), "source_group_snapshot": ("o",)})
        if "source_group_snapshot" in opts:
            opts["source_group_snapshot"] = _id_from_path(
                opts["source_group_snapshot"], C.SHARE_GROUP_SNAPSHOT_PATH, "share group snapshot")
        group = await self.engine.create_share_group(name, opts)
        return share_group_path(group.id)

    @method()
    @translate
    async def ManageSnapshot(self, share: "o", provider_location: "s",
                             options: "a{sv}") -> "o":
        opts = unpack_options(options, {"name": ("s",)})
        share_id = _id_from_path(share, C.SHARE_PATH, "share")
        snap = await self.engine.manage_snapshot(share_id, provider_location, opts)
        return snapshot_path(snap.id)

    @method()
    @translate
    async def ListShares(self, filter: "a{sv}") -> "ao":
        f = unpack_options(filter, {key: ("s",) for key in C.SHARE_FILTERS})
        return await slices.listed_paths(self.engine.share_listing(**f), share_path)

    @method()
    @translate
    async def ListSnapshots(self, filter: "a{sv}") -> "ao":
        f = unpack_options(filter, {"share": ("o",)})
        share_id = _id_from_path(f["share"], C.SHARE_PATH, "share") if "share" in f else None
        return await slices.listed_paths(self.engine.snapshot_listing(share_id), snapshot_path)

    @method()
    @translate
    async def FindShareByName(self, name: "s") -> "o":
        return share_path(self.engine.find_share_by_name(name).id)

    @method()
    @translate
    async def CreateShareNetwork(self, name: "s", options: "a{sv}") -> "o":
        opts = unpack_options(options, {"bridge": ("s",), "parent": ("s",), "vlan": ("q", "u"),
                                        "subnet": ("s",), "gateway": ("s",),
                                        "allocation_range": ("s",), "mtu": ("q", "u")})
        return share_network_path((await self.engine.create_share_network(name, opts)).id)

    @method()
    @translate
    async def RunPeriodicHooks(self, options: "a{sv}"):
        await self.engine.run_periodic_hooks(unpack_options(options, {"backend": ("s",)}))

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def HostId(self) -> "s":
        return self.engine.host_id

    @dbus_property(access=PropertyAccess.READ)
    def Backends(self) -> "ao":
        return [backend_path(n) for n in self.engine.backend_names()]

    @dbus_property(access=PropertyAccess.READ)
    def DefaultBackend(self) -> "s":
        return next(iter(self.engine.backend_names()), "")

    @dbus_property(access=PropertyAccess.READ)
    def SpoolDir(self) -> "s":
        return self.engine.spool_dir

    @dbus_property(access=PropertyAccess.READ)
    def RecordSigningKey(self) -> "s":
        return self.engine.record_public_key

    @dbus_property(access=PropertyAccess.READ)
    def SpoolExport(self) -> "s":
        return self.engine.spool_export_location


class Hooks(_Base):
    def __init__(self, engine):
        super().__init__(C.IFACE_HOOKS, engine)

    @signal()
    def Fired(self, phase, method_name, record) -> "sss":
        return [phase, method_name, record]


class Backend(_Base):
    def __init__(self, engine, name):
        super().__init__(C.IFACE_BACKEND, engine)
        self.backend_name = name

    @property
    def _b(self):
        return self.engine.backend_info(self.backend_name)

    def props(self):
        return {"Stats": to_variant_dict(self._b.stats)}

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.backend_name

    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> "s":
        return self._b.driver

    @dbus_property(access=PropertyAccess.READ)
    def Protocols(self) -> "as":
        return self._b.protocols

    @dbus_property(access=PropertyAccess.READ)
    def AccessTypes(self) -> "as":
        return self._b.access_types

    @dbus_property(access=PropertyAccess.READ)
    def Stats(self) -> "a{sv}":
        return to_variant_dict(self._b.stats)


class Share(_Base):
    def __init__(self, engine, share):
        super().__init__(C.IFACE_SHARE, engine)
        self.share_id = share.id
        self.generation = 0
        self.update(share)

    def object_path(self):
        return share_path(self.share_id)

    def update(self, share, rules: bool = False):
        """The committed state, from the engine's events: property reads
        (GetManagedObjects over thousands of shares) touch no database.
        The rules are read again only when an event says they changed."""
        self.cache = dataclasses.replace(share)
        if rules or not hasattr(self, "_rule_cache"):
            self._rule_cache = None

    def _s(self):
        return self.cache

    def props(self):
        s = self._s()
        schedule, retention = self.engine.snapshot_policy(s)
        return {"SizeGiB": s.size_gib, "Status": s.status,
                "ExportLocations": list(s.export_locations),
                "AccessRules": self._rules(), "AccessRuleOptions": self._rule_options(),
                "SnapshotSchedule": schedule, "SnapshotRetention": retention,
                "SnapshotVisibility": self.engine.snapshot_visibility(s)}

    def _rule_list(self):
        if self._rule_cache is None:
            self._rule_cache = self.engine.rules(self.share_id)
        return self._rule_cache

    def _rules(self):
        return [list(r.as_tuple()) for r in self._rule_list()]

    def _rule_options(self):
        return {r.id: to_variant_dict(r.options()) for r in self._rule_list() if r.options()}

    @method()
    @translate
    async def AllowAccess(self, access_type: "s", access_to: "s", access_level: "s",
                          options: "a{sv}") -> "s":
        opts = unpack_options(options, {"squash": ("s",), "anonuid": ("u", "i", "t", "x"),
                                        "anongid": ("u", "i", "t", "x")})
        return await self.engine.allow_access(self.share_id, access_type, access_to,
                                              access_level, opts)

    @method()
    @translate
    async def DenyAccess(self, access_id: "s", options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.deny_access(self.share_id, access_id, {})

    @method()
    @translate
    async def SetSnapshotPolicy(self, options: "a{sv}"):
        opts = unpack_options(options, {"snapshot_schedule": ("s",),
                                        "snapshot_retention": ("s",),
                                        "snapshot_visibility": ("s",)})
        await self.engine.set_snapshot_policy(self.share_id, opts)

    @method()
    @translate
    async def Extend(self, new_size_gib: "t", options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.extend_share(self.share_id, new_size_gib, {})

    @method()
    @translate
    async def Shrink(self, new_size_gib: "t", options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.shrink_share(self.share_id, new_size_gib, {})

    @method()
    @translate
    async def CreateSnapshot(self, name: "s", options: "a{sv}") -> "o":
        unpack_options(options, {})
        snap = await self.engine.create_snapshot(self.share_id, name, {})
        return snapshot_path(snap.id)

    @method()
    @translate
    async def RevertToSnapshot(self, snapshot: "o", options: "a{sv}"):
        unpack_options(options, {})
        snap_id = _id_from_path(snapshot, C.SNAPSHOT_PATH, "snapshot")
        await self.engine.revert_to_snapshot(self.share_id, snap_id, {})

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_share(self.share_id, {})

    @method()
    @translate
    async def Unmanage(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.unmanage_share(self.share_id, {})

    @method()
    @translate
    async def Migrate(self, backend: "s", options: "a{sv}") -> "o":
        opts = unpack_options(options, {"wait_for_complete": ("b",)})
        job = await self.engine.migrate_share(self.share_id, backend, opts, await caller_uid())
        return job_path(job.id)

    @method()
    @translate
    async def CompleteMigration(self, options: "a{sv}") -> "o":
        unpack_options(options, {})
        job = await self.engine.complete_migration(self.share_id, {}, await caller_uid())
        return job_path(job.id)

    @method()
    @translate
    async def CancelMigration(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.cancel_migration(self.share_id, {})

    @method()
    @translate
    async def CreateReplica(self, backend: "s", options: "a{sv}") -> "o":
        opts = unpack_options(options, {"style": ("s",)})
        job = await self.engine.create_replica(self.share_id, backend, opts, await caller_uid())
        return job_path(job.id)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.share_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._s().name

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self._s().backend

    @dbus_property(access=PropertyAccess.READ)
    def Protocol(self) -> "s":
        return self._s().protocol

    @dbus_property(access=PropertyAccess.READ)
    def SizeGiB(self) -> "t":
        return self._s().size_gib

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._s().status

    @dbus_property(access=PropertyAccess.READ)
    def ExportLocations(self) -> "as":
        return list(self._s().export_locations)

    @dbus_property(access=PropertyAccess.READ)
    def AccessRules(self) -> "a(sssss)":
        return self._rules()

    @dbus_property(access=PropertyAccess.READ)
    def AccessRuleOptions(self) -> "a{sa{sv}}":
        """Per rule id, the options it was allowed with (NFS: squash, anonuid,
        anongid); rules without options are left out."""
        return self._rule_options()

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self._s().created_at

    @dbus_property(access=PropertyAccess.READ)
    def Description(self) -> "s":
        return self._s().description

    @dbus_property(access=PropertyAccess.READ)
    def Metadata(self) -> "a{ss}":
        return dict(self._s().metadata)

    @dbus_property(access=PropertyAccess.READ)
    def ShareGroup(self) -> "o":
        group_id = self._s().share_group_id
        return share_group_path(group_id) if group_id else "/"

    @dbus_property(access=PropertyAccess.READ)
    def SnapshotSchedule(self) -> "s":
        return self.engine.snapshot_policy(self._s())[0]

    @dbus_property(access=PropertyAccess.READ)
    def SnapshotRetention(self) -> "s":
        return self.engine.snapshot_policy(self._s())[1]

    @dbus_property(access=PropertyAccess.READ)
    def SnapshotVisibility(self) -> "s":
        """visible or hidden: whether clients see the share's snapshots."""
        return self.engine.snapshot_visibility(self._s())

    @dbus_property(access=PropertyAccess.READ)
    def SourceSnapshot(self) -> "o":
        snap_id = self._s().snapshot_id
        return snapshot_path(snap_id) if snap_id else "/"

    @dbus_property(access=PropertyAccess.READ)
    def ShareServer(self) -> "o":
        server_id = self._s().share_server_id
        return share_server_path(server_id) if server_id else "/"


class Snapshot(_Base):
    def __init__(self, engine, snap):
        super().__init__(C.IFACE_SNAPSHOT, engine)
        self.snapshot_id = snap.id
        self.generation = 0
        self.update(snap)

    def object_path(self):
        return snapshot_path(self.snapshot_id)

    def update(self, snap):
        self.cache = dataclasses.replace(snap)
        self._rule_cache = None

    def _s(self):
        return self.cache

    def _rules(self):
        if self._rule_cache is None:
            self._rule_cache = [list(r.as_tuple())
                                for r in self.engine.snapshot_rules(self.snapshot_id)]
        return self._rule_cache

    def props(self):
        return {"Status": self._s().status,
                "ExportLocations": list(self._s().export_locations),
                "AccessRules": self._rules()}

    @method()
    @translate
    async def AllowAccess(self, access_type: "s", access_to: "s", options: "a{sv}") -> "s":
        """Read-only access for clients (mountable snapshots)."""
        unpack_options(options, {})
        return await self.engine.allow_snapshot_access(self.snapshot_id, access_type,
                                                       access_to, {})

    @method()
    @translate
    async def DenyAccess(self, access_id: "s", options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.deny_snapshot_access(self.snapshot_id, access_id, {})

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_snapshot(self.snapshot_id, {})

    @method()
    @translate
    async def Unmanage(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.unmanage_snapshot(self.snapshot_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.snapshot_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._s().name

    @dbus_property(access=PropertyAccess.READ)
    def Share(self) -> "o":
        return share_path(self._s().share_id)

    @dbus_property(access=PropertyAccess.READ)
    def ShareGroupSnapshot(self) -> "o":
        gs_id = self._s().group_snapshot_id
        return group_snapshot_path(gs_id) if gs_id else "/"

    @dbus_property(access=PropertyAccess.READ)
    def SizeGiB(self) -> "t":
        return self._s().size_gib

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._s().status

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self._s().created_at

    @dbus_property(access=PropertyAccess.READ)
    def ExportLocations(self) -> "as":
        return list(self._s().export_locations)

    @dbus_property(access=PropertyAccess.READ)
    def AccessRules(self) -> "a(sssss)":
        return self._rules()


class ShareNetwork(_Base):
    """Few objects. The row is the one last published (a network never
    changes; a deleted one stays readable until it is unexported, after
    its removal is on disk); the list of servers is read on every access."""

    def __init__(self, engine, network):
        super().__init__(C.IFACE_SHARE_NETWORK, engine)
        self.network_id = network.id
        self.cache = dataclasses.replace(network)

    def object_path(self):
        return share_network_path(self.network_id)

    def _n(self):
        return self.cache

    def props(self):
        return {"ShareServers": self._servers()}

    def _servers(self):
        return [share_server_path(s.id) for s in self.engine.share_servers(self.network_id)]

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_share_network(self.network_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.network_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._n().name

    @dbus_property(access=PropertyAccess.READ)
    def Subnet(self) -> "s":
        return self._n().subnet

    @dbus_property(access=PropertyAccess.READ)
    def Gateway(self) -> "s":
        return self._n().gateway

    @dbus_property(access=PropertyAccess.READ)
    def AllocationRange(self) -> "s":
        return self._n().allocation_range

    @dbus_property(access=PropertyAccess.READ)
    def Attachment(self) -> "s":
        """bridge:NAME, or vlan:PARENT.ID"""
        return describe_attachment(self._n().attachment)

    @dbus_property(access=PropertyAccess.READ)
    def Mtu(self) -> "u":
        return self._n().mtu

    @dbus_property(access=PropertyAccess.READ)
    def ShareServers(self) -> "ao":
        return self._servers()

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self._n().created_at


class ShareServer(_Base):
    """The row is the one last published: between a change's commit and
    its publication (the WAL's fsync, off the loop) readers see the state
    before it, and a server being deleted never reads as missing."""

    def __init__(self, engine, server):
        super().__init__(C.IFACE_SHARE_SERVER, engine)
        self.server_id = server.id
        self.update(server)

    def update(self, server):
        self.cache = dataclasses.replace(server)

    def object_path(self):
        return share_server_path(self.server_id)

    def _s(self):
        return self.cache

    listed = ("Shares",)
    # A tenant's server may hold 10,000 shares: its entry in GetManagedObjects
    # and its Shares are kept until a share comes or goes or the server
    # changes (the bus service bumps this), not read at every call.
    generation = 0
    _kept: Tuple[int, List[str]] = (-1, [])

    def props(self):
        s = self._s()
        return {"Status": s.status, "Addresses": list(s.addresses)}

    def _shares(self):
        if self._kept[0] != self.generation:
            self._kept = (self.generation, [share_path(i) for i in
                                            self.engine.share_server_share_ids(self.server_id)])
        return self._kept[1]

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_share_server(self.server_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.server_id

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._s().status

    @dbus_property(access=PropertyAccess.READ)
    def ShareNetwork(self) -> "o":
        return share_network_path(self._s().network_id)

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self._s().backend

    @dbus_property(access=PropertyAccess.READ)
    def Addresses(self) -> "as":
        return list(self._s().addresses)

    @dbus_property(access=PropertyAccess.READ)
    def Shares(self) -> "ao":
        return self._shares()

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self._s().created_at


class Replica(_Base):
    """One copy of a replicated share (the active one included)."""

    def __init__(self, engine, replica):
        super().__init__(C.IFACE_REPLICA, engine)
        self.replica_id = replica.id
        self.generation = 0
        self.update(replica)

    def object_path(self):
        return replica_path(self.replica_id)

    def update(self, replica):
        self.cache = dataclasses.replace(replica)

    def _r(self):
        return self.cache

    def props(self):
        r = self._r()
        return {"ReplicaRole": r.role, "ReplicaState": r.state, "Status": r.status,
                "Backend": r.backend, "LastSync": r.last_sync, "Style": r.style,
                "ExportLocations": list(r.export_locations)}

    @method()
    @translate
    async def Promote(self, options: "a{sv}"):
        opts = unpack_options(options, {"force": ("b",)})
        await self.engine.promote_replica(self.replica_id, opts)

    @method()
    @translate
    async def Resync(self, options: "a{sv}") -> "o":
        unpack_options(options, {})
        job = await self.engine.resync_replica(self.replica_id, {}, await caller_uid())
        return job_path(job.id)

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_replica(self.replica_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.replica_id

    @dbus_property(access=PropertyAccess.READ)
    def Share(self) -> "o":
        return share_path(self._r().share_id)

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self._r().backend

    @dbus_property(access=PropertyAccess.READ)
    def ReplicaRole(self) -> "s":
        return self._r().role

    @dbus_property(access=PropertyAccess.READ)
    def ReplicaState(self) -> "s":
        return self._r().state

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self._r().status

    @dbus_property(access=PropertyAccess.READ)
    def Style(self) -> "s":
        return self._r().style

    @dbus_property(access=PropertyAccess.READ)
    def LastSync(self) -> "t":
        return self._r().last_sync

    @dbus_property(access=PropertyAccess.READ)
    def ExportLocations(self) -> "as":
        return list(self._r().export_locations)

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self._r().created_at


class Job(_Base):
    """A long operation in progress (UDisks2's Job): gone once Completed."""

    def __init__(self, engine, job):
        super().__init__(C.IFACE_JOB, engine)
        self.job = job

    def object_path(self):
        return job_path(self.job.id)

    def props(self):
        j = self.job
        return {"Progress": j.progress, "ProgressValid": j.progress_valid, "Bytes": j.bytes,
                "Rate": j.rate, "ExpectedEndTime": j.expected_end_time,
                "Cancelable": j.cancelable}

    @method()
    @translate
    async def Cancel(self, options: "a{sv}"):
        unpack_options(options, {})
        self.engine.cancel_job(self.job.id, {})

    @signal()
    def Completed(self, success, message) -> "bs":
        return [success, message]

    @dbus_property(access=PropertyAccess.READ)
    def Operation(self) -> "s":
        return self.job.operation

    @dbus_property(access=PropertyAccess.READ)
    def Objects(self) -> "ao":
        return [share_path(i) for i in self.job.objects]

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        return self.job.progress

    @dbus_property(access=PropertyAccess.READ)
    def ProgressValid(self) -> "b":
        return self.job.progress_valid

    @dbus_property(access=PropertyAccess.READ)
    def Bytes(self) -> "t":
        return self.job.bytes

    @dbus_property(access=PropertyAccess.READ)
    def Rate(self) -> "t":
        return self.job.rate

    @dbus_property(access=PropertyAccess.READ)
    def StartTime(self) -> "t":
        return self.job.start_time

    @dbus_property(access=PropertyAccess.READ)
    def ExpectedEndTime(self) -> "t":
        return self.job.expected_end_time

    @dbus_property(access=PropertyAccess.READ)
    def StartedByUID(self) -> "u":
        return self.job.started_by_uid

    @dbus_property(access=PropertyAccess.READ)
    def Cancelable(self) -> "b":
        return self.job.cancelable


class ShareGroup(_Base):
    """Shares snapshotted together (all on one backend)."""

    def __init__(self, engine, group):
        super().__init__(C.IFACE_SHARE_GROUP, engine)
        self.group_id = group.id
        self.generation = 0
        self.update(group)

    def object_path(self):
        return share_group_path(self.group_id)

    def update(self, group):
        self.cache = dataclasses.replace(group)

    listed = ("Shares",)

    def props(self):
        return {"Status": self.cache.status}

    @method()
    @translate
    async def CreateSnapshot(self, name: "s", options: "a{sv}") -> "o":
        unpack_options(options, {})
        gs = await self.engine.create_share_group_snapshot(self.group_id, name, {})
        return group_snapshot_path(gs.id)

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_share_group(self.group_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.group_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.cache.name

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self.cache.backend

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self.cache.status

    @dbus_property(access=PropertyAccess.READ)
    def Shares(self) -> "ao":
        return [share_path(s.id) for s in self.engine.group_members(self.group_id)]

    @dbus_property(access=PropertyAccess.READ)
    def SourceGroupSnapshot(self) -> "o":
        source = self.cache.source_group_snapshot_id
        return group_snapshot_path(source) if source else "/"

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self.cache.created_at


class ShareGroupSnapshot(_Base):
    """One snapshot of every member share of a group, taken together."""

    def __init__(self, engine, gs):
        super().__init__(C.IFACE_SHARE_GROUP_SNAPSHOT, engine)
        self.gs_id = gs.id
        self.generation = 0
        self.update(gs)

    def object_path(self):
        return group_snapshot_path(self.gs_id)

    def update(self, gs):
        self.cache = dataclasses.replace(gs)

    def props(self):
        return {"Status": self.cache.status, "Snapshots": self.Snapshots}

    @method()
    @translate
    async def Delete(self, options: "a{sv}"):
        unpack_options(options, {})
        await self.engine.delete_share_group_snapshot(self.gs_id, {})

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.gs_id

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.cache.name

    @dbus_property(access=PropertyAccess.READ)
    def ShareGroup(self) -> "o":
        return share_group_path(self.cache.group_id)

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self.cache.status

    @dbus_property(access=PropertyAccess.READ)
    def Snapshots(self) -> "ao":
        return [snapshot_path(s.id) for s in self.engine.group_snapshot_members(self.gs_id)]

    @dbus_property(access=PropertyAccess.READ)
    def CreatedAt(self) -> "t":
        return self.cache.created_at
