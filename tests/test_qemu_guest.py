"""The qemu guest fixture: a real Debian kernel's NFS client and server.

Lab: our own namespace with a bridge (10.75.0.1, fd75::1) and NFS-Ganesha in
it, exporting a tmpfs to 10.75.0.21 only. Two guests boot at once on that
bridge: one at the allowed address mounts with ``mount -t nfs4`` and writes a
file the host then sees; it also exports a directory with its own kernel NFS
server and mounts it over loopback. The other, at 10.75.0.22, must be refused.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import tempfile
import time

import pytest

from tests.fixtures.bus import private_bus
from tests.fixtures.ganesha import make_ganesha
from tests.fixtures.netlab import make_lab
from tests.fixtures.qemu_guest import (REPO, GuestResult, parse_console, run_in_guest,
                                       start_guest)

SUBNET4, SUBNET6 = "10.75.0.0/24", "fd75::/64"
SERVER = "10.75.0.1"
ALLOWED, DENIED = "10.75.0.21", "10.75.0.22"
EXPORT_ID = 75


@pytest.fixture(scope="module")
def nfs_lab():
    """(lab, export_dir) with ganesha exporting a tmpfs at /x to ALLOWED only.

    Its own bus: the session's bus may already carry another ganesha."""
    with contextlib.ExitStack() as stack:
        system_bus = stack.enter_context(private_bus())
        lab = stack.enter_context(make_lab(SUBNET4, SUBNET6))
        g = stack.enter_context(make_ganesha(lab, system_bus))
        export_dir = tempfile.mkdtemp(prefix=f"sharedd-qg-export-{os.getpid()}-")
        stack.callback(os.rmdir, export_dir)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0777", "tmpfs",
                        export_dir], check=True, timeout=30)
        stack.callback(subprocess.run, ["umount", export_dir], check=True, timeout=30)
        conf = pathlib.Path(g.tmp) / "export-75.conf"
        conf.write_text(f"""EXPORT {{
    Export_Id = {EXPORT_ID}; Path = "{export_dir}"; Pseudo = "/x";
    Protocols = 4; Transports = TCP; SecType = sys; Squash = No_Root_Squash;
    Access_Type = None;
    FSAL {{ Name = VFS; }}
    CLIENT {{ Clients = {ALLOWED}; Access_Type = RW; Protocols = 4; }}
}}
""")
        system_bus.busctl("call", "org.ganesha.nfsd", "/org/ganesha/nfsd/ExportMgr",
                          "org.ganesha.nfsd.exportmgr", "AddExport", "ss", str(conf),
                          f"EXPORT(Export_Id={EXPORT_ID})")
        # The export is removed before ganesha stops and the tmpfs unmounts.
        stack.callback(system_bus.busctl, "call", "org.ganesha.nfsd",
                       "/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                       "RemoveExport", "q", str(EXPORT_ID), check=False)
        yield lab, pathlib.Path(export_dir), g


ALLOWED_SCRIPT = f"""#!/bin/bash
set -u
T0=$(date +%s%N)
say() {{ echo "RESULT $*"; echo "TIME ${{1%%=*}} $(( ($(date +%s%N) - T0) / 1000000 )) ms"; }}
say hostname=$(hostname)
ip -br addr show dev eth0
# --- the kernel NFS client against ganesha on the host's bridge ---
mkdir -p /mnt/nfs
mount -t nfs4 -o timeo=50,retrans=2 {SERVER}:/x /mnt/nfs; say ganesha_mount=$?
echo "written by $(hostname)" > /mnt/nfs/from-guest; say ganesha_write=$?
sync
say ganesha_fstype=$(findmnt -n -o FSTYPE /mnt/nfs)
umount /mnt/nfs; say ganesha_umount=$?
# --- the guest's own kernel NFS server ---
systemctl is-active --quiet nfs-server; say nfsd_active=$?
mkdir -p /srv/x && echo served > /srv/x/served
exportfs -o rw,no_root_squash {SUBNET4}:/srv/x; say exportfs=$?
exportfs -v
mkdir -p /mnt/k
# 127.0.0.1 is not in the exported subnet: refused.
timeout 60 mount -t nfs4 -o timeo=50,retrans=2 127.0.0.1:/srv/x /mnt/k; say knfs_lo_unlisted=$?
# The guest's own bridge address is: mounted, written, seen on the server side.
timeout 60 mount -t nfs4 {ALLOWED}:/srv/x /mnt/k; say knfs_mount=$?
cat /mnt/k/served && echo via-nfs > /mnt/k/back; say knfs_write=$?
umount /mnt/k
say knfs_back=$(cat /srv/x/back)
exportfs -o rw,no_root_squash 127.0.0.1:/srv/x; say exportfs_lo=$?
timeout 60 mount -t nfs4 127.0.0.1:/srv/x /mnt/k; say knfs_lo=$?
say knfs_lo_read=$(cat /mnt/k/back)
umount /mnt/k
exportfs -ua; say unexport=$?
# --- the project's code from the read-only repo share ---
cd /mnt/repo && /usr/bin/python3 -c 'import sharedd, dbus_next, pyinotify, netaddr, sdnotify, pyroute2; print(sharedd.__version__)' > /tmp/v; say repo_import=$?
say repo_version=$(cat /tmp/v)
touch /mnt/repo/.guest-write-probe 2>/dev/null; say repo_touch=$?
exit 0
"""

DENIED_SCRIPT = f"""#!/bin/bash
set -u
T0=$(date +%s%N)
say() {{ echo "RESULT $*"; echo "TIME ${{1%%=*}} $(( ($(date +%s%N) - T0) / 1000000 )) ms"; }}
say hostname=$(hostname)
mkdir -p /mnt/nfs
timeout 90 mount -t nfs4 -o timeo=50,retrans=2 {SERVER}:/x /mnt/nfs; say ganesha_mount=$?
if findmnt /mnt/nfs >/dev/null; then echo denied-guest-wrote > /mnt/nfs/from-denied; umount /mnt/nfs; fi
exit 0
"""


def _results(res: GuestResult) -> dict:
    return dict(m.groups() for m in re.finditer(r"^RESULT (\w+)=(.*)$", res.output, re.M))


def test_two_guests_nfs_client_and_server(nfs_lab, qemu_guest_image, capsys):
    lab, export_dir, g = nfs_lab
    common = dict(netns=lab.server_ns, bridge="br0", image=qemu_guest_image, timeout=600)
    t0 = time.monotonic()
    # Both at once: distinct taps, hostnames and NFSv4 client ids.
    with start_guest(ALLOWED_SCRIPT, ip_cidr=[f"{ALLOWED}/24", "fd75::21/64"],
                     hostname="qg-allowed", **common) as a, \
            start_guest(DENIED_SCRIPT, ip_cidr=f"{DENIED}/24", hostname="qg-denied",
                        **common) as b:
        ra, rb = a.wait(), b.wait()
    total = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[qemu guest] two concurrent guests: {total:.1f} s in all; "
              f"allowed: boot {ra.boot_seconds} s, cycle {ra.seconds:.1f} s; "
              f"denied: boot {rb.boot_seconds} s, cycle {rb.seconds:.1f} s")
        for name, res in (("allowed", ra), ("denied", rb)):
            steps = re.findall(r"^TIME (\w+) (\d+) ms$", res.output, re.M)
            print(f"[qemu guest] {name} script steps (ms since start): "
                  + ", ".join(f"{k} {v}" for k, v in steps))

    assert ra.returncode == 0 and not ra.timed_out, ra.describe()
    r = _results(ra)
    assert r.get("hostname") == "qg-allowed", ra.describe()
    assert r.get("ganesha_mount") == "0", ra.describe()
    assert r.get("ganesha_write") == "0", ra.describe()
    assert r.get("ganesha_fstype") == "nfs4", ra.describe()
    assert (export_dir / "from-guest").read_text() == "written by qg-allowed\n"
    assert r.get("nfsd_active") == "0", ra.describe()
    assert r.get("exportfs") == "0", ra.describe()
    assert r.get("knfs_lo_unlisted") not in (None, "0"), ra.describe()
    assert r.get("knfs_mount") == "0" and r.get("knfs_write") == "0", ra.describe()
    assert r.get("knfs_back") == "via-nfs", ra.describe()
    assert r.get("exportfs_lo") == "0" and r.get("knfs_lo") == "0", ra.describe()
    assert r.get("knfs_lo_read") == "via-nfs", ra.describe()
    assert r.get("repo_import") == "0", ra.describe()
    from sharedd import __version__
    assert r.get("repo_version") == __version__, ra.describe()
    assert r.get("repo_touch") not in (None, "0"), ra.describe()
    assert not (REPO / ".guest-write-probe").exists()

    assert rb.returncode == 0 and not rb.timed_out, rb.describe()
    rb_res = _results(rb)
    assert rb_res.get("hostname") == "qg-denied", rb.describe()
    assert rb_res.get("ganesha_mount") not in (None, "0"), rb.describe()
    assert not (export_dir / "from-denied").exists()


