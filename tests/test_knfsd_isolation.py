"""Share isolation on the kernel NFS server when shares are btrfs subvolumes.

The btrfs driver makes every share a subvolume of one pool file system and
mounts each at its own mount point; the kernel NFS helper exports those mount
points. All subvolumes share one superblock, and a btrfs file handle's
fileid names the subvolume (its root id) as well as the inode. knfsd picks
the export by the handle's fsid part and then asks btrfs for the fileid
part; with ``no_subtree_check`` it accepts whatever dentry comes back
(nfsd_acceptable returns 1 at once). So a client allowed only share A can
send a handle made of A's fsid and the fileid of a file in share B, and
read B. ``subtree_check`` makes nfsd walk from that dentry up to the
export's root, which B's files never reach.

``test_knfsd_isolation_in_guest`` proves both sides in one Debian guest
(qemu, nfs-kernel-server; 10.81.0.0/24 on a bridge in a namespace of our
own): a btrfs pool on a loop file, subvolumes A and B each mounted with
``subvol=``, a secret file in B (owner 1000, mode 0600). A is exported to
10.81.0.21 only, B to 10.81.0.22 only (both addresses of the guest's eth0;
the client binds its source address, so each is a distinct client for
nfsd). A raw NFSv4.0 client (tests/support/nfs4wire.py, AUTH_SYS uid 1000,
privileged source port) then, per phase:

- gets A's root handle and a file of A through A (as .21), the secret's
  handle through B (as .22), and reads both the legitimate way;
- as .21: looks up B's path, and tries B's genuine handle (both refused:
  .21 has no export of B);
- as .21: PUTFH + GETATTR + READ with a forged handle, A's header and fsid
  plus the secret's fileid type and fileid taken from B's handle; the same
  with a fileid built only from what an attacker can guess (inode 257,
  subvolume id, a small generation: no handle of B needed); READDIR of B's
  root directory through a guessed handle.

Phases: ``control`` (the helper's old options, written by hand:
``sync,no_subtree_check,no_root_squash,rw``), ``fsid_only`` (adds
``fsid=<uuid>``) and ``subtree_only`` (``subtree_check`` without fsid),
both report-only, and ``fixed``: the two shares exported through
KernelNfsHelper from the 9p repo share, wired as sharedd.backend does for a
btrfs backend, so the test follows whatever the helper renders. The fixed
phase must refuse every forged and guessed handle and still serve the
legitimate reads; the control phase must show the attack (the forged READ
returns B's secret to the client of A).

Observed (guest kernel 6.1.0-50-amd64, nfs-utils 2.6.2): handles are
version 1, auth 0, fsid type 7 (FSID_UUID16_INUM: the export root's inode
number, 8 bytes, then a 16-byte UUID: mountd's per-subvolume one, or the
``fsid=`` UUID), fileid type 0 and no fileid for an export root, else 0x4d
(btrfs objectid, root id, generation: 20 bytes) or, with ``subtree_check``,
0x4e (plus the parent's objectid and generation: 32 bytes). control and
fsid_only: the forged, the guessed and the directory handle all NFS4_OK
(B's secret read, B's directory listed); subtree_only and fixed: all
NFS4ERR_STALE at PUTFH, and so are the handles issued before the change
(clients holding them must remount).

Also here: host-side unit tests of nfs4wire's XDR, RPC and record marking
against a canned server over a socketpair (no network), and of the
privileged source port in a private network namespace.

The guest script is kept here rather than in tests/guest/: every file there
is part of the guest image's cache key.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Dict, List, Tuple

import pytest

from tests.support import nfs4wire as w

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- nfs4wire against a canned server (host, no network) -------------------------------


def _read_record(sock: socket.socket) -> bytes:
    data = b""
    while True:
        header = _recv_exact(sock, 4)
        (word,) = struct.unpack(">I", header)
        data += _recv_exact(sock, word & 0x7FFFFFFF)
        if word & 0x80000000:
            return data


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _parse_call(data: bytes) -> Tuple[int, Dict[str, object], w.XdrReader]:
    """xid, the call header's fields, and a reader positioned at the args."""
    r = w.XdrReader(data)
    xid = r.u32()
    head: Dict[str, object] = {"mtype": r.u32(), "rpcvers": r.u32(), "prog": r.u32(),
                               "vers": r.u32(), "proc": r.u32(), "flavor": r.u32()}
    cred = w.XdrReader(r.opaque(400))
    head.update(stamp=cred.u32(), machine=cred.string(255), uid=cred.u32(), gid=cred.u32(),
                gids=cred.u32_array(16))
    cred.done()
    head.update(verf_flavor=r.u32(), verf=r.opaque(400))
    return xid, head, r


def _accepted(xid: int, results: bytes) -> bytes:
    return w.XdrWriter().u32(xid).u32(1).u32(0).u32(0).opaque(b"").u32(0).getvalue() + results


