"""glusterfs_native driver: unit checks, then a real glusterd with TLS
(tests/fixtures/gluster.py), real FUSE mounts from a client namespace, and a
remote target driven through a real sshd."""

import os
import tempfile
import time
import uuid

import pytest

from sharedd.config import BACKEND_OPTIONS, BackendConfig
from sharedd.drivers import driver_class
from sharedd.drivers.glusterfs_native import (MARKER, NOBODY, GlusterCLI, GlusterfsNativeDriver,
                                              Target, parse_target)
from sharedd.errors import (BackendFailure, CapacityExceeded, ConfigError, InvalidArgument,
                            InvalidState, NotSupported)
from sharedd.models import AccessRule, Share
from sharedd.options import parse_value
from tests.fixtures.gluster import SERVER_IP, SSH_PORT, InNetns

GIB = 1024 ** 3


def make_config(name="gl", **over) -> BackendConfig:
    values = {o.name: o.default for o in BACKEND_OPTIONS + GlusterfsNativeDriver.OPTIONS}
    values.update(share_driver="glusterfs_native", share_backend_name=name,
                  enabled_share_protocols=["GLUSTERFS"])
    values.update(over)
    return BackendConfig(name, values)


def make_share(size=1, protocol="GLUSTERFS") -> Share:
    sid = uuid.uuid4().hex
    return Share(id=sid, name=f"s-{sid[:6]}", backend="gl", protocol=protocol,
                 size_gib=size, status="creating")


def rule(share, cn, level="rw", type_="cert") -> AccessRule:
    return AccessRule(id=uuid.uuid4().hex, share_id=share.id, access_type=type_,
                      access_to=cn, access_level=level, state="applying")


def applied(share, update):
    share.export_locations = update.export_locations
    share.provider_location = update.provider_location
    if update.size_gib:
        share.size_gib = update.size_gib
    return share


# --- unit checks (no server) ------------------------------------------------------

def test_registered_and_capabilities():
    cls = driver_class("glusterfs_native")
    assert cls is GlusterfsNativeDriver
    assert cls.supported_protocols == ("GLUSTERFS",)
    assert cls.access_types == {"GLUSTERFS": ("cert",)}
    assert cls.uses_export_helpers is False
    drv = cls("gl", make_config(glusterfs_targets=["h:/v"]), state_dir="/nonexistent")
    caps = drv.capabilities()
    assert caps["snapshot_support"] is False
    assert caps["extend_support"] is False and caps["shrink_support"] is False
    assert caps["manage_support"] is True
    secret = [o for o in cls.OPTIONS if o.name == "glusterfs_server_password"]
    assert secret and secret[0].secret


