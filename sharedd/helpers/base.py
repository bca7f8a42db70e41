"""Export helpers: publish a mounted directory over one protocol.

A driver that stores shares as local directories (btrfs, volume) delegates
exporting and access control to the helper configured for the share's
protocol (nfs_helper, cifs_helper). A new export mechanism is one new module.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .. import constants as C
from ..constants import RULE_DENYING, RULE_QUEUED_TO_DENY
from ..errors import InvalidArgument, NotSupported
from ..models import AccessRule, Share


#: A synchronous D-Bus call over the daemon's own connection, for helpers
#: that drive a service on the bus (NFS-Ganesha): (destination, path,
#: interface, member, signature, body, timeout) -> the reply's body; an error
#: reply or a lost connection raises BusCallError. The daemon provides it;
#: without it (tools, tests) a helper runs busctl.
BusCall = Callable[[str, str, str, str, str, List[Any], float], List[Any]]


class BusCallError(Exception):
    """An error reply (name: message) or no reply at all."""


@dataclasses.dataclass(frozen=True, order=True)
class Grant:
    """What one NFS client entry gives: the level, and what becomes of the
    client's root (squash) and of squashed users (anonymous ids)."""
    level: str
    squash: str = C.SQUASH_MODES[0]
    anonuid: int = C.DEFAULT_ANON_ID
    anongid: int = C.DEFAULT_ANON_ID

    @classmethod
    def of(cls, rule: AccessRule, config: Any) -> "Grant":
        """A rule's grant; rules stored without squash get the backend's default."""
        if rule.squash:
            return cls(rule.access_level.lower(), rule.squash, rule.anonuid, rule.anongid)
        return cls(rule.access_level.lower(),
                   getattr(config, "default_squash", None) or C.SQUASH_MODES[0],
                   _int(getattr(config, "default_anonuid", None)),
                   _int(getattr(config, "default_anongid", None)))

    def priority(self) -> Tuple[bool, int, int, int]:
        """Who wins where networks overlap (lower first): rw over ro, then
        the stricter squash (root gets less)."""
        return (self.level != "rw", _STRICT_FIRST.index(self.squash), self.anonuid,
                self.anongid)

    def to_json(self) -> List[Any]:
        return [self.level, self.squash, self.anonuid, self.anongid]

    @classmethod
    def from_json(cls, value: Any) -> "Grant":
        """A helper's state file entry: [level, squash, anonuid, anongid], or a
        bare level (state written before squash existed: the safe default)."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not 1 <= len(value) <= 4:
            raise ValueError(f"bad grant {value!r}")
        grant = cls(*value)
        if grant.level not in C.ACCESS_LEVELS or grant.squash not in C.SQUASH_MODES or \
                not all(isinstance(i, int) and 0 <= i <= C.MAX_ANON_ID
                        for i in (grant.anonuid, grant.anongid)):
            raise ValueError(f"bad grant {value!r}")
        return grant


_STRICT_FIRST = ("all_squash", "root_squash", "no_root_squash")


def grants_from_json(entries: Any) -> Dict[str, Grant]:
    """A helper's saved rule set, [[client, grant], ...]; ValueError if not."""
    try:
        return {str(to): Grant.from_json(value) for to, value in entries}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable rule set: {exc}") from None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else C.DEFAULT_ANON_ID


def _stronger(new: Grant, old: Optional[Grant]) -> bool:
    """rw wins over ro when two rules name the same client."""
    return old is None or (old.level != "rw" and new.level == "rw")


def rule_map(rules: Iterable[AccessRule], key: Callable[[str], str],
             config: Any = None) -> Dict[str, Grant]:
    """The rules in force as {key(access_to): Grant}; rw wins if a key repeats."""
    out: Dict[str, Grant] = {}
    for r in rules:
        if r.state in (RULE_QUEUED_TO_DENY, RULE_DENYING):
            continue
        k = key(r.access_to)
        grant = Grant.of(r, config)
        if _stronger(grant, out.get(k)):
            out[k] = grant
    return out


