"""Where the volume driver's block devices come from.

A provider stores named volumes (one per share or snapshot) and attaches them
as block devices. The volume driver only talks to this interface, so an LVM
provider (logical volumes, lvresize, lvcreate -s) can be added beside the
loop-file one without touching the driver.

Names are plain file-name-like words. Names starting with '.' are staging
names (copies in progress, pending reverts): they never count as volumes.
"""

from __future__ import annotations

import abc
import os
import re
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import BackendFailure, InvalidArgument
from ..util import fsync_dir, run

VOLUME_NAME_RE = re.compile(r"^\.?[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
#: suffix of a copy in progress; leftovers are garbage after a crash
PART_SUFFIX = ".part"


#: seconds to wait for a detached loop device to be released by other holders
DETACH_WAIT = 10.0


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (losetup -j matches by inode too)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _holders(devices: List[str]) -> str:
    """Which mount namespaces still mount these devices (for the error message)."""
    ids = set()
    for dev in devices:
        try:
            rdev = os.stat(dev).st_rdev
        except OSError:
            continue
        ids.add(f"{os.major(rdev)}:{os.minor(rdev)}")
    found, seen = [], set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            with open(f"/proc/{pid}/mountinfo") as f:
                hits = [l.split()[4] for l in f if l.split()[2] in ids]
            if hits:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                found.append(f"mounted on {hits[0]} in the mount namespace of pid {pid} ({comm})")
        except OSError:
            continue
    return "; ".join(found)


def check_name(name: str) -> str:
    if not VOLUME_NAME_RE.fullmatch(name or "") or ".." in name:
        raise InvalidArgument(f"{name!r} is not a valid volume name")
    return name


class VolumeProvider(abc.ABC):
    provider_name = ""

    def __init__(self, pool_path: str, command_timeout: float = 120.0):
        self.pool_path = pool_path
        self.command_timeout = command_timeout

    def setup(self) -> None:
        """Prepare the pool; remove staging leftovers of interrupted copies."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def create(self, name: str, size_bytes: int) -> None:
        """Create an empty volume (idempotent: an existing one is grown to size)."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Detach and remove the volume. Idempotent."""

    @abc.abstractmethod
    def size(self, name: str) -> int: ...

    @abc.abstractmethod
    def resize(self, name: str, size_bytes: int) -> None:
        """Set the volume's size; an attached device sees the new size."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Make dst a (cheap where possible) copy of src; dst appears whole or not at all."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomically move src to dst, replacing dst."""

    @abc.abstractmethod
    def path(self, name: str) -> str:
        """Something block tools accept (file or device) while detached."""

    @abc.abstractmethod
    def attach(self, name: str) -> str:
        """Return the volume's block device, attaching it if needed. Idempotent."""

    @abc.abstractmethod
    def detach(self, name: str) -> None:
        """Detach every device of the volume. Idempotent."""

    def release_device(self, dev: str) -> None:
        """Detach dev if it is one of this pool's volumes (known only by its device)."""

    @abc.abstractmethod
    def device(self, name: str) -> Optional[str]:
        """The attached device, or None."""

    @abc.abstractmethod
    def volumes(self) -> Dict[str, int]:
        """Every (non-staging) volume -> size in bytes."""

    @abc.abstractmethod
    def capacity(self) -> Tuple[int, int]:
        """(total bytes, free bytes) of the pool."""


class LoopfileProvider(VolumeProvider):
    """Sparse image files in a directory, attached as loop devices."""

    provider_name = "loopfile"
    _attach_lock = threading.Lock()   # find-then-attach must not race

    def __init__(self, pool_path: str, command_timeout: float = 120.0):
        super().__init__(pool_path, command_timeout)
        # volume -> its loop device: every loop device is looked at once (on
        # first use), then attach and detach keep it; each use checks it
        self._known: Optional[Dict[str, str]] = None

    def _run(self, argv, **kw):
        return run(argv, timeout=self.command_timeout, **kw)

    def path(self, name: str) -> str:
        return os.path.join(self.pool_path, check_name(name))

    def setup(self) -> None:
        os.makedirs(self.pool_path, mode=0o700, exist_ok=True)
        for entry in os.listdir(self.pool_path):
            if entry.startswith(".") and entry.endswith(PART_SUFFIX):
                os.unlink(os.path.join(self.pool_path, entry))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def create(self, name: str, size_bytes: int) -> None:
        path = self.path(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size_bytes:
                os.ftruncate(fd, size_bytes)    # sparse: no blocks written
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.pool_path)

    def delete(self, name: str) -> None:
        self.detach(name)
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            return
        fsync_dir(self.pool_path)

    def size(self, name: str) -> int:
        try:
            return os.stat(self.path(name)).st_size
        except FileNotFoundError:
            raise BackendFailure(f"volume image {self.path(name)} is missing") from None

    def resize(self, name: str, size_bytes: int) -> None:
        path = self.path(name)
        os.truncate(path, size_bytes)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        dev = self.device(name)
        if dev:
            self._run(["losetup", "-c", dev])     # loop device picks up the new size

    def copy(self, src: str, dst: str) -> None:
        dst_path = self.path(dst)
        part = os.path.join(self.pool_path, "." + os.path.basename(dst_path).lstrip(".") + PART_SUFFIX)
        try:
            # reflink where the pool supports it (xfs, btrfs), else a sparse copy
            self._run(["cp", "--reflink=auto", "--sparse=always", self.path(src), part])
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.rename(part, dst_path)
        except BaseException:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(self.pool_path)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.path(src), self.path(dst))
        fsync_dir(self.pool_path)
        if self._known is not None:        # a device follows its file
            self._known.pop(dst, None)
            if src in self._known:
                self._known[dst] = self._known.pop(src)

    def _devices(self, name: str) -> List[str]:
        """Every loop device of the volume: losetup -j reads every loop
        device's status, so operations use device() (remembered) instead."""
        path = self.path(name)
        if not os.path.exists(path):
            return []
        out = self._run(["losetup", "-j", path]).stdout.decode()
        # "/dev/loop3: [2049]:1234 (/pool/x.img)" - losetup matches by inode
        return [line.split(":", 1)[0] for line in out.splitlines() if line.startswith("/dev/")]

    @staticmethod
    def _backing(loop: str) -> Optional[str]:
        """The file behind /dev/<loop> as the kernel names it (it follows
        renames), None if detached: one sysfs read."""
        try:
            with open(f"/sys/block/{loop}/loop/backing_file", encoding="utf-8",
                      errors="surrogateescape") as f:
                return f.read().rstrip("\n")
        except OSError:                 # no loop/ directory: not attached
            return None

    def _scan(self) -> Dict[str, str]:
        pool = os.path.realpath(self.pool_path)
        found: Dict[str, str] = {}
        loops = [d for d in os.listdir("/sys/block") if re.fullmatch(r"loop\d+", d)]
        for loop in sorted(loops, key=lambda d: int(d[4:])):
            backing = self._backing(loop)
            if backing is not None and os.path.dirname(backing) == pool:
                found.setdefault(os.path.basename(backing), "/dev/" + loop)
        return found

    def device(self, name: str) -> Optional[str]:
        if self._known is None:
            self._known = self._scan()
        dev = self._known.get(name)
        if dev is None:
            return None
        if self._backing(dev[len("/dev/"):]) == os.path.realpath(self.path(name)):
            return dev
        devs = self._devices(name)      # changed behind us: look the slow way, once
        if devs:
            self._known[name] = devs[0]
            return devs[0]
        self._known.pop(name, None)     # (device() also runs outside the attach lock)
        return None

    def attach(self, name: str) -> str:
        with self._attach_lock:
            dev = self.device(name)
            if dev:
                return dev
            out = self._run(["losetup", "--find", "--show", self.path(name)]).stdout.decode().strip()
            if not out.startswith("/dev/"):
                raise BackendFailure(f"losetup gave no device for {self.path(name)}: {out!r}")
            if self._known is not None:
                self._known[name] = out
            return out

    def detach(self, name: str) -> None:
        if self._known is not None:
            self._known.pop(name, None)
        # One look at every loop device (an administrator may have attached
        # the image too); after that only these devices are read, in sysfs.
        # A device that is no longer this image's by then (detached, perhaps
        # taken by another volume) is left alone.
        devs: Dict[str, str] = {}
        for dev in self._devices(name):
            back = self._backing(dev[len("/dev/"):])
            if back is not None and _same_file(back, self.path(name)):
                devs[dev] = back

        def attached() -> List[str]:
            return [dev for dev, back in devs.items()
                    if self._backing(dev[len("/dev/"):]) == back]
        for dev in devs:
            proc = self._run(["losetup", "-d", dev], check=False)
            if proc.returncode != 0 and dev in attached():
                raise BackendFailure(f"cannot detach {dev} ({self.path(name)}): "
                                     f"{proc.stderr.decode(errors='replace').strip()}")
        # A device still open elsewhere (e.g. a copy of the mount in a mount
        # namespace cloned while it was mounted) is only marked for auto-clear;
        # short-lived holders go away, others are named in the error.
        deadline = time.monotonic() + DETACH_WAIT
        while True:
            left = attached()
            if not left:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise BackendFailure(f"{', '.join(left)} ({self.path(name)}) is still in use: "
                             f"{_holders(left) or 'held open by some process'}")

    def release_device(self, dev: str) -> None:
        if not re.fullmatch(r"/dev/loop\d+", dev):
            return
        proc = self._run(["losetup", "--noheadings", "--output", "BACK-FILE", dev], check=False)
        back = proc.stdout.decode().strip()
        if proc.returncode == 0 and os.path.dirname(back) == os.path.realpath(self.pool_path):
            self.detach(os.path.basename(back))

    def volumes(self) -> Dict[str, int]:
        result = {}
        with os.scandir(self.pool_path) as it:
            for entry in it:
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                    result[entry.name] = entry.stat().st_size
        return result

    def capacity(self) -> Tuple[int, int]:
        st = os.statvfs(self.pool_path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


PROVIDERS: Dict[str, Callable[..., VolumeProvider]] = {
    "loopfile": LoopfileProvider,
}
