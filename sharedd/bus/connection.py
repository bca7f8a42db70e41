"""A dbus-next connection that survives backpressure and hostile callers.
Both daemons (sharedd and sharedd-mountd) connect through `Connection`.

dbus-next 0.2.3 (Debian 12) has three faults that any local user can turn
into a deaf daemon:

- its writer treats EAGAIN on send (the socket buffer is full: a burst of
  large replies or signals) as fatal and drops the connection (upstream
  python-dbus-next issue #153, PR #154, unmerged). Here a full buffer means
  "wait until writable", which the writer is already registered for;
- a dropped connection keeps its socket open, so the bus still sees the
  process as the owner of its names and nothing restarts it. Here the socket
  is closed, so the name goes and the daemon's disconnect handling runs;
- a refused call (an unknown interface in Properties.Get, say) is logged at
  ERROR with a traceback and the caller's text, twice (log flooding, and a
  newline in the text forges a log line). Here refusals are counted and
  logged sparingly (sharedd.refusals): once per caller per interval, in
  a few lines an interval for all callers together, escaped and cut short.

It also answers Properties.GetAll("") (every interface of the object), which
dbus-next refuses as NotSupported, and keeps its object tree cheap at 10,000
objects (sharedd.bus.managed).
"""

from __future__ import annotations

import array
import collections
import copy
import logging
import socket
import time
from typing import Any, Deque, Dict, List, Optional

from dbus_next import Message, MessageType
from dbus_next.constants import ErrorType, MessageFlag
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface

from .. import constants as C
from ..errors import SharedError
from . import managed, reading, wire
from ..refusals import REFUSAL_LOG_INTERVAL, RefusalLog
from .audit import CALL, printable
from .managed import ObjectIndex

log = logging.getLogger(__name__)

#: seconds of reading incoming messages in one step of the loop
READ_SLICE = 0.002


#: a queued reply at least this long (GetManagedObjects at thousands of
#: shares: megabytes) lets shorter replies to other callers go first
LARGE_REPLY = 64 * 1024
#: a large reply is replaced by LimitsExceeded (try again) while this many
#: bytes of large replies wait to be written (every signal and call waits
#: behind them: seconds of dbus-daemon's time), or while the caller has
#: this many of its own queued; GetManagedObjects, the largest, is refused
#: before any work while the caller has that many waiting or queued
LARGE_QUEUED_MAX = 256 << 20
#: pieces of a message handed to one sendmsg (the kernel's limit: UIO_MAXIOV)
IOV_MAX = 1024
LARGE_PER_CALLER = 2
TOO_MANY_LARGE = "too many large replies are waiting to be written; try again in a moment"
#: the longest message the bus carries (dbus-daemon's default): it drops a
#: connection that sends a longer one, so none is sent
MESSAGE_MAX = 32 << 20


class _Queued:
    """A message waiting to be written: its bytes in pieces (a header and
    a body, or many for a body assembled from entries)."""

    __slots__ = ("parts", "size", "unix_fds", "fut", "large_to")

    def __init__(self, data: wire.Pieces, unix_fds: List[int], fut: Any):
        self.parts, self.size, self.unix_fds, self.fut = data.parts, data.size, unix_fds, fut
        self.large_to: Optional[str] = None     # its destination, if a large reply