def test_guest_without_nic_reports_exit_code_and_cleans_up(qemu_guest_image, capsys):
    share = tempfile.mkdtemp(prefix=f"sharedd-qg-share-{os.getpid()}-")
    try:
        pathlib.Path(share, "input").write_text("from the host\n")
        t0 = time.monotonic()
        res = run_in_guest("set -e\ncat /mnt/host/input\nip -br link\n"
                           "echo out > /mnt/host/made-in-guest\nexit 7\n",
                           share_dir=share, image=qemu_guest_image, timeout=600)
        with capsys.disabled():
            print(f"\n[qemu guest] one guest, no NIC: boot {res.boot_seconds} s, "
                  f"cycle {time.monotonic() - t0:.1f} s")
        rc, output = res
        assert rc == 7, res.describe()
        assert "from the host" in output, res.describe()
        assert "eth0" not in output, res.describe()
        assert pathlib.Path(share, "made-in-guest").read_text() == "out\n"
        # The serial console carries the same verdict (the fallback channel).
        fallback_rc, fallback_output = parse_console(res.console)
        assert fallback_rc == 7 and "from the host" in fallback_output, res.describe()
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", share], check=False)


def test_bad_arguments_are_refused_before_boot(qemu_guest_image):
    with pytest.raises(ValueError):
        run_in_guest("true", netns="no-such-ns-qg", bridge="br0", image=qemu_guest_image)
    with pytest.raises(ValueError):
        run_in_guest("true", ip_cidr="10.75.0.9/24", image=qemu_guest_image)
    with pytest.raises(ValueError):
        run_in_guest("true", hostname="Bad Name", image=qemu_guest_image)


