"""The object tree of a connection at 10,000 objects: signals find their
object path in one step, GetManagedObjects is answered from each object's
marshalled entry, kept until the object changes, in slices of the loop's
time, and Introspect finds a node's children in the tree.

dbus-next 0.2.3 looks up the path of an interface by scanning every
exported path for each signal it emits (a cost per PropertiesChanged that
grows with the number of shares), builds GetManagedObjects by reading
and marshalling every property of every object on each call (seconds at
10,000 shares, all of it in one callback on the event loop), and scans
every exported path for the children of a node on each Introspect.

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
import bisect
import struct
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from dbus_next import introspection as intr
from dbus_next.message import Message
from dbus_next.service import ServiceInterface

from . import slices
from .wire import Pieces, assemble_array, pad, write_signature, writer

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


#: replies written at once (the others wait their turn): each holds its
#: objects' entries until sent, megabytes at 10,000 shares
CONCURRENT_REPLIES = 2
#: what changed while a reply was written is read again in slices while
#: there are more than this many objects to read (at most LAST_ROUNDS times;
#: then, and always for the last ones, without a pause)
LAST_PATHS = 256
LAST_ROUNDS = 8


class ObjectIndex:
    """Mixed into the connection (a dbus-next MessageBus)."""

    _path_exports: Dict[str, List[ServiceInterface]]

    def _index_init(self) -> None:
        self._iface_paths: Dict[int, str] = {}
        self._entries: Dict[str, Tuple[Tuple[Any, ...], bytes]] = {}
        # The paths each reply being written must read again before it is
        # sent: a signal about them went out (or they came or went) meanwhile.
        self._touched: List[Set[str]] = []
        self._reply_turns: Optional[asyncio.Semaphore] = None
        # Per path asked for: the answers of the reply whose writing has
        # not begun yet; the writings under way.
        self._next_answers: Dict[str, List[Callable[[Optional[Pieces]], None]]] = {}
        self._writing: Set["asyncio.Future[None]"] = set()
        # The tree for Introspect: each node's children, with how many
        # exported paths lie under each (dbus-next scans every path per
        # call, and takes /a/share_x for a child "_x" of /a/share).
        self._in_tree: Set[str] = set()
        self._children: Dict[str, Dict[str, int]] = {}
        self._names: Dict[str, List[str]] = {}                   # path: its children, sorted
        self._children_xml: Dict[str, Tuple[str, bytes]] = {}    # path: (indent, lines)

    def _tree(self, path: str, step: int) -> None:
        parent = "/"
        for name in path.strip("/").split("/"):
            self._children_xml.pop(parent, None)
            kids = self._children.setdefault(parent, {})
            kids[name] = kids.get(name, 0) + step
            # (kept sorted as they come and go: sorting 10,000 names at each
            # Introspect after a change took milliseconds)
            names = self._names.setdefault(parent, [])
            if kids[name] == 1 and step > 0:
                bisect.insort(names, name)
            if kids[name] <= 0:
                del kids[name]
                del names[bisect.bisect_left(names, name)]
                if not kids:
                    del self._children[parent], self._names[parent]
            parent = parent.rstrip("/") + "/" + name

    def _touch(self, path: str) -> None:
        for touched in self._touched:
            touched.add(path)

    def _indexed(self, path: str) -> None:
        """Re-index path after its interfaces changed."""
        self._entries.pop(path, None)
        for iface in self._path_exports.get(path, []):
            self._iface_paths[id(iface)] = path
        if path != "/" and path not in self._in_tree and self._path_exports.get(path):
            self._in_tree.add(path)
            self._tree(path, 1)
        self._touch(path)

    def _unindexed(self, path: str, before: List[ServiceInterface]) -> None:
        self._entries.pop(path, None)
        now = {id(i) for i in self._path_exports.get(path, [])}
        for iface in before:
            if id(iface) not in now:
                self._iface_paths.pop(id(iface), None)
        if not now and path in self._in_tree:
            self._in_tree.discard(path)
            self._tree(path, -1)
        self._touch(path)

    def introspection(self, path: str) -> str:
        """Introspect's XML for path, as text."""
        return b"".join(self.introspection_parts(path)).decode()

    def introspection_parts(self, path: str) -> List[bytes]:
        """Introspect's XML for path, in pieces of UTF-8 (a node of 10,000
        children is 0.6 MB, kept as one piece until they change, and sent
        as it is): its interfaces, then its children (as text: ElementTree
        takes 30 ms for the 10,000 of a tree of shares)."""
        node = intr.Node.default(path) if path in self._path_exports else intr.Node(path)
        for iface in self._path_exports.get(path, []):
            node.interfaces.append(iface.introspect())
        if path not in self._children:
            return [str(node.tostring()).encode()]
        node.nodes = [intr.Node("-")]     # where they go ("-" is no path element)
        xml = str(node.tostring())
        mark = '<node name="-" />'
        at = xml.index(mark)
        indent = xml[xml.rindex("\n", 0, at) + 1:at]
        kept = self._children_xml.get(path)
        if kept is None or kept[0] != indent:
            kept = self._children_xml[path] = (indent, ("\n" + indent).join(
                [f'<node name="{c}" />' for c in self._names[path]]).encode())
        return [xml[:at].encode(), kept[1], xml[at + len(mark):].encode()]

    def path_of(self, iface: ServiceInterface) -> Optional[str]:
        return self._iface_paths.get(id(iface))

    async def warm(self, chunk: int = 256) -> None:
        """Write every cacheable object's entry now (at start-up, before the
        name is taken), so that the first GetManagedObjects is as fast as
        the next; yields to the loop between chunks."""
        for n, (path, ifaces) in enumerate(list(self._path_exports.items())):
            if None not in self._key(ifaces):
                try:
                    self._entry(path, ifaces)
                except Exception:
                    pass        # answered by the library when asked
            if n % chunk == chunk - 1:
                await asyncio.sleep(0)

    @staticmethod
    def _key(ifaces: List[ServiceInterface]) -> Tuple[Any, ...]:
        return tuple(getattr(i, "generation", None) for i in ifaces) + (len(ifaces),)

    def _entry(self, path: str, ifaces: List[ServiceInterface]) -> bytes:
        """path's entry, from the cache if it is current; raises what a
        getter raises."""
        key = self._key(ifaces)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        entry = object_entry(path, ifaces)
        if None not in key:
            self._entries[path] = (key, entry)
        return entry

    def managed_objects(self, call: Message,
                        answer: Callable[[Optional[Pieces]], None]) -> None:
        """Answer a GetManagedObjects call: answer(body) with the reply's
        body (wire.assemble_array), or answer(None) if some object cannot
        be written here (the library's handler then answers, and reports
        whatever is wrong).
        Callers who ask before a body's writing begins share it: 100 callers
        at once cost a writing or two, not 100, and each gets a state read
        after its call."""
        answers = self._next_answers.get(call.path)
        if answers is None:
            answers = self._next_answers[call.path] = []
            task = asyncio.ensure_future(self._write_body(call.path, answers))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
        answers.append(answer)

    async def _write_body(self, root: str,
                          answers: List[Callable[[Optional[Pieces]], None]]) -> None:
        """Written in slices (at 10,000 objects, 30 ms from the cache and
        most of a second with nothing cached would otherwise stop the loop),
        and still as of one moment: what came, went or was signalled while
        it was being written is read again (in slices while there is much of
        it), the last of it without a pause, and the answers go in that same
        step. So no signal a caller receives before the reply says something
        newer than the reply."""
        if self._reply_turns is None:
            self._reply_turns = asyncio.Semaphore(CONCURRENT_REPLIES)
        prefix = root.rstrip("/") + "/"
        async with self._reply_turns:
            del self._next_answers[root]     # later callers wait for the next one
            touched: Set[str] = set()
            self._touched.append(touched)
            entries: Dict[str, bytes] = {}

            def read(path: str) -> None:
                ifaces = self._path_exports.get(path, [])
                if ifaces and (root == "/" or path.startswith(prefix)):
                    entries[path] = self._entry(path, ifaces)
                else:
                    entries.pop(path, None)

            async def read_all(paths: Iterable[str]) -> None:
                since = time.perf_counter()
                for path in paths:
                    read(path)
                    if time.perf_counter() - since > slices.SLICE:
                        await slices.next_slice()
                        since = time.perf_counter()
            body: Optional[Pieces] = None
            try:
                # (a path touched meanwhile is read below)
                await read_all(p for p in list(self._path_exports) if p not in touched)
                for _ in range(LAST_ROUNDS):
                    if len(touched) <= LAST_PATHS:
                        break
                    again = list(touched)
                    touched.clear()
                    await read_all(again)
                for path in list(touched):
                    read(path)
                body = assemble_array(list(entries.values()))
            except Exception:                  # a getter or value we cannot write
                pass
            finally:
                self._touched.remove(touched)
            for answer in answers:
                try:
                    answer(body)
                except Exception:      # (one caller's failure is not the others')
                    continue
