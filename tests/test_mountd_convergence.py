"""mountd converges on what sharedd's state implies for this host (issue 5).

The real sharedd daemon (in-memory driver, NFS shares, spool hook on) runs on
the private test bus and receives a seeded random sequence of creates,
grants, level changes, denies and deletes. mountd's real engine (RecordSource
-> desired_mounts -> Reconciler with a StateStore) reads a second spool
directory into which the test copies sharedd's records, withholding a random
subset of non-periodic ones (as if mountd missed events), and is "restarted"
at random points: every in-memory object is dropped and rebuilt from the
persisted state and the spool. The mounter makes real bind mounts
(tests.fixtures.mountd_env.RecordingMounter), so the Reconciler's checks run
against the real /proc/self/mountinfo.

After the final periodic record (never withheld), the shares mountd has
mounted, with their levels, must equal exactly what sharedd's live state
(ListShares + AccessRules over busctl) implies for the host's addresses,
computed here independently with the standard library's ipaddress module.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random
from typing import Dict, List

import pytest

from mountd import spool_reader
from mountd.reconcile import Identity, Reconciler, desired_mounts
from mountd.records import RecordSource
from mountd.state import StateStore, read_mountinfo, top_mounts
from tests.fixtures.mountd_env import RecordingMounter, mounts_under

HOST_ID = "storage76"
CLIENT_ADDRS = ("10.76.0.5", "fd76::5")
# access_to values: some match the client (address or CIDR), some do not.
MATCHING = ["10.76.0.5", "10.76.0.0/24", "10.76.0.4/30", "fd76::5", "fd76::/64"]
UNRELATED = ["10.76.0.6", "10.76.1.9", "10.76.1.0/24", "fd76::6", "fd76:0:0:1::/64"]
OPERATIONS = 40
WITHHOLD = 0.35         # chance that a non-periodic record never reaches mountd
PASS_CHANCE = 0.4       # chance of a mountd pass after an operation
RESTART_CHANCE = 0.15   # chance of a mountd restart after an operation
EXTRA = {"NFS": [], "GLUSTERFS": []}

CONFIG = f"""
[DEFAULT]
enabled_share_backends = mem
state_path = @WORK@/state
spool_dir = @WORK@/spool
host_id = {HOST_ID}

[mem]
share_driver = tests.memdriver:MemoryDriver
enabled_share_protocols = NFS
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
enable_periodic_hooks = true
# Periodic records come only when the test asks for them.
periodic_hooks_interval = 86400
"""


def host_level(rules, addresses=CLIENT_ADDRS):
    """rw / ro / None for the host under (type, to, level, state) rules;
    written without mountd's code (stdlib ipaddress, not netaddr)."""
    addrs = [ipaddress.ip_address(a) for a in addresses]
    level = None
    for kind, to, lvl, state in rules:
        if kind != "ip" or state != "active":
            continue
        net = ipaddress.ip_network(to, strict=False)
        if any(a.version == net.version and a in net for a in addrs):
            if lvl == "rw":
                return "rw"
            level = "ro"
    return level


class Mirror:
    """Copies sharedd's spool records into mountd's spool, withholding some."""

    def __init__(self, src_dir: str, dst_dir: str, rng: random.Random, withhold: float):
        self.src_dir, self.dst_dir = src_dir, dst_dir
        self.rng, self.withhold = rng, withhold
        self.seen: set = set()
        self.copied: List[str] = []
        self.withheld: List[str] = []

    def sync(self) -> List[str]:
        os.makedirs(self.dst_dir, mode=0o755, exist_ok=True)
        os.chmod(self.dst_dir, 0o755)
        new = []
        for rf in spool_reader.list_records(self.src_dir):
            if rf.name in self.seen:
                continue
            self.seen.add(rf.name)
            if rf.phase != "periodic" and self.rng.random() < self.withhold:
                self.withheld.append(rf.name)
                continue
            with open(rf.path, "rb") as f:
                data = f.read()
            tmp = os.path.join(self.dst_dir, "." + rf.name + ".tmp")
            with open(tmp, "wb") as f:      # same atomic pattern as the spool hook
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.rename(tmp, os.path.join(self.dst_dir, rf.name))
            self.copied.append(rf.name)
            new.append(rf.name)
        return new