class _Writer(_MessageWriter):
    """The library's writer, with a full socket buffer treated as a pause,
    messages marshalled by sharedd.bus.wire when it can, and large replies
    that do not hold up the others.

    A connection is one ordered stream: behind a 10 MB reply every other
    caller waits until the bus has read it, and 20 callers asking for
    GetManagedObjects at once held a Get for more than a second. So a
    reply may go ahead of queued large replies to other callers (not yet
    begun); never ahead of a signal, a call, or a reply to its own caller,
    so what a caller sees keeps its order."""

    def __init__(self, bus: Any):
        super().__init__(bus)
        self.queue: Deque[_Queued] = collections.deque()
        self.current: Optional[_Queued] = None      # being written
        self.at = 0                                 # its first piece not all sent
        self.offset = 0                             # ... and how much of it is sent
        self.large_bytes = 0                        # of large replies queued or begun
        self._large_to: Dict[str, int] = {}         # how many of them, by destination

    def large_for(self, destination: str) -> int:
        """Large replies to destination queued or begun."""
        return self._large_to.get(destination, 0)

    def drop(self) -> None:
        """The connection is gone: nothing more is written."""
        for item in [self.current, *self.queue]:
            if item is not None and item.fut is not None and not item.fut.done():
                item.fut.cancel()
        self.queue.clear()
        self.current, self.large_bytes = None, 0
        self._large_to.clear()

    def buffer_message(self, msg: Message, future: Any = None) -> None:
        data = wire.marshal_parts(msg) or \
            wire.Pieces([msg._marshall(negotiate_unix_fd=self.negotiate_unix_fd)])
        reply = msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR)
        item = _Queued(data, copy.copy(msg.unix_fds), future)
        large = reply and item.size >= LARGE_REPLY
        to = msg.destination or ""          # ("" on a connection without a bus)
        if item.size > MESSAGE_MAX:
            too_long = f"the message would be {item.size} bytes, more than the bus carries"
            self.bus._count_refusal(to, f"{msg.message_type.name.lower()} of {item.size} bytes",
                                    DBusError(ErrorType.LIMITS_EXCEEDED, too_long))
            if reply:
                return self.buffer_message(Message(
                    message_type=MessageType.ERROR, serial=msg.serial,
                    reply_serial=msg.reply_serial, destination=msg.destination,
                    error_name=ErrorType.LIMITS_EXCEEDED.value, signature="s",
                    body=[too_long]), future)
            if future is not None and not future.done():
                future.set_exception(DBusError(ErrorType.LIMITS_EXCEEDED, too_long))
            return
        if large and msg.message_type == MessageType.METHOD_RETURN and (
                self.large_bytes and self.large_bytes + item.size > LARGE_QUEUED_MAX
                or self.large_for(to) >= LARGE_PER_CALLER):
            # (a ListShares of 10,000 shares is 0.7 MB: 100s of callers
            # asking at once, reading nothing, would queue gigabytes). The
            # error takes the reply's serial, which is never sent.
            self.bus._count_refusal(to, f"reply to call {msg.reply_serial} ({item.size} bytes)",
                                    DBusError(ErrorType.LIMITS_EXCEEDED, TOO_MANY_LARGE))
            return self.buffer_message(Message(
                message_type=MessageType.ERROR, serial=msg.serial, reply_serial=msg.reply_serial,
                destination=msg.destination, error_name=ErrorType.LIMITS_EXCEEDED.value,
                signature="s", body=[TOO_MANY_LARGE]), future)
        if large:
            item.large_to = to
            self.large_bytes += item.size
            self._large_to[to] = self.large_for(to) + 1
        at = len(self.queue)
        if reply and not large:
            while at and self.queue[at - 1].large_to not in (None, to):
                at -= 1
        self.queue.insert(at, item)

    def schedule_write(self, msg: Optional[Message] = None, future: Any = None) -> None:
        if self.bus._disconnected:
            return   # (its socket is closed; the fd number may be another's now)
        if msg is not None:
            self.buffer_message(msg, future)
        if not self.bus.unique_name:
            return   # before Hello's reply: sent once the bus is ready
        # What the socket takes now goes at once (the library waits for a
        # loop round and two epoll_ctl calls per message); the writer is
        # registered only for what is left.
        if self.current is None and len(self.queue) == 1:
            self._write(register=False)
        if self.current is not None or self.queue:
            self.loop.add_writer(self.fd, self.write_callback)

    def write_callback(self) -> None:
        self._write(register=True)

    def _write(self, register: bool) -> None:
        """Send queued messages until done or the socket is full. From
        schedule_write (register False) an error is left for the writer's
        callback to meet again and end the connection from the loop."""
        try:
            while True:
                if self.current is None:
                    if not self.queue:
                        if register:
                            self.loop.remove_writer(self.fd)
                        return
                    self.current = self.queue.popleft()
                    self.at = self.offset = 0
                item, parts, first = self.current, self.current.parts, self.at
                # (a body of entries is thousands of pieces: IOV_MAX at a time)
                views = parts[first:first + IOV_MAX]
                if self.offset:
                    views[0] = memoryview(views[0])[self.offset:]
                if item.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", item.unix_fds))]
                    sent = self.sock.sendmsg(views, ancdata)
                    item.unix_fds = []          # they go with the first byte
                else:
                    sent = self.sock.sendmsg(views)
                sent += self.offset
                while self.at < len(parts) and sent >= len(parts[self.at]):
                    sent -= len(parts[self.at])
                    self.at += 1
                self.offset = sent
                if self.at < len(parts):
                    if self.at >= first + len(views):
                        continue     # all of those went: the next ones may too
                    return   # partly written: the loop calls again when writable
                self.current = None
                if item.large_to is not None:
                    self.large_bytes -= item.size
                    left = self._large_to.pop(item.large_to) - 1
                    if left:
                        self._large_to[item.large_to] = left
                if item.fut is not None and not item.fut.done():
                    item.fut.set_result(None)
        except (BlockingIOError, InterruptedError):
            return           # the buffer is full: (still) registered, called when writable
        except Exception as exc:
            if not register:
                return
            fut = self.current.fut if self.current is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            self.bus._finalize(exc)


