"""The README's busctl cookbook, run: every line, in the README's order,
against a real sharedd started from the shipped configuration
(etc/sharedd.conf; only its paths and export address moved into a
temporary directory), a btrfs pool on a loop device and NFS-Ganesha.

The README's placeholders are filled the way a reader fills them: `<id>`
with the object a line before made (a share made for the purpose where the
line would delete or release the one the next lines use), `<access_id>`
with a rule granted just before. A line either works, or is refused with
the D-Bus error REFUSED names for it and says why; anything else fails."""

from __future__ import annotations

import configparser
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import pytest

from tests.fixtures.btrfs_pool import teardown_tree
from tests.fixtures.sharedd_daemon import Sharedd, call_for_error
from tests.fixtures.storage_host import remove_exports
from tests.support import components
from tests.test_readme_cookbook import readme_commands

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOT = "/org/sharedd/Sharedd1"
SHIPPED_POOL = "/var/lib/sharedd/pools/btrfs"
KEEP = "<id>"

#: lines refused with the shipped configuration, as the README says they are:
#: (a regex over the command, the error name (sharedd's own unless dotted), why)
REFUSED = [
    (r"AllowAccess sssa\{sv\} user ", "NotSupported", "user rules are for CIFS shares"),
    (r"AllowAccess sssa\{sv\} cert ", "NotSupported", "cert rules are for GlusterFS shares"),
    (r" snap-0a1b\.img ", "InvalidArgument", "a volume driver's image; the shipped backend is btrfs"),
    (r"share_network o ", "InvalidArgument",
     "share networks need a backend with driver_handles_share_servers"),
    # dbus-next answers a call to a path no object has with UnknownMethod
    (r"ShareNetwork Delete", "org.freedesktop.DBus.Error.UnknownMethod",
     "no share network was made (see above)"),
    (r"ShareServer Delete", "org.freedesktop.DBus.Error.UnknownMethod",
     "no share server was made (see above)"),
    (r"CreateShareNetwork ", "InvalidArgument",
     "the README's bridge and parent interface are examples this machine lacks"),
    (r"Migrate sa\{sv\} volumes ", "NotFound", "the shipped configuration has one backend"),
    (r"CreateReplica sa\{sv\} btrfs2 ", "NotFound",
     "the shipped configuration has one backend"),
]


def shipped_config(work: str, export_ip: str) -> str:
    """etc/sharedd.conf with its paths under work and an export address."""
    cp = configparser.ConfigParser(inline_comment_prefixes=("#",), interpolation=None)
    cp.read(REPO / "etc" / "sharedd.conf")
    cp["DEFAULT"]["state_path"] = f"{work}/state"
    cp["DEFAULT"]["spool_dir"] = f"{work}/spool"
    cp["btrfs"]["btrfs_pool_path"] = f"{work}/pool"
    cp["btrfs"]["btrfs_pool_image"] = f"{work}/pool.img"
    cp["btrfs"]["share_export_ip"] = export_ip
    path = os.path.join(work, "sharedd.conf")
    with open(path, "w") as f:
        cp.write(f)
    return path


