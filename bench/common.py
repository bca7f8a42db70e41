"""What the benchmarks of the btrfs backend share: a storage host (the real daemon,
btrfs pool on a loop image, NFS-Ganesha in a network namespace, a private
system bus), a D-Bus client for timing sharedd's calls, and the same work
done by hand with the raw tools (btrfs, mount, busctl) for the ratio.

The raw side runs the commands sharedd's btrfs driver and ganesha helper
run for the same operation (an administrator's script): subvolume create,
qgroup limit, mount -o subvol=, an export file and busctl AddExport /
UpdateExport / RemoveExport, snapshot, delete --commit-after. Its subvolumes
live under <pool>/raw, its export ids from 60000 up, its pseudo paths under
/raw: nothing it does touches sharedd's shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dbus_next import Message, MessageType  # noqa: E402

from sharedd.bus.connection import Connection  # noqa: E402
from sharedd.drivers import btrfs_kernel  # noqa: E402
from sharedd.mountinfo import mount_at  # noqa: E402
from sharedd.record import file_name  # noqa: E402
from tests.fixtures.btrfs_pool import teardown_tree  # noqa: E402
from tests.fixtures.bus import private_bus  # noqa: E402
from tests.fixtures.ganesha import make_ganesha  # noqa: E402
from tests.fixtures.netlab import make_lab  # noqa: E402
from tests.fixtures.samba import SERVER4, SambaLab  # noqa: E402
from tests.fixtures.storage_host import (destroy_storage_host, make_storage_host,  # noqa: E402
                                         multi_backend_host)

# Daemons run at the shipped log level (info), not the tests' debug.
os.environ.setdefault("SHAREDD_TEST_LOG_LEVEL", "info")

DEST, ROOT = "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1"
MGR, SHARE, SNAP = f"{DEST}.Manager", f"{DEST}.Share", f"{DEST}.Snapshot"
OPS = ("CreateShare", "AllowAccess", "Get(Status)", "Extend", "CreateSnapshot",
       "Snapshot.AllowAccess", "Snapshot.DenyAccess", "Snapshot.Delete", "DenyAccess", "Delete")
GiB = 1 << 30


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


_REFERENCE_WORK = {"shares": [{"id": f"{i:032x}", "size_gib": i, "rules": [
    {"access_to": f"10.0.{i // 250}.{i % 250}", "access_level": "rw"}]} for i in range(200)]}


def machine_speed_ms() -> float:
    """The same pure-Python work each time (20 JSON round trips of 200
    share-like records), in ms of this thread's CPU time, the least of three
    runs. On these VMs the CPU's speed moves by up to 2x from one second to
    the next with the machine idle (no steal time shows), so a bench that
    compares figures taken minutes apart times this beside them: a slow
    stretch shows here too. CPU time, not wall time: waiting for a CPU that
    the kernel's or the daemon's background work holds does not count."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(3):
            t = time.thread_time()
            for _ in range(20):
                json.loads(json.dumps(_REFERENCE_WORK, sort_keys=True))
            best = min(best, time.thread_time() - t)
    finally:
        gc.enable()
    return best * 1e3


