"""Hooks against the running daemon on a private bus: the Fired signal and
spool files for each wrapped method in phase order, pre-hook refusal and the
suppress options, slow hooks not blocking the bus, two hook drivers at once,
and sequence numbers that keep growing across restarts."""

import json
import os
import pathlib
import subprocess
import time

import pytest

from sharedd import record as record_schema
from sharedd import signing
from tests.support.signals import SignalCollector

REPO = pathlib.Path(__file__).resolve().parent.parent
ERR = "org.sharedd.Sharedd1.Error."
SHARE = "org.sharedd.Sharedd1.Share"

CONFIG = """
[DEFAULT]
enabled_share_backends = mem
state_path = @WORK@/state
spool_dir = @WORK@/spool
host_id = storage1

[mem]
share_driver = tests.memdriver:MemoryDriver
share_export_ip = 127.0.0.1
hook_drivers = spool, dbus, tests.testhooks:ControlledHook
enable_pre_hooks = true
enable_post_hooks = true
enable_periodic_hooks = true
suppress_pre_hooks_errors = {suppress_pre}
suppress_post_hooks_errors = {suppress_post}
"""


def make(factory, suppress_pre="false", suppress_post="false"):
    return factory(CONFIG.format(suppress_pre=suppress_pre, suppress_post=suppress_post))


def spool_records(d):
    spool = os.path.join(d.workdir, "spool", "storage1")
    return [json.load(open(os.path.join(spool, n))) for n in sorted(os.listdir(spool))
            if not n.startswith(".")]


def hooklog(d):
    try:
        return [json.loads(line) for line in open(os.path.join(d.workdir, "hooklog.jsonl"))]
    except FileNotFoundError:
        return []


def set_ctl(d, **ctl):
    with open(os.path.join(d.workdir, "hookctl.json"), "w") as f:
        json.dump(ctl, f)


def memory_calls(d):
    with open(os.path.join(d.workdir, "state", "backends", "mem", "memory.json")) as f:
        return [c[0] for c in json.load(f)["calls"]]


def test_signals_and_spool_in_phase_order(sharedd_factory, system_bus):
    d = make(sharedd_factory)
    sig = SignalCollector(system_bus.address, "type='signal',interface='org.sharedd.Sharedd1.Hooks'")
    start = len(spool_records(d))
    p = d.create_share("hooks")
    rid = d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.1.2.3", "ro", 0)
    snap = d.share(p, "CreateSnapshot", "sa{sv}", "s", 0)
    d.share(p, "Extend", "ta{sv}", 2, 0)
    d.share(p, "Shrink", "ta{sv}", 1, 0)
    d.share(p, "RevertToSnapshot", "oa{sv}", snap, 0)
    d.share(p, "DenyAccess", "sa{sv}", rid, 0)
    d.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    d.share(p, "Delete", "a{sv}", 0)
    d.manager("RunPeriodicHooks", "a{sv}", 0)
    expected = ["create_share", "allow_access", "create_snapshot", "extend_share", "shrink_share",
                "revert_to_snapshot", "deny_access", "delete_snapshot", "delete_share"]
    want = [(ph, m) for m in expected for ph in ("pre", "post")] + [("periodic", "periodic")]
    signals = [m.body for m in sig.wait_for(len(want))]
    sig.close()
    assert [(s[0], s[1]) for s in signals] == want
    spool = spool_records(d)[start:]
    assert [(r["phase"], r["method"]) for r in spool] == want
    for s, r in zip(signals, spool):
        rec = record_schema.validate(json.loads(s[2]))
        assert rec == r, "the signal and the spool file carry the same record"
    seqs = [r["seq"] for r in spool]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Deletion announced in the pre hook; the deny is in the pre hook too.
    by = {(r["phase"], r["method"]): r for r in spool}
    assert by[("pre", "delete_share")]["share"]["status"] == "deleting"
    assert by[("pre", "deny_access")]["is_allow_operation"] is False
    assert by[("pre", "deny_access")]["access_rules"][0]["state"] == "denying"
    assert by[("post", "allow_access")]["access_rules"][0]["state"] == "active"
    assert by[("post", "delete_share")]["share"]["status"] == "deleted"
    # The third-party hook saw the same records (two drivers plus dbus on one backend).
    log = [x for x in hooklog(d) if x["seq"] >= spool[0]["seq"]]
    assert [(x["phase"], x["method"]) for x in log] == want
    assert [x["seq"] for x in log] == seqs
    # Every record is signed with the key the daemon publishes (the D-Bus
    # property and --print-public-key agree), and declares its addresses.
    line = json.loads(system_bus.busctl("--json=short", "get-property", "org.sharedd.Sharedd1",
                                        "/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager",
                                        "RecordSigningKey").stdout)["data"]
    printed = subprocess.run(["/usr/bin/python3", "-m", "sharedd", "--config", d.config_path,
                              "--print-public-key"], capture_output=True, text=True, check=True,
                             cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert printed.stdout.strip() == line
    key = signing.parse_public_line(line)
    assert key.host == "storage1"
    for r in spool:
        key.verify(r)
        assert r["server_addresses"] == ["127.0.0.1"]
    tampered = dict(spool[0], seq=spool[0]["seq"] + 1000)
    with pytest.raises(signing.SignatureError):
        key.verify(tampered)


def test_failing_pre_hook_refuses_and_changes_nothing(sharedd_factory):
    d = make(sharedd_factory)
    p = d.create_share("keep")
    set_ctl(d, fail_pre=["create_share", "allow_access", "extend_share"])
    calls = memory_calls(d)
    text = d.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
                   "ssta{sv}", "refused", "NFS", 1, 0)
    assert ERR + "BackendFailure" in text and "pre hook" in text and "nothing was changed" in text
    assert ERR + "BackendFailure" in d.error(p, SHARE, "AllowAccess", "sssa{sv}", "ip", "10.0.0.1", "rw", 0)
    assert ERR + "BackendFailure" in d.error(p, SHARE, "Extend", "ta{sv}", 5, 0)
    assert d.manager("ListShares", "a{sv}", 0) == [p]
    assert d.share_prop(p, "AccessRules") == []
    assert d.share_prop(p, "SizeGiB") == 1
    assert d.share_prop(p, "Status") == "available"
    assert memory_calls(d) == calls, "the driver was never called"


