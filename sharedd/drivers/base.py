"""The share-driver interface, modelled on Manila's ShareDriver.

Drivers are synchronous: the engine calls them from worker threads, one
operation per share at a time, so a driver may block (with timeouts on every
external command, see util.run). Drivers never import D-Bus.

Every destructive method is idempotent (deleting what is already gone is not
an error), because start-up recovery replays interrupted operations.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import BackendFailure, NotSupported
from ..models import AccessRule, Share, ShareGroup, ShareServer, ShareUpdate, Snapshot

log = logging.getLogger(__name__)
GiB = 1 << 30


class ShareDriver(abc.ABC):
    #: short name used in share_driver = ...
    driver_name: str = ""
    driver_version: str = "1.0"
    #: protocols this driver can serve at all (the backend config narrows it)
    supported_protocols: tuple = ()
    #: access types per protocol; levels per access type
    access_types: Mapping[str, tuple] = {}
    #: True if capacity is thin-provisioned (quota based)
    thin_provisioning: bool = True
    #: True if exports go through nfs_helper / cifs_helper
    uses_export_helpers: bool = True
    #: the driver's shares are parts of one file system (btrfs subvolumes):
    #: export helpers must keep a client of one share out of the others
    shares_share_a_file_system: bool = False
    #: the driver's own options (sharedd.options.Opt), prefixed with its name
    OPTIONS: list = []

    @classmethod
    def check_config(cls, backend, src, sec_of) -> None:
        """Cross-option checks; raise ConfigError naming file, section, option.

        src(option) gives the file that set it, sec_of(option) the section.
        """

    def __init__(self, backend_name: str, config, helpers: Optional[dict] = None,
                 state_dir: str = "", command_timeout: float = 120.0):
        """config: the backend's BackendConfig (all options, parsed);
        helpers: protocol -> ExportHelper for this backend;
        state_dir: a private writable directory for this backend
        (<state_path>/backends/<name>, created by the engine);
        command_timeout: timeout for one external command (util.run)."""
        self.backend_name = backend_name
        self.config = config
        self.helpers = helpers or {}
        self.state_dir = state_dir
        self.command_timeout = command_timeout
        #: the share servers' runtime (sharedd.service_instance.ServiceInstances),
        #: given by the engine to drivers of backends that handle share servers
        self.service_instances: Any = None
        # share server id -> protocol -> that server's export helper; its address
        self._server_helpers: Dict[str, Dict[str, Any]] = {}
        self._server_addresses: Dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------
    def do_setup(self) -> None:
        """Prepare the backend (mount pools, check tools). Called once at start."""

    def check_for_setup_error(self) -> None:
        """Raise BackendFailure if the backend cannot serve."""

    # --- shares ------------------------------------------------------------
    @abc.abstractmethod
    def create_share(self, share: Share) -> ShareUpdate:
        """Create and export the share; return its export locations."""

    def create_share_from_snapshot(self, share: Share, snapshot: Snapshot,
                                   parent: Share) -> ShareUpdate:
        raise NotSupported(f"driver {self.driver_name} cannot create a share from a snapshot")

    @abc.abstractmethod
    def delete_share(self, share: Share) -> None:
        """Unexport and destroy the share. Idempotent."""

    def ensure_shares(self, shares: List[Share],
                      rules: Dict[str, List[AccessRule]]) -> Dict[str, ShareUpdate]:
        """Make every listed share available again (start-up, helper restart).

        rules maps share id -> the full rule set to apply (recovery mode).
        Returns share id -> update; a share that cannot be ensured raises
        from ensure_share and is reported by the engine as error.
        """
        return {s.id: self.ensure_share(s, rules.get(s.id, [])) for s in shares}

    def ensure_share(self, share: Share, rules: List[AccessRule]) -> ShareUpdate:
        raise NotSupported(f"driver {self.driver_name} cannot ensure shares")

    def update_access(self, share: Share, access_rules: List[AccessRule],
                      add_rules: List[AccessRule],
                      delete_rules: List[AccessRule]) -> Optional[Dict[str, str]]:
        """Apply access changes.

        With add_rules and delete_rules both empty, make the backend match
        access_rules exactly (recovery mode). Re-adding an existing rule or
        deleting one never applied is not an error. May return a mapping of
        rule id -> state ('error') for rules that could not be applied.
        """
        raise NotSupported(f"driver {self.driver_name} cannot change access")

    def validate_access(self, share: Share, access_type: str, access_level: str) -> None:
        """Raise NotSupported if this rule kind cannot be enforced for share."""
        types = self.access_types.get(share.protocol, ())
        if access_type not in types:
            raise NotSupported(
                f"{share.protocol} shares on driver {self.driver_name} do not support "
                f"access type {access_type!r} (supported: {', '.join(types) or 'none'})")
        helper = self.helpers.get(share.protocol)
        if helper is not None:
            helper.validate_access(access_type, access_level)

    def validate_rule(self, share: Share, rule: AccessRule) -> None:
        """Check the exact rule (address forms etc.) before anything changes."""
        self.validate_access(share, rule.access_type, rule.access_level)
        helper = self.helpers.get(share.protocol)
        if helper is not None:
            helper.validate_rule(rule)

    def extend_share(self, share: Share, new_size_gib: int) -> None:
        raise NotSupported(f"driver {self.driver_name} cannot extend shares")

    def shrink_share(self, share: Share, new_size_gib: int) -> None:
        raise NotSupported(f"driver {self.driver_name} cannot shrink shares")

    def manage_existing(self, share: Share, export_path: str,
                        options: Dict[str, Any]) -> ShareUpdate:
        """Take over existing storage; must set size_gib in the update."""
        raise NotSupported(f"driver {self.driver_name} cannot manage existing shares")

    def check_manage(self, export_path: str, options: Dict[str, Any]) -> Optional[str]:
        """Refuse, before anything is recorded, what manage_existing would
        refuse (outside what the backend may adopt, not the right kind of
        object, in use). Reads only; manage_existing checks again when it
        acts. Returns the provider_location the share would get, if known,
        so that the engine can refuse one another share already has."""
        return None

    def unmanage(self, share: Share) -> None:
        """Stop serving the share but keep its data."""
        raise NotSupported(f"driver {self.driver_name} cannot unmanage shares")

    # --- snapshots -------------------------------------------------------------
    def create_snapshot(self, snapshot: Snapshot, share: Share) -> Optional[str]:
        """Create the snapshot; may return its provider location."""
        raise NotSupported(f"driver {self.driver_name} does not support snapshots")

    def delete_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        raise NotSupported(f"driver {self.driver_name} does not support snapshots")

    def revert_to_snapshot(self, share: Share, snapshot: Snapshot,
                           rules: List[AccessRule]) -> ShareUpdate:
        raise NotSupported(f"driver {self.driver_name} cannot revert to snapshots")

    # --- share groups (Manila's share group methods) --------------------------------
    #: True where create_share_group_snapshot takes every member at one point
    #: in time (writes to all members paused together); False: one after another
    consistent_group_snapshots = False

    def create_share_group(self, group: ShareGroup) -> None:
        """Prepare what the backend needs for a group (nothing by default)."""

    def delete_share_group(self, group: ShareGroup) -> None:
        """Remove what create_share_group made (nothing by default)."""

    def create_share_group_snapshot(self, members: List[Tuple[Snapshot, Share]]
                                    ) -> List[Optional[str]]:
        """A snapshot of every member share; their provider locations, in
        order. By default one after another with create_snapshot; on a
        failure the ones made are removed again and the error raised."""
        made: List[Optional[str]] = []
        try:
            for snap, share in members:
                made.append(self.create_snapshot(snap, share))
        except Exception:
            for (snap, share), location in zip(members, made):
                try:
                    self.delete_snapshot(dataclasses.replace(snap, provider_location=location or ""),
                                         share)
                except Exception as exc:   # the caller leaves the group snapshot in error
                    log.error("group snapshot: cannot remove member %s again: %s", snap.id, exc)
            raise
        return made

    def delete_share_group_snapshot(self, members: List[Tuple[Snapshot, Share]]) -> None:
        """Delete every member snapshot (each idempotent)."""
        for snap, share in members:
            self.delete_snapshot(snap, share)

    def check_manage_snapshot(self, share: Share, provider_location: str) -> str:
        """Refuse, before anything is recorded, what manage_existing_snapshot
        would refuse: storage outside the share's snapshot area, not a
        snapshot of this share, in use. Reads only. Returns the location the
        snapshot would get (the engine refuses one another snapshot has)."""
        raise NotSupported(f"driver {self.driver_name} cannot manage existing snapshots")

    def manage_existing_snapshot(self, snapshot: Snapshot, share: Share,
                                 provider_location: str) -> int:
        """Adopt the snapshot at provider_location (checked again); its size
        in GiB. The data is the driver's from now on: delete_snapshot
        removes it."""
        raise NotSupported(f"driver {self.driver_name} cannot manage existing snapshots")

    def unmanage_snapshot(self, snapshot: Snapshot, share: Share) -> None:
        """Stop using the snapshot but keep its data (idempotent)."""
        raise NotSupported(f"driver {self.driver_name} cannot unmanage snapshots")

    def shows_snapshots(self, share: Share) -> bool:
        """Can the share show its snapshots to its clients (Previous
        Versions over SMB, a .snapshots directory over NFS)? Then
        update_snapshot_view follows every change. Cheap: called on the
        event loop (and, at ensure, in a worker thread for every share)."""
        return False

    def has_snapshot_view(self, share: Share) -> bool:
        """Does the share show any snapshot now (cheap: called on the event
        loop, and at ensure in a worker thread for every share)?"""
        return False

    def update_snapshot_view(self, share: Share, snapshots: List[Snapshot],
                             rules: List[AccessRule]) -> None:
        """Make the share's clients see exactly snapshots, read-only, where
        rules grant them the share (called inside the operation that changed
        them, when the visibility changes, and at ensure)."""

    def snapshot_update_access(self, snapshot: Snapshot, share: Share,
                               access_rules: List[AccessRule], add_rules: List[AccessRule],
                               delete_rules: List[AccessRule]) -> List[str]:
        """Export the snapshot, read-only, to exactly access_rules (add and
        delete say what changed; both empty: a recovery); with no rules left,
        withdraw its export. Returns its export locations ([] when withdrawn)."""
        raise NotSupported(f"driver {self.driver_name} cannot export snapshots")

    # --- migration (Manila's migration_* methods) ---------------------------------
    # Called on the source share's driver; dest_driver is the destination
    # backend's driver in this same daemon, dest_share the share as it will
    # be there (same id, the destination backend). The default is the
    # host-assisted way: an empty share made on the destination and the files
    # copied between the two shares' local mounts (sharedd.transfer.copy_tree);
    # a driver overrides it for a destination it can feed natively (btrfs
    # send/receive). Every step is idempotent: recovery replays them.
    #: progress(bytes done, bytes expected or None) and cancel (threading.Event)
    #: are the job's; a copy checks cancel and raises errors.Cancelled.

    def local_path(self, share: Share) -> Optional[str]:
        """Where the share's files are mounted on this host (None: nowhere)."""
        return None

    def migration_target(self, share: Share) -> None:
        """The share made and mounted here but not exported (idempotent): a
        migration's destination, exported only at the switch (both backends
        may export through one service, which serves a share's path once)."""
        raise NotSupported(f"driver {self.driver_name} cannot receive migrated shares")

    def migration_check_compatibility(self, share: Share, dest_driver: "ShareDriver") -> Dict[str, Any]:
        """What a migration of share to dest_driver can do; raises
        NotSupported when it cannot be done at all."""
        for drv, side in ((self, "source"), (dest_driver, "destination")):
            if type(drv).local_path is ShareDriver.local_path:
                raise NotSupported(f"the {side} driver {drv.driver_name} has no local mount of "
                                   "its shares to copy between")
        if type(dest_driver).migration_target is ShareDriver.migration_target:
            raise NotSupported(f"driver {dest_driver.driver_name} cannot receive migrated shares")
        return {"compatible": True, "writable": True, "nondisruptive": False,
                "preserve_snapshots": False, "driver_assisted": False}

    def migration_start(self, share: Share, dest_share: Share, dest_driver: "ShareDriver",
                        progress: Any, cancel: Any) -> Dict[str, Any]:
        """Phase 1, while the share serves: the destination share made and
        filled. Returns what later steps need (stored with the share)."""
        from .. import transfer   # a data mover, not needed by most calls
        dest_driver.migration_target(dest_share)
        src, dst = self._copy_paths(share, dest_share, dest_driver)
        transfer.copy_tree(src, dst, progress=progress, cancel=cancel)
        return {"method": "copy"}

    def migration_complete(self, share: Share, dest_share: Share, dest_driver: "ShareDriver",
                           state: Dict[str, Any], progress: Any, cancel: Any) -> None:
        """Phase 2, the source read-only: the last changes copied. The engine
        then exports the destination and deletes the source."""
        from .. import transfer
        src, dst = self._copy_paths(share, dest_share, dest_driver)
        transfer.copy_tree(src, dst, progress=progress, cancel=cancel)

    def migration_cleanup(self, share: Share, dest_share: Share, dest_driver: "ShareDriver",
                          state: Dict[str, Any]) -> None:
        """After the switch (the source deleted): what the copy left on
        either side removed. Idempotent."""
        return None

    def migration_cancel(self, share: Share, dest_share: Share, dest_driver: "ShareDriver",
                         state: Dict[str, Any]) -> None:
        """Undo phase 1: the destination's copy removed; the source untouched."""
        dest_driver.delete_share(dest_share)

    def _copy_paths(self, share: Share, dest_share: Share,
                    dest_driver: "ShareDriver") -> "tuple[str, str]":
        src, dst = self.local_path(share), dest_driver.local_path(dest_share)
        if not src or not dst:
            raise BackendFailure(f"share {share.id} is not mounted on both backends "
                                 f"(source {src}, destination {dst})")
        return src, dst

    # --- replication -------------------------------------------------------------
    # A replica is handled as a share of its own on its backend: the Share
    # given for it has the replica's id, backend and placement, so the share
    # methods serve it (ensure_share with read-only rules), unserve it and
    # revoke rules on it. The active copy's driver moves the data (Manila's
    # create_replica and update_replica_state); both must share a
    # replication_domain. Every step is idempotent: recovery replays them.

    #: the driver's backend can receive replicas (ReplicaPool)
    holds_replicas = False
    #: the driver serves what it holds (a readable replica, a promoted one)
    serves_exports = True

    def replica_sync(self, share: Share, replica: Share, dest_driver: "ShareDriver",
                     state: Dict[str, Any], snapshots: List[Snapshot], progress: Any,
                     cancel: Any) -> Dict[str, Any]:
        """Bring the replica on dest_driver up to the share's data as it is
        now, carrying the share's snapshots it lacks (oldest first) as the
        same snapshots there. state: what the last sync returned ({} at the
        first); returns the new one (its "provider_location", if any, is
        the replica's placement). Used the other way round after a promote."""
        raise NotSupported(f"driver {self.driver_name} cannot replicate shares")

    def replica_unserve(self, replica: Share) -> None:
        """(On the replica's backend.) Not exported, not mounted; data kept."""
        self.unmanage(replica)

    def replica_remove(self, share: Share, replica: Share, state: Dict[str, Any],
                       snapshots: List[Snapshot], source: Optional["ShareDriver"]) -> None:
        """(On the replica's backend.) The replica's data, its copies of the
        snapshots and its sync state deleted; source, the active copy's
        driver if usable, drops its side of the sync state."""
        raise NotSupported(f"driver {self.driver_name} cannot replicate shares")

    # --- share servers (driver_handles_share_servers) ---------------------------
    # The Generic driver's shape: a server per share network, with its own
    # export daemons. Here a network namespace (sharedd.service_instance);
    # the driver's export helpers work unchanged, one instance per server.
    def get_network_allocations_number(self) -> int:
        """Addresses one share server takes from its network."""
        return 1

    def setup_server(self, server: ShareServer, network_info: Any) -> Dict[str, Any]:
        """Make the server (idempotent); return its details (stored with it)."""
        details = self._instances().setup(self._serving(network_info))
        self._attach(server.id, details)
        return details

    def ensure_server(self, server: ShareServer, network_info: Any) -> Dict[str, Any]:
        """After a restart: the server's namespace and daemons back, its
        helpers ready. Its shares are ensured afterwards."""
        # setup() is idempotent: it recreates what is missing and adopts the
        # daemons still running; every share is ensured (re-exported) next.
        details = self._instances().setup(self._serving(network_info))
        self._attach(server.id, details)
        return details

    def _serving(self, network_info: Any) -> Any:
        """network_info with the protocols this driver has export helpers for
        (the server runs their daemons: ganesha for NFS, smbd for CIFS)."""
        return dataclasses.replace(network_info, protocols=tuple(sorted(self.helpers)))

    def teardown_server(self, server: ShareServer) -> None:
        """Remove the server: daemons, namespace, addresses, files. Idempotent."""
        helpers = self._server_helpers.pop(server.id, {})
        self._server_addresses.pop(server.id, None)
        self._instances().teardown(server.id)
        for helper in helpers.values():
            helper.forget()

    @classmethod
    def can_serve_share_servers(cls) -> bool:
        """Its own setup_server, or export helpers run per server."""
        return cls.uses_export_helpers or cls.setup_server is not ShareDriver.setup_server

    def serves_share_servers(self) -> bool:
        if type(self).setup_server is not ShareDriver.setup_server:
            return True
        return self.uses_export_helpers and self.service_instances is not None

    def _instances(self) -> Any:
        if self.service_instances is None or not self.uses_export_helpers:
            raise NotSupported(f"driver {self.driver_name} cannot handle share servers")
        return self.service_instances

    def _attach(self, server_id: str, details: Dict[str, Any]) -> None:
        helpers = {proto: helper.for_server(server_id, details)
                   for proto, helper in self.helpers.items()}
        for helper in helpers.values():
            helper.setup()
        self._server_helpers[server_id] = helpers
        self._server_addresses[server_id] = str(details["address"])

    def helper_for(self, share: Share) -> Optional[Any]:
        """The export helper serving share: its share server's, if it has one."""
        if share.share_server_id:
            helpers = self._server_helpers.get(share.share_server_id)
            if helpers is None:
                raise BackendFailure(f"share server {share.share_server_id} of share {share.id} "
                                     "is not running")
            return helpers.get(share.protocol)
        return self.helpers.get(share.protocol)

    def _helper(self, share: Share) -> Any:
        helper = self.helper_for(share)
        if helper is None:
            raise BackendFailure(f"backend {self.backend_name} has no export helper "
                                 f"for {share.protocol}")
        return helper

    # --- reads ---------------------------------------------------------------
    @abc.abstractmethod
    def get_share_stats(self) -> Dict[str, Any]:
        """Capacity figures: total_capacity_gb, free_capacity_gb (floats)."""

    def get_share_usage_gib(self, share: Share) -> Optional[float]:
        """Space the share uses now, if the driver can tell."""
        return None

    def get_share_usages(self, shares: Sequence[Share]) -> Dict[str, float]:
        """Bytes each share uses now, for those the driver can tell (the
        metrics' periodic read, in a worker thread)."""
        out: Dict[str, float] = {}
        for share in shares:
            try:
                gib = self.get_share_usage_gib(share)
            except BackendFailure as exc:
                log.debug("usage of share %s: %s", share.id, exc)
                continue
            if gib is not None:
                out[share.id] = gib * GiB
        return out

    def get_mount_hints(self, share: Share) -> Dict[str, Any]:
        """What a client needs to mount the share (no secrets).

        Keys: fstype, export, options (list of str), and driver extras.
        Called on the event loop for every hook record: computed from the
        share and the configuration only, never by I/O or a command.
        """
        return {}

    def served_addresses(self) -> List[str]:
        """Addresses clients mount this backend's exports from; signed
        records declare them, and mountd mounts no export named elsewhere."""
        ip = str(getattr(self.config, "share_export_ip", "") or "")
        return ([ip] if ip else []) + sorted(set(self._server_addresses.values()))

    def get_periodic_hook_data(self, shares: List[Share]) -> Dict[str, Dict[str, Any]]:
        """share id -> extra data for the periodic hook (mount hints by default)."""
        return {s.id: self.get_mount_hints(s) for s in shares}

    def get_backend_info(self) -> Dict[str, Any]:
        """Data whose change means shares must be ensured again."""
        return {"driver": self.driver_name, "version": self.driver_version}

    # --- the directory share mounts live in ----------------------------------------
    def prepare_mount_dir(self, path: str) -> None:
        """Make the directory of the share mounts: 0700, or 0711 where the
        backend serves CIFS (smbd opens a share as the connecting user, who
        must traverse to it). NFS share roots are world-writable (squashed
        clients write as the anonymous user): on a backend serving both, a
        local user who names an NFS share's directory reaches it, so say so."""
        protocols = set(self.helpers)       # one export helper per protocol served
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o711 if "CIFS" in protocols else 0o700)
        if "CIFS" in protocols and "NFS" in protocols:
            log.warning("backend %s serves NFS and CIFS: its mount directory %s must be "
                        "traversable for smbd's users, so local users of this host who know "
                        "an NFS share's id can reach that share; serve NFS and CIFS from "
                        "separate backends where local users are not trusted",
                        self.backend_name, path)

    # --- capabilities -------------------------------------------------------------
    def _implements(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(ShareDriver, method)

    def capabilities(self) -> Dict[str, bool]:
        return {
            "snapshot_support": self._implements("create_snapshot"),
            "create_share_from_snapshot_support":
                self._implements("create_share_from_snapshot"),
            "revert_to_snapshot_support": self._implements("revert_to_snapshot"),
            "shrink_support": self._implements("shrink_share"),
            "extend_support": self._implements("extend_share"),
            "manage_support": self._implements("manage_existing"),
            "manage_snapshot_support": self._implements("manage_existing_snapshot"),
            "mount_snapshot_support": self._implements("snapshot_update_access"),
            "share_group_snapshot_support": self._implements("create_snapshot"),
            "consistent_group_snapshot_support": bool(self.consistent_group_snapshots)
            and self._implements("create_snapshot"),
            "share_server_support": self.serves_share_servers(),
            "replication_support": self._implements("replica_sync") or self.holds_replicas,
        }
