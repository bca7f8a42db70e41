"""Desired state from hook records, and reconciliation against the kernel.

fold() and desired_mounts() are pure: records in, desired mounts out.
Reconciler compares the desired mounts with mountd's own persisted record
and /proc/self/mountinfo and acts through a Mounter. It only ever touches
mounts it made, identified by the kernel's mount id, file system type and
source recorded right after mounting.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import logging
import os
import re
import stat
import threading
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from sharedd.constants import PHASE_PERIODIC, PHASE_PRE
from sharedd.record import EXPORT_RE, mount_export

from . import matching
from .config import option_allowed
from .state import MountEntry, OwnMount, StateStore, read_mountinfo, top_mounts

log = logging.getLogger(__name__)

#: share statuses (and pre-hook methods) after which a share is gone for clients
GONE_STATUSES = ("deleting", "deleted", "unmanage_starting")
GONE_METHODS = ("delete_share", "unmanage_share")
FSTYPES = {"NFS": ("nfs4", "nfs"), "GLUSTERFS": ("glusterfs",)}
RETRY_BASE = 5.0
#: states of a share mountd has mounted: "stale" answers no probe (server gone)
MOUNTED = ("mounted", "stale")
MOUNT_WORKERS = 8      # mount commands running at once (each share's one at a time)
PASS_WAIT = 2.0        # seconds a pass waits for its commands; slower ones end in the background
RETRY_MAX = 600.0


# --- desired state ------------------------------------------------------------

def record_key(record: dict) -> Tuple[str, int, int]:
    # Timestamps differ in fraction length ("...:30Z", "...:30.5Z"): compare
    # the seconds text, then the fraction as microseconds.
    base, _, frac = record["timestamp"].rstrip("Z").partition(".")
    return (base, int((frac or "0").ljust(6, "0")[:6]), record["seq"])


#: load(view) -> the record, validated and trusted, or None if it must not count
Load = Callable[[dict], Optional[dict]]


def _as_is(record: dict) -> Optional[dict]:
    return record


def current_epoch(metas: Iterable[dict], load: Load = _as_is) -> Optional[str]:
    """The epoch of the newest record that loads (seq restarts in a new
    epoch, so the newest is told by timestamp, then seq)."""
    metas = list(metas)
    if not metas:
        return None
    newest = max(metas, key=record_key)
    if load(newest) is not None:
        return newest["epoch"]
    for m in sorted(metas, key=record_key, reverse=True)[1:]:
        if load(m) is not None:
            return m["epoch"]
    return None


def periodic_bases(records: Iterable[dict], epoch: Optional[str],
                   load: Load = _as_is) -> Dict[str, List[dict]]:
    """backend -> the parts of its newest complete periodic state in epoch
    (every part present and loaded: parts have consecutive seqs, the last
    part the highest)."""
    periodic = {r["seq"]: r for r in records
                if r["epoch"] == epoch and r["phase"] == PHASE_PERIODIC}
    bases: Dict[str, List[dict]] = {}
    for seq in sorted(periodic, reverse=True):
        r = periodic[seq]
        parts = r.get("parts", 1)
        if r["backend"] in bases or r.get("part", 1) != parts:
            continue
        seqs = range(seq - parts + 1, seq + 1)
        if not all(s in periodic and periodic[s]["backend"] == r["backend"]
                   and periodic[s].get("parts", 1) == parts
                   and periodic[s].get("part", 1) == i for i, s in enumerate(seqs, 1)):
            continue
        loaded = [load(periodic[s]) for s in seqs]
        if all(x is not None for x in loaded):
            bases[r["backend"]] = loaded      # type: ignore[assignment]
    return bases


@dataclasses.dataclass
class Folded:
    epoch: Optional[str]
    shares: Dict[str, dict]               # share id -> share, as in the records
    latest: Dict[str, int]                # share id -> seq of the record that decided it
    bases: Dict[str, range]               # backend -> seqs of its periodic state


def fold(records: Iterable[dict]) -> Tuple[Optional[str], Dict[str, dict]]:
    """Share id -> share (as in the records) for one sharedd host."""
    folded = fold_records(records)
    return folded.epoch, folded.shares


def fold_records(records: Iterable[dict], load: Load = _as_is) -> Folded:
    """The state of one sharedd host's shares.

    Starts from the newest complete periodic state of each backend in the
    current epoch and the later records of that backend; for each share,
    the record with the highest seq wins, whatever its backend. Records of
    other epochs are ignored (an epoch change resets the state).

    records may be light views (order and fold fields, the share's id and
    status); load(view) is asked, newest first, only for the records that
    decide something (the epoch, a periodic state, a share) and gives the
    whole record, or None to pass the record over. A reader thus reads and
    verifies in full what it acts on, not every record of a burst.
    """
    records = list(records)
    epoch = current_epoch(records, load)
    recs = [r for r in records if r["epoch"] == epoch]
    bases = periodic_bases(recs, epoch, load)
    # share id -> (seq of the newest word on it, the share or None if gone):
    # whatever backend spoke last about a share wins, by seq, never by name.
    best: Dict[str, Tuple[int, Optional[dict]]] = {}
    for backend, parts in bases.items():
        last = parts[-1]["seq"]
        for part in parts:
            for share in part.get("shares", []):
                if last > best.get(share["id"], (0, None))[0]:
                    best[share["id"]] = (last, dict(share, backend=share.get("backend", backend)))
    base_end = {b: parts[-1]["seq"] for b, parts in bases.items()}
    later: Dict[str, List[dict]] = {}
    for r in recs:
        if r["phase"] == PHASE_PERIODIC or r.get("share") is None:
            continue
        if r["seq"] > base_end.get(r["backend"], 0):
            later.setdefault(r["share"]["id"], []).append(r)
    for sid, candidates in later.items():
        for view in sorted(candidates, key=lambda r: r["seq"], reverse=True):
            if view["seq"] <= best.get(sid, (0, None))[0]:
                break
            r = load(view)
            if r is None:
                continue
            share = r["share"]
            gone = share["status"] in GONE_STATUSES or (
                r["phase"] == PHASE_PRE and r["method"] in GONE_METHODS)
            best[sid] = (r["seq"], None if gone else
                         dict(share, backend=share.get("backend", r["backend"])))
            break
    return Folded(epoch=epoch,
                  shares={sid: share for sid, (_, share) in best.items()
                          if share is not None and share["status"] not in GONE_STATUSES},
                  latest={sid: seq for sid, (seq, _) in best.items()},
                  bases={b: range(parts[0]["seq"], parts[-1]["seq"] + 1)
                         for b, parts in bases.items()})


@dataclasses.dataclass(frozen=True)
class Desired:
    share_id: str
    share_name: str
    host: str
    protocol: str
    fstype: str            # nfs4 | nfs | glusterfs
    export: str            # host:/path
    level: str             # rw | ro
    options: Tuple[str, ...]
    cert_required: bool = False
    error: str = ""        # set when the share cannot be mounted as described

    def params(self) -> tuple:
        return (self.export, self.fstype, self.options)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What identifies this host to access rules."""
    addresses: Tuple[str, ...]
    cert_cn: Optional[str] = None


