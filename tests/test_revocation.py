"""Revocation always wins, and a refused call leaves no trace - against the
real daemon: btrfs on a loop device, NFS-Ganesha in the server namespace,
libnfs clients in client namespaces, the spool on a real file system.

- NFS-Ganesha killed during a deny: the rule is never exported again, never
  reads as active, and is gone once ganesha is back;
- the spool made unwritable (a read-only file system mounted over it): grants
  are refused, but deny and delete take effect on the backend;
- ManageShare with bad paths: a named error and no row, signal or record.
(tests/test_limits_instance.py has the rule limit and the single instance.)
"""

import os
import subprocess
import time

import pytest

from tests.support import components
from tests.support.signals import SignalCollector

SHARE = "org.sharedd.Sharedd1.Share"
MGR = "org.sharedd.Sharedd1.Manager"
ROOT = "/org/sharedd/Sharedd1"
ERR = "org.sharedd.Sharedd1.Error."


@pytest.fixture(scope="module")
def client(netlab):
    return netlab.add_client("revoke", ip4="10.71.0.61")


def spool_names(h):
    d = os.path.join(h.spool_dir, "storage1")
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []


def wait_for(what, check, timeout=60, step=0.2):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def granted_share(h, client, name):
    """A new share with an rw rule for the client, proven over NFS."""
    path = h.create_share(name, "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    rid = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.61", "rw", 0)
    assert h.ganesha.nfs_ls(client, f"/shares/{sid}").ok
    return path, sid, rid


def test_ganesha_killed_during_deny(storage_host, client):
    h = storage_host
    path, sid, rid = granted_share(h, client, "revoke-ganesha")
    h.ganesha.kill()
    try:
        text = h.error(path, SHARE, "DenyAccess", "sa{sv}", rid, 0)
        assert ERR + "BackendFailure" in text and "queued and will be retried" in text, text
        states = {r[0]: r[4] for r in h.share_prop(path, "AccessRules")}
        assert states[rid] in ("queued_to_deny", "denying")
        time.sleep(2)   # retries run against the dead server; still never a grant
        assert {r[0]: r[4] for r in h.share_prop(path, "AccessRules")}[rid] != "active"
    finally:
        h.ganesha.start()
    seen = []

    def denied():
        rules = h.share_prop(path, "AccessRules")
        seen.extend(r[4] for r in rules)
        return rules == []
    wait_for("the queued deny to be applied once ganesha is back", denied)
    assert "active" not in seen, "a denied rule came back as a grant"
    assert not h.ganesha.nfs_ls(client, f"/shares/{sid}").ok, "the denied client still gets in"
    assert h.share_prop(path, "Status") == "available"
    # The share is exported again for everyone else: a new grant works.
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.61", "ro", 0)
    assert h.ganesha.nfs_ls(client, f"/shares/{sid}").ok
    h.share(path, "Delete", "a{sv}", 0)


def test_unwritable_spool_blocks_grants_but_never_revocation(storage_host, client):
    h = storage_host
    path, sid, rid = granted_share(h, client, "revoke-spool")
    before = spool_names(h)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "sharedd-ro-spool", h.spool_dir],
                   check=True)
    try:
        components.used("read-only tmpfs over the spool")
        text = h.error(path, SHARE, "AllowAccess", "sssa{sv}", "ip", "10.71.0.62", "rw", 0)
        assert ERR + "BackendFailure" in text and "pre hook" in text, text
        h.share(path, "DenyAccess", "sa{sv}", rid, 0)        # succeeds: revocation wins
        assert h.share_prop(path, "AccessRules") == []
        assert not h.ganesha.nfs_ls(client, f"/shares/{sid}").ok
        h.share(path, "Delete", "a{sv}", 0)
        assert sid not in os.listdir(os.path.join(h.pool_path, "shares"))
        assert path not in h.manager("ListShares", "a{sv}", 0)
    finally:
        subprocess.run(["umount", h.spool_dir], check=True)
    assert spool_names(h) == before, "nothing reached the real spool while it was covered"
    assert "goes on despite its pre hooks" in h.log_tail(200)


BAD_PATHS = ["--help", "-o", "/etc", "/", "relative/../../etc", "{pool}", "{pool}/shares",
             "{pool}/../state", "{pool}/plain-dir", "{pool}/missing", "{pool}/x\n",
             "{pool}/not-for-adoption"]     # a subvolume outside the areas ManageShare may use


def test_manage_share_with_bad_paths_leaves_no_trace(storage_host, system_bus):
    h = storage_host
    os.makedirs(os.path.join(h.pool_path, "plain-dir"), exist_ok=True)
    if not os.path.exists(os.path.join(h.pool_path, "not-for-adoption")):
        subprocess.run(["btrfs", "subvolume", "create", os.path.join(h.pool_path, "not-for-adoption")],
                       check=True, capture_output=True, timeout=60)
    shares = h.manager("ListShares", "a{sv}", 0)
    names = spool_names(h)
    sig = SignalCollector(system_bus.address, "type='signal',sender='org.sharedd.Sharedd1'")
    try:
        for bad in BAD_PATHS:
            text = h.error(ROOT, MGR, "ManageShare", "sssa{sv}", "btrfs1", "NFS",
                           bad.format(pool=h.pool_path), 1, "name", "s", "adopted")
            assert ERR + "InvalidArgument" in text, (bad, text)
        time.sleep(0.5)
    finally:
        sig.close()
    # (the backend's Stats may be refreshed on its timer meanwhile)
    about_shares = [m for m in sig.messages if not m.path.startswith(ROOT + "/backend/")]
    assert about_shares == [], [(m.member, m.path, m.body[:2]) for m in about_shares]
    assert h.manager("ListShares", "a{sv}", 0) == shares
    assert spool_names(h) == names
