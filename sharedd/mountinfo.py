"""The kernel's mount table (/proc/self/mountinfo), parsed once for both
daemons: sharedd's drivers and mountd's reconciler read it the same way.

With thousands of shares the table has thousands of lines, so the questions
an operation asks about one path are answered without reading it: the mount a
path lies on is the ``mnt_id`` of an O_PATH descriptor (/proc/self/fdinfo),
and a path is a mount point exactly when that differs from its parent's. The
table is read only to describe a mount that is there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 space, \\011 tab, \\012, \\134)."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and len(raw) >= i + 4 and all(48 <= c <= 55 for c in raw[i + 1:i + 4]):
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    mount_options: Tuple[str, ...]    # per mount point (ro/rw, nosuid, nodev ...)
    fstype: str
    source: str
    super_options: Tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options or "ro" in self.super_options


def parse_mountinfo(text: str) -> List[MountEntry]:
    """Entries in kernel order (a later entry at a mount point is on top)."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        try:
            entries.append(MountEntry(
                mount_id=int(fields[0]), parent_id=int(fields[1]),
                root=_unescape(fields[3]), mount_point=_unescape(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=_unescape(fields[sep + 1]), source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else ()))
        except ValueError:
            continue
    return entries


def read_mountinfo(path: str = "/proc/self/mountinfo") -> List[MountEntry]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def top_mounts(entries: List[MountEntry]) -> Dict[str, MountEntry]:
    """Mount point -> the entry visible there (the last one mounted)."""
    top: Dict[str, MountEntry] = {}
    for e in entries:
        top[e.mount_point] = e
    return top


def mount_id(path: str) -> Optional[int]:
    """Id of the mount that path (not followed if a symlink) lies on; None
    if path does not exist."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise OSError(f"no mnt_id in /proc/self/fdinfo for {path}")


def mounted_id(path: str) -> Optional[int]:
    """The id of the mount at exactly path (after resolving symlinks), if any."""
    real = os.path.realpath(path)
    mine = mount_id(real)
    if mine is None:
        return None
    if real == "/" or mine != mount_id(os.path.dirname(real)):
        return mine
    return None


def is_mounted(path: str) -> bool:
    """Whether a mount sits at exactly path (after resolving symlinks)."""
    return mounted_id(path) is not None


def mounted_device(path: str) -> Optional[str]:
    """The block device (/dev/<name>) of the mount at exactly path, None if
    nothing is mounted there. Without reading the mount table when the
    mount's device number is a block device the kernel names in sysfs (a
    loop device, a disk); else the table's source (e.g. for tmpfs)."""
    if not is_mounted(path):
        return None
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent",
                  encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.split("=", 1)[1].strip()
    except OSError:
        pass
    entry = mount_at(path)
    return entry.source if entry else None


def mount_at(path: str) -> Optional[MountEntry]:
    """The mount visible at exactly path (after resolving symlinks), if any.
    Reads the table only when something is mounted there. (Entries are not
    cached: mount ids and anonymous device numbers are both reused, so no
    cheap key tells a new mount from an old one.)"""
    if not is_mounted(path):
        return None
    return top_mounts(read_mountinfo()).get(os.path.realpath(path))
