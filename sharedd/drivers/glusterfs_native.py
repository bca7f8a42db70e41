"""GlusterFS native driver: one share = one whole GlusterFS volume, TLS access.

A backend owns a pool of pre-created volumes (``glusterfs_targets``). A share
takes a free volume that is large enough, turns on TLS on the I/O path
(``client.ssl``/``server.ssl``, set while the volume is stopped: running
bricks ignore the change) and admits clients by certificate CN through
``auth.ssl-allow``. With ``server.dynamic-auth on`` a CN removed from the
list loses its existing connections within seconds.

Ownership lives on the volume itself, in the option ``user.sharedd.share-id``
(gluster accepts any ``user.*`` key), so a crash between steps is recovered
by looking at the volumes: no marker = free, ``<share id>`` = in use,
``!unmanaged`` = released by unmanage (kept out of the pool, data intact).
Deleting a share wipes the volume through a FUSE mount made with the
driver's own certificate, stops it and resets all its options
(``volume reset``): gluster cannot reset single ``user.*`` keys.

Sizes: a volume has a fixed size, taken from ``volume status VOL detail``
(brick file-system sizes, combined per replica/disperse set). A stopped free
volume is measured by starting it briefly with TLS on and a placeholder
allow list (nobody gets in), then stopping and resetting it; results are
cached in the backend state directory, keyed by volume id and brick list.
Bricks that share one file system each report that file system's size.

Local targets (``server:/volume``) use the ``gluster`` CLI directly; remote
targets (``user@server:/volume``) run it through ``ssh`` with host-key
checking, each remote argument quoted (ssh joins them into one command line).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import socket
import stat
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..errors import (BackendFailure, CapacityExceeded, ConfigError, InvalidArgument,
                      InvalidState, NotSupported)
from ..models import AccessRule, Share, ShareUpdate
from ..mountinfo import is_mounted
from ..options import Opt
from .. import validation
from ..validation import CN_RE
from .. import util
from .base import ShareDriver

log = logging.getLogger(__name__)

GIB = 1024 ** 3

# [user@]host:/volume. Volume names must not start with '-' (they become
# CLI arguments); hosts are names or IPv4 addresses.
_USER = r"[A-Za-z_][A-Za-z0-9_.-]{0,31}"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
_VOLUME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
TARGET_RE = re.compile(rf"^(?:(?P<user>{_USER})@)?(?P<host>{_HOST}):/(?P<volume>{_VOLUME})$")
EXPORT_RE = re.compile(rf"^(?P<host>{_HOST}):/(?P<volume>{_VOLUME})$")
VOLUME_RE = re.compile(rf"^{_VOLUME}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Certificate CNs we put into auth.ssl-allow (validation.CN_RE): gluster
# splits the list on commas and matches entries with fnmatch, so commas and
# wildcards are out.

MARKER = "user.sharedd.share-id"
UNMANAGED = "!unmanaged"
# Allow list that admits nobody: gluster needs a value, and this one holds
# characters CN_RE refuses, so no rule can ever grant it.
NOBODY = "!sharedd-no-client!"

STATUS_CREATED, STATUS_STARTED, STATUS_STOPPED = 0, 1, 2
_TRUE = {"on", "yes", "true", "enable", "1"}

DEFAULT_SSL_DIR = "/usr/lib/ssl"   # gluster's compiled-in TLS file location


def parse_target(text: str) -> "Target":
    m = TARGET_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not [remoteuser@]server:/volume")
    return Target(m.group("user"), m.group("host"), m.group("volume"))


@dataclass(frozen=True)
class Target:
    user: Optional[str]
    host: str
    volume: str

    @property
    def remote(self) -> bool:
        return self.user is not None

    @property
    def export(self) -> str:
        return f"{self.host}:/{self.volume}"


@dataclass
class VolumeInfo:
    name: str
    id: str
    status: int
    bricks: List[str]
    options: Dict[str, str]
    replica: int
    disperse: int
    redundancy: int

    @property
    def started(self) -> bool:
        return self.status == STATUS_STARTED

    @property
    def marker(self) -> Optional[str]:
        return self.options.get(MARKER)


class GlusterError(BackendFailure):
    """A gluster command failed; op_errstr holds gluster's own reason."""

    def __init__(self, message: str, op_errstr: str = ""):
        super().__init__(message)
        self.op_errstr = op_errstr


def _text(elem: ET.Element, path: str, default: Optional[str] = None) -> str:
    node = elem.find(path)
    if node is None or node.text is None:
        if default is not None:
            return default
        raise BackendFailure(f"gluster XML output lacks <{path}>")
    return node.text.strip()


