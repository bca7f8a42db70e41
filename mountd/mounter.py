"""Mount and unmount shares with argument vectors (never a shell).

Mounter is what the Reconciler calls; it runs blocking commands with
timeouts and is used from a worker thread. The argument vectors are built
by pure functions so tests can check them and real end-to-end tests can run
the real thing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import List, Optional, Sequence, Set, Tuple

from sharedd.errors import BackendFailure, InvalidArgument
from sharedd.record import EXPORT_RE
from sharedd.util import run

from .config import option_allowed
from .state import MountEntry, read_mountinfo, top_mounts

log = logging.getLogger(__name__)

MOUNT = "mount"
UMOUNT = "umount"
GLUSTERFS = "glusterfs"
#: seconds a glusterfs mount may take to connect before it counts as refused
GLUSTERFS_SETTLE = 15.0


def _check_export(export: str) -> Tuple[str, str]:
    """(host, path) of host:/path; anything else (an export starting with '-',
    carrying ',' or a newline) could be read as options: refused."""
    m = re.fullmatch(EXPORT_RE, export)
    if not m:
        raise InvalidArgument(f"refusing export {export[:100]!r}: not host:/path")
    host = m.group(1)
    return host.strip("[]"), export[len(host) + 1:]


def _check_options(fstype: str, options: Sequence[str]) -> None:
    for opt in options:
        if not option_allowed(fstype, opt):
            raise InvalidArgument(f"refusing {fstype} mount option {opt[:100]!r}")


def _check_mount_point(mp: str) -> None:
    if not mp.startswith("/") or "\n" in mp or "," in mp:
        raise InvalidArgument(f"refusing mount point {mp[:100]!r}")


class NestedMounts(BackendFailure):
    """A busy mount point has mounts inside it: a lazy unmount would detach
    them too, so mountd leaves it mounted and tries again later."""

    def __init__(self, message: str, nested: Sequence[str]):
        super().__init__(message)
        self.nested = tuple(nested)


_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _below(path: str, top: str) -> bool:
    return top == "/" or path.startswith(top.rstrip("/") + "/")


def check_no_symlinks(mount_dir: str, mount_point: str) -> None:
    """Refuse mount_point unless it lies below mount_dir and no component of
    its path is a symlink (or not a directory).

    mount(8) and umount(8) follow symlinks: whoever could replace a directory
    on the way with a symlink could make root mount over, or detach, any
    path. The walk starts at / and opens one component at a time relative to
    the last, never following a symlink. mount_dir is resolved first, as the
    Reconciler does (an administrator may configure a symlinked mount_dir).
    """
    top = os.path.realpath(mount_dir)
    mp = mount_point
    if os.path.normpath(mp) != mp:
        # The commands get this very string: "link/.." would be resolved
        # by the kernel after the walk checked something else.
        raise InvalidArgument(f"refusing mount point {mp[:100]!r}: not a normalized path")
    if not mp.startswith("/") or mp == top or not _below(mp, top):
        raise InvalidArgument(f"refusing mount point {mp[:100]!r}: not below {top}")
    fd = os.open("/", _WALK_FLAGS)
    walked = ""
    try:
        for part in mp.split("/")[1:]:
            walked += "/" + part
            try:
                nfd = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    what = ("a symlink" if os.path.islink(walked) else "not a directory")
                    raise InvalidArgument(f"refusing mount point {mp[:100]!r}: "
                                          f"{walked[:100]} is {what}") from None
                raise BackendFailure(f"cannot open {walked}: {exc.strerror}") from None
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def mounts_below(mount_point: str, entries: Optional[List[MountEntry]] = None) -> List[str]:
    """Mount points strictly inside mount_point, in kernel order."""
    entries = read_mountinfo() if entries is None else entries
    out: List[str] = []
    for e in entries:
        if e.mount_point != mount_point and _below(e.mount_point, mount_point) \
                and e.mount_point not in out:
            out.append(e.mount_point)
    return out


def nfs_argv(export: str, mount_point: str, level: str, options: Sequence[str],
             fstype: str = "nfs4", nosuid_nodev: bool = True) -> List[str]:
    _check_export(export)
    _check_mount_point(mount_point)
    _check_options(fstype, options)
    if level not in ("ro", "rw") or fstype not in ("nfs", "nfs4"):
        raise InvalidArgument("bad level or file system type")
    opts = [level] + (["nosuid", "nodev"] if nosuid_nodev else []) + list(options)
    return [MOUNT, "-t", fstype, "-o", ",".join(opts), "--", export, mount_point]


def glusterfs_argv(export: str, mount_point: str, level: str, options: Sequence[str],
                   cert_required: bool = False, cert: str = "", key: str = "",
                   ca: str = "", log_file: str = "") -> List[str]:
    server, path = _check_export(export)
    _check_mount_point(mount_point)
    _check_options("glusterfs", options)
    if level not in ("ro", "rw"):
        raise InvalidArgument("bad level")
    volume, _, subdir = path.strip("/").partition("/")
    if not volume:
        raise InvalidArgument(f"refusing export {export!r}: no volume name")
    argv = [GLUSTERFS, f"--volfile-server={server}", f"--volfile-id={volume}"]
    if subdir:
        argv.append(f"--subdir-mount=/{subdir}")
    if level == "ro":
        argv.append("--read-only")
    for opt in options:
        argv.append(f"--{opt}")
    if log_file:
        argv.append(f"--log-file={log_file}")
    if cert_required:
        if not (cert and key):
            raise InvalidArgument("the share requires a client certificate and none is configured")
        argv.append(f"--xlator-option=*-client-*.transport.socket.ssl-own-cert={cert}")
        argv.append(f"--xlator-option=*-client-*.transport.socket.ssl-private-key={key}")
        if ca:
            argv.append(f"--xlator-option=*-client-*.transport.socket.ssl-ca-list={ca}")
    argv.append(mount_point)
    return argv


def restrict_argv(mount_point: str, level: str, nosuid_nodev: bool) -> List[str]:
    """Per-mount-point flags (a bind remount changes only this mount)."""
    _check_mount_point(mount_point)
    opts = ["remount", "bind", level] + (["nosuid", "nodev"] if nosuid_nodev else [])
    return [MOUNT, "-o", ",".join(opts), "--", mount_point]


class Mounter:
    """The real thing: mount(8), umount(8), glusterfs(8).

    Every command runs in a session of its own, so a timeout kills the
    helpers it started too (mount.nfs, glusterfs). With mount_dir set, each
    mount point must lie below it and is walked without following symlinks
    before a command touches it.
    """

    def __init__(self, *, timeout: float = 60.0, nosuid_nodev: bool = True,
                 glusterfs_cert: str = "", glusterfs_key: str = "", glusterfs_ca: str = "",
                 glusterfs_log_dir: str = "", mount_dir: str = ""):
        self.timeout = timeout
        self.mount_dir = mount_dir
        # Empty: glusterfs's default log (/var/log/glusterfs/<mount point>.log).
        self.glusterfs_log_dir = glusterfs_log_dir
        self.nosuid_nodev = nosuid_nodev
        self.cert, self.key, self.ca = glusterfs_cert, glusterfs_key, glusterfs_ca

    def argv(self, d, mount_point: str) -> List[str]:
        if d.fstype in ("nfs", "nfs4"):
            return nfs_argv(d.export, mount_point, d.level, d.options, d.fstype, self.nosuid_nodev)
        if d.fstype == "glusterfs":
            log_file = (os.path.join(self.glusterfs_log_dir, os.path.basename(mount_point) + ".log")
                        if self.glusterfs_log_dir else "")
            return glusterfs_argv(d.export, mount_point, d.level, d.options, d.cert_required,
                                  self.cert, self.key, self.ca, log_file)
        raise InvalidArgument(f"mountd does not mount {d.fstype}")

    def required_flags(self) -> Sequence[str]:
        return ("nosuid", "nodev") if self.nosuid_nodev else ()

    def kernel_fstypes(self, fstype: str) -> Optional[Set[str]]:
        """File system types mountinfo shows for a mount of fstype."""
        return {"nfs": {"nfs", "nfs4"}, "nfs4": {"nfs4", "nfs"},
                "glusterfs": {"fuse.glusterfs"}}.get(fstype, set())

    def _run(self, argv: Sequence[str], timeout: Optional[float] = None,
             check: bool = True) -> None:
        run(argv, timeout=self.timeout if timeout is None else timeout, check=check,
            new_session=True)

    def _check_path(self, mount_point: str, unmounting: bool = False) -> None:
        _check_mount_point(mount_point)
        if not self.mount_dir:
            return
        top = os.path.realpath(self.mount_dir)
        if unmounting and not _below(os.path.normpath(mount_point), top):
            # A mount made under an earlier mount_dir must still come off;
            # its path is still walked without following symlinks.
            top = "/"
        check_no_symlinks(top, mount_point)

    def mount(self, d, mount_point: str) -> None:
        argv = self.argv(d, mount_point)
        self._check_path(mount_point)
        self._run(argv)
        if d.fstype == "glusterfs":
            self._wait_glusterfs(d.export, mount_point)

    def _wait_glusterfs(self, export: str, mount_point: str) -> None:
        """glusterfs exits 0 even when the server refuses the client (the
        FUSE mount then answers ENOTCONN or vanishes): wait until the mount
        is there and answers statfs, else detach it and fail."""
        deadline = time.monotonic() + min(self.timeout, GLUSTERFS_SETTLE)
        last = "nothing mounted"
        while True:
            entry = top_mounts(read_mountinfo()).get(mount_point)
            if entry is not None and entry.fstype in self.kernel_fstypes("glusterfs"):
                try:
                    self._run(["stat", "-f", "--", mount_point],
                              timeout=max(1.0, deadline - time.monotonic()))
                    return
                except BackendFailure as exc:
                    last = str(exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if entry is not None and entry.fstype in self.kernel_fstypes("glusterfs"):
            self._run([UMOUNT, "-l", "--", mount_point], check=False)
        raise BackendFailure(f"glusterfs mount of {export} at {mount_point} did not come up "
                             f"(refused by the server? see /var/log/glusterfs/): {last[-300:]}")

    def probe(self, mount_point: str, timeout: float) -> None:
        """Raise BackendFailure unless the mount answers within timeout (a
        statfs in a child: a dead server blocks the child, never mountd)."""
        self._check_path(mount_point)
        run(["stat", "-f", "--", mount_point], timeout=timeout, new_session=True)

    def restrict(self, mount_point: str, level: str) -> None:
        argv = restrict_argv(mount_point, level, self.nosuid_nodev)
        self._check_path(mount_point)
        self._run(argv)

    def remount(self, d, mount_point: str) -> None:
        """Change the access level in place (NFS); glusterfs must mount again."""
        if d.fstype not in ("nfs", "nfs4"):
            raise NotImplementedError
        if d.level not in ("ro", "rw"):
            raise InvalidArgument("bad level")
        self._check_path(mount_point)
        self._run([MOUNT, "-o", f"remount,{d.level}", "--", mount_point])

    def unmount(self, mount_point: str, revoking: bool = False) -> str:
        """'clean', or 'lazy' when a plain unmount failed or hung (logged).

        A lazy unmount detaches every mount inside the share too (a user's
        FUSE mount, a bind mount): with mounts below it, NestedMounts is
        raised instead and the mount stays until a later attempt succeeds,
        unless access to it is being withdrawn (revoking): any local user
        who may write in the share may mount something inside it, and
        revocation wins.
        """
        self._check_path(mount_point, unmounting=True)
        try:
            self._run([UMOUNT, "--", mount_point])
            return "clean"
        except BackendFailure as exc:
            failure = exc
        nested = mounts_below(os.path.normpath(mount_point))
        shown = ", ".join(nested[:5]) + (f" and {len(nested) - 5} more" if len(nested) > 5 else "")
        if nested and not revoking:
            raise NestedMounts(f"cannot unmount {mount_point} ({failure}); not detaching it "
                               f"lazily because mounts inside it would go too: {shown}", nested)
        self._run([UMOUNT, "-l", "--", mount_point])
        log.warning("unmount of %s failed (%s); detached it lazily (umount -l)%s",
                    mount_point, failure,
                    f", access to it being withdrawn, with the mounts inside it: {shown}"
                    if nested else "")
        return "lazy"

    def detach(self, mount_point: str) -> None:
        """The topmost mount at mount_point detached lazily (a mount covering
        a share's)."""
        self._check_path(mount_point, unmounting=True)
        self._run([UMOUNT, "-l", "--", mount_point])
