"""D-Bus messages marshalled fast, for both daemons' connections.

dbus-next 0.2.3 marshals through a generic walk of the signature tree and
checks every value twice (in Variant and again in its Marshaller): about
0.4 ms for a two-string method call and more for a PropertiesChanged, all
of it on the event loop. Here a writer is compiled once per signature and
appends the same bytes (tests/test_bus_wire.py compares them with the
library's for random values, at every alignment). A value a writer cannot
write raises; `marshal` then returns None and the caller uses the
library's marshalling, which reports what is wrong with it.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from dbus_next._private.constants import LITTLE_ENDIAN, PROTOCOL_VERSION, HeaderField
from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import SignatureTree, SignatureType

Writer = Callable[[bytearray, Any], None]
_FIXED = {"y": ("<B", 1), "n": ("<h", 2), "q": ("<H", 2), "i": ("<i", 4), "u": ("<I", 4),
          "h": ("<I", 4), "x": ("<q", 8), "t": ("<Q", 8), "d": ("<d", 8)}
_ALIGN = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "h": 4, "x": 8, "t": 8, "d": 8,
          "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1}
_writers: Dict[str, Writer] = {}


def pad(buf: bytearray, n: int) -> None:
    r = -len(buf) % n
    if r:
        buf.extend(bytes(r))


def write_signature(buf: bytearray, sig: str) -> None:
    raw = sig.encode("ascii")
    buf.append(len(raw))
    buf.extend(raw)
    buf.append(0)


def writer(signature: str) -> Writer:
    """The writer of one complete type, compiled once."""
    w = _writers.get(signature)
    if w is None:
        (t,) = SignatureTree._get(signature).types
        w = _writers[signature] = _compile(t)
    return w


def _compile(t: SignatureType) -> Writer:
    tok = t.token
    if tok in ("s", "o"):
        def w(buf: bytearray, v: Any) -> None:
            raw = v.encode("utf-8")
            if b"\0" in raw:
                raise ValueError("NUL in a D-Bus string")
            pad(buf, 4)
            buf.extend(struct.pack("<I", len(raw)))
            buf.extend(raw)
            buf.append(0)
        return w
    if tok == "g":
        return write_signature
    if tok == "b":
        def w(buf: bytearray, v: Any) -> None:
            pad(buf, 4)
            buf.extend(struct.pack("<I", 1 if v else 0))
        return w
    if tok in _FIXED:
        fmt, size = _FIXED[tok]

        def w(buf: bytearray, v: Any) -> None:
            pad(buf, size)
            buf.extend(struct.pack(fmt, v))
        return w
    if tok == "v":
        def w(buf: bytearray, v: Any) -> None:
            write_signature(buf, v.signature)
            writer(v.signature)(buf, v.value)
        return w
    if tok[0] == "(":
        fields = [_compile(c) for c in t.children]

        def w(buf: bytearray, v: Any) -> None:
            pad(buf, 8)
            if len(v) != len(fields):
                raise ValueError("struct of the wrong length")
            for f, x in zip(fields, v):
                f(buf, x)
        return w
    if tok[0] == "a":
        (child,) = t.children
        align = _ALIGN[child.token[0]]
        each: Writer = write_strings
        if child.token[0] == "{":
            key, value = (_compile(c) for c in child.children)

            def entries(buf: bytearray, v: Any) -> None:
                for k, x in v.items():
                    pad(buf, 8)
                    key(buf, k)
                    value(buf, x)
            each = entries
        elif child.token not in ("s", "o"):
            element = _compile(child)

            def elements(buf: bytearray, v: Any) -> None:
                for x in v:
                    element(buf, x)
            each = elements

        def w(buf: bytearray, v: Any) -> None:
            pad(buf, 4)
            at = len(buf)
            buf.extend(bytes(4))
            pad(buf, align)
            start = len(buf)
            each(buf, v)
            struct.pack_into("<I", buf, at, len(buf) - start)
        return w
    raise ValueError(f"cannot marshal {tok!r}")


_LENGTH = struct.Struct("<I").pack
#: the NULs that end a string of length n and pad it to 4, by n % 4
_ENDS = tuple(bytes(1 + (-(n + 1)) % 4) for n in range(4))


def write_strings(buf: bytearray, items: Iterable[str]) -> None:
    """Strings (or object paths) as the elements of an array, the first at
    a 4-aligned end of buf; twice as fast as one writer call per element
    (a ListShares of 10,000 paths). The last one's padding is not part of
    the array: it is taken off again."""
    pad(buf, 4)
    end = len(buf)
    for x in items:
        raw = _utf8(x)
        end = len(buf) + 5 + len(raw)
        buf += _LENGTH(len(raw))
        buf += raw
        buf += _ENDS[len(raw) % 4]
    del buf[end:]


def string_element(x: str) -> bytes:
    """One string (or object path) of an array, as write_strings writes it,
    with the padding that the next element's start needs."""
    raw = _utf8(x)
    return _LENGTH(len(raw)) + raw + _ENDS[len(raw) % 4]


def _utf8(x: str) -> bytes:
    raw = x.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("NUL in a D-Bus string")
    return raw


def _padding(element: bytes) -> int:
    """The bytes after a string_element's NUL."""
    return len(element) - 5 - int(struct.unpack_from("<I", element)[0])