def _serve(handler: Callable[[int, Dict[str, object], w.XdrReader], List[bytes]]):
    """A client whose socket is one end of a socketpair; a thread answers one
    call on the other end with the fragments handler returns."""
    mine, theirs = socket.socketpair()
    seen: Dict[str, object] = {}

    def run() -> None:
        try:
            xid, head, args = _parse_call(_read_record(theirs))
            seen.update(head)
            for frag in handler(xid, head, args):
                theirs.sendall(frag)
        except Exception as exc:          # reported through seen
            seen["error"] = repr(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = w.Nfs4Client("unused", uid=1000, gid=1001, gids=(4, 24), machine="box")
    mine.settimeout(10)
    client.sock = mine
    return client, seen, thread


def _fragments(message: bytes, cut: int) -> List[bytes]:
    """message as two record-marking fragments."""
    return [struct.pack(">I", cut) + message[:cut],
            struct.pack(">I", 0x80000000 | (len(message) - cut)) + message[cut:]]


def test_nfs4wire_compound_round_trip():
    fh = bytes(range(1, 29))

    def handler(xid, head, args):
        tag, minor, nops = args.string(), args.u32(), args.u32()
        ops = []
        for _ in range(nops):
            code = args.u32()
            if code == w.OP_LOOKUP:
                ops.append(("LOOKUP", args.string()))
            elif code == w.OP_GETATTR:
                ops.append(("GETATTR", args.u32_array()))
            elif code == w.OP_READ:
                ops.append(("READ", args.u32(), args.fixed(12), args.u64(), args.u32()))
            else:
                ops.append((w.OP_NAMES[code],))
        args.done()
        assert (tag, minor) == ("t1", 0)
        assert ops == [("PUTROOTFH",), ("LOOKUP", "srv"), ("GETFH",),
                       ("GETATTR", [(1 << 1) | (1 << 4) | (1 << 8) | (1 << 20), 1 << 1]),
                       ("READ", 0, b"\0" * 12, 5, 100)]
        attrs = w.XdrWriter().u32(1).u64(11).u64(7).u64(9).u64(257).u32(0o640).getvalue()
        res = (w.XdrWriter().u32(0).string("t1").u32(5)
               .u32(w.OP_PUTROOTFH).u32(0).u32(w.OP_LOOKUP).u32(0)
               .u32(w.OP_GETFH).u32(0).opaque(fh)
               .u32(w.OP_GETATTR).u32(0).u32_array([(1 << 1) | (1 << 4) | (1 << 8) | (1 << 20),
                                                     1 << 1]).opaque(attrs)
               .u32(w.OP_READ).u32(0).boolean(True).opaque(b"hello").getvalue())
        return _fragments(_accepted(xid, res), 13)

    client, seen, thread = _serve(handler)
    with client:
        res = client.compound([w.putrootfh(), w.lookup("srv"), w.getfh(),
                               w.getattr_(["type", "size", "fsid", "fileid", "mode"]),
                               w.read(5, 100)], tag="t1")
    thread.join(10)
    assert "error" not in seen, seen
    assert (seen["prog"], seen["vers"], seen["proc"], seen["rpcvers"]) == (100003, 4, 1, 2)
    assert (seen["flavor"], seen["uid"], seen["gid"], seen["gids"], seen["machine"]) == \
        (w.AUTH_SYS, 1000, 1001, [4, 24], "box")
    assert res.ok and res.failed is None and res.tag == "t1", res.describe()
    assert res.value("GETFH") == fh
    assert res.value("GETATTR") == {"type": "REG", "size": 11, "fsid": (7, 9), "fileid": 257,
                                    "mode": 0o640}
    assert res.value("READ") == (True, b"hello")
    assert res.describe() == ("NFS4_OK [PUTROOTFH:NFS4_OK LOOKUP:NFS4_OK GETFH:NFS4_OK "
                              "GETATTR:NFS4_OK READ:NFS4_OK]")


def test_nfs4wire_stops_at_the_failed_op_and_reads_readdir():
    def handler(xid, head, args):
        res = (w.XdrWriter().u32(70).string("").u32(1).u32(w.OP_PUTFH).u32(70).getvalue())
        return [w.frame(_accepted(xid, res))]

    client, seen, thread = _serve(handler)
    with client:
        res = client.read_fh(b"\x01\x00\x07\x00" + b"x" * 24)
    thread.join(10)
    assert not res.ok and res.status_name == "NFS4ERR_STALE"
    assert res.failed is not None and res.failed.name == "PUTFH"
    assert res.describe() == "NFS4ERR_STALE [PUTFH:NFS4ERR_STALE]"
    with pytest.raises(KeyError):
        res.value("READ")

    def handler2(xid, head, args):
        entry_attrs = w.XdrWriter().u32(2).u64(256).getvalue()
        res = (w.XdrWriter().u32(0).string("").u32(2).u32(w.OP_PUTFH).u32(0)
               .u32(w.OP_READDIR).u32(0).fixed(b"verifier", 8)
               .boolean(True).u64(3).string("secret.txt").u32_array([(1 << 1) | (1 << 20)])
               .opaque(entry_attrs).boolean(False).boolean(True).getvalue())
        return [w.frame(_accepted(xid, res))]

    client, seen, thread = _serve(handler2)
    with client:
        res = client.compound([w.putfh(b"\x01" * 8), w.readdir(["type", "fileid"])])
    thread.join(10)
    verf, entries, eof = res.value("READDIR")
    assert verf == b"verifier" and eof
    assert entries == [w.DirEntry(3, "secret.txt", {"type": "DIR", "fileid": 256})]


def test_nfs4wire_refuses_big_replies_and_rpc_errors():
    def big(xid, head, args):
        return [struct.pack(">I", 0x80000000 | (5 << 20))]

    client, seen, thread = _serve(big)
    with pytest.raises(ConnectionError, match="refused"):
        client.compound([w.putrootfh()])
    thread.join(10)
    assert client.sock is None

    def denied(xid, head, args):     # MSG_DENIED, AUTH_ERROR, AUTH_TOOWEAK
        return [w.frame(w.XdrWriter().u32(xid).u32(1).u32(1).u32(1).u32(5).getvalue())]

    client, seen, thread = _serve(denied)
    with client, pytest.raises(w.RpcError, match="AUTH_TOOWEAK"):
        client.compound([w.putrootfh()])
    thread.join(10)

    def garbage(xid, head, args):    # accepted, GARBAGE_ARGS
        return [w.frame(w.XdrWriter().u32(xid).u32(1).u32(0).u32(0).opaque(b"").u32(4)
                        .getvalue())]

    client, seen, thread = _serve(garbage)
    with client, pytest.raises(w.RpcError, match="GARBAGE_ARGS"):
        client.compound([w.putrootfh()])
    thread.join(10)

    def truncated(xid, head, args):  # a result list that ends early
        return [w.frame(_accepted(xid, w.XdrWriter().u32(0).string("").u32(1)
                                  .u32(w.OP_GETFH).u32(0).u32(64).getvalue()))]

    client, seen, thread = _serve(truncated)
    with client, pytest.raises(w.XdrError):
        client.compound([w.getfh()])
    thread.join(10)
    with pytest.raises(w.XdrError):
        w.putfh(b"x" * 129)            # over NFS4_FHSIZE


def _parse_fattr(args: w.XdrReader) -> Tuple[List[int], bytes]:
    return args.u32_array(), args.opaque()


def test_nfs4wire_setattr_and_create_encoding():
    """SETATTR (anonymous stateid, mode with the setuid bit, owner) and CREATE
    of a block device node, as a canned server sees and answers them."""
    dir_fh, node_fh = b"\x01" * 16, b"\x02" * 20
    calls: List[list] = []

    def handler(xid, head, args):
        tag, minor, nops = args.string(), args.u32(), args.u32()
        ops: list = []
        for _ in range(nops):
            code = args.u32()
            if code == w.OP_PUTFH:
                ops.append(("PUTFH", args.opaque()))
            elif code == w.OP_SETATTR:
                ops.append(("SETATTR", args.u32(), args.fixed(12), _parse_fattr(args)))
            elif code == w.OP_CREATE:
                ftype = args.u32()
                spec = (args.u32(), args.u32()) if ftype in (3, 4) else None
                ops.append(("CREATE", ftype, spec, args.string(), _parse_fattr(args)))
            elif code == w.OP_GETATTR:
                ops.append(("GETATTR", args.u32_array()))
            else:
                ops.append((w.OP_NAMES[code],))
        args.done()
        calls.append(ops)
        if ops[1][0] == "SETATTR":
            attrs = w.XdrWriter().u32(0o4755).string("0").getvalue()
            res = (w.XdrWriter().u32(0).string(tag).u32(3).u32(w.OP_PUTFH).u32(0)
                   .u32(w.OP_SETATTR).u32(0).u32_array([0, 1 << 1 | 1 << 4])
                   .u32(w.OP_GETATTR).u32(0).u32_array([0, 1 << 1 | 1 << 4]).opaque(attrs)
                   .getvalue())
        else:
            attrs = w.XdrWriter().u32(3).u32(0o666).u32(7).u32(0).getvalue()
            res = (w.XdrWriter().u32(0).string(tag).u32(4).u32(w.OP_PUTFH).u32(0)
                   .u32(w.OP_CREATE).u32(0).boolean(True).u64(5).u64(6).u32_array([0, 1 << 1])
                   .u32(w.OP_GETFH).u32(0).opaque(node_fh)
                   .u32(w.OP_GETATTR).u32(0).u32_array([1 << 1, 1 << 1 | 1 << 9])
                   .opaque(attrs).getvalue())
        return [w.frame(_accepted(xid, res))]

    client, seen, thread = _serve(handler)
    with client:
        res = client.compound([w.putfh(node_fh), w.setattr_({"owner": "0", "mode": 0o4755}),
                               w.getattr_(["mode", "owner"])])
    thread.join(10)
    assert "error" not in seen, seen
    # stateid: seqid 0, other all zero; bitmap words [0, bit 33 | bit 36]; values in
    # bit order (mode before owner, whatever the dict's order).
    assert calls[0] == [("PUTFH", node_fh),
                        ("SETATTR", 0, b"\0" * 12,
                         ([0, 1 << 1 | 1 << 4],
                          w.XdrWriter().u32(0o4755).string("0").getvalue())),
                        ("GETATTR", [0, 1 << 1 | 1 << 4])]
    assert res.ok and res.value("SETATTR") == ["mode", "owner"], res.describe()
    assert res.value("GETATTR") == {"mode": 0o4755, "owner": "0"}

    client, seen, thread = _serve(handler)
    with client:
        res = client.compound([w.putfh(dir_fh), w.create("blk", "BLK", {"mode": 0o666},
                                                           rdev=(7, 0)),
                               w.getfh(), w.getattr_(["type", "mode", "rawdev"])])
    thread.join(10)
    assert "error" not in seen, seen
    assert calls[1] == [("PUTFH", dir_fh),
                        ("CREATE", 3, (7, 0), "blk",
                         ([0, 1 << 1], w.XdrWriter().u32(0o666).getvalue())),
                        ("GETFH",), ("GETATTR", [1 << 1, 1 << 1 | 1 << 9])]
    assert res.ok, res.describe()
    assert res.value("CREATE") == ((True, 5, 6), ["mode"])
    assert res.value("GETFH") == node_fh
    assert res.value("GETATTR") == {"type": "BLK", "mode": 0o666, "rawdev": (7, 0)}


def test_nfs4wire_refused_setattr_and_other_create_types():
    def perm(xid, head, args):        # SETATTR4res carries attrsset even when it fails
        res = (w.XdrWriter().u32(1).string("").u32(2).u32(w.OP_PUTFH).u32(0)
               .u32(w.OP_SETATTR).u32(1).u32_array([]).getvalue())
        return [w.frame(_accepted(xid, res))]

    client, seen, thread = _serve(perm)
    with client:
        res = client.compound([w.putfh(b"\x01" * 8), w.setattr_({"owner": "0"}),
                               w.getattr_(["owner"])])
    thread.join(10)
    assert "error" not in seen, seen
    assert res.describe() == "NFS4ERR_PERM [PUTFH:NFS4_OK SETATTR:NFS4ERR_PERM]"
    assert res.failed is not None and res.failed.name == "SETATTR"
    with pytest.raises(KeyError):
        res.value("GETATTR")
    # The other CREATE types: type-specific data, then the name, then fattr4.
    chr_ = w.XdrReader(w.create("null", "CHR", {"mode": 0o600}, rdev=(1, 3)).args)
    assert (chr_.u32(), chr_.u32(), chr_.u32(), chr_.string()) == (4, 1, 3, "null")
    assert _parse_fattr(chr_) == ([0, 1 << 1], w.XdrWriter().u32(0o600).getvalue())
    chr_.done()
    lnk = w.XdrReader(w.create("l", "LNK", linkdata="/etc/shadow").args)
    assert (lnk.u32(), lnk.string(), lnk.string(), lnk.u32_array(), lnk.opaque()) == \
        (5, "/etc/shadow", "l", [], b"")
    lnk.done()
    d = w.XdrReader(w.create("d", "DIR", {"owner_group": "0"}).args)
    assert (d.u32(), d.string(), _parse_fattr(d)) == \
        (2, "d", ([0, 1 << 5], w.XdrWriter().string("0").getvalue()))
    d.done()
    # A regular file is sent as asked (a server must answer NFS4ERR_BADTYPE).
    assert w.XdrReader(w.create("f", "REG").args).u32() == 1
    with pytest.raises(ValueError):
        w.create("x", "PIPE")
    with pytest.raises(ValueError):
        w.setattr_({"size": 0})
    assert w.bitmap_names([1 << 1, 1 << 1 | 1 << 30]) == ["type", "mode", "bit62"]


def test_knfsd_fh_parse_and_forge():
    a_root = bytes([1, 0, 7, 0]) + bytes(range(24))
    b_file = bytes([1, 0, 7, 0x4d]) + bytes(range(100, 124)) + \
        w.btrfs_fileid(257, 257, 9)
    a = w.KnfsdFh.parse(a_root)
    assert (a.fsid_type, a.fileid_type, a.fsid, a.fileid) == (7, 0, bytes(range(24)), b"")
    forged = w.KnfsdFh.parse(w.forge(a_root, b_file))
    assert (forged.fsid, forged.fileid_type) == (a.fsid, 0x4d)
    assert w.parse_btrfs_fileid(forged.fileid) == {"objectid": 257, "root_objectid": 257,
                                                   "gen": 9}
    with_parent = w.btrfs_fileid(257, 258, 9, parent=(256, 8))
    assert w.parse_btrfs_fileid(with_parent)["parent_objectid"] == 256
    assert "FSID_UUID16_INUM" in a.describe()
    with pytest.raises(ValueError):
        w.KnfsdFh.parse(bytes([1, 0, 7, 0]) + b"short")
    with pytest.raises(ValueError):
        w.KnfsdFh.parse(bytes([2, 0, 0, 0]))


PRIVPORT_SCRIPT = r"""
import socket, sys, threading
sys.path.insert(0, sys.argv[1])
from tests.support import nfs4wire as w
srv = socket.socket(); srv.bind(("127.0.0.1", 2049)); srv.listen(1)
peer = {}
def serve():
    conn, addr = srv.accept(); peer["port"] = addr[1]
    data = b""
    while len(data) < 4 or len(data) < 4 + (int.from_bytes(data[:4], "big") & 0x7fffffff):
        data += conn.recv(65536)
    xid = int.from_bytes(data[4:8], "big")
    conn.sendall(w.frame(w.XdrWriter().u32(xid).u32(1).u32(0).u32(0).opaque(b"").u32(0).getvalue()))
    conn.close()
t = threading.Thread(target=serve); t.start()
c = w.Nfs4Client("127.0.0.1", timeout=10)
with c:
    c.null()
t.join()
print(peer["port"], c.local_port)
"""


def test_nfs4wire_binds_a_privileged_port():
    """In a private network namespace (nothing else sees the traffic)."""
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c",
                           'ip link set lo up && exec "$0" -c "$1" "$2"', sys.executable,
                           PRIVPORT_SCRIPT, REPO],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    peer, local = map(int, proc.stdout.split())
    assert peer == local and 600 <= local < 1024


