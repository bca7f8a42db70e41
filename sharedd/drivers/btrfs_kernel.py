"""What the btrfs driver asks of the kernel on every operation, asked
directly: the btrfs ioctls (linux/btrfs.h) and mount(2)/umount2(2), in place
of a btrfs-progs or util-linux process per step.

Why: each process costs a few milliseconds, and the tools read the whole mount
table (libmount for mount and umount; btrfs-progs to find a path's mount), so
with 10,000 shares mounted one `mount` took tens of milliseconds. The calls
here cost the same with 10 shares or 10,000. Set-up work (mkfs, the loop
mount of the pool image, enabling quotas, listings) still uses the tools.

Every call raises OSError with the kernel's errno; the driver turns that into
its own errors. tests/test_btrfs_driver.py checks the results with
btrfs-progs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct
import uuid
from typing import Optional

#: inode number of every subvolume root (BTRFS_FIRST_FREE_OBJECTID)
SUBVOL_INO = 256

_MAGIC = 0x94


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | nr


_W, _R = 1, 2
_IOC_SYNC = _ioc(0, 8, 0)
_IOC_SUBVOL_CREATE = _ioc(_W, 14, 4096)        # struct btrfs_ioctl_vol_args
_IOC_SNAP_DESTROY = _ioc(_W, 15, 4096)
_IOC_INO_LOOKUP = _ioc(_W | _R, 18, 4096)      # struct btrfs_ioctl_ino_lookup_args
_IOC_SNAP_CREATE_V2 = _ioc(_W, 23, 4096)       # struct btrfs_ioctl_vol_args_v2
_IOC_FS_INFO = _ioc(_R, 31, 1024)              # struct btrfs_ioctl_fs_info_args
_IOC_QGROUP_LIMIT = _ioc(_R, 43, 48)           # _IOR in the header, though it writes

_VOL_NAME_MAX = 4087                           # btrfs_ioctl_vol_args.name[4088]
_V2_NAME_OFFSET = 56                           # fd, transid, flags, 4 x u64
_V2_NAME_MAX = 4039
_SUBVOL_RDONLY = 1 << 1
_QGROUP_LIMIT_MAX_RFER = 1 << 0


def _dir_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _name(name: str, limit: int) -> bytes:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..") or len(raw) > limit:
        raise OSError(22, f"{name!r} cannot name a subvolume")
    return raw


def subvolume_id(path: str) -> int:
    """The id of the subvolume whose root is path (INO_LOOKUP of the root
    inode answers the containing tree's id, unprivileged)."""
    fd = _dir_fd(path)
    try:
        args = bytearray(4096)
        struct.pack_into("=QQ", args, 0, 0, SUBVOL_INO)
        fcntl.ioctl(fd, _IOC_INO_LOOKUP, args)
        return int(struct.unpack_from("=Q", args, 0)[0])
    finally:
        os.close(fd)


def filesystem_uuid(path: str) -> str:
    """The uuid that names the file system under /sys/fs/btrfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        args = bytearray(1024)
        fcntl.ioctl(fd, _IOC_FS_INFO, args)
        return str(uuid.UUID(bytes=bytes(args[16:32])))
    finally:
        os.close(fd)


def create_subvolume(path: str) -> None:
    parent, name = os.path.split(path)
    raw = _name(name, _VOL_NAME_MAX)
    args = bytearray(4096)
    args[8:8 + len(raw)] = raw
    fd = _dir_fd(parent)
    try:
        fcntl.ioctl(fd, _IOC_SUBVOL_CREATE, args)
    finally:
        os.close(fd)


def snapshot(source: str, dest: str, readonly: bool) -> None:
    parent, name = os.path.split(dest)
    raw = _name(name, _V2_NAME_MAX)
    src = _dir_fd(source)
    try:
        args = bytearray(4096)
        struct.pack_into("=qQQ", args, 0, src, 0, _SUBVOL_RDONLY if readonly else 0)
        args[_V2_NAME_OFFSET:_V2_NAME_OFFSET + len(raw)] = raw
        fd = _dir_fd(parent)
        try:
            fcntl.ioctl(fd, _IOC_SNAP_CREATE_V2, args)
        finally:
            os.close(fd)
    finally:
        os.close(src)


def delete_subvolume(path: str, commit: bool = True) -> None:
    """Delete the subvolume at path (a read-only one too; not one with
    subvolumes inside: ENOTEMPTY) and commit, so that the deletion survives
    a power cut (without commit: the next transaction commit carries it).
    Its blocks are freed later by the cleaner."""
    parent, name = os.path.split(path)
    args = bytearray(4096)
    raw = _name(name, _VOL_NAME_MAX)
    args[8:8 + len(raw)] = raw
    fd = _dir_fd(parent)
    try:
        fcntl.ioctl(fd, _IOC_SNAP_DESTROY, args)
        if commit:
            fcntl.ioctl(fd, _IOC_SYNC)
    finally:
        os.close(fd)


def limit_referenced(path: str, nbytes: int) -> None:
    """Limit the referenced bytes of the subvolume at path (its level-0
    quota group: qgroupid 0 means the subvolume of the descriptor)."""
    fd = _dir_fd(path)
    try:
        args = bytearray(48)
        struct.pack_into("=QQQQQQ", args, 0, 0, _QGROUP_LIMIT_MAX_RFER, nbytes, 0, 0, 0)
        fcntl.ioctl(fd, _IOC_QGROUP_LIMIT, args)
    finally:
        os.close(fd)


def commit(path: str) -> None:
    """Commit the file system's current transaction (btrfs filesystem sync)."""
    fd = _dir_fd(path)
    try:
        fcntl.ioctl(fd, _IOC_SYNC)
    finally:
        os.close(fd)


_libc: Optional[ctypes.CDLL] = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = lib
    return _libc


# mount(2) flags (linux/mount.h)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
#: what a mount of share content on the storage host always carries: the
#: content is written by clients, and the host only serves it
SERVED_ONLY = MS_NOSUID | MS_NODEV | MS_NOEXEC


def mount_subvolume(device: str, subvol: str, target: str, flags: int = SERVED_ONLY) -> None:
    """mount -t btrfs -o nosuid,nodev,noexec,subvol=<subvol> <device> <target>,
    as one system call (no mount table read)."""
    data = b"subvol=" + os.fsencode(subvol)
    if b"," in data:
        raise OSError(22, f"{subvol!r} cannot be passed as a mount option")
    if _c().mount(os.fsencode(device), os.fsencode(target), b"btrfs",
                  flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {subvol} on {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    if _c().umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
