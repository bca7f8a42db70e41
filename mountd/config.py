"""mountd.conf: loading, drop-ins and validation.

One [mountd] section. Files are read in order: the main file, then
mountd.conf.d/*.conf sorted by name; later files override earlier ones.
Every problem names the file, section and option (ConfigError).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
from typing import Any, Dict, List, Optional, Tuple

import netaddr

from sharedd.errors import ConfigError
from sharedd.metrics import options as metrics_options
from sharedd.options import Opt, config_files, parse_options, read_ini
from sharedd.record import EXPORT_RE, MOUNT_OPTION_RE

from .trust import Trust, load_keys

DEFAULT_CONFIG = "/etc/sharedd/mountd.conf"
SECTION = "mountd"
SPOOL_USER = "sharedd"   # the sharedd system user, trusted as spool owner if present

OPTIONS: List[Opt] = [
    Opt("spool_dir", "path", "/var/spool/sharedd",
        help="Spool directory: one subdirectory per sharedd host, holding its hook records."),
    Opt("spool_source", "str", "",
        help="host:/path of a storage host's spool export (its Manager.SpoolExport "
             "property): mountd mounts it read-only at spool_dir (NFS, nosuid,nodev,noexec, "
             "soft) before reading records. Empty: spool_dir is used as it is."),
    Opt("spool_poll_interval", "float", 0.25, min=0.05, max=60,
        help="Seconds between looks at a network spool's directories for new records "
             "(inotify does not see other hosts' writes)."),
    Opt("mount_dir", "path", "/mnt/shares",
        help="Shares are mounted at mount_dir/<share name>-<first 8 characters of the share id>."),
    Opt("consume_interval", "float", 30.0, min=1,
        help="Seconds between periodic rescans of the spool (inotify does not see "
             "records written by another host on a network file system)."),
    Opt("expected_ip_addresses", "list", [],
        help="Addresses that identify this host in ip rules; empty: every address "
             "of the host's interfaces (followed over netlink)."),
    Opt("interfaces", "list", [],
        help="Only use the addresses of these interfaces (empty: all)."),
    Opt("match_loopback", "bool", False,
        help="Count this host's loopback addresses (127.0.0.0/8, ::1) as its identity "
             "in ip rules. Every host has them: only for a client on the storage host "
             "itself. Addresses listed in expected_ip_addresses always count."),
    Opt("protocols", "list", ["NFS", "GLUSTERFS"],
        help="Protocols mountd mounts: NFS and/or GLUSTERFS (CIFS is not supported: "
             "it needs credentials, which never travel in records)."),
    Opt("state_path", "path", "/var/lib/sharedd-mountd",
        help="State directory (the record of the mounts mountd made)."),
    Opt("nfs_mount_options", "list", [],
        help="Extra NFS mount options, e.g. soft,timeo=100,retrans=3. Without them the "
             "kernel's defaults apply: hard (I/O waits for a server that went away, and "
             "goes on when it is back), timeo=600 (tenths of a second), retrans=2."),
    Opt("glusterfs_mount_options", "list", [],
        help="Extra GlusterFS client options, e.g. log-level=WARNING."),
    Opt("mount_nosuid_nodev", "bool", True,
        help="Mount with nosuid,nodev."),
    Opt("glusterfs_client_cert", "path", "",
        help="PEM certificate this host presents to GlusterFS; its CN matches cert rules."),
    Opt("glusterfs_client_key", "path", "", help="Private key of glusterfs_client_cert."),
    Opt("glusterfs_ca", "path", "", help="CA list that signed the GlusterFS servers' certificates."),
    Opt("allowed_spool_owners", "list", [],
        help="User names or uids that may own spool files (empty: root, and the "
             "sharedd user if it exists)."),
    Opt("trusted_keys", "list", [],
        help="Record signing keys of the sharedd hosts this client trusts, as "
             "<host id>:<base64 key> (the middle word of sharedd --print-public-key)."),
    Opt("trusted_keys_dir", "path", "/etc/sharedd/trusted-keys.d",
        help="Directory of trusted keys, one file <name>.pub per sharedd host holding the "
             "line sharedd --print-public-key prints (root-owned, not writable by others)."),
    Opt("accept_unsigned", "bool", None,
        help="Act on records of hosts without a trusted key, trusting file ownership "
             "alone: only for a spool that nobody but this host's root writes. Default: "
             "true while no key is trusted at all, else false."),
    Opt("mount_timeout", "float", 60.0, min=1,
        help="Seconds one mount or unmount command may take."),
    Opt("health_check_interval", "float", 30.0, min=0,
        help="Seconds between checks that every mounted share answers (statfs in a child "
             "process, health_check_timeout): one that does not is reported stale (the "
             "Mounts property, STATUS=) until it answers again; one whose file handle went "
             "stale is mounted again. 0: no checks."),
    Opt("health_check_timeout", "float", 10.0, min=1,
        help="Seconds a mounted share has to answer a health check."),
    *metrics_options("sharedd-mountd.prom"),
    Opt("log_level", "str", "info", choices=("debug", "info", "warning", "error"),
        help="Log level."),
]

#: old or alternative spellings -> canonical option name
ALIASES = {
    "sleep_between_consume_attempts": "consume_interval",   # Manila's example
    "allowed_spool_uids": "allowed_spool_owners",
}

# Mount options a configuration or a record may ask for. Everything else
# (suid, dev, exec-related helpers, remount, bind ...) is refused.
NFS_OPTION_RE = re.compile(
    r"^(hard|soft|softreval|intr|nointr|ac|noac|cto|nocto|sharecache|nosharecache|"
    r"resvport|noresvport|fsc|nofsc|noatime|relatime|nodiratime|noexec|sync|async|"
    r"nofail|_netdev|lazytime|"
    r"(vers|nfsvers|minorversion)=[0-9.]{1,4}|"
    r"(rsize|wsize|timeo|retrans|retry|actimeo|acregmin|acregmax|acdirmin|acdirmax|"
    r"port|nconnect|max_connect)=[0-9]{1,10}|"
    r"proto=(tcp|tcp6|rdma|rdma6|udp|udp6)|"
    r"sec=(sys|krb5|krb5i|krb5p|none)|"
    r"lookupcache=(all|none|pos|positive)|local_lock=(all|flock|posix|none)|"
    r"clientaddr=[0-9A-Fa-f.:]{2,45})$")
GLUSTERFS_OPTION_RE = re.compile(
    r"^(acl|selinux|"
    r"log-level=(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL|NONE)|"
    r"(attribute-timeout|entry-timeout|negative-timeout|volfile-max-fetch-attempts|"
    r"background-qlen|congestion-threshold)=[0-9]{1,9}|"
    r"direct-io-mode=(enable|disable|auto)|"
    r"use-readdirp=(yes|no)|"
    r"backup-volfile-server=[A-Za-z0-9.:-]{1,253})$")


def option_allowed(fstype: str, option: str) -> bool:
    if not re.fullmatch(MOUNT_OPTION_RE, option):
        return False
    if fstype in ("nfs", "nfs4"):
        return bool(NFS_OPTION_RE.fullmatch(option))
    if fstype == "glusterfs":
        return bool(GLUSTERFS_OPTION_RE.fullmatch(option))
    return False


@dataclasses.dataclass
class MountdConfig:
    files: List[str]
    values: Dict[str, Any]
    #: uids trusted to own spool files
    allowed_uids: Tuple[int, ...] = ()
    #: whose records count (signing keys, accept_unsigned)
    trust: Trust = dataclasses.field(default_factory=lambda: Trust({}, True))

    def spool_owners(self) -> Optional[Tuple[int, ...]]:
        """Owners spool files and host directories must have; None (any) for
        a spool mountd mounts from another host when only signed records
        count: NFS may show root's files as nobody, and the signature, not
        the owner, decides there."""
        if self.values.get("spool_source") and not self.trust.accept_unsigned:
            return None
        return self.allowed_uids

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["values"][item]
        except KeyError:
            raise AttributeError(item) from None


def _read(files: List[str], optional_main: bool) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The [mountd] options (aliases resolved) and where each was set."""
    sections, origin = read_ini(files, optional_main)
    merged: Dict[str, str] = {}
    where: Dict[str, str] = {}
    for section, values in sections.items():
        if section != SECTION:
            path = next(origin[(section, k)] for k in values) if values else files[0]
            raise ConfigError(f"{path}: [{section}]: unknown section (mountd.conf has "
                              f"one [{SECTION}] section)")
        for key, value in values.items():
            name = ALIASES.get(key, key)
            merged[name] = value
            where[name] = f"{origin[(section, key)]}: [{SECTION}] {key}"
    return merged, where


