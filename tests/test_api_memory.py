"""The D-Bus API against the real daemon on a private bus, with an in-memory
driver (no storage): argument validation, named errors, state changes,
ObjectManager and PropertiesChanged. Storage-backed behaviour is tested in
test_e2e_btrfs_ganesha.py with real btrfs and NFS-Ganesha."""

import json
import os
import time

import pytest

MGR = "org.sharedd.Sharedd1.Manager"
SHARE = "org.sharedd.Sharedd1.Share"
ERR = "org.sharedd.Sharedd1.Error."

CONFIG = """
[DEFAULT]
enabled_share_backends = mem1, mem2
state_path = @WORK@/state
spool_dir = @WORK@/spool
host_id = storage1

[mem1]
share_driver = tests.memdriver:MemoryDriver
enabled_share_protocols = NFS, CIFS
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
enable_periodic_hooks = true

[mem2]
share_driver = tests.memdriver:MemoryDriver
memory_capacity_gib = 5
"""


@pytest.fixture
def d(sharedd_factory):
    return sharedd_factory(CONFIG)


def test_create_list_find_delete(d):
    path = d.create_share("projects", "nfs", 2, description="team data")
    assert path.startswith("/org/sharedd/Sharedd1/share/")
    assert d.share_prop(path, "Name") == "projects"
    assert d.share_prop(path, "Protocol") == "NFS"          # canonical
    assert d.share_prop(path, "Status") == "available"
    assert d.share_prop(path, "SizeGiB") == 2
    assert d.share_prop(path, "Backend") == "mem1"          # first enabled backend
    assert d.share_prop(path, "Description") == "team data"
    assert d.share_prop(path, "ExportLocations") == [f"mem:/{path.rsplit('/', 1)[1]}"]
    assert d.manager("ListShares", "a{sv}", 0) == [path]
    assert d.manager("FindShareByName", "s", "projects") == path
    d.share(path, "Delete", "a{sv}", 0)
    assert d.manager("ListShares", "a{sv}", 0) == []
    assert ERR + "NotFound" in d.error("/org/sharedd/Sharedd1", MGR, "FindShareByName", "s", "projects")


@pytest.mark.parametrize("args, error", [
    (("bad name!", "NFS", 1), "InvalidArgument"),
    (("x" * 64, "NFS", 1), "InvalidArgument"),
    (("ok", "SMB", 1), "InvalidArgument"),
    (("ok", "NFS", 0), "InvalidArgument"),
    (("ok", "GLUSTERFS", 1), "NotSupported"),
    (("trailing\n", "NFS", 1), "InvalidArgument"),
])
def test_create_rejects_bad_input(d, args, error):
    text = d.error("/org/sharedd/Sharedd1", MGR, "CreateShare", "ssta{sv}", *args, 0)
    assert ERR + error in text
    assert d.manager("ListShares", "a{sv}", 0) == []


def test_create_rejects_bad_options_and_duplicates(d):
    root = "/org/sharedd/Sharedd1"
    assert ERR + "InvalidArgument" in d.error(root, MGR, "CreateShare", "ssta{sv}", "a", "NFS", 1,
                                              1, "colour", "s", "blue")
    assert ERR + "InvalidArgument" in d.error(root, MGR, "CreateShare", "ssta{sv}", "a", "NFS", 1,
                                              1, "backend", "u", 3)
    assert ERR + "NotFound" in d.error(root, MGR, "CreateShare", "ssta{sv}", "a", "NFS", 1,
                                       1, "backend", "s", "nope")
    d.create_share("a")
    assert ERR + "AlreadyExists" in d.error(root, MGR, "CreateShare", "ssta{sv}", "a", "NFS", 1, 0)
    assert ERR + "CapacityExceeded" in d.error(root, MGR, "CreateShare", "ssta{sv}", "big", "NFS",
                                               10 ** 5, 1, "backend", "s", "mem2")
    assert len(d.manager("ListShares", "a{sv}", 0)) == 1