class _Reply:
    """dbus-next's reply sender for one call (a callable, and a context that
    answers an exception escaping the handler with an error reply, then lets
    it go on), without the class the library defines anew at every call:
    a class per call is a reference cycle per call, left to the collector."""

    __slots__ = ("bus", "msg")

    def __init__(self, bus: "Connection", msg: Message):
        self.bus, self.msg = bus, msg

    def __enter__(self) -> "_Reply":
        return self

    def __call__(self, reply: Message) -> None:
        if not self.msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            self._answer(exc)        # and it goes on, to Connection._on_message's log

    def send_error(self, exc: BaseException) -> None:
        """An error the library caught itself (a property's getter, say):
        answered, and counted with the caller's refusals (one log line per
        caller per interval); a bug's traceback at most once an interval."""
        if not isinstance(exc, Exception):
            return
        if isinstance(exc, SharedError):     # e.g. the object went while read
            exc = DBusError(C.ERROR_PREFIX + exc.name, printable(str(exc), 400))
        elif not isinstance(exc, DBusError):
            self.bus._bug(self.msg, exc)
        self._answer(exc)
        self.bus._refused(self.msg, exc if isinstance(exc, DBusError) else _internal(exc))

    def _answer(self, exc: BaseException) -> None:
        if isinstance(exc, DBusError):
            self(exc._as_message(self.msg))
        elif isinstance(exc, Exception):
            # The library adds the traceback and message; a caller is not told
            # our internals (paths, SQL), only the kind of failure.
            self(_internal(exc)._as_message(self.msg))


def _internal(exc: BaseException) -> DBusError:
    return DBusError(ErrorType.SERVICE_ERROR,
                     f"The service interface raised an error: {type(exc).__name__}")