def _uids(names: List[str], where: str) -> Tuple[int, ...]:
    if not names:
        uids = [0]
        try:
            uids.append(pwd.getpwnam(SPOOL_USER).pw_uid)
        except KeyError:
            pass
        return tuple(uids)
    out = []
    for name in names:
        if name.isdigit():
            out.append(int(name))
            continue
        try:
            out.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ConfigError(f"{where}: no such user {name!r}") from None
    return tuple(out)


def load(path: str = DEFAULT_CONFIG, *, optional: bool = False) -> MountdConfig:
    """Load and validate; optional=True accepts a missing main file (defaults)."""
    files = config_files(path)
    merged, origin = _read(files, optional)
    values = parse_options(OPTIONS, merged,
                           lambda key: origin.get(key, f"{files[0]}: [{SECTION}] {key}"))

    def where(name: str) -> str:
        return origin.get(name, f"{files[0]}: [{SECTION}] {name}")

    protos = []
    for proto in values["protocols"]:
        up = proto.upper()
        if up == "CIFS":
            raise ConfigError(f"{where('protocols')}: CIFS is not supported by mountd: a CIFS "
                              "mount needs credentials, which never travel in hook records")
        if up not in ("NFS", "GLUSTERFS"):
            raise ConfigError(f"{where('protocols')}: {proto!r} is not one of NFS, GLUSTERFS")
        if up not in protos:
            protos.append(up)
    values["protocols"] = protos
    for addr in values["expected_ip_addresses"]:
        try:
            netaddr.IPAddress(addr)
        except (netaddr.AddrFormatError, ValueError):
            raise ConfigError(f"{where('expected_ip_addresses')}: {addr!r} is not an IPv4 "
                              "or IPv6 address") from None
    for name in values["interfaces"]:
        if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", name):
            raise ConfigError(f"{where('interfaces')}: {name!r} is not an interface name")
    for key, fstype in (("nfs_mount_options", "nfs4"), ("glusterfs_mount_options", "glusterfs")):
        for option in values[key]:
            if not option_allowed(fstype, option):
                raise ConfigError(f"{where(key)}: {option!r} is not an allowed "
                                  f"{fstype} mount option")
    cert_keys = ("glusterfs_client_cert", "glusterfs_client_key", "glusterfs_ca")
    if any(values[k] for k in cert_keys) and not all(values[k] for k in cert_keys[:2]):
        raise ConfigError(f"{where('glusterfs_client_cert')}: glusterfs_client_cert and "
                          "glusterfs_client_key must be set together")
    for key in cert_keys:
        if values[key] and not os.path.isfile(values[key]):
            raise ConfigError(f"{where(key)}: {values[key]} does not exist or is not a file")
    if values["spool_source"] and not re.fullmatch(EXPORT_RE, values["spool_source"], re.ASCII):
        raise ConfigError(f"{where('spool_source')}: {values['spool_source']!r} is not "
                          "host:/path")
    uids = _uids(values["allowed_spool_owners"], where("allowed_spool_owners"))
    keys = load_keys(values["trusted_keys"], values["trusted_keys_dir"], where("trusted_keys"),
                     where("trusted_keys_dir"))
    if values["accept_unsigned"] is None:
        values["accept_unsigned"] = not keys
    return MountdConfig(files=files, values=values, allowed_uids=uids,
                        trust=Trust(keys, values["accept_unsigned"]))