def _int(elem: ET.Element, path: str, default: Optional[int] = None) -> int:
    raw = _text(elem, path, None if default is None else str(default))
    if not re.fullmatch(r"^-?[0-9]{1,20}$", raw):
        raise BackendFailure(f"gluster XML output: <{path}> is not a number: {raw[:40]!r}")
    return int(raw)


class GlusterCLI:
    """Runs `gluster --mode=script --xml` locally or through ssh."""

    def __init__(self, target: Target, *, timeout: float, ssh_key: str = "",
                 password: str = "", ssh_port: int = 22, known_hosts: str = "",
                 glusterd_socket: str = "", askpass: str = ""):
        self.target = target
        self.timeout = timeout
        self.ssh_key = ssh_key
        self.password = password
        self.ssh_port = ssh_port
        self.known_hosts = known_hosts
        self.glusterd_socket = glusterd_socket
        self.askpass = askpass

    def argv(self, args: List[str]) -> Tuple[List[str], Optional[dict]]:
        cmd = ["gluster", "--mode=script"]
        if self.glusterd_socket and not self.target.remote:
            cmd.append(f"--glusterd-sock={self.glusterd_socket}")
        cmd += ["--xml", *args]
        if not self.target.remote:
            return cmd, None
        env = None
        options: Tuple[str, ...] = ("-o", "BatchMode=yes")
        if self.password:
            # BatchMode would refuse password prompts: the password comes from
            # an askpass script reading it from the child's environment only.
            options = ("-o", "BatchMode=no", "-o", "NumberOfPasswordPrompts=1",
                       "-o", "KbdInteractiveAuthentication=no")
            env = dict(os.environ, SSH_ASKPASS=self.askpass, SSH_ASKPASS_REQUIRE="force",
                       SHAREDD_GLUSTERFS_PASSWORD=self.password)
        ssh = util.ssh_argv(self.target.host, self.target.user, port=self.ssh_port,
                            key=self.ssh_key, known_hosts=self.known_hosts, options=options)
        # ssh joins the remote words with spaces for the remote shell: quote each.
        return ssh + [shlex.quote(a) for a in cmd], env

    def __call__(self, *args: str) -> ET.Element:
        argv, env = self.argv(list(args))
        where = f"{self.target.user}@{self.target.host}" if self.target.remote else "local"
        log.debug("gluster (%s): %s", where, " ".join(args))
        try:
            proc = util.capture(argv, timeout=self.timeout, env=env)
        except subprocess.TimeoutExpired:
            raise GlusterError(f"gluster {' '.join(args)} ({where}) timed out after "
                               f"{self.timeout:g}s") from None
        except util.OutputTooLarge as exc:
            raise GlusterError(f"gluster {' '.join(args)} ({where}): {exc}") from None
        except OSError as exc:
            raise GlusterError(f"cannot run {argv[0]}: {exc}") from None
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace").strip()
        if self.target.remote and proc.returncode == 255:
            raise GlusterError(f"ssh to {where} failed: {err[-300:]}")
        start = out.find("<?xml")
        if start < 0:
            raise GlusterError(f"gluster {' '.join(args)} ({where}) failed (exit "
                               f"{proc.returncode}): {(err or out).strip()[-300:]}")
        try:
            root = ET.fromstring(out[start:])
        except ET.ParseError as exc:
            raise GlusterError(f"gluster {' '.join(args)} ({where}): unreadable XML: {exc}") from None
        if root.tag != "cliOutput":
            raise GlusterError(f"gluster {' '.join(args)} ({where}): unexpected XML root {root.tag!r}")
        op_ret = _int(root, "opRet")
        if op_ret != 0 or proc.returncode != 0:
            reason = _text(root, "opErrstr", "") or err[-300:] or f"opRet {op_ret}"
            raise GlusterError(f"gluster {' '.join(args)} ({where}) failed: {reason}", reason)
        return root


