"""NFS exports through the Linux kernel NFS server (nfs-kernel-server).

sharedd owns exactly one exports file, ``kernel_nfs_exports_file`` (default
``/etc/exports.d/sharedd.exports``); it never touches /etc/exports and never
copies etab anywhere. Each share's wanted state (path and rules) is one JSON
file in the helper's state dir (``<share id>.json``). The exports file is
regenerated from that state, atomically, under an flock on
``.<file name>.lock`` beside it: several backends and processes may write
the same file, so each share's line is tagged with its backend and share id
and a backend rewrites only its own lines::

    # Written by sharedd; changes are overwritten.
    # sharedd-kernel-nfs: {"backend": "b1", "share": "<id>"}
    /srv/shares/<id> 10.0.0.5(sync,fsid=<uuid>,subtree_check,rw,root_squash,anonuid=65534,
                             anongid=65534) fd00::/64(...,ro,...)        (one line)

The running export table is then changed with targeted commands, never
``exportfs -ra`` (that would also apply an administrator's half-edited
/etc/exports and drop exports made by hand): ``exportfs -o OPTS host:path``
for every wanted client (it adds a client or replaces its options in place)
and ``exportfs -u host:path`` for every other client the kernel lists for
that path (``exportfs -v``). The file holds the same entries, so a reboot
(``exportfs -ra`` at nfs-server start) restores the same exports.

``unexport`` removes every client of the path, then waits (outside the lock,
at most ``kernel_nfs_release_timeout``) until nfsd's export caches no longer
name the path: their entries pin the mount, and on Debian 12's 6.1 kernel
they outlived ``exportfs -u`` by 60-111 s once several clients had used
the export (``exportfs -f``, writing the caches' flush files and
/proc/fs/nfsd/unlock_filesystem did not release them; no NFSv4 client state
was left), and until then the driver's umount fails with "target is busy".

Client forms (checked with nfs-utils 2.6.2 and kernel 6.1 on Debian bookworm):

- a ``/32`` or ``/128`` is written as the bare address; other networks as
  network/prefix; IPv6 goes in brackets in ``exportfs`` arguments only
  (``[fd00::/64]:/path``), bare in the file.
- ``/0`` netmasks: older exportfs refused them (LESSONS), 2.6.2 takes
  ``0.0.0.0/0`` on the command line; either way ``*`` matches every client
  of both families, so ``0.0.0.0/0`` alone is written as ``0.0.0.0/1`` and
  ``128.0.0.0/1`` (and ``::/0`` as ``::/1``, ``8000::/1``), proven in the
  guest test to admit 127.0.0.1 but not an IPv6 client; only when both
  families get the same level is ``*`` used.
- rw wins: mountd picks one entry per client by its own precedence (by
  entry type and list order), not the most permissive one. So the rules are resolved before rendering: every ro network
  has the rw networks cut out of it (``address_exclude``), and no client is
  ever matched by both an rw and an ro entry.

Export options. ``kernel_nfs_export_options`` (default ``sync``, so
acknowledged writes are on disk) go on every entry; sharedd adds the rest:

- per client, the rule's level and squash: ``rw``/``ro``, ``root_squash``
  (the default: a client's root becomes ``anonuid``), ``all_squash`` or
  ``no_root_squash`` (asked for per rule), ``anonuid=``/``anongid=``. Where
  two rules' networks overlap, rw wins, then the stricter squash;
- per share, ``fsid=``, a UUID derived from the share's id: nfsd identifies the
  export by it in every file handle, stable across reboots and moves;
- ``subtree_check`` where the driver's shares are parts of one file system
  (btrfs subvolumes share one superblock: with ``no_subtree_check`` nfsd
  accepts a handle naming any inode of that file system, so a client that
  forges one reaches the other shares; tests/test_knfsd_isolation.py shows
  it), ``no_subtree_check`` where each share is a file system of its own.
  The price of subtree checking: a file renamed into another directory
  while a client has it open gives that client a stale handle.
"""

from __future__ import annotations

import contextlib
import hashlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from ..errors import BackendFailure, ConfigError, InvalidArgument, NotSupported
from ..models import AccessRule, Share
from ..options import Opt
from ..util import atomic_write, run
from .base import ExportHelper, Grant, grants_from_json, merge_access, rule_map

log = logging.getLogger(__name__)

