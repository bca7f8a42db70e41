"""Incoming messages decoded with bounded work.

dbus-next decodes a message's body element by element in Python (1-3 µs
an element) in the loop's reader callback, before anything looks at whom
it is for. Any local user may send sharedd or mountd a method call or a
signal of up to the bus's 32 MiB: an `ai` or `av` body of that size held
the loop 10-30 s, long enough for the watchdog to end the daemon. Here a
call's or a signal's body with arrays or variants is decoded only if it is
at most MAX_BODY bytes and MAX_ELEMENTS elements; otherwise its header
alone is read and the message is refused (LimitsExceeded, if it wants an
answer). Every method of sharedd and mountd takes strings, numbers and
a{sv} options of a few dozen entries: a call's body is never longer than
MAX_BODY, whatever it holds. A signal's body of strings alone (Fired
records, up to 4 MiB) costs one read per string and is decoded whole, up
to MAX_SIGNAL_BODY (a 30 MiB string took 69 ms to decode).
Replies are not bounded: the bus passes on only replies to our own calls.
dbus-next also keeps every signature it has parsed, for good: past
SIGNATURES_KEPT it forgets them here.

A call's or signal's header is bounded too (MAX_FIELDS): an object path
may be as long as the bus lets a message be, dbus-next checks it element
by element in Python
(0.66 s for 4 MiB) before anything looks at it, and an Introspect of such a
path would be answered with a message longer than the bus carries (the bus
then drops our connection). A message with a longer header is not decoded:
its sender is found without reading the other fields, and it is refused.
"""

from __future__ import annotations

import collections
import struct
from typing import Any, DefaultDict, List, Optional

from dbus_next.constants import MessageFlag, MessageType
from dbus_next.message import Message
from dbus_next._private.constants import HeaderField
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.signature import SignatureTree, Variant
from dbus_next.validators import is_bus_name_valid

from ..record import MAX_RECORD_BYTES

#: a call's or signal's body with arrays or variants longer than this is
#: not decoded (sharedd's largest: CreateShare with 64 metadata entries of
#: 1 KiB, about 70 KiB)
MAX_BODY = 256 * 1024
#: a signal's body of strings and numbers longer than this is not decoded
#: (the longest sharedd sends: a Fired record, at most MAX_RECORD_BYTES)
MAX_SIGNAL_BODY = MAX_RECORD_BYTES + 64 * 1024
#: ... nor one with more elements than this (sharedd's largest: about 150;
#: 1,024 variants take about 2.5 ms)
MAX_ELEMENTS = 1024
#: a body up to this long is decoded without counting (at most about two
#: thousand reads)
COUNTED_FROM = 4096
#: a message's header fields longer than this are not decoded (sharedd's
#: longest object path is under 200 characters, every other field at most
#: 255)
MAX_FIELDS = 8192
#: signatures dbus-next keeps parsed (it keeps every one it has seen, about
#: 40 KB for a long one, and any local user may send new ones): beyond, it
#: forgets them all and parses again what comes
SIGNATURES_KEPT = 256

_CALL_OR_SIGNAL = (MessageType.METHOD_CALL.value, MessageType.SIGNAL.value)
_HEADER = SignatureTree._get("a(yv)").types[0]


class _TooMany(Exception):
    pass


