"""Limits and the single instance, against the real daemon on a private bus
(in-memory driver): 5,000 rules then one more on a share is a named error and
the daemon restarts clean; a second daemon on the same state directory
refuses before it touches the database."""

import json
import os
import subprocess

from tests.support import configs

SHARE = "org.sharedd.Sharedd1.Share"
ERR = "org.sharedd.Sharedd1.Error."





def seed_rules(db_path, share_id, count):
    """Rules written straight into the stopped daemon's database, as many
    AllowAccess calls would have left them (the API's own cost per rule at
    thousands of rules is measured under bench/, not here)."""
    import sqlite3
    db = sqlite3.connect(db_path)
    with db:
        db.executemany("INSERT INTO rules(id, share_id, access_type, access_to, access_level,"
                       " state, created_at) VALUES(?,?,?,?,?,?,?)",
                       [(f"{i:032x}", share_id, "ip", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                         "ro", "active", i) for i in range(1, count + 1)])
    db.close()


def test_rule_limit_is_a_named_error_and_restart_is_clean(sharedd_factory):
    from sharedd import constants as C
    limit = C.MAX_ACCESS_RULES_PER_SHARE
    d = sharedd_factory(configs.memory(hook_drivers="spool, dbus", enable_pre_hooks="true",
                                       enable_post_hooks="true"))
    path = d.create_share("crowded")
    d.stop()
    seed_rules(os.path.join(d.workdir, "state", "sharedd.db"), path.rsplit("/", 1)[1], limit - 3)
    d.start()       # recovery and ensure with thousands of rules
    for i in range(3):
        d.share(path, "AllowAccess", "sssa{sv}", "ip", f"192.0.2.{i + 1}", "rw", 0)
    text = d.error(path, SHARE, "AllowAccess", "sssa{sv}", "ip", "192.0.2.99", "rw", 0)
    assert ERR + "CapacityExceeded" in text and "max_access_rules_per_share" in text, text
    rules = d.share_prop(path, "AccessRules")
    assert len(rules) == limit and {r[4] for r in rules} == {"active"}
    d.restart()
    assert d.share_prop(path, "Status") == "available"
    assert len(d.share_prop(path, "AccessRules")) == limit
    # A deny and a delete announce the full rule set: records within the schema.
    d.share(path, "DenyAccess", "sa{sv}", rules[0][0], 0)
    d.share(path, "Delete", "a{sv}", 0)
    spool = os.path.join(d.workdir, "spool", "storage1")
    pre_delete = [n for n in os.listdir(spool) if n.endswith("-pre-delete_share.json")]
    assert len(json.load(open(os.path.join(spool, pre_delete[0])))["share"]["access_rules"]) \
        == limit - 1


def test_second_daemon_on_the_same_state_refuses(sharedd_factory):
    d = sharedd_factory(configs.MEMORY)
    path = d.create_share("first")
    db = os.path.join(d.workdir, "state", "sharedd.db")
    before = os.stat(db).st_mtime_ns
    log = os.path.join(d.workdir, "second.log")
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/python3", "-m", "sharedd", "--config", d.config_path],
                              env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=d.bus.address,
                                       PYTHONPATH=os.path.dirname(os.path.dirname(__file__))),
                              stdout=out, stderr=subprocess.STDOUT, timeout=60)
    text = open(log).read()
    assert proc.returncode == 1, text
    assert f"another sharedd (pid {d.proc.pid}) is using the state directory" in text, text
    assert os.stat(db).st_mtime_ns == before, "the second daemon touched the database"
    assert d.share_prop(path, "Status") == "available"
    assert d.manager("ListShares", "a{sv}", 0) == [path]
    assert json.loads(json.dumps(d.share_prop(path, "AccessRules"))) == []
