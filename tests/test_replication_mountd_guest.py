"""mountd follows a promote: a real kernel NFS client (the installed
sharedd-mountd unit in the qemu Debian guest) has a replicated share mounted
read-write from its active copy (btrfs1, at the storage host's first
address); the replica on btrfs2 (announced at a second address) is promoted;
the promote's records carry the new export location, and mountd mounts the
share again from there. A file the guest wrote before the promote is read
back through the new mount, and a file written after it lands on btrfs2's
copy.
"""

import os
import shutil

from tests.support import components
from tests.test_e2e_mountd_nfs_guest import MANAGER, _logs, read_state, wait_state
from tests.test_replication_btrfs import (REPLICA, SECOND_IP, by_role, host,  # noqa: F401
                                          mount_of, replicate)
from tests.fixtures.qemu_guest import start_guest

GUEST_IP = "10.71.0.61"
REPLICATION_EXTRA = "spool_export_clients = 10.71.0.0/24"

GUEST_SCRIPT = r"""#!/bin/bash
set -u
state() { echo "$1" >> /mnt/host/guest-state; }
dpkg -i /mnt/host/debs/python3-sharedd_*.deb /mnt/host/debs/sharedd-mountd_*.deb \
    > /mnt/host/dpkg.log 2>&1 || { state "dpkg-failed"; exit 1; }
install -m 0644 /mnt/host/trusted.pub /etc/sharedd/trusted-keys.d/storage1.pub
mkdir -p /etc/sharedd/mountd.conf.d
printf '%s\n' '[mountd]' 'spool_dir = /srv/spool' "spool_source = $(cat /mnt/host/spool-source)" \
    'consume_interval = 120' 'protocols = NFS' 'health_check_interval = 2' \
    'health_check_timeout = 3' > /etc/sharedd/mountd.conf.d/50-test.conf
systemctl restart sharedd-mountd.service
systemctl is-active sharedd-mountd.service || { state "never-active"; exit 1; }
trap 'journalctl -u sharedd-mountd --no-pager > /mnt/host/mountd.log 2>&1' EXIT
wait_for() {  # wait_for SECONDS CONDITION...
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" && return 0; sleep 0.1; done
  return 1
}
share() { findmnt -rn -t nfs4 -o SOURCE,TARGET | awk '$2 ~ "^/mnt/shares/" {print; exit}'; }
src() { share | cut -d' ' -f1; }
mp() { share | cut -d' ' -f2; }
mounted() { [ -n "$(share)" ]; }
wait_for 60 findmnt -rn /srv/spool > /dev/null || { state "never-spool"; exit 1; }
state "started"
wait_for 180 mounted || { state "never-mounted"; exit 1; }
first=$(src)
state "mounted $first"
echo "written before the promote" > "$(mp)/before.txt" && state "wrote"
wait_for 300 test -e /mnt/host/promoted || { state "never-promoted"; exit 1; }
moved() { s=$(src); [ -n "$s" ] && [ "$s" != "$first" ]; }
wait_for 180 moved || { state "never-remounted $(share)"; exit 1; }
state "remounted $(src)"
m=$(mp)
[ "$(cat "$m/before.txt")" = "written before the promote" ] && state "read-before"
echo "written after the promote" > "$m/after.txt" && state "wrote-after"
systemctl stop sharedd-mountd.service
state "done"
"""


def test_mountd_remounts_a_promoted_share_from_its_new_location(host, netlab, system_bus,
                                                                 qemu_guest_image, built_debs):
    h = host
    debdir = os.path.join(h.workdir, "debs")
    shutil.copytree(built_debs[0], debdir, dirs_exist_ok=True)
    with open(os.path.join(h.workdir, "trusted.pub"), "w") as f:
        f.write(h.get(*MANAGER, "RecordSigningKey") + "\n")
    with open(os.path.join(h.workdir, "spool-source"), "w") as f:
        f.write(h.get(*MANAGER, "SpoolExport") + "\n")
    path = h.create_share("rep-guest", "NFS", 1)
    sid = path.rsplit("/", 1)[1]
    # A dr replica on btrfs2, complete before the guest mounts anything.
    rp = replicate(h, system_bus, path, "btrfs2")
    state = os.path.join(h.workdir, "guest-state")
    guest = start_guest(GUEST_SCRIPT, netns=netlab.server_ns, bridge="br0",
                        ip_cidr=f"{GUEST_IP}/24", hostname="replica-guest",
                        share_dir=h.workdir, timeout=900, image=qemu_guest_image)
    try:
        wait_state(state, "started", guest)
        h.share(path, "AllowAccess", "sssa{sv}", "ip", GUEST_IP, "rw", 0)
        line = wait_state(state, "mounted ", guest)
        assert line.split()[1].startswith(f"{netlab.server_ip4}:"), line
        wait_state(state, "wrote", guest)
        h.call(rp, REPLICA, "Promote", "a{sv}", 0)
        [export] = h.share_prop(path, "ExportLocations")
        assert export.startswith(f"{SECOND_IP}:"), export
        open(os.path.join(h.workdir, "promoted"), "w").close()
        line = wait_state(state, "remounted ", guest)
        assert line.split()[1] == export, (line, read_state(state))
        components.used("mountd following a promoted replica (kernel NFS client in a guest)")
        wait_state(state, "read-before", guest)
        wait_state(state, "wrote-after", guest)
        result = guest.wait()
        assert result.returncode == 0, result.describe() + _logs(state)
        copy = mount_of(h, "btrfs2", sid)
        assert open(os.path.join(copy, "after.txt")).read() == "written after the promote\n"
        assert open(os.path.join(copy, "before.txt")).read() == "written before the promote\n"
    finally:
        if guest.proc is not None and guest.proc.poll() is None:
            guest.kill()
    aid = by_role(h, path, "replica")
    h.call(aid, REPLICA, "Delete", "a{sv}", 0)
    h.share(path, "Delete", "a{sv}", 0)
