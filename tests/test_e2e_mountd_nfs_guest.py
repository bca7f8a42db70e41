"""mountd end to end with a real kernel NFS client on another host: the
client package is installed in a real Debian guest (qemu, systemd as PID 1)
and its hardened unit runs mountd on the storage network. The storage host
publishes its spool over its own NFS-Ganesha (spool_export_clients); mountd
mounts it itself (spool_source, read-only, nosuid,nodev,noexec), notices new
records by polling (no inotify over NFS) and acts only on records signed by
the key it trusts (the storage host's published key, installed as an
administrator would). sharedd (btrfs) exports through NFS-Ganesha in the
storage namespace.

grant rw -> mounted rw (data reaches the server), timed from the grant's
reply to the mount; a forged record in the spool (unsigned, granting
another share) mounts nothing; the rw rule is revoked while a ro CIDR rule
remains -> remounted ro (a write fails with EROFS); all access revoked ->
unmounted."""

import os
import shutil
import subprocess
import time

from tests.fixtures.mountd_env import make_record, make_share, rule, write_record
from tests.fixtures.qemu_guest import start_guest
from tests.support import components

GUEST_IP = "10.71.0.60"
# the storage host publishes its spool to the test network
STORAGE_HOST_EXTRA = "spool_export_clients = 10.71.0.0/24"
MANAGER = ("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager")