class BoundedUnmarshaller(Unmarshaller):
    """One message's reader; `refused` is set (a text) if its body was not
    decoded, and the message then has its header only."""

    refused: Optional[str] = None
    #: elements left to decode, while counted (a variant's signature counts
    #: a character an element: parsing it is the variant's cost)
    _left: Optional[List[int]] = None

    def read_variant(self, _: Any = None) -> Variant:
        signature = self.read_signature()  # type: ignore[no-untyped-call]
        if self._left is not None:
            self._left[0] -= len(signature)
            if self._left[0] < 0:
                raise _TooMany()
        tree = SignatureTree._get(signature)
        return Variant(tree, self.read_argument(tree.types[0]))  # type: ignore[no-untyped-call]

    def _unmarshall(self) -> None:
        if len(SignatureTree._cache) > SIGNATURES_KEPT:
            SignatureTree._cache.clear()
        self.offset = 0
        self.read(16, prefetch=True)  # type: ignore[no-untyped-call]
        head = bytes(self.buf[:16])
        order = "<" if head[0:1] == b"l" else ">"
        body_len, serial, fields_len = struct.unpack_from(order + "III", head, 4)
        if fields_len > MAX_FIELDS and head[1] in _CALL_OR_SIGNAL:
            self.read(16 + fields_len + (-fields_len % 8) + body_len,  # type: ignore[no-untyped-call]
                      prefetch=True)
            self.refused = (f"the message's header is {fields_len} bytes; at most {MAX_FIELDS}; "
                            "refused unread")
            self.message = _header_only(head, serial, self._sender(order, fields_len))
            return
        if head[1] not in _CALL_OR_SIGNAL or body_len <= COUNTED_FROM:
            super()._unmarshall()  # type: ignore[no-untyped-call]
            return
        # All of it first (a message read in part is read again from its start)
        self.read(16 + fields_len + (-fields_len % 8) + body_len,  # type: ignore[no-untyped-call]
                  prefetch=True)
        fields = self._fields()
        signature = fields["SIGNATURE"] or ""
        elements = "a" in signature or "v" in signature    # (an element a type)
        call = head[1] == MessageType.METHOD_CALL.value
        limit = MAX_BODY if elements or call else MAX_SIGNAL_BODY
        if body_len > limit:
            kind = ("one with arrays or variants" if elements
                    else "a method call's" if call else "a signal's")
            self.refused = (f"the message's body is {body_len} bytes; {kind} may have at "
                            f"most {limit}; refused unread")
        elif not elements:
            super()._unmarshall()  # type: ignore[no-untyped-call]
            return
        else:
            plain = self.readers
            left = self._left = [MAX_ELEMENTS]

            def counted(read: Any) -> Any:
                def one(type_: Any = None) -> Any:
                    left[0] -= 1
                    if left[0] < 0:
                        raise _TooMany()
                    return read(type_)
                return one
            self.readers = {token: counted(read) for token, read in plain.items()}
            try:
                super()._unmarshall()  # type: ignore[no-untyped-call]
                return
            except _TooMany:
                self.refused = (f"the message has more than {MAX_ELEMENTS} elements "
                                "(arrays and variants); refused unread")
            finally:
                self.readers, self._left = plain, None
        self.message = Message(
            destination=fields["DESTINATION"], path=fields["PATH"],
            interface=fields["INTERFACE"], member=fields["MEMBER"],
            message_type=MessageType(head[1]), flags=MessageFlag(head[2]),
            reply_serial=fields["REPLY_SERIAL"], sender=fields["SENDER"],
            unix_fds=self.unix_fds, serial=serial)

    def _sender(self, order: str, fields_len: int) -> Optional[str]:
        """The SENDER field (set by the bus), found by stepping over the
        others unread; None if it is not there or the fields are not well
        formed."""
        buf, pos, end = self.buf, 16, 16 + fields_len
        try:
            while pos < end:
                pos += -pos % 8
                code, sig_len = buf[pos], buf[pos + 1]
                sig = bytes(buf[pos + 2:pos + 2 + sig_len])
                pos += 3 + sig_len
                if sig in (b"s", b"o"):
                    pos += -pos % 4
                    (size,) = struct.unpack_from(order + "I", buf, pos)
                    pos += 4
                    if code == HeaderField.SENDER.value and sig == b"s":
                        name = bytes(buf[pos:pos + size]).decode("ascii", "replace") \
                            if size <= 255 else ""
                        return name if is_bus_name_valid(name) else None
                    pos += size + 1
                elif sig == b"g":
                    pos += buf[pos] + 2
                elif sig == b"u":
                    pos += -pos % 4 + 4
                else:
                    return None
        except (IndexError, struct.error):
            pass
        return None

    def _fields(self) -> DefaultDict[str, Any]:
        """The header's fields (the message is in the buffer); None for those
        it has not."""
        self.offset = 12
        self.endian = self.buf[0]
        fields: DefaultDict[str, Any] = collections.defaultdict(lambda: None)
        for code, value in self.read_argument(_HEADER):  # type: ignore[no-untyped-call]
            try:
                fields[HeaderField(code).name] = value.value
            except ValueError:         # (a field this library does not know)
                pass
        return fields


def _header_only(head: bytes, serial: int, sender: Optional[str]) -> Message:
    """A call or signal whose header was not decoded: its kind, flags, serial
    and sender, enough to refuse it (Message's own checks need a path and a
    member, which it has not)."""
    msg = Message.__new__(Message)
    msg.__dict__.update(
        destination=None, path=None, interface=None, member=None,
        message_type=MessageType(head[1]), flags=MessageFlag(head[2]), error_name=None,
        reply_serial=None, sender=sender, unix_fds=[], signature="",
        signature_tree=SignatureTree._get(""), body=[], serial=serial)
    return msg
