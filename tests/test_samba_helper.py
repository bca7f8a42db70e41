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
