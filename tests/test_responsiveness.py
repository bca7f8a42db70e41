"""The bus never blocks on a slow backend: reads answer while an operation is
in flight; operations on other shares proceed; operations on the same share
wait their turn (serialised)."""

import json
import os
import subprocess
import time

CONFIG = """
[DEFAULT]
enabled_share_backends = mem
state_path = @WORK@/state
spool_dir = @WORK@/spool

[mem]
share_driver = tests.memdriver:MemoryDriver
"""


def test_slow_backend_keeps_bus_responsive(sharedd_factory, system_bus):
    d = sharedd_factory(CONFIG)
    a = d.create_share("a")
    b = d.create_share("b")
    with open(os.path.join(d.workdir, "state", "backends", "mem", "control.json"), "w") as f:
        json.dump({"sleep": {"extend_share": 4}}, f)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    slow = subprocess.Popen(["busctl", "--system", "call", "org.sharedd.Sharedd1", a,
                             "org.sharedd.Sharedd1.Share", "Extend", "ta{sv}", "2", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    # Reads answer and show the operation in flight.
    assert d.share_prop(a, "Status") == "extending"
    # Another share is not held up.
    d.share(b, "AllowAccess", "sssa{sv}", "ip", "10.0.0.9", "rw", 0)
    assert slow.poll() is None, "share b's change completed while a's extend was running"
    # The same share waits for the running operation, then proceeds.
    rid = d.share(a, "AllowAccess", "sssa{sv}", "ip", "10.0.0.8", "rw", 0)
    assert slow.wait(30) == 0
    assert d.share_prop(a, "SizeGiB") == 2
    assert [r[0] for r in d.share_prop(a, "AccessRules")] == [rid]