def test_access_rules_validation_and_canonical_forms(d):
    path = d.create_share("acl")
    rid = d.share(path, "AllowAccess", "sssa{sv}", "IP", "10.0.0.0/24", "RW", 0)
    assert len(rid) == 32
    d.share(path, "AllowAccess", "sssa{sv}", "ip", "FD00::5/128", "ro", 0)
    rules = d.share_prop(path, "AccessRules")
    assert sorted((r[1], r[2], r[3], r[4]) for r in rules) == [
        ("ip", "10.0.0.0/24", "rw", "active"), ("ip", "fd00::5", "ro", "active")]
    for args, err in [(("ip", "10.0.0.5/24", "rw"), "InvalidArgument"),
                      (("ip", "10.0.0.0/24", "ro"), "AlreadyExists"),
                      (("ip", "not-an-ip", "rw"), "InvalidArgument"),
                      (("ip", "10.1.1.1", "rwx"), "InvalidArgument"),
                      (("cert", "alice", "rw"), "NotSupported"),
                      (("group", "x", "rw"), "InvalidArgument"),
                      (("ip", "10.1.1.1\n", "rw"), "InvalidArgument")]:
        assert ERR + err in d.error(path, SHARE, "AllowAccess", "sssa{sv}", *args, 0), args
    assert len(d.share_prop(path, "AccessRules")) == 2
    d.share(path, "DenyAccess", "sa{sv}", rid, 0)
    assert [r[2] for r in d.share_prop(path, "AccessRules")] == ["fd00::5"]
    assert ERR + "NotFound" in d.error(path, SHARE, "DenyAccess", "sa{sv}", rid, 0)
    assert ERR + "InvalidArgument" in d.error(path, SHARE, "DenyAccess", "sa{sv}", "../x", 0)


def test_grants_are_exact_and_squash_is_per_rule(d):
    """A single address never widens; root_squash unless a rule asks for
    more; the options show in AccessRuleOptions and in the records."""
    path = d.create_share("squash")
    for to, hint in (("0.0.0.0", "0.0.0.0/0"), ("::", "::/0"), ("0.0.0.0/32", "0.0.0.0/0"),
                     ("::ffff:10.0.0.1", "10.0.0.1")):
        text = d.error(path, SHARE, "AllowAccess", "sssa{sv}", "ip", to, "ro", 0)
        assert ERR + "InvalidArgument" in text and hint in text, (to, text)
    default = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.0.0.1", "rw", 0)
    opted = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.0.0.2", "rw", 3,
                    "squash", "s", "all_squash", "anonuid", "u", 1000, "anongid", "u", 1001)
    trusted = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.0.0.3", "ro", 1,
                      "squash", "s", "no_root_squash")
    everyone = d.share(path, "AllowAccess", "sssa{sv}", "ip", "0.0.0.0/0", "ro", 0)
    opts = d.share_prop(path, "AccessRuleOptions")
    flat = {rid: {k: v["data"] for k, v in o.items()} for rid, o in opts.items()}
    assert flat[default] == {"squash": "root_squash", "anonuid": 65534, "anongid": 65534}
    assert flat[opted] == {"squash": "all_squash", "anonuid": 1000, "anongid": 1001}
    assert flat[trusted]["squash"] == "no_root_squash" and everyone in flat
    for args in ((1, "squash", "s", "none"), (1, "squash", "u", 1), (1, "anonuid", "x", -1),
                 (1, "anonuid", "t", 2**32), (1, "colour", "s", "red")):
        text = d.error(path, SHARE, "AllowAccess", "sssa{sv}", "ip", "10.0.0.9", "rw", *args)
        assert ERR + "InvalidArgument" in text, (args, text)
    cifs = d.create_share("squash-cifs", "CIFS")
    text = d.error(cifs, SHARE, "AllowAccess", "sssa{sv}", "user", "alice", "rw", 1,
                   "squash", "s", "root_squash")
    assert ERR + "InvalidArgument" in text and "NFS" in text
    assert len(d.share_prop(path, "AccessRules")) == 4     # the refusals changed nothing
    spool = os.path.join(d.workdir, "spool", "storage1")
    rec = json.load(open(os.path.join(spool, sorted(
        n for n in os.listdir(spool) if n.endswith("-post-allow_access.json"))[-1])))
    assert rec["access_rules"][0]["squash"] == "root_squash"
    trusted_rec = [r for r in rec["share"]["access_rules"] if r["id"] == trusted][0]
    assert trusted_rec["squash"] == "no_root_squash"
    assert "no_root_squash" in d.log_tail(200)       # an explicit opt-in is logged