def merge_access(current: Optional[Dict[str, Grant]], access_rules: List[AccessRule],
                 add_rules: List[AccessRule], delete_rules: List[AccessRule],
                 key: Callable[[str], str], config: Any = None) -> Dict[str, Grant]:
    """What an export should admit after update_access (Manila's semantics).

    No add and no delete rules: recovery, exactly access_rules. Otherwise the
    current set (access_rules if unknown) less the deletes plus the adds;
    deleting a rule never applied and re-adding one are not errors.
    """
    if not add_rules and not delete_rules:
        return rule_map(access_rules, key, config)
    wanted = dict(current) if current is not None else rule_map(access_rules, key, config)
    for r in delete_rules:
        try:
            wanted.pop(key(r.access_to), None)
        except (InvalidArgument, NotSupported):
            pass      # a rule that could never have been applied
    for r in add_rules:
        k = key(r.access_to)
        grant = Grant.of(r, config)
        if _stronger(grant, wanted.get(k)):
            wanted[k] = grant
    return wanted


class Overlay:
    """A backend's configuration with some options replaced (one share
    server's address, say): what a per-server helper reads."""

    def __init__(self, config: Any, **values: Any):
        self._config = config
        self._values = values

    def __getattr__(self, item: str) -> Any:
        if item in self._values:
            return self._values[item]
        return getattr(self._config, item)


class ExportHelper(abc.ABC):
    #: short name used in nfs_helper = / cifs_helper =
    helper_name: str = ""
    protocol: str = ""
    #: access type -> allowed levels
    access_levels: Mapping[str, tuple] = {}

    #: the helper's own options (sharedd.options.Opt), prefixed with its name
    OPTIONS: list = []
    #: can show a share's snapshots to its clients (show_snapshots)
    shows_snapshots: bool = False

    def __init__(self, config, state_dir: str, command_timeout: float = 120.0):
        """config: the backend's BackendConfig (all options, parsed);
        state_dir: a private writable dir for this helper and backend
        (<state_path>/backends/<backend>/<helper_name>, created by the engine)."""
        self.config = config
        self.state_dir = state_dir
        self.command_timeout = command_timeout
        self.bus_call: Optional[BusCall] = None   # set by the engine when the daemon has one
        # Set from the driver: its shares are parts of one file system (btrfs
        # subvolumes), so an export must not let a handle reach its siblings.
        self.isolate_subtrees = False

    def setup(self) -> None:
        """Check that the export service is reachable; create state dirs."""

    def for_server(self, server_id: str, details: Dict[str, Any]) -> "ExportHelper":
        """This helper for one share server (sharedd.service_instance details:
        its address, its export daemon's bus): same options, the server's
        address, a state directory of its own."""
        raise NotSupported(f"{self.helper_name} cannot serve share servers")

    def forget(self) -> None:
        """The server this helper served is gone: drop its state."""

    def validate_access(self, access_type: str, access_level: str) -> None:
        levels = self.access_levels.get(access_type)
        if levels is None:
            raise NotSupported(f"{self.helper_name} cannot enforce {access_type!r} rules")
        if access_level not in levels:
            raise NotSupported(f"{self.helper_name} cannot enforce {access_level!r} for "
                               f"{access_type!r} rules (allowed: {', '.join(levels)})")

    def validate_rule(self, rule: AccessRule) -> None:
        """Raise NotSupported / InvalidArgument if this exact rule cannot be
        enforced (e.g. an address form the export service cannot express)."""
        self.validate_access(rule.access_type, rule.access_level)

    @abc.abstractmethod
    def export(self, share: Share, path: str, rules: List[AccessRule]) -> List[str]:
        """Export path for share with exactly these rules; return export locations.

        Idempotent: exporting an exported share makes it match again.
        """

    @abc.abstractmethod
    def unexport(self, share: Share, path: str) -> None:
        """Remove the export. Idempotent."""

    @abc.abstractmethod
    def update_access(self, share: Share, path: str, access_rules: List[AccessRule],
                      add_rules: List[AccessRule], delete_rules: List[AccessRule]) -> None:
        """Apply access changes (recovery mode when add and delete are empty)."""

    def has_export(self, share_id: str) -> bool:
        """Does this helper hold an export of share_id (its own record of it)?"""
        return False

    def export_locations(self, share: Share, path: str) -> List[str]:
        return []

    def mount_hints(self, share: Share, path: str) -> Dict[str, object]:
        return {}

    def show_snapshots(self, share: Share, path: str, shown: Dict[str, str],
                       hidden: List[str], rules: List[AccessRule]) -> None:
        """Let the share's clients (rules, read-only) see exactly shown
        (name -> read-only mount of a snapshot), and no longer hidden."""
        raise NotImplementedError(f"{self.helper_name} cannot show snapshots")

    def close_sessions(self, share: Share) -> None:
        """Cut clients that lost access (where the protocol keeps sessions)."""
