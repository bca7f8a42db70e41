"""A btrfs pool on another host, reached over ssh, that holds replicas.

`share_driver = btrfs_remote` with `btrfs_remote_target = user@host:/path`
(a directory of a btrfs file system there). The active copy's btrfs driver
sends each sync point with `btrfs send` here and `ssh ... btrfs receive`
there; every other step on that host (subvolume show, snapshot, delete,
rename, mkdir) is one ssh command with each word quoted. ssh runs with
BatchMode and StrictHostKeyChecking=yes, the rules of the GlusterFS remote
targets: the host key must be in `btrfs_remote_known_hosts_file` (or ssh's
own known_hosts), an unknown or changed key refuses every command.

The backend holds `dr` replicas only: nothing exports on that host, so its
copies are not readable and cannot be promoted here (an administrator
serves one there, e.g. with ManageShare of that host's sharedd). It creates
no shares of its own. Quota limits are not set on the copies.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from typing import Any, Dict, List, Optional, Sequence

from .. import util
from ..errors import BackendFailure, ConfigError, NotSupported
from ..models import Share, ShareUpdate
from ..options import Opt
from ..transfer import SubvolumeInfo
from .base import ShareDriver
from .btrfs_layout import REVERT_NEW, REVERT_OLD, ReplicaPool

log = logging.getLogger(__name__)

GiB = 1 << 30
# user@host:/path; the path is used unquoted by btrfs receive's helpers
# (transfer), so it is limited to characters no shell treats specially.
TARGET_RE = re.compile(r"^(?P<user>[a-z_][a-z0-9_-]{0,31})@"
                       r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):"
                       r"(?P<path>/[A-Za-z0-9._/-]{0,1000})$")
_UUID_RE = re.compile(r"^[0-9a-f-]{36}$")


def parse_target(text: str) -> "tuple[str, str, str]":
    m = TARGET_RE.fullmatch(text.strip())
    if not m or "/../" in m.group("path") + "/" or m.group("path").rstrip("/") == "":
        raise ValueError(f"{text!r} is not user@host:/path (a directory other than /)")
    return m.group("user"), m.group("host").strip("[]"), os.path.normpath(m.group("path"))


def parse_subvolume_show(text: str) -> SubvolumeInfo:
    """`btrfs subvolume show` output (btrfs-progs 5 and 6) -> its uuids."""
    def field(name: str) -> str:
        m = re.search(rf"^\s*{name}:\s*(\S*)\s*$", text, re.M)
        value = m.group(1) if m else ""
        return value if _UUID_RE.fullmatch(value) else ""
    flags = re.search(r"^\s*Flags:\s*(.*)$", text, re.M)
    return SubvolumeInfo(uuid=field("UUID"), parent_uuid=field("Parent UUID"),
                         received_uuid=field("Received UUID"),
                         readonly=bool(flags and "readonly" in flags.group(1)))


class BtrfsRemoteDriver(ReplicaPool, ShareDriver):
    driver_name = "btrfs_remote"
    driver_version = "1.0"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    uses_export_helpers = False
    serves_exports = False

    OPTIONS = [
        Opt("btrfs_remote_target", "str", required=True,
            help="user@host:/path: a directory of a btrfs file system on another host, reached "
                 "over ssh, where replicas of this host's btrfs shares are received (dr "
                 "replicas: not exported there)."),
        Opt("btrfs_remote_ssh_key", "path", "",
            help="Private key for ssh to the target (default: ssh's own)."),
        Opt("btrfs_remote_ssh_port", "int", 22, min=1, max=65535, help="SSH port of the target."),
        Opt("btrfs_remote_known_hosts_file", "path", "",
            help="known_hosts file with the target's host key (default: ssh's own). The key "
                 "must be there: an unknown or changed key refuses every command."),
    ]

    @classmethod
    def check_config(cls, backend, src, sec_of) -> None:
        try:
            parse_target(backend.btrfs_remote_target)
        except ValueError as exc:
            raise ConfigError(f"{src('btrfs_remote_target')}: [{sec_of('btrfs_remote_target')}] "
                              f"btrfs_remote_target: {exc}") from None

    def __init__(self, backend_name: str, config, helpers: Optional[dict] = None,
                 state_dir: str = "", command_timeout: float = 120.0):
        super().__init__(backend_name, config, helpers, state_dir, command_timeout)
        self.user, self.host, self.pool = parse_target(config.btrfs_remote_target)
        self.ssh = util.ssh_argv(self.host, self.user, port=int(config.btrfs_remote_ssh_port),
                                 key=config.btrfs_remote_ssh_key or "",
                                 known_hosts=config.btrfs_remote_known_hosts_file or "")

    # --- commands on the target ----------------------------------------------------
    def _remote(self, *cmd: str, check: bool = True) -> "tuple[int, str]":
        argv = self.ssh + [shlex.quote(a) for a in cmd]
        proc = util.run(argv, timeout=self.command_timeout, check=False, new_session=True)
        err = (proc.stderr or b"").decode(errors="replace").strip()
        if proc.returncode == 255:
            raise BackendFailure(f"ssh to {self.user}@{self.host} failed: {err[-300:]}")
        if check and proc.returncode != 0:
            raise BackendFailure(f"{' '.join(cmd)} on {self.host} failed (exit "
                                 f"{proc.returncode}): {err[-300:]}")
        return proc.returncode, proc.stdout.decode(errors="replace")

    def _exists(self, path: str) -> bool:
        return self._remote("test", "-e", path, check=False)[0] == 0

    # --- ReplicaPool ----------------------------------------------------------------------
    def _pool_info(self, path: str) -> Optional[SubvolumeInfo]:
        code, out = self._remote("btrfs", "subvolume", "show", path, check=False)
        if code != 0:
            return None
        info = parse_subvolume_show(out)
        return info if info.uuid else None

    def _delete_subvolume(self, path: str, commit: bool = True) -> None:
        if self._exists(path):
            self._remote("btrfs", "subvolume", "delete", *(["--commit-after"] if commit else []),
                         path)

    def _commit(self) -> None:
        self._remote("btrfs", "filesystem", "sync", self.pool)

    def _make_dirs(self, path: str) -> None:
        self._remote("mkdir", "-p", "-m", "0700", path)

    def _entries(self, path: str) -> List[str]:
        code, out = self._remote("ls", "-1A", "--", path, check=False)
        return sorted(n for n in out.splitlines() if n) if code == 0 else []

    def _remove_dir(self, path: str) -> None:
        code, _ = self._remote("rmdir", "--", path, check=False)
        if code != 0:
            log.warning("cannot remove %s on %s", path, self.host)

    def _receive_prefix(self) -> Sequence[str]:
        return list(self.ssh)

    def _replica_take(self, replica: Share, received: str) -> None:
        path = self._path(self._share_rel(replica))
        new, old = path + REVERT_NEW, path + REVERT_OLD
        if self._exists(old):                 # an earlier take was cut short
            if not self._exists(path):
                self._remote("mv", "-T", "--", old, path)
            else:
                self._delete_subvolume(old)
        self._delete_subvolume(new)
        self._make_dirs(os.path.dirname(path))
        self._remote("btrfs", "subvolume", "snapshot", received, new)
        if self._exists(path):
            self._remote("mv", "-T", "--", path, old)
        self._remote("mv", "-T", "--", new, path)
        self._commit()
        self._delete_subvolume(old, commit=False)      # the sync's last commit carries it

    def replica_unserve(self, replica: Share) -> None:
        return None                           # nothing is served there

    # --- the rest of a driver ----------------------------------------------------------
    def do_setup(self) -> None:
        code, out = self._remote("stat", "-f", "-c", "%T", self.pool, check=False)
        if code != 0 or out.strip() != "btrfs":
            raise BackendFailure(f"{self.pool} on {self.host} is not a btrfs directory "
                                 f"({out.strip() or 'missing'})")

    def create_share(self, share: Share) -> ShareUpdate:
        raise NotSupported(f"backend {self.backend_name} holds replicas only")

    def delete_share(self, share: Share) -> None:
        raise NotSupported(f"backend {self.backend_name} holds replicas only")

    def ensure_share(self, share: Share, rules: List[Any]) -> ShareUpdate:
        raise NotSupported(f"backend {self.backend_name} exports nothing: its replicas are on "
                           f"{self.host}")

    def get_share_stats(self) -> Dict[str, Any]:
        _, out = self._remote("stat", "-f", "-c", "%S %b %a", self.pool)
        try:
            size, blocks, free = (int(x) for x in out.split())
        except ValueError:
            raise BackendFailure(f"stat -f {self.pool} on {self.host}: {out.strip()!r}") from None
        return {"share_backend_name": self.backend_name, "driver_name": self.driver_name,
                "driver_version": self.driver_version,
                "total_capacity_gb": size * blocks / GiB, "free_capacity_gb": size * free / GiB,
                "thin_provisioning": True, "pool_path": f"{self.host}:{self.pool}",
                **self.capabilities()}

    def get_backend_info(self) -> Dict[str, Any]:
        return {"driver": self.driver_name, "version": self.driver_version,
                "target": f"{self.user}@{self.host}:{self.pool}"}
