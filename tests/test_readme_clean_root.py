"""The README's first command on a clean Debian 12, as a new user meets it.

The root is what a plain Debian 12 install without tasks holds
(tests/fixtures/nspawn.py, ensure_clean_root: debootstrap's default variant,
no sudo), booted under a real systemd with the host's network (apt fetches
from the Debian mirror; the demo's own traffic stays in the network
namespaces it creates) and nothing masked. The checkout is bound read-only,
root logs in with `su -` as the README says, and `tools/demo` runs as
written. Afterwards the enabled units are the same as before and none of the
packages' services runs.
"""

from __future__ import annotations

import pathlib
import re
from typing import Set

from tests.fixtures import nspawn
from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent
CHECKOUT = "/root/sharedd"
# The README: "`su -`, then `cd` to the checkout", then its first command.
COMMAND = f"cd {CHECKOUT} && tools/demo"


def enabled_units(ct: nspawn.Container) -> Set[str]:
    out = ct.sh_out("systemctl", "list-unit-files", "--state=enabled", "--no-legend",
                    "--no-pager")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def running_services(ct: nspawn.Container) -> Set[str]:
    out = ct.sh_out("systemctl", "list-units", "--type=service", "--state=running",
                    "--no-legend", "--no-pager", "--plain")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_tools_demo_on_a_clean_debian_12(nspawn_clean_root: pathlib.Path) -> None:
    with nspawn.boot(nspawn_clean_root, bind_ro={str(REPO): CHECKOUT},
                     private_network=False, masked=()) as ct:
        assert ct.run("sh", "-c", "command -v sudo", check=False).returncode != 0, \
            "a clean Debian 12 root has no sudo"
        before = enabled_units(ct)
        running_before = running_services(ct)
        # A login shell as root (su - runs root's shell, bash, with -c), so the
        # environment is what the README's reader has.
        proc = ct.run("su", "-", "root", "-c", COMMAND, check=False, timeout=1800)
        components.used("tools/demo on a clean Debian 12 root (nspawn, apt from the mirror)")
        out = proc.stdout
        assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
        assert out.startswith("install-deps: installing "), out[:2000]
        # The packages did enable units (so the comparison below is not
        # vacuous), and install-deps disabled them again.
        assert re.search(r"^install-deps: disabled what those packages enabled.*"
                         r"\bnfs-ganesha\.service\b", out, re.M), out[-4000:]
        for expected in ("alice: can list; write OK",
                         "bob: can list; write refused: read-only file system",
                         "eve: no access",
                         "alice.txt after revert: written by alice",
                         "-m mountd --config",
                         "done: everything the demo started is stopped and removed"):
            assert expected in out, expected
        # The container shares the host's kernel: where it has no NFS client
        # the demo says so before sharedd-mountd's mount fails.
        has_nfs = any(line.split()[-1] in ("nfs", "nfs4")
                      for line in pathlib.Path("/proc/filesystems").read_text().splitlines())
        assert has_nfs or "this machine's kernel has no NFS client" in out
        assert "Traceback" not in out + proc.stderr
        after = enabled_units(ct)
        assert after == before, (sorted(after - before), sorted(before - after))
        # The packages' services were not started (policy-rc.d) and nothing
        # the demo started outlives it (dbus is not in the clean root: it is
        # Priority standard, installed by install-deps).
        for unit in ("nfs-ganesha.service", "nfs-ganesha-lock.service", "rpcbind.service",
                     "rpcbind.socket", "dbus.service", "dbus.socket"):
            state = ct.run("systemctl", "is-active", unit, check=False).stdout.strip()
            assert state != "active", (unit, state)
        assert running_services(ct) <= running_before, running_services(ct) - running_before