def test_failing_pre_hook_never_blocks_revocation(sharedd_factory):
    """Deny and delete go on when their pre hooks fail; the post record says so."""
    d = make(sharedd_factory)
    p = d.create_share("revoked")
    rid = d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.0.0.1", "rw", 0)
    set_ctl(d, fail_pre=["deny_access", "delete_share"])
    d.share(p, "DenyAccess", "sa{sv}", rid, 0)
    assert d.share_prop(p, "AccessRules") == []
    assert memory_calls(d)[-1] == "update_access"
    d.share(p, "Delete", "a{sv}", 0)
    assert d.manager("ListShares", "a{sv}", 0) == []
    assert memory_calls(d)[-1] == "delete_share"
    posts = {r["method"]: r for r in spool_records(d) if r["phase"] == "post"}
    for method in ("deny_access", "delete_share"):
        assert posts[method]["result"]["ok"] is True
        assert any("pre hook" in w for w in posts[method]["result"]["warnings"]), posts[method]


def test_suppressed_pre_hook_errors_let_operations_go_on(sharedd_factory):
    d = make(sharedd_factory, suppress_pre="true")
    set_ctl(d, fail_pre=["create_share"])
    p = d.create_share("goes-on")
    assert d.share_prop(p, "Status") == "available"


def test_post_hook_failure_is_reported_after_the_change(sharedd_factory):
    d = make(sharedd_factory)
    set_ctl(d, fail_post=["create_share"])
    text = d.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
                   "ssta{sv}", "done-anyway", "NFS", 1, 0)
    assert ERR + "BackendFailure" in text and "post hook" in text
    p = d.manager("FindShareByName", "s", "done-anyway")
    assert d.share_prop(p, "Status") == "available"
    d.stop()
    d2 = make(sharedd_factory, suppress_post="true")
    set_ctl(d2, fail_post=["create_share"])
    assert d2.create_share("quiet")


def test_slow_hook_does_not_block_the_bus(sharedd_factory, system_bus):
    d = make(sharedd_factory)
    set_ctl(d, sleep_pre=4)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    slow = subprocess.Popen(["busctl", "--system", "call", "org.sharedd.Sharedd1",
                             "/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
                             "ssta{sv}", "slow", "NFS", "1", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    assert d.get("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "Version")
    assert d.manager("ListShares", "a{sv}", 0) is not None
    assert slow.poll() is None, "the reads were answered while the hook was still running"
    assert slow.wait(30) == 0
    assert d.manager("FindShareByName", "s", "slow")


def test_sequence_numbers_grow_across_restarts(sharedd_factory):
    d = make(sharedd_factory)
    d.create_share("one")
    before = spool_records(d)
    last = before[-1]["seq"]
    epoch = before[-1]["epoch"]
    d.restart()
    d.create_share("two")
    after = [r for r in spool_records(d) if r["seq"] > last]
    assert after and all(r["epoch"] == epoch for r in after)
    assert [r["seq"] for r in after] == list(range(last + 1, last + 1 + len(after)))
