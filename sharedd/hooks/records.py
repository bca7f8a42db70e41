"""Build hook records (sharedd.record.SCHEMA) from engine state."""

from __future__ import annotations

import datetime
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import constants as C
from .. import record as record_schema
from ..models import AccessRule, Replica, Share, ShareGroup, ShareGroupSnapshot, ShareServer, Snapshot

log = logging.getLogger(__name__)


def rule_dict(r: AccessRule) -> Dict[str, Any]:
    out = {"id": r.id, "access_type": r.access_type, "access_to": r.access_to,
           "access_level": r.access_level, "state": r.state}
    out.update(r.options())
    return out


def _checked_hints(hints: Optional[Dict[str, Any]], what: str) -> Dict[str, Any]:
    hints = dict(hints or {})
    try:
        record_schema._check(hints, record_schema.SCHEMA["properties"]["share"]["oneOf"][1]
                             ["properties"]["mount_hints"], "mount_hints")
    except record_schema.RecordError as exc:
        # A driver bug must not poison every record: drop the hints, say why.
        log.error("%s: dropping invalid mount hints: %s", what, exc)
        hints = {}
    return hints


def snapshot_export_dict(s: Snapshot, rules: List[AccessRule],
                         hints: Dict[str, Any]) -> Dict[str, Any]:
    """A snapshot clients may mount (read-only), within its share's dict."""
    return {"id": s.id, "name": s.name, "export_locations": list(s.export_locations),
            "access_rules": [rule_dict(r) for r in rules],
            "mount_hints": _checked_hints(hints, f"snapshot {s.id}")}


def share_dict(share: Share, rules: List[AccessRule], hints: Dict[str, Any],
               status: Optional[str] = None,
               snapshots: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    hints = _checked_hints(hints, f"share {share.id}")
    out = {
        "id": share.id, "name": share.name, "backend": share.backend,
        "protocol": share.protocol, "export_locations": list(share.export_locations),
        "size_gib": share.size_gib, "status": status or share.status,
        "access_rules": [rule_dict(r) for r in rules], "mount_hints": hints,
    }
    if share.share_server_id:
        out["share_server"] = share.share_server_id
    if share.share_group_id:
        out["share_group"] = share.share_group_id
    if snapshots:
        out["snapshots"] = list(snapshots)
    return out


def snapshot_dict(s: Snapshot, status: Optional[str] = None) -> Dict[str, Any]:
    return {"id": s.id, "name": s.name, "status": status or s.status, "size_gib": s.size_gib}


def server_dict(s: ShareServer, status: Optional[str] = None) -> Dict[str, Any]:
    return {"id": s.id, "share_network": s.network_id, "status": status or s.status,
            "addresses": list(s.addresses)}


def replica_dict(r: Replica, status: Optional[str] = None) -> Dict[str, Any]:
    return {"id": r.id, "backend": r.backend, "role": r.role, "status": status or r.status,
            "state": r.state, "style": r.style, "export_locations": list(r.export_locations)}


def group_dict(g: ShareGroup, share_ids: List[str], status: Optional[str] = None) -> Dict[str, Any]:
    return {"id": g.id, "name": g.name, "status": status or g.status, "shares": list(share_ids)}


def group_snapshot_dict(gs: ShareGroupSnapshot, members: List[Snapshot],
                        status: Optional[str] = None) -> Dict[str, Any]:
    return {"id": gs.id, "name": gs.name, "share_group": gs.group_id,
            "status": status or gs.status,
            "members": [{"snapshot": s.id, "share": s.share_id} for s in members]}


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build(*, host: str, epoch: str, seq: int, phase: str, method: str, backend: str,
          share: Optional[Dict[str, Any]] = None, snapshot: Optional[Dict[str, Any]] = None,
          rules: Optional[List[AccessRule]] = None, is_allow: Optional[bool] = None,
          result: Optional[Dict[str, Any]] = None,
          shares: Optional[List[Dict[str, Any]]] = None,
          part: Tuple[int, int] = (1, 1),
          server: Optional[Dict[str, Any]] = None,
          replica: Optional[Dict[str, Any]] = None,
          server_addresses: Optional[List[str]] = None,
          group: Optional[Dict[str, Any]] = None,
          group_snapshot: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    rec: Dict[str, Any] = {
        "schema": record_schema.SCHEMA_VERSION, "host": host, "epoch": epoch, "seq": seq,
        "timestamp": timestamp(), "phase": phase, "method": method, "backend": backend,
        "share": share, "snapshot": snapshot,
        "access_rules": [rule_dict(r) for r in (rules or [])],
        "is_allow_operation": is_allow,
    }
    if result is not None:
        rec["result"] = result
    if shares is not None:
        rec["shares"] = shares
    if server is not None:
        rec["share_server"] = server
    if replica is not None:
        rec["replica"] = replica
    if group is not None:
        rec["share_group"] = group
    if group_snapshot is not None:
        rec["share_group_snapshot"] = group_snapshot
    if server_addresses:
        rec["server_addresses"] = list(server_addresses)
    if part != (1, 1):
        rec["part"], rec["parts"] = part
    return rec   # checked once, as the hooks get it (HookManager.finish)


Exports = Dict[str, List[Dict[str, Any]]]     # share id -> its snapshot_export_dicts


def periodic_parts(shares: int, rules: int, exported: int = 0, exported_rules: int = 0) -> int:
    """How many records one periodic state takes, from counts of what it
    holds (Store.periodic_counts: its seqs are taken before it is read):
    as many as its estimated size needs, at most one per share."""
    size = _size(shares, rules, exported, exported_rules)
    return max(1, min(shares, -(-size // C.PERIODIC_PART_BYTES)))


def _size(shares: int, rules: int, exported: int, exported_rules: int) -> int:
    """The estimated bytes of shares with their rules and exported
    snapshots, a generous bound (constants.PERIODIC_*_BYTES)."""
    return (C.PERIODIC_SHARE_BYTES * (shares + exported)
            + C.PERIODIC_RULE_BYTES * (rules + exported_rules))


def _cost(s: Share, rules: Dict[str, List[AccessRule]], snapshots: Optional[Exports]) -> int:
    exported = (snapshots or {}).get(s.id, ())
    return _size(1, len(rules.get(s.id, ())), len(exported),
                 sum(len(e["access_rules"]) for e in exported))


def split(shares: List[Share], rules: Dict[str, List[AccessRule]], parts: int,
          snapshots: Optional[Exports] = None) -> List[List[Share]]:
    """shares in parts runs (in order) of about equal estimated size; none
    empty while there are as many shares as parts (every part costs a seq,
    and the part count may come from an upper bound: Store.periodic_counts)."""
    target = -(-sum(_cost(s, rules, snapshots) for s in shares) // parts) if shares else 0
    out: List[List[Share]] = [[] for _ in range(parts)]
    i, size = 0, 0
    for k, s in enumerate(shares):
        cost = _cost(s, rules, snapshots)
        parts_after = parts - 1 - i
        if size and parts_after and (size + cost > target or len(shares) - k <= parts_after):
            i, size = i + 1, 0
        out[i].append(s)
        size += cost
    return out
