"""The Samba helper against a real smbd (registry config), clients via smbclient
from their own network namespaces (see tests/fixtures/samba.py)."""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest

from sharedd import errors
from sharedd.config import BackendConfig
from sharedd.drivers import load_class
from sharedd.helpers import CIFS_HELPERS
from sharedd.helpers.samba import SambaHelper
from sharedd.models import AccessRule, Share
from sharedd.record import EXPORT_RE

DENIED = "NT_STATUS_ACCESS_DENIED"


def make_share(name: str) -> Share:
    return Share(id=uuid.uuid4().hex, name=name, backend="smb73", protocol="CIFS",
                 size_gib=1, status="available")


def rule(share: Share, kind: str, to: str, level: str = "rw") -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id=share.id, access_type=kind,
                      access_to=to, access_level=level, state="active")


def offline_helper(export_ip: str = "10.73.0.1") -> SambaHelper:
    cfg = BackendConfig("smb73", {"samba_config_file": "", "samba_net_command": "net",
                                  "samba_smbcontrol_command": "smbcontrol",
                                  "samba_command_prefix": [], "share_export_ip": export_ip})
    return SambaHelper(cfg, "/nonexistent", 10)


@pytest.fixture(scope="module")
def helper(samba_lab):
    cls = load_class(CIFS_HELPERS["samba"])
    h = cls(BackendConfig("smb73", samba_lab.helper_config()), samba_lab.path("state"), 30)
    h.setup()
    return h


def share_dir(lab, name: str) -> str:
    path = lab.path("shares", name)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)   # root-owned, like a fresh file system's root
    return path


def ok(proc) -> bool:
    return proc.returncode == 0 and "NT_STATUS" not in proc.stdout + proc.stderr


