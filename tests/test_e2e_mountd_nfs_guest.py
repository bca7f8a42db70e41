"""mountd end to end over NFS with a real kernel NFS client: the client
package is installed in a real Debian guest (qemu, systemd as PID 1) and its
hardened unit runs mountd on the storage network, reading the host's spool
through a read-only mount of a host share; sharedd (btrfs) exports through
NFS-Ganesha in the storage namespace. grant rw -> mounted rw (data reaches
the server); the rw rule is revoked while a ro CIDR rule remains -> remounted
ro (a write fails with EROFS); all access revoked -> unmounted."""

import os
import shutil
import time

from tests.fixtures.qemu_guest import start_guest
from tests.support import components

GUEST_IP = "10.71.0.60"

# Runs inside the guest (/mnt/host is the host's storage work dir, shared
# over 9p; /mnt/repo is this repository, read-only).
GUEST_SCRIPT = r"""#!/bin/bash
set -u
state() { echo "$1" >> /mnt/host/guest-state; }
mkdir -p /srv/spool
mount --bind /mnt/host/spool /srv/spool
mount -o remount,bind,ro /srv/spool
# The client package, installed as an administrator would; its unit starts.
dpkg -i /mnt/host/debs/python3-sharedd_*.deb /mnt/host/debs/sharedd-mountd_*.deb \
    > /mnt/host/dpkg.log 2>&1 || { state "dpkg-failed"; exit 1; }
systemctl is-enabled sharedd-mountd.service >> /mnt/host/dpkg.log 2>&1
mkdir -p /etc/sharedd/mountd.conf.d
printf '%s\n' '[mountd]' 'spool_dir = /srv/spool' 'consume_interval = 2' 'protocols = NFS' \
    > /etc/sharedd/mountd.conf.d/50-test.conf
systemctl restart sharedd-mountd.service
systemctl is-active sharedd-mountd.service || { state "never-active"; journalctl -u sharedd-mountd > /mnt/host/mountd.log; exit 1; }
state started
mp() { findmnt -rn -t nfs4 -o TARGET | grep '^/mnt/shares/' | head -1; }
trap 'journalctl -u sharedd-mountd --no-pager > /mnt/host/mountd.log 2>&1' EXIT
opts() { findmnt -rn -o OPTIONS --target "$1"; }
wait_for() {  # wait_for SECONDS CONDITION...
  local t=$1; shift
  for _ in $(seq $((t * 2))); do "$@" && return 0; sleep 0.5; done
  return 1
}
is_rw() { m=$(mp); [ -n "$m" ] && opts "$m" | grep -qE '(^|,)rw(,|$)'; }
is_ro() { m=$(mp); [ -n "$m" ] && opts "$m" | grep -qE '(^|,)ro(,|$)'; }
gone() { [ -z "$(mp)" ]; }
wait_for 180 is_rw || { state "never-rw"; exit 1; }
m=$(mp); state "mounted-rw $m $(opts $m)"
echo "written by the guest over NFS" > "$m/from-guest.txt" && state "wrote"
wait_for 180 is_ro || { state "never-ro"; exit 1; }
m=$(mp); state "mounted-ro $m $(opts $m)"
if touch "$m/should-fail.txt" 2>/tmp/ro-error.txt; then
  state "ro-write-succeeded"
else
  state "ro-write-refused $(cat /tmp/ro-error.txt)"
fi
cat "$m/from-guest.txt" > /dev/null && state "ro-read-ok"
wait_for 180 gone || { state "never-unmounted"; exit 1; }
state "unmounted"
systemctl stop sharedd-mountd.service
state "done"
"""


def read_state(path):
    try:
        return open(path).read().splitlines()
    except FileNotFoundError:
        return []


def _logs(state_path):
    out = []
    for name in ("dpkg.log", "mountd.log"):
        p = os.path.join(os.path.dirname(state_path), name)
        if os.path.exists(p):
            out.append(f"--- {name} ---\n" + open(p).read()[-3000:])
    return "\n".join(out)


def wait_state(path, prefix, guest, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in read_state(path):
            if line.startswith(prefix):
                return line
            if line.startswith(("never", "dpkg-failed")) or line == "ro-write-succeeded":
                raise AssertionError(f"guest reported {line}: {read_state(path)}\n{_logs(path)}")
        if guest.proc is not None and guest.proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"guest never reported {prefix!r}; state {read_state(path)}\n{_logs(path)}")


def test_mountd_in_guest_mounts_rw_ro_and_unmounts(storage_host, netlab, qemu_guest_image,
                                                   built_debs):
    h = storage_host
    debdir = os.path.join(h.workdir, "debs")
    shutil.copytree(built_debs[0], debdir, dirs_exist_ok=True)
    path = h.create_share("guestshare", "NFS", 1)
    share_mp = os.path.join(h.state_path, "backends", "btrfs1", "mounts", path.rsplit("/", 1)[1])
    state = os.path.join(h.workdir, "guest-state")
    guest = start_guest(GUEST_SCRIPT, netns=netlab.server_ns, bridge="br0",
                        ip_cidr=f"{GUEST_IP}/24", hostname="mountd-guest",
                        share_dir=h.workdir, timeout=900, image=qemu_guest_image)
    try:
        wait_state(state, "started", guest)
        rw_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", GUEST_IP, "rw", 0)
        ro_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.0/24", "ro", 0)
        line = wait_state(state, "mounted-rw", guest)
        components.used("installed sharedd-mountd unit in a qemu Debian guest (kernel NFS client)")
        assert "nosuid" in line and "nodev" in line, line
        wait_state(state, "wrote", guest)
        assert open(os.path.join(share_mp, "from-guest.txt")).read() == "written by the guest over NFS\n"
        # Revoke the rw rule; the ro CIDR still matches: a level change.
        h.share(path, "DenyAccess", "sa{sv}", rw_id, 0)
        wait_state(state, "mounted-ro", guest)
        line = wait_state(state, "ro-write-refused", guest)
        assert "Read-only file system" in line, line
        assert not os.path.exists(os.path.join(share_mp, "should-fail.txt"))
        h.share(path, "DenyAccess", "sa{sv}", ro_id, 0)
        wait_state(state, "unmounted", guest)
        result = guest.wait()
        assert result.returncode == 0, result.describe()
    finally:
        if guest.proc is not None and guest.proc.poll() is None:
            guest.kill()
        h.share(path, "Delete", "a{sv}", 0)
