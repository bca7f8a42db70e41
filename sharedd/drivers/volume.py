"""The volume driver: one block volume with its own file system per share.

Each share is a volume from a provider (default: a sparse image file
<volume_pool_path>/<share id>.img on a loop device) formatted ext4 or xfs,
mounted on <volume_mount_dir>/<share id> and exported by the backend's
NFS/CIFS helper. Sizes are hard (thick) limits: the file system is the size
of the share.

Crash safety: every method can be replayed. Copies (snapshots, clones,
reverts) are built under staging names starting with '.' and renamed into
place only when complete (file system UUID already reset); a complete
pending revert ('.<image>.revert') is finished by ensure_share, incomplete
staging files are removed.

The last rule set applied to each share is kept in
<state_dir>/access/<share id>.json, because shrinking must unexport and
re-export the share and shrink_share is not given the rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from ..errors import BackendFailure, ConfigError, InvalidArgument, NotSupported
from ..models import AccessRule, Share, ShareUpdate, Snapshot
from ..options import Opt
from ..mountinfo import is_mounted, mounted_device, read_mountinfo, top_mounts
from ..util import atomic_write, run
from .base import ShareDriver
from .volume_providers import PROVIDERS, VOLUME_NAME_RE, VolumeProvider

log = logging.getLogger(__name__)

GiB = 1 << 30
FS_TYPES = ("ext4", "xfs")
REVERT_SUFFIX = ".revert"
NEW_SUFFIX = ".new"       # staging copy whose UUID is being reset


class VolumeDriver(ShareDriver):
    driver_name = "volume"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    uses_export_helpers = True
    thin_provisioning = False

    OPTIONS = [
        Opt("volume_pool_path", "path", "", required=True,
            help="Directory holding the volume images (one sparse image file per share and snapshot)."),
        Opt("volume_fs_type", "str", "ext4", choices=FS_TYPES,
            help="File system made on new share volumes: ext4 or xfs (xfs cannot shrink)."),
        Opt("volume_mount_dir", "path", "",
            help="Where share volumes are mounted (default: <state_path>/backends/<backend>/mounts). "
                 "For CIFS user access it and its parents must be traversable (mode 0711 or wider). "
                 "Unless it is a mount point already, it is bind-mounted on itself and made "
                 "shared, so mounts and unmounts reach other mount namespaces."),
        Opt("volume_provider", "str", "loopfile", choices=tuple(PROVIDERS),
            help="Volume provider: loopfile (image files on loop devices)."),
    ]

    @classmethod
    def check_config(cls, backend, src, sec_of) -> None:
        pool = backend.volume_pool_path
        mdir = backend.volume_mount_dir
        if mdir and (mdir == pool or mdir.startswith(pool.rstrip("/") + "/")):
            raise ConfigError(f"{src('volume_mount_dir')}: [{sec_of('volume_mount_dir')}] volume_mount_dir: "
                              "must not be inside volume_pool_path")

    def __init__(self, backend_name: str, config, helpers: Optional[dict] = None,
                 state_dir: str = "", command_timeout: float = 120.0):
        super().__init__(backend_name, config, helpers, state_dir, command_timeout)
        self.pool_path: str = config.volume_pool_path
        self.fs_type: str = getattr(config, "volume_fs_type", "ext4") or "ext4"
        self.mount_dir: str = (getattr(config, "volume_mount_dir", "")
                               or os.path.join(state_dir, "mounts"))
        provider = getattr(config, "volume_provider", "loopfile") or "loopfile"
        self.provider: VolumeProvider = PROVIDERS[provider](self.pool_path, command_timeout)
        self.access_dir = os.path.join(state_dir, "access")
        self.work_dir = os.path.join(state_dir, "work")   # temporary mount points

    # --- small tools ---------------------------------------------------------
    def _run(self, argv, **kw):
        return run(argv, timeout=self.command_timeout, **kw)

    @staticmethod
    def _image(share: Share) -> str:
        return share.provider_location or f"{share.id}.img"

    @staticmethod
    def _snap_image(snapshot: Snapshot) -> str:
        return snapshot.provider_location or f"snap-{snapshot.id}.img"

    def _mountpoint(self, share: Share) -> str:
        return os.path.join(self.mount_dir, share.id)

    def local_path(self, share: Share) -> Optional[str]:
        return self._mountpoint(share)

    def _blkid(self, path: str, tag: str) -> str:
        # -p: probe the device itself, not blkid's cache (stale after copies)
        proc = self._run(["blkid", "-p", "-o", "value", "-s", tag, path], check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else ""

    def _fs_of(self, share: Share) -> str:
        fs = share.driver_data.get("fs_type") if share.driver_data else None
        if fs in FS_TYPES:
            return fs
        fs = self._blkid(self.provider.path(self._image(share)), "TYPE")
        return fs if fs in FS_TYPES else self.fs_type

    def _mkfs(self, path: str, fs: str) -> None:
        if fs == "ext4":
            # -m 0: the share's owner gets all of its size
            self._run(["mkfs.ext4", "-q", "-F", "-m", "0", path])
        else:
            self._run(["mkfs.xfs", "-q", "-f", path])

    def _fsck(self, path: str) -> None:
        proc = self._run(["e2fsck", "-f", "-y", path], check=False)
        if proc.returncode > 2:       # 0 clean, 1/2 errors corrected
            raise BackendFailure(f"e2fsck -f -y {path} failed (exit {proc.returncode}): "
                                 f"{(proc.stdout + proc.stderr).decode(errors='replace').strip()[-400:]}")

    def _fresh_uuid(self, name: str, fs: str) -> None:
        """Give a detached copy its own file-system UUID (mountable beside its origin)."""
        path = self.provider.path(name)
        old = self._blkid(path, "UUID")
        if fs == "ext4":
            self._fsck(path)
            self._run(["tune2fs", "-U", "random", path])
        else:
            # A copy of a live xfs has a log to replay; xfs_admin refuses (yet
            # exits 0) until a mount has replayed it.
            dev = self.provider.attach(name)
            tmp = os.path.join(self.work_dir, name.lstrip("."))
            os.makedirs(tmp, exist_ok=True)
            try:
                self._run(["mount", "-t", "xfs", "-o", "nouuid,nosuid,nodev,noexec", dev, tmp])
                self._run(["umount", tmp])
                self._run(["xfs_admin", "-U", "generate", dev])
            finally:
                if is_mounted(tmp):
                    self._run(["umount", tmp], check=False)
                os.rmdir(tmp)
                self.provider.detach(name)
        new = self._blkid(path, "UUID")
        if not new or new == old:
            raise BackendFailure(f"could not give {path} a new file-system UUID")

    def _mount(self, share: Share) -> str:
        """Attach and mount the share's volume; returns the device. Idempotent."""
        name = self._image(share)
        if not self.provider.exists(name):
            raise BackendFailure(f"volume {self.provider.path(name)} of share {share.name} is missing")
        dev = self.provider.attach(name)
        mp = self._mountpoint(share)
        if not os.path.isdir(mp):
            # mode 0: while nothing is mounted, no user can put files here
            os.makedirs(mp, mode=0o000)
            os.chmod(mp, 0o000)
        src = mounted_device(mp)
        if src == dev:
            return dev
        if src is not None:           # a stale mount (e.g. from before a crash)
            self._umount(mp)
        self._run(["mount", "-t", self._fs_of(share), "-o", "nodev,nosuid,noexec", dev, mp])
        return dev

    def _umount(self, mp: str) -> None:
        for attempt in range(5):
            if not is_mounted(mp):
                return
            proc = self._run(["umount", mp], check=False)
            if proc.returncode == 0:
                continue
            time.sleep(0.2 * (attempt + 1))
        if is_mounted(mp):
            raise BackendFailure(f"cannot unmount {mp}: {proc.stderr.decode(errors='replace').strip()}")

    def _stop(self, share: Share, unexport: bool = True) -> None:
        """Unexport (before unmounting: servers keep the path busy), unmount, detach."""
        mp = self._mountpoint(share)
        if unexport:
            helper = self.helper_for(share)
            if helper is not None:
                helper.unexport(share, mp)
        src = mounted_device(mp)
        if src is not None:
            self._run(["fsfreeze", "-u", mp], check=False)   # never leave it frozen
        self._umount(mp)
        if self.provider.exists(self._image(share)):
            self.provider.detach(self._image(share))
        if src is not None:
            # e.g. a managed image whose name was never recorded (crash mid-manage)
            self.provider.release_device(src)

    def _grow_fs(self, share: Share, dev: str) -> None:
        """Grow the mounted file system to its device (online). Idempotent."""
        if self._fs_of(share) != "ext4":
            self._run(["xfs_growfs", self._mountpoint(share)])
            return
        proc = self._run(["resize2fs", dev], check=False)
        if proc.returncode == 0:
            return
        err = proc.stderr.decode(errors="replace")
        if "Permission denied" not in err:
            raise BackendFailure(f"resize2fs {dev} failed: {err.strip()[-400:]}")
        # Online ext4 resizing needs CAP_SYS_RESOURCE; without it grow offline.
        log.warning("online resize of %s refused (no CAP_SYS_RESOURCE?); growing offline", dev)
        rules = self._saved_rules(share)
        self._stop(share)
        try:
            self._grow_offline(share, self._fs_of(share))
        finally:
            self._mount(share)
            self._export(share, rules)

    def _grow_offline(self, share_or_name, fs: str) -> None:
        """Grow a detached ext4 volume's file system to the volume (xfs grows only mounted)."""
        if fs != "ext4":
            return
        name = share_or_name if isinstance(share_or_name, str) else self._image(share_or_name)
        path = self.provider.path(name)
        self._fsck(path)
        self._run(["resize2fs", path])

    def _export(self, share: Share, rules: List[AccessRule]) -> List[str]:
        locations = self._helper(share).export(share, self._mountpoint(share), rules)
        self._save_rules(share, rules)
        return locations

    def _usage_bytes(self, share: Share) -> int:
        st = os.statvfs(self._mountpoint(share))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    # --- the rule record (for re-exports that are not given rules) --------------
    def _rules_file(self, share: Share) -> str:
        return os.path.join(self.access_dir, f"{share.id}.json")

    def _save_rules(self, share: Share, rules: List[AccessRule]) -> None:
        os.makedirs(self.access_dir, mode=0o700, exist_ok=True)
        atomic_write(self._rules_file(share),
                     json.dumps([dataclasses.asdict(r) for r in rules]).encode(), 0o600)

    def _saved_rules(self, share: Share) -> List[AccessRule]:
        try:
            with open(self._rules_file(share)) as f:
                return [AccessRule(**r) for r in json.load(f)]
        except FileNotFoundError:
            log.warning("no recorded access rules for share %s; re-exporting without rules "
                        "until the next ensure", share.id)
            return []

    def _forget_rules(self, share: Share) -> None:
        try:
            os.unlink(self._rules_file(share))
        except FileNotFoundError:
            pass

    # --- lifecycle --------------------------------------------------------------
    def do_setup(self) -> None:
        self.provider.setup()
        self.prepare_mount_dir(self.mount_dir)
        mdir = os.path.realpath(self.mount_dir)
        if not is_mounted(mdir):
            # A shared mount point: mounts and unmounts below it reach mount
            # namespaces cloned from ours (sandboxed servers, ip netns exec).
            # Otherwise an unmount here leaves their copy holding the device.
            self._run(["mount", "--bind", mdir, mdir])
            self._run(["mount", "--make-shared", mdir])
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        # Staging copies whose UUID reset was interrupted are garbage.
        for entry in os.listdir(self.pool_path):
            if entry.startswith(".") and entry.endswith(NEW_SUFFIX):
                self.provider.delete(entry)

    def check_for_setup_error(self) -> None:
        import shutil
        tools = ["losetup", "blkid", "mount", "umount", "cp", "fsfreeze",
                 "mkfs.ext4", "e2fsck", "resize2fs", "tune2fs", "dumpe2fs", "mkfs.xfs", "xfs_growfs", "xfs_admin"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise BackendFailure(f"volume driver: missing tools: {', '.join(missing)}")
        if not os.path.isdir(self.pool_path) or not os.access(self.pool_path, os.W_OK):
            raise BackendFailure(f"volume_pool_path {self.pool_path} is not a writable directory")

    # --- shares -----------------------------------------------------------------
    @contextlib.contextmanager
    def _new_volume(self, share: Share, name: str):
        """On failure, stop and delete the volume if this call created it
        (a replayed create keeps what was there); the original error stands."""
        created = not self.provider.exists(name)
        try:
            yield
        except BaseException:
            if created:
                try:
                    self._stop(share)
                    self.provider.delete(name)
                except Exception:
                    log.exception("rollback of share %s failed", share.id)
            raise

    def create_share(self, share: Share) -> ShareUpdate:
        name = self._image(share)
        with self._new_volume(share, name):
            fs = self._make_volume(share)
            locations = self._export(share, [])
        return ShareUpdate(export_locations=locations, provider_location=name,
                           size_gib=share.size_gib, driver_data={"fs_type": fs})

    def migration_target(self, share: Share) -> None:
        with self._new_volume(share, self._image(share)):
            self._make_volume(share)

    def _make_volume(self, share: Share) -> str:
        """The share's volume made (or found: a replay), formatted and
        mounted; returns its file system type."""
        name = self._image(share)
        self.provider.create(name, share.size_gib * GiB)
        path = self.provider.path(name)
        # Never format a volume that already has a file system (replay).
        if not self._blkid(path, "TYPE"):
            self._mkfs(path, self.fs_type)
        fs = self._blkid(path, "TYPE")
        self._mount(share)
        if share.protocol == "NFS":
            # Clients' root is squashed by default: the anonymous user
            # must be able to write (Manila's Generic driver does the same).
            os.chmod(self._mountpoint(share), 0o777)
        return fs

    def delete_share(self, share: Share) -> None:
        name = self._image(share)
        self._stop(share)
        for staging in ("." + name + REVERT_SUFFIX + NEW_SUFFIX, "." + name + REVERT_SUFFIX,
                        "." + name + NEW_SUFFIX):
            self.provider.delete(staging)
        self.provider.delete(name)
        mp = self._mountpoint(share)
        if os.path.isdir(mp):
            os.rmdir(mp)
        self._forget_rules(share)

    def ensure_share(self, share: Share, rules: List[AccessRule]) -> ShareUpdate:
        self._finish_revert(share)
        self._mount(share)
        self._run(["fsfreeze", "-u", self._mountpoint(share)], check=False)  # a crash mid-snapshot
        return ShareUpdate(export_locations=self._export(share, rules))

    def update_access(self, share: Share, access_rules: List[AccessRule],
                      add_rules: List[AccessRule],
                      delete_rules: List[AccessRule]) -> Optional[Dict[str, str]]:
        self._mount(share)   # never let a server publish the bare mount-point directory
        self._helper(share).update_access(share, self._mountpoint(share), access_rules,
                                          add_rules, delete_rules)
        gone = {r.id for r in delete_rules}
        effective = {r.id: r for r in access_rules if r.id not in gone}
        for r in add_rules:
            effective.setdefault(r.id, r)
        self._save_rules(share, list(effective.values()))
        return None

    def extend_share(self, share: Share, new_size_gib: int) -> None:
        name = self._image(share)
        if self.provider.size(name) < new_size_gib * GiB:
            self.provider.resize(name, new_size_gib * GiB)   # losetup -c if attached
        dev = self._mount(share)
        self._grow_fs(share, dev)

    def shrink_share(self, share: Share, new_size_gib: int) -> None:
        fs = self._fs_of(share)
        if fs == "xfs":
            raise NotSupported(f"share {share.name} is on xfs, which cannot shrink")
        name = self._image(share)
        new_bytes = new_size_gib * GiB
        current = self.provider.size(name)
        dev = self._mount(share)
        if current == new_bytes:           # replay after the image was cut
            self._export(share, self._saved_rules(share))
            return
        if current < new_bytes:
            raise InvalidArgument(f"share {share.name} is {current / GiB:.2f} GiB; "
                                  f"{new_size_gib} GiB is not smaller")
        used = self._usage_bytes(share)
        if used >= new_bytes:
            raise InvalidArgument(f"share {share.name} uses {used / GiB:.2f} GiB; "
                                  f"cannot shrink it to {new_size_gib} GiB")
        minimum = self._ext4_min_bytes(dev)
        if minimum > new_bytes:
            raise InvalidArgument(f"share {share.name} uses {used / GiB:.2f} GiB and its file system "
                                  f"needs at least {minimum / GiB:.2f} GiB; cannot shrink it to "
                                  f"{new_size_gib} GiB")
        rules = self._saved_rules(share)
        self._stop(share)                  # ext4 shrinks only offline
        try:
            dev = self.provider.attach(name)
            self._fsck(dev)
            self._run(["resize2fs", dev, f"{new_size_gib}G"])
            if self._ext4_size_bytes(dev) > new_bytes:
                raise BackendFailure(f"resize2fs left {dev} larger than {new_size_gib} GiB")
        except BaseException:
            self._mount(share)             # roll back: serve it at the old size
            self._export(share, rules)
            raise
        self.provider.detach(name)
        self.provider.resize(name, new_bytes)
        self._mount(share)
        self._export(share, rules)

    def _ext4_min_bytes(self, dev: str) -> int:
        out = self._run(["resize2fs", "-P", dev]).stdout.decode()
        m = re.search(r"minimum size of the filesystem:\s*(\d+)", out)
        if not m:
            raise BackendFailure(f"resize2fs -P {dev}: unexpected output {out.strip()!r}")
        return int(m.group(1)) * self._ext4_block_size(dev)

    def _dumpe2fs(self, dev: str) -> Dict[str, str]:
        out = self._run(["dumpe2fs", "-h", dev]).stdout.decode(errors="replace")
        return {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in out.splitlines()) if v}

    def _ext4_block_size(self, dev: str) -> int:
        return int(self._dumpe2fs(dev)["Block size"])

    def _ext4_size_bytes(self, dev: str) -> int:
        info = self._dumpe2fs(dev)
        return int(info["Block count"]) * int(info["Block size"])

    # --- manage / unmanage ---------------------------------------------------------
    def check_manage(self, export_path: str, options: Dict[str, Any]) -> Optional[str]:
        return self._managed_image(None, export_path)[0]

    def manage_existing(self, share: Share, export_path: str,
                        options: Dict[str, Any]) -> ShareUpdate:
        name, fs = self._managed_image(share, export_path)
        share = dataclasses.replace(share, provider_location=name,
                                    driver_data=dict(share.driver_data or {}, fs_type=fs))
        size_gib = max(1, math.ceil(self.provider.size(name) / GiB))
        self._mount(share)
        locations = self._export(share, [])
        return ShareUpdate(export_locations=locations, provider_location=name,
                           size_gib=size_gib, driver_data={"fs_type": fs})

    def _managed_image(self, share: Optional[Share], export_path: str) -> Tuple[str, str]:
        """(image name, file-system type) of an image that may be managed."""
        path = export_path if os.path.isabs(export_path) else os.path.join(self.pool_path, export_path)
        name = os.path.basename(path)
        if ".." in export_path.split("/") or os.path.realpath(os.path.dirname(path)) != os.path.realpath(self.pool_path) \
                or not VOLUME_NAME_RE.fullmatch(name) or name.startswith(".") or ".." in name:
            raise InvalidArgument(f"{export_path!r} is not an image file directly inside "
                                  f"the pool {self.pool_path}")
        if name.startswith("snap-"):
            raise InvalidArgument(f"{export_path!r} is a snapshot image, not a share")
        if os.path.islink(path) or not os.path.isfile(path):
            raise InvalidArgument(f"{export_path!r} is not an existing regular file")
        fs = self._blkid(path, "TYPE")
        if fs not in FS_TYPES:
            raise InvalidArgument(f"{export_path!r} holds {fs or 'no'} file system "
                                  f"(supported: {', '.join(FS_TYPES)})")
        dev = self.provider.device(name)
        own = os.path.realpath(self._mountpoint(share)) if share is not None else None
        if dev and any(e.source == dev and mp != own
                       for mp, e in top_mounts(read_mountinfo()).items()):
            raise InvalidArgument(f"{export_path!r} is in use (mounted elsewhere)")
        return name, fs

    def unmanage(self, share: Share) -> None:
        self._stop(share)
        mp = self._mountpoint(share)
        if os.path.isdir(mp):
            os.rmdir(mp)
        self._forget_rules(share)

    # --- snapshots -----------------------------------------------------------------
    def _copy_with_new_uuid(self, src: str, dst: str, fs: str) -> None:
        """dst = copy of src with its own file-system UUID; appears only when done."""
        if self.provider.exists(dst):
            return
        staging = "." + dst.lstrip(".") + NEW_SUFFIX
        self.provider.delete(staging)
        self.provider.copy(src, staging)
        self._fresh_uuid(staging, fs)
        self.provider.rename(staging, dst)

    def create_snapshot(self, snapshot: Snapshot, share: Share) -> Optional[str]:
        snap = self._snap_image(snapshot)
        if self.provider.exists(snap):
            return snap
        fs = self._fs_of(share)
        mp = self._mountpoint(share)
        staging = "." + snap + NEW_SUFFIX
        self.provider.delete(staging)
        if is_mounted(mp):
            # freeze: the copy sees a consistent, flushed file system
            self._run(["fsfreeze", "-f", mp])
            try:
                self.provider.copy(self._image(share), staging)
            finally:
                self._run(["fsfreeze", "-u", mp])
        else:
            self.provider.copy(self._image(share), staging)
        self._fresh_uuid(staging, fs)
        self.provider.rename(staging, snap)
        return snap

    def delete_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        snap = self._snap_image(snapshot)
        self.provider.delete("." + snap + NEW_SUFFIX)
        self.provider.delete(snap)

    # Every member's file system is frozen before the first copy and thawed
    # after the last: the member snapshots show one point in time.
    consistent_group_snapshots = True

    def create_share_group_snapshot(self, members: List[Tuple[Snapshot, Share]]
                                    ) -> List[Optional[str]]:
        names = [self._snap_image(snap) for snap, _ in members]
        frozen: List[str] = []
        try:
            for (snap, share), name in zip(members, names):
                self.provider.delete("." + name + NEW_SUFFIX)
            for _, share in members:
                mp = self._mountpoint(share)
                if is_mounted(mp):
                    self._run(["fsfreeze", "-f", mp])
                    frozen.append(mp)
            for (snap, share), name in zip(members, names):
                self.provider.copy(self._image(share), "." + name + NEW_SUFFIX)
        except Exception:
            for name in names:
                self.provider.delete("." + name + NEW_SUFFIX)
            raise
        finally:
            for mp in frozen:
                self._run(["fsfreeze", "-u", mp], check=False)   # never leave one frozen
        for (snap, share), name in zip(members, names):
            staging = "." + name + NEW_SUFFIX
            self._fresh_uuid(staging, self._fs_of(share))
            self.provider.rename(staging, name)
        return list(names)

    def check_manage_snapshot(self, share: Share, provider_location: str) -> str:
        """A snapshot image (snap-*.img) directly inside the pool, holding
        the share's file-system type, not attached or mounted."""
        path = provider_location if os.path.isabs(provider_location) \
            else os.path.join(self.pool_path, provider_location)
        name = os.path.basename(path)
        if ".." in provider_location.split("/") or "\x00" in provider_location \
                or os.path.realpath(os.path.dirname(path)) != os.path.realpath(self.pool_path) \
                or not VOLUME_NAME_RE.fullmatch(name) or not name.startswith("snap-"):
            raise InvalidArgument(f"{provider_location!r} is not a snapshot image (snap-*.img) "
                                  f"directly inside the pool {self.pool_path}")
        if os.path.islink(path) or not os.path.isfile(path):
            raise InvalidArgument(f"{provider_location!r} is not an existing regular file")
        fs, want = self._blkid(path, "TYPE"), self._fs_of(share)
        if fs != want:
            raise InvalidArgument(f"{provider_location!r} holds {fs or 'no'} file system; share "
                                  f"{share.name} is {want}")
        if self.provider.device(name):
            raise InvalidArgument(f"{provider_location!r} is in use (attached to a device)")
        return name

    def manage_existing_snapshot(self, snapshot: Snapshot, share: Share,
                                 provider_location: str) -> int:
        name = self.check_manage_snapshot(share, provider_location)
        return max(1, math.ceil(self.provider.size(name) / GiB))

    def unmanage_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        return None   # a snapshot image is not served: it stays as it is

    def create_share_from_snapshot(self, share: Share, snapshot: Snapshot,
                                   parent: Share) -> ShareUpdate:
        snap = self._snap_image(snapshot)
        if not self.provider.exists(snap):
            raise BackendFailure(f"snapshot image {self.provider.path(snap)} is missing")
        if share.size_gib * GiB < self.provider.size(snap):
            raise InvalidArgument(f"share size {share.size_gib} GiB is smaller than the "
                                  f"snapshot ({snapshot.size_gib} GiB)")
        fs = self._fs_of(parent)
        name = f"{share.id}.img"
        share = dataclasses.replace(share, provider_location=name,
                                    driver_data=dict(share.driver_data or {}, fs_type=fs))
        with self._new_volume(share, name):
            self._copy_with_new_uuid(snap, name, fs)
            if self.provider.size(name) < share.size_gib * GiB:
                self.provider.resize(name, share.size_gib * GiB)
                self._grow_offline(name, fs)
            dev = self._mount(share)
            self._grow_fs(share, dev)
            locations = self._export(share, [])
        return ShareUpdate(export_locations=locations, provider_location=name,
                           size_gib=share.size_gib, driver_data={"fs_type": fs})

    def _finish_revert(self, share: Share) -> bool:
        """Swap in a complete pending revert copy; drop an incomplete one."""
        name = self._image(share)
        pending = "." + name + REVERT_SUFFIX
        self.provider.delete(pending + NEW_SUFFIX)
        if not self.provider.exists(pending):
            return False
        self._stop(share)
        self.provider.rename(pending, name)
        return True

    def revert_to_snapshot(self, share: Share, snapshot: Snapshot,
                           rules: List[AccessRule]) -> ShareUpdate:
        snap = self._snap_image(snapshot)
        if not self.provider.exists(snap):
            raise BackendFailure(f"snapshot image {self.provider.path(snap)} is missing")
        name = self._image(share)
        fs = self._fs_of(share)
        pending = "." + name + REVERT_SUFFIX
        # 1. complete copy under a staging name (the share keeps serving)
        self._copy_with_new_uuid(snap, pending, fs)
        if self.provider.size(pending) < share.size_gib * GiB:
            self.provider.resize(pending, share.size_gib * GiB)   # keep the extended size
            self._grow_offline(pending, fs)
        # 2. swap by rename: a crash leaves either the old image or the new one
        self._finish_revert(share)
        # 3. serve again
        dev = self._mount(share)
        self._grow_fs(share, dev)
        locations = self._export(share, rules)
        size_gib = max(1, math.ceil(self.provider.size(name) / GiB))
        return ShareUpdate(export_locations=locations, size_gib=size_gib)

    # --- reads -----------------------------------------------------------------------
    def get_share_stats(self) -> Dict[str, Any]:
        total, free = self.provider.capacity()
        provisioned = sum(self.provider.volumes().values())
        # Images are sparse: what they may still grow into is committed space.
        committed_free = max(0, min(free, total - provisioned))
        stats = {
            "share_backend_name": getattr(self.config, "share_backend_name", self.backend_name),
            "driver_name": self.driver_name,
            "volume_provider": self.provider.provider_name,
            "volume_fs_type": self.fs_type,
            "total_capacity_gb": round(total / GiB, 3),
            "free_capacity_gb": round(committed_free / GiB, 3),
            "provisioned_capacity_gb": round(provisioned / GiB, 3),
            "thin_provisioning": False,
        }
        stats.update(self.capabilities())
        return stats

    def get_share_usage_gib(self, share: Share) -> Optional[float]:
        if not is_mounted(self._mountpoint(share)):
            return None
        return self._usage_bytes(share) / GiB

    def get_mount_hints(self, share: Share) -> Dict[str, Any]:
        helper = self.helper_for(share)
        return helper.mount_hints(share, self._mountpoint(share)) if helper else {}