def test_extend_shrink_snapshot_revert_clone(d):
    path = d.create_share("data", "NFS", 2)
    d.share(path, "Extend", "ta{sv}", 4, 0)
    assert d.share_prop(path, "SizeGiB") == 4
    assert ERR + "InvalidArgument" in d.error(path, SHARE, "Extend", "ta{sv}", 3, 0)
    d.share(path, "Shrink", "ta{sv}", 3, 0)
    assert d.share_prop(path, "SizeGiB") == 3
    snap = d.share(path, "CreateSnapshot", "sa{sv}", "s1", 0)
    assert snap.startswith("/org/sharedd/Sharedd1/snapshot/")
    assert d.get(snap, "org.sharedd.Sharedd1.Snapshot", "Share") == path
    assert d.get(snap, "org.sharedd.Sharedd1.Snapshot", "Status") == "available"
    assert ERR + "AlreadyExists" in d.error(path, SHARE, "CreateSnapshot", "sa{sv}", "s1", 0)
    d.share(path, "RevertToSnapshot", "oa{sv}", snap, 0)
    clone = d.create_share("clone", "NFS", 3, snapshot=snap)
    assert d.share_prop(clone, "SourceSnapshot") == snap
    assert ERR + "InvalidState" in d.error(path, SHARE, "Delete", "a{sv}", 0)  # has snapshots
    d.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
    d.share(path, "Delete", "a{sv}", 0)


def test_manage_unmanage(d):
    path = d.manager("ManageShare", "sssa{sv}", "mem1", "nfs", "/legacy/data", 1, "size_gib", "t", 7)
    assert d.share_prop(path, "Name") == "data"
    assert d.share_prop(path, "SizeGiB") == 7
    assert ERR + "AlreadyExists" in d.error("/org/sharedd/Sharedd1", MGR, "ManageShare", "sssa{sv}",
                                            "mem1", "NFS", "/legacy/data", 1, "name", "s", "other")
    d.share(path, "Unmanage", "a{sv}", 0)
    assert d.manager("ListShares", "a{sv}", 0) == []


def test_backend_objects_and_stats(d):
    backends = d.get("/org/sharedd/Sharedd1", MGR, "Backends")
    assert backends == ["/org/sharedd/Sharedd1/backend/mem1", "/org/sharedd/Sharedd1/backend/mem2"]
    stats = d.get(backends[1], "org.sharedd.Sharedd1.Backend", "Stats")
    assert stats["total_capacity_gb"]["data"] == 5.0
    assert stats["snapshot_support"]["data"] is True
    assert d.get(backends[0], "org.sharedd.Sharedd1.Backend", "Protocols") == ["NFS", "CIFS"]


def test_spool_and_signal_records(d):
    path = d.create_share("hooked")
    share_id = path.rsplit("/", 1)[1]
    rid = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.9.0.0/16", "rw", 0)
    d.share(path, "DenyAccess", "sa{sv}", rid, 0)
    d.manager("RunPeriodicHooks", "a{sv}", 0)
    spool = os.path.join(d.workdir, "spool", "storage1")
    names = sorted(n for n in os.listdir(spool) if not n.startswith("."))
    recs = [json.load(open(os.path.join(spool, n))) for n in names]
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = [(r["phase"], r["method"]) for r in recs if r["share"] and r["share"]["id"] == share_id]
    assert kinds == [("pre", "create_share"), ("post", "create_share"),
                     ("pre", "allow_access"), ("post", "allow_access"),
                     ("pre", "deny_access"), ("post", "deny_access")]
    by = {(r["phase"], r["method"]): r for r in recs if r["share"] and r["share"]["id"] == share_id}
    assert by[("pre", "allow_access")]["share"]["access_rules"][0]["state"] == "applying"
    assert by[("post", "allow_access")]["share"]["access_rules"][0]["state"] == "active"
    assert by[("pre", "deny_access")]["share"]["access_rules"][0]["state"] == "denying"
    assert by[("post", "deny_access")]["share"]["access_rules"] == []
    periodic = [r for r in recs if r["phase"] == "periodic"]
    assert periodic and periodic[-1]["shares"][0]["id"] == share_id



