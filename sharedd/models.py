"""Plain data objects passed between the store, the engine, drivers and hooks."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple


@dataclasses.dataclass
class AccessRule:
    id: str
    share_id: str
    access_type: str      # ip | user | cert
    access_to: str        # canonical form (see validation.py)
    access_level: str     # rw | ro
    state: str
    created_at: int = 0   # µs since epoch
    # NFS only (ip rules): what the server makes of the client's root; ""
    # for other protocols and for rules stored before squash existed (the
    # backend's default_squash applies to those).
    squash: str = ""
    anonuid: int = 65534
    anongid: int = 65534

    def as_tuple(self) -> Tuple[str, str, str, str, str]:
        return (self.id, self.access_type, self.access_to,
                self.access_level, self.state)

    def options(self) -> Dict[str, Any]:
        """The rule's options as AllowAccess takes them (none when not NFS)."""
        if not self.squash:
            return {}
        return {"squash": self.squash, "anonuid": self.anonuid, "anongid": self.anongid}


@dataclasses.dataclass
class Share:
    id: str
    name: str
    backend: str
    protocol: str
    size_gib: int
    status: str
    created_at: int = 0
    description: str = ""
    metadata: Dict[str, str] = dataclasses.field(default_factory=dict)
    export_locations: List[str] = dataclasses.field(default_factory=list)
    # Driver-private location (e.g. the subvolume path); opaque to the engine.
    provider_location: str = ""
    # Snapshot this share was created from, if any.
    snapshot_id: Optional[str] = None
    # Extra driver state persisted for the driver (JSON-able).
    driver_data: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # The share server that exports it (backends that handle share servers).
    share_server_id: Optional[str] = None
    # The share group it belongs to, if any.
    share_group_id: Optional[str] = None


@dataclasses.dataclass
class Snapshot:
    id: str
    name: str
    share_id: str
    size_gib: int
    status: str
    created_at: int = 0
    provider_location: str = ""
    # the share group snapshot this snapshot is a member of
    group_snapshot_id: Optional[str] = None
    # where clients granted access mount it (read-only), while it has rules
    export_locations: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ShareGroup:
    """Shares snapshotted together; all on one backend."""
    id: str
    name: str
    backend: str
    status: str
    created_at: int = 0
    # the group snapshot its shares were made from, if any
    source_group_snapshot_id: Optional[str] = None


@dataclasses.dataclass
class ShareGroupSnapshot:
    """One snapshot of every member share, taken together; the members are
    the snapshots whose group_snapshot_id is this one's id."""
    id: str
    name: str
    group_id: str
    status: str
    created_at: int = 0


@dataclasses.dataclass
class Replica:
    """One copy of a replicated share on one backend. The share row holds
    the active copy's placement; the active's replica row its identity."""
    id: str
    share_id: str
    backend: str
    role: str               # active | replica
    status: str             # creating | available | deleting | error
    state: str              # in_sync | out_of_sync | error
    style: str              # dr | readable
    last_sync: int = 0      # µs since epoch of the last completed sync
    created_at: int = 0
    export_locations: List[str] = dataclasses.field(default_factory=list)
    provider_location: str = ""
    # The driver's sync state (for btrfs: the last common snapshot).
    driver_data: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ShareNetwork:
    """A tenant's network, defined by the administrator: where share servers
    attach (a bridge, or a VLAN of a parent interface) and which addresses
    they may take."""
    id: str
    name: str
    subnet: str                                   # CIDR
    attachment: Dict[str, Any]                    # {"bridge": s} or {"parent": s, "vlan": n}
    allocation_range: str                         # "first-last" (inclusive)
    gateway: str = ""
    mtu: int = 0
    created_at: int = 0


@dataclasses.dataclass
class ShareServer:
    """One share network's server on one backend: a network namespace with
    its own export daemons, made with the first share and removed with the
    last."""
    id: str
    network_id: str
    backend: str
    status: str
    addresses: List[str] = dataclasses.field(default_factory=list)
    created_at: int = 0
    # What setup_server returned (namespace, daemons): the driver's own.
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ShareUpdate:
    """What a driver reports back after acting on a share."""
    export_locations: Optional[List[str]] = None
    provider_location: Optional[str] = None
    size_gib: Optional[int] = None
    driver_data: Optional[Dict[str, Any]] = None


def fields_of(update: Optional[ShareUpdate]) -> Dict[str, Any]:
    """A driver's ShareUpdate as the share fields it sets."""
    if update is None:
        return {}
    out: Dict[str, Any] = {}
    if update.export_locations is not None:
        out["export_locations"] = list(update.export_locations)
    if update.provider_location is not None:
        out["provider_location"] = update.provider_location
    if update.size_gib is not None:
        out["size_gib"] = int(update.size_gib)
    if update.driver_data is not None:
        out["driver_data"] = dict(update.driver_data)
    return out


def snapshot_as_share(snapshot: Snapshot, share: Share) -> Share:
    """A snapshot as the share's export helper serves it (mountable
    snapshots): an export of its own, named by the snapshot's id, with the
    share's protocol and share server."""
    return dataclasses.replace(share, id=snapshot.id, name=f"{share.name}@{snapshot.name}",
                               export_locations=list(snapshot.export_locations))
