"""NFS exports through NFS-Ganesha's export manager on the system bus.

One export per share. Its config file lives in the helper's state dir as
``<share id>.conf`` and holds the export id (a uint16), the rule set the
helper applied (a JSON comment line), and the EXPORT block::

    EXPORT {
        Export_Id = N; Path = "<path>"; Pseudo = "<prefix>/<share id>";
        Protocols = 4; Transports = TCP; SecType = sys;
        Squash = No_Root_Squash; Access_Type = None;     # unlisted: nothing
        FSAL { Name = VFS; }
        CLIENT { Clients = ...; Access_Type = RW; Protocols = 4; }   # first:
        CLIENT { Clients = ...; Access_Type = RO; Protocols = 4; }   # rw wins
    }

The pseudo path uses the share id, not its name: ids never change and are
never reused, so a client holding an old path cannot reach a newer share.

Snapshots a share shows (show_snapshots) are exports of their own, nested
in the share's pseudo path at ``<share pseudo>/.snapshots/<name>`` (ganesha
4.3 does not serve file systems mounted inside an export after it was
added, and offers no option to): read-only, to the share's clients (a
client must pass both exports' lists), over an empty junction directory
``.snapshots/<name>`` in the share. Their file is named by an id derived
from the share's and the name. ganesha refuses to remove an export with
nested ones, and an export added over a nested one hides it: nested ones go
first, and come back after their share (reexport_all orders by depth).

ganesha's export manager (org.ganesha.nfsd, /org/ganesha/nfsd/ExportMgr) is
called over the daemon's own bus connection, or with ``busctl`` where there
is none (busctl honours DBUS_SYSTEM_BUS_ADDRESS).

Export ids: which ids sharedd's files use, and which ganesha serves for
others, is learnt once (one directory scan, one ShowExports) and then kept
in memory, so a new export costs the same with 10 or 10,000 exports. An id
taken behind our back is found when AddExport says it is active: it is
remembered as foreign and another id is tried.

Client forms, as measured with NFS-Ganesha 4.3:

- IPv4 address or CIDR: written as is (a /32 as the bare address).
- ``0.0.0.0/0`` is refused by ganesha's parser, and ``0.0.0.0`` (Manila's
  spelling) or ``*`` match IPv6 clients as well; everyone-IPv4 is written
  as ``0.0.0.0/1, 128.0.0.0/1``.
- IPv6: a bare address, or a prefix of length 1-99; ganesha's parser
  refuses ``/0`` and three-digit lengths (``/100``..``/128`` make a CLIENT
  block silently vanish). ``::/0`` is written as ``::/1, 8000::/1``, a
  ``/128`` as the bare address; ``/100``..``/127`` are NotSupported.
- IPv4-mapped IPv6 addresses are NotSupported (ganesha matches IPv4
  clients by their IPv4 form).

Quirks handled: AddExport on an active id fails (a new export tries another
id); UpdateExport on an unknown id adds it; a reply can be a success string
that carries "Errors found" (treated as failure and undone); "busy" comes
back as InvalidArgs (retried with backoff, about 5 s in all); runtime exports
vanish when ganesha restarts (the daemon ensures every share again when
ganesha's bus name reappears; ``reexport_all`` re-adds them from the files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import stat
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ..errors import (BackendFailure, CapacityExceeded, ConfigError,
                      InvalidArgument, NotFound, NotSupported)
from ..models import AccessRule, Share
from ..options import Opt
from ..util import atomic_write, run
from .base import (BusCallError, ExportHelper, Grant, Overlay, grants_from_json, merge_access,
                   rule_map)

log = logging.getLogger(__name__)

BUS_NAME = "org.ganesha.nfsd"
EXPORT_MGR_PATH = "/org/ganesha/nfsd/ExportMgr"
EXPORT_MGR_IFACE = "org.ganesha.nfsd.exportmgr"

_SHARE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._-]+)*$")
_META_RE = re.compile(r"^# sharedd-ganesha: (\{.*\})$", re.M)
#: where a share shows its snapshots, and the key of a nested export's pseudo path
SNAPSHOT_DIR = ".snapshots"
NESTED_PSEUDO = "ganesha_pseudo"
_NAME_RE = re.compile(r"[A-Za-z0-9@][A-Za-z0-9._@-]{0,127}")

_BUSY_RETRIES = 10
_BUSY_DELAY = 0.05          # doubling up to _BUSY_DELAY_MAX: about 5 s in all
_BUSY_DELAY_MAX = 1.0
_ID_ATTEMPTS = 8            # export ids tried when ganesha says one is taken


# ganesha's spelling of each squash mode
_SQUASH = {"root_squash": "Root_Squash", "all_squash": "All_Squash",
           "no_root_squash": "No_Root_Squash"}


def _junction(share_root: str, name: Optional[str], make: bool) -> None:
    """Make (or remove, if empty) <share_root>/.snapshots[/name]: ganesha
    cannot make a directory in a VFS export, so a nested export needs one.
    The share's content is its clients': every step is relative to an open
    directory and follows no symbolic link a client may have put there."""
    root = os.open(share_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if make:
            with contextlib.suppress(FileExistsError):
                os.mkdir(SNAPSHOT_DIR, 0o755, dir_fd=root)
        try:
            top = os.open(SNAPSHOT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BackendFailure(f"{share_root}/{SNAPSHOT_DIR} is not a directory sharedd can "
                                 f"use (a client's symbolic link or file?): {exc}") from None
        try:
            if name is None:
                os.close(top)
                top = -1
                with contextlib.suppress(OSError):
                    os.rmdir(SNAPSHOT_DIR, dir_fd=root)
            elif make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=top)
                if not stat.S_ISDIR(os.stat(name, dir_fd=top, follow_symlinks=False).st_mode):
                    raise BackendFailure(f"{share_root}/{SNAPSHOT_DIR}/{name} is not a directory")
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=top)
        finally:
            if top >= 0:
                os.close(top)
    finally:
        os.close(root)


def _grants(entries: Any) -> Optional[Dict[str, Grant]]:
    """The rule set an export file records; None if unreadable (the caller
    then starts from the rules the engine passed)."""
    try:
        return grants_from_json(entries)
    except ValueError as exc:
        log.warning("export file: %s; using the share's rules", exc)
        return None


def _busy(text: str) -> bool:
    """ganesha's "try again later" (its admin lock is held), sent as InvalidArgs."""
    low = text.lower()
    return "busy" in low or "try again" in low


