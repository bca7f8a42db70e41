"""The interface XML shipped in dbus/ matches the live daemon's introspection,
and introspection is complete (every argument named)."""

import os
import subprocess
import xml.etree.ElementTree as ET

from tests.test_api_memory import CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_xml_matches_live_introspection(sharedd_factory, system_bus):
    d = sharedd_factory(CONFIG)
    g = d.manager("CreateShareGroup", "sa{sv}", "introspected", 0)
    p = d.create_share("introspect", share_group=g)
    d.share(p, "CreateSnapshot", "sa{sv}", "s", 0)
    d.call(g, "org.sharedd.Sharedd1.ShareGroup", "CreateSnapshot", "sa{sv}", "gs", 0)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = subprocess.run(["/usr/bin/python3", os.path.join(REPO, "tools", "gen-dbus-xml"), "--check"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    names = sorted(f for f in os.listdir(os.path.join(REPO, "dbus")) if f.endswith(".xml"))
    assert names == [f"org.sharedd.Sharedd1.{i}.xml" for i in
                     ("Backend", "Hooks", "Job", "Manager", "Replica", "Share", "ShareGroup",
                      "ShareGroupSnapshot", "ShareNetwork", "ShareServer", "Snapshot")]
    for name in names:
        root = ET.parse(os.path.join(REPO, "dbus", name)).getroot()
        for arg in root.iter("arg"):
            assert arg.get("name"), f"{name}: unnamed argument {arg.attrib}"