def wait_for(pred, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


# --- without a server ---------------------------------------------------------------
def test_contract_and_locations():
    h = offline_helper()
    assert h.helper_name == "samba" and h.protocol == "CIFS"
    assert load_class(CIFS_HELPERS["samba"]) is SambaHelper
    share = make_share("docs")
    assert h.export_locations(share, "/x") == ["\\\\10.73.0.1\\docs"]
    hints = h.mount_hints(share, "/x")
    assert hints == {"fstype": "cifs", "export": "10.73.0.1:/docs"}
    assert re.match(EXPORT_RE, hints["export"])
    v6 = offline_helper("fd73::1").mount_hints(share, "/x")
    assert v6["export"] == "[fd73::1]:/docs" and re.match(EXPORT_RE, v6["export"])
    with pytest.raises(errors.NotSupported, match="per host"):
        h.validate_access("ip", "ro")
    h.validate_access("user", "ro")
    h.validate_access("ip", "rw")
    with pytest.raises(errors.NotSupported):
        h.validate_access("cert", "rw")


# --- against smbd --------------------------------------------------------------------------
def test_ip_rules_admit_and_refuse_hosts(samba_lab, helper):
    share = make_share("ip73")
    path = share_dir(samba_lab, "ip73")
    rules = [rule(share, "ip", "10.73.0.11"), rule(share, "ip", "fd73::11/128")]
    assert helper.export(share, path, rules) == ["\\\\10.73.0.1\\ip73"]
    assert ok(samba_lab.smbclient("a", "ip73", "smbrw73", "ls"))
    assert ok(samba_lab.smbclient("a", "ip73", "smbrw73", "ls", ipv6=True))
    for v6 in (False, True):   # hosts deny = ALL closes IPv6 too
        out = samba_lab.smbclient("b", "ip73", "smbrw73", "ls", ipv6=v6)
        assert out.returncode != 0 and DENIED in out.stdout + out.stderr

    before = samba_lab.net("showshare", "ip73").stdout
    with pytest.raises(errors.NotSupported, match="read-only per host"):
        helper.update_access(share, path, rules, [rule(share, "ip", "10.73.0.12", "ro")], [])
    with pytest.raises(errors.InvalidArgument):
        helper.update_access(share, path, rules, [rule(share, "ip", "not-an-ip")], [])
    assert samba_lab.net("showshare", "ip73").stdout == before

    extra = rule(share, "ip", "10.73.0.0/28")
    helper.update_access(share, path, rules + [extra], [extra], [])
    assert ok(samba_lab.smbclient("b", "ip73", "smbrw73", "ls"))
    helper.update_access(share, path, rules, [], [extra])
    assert DENIED in samba_lab.smbclient("b", "ip73", "smbrw73", "ls").stdout

    helper.unexport(share, path)
    assert "ip73" not in samba_lab.net("listshares").stdout.split()
    out = samba_lab.smbclient("a", "ip73", "smbrw73", "ls")
    assert out.returncode != 0 and "NT_STATUS_BAD_NETWORK_NAME" in out.stdout + out.stderr
    helper.unexport(share, path)   # idempotent


def test_user_rules_rw_and_ro(samba_lab, helper):
    share = make_share("usr73")
    path = share_dir(samba_lab, "usr73")
    rw, ro = rule(share, "user", "smbrw73"), rule(share, "user", "smbro73", "ro")
    helper.export(share, path, [rw, ro])
    local = samba_lab.path("client", "up.txt")
    with open(local, "w") as f:
        f.write("written by the rw user\n")
    assert ok(samba_lab.smbclient("a", "usr73", "smbrw73", f"put {local} up.txt"))
    st = os.stat(os.path.join(path, "up.txt"))
    assert st.st_uid == 47301   # written as the user, through the ACL on the root
    got = samba_lab.path("client", "got.txt")
    assert ok(samba_lab.smbclient("b", "usr73", "smbro73", f"get up.txt {got}"))
    with open(got) as f:
        assert f.read() == "written by the rw user\n"
    out = samba_lab.smbclient("b", "usr73", "smbro73", f"put {local} ro.txt")
    assert "NT_STATUS" in out.stdout + out.stderr
    assert not os.path.exists(os.path.join(path, "ro.txt"))
    out = samba_lab.smbclient("a", "usr73", "smbno73", "ls")   # not granted
    assert out.returncode != 0 and DENIED in out.stdout + out.stderr

    # recovery mode rewrites a tampered registry share from the full rule set
    samba_lab.net("setparm", "usr73", "valid users", "smbno73")
    samba_lab.net("setparm", "usr73", "read list", "")
    helper.update_access(share, path, [rw, ro], [], [])
    params = samba_lab.net("showshare", "usr73").stdout
    assert "valid users = smbro73, smbrw73" in params and "read list = smbro73" in params
    assert "available" not in params
    assert ok(samba_lab.smbclient("a", "usr73", "smbrw73", "ls"))
    assert DENIED in samba_lab.smbclient("a", "usr73", "smbno73", "ls").stdout

    with pytest.raises(errors.InvalidArgument, match="unknown user"):
        helper.update_access(share, path, [rw, ro], [rule(share, "user", "nosuchuser73")], [])
    with pytest.raises(errors.InvalidArgument):
        helper.update_access(share, path, [rw, ro], [rule(share, "user", "@staff")], [])
    helper.unexport(share, path)


def test_deny_cuts_open_session(samba_lab, helper):
    share = make_share("cut73")
    path = share_dir(samba_lab, "cut73")
    rw, ro = rule(share, "user", "smbrw73"), rule(share, "user", "smbro73", "ro")
    helper.export(share, path, [rw, ro])
    session = samba_lab.open_session("a", "cut73", "smbrw73")
    try:
        session.stdin.write("ls\n")
        session.stdin.flush()
        assert wait_for(lambda: "cut73" in samba_lab.connected_shares()), "session never opened"
        helper.update_access(share, path, [rw, ro], [], [rw])
        # smbd dropped the tree connection on its own: the client did nothing
        assert wait_for(lambda: "cut73" not in samba_lab.connected_shares()), \
            "the denied session is still open"
        out, _ = session.communicate("ls\nquit\n", timeout=30)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    first, _, after = out.partition("blocks available")
    assert " . " in first or "  .  " in first or "D        0" in first   # the listing before
    assert "NT_STATUS_NETWORK_NAME_DELETED" in after, out
    assert DENIED in samba_lab.smbclient("a", "cut73", "smbrw73", "ls").stdout
    assert ok(samba_lab.smbclient("a", "cut73", "smbro73", "ls"))
    acl = samba_lab.ns_run(["getfacl", "-p", path]).stdout
    assert "user:smbrw73:" not in acl and "user:smbro73:r-x" in acl
    helper.unexport(share, path)


def test_foreign_and_reserved_shares_untouched(samba_lab, helper):
    path = share_dir(samba_lab, "adm73")
    samba_lab.net("addshare", "adm73", path, "writeable=n", "guest_ok=n")
    try:
        share = make_share("adm73")
        before = samba_lab.net("showshare", "adm73").stdout
        with pytest.raises(errors.AlreadyExists):
            helper.export(share, path, [])
        helper.unexport(share, path)
        assert samba_lab.net("showshare", "adm73").stdout == before
    finally:
        samba_lab.net("delshare", "adm73")
    with pytest.raises(errors.InvalidArgument, match="reserved"):
        helper.export(make_share("homes"), path, [])
    assert "homes" not in samba_lab.net("listshares").stdout.split()


def test_volume_share_served_by_smbd(samba_lab, helper):
    """End to end: the volume driver on a loop image with this helper in front."""
    from sharedd.drivers.volume import VolumeDriver
    from sharedd.mountinfo import is_mounted
    import subprocess
    pool, state = samba_lab.path("pool"), samba_lab.path("vstate")
    os.makedirs(state, exist_ok=True)
    cfg = BackendConfig("vol73", {"volume_pool_path": pool, "volume_fs_type": "ext4",
                                  "volume_mount_dir": samba_lab.mounts,
                                  "volume_provider": "loopfile"})
    drv = VolumeDriver("vol73", cfg, {"CIFS": helper}, state, 60)
    drv.do_setup()
    share = make_share("vol73")
    share.size_gib = 2
    mp = os.path.join(samba_lab.mounts, share.id)
    try:
        update = drv.create_share(share)
        share.provider_location, share.driver_data = update.provider_location, update.driver_data
        assert update.export_locations == ["\\\\10.73.0.1\\vol73"]
        assert drv.get_mount_hints(share) == {"fstype": "cifs", "export": "10.73.0.1:/vol73"}
        rw, ro = rule(share, "user", "smbrw73"), rule(share, "user", "smbro73", "ro")
        drv.update_access(share, [rw, ro], [rw, ro], [])
        local = samba_lab.path("client", "vol.txt")
        with open(local, "w") as f:
            f.write("on a loop volume\n")
        assert ok(samba_lab.smbclient("a", "vol73", "smbrw73", f"put {local} one.txt"))
        with open(os.path.join(mp, "one.txt")) as f:
            assert f.read() == "on a loop volume\n"

        # offline shrink unexports and re-exports with the rules last applied
        drv.shrink_share(share, 1)
        share.size_gib = 1
        got = samba_lab.path("client", "vol-got.txt")
        assert ok(samba_lab.smbclient("b", "vol73", "smbro73", f"get one.txt {got}"))
        with open(got) as f:
            assert f.read() == "on a loop volume\n"
        assert DENIED in samba_lab.smbclient("a", "vol73", "smbno73", "ls").stdout

        drv.delete_share(share)
        assert "vol73" not in samba_lab.net("listshares").stdout.split()
        assert not is_mounted(mp) and not os.listdir(pool)
    finally:
        if os.path.isdir(pool) and os.listdir(pool):
            try:
                drv.delete_share(share)
            finally:
                for name in os.listdir(pool):
                    out = subprocess.run(["losetup", "-j", os.path.join(pool, name)],
                                         capture_output=True, text=True).stdout
                    for line in out.splitlines():
                        subprocess.run(["umount", "-l", mp], capture_output=True)
                        subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)