class Mountd:
    """mountd's engine objects; restart() drops them all and rebuilds them
    from the persisted state file and the spool, as a new process would."""

    def __init__(self, tmp: str):
        self.spool = os.path.join(tmp, "spool")
        self.mnt = os.path.join(tmp, "mnt")
        self.state = os.path.join(tmp, "state")
        self.src = os.path.join(tmp, "src")
        self.restarts = 0
        self._build()

    def _build(self) -> None:
        self.source = RecordSource(self.spool, (0,))
        self.mounter = RecordingMounter(self.src)
        self.reconciler = Reconciler(self.mnt, self.mounter, StateStore(self.state))

    def restart(self) -> None:
        # A stopped unit's mount commands end with it (systemd kills the
        # cgroup): none of the old engine's may still run beside the new one.
        self.reconciler.close(wait=True)
        del self.source, self.mounter, self.reconciler
        self.restarts += 1
        self._build()

    def run_pass(self) -> Dict[str, str]:
        """One reconcile pass as the daemon does it; returns the desired levels."""
        desired = desired_mounts(self.source.scan(), Identity(CLIENT_ADDRS), ("NFS",), EXTRA,
                                 have_client_cert=False)
        self.reconciler.run(desired)
        # A loaded machine can outlast the pass's own wait; the test's
        # claims are about the pass's result, so wait for every command.
        assert self.reconciler.wait_idle(120)
        return {sid: d.level for sid, d in desired.items()}

    def mounted(self) -> Dict[str, str]:
        return {m.share_id: m.level for m in self.reconciler.mounts.values()
                if m.state == "mounted"}

    def check_kernel(self) -> None:
        """mountd's record agrees with the kernel: each share mounted once,
        at its own mount point, with its level; nothing else under mnt."""
        kernel = mounts_under(self.mnt)
        dup = [mp for mp, n in collections.Counter(kernel).items() if n > 1]
        assert not dup, f"mounted more than once: {dup}"
        own = {m.mount_point: m for m in self.reconciler.mounts.values() if m.state == "mounted"}
        assert sorted(kernel) == sorted(own), "kernel mounts differ from mountd's record"
        top = top_mounts(read_mountinfo())
        for mp, m in own.items():
            assert m.owns(top.get(mp)), f"{mp} is not the mount mountd recorded"
            assert top[mp].read_only == (m.level == "ro"), f"{mp} should be {m.level}"
            assert {"nosuid", "nodev"} <= set(top[mp].mount_options)


class Model:
    """What the test did to sharedd, to pick valid operations (no
    AlreadyExists) and to cross-check sharedd's own reports."""

    def __init__(self):
        self.shares: Dict[str, dict] = {}     # object path -> {id, name, rules}

    def truth(self) -> Dict[str, str]:
        out = {}
        for s in self.shares.values():
            level = host_level([("ip", to, lvl, "active") for to, lvl in s["rules"].values()])
            if level:
                out[s["id"]] = level
        return out


def sharedd_truth(d) -> Dict[str, str]:
    """Share id -> level for the client, from sharedd's live state over busctl."""
    out = {}
    for path in d.manager("ListShares", "a{sv}", 0):
        assert d.share_prop(path, "Protocol") == "NFS"
        assert d.share_prop(path, "Status") == "available"
        rules = [(kind, to, lvl, state) for _rid, kind, to, lvl, state
                 in d.share_prop(path, "AccessRules")]
        level = host_level(rules)
        if level:
            out[d.share_prop(path, "Id")] = level
    return out


def operate(d, model: Model, rng: random.Random, step: int, tag: str) -> str:
    """One random operation on sharedd; returns its kind."""
    shares = model.shares
    with_rules = [p for p, s in shares.items() if s["rules"]]
    choices = [("create", 3 if len(shares) < 6 else 0), ("allow", 5 if shares else 0),
               ("level", 2 if with_rules else 0), ("deny", 3 if with_rules else 0),
               ("delete", 0.7 if shares else 0), ("periodic", 0.5)]
    kind = rng.choices([k for k, _ in choices], [w for _, w in choices])[0]
    if kind == "create":
        name = f"c{tag}-{step}"
        path = d.create_share(name, "NFS", 1)
        shares[path] = {"id": d.share_prop(path, "Id"), "name": name, "rules": {}}
    elif kind == "allow":
        path = rng.choice(sorted(shares))
        used = {to for to, _ in shares[path]["rules"].values()}
        free = [t for t in MATCHING + UNRELATED if t not in used]
        if not free:
            return "none"
        # Bias towards rules that concern the client.
        pool = [t for t in free if t in MATCHING] if rng.random() < 0.7 else free
        to = rng.choice(pool or free)
        level = rng.choice(["rw", "ro"])
        rid = d.share(path, "AllowAccess", "sssa{sv}", "ip", to, level, 0)
        shares[path]["rules"][rid] = (to, level)
    elif kind in ("level", "deny"):
        path = rng.choice(sorted(with_rules))
        rid = rng.choice(sorted(shares[path]["rules"]))
        to, level = shares[path]["rules"].pop(rid)
        d.share(path, "DenyAccess", "sa{sv}", rid, 0)
        if kind == "level":   # same (type, to) at the other level
            other = "ro" if level == "rw" else "rw"
            rid = d.share(path, "AllowAccess", "sssa{sv}", "ip", to, other, 0)
            shares[path]["rules"][rid] = (to, other)
    elif kind == "delete":
        path = rng.choice(sorted(shares))
        if rng.random() < 0.5:
            for rid in sorted(shares[path]["rules"]):
                d.share(path, "DenyAccess", "sa{sv}", rid, 0)
            shares[path]["rules"].clear()
        d.share(path, "Delete", "a{sv}", 0)
        del shares[path]
    else:
        d.manager("RunPeriodicHooks", "a{sv}", 0)
    return kind