# --- the real thing: knfsd in a qemu guest ------------------------------------------------
SUBNET4, SUBNET6 = "10.81.0.0/24", "fd81::/64"
A_IP, B_IP = "10.81.0.21", "10.81.0.22"
OLD_OPTIONS = "sync,no_subtree_check,no_root_squash"

GUEST_SCRIPT = r'''#!/usr/bin/python3
"""Runs inside the guest: two btrfs subvolume shares on knfsd, attacked with
forged file handles by a raw NFSv4.0 client (see the test module's docstring)."""
import fcntl, json, os, re, signal, struct, subprocess, sys, time, traceback, uuid
sys.path.insert(0, "/mnt/repo")
from tests.support import nfs4wire as w
from tests.support.guestlib import run_main, sh

signal.alarm(400)              # well inside the host's timeout: fail, don't hang
TAG, ID_A, ID_B = "@TAG@", "@ID_A@", "@ID_B@"
A_IP, B_IP = "@A_IP@", "@B_IP@"
OLD = "@OLD@"
UID = GID = 1000
BASE = f"/srv/isol-{TAG}"
IMG, POOL, MOUNTS = f"/var/tmp/isol-{TAG}.img", BASE + "/pool", BASE + "/mounts"
MP_A, MP_B = f"{MOUNTS}/{ID_A}", f"{MOUNTS}/{ID_B}"
SECRET = f"secret of share B {uuid.uuid4().hex}\n".encode()
PUBLIC = b"data of share A\n"
RETRY = {"NFS4ERR_GRACE", "NFS4ERR_DELAY"}
T0 = time.monotonic()


def say(key, value):
    print(f"RESULT {key}=" + json.dumps(value, sort_keys=True), flush=True)


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def uuid_dashed(hex32):
    return str(uuid.UUID(hex32))


def generation(path):
    """The inode's generation (FS_IOC_GETVERSION; btrfs writes an int)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return struct.unpack("<I", fcntl.ioctl(fd, 0x80087601, bytes(8))[:4])[0]
    finally:
        os.close(fd)


def export_fsid(table, path):
    """The fsid= value `exportfs -v` shows for path (None without one)."""
    for line in table.replace("\n\t\t", " ").splitlines():   # long paths wrap
        if line.split()[:1] == [path]:
            found = re.search(r"[(,]fsid=([^,)]+)", line)
            return found.group(1) if found else None
    return None


def names_fsid(fh, value):
    """Whether a handle's fsid part is the export's fsid= option (None: no option)."""
    if value is None:
        return None
    if value.isdigit():                        # FSID_NUM: the number, 4 bytes
        return fh.fsid_type == 1 and int.from_bytes(fh.fsid, "little") == int(value)
    try:
        return uuid.UUID(value).hex in fh.fsid.hex()   # FSID_UUID*: the UUID's bytes
    except ValueError:
        return False


def meta(path):
    return {"ino": os.stat(path).st_ino, "gen": generation(path),
            "root": int(sh("btrfs", "inspect-internal", "rootid", path).stdout)}


# --- the shares: as the btrfs driver makes them -----------------------------------
def setup():
    sh("truncate", "-s", "512M", IMG)
    sh("mkfs.btrfs", "-q", "-f", IMG)
    os.makedirs(POOL)
    os.makedirs(MOUNTS)
    sh("mount", "-t", "btrfs", "-o", "loop", IMG, POOL)
    dev = sh("findmnt", "-n", "-o", "SOURCE", POOL).stdout.strip()
    os.makedirs(POOL + "/shares")
    for sid, mp in ((ID_A, MP_A), (ID_B, MP_B)):
        sh("btrfs", "subvolume", "create", f"{POOL}/shares/{sid}")
        os.makedirs(mp)
        sh("mount", "-t", "btrfs", "-o", f"subvol=shares/{sid}", dev, mp)
    for path, data in ((MP_A + "/public.txt", PUBLIC), (MP_B + "/secret.txt", SECRET)):
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, UID, GID)
        os.chmod(path, 0o600)
    os.sync()
    say("kernel", os.uname().release)
    try:
        with open("/proc/fs/nfsd/versions") as f:
            say("nfsd_versions", f.read().strip())
    except OSError as exc:
        say("nfsd_versions", str(exc))
    table = sh("findmnt", "-n", "-l", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS", check=False).stdout
    say("mounts", [line for line in table.splitlines() if BASE in line])
    m = {"a_root": meta(MP_A), "b_root": meta(MP_B), "b_secret": meta(MP_B + "/secret.txt")}
    say("meta", m)
    return m


# --- the client side --------------------------------------------------------------
def client(ip):
    """A client at one of the guest's addresses: nfsd sees that source."""
    return w.Nfs4Client(ip, source=ip, uid=UID, gid=GID, machine=f"isol-{ip}",
                        timeout=30).connect()


def call(c, ops):
    """A COMPOUND, retried while nfsd is in grace or waits for mountd."""
    deadline = time.monotonic() + 90
    while True:
        res = c.compound(ops, tag="isolation")
        bad = res.failed
        if bad is None or bad.status_name not in RETRY or time.monotonic() > deadline:
            return res
        time.sleep(1)


def lookup_fh(c, path):
    res = call(c, [w.putrootfh()] + [w.lookup(p) for p in path.strip("/").split("/")]
               + [w.getfh()])
    if not res.ok:
        raise RuntimeError(f"lookup {path}: {res.describe()}")
    return res.value("GETFH")


def attempt(c, fh):
    """PUTFH, GETATTR, READ: the statuses, and what came back."""
    res = call(c, [w.putfh(fh), w.getattr_(["type", "fileid", "size", "fsid"]),
                   w.read(0, 4096)])
    out = {"status": res.describe(), "ok": res.ok, "secret": False}
    for r in res.results:
        if r.name == "GETATTR" and r.ok:
            out["attrs"] = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in r.value.items()}
        if r.name == "READ" and r.ok:
            out["data"] = r.value[1].decode(errors="replace")
            out["secret"] = r.value[1] == SECRET
    return out


def listing(c, fh):
    res = call(c, [w.putfh(fh), w.readdir(["type", "fileid"])])
    out = {"status": res.describe(), "ok": res.ok}
    if res.ok:
        out["names"] = sorted(e.name for e in res.value("READDIR")[1])
    return out


def guessed(export_fh, fileid):
    """A handle for export_fh's export whose fileid nobody handed out."""
    head = w.KnfsdFh.parse(export_fh)
    return w.KnfsdFh(head.version, head.auth_type, head.fsid_type, 0x4d, head.fsid,
                     fileid).encode()


def phase(name, m, old=None):
    """Everything a client of A (A_IP) tries against B, with the exports in place."""
    log(f"phase {name}")
    time.sleep(1)           # let mountd see the new etab
    table = sh("exportfs", "-v").stdout
    say(name + "_exportfs", table)
    r = {}
    ca, cb = client(A_IP), client(B_IP)
    try:
        a_root = lookup_fh(ca, MP_A)
        a_file = lookup_fh(ca, MP_A + "/public.txt")
        b_root = lookup_fh(cb, MP_B)
        b_file = lookup_fh(cb, MP_B + "/secret.txt")
        fhs = {"a_root": a_root, "a_file": a_file, "b_root": b_root, "b_secret": b_file}
        r["fh"] = {k: v.hex() for k, v in fhs.items()}
        p = {k: w.KnfsdFh.parse(v) for k, v in fhs.items()}
        r["fh_layout"] = {k: v.describe() for k, v in p.items()}
        fid = w.parse_btrfs_fileid(p["b_secret"].fileid)
        sec, broot = m["b_secret"], m["b_root"]
        r["layout_checks"] = {
            "export_roots_have_no_fileid": p["a_root"].fileid_type == 0 == len(p["a_root"].fileid)
                                           and p["b_root"].fileid == b"",
            "same_export_same_fsid": (p["a_root"].fsid_type, p["a_root"].fsid)
                                     == (p["a_file"].fsid_type, p["a_file"].fsid),
            "exports_differ_in_fsid": p["a_root"].fsid != p["b_root"].fsid,
            "b_fsid_is_b_not_a": p["b_root"].fsid == p["b_secret"].fsid,
            "btrfs_fileid": fid,
            "btrfs_fileid_matches_inode": (fid["objectid"], fid["root_objectid"], fid["gen"])
                                          == (sec["ino"], sec["root"], sec["gen"]),
            "parent_matches_b_root": ("parent_objectid" not in fid)
                                     or (fid["parent_objectid"], fid["parent_gen"])
                                     == (broot["ino"], broot["gen"]),
            # With fsid= (a UUID: FSID_UUID16_INUM, the export root's inode
            # number then the UUID), nfsd names the export by it.
            "a_fsid_is_export_option": names_fsid(p["a_root"], export_fsid(table, MP_A)),
            "b_fsid_is_export_option": names_fsid(p["b_root"], export_fsid(table, MP_B)),
        }
        # The legitimate paths.
        r["legit_a"] = attempt(ca, a_file)
        r["legit_b"] = attempt(cb, b_file)
        # The client of A has no business with B: the honest ways are refused.
        res = call(ca, [w.putrootfh()] + [w.lookup(x) for x in MP_B.strip("/").split("/")])
        r["a_client_lookup_b"] = res.describe()
        r["a_client_genuine_b_handle"] = attempt(ca, b_file)
        # The attacks.
        forged = w.forge(a_root, b_file)
        r["fh"]["forged"] = forged.hex()
        r["forged"] = attempt(ca, forged)
        guess = guessed(a_root, w.btrfs_fileid(sec["ino"], sec["root"], sec["gen"]))
        r["fh"]["guessed"] = guess.hex()
        r["guessed"] = attempt(ca, guess)
        guess_dir = guessed(a_root, w.btrfs_fileid(broot["ino"], broot["root"], broot["gen"]))
        r["fh"]["guessed_dir"] = guess_dir.hex()
        r["guessed_dir"] = listing(ca, guess_dir)
        if old is not None:         # handles from before the options changed
            for key in ("forged", "guessed"):
                r["old_" + key] = attempt(ca, bytes.fromhex(old["fh"][key]))
            r["old_guessed_dir"] = listing(ca, bytes.fromhex(old["fh"]["guessed_dir"]))
            r["old_legit_b"] = attempt(cb, bytes.fromhex(old["fh"]["b_secret"]))
    finally:
        ca.close()
        cb.close()
    say(name, r)
    return r


# --- exports ----------------------------------------------------------------------
def by_hand(options_a, options_b):
    def export():
        sh("exportfs", "-o", options_a, f"{A_IP}:{MP_A}")
        sh("exportfs", "-o", options_b, f"{B_IP}:{MP_B}")

    def unexport():
        sh("exportfs", "-u", f"{A_IP}:{MP_A}", check=False)
        sh("exportfs", "-u", f"{B_IP}:{MP_B}", check=False)
    return export, unexport


def with_helper():
    from sharedd.config import BackendConfig
    from sharedd.drivers import driver_class
    from sharedd.helpers.kernel_nfs import KernelNfsHelper
    from sharedd.models import AccessRule, Share
    cfg = BackendConfig("isol", {"share_export_ip": A_IP, "kernel_nfs_release_timeout": 0,
                                 "kernel_nfs_exports_file": f"/etc/exports.d/isol-{TAG}.exports"})
    h = KernelNfsHelper(cfg, f"/var/lib/sharedd-isol-{TAG}/kernel", command_timeout=60)
    # As sharedd.backend.Backend wires a helper to its driver.
    h.isolate_subtrees = driver_class("btrfs").shares_share_a_file_system
    h.setup()
    shares = [(Share(id=sid, name="s" + sid[:8], backend="isol", protocol="NFS", size_gib=1,
                     status="available"), mp, ip)
              for sid, mp, ip in ((ID_A, MP_A, A_IP), (ID_B, MP_B, B_IP))]

    def export():
        for share, mp, ip in shares:
            h.export(share, mp, [AccessRule(id=uuid.uuid4().hex, share_id=share.id,
                                            access_type="ip", access_to=ip,
                                            access_level="rw", state="active")])
        say("helper_exports_file", open(h.exports_file).read())

    def unexport():
        for share, mp, _ in shares:
            h.unexport(share, mp)
    return export, unexport


def run(name, exports, m, old=None):
    export, unexport = exports
    try:
        export()
        return phase(name, m, old)
    finally:
        unexport()


def main():
    m = setup()
    control = run("control", by_hand(OLD + ",rw", OLD + ",rw"), m)
    run("fsid_only", by_hand(f"{OLD},fsid={uuid_dashed(ID_A)},rw",
                             f"{OLD},fsid={uuid_dashed(ID_B)},rw"), m)
    run("subtree_only", by_hand(OLD.replace("no_subtree_check", "subtree_check") + ",rw",
                                OLD.replace("no_subtree_check", "subtree_check") + ",rw"), m)
    run("fixed", with_helper(), m, old=control)
    log("done")


run_main(main)
'''


