"""The kernel's mount table (/proc/self/mountinfo), parsed once for both
daemons: sharedd's drivers and mountd's reconciler read it the same way."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional


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
    mount_options: tuple      # per mount point (ro/rw, nosuid, nodev ...)
    fstype: str
    source: str
    super_options: tuple

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


def mount_at(path: str) -> Optional[MountEntry]:
    """The mount visible at exactly path (after resolving symlinks), if any."""
    return top_mounts(read_mountinfo()).get(os.path.realpath(path))


def is_mounted(path: str) -> bool:
    return mount_at(path) is not None