def test_object_manager_and_properties_changed(d, system_bus):
    from tests.support.signals import SignalCollector
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    path = d.create_share("watched")
    d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.5.0.1", "rw", 0)
    d.share(path, "Extend", "ta{sv}", 3, 0)
    d.share(path, "Delete", "a{sv}", 0)
    time.sleep(0.5)
    msgs = sig.wait_for(1)
    sig.close()
    om = [(m.member, m.path, m.body[0]) for m in msgs
          if m.interface == "org.freedesktop.DBus.ObjectManager"]
    assert ("InterfacesAdded", "/org/sharedd/Sharedd1", path) in om
    assert ("InterfacesRemoved", "/org/sharedd/Sharedd1", path) in om
    added = [m for m in msgs if m.member == "InterfacesAdded" and m.body[0] == path][0]
    assert added.body[1]["org.sharedd.Sharedd1.Share"]["Name"].value == "watched"
    changes = [m.body[1] for m in msgs if m.member == "PropertiesChanged" and m.path == path]
    assert any("AccessRules" in c for c in changes)
    assert any(c.get("SizeGiB") and c["SizeGiB"].value == 3 for c in changes)
    statuses = [c["Status"].value for c in changes if "Status" in c]
    assert "extending" in statuses and "deleting" in statuses


def test_a_group_names_its_changed_share_list_without_sending_it(d, system_bus):
    """A share joining or leaving a group: the group's PropertiesChanged
    names Shares as invalidated and does not carry the list (as long as the
    group); Get reads the list."""
    from tests.support.signals import SignalCollector
    group = d.manager("CreateShareGroup", "sa{sv}", "listed", 0)
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    path = d.create_share("member", share_group=group)
    assert d.get(group, "org.sharedd.Sharedd1.ShareGroup", "Shares") == [path]
    d.share(path, "Delete", "a{sv}", 0)
    time.sleep(0.5)
    msgs = sig.wait_for(1)
    sig.close()
    told = [m.body for m in msgs if m.member == "PropertiesChanged" and m.path == group]
    assert len(told) >= 2, told               # joined, left
    assert all("Shares" not in changed and invalidated == ["Shares"]
               for _, changed, invalidated in told), told
    assert d.get(group, "org.sharedd.Sharedd1.ShareGroup", "Shares") == []


def test_rule_and_backend_announcements_follow_the_last_state(d, system_bus):
    """AccessRules are announced from the rule events (the share's other
    changes reuse them); a backend's Stats at most every half second, and
    the last announcement always carries the final figures."""
    from tests.support.signals import SignalCollector
    backend = "/org/sharedd/Sharedd1/backend/mem1"
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    path = d.create_share("rules-follow")
    rid = d.share(path, "AllowAccess", "sssa{sv}", "ip", "10.5.0.2", "rw", 0)
    d.share(path, "Extend", "ta{sv}", 2, 0)
    for size in range(3, 9):
        d.share(path, "Extend", "ta{sv}", size, 0)
    d.share(path, "DenyAccess", "sa{sv}", rid, 0)
    time.sleep(1.5)     # past the backend's announcement interval
    msgs = sig.wait_for(1)
    sig.close()
    rules = [m.body[1]["AccessRules"].value for m in msgs
             if m.member == "PropertiesChanged" and m.path == path and "AccessRules" in m.body[1]]
    assert rules[-1] == [] and any(r and r[0][0] == rid for r in rules)
    assert d.share_prop(path, "AccessRules") == []
    stats = [m.body[1]["Stats"].value for m in msgs
             if m.member == "PropertiesChanged" and m.path == backend and "Stats" in m.body[1]]
    assert 1 <= len(stats) < 8      # 8 operations changed the provisioned figure
    assert stats[-1]["provisioned_capacity_gb"].value == 8.0
    assert d.get(backend, "org.sharedd.Sharedd1.Backend", "Stats")["provisioned_capacity_gb"]["data"] == 8.0

