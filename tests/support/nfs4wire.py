"""A small NFSv4.0 client speaking the wire protocol directly (stdlib only).

For tests that must send what no kernel client would, e.g. a PUTFH with a
forged file handle. It runs on the host and, from the 9p repo share, inside
the qemu guest (so: no dependencies beyond the standard library).

What it implements, from RFC 5531 (ONC RPC v2), RFC 4506 (XDR) and RFC 7530
(NFSv4.0):

- RPC over TCP with record marking: a request is sent as one fragment; a
  reply may come in several, each behind a 4-byte header (high bit: last
  fragment, low 31 bits: length). Replies are bounded (``max_reply``).
- AUTH_SYS credentials (uid, gid, supplementary gids, machine name) and an
  AUTH_NONE verifier.
- A privileged source port (< 1024, needs root): knfsd refuses requests
  from other ports unless the export says ``insecure``.
- NFSv4.0 COMPOUND (program 100003, version 4, procedure 1) with the
  operations PUTROOTFH, PUTFH, LOOKUP, LOOKUPP, GETFH, GETATTR, ACCESS, READ
  (any stateid; the anonymous all-zero one needs no OPEN), READDIR,
  SETATTR (mode, owner, owner_group; the anonymous stateid: no OPEN needed
  for attributes other than size) and CREATE (every type CREATE makes:
  block and character device nodes with their major/minor numbers, FIFO,
  socket, directory, symbolic link; regular files need OPEN, which this
  client does not implement: create them with another client).

The server stops a COMPOUND at the first operation that fails; the result
lists every operation it ran, the failed one last, each with its status.

At the end, ``KnfsdFh`` splits a Linux knfsd file handle (version 1) into its
header, fsid and fileid parts and puts one together (fs/nfsd/nfsfh.h).

Example::

    with Nfs4Client("10.0.0.1", uid=1000, gid=1000) as c:
        res = c.compound([putrootfh(), lookup("srv"), lookup("x"), getfh(),
                          getattr_(["type", "fileid"])])
        res.status_name                  # "NFS4_OK"
        fh = res.value("GETFH")          # bytes
        c.compound([putfh(fh), read(0, 4096)]).value("READ")   # (eof, data)
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import random
import socket
import struct
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

NFS_PORT = 2049
NFS_PROGRAM = 100003
NFS_V4 = 4
PROC_COMPOUND = 1
NFS4_FHSIZE = 128
RPC_VERSION = 2
AUTH_NONE, AUTH_SYS = 0, 1
MAX_REPLY = 4 * 1024 * 1024
_LAST_FRAGMENT = 0x80000000

# --- NFSv4 status codes (RFC 7530 section 13) ----------------------------------
NFS4_OK = 0
STATUS_NAMES: Dict[int, str] = {
    0: "NFS4_OK", 1: "NFS4ERR_PERM", 2: "NFS4ERR_NOENT", 5: "NFS4ERR_IO",
    6: "NFS4ERR_NXIO", 13: "NFS4ERR_ACCESS", 17: "NFS4ERR_EXIST", 18: "NFS4ERR_XDEV",
    20: "NFS4ERR_NOTDIR", 21: "NFS4ERR_ISDIR", 22: "NFS4ERR_INVAL", 27: "NFS4ERR_FBIG",
    28: "NFS4ERR_NOSPC", 30: "NFS4ERR_ROFS", 31: "NFS4ERR_MLINK",
    63: "NFS4ERR_NAMETOOLONG", 66: "NFS4ERR_NOTEMPTY", 69: "NFS4ERR_DQUOT",
    70: "NFS4ERR_STALE", 10001: "NFS4ERR_BADHANDLE", 10003: "NFS4ERR_BAD_COOKIE",
    10004: "NFS4ERR_NOTSUPP", 10005: "NFS4ERR_TOOSMALL", 10006: "NFS4ERR_SERVERFAULT",
    10007: "NFS4ERR_BADTYPE", 10008: "NFS4ERR_DELAY", 10009: "NFS4ERR_SAME",
    10010: "NFS4ERR_DENIED", 10011: "NFS4ERR_EXPIRED", 10012: "NFS4ERR_LOCKED",
    10013: "NFS4ERR_GRACE", 10014: "NFS4ERR_FHEXPIRED", 10015: "NFS4ERR_SHARE_DENIED",
    10016: "NFS4ERR_WRONGSEC", 10017: "NFS4ERR_CLID_INUSE", 10018: "NFS4ERR_RESOURCE",
    10019: "NFS4ERR_MOVED", 10020: "NFS4ERR_NOFILEHANDLE",
    10021: "NFS4ERR_MINOR_VERS_MISMATCH", 10022: "NFS4ERR_STALE_CLIENTID",
    10023: "NFS4ERR_STALE_STATEID", 10024: "NFS4ERR_OLD_STATEID",
    10025: "NFS4ERR_BAD_STATEID", 10026: "NFS4ERR_BAD_SEQID", 10027: "NFS4ERR_NOT_SAME",
    10028: "NFS4ERR_LOCK_RANGE", 10029: "NFS4ERR_SYMLINK", 10030: "NFS4ERR_RESTOREFH",
    10031: "NFS4ERR_LEASE_MOVED", 10032: "NFS4ERR_ATTRNOTSUPP",
    10033: "NFS4ERR_NO_GRACE", 10034: "NFS4ERR_RECLAIM_BAD",
    10035: "NFS4ERR_RECLAIM_CONFLICT", 10036: "NFS4ERR_BADXDR",
    10037: "NFS4ERR_LOCKS_HELD", 10038: "NFS4ERR_OPENMODE", 10039: "NFS4ERR_BADOWNER",
    10040: "NFS4ERR_BADCHAR", 10041: "NFS4ERR_BADNAME", 10042: "NFS4ERR_BAD_RANGE",
    10043: "NFS4ERR_LOCK_NOTSUPP", 10044: "NFS4ERR_OP_ILLEGAL",
    10045: "NFS4ERR_DEADLOCK", 10046: "NFS4ERR_FILE_OPEN",
    10047: "NFS4ERR_ADMIN_REVOKED", 10048: "NFS4ERR_CB_PATH_DOWN",
}


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, f"NFS4ERR_{status}")


# --- operation numbers (RFC 7530 section 16) ------------------------------------
OP_ACCESS, OP_GETATTR, OP_GETFH, OP_LOOKUP, OP_LOOKUPP = 3, 9, 10, 15, 16
OP_PUTFH, OP_PUTROOTFH, OP_READ, OP_READDIR = 22, 24, 25, 26
OP_CREATE, OP_SETATTR = 6, 34
OP_NAMES = {OP_ACCESS: "ACCESS", OP_GETATTR: "GETATTR", OP_GETFH: "GETFH",
            OP_LOOKUP: "LOOKUP", OP_LOOKUPP: "LOOKUPP", OP_PUTFH: "PUTFH",
            OP_PUTROOTFH: "PUTROOTFH", OP_READ: "READ", OP_READDIR: "READDIR",
            OP_CREATE: "CREATE", OP_SETATTR: "SETATTR", 10044: "ILLEGAL"}

# ACCESS bits (RFC 7530 section 16.1)
ACCESS_READ, ACCESS_LOOKUP, ACCESS_MODIFY = 0x01, 0x02, 0x04
ACCESS_EXTEND, ACCESS_DELETE, ACCESS_EXECUTE = 0x08, 0x10, 0x20

# nfs_ftype4
FILE_TYPES = {1: "REG", 2: "DIR", 3: "BLK", 4: "CHR", 5: "LNK", 6: "SOCK", 7: "FIFO",
              8: "ATTRDIR", 9: "NAMEDATTR"}
FILE_TYPE_CODES = {name: code for code, name in FILE_TYPES.items()}


class XdrError(ValueError):
    """Malformed or truncated XDR data."""


class RpcError(Exception):
    """The RPC layer refused the call (denied, auth error, not accepted)."""


# --- XDR ---------------------------------------------------------------------------
class XdrWriter:
    def __init__(self) -> None:
        self._parts: List[bytes] = []

    def u32(self, value: int) -> "XdrWriter":
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> "XdrWriter":
        self._parts.append(struct.pack(">Q", value))
        return self

    def boolean(self, value: bool) -> "XdrWriter":
        return self.u32(1 if value else 0)

    def fixed(self, data: bytes, size: int) -> "XdrWriter":
        if len(data) != size:
            raise XdrError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self._parts.append(data + b"\0" * (-size % 4))
        return self

    def opaque(self, data: bytes, limit: Optional[int] = None) -> "XdrWriter":
        if limit is not None and len(data) > limit:
            raise XdrError(f"opaque of {len(data)} bytes exceeds its limit {limit}")
        self.u32(len(data))
        self._parts.append(data + b"\0" * (-len(data) % 4))
        return self

    def string(self, text: str, limit: Optional[int] = None) -> "XdrWriter":
        return self.opaque(text.encode("utf-8"), limit)

    def u32_array(self, values: Sequence[int], limit: Optional[int] = None) -> "XdrWriter":
        if limit is not None and len(values) > limit:
            raise XdrError(f"array of {len(values)} exceeds its limit {limit}")
        self.u32(len(values))
        for v in values:
            self.u32(v)
        return self

    def raw(self, data: bytes) -> "XdrWriter":
        if len(data) % 4:
            raise XdrError("raw XDR data must be a multiple of 4 bytes")
        self._parts.append(data)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class XdrReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, size: int) -> bytes:
        if size < 0 or size > self.remaining:
            raise XdrError(f"need {size} bytes at offset {self._pos}, "
                           f"only {self.remaining} left")
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += size
        return chunk

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def boolean(self) -> bool:
        value = self.u32()
        if value > 1:
            raise XdrError(f"bad XDR boolean {value}")
        return value == 1

    def fixed(self, size: int) -> bytes:
        data = self._take(size)
        self._take(-size % 4)
        return data

    def opaque(self, limit: Optional[int] = None) -> bytes:
        size = self.u32()
        if limit is not None and size > limit:
            raise XdrError(f"opaque of {size} bytes exceeds its limit {limit}")
        return self.fixed(size)

    def string(self, limit: Optional[int] = None) -> str:
        return self.opaque(limit).decode("utf-8", errors="replace")

    def u32_array(self, limit: int = 1024) -> List[int]:
        count = self.u32()
        if count > limit or count * 4 > self.remaining:
            raise XdrError(f"array of {count} entries does not fit")
        return [self.u32() for _ in range(count)]

    def done(self) -> None:
        if self.remaining:
            raise XdrError(f"{self.remaining} unexpected trailing bytes")


# --- attributes (RFC 7530 section 5) --------------------------------------------
# name -> (bit number, decoder); only attributes this module can decode.
def _dec_fsid(r: XdrReader) -> Tuple[int, int]:
    return (r.u64(), r.u64())


ATTRS: Dict[str, Tuple[int, Any]] = {
    "supported_attrs": (0, lambda r: r.u32_array(64)),
    "type": (1, lambda r: FILE_TYPES.get(r.u32(), "?")),
    "change": (3, XdrReader.u64),
    "size": (4, XdrReader.u64),
    "fsid": (8, _dec_fsid),
    "filehandle": (19, lambda r: r.opaque(NFS4_FHSIZE)),
    "fileid": (20, XdrReader.u64),
    "mode": (33, XdrReader.u32),
    "numlinks": (35, XdrReader.u32),
    "owner": (36, lambda r: r.string(1024)),
    "owner_group": (37, lambda r: r.string(1024)),
    "rawdev": (41, lambda r: (r.u32(), r.u32())),        # specdata4: (major, minor)
    "mounted_on_fileid": (55, XdrReader.u64),
}
_ATTR_BY_BIT = {bit: (name, dec) for name, (bit, dec) in ATTRS.items()}

# name -> encoder: the attributes this module can set (SETATTR, CREATE).
ATTR_ENCODERS: Dict[str, Callable[[XdrWriter, Any], Any]] = {
    "mode": lambda w, v: w.u32(int(v)),          # mode4: sent as given (0o4755: setuid)
    "owner": lambda w, v: w.string(str(v), 1024),
    "owner_group": lambda w, v: w.string(str(v), 1024),
}


def attr_bitmap(names: Iterable[str]) -> List[int]:
    """The bitmap4 words that request these attributes."""
    bits = []
    for name in names:
        if name not in ATTRS:
            raise ValueError(f"unknown attribute {name!r}; known: {sorted(ATTRS)}")
        bits.append(ATTRS[name][0])
    words = [0] * (max(bits) // 32 + 1 if bits else 0)
    for bit in bits:
        words[bit // 32] |= 1 << (bit % 32)
    return words


def bitmap_bits(words: Sequence[int]) -> List[int]:
    return [i * 32 + b for i, w in enumerate(words) for b in range(32) if w >> b & 1]


def encode_fattr(values: Dict[str, Any]) -> bytes:
    """fattr4 for these attribute values (bitmap, then the values in bit order)."""
    for name in values:
        if name not in ATTR_ENCODERS:
            raise ValueError(f"cannot encode attribute {name!r}; known: {sorted(ATTR_ENCODERS)}")
    vals = XdrWriter()
    for name in sorted(values, key=lambda n: ATTRS[n][0]):
        ATTR_ENCODERS[name](vals, values[name])
    return XdrWriter().u32_array(attr_bitmap(values)).opaque(vals.getvalue()).getvalue()


def bitmap_names(words: Sequence[int]) -> List[str]:
    """The names of the attributes a bitmap4 lists (unknown bits as 'bit<N>')."""
    return [_ATTR_BY_BIT[b][0] if b in _ATTR_BY_BIT else f"bit{b}" for b in bitmap_bits(words)]


def decode_fattr(r: XdrReader) -> Dict[str, Any]:
    """fattr4: the attribute values, in bit order, by name."""
    words = r.u32_array(64)
    vals = XdrReader(r.opaque(MAX_REPLY))
    out: Dict[str, Any] = {}
    for bit in bitmap_bits(words):
        if bit not in _ATTR_BY_BIT:
            raise XdrError(f"server returned attribute bit {bit}, which this client "
                           "did not request and cannot decode")
        name, dec = _ATTR_BY_BIT[bit]
        out[name] = dec(vals)
    vals.done()
    return out


# --- operations --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Op:
    code: int
    args: bytes = b""

    @property
    def name(self) -> str:
        return OP_NAMES.get(self.code, str(self.code))


ANON_STATEID = (0, b"\0" * 12)        # seqid 0, other all zero: READ without OPEN


def putrootfh() -> Op:
    return Op(OP_PUTROOTFH)


def putfh(fh: bytes) -> Op:
    """PUTFH with arbitrary bytes (up to NFS4_FHSIZE: the protocol's limit)."""
    return Op(OP_PUTFH, XdrWriter().opaque(bytes(fh), NFS4_FHSIZE).getvalue())


def lookup(name: str) -> Op:
    return Op(OP_LOOKUP, XdrWriter().string(name).getvalue())


def lookupp() -> Op:
    return Op(OP_LOOKUPP)


def getfh() -> Op:
    return Op(OP_GETFH)


def getattr_(names: Iterable[str]) -> Op:
    return Op(OP_GETATTR, XdrWriter().u32_array(attr_bitmap(names)).getvalue())


def access(mask: int) -> Op:
    return Op(OP_ACCESS, XdrWriter().u32(mask).getvalue())


def read(offset: int, count: int, stateid: Tuple[int, bytes] = ANON_STATEID) -> Op:
    seqid, other = stateid
    w = XdrWriter().u32(seqid).fixed(other, 12).u64(offset).u32(count)
    return Op(OP_READ, w.getvalue())


def readdir(attrs: Iterable[str] = ("type", "fileid"), cookie: int = 0,
            cookieverf: bytes = b"\0" * 8, dircount: int = 8192,
            maxcount: int = 32768) -> Op:
    w = XdrWriter().u64(cookie).fixed(cookieverf, 8).u32(dircount).u32(maxcount)
    w.u32_array(attr_bitmap(attrs))
    return Op(OP_READDIR, w.getvalue())


def setattr_(values: Dict[str, Any], stateid: Tuple[int, bytes] = ANON_STATEID) -> Op:
    """SETATTR of the current file handle, e.g. {"mode": 0o4755} or {"owner": "0"}."""
    seqid, other = stateid
    w = XdrWriter().u32(seqid).fixed(other, 12).raw(encode_fattr(values))
    return Op(OP_SETATTR, w.getvalue())


def create(name: str, ftype: str, attrs: Optional[Dict[str, Any]] = None, *,
           rdev: Tuple[int, int] = (0, 0), linkdata: str = "") -> Op:
    """CREATE name in the current directory (then the current file handle is
    the new object). ftype: "BLK" or "CHR" (rdev: (major, minor)), "LNK"
    (linkdata: the target), "DIR", "FIFO" or "SOCK". Anything else (a
    regular file needs OPEN) is sent as asked: the server must refuse it
    (NFS4ERR_BADTYPE)."""
    code = FILE_TYPE_CODES.get(ftype)
    if code is None:
        raise ValueError(f"unknown file type {ftype!r}; known: {sorted(FILE_TYPE_CODES)}")
    w = XdrWriter().u32(code)
    if ftype in ("BLK", "CHR"):
        w.u32(rdev[0]).u32(rdev[1])
    elif ftype == "LNK":
        w.string(linkdata, 4096)
    w.string(name, 1024).raw(encode_fattr(attrs or {}))
    return Op(OP_CREATE, w.getvalue())


@dataclasses.dataclass(frozen=True)
class DirEntry:
    cookie: int
    name: str
    attrs: Dict[str, Any]


def _dec_readdir(r: XdrReader) -> Tuple[bytes, List[DirEntry], bool]:
    verf = r.fixed(8)
    entries: List[DirEntry] = []
    while r.boolean():
        if len(entries) >= 100000:
            raise XdrError("too many directory entries")
        cookie = r.u64()
        name = r.string(1024)
        entries.append(DirEntry(cookie, name, decode_fattr(r)))
    return verf, entries, r.boolean()


# Bodies of successful results; every other op's OK result is empty.
_RESULT_DECODERS: Dict[int, Callable[[XdrReader], Any]] = {
    OP_GETFH: lambda r: r.opaque(NFS4_FHSIZE),
    OP_GETATTR: decode_fattr,
    OP_ACCESS: lambda r: (r.u32(), r.u32()),                  # (supported, access)
    OP_READ: lambda r: (r.boolean(), r.opaque(MAX_REPLY)),     # (eof, data)
    OP_READDIR: _dec_readdir,                                  # (verf, entries, eof)
    OP_SETATTR: lambda r: bitmap_names(r.u32_array(64)),      # the attributes set
    # ((atomic, change before, change after), the attributes set)
    OP_CREATE: lambda r: ((r.boolean(), r.u64(), r.u64()), bitmap_names(r.u32_array(64))),
}


@dataclasses.dataclass(frozen=True)
class OpResult:
    code: int
    status: int
    value: Any = None

    @property
    def name(self) -> str:
        return OP_NAMES.get(self.code, str(self.code))

    @property
    def status_name(self) -> str:
        return status_name(self.status)

    @property
    def ok(self) -> bool:
        return self.status == NFS4_OK


@dataclasses.dataclass(frozen=True)
class CompoundResult:
    status: int
    tag: str
    results: Tuple[OpResult, ...]
    sent: Tuple[str, ...]          # names of the operations sent

    @property
    def ok(self) -> bool:
        return self.status == NFS4_OK

    @property
    def status_name(self) -> str:
        return status_name(self.status)

    @property
    def failed(self) -> Optional[OpResult]:
        """The operation that stopped the COMPOUND (None when all succeeded)."""
        return next((res for res in self.results if not res.ok), None)

    def value(self, op_name: str, index: int = -1) -> Any:
        """The result value of the op_name operation (the last one by default)."""
        found = [res for res in self.results if res.name == op_name]
        if not found:
            raise KeyError(f"{op_name} did not run: {self.describe()}")
        res = found[index]
        if not res.ok:
            raise KeyError(f"{op_name} failed with {res.status_name}")
        return res.value

    def describe(self) -> str:
        """E.g. 'NFS4ERR_STALE [PUTFH:NFS4ERR_STALE]'; ops not run are not listed."""
        return f"{self.status_name} [" + " ".join(
            f"{res.name}:{res.status_name}" for res in self.results) + "]"


def encode_compound(ops: Sequence[Op], tag: str = "", minorversion: int = 0) -> bytes:
    w = XdrWriter().string(tag, 1024).u32(minorversion).u32(len(ops))
    for op in ops:
        w.u32(op.code).raw(op.args)
    return w.getvalue()


def decode_compound(data: bytes, ops: Sequence[Op]) -> CompoundResult:
    r = XdrReader(data)
    status = r.u32()
    tag = r.string(1024)
    count = r.u32()
    if count > len(ops):
        raise XdrError(f"{count} results for {len(ops)} operations")
    results: List[OpResult] = []
    for i in range(count):
        code = r.u32()
        if code != ops[i].code and code != 10044:       # OP_ILLEGAL answers bad op codes
            raise XdrError(f"result {i} is for op {code}, expected {ops[i].code}")
        op_status = r.u32()
        value = None
        if op_status == NFS4_OK and code in _RESULT_DECODERS:
            value = _RESULT_DECODERS[code](r)
        results.append(OpResult(code, op_status, value))
        if op_status != NFS4_OK:
            break           # the server stops here; a failed result may carry a body
    else:
        r.done()
    return CompoundResult(status, tag, tuple(results), tuple(op.name for op in ops))


# --- RPC -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AuthSys:
    uid: int = 0
    gid: int = 0
    gids: Tuple[int, ...] = ()
    machine: str = "nfs4wire"
    stamp: int = 0

    def encode(self) -> bytes:
        body = XdrWriter().u32(self.stamp).string(self.machine, 255).u32(self.uid) \
            .u32(self.gid).u32_array(list(self.gids), 16).getvalue()
        if len(body) > 400:
            raise XdrError("AUTH_SYS credential over 400 bytes")
        return XdrWriter().u32(AUTH_SYS).opaque(body).getvalue()


ACCEPT_STAT = {1: "PROG_UNAVAIL", 2: "PROG_MISMATCH", 3: "PROC_UNAVAIL",
               4: "GARBAGE_ARGS", 5: "SYSTEM_ERR"}
AUTH_STAT = {1: "AUTH_BADCRED", 2: "AUTH_REJECTEDCRED", 3: "AUTH_BADVERF",
             4: "AUTH_REJECTEDVERF", 5: "AUTH_TOOWEAK", 6: "AUTH_INVALIDRESP",
             7: "AUTH_FAILED"}


def encode_call(xid: int, prog: int, vers: int, proc: int, cred: bytes, body: bytes) -> bytes:
    w = XdrWriter().u32(xid).u32(0).u32(RPC_VERSION).u32(prog).u32(vers).u32(proc)
    w.raw(cred).u32(AUTH_NONE).opaque(b"")             # verifier: AUTH_NONE
    return w.getvalue() + body


def decode_reply(data: bytes, xid: int) -> bytes:
    """The procedure's results from an RPC reply; RpcError unless accepted."""
    r = XdrReader(data)
    got_xid, mtype = r.u32(), r.u32()
    if got_xid != xid:
        raise RpcError(f"reply xid {got_xid:#x} does not match call xid {xid:#x}")
    if mtype != 1:
        raise RpcError(f"message type {mtype} is not a REPLY")
    if r.u32() == 1:                        # MSG_DENIED
        reject = r.u32()
        if reject == 0:
            raise RpcError(f"RPC_MISMATCH (server speaks {r.u32()}..{r.u32()})")
        code = r.u32()
        raise RpcError(f"AUTH_ERROR {AUTH_STAT.get(code, code)}")
    r.u32()                                 # verifier flavor
    r.opaque(400)                           # verifier body
    stat = r.u32()
    if stat != 0:
        raise RpcError(f"call not accepted: {ACCEPT_STAT.get(stat, stat)}")
    return data[len(data) - r.remaining:]


def frame(message: bytes) -> bytes:
    """One record of one (last) fragment."""
    if len(message) >= _LAST_FRAGMENT:
        raise XdrError("message too large for one fragment")
    return struct.pack(">I", _LAST_FRAGMENT | len(message)) + message


class Nfs4Client:
    """One TCP connection to an NFSv4 server; one call at a time.

    ``source``: the local address to send from (default: chosen by the
    routing table). ``privileged``: bind a source port below 1024 (needs
    root or CAP_NET_BIND_SERVICE). ``max_reply``: replies larger than this
    are refused (ConnectionError) before being read."""

    def __init__(self, host: str, port: int = NFS_PORT, *, uid: int = 0, gid: int = 0,
                 gids: Sequence[int] = (), machine: str = "nfs4wire",
                 source: Optional[str] = None, privileged: bool = True,
                 timeout: float = 15.0, max_reply: int = MAX_REPLY) -> None:
        self.host, self.port = host, port
        self.auth = AuthSys(uid, gid, tuple(gids), machine)
        self.source, self.privileged = source, privileged
        self.timeout, self.max_reply = timeout, max_reply
        self._xids = itertools.count(random.randrange(1, 1 << 31))
        self.sock: Optional[socket.socket] = None
        self.local_port: Optional[int] = None

    # --- connection --------------------------------------------------------------
    def connect(self) -> "Nfs4Client":
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        family, addr = info[0], info[4]
        ports: List[Optional[int]] = [None]
        if self.privileged:
            ports = random.sample(range(600, 1024), 424)
        last: Optional[OSError] = None
        for port in ports[:64]:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                if port is not None or self.source is not None:
                    sock.bind((self.source or "", port or 0))
                sock.connect(addr)
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) and port is not None:
                    continue            # that port is taken (or its 4-tuple lingers)
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            self.local_port = sock.getsockname()[1]
            return self
        raise ConnectionError(f"no free privileged port: {last}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Nfs4Client":
        return self.connect() if self.sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, size: int) -> bytes:
        assert self.sock is not None
        chunks, got = [], 0
        while got < size:
            chunk = self.sock.recv(min(size - got, 1 << 16))
            if not chunk:
                raise ConnectionError(f"server closed the connection "
                                      f"({got} of {size} bytes read)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _recv_record(self) -> bytes:
        parts, total = [], 0
        while True:
            (header,) = struct.unpack(">I", self._recv_exact(4))
            size = header & ~_LAST_FRAGMENT
            total += size
            if total > self.max_reply:
                self.close()        # the stream is unusable past a skipped reply
                raise ConnectionError(f"reply of more than {self.max_reply} bytes refused")
            parts.append(self._recv_exact(size))
            if header & _LAST_FRAGMENT:
                return b"".join(parts)

    def call(self, prog: int, vers: int, proc: int, body: bytes) -> bytes:
        """One RPC call; returns the procedure's result bytes."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        xid = next(self._xids) & 0xFFFFFFFF
        self.sock.sendall(frame(encode_call(xid, prog, vers, proc, self.auth.encode(), body)))
        return decode_reply(self._recv_record(), xid)

    def null(self) -> None:
        """The NULL procedure (a ping); RpcError/OSError if the server refuses."""
        self.call(NFS_PROGRAM, NFS_V4, 0, b"")

    def compound(self, ops: Sequence[Op], tag: str = "", minorversion: int = 0) -> CompoundResult:
        data = self.call(NFS_PROGRAM, NFS_V4, PROC_COMPOUND,
                         encode_compound(ops, tag, minorversion))
        return decode_compound(data, ops)

    # --- conveniences ---------------------------------------------------------------
    def lookup_path(self, path: str, attrs: Sequence[str] = ("type", "fileid")) -> CompoundResult:
        """PUTROOTFH, LOOKUP per component, GETFH, GETATTR."""
        ops = [putrootfh()] + [lookup(p) for p in path.strip("/").split("/") if p]
        return self.compound(ops + [getfh(), getattr_(attrs)])

    def read_fh(self, fh: bytes, count: int = 65536,
                attrs: Sequence[str] = ("type", "fileid", "size")) -> CompoundResult:
        """PUTFH fh, GETATTR, READ from offset 0 with the anonymous stateid."""
        return self.compound([putfh(fh), getattr_(attrs), read(0, count)])


# --- Linux knfsd file handles (fs/nfsd/nfsfh.h) ----------------------------------------
# fsid type -> length of the fsid part in bytes (key_len()).
KNFSD_FSID_LEN = {0: 8, 1: 4, 2: 12, 3: 8, 4: 8, 5: 8, 6: 16, 7: 24}
KNFSD_FSID_TYPES = {0: "FSID_DEV", 1: "FSID_NUM", 2: "FSID_MAJOR_MINOR",
                    3: "FSID_ENCODE_DEV", 4: "FSID_UUID4_INUM", 5: "FSID_UUID8",
                    6: "FSID_UUID16", 7: "FSID_UUID16_INUM"}


@dataclasses.dataclass(frozen=True)
class KnfsdFh:
    """A version-1 knfsd file handle: 4 header bytes (version, auth type,
    fsid type, fileid type), the fsid (length by fsid type: which export),
    then the fileid (the file system's own encoding: which file)."""
    version: int
    auth_type: int
    fsid_type: int
    fileid_type: int
    fsid: bytes
    fileid: bytes

    @classmethod
    def parse(cls, fh: bytes) -> "KnfsdFh":
        if len(fh) < 4 or fh[0] != 1:
            raise ValueError(f"not a version 1 knfsd file handle: {fh.hex()}")
        if fh[2] not in KNFSD_FSID_LEN:
            raise ValueError(f"unknown fsid type {fh[2]} in {fh.hex()}")
        end = 4 + KNFSD_FSID_LEN[fh[2]]
        if len(fh) < end:
            raise ValueError(f"file handle shorter than its fsid: {fh.hex()}")
        return cls(fh[0], fh[1], fh[2], fh[3], bytes(fh[4:end]), bytes(fh[end:]))

    def encode(self) -> bytes:
        return bytes([self.version, self.auth_type, self.fsid_type,
                      self.fileid_type]) + self.fsid + self.fileid

    def describe(self) -> str:
        return (f"v{self.version} auth={self.auth_type} "
                f"fsid_type={self.fsid_type}({KNFSD_FSID_TYPES.get(self.fsid_type, '?')}) "
                f"fileid_type={self.fileid_type:#x} fsid={self.fsid.hex()} "
                f"fileid={self.fileid.hex()}")


def forge(export_fh: bytes, file_fh: bytes) -> bytes:
    """The export part (header and fsid) of export_fh with the file part
    (fileid type and fileid) of file_fh."""
    exp, fil = KnfsdFh.parse(export_fh), KnfsdFh.parse(file_fh)
    return dataclasses.replace(exp, fileid_type=fil.fileid_type, fileid=fil.fileid).encode()


# btrfs's fileid (fs/btrfs/export.h, struct btrfs_fid, packed, little endian).
BTRFS_FILEID_TYPES = {0x4d: "FILEID_BTRFS_WITHOUT_PARENT", 0x4e: "FILEID_BTRFS_WITH_PARENT",
                      0x4f: "FILEID_BTRFS_WITH_PARENT_ROOT"}


def btrfs_fileid(objectid: int, root_objectid: int, gen: int,
                 parent: Optional[Tuple[int, int]] = None,
                 parent_root: Optional[int] = None) -> bytes:
    """A btrfs fileid: objectid u64, root u64, generation u32 [, parent
    objectid u64, parent generation u32 [, parent root u64]]."""
    data = struct.pack("<QQI", objectid, root_objectid, gen)
    if parent is not None:
        data += struct.pack("<QI", *parent)
        if parent_root is not None:
            data += struct.pack("<Q", parent_root)
    return data


def parse_btrfs_fileid(fileid: bytes) -> Dict[str, int]:
    names = ["objectid", "root_objectid", "gen", "parent_objectid", "parent_gen",
             "parent_root_objectid"]
    fmts = {20: "<QQI", 32: "<QQIQI", 40: "<QQIQIQ"}
    if len(fileid) not in fmts:
        raise ValueError(f"not a btrfs fileid ({len(fileid)} bytes): {fileid.hex()}")
    return dict(zip(names, struct.unpack(fmts[len(fileid)], fileid)))