class GlusterfsNativeDriver(ShareDriver):
    driver_name = "glusterfs_native"
    supported_protocols = ("GLUSTERFS",)
    access_types = {"GLUSTERFS": ("cert",)}
    thin_provisioning = False
    uses_export_helpers = False

    OPTIONS = [
        Opt("glusterfs_targets", "list", required=True,
            help="Volumes this backend hands out as shares, each [remoteuser@]server:/volume. "
                 "Without remoteuser@ the server is this host and the gluster CLI runs "
                 "locally; with it, through ssh. The volumes must exist and be "
                 "dedicated to sharedd."),
        Opt("glusterfs_mount_point_base", "path", "",
            help="Where the driver mounts volumes to wipe them (default: <state_path>/backends/<backend>/mnt)."),
        Opt("glusterfs_path_to_private_key", "path", "",
            help="SSH private key for remote targets."),
        Opt("glusterfs_server_password_file", "path", "",
            help="File holding the SSH password for remote targets (used when no key is "
                 "accepted; never logged): owned by root, mode 0600 or stricter, else the "
                 "backend refuses to start."),
        Opt("glusterfs_server_password", "str", "", secret=True,
            help="Deprecated: the SSH password itself, readable by whoever reads the "
                 "configuration; use glusterfs_server_password_file."),
        Opt("glusterfs_ssh_port", "int", 22, min=1, max=65535, help="SSH port of remote targets."),
        Opt("glusterfs_ssh_known_hosts_file", "path", "",
            help="known_hosts file with the remote servers' host keys (default: ssh's own). "
                 "Host keys are always checked."),
        Opt("glusterfs_glusterd_socket", "path", "",
            help="Unix socket of the local glusterd (local targets; default: gluster's own)."),
        Opt("glusterfs_ssl_own_cert", "path", "",
            help="Certificate the bricks present (ssl.own-cert; default: gluster's "
                 "/usr/lib/ssl/glusterfs.pem). The driver also mounts with it to wipe volumes, "
                 "so the same path must be readable on the sharedd host."),
        Opt("glusterfs_ssl_private_key", "path", "",
            help="Private key of glusterfs_ssl_own_cert (ssl.private-key; default: /usr/lib/ssl/glusterfs.key)."),
        Opt("glusterfs_ssl_ca_list", "path", "",
            help="CA certificates that sign client certificates (ssl.ca-list; default: /usr/lib/ssl/glusterfs.ca)."),
    ]

    @classmethod
    def check_config(cls, backend, src, sec_of) -> None:
        targets = backend.glusterfs_targets
        if not targets:
            raise ConfigError(f"{src('glusterfs_targets')}: [{sec_of('glusterfs_targets')}] "
                              "glusterfs_targets: names no volume")
        seen = set()
        for text in targets:
            try:
                t = parse_target(text)
            except ValueError as exc:
                raise ConfigError(f"{src('glusterfs_targets')}: [{sec_of('glusterfs_targets')}] "
                                  f"glusterfs_targets: {exc}") from None
            if (t.host, t.volume) in seen:
                raise ConfigError(f"{src('glusterfs_targets')}: [{sec_of('glusterfs_targets')}] "
                                  f"glusterfs_targets: {t.export} is listed twice")
            seen.add((t.host, t.volume))
        for opt in ("glusterfs_ssl_own_cert", "glusterfs_ssl_private_key"):
            other = "glusterfs_ssl_private_key" if opt == "glusterfs_ssl_own_cert" else "glusterfs_ssl_own_cert"
            if getattr(backend, opt) and not getattr(backend, other):
                raise ConfigError(f"{src(opt)}: [{sec_of(opt)}] {opt}: set {other} as well "
                                  "(certificate and key go together)")

    def __init__(self, backend_name: str, config, helpers: Optional[dict] = None,
                 state_dir: str = "", command_timeout: float = 120.0):
        super().__init__(backend_name, config, helpers, state_dir, command_timeout)
        self.targets = [parse_target(t) for t in config.glusterfs_targets]
        self.mount_base = config.glusterfs_mount_point_base or os.path.join(state_dir, "mnt")
        self.ssl_cert = config.glusterfs_ssl_own_cert
        self.ssl_key = config.glusterfs_ssl_private_key
        self.ssl_ca = config.glusterfs_ssl_ca_list
        self._lock = threading.RLock()       # pool selection and measuring
        self._cache_path = os.path.join(state_dir, "volume-sizes.json")
        self._sizes: Optional[Dict[str, Any]] = None   # the file, read once
        self._askpass = os.path.join(state_dir, "ssh-askpass")
        self._own_cn: Optional[str] = None
        self._secret: Optional[str] = None     # read at set-up (or first use)

    # --- plumbing ------------------------------------------------------------
    def _password(self) -> str:
        """The SSH password: from its root-only file, else (deprecated) the
        configuration itself."""
        path = getattr(self.config, "glusterfs_server_password_file", "") or ""
        if not path:
            return self.config.glusterfs_server_password or ""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendFailure(f"glusterfs_server_password_file: cannot open it: "
                                 f"{exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
                raise BackendFailure("glusterfs_server_password_file must be a regular file "
                                     "owned by root with mode 0600 or stricter")
            data = os.read(fd, 4097)
        finally:
            os.close(fd)
        try:
            text = data.decode("utf-8").rstrip("\n") if len(data) <= 4096 else ""
        except UnicodeDecodeError:
            text = ""
        if not text or "\n" in text or "\0" in text:
            raise BackendFailure("glusterfs_server_password_file must hold one line of at "
                                 "most 4096 bytes")
        return text

    def _cli(self, target: Target) -> GlusterCLI:
        c = self.config
        return GlusterCLI(target, timeout=self.command_timeout,
                          ssh_key=c.glusterfs_path_to_private_key,
                          password=self._secret if self._secret is not None
                          else self._password(),
                          ssh_port=c.glusterfs_ssh_port,
                          known_hosts=c.glusterfs_ssh_known_hosts_file,
                          glusterd_socket=c.glusterfs_glusterd_socket,
                          askpass=self._askpass)

    def _tls_files(self) -> Tuple[str, str, str]:
        return (self.ssl_cert or os.path.join(DEFAULT_SSL_DIR, "glusterfs.pem"),
                self.ssl_key or os.path.join(DEFAULT_SSL_DIR, "glusterfs.key"),
                self.ssl_ca or os.path.join(DEFAULT_SSL_DIR, "glusterfs.ca"))

    def _ssl_options(self) -> List[Tuple[str, str]]:
        opts = [("client.ssl", "on"), ("server.ssl", "on"), ("server.dynamic-auth", "on")]
        for key, value in (("ssl.own-cert", self.ssl_cert), ("ssl.private-key", self.ssl_key),
                           ("ssl.ca-list", self.ssl_ca)):
            if value:
                opts.append((key, value))
        return opts

    def _target_for(self, share: Share) -> Optional[Target]:
        """The share's volume: from provider_location, else by marker."""
        loc = share.provider_location or (share.export_locations[0] if share.export_locations else "")
        if loc:
            m = EXPORT_RE.fullmatch(loc)
            if not m:
                raise BackendFailure(f"share {share.id}: provider location {loc!r} is not server:/volume")
            for t in self.targets:
                if (t.host, t.volume) == (m.group("host"), m.group("volume")):
                    return t
            raise BackendFailure(f"share {share.id}: volume {loc} is no longer in glusterfs_targets")
        # No location recorded (a create interrupted before the engine saved
        # it): the marker on the volumes tells. An unreachable volume might be
        # the one, so that is an error rather than "no volume".
        errors = []
        for t, info, exc in self._infos():
            if exc is not None:
                errors.append(f"{t.export}: {exc}")
            elif info is not None and info.marker == share.id:
                return t
        if errors:
            raise BackendFailure(f"share {share.id}: cannot check every volume for it: "
                                 + "; ".join(errors))
        return None

    def _info(self, target: Target) -> Optional[VolumeInfo]:
        """Volume info, or None if the volume does not exist."""
        try:
            root = self._cli(target)("volume", "info", target.volume)
        except GlusterError as exc:
            if "does not exist" in exc.op_errstr:
                return None
            raise
        vols = root.findall("./volInfo/volumes/volume")
        if len(vols) != 1:
            raise BackendFailure(f"gluster volume info {target.volume}: expected one volume, got {len(vols)}")
        info = _parse_volume(vols[0])
        if info.name != target.volume:
            raise BackendFailure(f"gluster volume info {target.volume} answered for {info.name!r}")
        return info

    def _infos(self) -> List[Tuple[Target, Optional[VolumeInfo], Optional[BackendFailure]]]:
        """Every target with its info (None: no such volume) or the error.

        One `volume info` per server, not per volume: over ssh each call
        costs a connection.
        """
        by_server: Dict[Tuple[Optional[str], str], List[Target]] = {}
        for t in self.targets:
            by_server.setdefault((t.user, t.host), []).append(t)
        result = []
        for targets in by_server.values():
            try:
                try:
                    root = self._cli(targets[0])("volume", "info")
                    vols = {}
                    for v in root.findall("./volInfo/volumes/volume"):
                        info = _parse_volume(v)
                        vols[info.name] = info
                except GlusterError as exc:
                    if "No volumes present" not in exc.op_errstr:
                        raise
                    vols = {}
                result += [(t, vols.get(t.volume), None) for t in targets]
            except BackendFailure as exc:
                result += [(t, None, exc) for t in targets]
        return result

    def _require(self, target: Target) -> VolumeInfo:
        info = self._info(target)
        if info is None:
            raise BackendFailure(f"GlusterFS volume {target.export} does not exist")
        return info

    def _set(self, target: Target, key: str, value: str) -> None:
        self._set_many(target, [(key, value)])

    def _set_many(self, target: Target, pairs: List[Tuple[str, str]]) -> None:
        """One `volume set` for several options (each set costs a volfile rewrite)."""
        args = [w for pair in pairs for w in pair]
        self._cli(target)("volume", "set", target.volume, *args)

    def _start(self, target: Target) -> None:
        self._cli(target)("volume", "start", target.volume)

    def _stop(self, target: Target) -> None:
        self._cli(target)("volume", "stop", target.volume)

    def _reset(self, target: Target) -> None:
        self._cli(target)("volume", "reset", target.volume)

    def _ssl_ok(self, info: VolumeInfo) -> bool:
        for key, value in self._ssl_options():
            have = info.options.get(key)
            if value == "on":
                if key == "server.dynamic-auth":
                    if have is not None and have.lower() not in _TRUE:   # default is on
                        return False
                elif have is None or have.lower() not in _TRUE:
                    return False
            elif have != value:
                return False
        return True

    def _secure(self, target: Target, info: VolumeInfo, allow: str) -> None:
        """Make the volume run with TLS and the given allow list.

        TLS options are set while the volume is stopped (running bricks keep
        their old transport); the allow list is set before the start, so the
        volume never runs open.
        """
        started = info.started
        pairs = []
        if not self._ssl_ok(info):
            if started:
                self._stop(target)
                started = False
            pairs += self._ssl_options()
        if info.options.get("auth.ssl-allow") != allow:
            pairs.append(("auth.ssl-allow", allow))
        if pairs:
            self._set_many(target, pairs)
        if not started:
            self._start(target)

    def _release(self, target: Target) -> None:
        """Stop the volume and reset every option: it is free again."""
        info = self._info(target)
        if info is None:
            return
        if info.started:
            self._stop(target)
        self._reset(target)

    # --- sizes ---------------------------------------------------------------
    def _status_sizes(self, target: Target, info: VolumeInfo) -> Tuple[int, int]:
        """(total, free) bytes of a started volume from its bricks."""
        root = self._cli(target)("volume", "status", target.volume, "detail")
        sizes: Dict[str, Tuple[int, int]] = {}
        for node in root.findall("./volStatus/volumes/volume/node"):
            path = _text(node, "path", "")
            if not path.startswith("/"):
                continue
            host = _text(node, "hostname")
            if node.find("sizeTotal") is None:
                continue
            sizes[f"{host}:{path}"] = (_int(node, "sizeTotal"), _int(node, "sizeFree"))
        if not info.bricks or not all(b in sizes for b in info.bricks):
            missing = [b for b in info.bricks if b not in sizes]
            raise BackendFailure(f"volume {target.export}: no size for bricks {missing} "
                                 "(brick offline?)")
        # Combine per subvolume: a replica set holds what its smallest brick
        # holds; a disperse set holds (bricks - redundancy) of its smallest.
        group = info.disperse or info.replica or 1
        data = (info.disperse - info.redundancy) if info.disperse else 1
        total = free = 0
        for i in range(0, len(info.bricks), group):
            members = [sizes[b] for b in info.bricks[i:i + group]]
            total += min(s[0] for s in members) * data
            free += min(s[1] for s in members) * data
        return total, free

    def _load_cache(self) -> Dict[str, Any]:
        """The measured sizes, read from their file once (each create
        measures every free volume: not one read of the file per volume)."""
        if self._sizes is None:
            try:
                with open(self._cache_path) as f:
                    data = json.load(f)
                self._sizes = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._sizes = {}
        return self._sizes

    def _measure(self, target: Target, info: VolumeInfo) -> Tuple[int, int]:
        """(total, free) bytes; a stopped free volume is started briefly."""
        key = target.export
        cache = self._load_cache()
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("id") == info.id and hit.get("bricks") == info.bricks \
                and isinstance(hit.get("total"), int) and isinstance(hit.get("free"), int):
            if not info.started:
                return hit["total"], hit["free"]
        if info.started:
            total, free = self._status_sizes(target, info)
        else:
            if info.marker is not None:
                raise BackendFailure(f"volume {target.export} is in use but stopped; cannot measure")
            log.info("measuring free GlusterFS volume %s", target.export)
            try:
                self._secure(target, info, NOBODY)
                total, free = self._status_sizes(target, self._require(target))
            finally:
                self._release(target)
        cache[key] = {"id": info.id, "bricks": info.bricks, "total": total, "free": free}
        if self.state_dir:
            util.atomic_write(self._cache_path, json.dumps(cache).encode(), 0o600)
        return total, free

    # --- lifecycle -------------------------------------------------------------
    def do_setup(self) -> None:
        for d in (self.mount_base, os.path.join(self.state_dir, "log")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        if self.config.glusterfs_server_password:
            log.warning("backend %s: glusterfs_server_password is readable by whoever reads "
                        "the configuration; move it into glusterfs_server_password_file "
                        "(root, 0600)", self.backend_name)
        self._secret = self._password()
        if self._secret:
            # Prints the password from the ssh child's environment; never on disk.
            data = b'#!/bin/sh\nprintf \'%s\\n\' "$SHAREDD_GLUSTERFS_PASSWORD"\n'
            util.atomic_write(self._askpass, data, 0o700)

    def check_for_setup_error(self) -> None:
        cert, key, ca = self._tls_files()
        for opt, path in (("glusterfs_ssl_own_cert", cert), ("glusterfs_ssl_private_key", key),
                          ("glusterfs_ssl_ca_list", ca)):
            if not os.access(path, os.R_OK):
                raise BackendFailure(f"{opt}: {path} is not readable; the driver mounts volumes "
                                     "with this certificate to wipe them")
        self._own_cn = None
        self.own_cn()
        for t in self.targets:
            if not t.remote and not _is_local_host(t.host):
                raise BackendFailure(f"glusterfs_targets: {t.export}: {t.host} is not an address of "
                                     "this host; write remoteuser@server:/volume for a remote server")
        infos = self._infos()
        for t, _, exc in infos:
            if exc is not None:
                raise BackendFailure(f"glusterfs_targets: {t.export}: {exc}")
        missing = [t.export for t, info, _ in infos if info is None]
        if missing:
            raise BackendFailure(f"glusterfs_targets: volumes do not exist: {', '.join(missing)}")

    def own_cn(self) -> str:
        """CN of the certificate the driver mounts with (it must be allowed)."""
        if self._own_cn is None:
            cert = self._tls_files()[0]
            proc = util.run(["openssl", "x509", "-in", cert, "-noout", "-subject",
                             "-nameopt", "RFC2253"], timeout=self.command_timeout)
            m = re.search(r"(?:^|[=,])CN=([^,\\]+)(?:,|$)", proc.stdout.decode().strip())
            if not m or not CN_RE.fullmatch(m.group(1)):
                raise BackendFailure(f"{cert}: no usable CN in the certificate subject")
            self._own_cn = m.group(1)
        return self._own_cn

    # --- shares ----------------------------------------------------------------
    def create_share(self, share: Share) -> ShareUpdate:
        self._check_protocol(share)
        with self._lock:
            target = self._claim(share)
        try:
            self._secure(target, self._require(target), NOBODY)
        except BaseException:
            log.warning("share %s: setting up %s failed; returning it to the pool",
                        share.id, target.export)
            try:
                self._release(target)
            except BackendFailure as exc:
                log.error("share %s: cannot release %s: %s", share.id, target.export, exc)
            raise
        return ShareUpdate(export_locations=[target.export], provider_location=target.export)

    def _claim(self, share: Share) -> Target:
        """Mark a free volume that fits as the share's (or find it if marked)."""
        infos: List[Tuple[Target, VolumeInfo]] = []
        for t, info, exc in self._infos():
            if exc is not None:
                log.warning("volume %s unavailable: %s", t.export, exc)
                continue
            if info is None:
                continue
            if info.marker == share.id:
                return t            # a retried create: the volume is already ours
            if info.marker is None:
                infos.append((t, info))
        fits = []
        for t, info in infos:
            try:
                total, _ = self._measure(t, info)
            except BackendFailure as exc:
                log.warning("cannot measure volume %s: %s", t.export, exc)
                continue
            if total >= share.size_gib * GIB:
                fits.append((total, t))
        if not fits:
            raise CapacityExceeded(f"no free GlusterFS volume of at least {share.size_gib} GiB "
                                   f"in backend {self.backend_name} ({len(infos)} free)")
        fits.sort(key=lambda f: (f[0], f[1].export))   # best fit: smallest that holds it
        target = fits[0][1]
        self._set(target, MARKER, share.id)
        return target

    def delete_share(self, share: Share) -> None:
        target = self._target_for(share)
        if target is None:
            return
        info = self._info(target)
        if info is None or info.marker is None:
            return                              # already released
        if info.marker != share.id:
            log.warning("share %s: volume %s belongs to %s now; not touching it",
                        share.id, target.export, info.marker)
            return
        # Only the driver's own certificate may connect while it wipes.
        self._secure(target, info, self.own_cn())
        self._wipe(target)
        self._release(target)

    def _wipe(self, target: Target) -> None:
        mp = os.path.join(self.mount_base, f"{target.host}_{target.volume}")
        os.makedirs(mp, mode=0o700, exist_ok=True)
        if is_mounted(mp):
            self._umount(mp)
        cert, key, ca = self._tls_files()
        logfile = os.path.join(self.state_dir or self.mount_base, "log",
                               f"{target.host}_{target.volume}.log")
        os.makedirs(os.path.dirname(logfile), mode=0o700, exist_ok=True)
        argv = ["glusterfs", f"--volfile-server={target.host}", f"--volfile-id={target.volume}",
                f"--log-file={logfile}"]
        for opt, path in (("ssl-own-cert", cert), ("ssl-private-key", key), ("ssl-ca-list", ca)):
            argv.append(f"--xlator-option=*-client-*.transport.socket.{opt}={path}")
        util.run(argv + [mp], timeout=self.command_timeout)
        # glusterfs exits 0 even when the server refuses it: look for the mount.
        deadline = time.monotonic() + min(30.0, self.command_timeout)
        while not is_mounted(mp):
            if time.monotonic() > deadline:
                raise BackendFailure(f"cannot mount {target.export} to wipe it: "
                                     f"{_tail(logfile)}")
            time.sleep(0.2)
        try:
            # rm in a child: a hung FUSE call then ends with the timeout.
            util.run(["find", mp, "-mindepth", "1", "-maxdepth", "1", "!", "-name", ".trashcan",
                      "-exec", "rm", "-rf", "--one-file-system", "--", "{}", "+"],
                     timeout=self.command_timeout)
            left = [n for n in os.listdir(mp) if n != ".trashcan"]
            if left:
                raise BackendFailure(f"volume {target.export} not empty after wipe: {left[:5]}")
        finally:
            self._umount(mp)

    def _umount(self, mp: str) -> None:
        proc = util.run(["umount", mp], timeout=self.command_timeout, check=False)
        if proc.returncode != 0 and is_mounted(mp):
            util.run(["umount", "-l", mp], timeout=self.command_timeout)

    def ensure_share(self, share: Share, rules: List[AccessRule]) -> ShareUpdate:
        self._check_protocol(share)
        target = self._target_for(share)
        if target is None:
            raise BackendFailure(f"share {share.id}: no GlusterFS volume carries it")
        info = self._require(target)
        if info.marker != share.id:
            if info.marker not in (None, UNMANAGED):
                raise BackendFailure(f"volume {target.export} belongs to share {info.marker}")
            self._set(target, MARKER, share.id)
        allow, _ = self._allow_list(rules)
        self._secure(target, info, allow)
        return ShareUpdate(export_locations=[target.export], provider_location=target.export)

    # --- access ------------------------------------------------------------------
    def validate_access(self, share: Share, access_type: str, access_level: str,
                        access_to: Optional[str] = None) -> None:
        if share.protocol not in self.supported_protocols:
            raise NotSupported(f"driver {self.driver_name} serves only GLUSTERFS shares")
        if access_type != "cert":
            raise NotSupported(f"GlusterFS TLS access is granted per certificate CN: access type "
                               f"{access_type!r} is not supported (use 'cert')")
        if access_level != "rw":
            raise NotSupported(f"GlusterFS TLS access is rw only (auth.ssl-allow admits a "
                               f"certificate fully): access level {access_level!r} is not supported")
        if access_to is not None:
            validation.access_to("cert", access_to)

    @staticmethod
    def _allow_list(rules: List[AccessRule]) -> Tuple[str, Dict[str, str]]:
        """auth.ssl-allow value for rules, and rule id -> 'error' for unusable ones."""
        cns, errors = set(), {}
        for r in rules:
            if r.access_type == "cert" and r.access_level == "rw" and CN_RE.fullmatch(r.access_to or ""):
                cns.add(r.access_to)
            else:
                errors[r.id] = "error"
        return (",".join(sorted(cns)) or NOBODY), errors

    def update_access(self, share: Share, access_rules: List[AccessRule],
                      add_rules: List[AccessRule],
                      delete_rules: List[AccessRule]) -> Optional[Dict[str, str]]:
        self._check_protocol(share)
        for r in add_rules:   # refuse bad input before changing anything
            self.validate_access(share, r.access_type, r.access_level, r.access_to)
        if add_rules or delete_rules:
            gone = {r.id for r in delete_rules} | {(r.access_type, r.access_to) for r in delete_rules}
            wanted = {r.id: r for r in access_rules
                      if r.id not in gone and (r.access_type, r.access_to) not in gone}
            wanted.update({r.id: r for r in add_rules})
            rules = list(wanted.values())
        else:
            rules = list(access_rules)
        allow, errors = self._allow_list(rules)
        target = self._target_for(share)
        if target is None:
            raise BackendFailure(f"share {share.id}: no GlusterFS volume carries it")
        info = self._require(target)
        if info.marker != share.id:
            raise BackendFailure(f"volume {target.export} does not belong to share {share.id}")
        if info.options.get("auth.ssl-allow") != allow:
            self._set(target, "auth.ssl-allow", allow)
        return errors or None

    # --- manage --------------------------------------------------------------
    def check_manage(self, export_path: str, options: Dict[str, Any]) -> Optional[str]:
        target = self._managed_target(export_path)
        self._manageable(target, export_path, None)
        return target.export

    def _managed_target(self, export_path: str):
        m = EXPORT_RE.fullmatch(export_path.strip())
        if not m:
            raise InvalidArgument(f"{export_path!r} is not server:/volume")
        target = next((t for t in self.targets
                       if (t.host, t.volume) == (m.group("host"), m.group("volume"))), None)
        if target is None:
            raise InvalidArgument(f"{export_path} is not one of backend {self.backend_name}'s "
                                  "glusterfs_targets")
        return target

    def _manageable(self, target, export_path: str, share_id: Optional[str]) -> None:
        info = self._info(target)
        if info is None:
            raise InvalidArgument(f"GlusterFS volume {export_path} does not exist")
        if info.marker not in (None, UNMANAGED, share_id):
            raise InvalidState(f"volume {export_path} is already share {info.marker}")

    def manage_existing(self, share: Share, export_path: str,
                        options: Dict[str, Any]) -> ShareUpdate:
        self._check_protocol(share)
        target = self._managed_target(export_path)
        with self._lock:
            self._manageable(target, export_path, share.id)
            self._set(target, MARKER, share.id)
        self._secure(target, self._require(target), NOBODY)
        total, _ = self._status_sizes(target, self._require(target))
        return ShareUpdate(export_locations=[target.export], provider_location=target.export,
                           size_gib=max(1, math.ceil(total / GIB)))

    def unmanage(self, share: Share) -> None:
        """Forget the share; the volume keeps its data, state and clients and
        stays out of the pool (marker !unmanaged) until managed again."""
        target = self._target_for(share)
        if target is None:
            return
        info = self._info(target)
        if info is not None and info.marker == share.id:
            self._set(target, MARKER, UNMANAGED)

    # --- reads ---------------------------------------------------------------
    def get_share_stats(self) -> Dict[str, Any]:
        total = free = largest = 0
        n_free = n_used = n_bad = 0
        with self._lock:
            for t, info, exc in self._infos():
                try:
                    if exc is not None:
                        raise exc
                    if info is None:
                        n_bad += 1
                        continue
                    if info.marker is not None:
                        n_used += 1
                        continue
                    vtotal, vfree = self._measure(t, info)
                except BackendFailure as exc:
                    log.warning("volume %s: %s", t.export, exc)
                    n_bad += 1
                    continue
                n_free += 1
                total += vtotal
                free += vfree
                largest = max(largest, vtotal)
        stats = {
            "driver_name": self.driver_name,
            "storage_protocol": "GLUSTERFS",
            "total_capacity_gb": total / GIB,
            "free_capacity_gb": free / GIB,
            "largest_free_volume_gb": largest / GIB,
            "free_volumes": n_free,
            "used_volumes": n_used,
            "unavailable_volumes": n_bad,
            "thin_provisioning": False,
        }
        stats.update(self.capabilities())
        return stats

    def get_share_usage_gib(self, share: Share) -> Optional[float]:
        target = self._target_for(share)
        if target is None:
            return None
        info = self._info(target)
        if info is None or not info.started:
            return None
        total, free = self._status_sizes(target, info)
        return (total - free) / GIB

    def get_mount_hints(self, share: Share) -> Dict[str, Any]:
        export = share.export_locations[0] if share.export_locations else share.provider_location
        return {"fstype": "glusterfs", "export": export, "client_certificate_required": True}

    def served_addresses(self) -> List[str]:
        return sorted({t.host for t in self.targets})

    def get_backend_info(self) -> Dict[str, Any]:
        info = super().get_backend_info()
        info.update(targets=[t.export for t in self.targets],
                    ssl=[self.ssl_cert, self.ssl_key, self.ssl_ca])
        return info

    def _check_protocol(self, share: Share) -> None:
        if share.protocol not in self.supported_protocols:
            raise NotSupported(f"driver {self.driver_name} serves only GLUSTERFS shares, "
                               f"not {share.protocol}")


def _parse_volume(v: ET.Element) -> VolumeInfo:
    """A <volume> element of `volume info --xml`, validated."""
    name = _text(v, "name")
    if not VOLUME_RE.fullmatch(name):
        raise BackendFailure(f"gluster volume info: bad volume name {name[:80]!r}")
    vid = _text(v, "id")
    if not UUID_RE.fullmatch(vid):
        raise BackendFailure(f"volume {name}: bad volume id {vid[:40]!r}")
    status = _int(v, "status")
    if status not in (STATUS_CREATED, STATUS_STARTED, STATUS_STOPPED):
        raise BackendFailure(f"volume {name}: unknown status {status}")
    bricks = []
    for b in v.findall("./bricks/brick"):
        bname = _text(b, "name")
        if not re.fullmatch(r"[^\s:]+:/\S*", bname):
            raise BackendFailure(f"volume {name}: bad brick {bname[:80]!r}")
        bricks.append(bname)
    options = {}
    for o in v.findall("./options/option"):
        options[_text(o, "name")] = _text(o, "value", "")
    return VolumeInfo(name, vid, status, bricks, options,
                      replica=max(1, _int(v, "replicaCount", 1)),
                      disperse=max(0, _int(v, "disperseCount", 0)),
                      redundancy=max(0, _int(v, "redundancyCount", 0)))


def _is_local_host(host: str) -> bool:
    """True if host resolves to an address of this host (it can be bound)."""
    try:
        addrs = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in addrs:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:])
    except OSError:
        return "(no log)"