def _results(output: str) -> Dict[str, object]:
    return {k: json.loads(v) for k, v in re.findall(r"^RESULT (\w+)=(.*)$", output, re.M)}


def _secret_absent(outcome: dict) -> bool:
    return not outcome.get("secret") and "secret of share B" not in outcome.get("data", "")


def test_knfsd_isolation_in_guest(qemu_guest_image, capsys):
    from tests.fixtures.netlab import make_lab
    from tests.fixtures.qemu_guest import run_in_guest

    tag = uuid.uuid4().hex[:8]
    script = (GUEST_SCRIPT.replace("@TAG@", tag).replace("@ID_A@", uuid.uuid4().hex)
              .replace("@ID_B@", uuid.uuid4().hex).replace("@A_IP@", A_IP)
              .replace("@B_IP@", B_IP).replace("@OLD@", OLD_OPTIONS))
    t0 = time.monotonic()
    with make_lab(SUBNET4, SUBNET6) as lab:
        res = run_in_guest(script, netns=lab.server_ns, bridge="br0",
                           ip_cidr=[f"{A_IP}/24", f"{B_IP}/32"], hostname=f"knfsd-isol-{tag}",
                           image=qemu_guest_image, timeout=600)
    total = time.monotonic() - t0
    r = _results(res.output)
    d = res.describe()
    with capsys.disabled():
        print(f"\n[knfsd isolation] boot {res.boot_seconds} s, cycle {res.seconds:.1f} s, "
              f"total {total:.1f} s, kernel {r.get('kernel')}")
        for name in ("control", "fsid_only", "subtree_only", "fixed"):
            ph = r.get(name)
            if not isinstance(ph, dict):
                continue
            print(f"[knfsd isolation] {name}: handles {json.dumps(ph['fh_layout'])}")
            print(f"[knfsd isolation] {name}: layout {json.dumps(ph['layout_checks'])}")
            for key in ("legit_a", "legit_b", "a_client_lookup_b", "a_client_genuine_b_handle",
                        "forged", "guessed", "guessed_dir", "old_forged", "old_guessed",
                        "old_guessed_dir", "old_legit_b"):
                if key in ph:
                    val = ph[key]
                    if isinstance(val, dict):
                        val = {k: v for k, v in val.items() if k in ("status", "secret", "names")}
                    print(f"[knfsd isolation] {name}: {key} = {json.dumps(val)}")
        for line in str(r.get("helper_exports_file", "")).splitlines():
            if line.startswith("/"):
                print(f"[knfsd isolation] fixed: the helper's export line: {line}")
        control = r.get("control")
        if isinstance(control, dict):
            f = control["forged"]
            verdict = "PROVEN" if f.get("secret") else "REFUTED"
            print(f"[knfsd isolation] control (old options): attack {verdict}: a client of "
                  f"share A read share B's secret through a forged handle: {f['status']}")
    assert res.returncode == 0 and not res.timed_out, d
    control, fixed = r["control"], r["fixed"]
    # The handle layout the forgery relies on, as observed.
    for ph in (control, fixed):
        checks = ph["layout_checks"]
        assert all(checks[k] for k in ("export_roots_have_no_fileid", "same_export_same_fsid",
                                       "exports_differ_in_fsid", "b_fsid_is_b_not_a",
                                       "btrfs_fileid_matches_inode",
                                       "parent_matches_b_root")), (checks, d)
    # The legitimate paths work in both.
    for ph in (control, fixed):
        assert ph["legit_a"]["ok"] and ph["legit_a"].get("data") == "data of share A\n", d
        assert ph["legit_b"]["ok"] and ph["legit_b"]["secret"], d
        # The honest ways from A's client to B are refused.
        assert not ph["a_client_lookup_b"].startswith("NFS4_OK"), d
        assert not ph["a_client_genuine_b_handle"]["ok"], d
        assert _secret_absent(ph["a_client_genuine_b_handle"]), d
    # Control (the old options): the forged handle reads B's secret.
    assert control["forged"]["ok"] and control["forged"]["secret"], d
    assert control["guessed"]["ok"] and control["guessed"]["secret"], d
    assert "secret.txt" in control["guessed_dir"].get("names", []), d
    # Fixed (what the helper renders now): every forged or guessed handle is refused.
    # nfsd names A's and B's exports by the fsid= the helper gave them.
    assert fixed["layout_checks"]["a_fsid_is_export_option"] is True, d
    assert fixed["layout_checks"]["b_fsid_is_export_option"] is True, d
    for key in ("forged", "guessed", "old_forged", "old_guessed"):
        assert not fixed[key]["ok"] and _secret_absent(fixed[key]), (key, d)
    for key in ("guessed_dir", "old_guessed_dir"):
        assert not fixed[key]["ok"] and "names" not in fixed[key], (key, d)