def mount_point_for(mount_dir: str, name: str, share_id: str, length: int = 8) -> str:
    return os.path.join(mount_dir, f"{name}-{share_id[:length]}")


def desired_mounts(shares_by_host: Dict[str, Dict[str, dict]], identity: Identity,
                   protocols: Sequence[str], extra_options: Dict[str, Sequence[str]],
                   have_client_cert: bool,
                   owners: Optional[Mapping[str, str]] = None) -> Dict[str, Desired]:
    """Share id -> Desired for every share this host may mount. An id that
    two sharedd hosts announce (a trusted host that was broken into may
    sign a record naming another's share, to take its mount point over)
    stays with the host it is mounted from (owners: id -> host); if it is
    not mounted, neither host's is."""
    addrs = matching.parse_addresses(identity.addresses)
    # id -> the hosts that name it (granting this host access or not), and
    # what each that grants it would have mounted
    named: Dict[str, List[str]] = {}
    claims: Dict[str, Dict[str, Desired]] = {}
    for host in sorted(shares_by_host):
        for sid, share in shares_by_host[host].items():
            named.setdefault(sid, []).append(host)
            for snap in share.get("snapshots", ()):
                named.setdefault(snap["id"], []).append(host)
            proto = share["protocol"]
            if proto not in protocols:
                continue
            level = matching.access_level(share.get("access_rules", []), addrs, identity.cert_cn)
            if level is not None:
                claims.setdefault(sid, {})[host] = _describe(
                    host, share, level, extra_options, have_client_cert)
            # Its snapshots this host may mount: read-only, whatever a rule
            # says, each on a mount point of its own (<share>@<snapshot>-<id>).
            for snap in share.get("snapshots", ()):
                if matching.access_level(snap.get("access_rules", []), addrs,
                                         identity.cert_cn) is None:
                    continue
                as_share = dict(snap, protocol=proto, name=f"{share['name']}@{snap['name']}")
                claims.setdefault(snap["id"], {})[host] = _describe(
                    host, as_share, "ro", extra_options, have_client_cert)
    out: Dict[str, Desired] = {}
    for sid in sorted(claims):
        by, hosts = claims[sid], sorted(set(named[sid]))
        if len(hosts) == 1:
            out[sid] = next(iter(by.values()))
            continue
        # (the owner's, if it still grants access; else no host's: a host
        # that withdraws access must not hand the mount point to another)
        owner = (owners or {}).get(sid)
        _warn_once((sid, owner if owner in by else None, *hosts),
                   "share %s is announced by %d sharedd hosts (%s); %s",
                   sid, len(hosts), ", ".join(hosts),
                   f"kept as mounted from {owner}" if owner in by else "mounted from none")
        if owner in by:
            out[sid] = by[owner]
    return out


