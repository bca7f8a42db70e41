"""What is mounted: the kernel's view (/proc/self/mountinfo) and mountd's own
persisted record of the mounts it made (JSON, written atomically)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional, Set

from sharedd.mountinfo import MountEntry, parse_mountinfo, read_mountinfo, top_mounts  # noqa: F401 (re-exported)
from sharedd.util import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "mounts.json"
STATE_VERSION = 1


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
        # errnos already logged since the last save that worked
        self._failing: Set[Optional[int]] = set()

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

    def save(self, mounts: Dict[str, OwnMount]) -> bool:
        """Write the record; False if the state directory refused it.

        A full or read-only state directory must not stop mounting (the
        kernel's table still shows the mounts), nor flood the log on every
        pass: one error line per errno until a save works again."""
        data = {"version": STATE_VERSION,
                "mounts": [dataclasses.asdict(m) for m in sorted(mounts.values(),
                                                                 key=lambda m: m.share_id)]}
        try:
            os.makedirs(self.state_path, mode=0o755, exist_ok=True)
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n",
                         mode=0o644)
        except OSError as exc:
            if exc.errno not in self._failing:
                self._failing.add(exc.errno)
                log.error("cannot save mount state to %s: %s (logged once; mounts go on, "
                          "the record is written once saving works again)",
                          self.path, exc.strerror or exc)
            return False
        if self._failing:
            self._failing.clear()
            log.info("saving mount state to %s works again", self.path)
        return True
