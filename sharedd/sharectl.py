"""sharectl: sharedd's D-Bus API as commands with human output.

    sharectl share list | show | create | delete | extend | shrink | manage |
                unmanage | migrate | schedule
    sharectl access list | allow | deny
    sharectl snapshot list | show | create | delete | revert | manage | unmanage |
                     access | allow | deny
    sharectl group list | show | create | delete | snapshot | delete-snapshot
    sharectl replica list | create | promote | resync | delete
    sharectl backend list | show
    sharectl job list | cancel

Shares, groups and backends are named by name, id or object path;
snapshots by id, object path or SHARE/NAME. Tables by default, --json for
scripts. Calls that start a job (migrate, replica create, replica resync)
return at once, or with --wait follow the job to its end (a progress bar on
a terminal). Exit status: 0 done; 1 sharedd refused or failed the call (the
D-Bus error name and message are printed); 2 the command line is wrong;
3 sharedd cannot be reached; 4 a named object does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from . import constants as C

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 1, 2, 3, 4
_ID = re.compile(r"[0-9a-f]{32}")
PROPS = "org.freedesktop.DBus.Properties"


class Failure(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


class Client:
    """Calls on sharedd over the system bus (DBUS_SYSTEM_BUS_ADDRESS)."""

    def __init__(self, bus: MessageBus, no_user_interaction: bool = False):
        self.bus = bus
        self.no_user_interaction = no_user_interaction

    async def call(self, path: str, iface: str, member: str, sig: str = "",
                   *body: Any) -> List[Any]:
        if self.no_user_interaction and sig.endswith("a{sv}") and iface != PROPS:
            body = body[:-1] + (dict(body[-1], **{C.OPTION_NO_USER_INTERACTION:
                                                  Variant("b", True)}),)
        reply = await self.bus.call(Message(destination=C.BUS_NAME, path=path, interface=iface,
                                            member=member, signature=sig, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                                    "org.freedesktop.DBus.Error.NameHasNoOwner"):
                raise Failure(EXIT_UNREACHABLE, f"sharedd is not running ({reply.error_name})")
            status = EXIT_NOT_FOUND if reply.error_name == C.ERROR_PREFIX + "NotFound" \
                else EXIT_REFUSED
            raise Failure(status, f"{reply.error_name}: {text}")
        return list(reply.body)

    async def props(self, path: str, iface: str) -> Dict[str, Any]:
        (values,) = await self.call(path, PROPS, "GetAll", "s", iface)
        return {k: unwrap(v) for k, v in values.items()}

    async def manager(self, member: str, sig: str = "", *body: Any) -> List[Any]:
        return await self.call(C.ROOT_PATH, C.IFACE_MANAGER, member, sig, *body)

    # --- names to object paths -------------------------------------------------
    @staticmethod
    def _direct(name: str, prefix: str) -> Optional[str]:
        """The object path name gives as a path or an id (None: a name)."""
        if name.startswith(prefix + "/"):
            return name
        if _ID.fullmatch(name):
            return f"{prefix}/{name}"
        return None

    async def share(self, name: str) -> str:
        direct = self._direct(name, C.SHARE_PATH)
        if direct:
            return direct
        try:
            (path,) = await self.manager("FindShareByName", "s", name)
        except Failure as exc:
            raise Failure(EXIT_NOT_FOUND, f"no share named {name!r} ({exc})") from None
        return str(path)

    async def snapshot(self, name: str) -> str:
        direct = self._direct(name, C.SNAPSHOT_PATH)
        if direct:
            return direct
        share, sep, snap = name.rpartition("/")
        if not sep:
            raise Failure(EXIT_USAGE, f"name a snapshot as SHARE/NAME, an id or a path, "
                                      f"not {name!r}")
        share_path = await self.share(share)
        (paths,) = await self.manager("ListSnapshots", "a{sv}", {"share": Variant("o", share_path)})
        for path in paths:
            if (await self.props(path, C.IFACE_SNAPSHOT))["Name"] == snap:
                return str(path)
        raise Failure(EXIT_NOT_FOUND, f"share {share} has no snapshot named {snap!r}")

    async def group(self, name: str) -> str:
        direct = self._direct(name, C.SHARE_GROUP_PATH)
        if direct:
            return direct
        for path, v in await self.of(C.IFACE_SHARE_GROUP):
            if v["Name"] == name:
                return path
        raise Failure(EXIT_NOT_FOUND, f"no share group named {name!r}")

    async def group_snapshot(self, name: str) -> str:
        direct = self._direct(name, C.SHARE_GROUP_SNAPSHOT_PATH)
        if direct:
            return direct
        group, sep, snap = name.rpartition("/")
        if not sep:
            raise Failure(EXIT_USAGE, f"name a group snapshot as GROUP/NAME, an id or a path, "
                                      f"not {name!r}")
        group_path = await self.group(group)
        for path, gs in await self.of(C.IFACE_SHARE_GROUP_SNAPSHOT):
            if gs["ShareGroup"] == group_path and gs["Name"] == snap:
                return path
        raise Failure(EXIT_NOT_FOUND, f"share group {group} has no snapshot named {snap!r}")

    @staticmethod
    def backend(name: str) -> str:
        return name if name.startswith(C.BACKEND_PATH + "/") else f"{C.BACKEND_PATH}/{name}"

    async def objects(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        (managed,) = await self.call(C.ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                                     "GetManagedObjects")
        return {path: {iface: {k: unwrap(v) for k, v in props.items()}
                       for iface, props in ifaces.items()}
                for path, ifaces in managed.items()}

    async def of(self, iface: str) -> List[Tuple[str, Dict[str, Any]]]:
        return sorted(((p, i[iface]) for p, i in (await self.objects()).items() if iface in i),
                      key=lambda x: (str(x[1].get("Name", "")), x[0]))


def unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def options(**values: Any) -> Dict[str, Variant]:
    """An a{sv} from keyword arguments (None: left out)."""
    sigs = {bool: "b", int: "t", str: "s"}
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, tuple):          # (signature, value)
            out[key] = Variant(*value)
        else:
            out[key] = Variant(sigs[type(value)], value)
    return out


def last(path: str) -> str:
    return path.rsplit("/", 1)[-1] if path and path != "/" else ""


# --- output ---------------------------------------------------------------------
class Out:
    def __init__(self, as_json: bool):
        self.as_json = as_json

    def table(self, columns: Sequence[str], rows: List[Sequence[Any]],
              data: Optional[List[Dict[str, Any]]] = None) -> None:
        if self.as_json:
            print(json.dumps(data if data is not None else
                             [dict(zip(columns, r)) for r in rows], indent=1, sort_keys=True))
            return
        texts = [[_cell(c) for c in r] for r in rows]
        widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(columns)]
        print("  ".join(h.ljust(w) for h, w in zip(columns, widths)).rstrip())
        for r in texts:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

    def record(self, values: Dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(values, indent=1, sort_keys=True, default=str))
            return
        width = max((len(k) for k in values), default=0)
        for key, value in values.items():
            print(f"{key.ljust(width)}  {_cell(value)}")

    def done(self, text: str, data: Optional[Dict[str, Any]] = None) -> None:
        if self.as_json:
            print(json.dumps(data or {"result": text}, sort_keys=True))
        else:
            print(text)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    if value in ("", None, "/"):
        return "-"
    return str(value)


# --- commands --------------------------------------------------------------------
async def share_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    S = C.IFACE_SHARE
    if a.action == "list":
        # one GetManagedObjects, not one GetAll per share (10,000 round trips)
        want = {"Backend": a.backend, "Status": a.status,
                "Protocol": a.protocol.upper() if a.protocol else None}
        data = [v for _, v in await c.of(S)
                if all(x is None or v[k] == x for k, x in want.items())]
        out.table(["NAME", "ID", "BACKEND", "PROTOCOL", "GIB", "STATUS", "EXPORT"],
                  [[v["Name"], v["Id"], v["Backend"], v["Protocol"], v["SizeGiB"], v["Status"],
                    v["ExportLocations"]] for v in data], data)
    elif a.action == "show":
        p = await c.share(a.share)
        out.record(await c.props(p, S))
    elif a.action == "create":
        snap = await c.snapshot(a.snapshot) if a.snapshot else None
        group = await c.group(a.group) if a.group else None
        (p,) = await c.manager("CreateShare", "ssta{sv}", a.name, a.protocol, a.size, options(
            backend=a.backend, description=a.description,
            snapshot=("o", snap) if snap else None, share_group=("o", group) if group else None,
            snapshot_schedule=a.schedule, snapshot_retention=a.retention,
            snapshot_visibility=a.visibility))
        out.done(f"share {a.name} created: {p}", {"share": p})
    elif a.action in ("delete", "unmanage"):
        p = await c.share(a.share)
        await c.call(p, S, "Delete" if a.action == "delete" else "Unmanage", "a{sv}", {})
        out.done(f"share {a.share} {a.action}d")
    elif a.action in ("extend", "shrink"):
        p = await c.share(a.share)
        await c.call(p, S, a.action.capitalize(), "ta{sv}", a.size, {})
        out.done(f"share {a.share} is now {a.size} GiB")
    elif a.action == "manage":
        (p,) = await c.manager("ManageShare", "sssa{sv}", a.backend, a.protocol, a.path,
                               options(name=a.name, size_gib=a.size))
        out.done(f"share managed: {p}", {"share": p})
    elif a.action == "schedule":
        p = await c.share(a.share)
        await c.call(p, S, "SetSnapshotPolicy", "a{sv}",
                     options(snapshot_schedule=a.schedule, snapshot_retention=a.retention,
                             snapshot_visibility=a.visibility))
        v = await c.props(p, S)
        out.record({k: v[k] for k in ("SnapshotSchedule", "SnapshotRetention",
                                      "SnapshotVisibility")})
    elif a.action == "migrate":
        p = await c.share(a.share)
        watch = await completions(c, a.wait)
        (job,) = await c.call(p, S, "Migrate", "sa{sv}", a.backend,
                              options(wait_for_complete=True if a.wait_for_complete else None))
        await follow(c, out, job, watch)


def rules_table(out: Out, v: Dict[str, Any]) -> None:
    """A share's or a snapshot's AccessRules (and AccessRuleOptions)."""
    extra = v.get("AccessRuleOptions", {})
    rows = [list(r) + [extra.get(r[0], {})] for r in v["AccessRules"]]
    out.table(["ID", "TYPE", "TO", "LEVEL", "STATE", "OPTIONS"], rows,
              [dict(zip(["id", "access_type", "access_to", "access_level", "state",
                         "options"], r)) for r in rows])


async def access_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    p = await c.share(a.share)
    if a.action == "list":
        rules_table(out, await c.props(p, C.IFACE_SHARE))
    elif a.action == "allow":
        opts = options(squash=a.squash,
                       anonuid=("u", a.anonuid) if a.anonuid is not None else None,
                       anongid=("u", a.anongid) if a.anongid is not None else None)
        (rid,) = await c.call(p, C.IFACE_SHARE, "AllowAccess", "sssa{sv}", a.type, a.to,
                              a.level, opts)
        out.done(f"{a.level} access for {a.type} {a.to}: {rid}", {"access_id": rid})
    elif a.action == "deny":
        await c.call(p, C.IFACE_SHARE, "DenyAccess", "sa{sv}", a.access_id, {})
        out.done(f"access {a.access_id} denied")


async def snapshot_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    N = C.IFACE_SNAPSHOT
    if a.action == "list":
        only = await c.share(a.share) if a.share else None
        objs = await c.objects()
        data = sorted((i[N] for i in objs.values()
                       if N in i and (only is None or i[N]["Share"] == only)),
                      key=lambda v: (v["Share"], v["CreatedAt"], v["Name"]))
        names = {p: i[C.IFACE_SHARE]["Name"] for p, i in objs.items() if C.IFACE_SHARE in i}
        out.table(["SHARE", "NAME", "ID", "GIB", "STATUS"],
                  [[names.get(v["Share"], v["Share"]), v["Name"], v["Id"], v["SizeGiB"],
                    v["Status"]] for v in data], data)
    elif a.action == "show":
        out.record(await c.props(await c.snapshot(a.snapshot), N))
    elif a.action == "create":
        (path,) = await c.call(await c.share(a.share), C.IFACE_SHARE, "CreateSnapshot",
                               "sa{sv}", a.name, {})
        out.done(f"snapshot {a.share}/{a.name} created: {path}", {"snapshot": path})
    elif a.action in ("delete", "unmanage"):
        path = await c.snapshot(a.snapshot)
        await c.call(path, N, "Delete" if a.action == "delete" else "Unmanage", "a{sv}", {})
        out.done(f"snapshot {a.snapshot} {a.action}d")
    elif a.action == "revert":
        path = await c.snapshot(a.snapshot)
        share = (await c.props(path, N))["Share"]
        await c.call(share, C.IFACE_SHARE, "RevertToSnapshot", "oa{sv}", path, {})
        out.done(f"share reverted to {a.snapshot}")
    elif a.action == "manage":
        (path,) = await c.manager("ManageSnapshot", "osa{sv}", await c.share(a.share),
                                  a.location, options(name=a.name))
        out.done(f"snapshot managed: {path}", {"snapshot": path})
    elif a.action == "access":
        rules_table(out, await c.props(await c.snapshot(a.snapshot), N))
    elif a.action == "allow":
        path = await c.snapshot(a.snapshot)
        (rid,) = await c.call(path, N, "AllowAccess", "ssa{sv}", a.type, a.to, {})
        where = (await c.props(path, N))["ExportLocations"]
        out.done(f"ro access to {a.snapshot} for {a.type} {a.to}: {rid} "
                 f"(mount {', '.join(where)})", {"access_id": rid, "export_locations": where})
    elif a.action == "deny":
        await c.call(await c.snapshot(a.snapshot), N, "DenyAccess", "sa{sv}", a.access_id, {})
        out.done(f"access {a.access_id} to {a.snapshot} denied")


async def group_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    G, GS = C.IFACE_SHARE_GROUP, C.IFACE_SHARE_GROUP_SNAPSHOT
    if a.action == "list":
        groups = await c.of(G)
        out.table(["NAME", "ID", "BACKEND", "STATUS", "SHARES"],
                  [[v["Name"], v["Id"], v["Backend"], v["Status"], len(v["Shares"])]
                   for _, v in groups], [v for _, v in groups])
    elif a.action == "show":
        path = await c.group(a.group)
        v = await c.props(path, G)
        snaps = [s for _, s in await c.of(GS) if s["ShareGroup"] == path]
        v["Snapshots"] = [s["Name"] for s in snaps]
        out.record(v)
    elif a.action == "create":
        source = await c.group_snapshot(a.source) if a.source else None
        (path,) = await c.manager("CreateShareGroup", "sa{sv}", a.name, options(
            backend=a.backend, source_group_snapshot=("o", source) if source else None))
        out.done(f"share group {a.name} created: {path}", {"share_group": path})
    elif a.action == "delete":
        await c.call(await c.group(a.group), G, "Delete", "a{sv}", {})
        out.done(f"share group {a.group} deleted")
    elif a.action == "snapshot":
        (path,) = await c.call(await c.group(a.group), G, "CreateSnapshot", "sa{sv}", a.name, {})
        out.done(f"share group snapshot {a.group}/{a.name} created: {path}",
                 {"share_group_snapshot": path})
    elif a.action == "delete-snapshot":
        await c.call(await c.group_snapshot(a.snapshot), GS, "Delete", "a{sv}", {})
        out.done(f"share group snapshot {a.snapshot} deleted")


async def replica_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    R = C.IFACE_REPLICA
    if a.action == "list":
        share = await c.share(a.share)
        rows = [(p, v) for p, v in await c.of(R) if v["Share"] == share]
        out.table(["ID", "BACKEND", "ROLE", "STATE", "STATUS", "STYLE"],
                  [[v["Id"], v["Backend"], v["ReplicaRole"], v["ReplicaState"], v["Status"],
                    v["Style"]] for _, v in rows], [v for _, v in rows])
    elif a.action == "create":
        share = await c.share(a.share)
        watch = await completions(c, a.wait)
        (job,) = await c.call(share, C.IFACE_SHARE, "CreateReplica", "sa{sv}",
                              a.backend, options(style=a.style))
        await follow(c, out, job, watch)
    else:
        path = a.replica if a.replica.startswith(C.REPLICA_PATH) else \
            f"{C.REPLICA_PATH}/{a.replica}"
        if a.action == "promote":
            await c.call(path, R, "Promote", "a{sv}", options(force=True if a.force else None))
            out.done(f"replica {a.replica} promoted")
        elif a.action == "resync":
            watch = await completions(c, a.wait)
            (job,) = await c.call(path, R, "Resync", "a{sv}", {})
            await follow(c, out, job, watch)
        elif a.action == "delete":
            await c.call(path, R, "Delete", "a{sv}", {})
            out.done(f"replica {a.replica} deleted")


async def backend_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    B = C.IFACE_BACKEND
    if a.action == "list":
        rows, data = [], []
        for path, v in await c.of(B):
            stats = v.get("Stats", {})
            rows.append([v["Name"], v["Driver"], v["Protocols"],
                         stats.get("total_capacity_gb", "-"), stats.get("free_capacity_gb", "-"),
                         stats.get("provisioned_capacity_gb", "-"),
                         "yes" if stats.get("available", True) else "no"])
            data.append(v)
        out.table(["NAME", "DRIVER", "PROTOCOLS", "TOTAL_GB", "FREE_GB", "PROVISIONED_GB",
                   "USABLE"], rows, data)
    else:
        out.record(await c.props(c.backend(a.backend), B))


async def job_cmd(c: Client, out: Out, a: argparse.Namespace) -> None:
    J = C.IFACE_JOB
    if a.action == "list":
        jobs = await c.of(J)
        out.table(["ID", "OPERATION", "PROGRESS", "OBJECTS"],
                  [[last(p), v["Operation"], f"{v['Progress'] * 100:.0f}%"
                    if v.get("ProgressValid") else "-", [last(o) for o in v["Objects"]]]
                   for p, v in jobs], [v for _, v in jobs])
    else:
        path = a.job if a.job.startswith(C.JOB_PATH) else f"{C.JOB_PATH}/{a.job}"
        await c.call(path, J, "Cancel", "a{sv}", {})
        out.done(f"job {a.job} cancelled")


class Completions:
    """Jobs' Completed signals, listened for before a job starts (a job is
    gone once completed: one that ends before we look is not missed), and
    taken only from sharedd itself: any local user may send a signal named
    Completed to our connection."""

    def __init__(self) -> None:
        self.owner = ""                  # org.sharedd.Sharedd1's unique name
        self.done: Dict[str, Tuple[bool, str]] = {}
        self.arrived = asyncio.Event()

    async def listen(self, c: Client) -> "Completions":
        rule = (f"type='signal',sender='{C.BUS_NAME}',interface='{C.IFACE_JOB}',"
                f"member='Completed',path_namespace='{C.JOB_PATH}'")
        for member, arg in (("AddMatch", rule), ("GetNameOwner", C.BUS_NAME)):
            reply = await c.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member=member, signature="s", body=[arg]))
            if member == "GetNameOwner" and reply.message_type == MessageType.METHOD_RETURN:
                self.owner = reply.body[0]   # (not running: the call that starts the job says so)
        c.bus.add_message_handler(self.take)
        return self

    def take(self, msg: Message) -> None:
        if (msg.message_type == MessageType.SIGNAL and self.owner and msg.sender == self.owner
                and msg.interface == C.IFACE_JOB and msg.member == "Completed"
                and msg.signature == "bs" and msg.path.startswith(C.JOB_PATH + "/")):
            self.done[msg.path] = (msg.body[0], msg.body[1][:4000])
            self.arrived.set()


async def completions(c: Client, wait: bool) -> Optional[Completions]:
    """Before a call that starts a job: its Completed, if it is to be followed."""
    return await Completions().listen(c) if wait else None


async def follow(c: Client, out: Out, job: str, watch: Optional[Completions]) -> None:
    """Print the job; with watch (--wait), follow it to Completed."""
    if watch is None:
        out.done(f"started job {job}", {"job": job})
        return
    bar = sys.stdout.isatty() and not out.as_json
    while job not in watch.done:
        try:
            v = await c.props(job, C.IFACE_JOB)
        except Failure:
            if job in watch.done:
                break
            # (sharedd restarted meanwhile, or another took its name)
            raise Failure(EXIT_REFUSED, f"job {last(job)} is gone without a Completed signal "
                          "from sharedd: its outcome is unknown (see sharedd's journal)") from None
        if bar and v.get("ProgressValid"):
            filled = int(v["Progress"] * 30)
            print(f"\r{v['Operation']} [{'#' * filled}{'.' * (30 - filled)}] "
                  f"{v['Progress'] * 100:5.1f}%", end="", flush=True)
        watch.arrived.clear()
        if job not in watch.done:
            try:
                await asyncio.wait_for(watch.arrived.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
    if bar:
        print()
    ok, message = watch.done[job]
    if not ok:
        raise Failure(EXIT_REFUSED, f"job {last(job)} failed: {message}")
    out.done(f"job {last(job)} completed: {message or 'ok'}",
             {"job": job, "success": ok, "message": message})


# --- command line ----------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharectl", description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 done, 1 refused or failed by sharedd, "
                                       "2 command line error, 3 sharedd not reachable, "
                                       "4 no such object.")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-user-interaction", action="store_true",
                   help="do not let polkit ask for a password: refuse instead")
    sub = p.add_subparsers(dest="noun", required=True)
    # --json is taken anywhere on the line
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of tables")

    class Verbs:
        def __init__(self, actions: Any):
            self.actions = actions

        def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
            parser: argparse.ArgumentParser = self.actions.add_parser(name, parents=[common], **kw)
            return parser

    def verbs(noun: str, help_text: str) -> Verbs:
        sp = sub.add_parser(noun, help=help_text, parents=[common])
        return Verbs(sp.add_subparsers(dest="action", required=True))

    s = verbs("share", "shares")
    x = s.add_parser("list", help="list shares")
    x.add_argument("--backend")
    x.add_argument("--status")
    x.add_argument("--protocol")
    s.add_parser("show", help="every property of a share").add_argument("share")
    x = s.add_parser("create", help="create a share")
    x.add_argument("name")
    x.add_argument("--protocol", default="NFS")
    x.add_argument("--size", type=int, default=1, help="GiB (default 1)")
    x.add_argument("--backend")
    x.add_argument("--description")
    x.add_argument("--snapshot", help="make it from this snapshot (SHARE/NAME or id)")
    x.add_argument("--group", help="join this share group")
    x.add_argument("--schedule", help="snapshot schedule (e.g. daily, 4h)")
    x.add_argument("--retention", help="snapshot retention (e.g. 7, 30d)")
    x.add_argument("--visibility", choices=C.SNAPSHOT_VISIBILITIES,
                   help="whether clients see its snapshots (default: the backend's)")
    for verb in ("delete", "unmanage"):
        s.add_parser(verb, help=f"{verb} a share").add_argument("share")
    for verb in ("extend", "shrink"):
        x = s.add_parser(verb, help=f"{verb} a share to a new size")
        x.add_argument("share")
        x.add_argument("size", type=int, help="GiB")
    x = s.add_parser("manage", help="adopt existing storage as a share")
    x.add_argument("backend")
    x.add_argument("protocol")
    x.add_argument("path")
    x.add_argument("--name")
    x.add_argument("--size", type=int)
    x = s.add_parser("schedule", help="set a share's snapshot schedule, retention and "
                                      "visibility")
    x.add_argument("share")
    x.add_argument("--schedule", help='"" for the backend\'s, none for no schedule')
    x.add_argument("--retention", help='"" for the backend\'s, all to keep every one')
    x.add_argument("--visibility", choices=C.SNAPSHOT_VISIBILITIES + ("",),
                   help='whether clients see its snapshots ("" for the backend\'s)')
    x = s.add_parser("migrate", help="move a share to another backend (a job)")
    x.add_argument("share")
    x.add_argument("backend")
    x.add_argument("--wait-for-complete", action="store_true",
                   help="stop before the switch (CompleteMigration finishes it)")
    x.add_argument("--wait", action="store_true", help="follow the job to its end")

    s = verbs("access", "access rules")
    s.add_parser("list", help="a share's rules").add_argument("share")
    x = s.add_parser("allow", help="grant access")
    x.add_argument("share")
    x.add_argument("type", choices=list(C.ACCESS_TYPES))
    x.add_argument("to")
    level = x.add_mutually_exclusive_group(required=True)
    level.add_argument("--rw", dest="level", action="store_const", const="rw")
    level.add_argument("--ro", dest="level", action="store_const", const="ro")
    x.add_argument("--squash", choices=list(C.SQUASH_MODES))
    x.add_argument("--anonuid", type=int)
    x.add_argument("--anongid", type=int)
    x = s.add_parser("deny", help="withdraw access")
    x.add_argument("share")
    x.add_argument("access_id")

    s = verbs("snapshot", "snapshots")
    s.add_parser("list", help="snapshots (of one share)").add_argument("share", nargs="?")
    s.add_parser("show", help="every property of a snapshot").add_argument("snapshot")
    x = s.add_parser("create", help="take a snapshot")
    x.add_argument("share")
    x.add_argument("name")
    for verb in ("delete", "unmanage", "revert"):
        s.add_parser(verb, help=f"{verb} (SHARE/NAME, id or path)").add_argument("snapshot")
    x = s.add_parser("manage", help="adopt a snapshot the backend holds")
    x.add_argument("share")
    x.add_argument("location")
    x.add_argument("--name")
    s.add_parser("access", help="who may mount a snapshot (read-only)").add_argument("snapshot")
    x = s.add_parser("allow", help="let clients mount a snapshot, read-only")
    x.add_argument("snapshot")
    x.add_argument("type", choices=["ip", "user", "cert"])
    x.add_argument("to")
    x = s.add_parser("deny", help="withdraw a snapshot access rule")
    x.add_argument("snapshot")
    x.add_argument("access_id")

    s = verbs("group", "share groups")
    s.add_parser("list", help="share groups")
    s.add_parser("show", help="a group, its shares and snapshots").add_argument("group")
    x = s.add_parser("create", help="create a share group")
    x.add_argument("name")
    x.add_argument("--backend")
    x.add_argument("--source", help="make its shares from this group snapshot (GROUP/NAME)")
    s.add_parser("delete", help="delete an empty share group").add_argument("group")
    x = s.add_parser("snapshot", help="snapshot every share of a group")
    x.add_argument("group")
    x.add_argument("name")
    s.add_parser("delete-snapshot", help="delete a group snapshot (GROUP/NAME)"
                 ).add_argument("snapshot")

    s = verbs("replica", "replicas")
    s.add_parser("list", help="a share's copies").add_argument("share")
    x = s.add_parser("create", help="replicate a share to a backend (a job)")
    x.add_argument("share")
    x.add_argument("backend")
    x.add_argument("--style", choices=list(C.REPLICATION_STYLES))
    x.add_argument("--wait", action="store_true")
    x = s.add_parser("promote", help="make a replica the active copy")
    x.add_argument("replica")
    x.add_argument("--force", action="store_true")
    x = s.add_parser("resync", help="sync a replica again (a job)")
    x.add_argument("replica")
    x.add_argument("--wait", action="store_true")
    s.add_parser("delete", help="delete a replica").add_argument("replica")

    s = verbs("backend", "backends")
    s.add_parser("list", help="backends and their capacity")
    s.add_parser("show", help="every property of a backend").add_argument("backend")

    s = verbs("job", "jobs (long operations)")
    s.add_parser("list", help="running jobs")
    s.add_parser("cancel", help="cancel a job").add_argument("job")
    return p


COMMANDS = {"share": share_cmd, "access": access_cmd, "snapshot": snapshot_cmd,
            "group": group_cmd, "replica": replica_cmd, "backend": backend_cmd, "job": job_cmd}


async def run(args: argparse.Namespace) -> int:
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:   # no bus at all
        print(f"sharectl: cannot reach the system bus: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        await COMMANDS[args.noun](Client(bus, args.no_user_interaction), Out(args.json), args)
        return 0
    except Failure as exc:
        print(f"sharectl: {exc}", file=sys.stderr)
        return exc.status
    finally:
        bus.disconnect()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
