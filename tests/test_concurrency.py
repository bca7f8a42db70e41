"""100 clients at once, each with its own connection, 100 mixed operations
each, against the real daemon on btrfs + NFS-Ganesha: every call answers,
no error but the ones the API promises, and the end state is consistent -
every share has its subvolume, its mount and its export, ganesha's CLIENT
blocks are exactly the share's rules, and nothing is orphaned."""

import asyncio
import os
import random
import re
import tempfile
import time

import pytest
from dbus_next import Message, MessageType

from sharedd.bus.connection import Connection
from sharedd.config import BACKEND_OPTIONS, BackendConfig
from sharedd.helpers.ganesha import GaneshaHelper
from sharedd.hooks import HOOK_OPTIONS
from sharedd.mountinfo import read_mountinfo, top_mounts
from tests.fixtures.storage_host import destroy_storage_host, make_storage_host
from tests.support import components

DEST, ROOT = "org.sharedd.Sharedd1", "/org/sharedd/Sharedd1"
MGR, SHARE, SNAP = (f"{DEST}.Manager", f"{DEST}.Share", f"{DEST}.Snapshot")
CLIENTS = int(os.environ.get("SHAREDD_CONCURRENCY_CLIENTS", "100"))
OPS = int(os.environ.get("SHAREDD_CONCURRENCY_OPS", "100"))


@pytest.fixture(scope="module")
def host(system_bus, netlab, ganesha):
    tmp_root = tempfile.mkdtemp(prefix=f"sharedd-conc-{os.getpid()}-")
    os.chmod(tmp_root, 0o755)
    h = make_storage_host(system_bus, netlab, ganesha, tmp_root)
    with open(h.config_path) as f:
        text = f.read()
    with open(h.config_path, "w") as f:   # up to 300 GiB provisioned on a 4 GiB pool: thin
        f.write(text.replace("btrfs_pool_image_size_gib = 4",
                             "btrfs_pool_image_size_gib = 4\nmax_over_subscription_ratio = 1000"))
    try:
        h.start()
        yield h
    finally:
        destroy_storage_host(h)


async def client(address, n, ops, seed, latencies, unexpected):
    rng = random.Random(seed)
    bus = await Connection(bus_address=address).connect()

    async def call(path, iface, member, sig="", body=(), expect=()):
        started = time.monotonic()
        reply = await bus.call(Message(destination=DEST, path=path, interface=iface,
                                       member=member, signature=sig, body=list(body)))
        latencies.append(time.monotonic() - started)
        if reply.message_type == MessageType.ERROR:
            if reply.error_name.rsplit(".", 1)[-1] not in expect:
                unexpected.append(f"client {n} {member}: {reply.error_name}: {reply.body}")
            return None
        return reply.body

    share = (await call(ROOT, MGR, "CreateShare", "ssta{sv}", [f"conc-{n}", "NFS", 1, {}]))[0]
    rules, size, snaps = {}, 1, []
    for i in range(ops - 1):
        kind = rng.choice(["allow", "allow", "deny", "read", "list", "extend", "snapshot"])
        if kind == "allow":
            ip = f"10.{n}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            got = await call(share, SHARE, "AllowAccess", "sssa{sv}",
                             ["ip", ip, rng.choice(["rw", "ro"]), {}], expect=("AlreadyExists",))
            if got:
                rules[got[0]] = ip
        elif kind == "deny" and rules:
            rid = rng.choice(sorted(rules))
            await call(share, SHARE, "DenyAccess", "sa{sv}", [rid, {}])
            rules.pop(rid)
        elif kind == "read":
            await call(share, "org.freedesktop.DBus.Properties", "GetAll", "s", [SHARE])
        elif kind == "list":
            await call(ROOT, MGR, "ListShares", "a{sv}", [{}])
        elif kind == "extend" and size < 3:
            size += 1
            await call(share, SHARE, "Extend", "ta{sv}", [size, {}])
        elif kind == "snapshot":
            if snaps and rng.random() < 0.5:
                await call(snaps.pop(), SNAP, "Delete", "a{sv}", [{}])
            else:
                got = await call(share, SHARE, "CreateSnapshot", "sa{sv}", [f"s{i}", {}])
                if got:
                    snaps.append(got[0])
    bus.disconnect()
    return share, rules


def ganesha_clients(h, share_id):
    with open(os.path.join(h.state_path, "backends", "btrfs1", "ganesha", f"{share_id}.conf")) as f:
        text = f.read()
    out = set()
    for clients, access in re.findall(r"CLIENT \{ Clients = ([^;]*); Access_Type = (RW|RO);", text):
        out |= {(c.strip(), access.lower()) for c in clients.split(",")}
    return out


def test_many_clients_many_operations(host):
    h = host
    latencies, unexpected = [], []

    async def everyone():
        return await asyncio.gather(*(client(h.bus.address, n, OPS, n, latencies, unexpected)
                                      for n in range(CLIENTS)))
    started = time.monotonic()
    results = asyncio.run(everyone())
    elapsed = time.monotonic() - started
    components.used(f"{CLIENTS} concurrent D-Bus clients x {OPS} operations")
    assert unexpected == [], unexpected[:10]
    latencies.sort()
    print(f"\n{len(latencies)} calls in {elapsed:.1f}s: p50 {latencies[len(latencies) // 2] * 1e3:.0f} ms,"
          f" p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.0f} ms")
    # The end state, share by share, against btrfs, the mount table and ganesha.
    values = {o.name: o.default for o in BACKEND_OPTIONS + GaneshaHelper.OPTIONS + HOOK_OPTIONS}
    helper = GaneshaHelper(BackendConfig("btrfs1", values),
                           os.path.join(h.state_path, "backends", "btrfs1", "ganesha"), 60)
    active = helper._active_ids()
    mounted = set(top_mounts(read_mountinfo()))
    mdir = os.path.join(h.state_path, "backends", "btrfs1", "mounts")
    listed = set(h.manager("ListShares", "a{sv}", 0))
    assert listed == {share for share, _ in results}
    for share, rules in results:
        sid = share.rsplit("/", 1)[1]
        assert h.share_prop(share, "Status") == "available"
        got = h.share_prop(share, "AccessRules")
        assert {r[0]: r[2] for r in got} == rules and {r[4] for r in got} <= {"active"}
        assert os.path.isdir(os.path.join(h.pool_path, "shares", sid))
        assert os.path.join(mdir, sid) in mounted
        assert helper.export_id(share_stub(sid)) in active
        assert ganesha_clients(h, sid) == {(r[2], r[3]) for r in got}
    assert set(os.listdir(os.path.join(h.pool_path, "shares"))) == \
        {s.rsplit("/", 1)[1] for s in listed}, "orphan subvolumes"
    assert set(helper.exported_share_ids()) == {s.rsplit("/", 1)[1] for s in listed}
    # NFS-Ganesha was driven over the daemon's own connection: no busctl per call.
    with open(h.log_path) as f:
        assert "'busctl'" not in f.read()


def share_stub(share_id):
    from sharedd.models import Share
    return Share(id=share_id, name="x", backend="btrfs1", protocol="NFS", size_gib=1,
                 status="available")
