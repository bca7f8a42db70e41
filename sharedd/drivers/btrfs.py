"""btrfs share driver: one subvolume per share, size enforced by qgroups.

Pool layout (pool = btrfs_pool_path):

    <pool>/shares/<share id>        subvolume of a created share
    <pool>/snapshots/<snapshot id>  read-only snapshot
    <anything>.revert-new / .revert-old   transient, during a revert
    <pool>/migrate/<share id>.1, .2 read-only snapshots of a share migrating
                                    away (send/receive to another btrfs pool)
    <pool>/migrate/<share id>/      what a share migrating in receives

Each share subvolume is mounted on its own mount point
(<mount_dir>/<share id>, with -o subvol=) and that mount point is what the
export helper publishes: NFS-Ganesha cannot export a subvolume that is only
reachable as a directory under the pool mount (clients get NFS4ERR_XDEV).

Every step is idempotent so that start-up recovery can replay it. The steps
of an operation are system calls (btrfs_kernel), not processes; set-up uses
the tools.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from .. import transfer, util
from ..errors import (AlreadyExists, BackendFailure, Cancelled, ConfigError, InvalidArgument,
                      NotSupported)
from ..models import AccessRule, Share, ShareUpdate, Snapshot, snapshot_as_share
from ..mountinfo import MountEntry, is_mounted, mount_at, mounted_id
from ..options import Opt
from . import btrfs_kernel as kernel
from .base import ShareDriver
from .btrfs_layout import (REVERT_NEW, REVERT_OLD, SHARES_DIR, SNAPSHOTS_DIR, ReplicaPool,
                           same_snapshot)
from .btrfs_kernel import SUBVOL_INO, filesystem_uuid

log = logging.getLogger(__name__)

GiB = 1 << 30
#: btrfs superblock: at 64 KiB, magic at offset 0x40 within it
_SUPER_MAGIC_OFFSET = 0x10000 + 0x40
_SUPER_MAGIC = b"_BHRfS_M"

MIGRATE_DIR = "migrate"
#: what migration_start returns for a send/receive migration (state["method"])
MIGRATION_METHOD = "btrfs-send"

_QGROUP_HEADER_RE = re.compile(
    r"^qgroupid\s+(referenced|rfer)\s+(exclusive|excl)\s+"
    r"(max referenced|max_rfer)\s+(max exclusive|max_excl)\b", re.I)
_QGROUP_ID_RE = re.compile(r"^(\d+)/(\d+)$")

_QGROUP_LIMIT_MAX_RFER = 1                  # limit_flags bit in sysfs


def _is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_INO


def _has_btrfs_signature(image: str) -> bool:
    try:
        with open(image, "rb") as f:
            f.seek(_SUPER_MAGIC_OFFSET)
            return f.read(len(_SUPER_MAGIC)) == _SUPER_MAGIC
    except OSError:
        return False


class Qgroup:
    def __init__(self, subvol_id: int, referenced: int, exclusive: int,
                 max_referenced: Optional[int]):
        self.subvol_id = subvol_id
        self.referenced = referenced
        self.exclusive = exclusive
        self.max_referenced = max_referenced


def parse_qgroup_show(text: str) -> Dict[int, Qgroup]:
    """Parse `btrfs qgroup show -r -e --raw` into subvolume id -> Qgroup.

    Only level-0 qgroups (one per subvolume). Anything unexpected raises
    BackendFailure rather than being guessed at: sizes decide whether a
    shrink may lose data.
    """
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if not lines or not _QGROUP_HEADER_RE.match(lines[0].strip()):
        raise BackendFailure("unexpected output from btrfs qgroup show: "
                             f"header {lines[0][:120] if lines else '(empty)'!r}")
    result: Dict[int, Qgroup] = {}
    for line in lines[1:]:
        fields = line.split()
        if set(line.strip()) <= set("- "):
            continue          # the dashes under the header
        m = _QGROUP_ID_RE.fullmatch(fields[0])
        if not m or len(fields) < 5:
            raise BackendFailure(f"unexpected line from btrfs qgroup show: {line[:120]!r}")
        level, qid = int(m.group(1)), int(m.group(2))

        def number(value: str, allow_none: bool) -> Optional[int]:
            if allow_none and value == "none":
                return None
            if not value.isdigit():
                raise BackendFailure(f"unexpected size {value!r} from btrfs qgroup show "
                                     f"in line {line[:120]!r}")
            return int(value)

        rfer = number(fields[1], False)
        excl = number(fields[2], False)
        max_rfer = number(fields[3], True)
        number(fields[4], True)
        if level == 0:
            result[qid] = Qgroup(qid, rfer, excl, max_rfer)
    return result


def _gib_ceil(nbytes: int) -> int:
    return max(1, math.ceil(nbytes / GiB))


class _MigrationPaths(NamedTuple):
    source: str             # the share's subvolume (source pool)
    base: str               # snapshot of phase 1 (source pool)
    final: str              # snapshot of phase 2 (source pool)
    area: str               # where the destination pool receives
    received_base: str
    received_final: str
    dest: str               # the destination share's subvolume


class BtrfsDriver(ReplicaPool, ShareDriver):
    driver_name = "btrfs"
    driver_version = "1.0"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    thin_provisioning = True
    uses_export_helpers = True
    shares_share_a_file_system = True

    OPTIONS = [
        Opt("btrfs_pool_path", "path", required=True,
            help="Mount point of the btrfs pool that holds the share subvolumes."),
        Opt("btrfs_pool_image", "path", "",
            help="Optional sparse image file for the pool: created and formatted "
                 "with mkfs.btrfs if missing, loop-mounted at btrfs_pool_path when "
                 "not mounted. An existing image is reused, never reformatted."),
        Opt("btrfs_pool_image_size_gib", "int", 10, min=1,
            help="Size of a new btrfs_pool_image, GiB (sparse)."),
        Opt("btrfs_manage_paths", "list", [],
            help="Directories of the pool (relative to btrfs_pool_path) whose subvolumes "
                 "ManageShare may adopt, besides the pool's own shares directory; "
                 "nothing else in the pool can be taken over."),
        Opt("btrfs_share_mount_dir", "path", "",
            help="Directory for the per-share subvolume mounts "
                 "(default: <state_path>/backends/<backend>/mounts)."),
    ]

    @classmethod
    def check_config(cls, backend, src, sec_of) -> None:
        pool = backend.btrfs_pool_path
        if pool == "/":
            raise ConfigError(f"{src('btrfs_pool_path')}: [{sec_of('btrfs_pool_path')}] "
                              "btrfs_pool_path: must not be the root directory")
        image = backend.btrfs_pool_image
        if image and (image == pool or image.startswith(pool.rstrip("/") + "/")):
            raise ConfigError(f"{src('btrfs_pool_image')}: [{sec_of('btrfs_pool_image')}] "
                              "btrfs_pool_image: must not lie inside btrfs_pool_path")
        for area in backend.btrfs_manage_paths or []:
            norm = os.path.normpath(area)
            if os.path.isabs(area) or norm in (".", "..") or norm.startswith("../") \
                    or norm.split("/")[0] == SNAPSHOTS_DIR or "," in area:
                raise ConfigError(f"{src('btrfs_manage_paths')}: [{sec_of('btrfs_manage_paths')}] "
                                  f"btrfs_manage_paths: {area!r} must be a directory of the "
                                  "pool, relative to btrfs_pool_path, outside its snapshots")
        mdir = backend.btrfs_share_mount_dir
        if mdir and (mdir == pool or mdir.startswith(pool.rstrip("/") + "/")):
            raise ConfigError(f"{src('btrfs_share_mount_dir')}: "
                              f"[{sec_of('btrfs_share_mount_dir')}] btrfs_share_mount_dir: "
                              "must not lie inside btrfs_pool_path")

    def __init__(self, backend_name: str, config, helpers: Optional[dict] = None,
                 state_dir: str = "", command_timeout: float = 120.0):
        super().__init__(backend_name, config, helpers, state_dir, command_timeout)
        self.pool = os.path.realpath(config.btrfs_pool_path)
        self.image = config.btrfs_pool_image or ""
        self.image_size_gib = int(config.btrfs_pool_image_size_gib or 10)
        mdir = config.btrfs_share_mount_dir or os.path.join(state_dir or ".", "mounts")
        self.mount_dir = os.path.realpath(mdir)
        self._pool_entry: Optional[Tuple[Any, MountEntry]] = None
        self.manage_paths: List[str] = list(getattr(config, "btrfs_manage_paths", None) or [])
        cifs = (helpers or {}).get("CIFS")
        if hasattr(cifs, "snapshot_dir_of"):
            cifs.snapshot_dir_of = self._shown_view     # Samba's shadow_copy2 reads it

    # --- small tools -----------------------------------------------------------
    def _run(self, *argv: str, check: bool = True):
        return util.run(list(argv), timeout=self.command_timeout, check=check)

    @staticmethod
    def _kernel(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One btrfs_kernel call; the kernel's refusal as a BackendFailure."""
        log.debug("kernel: %s %s", what, args)
        try:
            return fn(*args)
        except OSError as exc:
            raise BackendFailure(f"{what} {' '.join(str(a) for a in args)}: "
                                 f"{exc.strerror or exc}") from None

    def _pool_mount(self) -> MountEntry:
        """The pool's mount. Every create and stats read asks: the entry is
        kept while the same mount (id) of the same file system (uuid) is
        there, so the mount table of thousands of shares is not re-read."""
        mid = mounted_id(self.pool)
        if mid is None:
            raise BackendFailure(f"btrfs pool {self.pool} is not mounted")
        try:
            key: Any = (mid, filesystem_uuid(self.pool))
        except OSError:
            key = None                      # not btrfs: described below
        if key is None or self._pool_entry is None or self._pool_entry[0] != key:
            m = mount_at(self.pool)
            if m is None:
                raise BackendFailure(f"btrfs pool {self.pool} is not mounted")
            if m.fstype != "btrfs":
                raise BackendFailure(f"{self.pool} is a {m.fstype} mount, not btrfs")
            self._pool_entry = (key, m)
        return self._pool_entry[1]

    def _mount_point(self, share: Share) -> str:
        self._check_id("share", share.id)
        return os.path.join(self.mount_dir, share.id)

    def _subvol_id(self, path: str) -> int:
        return int(self._kernel("subvolume id of", kernel.subvolume_id, path))

    def _qgroups(self) -> Dict[int, Qgroup]:
        # Accounting lags behind writes until the transaction commits.
        self._kernel("commit", kernel.commit, self.pool)
        out = self._run("btrfs", "qgroup", "show", "-r", "-e", "--raw", self.pool)
        return parse_qgroup_show(out.stdout.decode(errors="replace"))

    def _qgroup_dir(self) -> Optional[str]:
        """/sys/fs/btrfs/<uuid>/qgroups of the pool (kernel 5.9+), if there."""
        try:
            d = f"/sys/fs/btrfs/{filesystem_uuid(self.pool)}/qgroups"
        except OSError:
            return None
        return d if os.path.isdir(d) else None

    @staticmethod
    def _qgroup_sysfs(qdir: str, sid: int) -> Qgroup:
        """One quota group from sysfs: no listing of every subvolume's."""
        d = os.path.join(qdir, f"0_{sid}")

        def value(name: str) -> int:
            with open(os.path.join(d, name), encoding="ascii") as f:
                text = f.read(64).strip()
            if not text.isdigit():
                raise BackendFailure(f"unexpected {name} {text!r} in {d}")
            return int(text)
        try:
            limit = value("max_referenced") if value("limit_flags") & _QGROUP_LIMIT_MAX_RFER \
                else None
            return Qgroup(sid, value("referenced"), value("exclusive"), limit)
        except FileNotFoundError:
            raise BackendFailure(f"no quota group 0/{sid} (are quotas enabled on the "
                                 "pool?)") from None

    def _qgroup(self, path: str, fresh: bool = True) -> Qgroup:
        """The subvolume's quota group; fresh: after a commit (usage figures)."""
        sid = self._subvol_id(path)
        qdir = self._qgroup_dir()
        if qdir is None:                     # no sysfs view: list them all
            group = self._qgroups().get(sid)
            if group is None:
                raise BackendFailure(f"no quota group 0/{sid} for subvolume {path} "
                                     "(are quotas enabled on the pool?)")
            return group
        if fresh:
            self._kernel("commit", kernel.commit, self.pool)
        return self._qgroup_sysfs(qdir, sid)

    def _set_limit(self, path: str, size_gib: int) -> None:
        # One ioctl (cheaper than reading the limit back): ensure sets it too.
        if int(size_gib) < 1:
            raise InvalidArgument(f"share size must be at least 1 GiB, not {size_gib}")
        self._kernel("qgroup limit", kernel.limit_referenced, path, int(size_gib) * GiB)

    def _snapshot(self, source: str, dest: str, readonly: bool) -> None:
        """Snapshot source to dest unless dest is already a subvolume (replay)."""
        if _is_subvolume(dest):
            return
        if os.path.lexists(dest):
            raise BackendFailure(f"{dest} exists and is not a subvolume")
        if not _is_subvolume(source):
            raise BackendFailure(f"{source} is not a subvolume")
        self._kernel("snapshot", kernel.snapshot, source, dest, readonly)

    def _delete_subvolume(self, path: str, commit: bool = True) -> None:
        """Delete the subvolume at path and its quota group; gone is fine.
        commit=False where a snapshot follows at once (it commits both):
        with quotas on, a committed delete makes the next snapshot wait for
        the cleaner."""
        if not os.path.lexists(path):
            return
        if not _is_subvolume(path):
            raise BackendFailure(f"{path} is not a subvolume; not deleting it")
        # A read-only snapshot can be deleted as is; nested subvolumes cannot.
        # The commit makes the deletion survive a crash. The quota group goes
        # with the subvolume once the cleaner is done (kernel 6.x); an older
        # kernel keeps a stale one, which costs nothing and is cleared at the
        # next set-up: waiting for the cleaner here would cost a second or
        # more per delete.
        self._kernel("subvolume delete", kernel.delete_subvolume, path, commit)

    def _is_mounted_subvol(self, mp: str, subvol_path: str) -> bool:
        if not is_mounted(mp):
            return False
        try:
            a, b = os.stat(mp), os.stat(subvol_path)
        except OSError:
            return False
        # Every subvolume has its own st_dev, the same through every mount of
        # it (so this is btrfs, and this subvolume).
        return a.st_dev == b.st_dev and a.st_ino == b.st_ino == SUBVOL_INO

    def _mount(self, share: Share) -> str:
        """Mount the share's subvolume on its mount point; return the mount point."""
        return self._mount_rel(self._share_rel(share), self._mount_point(share),
                               f"of share {share.id}")

    def _mount_rel(self, rel: str, mp: str, what: str, flags: int = kernel.SERVED_ONLY) -> str:
        """Mount the subvolume at rel (in the pool) on mp, unless it is there."""
        path = self._path(rel)
        if not _is_subvolume(path):
            raise BackendFailure(f"subvolume {path} {what} is missing")
        if self._is_mounted_subvol(mp, path):
            return mp
        self._unmount(mp, keep_dir=True)     # something stale is mounted there
        pool = self._pool_mount()
        fsroot = os.path.normpath(os.path.join(pool.root, rel))
        os.makedirs(mp, mode=0o700, exist_ok=True)   # its own mode is hidden once mounted
        try:
            self._kernel("mount", kernel.mount_subvolume, pool.source, fsroot, mp, flags)
        except BackendFailure:
            self._pool_entry = None         # describe the pool afresh next time
            raise
        if not self._is_mounted_subvol(mp, path):
            raise BackendFailure(f"mounted {fsroot} on {mp} but the mount does not show "
                                 f"the subvolume {what}")
        return mp

    def _unmount(self, mp: str, keep_dir: bool = False) -> None:
        for _ in range(8):            # stacked mounts: peel them one by one
            if not is_mounted(mp):
                break
            self._kernel("umount", kernel.unmount, mp)
        else:
            raise BackendFailure(f"{mp} is still mounted after repeated umount")
        if not keep_dir:
            self._rmdir(mp)

    def _export(self, share: Share, mp: str, rules: List[AccessRule]) -> List[str]:
        return list(self._helper(share).export(share, mp, rules))

    def _unexport(self, share: Share) -> None:
        self._hide(share)
        self._helper(share).unexport(share, self._mount_point(share))

    def _serve(self, share: Share, rules: List[AccessRule]) -> ShareUpdate:
        """Limit, mount and export an existing subvolume."""
        path = self._path(self._share_rel(share))
        self._set_limit(path, share.size_gib)
        mp = self._mount(share)
        locations = self._export(share, mp, rules)
        self._reshow(share, rules)
        return ShareUpdate(export_locations=locations, provider_location=self._share_rel(share))

    # --- lifecycle -------------------------------------------------------------
    def do_setup(self) -> None:
        if not is_mounted(self.pool):
            if not self.image:
                raise BackendFailure(f"btrfs pool {self.pool} is not mounted and no "
                                     "btrfs_pool_image is configured")
            self._prepare_image()
            os.makedirs(self.pool, mode=0o700, exist_ok=True)
            self._run("mount", "-t", "btrfs", "-o", "loop,nosuid,nodev,noexec", self.image,
                      self.pool)
            os.chmod(self.pool, 0o700)        # the pool's own root: sharedd's alone
        self._pool_mount()
        self._run("btrfs", "quota", "enable", self.pool)
        # Enabling quotas on a pool with data starts a rescan; usage figures
        # are wrong until it ends.
        self._run("btrfs", "quota", "rescan", "-W", self.pool)
        # Quota groups of subvolumes deleted on an older kernel (see
        # _delete_subvolume); best effort.
        self._run("btrfs", "qgroup", "clear-stale", self.pool, check=False)
        for sub in (SHARES_DIR, SNAPSHOTS_DIR):
            # Share content is the clients': no local user may reach it
            # through the pool, whatever the pool's own mount allows.
            os.makedirs(self._path(sub), mode=0o700, exist_ok=True)
            os.chmod(self._path(sub), 0o700)
        self.prepare_mount_dir(self.mount_dir)
        flags = set(self._pool_mount().mount_options)
        if not {"nosuid", "nodev"} <= flags:
            log.warning("btrfs pool %s is mounted without nosuid,nodev: share content "
                        "written by clients could act on this host through it; sharedd "
                        "keeps %s and %s at 0700, remount the pool with nosuid,nodev",
                        self.pool, self._path(SHARES_DIR), self._path(SNAPSHOTS_DIR))
    def _prepare_image(self) -> None:
        """Create and format the image once; reuse it on every later start."""
        if os.path.exists(self.image):
            if not _has_btrfs_signature(self.image):
                raise BackendFailure(f"btrfs_pool_image {self.image} exists but holds no "
                                     "btrfs file system; refusing to format it")
            return
        os.makedirs(os.path.dirname(self.image), mode=0o700, exist_ok=True)
        # Format under a temporary name: an image only appears under its real
        # name once complete, so a crash never leaves a half-made pool that a
        # later start would have to guess about.
        tmp = self.image + ".new"
        with open(tmp, "wb") as f:
            f.truncate(self.image_size_gib * GiB)
        self._run("mkfs.btrfs", "-q", "-f", "-L", f"sharedd-{self.backend_name}"[:255], tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, self.image)
        util.fsync_dir(os.path.dirname(self.image))

    def check_for_setup_error(self) -> None:
        self._pool_mount()
        self._qgroups()                 # fails if quotas are off
        for sub in (SHARES_DIR, SNAPSHOTS_DIR):
            if not os.path.isdir(self._path(sub)):
                raise BackendFailure(f"{self._path(sub)} is missing")

    # --- shares ---------------------------------------------------------------------
    def create_share(self, share: Share) -> ShareUpdate:
        self._new_subvolume(share)
        return self._serve(share, [])

    def migration_target(self, share: Share) -> None:
        path = self._new_subvolume(share)
        self._set_limit(path, share.size_gib)
        self._mount(share)

    def _new_subvolume(self, share: Share) -> str:
        path = self._path(self._share_rel(share))
        if not _is_subvolume(path):            # replay: it may already exist
            if os.path.lexists(path):
                raise BackendFailure(f"{path} exists and is not a subvolume")
            self._kernel("subvolume create", kernel.create_subvolume, path)
            if share.protocol == "NFS":
                # Clients' root is squashed by default: the anonymous user
                # must be able to write, as Manila's Generic driver does.
                os.chmod(path, 0o777)
        return path

    def create_share_from_snapshot(self, share: Share, snapshot: Snapshot,
                                   parent: Share) -> ShareUpdate:
        src = self._path(self._snapshot_rel(snapshot))
        if not _is_subvolume(src):
            raise BackendFailure(f"snapshot {snapshot.id} has no subvolume at {src}")
        self._snapshot(src, self._path(self._share_rel(share)), readonly=False)
        return self._serve(share, [])

    def delete_share(self, share: Share) -> None:
        rel = self._share_rel(share)
        self._drop_view(share)
        self._unexport(share)
        self._unmount(self._mount_point(share))
        for suffix in (REVERT_NEW, REVERT_OLD, ""):
            self._delete_subvolume(self._path(rel + suffix))

    def ensure_share(self, share: Share, rules: List[AccessRule]) -> ShareUpdate:
        self._recover_revert(share)
        return self._serve(share, rules)

    def update_access(self, share: Share, access_rules: List[AccessRule],
                      add_rules: List[AccessRule],
                      delete_rules: List[AccessRule]) -> Optional[Dict[str, str]]:
        self._helper(share).update_access(share, self._mount_point(share),
                                          access_rules, add_rules, delete_rules)
        if share.protocol == "NFS":      # the shown snapshots take the share's clients
            gone = {r.id for r in delete_rules}
            rules = {r.id: r for r in list(access_rules) + list(add_rules) if r.id not in gone}
            self._reshow(share, list(rules.values()))
        return None

    def extend_share(self, share: Share, new_size_gib: int) -> None:
        self._set_limit(self._path(self._share_rel(share)), new_size_gib)

    def shrink_share(self, share: Share, new_size_gib: int) -> None:
        path = self._path(self._share_rel(share))
        if int(new_size_gib) < 1:
            raise InvalidArgument(f"share size must be at least 1 GiB, not {new_size_gib}")
        used = self._qgroup(path).referenced
        if used > int(new_size_gib) * GiB:
            raise InvalidArgument(
                f"share {share.id} uses {used / GiB:.2f} GiB ({used} bytes); cannot shrink "
                f"it to {new_size_gib} GiB without losing data (at least "
                f"{_gib_ceil(used)} GiB needed)")
        self._set_limit(path, new_size_gib)

    def manage_existing(self, share: Share, export_path: str,
                        options: Dict[str, Any]) -> ShareUpdate:
        rel = self._managed_rel(share, export_path)
        path = self._path(rel)
        size = options.get("size_gib") if options else None
        usage = self._qgroup(path)
        if size is not None:
            if isinstance(size, bool) or not (isinstance(size, int) or
                                              (isinstance(size, str) and size.isdigit())):
                raise InvalidArgument(f"size_gib must be a whole number, not {size!r}")
            size = int(size)
            if size < 1:
                raise InvalidArgument("size_gib must be at least 1")
            if usage.referenced > size * GiB:
                raise InvalidArgument(
                    f"{export_path} uses {usage.referenced / GiB:.2f} GiB; size_gib={size} "
                    f"is too small (at least {_gib_ceil(usage.referenced)} GiB needed)")
        elif usage.max_referenced is not None:
            size = _gib_ceil(usage.max_referenced)
        else:
            size = _gib_ceil(usage.referenced)
        managed = dataclasses.replace(share, provider_location=rel, size_gib=size)
        update = self._serve(managed, [])
        update.size_gib = size
        update.provider_location = rel
        return update

    def check_manage(self, export_path: str, options: Dict[str, Any]) -> Optional[str]:
        return self._managed_rel(None, export_path)

    def _managed_rel(self, share: Optional[Share], export_path: str) -> str:
        if not export_path or "\x00" in export_path:
            raise InvalidArgument("export path is empty")
        given = export_path if os.path.isabs(export_path) else self._path(export_path)
        real = os.path.realpath(given)
        if os.path.commonpath([real, self.pool]) != self.pool or real == self.pool:
            raise InvalidArgument(f"{export_path} is not inside the btrfs pool {self.pool}")
        rel = self._check_rel(os.path.relpath(real, self.pool))
        areas = [SHARES_DIR] + [self._check_rel(a) for a in self.manage_paths]
        if not any(rel.startswith(a.rstrip("/") + "/") for a in areas):
            raise InvalidArgument(
                f"{export_path} is outside what backend {self.backend_name} may adopt: "
                f"subvolumes under {', '.join(self._path(a) for a in areas)} "
                "(btrfs_manage_paths names more)")
        if not os.path.lexists(real):
            raise InvalidArgument(f"{export_path} does not exist in pool {self.pool}")
        if not _is_subvolume(real):
            raise InvalidArgument(f"{export_path} is not a btrfs subvolume")
        if rel.split("/")[0] == SNAPSHOTS_DIR or rel.endswith((REVERT_NEW, REVERT_OLD)):
            raise InvalidArgument(f"{export_path} is a snapshot or revert subvolume of "
                                  "this driver, not a share")
        if is_mounted(real):
            raise InvalidArgument(f"{export_path} is a separate mount, not part of the pool")
        # In use if mounted on another share's mount point.
        own = self._mount_point(share) if share is not None else None
        try:
            names = os.listdir(self.mount_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            mp = os.path.join(self.mount_dir, name)
            if mp != own and self._is_mounted_subvol(mp, real):
                raise AlreadyExists(f"{export_path} is already served as share {name}")
        return rel

    def unmanage(self, share: Share) -> None:
        self._drop_view(share)
        self._unexport(share)
        self._unmount(self._mount_point(share))

    # --- snapshots -----------------------------------------------------------------
    def create_snapshot(self, snapshot: Snapshot, share: Share) -> Optional[str]:
        rel = self._snapshot_rel(snapshot)
        self._snapshot(self._path(self._share_rel(share)), self._path(rel), readonly=True)
        return rel

    def delete_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        self._delete_subvolume(self._path(self._snapshot_rel(snapshot)))

    # --- snapshot views: what clients see of a share's snapshots ------------------
    # <mount_dir>/.previous/<share id> holds one read-only mount per snapshot
    # shown, and is the driver's record of what is shown: CIFS names them
    # @GMT-YYYY.MM.DD-HH.MM.SS (UTC creation, as Windows' Previous Versions and
    # Samba's shadow_copy2 want), NFS by the snapshot's name (.snapshots/NAME).
    def _view_dir(self, share: Share) -> str:
        self._check_id("share", share.id)
        return os.path.join(self.mount_dir, ".previous", share.id)

    def _view_names(self, share: Share) -> List[str]:
        try:
            return sorted(os.listdir(self._view_dir(share)))
        except FileNotFoundError:
            return []

    def _mounted_view(self, share: Share) -> Dict[str, str]:
        """name -> path of the snapshots mounted in the view. After a reboot
        there are none until ensure mounts them (update_snapshot_view): an
        empty mount point is never shown as a snapshot."""
        view = self._view_dir(share)
        paths = {n: os.path.join(view, n) for n in self._view_names(share)}
        return {n: p for n, p in paths.items() if is_mounted(p)}

    def _shown_view(self, share: Share) -> Optional[str]:
        """The view directory, if the share shows snapshots (for Samba)."""
        return self._view_dir(share) if self._mounted_view(share) else None

    def shows_snapshots(self, share: Share) -> bool:
        helper = self.helper_for(share) if not share.share_server_id else None
        return bool(getattr(helper, "shows_snapshots", False))

    def has_snapshot_view(self, share: Share) -> bool:
        return os.path.isdir(self._view_dir(share))

    def update_snapshot_view(self, share: Share, snapshots: List[Snapshot],
                             rules: List[AccessRule]) -> None:
        view = self._view_dir(share)
        if not snapshots and not os.path.isdir(view):
            return
        # The helper names what its clients see: by time (strftime of the
        # UTC creation; Samba's Previous Versions) or by snapshot name.
        by_time = getattr(self._helper(share), "snapshot_names", None)
        want: Dict[str, Snapshot] = {}
        for snap in sorted(snapshots, key=lambda x: x.created_at):
            name = time.strftime(by_time, time.gmtime(snap.created_at / 1e6)) if by_time \
                else snap.name
            if name in want:           # two in one second: Windows can tell one
                log.info("share %s: snapshot %s shares its second with %s; shown once",
                         share.id, snap.id, want[name].id)
            want[name] = snap
        # smbd opens the versions as the connecting user, who must traverse
        # to them (as to the share itself); ganesha runs as root.
        cifs = share.protocol == "CIFS"
        for d, mode in ((os.path.dirname(view), 0o711 if cifs else 0o700),
                        (view, 0o755 if cifs else 0o700)):
            os.makedirs(d, mode=0o700, exist_ok=True)
            if cifs or d == view:
                os.chmod(d, mode)
        have = self._view_names(share)
        for name, snap in want.items():
            self._mount_rel(self._snapshot_rel(snap), os.path.join(view, name),
                            f"of snapshot {snap.id}", kernel.SERVED_ONLY | kernel.MS_RDONLY)
        gone = sorted(set(have) - set(want))
        # The clients' view first (NFS: nested exports; CIFS: shadow_copy2),
        # then the mounts under it.
        self._show(share, {n: os.path.join(view, n) for n in want}, gone, rules)
        for name in gone:
            self._unmount(os.path.join(view, name))
        if not want:
            self._rmdir(view)

    def _show(self, share: Share, shown: Dict[str, str], hidden: List[str],
              rules: List[AccessRule]) -> None:
        helper = self._helper(share)
        if not getattr(helper, "shows_snapshots", False):
            return
        mp = self._mount_point(share)
        try:
            helper.show_snapshots(share, mp, shown, hidden, rules)
        except BackendFailure as exc:
            if not shown:
                raise
            # Fail closed, and keep the share: a client's file where a
            # junction must go (or a failing export) withdraws every shown
            # snapshot rather than leave one with stale clients; the view
            # still lists them, so the next ensure tries again.
            log.error("share %s: cannot show its snapshots (%s); withdrawing them", share.id, exc)
            helper.show_snapshots(share, mp, {}, sorted(set(shown) | set(hidden)), [])

    def _reshow(self, share: Share, rules: List[AccessRule]) -> None:
        """Show what the view holds again (after the share's export came back,
        or its rules changed): the snapshots mounted there (ganesha would keep
        serving an empty mount point it exported before the mount)."""
        mounted = self._mounted_view(share)
        if mounted:
            self._show(share, mounted, [], rules)

    def _hide(self, share: Share) -> None:
        """Withdraw the clients' view, keep the mounts (before the share's
        export goes: NFS-Ganesha refuses to remove an export with nested ones)."""
        names = self._view_names(share)
        if names:
            self._show(share, {}, names, [])

    def _drop_view(self, share: Share) -> None:
        if os.path.isdir(self._view_dir(share)):
            self.update_snapshot_view(share, [], [])

    # --- mountable snapshots -------------------------------------------------------
    def _snapshot_export(self, snapshot: Snapshot, share: Share) -> Tuple[Share, str]:
        """The snapshot as the share's export helper serves it: an export of
        its own (the snapshot's id, the share's protocol and server) of a
        read-only mount at <mount_dir>/<snapshot id>."""
        self._check_id("snapshot", snapshot.id)
        return snapshot_as_share(snapshot, share), os.path.join(self.mount_dir, snapshot.id)

    def snapshot_update_access(self, snapshot: Snapshot, share: Share,
                               access_rules: List[AccessRule], add_rules: List[AccessRule],
                               delete_rules: List[AccessRule]) -> List[str]:
        export, mp = self._snapshot_export(snapshot, share)
        helper = self._helper(share)
        if not access_rules:
            helper.unexport(export, mp)
            self._unmount(mp)
            return []
        self._mount_rel(self._snapshot_rel(snapshot), mp, f"of snapshot {snapshot.id}",
                        kernel.SERVED_ONLY | kernel.MS_RDONLY)
        # Read-only whatever a rule says; at most MAX_SNAPSHOT_ACCESS_RULES
        # rules, so every change is a full sync of the export.
        rules = [dataclasses.replace(r, access_level="ro") for r in access_rules]
        return list(helper.export(export, mp, rules))

    def check_manage_snapshot(self, share: Share, provider_location: str) -> str:
        """A read-only subvolume under the pool's snapshots directory (or a
        btrfs_manage_paths area) taken of the share (_lineage), not mounted
        anywhere."""
        if not provider_location or "\x00" in provider_location:
            raise InvalidArgument("the snapshot's location is empty")
        given = provider_location if os.path.isabs(provider_location) \
            else self._path(provider_location)
        real = os.path.realpath(given)
        if os.path.commonpath([real, self.pool]) != self.pool or real == self.pool:
            raise InvalidArgument(f"{provider_location} is not inside the btrfs pool {self.pool}")
        rel = self._check_rel(os.path.relpath(real, self.pool))
        areas = [SNAPSHOTS_DIR] + [self._check_rel(a) for a in self.manage_paths]
        if not any(rel.startswith(a.rstrip("/") + "/") for a in areas):
            raise InvalidArgument(
                f"{provider_location} is outside what backend {self.backend_name} may adopt "
                f"as a snapshot: subvolumes under {', '.join(self._path(a) for a in areas)}")
        if not _is_subvolume(real):
            raise InvalidArgument(f"{provider_location} is not a btrfs subvolume")
        info = self._info(real)
        if not info.readonly:
            raise InvalidArgument(f"{provider_location} is a writable subvolume; a snapshot "
                                  "is read-only (btrfs subvolume snapshot -r)")
        family = self._lineage(share, os.path.dirname(real))
        if not info.parent_uuid or not {info.parent_uuid, info.uuid} & family:
            raise InvalidArgument(f"{provider_location} is not a snapshot of share "
                                  f"{share.name} (its parent subvolume is "
                                  f"{info.parent_uuid or 'none'})")
        if is_mounted(real):
            raise InvalidArgument(f"{provider_location} is a separate mount, not part of the pool")
        return rel

    def _lineage(self, share: Share, also: str) -> Set[str]:
        """The uuids a snapshot of the share may have as parent: the share's
        subvolume and, as reverts make the share a snapshot of a snapshot,
        its ancestors (found among the subvolumes of the snapshots area and
        of the directory `also`; the first one not found ends the chain)."""
        own = self._info(self._path(self._share_rel(share)))
        known: Dict[str, str] = {}
        for area in {self._path(SNAPSHOTS_DIR), also}:
            try:
                names = os.listdir(area)
            except OSError:
                continue
            for name in names:
                sub = os.path.join(area, name)
                if _is_subvolume(sub):
                    info = self._pool_info(sub)
                    if info is not None and info.uuid:
                        known[info.uuid] = info.parent_uuid
        family = {own.uuid}
        parent = own.parent_uuid
        while parent and parent not in family:
            family.add(parent)
            parent = known.get(parent, "")
        return family - {""}

    def manage_existing_snapshot(self, snapshot: Snapshot, share: Share,
                                 provider_location: str) -> int:
        rel = self.check_manage_snapshot(share, provider_location)
        return max(1, _gib_ceil(self._qgroup(self._path(rel)).referenced))

    def unmanage_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        return None   # a snapshot is not served: nothing to stop, the subvolume stays

    def revert_to_snapshot(self, share: Share, snapshot: Snapshot,
                           rules: List[AccessRule]) -> ShareUpdate:
        rel = self._share_rel(share)
        cur, new, old = (self._path(rel + s) for s in ("", REVERT_NEW, REVERT_OLD))
        src = self._path(self._snapshot_rel(snapshot))
        if not _is_subvolume(src):
            raise BackendFailure(f"snapshot {snapshot.id} has no subvolume at {src}")
        self._recover_revert(share)
        if not _is_subvolume(cur):
            raise BackendFailure(f"subvolume {cur} of share {share.id} is missing")
        # 1. the reverted copy, beside the live one (a leftover is stale).
        self._delete_subvolume(new)
        self._snapshot(src, new, readonly=False)
        self._set_limit(new, share.size_gib)
        # 2. swap: the two renames are the only window; _recover_revert
        #    finishes (new without cur) or rolls back (new beside cur).
        self._unexport(share)
        self._unmount(self._mount_point(share))
        os.rename(cur, old)
        os.rename(new, cur)
        self._kernel("commit", kernel.commit, self.pool)
        # 3. serve the reverted data, then drop the old copy.
        update = self._serve(share, rules)
        self._delete_subvolume(old)
        return update

    def _recover_revert(self, share: Share) -> None:
        """Finish or roll back a revert interrupted by a crash."""
        rel = self._share_rel(share)
        cur, new, old = (self._path(rel + s) for s in ("", REVERT_NEW, REVERT_OLD))
        if not _is_subvolume(cur):
            if _is_subvolume(new):
                log.warning("share %s: finishing an interrupted revert", share.id)
                self._unmount(self._mount_point(share), keep_dir=True)
                os.rename(new, cur)
            elif _is_subvolume(old):
                log.warning("share %s: rolling back an interrupted revert", share.id)
                self._unmount(self._mount_point(share), keep_dir=True)
                os.rename(old, cur)
            else:
                return
            self._kernel("commit", kernel.commit, self.pool)
        elif _is_subvolume(new):
            log.warning("share %s: discarding an unfinished revert copy", share.id)
            self._delete_subvolume(new)
        if _is_subvolume(cur) and _is_subvolume(old):
            # A mount may still show the old data (crash after the rename).
            mp = self._mount_point(share)
            if is_mounted(mp) and not self._is_mounted_subvol(mp, cur):
                self._unexport(share)
                self._unmount(mp, keep_dir=True)
            self._delete_subvolume(old)

    # --- migration -------------------------------------------------------------------
    # To another btrfs pool, driver-assisted with send/receive. Phase 1 sends
    # a read-only snapshot of the share (the base, <pool>/migrate/<id>.1)
    # whole into <destpool>/migrate/<id>/ and makes the destination share a
    # writable snapshot of what arrived. Phase 2, the source read-only, sends
    # a second snapshot (the final one, .2) as its difference from the base
    # and makes the destination share a writable snapshot of that instead.
    # The snapshots go after the switch (migration_cleanup), the base first,
    # so "no base, but a destination share" means the migration got that
    # far (a sharedd before this one cleaned up inside phase 2). Any other
    # destination: the base class's copy between the two mounts.

    def local_path(self, share: Share) -> Optional[str]:
        """The share's mount point, if its subvolume is mounted there (a copy
        into a bare mount point directory would land on the host's disk)."""
        mp = self._mount_point(share)
        if self._is_mounted_subvol(mp, self._path(self._share_rel(share))):
            return mp
        return None

    def _sends_to(self, dest_driver: ShareDriver, state: Optional[Dict[str, Any]] = None) -> bool:
        """Whether this migration is (or was started as) a send/receive one."""
        if state and state.get("method") != MIGRATION_METHOD:
            return False
        return isinstance(dest_driver, BtrfsDriver)

    def _same_pool(self, other: "BtrfsDriver") -> bool:
        if other.pool == self.pool:
            return True
        try:
            return os.path.samefile(other.pool, self.pool)
        except OSError:
            return False

    def migration_check_compatibility(self, share: Share,
                                      dest_driver: ShareDriver) -> Dict[str, Any]:
        result = super().migration_check_compatibility(share, dest_driver)
        if not isinstance(dest_driver, BtrfsDriver):
            return result
        self._check_id("share", share.id)
        if self._same_pool(dest_driver):
            raise NotSupported(f"backends {self.backend_name} and {dest_driver.backend_name} "
                               f"use the same btrfs pool {self.pool}: a share cannot migrate "
                               "within one pool")
        return {**result, "driver_assisted": not self._holds_subvolumes(share)}

    def _holds_subvolumes(self, share: Share) -> bool:
        """Whether subvolumes sit inside the share's (made on this host; a
        client cannot): a snapshot, so btrfs send, shows each as an empty
        directory, so such a share is copied file by file instead."""
        path = self._path(self._share_rel(share))
        if not _is_subvolume(path):
            return False            # migration_start says what is wrong
        out = self._run("btrfs", "subvolume", "list", "-o", path).stdout
        return bool(out.strip())

    def _migration_paths(self, share: Share, dest_share: Share,
                         dest: "BtrfsDriver") -> "_MigrationPaths":
        self._check_id("share", share.id)
        base, final = f"{share.id}.1", f"{share.id}.2"
        area = dest._path(f"{MIGRATE_DIR}/{share.id}")
        return _MigrationPaths(
            source=self._path(self._share_rel(share)),
            base=self._path(f"{MIGRATE_DIR}/{base}"),
            final=self._path(f"{MIGRATE_DIR}/{final}"),
            area=area,
            received_base=os.path.join(area, base),
            received_final=os.path.join(area, final),
            dest=dest._path(dest._share_rel(dest_share)))

    def _migration_prepare(self, share: Share, dest: "BtrfsDriver",
                           p: "_MigrationPaths") -> None:
        self._pool_mount()
        dest._pool_mount()
        if not _is_subvolume(p.source):
            raise BackendFailure(f"subvolume {p.source} of share {share.id} is missing")
        util.private_dir(self._path(MIGRATE_DIR))
        util.private_dir(dest._path(MIGRATE_DIR))
        util.private_dir(p.area)

    def migration_start(self, share: Share, dest_share: Share, dest_driver: ShareDriver,
                        progress: Any, cancel: Any) -> Dict[str, Any]:
        if not self._sends_to(dest_driver) or \
                not self.migration_check_compatibility(share, dest_driver)["driver_assisted"]:
            return super().migration_start(share, dest_share, dest_driver, progress, cancel)
        assert isinstance(dest_driver, BtrfsDriver)
        p = self._migration_paths(share, dest_share, dest_driver)
        self._migration_prepare(share, dest_driver, p)
        try:
            self._snapshot(p.source, p.base, readonly=True)
            received = transfer.btrfs_send_receive(
                p.base, p.area, progress=progress, cancel=cancel,
                expected=self._used_bytes(p.source), command_timeout=self.command_timeout)
        except Cancelled:
            self._migration_undo(self._migration_remove, share, dest_share, dest_driver, True)
            raise
        dest_driver._migration_take(dest_share, received, p.dest)
        return {"method": MIGRATION_METHOD, "base": os.path.basename(p.base),
                "source_dir": MIGRATE_DIR, "dest_dir": f"{MIGRATE_DIR}/{share.id}"}

    def migration_complete(self, share: Share, dest_share: Share, dest_driver: ShareDriver,
                           state: Dict[str, Any], progress: Any, cancel: Any) -> None:
        if not self._sends_to(dest_driver, state):
            super().migration_complete(share, dest_share, dest_driver, state, progress, cancel)
            return
        assert isinstance(dest_driver, BtrfsDriver)
        p = self._migration_paths(share, dest_share, dest_driver)
        if not _is_subvolume(p.base):
            if _is_subvolume(p.dest):
                log.info("share %s: migration to %s had finished its copy; cleaning up",
                         share.id, dest_driver.backend_name)
                self._migration_clean(p, dest_driver)
                return
            raise BackendFailure(f"share {share.id} has no migration base snapshot {p.base}: "
                                 "phase 1 did not finish; cancel the migration and start again")
        self._migration_prepare(share, dest_driver, p)
        # Always a fresh final snapshot: one an earlier attempt left may
        # predate writes made while the source was writable again.
        self._delete_subvolume(p.final)
        self._snapshot(p.source, p.final, readonly=True)
        parent: Optional[str] = p.base
        if not transfer.is_received(p.received_base, p.base):
            log.warning("share %s: the destination lacks the base snapshot; sending the "
                        "final one whole", share.id)
            parent = None
        try:
            received = transfer.btrfs_send_receive(
                p.final, p.area, parent=parent, progress=progress, cancel=cancel,
                command_timeout=self.command_timeout)
        except Cancelled:
            self._migration_undo(self._delete_subvolume, p.final)
            raise
        dest_driver._migration_take(dest_share, received, p.dest)

    def migration_cleanup(self, share: Share, dest_share: Share, dest_driver: ShareDriver,
                          state: Dict[str, Any]) -> None:
        # Out of the read-only window: each delete commits, and with quotas
        # on the next snapshot would wait for the cleaner.
        if self._sends_to(dest_driver, state):
            assert isinstance(dest_driver, BtrfsDriver)
            self._migration_clean(self._migration_paths(share, dest_share, dest_driver),
                                  dest_driver)

    def migration_cancel(self, share: Share, dest_share: Share, dest_driver: ShareDriver,
                         state: Dict[str, Any]) -> None:
        if not self._sends_to(dest_driver, state):
            super().migration_cancel(share, dest_share, dest_driver, state)
            return
        assert isinstance(dest_driver, BtrfsDriver)
        # No state: migration_start never returned (a crash in phase 1, of
        # either kind of copy), so a destination share can only be its.
        self._migration_remove(share, dest_share, dest_driver, owned=not state)

    @staticmethod
    def _migration_undo(fn: Callable[..., None], *args: Any) -> None:
        """Clean-up after a cancel: a failure is logged, the Cancelled raised
        (migration_cancel, idempotent, removes what is left)."""
        try:
            fn(*args)
        except BackendFailure as exc:
            log.error("clean-up of a cancelled migration step failed: %s", exc)

    def _used_bytes(self, path: str) -> Optional[int]:
        try:
            return self._qgroup(path).referenced
        except BackendFailure:
            return None

    def _info(self, path: str) -> "transfer.SubvolumeInfo":
        info: transfer.SubvolumeInfo = self._kernel("subvolume info of",
                                                    transfer.subvolume_info, path)
        return info

    def _migration_take(self, share: Share, received: str, path: str) -> None:
        """(On the destination.) The share's subvolume made a writable
        snapshot of received and limited to the share's size; a replay finds
        it made. Neither mounted nor exported: the engine ensures it later."""
        want = self._info(received).uuid
        if _is_subvolume(path) and self._info(path).parent_uuid != want:
            self._migration_unserve(share)
            self._delete_subvolume(path, commit=False)    # the snapshot commits it
        self._snapshot(received, path, readonly=False)
        self._set_limit(path, share.size_gib)

    def _migration_unserve(self, share: Share) -> None:
        """(On the destination.) Its mount point unmounted and removed."""
        mp = self._mount_point(share)
        if is_mounted(mp):
            try:
                self._unexport(share)
            except (BackendFailure, NotSupported) as exc:
                log.warning("share %s: cannot unexport %s: %s", share.id, mp, exc)
        self._unmount(mp)

    @staticmethod
    def _rmdir(path: str) -> None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)

    def _migration_clean(self, p: "_MigrationPaths", dest: "BtrfsDriver") -> None:
        """The snapshots and received subvolumes of a finished copy deleted,
        the base first (see the note above migration_start). Once the base
        is gone nothing may fail the step (a later step would take the
        destination as final). What stays is logged (a later migration of
        the share replaces it)."""
        try:
            self._delete_subvolume(p.base)
        except BackendFailure:
            if _is_subvolume(p.base):
                raise
        for drv, path in ((self, p.final), (dest, p.received_final), (dest, p.received_base)):
            try:
                drv._delete_subvolume(path)
            except BackendFailure as exc:
                log.warning("migration of share %s: cannot delete %s: %s; delete it by hand",
                            os.path.basename(p.area), path, exc)
        self._rmdir(p.area)

    def _migration_remove(self, share: Share, dest_share: Share, dest: "BtrfsDriver",
                          owned: bool = False) -> None:
        """Everything of the migration deleted on both sides; the source
        share untouched. The destination share is deleted only while it is
        this migration's: owned, or the base still exists (it goes last
        here), or the share is a snapshot of a received subvolume still
        there; else the migration had finished and the share is kept."""
        p = self._migration_paths(share, dest_share, dest)
        received = {self._info(r).uuid for r in (p.received_base, p.received_final)
                    if _is_subvolume(r)}
        if _is_subvolume(p.dest):
            if owned or _is_subvolume(p.base) or self._info(p.dest).parent_uuid in received:
                dest._migration_unserve(dest_share)
                dest._delete_subvolume(p.dest)
            else:
                log.warning("share %s: %s was not made by this migration (it had finished); "
                            "keeping it", share.id, p.dest)
        else:
            dest._migration_unserve(dest_share)
        dest._delete_subvolume(p.received_final)
        dest._delete_subvolume(p.received_base)
        self._rmdir(p.area)
        self._delete_subvolume(p.final)
        self._delete_subvolume(p.base)

    # --- replication -----------------------------------------------------------------
    # Each sync takes a read-only snapshot of the active share, the sync
    # point <pool>/replication/<share id>/<replica id>.<n>, and sends it into
    # the same directory of the replica's pool, incrementally from the last
    # common point (the state's "base": present on both sides, see
    # btrfs_layout.same_snapshot). The replica's subvolume then becomes a writable
    # snapshot of what arrived (swapped in as a revert swaps, so a crash
    # leaves the old or the new one), and the old point is deleted on both
    # sides. Snapshots of the share travel the same way, each placed as the
    # same snapshot in the replica's pool. After a promote the roles swap and
    # the last point, on both pools, is the base of the reverse direction.

    # What the receiving side of a sync does in a local pool (ReplicaPool).
    def _pool_info(self, path: str) -> Optional[transfer.SubvolumeInfo]:
        if not _is_subvolume(path):
            return None
        try:
            return transfer.subvolume_info(path)
        except OSError:
            return None

    def _commit(self) -> None:
        self._kernel("commit", kernel.commit, self.pool)

    def _make_dirs(self, path: str) -> None:
        self._pool_mount()
        rel = os.path.relpath(path, self.pool)
        if rel.startswith(".."):
            raise BackendFailure(f"{path} is outside the pool {self.pool}")
        done = self.pool
        for part in rel.split(os.sep):
            done = os.path.join(done, part)
            util.private_dir(done)

    def _entries(self, path: str) -> List[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def _remove_dir(self, path: str) -> None:
        self._rmdir(path)

    def replica_sync(self, share: Share, replica: Share, dest_driver: ShareDriver,
                     state: Dict[str, Any], snapshots: List[Snapshot], progress: Any,
                     cancel: Any) -> Dict[str, Any]:
        if not isinstance(dest_driver, ReplicaPool) or (
                isinstance(dest_driver, BtrfsDriver) and self._same_pool(dest_driver)):
            raise NotSupported(f"backend {self.backend_name} replicates only to another "
                               "btrfs pool")
        self._check_id("replica", replica.id)
        source = self._path(self._share_rel(share))
        if not _is_subvolume(source):
            raise BackendFailure(f"subvolume {source} of share {share.id} is missing")
        src_area = self._replication_dirs(share.id)
        dst_area = dest_driver._replication_dirs(share.id)
        base = str(state.get("base") or "")
        parent: Optional[str] = None
        if base:
            self._check_id("sync point", base)
            if same_snapshot(self._pool_info(os.path.join(src_area, base)),
                             dest_driver._pool_info(os.path.join(dst_area, base))):
                parent = os.path.join(src_area, base)
            else:
                log.warning("share %s: replica %s shares no sync point with it; sending the "
                            "share whole", share.id, replica.id)
        # 1. the snapshots the replica lacks, each sent from the newest common
        #    one (the sync point, or a snapshot sent just before)
        for snap in snapshots:
            path = self._path(self._snapshot_rel(snap))
            there = dest_driver._path(dest_driver._snapshot_rel(snap))
            if same_snapshot(self._pool_info(path), dest_driver._pool_info(there)):
                parent = parent or path               # common, if nothing newer is
                continue
            if os.path.basename(there) != os.path.basename(path):
                raise BackendFailure(f"snapshot {snap.id} would be received as "
                                     f"{os.path.basename(path)}, not at {there}")
            # Received where it belongs: a read-only subvolume cannot move to
            # another directory (its ".." would change).
            dest_driver._delete_subvolume(there)      # a stale or partial copy
            dest_driver._make_dirs(os.path.dirname(there))
            transfer.btrfs_send_receive(
                path, os.path.dirname(there), parent=parent, progress=progress, cancel=cancel,
                receive_prefix=dest_driver._receive_prefix(),
                command_timeout=self.command_timeout)
            parent = path
        # 2. a fresh sync point (one a failed attempt left predates later writes)
        n = int(state.get("n") or 0) + 1
        name = f"{replica.id}.{n}"
        point = os.path.join(src_area, name)
        self._delete_subvolume(point)
        self._snapshot(source, point, readonly=True)
        received = transfer.btrfs_send_receive(
            point, dst_area, parent=parent, progress=progress, cancel=cancel,
            expected=None if parent else self._used_bytes(source),
            receive_prefix=dest_driver._receive_prefix(), command_timeout=self.command_timeout)
        # 3. the replica's data becomes what arrived
        dest_driver._replica_take(replica, received)
        # 4. the previous point is no longer needed on either side; one
        #    commit per pool (a leftover of a power cut goes with the replica)
        for drv, area in ((self, src_area), (dest_driver, dst_area)):
            try:
                if base and base != name:
                    drv._delete_subvolume(os.path.join(area, base), commit=False)
                drv._commit()
            except BackendFailure as exc:
                log.warning("share %s: cannot delete the old sync point %s: %s",
                            share.id, base, exc)
        return {"base": name, "n": n, "provider_location": dest_driver._share_rel(replica)}

    def _replica_take(self, replica: Share, received: str) -> None:
        """(On the replica's pool.) The replica's subvolume replaced by a
        writable snapshot of received, limited to the share's size; not
        served (the engine serves a readable replica afterwards)."""
        path = self._path(self._share_rel(replica))
        new, old = path + REVERT_NEW, path + REVERT_OLD
        self._recover_revert(replica)
        self._delete_subvolume(new)
        self._snapshot(received, new, readonly=False)
        self._set_limit(new, replica.size_gib)
        self._migration_unserve(replica)
        if _is_subvolume(path):
            os.rename(path, old)
        os.rename(new, path)
        self._commit()
        self._delete_subvolume(old, commit=False)      # the sync's last commit carries it

    def replica_unserve(self, replica: Share) -> None:
        self._migration_unserve(replica)

    # --- reads --------------------------------------------------------------------
    def get_share_stats(self) -> Dict[str, Any]:
        self._pool_mount()
        st = os.statvfs(self.pool)
        return {
            "share_backend_name": getattr(self.config, "share_backend_name", "") or self.backend_name,
            "driver_name": self.driver_name,
            "driver_version": self.driver_version,
            "storage_protocol": "_".join(self.supported_protocols),
            "total_capacity_gb": st.f_blocks * st.f_frsize / GiB,
            "free_capacity_gb": st.f_bavail * st.f_frsize / GiB,
            "thin_provisioning": self.thin_provisioning,
            "pool_path": self.pool,
            **self.capabilities(),
        }

    def get_share_usage_gib(self, share: Share) -> Optional[float]:
        return self._qgroup(self._path(self._share_rel(share))).referenced / GiB

    def get_share_usages(self, shares: Sequence[Share]) -> Dict[str, float]:
        # One commit for all (accounting lags writes until one), then one
        # sysfs read per share, or one listing where there is no sysfs view.
        self._kernel("commit", kernel.commit, self.pool)
        qdir = self._qgroup_dir()
        groups = self._qgroups() if qdir is None else {}
        out: Dict[str, float] = {}
        for share in shares:
            try:
                sid = self._subvol_id(self._path(self._share_rel(share)))
                group = groups.get(sid) if qdir is None else self._qgroup_sysfs(qdir, sid)
            except (BackendFailure, OSError) as exc:
                log.debug("usage of share %s: %s", share.id, exc)
                continue
            if group is not None:
                out[share.id] = float(group.referenced)
        return out

    def get_mount_hints(self, share: Share) -> Dict[str, Any]:
        helper = self.helper_for(share)
        mp = self._mount_point(share)
        hints: Dict[str, Any] = dict(helper.mount_hints(share, mp)) if helper else {}
        if not hints.get("export"):
            locations = list(share.export_locations) or \
                (list(helper.export_locations(share, mp)) if helper else [])
            if locations:
                hints["export"] = locations[0]
        hints.setdefault("fstype", "nfs4" if share.protocol == "NFS" else share.protocol.lower())
        hints.setdefault("options", [])
        return hints

    def get_backend_info(self) -> Dict[str, Any]:
        return {"driver": self.driver_name, "version": self.driver_version,
                "pool_path": self.pool, "mount_dir": self.mount_dir}