class Connection(ObjectIndex, MessageBus):
    #: sharedd.bus.audit.Auditor of the calls this connection serves (sharedd's)
    auditor: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        self._index_init()
        super().__init__(*args, **kwargs)
        self._writer = _Writer(self)
        self.refusals = RefusalLog("message")
        self._read_later = False        # reading goes on in a later step
        self._bug_logged = float("-inf")
        # GetManagedObjects answers waiting for their writing, per caller
        self._answers_for: Dict[str, int] = {}
        self._last_call = time.monotonic()

    # --- the object tree, indexed (an interface object lives at one path) -----
    def export(self, path: str, interface: ServiceInterface) -> None:
        super().export(path, interface)
        self._indexed(path)

    def unexport(self, path: str, interface: Any = None) -> None:
        before = list(self._path_exports.get(path, []))
        super().unexport(path, interface)
        self._unindexed(path, before)

    def _has_interface(self, interface: ServiceInterface) -> bool:
        path = self.path_of(interface)
        return path is not None and any(i is interface for i in self._path_exports.get(path, []))

    def _interface_signal_notify(self, interface: ServiceInterface, interface_name: str,
                                 member: str, signature: str, body: List[Any],
                                 unix_fds: List[int] = []) -> None:
        path = self.path_of(interface)
        if path is None:
            return super()._interface_signal_notify(interface, interface_name, member,
                                                    signature, body, unix_fds)
        self._touch(path)      # a reply being written reads it again (managed.py)
        self.send(Message.new_signal(path=path, interface=interface_name, member=member,
                                     signature=signature, body=body, unix_fds=unix_fds))

    def _call(self, msg: Message, callback: Any) -> None:
        # The library's, without its check of the callback's signature with
        # inspect (a tenth of the CPU of a helper's call to NFS-Ganesha):
        # the callbacks here are the library's own.
        if not msg.serial:
            msg.serial = self.next_serial()

        def reply_notify(reply: Optional[Message], err: Optional[Exception]) -> None:
            if reply:
                self._name_owners[msg.destination] = reply.sender
            callback(reply, err)
        sent = self.send(msg)
        if sent.done() and sent.exception() is not None:
            callback(None, sent.exception())    # never sent (longer than the bus carries)
        elif msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            callback(None, None)
        else:
            self._method_return_handlers[msg.serial] = reply_notify

    def _send_reply(self, msg: Message) -> _Reply:
        return _Reply(self, msg)

    def _create_unmarshaller(self) -> Any:
        # Called when the previous message is done: its unmarshaller's table
        # of its own bound methods is a reference cycle (holding the
        # message's bytes) that only the collector would free.
        done = getattr(self, "_unmarshaller", None)
        if done is not None:
            done.readers.clear()
        return reading.BoundedUnmarshaller(self._stream,
                                           self._sock if self._negotiate_unix_fd else None)

    def _message_reader(self) -> None:
        """The library's reader (the socket's callback), with messages whose
        body was not decoded (sharedd.bus.reading) refused, and at most
        READ_SLICE seconds of reading in one step: a flood of calls is read
        over several steps, with what they started (and replies awaited)
        run between them. While a step's reading goes on in a later one
        (_read_on), the socket's callback leaves it to that."""
        if self._read_later:
            return
        started = time.perf_counter()
        try:
            while True:
                reader = self._unmarshaller
                msg = reader.unmarshall()
                if msg is None:
                    return
                if reader.refused is None:
                    self._on_message(msg)
                else:
                    self._unread(msg, reader.refused)
                self._unmarshaller = self._create_unmarshaller()
                if time.perf_counter() - started > READ_SLICE:
                    # (what the stream has buffered already makes the socket
                    # no more readable: the next step reads on by itself)
                    self._read_later = True
                    self._loop.call_soon(self._read_on)
                    return
        except Exception as exc:
            self._finalize(exc)

    def _read_on(self) -> None:
        self._read_later = False
        if not self._disconnected:
            self._message_reader()

    def _unread(self, msg: Message, why: str) -> None:
        exc = DBusError(ErrorType.LIMITS_EXCEEDED, why)
        if msg.message_type == MessageType.METHOD_CALL and \
                not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.send(exc._as_message(msg))
        self._refused(msg, exc)

    def _default_introspect_handler(self, msg: Message, send_reply: Any) -> None:
        send_reply(wire.PremarshalledReply(msg, "s", wire.string_pieces(
            self.introspection_parts(msg.path))))

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: _Reply) -> None:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return              # nothing to write for no one
        caller = msg.sender or ""      # (as the writer counts it)
        if self._writer.large_bytes >= LARGE_QUEUED_MAX or \
                self._answers_for.get(caller, 0) + self._writer.large_for(caller) \
                >= LARGE_PER_CALLER:
            return self._too_much(msg, send_reply)
        self._answers_for[caller] = self._answers_for.get(caller, 0) + 1

        def answer(body: Optional[wire.Pieces]) -> None:
            # Called in the step that read the body last (managed.py).
            left = self._answers_for.pop(caller) - 1
            if left:
                self._answers_for[caller] = left
            if self._disconnected:
                return
            try:                # (the writer refuses it if too much is queued now)
                if body is None:
                    MessageBus._default_get_managed_objects_handler(self, msg, send_reply)
                else:
                    send_reply(wire.PremarshalledReply(msg, managed.SIGNATURE, body))
            except Exception as exc:
                send_reply.send_error(exc)
        self.managed_objects(msg, answer)

    def _too_much(self, msg: Message, send_reply: _Reply) -> None:
        send_reply.send_error(DBusError(ErrorType.LIMITS_EXCEEDED, TOO_MANY_LARGE))

    # --- a lost connection really goes --------------------------------------
    def _finalize(self, err: Optional[Exception] = None) -> None:
        already = self._disconnected
        super()._finalize(err)
        self._writer.drop()
        if not already:
            if err is not None and not self._user_disconnect:
                log.error("the bus connection failed: %s", err)
            try:
                self._sock.close()   # the bus drops our names; no half-alive owner
            except OSError:
                pass

    def disconnect(self) -> None:
        if not self._disconnected:   # a failed connection is closed already
            super().disconnect()

    # --- refusals: counted, logged sparingly ------------------------------------
    def idle(self) -> float:
        """Seconds since the last call came (the collector waits for a
        quiet moment)."""
        return time.monotonic() - self._last_call

    def _on_message(self, msg: Message) -> None:
        # The caller, for the audit record of what this message starts
        # (tasks created while handling it copy the context).
        token = None
        if msg.message_type == MessageType.METHOD_CALL:
            token = CALL.set((self, msg.sender))
            self._last_call = time.monotonic()
        try:
            self._process_message(msg)
        except DBusError as exc:
            # dbus-next has already sent the error reply to the caller.
            self._refused(msg, exc)
        except Exception:
            log.exception("error handling %s.%s from %s", printable(msg.interface, 80),
                          printable(msg.member, 80), msg.sender)
        finally:
            if token is not None:
                CALL.reset(token)

    def _bug(self, msg: Message, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._bug_logged >= REFUSAL_LOG_INTERVAL:
            self._bug_logged = now
            log.error("error answering %s.%s from %s (one traceback per %gs)",
                      printable(msg.interface, 80), printable(msg.member, 80), msg.sender,
                      REFUSAL_LOG_INTERVAL, exc_info=exc)

    def _refused(self, msg: Message, exc: DBusError) -> None:
        if msg.member:
            what = f"{printable(msg.interface, 80)}.{printable(msg.member, 80)}"
        elif msg.path is None and msg.message_type in (MessageType.METHOD_CALL,
                                                       MessageType.SIGNAL):
            what = f"a {msg.message_type.name.lower()}, unread"   # (sharedd.bus.reading)
        else:
            what = f"a {msg.message_type.name.lower()}"
        self._count_refusal(msg.sender or "", what, exc)   # ("" without a bus)

    def _count_refusal(self, caller: str, what: str, exc: DBusError) -> None:
        self.refusals.refused(caller, what, exc.type, exc.text)

    # --- Properties.GetAll("") ---------------------------------------------------
    def _default_properties_handler(self, msg: Message, send_reply: Any) -> None:
        if not (msg.member == "GetAll" and msg.signature == "s" and msg.body[0] == ""):
            return super()._default_properties_handler(msg, send_reply)
        if msg.path not in self._path_exports:
            raise DBusError(ErrorType.UNKNOWN_OBJECT, f"no interfaces at path: {msg.path!r}")
        interfaces: List[ServiceInterface] = list(self._path_exports[msg.path])
        merged: Dict[str, Any] = {}
        left = [len(interfaces)]

        def got(iface: Any, values: Dict[str, Any], _user: Any, err: Optional[Exception]) -> None:
            if err is None:
                merged.update(values)
            left[0] -= 1
            if left[0] == 0:
                send_reply(Message.new_method_return(msg, "a{sv}", [merged]))
        if not interfaces:
            send_reply(Message.new_method_return(msg, "a{sv}", [{}]))
            return
        for iface in interfaces:
            ServiceInterface._get_all_property_values(iface, got)
