"""sharedd publishes its spool read-only over its own NFS-Ganesha
(spool_export_clients): the listed client reads signed records over NFS
(libnfs, from its own network namespace) and cannot write; another client
is refused; the export's location is the Manager's SpoolExport property;
clearing the option withdraws the export at the next start."""

import json
import os
import shutil
import tempfile
import time

import pytest

from sharedd import record as recordlib
from sharedd import signing
from sharedd.spool_export import spool_share_id
from tests.fixtures.storage_host import destroy_storage_host, make_storage_host
from tests.support import components

MANAGER = ("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager")
READER, OTHER = "10.71.0.41", "10.71.0.42"


@pytest.fixture(scope="module")
def spool_host(system_bus, netlab, ganesha):
    tmp_root = tempfile.mkdtemp(prefix=f"sharedd-spoolexp-{os.getpid()}-")
    os.chmod(tmp_root, 0o755)
    h = make_storage_host(system_bus, netlab, ganesha, tmp_root,
                          extra=f"spool_export_clients = {READER}")
    try:
        h.start()
        yield h
    finally:
        destroy_storage_host(h)
        shutil.rmtree(tmp_root, ignore_errors=True)


def test_the_spool_is_published_read_only_to_the_listed_clients(spool_host, netlab):
    h = spool_host
    reader = netlab.add_client("spool-rd", ip4=READER)
    other = netlab.add_client("spool-no", ip4=OTHER)
    path = h.create_share("spooled", "NFS", 1)
    location = h.get(*MANAGER, "SpoolExport")
    pseudo = f"/shares/{spool_share_id('storage1')}"
    assert location == f"{netlab.server_ip4}:{pseudo}"
    # Records are written behind ganesha's back: no attribute cache on this export.
    conf = os.path.join(h.state_path, "backends", "btrfs1", "ganesha",
                        f"{spool_share_id('storage1')}.conf")
    with open(conf) as f:
        text = f.read()
    assert "Attr_Expiration_Time = 0;" in text and "Access_Type = RO;" in text, text
    listing = h.ganesha.nfs_ls(reader, f"{pseudo}/storage1")
    assert listing.ok, listing
    names = sorted(n for n in os.listdir(os.path.join(h.spool_dir, "storage1"))
                   if recordlib.FILE_NAME_RE.fullmatch(n))
    assert names and all(n in listing.stdout for n in names[-3:]), listing.stdout
    # A record read over NFS verifies with the key the daemon publishes.
    got = h.ganesha.nfs_cat(reader, f"{pseudo}/storage1/{names[-1]}")
    assert got.ok, got
    record = recordlib.loads(got.stdout.encode())
    signing.parse_public_line(h.get(*MANAGER, "RecordSigningKey")).verify(record)
    components.used("spool published over NFS-Ganesha (libnfs client)")
    # Read-only, and only to the listed client.
    local = os.path.join(h.workdir, "forged.json")
    with open(local, "w") as f:
        json.dump({"forged": True}, f)
    wrote = h.ganesha.nfs_cp_to(reader, local, f"{pseudo}/storage1/forged.json")
    assert not wrote.ok and not os.path.exists(os.path.join(h.spool_dir, "storage1",
                                                            "forged.json"))
    assert not h.ganesha.nfs_ls(other, f"{pseudo}/storage1").ok
    h.share(path, "Delete", "a{sv}", 0)
    # Without spool_export_clients the export is withdrawn at the next start.
    with open(h.config_path) as f:
        text = f.read()
    with open(h.config_path, "w") as f:
        f.write(text.replace(f"spool_export_clients = {READER}", ""))
    h.restart()
    assert h.get(*MANAGER, "SpoolExport") == ""
    deadline = time.monotonic() + 10
    while h.ganesha.nfs_ls(reader, f"{pseudo}/storage1").ok:
        assert time.monotonic() < deadline, "the spool is still exported"
        time.sleep(0.2)