def test_non_root_reads_but_cannot_change(d):
    """The bus lets everyone call; sharedd refuses changes to callers who
    are neither root nor in admin_group (no polkit on this bus: authorization
    = auto falls back to the group)."""
    path = d.create_share("policy")
    nobody = 65534
    # Reading is allowed to everyone.
    proc = d.bus.busctl("get-property", "org.sharedd.Sharedd1", path, SHARE, "Name", user=nobody)
    assert '"policy"' in proc.stdout
    proc = d.bus.busctl("call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1", MGR, "ListShares",
                        "a{sv}", "0", user=nobody)
    assert path in proc.stdout
    # Changing is refused by sharedd, with the reason, and audited.
    for argv in (["call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1", MGR, "CreateShare",
                  "ssta{sv}", "x", "NFS", "1", "0"],
                 ["call", "org.sharedd.Sharedd1", path, SHARE, "Delete", "a{sv}", "0"],
                 ["call", "org.sharedd.Sharedd1", path, SHARE, "AllowAccess", "sssa{sv}", "ip",
                  "10.0.0.1", "rw", "1", "auth.no_user_interaction", "b", "true"]):
        proc = d.bus.busctl(*argv, check=False, user=nobody)
        assert proc.returncode != 0 and "is for root and members of group sharedd" \
            in proc.stderr, proc.stderr
    assert d.manager("ListShares", "a{sv}", 0) == [path]
    assert d.share_prop(path, "AccessRules") == []
    assert any(f"by uid {nobody}" in ln and "refused: NotAuthorized" in ln
               for ln in d.log_tail(200).splitlines())


def test_members_of_the_admin_group_may_change(sharedd_factory):
    """admin_group = nogroup, the primary group of nobody: nobody may now
    create and delete (and the no-interaction option is every call's)."""
    d = sharedd_factory(CONFIG.replace("host_id = storage1",
                                       "host_id = storage1\nadmin_group = nogroup"))
    proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1",
                        MGR, "CreateShare", "ssta{sv}", "bynobody", "NFS", "1", "1",
                        "auth.no_user_interaction", "b", "true", user=65534)
    path = json.loads(proc.stdout)["data"][0]
    d.bus.busctl("call", "org.sharedd.Sharedd1", path, SHARE, "Delete", "a{sv}", "0", user=65534)
    assert d.manager("ListShares", "a{sv}", 0) == []
    bad = d.error("/org/sharedd/Sharedd1", MGR, "CreateShare", "ssta{sv}", "x", "NFS", 1, 1,
                  "auth.no_user_interaction", "s", "yes")
    assert bad.startswith("org.sharedd.Sharedd1.Error.InvalidArgument")


def test_every_change_is_attributed_to_its_caller(d):
    """One audit record per state-changing call, done or refused, with the
    caller's uid and pid from the bus; reads leave none. (On a test bus
    there is no journald: the record goes to the log; the packaged test
    reads it from the journal.)"""
    path = d.create_share("audited")
    d.share(path, "Extend", "ta{sv}", 2, 0)
    d.error(path, SHARE, "Extend", "ta{sv}", 1, 0)                          # refused
    d.manager("ListShares", "a{sv}", 0)
    lines = [ln for ln in d.log_tail(400).splitlines() if "audit: " in ln]
    assert any("Manager.CreateShare /org/sharedd/Sharedd1 by uid 0 (pid " in ln
               and ": ok; args: audited NFS 1 {}" in ln for ln in lines), lines
    assert any(f"Share.Extend {path} by uid 0" in ln and ": ok;" in ln for ln in lines), lines
    assert any(f"Share.Extend {path} by uid 0" in ln and "refused: InvalidArgument" in ln
               for ln in lines), lines
    assert not any("ListShares" in ln for ln in lines)
    # A caller's text is escaped and bounded in the record.
    d.error("/org/sharedd/Sharedd1", MGR, "CreateShare", "ssta{sv}", "x\ny" * 100, "NFS", 1, 0)
    forged = [ln for ln in d.log_tail(400).splitlines() if ln.startswith("y")]
    assert not forged and any("x\\ny" in ln for ln in d.log_tail(400).splitlines())