#: conflicts already logged (each once: they come back every pass)
_warned: Dict[tuple, None] = {}


def _warn_once(key: tuple, text: str, *args: object) -> None:
    if key in _warned:
        return
    _warned[key] = None
    while len(_warned) > 1024:
        del _warned[next(iter(_warned))]
    log.warning(text, *args)


def _describe(host: str, share: dict, level: str, extra: Dict[str, Sequence[str]],
              have_client_cert: bool) -> Desired:
    hints = share.get("mount_hints") or {}
    proto = share["protocol"]
    fstype = hints.get("fstype") or FSTYPES[proto][0]
    export = mount_export(share)
    error = ""
    if fstype not in FSTYPES[proto]:
        error = f"file system type {fstype!r} does not fit protocol {proto}"
    elif not export or not re.fullmatch(EXPORT_RE, export):
        error = "no usable export location (host:/path)"
    options: List[str] = []
    for opt in list(extra.get(proto, ())) + list(hints.get("options", [])):
        if opt in ("ro", "rw", "nosuid", "nodev"):
            continue      # mountd decides these
        if not option_allowed(fstype, opt):
            error = error or f"mount option {opt!r} is not allowed"
        elif opt not in options:
            options.append(opt)
    cert_required = bool(hints.get("client_certificate_required"))
    if cert_required and not have_client_cert and not error:
        error = "the share requires a client certificate and none is configured"
    return Desired(share_id=share["id"], share_name=share["name"], host=host, protocol=proto,
                   fstype=fstype, export=export, level=level, options=tuple(options),
                   cert_required=cert_required, error=error)


# --- reconciliation -----------------------------------------------------------

class MountFailed(Exception):
    """A mount, remount or unmount did not happen (message says why)."""


@dataclasses.dataclass
class Outcome:
    events: List[tuple] = dataclasses.field(default_factory=list)  # ("Mounted", sid, mp, level) ...
    next_retry: Optional[float] = None      # wall clock of the earliest retry due
    changed: bool = False

    def retry_at(self, when: float) -> None:
        if when and (self.next_retry is None or when < self.next_retry):
            self.next_retry = when

    def merge(self, other: "Outcome") -> None:
        self.events += other.events
        self.changed = self.changed or other.changed
        if other.next_retry is not None:
            self.retry_at(other.next_retry)


