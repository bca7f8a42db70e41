"""The seed's generic data path through the real daemon and busctl: the
`volume` driver (a loop-backed ext4 volume per share) served over NFS by
NFS-Ganesha and over CIFS by a real smbd, with every access rule checked by
real clients, and extend/snapshot/revert keeping the data."""

import hashlib
import os
import pathlib
import tempfile

from sharedd.mountinfo import is_mounted
from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd
from tests.fixtures.storage_host import remove_exports
from tests.support import components

SHARE = "org.sharedd.Sharedd1.Share"
ERR = "org.sharedd.Sharedd1.Error."

NFS_CONF = """
[DEFAULT]
enabled_share_backends = vol1
state_path = {work}/state
spool_dir = {work}/spool

[vol1]
share_driver = volume
share_export_ip = {ip}
enabled_share_protocols = NFS
nfs_helper = ganesha
volume_pool_path = {work}/pool
volume_fs_type = ext4
"""

CIFS_CONF = """
[DEFAULT]
enabled_share_backends = vol1
state_path = {work}/state
spool_dir = {work}/spool

[vol1]
share_driver = volume
share_export_ip = 10.73.0.1
enabled_share_protocols = CIFS
cifs_helper = samba
volume_pool_path = {work}/pool
volume_fs_type = ext4
volume_mount_dir = {mounts}
samba_config_file = {smbconf}
samba_command_prefix = {prefix}
"""


def start(bus, text, tmp, **fmt):
    work = tempfile.mkdtemp(prefix="vol-", dir=tmp)
    os.chmod(work, 0o755)
    conf = os.path.join(work, "sharedd.conf")
    pathlib.Path(conf).write_text(text.format(work=work, **fmt))
    d = Sharedd(bus, work, conf)
    d.start()
    return d


def stop(d, images_dir):
    try:
        d.stop()
    finally:
        remove_exports(os.path.join(d.workdir, "state"), "vol1")
        images = [os.path.join(images_dir, n) for n in os.listdir(images_dir)] \
            if os.path.isdir(images_dir) else []
        teardown_tree(d.workdir, images)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def mount_of(d, path, mounts_dir):
    mp = os.path.join(mounts_dir, path.rsplit("/", 1)[1])
    assert is_mounted(mp), f"{mp} is not mounted"
    return mp


def test_volume_share_over_nfs(system_bus, netlab, ganesha, tmp_path):
    d = start(system_bus, NFS_CONF, str(tmp_path), ip=netlab.server_ip4)
    rw = netlab.add_client("vol-rw", ip4="10.71.0.71")
    ro = netlab.add_client("vol-ro", ip4="10.71.0.72")
    try:
        p = d.create_share("volnfs", "NFS", 1)
        components.used("sharedd volume driver (loop-backed ext4) over NFS-Ganesha")
        pseudo = d.share_prop(p, "ExportLocations")[0].split(":", 1)[1]
        mp = mount_of(d, p, os.path.join(d.workdir, "state", "backends", "vol1", "mounts"))
        assert not ganesha.nfs_ls(rw, pseudo).ok
        d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.71.0.71", "rw", 0)
        d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.71.0.72", "ro", 0)
        local = os.path.join(d.workdir, "up.txt")
        open(local, "w").write("over nfs to a volume\n")
        assert ganesha.nfs_cp_to(rw, local, f"{pseudo}/up.txt").ok
        assert open(os.path.join(mp, "up.txt")).read() == "over nfs to a volume\n"
        res = ganesha.nfs_cp_to(ro, local, f"{pseudo}/ro.txt")
        assert not res.ok and res.rofs
        with open(os.path.join(mp, "data.bin"), "wb") as f:
            f.write(os.urandom(8 << 20))
        digest = sha(os.path.join(mp, "data.bin"))
        d.share(p, "Extend", "ta{sv}", 2, 0)
        snap = d.share(p, "CreateSnapshot", "sa{sv}", "s1", 0)
        mp = mount_of(d, p, os.path.join(d.workdir, "state", "backends", "vol1", "mounts"))
        with open(os.path.join(mp, "data.bin"), "wb") as f:
            f.write(b"changed")
        d.share(p, "RevertToSnapshot", "oa{sv}", snap, 0)
        mp = mount_of(d, p, os.path.join(d.workdir, "state", "backends", "vol1", "mounts"))
        assert sha(os.path.join(mp, "data.bin")) == digest
        assert ganesha.nfs_cp_to(rw, local, f"{pseudo}/after-revert.txt").ok, "rules back after revert"
        d.share(p, "Shrink", "ta{sv}", 1, 0)
        assert sha(os.path.join(mount_of(d, p, os.path.dirname(mp)), "data.bin")) == digest
        d.call(snap, "org.sharedd.Sharedd1.Snapshot", "Delete", "a{sv}", 0)
        d.share(p, "Delete", "a{sv}", 0)
        assert not ganesha.nfs_ls(rw, pseudo).ok
        assert os.listdir(os.path.join(d.workdir, "pool")) == []
    finally:
        stop(d, os.path.join(d.workdir, "pool"))


def test_volume_share_over_cifs(system_bus, samba_lab, tmp_path):
    mounts = os.path.join(samba_lab.mounts, "e2e")
    os.makedirs(mounts, exist_ok=True)
    d = start(system_bus, CIFS_CONF, str(tmp_path), mounts=mounts, smbconf=samba_lab.conf,
              prefix=", ".join(samba_lab.prefix))
    try:
        p = d.create_share("volcifs", "CIFS", 1)
        components.used("sharedd volume driver over CIFS (smbd, net conf)")
        assert d.share_prop(p, "ExportLocations") == ["\\\\10.73.0.1\\volcifs"]
        # Samba cannot make one host read-only: refused, nothing changed.
        assert ERR + "NotSupported" in d.error(p, SHARE, "AllowAccess", "sssa{sv}", "ip",
                                               "10.73.0.11", "ro", 0)
        d.share(p, "AllowAccess", "sssa{sv}", "user", "smbrw73", "rw", 0)
        d.share(p, "AllowAccess", "sssa{sv}", "user", "smbro73", "ro", 0)
        local = samba_lab.path("client", "e2e.txt")
        open(local, "w").write("over cifs to a volume\n")
        out = samba_lab.smbclient("a", "volcifs", "smbrw73", f"put {local} e2e.txt")
        assert out.returncode == 0, out.stdout + out.stderr
        mp = mount_of(d, p, mounts)
        assert open(os.path.join(mp, "e2e.txt")).read() == "over cifs to a volume\n"
        out = samba_lab.smbclient("b", "volcifs", "smbro73", f"put {local} ro.txt")
        assert out.returncode != 0 and "ACCESS_DENIED" in out.stdout + out.stderr
        out = samba_lab.smbclient("a", "volcifs", "smbno73", "ls")
        assert out.returncode != 0
        rules = d.share_prop(p, "AccessRules")
        rw_id = [r[0] for r in rules if r[2] == "smbrw73"][0]
        d.share(p, "DenyAccess", "sa{sv}", rw_id, 0)
        out = samba_lab.smbclient("a", "volcifs", "smbrw73", "ls")
        assert out.returncode != 0
        d.share(p, "Delete", "a{sv}", 0)
        assert "volcifs" not in samba_lab.net("listshares").stdout.split()
    finally:
        stop(d, os.path.join(d.workdir, "pool"))