# --- a client's root over kernel NFS: setuid binaries and device nodes ----------------
# A second guest test (issue 12, the kernel NFS half): the guest is the storage
# host (nfsd serving two btrfs subvolume shares, mounted as the btrfs driver
# mounts them: mount(2) with nosuid,nodev,noexec) and, through its own kernel
# NFS client, the client. As uid 0 through `mount -t nfs4` it copies
# /usr/bin/id, chowns it to 0, chmods it 04755 and mknods a block device
# (7,0: /dev/loop0) mode 0666 into each share:
#
# - S1, exported by KernelNfsHelper with the default squash (root_squash): the
#   copy belongs to 65534, the chown is refused (EPERM) and so is the mknod
#   (nfsd drops CAP_MKNOD for a squashed user: EPERM), so nothing setuid-root
#   or device-like exists;
# - S2, exported with no_root_squash: owner 0, mode 04755 and the node exist,
#   yet on the storage host (the share's own mount point) the copy does not
#   run for an unprivileged user (noexec: EACCES; a bind mount of the share
#   with only nosuid,nodev shows nosuid alone keeps the uid 65534) and the
#   node opens neither for nobody nor for root (nodev: EACCES).
#
# A control in /var/tmp (the guest's root file system, none of those flags)
# shows the same payload does print 0 for uid 65534 and the same node opens,
# so the refusals are the share mounts'. The same probes through the client's
# NFS mount are reported too (the client's own mount options decide there).
SUID_SUBNET4, SUID_SUBNET6 = "10.82.0.0/24", "fd82::/64"
SUID_IP = "10.82.0.21"

