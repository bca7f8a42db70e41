"""Data movers for share migration: a tree copy (rsync) and a btrfs
send/receive pipe, each with progress and cancel.

Both run their tools as argument vectors (never a shell), each tool in a
session (process group) of its own, and stream what the tools print (only
a bounded tail of stderr is kept, so memory stays flat however long a copy
runs). They

- call progress(bytes_done, bytes_expected) at most every PROGRESS_INTERVAL
  seconds and once at the end, with bytes_done never going down;
- look at cancel (a threading.Event) every POLL_INTERVAL seconds: when it is
  set, the tools' process groups get SIGTERM (rsync then removes its
  temporary file), SIGKILL after TERM_GRACE seconds, and are reaped, the
  step's partial work is removed and errors.Cancelled is raised;
- have no overall time limit (a large copy legitimately takes hours), but
  fail with BackendFailure when the tools show no activity for stall_timeout
  seconds: no output, no CPU time and no read/write counted in /proc for any
  process of the tools' trees (a tool blocked on a dead disk or a stopped
  process makes none).

They block: the engine runs them in worker threads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import select
import signal
import stat
import struct
import subprocess
import threading
import time
import uuid
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple

from . import util
from .drivers import btrfs_kernel
from .errors import BackendFailure, Cancelled

log = logging.getLogger(__name__)

#: progress(bytes done, bytes expected or None)
ProgressFn = Callable[[int, Optional[int]], None]

#: seconds between two progress reports (the engine persists some of them)
PROGRESS_INTERVAL = 0.1
#: seconds between two looks at the cancel event
POLL_INTERVAL = 0.1
#: default seconds without any activity after which a copy has failed
DEFAULT_STALL_TIMEOUT = 600.0
#: seconds between two samples of the tools' /proc counters while they are quiet
PROBE_INTERVAL = 5.0
#: seconds a tool has after SIGTERM to clean up before SIGKILL
TERM_GRACE = 5.0
#: seconds to wait for a SIGKILLed tool to be reaped
REAP_TIMEOUT = 10.0
#: bytes of each tool's stderr kept for the error message
STDERR_TAIL = 4000
#: bytes of it put in an error message
MESSAGE_TAIL = 500
#: bytes moved from send to receive at a time
CHUNK = 1 << 20
#: one read of a tool's text output (progress lines, stderr): a pipe holds
#: 64 KiB, and a larger request allocates its full size every time
TEXT_READ = 1 << 16
#: longest output line kept while waiting for its end (rsync's are short)
LINE_LIMIT = 1 << 16

#: what the tools see: messages in English, numbers without separators
_ENV = dict(os.environ, LC_ALL="C")


# --- processes ---------------------------------------------------------------------
class _Tool:
    """One tool in a process group of its own.

    The group is signalled only while the tool itself is not yet reaped: its
    (zombie) process keeps the group id from being reused, so a signal can
    never reach an unrelated group that later got the same number.
    """

    def __init__(self, argv: Sequence[str], *, stdin: Optional[int] = None,
                 stdout: Optional[int] = subprocess.PIPE):
        self.argv = [str(a) for a in argv]
        self.name = " ".join(self.argv[:2])
        self._err = bytearray()
        log.debug("transfer: starting %s", self.argv)
        try:
            self.proc = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout,
                                         stderr=subprocess.PIPE, env=_ENV,
                                         start_new_session=True)
        except OSError as exc:
            raise BackendFailure(f"cannot run {self.argv[0]}: {exc}") from None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def add_stderr(self, data: bytes) -> None:
        self._err += data
        if len(self._err) > STDERR_TAIL:
            del self._err[:-STDERR_TAIL]

    def error_text(self) -> str:
        text = bytes(self._err).decode(errors="replace").strip()
        return text[-MESSAGE_TAIL:] or "(no error output)"

    def finished(self) -> bool:
        """Whether the tool has exited (it is reaped then)."""
        return self.proc.poll() is not None

    def _exited_unreaped(self) -> bool:
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        return info is not None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """End the tool and everything it started; reap it, and wait (a
        while) until the processes it started are gone too. Idempotent."""
        if self.proc.returncode is None:
            started = [(pid, _start_time(pid)) for pid in _tree_pids(self.pid)[1:]]
            self._signal_group(signal.SIGTERM)
            self._signal_group(signal.SIGCONT)      # a stopped process acts on TERM only then
            # rsync's receiver removes its temporary file on TERM: let every
            # process finish before stragglers get KILL.
            deadline = time.monotonic() + TERM_GRACE
            while time.monotonic() < deadline and not (
                    self._exited_unreaped() and not any(_running(*p) for p in started)):
                time.sleep(0.02)
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not die within %gs of SIGKILL", self.name,
                          self.pid, REAP_TIMEOUT)
            # Those are reaped by whoever inherits them (init), soon after.
            deadline = time.monotonic() + REAP_TIMEOUT
            while any(_start_time(pid) == start for pid, start in started):
                if time.monotonic() > deadline:
                    log.error("processes started by %s are still there %gs after SIGKILL: %s",
                              self.name, REAP_TIMEOUT, [p for p, _ in started])
                    break
                time.sleep(0.02)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def _start_time(pid: int) -> Optional[int]:
    """When pid started (clock ticks since boot; None: no such process):
    with the pid, it names one process, whatever reuses the number later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int, start: Optional[int]) -> bool:
    """Whether the process that started at start still runs (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0] != b"Z" and int(fields[19]) == start
    except (OSError, ValueError, IndexError):
        return False


def _tree_pids(root: int, limit: int = 64) -> List[int]:
    """root and its descendants (/proc/PID/task/TID/children), at most limit."""
    pids: List[int] = []
    todo = [root]
    while todo and len(pids) < limit:
        pid = todo.pop()
        pids.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return pids


def _activity_sample(roots: Sequence[int]) -> Tuple[Tuple[int, int, int, int], ...]:
    """(pid, cpu ticks, bytes read, bytes written) of every process of the trees."""
    sample = []
    for pid in sorted(p for r in roots for p in _tree_pids(r)):
        ticks = rchar = wchar = 0
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])     # utime, stime
            with open(f"/proc/{pid}/io", "rb") as f:
                for line in f:
                    key, _, value = line.partition(b":")
                    if key == b"rchar":
                        rchar = int(value)
                    elif key == b"wchar":
                        wchar = int(value)
        except (OSError, ValueError, IndexError):
            pass
        sample.append((pid, ticks, rchar, wchar))
    return tuple(sample)


class _Watchdog:
    """Fails a copy that shows no activity for stall_timeout seconds."""

    def __init__(self, what: str, tools: Sequence[_Tool], stall_timeout: float):
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.what = what
        self.tools = tools
        self.stall_timeout = stall_timeout
        self.probe_interval = min(PROBE_INTERVAL, stall_timeout / 4)
        self.last = self.last_probe = time.monotonic()
        self.sample: Optional[Tuple[Tuple[int, int, int, int], ...]] = None

    def touch(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.probe_interval and now - self.last_probe >= self.probe_interval:
            self.last_probe = now
            sample = _activity_sample([t.pid for t in self.tools if t.proc.returncode is None])
            if sample != self.sample:
                self.sample = sample
                self.last = now
        if now - self.last > self.stall_timeout:
            raise BackendFailure(f"{self.what} made no progress for {self.stall_timeout:g}s; "
                                 "given up")


class _Reporter:
    """progress() at most every PROGRESS_INTERVAL seconds, never going back."""

    def __init__(self, progress: ProgressFn):
        self.progress = progress
        self.done = 0
        self.expected: Optional[int] = None
        self.last = 0.0

    def update(self, done: int, expected: Optional[int], force: bool = False) -> None:
        self.done = max(self.done, done)
        self.expected = None if expected is None else max(expected, self.done)
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.progress(self.done, self.expected)


def _check_cancel(cancel: threading.Event, what: str) -> None:
    if cancel.is_set():
        raise Cancelled(f"{what} cancelled")


def _wait_exit(tools: Sequence[_Tool], cancel: threading.Event, what: str,
               watchdog: _Watchdog) -> None:
    """Wait until every tool has exited, still answering cancel and stalls."""
    while not all(t.finished() for t in tools):
        _check_cancel(cancel, what)
        watchdog.check()
        time.sleep(POLL_INTERVAL / 2)


def _fd(pipe: Optional[IO[bytes]]) -> int:
    assert pipe is not None
    return pipe.fileno()


# --- rsync -----------------------------------------------------------------------
#: rsync --info=progress2: "  1234567  12%  1.00MB/s  0:00:01 (xfr#1, to-chk=5/10)"
_PROGRESS_RE = re.compile(rb"^\s*(\d+)\s+(\d+)%")
_STAT_RE = re.compile(rb"^(Total file size|Total transferred file size):\s*(\d+)")
#: exit code of rsync when source files vanished while it ran
RSYNC_VANISHED = 24


def _real_dir(path: str, what: str) -> str:
    """path, absolute; a directory itself (not a symlink to one)."""
    if not path or "\0" in path:
        raise BackendFailure(f"{what} path {path!r} is not a directory")
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise BackendFailure(f"{what} {path} is not there: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BackendFailure(f"{what} {path} is not a directory")
    return path


def rsync_argv(src: str, dst: str, rsync: str = "rsync") -> List[str]:
    """The rsync command copy_tree runs: dst's tree made equal to src's.

    -a copies symlinks as symlinks (never follows one, in or out of the
    tree), permissions, times, owners and groups, devices and specials;
    -H hard links, -A ACLs, -X xattrs, --numeric-ids owners by number (the
    ids are the clients'), -S keeps sparse files sparse (a share's quota
    counts allocated blocks), --delete removes what src no longer has.
    --no-inc-recursive builds the whole file list first, so the percentage
    is of the whole tree; flist2 prints while it is built (a sign of
    life), --outbuf=N passes progress lines on as they come.
    """
    return [rsync, "-aHAXS", "--numeric-ids", "--delete", "--no-inc-recursive",
            "--info=progress2,flist2,stats2", "--no-human-readable", "--outbuf=N",
            "--", src.rstrip("/") + "/", dst.rstrip("/") + "/"]


def copy_tree(src: str, dst: str, *, progress: ProgressFn, cancel: threading.Event,
              expected: Optional[int] = None,
              stall_timeout: float = DEFAULT_STALL_TIMEOUT,
              vanished_ok: bool = True, rsync: str = "rsync") -> int:
    """Make the tree under dst equal to the tree under src; return the bytes
    of file data copied (rsync's "Total transferred file size").

    Meant to run twice: live while src still changes, then once src is
    read-only; the second run copies only the files that changed since
    (rsync's quick check: size and modification time, nanoseconds
    included), and deletes in dst what src lost. Both src and dst must
    exist and be directories (not symlinks). A file that vanishes from src
    while the copy runs (rsync exit 24) is not an error when vanished_ok
    (the next run settles it).

    progress gets the bytes copied so far and, as the expected total, the
    caller's expected or else an estimate: the size of the whole tree, from
    rsync's percentage (an upper bound: a second run copies less). The last
    report is (copied, copied).

    On cancel rsync is stopped (it removes its temporary file; a file of a
    killed rsync is removed by the next run's --delete or with the share)
    and Cancelled is raised; the files already copied stay in dst.
    """
    src = _real_dir(src, "copy source")
    dst = _real_dir(dst, "copy destination")
    what = f"copy of {src} to {dst}"
    report = _Reporter(progress)
    tool = _Tool(rsync_argv(src, dst, rsync))
    watchdog = _Watchdog(what, [tool], stall_timeout)
    stats: Dict[bytes, int] = {}
    estimate: Optional[int] = None
    try:
        out, err = _fd(tool.proc.stdout), _fd(tool.proc.stderr)
        poller = select.poll()
        open_fds = {out, err}
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        partial = b""
        while open_fds:
            _check_cancel(cancel, what)
            for fd, _ in poller.poll(int(POLL_INTERVAL * 1000)):
                data = os.read(fd, TEXT_READ)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                watchdog.touch()
                if fd == err:
                    tool.add_stderr(data)
                    continue
                # Progress lines end with \r, the rest with \n.
                lines = (partial + data).replace(b"\r", b"\n").split(b"\n")
                partial = lines.pop()
                if len(partial) > LINE_LIMIT:
                    partial = b""
                for line in lines:
                    m = _PROGRESS_RE.match(line)
                    if m:
                        done, pct = int(m.group(1)), int(m.group(2))
                        if pct > 0:
                            estimate = done * 100 // pct
                        report.update(done, expected if expected is not None else estimate)
                        continue
                    s = _STAT_RE.match(line)
                    if s:
                        stats[s.group(1)] = int(s.group(2))
            watchdog.check()
        _wait_exit([tool], cancel, what, watchdog)
    finally:
        tool.stop()
    rc = tool.proc.returncode
    if rc == RSYNC_VANISHED and vanished_ok:
        log.info("%s: some source files vanished while it ran (rsync exit 24)", what)
    elif rc != 0:
        raise BackendFailure(f"{what} failed (rsync exit {rc}): {tool.error_text()}")
    copied = stats.get(b"Total transferred file size", report.done)
    report.update(copied, copied, force=True)
    return copied


# --- btrfs subvolumes ------------------------------------------------------------
_IOC_GET_SUBVOL_INFO = (2 << 30) | (504 << 16) | (0x94 << 8) | 60   # struct of 504 bytes
_IOC_SUBVOL_GETFLAGS = (2 << 30) | (8 << 16) | (0x94 << 8) | 25
_SUBVOL_RDONLY = 1 << 1
_UUID_OFFSETS = (296, 312, 328)        # uuid, parent_uuid, received_uuid


@dataclasses.dataclass(frozen=True)
class SubvolumeInfo:
    """What the kernel tells of a subvolume; a uuid is "" when unset."""
    uuid: str
    parent_uuid: str
    received_uuid: str
    readonly: bool

    @property
    def stream_uuid(self) -> str:
        """The uuid a send of this subvolume carries (btrfs send: the
        received uuid if the subvolume was itself received, else its own)."""
        return self.received_uuid or self.uuid


def _uuid_at(raw: bytes, offset: int) -> str:
    value = raw[offset:offset + 16]
    return "" if value == bytes(16) else str(uuid.UUID(bytes=value))


def subvolume_info(path: str) -> SubvolumeInfo:
    """The subvolume whose root is path (BTRFS_IOC_GET_SUBVOL_INFO and
    SUBVOL_GETFLAGS, kernel 4.18+). Raises OSError from the kernel."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        args = bytearray(504)
        fcntl.ioctl(fd, _IOC_GET_SUBVOL_INFO, args)
        flags = bytearray(8)
        fcntl.ioctl(fd, _IOC_SUBVOL_GETFLAGS, flags)
    finally:
        os.close(fd)
    raw = bytes(args)
    own, parent, received = (_uuid_at(raw, o) for o in _UUID_OFFSETS)
    return SubvolumeInfo(uuid=own, parent_uuid=parent, received_uuid=received,
                         readonly=bool(struct.unpack("=Q", flags)[0] & _SUBVOL_RDONLY))


def _is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == btrfs_kernel.SUBVOL_INO


def is_received(path: str, snapshot: str) -> bool:
    """Whether path is a complete receive of snapshot (both local).

    btrfs receive creates the subvolume writable and, only after the
    stream's end command, sets its received uuid (the stream's uuid: the
    snapshot's own, or its received uuid) and then makes it read-only; a
    stream cut anywhere, even between two commands, leaves it writable
    without a received uuid (tests/test_transfer.py checks both). So a
    read-only subvolume with that received uuid was received to the end; one
    that is writable or carries another uuid is a partial or a stale one.
    """
    if not _is_subvolume(path):
        return False
    try:
        got, want = subvolume_info(path), subvolume_info(snapshot)
    except OSError:
        return False
    return got.readonly and got.received_uuid == want.stream_uuid != ""


class _Destination:
    """Where btrfs receive runs: here, or behind receive_prefix (e.g. ssh),
    where the same questions are asked with btrfs-progs through the prefix."""

    def __init__(self, prefix: Sequence[str], btrfs: str, timeout: float):
        self.prefix = [str(a) for a in prefix]
        self.btrfs = btrfs
        self.timeout = timeout

    def received_uuid(self, path: str) -> Optional[str]:
        """None if nothing complete is at path; else its received uuid."""
        if not self.prefix:
            if not _is_subvolume(path):
                return None
            try:
                info = subvolume_info(path)
            except OSError:
                return None
            return info.received_uuid if info.readonly and info.received_uuid else None
        proc = util.run(self.prefix + [self.btrfs, "subvolume", "show", path],
                        timeout=self.timeout, check=False, new_session=True)
        if proc.returncode != 0:
            return None
        text = proc.stdout.decode(errors="replace")
        rec = re.search(r"^\s*Received UUID:\s*(\S+)", text, re.M)
        flags = re.search(r"^\s*Flags:\s*(.*)$", text, re.M)
        if not rec or rec.group(1) == "-" or not flags or "readonly" not in flags.group(1):
            return None
        return rec.group(1)

    def exists(self, path: str) -> bool:
        if not self.prefix:
            return os.path.lexists(path)
        proc = util.run(self.prefix + ["test", "-e", path], timeout=self.timeout,
                        check=False, new_session=True)
        return proc.returncode == 0

    def delete(self, path: str) -> None:
        """Delete the subvolume at path (gone is fine)."""
        if not self.prefix:
            if not os.path.lexists(path):
                return
            if not _is_subvolume(path):
                raise BackendFailure(f"{path} is not a subvolume; not deleting it")
            try:
                btrfs_kernel.delete_subvolume(path)
            except OSError as exc:
                raise BackendFailure(f"subvolume delete {path}: {exc.strerror or exc}") from None
            return
        if self.exists(path):
            util.run(self.prefix + [self.btrfs, "subvolume", "delete", "--commit-after", path],
                     timeout=self.timeout, new_session=True)


def btrfs_send_receive(snapshot: str, dest_dir: str, *, parent: Optional[str] = None,
                       progress: ProgressFn, cancel: threading.Event,
                       expected: Optional[int] = None,
                       receive_prefix: Sequence[str] = (),
                       stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                       btrfs: str = "btrfs", command_timeout: float = 120.0) -> str:
    """Send the read-only snapshot (incrementally from parent, if given: a
    read-only snapshot already received at the destination) and receive it
    in dest_dir; return the received subvolume, dest_dir/<snapshot's name>.

    `btrfs send` feeds this process, which counts the bytes (progress:
    stream bytes, of expected if given) and writes them to `btrfs receive`,
    run behind receive_prefix (an argument vector such as ["ssh", host,
    "--"]; the subvolume checks and deletes then run behind it too).

    Replays: a subvolume already at the target that is a complete receive of
    this snapshot (see is_received: read-only, received uuid = the
    snapshot's) is returned as it is; anything else there (a partial receive,
    a receive of another snapshot of that name) is deleted and received anew.

    On failure or cancel both tools are stopped and reaped and what was
    received is deleted (a receive whose send failed is deleted too: a
    stream cut short can look finished to btrfs receive). Raises Cancelled
    or BackendFailure (the tools' stderr tail).
    """
    snapshot = os.path.abspath(snapshot)
    name = os.path.basename(snapshot)
    target = os.path.join(dest_dir, name)
    what = f"btrfs send of {snapshot} to {dest_dir}"
    dest = _Destination(receive_prefix, btrfs, command_timeout)
    infos = {}
    for role, path in (("snapshot", snapshot), ("parent", parent)):
        if path is None:
            continue
        try:
            infos[role] = subvolume_info(path)
        except OSError as exc:
            raise BackendFailure(f"{what}: {role} {path} is not a subvolume: "
                                 f"{exc.strerror or exc}") from None
        if not infos[role].readonly:
            raise BackendFailure(f"{what}: {role} {path} is not read-only")
    if not dest.prefix:
        _real_dir(dest_dir, "receive directory")
    stream_uuid = infos["snapshot"].stream_uuid
    report = _Reporter(progress)
    have = dest.received_uuid(target)
    if have == stream_uuid:
        log.info("%s: %s was received already", what, target)
        report.update(0, 0, force=True)
        return target
    if dest.exists(target):
        log.warning("%s: deleting %s, left by an unfinished or other receive", what, target)
        dest.delete(target)
    _check_cancel(cancel, what)

    send = _Tool([btrfs, "send", "-q", *(["-p", parent] if parent else []), snapshot])
    try:
        recv = _Tool([*dest.prefix, btrfs, "receive", dest_dir], stdin=subprocess.PIPE,
                     stdout=subprocess.DEVNULL)
    except BaseException:
        send.stop()
        raise
    tools = [send, recv]
    try:
        _pipe(send, recv, cancel, what, report, expected, _Watchdog(what, tools, stall_timeout))
        failed = [t for t in (recv, send) if t.proc.returncode != 0]
        if failed:
            raise BackendFailure(f"{what} failed: " + "; ".join(
                f"{t.name} exit {t.proc.returncode}: {t.error_text()}" for t in failed))
        if dest.received_uuid(target) != stream_uuid:
            raise BackendFailure(f"{what}: btrfs receive ended but {target} is not a "
                                 "complete read-only copy of the snapshot")
    except BaseException:
        for t in tools:
            t.stop()
        try:
            dest.delete(target)
        except BackendFailure as exc:
            log.error("%s: cannot delete the partial receive: %s", what, exc)
        raise
    report.update(report.done, report.done, force=True)
    return target


def _pipe(send: _Tool, recv: _Tool, cancel: threading.Event, what: str,
          report: _Reporter, expected: Optional[int], watchdog: _Watchdog) -> None:
    """Copy send's stdout to recv's stdin until send ends or recv stops
    reading; collect both stderrs; wait for both to exit."""
    out, into = _fd(send.proc.stdout), _fd(recv.proc.stdin)
    errs = {_fd(send.proc.stderr): send, _fd(recv.proc.stderr): recv}
    os.set_blocking(into, False)        # a slow receive must not block cancel
    # splice(2) moves the stream pipe to pipe inside the kernel: counted, never
    # copied into this process (no per-read buffer, no CPU for the bytes).
    waiting_for_data = True             # else: for room in receive's pipe
    send_open, recv_open = True, True
    while send_open or recv_open or errs:
        _check_cancel(cancel, what)
        poller = select.poll()
        if send_open and recv_open:
            if waiting_for_data:
                poller.register(out, select.POLLIN)
            else:
                poller.register(into, select.POLLOUT)
        for fd in errs:
            poller.register(fd, select.POLLIN)
        for fd, ev in poller.poll(int(POLL_INTERVAL * 1000)):
            if fd in errs:
                data = os.read(fd, TEXT_READ)
                if data:
                    errs[fd].add_stderr(data)
                else:
                    del errs[fd]
            elif fd in (out, into) and send_open and recv_open:
                try:
                    # (Python 3.10+; this mypy's typeshed predates it)
                    n = os.splice(out, into, CHUNK,  # type: ignore[attr-defined]
                                  flags=os.SPLICE_F_NONBLOCK)  # type: ignore[attr-defined]
                except BlockingIOError:
                    # ready for data but no room, or room but no data yet
                    waiting_for_data = fd == into
                    continue
                except BrokenPipeError:
                    # receive gave up (its stderr says why): nothing reads
                    # send's output any more, so send is stopped
                    recv_open, send_open = False, False
                    errs.pop(_fd(send.proc.stderr), None)
                    send.stop()
                    continue
                if n == 0:
                    send_open = False           # the end of send's stream
                    continue
                waiting_for_data = True
                watchdog.touch()
                report.update(report.done + n, expected)
        if recv_open and not send_open:
            assert recv.proc.stdin is not None
            recv.proc.stdin.close()     # the end of the stream
            recv_open = False
        watchdog.check()
    _wait_exit([send, recv], cancel, what, watchdog)
