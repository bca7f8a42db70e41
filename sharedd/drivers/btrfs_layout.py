"""Where a btrfs pool keeps shares, snapshots and sync points, and what a
replica sync asks of the pool that receives it.

A pool holds <pool>/shares/<share id> (a subvolume each),
<pool>/snapshots/<snapshot id> (read-only subvolumes) and, for replication,
<pool>/replication/<share id>/<sync point> (read-only subvolumes, the last
one common to both sides of a replica). `BtrfsLayout` is that layout; a
class that holds replicas (`ReplicaPool`: the local btrfs driver, or the one
of a pool on another host reached over ssh) adds the few subvolume
operations a sync needs on the receiving side, and removes a replica the
same way wherever its pool is.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence

from ..errors import InvalidArgument
from ..models import Share, Snapshot
from ..transfer import SubvolumeInfo

log = logging.getLogger(__name__)

SHARES_DIR = "shares"
SNAPSHOTS_DIR = "snapshots"
REVERT_NEW = ".revert-new"
REVERT_OLD = ".revert-old"
REPLICATION_DIR = "replication"

# Ids become path components and mount point names.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def same_snapshot(a: Optional[SubvolumeInfo], b: Optional[SubvolumeInfo]) -> bool:
    """Whether two subvolumes (of two pools) are read-only copies of one
    snapshot, so that either can be the parent of an incremental send to the
    other's pool: one was received from the other (either way round: a send
    from a received subvolume carries the original's uuid, and btrfs receive
    finds the original by its own uuid), or both from a third."""
    return (a is not None and b is not None and a.readonly and b.readonly
            and a.stream_uuid == b.stream_uuid != "")


class BtrfsLayout:
    pool: str

    def _path(self, rel: str) -> str:
        return os.path.join(self.pool, rel)

    @staticmethod
    def _check_id(kind: str, value: str) -> None:
        if not _ID_RE.fullmatch(value or "") or value.endswith((REVERT_NEW, REVERT_OLD)):
            raise InvalidArgument(f"{kind} id {value!r} cannot be used as a path component")

    @staticmethod
    def _check_rel(rel: str) -> str:
        norm = os.path.normpath(rel)
        if (not rel or os.path.isabs(rel) or norm in (".", "..")
                or norm.startswith("../") or "\x00" in rel or "," in rel):
            raise InvalidArgument(f"{rel!r} is not a path inside the pool")
        return norm

    def _share_rel(self, share: Share) -> str:
        if share.provider_location:
            return self._check_rel(share.provider_location)
        self._check_id("share", share.id)
        return f"{SHARES_DIR}/{share.id}"

    def _snapshot_rel(self, snapshot: Snapshot) -> str:
        if snapshot.provider_location:
            return self._check_rel(snapshot.provider_location)
        self._check_id("snapshot", snapshot.id)
        return f"{SNAPSHOTS_DIR}/{snapshot.id}"

    def _replication_area(self, share_id: str) -> str:
        self._check_id("share", share_id)
        return self._path(f"{REPLICATION_DIR}/{share_id}")


class ReplicaPool(BtrfsLayout):
    """A pool that can receive replicas. Its subclass says how each
    operation is done there (here with the kernel, or over ssh)."""

    holds_replicas = True

    def _pool_info(self, path: str) -> Optional[SubvolumeInfo]:
        """The subvolume at path (None: nothing complete is there)."""
        raise NotImplementedError

    def _delete_subvolume(self, path: str, commit: bool = True) -> None:
        """Delete the subvolume (gone is fine); commit=False: the pool's next
        commit (_commit) carries it."""
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _make_dirs(self, path: str) -> None:
        """path and its parents, private to root."""
        raise NotImplementedError

    def _entries(self, path: str) -> List[str]:
        """The names in directory path ([] if it is not there)."""
        raise NotImplementedError

    def _remove_dir(self, path: str) -> None:
        """Remove the directory if empty; a failure is only logged."""
        raise NotImplementedError

    def _receive_prefix(self) -> Sequence[str]:
        """What btrfs receive (and transfer's checks) run behind."""
        return ()

    def _replica_take(self, replica: Share, received: str) -> None:
        """The replica's subvolume replaced by a writable snapshot of
        received (a crash leaves the old or the new one)."""
        raise NotImplementedError

    def replica_unserve(self, replica: Share) -> None:
        raise NotImplementedError

    def _replication_dirs(self, share_id: str) -> str:
        area = self._replication_area(share_id)
        self._make_dirs(area)
        return area

    def replica_remove(self, share: Share, replica: Share, state: Dict[str, Any],
                       snapshots: List[Snapshot], source: Optional[Any]) -> None:
        self._check_id("replica", replica.id)
        self.replica_unserve(replica)
        path = self._path(self._share_rel(replica))
        for suffix in (REVERT_NEW, REVERT_OLD, ""):
            self._delete_subvolume(path + suffix)
        for snap in snapshots:
            self._delete_subvolume(self._path(self._snapshot_rel(snap)))
        base = str(state.get("base") or "")
        for side in [self] + ([source] if isinstance(source, ReplicaPool) else []):
            area = side._replication_area(share.id)
            for entry in side._entries(area):
                if entry == base or entry.startswith(f"{replica.id}."):
                    side._delete_subvolume(os.path.join(area, entry))
            side._remove_dir(area)
