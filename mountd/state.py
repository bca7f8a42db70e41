"""What is mounted: the kernel's view (/proc/self/mountinfo) and mountd's own
persisted record of the mounts it made (JSON, written atomically)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional

from sharedd.util import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "mounts.json"
STATE_VERSION = 1


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


@dataclasses.dataclass
class OwnMount:
    """One share mountd is responsible for (mounted, or failing to mount)."""
    share_id: str
    share_name: str
    host: str                 # sharedd host (spool subdirectory)
    mount_point: str
    export: str
    fstype: str
    level: str
    options: List[str]
    state: str                # mounted | failed
    mount_id: Optional[int] = None     # kernel identity of the mount it made
    kernel_fstype: str = ""
    kernel_source: str = ""
    error: str = ""
    failures: int = 0
    next_attempt: float = 0.0          # wall clock; retries wait until then
    created_dir: bool = False          # mountd created the mount point directory

    def owns(self, entry: Optional[MountEntry]) -> bool:
        """Is entry the very mount this record describes?"""
        return (entry is not None and self.mount_id is not None
                and entry.mount_id == self.mount_id
                and entry.mount_point == self.mount_point
                and entry.fstype == self.kernel_fstype
                and entry.source == self.kernel_source)


class StateStore:
    """mountd's persisted record of its mounts: state_path/mounts.json."""

    def __init__(self, state_path: str):
        self.state_path = state_path
        self.path = os.path.join(state_path, STATE_FILE)

    def load(self) -> Dict[str, OwnMount]:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Unreadable state must not make us forget mounts silently.
            log.error("state file %s unreadable (%s); starting with no known mounts", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.error("state file %s has an unknown format; ignoring it", self.path)
            return {}
        fields = {f.name for f in dataclasses.fields(OwnMount)}
        mounts = {}
        for item in data.get("mounts", []):
            try:
                m = OwnMount(**{k: v for k, v in item.items() if k in fields})
            except TypeError as exc:
                log.error("state file %s: skipping a bad entry: %s", self.path, exc)
                continue
            mounts[m.share_id] = m
        return mounts

    def save(self, mounts: Dict[str, OwnMount]) -> None:
        os.makedirs(self.state_path, mode=0o755, exist_ok=True)
        data = {"version": STATE_VERSION,
                "mounts": [dataclasses.asdict(m) for m in sorted(mounts.values(),
                                                                 key=lambda m: m.share_id)]}
        atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n",
                     mode=0o644)
