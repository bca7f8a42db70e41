"""Small helpers used across the engine and drivers (no D-Bus here)."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import AlreadyRunning, BackendFailure

log = logging.getLogger(__name__)

#: default timeout for one external command, seconds
DEFAULT_TIMEOUT = 60.0

_ACCOUNT_RE = re.compile(r"\b[A-Za-z_][A-Za-z0-9_.-]*@[A-Za-z0-9][A-Za-z0-9.:-]*")
_PATH_RE = re.compile(r"(?<![\w:])/[^\s'\"():,;]+")


def private_dir(path: str, mode: int = 0o700) -> None:
    """A directory sharedd owns: made with mode (whatever the umask), and
    tightened to it if it exists with more permissions (never loosened)."""
    os.makedirs(path, mode=mode, exist_ok=True)
    current = os.stat(path).st_mode & 0o777
    if current & ~mode:
        log.info("%s was mode %o; tightening it to %o", path, current, current & mode)
        os.chmod(path, current & mode)


def public_text(text: str, limit: int = 1000) -> str:
    """An error as every local user may read it (Backend Stats, hook records,
    signals): without accounts (user@host: the remote logins of a backend)
    or file paths (key files, state, pool layout). The log keeps the whole."""
    text = _ACCOUNT_RE.sub("<account>", text)
    text = _PATH_RE.sub("<path>", text)
    return text[:limit]


def ssh_argv(host: str, user: str, *, port: int = 22, key: str = "", known_hosts: str = "",
             options: Sequence[str] = ("-o", "BatchMode=yes")) -> List[str]:
    """ssh to user@host, up to the "--" after which the remote words follow
    (each quoted by the caller: ssh joins them for the remote shell). The
    host key must be known (StrictHostKeyChecking=yes: in known_hosts, or
    ssh's own file): an unknown or changed key refuses the connection."""
    argv = ["ssh", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
            "-p", str(port), "-l", user, *options]
    if key:
        argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
    return argv + ["--", host]


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
        check: bool = True, input: Optional[bytes] = None,
        env: Optional[Dict[str, str]] = None,
        new_session: bool = False) -> "subprocess.CompletedProcess[bytes]":
    """Run an argument vector (never a shell) with a timeout.

    Failures become BackendFailure naming the command and the tail of stderr;
    so does a command that writes more than MAX_OUTPUT (capture).
    new_session: start the command in a session (and process group) of its
    own and, on timeout, kill that whole group: helpers the command started
    (mount.nfs, glusterfs ...) must not outlive a command given up on.
    """
    argv = [str(a) for a in argv]
    log.debug("run: %s", argv)
    try:
        proc = capture(argv, timeout=timeout, input=input, env=env, new_session=new_session)
    except subprocess.TimeoutExpired:
        raise BackendFailure(f"{argv[0]} timed out after {timeout:g}s: "
                             f"{' '.join(argv)}") from None
    except OutputTooLarge as exc:
        raise BackendFailure(f"{' '.join(argv)}: {exc}") from None
    except OSError as exc:
        raise BackendFailure(f"cannot run {argv[0]}: {exc}") from None
    if check and proc.returncode != 0:
        raise command_failed(argv, proc)
    return proc


def command_failed(argv: Sequence[str], proc: "subprocess.CompletedProcess[bytes]") -> BackendFailure:
    """The error for a command that exited non-zero: the command and the
    tail of what it said."""
    err = (proc.stderr or proc.stdout or b"").decode(errors="replace")
    return BackendFailure(f"{' '.join(str(a) for a in argv)} failed (exit {proc.returncode}):"
                          f" {err.strip()[-500:]}")


#: bytes a command may write to its stdout, and to its stderr: what a
#: remote host's command says (over ssh) is read into the daemon's memory
MAX_OUTPUT = 64 << 20
#: seconds to wait for a killed command to be reaped (a task stuck in the
#: kernel dies only when its system call returns)
_REAP_TIMEOUT = 10.0


class OutputTooLarge(Exception):
    pass


def capture(argv: Sequence[str], *, timeout: float, input: Optional[bytes] = None,
            env: Optional[Dict[str, str]] = None, new_session: bool = False,
            limit: Optional[int] = None) -> "subprocess.CompletedProcess[bytes]":
    """subprocess.run(capture_output=True), with at most limit (MAX_OUTPUT)
    bytes read from each of stdout and stderr: beyond, OutputTooLarge. On
    that, a timeout (TimeoutExpired) or any other exception the command is
    killed (with new_session, its whole process group) and reaped. stdin is
    input, or nothing."""
    limit = MAX_OUTPUT if limit is None else limit
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=new_session)
    try:
        out, err = _communicate(proc, input or b"", timeout, limit)
    except BaseException:
        _kill(proc, argv[0], new_session)
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _communicate(proc: "subprocess.Popen[bytes]", data: bytes, timeout: float,
                 limit: int) -> Tuple[bytes, bytes]:
    deadline = time.monotonic() + timeout
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd, stdin = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    outputs = {out_fd: bytearray(), err_fd: bytearray()}
    with selectors.DefaultSelector() as sel:
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        if data:
            os.set_blocking(stdin, False)
            sel.register(stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        written = 0
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == stdin:
                    try:
                        written += os.write(fd, data[written:written + 65536])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        written = len(data)        # (it stopped reading: as communicate)
                    if written >= len(data):
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                outputs[fd] += chunk
                if len(outputs[fd]) > limit:
                    raise OutputTooLarge(f"wrote more than {limit} bytes to "
                                         f"{'stdout' if fd == out_fd else 'stderr'}; stopped")
    proc.stdout.close()
    proc.stderr.close()
    proc.wait(max(0.0, deadline - time.monotonic()))
    return bytes(outputs[out_fd]), bytes(outputs[err_fd])


def _kill(proc: "subprocess.Popen[bytes]", name: str, group: bool) -> None:
    try:
        if group:   # (the group id is the child's pid: grandchildren holding our pipes go too)
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass      # the child and every member of its group are gone already
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    try:
        proc.wait(_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.error("%s (pid %d) did not die within %gs of SIGKILL", name, proc.pid,
                  _REAP_TIMEOUT)


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


def lock_state_dir(path: str) -> int:
    """One daemon per state directory: an flock on <path>/sharedd.lock, taken
    before the database is touched; the holder's pid is in the file."""
    fd = os.open(os.path.join(path, "sharedd.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(f"another sharedd (pid {holder}) is using the state directory "
                             f"{path}; stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
