"""GetManagedObjects answered from kept, marshalled entries (sharedd.bus.
managed): the bytes are the library's own, and the answer follows every
change a caller can make."""

import random
import string

from dbus_next._private.marshaller import Marshaller
from dbus_next.signature import Variant

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from sharedd.bus.managed import SIGNATURE, object_entry
from sharedd.bus.wire import assemble_array
from tests.test_bus_wire import random_value
from tests.support.configs import MEMORY

MGR, SHARE = "org.sharedd.Sharedd1.Manager", "org.sharedd.Sharedd1.Share"
ROOT = "/org/sharedd/Sharedd1"


def _entry(path, interfaces):
    m = Marshaller("(oa{sa{sv}})", [[path, interfaces]])
    m.marshall()
    return bytes(m.buffer)


class Thing(ServiceInterface):
    def __init__(self, values):
        super().__init__("org.example.Thing")
        self.values = values

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.values["Name"]

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":
        return self.values["Size"]

    @dbus_property(access=PropertyAccess.READ)
    def Rules(self) -> "a(sssss)":
        return self.values["Rules"]

    @dbus_property(access=PropertyAccess.READ)
    def Meta(self) -> "a{ss}":
        return self.values["Meta"]


def test_entries_and_bodies_are_the_librarys_bytes():
    rng = random.Random(3)
    sigs = {"Name": "s", "Size": "t", "Rules": "a(sssss)", "Meta": "a{ss}"}
    for _ in range(200):
        tree = {}
        for k in range(rng.randint(0, 6)):
            vals = {n: random_value(rng, sig) for n, sig in sigs.items()}
            # in the order the library reads them
            tree[f"/o/n{k}"] = {p.name: Variant(sigs[p.name], vals[p.name])
                                for p in ServiceInterface._get_properties(Thing(vals))}
            assert object_entry(f"/o/n{k}", [Thing(vals)]) == \
                _entry(f"/o/n{k}", {"org.example.Thing": tree[f"/o/n{k}"]})
        whole = Marshaller(SIGNATURE, [{p: {"org.example.Thing": v} for p, v in tree.items()}])
        whole.marshall()
        entries = [object_entry(p, [Thing({n: x.value for n, x in v.items()})])
                   for p, v in tree.items()]
        assert assemble_array(entries) == bytes(whole.buffer)


def test_answers_follow_changes(sharedd_factory):
    import json
    d = sharedd_factory(MEMORY)

    def objects():
        proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", ROOT,
                            "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return json.loads(proc.stdout)["data"][0]

    def prop(objs, path, name):
        return objs[path][SHARE][name]["data"]
    p = d.create_share("a", size=1)
    objs = objects()
    assert prop(objs, p, "SizeGiB") == 1 and prop(objs, p, "AccessRules") == []
    objects()                                     # served from the kept entry
    rid = d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.1.2.3", "ro", 0)
    objs = objects()
    assert [r[2] for r in prop(objs, p, "AccessRules")] == ["10.1.2.3"]
    d.share(p, "Extend", "ta{sv}", 3, 0)
    assert prop(objects(), p, "SizeGiB") == 3
    d.share(p, "DenyAccess", "sa{sv}", rid, 0)
    assert prop(objects(), p, "AccessRules") == []
    q = d.create_share("b", size=2)
    objs = objects()
    assert prop(objs, q, "Name") == "b" and prop(objs, p, "Name") == "a"
    d.share(p, "Delete", "a{sv}", 0)
    objs = objects()
    assert p not in objs and q in objs
    # every object's answer equals what Properties.GetAll says about it
    for path, ifaces in objs.items():
        for name, props in ifaces.items():
            proc = d.bus.busctl("--json=short", "call", "org.sharedd.Sharedd1", path,
                                "org.freedesktop.DBus.Properties", "GetAll", "s", name)
            assert json.loads(proc.stdout)["data"][0] == props, (path, name)