_SHARE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# The export path as sharedd.record.EXPORT_RE allows it after "host:".
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]{0,1023}$(?!\n)")
_OPTION_RE = re.compile(r"^[A-Za-z0-9_]+(=[A-Za-z0-9_.:/@-]+)?$")
_TAG = "# sharedd-kernel-nfs: "
_HEADER = "# Written by sharedd; changes are overwritten.\n"
# Options sharedd sets itself: per client (the rule's level and squash) and
# per export (the share's fsid, and subtree checking as its file system needs).
_OWN_OPTIONS = {"rw", "ro", "root_squash", "all_squash", "no_root_squash", "anonuid", "anongid",
                "fsid", "subtree_check", "no_subtree_check"}

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def canonical_network(access_to: str) -> Network:
    """The network of an 'ip' rule; InvalidArgument if it is not one."""
    text = (access_to or "").strip()
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"access_to {access_to!r} is not an IPv4/IPv6 address "
                              f"or network: {exc}") from None
    if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        raise NotSupported(f"kernel NFS matches IPv4 clients by their IPv4 form; "
                           f"use that instead of {access_to!r}")
    return net


def rule_key(access_to: str) -> str:
    """One spelling per network, so deltas find what was applied."""
    net = canonical_network(access_to)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def resolve(rules: Dict[str, Grant]) -> List[Tuple[Network, Grant]]:
    """(network, grant) pairs such that no client is in two networks with
    different grants (the higher priority wins: rw over ro, then the stricter
    squash), in priority order, each grant's networks collapsed."""
    out: List[Tuple[Network, Grant]] = []
    for version in (4, 6):
        taken: List[Network] = []          # networks of the grants already placed
        for grant in sorted(set(rules.values()), key=Grant.priority):
            pieces_all: List[Network] = []
            for key, g in rules.items():
                net = canonical_network(key)
                if g != grant or net.version != version:
                    continue
                pieces = [net]
                for cut in taken:
                    kept: List[Network] = []
                    for piece in pieces:
                        if not piece.overlaps(cut):
                            kept.append(piece)
                        elif cut.subnet_of(piece) and cut != piece:
                            kept.extend(piece.address_exclude(cut))
                        # else: the piece lies inside a stronger grant's network
                    pieces = kept
                pieces_all.extend(pieces)
            mine = list(ipaddress.collapse_addresses(pieces_all))
            out += [(n, grant) for n in mine]
            taken += mine
    return sorted(out, key=lambda pair: pair[1].priority())


def client_forms(rules: Dict[str, Grant]) -> List[Tuple[str, Grant]]:
    """(client as written in the exports file, grant), in priority order."""
    resolved = resolve(rules)
    everyone = {(n.version, g) for n, g in resolved if n.prefixlen == 0}
    star = next((g for g in sorted({g for _, g in everyone}, key=Grant.priority)
                 if (4, g) in everyone and (6, g) in everyone), None)
    out: List[Tuple[str, Grant]] = []
    if star is not None:
        out.append(("*", star))
    for net, grant in resolved:
        if net.prefixlen == 0:
            if star == grant:
                continue
            # exportfs refuses /0; two halves cover the same family only.
            out += [(str(half), grant) for half in net.subnets(prefixlen_diff=1)]
        elif net.prefixlen == net.max_prefixlen:
            out.append((str(net.network_address), grant))
        else:
            out.append((str(net), grant))
    return sorted(out, key=lambda pair: pair[1].priority())


def grant_options(grant: Grant) -> List[str]:
    """exports(5) words for one client entry's grant."""
    return [grant.level, grant.squash, f"anonuid={grant.anonuid}", f"anongid={grant.anongid}"]


def fsid(share_id: str) -> str:
    """A share's own file system id for nfsd, stable for the share's life: a
    UUID derived from its id (written with dashes, so exportfs never reads
    it as a number)."""
    digest = hashlib.sha256(b"sharedd-fsid:" + share_id.encode()).digest()
    return f"fsid={uuid.UUID(bytes=digest[:16])}"