SUID_SCRIPT = r'''#!/usr/bin/python3
"""Runs inside the guest: root on a kernel NFS client plants a setuid-root
binary and a device node in two btrfs subvolume shares (root_squash and
no_root_squash); what the storage host makes of them (see the test module)."""
import ctypes, errno, json, os, shutil, signal, stat, sys, time, traceback, uuid
sys.path.insert(0, "/mnt/repo")
from tests.support.guestlib import run_main, sh
from sharedd.drivers.btrfs_kernel import MS_NODEV, MS_NOSUID
MS_REMOUNT, MS_BIND = 32, 4096

signal.alarm(400)              # well inside the host's timeout: fail, don't hang
TAG, IP = "@TAG@", "@IP@"
ID1, ID2 = "@ID1@", "@ID2@"
NOBODY = 65534
BASE = f"/srv/suid-{TAG}"
IMG, POOL, MOUNTS = f"/var/tmp/suid-{TAG}.img", BASE + "/pool", BASE + "/mounts"
CLIENT, CONTROL = BASE + "/client", f"/var/tmp/suid-control-{TAG}"
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
OPEN_PROBE = ("import errno, os, sys\n"
              "try:\n"
              "    os.close(os.open(sys.argv[1], os.O_RDONLY))\n"
              "    print('ok')\n"
              "except OSError as e:\n"
              "    print(errno.errorcode.get(e.errno, e.errno))\n")
STRERROR = {os.strerror(n): errno.errorcode[n] for n in errno.errorcode}
T0 = time.monotonic()


def say(key, value):
    print(f"RESULT {key}=" + json.dumps(value, sort_keys=True), flush=True)


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def attempt(fn, *args):
    """'ok', or the errno's name."""
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def file_info(path):
    try:
        st = os.lstat(path)
    except OSError as exc:
        return {"exists": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno))}
    out = {"exists": True, "uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode),
           "perm": oct(stat.S_IMODE(st.st_mode)), "setuid": bool(st.st_mode & stat.S_ISUID),
           "blk": stat.S_ISBLK(st.st_mode), "chr": stat.S_ISCHR(st.st_mode)}
    if out["blk"] or out["chr"]:
        out["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    out["setuid_root"] = out["setuid"] and st.st_uid == 0 and stat.S_ISREG(st.st_mode)
    return out


def exec_as_nobody(path):
    """`setpriv ... PATH -u`: the effective uid the payload runs with, or why not."""
    p = sh(*AS_NOBODY, path, "-u", check=False)
    out = {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()[-200:]}
    if p.returncode:         # setpriv: failed to execute PATH: <strerror>
        out["errno"] = STRERROR.get(p.stderr.strip().rsplit(": ", 1)[-1], "?")
    return out


def open_as_nobody(path):
    return sh(*AS_NOBODY, "/usr/bin/python3", "-c", OPEN_PROBE, path,
              check=False).stdout.strip() or "probe failed"


def open_as_root(path):
    return attempt(lambda p: os.close(os.open(p, os.O_RDONLY)), path)


def mountinfo(path):
    """The mount at path from /proc/self/mountinfo (the last one stacked there)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields, rest = left.split(), right.split()
            if fields[4] == path:
                found = {"mount_options": fields[5].split(","), "fstype": rest[0],
                         "source": rest[1], "super_options": rest[2].split(",")}
    return found


def plant(where):
    """As root, into where: the setuid copy of id and a block device node."""
    payload, node = where + "/id", where + "/blk"
    umask = os.umask(0)          # the node is made 0666, as asked
    try:
        return {"copy": attempt(shutil.copyfile, "/usr/bin/id", payload),
                "chown_0": attempt(os.chown, payload, 0, 0),     # before chmod: chown
                "chmod_4755": attempt(os.chmod, payload, 0o4755),  # clears setuid
                "mknod_blk_7_0": attempt(os.mknod, node, stat.S_IFBLK | 0o666,
                                         os.makedev(7, 0))}
    finally:
        os.umask(umask)


def probe(where, root=True):
    """What becomes of the planted files, seen at where."""
    payload, node = where + "/id", where + "/blk"
    r = {"payload": file_info(payload), "node": file_info(node),
         "read_payload_as_nobody": open_as_nobody(payload),
         "exec_as_nobody": exec_as_nobody(payload)}
    if os.path.lexists(node):
        r["open_node_as_nobody"] = open_as_nobody(node)
        if root:
            r["open_node_as_root"] = open_as_root(node)
    return r


# --- the storage host: the pool and two shares, as the btrfs driver makes them ---
def setup():
    from sharedd.drivers import btrfs_kernel as kernel
    sh("truncate", "-s", "512M", IMG)
    sh("mkfs.btrfs", "-q", "-f", IMG)
    os.makedirs(POOL)
    sh("mount", "-t", "btrfs", "-o", "loop,nosuid,nodev,noexec", IMG, POOL)
    os.chmod(POOL, 0o700)
    dev = sh("findmnt", "-n", "-o", "SOURCE", POOL).stdout.strip()
    say("pool_device", dev)
    os.makedirs(POOL + "/shares", mode=0o700)
    # The driver keeps its mount directory at 0700; here it is traversable, so
    # that an unprivileged user's refusal is the mount's, not a directory's.
    os.makedirs(MOUNTS, mode=0o755)
    os.chmod(BASE, 0o755)
    os.chmod(MOUNTS, 0o755)
    mps = {}
    for name, sid in (("s1", ID1), ("s2", ID2)):
        kernel.create_subvolume(f"{POOL}/shares/{sid}")
        os.chmod(f"{POOL}/shares/{sid}", 0o777)      # as the driver does for NFS shares
        mp = f"{MOUNTS}/{sid}"
        os.makedirs(mp, mode=0o700)
        kernel.mount_subvolume(dev, f"/shares/{sid}", mp)    # flags=SERVED_ONLY
        mps[name] = mp
    say("served_only_flags", kernel.SERVED_ONLY)
    say("kernel", os.uname().release)
    return mps


def export(mps):
    from sharedd.config import BackendConfig
    from sharedd.drivers import driver_class
    from sharedd.helpers.kernel_nfs import KernelNfsHelper
    from sharedd.models import AccessRule, Share
    cfg = BackendConfig("suid", {"share_export_ip": IP, "kernel_nfs_release_timeout": 0,
                                 "kernel_nfs_exports_file": f"/etc/exports.d/suid-{TAG}.exports"})
    h = KernelNfsHelper(cfg, f"/var/lib/sharedd-suid-{TAG}/kernel", command_timeout=60)
    # As sharedd.backend.Backend wires a helper to the btrfs driver (True).
    h.isolate_subtrees = driver_class("btrfs").shares_share_a_file_system
    say("isolate_subtrees", h.isolate_subtrees)
    h.setup()
    shares = {}
    for name, sid, squash in (("s1", ID1, ""), ("s2", ID2, "no_root_squash")):
        share = Share(id=sid, name=name, backend="suid", protocol="NFS", size_gib=1,
                      status="available")
        h.export(share, mps[name], [AccessRule(id=uuid.uuid4().hex, share_id=sid,
                                               access_type="ip", access_to=IP,
                                               access_level="rw", state="active",
                                               squash=squash)])
        shares[name] = share
    with open(h.exports_file) as f:
        say("exports_file", f.read())
    say("exportfs", sh("exportfs", "-v").stdout)
    return h, shares


def nfs_mount(h, share, mp, target):
    hints = h.mount_hints(share, mp)
    os.makedirs(target)
    opts = ",".join(hints["options"] + ["timeo=30", "retrans=1"])
    m = sh("timeout", "90", "mount", "-t", hints["fstype"], "-o", opts, hints["export"],
           target, check=False)
    if m.returncode:
        raise RuntimeError(f"mount {hints['export']}: {m.stderr.strip()}")
    return hints


def control():
    """The same payload and node outside the shares: what they do unhindered."""
    os.makedirs(CONTROL, mode=0o755)
    os.chmod(CONTROL, 0o755)
    r = {"plant": plant(CONTROL)}
    r.update(probe(CONTROL))
    t = sh("findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", "-T", CONTROL).stdout.split()
    r["mount"] = {"target": t[0], "fstype": t[1], "mount_options": t[2].split(",")}
    return r


def nosuid_only(mp):
    """The share bind-mounted with nosuid,nodev but exec allowed: nosuid alone."""
    target = f"{BASE}/nosuid-only"
    os.makedirs(target, mode=0o755)
    sh("mount", "--bind", mp, target)
    try:
        # mount(2) itself: the bind mount's flags become exactly nosuid,nodev.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(None, target.encode(), None,
                      MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None) != 0:
            raise OSError(ctypes.get_errno(), f"remount {target}")
        return {"mount_options": mountinfo(target)["mount_options"],
                "exec_as_nobody": exec_as_nobody(target + "/id")}
    finally:
        sh("umount", target, check=False)


def main():
    mps = setup()
    say("control", control())
    h, shares = export(mps)
    mounted = []
    try:
        for name in ("s1", "s2"):
            mp, target = mps[name], f"{CLIENT}/{name}"
            log(f"{name}: mount -t nfs4 {IP}:{mp}")
            say(name + "_hints", nfs_mount(h, shares[name], mp, target))
            mounted.append(target)
            r = {"client_mount": mountinfo(target)}
            r["plant"] = plant(target)                     # root, through NFS
            os.sync()
            r["server"] = probe(mp)                        # the share's own mount
            r["server"]["mount"] = mountinfo(mp)
            r["server"]["uids_in_share"] = sorted({os.lstat(os.path.join(mp, n)).st_uid
                                                   for n in os.listdir(mp)})
            r["client"] = probe(target, root=False)        # through the NFS mount
            if name == "s2" and r["server"]["payload"].get("setuid_root"):
                r["server"]["nosuid_only"] = nosuid_only(mp)
            say(name, r)
    finally:
        for target in mounted:
            sh("umount", target, check=False)
        for name, share in shares.items():
            h.unexport(share, mps[name])
    log("done")


run_main(main)
'''


