"""Reading the spool tree safely (mountd's engine side: no D-Bus, no inotify).

The spool may come from another host over a network file system, so nothing
in it is trusted: names must match the record layout, host directories must
be real directories, record files must be regular files owned by an allowed
uid and no larger than sharedd.record.MAX_RECORD_BYTES, the content must
validate against the record schema, and the file name and directory must
agree with the record's seq, phase, method and host. Anything else raises
SpoolFileRejected, never a generic error.

Opening is careful: the host directory is opened with O_NOFOLLOW and the file
relative to it; the file is lstat-ed first so a FIFO or device node is never
opened (opening a device can have side effects), then opened with
O_NOFOLLOW|O_NONBLOCK and fstat-ed again (same inode, regular file).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Any, Dict, FrozenSet, Iterable, List, NamedTuple, Optional

from sharedd import record as rec
from sharedd.errors import InvalidArgument

DEFAULT_ALLOWED_UIDS: FrozenSet[int] = frozenset({0})


class SpoolFileRejected(InvalidArgument):
    """A spool entry that must not be used; reason says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class RecordFile(NamedTuple):
    seq: int
    phase: str
    method: str
    name: str
    path: str


def parse_file_name(name: str) -> Optional[RecordFile]:
    """(seq, phase, method) of a record file name, None for anything else
    (temporary dot files, stray files)."""
    m = rec.FILE_NAME_RE.fullmatch(name)
    if not m:
        return None
    return RecordFile(int(m.group(1)), m.group(2), m.group(3), name, name)


def is_host_id(name: str) -> bool:
    # fullmatch: re.search with '$' would let a trailing newline through.
    return re.fullmatch(rec.HOST_ID_RE, name) is not None


def list_host_dirs(spool_dir: str, missing_ok: bool = True,
                   allowed_uids: Optional[Iterable[int]] = None) -> List[str]:
    """Host ids under spool_dir: directories (not symlinks) with valid names,
    sorted; only those writable by their owner alone and, with allowed_uids,
    owned by one of them (a local user who can write the spool cannot make
    mountd read directories of their own). A missing spool_dir is an empty
    spool if missing_ok (else FileNotFoundError: mountd tells "no records
    yet" from "records gone")."""
    uids = None if allowed_uids is None else frozenset(allowed_uids)
    hosts = []
    try:
        with os.scandir(spool_dir) as it:
            for entry in it:
                if not (is_host_id(entry.name) and entry.is_dir(follow_symlinks=False)):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if (uids is not None and st.st_uid not in uids) \
                        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    continue
                hosts.append(entry.name)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return []
    return sorted(hosts)


def list_records(host_dir: str, after_seq: int = 0, missing_ok: bool = True) -> List[RecordFile]:
    """Record files of one host directory in sequence order, skipping
    temporary files (names starting with '.') and anything not named like a
    record; only seq > after_seq. Names only: read_record checks the rest."""
    found = []
    try:
        with os.scandir(host_dir) as it:
            for entry in it:
                rf = parse_file_name(entry.name)
                if rf is not None and rf.seq > after_seq:
                    found.append(rf._replace(path=os.path.join(host_dir, entry.name)))
    except FileNotFoundError:
        if not missing_ok:
            raise
        return []
    found.sort(key=lambda r: (r.seq, r.name))
    return found


def latest_periodic(records: Iterable[RecordFile]) -> Optional[RecordFile]:
    """The newest periodic record file among records (by seq)."""
    best = None
    for rf in records:
        if rf.phase == "periodic" and (best is None or rf.seq > best.seq):
            best = rf
    return best


def _check_owner(path: str, st: os.stat_result, allowed_uids: Optional[FrozenSet[int]]) -> None:
    if allowed_uids is not None and st.st_uid not in allowed_uids:
        raise SpoolFileRejected(path, f"owned by uid {st.st_uid}, not by one of "
                                      f"{sorted(allowed_uids)}")


def read_record(path: str, allowed_uids: Optional[Iterable[int]] = DEFAULT_ALLOWED_UIDS,
                full: bool = True) -> Dict[str, Any]:
    """Read, check and parse one spool file; raise SpoolFileRejected.

    full=False checks only what orders and folds the record
    (sharedd.record.check_meta): the caller validates it in full before
    acting on it.

    allowed_uids: owners accepted for the file and its host directory
    (default root only); None skips ownership checks, for file systems
    that do not preserve ownership.
    """
    uids = None if allowed_uids is None else frozenset(allowed_uids)
    host_dir, name = os.path.split(path)
    host = os.path.basename(host_dir)
    named = parse_file_name(name)
    if named is None:
        raise SpoolFileRejected(path, "name is not <20-digit seq>-<phase>-<method>.json")
    if not is_host_id(host):
        raise SpoolFileRejected(path, f"directory name {host[:80]!r} is not a host id")
    try:
        dfd = os.open(host_dir or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        reason = "host directory is a symbolic link" if exc.errno in (errno.ELOOP, errno.ENOTDIR) \
            else f"cannot open host directory: {exc.strerror}"
        raise SpoolFileRejected(path, reason) from None
    try:
        dst = os.fstat(dfd)
        _check_owner(host_dir, dst, uids)
        if dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SpoolFileRejected(path, "host directory is writable by group or others")
        data = _read_file(path, name, dfd, uids)
    finally:
        os.close(dfd)
    try:
        record = rec.loads(data, full)
    except rec.RecordError as exc:
        raise SpoolFileRejected(path, str(exc)) from None
    except RecursionError:
        raise SpoolFileRejected(path, "record: nested too deeply") from None
    if rec.file_name(record) != name:
        raise SpoolFileRejected(path, f"name does not match the record "
                                      f"(seq {record['seq']}, {record['phase']}, {record['method']})")
    if record["host"] != host:
        raise SpoolFileRejected(path, f"record is for host {record['host']!r}, "
                                      f"found in directory {host!r}")
    return record


def _read_file(path: str, name: str, dfd: int, uids: Optional[FrozenSet[int]]) -> bytes:
    try:
        lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        raise SpoolFileRejected(path, f"cannot stat: {exc.strerror}") from None
    if stat.S_ISLNK(lst.st_mode):
        raise SpoolFileRejected(path, "is a symbolic link")
    if not stat.S_ISREG(lst.st_mode):
        raise SpoolFileRejected(path, "is not a regular file")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror}"
        raise SpoolFileRejected(path, reason) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            raise SpoolFileRejected(path, "changed while being opened")
        _check_owner(path, st, uids)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SpoolFileRejected(path, "writable by group or others")
        if st.st_size > rec.MAX_RECORD_BYTES:
            raise SpoolFileRejected(path, f"{st.st_size} bytes, more than {rec.MAX_RECORD_BYTES}")
        chunks, left = [], rec.MAX_RECORD_BYTES + 1   # one more: notice growth
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise SpoolFileRejected(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > rec.MAX_RECORD_BYTES:
        raise SpoolFileRejected(path, f"more than {rec.MAX_RECORD_BYTES} bytes")
    return data
