"""Export helpers: publish a mounted directory over one protocol.

A driver that stores shares as local directories (btrfs, volume) delegates
exporting and access control to the helper configured for the share's
protocol (nfs_helper, cifs_helper). A new export mechanism is one new module.
"""

from __future__ import annotations

import abc
from typing import Dict, List, Mapping

from ..errors import NotSupported
from ..models import AccessRule, Share


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