def _grants(entries: Any) -> Dict[str, Grant]:
    """A state file's rules (a bare level in files written before squash)."""
    try:
        return grants_from_json(entries)
    except ValueError as exc:
        raise BackendFailure(f"kernel NFS state: {exc}") from None


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    """(inode, mtime, size) of a file, None if it is not there: a rename
    into place changes the inode, so a file written since differs."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def exportfs_host(client: str) -> str:
    """The client as exportfs wants it before ':path' (IPv6 in brackets)."""
    return f"[{client}]" if ":" in client else client


def parse_exportfs_v(text: str) -> Dict[str, List[str]]:
    """path -> clients from ``exportfs -v`` output, read defensively.

    A line is ``<path> <client>(<options>)``; a long path stands alone with
    its client on the next, indented line. ``<world>`` is ``*``. Lines that
    fit neither form are skipped.
    """
    result: Dict[str, List[str]] = {}
    pending: Optional[str] = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        parts = raw.split()
        if raw[0].isspace():
            if pending is None or len(parts) != 1:
                continue
            path, entry = pending, parts[0]
        elif len(parts) == 1 and parts[0].startswith("/"):
            pending = parts[0]
            continue
        elif len(parts) == 2 and parts[0].startswith("/"):
            path, entry = parts
        else:
            pending = None
            continue
        pending = None
        client = entry.split("(", 1)[0]
        if client == "<world>":
            client = "*"
        if client:
            result.setdefault(path, []).append(client)
    return result


class KernelNfsHelper(ExportHelper):
    helper_name = "kernel"
    protocol = "NFS"
    access_levels = {"ip": ("rw", "ro")}

    OPTIONS = [
        Opt("kernel_nfs_exports_file", "path", "/etc/exports.d/sharedd.exports",
            help="The exports file sharedd owns (must end in .exports and live in "
                 "/etc/exports.d to be read at boot); /etc/exports is never touched."),
        Opt("kernel_nfs_export_options", "str", "sync",
            help="Options for every client entry: sync so acknowledged writes are on disk. "
                 "sharedd adds the rule's rw or ro and squash (root_squash, all_squash or "
                 "no_root_squash, anonuid=, anongid=), the share's own fsid=, and "
                 "subtree_check where shares share a file system (btrfs subvolumes), "
                 "no_subtree_check elsewhere; those may not be set here."),
        Opt("kernel_nfs_exportfs_command", "str", "exportfs",
            help="The exportfs program (name or absolute path)."),
        Opt("kernel_nfs_release_timeout", "float", 300.0, min=0, max=3600,
            help="Seconds unexport waits for nfsd to drop its cached references to "
                 "the path (they kept the file system busy for 60-111 s after clients "
                 "used it, in tests); 0 does not wait."),
    ]

    def __init__(self, config, state_dir: str, command_timeout: float = 120.0):
        super().__init__(config, state_dir, command_timeout)
        name = getattr(config, "name", "?")
        self.backend = str(name)
        path = str(self._opt("kernel_nfs_exports_file", "/etc/exports.d/sharedd.exports"))
        if not os.path.isabs(path) or not path.endswith(".exports") \
                or os.path.basename(path).startswith("."):
            raise ConfigError(f"[{name}] kernel_nfs_exports_file: {path!r} must be an absolute "
                              "path ending in .exports (exportfs reads only those)")
        self.exports_file = os.path.normpath(path)
        self.lock_file = os.path.join(os.path.dirname(self.exports_file),
                                      "." + os.path.basename(self.exports_file) + ".lock")
        opts = [o.strip() for o in str(self._opt("kernel_nfs_export_options", "sync")).split(",")
                if o.strip()]
        for o in opts:
            if not _OPTION_RE.fullmatch(o):
                raise ConfigError(f"[{name}] kernel_nfs_export_options: {o!r} is not an "
                                  "exports(5) option word")
            if o.split("=", 1)[0] in _OWN_OPTIONS:
                raise ConfigError(f"[{name}] kernel_nfs_export_options: leave out {o!r}; "
                                  "sharedd sets it per access rule (level, squash: see "
                                  "default_squash) or per share (fsid, subtree checking)")
        self.export_options = opts
        cmd = str(self._opt("kernel_nfs_exportfs_command", "exportfs") or "exportfs")
        if any(c.isspace() for c in cmd):
            raise ConfigError(f"[{name}] kernel_nfs_exportfs_command: {cmd!r} must be one "
                              "program name or path, without arguments")
        self.exportfs = cmd
        self.release_timeout = float(self._opt("kernel_nfs_release_timeout", 300.0))
        # This backend's part of the exports file, share id -> its lines (""
        # when no client may mount), read from the state files once: an
        # operation renders its own share, not every share again. (One
        # daemon per state directory: nobody else writes these state files.)
        self._chunks: Optional[Dict[str, str]] = None
        # The other backends' lines as last read, with the file's identity then
        # (inode, mtime, size): re-read only when someone else wrote the file.
        self._foreign: Tuple[Optional[Tuple[int, int, int]], List[Tuple[str, str]]] = (None, [])

    def _opt(self, name: str, default):
        try:
            value = getattr(self.config, name)
        except AttributeError:
            return default
        return default if value is None or value == "" else value

    # --- setup -----------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(self.exports_file), mode=0o755, exist_ok=True)
        try:
            self._exported()
        except BackendFailure as exc:
            raise BackendFailure(f"the kernel NFS server's export table cannot be read "
                                 f"(is nfs-kernel-server installed?): {exc}") from None

    # --- validation ------------------------------------------------------
    def validate_rule(self, rule: AccessRule) -> None:
        self.validate_access(rule.access_type, rule.access_level)
        canonical_network(rule.access_to)

    def _validate_all(self, rules: Iterable[AccessRule]) -> None:
        for r in rules:
            self.validate_rule(r)

    def _check_share(self, share: Share, path: Optional[str] = None) -> None:
        if not _SHARE_ID_RE.fullmatch(share.id or ""):
            raise InvalidArgument(f"share id {share.id!r} cannot name a state file")
        if path is not None:
            self._check_path(path)

    @staticmethod
    def _check_path(path: str) -> None:
        if not _PATH_RE.fullmatch(path or "") or os.path.normpath(path) != path or path == "/":
            raise BackendFailure(f"export path {path!r} cannot be exported: it must be a "
                                 "normalized absolute path other than / made of letters, "
                                 "digits, '.', '_', '-' and '/'")

    # --- names -----------------------------------------------------------
    def _host(self) -> str:
        ip = str(self._opt("share_export_ip", "") or "")
        if not ip:
            raise BackendFailure("share_export_ip is not set for this backend")
        return f"[{ip}]" if ":" in ip else ip

    def export_locations(self, share: Share, path: str) -> List[str]:
        self._check_path(path)
        return [f"{self._host()}:{path}"]

    def mount_hints(self, share: Share, path: str) -> Dict[str, object]:
        # NFSv4 only (no mountd/portmap round trips through firewalls); 4.1
        # sessions are what current kernel clients negotiate by default.
        # mount.nfs4 refuses an IPv6 server with proto=tcp: it needs tcp6.
        proto = "tcp6" if ":" in str(self._opt("share_export_ip", "")) else "tcp"
        return {"fstype": "nfs4", "export": self.export_locations(share, path)[0],
                "options": ["vers=4.1", f"proto={proto}"]}

    def _state_file(self, share_id: str) -> str:
        return os.path.join(self.state_dir, share_id + ".json")

    # --- state -------------------------------------------------------------
    def _read_state(self, share_id: str) -> Optional[dict]:
        try:
            with open(self._state_file(share_id), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise BackendFailure(f"{self._state_file(share_id)}: not a state file written "
                                 f"by sharedd: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list) \
                or not isinstance(data.get("path"), str):
            raise BackendFailure(f"{self._state_file(share_id)}: not a state file written by sharedd")
        return data

    def _write_state(self, share_id: str, path: str, rules: Dict[str, Grant]) -> None:
        data = {"share_id": share_id, "path": path,
                "rules": [[to, g.to_json()] for to, g in sorted(rules.items())]}
        atomic_write(self._state_file(share_id),
                     (json.dumps(data, sort_keys=True) + "\n").encode(), 0o600)
        if self._chunks is not None:
            self._chunks[share_id] = self._chunk(share_id, path, rules)

    def _drop_state(self, share_id: str) -> None:
        os.unlink(self._state_file(share_id))
        if self._chunks is not None:
            self._chunks.pop(share_id, None)

    def _all_states(self) -> List[dict]:
        states = []
        for name in sorted(os.listdir(self.state_dir)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            data = self._read_state(name[:-5])
            if data is not None:
                states.append(data)
        return states

    # --- the exports file ------------------------------------------------
    def _options(self, share_id: str, grant: Grant) -> str:
        subtree = "subtree_check" if self.isolate_subtrees else "no_subtree_check"
        return ",".join(self.export_options + [fsid(share_id), subtree] + grant_options(grant))

    def render_line(self, share_id: str, path: str, rules: Dict[str, Grant]) -> Optional[str]:
        """The exports(5) line for a share; None when no client may mount."""
        entries = [f"{client}({self._options(share_id, grant)})"
                   for client, grant in client_forms(rules)]
        return f"{path} {' '.join(entries)}" if entries else None

    def _foreign_blocks(self) -> List[Tuple[str, str]]:
        """(tag line, export line) pairs other backends wrote into the file."""
        known, blocks = self._foreign
        identity = _identity(self.exports_file)
        if identity is not None and identity == known:
            return blocks
        try:
            with open(self.exports_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            self._foreign = (None, [])      # removed: the other lines went with it
            return []
        blocks = []
        for i, line in enumerate(lines[:-1]):
            if not line.startswith(_TAG):
                continue
            try:
                meta = json.loads(line[len(_TAG):])
            except ValueError:
                continue
            nxt = lines[i + 1]
            if isinstance(meta, dict) and meta.get("backend") != self.backend \
                    and nxt.startswith("/"):
                blocks.append((line, nxt))
        self._foreign = (identity, blocks)
        return blocks

    def render_file(self) -> str:
        chunks = [_HEADER]
        for tag, line in self._foreign_blocks():
            chunks.append(f"{tag}\n{line}\n")
        if self._chunks is None:
            self._chunks = {st["share_id"]: self._chunk(st["share_id"], st["path"],
                                                        _grants(st["rules"]))
                            for st in self._all_states()}
        chunks.extend(chunk for _, chunk in sorted(self._chunks.items()))
        return "".join(chunks)

    def _chunk(self, share_id: str, path: str, rules: Dict[str, Grant]) -> str:
        line = self.render_line(share_id, path, rules)
        if line is None:
            return ""
        tag = _TAG + json.dumps({"backend": self.backend, "share": share_id}, sort_keys=True)
        return f"{tag}\n{line}\n"

    def _write_file(self) -> None:
        os.makedirs(os.path.dirname(self.exports_file), mode=0o755, exist_ok=True)
        atomic_write(self.exports_file, self.render_file().encode(), 0o644)
        # the other backends' lines are those just written back
        self._foreign = (_identity(self.exports_file), self._foreign[1])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One lock per exports file, shared by every backend and process
        # that writes it; flock on a fresh open file also excludes threads.
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(self.lock_file), mode=0o755, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- exportfs ------------------------------------------------------------
    def _run(self, *args: str, check: bool = True):
        return run([self.exportfs, *args], timeout=max(5.0, self.command_timeout), check=check)

    def _exported(self) -> Dict[str, List[str]]:
        proc = self._run("-v")
        return parse_exportfs_v(proc.stdout.decode(errors="replace"))

    def _export_client(self, share_id: str, client: str, grant: Grant, path: str) -> None:
        self._run("-o", self._options(share_id, grant), f"{exportfs_host(client)}:{path}")

    def _unexport_client(self, client: str, path: str) -> None:
        proc = self._run("-u", f"{exportfs_host(client)}:{path}", check=False)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip()
            if "could not find" in err.lower():
                return   # already gone: unexport is idempotent
            raise BackendFailure(f"{self.exportfs} -u {exportfs_host(client)}:{path} failed "
                                 f"(exit {proc.returncode}): {err[-500:]}")

    def _sync_kernel(self, share_id: str, path: str, rules: Dict[str, Grant]) -> None:
        """Make the kernel's clients of path exactly the rendered ones."""
        wanted = client_forms(rules)
        names = {c for c, _ in wanted}
        for client, grant in wanted:           # add, or change options in place
            self._export_client(share_id, client, grant, path)
        for client in self._exported().get(path, []):
            if client not in names:
                self._unexport_client(client, path)

    # --- the ExportHelper interface ------------------------------------------
    def _rule_map(self, rules: Iterable[AccessRule]) -> Dict[str, Grant]:
        return rule_map(rules, rule_key, self.config)

    def export(self, share: Share, path: str, rules: List[AccessRule]) -> List[str]:
        self._check_share(share, path)
        self._validate_all(rules)
        wanted = self._rule_map(rules)
        with self._locked():
            self._apply(share, path, wanted)
        return self.export_locations(share, path)

    def update_access(self, share: Share, path: str, access_rules: List[AccessRule],
                      add_rules: List[AccessRule], delete_rules: List[AccessRule]) -> None:
        self._check_share(share, path)
        self._validate_all(list(access_rules) + list(add_rules))
        with self._locked():
            state = self._read_state(share.id)
            current = _grants(state["rules"]) if state is not None else None
            self._apply(share, path, merge_access(current, access_rules, add_rules,
                                                  delete_rules, rule_key, self.config))

    def _apply(self, share: Share, path: str, rules: Dict[str, Grant]) -> None:
        """Save the state, rewrite the file, change the kernel; undo on failure."""
        old = self._read_state(share.id)
        if old is not None and old["path"] != path:
            self._unexport_path(old["path"])    # the share moved: drop the old path
        self._write_state(share.id, path, rules)
        try:
            self._write_file()
            self._sync_kernel(share.id, path, rules)
        except BaseException:
            self._restore(share, path, old)
            raise

    def _restore(self, share: Share, path: str, old: Optional[dict]) -> None:
        try:
            if old is None:
                self._drop_state(share.id)
                self._write_file()
                self._unexport_path(path)
            else:
                old_rules = _grants(old["rules"])
                self._write_state(share.id, old["path"], old_rules)
                self._write_file()
                self._sync_kernel(share.id, old["path"], old_rules)
        except (BackendFailure, OSError) as exc:
            log.error("restoring the kernel export of share %s failed: %s", share.id, exc)

    def _unexport_path(self, path: str) -> None:
        for client in self._exported().get(path, []):
            self._unexport_client(client, path)

    def has_export(self, share_id: str) -> bool:
        return _SHARE_ID_RE.fullmatch(share_id) is not None and self._read_state(share_id) is not None

    def unexport(self, share: Share, path: str) -> None:
        """Remove every client of path from the kernel, then from the file,
        and wait until nfsd lets go of the path, so the driver's umount that
        follows does not fail with "target is busy"."""
        self._check_share(share)
        with self._locked():
            state = self._read_state(share.id)
            paths = [p for p in {path, state["path"] if state else None} if p]
            paths = [p for p in paths if _PATH_RE.fullmatch(p)]
            for p in paths:
                self._unexport_path(p)
            if state is not None:
                self._drop_state(share.id)
            self._write_file()
        for p in paths:                       # outside the lock: may take a minute
            self.wait_released(p, self.release_timeout)

    #: nfsd's export caches: their entries pin the exported path (see the
    #: module docstring), and umount fails with EBUSY until they are gone.
    CACHE_FILES = ("/proc/net/rpc/nfsd.export/content", "/proc/net/rpc/nfsd.fh/content")

    def nfsd_references(self, path: str) -> int:
        """How many nfsd cache entries name path (0 without a kernel NFS server)."""
        count = 0
        for name in self.CACHE_FILES:
            try:
                with open(name, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                words = line[2:].split() if line.startswith("# ") else line.split()
                if not words or words[0].startswith("#"):
                    continue
                # nfsd.export: "<path> <client>(...)"; nfsd.fh: "... <path>" last.
                if words[0] == path or (len(words) >= 4 and words[-1] == path):
                    count += 1
        return count

    def wait_released(self, path: str, timeout: float) -> bool:
        """Wait until no nfsd cache entry names path; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.nfsd_references(path):
            if time.monotonic() >= deadline:
                log.warning("nfsd still references %s after %.0f s; its umount may fail "
                            "with 'target is busy' for a while", path, timeout)
                return False
            time.sleep(1.0)
        return True

    # --- recovery --------------------------------------------------------------
    def exported_share_ids(self) -> List[str]:
        with self._locked():
            return [st["share_id"] for st in self._all_states()]

    def reexport_all(self) -> None:
        """Make the file and the kernel match the saved state of every share
        of this backend (e.g. after someone ran exportfs -ua)."""
        with self._locked():
            self._chunks = None                 # the state files are the truth
            self._write_file()
            for st in self._all_states():
                self._sync_kernel(st["share_id"], st["path"], _grants(st["rules"]))