# --- ip rules make the share writable (issue 12) ----------------------------------------
def acl_of(lab, path: str) -> str:
    """Every access and default ACL entry under path, recursively."""
    return lab.ns_run(["getfacl", "-R", "-p", path]).stdout


def assert_group_gives_nothing(lab, path: str, group: str = "sharedd-cifs") -> None:
    """No named entry for group anywhere under path, and no permission for it
    where it owns a file."""
    acl = acl_of(lab, path)
    assert f"group:{group}:" not in acl, acl
    for block in acl.split("\n\n"):
        if f"# group: {group}\n" in block:
            assert "\ngroup::---" in block, block


def local_touch(uid: int, target: str, gid: int = 0):
    """Write a file as a local account of the storage host (no Samba involved)."""
    import subprocess
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups",
                           "touch", target], capture_output=True, text=True, timeout=30)


def test_ip_rw_rule_makes_share_writable_and_deny_undoes_it(samba_lab, helper):
    share = make_share("ipw73")
    path = share_dir(samba_lab, "ipw73")
    grant = rule(share, "ip", "10.73.0.11")
    helper.export(share, path, [grant])
    params = samba_lab.net("showshare", "ipw73").stdout
    assert "force group = sharedd-cifs" in params and "valid users" not in params
    assert "group:sharedd-cifs:rwx" in acl_of(samba_lab, path)
    assert "default:group:sharedd-cifs:rwx" in acl_of(samba_lab, path)

    local = samba_lab.path("client", "ipw.txt")
    with open(local, "w") as f:
        f.write("written through an ip rule\n")
    out = samba_lab.smbclient("a", "ipw73", "smbrw73", f"put {local} ipw.txt")
    assert ok(out), out.stdout + out.stderr
    st = os.stat(os.path.join(path, "ipw.txt"))
    assert st.st_uid == 47301 and st.st_gid == 47310   # the writer, the forced group
    got = samba_lab.path("client", "ipw-got.txt")
    assert ok(samba_lab.smbclient("a", "ipw73", "smbno73", f"get ipw.txt {got}"))
    with open(got) as f:
        assert f.read() == "written through an ip rule\n"
    # every admitted account writes, also into another account's directory
    # and over another account's file (the default ACL entries are inherited)
    assert ok(samba_lab.smbclient("a", "ipw73", "smbno73", "mkdir sub"))
    assert ok(samba_lab.smbclient("a", "ipw73", "smbro73", f"put {local} sub/deep.txt"))
    assert os.stat(os.path.join(path, "sub", "deep.txt")).st_uid == 47302
    with open(local, "w") as f:
        f.write("overwritten by another account\n")
    assert ok(samba_lab.smbclient("a", "ipw73", "smbno73", f"put {local} ipw.txt"))
    with open(os.path.join(path, "ipw.txt")) as f:
        assert f.read() == "overwritten by another account\n"

    # not world-writable (the group bits show the ACL mask): the same account,
    # locally on the storage host, cannot write
    assert os.stat(path).st_mode & 0o707 == 0o705
    proc = local_touch(47303, os.path.join(path, "local.txt"))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(path, "local.txt"))

    # the forced group is what grants the writes (checked again after the deny)
    assert local_touch(47399, os.path.join(path, "ipw.txt"), gid=47310).returncode == 0

    # a host that is not granted is refused
    out = samba_lab.smbclient("b", "ipw73", "smbrw73", f"put {local} from-b.txt")
    assert out.returncode != 0 and DENIED in out.stdout + out.stderr
    assert not os.path.exists(os.path.join(path, "from-b.txt"))

    # ip ro stays refused, and says why and what to use instead; nothing changes
    before = samba_lab.net("showshare", "ipw73").stdout
    with pytest.raises(errors.NotSupported,
                       match=r"read-only per host.*'user' rules with level ro"):
        helper.update_access(share, path, [grant], [rule(share, "ip", "10.73.0.12", "ro")], [])
    assert samba_lab.net("showshare", "ipw73").stdout == before

    # deny the last ip rule: nobody connects, and the forced group and its
    # ACL entries are gone from the whole tree (not left writable)
    session = samba_lab.open_session("a", "ipw73", "smbrw73")
    try:
        session.stdin.write("ls\n")
        session.stdin.flush()
        assert wait_for(lambda: "ipw73" in samba_lab.connected_shares()), "session never opened"
        helper.update_access(share, path, [grant], [], [grant])
        assert wait_for(lambda: "ipw73" not in samba_lab.connected_shares()), \
            "a session kept the forced group after the deny"
    finally:
        session.kill()
        session.wait()
    out = samba_lab.smbclient("a", "ipw73", "smbrw73", f"put {local} after.txt")
    assert out.returncode != 0 and DENIED in out.stdout + out.stderr
    assert not os.path.exists(os.path.join(path, "after.txt"))
    assert "force group" not in samba_lab.net("showshare", "ipw73").stdout
    assert_group_gives_nothing(samba_lab, path)
    assert os.stat(path).st_mode & 0o777 == 0o755
    # nor does holding the group (smbd's forced group was the only holder)
    proc = local_touch(47399, os.path.join(path, "ipw.txt"), gid=47310)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stderr
    proc = local_touch(47399, os.path.join(path, "sub", "new.txt"), gid=47310)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stderr

    # a full sync (export, recovery) also clears stray entries of the group
    samba_lab.ns_run(["setfacl", "-m", "g:sharedd-cifs:rwx,d:g:sharedd-cifs:rwx", path])
    helper.update_access(share, path, [], [], [])
    assert_group_gives_nothing(samba_lab, path)
    helper.unexport(share, path)


