"""CIFS exports through Samba's registry configuration (`net conf`).

smb.conf must contain `include = registry` (or `config backend = registry`)
in [global]; each share is one registry share named like the sharedd share,
tagged `comment = sharedd <share id>` so shares the administrator made are
never touched.

Access mapping (Samba checks host and user separately):
- `ip` rules -> `hosts allow`, always with `hosts deny = ALL` (which, unlike
  0.0.0.0/0, also closes IPv6).
- `user` rules -> `valid users` (every granted user) plus `read list` (the ro
  ones). The share's root directory gets POSIX ACL entries (recursive, plus
  default entries for new files; `inherit acls = yes`) so every granted user
  can write (rw) or read (ro) at the file-system level too.
- With only user rules every host is admitted (`hosts allow = ALL`); with
  both, a client must pass both checks (host in `hosts allow`, user in
  `valid users`) and the user rules alone decide who may write; with none,
  nobody is admitted.
- With only ip rules every authenticated Samba user from a granted host is
  admitted and may write, as an `ip rw` rule says (Manila's generic CIFS
  helper makes such shares writable too): see "Writable for ip rules".
- `ip ro` is refused (NotSupported, at AllowAccess): `hosts allow` only
  admits or refuses a host, Samba has no per-host read-only. For read-only
  access grant the hosts with `ip rw` and the accounts with `user ro` rules
  (a client must then pass both checks, and the ro users stay read-only).

Writable for ip rules: while a share has ip rules and no user rules, it gets
`force group = sharedd-cifs` (IP_GROUP) and the POSIX ACL entries
`group:sharedd-cifs:rwX` plus the same default entry on its root
(recursive), so every admitted session, whatever its account, can create
files and change the other sessions' files (new ones inherit the entry).
The group must exist on the Samba host and have no members: a missing
group, or one that lists members, makes a grant or export fail with
BackendFailure saying what to do (`groupadd --system sharedd-cifs`); a
deny still goes through, leaving the remaining ip rules without write
access. Files keep their writer as owner. Why not the alternatives:
- chmod 777 on the share root (Manila's generic driver): every local account
  of the storage host would get write access too. CIFS users are local
  accounts and smbd works as the user, so the directories above a share must
  be traversable by every account (a share under a 0750 root-only directory,
  such as the default state_path /var/lib/sharedd, is denied to every CIFS
  user, measured; the volume driver makes its mount directory 0711 for this
  reason), and share ids (the mount point names) are readable on the bus.
  A hidden parent directory is no protection here.
- per-user ACL entries: "every Samba account" cannot be named (accounts
  added later would not be covered) and they would collide with the entries
  of user rules.
- `force user`: every file would belong to one account, and who wrote what
  would be lost.
With force group the extra access exists only inside smbd sessions of the
share (hosts allow still applies); a local process gets it only as a member
of the group, hence no members. Both the force group and the group's ACL
entries are removed as soon as the share has no ip rule left (deny) or gets
a user rule: the named entries recursively, and on the files made meanwhile
(owned by the group, smbd merges the group's entry into their `group::`)
the group's permissions are emptied; this happens before the parameter is
dropped, so a failure in between is retried. Open sessions are cut then, so
no session keeps the forced group and the share is not left writable after
access shrinks. A full sync (export, recovery) also does this when it finds
entries of the group on the share root without the parameter.

A change of a share's parameters is one `net conf import` of the whole
share (every parameter, those sharedd does not manage included), which the
registry takes in one transaction: no client ever sees a half-applied rule
set, and a new share appears complete. A share is read with one `net conf
showshare`; the Previous Versions parameters it last left are remembered, so
a snapshot change that keeps them runs no `net`. Samba applies
changes to new connections only, so whenever access shrinks the helper cuts
open sessions with `smbcontrol smbd close-share` (clients reconnect under the
new rules, denied ones fail). close-share is asynchronous: the helper then
waits (samba_close_timeout) until `smbstatus -S` no longer lists the share,
so unexport returns only when the share's file system can be unmounted.

Test/deployment hooks: `samba_config_file` is passed to net and smbcontrol
as `-s FILE`; `samba_command_prefix` is put before every command this helper
runs (net, smbcontrol, smbstatus, setfacl, getfacl, getent, find), e.g.
`nsenter,--mount=/proc/PID/ns/mnt,--` to reach a Samba instance in another
mount namespace.

Share servers (`for_server`): one helper per server, with the server's
address, its smb.conf and `nsenter --mount=<its namespace file> --` as the
prefix (sharedd.service_instance: the server's registry, passdb and
accounts are those of its mount namespace), and a state directory of its
own. Before each export it checks that the share's mount reached that
namespace (same device and inode inside): mounts made on the host propagate
there only from shared mounts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import netaddr

from ..errors import AlreadyExists, BackendFailure, InvalidArgument, NotSupported
from ..models import AccessRule, Share
from ..options import Opt
from ..util import command_failed, run
from .base import ExportHelper, Overlay

log = logging.getLogger(__name__)

# Plain account names only: no groups (@, +, &), domains, spaces or commas.
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = {"global", "homes", "printers", "print$", "ipc$"}
COMMENT_PREFIX = "sharedd "
# What `net conf showshare` says of a share the registry does not hold.
NO_SUCH_SHARE = "SBC_ERR_NO_SUCH_SERVICE"
# Parameters this helper owns on its shares (lower case, as compared).
SNAPSHOT_PARAMS = ("vfs objects", "shadow:snapdir", "shadow:format", "shadow:localtime")
MANAGED = ("path", "comment", "read only", "guest ok", "browseable", "inherit acls",
           "hosts deny", "hosts allow", "valid users", "read list", "force group",
           "available") + SNAPSHOT_PARAMS
#: Previous Versions: snapshot directories named as Windows names them (UTC)
SNAPSHOT_FORMAT = "@GMT-%Y.%m.%d-%H.%M.%S"
# The group that makes shares with only ip rules writable (see the module doc).
IP_GROUP = "sharedd-cifs"
_SERVER_ID_RE = re.compile(r"[0-9a-f]{32}")


def _diff(current: Dict[str, str], want: Dict[str, str],
          keys: Tuple[str, ...]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(parameters to set, parameters of keys to delete) to go from current to want."""
    return ([(k, v) for k, v in want.items() if current.get(k) != v],
            [k for k in keys if k in current and k not in want])