def test_knfsd_root_setuid_and_devices_in_guest(qemu_guest_image, capsys):
    from tests.fixtures.netlab import make_lab
    from tests.fixtures.qemu_guest import run_in_guest

    tag = uuid.uuid4().hex[:8]
    id1, id2 = uuid.uuid4().hex, uuid.uuid4().hex
    script = (SUID_SCRIPT.replace("@TAG@", tag).replace("@IP@", SUID_IP)
              .replace("@ID1@", id1).replace("@ID2@", id2))
    t0 = time.monotonic()
    with make_lab(SUID_SUBNET4, SUID_SUBNET6) as lab:
        res = run_in_guest(script, netns=lab.server_ns, bridge="br0",
                           ip_cidr=[f"{SUID_IP}/24"], hostname=f"knfsd-suid-{tag}",
                           image=qemu_guest_image, timeout=600)
    total = time.monotonic() - t0
    r = _results(res.output)
    d = res.describe()

    def brief(probe: dict) -> dict:
        keep = ("uid", "gid", "perm", "setuid", "setuid_root", "blk", "rdev", "exists", "errno")
        out = {k: ({x: y for x, y in v.items() if x in keep} if k in ("payload", "node") else v)
               for k, v in probe.items() if k not in ("mount", "client_mount")}
        if isinstance(out.get("exec_as_nobody"), dict):
            out["exec_as_nobody"] = {k: v for k, v in out["exec_as_nobody"].items()
                                     if k != "err"}
        return out

    with capsys.disabled():
        print(f"\n[knfsd suid] boot {res.boot_seconds} s, cycle {res.seconds:.1f} s, "
              f"total {total:.1f} s, kernel {r.get('kernel')}, pool {r.get('pool_device')}")
        for line in str(r.get("exports_file", "")).splitlines():
            if line.startswith("/"):
                print(f"[knfsd suid] the helper's export line: {line}")
        ctl = r.get("control")
        if isinstance(ctl, dict):
            print(f"[knfsd suid] control ({ctl['mount']['target']}, "
                  f"{','.join(ctl['mount']['mount_options'])}): plant {json.dumps(ctl['plant'])}")
            print(f"[knfsd suid] control: {json.dumps(brief(ctl))}")
        for name in ("s1", "s2"):
            s = r.get(name)
            if not isinstance(s, dict):
                continue
            mount = s["server"].get("mount") or {}
            print(f"[knfsd suid] {name}: server mount {mount.get('mount_options')} "
                  f"super {mount.get('super_options')}")
            print(f"[knfsd suid] {name}: client mount "
                  f"{(s.get('client_mount') or {}).get('mount_options')}")
            print(f"[knfsd suid] {name}: root over NFS: {json.dumps(s['plant'])}")
            print(f"[knfsd suid] {name}: storage host: {json.dumps(brief(s['server']))}")
            print(f"[knfsd suid] {name}: through the NFS mount: {json.dumps(brief(s['client']))}")
    assert res.returncode == 0 and not res.timed_out, d
    ctl, s1, s2 = r["control"], r["s1"], r["s2"]
    assert r["isolate_subtrees"] is True, d

    # The exports as the helper rendered them: default squash on S1, no_root_squash on S2.
    lines = {line.split()[0]: line for line in r["exports_file"].splitlines()
             if line.startswith("/")}
    s1_line = next(v for k, v in lines.items() if k.endswith("/" + id1))
    s2_line = next(v for k, v in lines.items() if k.endswith("/" + id2))
    for line, squash in ((s1_line, "root_squash"), (s2_line, "no_root_squash")):
        opts = re.search(r"\(([^)]*)\)", line).group(1).split(",")
        assert squash in opts and "subtree_check" in opts and "rw" in opts, (line, d)
        assert any(o.startswith("fsid=") for o in opts), (line, d)
        if squash == "root_squash":
            assert "no_root_squash" not in opts, (line, d)

    # The control: the payload is setuid root and runs as root for nobody; the
    # node opens. Whatever the shares refuse below, the shares' mounts refuse.
    assert ctl["plant"] == {"copy": "ok", "chown_0": "ok", "chmod_4755": "ok",
                            "mknod_blk_7_0": "ok"}, d
    assert not {"nosuid", "nodev", "noexec"} & set(ctl["mount"]["mount_options"]), d
    assert ctl["payload"]["setuid_root"] and ctl["payload"]["perm"] == "0o4755", d
    assert ctl["exec_as_nobody"]["rc"] == 0 and ctl["exec_as_nobody"]["out"] == "0", d
    assert ctl["node"]["blk"] and ctl["node"]["rdev"] == [7, 0], d
    assert ctl["open_node_as_nobody"] == "ok", d

    # Both shares' mounts on the storage host: nosuid,nodev,noexec, each its subvolume.
    for sid, s in ((id1, s1), (id2, s2)):
        mount = s["server"]["mount"]
        assert mount and mount["fstype"] == "btrfs", d
        assert {"nosuid", "nodev", "noexec"} <= set(mount["mount_options"]), (mount, d)
        assert f"subvol=/shares/{sid}" in mount["super_options"], (mount, d)
        assert s["plant"]["copy"] == "ok", d
        # The payload is readable by nobody: a refused exec is not a refused path.
        assert s["server"]["read_payload_as_nobody"] == "ok", d

    # S1 (root_squash): root's files are nobody's; no chown to 0, no device node.
    srv = s1["server"]
    assert srv["payload"]["uid"] == srv["payload"]["gid"] == 65534, d
    assert not srv["payload"]["setuid_root"], d
    assert srv["uids_in_share"] == [65534], d
    assert s1["plant"]["chown_0"] == "EPERM", d
    assert s1["plant"]["mknod_blk_7_0"] == "EPERM" or (
        srv["node"]["exists"] and srv["open_node_as_nobody"] != "ok"
        and srv["open_node_as_root"] != "ok"), d
    assert srv["exec_as_nobody"]["out"] != "0", d

    # S2 (no_root_squash): the writes work...
    srv = s2["server"]
    assert s2["plant"] == {"copy": "ok", "chown_0": "ok", "chmod_4755": "ok",
                           "mknod_blk_7_0": "ok"}, d
    assert srv["payload"]["uid"] == 0 and srv["payload"]["setuid_root"], d
    assert srv["payload"]["perm"] == "0o4755", d
    assert srv["node"]["blk"] and srv["node"]["rdev"] == [7, 0], d
    assert srv["node"]["perm"] == "0o666" and srv["node"]["uid"] == 0, d
    # ...yet the storage host neither runs the setuid payload (noexec; and with
    # exec allowed, nosuid keeps nobody's uid) nor opens the node (nodev).
    assert srv["exec_as_nobody"]["rc"] != 0 and srv["exec_as_nobody"]["out"] == "", d
    assert srv["exec_as_nobody"]["errno"] == "EACCES", d
    only = srv["nosuid_only"]
    assert {"nosuid", "nodev"} <= set(only["mount_options"]), d
    assert "noexec" not in only["mount_options"], d
    assert only["exec_as_nobody"]["rc"] == 0 and only["exec_as_nobody"]["out"] == "65534", d
    assert srv["open_node_as_nobody"] == "EACCES", d
    assert srv["open_node_as_root"] == "EACCES", d
