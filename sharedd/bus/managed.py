"""The object tree of a connection at 10,000 objects: signals find their
object path in one step, and GetManagedObjects is answered from each
object's marshalled entry, kept until the object changes.

dbus-next 0.2.3 looks up the path of an interface by scanning every
exported path for each signal it emits (a cost per PropertiesChanged that
grows with the number of shares), and builds GetManagedObjects by reading
and marshalling every property of every object on each call (seconds at
10,000 shares, all of it on the event loop).

The wire format makes the cache possible: an a{oa{sa{sv}}} reply is the
array's byte length, padding to 8, then one dict entry per object, each
starting on an 8-byte boundary; an entry marshalled on its own at offset 0
has exactly the bytes it has inside the array. An interface opts in with a
`generation` attribute that its owner bumps whenever a property may have
changed (sharedd's Share and Snapshot objects: every change goes through
the bus service's one change handler, which also sends PropertiesChanged);
objects with an interface that does not are marshalled on every call.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Dict, List, Optional, Tuple

from dbus_next.message import Message
from dbus_next.service import ServiceInterface

from .wire import PremarshalledReply, assemble_array, pad, write_signature, writer

SIGNATURE = "a{oa{sa{sv}}}"

def object_entry(path: str, ifaces: List[ServiceInterface]) -> bytes:
    """The (o, a{sa{sv}}) entry of one object, read from its getters."""
    buf = bytearray()
    writer("o")(buf, path)
    pad(buf, 4)
    at = len(buf)
    buf.extend(bytes(4))
    pad(buf, 8)
    start = len(buf)
    for iface in ifaces:
        pad(buf, 8)
        writer("s")(buf, iface.name)
        pad(buf, 4)
        inner = len(buf)
        buf.extend(bytes(4))
        pad(buf, 8)
        first = len(buf)
        for prop in ServiceInterface._get_properties(iface):  # type: ignore[no-untyped-call]
            if prop.disabled or not prop.access.readable():
                continue
            if asyncio.iscoroutinefunction(prop.prop_getter):
                raise ValueError(f"{prop.name} is read asynchronously")
            value = prop.prop_getter(iface)
            pad(buf, 8)
            writer("s")(buf, prop.name)
            write_signature(buf, prop.signature)
            writer(prop.signature)(buf, value)
        struct.pack_into("<I", buf, inner, len(buf) - first)
    struct.pack_into("<I", buf, at, len(buf) - start)
    return bytes(buf)




class ObjectIndex:
    """Mixed into the connection (a dbus-next MessageBus)."""

    _path_exports: Dict[str, List[ServiceInterface]]

    def _index_init(self) -> None:
        self._iface_paths: Dict[int, str] = {}
        self._entries: Dict[str, Tuple[Tuple[Any, ...], bytes]] = {}

    def _indexed(self, path: str) -> None:
        """Re-index path after its interfaces changed."""
        self._entries.pop(path, None)
        for iface in self._path_exports.get(path, []):
            self._iface_paths[id(iface)] = path

    def _unindexed(self, path: str, before: List[ServiceInterface]) -> None:
        self._entries.pop(path, None)
        now = {id(i) for i in self._path_exports.get(path, [])}
        for iface in before:
            if id(iface) not in now:
                self._iface_paths.pop(id(iface), None)

    def path_of(self, iface: ServiceInterface) -> Optional[str]:
        return self._iface_paths.get(id(iface))

    async def warm(self, chunk: int = 256) -> None:
        """Write every cacheable object's entry now (at start-up, before the
        name is taken), so that the first GetManagedObjects is as fast as
        the next; yields to the loop between chunks."""
        for n, (path, ifaces) in enumerate(list(self._path_exports.items())):
            key = self._key(ifaces)
            if None not in key and path not in self._entries:
                try:
                    self._entries[path] = (key, object_entry(path, ifaces))
                except Exception:
                    pass        # answered by the library when asked
            if n % chunk == chunk - 1:
                await asyncio.sleep(0)

    @staticmethod
    def _key(ifaces: List[ServiceInterface]) -> Tuple[Any, ...]:
        return tuple(getattr(i, "generation", None) for i in ifaces) + (len(ifaces),)

    def managed_objects_reply(self, call: Message) -> Optional[Message]:
        """The GetManagedObjects reply for call, or None if some object
        cannot be written here (the library's handler then answers, and
        reports whatever is wrong)."""
        prefix = call.path.rstrip("/") + "/"
        entries: List[bytes] = []
        for path, ifaces in self._path_exports.items():
            if not (call.path == "/" or path.startswith(prefix)):
                continue
            key = self._key(ifaces)
            cached = self._entries.get(path)
            if cached is not None and cached[0] == key:
                entries.append(cached[1])
                continue
            try:
                entry = object_entry(path, ifaces)
            except Exception:           # a getter or value we cannot write
                return None
            if None not in key:
                self._entries[path] = (key, entry)
            entries.append(entry)
        return PremarshalledReply(call, SIGNATURE, assemble_array(entries))