class Reconciler:
    """Brings the mounts in line with the desired state. Not thread-safe:
    the daemon runs one pass at a time, in a worker thread."""

    def __init__(self, mount_dir: str, mounter, store: StateStore, *,
                 mountinfo: Callable[[], List[MountEntry]] = read_mountinfo,
                 clock: Callable[[], float] = time.time, workers: int = MOUNT_WORKERS,
                 pass_wait: float = PASS_WAIT, on_done: Optional[Callable[[], None]] = None):
        # mountinfo shows resolved paths: a symlink in mount_dir must not hide our mounts.
        self.mount_dir = os.path.realpath(mount_dir)
        self.mounter = mounter
        self.store = store
        self.mountinfo = mountinfo
        self.clock = clock
        self.mounts: Dict[str, OwnMount] = store.load()
        # Mount commands of different shares run side by side (one share's
        # at a time), so one dead server delays no other share and no revoke.
        self._pool = concurrent.futures.ThreadPoolExecutor(workers,
                                                           thread_name_prefix="mountd-mount")
        self._lock = threading.RLock()        # self.mounts, the state file, _late, _busy
        self._busy: Dict[str, concurrent.futures.Future] = {}
        self._late = Outcome()                # what jobs did since the last pass collected it
        self._pass_open = False
        self.pass_wait = pass_wait
        # called when a job a pass stopped waiting for ends (a new pass is due)
        self.on_done = on_done
        self.failures_total = 0               # mount attempts that failed (metrics)

    # -- helpers
    def _save(self) -> None:
        with self._lock:
            self.store.save(self.mounts)

    def close(self, wait: bool = False) -> None:
        """Stop taking work; commands running end by their own timeouts
        (wait: until they have)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no command runs; False if some still do after timeout."""
        with self._lock:
            futures = list(self._busy.values())
        return not concurrent.futures.wait(futures, timeout=timeout).not_done

    def busy(self) -> List[str]:
        with self._lock:
            return sorted(self._busy)

    def _job(self, sid: str, work: Callable[[Outcome], None]) -> None:
        out = Outcome()
        try:
            work(out)
        except Exception:       # a bug must not lose the share: the next pass retries
            log.exception("share %s: reconcile step failed", sid)
            out.changed = True
        with self._lock:
            self._busy.pop(sid, None)
            self._late.merge(out)
            late = not self._pass_open
        if late and self.on_done is not None:
            self.on_done()

    def _mount_points(self, desired: Dict[str, Desired]) -> Dict[str, str]:
        """Share id -> mount point; a name clash gets the full id."""
        used: Dict[str, str] = {}
        out: Dict[str, str] = {}
        for sid in sorted(desired, key=lambda s: (s not in self.mounts, s)):
            d = desired[sid]
            mp = mount_point_for(self.mount_dir, d.share_name, sid)
            if mp in used and used[mp] != sid:
                mp = mount_point_for(self.mount_dir, d.share_name, sid, 32)
            used[mp] = sid
            out[sid] = mp
        return out

    def _fail(self, own: OwnMount, why: str, outcome: Outcome) -> None:
        own.state = "failed"
        own.error = why
        own.failures += 1
        with self._lock:
            self.failures_total += 1
        delay = min(RETRY_BASE * 2 ** (own.failures - 1), RETRY_MAX)
        own.next_attempt = self.clock() + delay
        log.error("share %s (%s): %s; retrying in %.0fs (attempt %d failed)",
                  own.share_name, own.share_id, why, delay, own.failures)
        outcome.changed = True

    def _prepare_dir(self, mp: str, top: Dict[str, MountEntry]) -> bool:
        """Make the mount point; True if mountd created it."""
        if not os.path.isdir(self.mount_dir):
            os.makedirs(self.mount_dir, mode=0o755, exist_ok=True)
            os.chmod(self.mount_dir, 0o755)    # whatever the umask: users reach mounts here
        if mp in top:
            raise MountFailed(f"{mp} is already a mount point that mountd did not make")
        try:
            os.mkdir(mp, 0o755)
            os.chmod(mp, 0o755)
            return True
        except FileExistsError:
            pass
        st = os.lstat(mp)
        if not stat.S_ISDIR(st.st_mode):
            raise MountFailed(f"{mp} exists and is not a directory")
        if os.listdir(mp):
            raise MountFailed(f"{mp} is not empty; refusing to hide its files")
        return False

    def _find_new(self, mp: str, before: Optional[MountEntry]) -> MountEntry:
        top = top_mounts(self.mountinfo())
        entry = top.get(mp)
        if entry is None or (before is not None and entry.mount_id == before.mount_id):
            raise MountFailed(f"the mount command succeeded but nothing is mounted at {mp}")
        return entry

    def _check_flags(self, own: OwnMount, entry: MountEntry) -> MountEntry:
        """Enforce the level (never rw for a ro share) and nosuid/nodev."""
        want_ro = own.level == "ro"
        need = entry.read_only != want_ro or any(
            f not in entry.mount_options for f in self.mounter.required_flags())
        if need:
            self.mounter.restrict(own.mount_point, own.level)
            entry = top_mounts(self.mountinfo()).get(own.mount_point)
            if entry is None or entry.mount_id != own.mount_id:
                raise MountFailed(f"the mount at {own.mount_point} vanished while setting flags")
            if entry.read_only != want_ro:
                raise MountFailed(f"{own.mount_point} is {'ro' if entry.read_only else 'rw'}"
                                  f" after mounting, not {own.level}")
        return entry

    # -- actions
    def _mount(self, d: Desired, mp: str, outcome: Outcome,
               top: Optional[Dict[str, MountEntry]] = None) -> None:
        own = self.mounts.get(d.share_id)
        if own is None or own.mount_point != mp or (own.export, own.fstype, tuple(own.options)) != d.params():
            own = OwnMount(share_id=d.share_id, share_name=d.share_name, host=d.host,
                           mount_point=mp, export=d.export, fstype=d.fstype, level=d.level,
                           options=list(d.options), state="failed")
            with self._lock:
                self.mounts[d.share_id] = own
        own.level = d.level
        own.host = d.host
        if d.error:
            if own.error != d.error:
                own.error = d.error
                own.state = "failed"
                log.error("share %s (%s): not mounted: %s", d.share_name, d.share_id, d.error)
                outcome.changed = True
            return
        if top is None:
            top = top_mounts(self.mountinfo())
        try:
            own.created_dir = self._prepare_dir(mp, top) or own.created_dir
            own.state = "mounting"   # persisted first: a crash now is recognised on restart
            own.mount_id = None
            self._save()
            self.mounter.mount(d, mp)
            entry = self._find_new(mp, None)
            own.mount_id, own.kernel_fstype, own.kernel_source = (
                entry.mount_id, entry.fstype, entry.source)
            try:
                self._check_flags(own, entry)
            except Exception:
                self._unmount_quietly(mp)
                raise
        except (MountFailed, OSError, Exception) as exc:  # noqa: B014 - any failure is retried
            own.mount_id = None
            self._fail(own, str(exc), outcome)
            self._save()
            return
        own.state, own.error, own.failures, own.next_attempt = "mounted", "", 0, 0.0
        log.info("mounted share %s (%s) %s at %s %s", d.share_name, d.share_id, d.export, mp, d.level)
        outcome.events.append(("Mounted", d.share_id, mp, d.level))
        outcome.changed = True
        self._save()

    def _unmount_quietly(self, mp: str) -> None:
        try:
            self.mounter.unmount(mp)
        except Exception as exc:   # already failing; report the first error
            log.error("cleanup unmount of %s failed: %s", mp, exc)

    def _unmount(self, own: OwnMount, outcome: Outcome, revoking: bool = False) -> bool:
        try:
            self.mounter.unmount(own.mount_point, revoking=revoking)
        except Exception as exc:
            log.error("unmounting share %s at %s failed: %s", own.share_id, own.mount_point, exc)
            own.error = f"unmount failed: {exc}"
            outcome.changed = True
            return False
        # By id at its mount point: a freed mount id is soon given to another mount.
        if any((e.mount_id, e.mount_point) == (own.mount_id, own.mount_point)
               for e in self.mountinfo()):
            own.error = "still mounted after unmount"
            log.error("share %s: %s is still mounted after unmount", own.share_id, own.mount_point)
            return False
        log.info("unmounted share %s (%s) from %s", own.share_name, own.share_id, own.mount_point)
        outcome.events.append(("Unmounted", own.share_id, own.mount_point))
        outcome.changed = True
        return True

    def _forget(self, own: OwnMount) -> None:
        if own.created_dir:
            try:
                os.rmdir(own.mount_point)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT,):
                    log.warning("cannot remove mount point %s: %s", own.mount_point, exc)
        with self._lock:
            self.mounts.pop(own.share_id, None)

    def _remount(self, own: OwnMount, d: Desired, outcome: Outcome) -> None:
        old = own.level
        try:
            self.mounter.remount(d, own.mount_point)
            own.level = d.level
            entry = top_mounts(self.mountinfo()).get(own.mount_point)
            if not own.owns(entry):
                raise MountFailed(f"the mount at {own.mount_point} changed during remount")
            self._check_flags(own, entry)
        except NotImplementedError:
            # This file system cannot change level in place: mount again
            # (a lowering is a revocation: mounts inside do not hold it back).
            if self._unmount(own, outcome, revoking=old == "rw" and d.level == "ro"):
                own.mount_id = None
                self._mount(d, own.mount_point, outcome)
            return
        except Exception as exc:
            own.level = old
            log.error("share %s: changing %s from %s to %s failed: %s", own.share_id,
                      own.mount_point, old, d.level, exc)
            own.error = f"remount {d.level} failed: {exc}"
            outcome.changed = True
            if d.level == "ro":
                # Never leave write access that was withdrawn.
                if self._unmount(own, outcome, revoking=True):
                    own.mount_id, own.state = None, "failed"
                    self._fail(own, f"could not remount read-only: {exc}", outcome)
            return
        own.error = ""
        log.info("remounted share %s (%s) at %s %s", own.share_name, own.share_id,
                 own.mount_point, d.level)
        outcome.events.append(("Mounted", own.share_id, own.mount_point, d.level))
        outcome.changed = True

    # -- the pass
    def adopt_interrupted(self, top: Dict[str, MountEntry]) -> None:
        """A crash between mount and save leaves state 'mounting': adopt the
        mount found at the mount point if it has the expected type."""
        for own in self.mounts.values():
            if own.state != "mounting":
                continue
            entry = top.get(own.mount_point)
            kinds = self.mounter.kernel_fstypes(own.fstype)
            if entry is not None and (kinds is None or entry.fstype in kinds):
                own.mount_id, own.kernel_fstype, own.kernel_source = (
                    entry.mount_id, entry.fstype, entry.source)
                own.state = "mounted"
                log.info("adopted the mount at %s made before a restart", own.mount_point)
            else:
                own.state = "failed"

    def run(self, desired: Dict[str, Desired], keep_hosts: frozenset = frozenset()) -> Outcome:
        """Make the mounts match desired; mounts of keep_hosts (whose records
        cannot be read now) are neither withdrawn nor changed.

        The commands run in the pool, withdrawals first; the pass waits for
        them up to pass_wait. A share whose command still runs is left alone
        by later passes until it ends (on_done then asks for a new pass)."""
        outcome = Outcome()
        now = self.clock()
        entries = self.mountinfo()
        top = top_mounts(entries)
        # Mount ids are reused as soon as they are free, so a mount is
        # recognised by its id at its own mount point, never by id alone.
        ids = {(e.mount_id, e.mount_point) for e in entries}
        with self._lock:
            busy = set(self._busy)
            self._pass_open = True
        self.adopt_interrupted(top)
        # Mounts that disappeared behind mountd's back are mounted again below.
        for own in list(self.mounts.values()):
            if own.share_id in busy:
                continue
            if own.state in MOUNTED and not own.owns(top.get(own.mount_point)):
                if (own.mount_id, own.mount_point) in ids:
                    log.warning("share %s: %s is covered by another mount", own.share_id,
                                own.mount_point)
                    continue
                log.warning("share %s: %s is no longer mounted", own.share_id, own.mount_point)
                own.state, own.mount_id, own.failures, own.next_attempt = "failed", None, 0, 0.0
                own.error = "mount disappeared"
                outcome.changed = True
        jobs: List[Tuple[str, Callable[[Outcome], None]]] = []
        # Withdrawn access and deleted shares first (deny arrives before the server acts).
        for sid in sorted(set(self.mounts) - set(desired) - busy):
            own = self.mounts[sid]
            if own.host in keep_hosts:
                continue              # no verified record withdrew it
            entry = top.get(own.mount_point)
            if own.owns(entry):
                jobs.append((sid, functools.partial(self._withdraw, own)))
            elif own.mount_id is not None and (own.mount_id, own.mount_point) in ids:
                if _covers_of(own, entries) is None:
                    log.error("share %s: cannot unmount %s: another mount covers it",
                              sid, own.mount_point)
                else:
                    jobs.append((sid, functools.partial(
                        self._uncovered, own, functools.partial(self._withdraw, own))))
            else:
                self._forget(own)
                outcome.changed = True
        # Lowered levels next: write access that was withdrawn goes before anything is added.
        mps = self._mount_points(desired)
        later: List[Tuple[str, Callable[[Outcome], None]]] = []
        for sid in sorted(set(desired) - busy):
            d = desired[sid]
            mp = mps[sid]
            own = self.mounts.get(sid)
            if own is not None and own.state in MOUNTED and own.owns(top.get(own.mount_point)):
                if own.mount_point != mp or (own.export, own.fstype, tuple(own.options)) != d.params():
                    log.info("share %s: export or options changed; mounting again", sid)
                    jobs.append((sid, functools.partial(self._replace, own, d, mp)))
                elif own.level != d.level:
                    (jobs if d.level == "ro" else later).append(
                        (sid, functools.partial(self._remount, own, d)))
                continue
            if own is not None and own.state in MOUNTED:
                # covered by another mount: left as it is (warned above), but
                # write access that was withdrawn goes
                if own.level == "rw" and d.level == "ro" and own.mount_id is not None \
                        and (own.mount_id, own.mount_point) in ids \
                        and _covers_of(own, entries) is not None:
                    jobs.append((sid, functools.partial(
                        self._uncovered, own, functools.partial(self._remount, own, d))))
                continue
            if (own is not None and own.mount_point == mp and not d.error
                    and (own.export, own.fstype, tuple(own.options)) == d.params()
                    and own.next_attempt > now and own.level == d.level):
                outcome.retry_at(own.next_attempt)
                continue
            later.append((sid, functools.partial(self._mount_and_retry, d, mp, top)))
        futures = []
        with self._lock:
            for sid, work in jobs + later:
                fut = self._pool.submit(self._job, sid, work)
                self._busy[sid] = fut
                futures.append(fut)
        if futures:
            concurrent.futures.wait(futures, timeout=self.pass_wait)
        with self._lock:
            self._pass_open = False
            outcome.merge(self._late)
            self._late = Outcome()
        if outcome.changed:
            self._save()
        return outcome

    def check_health(self, timeout: float) -> None:
        """Probe every mounted share not busy (in the pool; results come with
        a later pass): one that does not answer is reported stale, one whose
        file handle went stale is mounted again."""
        probe = getattr(self.mounter, "probe", None)
        if probe is None:
            return
        with self._lock:
            for own in list(self.mounts.values()):
                if own.state in MOUNTED and own.share_id not in self._busy:
                    self._busy[own.share_id] = self._pool.submit(
                        self._job, own.share_id, functools.partial(self._probe, own, timeout))

    def _probe(self, own: OwnMount, timeout: float, outcome: Outcome) -> None:
        try:
            self.mounter.probe(own.mount_point, timeout)
        except Exception as exc:
            text = str(exc)
            if "Stale file handle" in text:
                log.warning("share %s at %s: stale file handle (the export changed on the "
                            "server); mounting it again", own.share_id, own.mount_point)
                if self._unmount(own, outcome):
                    own.state, own.mount_id, own.failures, own.next_attempt = "failed", None, 0, 0.0
                    own.error = "stale file handle: mounted again"
                    outcome.changed = True
                return
            if own.state != "stale":
                log.warning("share %s at %s does not answer (%s); reported as stale until it "
                            "does", own.share_id, own.mount_point, text[-200:])
                own.state, own.error = "stale", f"not answering: {text[-200:]}"
                outcome.changed = True
            return
        if own.state == "stale":
            log.info("share %s at %s answers again", own.share_id, own.mount_point)
            own.state, own.error = "mounted", ""
            outcome.changed = True

    def _withdraw(self, own: OwnMount, outcome: Outcome) -> None:
        if self._unmount(own, outcome, revoking=True):
            self._forget(own)

    def _uncovered(self, own: OwnMount, then: Callable[[Outcome], None],
                   outcome: Outcome) -> None:
        """Access to own is withdrawn or lowered while other mounts cover it,
        each mounted on it (any local user who may write in the share may
        mount FUSE there): they are detached, then `then` runs."""
        for _ in range(_MAX_COVERS):
            entry = top_mounts(self.mountinfo()).get(own.mount_point)
            if entry is None or own.owns(entry):
                break
            try:
                self.mounter.detach(own.mount_point)
            except Exception as exc:
                log.error("share %s: cannot detach what covers %s: %s", own.share_id,
                          own.mount_point, exc)
                own.error = f"covered, and the cover cannot be detached: {exc}"
                outcome.changed = True
                return
            log.warning("share %s: detached %s mounted over %s (access to the share is "
                        "withdrawn or lowered)", own.share_id, entry.fstype, own.mount_point)
        else:
            own.error = f"covered by more than {_MAX_COVERS} mounts; detached that many"
            outcome.changed = True
            return
        then(outcome)

    def _replace(self, own: OwnMount, d: Desired, mp: str, outcome: Outcome) -> None:
        if self._unmount(own, outcome, revoking=own.level == "rw" and d.level == "ro"):
            self._forget(own)
            self._mount(d, mp, outcome)

    def _mount_and_retry(self, d: Desired, mp: str, top: Dict[str, MountEntry],
                         outcome: Outcome) -> None:
        self._mount(d, mp, outcome, top)
        own = self.mounts.get(d.share_id)
        if own is not None and own.state == "failed" and own.next_attempt and not d.error:
            outcome.retry_at(own.next_attempt)

    def mounts_table(self) -> List[Tuple[str, str, str, str, str]]:
        """(share id, mount point, export, level, state) for the bus."""
        return [(m.share_id, m.mount_point, m.export, m.level, m.state)
                for m in sorted(self.mounts.values(), key=lambda m: m.share_id)]

    def owners(self) -> Dict[str, str]:
        """Share id -> the sharedd host each mount came from."""
        with self._lock:
            return {sid: m.host for sid, m in list(self.mounts.items())}

    def hosts(self) -> List[str]:
        """The sharedd hosts the mounts mountd is responsible for came from."""
        return sorted({m.host for m in self.mounts.values()})

    def mounted_count(self) -> int:
        return sum(1 for m in self.mounts.values() if m.state == "mounted")


#: mounts covering a share's that are detached, one by one, at most
_MAX_COVERS = 16


def _covers_of(own: OwnMount, entries: List[MountEntry]) -> Optional[List[MountEntry]]:
    """The mounts over own's at its mount point, each mounted on it or on
    one of them (a mount's parent is the mount it was put on); None if the
    table says otherwise (own's mount is not there, or a cover's parent is
    not among them)."""
    ours = [e for e in entries if (e.mount_id, e.mount_point) == (own.mount_id, own.mount_point)]
    if not ours:
        return None
    on_ours = {ours[0].mount_id}
    covers = []
    for e in entries[entries.index(ours[0]) + 1:]:
        if e.mount_point == own.mount_point:
            if e.parent_id not in on_ours:
                return None
            on_ours.add(e.mount_id)
            covers.append(e)
    return covers