# Runs inside the guest (/mnt/host is the host's storage work dir, shared
# over 9p; /mnt/repo is this repository, read-only).
GUEST_SCRIPT = r"""#!/bin/bash
set -u
state() { echo "$1" >> /mnt/host/guest-state; }
# The client package, installed as an administrator would; its unit starts.
dpkg -i /mnt/host/debs/python3-sharedd_*.deb /mnt/host/debs/sharedd-mountd_*.deb \
    > /mnt/host/dpkg.log 2>&1 || { state "dpkg-failed"; exit 1; }
systemctl is-enabled sharedd-mountd.service >> /mnt/host/dpkg.log 2>&1
# Trust the storage host's record signing key; mount its published spool.
install -m 0644 /mnt/host/trusted.pub /etc/sharedd/trusted-keys.d/storage1.pub
mkdir -p /etc/sharedd/mountd.conf.d
printf '%s\n' '[mountd]' 'spool_dir = /srv/spool' "spool_source = $(cat /mnt/host/spool-source)" \
    'consume_interval = 120' 'protocols = NFS' 'health_check_interval = 2' \
    'health_check_timeout = 3' > /etc/sharedd/mountd.conf.d/50-test.conf
systemctl restart sharedd-mountd.service
systemctl is-active sharedd-mountd.service || { state "never-active"; journalctl -u sharedd-mountd > /mnt/host/mountd.log; exit 1; }
trap 'journalctl -u sharedd-mountd --no-pager > /mnt/host/mountd.log 2>&1' EXIT
for _ in $(seq 120); do findmnt -rn /srv/spool > /dev/null && break; sleep 0.5; done
state "spool $(findmnt -rn -o FSTYPE,OPTIONS /srv/spool)"
state started
# Mount events as they happen (polled every 10 ms; one python for the run).
python3 - <<'PY' &
import time
def shares():
    out = {}
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4].startswith("/mnt/shares/") and f[f.index("-") + 1] == "nfs4":
            out[f[4]] = "ro" if "ro" in f[5].split(",") else "rw"
    return out
last = {}
while True:
    now = shares()
    if now != last:
        with open("/mnt/host/guest-state", "a") as s:
            s.write("mounts " + " ".join(f"{k}={v}" for k, v in sorted(now.items())) + "\n")
        last = now
    time.sleep(0.01)
PY
mp() { findmnt -rn -t nfs4 -o TARGET | grep '^/mnt/shares/' | head -1; }
opts() { findmnt -rn -o OPTIONS --target "$1"; }
wait_for() {  # wait_for SECONDS CONDITION...
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" && return 0; sleep 0.1; done
  return 1
}
is_rw() { m=$(mp); [ -n "$m" ] && opts "$m" | grep -qE '(^|,)rw(,|$)'; }
is_ro() { m=$(mp); [ -n "$m" ] && opts "$m" | grep -qE '(^|,)ro(,|$)'; }
gone() { [ -z "$(mp)" ]; }
wait_for 180 is_rw || { state "never-rw"; exit 1; }
m=$(mp); state "mounted-rw $m $(opts $m)"
echo "written by the guest over NFS" > "$m/from-guest.txt" && state "wrote"
# The host cuts this guest's link: mountd answers on the bus all along,
# reports the share stale, and mounted again once the server is back.
mounts() { timeout 5 busctl --system --json=short get-property org.sharedd.Mountd1 \
    /org/sharedd/Mountd1 org.sharedd.Mountd1 Mounts; }
stale() { mounts | grep -q '"stale"'; }
fresh() { mounts | grep -q '"mounted"'; }
wait_for 300 test -e /mnt/host/link-down || { state "never-cut"; exit 1; }
wait_for 120 stale || { state "never-stale $(mounts)"; exit 1; }
state "stale-reported $(mounts)"
wait_for 300 test -e /mnt/host/link-up || { state "never-restored"; exit 1; }
wait_for 180 fresh || { state "never-recovered $(mounts)"; exit 1; }
state "recovered"
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
journalctl -u sharedd-mountd --no-pager | grep -c "spool file rejected" | sed 's/^/rejected /' \
    >> /mnt/host/guest-state
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


def _mount_events(path):
    """(time seen, {mount point: level}) for each 'mounts' line, as they come."""
    return [line for line in read_state(path) if line.startswith("mounts")]


def test_mountd_in_guest_mounts_rw_ro_and_unmounts(storage_host, netlab, qemu_guest_image,
                                                   built_debs):
    h = storage_host
    debdir = os.path.join(h.workdir, "debs")
    shutil.copytree(built_debs[0], debdir, dirs_exist_ok=True)
    key = h.get(*MANAGER, "RecordSigningKey")
    source = h.get(*MANAGER, "SpoolExport")
    assert source.startswith(f"{netlab.server_ip4}:/"), source
    with open(os.path.join(h.workdir, "trusted.pub"), "w") as f:
        f.write(key + "\n")
    with open(os.path.join(h.workdir, "spool-source"), "w") as f:
        f.write(source + "\n")
    path = h.create_share("guestshare", "NFS", 1)
    share_mp = os.path.join(h.state_path, "backends", "btrfs1", "mounts", path.rsplit("/", 1)[1])
    state = os.path.join(h.workdir, "guest-state")
    guest = start_guest(GUEST_SCRIPT, netns=netlab.server_ns, bridge="br0",
                        ip_cidr=f"{GUEST_IP}/24", hostname="mountd-guest",
                        share_dir=h.workdir, timeout=900, image=qemu_guest_image)
    forged = None
    try:
        spool_line = wait_state(state, "spool ", guest)
        assert spool_line.split()[1] == "nfs4", spool_line
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(spool_line.split()[2].split(",")), \
            spool_line
        wait_state(state, "started", guest)
        # A forged record in the published spool: unsigned, granting the guest
        # another share rw. It must not be mounted (checked at the end: the
        # only mounts seen are the genuine share's).
        bait = make_share(name="bait", rules=[rule(GUEST_IP, "rw")],
                          export=f"{netlab.server_ip4}:/shares/bait")
        forged = write_record(h.spool_dir, make_record(
            10 ** 19, "post", "allow_access", share=bait, host="storage1"))
        before = len(_mount_events(state))
        granted = time.monotonic()
        rw_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", GUEST_IP, "rw", 0)
        replied = time.monotonic()
        while len(_mount_events(state)) == before:
            assert time.monotonic() - granted < 300, f"no mount; {read_state(state)}\n{_logs(state)}"
            time.sleep(0.01)
        latency = time.monotonic() - replied
        print(f"grant -> mounted in the guest: {latency:.2f} s "
              f"(AllowAccess took {replied - granted:.2f} s)")
        ro_id = h.share(path, "AllowAccess", "sssa{sv}", "ip", "10.71.0.0/24", "ro", 0)
        line = wait_state(state, "mounted-rw", guest)
        components.used("installed sharedd-mountd unit in a qemu Debian guest (kernel NFS client)")
        components.used("spool published by sharedd over NFS-Ganesha, mounted by mountd")
        assert "nosuid" in line and "nodev" in line, line
        wait_state(state, "wrote", guest)
        assert open(os.path.join(share_mp, "from-guest.txt")).read() == "written by the guest over NFS\n"
        # The server goes away for the guest (its link down), then comes back.
        subprocess.run(["ip", "-n", netlab.server_ns, "link", "set", guest.tap, "down"],
                       check=True, timeout=30)
        open(os.path.join(h.workdir, "link-down"), "w").close()
        wait_state(state, "stale-reported", guest)
        subprocess.run(["ip", "-n", netlab.server_ns, "link", "set", guest.tap, "up"],
                       check=True, timeout=30)
        open(os.path.join(h.workdir, "link-up"), "w").close()
        wait_state(state, "recovered", guest)
        components.used("mountd health checks against a server that went away (link down)")
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
        assert not any("bait" in line for line in _mount_events(state)), read_state(state)
        assert int(wait_state(state, "rejected ", guest).split()[1]) >= 1, _logs(state)
    finally:
        if guest.proc is not None and guest.proc.poll() is None:
            guest.kill()
        if forged is not None:
            os.unlink(forged)
        h.share(path, "Delete", "a{sv}", 0)
