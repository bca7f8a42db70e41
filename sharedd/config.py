"""sharedd.conf: loading, drop-ins and validation.

[DEFAULT] holds the daemon-wide options below; any backend option set there
is the default for every backend section (as in Manila). Files are read in
order: the main file, then sharedd.conf.d/*.conf sorted by name; later files
override earlier ones. Every problem names the file, section and option.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from typing import Any, Dict, List

import netaddr

from . import constants as C
from . import validation
from .errors import ConfigError, InvalidArgument
from .metrics import options as metrics_options
from .options import Opt, config_files, parse_options, read_ini, unknown
from .record import HOST_ID
from .signing import default_key_path

DEFAULT_CONFIG = "/etc/sharedd/sharedd.conf"
SECTION_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")   # also an object path element

GLOBAL_OPTIONS: List[Opt] = [
    Opt("enabled_share_backends", "list", required=True,
        help="Backend sections to serve, in order; the first is the default for CreateShare."),
    Opt("state_path", "path", "/var/lib/sharedd", help="State directory (SQLite database, export files, share mounts)."),
    Opt("spool_dir", "path", "/var/spool/sharedd", help="Spool directory for hook records."),
    Opt("host_id", "str", "", help="Name of this storage host in hook records (default: the host name)."),
    Opt("spool_export_clients", "list", [],
        help="Export the spool read-only over NFS to these client addresses or networks "
             "(CIDR), through the NFS helper of the first backend serving NFS; clients mount "
             "it with mountd's spool_source (its location: the Manager's SpoolExport "
             "property). Empty: not exported."),
    Opt("record_signing_key", "path", "",
        help="Ed25519 private key (PEM, root, 0600) that signs every hook record; made at "
             "first start if missing (default: record-signing.key beside the main "
             "configuration file). Clients trust its public key: sharedd --print-public-key."),
    Opt("share_server_launcher", "str", "auto", choices=("auto", "systemd", "child"),
        help="How share servers' daemons run: systemd (instances of the template units "
             "sharedd-server-bus@, sharedd-server-nfs@ and sharedd-server-smb@, started "
             "over systemd's D-Bus API), child (children sharedd supervises), auto "
             "(systemd when it is PID 1 and the units are installed)."),
    Opt("share_server_run_dir", "path", "/run/sharedd/servers",
        help="Volatile files of share servers (private bus sockets, pid files); the "
             "template units read /run/sharedd/servers."),
    Opt("log_level", "str", "info", choices=("debug", "info", "warning", "error"), help="Log level."),
    Opt("command_timeout", "float", 120.0, min=1, help="Timeout for one external command, seconds."),
    Opt("stats_refresh_interval", "float", 60.0, min=1, help="How often backend Stats are refreshed, seconds."),
    Opt("authorization", "str", "auto", choices=("auto", "polkit", "group"),
        help="Who may change things (reading is for everyone): polkit decides per call "
             "(actions org.sharedd.Sharedd1.*; the shipped rules grant admin_group the "
             "manage actions), group lets root and members of admin_group, auto uses polkit "
             "where it is installed and group elsewhere. Root may always."),
    Opt("admin_group", "str", "sharedd",
        help="The group whose members may change things without polkit, and whom the "
             "shipped polkit rules grant the manage actions."),
    *metrics_options("sharedd.prom"),
    Opt("metrics_usage_interval", "float", 300.0, min=0,
        help="Seconds between two reads of the space every share uses, for the metrics "
             "(a driver read per share; 0: never)."),
    Opt("spool_retention_seconds", "int", 86400, min=0,
        help="Spool records older than this are pruned (0: keep by age forever); the newest periodic record of every backend is always kept."),
    Opt("spool_retention_count", "int", 10000, min=0,
        help="Keep at most this many spool records per host (0: no limit)."),
    Opt("max_access_rules_per_share", "int", C.MAX_ACCESS_RULES_PER_SHARE, min=1,
        max=C.MAX_ACCESS_RULES_PER_SHARE,
        help="Access rules one share may have; AllowAccess beyond it is refused (CapacityExceeded)."),
    Opt("max_metadata_entries", "int", C.MAX_METADATA_ENTRIES, min=0, max=C.MAX_METADATA_ENTRIES,
        help="Metadata entries one share may have."),
    Opt("max_description_length", "int", C.MAX_DESCRIPTION_LENGTH, min=0,
        max=C.MAX_DESCRIPTION_LENGTH, help="Characters a share's description may have."),
]

BACKEND_OPTIONS: List[Opt] = [
    Opt("share_driver", "str", required=True, help="Driver: btrfs, btrfs_remote (replicas only), volume or glusterfs_native."),
    Opt("share_backend_name", "str", "", help="Backend name reported in Stats (default: the section name)."),
    Opt("share_export_ip", "ip", "", help="Address clients use to reach exports."),
    Opt("enabled_share_protocols", "list", ["NFS"], help="Protocols this backend serves (NFS, CIFS, GLUSTERFS)."),
    Opt("nfs_helper", "str", "ganesha", help="NFS export helper: ganesha or kernel."),
    Opt("cifs_helper", "str", "samba", help="CIFS export helper: samba."),
    Opt("reserved_share_percentage", "float", 0.0, min=0, max=100,
        help="Percentage of total capacity kept free of new shares."),
    Opt("max_over_subscription_ratio", "float", 20.0, min=1,
        help="Thin provisioning: provisioned capacity may reach total times this ratio."),
    Opt("default_squash", "str", "root_squash", choices=C.SQUASH_MODES,
        help="What NFS access rules make of a client's root when AllowAccess names no "
             "squash option: root_squash (the anonymous uid), all_squash (every uid) or "
             "no_root_squash (root stays root: only for clients you administer). "
             "Applies to rules allowed afterwards."),
    Opt("default_anonuid", "int", C.DEFAULT_ANON_ID, min=0, max=C.MAX_ANON_ID,
        help="The uid squashed NFS users become, when AllowAccess names no anonuid."),
    Opt("default_anongid", "int", C.DEFAULT_ANON_ID, min=0, max=C.MAX_ANON_ID,
        help="The gid squashed NFS users become, when AllowAccess names no anongid."),
    Opt("hook_drivers", "list", [], help="Hook drivers: spool, dbus, or module:Class."),
    Opt("enable_pre_hooks", "bool", False, help="Run pre hooks."),
    Opt("enable_post_hooks", "bool", False, help="Run post hooks."),
    Opt("enable_periodic_hooks", "bool", False, help="Run periodic hooks."),
    Opt("suppress_pre_hooks_errors", "bool", False, help="Log pre-hook errors and go on instead of failing the call."),
    Opt("suppress_post_hooks_errors", "bool", False, help="Log post-hook errors instead of reporting them."),
    Opt("periodic_hooks_interval", "float", 300.0, min=1, help="Seconds between periodic hooks."),
    Opt("driver_handles_share_servers", "bool", False,
        help="Serve every share network from a share server of its own: a network namespace "
             "on the network's bridge or VLAN with its own NFS-Ganesha, made with the "
             "network's first share on this backend and removed with its last. CreateShare "
             "then needs the share_network option. Drivers with export helpers (btrfs, "
             "volume); NFS through nfs_helper = ganesha, CIFS through cifs_helper = samba "
             "(the server's own smbd, registry and passdb)."),
    Opt("replication_domain", "str", "",
        help="Backends with the same non-empty replication domain can hold replicas of each "
             "other's shares (CreateReplica); empty: this backend takes part in no "
             "replication."),
    Opt("replication_interval", "float", 300.0, min=1,
        help="Seconds between two syncs of a replica of this backend's shares (incremental); "
             "a replica whose last sync is older than twice this is out_of_sync."),
    Opt("share_server_idle_seconds", "float", 0.0, min=0,
        help="Keep a share server this long after its last share is gone (0: remove it at "
             "once), so that a network's next share does not wait for a new server."),
    Opt("snapshot_schedule", "str", "",
        help="When every share of this backend gets a scheduled snapshot (named "
             "auto-YYYYMMDDTHHMMSSZ), unless the share sets its own: an interval (15min, 4h, "
             "1d) or a calendar expression as systemd-analyze calendar reads it (daily, "
             "Mon..Fri *-*-* 08:00, *:0/15, with UTC at the end for UTC). Empty: none."),
    Opt("snapshot_visibility", "str", "auto", choices=("auto",) + C.SNAPSHOT_VISIBILITIES,
        help="Whether clients see the snapshots of this backend's shares, unless a share "
             "says: as Previous Versions over SMB, in a read-only .snapshots directory over "
             "NFS (NFS-Ganesha), where the driver can show them (btrfs). auto: CIFS shares "
             "show them, NFS shares do not."),
    Opt("snapshot_retention", "str", "",
        help="Which scheduled snapshots are kept, unless the share sets its own: a count "
             "(the N newest), an age (7d: those younger), or both (3, 7d: either keeps one). "
             "Empty: all are kept. Snapshots in use are never pruned."),
]


@dataclasses.dataclass
class BackendConfig:
    name: str
    values: Dict[str, Any]

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["values"][item]
        except KeyError:
            raise AttributeError(item) from None


@dataclasses.dataclass
class Config:
    files: List[str]
    values: Dict[str, Any]
    backends: Dict[str, BackendConfig]   # in enabled_share_backends order
    # sections not in enabled_share_backends: checked as strictly, not served
    unlisted: List[str] = dataclasses.field(default_factory=list)

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["values"][item]
        except KeyError:
            raise AttributeError(item) from None


def _extra_options(section_values: Dict[str, str], section: str, src) -> List[Opt]:
    """Options declared by the driver, the helpers it uses, and the hooks."""
    from . import drivers, helpers
    from .hooks import HOOK_OPTIONS
    driver = section_values["share_driver"].strip()
    try:
        cls = drivers.driver_class(driver)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{src('share_driver')}: [{section}] share_driver: {driver!r} is neither "
                          f"one of {', '.join(sorted(drivers.DRIVERS))} nor an importable "
                          "module:Class") from None
    opts = list(getattr(cls, "OPTIONS", []))
    if getattr(cls, "uses_export_helpers", False):
        for registry, key, default in ((helpers.NFS_HELPERS, "nfs_helper", "ganesha"),
                                       (helpers.CIFS_HELPERS, "cifs_helper", "samba")):
            spec = registry.get(section_values.get(key, default).strip())
            if spec:
                try:
                    opts += getattr(drivers.load_class(spec), "OPTIONS", [])
                except ImportError:
                    pass  # reported by _check_backend when the protocol is enabled
    return opts + list(HOOK_OPTIONS)


def load(path: str = DEFAULT_CONFIG) -> Config:
    files = config_files(path)
    merged, origin = read_ini(files)

    def where(section: str, key: str) -> str:
        return origin.get((section, key), files[0])

    default = merged.get("DEFAULT", {})
    global_names = {o.name for o in GLOBAL_OPTIONS}
    # Unknown [DEFAULT] options are checked below, against backend options too.
    values = parse_options(GLOBAL_OPTIONS, default,
                           lambda key: f"{where('DEFAULT', key)}: [DEFAULT] {key}", check_unknown=())
    if not values["host_id"]:
        values["host_id"] = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"
    elif not re.fullmatch(HOST_ID, values["host_id"], re.ASCII):
        raise ConfigError(f"{where('DEFAULT', 'host_id')}: [DEFAULT] host_id: "
                          f"{values['host_id']!r} may only use letters, digits, '.', '_' and '-'")

    if not values["record_signing_key"]:
        values["record_signing_key"] = default_key_path(files[0])
    clients = []
    for text in values["spool_export_clients"]:
        try:
            clients.append(validation.ip_rule(text))
        except InvalidArgument as exc:
            raise ConfigError(f"{where('DEFAULT', 'spool_export_clients')}: [DEFAULT] "
                              f"spool_export_clients: {exc}") from None
    values["spool_export_clients"] = clients

    enabled = values["enabled_share_backends"]
    if not enabled:
        raise ConfigError(f"{where('DEFAULT', 'enabled_share_backends')}: [DEFAULT] "
                          "enabled_share_backends: names no backend")
    if len(set(enabled)) != len(enabled):
        raise ConfigError(f"{where('DEFAULT', 'enabled_share_backends')}: [DEFAULT] "
                          "enabled_share_backends: lists a backend twice")

    for name in enabled:
        if name not in merged:
            raise ConfigError(f"{where('DEFAULT', 'enabled_share_backends')}: [DEFAULT] "
                              f"enabled_share_backends: no section [{name}]")
    backends = {name: _backend(name, merged, default, where) for name in enabled}
    # A section not listed is checked all the same (a typo there must not
    # wait for the day it is enabled), and reported by --check-config.
    unlisted = [name for name in merged if name != "DEFAULT" and name not in backends]
    checked = {name: _backend(name, merged, default, where) for name in unlisted}

    # Unknown options in [DEFAULT]: neither global nor any backend's option.
    backend_known = set()
    for b in list(backends.values()) + list(checked.values()):
        backend_known |= set(b.values)
    for key in default:
        if key not in global_names and key not in backend_known:
            raise ConfigError(f"{where('DEFAULT', key)}: [DEFAULT] {key}: "
                              f"{unknown(key, global_names | backend_known)}")
    return Config(files=files, values=values, backends=backends, unlisted=unlisted)


def _backend(name: str, merged: Dict[str, Dict[str, str]], default: Dict[str, str],
             where: Any) -> BackendConfig:
    """One backend section parsed and checked, [DEFAULT] applied."""
    if not SECTION_RE.fullmatch(name):
        raise ConfigError(f"{where(name, 'share_driver')}: [{name}]: a backend section name "
                          "may only use letters, digits and '_'")
    section = dict(default)
    section.update(merged[name])
    # Where an option came from: the backend section, else [DEFAULT] if set
    # there, else (not set anywhere) the backend section of the main file.
    def src(key: str) -> str:
        return where("DEFAULT", key) if key not in merged[name] and key in default \
            else where(name, key)

    def sec_of(key: str) -> str:
        return "DEFAULT" if key not in merged[name] and key in default else name
    if "share_driver" not in section:
        raise ConfigError(f"{where(name, '')}: [{name}] share_driver: required option is missing")
    opts = BACKEND_OPTIONS + _extra_options(section, name, src)
    bvalues = parse_options(opts, section, lambda key: f"{src(key)}: [{sec_of(key)}] {key}",
                            check_unknown=merged[name])
    bvalues["share_backend_name"] = bvalues["share_backend_name"] or name
    backend = BackendConfig(name, bvalues)
    _check_backend(backend, src, sec_of)
    return backend


def _check_backend(b: BackendConfig, src, sec_of) -> None:
    from . import helpers
    from .constants import PROTOCOLS
    from .drivers import driver_class
    cls = driver_class(b.share_driver)
    for proto in b.enabled_share_protocols:
        if proto.upper() not in PROTOCOLS:
            raise ConfigError(f"{src('enabled_share_protocols')}: [{sec_of('enabled_share_protocols')}] "
                              f"enabled_share_protocols: {proto!r} is not one of {', '.join(PROTOCOLS)}")
        if proto.upper() not in cls.supported_protocols:
            raise ConfigError(f"{src('enabled_share_protocols')}: [{sec_of('enabled_share_protocols')}] "
                              f"enabled_share_protocols: driver {b.share_driver} cannot serve {proto.upper()} "
                              f"(it serves {', '.join(cls.supported_protocols)})")
    b.values["enabled_share_protocols"] = [p.upper() for p in b.enabled_share_protocols]
    if "NFS" in b.enabled_share_protocols and cls.uses_export_helpers \
            and b.nfs_helper not in helpers.NFS_HELPERS:
        raise ConfigError(f"{src('nfs_helper')}: [{sec_of('nfs_helper')}] nfs_helper: {b.nfs_helper!r} "
                          f"is not one of {', '.join(helpers.NFS_HELPERS)}")
    if "CIFS" in b.enabled_share_protocols and cls.uses_export_helpers \
            and b.cifs_helper not in helpers.CIFS_HELPERS:
        raise ConfigError(f"{src('cifs_helper')}: [{sec_of('cifs_helper')}] cifs_helper: {b.cifs_helper!r} "
                          f"is not one of {', '.join(helpers.CIFS_HELPERS) or '(none available)'}")
    from .hooks import HOOK_DRIVERS
    from .hooks.manager import hook_class
    for hook in b.hook_drivers:
        where = f"{src('hook_drivers')}: [{sec_of('hook_drivers')}] hook_drivers"
        if hook not in HOOK_DRIVERS and not re.fullmatch(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", hook):
            raise ConfigError(f"{where}: {hook!r} is neither a built-in "
                              f"({', '.join(HOOK_DRIVERS)}) nor module:Class")
        try:
            hook_class(hook)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    from .schedule import Retention, Schedule
    for key, parse in (("snapshot_schedule", Schedule.parse), ("snapshot_retention", Retention.parse)):
        if b.values.get(key):
            try:
                parse(b.values[key])
            except InvalidArgument as exc:
                raise ConfigError(f"{src(key)}: [{sec_of(key)}] {key}: {exc}") from None
    if b.driver_handles_share_servers:
        where = f"{src('driver_handles_share_servers')}: " \
                f"[{sec_of('driver_handles_share_servers')}] driver_handles_share_servers"
        if not cls.can_serve_share_servers():
            raise ConfigError(f"{where}: driver {b.share_driver} exports through its own "
                              "service and cannot run share servers")
        protos = b.enabled_share_protocols
        if cls.uses_export_helpers and (not set(protos) <= {"NFS", "CIFS"}
                                        or ("NFS" in protos and b.nfs_helper != "ganesha")
                                        or ("CIFS" in protos and b.cifs_helper != "samba")):
            raise ConfigError(f"{where}: share servers serve NFS through nfs_helper = ganesha "
                              "and CIFS through cifs_helper = samba only: set "
                              "enabled_share_protocols to NFS and/or CIFS with those helpers")
    cls.check_config(b, src, sec_of)


def warnings(cfg: "Config") -> List[str]:
    """What loads but will not serve clients as an administrator expects
    (printed by --check-config, logged at start)."""
    from .drivers import driver_class
    out = []
    for name, b in cfg.backends.items():
        if not driver_class(b.share_driver).uses_export_helpers \
                or b.driver_handles_share_servers:
            continue
        ip = b.share_export_ip
        if not ip:
            out.append(f"[{name}] share_export_ip is not set: the backend cannot export "
                       "until it names the address clients reach this host on (its storage "
                       "network address)")
        elif netaddr.IPAddress(ip).is_loopback():
            out.append(f"[{name}] share_export_ip = {ip} is a loopback address: only this "
                       "host itself can mount these exports; set the storage network address")
    return out