@pytest.mark.parametrize("seed", [5, 76, 2026])
def test_mountd_converges_after_the_next_periodic_record(seed, sharedd_factory, mountd_tmp):
    rng = random.Random(seed)
    d = sharedd_factory(CONFIG)
    mirror = Mirror(os.path.join(d.workdir, "spool", HOST_ID),
                    os.path.join(mountd_tmp, "spool", HOST_ID), rng, WITHHOLD)
    mountd = Mountd(mountd_tmp)
    model = Model()
    kinds = collections.Counter()
    diverged = 0
    for step in range(OPERATIONS):
        kinds[operate(d, model, rng, step, str(seed))] += 1
        mirror.sync()
        restart = rng.random() < RESTART_CHANCE
        if restart:
            mountd.restart()
        if restart or rng.random() < PASS_CHANCE:
            want = mountd.run_pass()
            # Every mount succeeds here, so one pass reaches the desired state.
            assert mountd.mounted() == want
            mountd.check_kernel()
            # A second pass, or one after a restart, changes nothing.
            calls = len(mountd.mounter.calls)
            mountd.run_pass()
            assert mountd.mounter.calls[calls:] == []
            diverged += mountd.mounted() != model.truth()

    # A tail whose records all miss mountd, so that mountd is certainly
    # wrong before the periodic record: a new grant, and a mount withdrawn.
    mountd.run_pass()
    mirror.withhold = 1.0
    late = d.create_share(f"late{seed}", "NFS", 1)
    rid = d.share(late, "AllowAccess", "sssa{sv}", "ip", "10.76.0.0/24", "rw", 0)
    model.shares[late] = {"id": d.share_prop(late, "Id"), "name": f"late{seed}",
                          "rules": {rid: ("10.76.0.0/24", "rw")}}
    by_id = {s["id"]: p for p, s in model.shares.items()}
    live_mounts = sorted(sid for sid in mountd.mounted() if sid in by_id)
    gone = rng.choice(live_mounts) if live_mounts else None
    if gone is not None:
        path = by_id[gone]
        for rid in sorted(model.shares[path]["rules"]):
            d.share(path, "DenyAccess", "sa{sv}", rid, 0)
        model.shares[path]["rules"].clear()
        if rng.random() < 0.5:
            d.share(path, "Delete", "a{sv}", 0)
            del model.shares[path]
    assert mirror.sync() == []
    mountd.run_pass()
    mountd.check_kernel()
    before = mountd.mounted()
    assert model.shares[late]["id"] not in before
    assert gone is None or gone in before
    assert before != model.truth()
    diverged += 1

    # The next periodic record brings mountd in line, whatever it missed.
    d.manager("RunPeriodicHooks", "a{sv}", 0)
    new = mirror.sync()
    assert [spool_reader.parse_file_name(n).phase for n in new][-1:] == ["periodic"]
    if rng.random() < 0.5:
        mountd.restart()
    mountd.run_pass()

    truth = sharedd_truth(d)
    assert truth == model.truth(), "sharedd's state differs from the operations made"
    assert mountd.mounted() == truth
    mountd.check_kernel()
    # Persisted state agrees too: a restart now changes nothing.
    mountd.restart()
    mountd.run_pass()
    assert mountd.mounter.calls == [] and mountd.mounted() == truth

    # The sequence exercised what it claims to (deterministic per seed).
    assert mirror.withheld and mountd.restarts >= 2
    assert kinds["create"] and kinds["allow"] and kinds["deny"] + kinds["level"]
    print(f"seed {seed}: {dict(kinds)}; records copied {len(mirror.copied)}, "
          f"withheld {len(mirror.withheld)}; restarts {mountd.restarts}; "
          f"passes diverged from sharedd {diverged}; withdrawn in the tail {gone}; "
          f"final mounts {truth}")