def test_ip_and_user_rules_user_rules_decide_levels(samba_lab, helper):
    share = make_share("ipu73")
    path = share_dir(samba_lab, "ipu73")
    host = rule(share, "ip", "10.73.0.11")
    ro = rule(share, "user", "smbro73", "ro")
    rw = rule(share, "user", "smbrw73")
    helper.export(share, path, [host])
    local = samba_lab.path("client", "ipu.txt")
    with open(local, "w") as f:
        f.write("before the user rules\n")
    assert ok(samba_lab.smbclient("a", "ipu73", "smbro73", f"put {local} early.txt"))

    # a ro user rule: the share is no longer writable through the ip rule
    helper.update_access(share, path, [host, ro], [ro], [])
    params = samba_lab.net("showshare", "ipu73").stdout
    assert "force group" not in params and "read list = smbro73" in params
    assert_group_gives_nothing(samba_lab, path)
    out = samba_lab.smbclient("a", "ipu73", "smbro73", f"put {local} ro.txt")
    assert "NT_STATUS" in out.stdout + out.stderr
    assert not os.path.exists(os.path.join(path, "ro.txt"))
    out = samba_lab.smbclient("a", "ipu73", "smbro73", f"put {local} early.txt")   # its own file
    assert "NT_STATUS" in out.stdout + out.stderr
    with open(os.path.join(path, "early.txt")) as f:
        assert f.read() == "before the user rules\n"
    got = samba_lab.path("client", "ipu-got.txt")
    assert ok(samba_lab.smbclient("a", "ipu73", "smbro73", f"get early.txt {got}"))
    # both checks: an unlisted user from the granted host, a listed one from another host
    assert DENIED in samba_lab.smbclient("a", "ipu73", "smbno73", "ls").stdout
    assert DENIED in samba_lab.smbclient("b", "ipu73", "smbro73", "ls").stdout

    helper.update_access(share, path, [host, ro, rw], [rw], [])
    assert ok(samba_lab.smbclient("a", "ipu73", "smbrw73", f"put {local} rw.txt"))
    assert os.path.exists(os.path.join(path, "rw.txt"))
    out = samba_lab.smbclient("b", "ipu73", "smbrw73", f"put {local} rw-b.txt")
    assert out.returncode != 0 and DENIED in out.stdout + out.stderr
    out = samba_lab.smbclient("a", "ipu73", "smbro73", f"put {local} ro2.txt")
    assert "NT_STATUS" in out.stdout + out.stderr
    assert not os.path.exists(os.path.join(path, "ro2.txt"))

    # back to ip only: writable for every admitted user again
    helper.update_access(share, path, [host, ro, rw], [], [ro, rw])
    assert "force group = sharedd-cifs" in samba_lab.net("showshare", "ipu73").stdout
    assert ok(samba_lab.smbclient("a", "ipu73", "smbno73", f"put {local} again.txt"))
    helper.unexport(share, path)


