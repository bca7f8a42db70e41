"""A backend whose export service starts late comes back by itself: sharedd
starts while NFS-Ganesha is down (the backend is not usable, and says so in
Stats), and once ganesha owns its bus name the backend is set up, its shares
recovered and exported again, with their rules - no restart of sharedd."""

import os
import shutil
import tempfile
import time

import pytest

from tests.fixtures.storage_host import destroy_storage_host, make_storage_host
from tests.support import components

BACKEND = "/org/sharedd/Sharedd1/backend/btrfs1"
ERR = "org.sharedd.Sharedd1.Error."


@pytest.fixture
def host(system_bus, netlab, ganesha):
    tmp_root = tempfile.mkdtemp(prefix=f"sharedd-late-{os.getpid()}-")
    os.chmod(tmp_root, 0o755)
    h = make_storage_host(system_bus, netlab, ganesha, tmp_root)
    h.client = netlab.add_client("late", ip4="10.71.0.71")
    try:
        yield h
    finally:
        if h.ganesha.proc is None:
            h.ganesha.start()
        destroy_storage_host(h)
        shutil.rmtree(tmp_root, ignore_errors=True)


def stats(h):
    return {k: v["data"] for k, v in h.get(BACKEND, "org.sharedd.Sharedd1.Backend", "Stats").items()}


def test_ganesha_started_after_sharedd(host):
    h = host
    h.start()
    path = h.create_share("late", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.71", "rw", 0)
    assert h.ganesha.nfs_ls(h.client, f"/shares/{sid}").ok
    h.stop()
    h.ganesha.kill()                       # its runtime exports go with it
    try:
        h.start()                          # READY although the backend cannot serve
        s = stats(h)
        assert s["available"] is False and "NFS-Ganesha" in s["error"], s
        text = h.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
                       "ssta{sv}", "meanwhile", "NFS", 1, 0)
        assert ERR + "BackendFailure" in text and "not usable" in text
    finally:
        h.ganesha.start()
    components.used("NFS-Ganesha started after sharedd")
    deadline = time.monotonic() + 60
    while not h.ganesha.nfs_ls(h.client, f"/shares/{sid}").ok:
        assert time.monotonic() < deadline, "the late backend never came back\n" + h.log_tail()
        time.sleep(0.5)
    s = stats(h)
    assert s["available"] is True and "error" not in s, s
    assert h.share_prop(path, "Status") == "available"
    assert [(r[2], r[4]) for r in h.share_prop(path, "AccessRules")] == [("10.71.0.71", "active")]
    h.create_share("afterwards", "NFS", 1)