def string_array(elements: List[bytes]) -> "Pieces":
    """The array of these string_element()s, as the whole body of an `as`
    or `ao` reply: its length, then the elements (the last one's padding is
    not part of the array), joined but for the last (one copy of the 700 KB
    of 10,000 paths; sendmsg takes each piece on its own, in Python: slower
    than the join for thousands of small ones)."""
    if not elements:
        return Pieces([bytes(4)], 4)
    last = elements[-1]
    last = last[:len(last) - _padding(last)]
    most = b"".join(elements[:-1])
    return Pieces([_LENGTH(len(most) + len(last)), most, last], 4 + len(most) + len(last))


_FIELDS = ((HeaderField.PATH.value, "o", "path"), (HeaderField.INTERFACE.value, "s", "interface"),
           (HeaderField.MEMBER.value, "s", "member"),
           (HeaderField.ERROR_NAME.value, "s", "error_name"),
           (HeaderField.REPLY_SERIAL.value, "u", "reply_serial"),
           (HeaderField.DESTINATION.value, "s", "destination"))


class Marshalled:
    """A method's return value marshalled ahead (sharedd.bus.slices): the
    whole body of its reply, whose signature must be `signature`."""

    __slots__ = ("signature", "body")

    def __init__(self, signature: str, body: Union[bytes, "Pieces"]):
        self.signature, self.body = signature, body


class Pieces:
    """Marshalled bytes in pieces whose concatenation they are, and their
    length: a GetManagedObjects body of 10 MB is 20,000 pieces, handed as
    they are to sendmsg, never joined (joining held the loop 10-25 ms), and
    its length is counted once, not at every reply that carries it."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: List[bytes], size: Optional[int] = None):
        self.parts = parts
        self.size = sum(len(p) for p in parts) if size is None else size


def _body(msg: Message) -> Pieces:
    raw = getattr(msg, "raw_body", None)
    if raw is not None:
        return raw if type(raw) is Pieces else Pieces([bytes(raw)])
    if msg.body and type(msg.body[0]) is Marshalled:
        if len(msg.body) != 1 or msg.body[0].signature != msg.signature:
            raise ValueError("a marshalled body of another signature")
        body = msg.body[0].body
        return body if isinstance(body, Pieces) else Pieces([body])
    buf = bytearray()
    if msg.signature:
        types = SignatureTree._get(msg.signature).types
        if len(types) != len(msg.body):
            raise ValueError("body does not match the signature")
        for t, value in zip(types, msg.body):
            writer(t.signature)(buf, value)
    elif msg.body:
        raise ValueError("a body without a signature")
    return Pieces([bytes(buf)], len(buf))


def marshal(msg: Message) -> Optional[bytes]:
    """The message's bytes as the library would write them; None for what
    this does not handle (file descriptors) or a value it cannot write."""
    parts = marshal_parts(msg)
    return None if parts is None else b"".join(parts.parts)


def marshal_parts(msg: Message) -> Optional[Pieces]:
    """marshal(msg) in pieces: its header (padded), then its body's. A body
    marshalled ahead (PremarshalledReply) goes out as it is, shared by every
    reply that carries it, neither copied into each nor joined."""
    if msg.unix_fds:
        return None
    try:
        body = _body(msg)
        head = bytearray(struct.pack("<BBBBII", LITTLE_ENDIAN, msg.message_type.value,
                                     msg.flags.value, PROTOCOL_VERSION, body.size, msg.serial))
        head.extend(bytes(4))            # the fields' length, filled in below
        for code, sig, attr in _FIELDS:
            value = getattr(msg, attr)
            if value:
                pad(head, 8)
                head.append(code)
                write_signature(head, sig)
                writer(sig)(head, value)
        if msg.signature:
            pad(head, 8)
            head.append(HeaderField.SIGNATURE.value)
            write_signature(head, "g")
            write_signature(head, msg.signature)
        struct.pack_into("<I", head, 12, len(head) - 16)
        pad(head, 8)
        parts = [bytes(head)]
        parts += body.parts
        return Pieces(parts, len(head) + body.size)
    except Exception:
        return None


#: the padding between two elements of an array (assemble_array)
_GAPS = [bytes(n) for n in range(8)]


def assemble_array(entries: List[bytes]) -> Pieces:
    """An array of 8-aligned elements (structs, dict entries) from elements
    marshalled each on its own at offset 0."""
    parts: List[bytes] = [b""]          # the array's length, set below
    length = 0
    for entry in entries:
        gap = -length % 8
        if gap:
            parts.append(_GAPS[gap])
        parts.append(entry)
        length += gap + len(entry)
    parts[0] = struct.pack("<I", length) + bytes(4)
    return Pieces(parts, length + 8)


def string_pieces(text: List[bytes]) -> Pieces:
    """A marshalled string (at offset 0) from its UTF-8 in pieces."""
    length = sum(len(t) for t in text)
    return Pieces([struct.pack("<I", length), *text, b"\0"], length + 5)


class PremarshalledReply(Message):
    """A method return whose body is already marshalled."""

    def __init__(self, call: Message, signature: str, body: Union[bytes, Pieces]):
        super().__init__(message_type=MessageType.METHOD_RETURN, reply_serial=call.serial,
                         destination=call.sender, signature=signature)
        self.raw_body = body

    def _marshall(self, negotiate_unix_fd: bool = False) -> bytes:
        data = marshal(self)
        if data is None:
            raise ValueError("cannot marshal a premarshalled reply")
        return data