def test_ip_group_must_exist_and_have_no_members(samba_lab, helper):
    share = make_share("grp73")
    path = share_dir(samba_lab, "grp73")
    try:
        for group, why in (("nosuchgroup73", "groupadd --system nosuchgroup73"),
                           ("smbmembers73", r"has members \(smbrw73\)")):
            helper.ip_group = group
            with pytest.raises(errors.BackendFailure, match=why):
                helper.export(share, path, [rule(share, "ip", "10.73.0.11")])
            assert "grp73" not in samba_lab.net("listshares").stdout.split()   # nothing made
    finally:
        del helper.ip_group
    host, user = rule(share, "ip", "10.73.0.11"), rule(share, "user", "smbro73", "ro")
    helper.export(share, path, [host])
    assert "force group = sharedd-cifs" in samba_lab.net("showshare", "grp73").stdout
    helper.update_access(share, path, [host, user], [user], [])
    assert "force group" not in samba_lab.net("showshare", "grp73").stdout
    # a deny is never held back by the group: it goes through without it
    helper.ip_group = "nosuchgroup73"
    try:
        helper.update_access(share, path, [host, user], [], [user])
    finally:
        del helper.ip_group
    params = samba_lab.net("showshare", "grp73").stdout
    assert "force group" not in params and "valid users" not in params
    assert "hosts allow = 10.73.0.11" in params and "available" not in params
    out = samba_lab.smbclient("a", "grp73", "smbrw73", "ls")
    assert ok(out), out.stdout + out.stderr
    helper.update_access(share, path, [host], [], [])   # the next ensure makes it writable
    assert "force group = sharedd-cifs" in samba_lab.net("showshare", "grp73").stdout
    helper.unexport(share, path)


