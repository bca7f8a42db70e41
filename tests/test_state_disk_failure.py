"""The disk under the state database fails: sharedd exits non-zero for
systemd to restart it, instead of running on and refusing every change; once
the disk is back, start-up goes on from what reached it.

The disk really fails: the state directory is an ext4 file system (no
journal) on a loop device whose capacity is cut under it (losetup -c after
truncating its image), so the kernel answers the WAL's fdatasync with EIO.
The image is saved first (frozen), as the disk held it, and put back for the
restart.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid

from tests.fixtures.bus import private_bus
from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd
from tests.support import components, configs

SHARE = "org.sharedd.Sharedd1.Share"


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def state_disk():
    """(root, image, mount point, device): a 32 MiB ext4 on a loop device."""
    root = tempfile.mkdtemp(prefix=f"sharedd-statedisk-{os.getpid()}-{uuid.uuid4().hex[:8]}-")
    image, mnt = os.path.join(root, "state.img"), os.path.join(root, "state")
    try:
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        sh("mkfs.ext4", "-q", "-O", "^has_journal", image)
        device = sh("losetup", "-f", "--show", image).strip()
        os.mkdir(mnt)
        sh("mount", device, mnt)
        components.used("ext4 on a loop device (a state disk that fails)")
        yield root, image, mnt, device
    finally:
        subprocess.run(["fsfreeze", "-u", mnt], capture_output=True, timeout=60)   # (if frozen)
        teardown_tree(root, [image])


def test_a_failed_fsync_of_the_state_makes_sharedd_exit_for_a_restart(tmp_path):
    work = str(tmp_path)
    os.chmod(work, 0o755)
    with private_bus() as bus, state_disk() as (root, image, mnt, device):
        conf = os.path.join(work, "sharedd.conf")
        with open(conf, "w") as f:
            f.write(configs.MEMORY.replace("@WORK@/state", os.path.join(mnt, "db"))
                    .replace("@WORK@", work))
        d = Sharedd(bus, work, conf)
        saved = image + ".saved"
        try:
            d.start()
            path = d.create_share("kept")
            # What the disk holds now, copied while nothing writes to it.
            sh("fsfreeze", "-f", mnt)
            try:
                shutil.copyfile(image, saved)
            finally:
                sh("fsfreeze", "-u", mnt)
            # The disk fails: every block past the first 64 KiB is gone.
            os.truncate(image, 64 << 10)
            sh("losetup", "-c", device)
            proc = d.call(path, SHARE, "Extend", "ta{sv}", 2, 0, check=False)
            assert proc is not None and proc.returncode != 0, "Extend succeeded"
            assert "writing the state database to disk failed" in proc.stderr, proc.stderr
            rc = d.proc.wait(timeout=60)
            log = d.log_tail(200)
            assert rc == 1 and "Traceback" not in log, log
            assert "exiting so systemd restarts us" in log, log
        finally:
            d.stop()
        # The disk comes back as it was before it failed: the share created
        # before (its commit fsynced) is there, and changes work again.
        sh("umount", mnt)
        sh("losetup", "-d", device)
        os.replace(saved, image)
        fsck = subprocess.run(["e2fsck", "-fy", image], capture_output=True, text=True,
                              timeout=120)
        assert fsck.returncode < 4, fsck.stdout + fsck.stderr
        device = sh("losetup", "-f", "--show", image).strip()
        sh("mount", device, mnt)
        try:
            d.start()
            assert d.share_prop(path, "Name") == "kept"
            d.share(path, "Extend", "ta{sv}", 2, 0)
            assert d.share_prop(path, "SizeGiB") == 2
        finally:
            d.stop()