def test_target_syntax():
    assert parse_target("srv.example:/vol_1") == Target(None, "srv.example", "vol_1")
    assert parse_target("admin@10.0.0.1:/v-2") == Target("admin", "10.0.0.1", "v-2")
    for bad in ("srv:vol", "srv:/-v", "a b@srv:/v", "srv:/v;rm", "srv:/", "@srv:/v", ":/v",
                "srv:/v/x", "user@srv:/$(id)"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_check_config_names_file_section_option():
    src = lambda key: "/etc/sharedd/sharedd.conf"
    sec_of = lambda key: "gl"
    opt = [o for o in GlusterfsNativeDriver.OPTIONS if o.name == "glusterfs_targets"][0]
    good = make_config(glusterfs_targets=parse_value(opt, "root@a:/v1, b:/v2"))
    GlusterfsNativeDriver.check_config(good, src, sec_of)
    for targets, words in ((["a:/v1", "bad target"], "not [remoteuser@]server:/volume"),
                           (["a:/v1", "x@a:/v1"], "listed twice"),
                           ([], "names no volume")):
        with pytest.raises(ConfigError) as exc:
            GlusterfsNativeDriver.check_config(make_config(glusterfs_targets=targets), src, sec_of)
        msg = str(exc.value)
        assert msg.startswith("/etc/sharedd/sharedd.conf: [gl] glusterfs_targets:"), msg
        assert words in msg
    with pytest.raises(ConfigError, match=r"\[gl\] glusterfs_ssl_own_cert: set glusterfs_ssl_private_key"):
        GlusterfsNativeDriver.check_config(
            make_config(glusterfs_targets=["a:/v"], glusterfs_ssl_own_cert="/x.pem"), src, sec_of)


def test_validate_access_rules():
    drv = GlusterfsNativeDriver("gl", make_config(glusterfs_targets=["h:/v"]), state_dir="/x")
    sh = make_share()
    drv.validate_access(sh, "cert", "rw", "alice")
    with pytest.raises(NotSupported, match="per certificate CN"):
        drv.validate_access(sh, "ip", "rw")
    with pytest.raises(NotSupported, match="rw only"):
        drv.validate_access(sh, "cert", "ro")
    for cn in ("a,b", "*", "al?ce", "", "a b", "-x", "x" * 65):
        with pytest.raises(InvalidArgument):
            drv.validate_access(sh, "cert", "rw", cn)
    with pytest.raises(NotSupported):
        drv.validate_access(make_share(protocol="NFS"), "cert", "rw")


def test_remote_cli_argv_quotes_every_word():
    cli = GlusterCLI(Target("admin", "srv", "v"), timeout=5, ssh_key="/k", ssh_port=2200,
                     known_hosts="/kh", glusterd_socket="/ignored-remotely")
    argv, env = cli.argv(["volume", "set", "v", "auth.ssl-allow", "a b;touch /x"])
    assert argv[0] == "ssh" and env is None
    joined = " ".join(argv)
    for want in ("BatchMode=yes", "StrictHostKeyChecking=yes", "-i /k", "-p 2200",
                 "UserKnownHostsFile=/kh", "-l admin"):
        assert want in joined
    i = argv.index("--")
    assert argv[i + 1] == "srv"
    remote = argv[i + 2:]
    assert remote[:3] == ["gluster", "--mode=script", "--xml"]     # no local socket remotely
    assert remote[-1] == "'a b;touch /x'"
    # password: no BatchMode (it forbids prompts); the secret only in the child's env
    cli = GlusterCLI(Target("admin", "srv", "v"), timeout=5, password="s3cret", askpass="/ap")
    argv, env = cli.argv(["volume", "info", "v"])
    assert "s3cret" not in " ".join(argv)
    assert env["SHAREDD_GLUSTERFS_PASSWORD"] == "s3cret" and env["SSH_ASKPASS"] == "/ap"
    local = GlusterCLI(Target(None, "srv", "v"), timeout=5, glusterd_socket="/s")
    assert local.argv(["volume", "info", "v"])[0] == [
        "gluster", "--mode=script", "--glusterd-sock=/s", "--xml", "volume", "info", "v"]


# --- a real glusterd ------------------------------------------------------------

@pytest.fixture(scope="module")
def gl(gluster_lab):
    """The driver on local targets gv1, gv2 (2 GiB image), in the server netns."""
    state = tempfile.mkdtemp(prefix="sharedd-gl-state-", dir=gluster_lab.tmp)
    srv = gluster_lab.cert("server")
    cfg = make_config(glusterfs_targets=[f"{SERVER_IP}:/gv1", f"{SERVER_IP}:/gv2"],
                      glusterfs_glusterd_socket=gluster_lab.socket,
                      glusterfs_ssl_own_cert=srv["cert"], glusterfs_ssl_private_key=srv["key"],
                      glusterfs_ssl_ca_list=srv["ca"])
    drv = InNetns(GlusterfsNativeDriver("gl", cfg, state_dir=state, command_timeout=60),
                  gluster_lab.lab.server_ns)
    drv.do_setup()
    drv.check_for_setup_error()
    return drv


def _wait(pred, timeout=15.0, step=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def test_share_lifecycle_with_tls(gl, gluster_lab):
    lab = gluster_lab
    sh = make_share(1)
    upd = gl.create_share(sh)
    assert upd.export_locations in ([f"{SERVER_IP}:/gv1"], [f"{SERVER_IP}:/gv2"])
    assert upd.provider_location == upd.export_locations[0]
    applied(sh, upd)
    vol = upd.provider_location.rsplit("/", 1)[1]
    info = lab.volume_info(vol)
    assert info["status"] == "Started"
    opts = info["options"]
    assert opts["client.ssl"] == "on" and opts["server.ssl"] == "on"
    assert opts["auth.ssl-allow"] == NOBODY
    assert opts[MARKER] == sh.id
    assert gl.get_mount_hints(sh) == {"fstype": "glusterfs", "export": upd.export_locations[0],
                                      "client_certificate_required": True}

    # Nobody is admitted before a rule exists.
    mp = lab.client_mount(vol, "alice")
    assert not lab.is_mounted(mp) or lab.io(["stat", mp]).returncode != 0
    lab.client_umount(mp)

    alice = rule(sh, "alice")
    assert gl.update_access(sh, [alice], [alice], []) is None
    assert lab.volume_info(vol)["options"]["auth.ssl-allow"] == "alice"

    mp_a = lab.client_mount(vol, "alice")
    assert lab.is_mounted(mp_a), open(mp_a + ".log").read()[-2000:]
    with open(os.path.join(lab.tmp, "payload"), "w") as f:
        f.write("hello gluster\n")
    assert lab.io(["cp", os.path.join(lab.tmp, "payload"), f"{mp_a}/f"]).returncode == 0
    assert lab.io(["cat", f"{mp_a}/f"]).stdout == "hello gluster\n"
    # the data really is on the brick
    assert open(os.path.join(lab.brick_dir(vol), "f")).read() == "hello gluster\n"

    mp_m = lab.client_mount(vol, "mallory")
    assert not lab.is_mounted(mp_m)
    assert "Authentication failed" in open(mp_m + ".log").read() or \
        "auth" in open(mp_m + ".log").read().lower()
    lab.client_umount(mp_m)

    # Re-adding an existing rule is not an error; bad input changes nothing.
    gl.update_access(sh, [alice], [alice], [])
    bad = rule(sh, "eve,alice")
    with pytest.raises(InvalidArgument):
        gl.update_access(sh, [alice, bad], [bad], [])
    with pytest.raises(NotSupported):
        gl.update_access(sh, [alice, rule(sh, "bob", level="ro")],
                         [rule(sh, "bob", level="ro")], [])
    with pytest.raises(NotSupported):
        gl.update_access(sh, [alice, rule(sh, "10.72.0.11", type_="ip")],
                         [rule(sh, "10.72.0.11", type_="ip")], [])
    assert lab.volume_info(vol)["options"]["auth.ssl-allow"] == "alice"

    # Deny: alice's open mount is cut within seconds (dynamic auth).
    t0 = time.monotonic()
    gl.update_access(sh, [alice], [], [alice])
    assert lab.volume_info(vol)["options"]["auth.ssl-allow"] == NOBODY
    assert _wait(lambda: lab.io(["cat", f"{mp_a}/f"], timeout=5).returncode != 0, timeout=15)
    assert time.monotonic() - t0 < 15
    lab.client_umount(mp_a)

    # Recovery mode: the full rule set, no deltas.
    gl.update_access(sh, [alice, rule(sh, "carol")], [], [])
    assert lab.volume_info(vol)["options"]["auth.ssl-allow"] == "alice,carol"

    # Delete: wiped, stopped, reset; idempotent.
    gl.delete_share(sh)
    info = lab.volume_info(vol)
    assert info["status"] == "Stopped"
    assert MARKER not in info["options"] and "server.ssl" not in info["options"]
    assert [n for n in os.listdir(lab.brick_dir(vol)) if not n.startswith(".")] == []
    gl.delete_share(sh)
    assert gl.get_share_stats()["free_volumes"] == 2

    # The volume is back in the pool: the next share (same best fit) takes it.
    sh2 = make_share(1)
    upd2 = gl.create_share(sh2)
    assert upd2.provider_location == upd.provider_location
    applied(sh2, upd2)
    assert lab.volume_info(vol)["options"]["auth.ssl-allow"] == NOBODY
    # a retried create of the same share finds its volume again
    assert gl.create_share(sh2).provider_location == upd2.provider_location
    gl.delete_share(sh2)
    assert lab.volume_info(vol)["status"] == "Stopped"


def test_capacity_and_stats(gl, gluster_lab):
    stats = gl.get_share_stats()
    assert isinstance(stats["total_capacity_gb"], float)
    # two free volumes, each on a 2 GiB xfs image (less its metadata)
    assert 3.0 < stats["total_capacity_gb"] <= 4.0
    assert 0 < stats["free_capacity_gb"] <= stats["total_capacity_gb"]
    assert stats["free_volumes"] == 2 and stats["snapshot_support"] is False
    with pytest.raises(CapacityExceeded):
        gl.create_share(make_share(2))
    for vol in ("gv1", "gv2"):           # the failed create took nothing
        assert MARKER not in gluster_lab.volume_info(vol)["options"]
    sh = make_share(1)
    applied(sh, gl.create_share(sh))
    try:
        stats2 = gl.get_share_stats()
        assert stats2["free_volumes"] == 1 and stats2["used_volumes"] == 1
        assert stats2["total_capacity_gb"] < stats["total_capacity_gb"]
        assert 0 <= gl.get_share_usage_gib(sh) < 1
        with pytest.raises(NotSupported):
            gl.extend_share(sh, 2)
        with pytest.raises(NotSupported):
            gl.create_snapshot(None, sh)
    finally:
        gl.delete_share(sh)


def test_ensure_share_restores_tls_and_rules(gl, gluster_lab):
    lab = gluster_lab
    sh = make_share(1)
    applied(sh, gl.create_share(sh))
    vol = sh.provider_location.rsplit("/", 1)[1]
    try:
        # Someone stopped the volume and turned TLS off.
        lab.gluster("volume", "stop", vol)
        lab.gluster("volume", "set", vol, "server.ssl", "off")
        lab.gluster("volume", "set", vol, "auth.ssl-allow", "*")
        upd = gl.ensure_share(sh, [rule(sh, "alice")])
        assert upd.export_locations == [sh.provider_location]
        info = lab.volume_info(vol)
        assert info["status"] == "Started"
        assert info["options"]["server.ssl"] == "on"
        assert info["options"]["auth.ssl-allow"] == "alice"
        mp = lab.client_mount(vol, "mallory")
        assert not lab.is_mounted(mp)
        lab.client_umount(mp)
    finally:
        gl.delete_share(sh)


def test_manage_and_unmanage(gl, gluster_lab):
    lab = gluster_lab
    with pytest.raises(InvalidArgument):
        gl.manage_existing(make_share(), f"{SERVER_IP}:/gv3", {})     # not a target here
    with pytest.raises(InvalidArgument):
        gl.manage_existing(make_share(), "no-volume-here", {})
    sh = make_share()
    upd = gl.manage_existing(sh, f"{SERVER_IP}:/gv2", {})
    applied(sh, upd)
    assert upd.size_gib == 2 and upd.export_locations == [f"{SERVER_IP}:/gv2"]
    assert lab.volume_info("gv2")["options"][MARKER] == sh.id
    with pytest.raises(InvalidState):
        gl.manage_existing(make_share(), f"{SERVER_IP}:/gv2", {})
    alice = rule(sh, "alice")
    gl.update_access(sh, [alice], [alice], [])
    mp = lab.client_mount("gv2", "alice")
    assert lab.is_mounted(mp)
    assert lab.io(["cp", "/etc/hostname", f"{mp}/kept"]).returncode == 0
    lab.client_umount(mp)
    # unmanage keeps data and keeps the volume out of the pool
    gl.unmanage(sh)
    assert os.path.exists(os.path.join(lab.brick_dir("gv2"), "kept"))
    assert gl.get_share_stats()["free_volumes"] == 1
    big = make_share(1)
    applied(big, gl.create_share(big))
    assert big.provider_location == f"{SERVER_IP}:/gv1"
    gl.delete_share(big)
    # manage it again, then delete: wiped and back in the pool
    sh2 = make_share()
    applied(sh2, gl.manage_existing(sh2, f"{SERVER_IP}:/gv2", {}))
    gl.delete_share(sh2)
    assert not os.path.exists(os.path.join(lab.brick_dir("gv2"), "kept"))
    assert gl.get_share_stats()["free_volumes"] == 2


def test_remote_target_over_ssh(gluster_lab):
    """A remote target (root@server:/gv3, 4 GiB): every gluster call goes through a real sshd."""
    lab = gluster_lab
    state = tempfile.mkdtemp(prefix="sharedd-glr-state-", dir=lab.tmp)
    srv = lab.cert("server")
    cfg = make_config("glr", glusterfs_targets=[f"root@{SERVER_IP}:/gv3"],
                      glusterfs_path_to_private_key=lab.ssh_files["key"],
                      glusterfs_ssh_known_hosts_file=lab.ssh_files["known_hosts"],
                      glusterfs_ssh_port=SSH_PORT,
                      glusterfs_ssl_own_cert=srv["cert"], glusterfs_ssl_private_key=srv["key"],
                      glusterfs_ssl_ca_list=srv["ca"])
    drv = InNetns(GlusterfsNativeDriver("glr", cfg, state_dir=state, command_timeout=60),
                  lab.lab.server_ns)
    drv.do_setup()
    drv.check_for_setup_error()
    assert 3.0 < drv.get_share_stats()["total_capacity_gb"] <= 4.0
    sh = make_share(3)
    applied(sh, drv.create_share(sh))
    assert sh.export_locations == [f"{SERVER_IP}:/gv3"]
    assert lab.volume_info("gv3")["status"] == "Started"
    alice = rule(sh, "alice")
    drv.update_access(sh, [alice], [alice], [])
    mp = lab.client_mount("gv3", "alice")
    assert lab.is_mounted(mp)
    assert lab.io(["cp", "/etc/hostname", f"{mp}/r"]).returncode == 0
    lab.client_umount(mp)
    drv.delete_share(sh)
    info = lab.volume_info("gv3")
    assert info["status"] == "Stopped" and MARKER not in info["options"]
    assert not os.path.exists(os.path.join(lab.brick_dir("gv3"), "r"))

    # A wrong host key is refused: host keys are checked.
    bad_kh = os.path.join(state, "bad_known_hosts")
    with open(lab.ssh_files["known_hosts"]) as f:
        entry = f.read().split()
    with open(os.path.join(lab.tmp, "ssh", "id_ed25519.pub")) as f:
        other_key = f.read().split()[:2]
    with open(bad_kh, "w") as f:
        f.write(f"{entry[0]} {' '.join(other_key)}\n")
    cfg.values["glusterfs_ssh_known_hosts_file"] = bad_kh
    bad = InNetns(GlusterfsNativeDriver("glr", cfg, state_dir=state, command_timeout=30),
                  lab.lab.server_ns)
    with pytest.raises(BackendFailure, match="ssh to root@"):
        bad.check_for_setup_error()


def test_remote_target_with_password(gluster_lab, caplog):
    """An SSH password (no key), from glusterfs_server_password_file or the
    deprecated glusterfs_server_password: ssh gets it through SSH_ASKPASS;
    never logged, never on disk but in its own root-only file."""
    import logging
    from tests.fixtures.gluster import ROOT_PASSWORD
    lab = gluster_lab
    state = tempfile.mkdtemp(prefix="sharedd-glp-state-", dir=lab.tmp)
    srv = lab.cert("server")
    cfg = make_config("glp", glusterfs_targets=[f"root@{SERVER_IP}:/gv3"],
                      glusterfs_server_password=ROOT_PASSWORD,
                      glusterfs_ssh_known_hosts_file=lab.ssh_files["known_hosts"],
                      glusterfs_ssh_port=SSH_PORT,
                      glusterfs_ssl_own_cert=srv["cert"], glusterfs_ssl_private_key=srv["key"],
                      glusterfs_ssl_ca_list=srv["ca"])
    drv = InNetns(GlusterfsNativeDriver("glp", cfg, state_dir=state, command_timeout=60),
                  lab.lab.server_ns)
    caplog.set_level(logging.DEBUG)
    drv.do_setup()
    assert ROOT_PASSWORD not in open(os.path.join(state, "ssh-askpass")).read()
    drv.check_for_setup_error()
    stats = drv.get_share_stats()
    assert stats["free_volumes"] == 1 and 3.0 < stats["total_capacity_gb"] <= 4.0
    assert "glusterfs_server_password_file" in caplog.text     # the deprecation warning
    # a wrong password is refused
    cfg.values["glusterfs_server_password"] = "wrong-" + ROOT_PASSWORD
    bad = InNetns(GlusterfsNativeDriver("glp", cfg, state_dir=state, command_timeout=60),
                  lab.lab.server_ns)
    with pytest.raises(BackendFailure, match="ssh to root@"):
        bad.check_for_setup_error()
    # The password file: root's, 0600, one line; anything else is refused
    # before ssh is ever run.
    pw = os.path.join(state, "gluster.password")
    with open(pw, "w") as f:
        f.write(ROOT_PASSWORD + "\n")
    os.chmod(pw, 0o600)
    cfg.values.update(glusterfs_server_password="", glusterfs_server_password_file=pw)
    good = InNetns(GlusterfsNativeDriver("glp", cfg, state_dir=state, command_timeout=60),
                   lab.lab.server_ns)
    good.do_setup()
    good.check_for_setup_error()
    os.chmod(pw, 0o640)
    loose = GlusterfsNativeDriver("glp", cfg, state_dir=state, command_timeout=60)
    with pytest.raises(BackendFailure, match="mode 0600"):
        loose.do_setup()
    os.chmod(pw, 0o600)
    with open(pw, "w") as f:
        f.write("two\nlines\n")
    with pytest.raises(BackendFailure, match="one line"):
        GlusterfsNativeDriver("glp", cfg, state_dir=state, command_timeout=60).do_setup()
    assert ROOT_PASSWORD not in caplog.text


def test_crash_recovery_from_the_volume_marker(gl, gluster_lab):
    """The volume itself records its share: a create interrupted after the
    claim is found again by a retried create, or cleaned by delete."""
    lab = gluster_lab
    sh = make_share(1)
    lab.gluster("volume", "set", "gv2", MARKER, sh.id)      # crashed right after the claim
    assert gl.get_share_stats()["used_volumes"] == 1
    upd = gl.create_share(sh)                               # the retry
    assert upd.provider_location == f"{SERVER_IP}:/gv2"
    info = lab.volume_info("gv2")
    assert info["status"] == "Started" and info["options"]["server.ssl"] == "on"
    lab.gluster("volume", "stop", "gv2")                    # crash in the middle of a delete
    gl.delete_share(make_share())                           # unknown share: nothing happens
    assert lab.volume_info("gv2")["options"][MARKER] == sh.id
    gl.delete_share(sh)                                     # no provider_location: found by marker
    info = lab.volume_info("gv2")
    assert info["status"] == "Stopped" and MARKER not in info["options"]
    assert gl.get_share_stats()["free_volumes"] == 2


def test_gluster_failure_reported_with_reason(gluster_lab):
    """`gluster --xml` may exit 0 with opRet -1: both are checked."""
    cli = GlusterCLI(Target(None, SERVER_IP, "gv1"), timeout=30,
                     glusterd_socket=gluster_lab.socket)
    proc = gluster_lab.gluster("--xml", "volume", "set", "no-such-vol", "auth.ssl-allow", "x",
                               check=False)
    assert proc.returncode == 0 and "<opRet>-1</opRet>" in proc.stdout   # the trap itself
    with pytest.raises(BackendFailure, match="does not exist"):
        cli("volume", "set", "no-such-vol", "auth.ssl-allow", "x")
    with pytest.raises(BackendFailure, match="no.such.option|option"):
        cli("volume", "set", "gv1", "no.such.option", "x")
    assert cli("volume", "info", "gv1").find("./volInfo/volumes/volume/name").text == "gv1"
