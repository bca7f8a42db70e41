"""Export helpers: publish a mounted directory over one protocol.

A driver that stores shares as local directories (btrfs, volume) delegates
exporting and access control to the helper configured for the share's
protocol (nfs_helper, cifs_helper). A new export mechanism is one new module.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

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


def rule_map(rules: Iterable[AccessRule], key: Callable[[str], str]) -> Dict[str, str]:
    """The rules in force as {key(access_to): level}; rw wins if a key repeats."""
    out: Dict[str, str] = {}
    for r in rules:
        if r.state in (RULE_QUEUED_TO_DENY, RULE_DENYING):
            continue
        k = key(r.access_to)
        if out.get(k) != "rw":
            out[k] = r.access_level.lower()
    return out


def merge_access(current: Optional[Dict[str, str]], access_rules: List[AccessRule],
                 add_rules: List[AccessRule], delete_rules: List[AccessRule],
                 key: Callable[[str], str]) -> Dict[str, str]:
    """What an export should admit after update_access (Manila's semantics).

    No add and no delete rules: recovery, exactly access_rules. Otherwise the
    current set (access_rules if unknown) less the deletes plus the adds;
    deleting a rule never applied and re-adding one are not errors.
    """
    if not add_rules and not delete_rules:
        return rule_map(access_rules, key)
    wanted = dict(current) if current is not None else rule_map(access_rules, key)
    for r in delete_rules:
        try:
            wanted.pop(key(r.access_to), None)
        except (InvalidArgument, NotSupported):
            pass      # a rule that could never have been applied
    for r in add_rules:
        k = key(r.access_to)
        if wanted.get(k) != "rw":
            wanted[k] = r.access_level.lower()
    return wanted


class ExportHelper(abc.ABC):
    #: short name used in nfs_helper = / cifs_helper =
    helper_name: str = ""
    protocol: str = ""
    #: access type -> allowed levels
    access_levels: Mapping[str, tuple] = {}

    #: the helper's own options (sharedd.options.Opt), prefixed with its name
    OPTIONS: list = []

    def __init__(self, config, state_dir: str, command_timeout: float = 120.0):
        """config: the backend's BackendConfig (all options, parsed);
        state_dir: a private writable dir for this helper and backend
        (<state_path>/backends/<backend>/<helper_name>, created by the engine)."""
        self.config = config
        self.state_dir = state_dir
        self.command_timeout = command_timeout
        self.bus_call: Optional[BusCall] = None   # set by the engine when the daemon has one

    def setup(self) -> None:
        """Check that the export service is reachable; create state dirs."""

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

    def export_locations(self, share: Share, path: str) -> List[str]:
        return []

    def mount_hints(self, share: Share, path: str) -> Dict[str, object]:
        return {}

    def close_sessions(self, share: Share) -> None:
        """Cut clients that lost access (where the protocol keeps sessions)."""
