"""Small helpers used across the engine and drivers (no D-Bus here)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from typing import Optional, Sequence

from .errors import BackendFailure

log = logging.getLogger(__name__)

#: default timeout for one external command, seconds
DEFAULT_TIMEOUT = 60.0


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
        check: bool = True, input: Optional[bytes] = None,
        env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run an argument vector (never a shell) with a timeout.

    Failures become BackendFailure naming the command and the tail of stderr.
    """
    argv = [str(a) for a in argv]
    log.debug("run: %s", argv)
    try:
        proc = subprocess.run(argv, input=input, capture_output=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BackendFailure(f"{argv[0]} timed out after {timeout:g}s: "
                             f"{' '.join(argv)}") from None
    except OSError as exc:
        raise BackendFailure(f"cannot run {argv[0]}: {exc}") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout or b"").decode(errors="replace")
        raise BackendFailure(f"{' '.join(argv)} failed (exit {proc.returncode}):"
                             f" {err.strip()[-500:]}")
    return proc


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write data to path so that a reader sees the old or the new file, whole.

    Temporary names start with '.', so directory scanners can skip them.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_us() -> int:
    return int(time.time() * 1_000_000)


def unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (\\040 etc.) used in /proc/*/mountinfo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and all(c in "01234567" for c in field[i + 1:i + 4]):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> dict:
    """Map mount point -> (fstype, source, options) from mountinfo."""
    result = {}
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            rparts = right.split()
            if len(parts) < 6 or len(rparts) < 3:
                continue
            mp = unescape_mountinfo(parts[4])
            result[mp] = (rparts[0], unescape_mountinfo(rparts[1]),
                          parts[5] + "," + rparts[2])
    return result


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()
