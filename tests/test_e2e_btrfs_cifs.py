"""CIFS shares on btrfs with Previous Versions: the real sharedd (btrfs
backend, Samba helper) and the real smbd of the samba_lab fixture, clients
in network namespaces. A share's snapshots appear to SMB clients as
@GMT- versions (Samba's shadow_copy2 over read-only mounts sharedd keeps in
step with the snapshots), read-only, with the snapshots' times."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import tempfile
import time

from sharedd.mountinfo import read_mountinfo
from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd
from tests.support import components

CONF = """
[DEFAULT]
enabled_share_backends = cifs1
state_path = {work}/state
spool_dir = {work}/spool
host_id = storage1

[cifs1]
share_driver = btrfs
share_export_ip = 10.73.0.1
enabled_share_protocols = CIFS
cifs_helper = samba
btrfs_pool_path = {work}/pool
btrfs_pool_image = {work}/pool.img
btrfs_pool_image_size_gib = 2
btrfs_share_mount_dir = {mounts}
samba_config_file = {smbconf}
samba_command_prefix = {prefix}
hook_drivers = spool
enable_pre_hooks = true
enable_post_hooks = true
"""
SNAP = "org.sharedd.Sharedd1.Snapshot"
GMT = re.compile(r"@GMT-\d{4}\.\d\d\.\d\d-\d\d\.\d\d\.\d\d")


def gmt(created_at_us: int) -> str:
    return time.strftime("@GMT-%Y.%m.%d-%H.%M.%S", time.gmtime(created_at_us / 1e6))


def test_previous_versions_over_smb(system_bus, samba_lab, tmp_path):
    mounts = os.path.join(samba_lab.mounts, "btrfs-pv")
    work = tempfile.mkdtemp(prefix="cifs-", dir=str(tmp_path))
    os.chmod(tmp_path, 0o755)
    os.chmod(work, 0o755)
    conf = os.path.join(work, "sharedd.conf")
    pathlib.Path(conf).write_text(CONF.format(work=work, mounts=mounts, smbconf=samba_lab.conf,
                                              prefix=", ".join(samba_lab.prefix)))
    d = Sharedd(system_bus, work, conf)
    d.start()
    try:
        p = d.create_share("pv", "CIFS", 1)
        components.used("sharedd btrfs backend over Samba (CIFS, Previous Versions)")
        share_id = p.rsplit("/", 1)[1]
        d.share(p, "AllowAccess", "sssa{sv}", "user", "smbrw73", "rw", 0)
        mp = os.path.join(mounts, share_id)
        local = samba_lab.path("client", "pv.txt")
        versions = []
        for text in ("first version\n", "second version\n"):
            with open(local, "w") as f:
                f.write(text)
            out = samba_lab.smbclient("a", "pv", "smbrw73", f"put {local} doc.txt")
            assert out.returncode == 0, out.stdout + out.stderr
            snap = d.share(p, "CreateSnapshot", "sa{sv}", f"v{len(versions) + 1}", 0)
            versions.append((snap, gmt(d.get(snap, SNAP, "CreatedAt"))))
            time.sleep(1.1)                       # one version per second at most
        with open(local, "w") as f:
            f.write("current\n")
        samba_lab.smbclient("a", "pv", "smbrw73", f"put {local} doc.txt")
        # the registry share names the view; the view holds one mount per snapshot
        params = samba_lab.net("showshare", "pv").stdout
        assert "shadow_copy2" in params and f".previous/{share_id}" in params
        view = os.path.join(mounts, ".previous", share_id)
        assert sorted(os.listdir(view)) == sorted(name for _, name in versions)
        for _, name in versions:
            entry = [e for e in read_mountinfo() if e.mount_point == os.path.join(view, name)]
            assert entry and entry[0].read_only, (name, entry)
        # What a Windows client's Previous Versions tab asks: the versions of a file
        out = samba_lab.smbclient("a", "pv", "smbrw73", "allinfo doc.txt")
        assert out.returncode == 0, out.stdout + out.stderr
        listed = set(GMT.findall(out.stdout))
        assert listed == {name for _, name in versions}, out.stdout
        # each version reads as it was, and cannot be written
        for (_, name), text in zip(versions, ("first version\n", "second version\n")):
            got = samba_lab.path("client", f"got-{name}")
            out = samba_lab.smbclient("a", "pv", "smbrw73", f"get {name}\\doc.txt {got}")
            assert out.returncode == 0 and open(got).read() == text, out.stdout + out.stderr
            for target in ("new.txt", "doc.txt"):
                out = samba_lab.smbclient("a", "pv", "smbrw73", f"put {local} {name}\\{target}")
                assert out.returncode != 0 and "NT_STATUS_" in out.stdout, out.stdout
            assert not os.path.exists(os.path.join(view, name, "new.txt"))
            assert open(os.path.join(view, name, "doc.txt")).read() == text
        assert open(os.path.join(mp, "doc.txt")).read() == "current\n"
        # a deleted snapshot leaves the versions; a restart rebuilds the view
        d.call(versions[0][0], SNAP, "Delete", "a{sv}", 0)
        assert os.listdir(view) == [versions[1][1]]
        out = samba_lab.smbclient("a", "pv", "smbrw73", "allinfo doc.txt")
        assert set(GMT.findall(out.stdout)) == {versions[1][1]}
        d.stop()
        for name in os.listdir(view):
            subprocess.run(["umount", os.path.join(view, name)], check=True)
        d.start()
        assert os.listdir(view) == [versions[1][1]]
        d.call(versions[1][0], SNAP, "Delete", "a{sv}", 0)
        assert not os.path.exists(view)
        assert "shadow" not in samba_lab.net("showshare", "pv").stdout, "no versions: no module"
        d.share(p, "Delete", "a{sv}", 0)
    finally:
        try:
            d.stop()
        finally:
            teardown_tree(mounts)
            teardown_tree(work, [os.path.join(work, "pool.img")])