def _backoff(attempt: int) -> None:
    time.sleep(min(_BUSY_DELAY * 2 ** attempt, _BUSY_DELAY_MAX))


class GaneshaHelper(ExportHelper):
    helper_name = "ganesha"
    protocol = "NFS"
    access_levels = {"ip": ("rw", "ro")}

    OPTIONS = [
        Opt("ganesha_export_id_min", "int", 100, min=1, max=65535,
            help="Lowest NFS-Ganesha Export_Id sharedd allocates (keep ids of exports "
                 "in ganesha's own config outside the range)."),
        Opt("ganesha_export_id_max", "int", 65535, min=1, max=65535,
            help="Highest Export_Id sharedd allocates (ids are 16-bit)."),
        Opt("ganesha_pseudo_prefix", "path", "/shares",
            help="NFSv4 pseudo-file-system directory under which shares appear as "
                 "<prefix>/<share id>."),
    ]

    def __init__(self, config, state_dir: str, command_timeout: float = 120.0):
        super().__init__(config, state_dir, command_timeout)
        self.id_min = int(self._opt("ganesha_export_id_min", 100))
        self.id_max = int(self._opt("ganesha_export_id_max", 65535))
        if not 1 <= self.id_min <= self.id_max <= 65535:
            raise ConfigError(f"[{getattr(config, 'name', '?')}] ganesha_export_id_min/"
                              f"ganesha_export_id_max: need 1 <= min <= max <= 65535, "
                              f"got {self.id_min}..{self.id_max}")
        prefix = self._opt("ganesha_pseudo_prefix", "/shares") or "/"
        prefix = os.path.normpath("/" + str(prefix).lstrip("/")).rstrip("/")
        if not _PREFIX_RE.fullmatch(prefix):
            raise ConfigError(f"[{getattr(config, 'name', '?')}] ganesha_pseudo_prefix: "
                              f"{prefix!r} may only use letters, digits, '.', '_', '-' and '/'")
        self.prefix = prefix
        # export id -> share id of our files, and ids ganesha serves for
        # others; None until first needed (read under the directory lock).
        self._ids: Optional[Dict[int, str]] = None
        self._foreign: Set[int] = set()
        self._cursor = self.id_min
        # A share server's own ganesha, on the server's private bus (None:
        # the host's ganesha on the system bus).
        self.bus_address: Optional[str] = None

    def for_server(self, server_id: str, details: Dict[str, Any]) -> "GaneshaHelper":
        address, bus = str(details.get("address", "")), str(details.get("bus_address", ""))
        if not address or not bus.startswith("unix:path=/"):
            raise BackendFailure(f"share server {server_id}: no address or bus in its details")
        if not _SHARE_ID_RE.fullmatch(server_id):
            raise InvalidArgument(f"bad share server id {server_id!r}")
        helper = GaneshaHelper(Overlay(self.config, share_export_ip=address),
                               os.path.join(self.state_dir, "servers", server_id),
                               self.command_timeout)
        helper.bus_address = bus
        helper.isolate_subtrees = self.isolate_subtrees
        return helper

    def forget(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _opt(self, name: str, default):
        try:
            value = getattr(self.config, name)
        except AttributeError:
            return default
        return default if value is None else value

    # --- setup -----------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        try:
            self._active_ids()
        except BackendFailure as exc:
            raise BackendFailure(f"NFS-Ganesha is not reachable on the system bus as {BUS_NAME} "
                                 f"(is ganesha.nfsd running with D-Bus enabled?): {exc}") from None

    # --- validation ------------------------------------------------------
    def client_spec(self, access_type: str, access_to: str) -> List[str]:
        """The ganesha Clients entries for one rule; raise if not enforceable."""
        if access_type != "ip":
            raise NotSupported(f"{self.helper_name} cannot enforce {access_type!r} rules (only 'ip')")
        text = (access_to or "").strip()
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"access_to {access_to!r} is not an IPv4/IPv6 address "
                                  f"or network: {exc}") from None
        if net.version == 4:
            if net.prefixlen == 0:
                return ["0.0.0.0/1", "128.0.0.0/1"]
            if net.prefixlen == 32:
                return [str(net.network_address)]
            return [str(net)]
        if net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
            raise NotSupported(f"{self.helper_name} cannot enforce IPv4-mapped address {access_to!r}; "
                               "use the IPv4 form")
        if net.prefixlen == 0:
            return ["::/1", "8000::/1"]
        if net.prefixlen == 128:
            return [str(net.network_address)]
        if net.prefixlen >= 100:
            raise NotSupported(f"{self.helper_name}: NFS-Ganesha cannot parse IPv6 prefix lengths "
                               f"above 99 ({access_to!r}); use a shorter prefix or single addresses")
        return [str(net)]

    def validate_rule(self, rule: AccessRule) -> None:
        self.validate_access(rule.access_type, rule.access_level)
        self.client_spec(rule.access_type, rule.access_to)

    def _check_share(self, share: Share, path: Optional[str] = None) -> None:
        if not _SHARE_ID_RE.fullmatch(share.id or ""):
            raise InvalidArgument(f"share id {share.id!r} cannot name an export file")
        if path is not None:
            if not os.path.isabs(path) or any(c in path for c in '"\\\n\r\t\0{};#'):
                raise InvalidArgument(f"export path {path!r} must be absolute and free of "
                                      "quotes, backslashes, braces, ';', '#' and control characters")

    # --- names -----------------------------------------------------------
    def pseudo_path(self, share: Share) -> str:
        return str(share.driver_data.get(NESTED_PSEUDO) or f"{self.prefix}/{share.id}")

    # --- snapshots shown in a share (nested exports) ------------------------
    shows_snapshots = True

    def _nested(self, share: Share, name: str) -> Share:
        """The export of the share's snapshot shown as .snapshots/<name>."""
        if not _NAME_RE.fullmatch(name):
            raise InvalidArgument(f"{name!r} cannot name a snapshot directory")
        nested_id = hashlib.sha256(f"{share.id}/{name}".encode()).hexdigest()[:32]
        return dataclasses.replace(share, id=nested_id, name=f"{share.name}@{name}",
                                   driver_data={NESTED_PSEUDO: f"{self.pseudo_path(share)}/"
                                                               f"{SNAPSHOT_DIR}/{name}"})

    def show_snapshots(self, share: Share, path: str, shown: Dict[str, str],
                       hidden: List[str], rules: List[AccessRule]) -> None:
        self._check_share(share, path)
        for name in hidden:
            self.unexport(self._nested(share, name), "")
            _junction(path, name, make=False)
        if not shown:
            _junction(path, None, make=False)
            return
        ro = [dataclasses.replace(r, access_level="ro") for r in rules]
        for name, mount in sorted(shown.items()):
            _junction(path, name, make=True)
            self.export(self._nested(share, name), mount, ro)

    def _file(self, share_id: str) -> str:
        return os.path.join(self.state_dir, share_id + ".conf")

    def _host(self) -> str:
        ip = str(self._opt("share_export_ip", "") or "")
        if not ip:
            raise BackendFailure("share_export_ip is not set for this backend")
        return f"[{ip}]" if ":" in ip else ip

    def export_locations(self, share: Share, path: str) -> List[str]:
        return [f"{self._host()}:{self.pseudo_path(share)}"]

    def mount_hints(self, share: Share, path: str) -> Dict[str, object]:
        # NFSv4.1 or later: ganesha serves 4.0-4.2; 4.1 sessions are what
        # the kernel client negotiates by default on current distributions.
        return {"fstype": "nfs4", "export": self.export_locations(share, path)[0],
                "options": ["vers=4.1", "proto=tcp"]}

    # --- files -----------------------------------------------------------
    def _read_meta(self, share_id: str) -> Optional[dict]:
        try:
            with open(self._file(share_id), encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        m = _META_RE.search(text)
        if not m:
            raise BackendFailure(f"{self._file(share_id)}: not an export file written by sharedd")
        meta = json.loads(m.group(1))
        meta["_text"] = text
        return meta

    def _metas(self) -> Dict[int, dict]:
        """export id -> its file's meta, for every file in the state dir."""
        metas: Dict[int, dict] = {}
        for name in os.listdir(self.state_dir):
            if name.startswith(".") or not name.endswith(".conf"):
                continue
            meta = self._read_meta(name[:-5])
            if meta is not None:
                metas[int(meta["export_id"])] = meta
        return metas

    def _used_ids(self) -> Dict[int, str]:
        """export id -> share id, from the files in the state dir."""
        return {export_id: meta["share_id"] for export_id, meta in self._metas().items()}

    def _index(self) -> Dict[int, str]:
        """Export ids in use (ours and foreign), learnt once. Directory lock held."""
        if self._ids is None:
            active = self._active_ids()
            ids = self._used_ids()
            self._foreign = active - set(ids)
            self._ids = ids
        return self._ids

    def _allocate(self) -> int:
        """A free export id, searched on from the last one given. Directory lock held."""
        ids = self._index()
        span = self.id_max - self.id_min + 1
        start = min(max(self._cursor, self.id_min), self.id_max)
        for step in range(span):
            candidate = self.id_min + (start - self.id_min + step) % span
            if candidate not in ids and candidate not in self._foreign:
                self._cursor = candidate + 1
                return candidate
        raise CapacityExceeded(f"no free NFS-Ganesha export id in {self.id_min}..{self.id_max} "
                               f"(raise ganesha_export_id_max or delete shares)")

    def _render(self, share: Share, path: str, export_id: int,
                rules: Dict[str, Grant]) -> str:
        meta = {"share_id": share.id, "export_id": export_id, "path": path,
                "pseudo": self.pseudo_path(share),
                "rules": [[to, g.to_json()] for to, g in sorted(rules.items())]}
        lines = [
            "# Written by sharedd; changes are overwritten.",
            "# sharedd-ganesha: " + json.dumps(meta, sort_keys=True),
            "EXPORT {",
            f"    Export_Id = {export_id};",
            f'    Path = "{path}";',
            f'    Pseudo = "{self.pseudo_path(share)}";',
            "    Protocols = 4;",
            "    Transports = TCP;",
            "    SecType = sys;",
            "    Squash = Root_Squash;",
            "    Access_Type = None;",
            "    FSAL { Name = VFS; }",
        ]
        # Content that changes on the local file system, behind ganesha's back
        # (the spool): ganesha must not serve cached attributes and listings.
        expire = share.driver_data.get("attr_expiration_time")
        if isinstance(expire, int) and not isinstance(expire, bool) and expire >= 0:
            lines.append(f"    Attr_Expiration_Time = {expire};")
        # One CLIENT block per grant. ganesha takes the first block that
        # matches a client: rw before ro (rw wins), and within a level the
        # stricter squash first (where two networks overlap, root gets less).
        groups: Dict[Grant, List[str]] = {}
        for to, grant in sorted(rules.items()):
            groups.setdefault(grant, []).extend(self.client_spec("ip", to))
        for grant in sorted(groups, key=Grant.priority):
            lines.append(f"    CLIENT {{ Clients = {', '.join(groups[grant])}; "
                         f"Access_Type = {grant.level.upper()}; Protocols = 4; "
                         f"Squash = {_SQUASH[grant.squash]}; Anonymous_Uid = {grant.anonuid}; "
                         f"Anonymous_Gid = {grant.anongid}; }}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    @contextlib.contextmanager
    def _locked(self, share_id: Optional[str] = None) -> Iterator[None]:
        # flock on a fresh open file: excludes other threads and processes.
        # Per export, so that one share's changes never wait for another's;
        # without a share id, the directory (export-id allocation, listings).
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        name = f".lock-{share_id}" if share_id else ".lock"
        fd = os.open(os.path.join(self.state_dir, name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- ganesha calls ---------------------------------------------------
    def _busctl(self, *args: str, json_reply: bool = False) -> Tuple[int, str, str]:
        """One ExportMgr call, answered as busctl would: (rc, out, err).
        Over the daemon's own connection when it has one (no process per
        call), else through busctl. ganesha says "busy" as an error: retried."""
        timeout = max(5.0, min(60.0, self.command_timeout))
        if self.bus_call is not None and self.bus_address is None:
            return self._over_bus(args, json_reply, timeout)
        bus = f"--address={self.bus_address}" if self.bus_address else "--system"
        argv = ["busctl", bus, "--no-pager", f"--timeout={timeout:g}"]
        if json_reply:
            argv.append("--json=short")
        argv += ["call", BUS_NAME, EXPORT_MGR_PATH, EXPORT_MGR_IFACE, *args]
        for attempt in range(_BUSY_RETRIES):
            proc = run(argv, timeout=timeout + 10, check=False)
            out = proc.stdout.decode(errors="replace").strip()
            err = proc.stderr.decode(errors="replace").strip()
            if proc.returncode != 0 and _busy(err) and attempt + 1 < _BUSY_RETRIES:
                _backoff(attempt)
                continue
            return proc.returncode, out, err
        return proc.returncode, out, err

    def _over_bus(self, args: Tuple[str, ...], json_reply: bool,
                  timeout: float) -> Tuple[int, str, str]:
        assert self.bus_call is not None
        member, signature, values = args[0], (args[1] if len(args) > 1 else ""), args[2:]
        body: List[Any] = [int(v) if code in "qutxyni" else v for code, v in zip(signature, values)]
        for attempt in range(_BUSY_RETRIES):
            try:
                reply = self.bus_call(BUS_NAME, EXPORT_MGR_PATH, EXPORT_MGR_IFACE, member,
                                      signature, body, timeout)
            except BusCallError as exc:
                if _busy(str(exc)) and attempt + 1 < _BUSY_RETRIES:
                    _backoff(attempt)
                    continue
                return 1, "", str(exc)
            if json_reply:
                return 0, json.dumps({"data": reply}, default=str), ""
            return 0, " ".join(str(v) for v in reply), ""
        return 1, "", "busy"

    def _call(self, *args: str) -> str:
        rc, out, err = self._busctl(*args)
        if rc != 0:
            raise BackendFailure(f"NFS-Ganesha {args[0]} failed: {err or out}")
        if "Errors found" in out:
            raise BackendFailure(f"NFS-Ganesha {args[0]} reported errors: {out}")
        return out

    def _active_ids(self) -> Set[int]:
        rc, out, err = self._busctl("ShowExports", json_reply=True)
        if rc != 0:
            raise BackendFailure(f"NFS-Ganesha ShowExports failed: {err or out}")
        try:
            data = json.loads(out)["data"]
            return {int(entry[0]) for entry in data[1]}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendFailure(f"cannot parse NFS-Ganesha ShowExports reply {out[:200]!r}: {exc}") from None

    def _add(self, conf: str, export_id: int) -> bool:
        """AddExport; False if ganesha already serves this id (for someone else)."""
        rc, out, err = self._busctl("AddExport", "ss", conf, f"EXPORT(Export_Id={export_id})")
        if rc == 0 and "Errors found" not in out:
            return True
        if rc == 0:   # added, but some block was rejected: take it down again
            self._remove(export_id)
            raise BackendFailure(f"NFS-Ganesha AddExport reported errors: {out}")
        if "already active" in err:
            return False
        raise BackendFailure(f"NFS-Ganesha AddExport failed: {err or out}")

    def _remove(self, export_id: int) -> bool:
        """RemoveExport; False when ganesha does not know the id."""
        rc, out, err = self._busctl("RemoveExport", "q", str(export_id))
        if rc == 0:
            return True
        if "not found" in err.lower():
            return False
        raise BackendFailure(f"NFS-Ganesha RemoveExport {export_id} failed: {err or out}")

    # --- rule sets ---------------------------------------------------------
    @staticmethod
    def _key(access_to: str) -> str:
        """One spelling per network, so deltas find what was applied."""
        try:
            net = ipaddress.ip_network(access_to.strip(), strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"access_to {access_to!r} is not an IPv4/IPv6 address "
                                  f"or network: {exc}") from None
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return str(net)

    def _rule_map(self, rules: Iterable[AccessRule]) -> Dict[str, Grant]:
        return rule_map(rules, self._key, self.config)

    def _validate_all(self, rules: Iterable[AccessRule]) -> None:
        for r in rules:
            self.validate_rule(r)

    # --- the ExportHelper interface ------------------------------------------
    def export(self, share: Share, path: str, rules: List[AccessRule]) -> List[str]:
        self._check_share(share, path)
        self._validate_all(rules)
        try:
            with self._locked(share.id):
                self._apply(share, path, self._rule_map(rules))
        except BaseException:
            if self._read_meta(share.id) is None:   # never exported: leave nothing behind
                self._forget_lock(share.id)
            raise
        return self.export_locations(share, path)

    def _forget_lock(self, share_id: str) -> None:
        try:
            os.unlink(os.path.join(self.state_dir, f".lock-{share_id}"))
        except FileNotFoundError:
            pass

    def update_access(self, share: Share, path: str, access_rules: List[AccessRule],
                      add_rules: List[AccessRule], delete_rules: List[AccessRule]) -> None:
        self._check_share(share, path)
        self._validate_all(list(access_rules) + list(add_rules))
        with self._locked(share.id):
            meta = self._read_meta(share.id)
            current = _grants(meta["rules"]) if meta is not None else None
            self._apply(share, path, merge_access(current, access_rules, add_rules,
                                                  delete_rules, self._key, self.config))

    def _apply(self, share: Share, path: str, rules: Dict[str, Grant]) -> None:
        """Write the file and make ganesha match it; undo the file on failure."""
        meta = self._read_meta(share.id)
        if meta is None:
            self._add_new(share, path, rules)
            return
        # An existing export: UpdateExport also adds it if ganesha lost it,
        # so no listing of every export is needed.
        conf, export_id = self._file(share.id), int(meta["export_id"])
        selector = f"EXPORT(Export_Id={export_id})"
        text = self._render(share, path, export_id, rules)
        if text != meta["_text"]:     # ensure at start-up: mostly unchanged
            atomic_write(conf, text.encode(), 0o644)
        try:
            self._call("UpdateExport", "ss", conf, selector)
        except BaseException:
            atomic_write(conf, meta["_text"].encode(), 0o644)
            try:      # a half-applied update: put the old one back
                self._call("UpdateExport", "ss", conf, selector)
            except BackendFailure as exc:
                log.error("restoring export %s failed: %s", export_id, exc)
            raise

    def _add_new(self, share: Share, path: str, rules: Dict[str, Grant]) -> None:
        conf = self._file(share.id)
        for _ in range(_ID_ATTEMPTS):
            with self._locked():   # the id is taken once its file exists
                export_id = self._allocate()
                atomic_write(conf, self._render(share, path, export_id, rules).encode(), 0o644)
                self._index()[export_id] = share.id
            try:
                if self._add(conf, export_id):
                    return
            except BaseException:
                self._drop_new(share.id, export_id)
                raise
            log.warning("NFS-Ganesha already serves export id %s for something sharedd did "
                        "not make; not using that id", export_id)
            self._drop_new(share.id, export_id, foreign=True)
        raise BackendFailure(f"NFS-Ganesha refused {_ID_ATTEMPTS} export ids as already active "
                             "(exports of its own config inside ganesha_export_id_min.."
                             "ganesha_export_id_max?)")

    def _drop_new(self, share_id: str, export_id: int, foreign: bool = False) -> None:
        with self._locked():
            try:
                os.unlink(self._file(share_id))
            except FileNotFoundError:
                pass
            self._index().pop(export_id, None)
            if foreign:
                self._foreign.add(export_id)

    def unexport(self, share: Share, path: str) -> None:
        self._check_share(share)
        with self._locked(share.id):
            meta = self._read_meta(share.id)
            if meta is None:
                return
            export_id = int(meta["export_id"])
            self._remove(export_id)
            with self._locked():
                try:
                    os.unlink(self._file(share.id))
                except FileNotFoundError:
                    pass
                if self._ids is not None:
                    self._ids.pop(export_id, None)
            self._forget_lock(share.id)

    def has_export(self, share_id: str) -> bool:
        return _SHARE_ID_RE.fullmatch(share_id) is not None and self._read_meta(share_id) is not None

    # --- recovery after a ganesha restart -----------------------------------
    def exported_share_ids(self) -> List[str]:
        """Ids of every export's file; nested ones (shown snapshots) first,
        in the order they can be removed."""
        with self._locked():
            metas = self._metas().values()
        return [m["share_id"] for m in sorted(
            metas, key=lambda m: (-str(m.get("pseudo", "")).count("/"), m["share_id"]))]

    def export_id(self, share: Share) -> int:
        meta = self._read_meta(share.id)
        if meta is None:
            raise NotFound(f"share {share.id} is not exported by {self.helper_name}")
        return int(meta["export_id"])

    def reexport(self, share: Share) -> bool:
        """Make ganesha serve the share's file again; True if it had to be added."""
        self._check_share(share)
        with self._locked(share.id):
            meta = self._read_meta(share.id)
            if meta is None:
                raise NotFound(f"share {share.id} is not exported by {self.helper_name}")
            export_id = int(meta["export_id"])
            if export_id in self._active_ids():
                return False
            self._call("UpdateExport", "ss", self._file(share.id), f"EXPORT(Export_Id={export_id})")
            return True

    def reexport_all(self) -> Dict[str, str]:
        """Re-add every export whose file exists but ganesha lacks (after a
        ganesha restart). Returns share id -> 'added' | 'active' | error text."""
        result: Dict[str, str] = {}
        with self._locked():
            active = self._active_ids()
            # a share's export before those nested in its pseudo path
            metas = sorted(self._metas().items(),
                           key=lambda kv: (str(kv[1].get("pseudo", "")).count("/"), kv[0]))
            for export_id, share_id in ((i, m["share_id"]) for i, m in metas):
                if export_id in active:
                    result[share_id] = "active"
                    continue
                try:
                    self._call("UpdateExport", "ss", self._file(share_id),
                               f"EXPORT(Export_Id={export_id})")
                    result[share_id] = "added"
                except BackendFailure as exc:
                    log.error("re-adding export %s of share %s failed: %s", export_id, share_id, exc)
                    result[share_id] = str(exc)
        return result
