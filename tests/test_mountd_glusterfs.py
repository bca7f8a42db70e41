"""mountd end to end over a real GlusterFS FUSE mount with TLS certificates:
the real Mounter and Reconciler run in the gluster lab's client namespace
against a volume this test creates (mountd74) on the lab's glusterd."""

import os

import pytest

from mountd.matching import certificate_cn
from mountd.mounter import Mounter
from mountd.reconcile import Identity, Reconciler, desired_mounts
from mountd.state import StateStore, read_mountinfo, top_mounts
from tests.fixtures.gluster import SERVER_IP, call_in_netns
from tests.fixtures.mountd_env import make_share, rule
from tests.support import components

VOL = "mountd74"


@pytest.fixture(scope="module")
def volume(gluster_lab):
    lab = gluster_lab
    brick = lab.p("bricksA", VOL)
    os.makedirs(brick, exist_ok=True)
    srv = lab.cert("server")
    lab.gluster("volume", "create", VOL, f"{SERVER_IP}:{brick}")
    try:
        for key, value in (("client.ssl", "on"), ("server.ssl", "on"),
                           ("ssl.own-cert", srv["cert"]), ("ssl.private-key", srv["key"]),
                           ("ssl.ca-list", srv["ca"]), ("auth.ssl-allow", "alice")):
            lab.gluster("volume", "set", VOL, key, value)
        lab.gluster("volume", "start", VOL)
        yield brick
    finally:
        lab.gluster("volume", "stop", VOL, "force", check=False)
        lab.gluster("volume", "delete", VOL, check=False)


def _reconciler(lab, tmp, cn):
    c = lab.cert(cn)
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs, exist_ok=True)
    mounter = Mounter(timeout=30, glusterfs_cert=c["cert"], glusterfs_key=c["key"],
                      glusterfs_ca=c["ca"], glusterfs_log_dir=logs)
    # pass_wait: each run() here waits for its glusterfs commands (refusals take ~15 s)
    return Reconciler(os.path.join(tmp, "mnt"), mounter, StateStore(os.path.join(tmp, "state")),
                      pass_wait=120)


def _desired(share, cn):
    return desired_mounts({"storage72": {share["id"]: share}}, Identity((), cn),
                          ("GLUSTERFS",), {"GLUSTERFS": []}, True)


def _io(lab, *argv):
    return lab.io(list(argv), timeout=10)


def test_glusterfs_mount_levels_refusal_and_unmount(gluster_lab, volume, mountd_tmp):
    lab = gluster_lab
    alice_cn = certificate_cn(lab.cert("alice")["cert"])
    assert alice_cn == "alice"
    share = make_share(name="gl74", protocol="GLUSTERFS", export=f"{SERVER_IP}:/{VOL}",
                       rules=[rule("alice", "rw", kind="cert"), rule("mallory", "rw", kind="cert")])
    rec = _reconciler(lab, os.path.join(mountd_tmp, "alice"), "alice")
    run = lambda d: call_in_netns(lab.client_ns, rec.run, d)

    out = run(_desired(share, alice_cn))
    components.used("GlusterFS FUSE client (mountd's Mounter)")
    own = rec.mounts[share["id"]]
    assert own.state == "mounted", own.error
    mp = own.mount_point
    e = top_mounts(read_mountinfo())[mp]
    assert e.fstype == "fuse.glusterfs" and not e.read_only
    assert {"nosuid", "nodev"} <= set(e.mount_options)
    assert out.events == [("Mounted", share["id"], mp, "rw")]
    assert _io(lab, "sh", "-c", f"echo hello74 > {mp}/f").returncode == 0
    assert open(os.path.join(volume, "f")).read() == "hello74\n"

    # Idempotent: nothing to do on a second pass.
    assert run(_desired(share, alice_cn)).events == []

    # rw -> ro: glusterfs cannot change in place; mounted again with --read-only.
    ro_share = dict(share, access_rules=[rule("alice", "ro", kind="cert")])
    out = run(_desired(ro_share, alice_cn))
    assert ("Mounted", share["id"], mp, "ro") in out.events
    assert top_mounts(read_mountinfo())[mp].read_only
    assert _io(lab, "cat", f"{mp}/f").stdout == "hello74\n"
    assert _io(lab, "sh", "-c", f"echo no > {mp}/g").returncode != 0
    assert not os.path.exists(os.path.join(volume, "g"))

    # Another host whose CN the server refuses: reported as failed, not mounted.
    rec_m = _reconciler(lab, os.path.join(mountd_tmp, "mallory"), "mallory")
    call_in_netns(lab.client_ns, rec_m.run, _desired(share, "mallory"))
    own_m = rec_m.mounts[share["id"]]
    # Refused: either the client gave up waiting, or it exited at once (timing).
    assert own_m.state == "failed"
    assert "did not come up" in own_m.error or "nothing is mounted" in own_m.error, own_m.error
    assert own_m.mount_point not in top_mounts(read_mountinfo())
    assert top_mounts(read_mountinfo()).get(own_m.mount_point) is None

    # Access withdrawn: unmounted, the glusterfs client gone with it.
    out = run({})
    assert out.events == [("Unmounted", share["id"], mp)]
    assert top_mounts(read_mountinfo()).get(mp) is None
    assert rec.mounts == {}