def test_previous_versions_parameters_follow_the_view_and_cost_no_net_when_kept(samba_lab, helper):
    """show_snapshots sets or drops shadow_copy2 as the view starts or stops
    showing snapshots; a snapshot change that keeps them (another version in
    a view that already shows some), or follows a sync that set them, runs
    no `net`; a share of that name that is not ours is refused."""
    path = share_dir(samba_lab, "pv73")
    view = samba_lab.path("shares", "pv73-view")
    os.makedirs(view, exist_ok=True)
    share = make_share("pv73")
    rules = [rule(share, "ip", "10.73.0.11")]
    runs = []
    real_run = helper._run
    helper._run = lambda argv, **kw: runs.append(list(argv)) or real_run(argv, **kw)
    helper.snapshot_dir_of = lambda s: view if s.id == share.id else None
    try:
        helper.show_snapshots(share, path, {"@GMT-2026.01.01-00.00.00": view}, [], rules)
        assert [a for a in runs if "import" in a] == [], "not exported yet: nothing set"
        helper.export(share, path, rules)         # the export carries them
        assert "shadow_copy2" in samba_lab.net("showshare", "pv73").stdout
        runs.clear()
        helper.show_snapshots(share, path, {"@GMT-2026.01.01-00.00.00": view,
                                            "@GMT-2026.01.02-00.00.00": view}, [], rules)
        helper.show_snapshots(share, path, {"@GMT-2026.01.02-00.00.00": view},
                              ["@GMT-2026.01.01-00.00.00"], rules)
        assert runs == [], "the parameters did not change: no net"

        helper.show_snapshots(share, path, {}, ["@GMT-2026.01.02-00.00.00"], rules)
        params = samba_lab.net("showshare", "pv73").stdout
        assert "shadow" not in params and "vfs objects" not in params
        runs.clear()
        helper.show_snapshots(share, path, {}, [], rules)
        assert runs == []
        helper.show_snapshots(share, path, {"@GMT-2026.01.03-00.00.00": view}, [], rules)
        params = samba_lab.net("showshare", "pv73").stdout
        assert "shadow_copy2" in params and f"shadow:snapdir = {view}" in params

        # Changed behind sharedd's back: the next sync (an ensure) puts them back.
        samba_lab.net("delparm", "pv73", "vfs objects")
        helper.update_access(share, path, rules, [], [])
        assert "shadow_copy2" in samba_lab.net("showshare", "pv73").stdout
        helper.unexport(share, path)
        assert "pv73" not in samba_lab.net("listshares").stdout.split()

        # Someone else's share of that name: refused, untouched.
        samba_lab.net("addshare", "pv73", path, "writeable=n", "guest_ok=n")
        before = samba_lab.net("showshare", "pv73").stdout
        with pytest.raises(errors.AlreadyExists):
            helper.show_snapshots(share, path, {"@GMT-2026.01.03-00.00.00": view}, [], rules)
        helper.unexport(share, path)
        assert samba_lab.net("showshare", "pv73").stdout == before
    finally:
        helper._run = real_run
        helper.snapshot_dir_of = None
        samba_lab.net("delshare", "pv73", check=False)