def _one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


class SambaHelper(ExportHelper):
    helper_name = "samba"
    protocol = "CIFS"
    access_levels = {"ip": ("rw",), "user": ("rw", "ro")}
    ip_group = IP_GROUP

    OPTIONS = [
        Opt("samba_config_file", "path", "",
            help="smb.conf that net and smbcontrol read (passed as -s); default: Samba's own."),
        Opt("samba_net_command", "str", "net", help="The net command."),
        Opt("samba_smbcontrol_command", "str", "smbcontrol", help="The smbcontrol command."),
        Opt("samba_smbstatus_command", "str", "smbstatus", help="The smbstatus command."),
        Opt("samba_close_timeout", "float", 10.0, min=0,
            help="Seconds to wait for smbd to drop a share's connections after close-share "
                 "(so the share's file system can be unmounted)."),
        Opt("samba_command_prefix", "list", [],
            help="Argument prefix (comma-separated) for every command the Samba helper runs, "
                 "e.g. nsenter,--mount=/proc/PID/ns/mnt,-- to reach smbd in another mount "
                 "namespace (a test and deployment hook)."),
    ]

    def __init__(self, config, state_dir: str, command_timeout: float = 120.0):
        super().__init__(config, state_dir, command_timeout)
        self.conf_file = getattr(config, "samba_config_file", "") or ""
        self.net_cmd = getattr(config, "samba_net_command", "") or "net"
        self.smbcontrol_cmd = getattr(config, "samba_smbcontrol_command", "") or "smbcontrol"
        self.smbstatus_cmd = getattr(config, "samba_smbstatus_command", "") or "smbstatus"
        self.close_timeout = float(getattr(config, "samba_close_timeout", 10.0))
        self.prefix = list(getattr(config, "samba_command_prefix", []) or [])
        self.export_ip = getattr(config, "share_export_ip", "") or ""
        # A share server's helper: its smbd sees the host's mounts only
        # through propagation, checked at each export.
        self.server_id: Optional[str] = None
        # Set by a driver that keeps each share's snapshots in a directory
        # of SNAPSHOT_FORMAT names (Previous Versions through shadow_copy2):
        # the directory, while it shows some.
        self.snapshot_dir_of: Optional[Callable[[Share], Optional[str]]] = None
        # share id -> the Previous Versions parameters this helper last left
        # in the registry: a snapshot change that keeps them runs no `net`
        # (each takes tens of ms). Dropped before every change of the share.
        self._shown_params: Dict[str, Dict[str, str]] = {}

    #: how the driver names the versions it shows (shadow:format)
    snapshot_names = SNAPSHOT_FORMAT

    @property
    def shows_snapshots(self) -> bool:    # type: ignore[override]
        return self.snapshot_dir_of is not None

    def show_snapshots(self, share: Share, path: str, shown: Dict[str, str],
                       hidden: List[str], rules: List[AccessRule]) -> None:
        """Previous Versions: the shadow_copy2 parameters follow whether the
        view directory shows any snapshot (the driver keeps it)."""
        # (the mounts of hidden ones are still there: shown decides)
        want = self._snapshot_params(share) if shown else {}
        if self._shown_params.get(share.id) == want:
            return
        self._shown_params.pop(share.id, None)    # not known again until it is done
        current = self._current(share)
        if current is None:
            return                       # exported later, with them (_desired)
        changes, removals = _diff(current, want, SNAPSHOT_PARAMS)
        if changes or removals:
            self._put(share.name, current, want, removals)
        self._shown_params[share.id] = want

    def _snapshot_params(self, share: Share) -> Dict[str, str]:
        snapdir = self.snapshot_dir_of(share) if self.snapshot_dir_of else None
        if not snapdir:
            return {}
        return {"vfs objects": "shadow_copy2", "shadow:snapdir": snapdir,
                "shadow:format": SNAPSHOT_FORMAT, "shadow:localtime": "no"}

    def for_server(self, server_id: str, details: Dict[str, Any]) -> "SambaHelper":
        """This helper for one share server (sharedd.service_instance): its
        address, its smb.conf, every command run inside its mount namespace
        (where /var/lib/samba etc. are the server's own: net conf edits its
        registry, smbcontrol reaches its smbd, getent reads the namespace's
        accounts), a state directory of its own."""
        address = str(details.get("address", ""))
        conf = str(details.get("samba_conf", ""))
        mount_ns = str(details.get("mount_ns", ""))
        if not address or not conf.startswith("/") or not mount_ns.startswith("/"):
            raise BackendFailure(f"share server {server_id}: no address, samba_conf or mount_ns "
                                 "in its details (is CIFS among the server's protocols?)")
        if not isinstance(server_id, str) or not _SERVER_ID_RE.fullmatch(server_id):
            raise InvalidArgument(f"bad share server id {str(server_id)[:80]!r}")
        helper = SambaHelper(Overlay(self.config, share_export_ip=address,
                                     samba_config_file=conf,
                                     samba_command_prefix=["nsenter", f"--mount={mount_ns}",
                                                           "--"]),
                             os.path.join(self.state_dir, "servers", server_id),
                             self.command_timeout)
        helper.server_id = server_id
        helper.bus_call = self.bus_call
        helper.isolate_subtrees = self.isolate_subtrees
        return helper

    def forget(self) -> None:
        if self.server_id is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # --- commands -------------------------------------------------------------
    def _run(self, argv, check=True, input: Optional[bytes] = None):
        return run(self.prefix + list(argv), timeout=self.command_timeout, check=check,
                   input=input)

    def _conf_args(self) -> List[str]:
        return ["-s", self.conf_file] if self.conf_file else []

    def _net(self, *args, check=True, input: Optional[bytes] = None):
        return self._run([self.net_cmd, *self._conf_args(), "conf", *args], check=check,
                         input=input)

    def _current(self, share: Share) -> Optional[Dict[str, str]]:
        """The registry's parameters of the share's name, in one `net` (None:
        no such share); AlreadyExists if that share is not this one."""
        proc = self._net("showshare", share.name, check=False)
        if proc.returncode != 0:
            if NO_SUCH_SHARE.encode() in proc.stdout + proc.stderr:   # (net prints it on stdout)
                return None
            raise command_failed(proc.args, proc)
        params = {}
        for line in proc.stdout.decode(errors="replace").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                params[key.strip().lower()] = value.strip()
        if params.get("comment") != COMMENT_PREFIX + share.id:
            raise AlreadyExists(f"Samba share {share.name!r} exists and is not sharedd's"
                                f" share {share.id}")
        return params

    def _put(self, name: str, current: Dict[str, str], want: Dict[str, str],
             removals: List[str]) -> None:
        """The share's parameters become current's, less removals, with
        want's: one `net conf import` of the whole share, which the registry
        takes in one transaction (a client never sees half of a change; a
        new share appears complete). Parameters sharedd does not manage are
        carried over, unless one cannot be written back as one line (it is
        dropped and logged: a revocation must not fail on it)."""
        if not _one_line(name) or "[" in name or "]" in name:
            raise BackendFailure(f"Samba share {name!r} cannot be named in smb.conf")
        params = {k: v for k, v in current.items() if k not in removals}
        params.update(want)
        for key, value in list(params.items()):
            if _one_line(key) and _one_line(value) and not value.endswith("\\") \
                    and not key.startswith("["):
                continue
            if key in want:
                raise BackendFailure(f"Samba share {name!r}: {key!r} cannot be written as one"
                                     " smb.conf line")
            log.warning("Samba share %s: parameter %r cannot be written back as one line;"
                        " dropped", name, key[:80])
            del params[key]
        text = f"[{name}]\n" + "".join(f"\t{k} = {v}\n" for k, v in params.items())
        self._net("import", "/dev/stdin", name, input=text.encode())

    def setup(self) -> None:
        if self.server_id is not None:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._net("list")   # the registry is reachable (fails with exit 255 otherwise)
        if self._run(["getent", "group", self.ip_group], check=False).returncode != 0:
            log.warning("group %s does not exist: CIFS 'ip' rules will fail until it is created "
                        "without members (groupadd --system %s)", self.ip_group, self.ip_group)

    # --- rules -> parameters -------------------------------------------------------
    def validate_access(self, access_type: str, access_level: str) -> None:
        if access_type == "ip" and access_level == "ro":
            raise NotSupported("Samba cannot make a share read-only per host ('hosts allow' only "
                               "admits or refuses a host, and every user it admits may write); "
                               "for read-only access use 'user' rules with level ro (with 'ip' rw "
                               "rules beside them a client must pass both checks)")
        super().validate_access(access_type, access_level)

    def _check_rule(self, rule: AccessRule) -> None:
        self.validate_access(rule.access_type, rule.access_level)
        if rule.access_type == "ip":
            try:
                netaddr.IPNetwork(rule.access_to)
            except (netaddr.AddrFormatError, ValueError):
                raise InvalidArgument(f"{rule.access_to!r} is not an IP address or network") from None
        elif not USER_RE.fullmatch(rule.access_to):
            raise InvalidArgument(f"{rule.access_to!r} is not a plain user name "
                                  "(letters, digits, '.', '_', '-'; no groups or domains)")

    @staticmethod
    def _host(value: str) -> str:
        net = netaddr.IPNetwork(value)
        if net.size == 1:
            return str(net.ip)
        return f"{net.network}/{net.prefixlen}"

    @staticmethod
    def _ip_writable(rules: List[AccessRule]) -> bool:
        """Only ip rules: every admitted user writes, through the forced group."""
        kinds = {r.access_type for r in rules}
        return "ip" in kinds and "user" not in kinds

    def _desired(self, share: Share, path: str, rules: List[AccessRule],
                 force_group: bool = False) -> Dict[str, str]:
        hosts = sorted({self._host(r.access_to) for r in rules if r.access_type == "ip"})
        users = sorted({r.access_to for r in rules if r.access_type == "user"})
        ro = sorted({r.access_to for r in rules if r.access_type == "user" and r.access_level == "ro"})
        params = {
            "path": path,
            "comment": COMMENT_PREFIX + share.id,
            "read only": "no",
            "guest ok": "no",
            "browseable": "no",
            "inherit acls": "yes",
            "hosts deny": "ALL",
        }
        if hosts:
            params["hosts allow"] = ", ".join(hosts)
        elif users:
            params["hosts allow"] = "ALL"
        if users:
            params["valid users"] = ", ".join(users)
        if ro:
            params["read list"] = ", ".join(ro)
        if force_group:
            params["force group"] = self.ip_group
        params.update(self._snapshot_params(share))
        return params

    @staticmethod
    def _split(value: Optional[str]) -> Set[str]:
        return {v for v in re.split(r"[\s,]+", value or "") if v}

    def _access_of(self, params: Dict[str, str]) -> Tuple[Optional[Set[str]], Optional[Set[str]], Set[str]]:
        """(hosts admitted or None for all, users admitted or None for all, ro users)."""
        allow = self._split(params.get("hosts allow"))
        deny = self._split(params.get("hosts deny"))
        if params.get("available", "yes").lower() in ("no", "false", "0"):
            hosts: Optional[Set[str]] = set()
        elif "ALL" in {h.upper() for h in allow} or not deny:
            hosts = None
        else:
            hosts = allow
        users = self._split(params.get("valid users")) or None
        return hosts, users, self._split(params.get("read list"))

    @staticmethod
    def _lacks(old: Optional[Set[str]], new: Optional[Set[str]]) -> bool:
        """True if new admits less than old."""
        if new is None:
            return False
        if old is None:
            return True
        return bool(old - new)

    # --- file-system access for granted users -------------------------------------
    def _user_known(self, user: str) -> bool:
        return self._run(["getent", "passwd", user], check=False).returncode == 0

    def _grant_fs(self, path: str, user: str, level: str) -> None:
        perms = "rwX" if level == "rw" else "rX"
        self._run(["setfacl", "-R", "-m", f"u:{user}:{perms},d:u:{user}:{perms}", path])

    def _revoke_fs(self, path: str, user: str) -> None:
        proc = self._run(["setfacl", "-R", "-x", f"u:{user},d:u:{user}", path], check=False)
        if proc.returncode != 0:
            log.warning("cannot remove ACL entries of %s on %s: %s", user, path,
                        proc.stderr.decode(errors="replace").strip())

    def _check_group(self) -> None:
        """The ip group exists and lists no members (they would write locally)."""
        group = self.ip_group
        proc = self._run(["getent", "group", group], check=False)
        if proc.returncode != 0:
            raise BackendFailure(
                f"group {group!r} does not exist on the Samba host; CIFS 'ip' rules need it to "
                f"make the share writable for the users they admit: create it without members "
                f"(groupadd --system {group})")
        members = proc.stdout.decode(errors="replace").strip().split(":")[3:]
        members = [m for m in ",".join(members).split(",") if m]
        if members:
            raise BackendFailure(
                f"group {group!r} has members ({', '.join(members)}): they would get write access "
                f"to every CIFS share with 'ip' rules on the storage host; remove them "
                f"(gpasswd -d USER {group})")

    def _grant_group(self, path: str) -> None:
        g = self.ip_group
        self._run(["setfacl", "-R", "-m", f"g:{g}:rwX,d:g:{g}:rwX", path])

    def _revoke_group(self, path: str, group: str) -> None:
        if self._run(["getent", "group", group], check=False).returncode != 0:
            # deleted meanwhile: nobody can hold it, and it cannot be named any more
            log.warning("group %s no longer exists; its ACL entries on %s stay", group, path)
            return
        # check=True: a failure must not go on to drop `force group` (the retry's marker)
        self._run(["setfacl", "-R", "-x", f"g:{group},d:g:{group}", path])
        # Files made under force group have the group as owning group, and smbd
        # merges the group's entry into their `group::` entry: empty that too
        # (not on symlinks, which setfacl would follow).
        self._run(["find", path, "-group", group, "!", "-type", "l",
                   "-exec", "setfacl", "-m", "g::---", "{}", "+"])

    def _root_has_group(self, path: str, group: str) -> bool:
        """Whether the share root has access or default ACL entries for group."""
        proc = self._run(["getfacl", "-p", "--omit-header", path], check=False)
        if proc.returncode != 0:
            log.warning("cannot read the ACL of %s: %s", path,
                        proc.stderr.decode(errors="replace").strip())
            return False
        for line in proc.stdout.decode(errors="replace").splitlines():
            fields = line.split("#", 1)[0].strip().split(":")
            if fields[0] == "default":
                fields = fields[1:]
            if len(fields) >= 3 and fields[0] == "group" and fields[1] == group:
                return True
        return False

    # --- the sync -----------------------------------------------------------------------
    def _sync(self, share: Share, path: str, rules: List[AccessRule], *, full: bool,
              close: bool = False, new_users: Set[str] = frozenset()) -> None:
        name = share.name
        if name.lower() in RESERVED_NAMES:
            raise InvalidArgument(f"{name!r} is a reserved Samba share name")
        for r in rules:
            self._check_rule(r)
        known = {u for u in new_users if self._user_known(u)}
        unknown = sorted(set(new_users) - known)
        if unknown:
            raise InvalidArgument(f"unknown user(s) on the Samba host: {', '.join(unknown)}")
        want_group = self._ip_writable(rules)
        if want_group:
            try:
                self._check_group()
            except BackendFailure as exc:
                if not close:
                    raise
                # A revocation is never held back: apply it without the group
                # (less access, never more); the next grant or ensure reports it.
                log.error("share %s: %s; 'ip' rules left without write access", share.id, exc)
                want_group = False
        self._shown_params.pop(share.id, None)
        found = self._current(share)
        exists, current = found is not None, found or {}
        desired = self._desired(share, path, rules, force_group=want_group)
        changes, removals = _diff(current, desired, MANAGED)
        old_hosts, old_users, old_ro = self._access_of(current) if exists else (set(), set(), set())
        new_hosts, new_users_set, new_ro = self._access_of(desired)
        levels = {r.access_to: r.access_level for r in rules if r.access_type == "user"}
        old_group = current.get("force group") or None
        new_group = desired.get("force group")
        stale_groups: Set[str] = set()
        if old_group and old_group != new_group:
            stale_groups.add(old_group)
        if full and not want_group and self._root_has_group(path, self.ip_group):
            stale_groups.add(self.ip_group)

        # The ip group's ACL entries go on before `force group` is set and come
        # off before it is removed: a failure in between leaves the parameter
        # saying what is still to do, and the retry does it.
        if want_group and (full or old_group != new_group):
            self._grant_group(path)
        for group in sorted(stale_groups):
            self._revoke_group(path, group)
        if changes or removals:
            self._put(name, current, desired, removals)
        # ACLs: every granted user on a full sync, else the ones whose grant changed.
        old_levels = {u: ("ro" if u in old_ro else "rw") for u in (old_users or set())}
        for user, level in sorted(levels.items()):
            if full or old_levels.get(user) != level:
                if user in known or self._user_known(user):
                    self._grant_fs(path, user, level)
                else:
                    log.warning("user %s is unknown on this host: no ACL on %s", user, path)
        for user in sorted((old_users or set()) - set(levels)):
            self._revoke_fs(path, user)
        self._shown_params[share.id] = {k: desired[k] for k in SNAPSHOT_PARAMS if k in desired}
        # Sessions are cut when someone admitted before loses (write) access.
        # A share that admitted no host has none (one an interrupted change
        # of an older sharedd left `available = no` may still hold some).
        demoted = {u for u in new_ro - old_ro if old_users is None or u in old_users}
        admitted = exists and (old_hosts != set() or "available" in current)
        lost = admitted and (self._lacks(old_hosts, new_hosts) or bool(demoted)
                             or self._lacks(old_users, new_users_set))
        if close or lost or stale_groups:
            self.close_sessions(share)

    # --- ExportHelper ---------------------------------------------------------------------
    def _check_visible(self, path: str) -> None:
        """The share's mount reached the server's mount namespace (a slave
        of the host's: mounts propagate only from shared mounts)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise BackendFailure(f"cannot stat {path}: {exc}") from None
        out = self._run(["stat", "-L", "-c", "%d:%i", path], check=False)
        if out.stdout.decode(errors="replace").strip() != f"{st.st_dev}:{st.st_ino}":
            raise BackendFailure(
                f"{path} is not the same directory in share server {self.server_id}'s mount "
                "namespace: the share was mounted on the host where mounts do not propagate "
                "(the mount's parent must be a shared mount, as under systemd; "
                "e.g. mount --make-rshared /)")

    def export(self, share: Share, path: str, rules: List[AccessRule]) -> List[str]:
        if self.server_id is not None:
            self._check_visible(path)
        self._sync(share, path, rules, full=True)
        return self.export_locations(share, path)

    def update_access(self, share: Share, path: str, access_rules: List[AccessRule],
                      add_rules: List[AccessRule], delete_rules: List[AccessRule]) -> None:
        for r in add_rules:
            self._check_rule(r)
        gone = {r.id for r in delete_rules}
        effective = {r.id: r for r in access_rules if r.id not in gone}
        for r in add_rules:
            if r.id not in gone:
                effective.setdefault(r.id, r)
        recovery = not add_rules and not delete_rules
        new_users = {r.access_to for r in add_rules if r.access_type == "user"}
        self._sync(share, path, list(effective.values()), full=recovery,
                   close=bool(delete_rules), new_users=new_users)

    def unexport(self, share: Share, path: str) -> None:
        self._shown_params.pop(share.id, None)
        try:
            if self._current(share) is None:
                return
        except AlreadyExists:
            log.warning("Samba share %s is not sharedd's share %s; left alone", share.name, share.id)
            return
        self._net("delshare", share.name)
        self.close_sessions(share)

    def close_sessions(self, share: Share) -> None:
        """Cut the share's open sessions and wait until smbd has. Called
        after the registry change, so a connection smbstatus does not list
        is made under the new rules: with none listed there is nothing to cut."""
        if share.name.lower() not in self._connected_shares():
            return
        proc = self._run([self.smbcontrol_cmd, *self._conf_args(), "smbd", "close-share",
                          share.name], check=False)
        if proc.returncode != 0:   # smbd not running: there are no sessions to cut
            log.warning("smbcontrol close-share %s: %s", share.name,
                        (proc.stderr or proc.stdout).decode(errors="replace").strip())
            return
        # close-share is a message smbd handles later; wait until the tree
        # connections are gone, else an unmount right after may find the file
        # system busy (or, in another mount namespace, silently keep it alive).
        deadline = time.monotonic() + self.close_timeout
        while share.name.lower() in self._connected_shares():
            if time.monotonic() > deadline:
                raise BackendFailure(f"smbd still serves connections to {share.name} "
                                     f"{self.close_timeout:g}s after close-share")
            time.sleep(0.1)

    def _connected_shares(self) -> Set[str]:
        proc = self._run([self.smbstatus_cmd, *self._conf_args(), "-S"], check=False)
        if proc.returncode != 0:
            return set()
        names, seen_rule = set(), False
        for line in proc.stdout.decode(errors="replace").splitlines():
            if line.startswith("---"):
                seen_rule = True
            elif seen_rule and line.strip():
                names.add(line.split()[0].lower())
        return names

    def _host_part(self) -> str:
        if not self.export_ip:
            raise BackendFailure("share_export_ip is not set")
        return f"[{self.export_ip}]" if ":" in self.export_ip else self.export_ip

    def export_locations(self, share: Share, path: str) -> List[str]:
        return [f"\\\\{self._host_part()}\\{share.name}"]

    def mount_hints(self, share: Share, path: str) -> Dict[str, object]:
        return {"fstype": "cifs", "export": f"{self._host_part()}:/{share.name}"}