def median_ms(values: List[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def set_options(config_path: str, section_lines: Dict[str, str]) -> None:
    """Replace or add `name = value` lines in the backend section."""
    with open(config_path) as f:
        lines = f.read().splitlines()
    out = [ln for ln in lines if ln.split("=", 1)[0].strip() not in section_lines]
    out += [f"{k} = {v}" for k, v in section_lines.items()]
    with open(config_path, "w") as f:
        f.write("\n".join(out) + "\n")


@contextlib.contextmanager
def storage_host(bus, lab, ganesha, image_gib: int = 16, extra: str = "") -> Iterator:
    tmp = tempfile.mkdtemp(prefix="sharedd-bench-")
    os.chmod(tmp, 0o755)
    h = make_storage_host(bus, lab, ganesha, tmp, extra=extra)
    set_options(h.config_path, {"btrfs_pool_image_size_gib": str(image_gib),
                                "max_over_subscription_ratio": "1000"})
    try:
        h.start(timeout=1800)
        yield h
    finally:
        try:
            destroy_storage_host(h)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


CIFS_SECTION = """
[cifs1]
share_driver = btrfs
share_export_ip = {smb_ip}
enabled_share_protocols = CIFS
cifs_helper = samba
btrfs_pool_path = {{work}}/pool2
btrfs_pool_image = {{work}}/pool2.img
btrfs_pool_image_size_gib = 4
btrfs_share_mount_dir = {mounts}
samba_config_file = {smbconf}
samba_command_prefix = {prefix}
hook_drivers = spool, dbus
enable_pre_hooks = true
enable_post_hooks = true
"""


@contextlib.contextmanager
def nfs_and_cifs_host(name: str, subnet: int) -> Iterator[Tuple[object, SambaLab]]:
    """A started storage host with two btrfs backends, hooks on: btrfs1
    (NFS through NFS-Ganesha in the lab 10.<subnet>.0.0/24) and cifs1 (CIFS
    through the smbd of a SambaLab, tests/fixtures/samba.py), on a private
    bus; (host, samba). host.pool_path is btrfs1's pool."""
    samba = SambaLab()
    try:
        cifs_mounts = os.path.join(samba.mounts, "bench")   # where smbd sees them
        section = CIFS_SECTION.format(smb_ip=SERVER4, smbconf=samba.conf, mounts=cifs_mounts,
                                      prefix=", ".join(samba.prefix))
        with private_bus() as bus, make_lab(f"10.{subnet}.0.0/24", f"fd{subnet}::/64") as lab, \
                make_ganesha(lab, bus) as ganesha:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
            with multi_backend_host(bus, lab, ganesha, name, ["btrfs1", "cifs1"], section,
                                    images=("pool.img", "pool2.img")) as h:
                h.pool_path = os.path.join(h.workdir, "pool")
                try:
                    yield h, samba
                finally:
                    h.stop()
                    teardown_tree(cifs_mounts)    # outside the host's work directory
    finally:
        samba.close()


class Client:
    """sharedd's API over one bus connection; every call timed."""

    def __init__(self, address: str):
        self.address = address
        self.bus = None

    async def connect(self) -> "Client":
        self.bus = await Connection(bus_address=self.address).connect()
        return self

    async def call(self, path, iface, member, sig="", body=(), dest=DEST, timeout_ok=False):
        reply = await self.bus.call(Message(destination=dest, path=path, interface=iface,
                                            member=member, signature=sig, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
        return reply.body

    async def round(self, name: str, times: Dict[str, List[float]], n: int) -> None:
        """One of each operation on a new share, which is gone at the end."""
        async def timed(op, *args):
            t = time.perf_counter()
            out = await self.call(*args)
            times[op].append(time.perf_counter() - t)
            return out
        (p,) = await timed("CreateShare", ROOT, MGR, "CreateShare", "ssta{sv}", [name, "NFS", 1, {}])
        client = f"10.99.{n // 250 % 250}.{n % 250 + 1}"
        (rid,) = await timed("AllowAccess", p, SHARE, "AllowAccess", "sssa{sv}",
                             ["ip", client, "rw", {}])
        await timed("Get(Status)", p, "org.freedesktop.DBus.Properties", "Get", "ss", [SHARE, "Status"])
        await timed("Extend", p, SHARE, "Extend", "ta{sv}", [2, {}])
        (sp,) = await timed("CreateSnapshot", p, SHARE, "CreateSnapshot", "sa{sv}", ["snap", {}])
        (srid,) = await timed("Snapshot.AllowAccess", sp, SNAP, "AllowAccess", "ssa{sv}",
                              ["ip", client, {}])
        await timed("Snapshot.DenyAccess", sp, SNAP, "DenyAccess", "sa{sv}", [srid, {}])
        await timed("Snapshot.Delete", sp, SNAP, "Delete", "a{sv}", [{}])
        await timed("DenyAccess", p, SHARE, "DenyAccess", "sa{sv}", [rid, {}])
        await timed("Delete", p, SHARE, "Delete", "a{sv}", [{}])

    async def managed_objects_s(self) -> float:
        """One GetManagedObjects by busctl (sd-bus reads the reply in C; a
        dbus-next client would add its own unmarshalling in Python)."""
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "busctl", "--system", "--quiet", "call", DEST, ROOT, "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects", stdout=asyncio.subprocess.DEVNULL)
        if await proc.wait() != 0:
            raise RuntimeError("busctl GetManagedObjects failed")
        return time.perf_counter() - t

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()


class RecordsByHand:
    """Records written the way the spool hook must (temporary name, fsync,
    rename, fsync of the directory) into a new file each, the least a
    durable notification costs; the oldest beyond keep deleted, as
    retention does."""

    def __init__(self, directory: str, keep: int):
        self.dir = directory
        self.keep = keep
        self.written: List[str] = []
        os.makedirs(directory, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.dir, "." + name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.dir, name))
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.written.append(name)
        if len(self.written) > self.keep:
            os.unlink(os.path.join(self.dir, self.written.pop(0)))


class Raw:
    """The same operations by hand, one process per command."""

    name = "raw"            #: its subvolumes, mounts, files and pseudo paths
    first_export_id = 60000

    def __init__(self, host, work: str, records: bool = False):
        self.pool = host.pool_path
        # With records: each operation also writes a pre and a post record
        # the way the spool hook must (temporary name, fsync, rename, fsync
        # of the directory), the least a durable notification costs.
        self.records = (RecordsByHand(os.path.join(work, f"{self.name}-records"), 200)
                        if records else None)
        self.seq = 0
        self.top = os.path.join(self.pool, self.name)
        self.mounts = os.path.join(work, f"{self.name}-mounts")
        self.confs = os.path.join(work, f"{self.name}-exports")
        for d in (self.mounts, self.confs):
            os.makedirs(d, exist_ok=True)
        if not os.path.isdir(self.top):
            os.mkdir(self.top)
        self.source = mount_at(self.pool).source
        self.next_id = self.first_export_id

    @staticmethod
    def sh(*argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv}: {proc.stderr.strip()}")
        return proc.stdout

    # Each step of a round, by the tools an administrator would use.
    def subvolume_create(self, sub: str) -> None:
        self.sh("btrfs", "subvolume", "create", sub)

    def limit(self, sub: str, nbytes: int) -> None:
        self.sh("btrfs", "qgroup", "limit", str(nbytes), sub)

    def mount(self, rel: str, mp: str, ro: bool = False) -> None:
        self.sh("mount", "-t", "btrfs", "-o", ("ro," if ro else "") + f"subvol={rel}",
                self.source, mp)

    def umount(self, mp: str) -> None:
        self.sh("umount", mp)

    def snapshot(self, sub: str, snap: str) -> None:
        self.sh("btrfs", "subvolume", "snapshot", "-r", sub, snap)

    def delete(self, sub: str) -> None:
        self.sh("btrfs", "subvolume", "delete", "--commit-after", sub)

    def busctl(self, *args: str) -> None:
        self.sh("busctl", "--system", "call", "org.ganesha.nfsd", "/org/ganesha/nfsd/ExportMgr",
                "org.ganesha.nfsd.exportmgr", *args)

    async def ganesha(self, member: str, sig: str, *args) -> None:
        self.busctl(member, sig, *(str(a) for a in args))

    def write_export(self, i: object, export_id: int, mp: str, clients: str = "",
                     level: str = "RW", pseudo: str = "") -> str:
        conf = os.path.join(self.confs, f"{i}.conf")
        pseudo = pseudo or f"/{self.name}/{i}"
        client = (f"    CLIENT {{ Clients = {clients}; Access_Type = {level}; Protocols = 4; }}\n"
                  if clients else "")
        with open(conf + ".tmp", "w") as f:
            f.write(f'EXPORT {{\n    Export_Id = {export_id};\n    Path = "{mp}";\n'
                    f'    Pseudo = "{pseudo}";\n    Protocols = 4;\n    Transports = TCP;\n'
                    f'    SecType = sys;\n    Squash = No_Root_Squash;\n    Access_Type = None;\n'
                    f'    FSAL {{ Name = VFS; }}\n{client}}}\n')
            f.flush()
            os.fsync(f.fileno())
        os.rename(conf + ".tmp", conf)
        return conf

    def record(self, op: str, phase: str) -> None:
        if self.records is None:
            return
        self.seq += 1
        body = json.dumps({"seq": self.seq, "phase": phase, "method": op,
                           "pad": "x" * 1200}).encode()   # a record's usual size
        self.records.write(file_name({"seq": self.seq, "phase": phase, "method": op}), body)

    async def timed(self, times: Dict[Any, List[float]], op: Any, *steps) -> None:
        """One operation's steps (each a function; a coroutine it returns is
        awaited) between its pre and post records, timed into times[op]."""
        t = time.perf_counter()
        method = op if isinstance(op, str) else op[-1]    # (case, operation) keys
        self.record(method, "pre")
        for step in steps:
            out = step()
            if asyncio.iscoroutine(out):
                await out
        self.record(method, "post")
        times[op].append(time.perf_counter() - t)

    async def round(self, i: int, times: Dict[str, List[float]]) -> None:
        sub, snap = os.path.join(self.top, str(i)), os.path.join(self.top, f"{i}.snap")
        rel = f"/{self.name}/{i}"
        mp = os.path.join(self.mounts, str(i))
        eid = self.next_id
        self.next_id += 2
        if self.next_id > self.first_export_id + 5000:
            raise RuntimeError(f"{self.name}: out of export ids (2 a round, 2,500 rounds)")
        sel = f"EXPORT(Export_Id={eid})"

        timed = functools.partial(self.timed, times)
        await timed("CreateShare",
                    lambda: self.subvolume_create(sub),
                    lambda: self.limit(sub, GiB),
                    lambda: os.makedirs(mp),
                    lambda: self.mount(rel, mp),
                    lambda: self.ganesha("AddExport", "ss", self.write_export(i, eid, mp), sel))
        client = f"10.99.{i // 250 % 250}.{i % 250 + 1}"
        await timed("AllowAccess",
                    lambda: self.ganesha("UpdateExport", "ss",
                                         self.write_export(i, eid, mp, client), sel))
        await timed("Extend", lambda: self.limit(sub, 2 * GiB))
        await timed("CreateSnapshot", lambda: self.snapshot(sub, snap))
        # a mountable snapshot: mounted read-only, exported on its own
        smp, seid = os.path.join(self.mounts, f"{i}.snap"), eid + 1
        await timed("Snapshot.AllowAccess",
                    lambda: os.makedirs(smp),
                    lambda: self.mount(f"{rel}.snap", smp, ro=True),
                    lambda: self.ganesha("AddExport", "ss",
                                         self.write_export(f"{i}.snap", seid, smp, client, "RO"),
                                         f"EXPORT(Export_Id={seid})"))
        await timed("Snapshot.DenyAccess",
                    lambda: self.ganesha("RemoveExport", "q", seid),
                    lambda: os.unlink(os.path.join(self.confs, f"{i}.snap.conf")),
                    lambda: self.umount(smp),
                    lambda: os.rmdir(smp))
        await timed("Snapshot.Delete", lambda: self.delete(snap))
        await timed("DenyAccess",
                    lambda: self.ganesha("UpdateExport", "ss", self.write_export(i, eid, mp), sel))
        await timed("Delete",
                    lambda: self.ganesha("RemoveExport", "q", eid),
                    lambda: os.unlink(os.path.join(self.confs, f"{i}.conf")),
                    lambda: self.umount(mp),
                    lambda: os.rmdir(mp),
                    lambda: self.delete(sub))


class Floor(Raw):
    """The same steps with no process at all: the system calls themselves
    (btrfs ioctls, mount(2) with sharedd's nosuid,nodev,noexec, umount2(2):
    sharedd.drivers.btrfs_kernel) and NFS-Ganesha over one open bus
    connection (client: a connected Client, set before a round). What the
    kernel and ganesha alone cost; its growth with the number of shares is
    theirs."""

    name = "floor"
    first_export_id = 55000

    def __init__(self, host, work: str, client: "Client", records: bool = False):
        super().__init__(host, work, records)
        self.client = client

    def subvolume_create(self, sub: str) -> None:
        btrfs_kernel.create_subvolume(sub)

    def limit(self, sub: str, nbytes: int) -> None:
        btrfs_kernel.limit_referenced(sub, nbytes)

    def mount(self, rel: str, mp: str, ro: bool = False) -> None:
        btrfs_kernel.mount_subvolume(self.source, rel, mp, btrfs_kernel.SERVED_ONLY
                                     | (btrfs_kernel.MS_RDONLY if ro else 0))

    def umount(self, mp: str) -> None:
        btrfs_kernel.unmount(mp)

    def snapshot(self, sub: str, snap: str) -> None:
        btrfs_kernel.snapshot(sub, snap, readonly=True)

    def delete(self, sub: str) -> None:
        btrfs_kernel.delete_subvolume(sub, commit=True)

    async def ganesha(self, member: str, sig: str, *args) -> None:
        await self.client.call("/org/ganesha/nfsd/ExportMgr", "org.ganesha.nfsd.exportmgr",
                               member, sig, args, dest="org.ganesha.nfsd")


def table(title: str, columns: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(columns)]
    print(title)
    print("  ".join(c.ljust(w) if k == 0 else c.rjust(w)
                    for k, (c, w) in enumerate(zip(columns, widths))))
    for r in rows:
        print("  ".join(v.ljust(w) if k == 0 else v.rjust(w)
                        for k, (v, w) in enumerate(zip(r, widths))), flush=True)