def test_a_rule_change_is_one_registry_transaction_that_keeps_foreign_parameters(samba_lab, helper):
    """A sync reads the share once and writes it with one `net conf import`:
    parameters an administrator added to the share stay, a share an older
    sharedd left closed (`available = no`) is opened, and a value that
    would span lines is refused with the registry unchanged."""
    share = make_share("tx73")
    path = share_dir(samba_lab, "tx73")
    rules = [rule(share, "ip", "10.73.0.11")]
    runs = []
    real_run = helper._run
    helper._run = lambda argv, **kw: runs.append(list(argv)) or real_run(argv, **kw)
    try:
        helper.export(share, path, rules)
        nets = [a[a.index("conf") + 1] for a in runs if "conf" in a]
        assert nets == ["showshare", "import"], nets
        samba_lab.net("setparm", "tx73", "max connections", "7")
        samba_lab.net("setparm", "tx73", "available", "no")
        runs.clear()
        extra = rule(share, "user", "smbro73", "ro")
        helper.update_access(share, path, rules + [extra], [extra], [])
        nets = [a[a.index("conf") + 1] for a in runs if "conf" in a]
        assert nets == ["showshare", "import"], nets
        params = samba_lab.net("showshare", "tx73").stdout
        assert "max connections = 7" in params and "available" not in params
        assert "valid users = smbro73" in params and "read list = smbro73" in params

        before = samba_lab.net("showshare", "tx73").stdout
        with pytest.raises(errors.BackendFailure, match="one smb.conf line"):
            helper._put("tx73", {"comment": "sharedd " + share.id}, {"path": path + "\n\tguest ok = yes"}, [])
        with pytest.raises(errors.BackendFailure, match="one smb.conf line"):
            helper._put("tx73", {"comment": "sharedd " + share.id, "path": path},
                        {"hosts allow": "10.73.0.11 \\"}, [])
        assert samba_lab.net("showshare", "tx73").stdout == before
        # A foreign parameter that cannot be carried over is dropped, not a failure.
        current = helper._current(share)
        helper._put("tx73", dict(current, **{"max connections": "8 \\"}),
                    {"hosts allow": "10.73.0.12"}, [])
        params = samba_lab.net("showshare", "tx73").stdout
        assert "hosts allow = 10.73.0.12" in params and "max connections" not in params
    finally:
        helper._run = real_run
        helper.unexport(share, path)
    assert "tx73" not in samba_lab.net("listshares").stdout.split()


def test_a_new_read_only_user_keeps_open_sessions_and_a_demoted_one_cuts_them(samba_lab, helper):
    """Granting a user who had no access (ro) takes nothing from anyone, so
    open sessions stay; making an admitted user read-only cuts them (Samba
    applies the read list to new connections only)."""
    share = make_share("dem73")
    path = share_dir(samba_lab, "dem73")
    rw = rule(share, "user", "smbrw73")
    helper.export(share, path, [rw])
    session = samba_lab.open_session("a", "dem73", "smbrw73")
    try:
        session.stdin.write("ls\n")
        session.stdin.flush()
        assert wait_for(lambda: "dem73" in samba_lab.connected_shares()), "session never opened"
        ro = rule(share, "user", "smbro73", "ro")
        helper.update_access(share, path, [rw, ro], [ro], [])
        time.sleep(1)
        assert "dem73" in samba_lab.connected_shares(), "a grant cut the open session"
        demoted = rule(share, "user", "smbrw73", "ro")
        helper.update_access(share, path, [ro, demoted], [demoted], [rw])
        assert wait_for(lambda: "dem73" not in samba_lab.connected_shares()), \
            "the demoted user's session is still open"
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        helper.unexport(share, path)


def test_the_first_grant_of_a_closed_share_cuts_no_sessions(samba_lab, helper):
    """A share that admits no host has no session to cut: its first grant
    runs no smbcontrol (nor smbstatus); a deny then does."""
    share = make_share("first73")
    path = share_dir(samba_lab, "first73")
    helper.export(share, path, [])
    runs = []
    real_run = helper._run
    helper._run = lambda argv, **kw: runs.append(list(argv)) or real_run(argv, **kw)
    try:
        rw = rule(share, "user", "smbrw73")
        helper.update_access(share, path, [rw], [rw], [])
        assert not [a for a in runs if "smbcontrol" in a or "smbstatus" in a], runs
        assert ok(samba_lab.smbclient("a", "first73", "smbrw73", "ls"))
        helper.update_access(share, path, [], [], [rw])
        assert [a for a in runs if "smbstatus" in a], "a deny looks for sessions to cut"
    finally:
        helper._run = real_run
        helper.unexport(share, path)