def test_timeout_kills_qemu_and_removes_tap(qemu_guest_image):
    with make_lab("10.75.1.0/24", "fd75:1::/64") as lab:
        guest = start_guest("sleep 1000\n", netns=lab.server_ns, bridge="br0",
                            ip_cidr="10.75.1.21/24", image=qemu_guest_image, timeout=12)
        pid, tap, share = guest.proc.pid, guest.tap, guest.share
        links = lab.run(lab.server_ns, ["ip", "-o", "link", "show", "master", "br0"]).stdout
        assert tap and tap in links
        res = guest.wait()
        assert res.timed_out and res.returncode is None, res.describe()
        assert 11 < res.seconds < 60
        assert not os.path.exists(f"/proc/{pid}") or \
            pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"qemu-system-x86_64"
        links = lab.run(lab.server_ns, ["ip", "-o", "link", "show"]).stdout
        assert tap not in links
        assert not share.exists()


def test_parse_console_fallback():
    console = ("[  OK  ] Started x\r\n=== sharedd-guest output begin ===\r\nline 1\r\n"
               "line 2\r\n\r\n=== sharedd-guest exit=3 ===\r\n[ 40.1] reboot: Power down\r\n")
    assert parse_console(console) == (3, "line 1\nline 2")
    assert parse_console("=== sharedd-guest exit=125 ===\n") == (125, "")
    assert parse_console("kernel panic") == (None, "")