class Reader:
    """Fills the README's placeholders as a reader following it would."""

    def __init__(self, host: Sharedd, pool: str):
        self.host, self.pool = host, pool
        self.made: Dict[str, str] = {}          # kind -> newest object path a line made
        self.count = 0

    def fresh_share(self) -> str:
        self.count += 1
        return self.host.create_share(f"cookbook-{self.count}")

    def share(self) -> str:
        if "share" not in self.made:
            self.made["share"] = self.fresh_share()
        return self.made["share"]

    def snapshot(self) -> str:
        if "snapshot" not in self.made:
            self.made["snapshot"] = self.host.share(self.share(), "CreateSnapshot", "sa{sv}",
                                                    "cookbook-base", 0)
        return self.made["snapshot"]

    def fresh_snapshot(self) -> str:
        self.count += 1
        return self.host.share(self.share(), "CreateSnapshot", "sa{sv}",
                               f"cookbook-{self.count}", 0)

    def path(self, kind: str, releases: bool) -> str:
        if kind == "share":
            return self.fresh_share() if releases else self.share()
        if kind == "snapshot":
            return self.fresh_snapshot() if releases else self.snapshot()
        if kind == "share_group" and releases:       # "once empty"
            self.count += 1
            return self.host.manager("CreateShareGroup", "sa{sv}", f"cookbook-{self.count}", 0)
        # nothing made of this kind yet: an id no object has
        return self.made.get(kind, f"{ROOT}/{kind}/{'0' * 32}")

    def fill(self, argv: List[str], text_paths: Dict[str, str]) -> List[str]:
        releases = any(w in ("Delete", "Unmanage") for w in argv)
        out = []
        for word in argv:
            if word.startswith("$") and word[1:] in text_paths:
                word = text_paths[word[1:]]
            m = re.fullmatch(re.escape(ROOT) + r"/(\w+)/" + re.escape(KEEP), word)
            if m:
                word = self.path(m.group(1), releases)
            elif word == "<access_id>" and "org.sharedd.Sharedd1.Snapshot" in argv:
                word = self.host.call(out[argv.index("org.sharedd.Sharedd1.Snapshot") - 1],
                                      "org.sharedd.Sharedd1.Snapshot", "AllowAccess",
                                      "ssa{sv}", "ip", "192.0.2.99", 0)
            elif word == "<access_id>":
                word = self.host.share(self.share(), "AllowAccess", "sssa{sv}", "ip",
                                       "192.0.2.99", "ro", 0)
            elif word.startswith(SHIPPED_POOL):
                word = self.pool + word[len(SHIPPED_POOL):]
            out.append(word)
        return out

    def prepare(self, argv: List[str]) -> None:
        """What the administrator did before the line, as the README says."""
        if "ManageShare" in argv:
            target = [w for w in argv if w.startswith(self.pool)][0]
            subprocess.run(["btrfs", "subvolume", "create", target], check=True,
                           capture_output=True)
        if "ManageSnapshot" in argv and "snapshots/before-upgrade" in argv:
            share_id = self.share().rsplit("/", 1)[1]
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r",
                            f"{self.pool}/shares/{share_id}",
                            f"{self.pool}/snapshots/before-upgrade"], check=True,
                           capture_output=True)

    def note(self, argv: List[str], stdout: str) -> None:
        """Remember what the line made (busctl prints `o "/org/..."`)."""
        m = re.fullmatch(r'o "(/org/sharedd/Sharedd1/(\w+)/[0-9a-f]{32})"', stdout.strip())
        if m and not any(w in ("Delete", "Unmanage") for w in argv):
            kind = m.group(2)
            if kind == "share" and "share" in self.made:
                return                      # the first share stays the one $P names
            self.made[kind] = m.group(1)


def refusal(argv: List[str]) -> Optional[tuple]:
    line = " ".join(argv)
    for pattern, name, why in REFUSED:
        if re.search(pattern, line):
            return name, why
    return None


def error_of(address: str, argv: List[str]) -> str:
    """The D-Bus error name of a failed call (busctl prints the message only;
    a refused call changed nothing, so asking again is safe)."""
    words = [w for w in argv[1:] if not w.startswith("-")]
    _, _dest, path, iface, member, sig, *args = words
    return call_for_error(address, path, iface, member, sig, args)


@pytest.fixture(scope="module")
def shipped_host(system_bus, netlab, ganesha):
    tmp_root = tempfile.mkdtemp(prefix=f"sharedd-cookbook-{os.getpid()}-")
    os.chmod(tmp_root, 0o755)
    work = os.path.join(tmp_root, "w")
    os.mkdir(work, 0o755)
    host = Sharedd(system_bus, work, shipped_config(work, netlab.server_ip4))
    host.pool_path = os.path.join(work, "pool")
    try:
        host.start()
        components.used("sharedd daemon (the shipped configuration, btrfs + NFS-Ganesha)")
        yield host
    finally:
        try:
            host.stop()
        finally:
            remove_exports(os.path.join(work, "state"), "btrfs")
            teardown_tree(work, [os.path.join(work, "pool.img")])
            shutil.rmtree(tmp_root, ignore_errors=True)


def test_every_cookbook_line_runs_against_the_shipped_configuration(shipped_host, system_bus):
    text = (REPO / "README.md").read_text()
    text_paths = dict(re.findall(r"`([A-Z])=(/org/sharedd/[^`]+)`", text))
    reader = Reader(shipped_host, shipped_host.pool_path)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    problems, ran, refused = [], 0, 0
    for number, argv in readme_commands(placeholders={}):
        argv = reader.fill(argv, text_paths)
        if "monitor" in argv:
            # runs until interrupted: it must start watching, quietly
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
            time.sleep(1)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            if "Failed" in err or "rror" in err:
                problems.append(f"line {number}: {' '.join(argv)}: {err.strip()}")
            continue
        reader.prepare(argv)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        ran += 1
        expected = refusal(argv)
        if proc.returncode == 0:
            reader.note(argv, proc.stdout)
            if expected:
                problems.append(f"line {number}: {' '.join(argv)}: works, though the test "
                                f"expects {expected[0]} ({expected[1]})")
            continue
        error = error_of(system_bus.address, argv) if "call" in argv else proc.stderr.strip()
        name = expected and (expected[0] if "." in expected[0]
                             else f"org.sharedd.Sharedd1.Error.{expected[0]}")
        if expected and error.startswith(f"{name}:"):
            refused += 1
            continue
        problems.append(f"line {number}: {' '.join(argv)}: {error}")
    components.used("busctl (every README cookbook line)")
    assert not problems, "\n".join(problems) + "\n" + shipped_host.log_tail(30)
    assert ran >= 40 and refused <= len(REFUSED) + 3, (ran, refused)
