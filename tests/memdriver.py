"""An in-memory share driver for engine and API tests that need no storage.

It keeps its state in a JSON file (so restarts see it), enforces nothing, and
can be told to fail or stall a method through a control file, to test
rollback, recovery and responsiveness. Real-storage tests use the real drivers.
"""

import json
import os
import threading
import time

from sharedd.drivers.base import ShareDriver
from sharedd.errors import BackendFailure, Cancelled, InvalidArgument, NotSupported
from sharedd.models import ShareUpdate
from sharedd.options import Opt


#: calls remembered in memory.json (tests compare recent calls only)
MAX_CALLS = 2000
#: two memory backends' files change together when a copy lands
_MIGRATION_LOCK = threading.Lock()


def _serialised(cls):
    """Each driver method loads, changes and saves memory.json: one at a
    time, since the engine runs different shares' calls in parallel threads."""
    lock = threading.Lock()
    for name in ("create_share", "create_share_from_snapshot", "delete_share", "ensure_share",
                 "update_access", "extend_share", "shrink_share", "create_snapshot",
                 "delete_snapshot", "revert_to_snapshot", "manage_existing", "unmanage"):
        def method(self, *args, _fn=getattr(cls, name), _name=name, **kw):
            self._control(_name)   # a told stall or failure holds up no other share
            with lock:
                return _fn(self, *args, **kw)
        method.__name__ = name
        setattr(cls, name, method)
    return cls


@_serialised
class MemoryDriver(ShareDriver):
    driver_name = "memory"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    uses_export_helpers = False
    OPTIONS = [Opt("memory_capacity_gib", "float", 100.0, help="Pretend capacity.")]

    def _path(self):
        return os.path.join(self.state_dir, "memory.json")

    def _load(self):
        # Read once per process (this daemon is the file's only writer), so a
        # call costs one write, not a read and a write of every share.
        st = getattr(self, "_state", None)
        if st is None:
            try:
                with open(self._path()) as f:
                    st = json.load(f)
            except FileNotFoundError:
                st = {"shares": {}, "snapshots": {}, "calls": []}
            self._state = st
        return st

    def _save(self, st):
        tmp = self._path() + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(st, separators=(",", ":")))   # the C encoder: many times faster
        os.rename(tmp, self._path())   # readers (tests) never see half a file

    def _control(self, method):
        """control.json: {"fail": [methods], "sleep": {method: seconds}}"""
        try:
            with open(os.path.join(self.state_dir, "control.json")) as f:
                ctl = json.load(f)
        except FileNotFoundError:
            return
        time.sleep(ctl.get("sleep", {}).get(method, 0))
        if method in ctl.get("fail", []):
            raise BackendFailure(f"memory driver told to fail {method}")

    def _call(self, method, **kw):
        st = self._load()
        st["calls"] = st["calls"][-MAX_CALLS:] + [[method, kw]]
        return st

    def create_share(self, share):
        st = self._call("create_share", share=share.id)
        st["shares"][share.id] = {"size": share.size_gib, "rules": [], "data": "new"}
        self._save(st)
        return ShareUpdate(export_locations=[f"mem:/{share.id}"])

    def create_share_from_snapshot(self, share, snapshot, parent):
        st = self._call("create_share_from_snapshot", share=share.id, snapshot=snapshot.id)
        st["shares"][share.id] = {"size": share.size_gib, "rules": [],
                                  "data": st["snapshots"][snapshot.id]["data"]}
        self._save(st)
        return ShareUpdate(export_locations=[f"mem:/{share.id}"])

    def delete_share(self, share):
        st = self._call("delete_share", share=share.id)
        st["shares"].pop(share.id, None)
        self._save(st)

    def ensure_share(self, share, rules):
        st = self._call("ensure_share", share=share.id)
        if share.id not in st["shares"]:
            raise BackendFailure(f"share {share.id} is missing")
        st["shares"][share.id]["rules"] = sorted(r.access_to for r in rules)
        self._save(st)
        return ShareUpdate(export_locations=[f"mem:/{share.id}"])

    def update_access(self, share, access_rules, add_rules, delete_rules):
        st = self._call("update_access", share=share.id,
                        add=[r.access_to for r in add_rules], delete=[r.access_to for r in delete_rules])
        st["shares"][share.id]["rules"] = sorted(r.access_to for r in access_rules)
        self._save(st)

    def extend_share(self, share, new_size_gib):
        st = self._call("extend_share", share=share.id, size=new_size_gib)
        st["shares"][share.id]["size"] = new_size_gib
        self._save(st)

    def shrink_share(self, share, new_size_gib):
        st = self._call("shrink_share", share=share.id, size=new_size_gib)
        if new_size_gib < st["shares"][share.id].get("used", 0):
            raise InvalidArgument("would lose data")
        st["shares"][share.id]["size"] = new_size_gib
        self._save(st)

    def create_snapshot(self, snapshot, share):
        st = self._call("create_snapshot", snapshot=snapshot.id)
        st["snapshots"][snapshot.id] = {"data": st["shares"][share.id]["data"]}
        self._save(st)
        return f"snap/{snapshot.id}"

    def delete_snapshot(self, snapshot, share):
        st = self._call("delete_snapshot", snapshot=snapshot.id)
        st["snapshots"].pop(snapshot.id, None)
        self._save(st)

    def snapshot_update_access(self, snapshot, share, access_rules, add_rules, delete_rules):
        st = self._call("snapshot_update_access", snapshot=snapshot.id,
                        add=[r.access_to for r in add_rules],
                        delete=[r.access_to for r in delete_rules])
        st["snapshots"][snapshot.id]["rules"] = sorted(r.access_to for r in access_rules)
        self._save(st)
        return [f"mem:/{snapshot.id}"] if access_rules else []

    def revert_to_snapshot(self, share, snapshot, rules):
        st = self._call("revert_to_snapshot", share=share.id, snapshot=snapshot.id)
        st["shares"][share.id]["data"] = st["snapshots"][snapshot.id]["data"]
        self._save(st)
        return ShareUpdate()

    def manage_existing(self, share, export_path, options):
        st = self._call("manage_existing", share=share.id, path=export_path)
        st["shares"][share.id] = {"size": options.get("size_gib", 3), "rules": [], "data": export_path}
        self._save(st)
        return ShareUpdate(export_locations=[f"mem:{export_path}"], provider_location=export_path,
                           size_gib=options.get("size_gib", 3))

    def unmanage(self, share):
        st = self._call("unmanage", share=share.id)
        st["shares"].pop(share.id, None)
        self._save(st)

    def get_share_stats(self):
        cap = float(self.config.memory_capacity_gib)
        return {"total_capacity_gb": cap, "free_capacity_gb": cap}

    # migration between two memory backends: MIGRATION_STEPS steps of a
    # copy, each sleeping control.json's sleep["migration_step"] seconds
    MIGRATION_STEPS = 10

    def migration_check_compatibility(self, share, dest_driver):
        if not isinstance(dest_driver, MemoryDriver):
            raise NotSupported("the memory driver migrates only to memory backends")
        return {"compatible": True, "writable": True, "nondisruptive": False,
                "preserve_snapshots": False, "driver_assisted": True}

    def _copy(self, method, share, dest_driver, progress, cancel):
        for step in range(1, self.MIGRATION_STEPS + 1):
            self._control(method)
            try:
                with open(os.path.join(self.state_dir, "control.json")) as f:
                    cancel.wait(json.load(f).get("sleep", {}).get("migration_step", 0))
            except FileNotFoundError:
                pass
            if cancel.is_set():
                raise Cancelled(f"{method} of share {share.id} cancelled")
            progress(step * 1000, self.MIGRATION_STEPS * 1000)
        with _MIGRATION_LOCK:
            src = self._load()["shares"][share.id]
            st = dest_driver._call(method, share=share.id)
            st["shares"][share.id] = {"size": share.size_gib, "rules": [], "data": src["data"]}
            dest_driver._save(st)

    def migration_start(self, share, dest_share, dest_driver, progress, cancel):
        self._copy("migration_start", share, dest_driver, progress, cancel)
        return {"method": "memory"}

    def migration_complete(self, share, dest_share, dest_driver, state, progress, cancel):
        self._copy("migration_complete", share, dest_driver, progress, cancel)

    def migration_cancel(self, share, dest_share, dest_driver, state):
        with _MIGRATION_LOCK:
            st = dest_driver._call("migration_cancel", share=share.id)
            st["shares"].pop(share.id, None)
            dest_driver._save(st)

    def get_mount_hints(self, share):
        return {"fstype": "nfs4", "export": f"192.0.2.1:/{share.id}", "options": ["vers=4.1"]}


class Crash(BaseException):
    """A simulated SIGKILL at a driver boundary (in-process tests): not an
    Exception, so nothing in the engine can catch it and carry on."""


class World:
    """What a SimDriver backend holds; outlives engine restarts."""

    def __init__(self):
        self.shares = {}       # share id -> {"size": int, "rules": {rule id: access_to}}
        self.snapshots = {}    # snapshot id -> share id
        self.snapshot_rules = {}   # snapshot id -> {rule id: access_to} it is exported to
        self.loose = {}        # snapshots no one manages: location -> share id
        self.fail = set()      # methods that raise BackendFailure
        self.crash = None      # (method, "before" | "after"): raise Crash once
        self.calls = []
        self.servers = {}      # share server id -> its address


class SimDriver(ShareDriver):
    """The in-process twin of MemoryDriver: state in memory (SimDriver.worlds,
    keyed by the backend's state directory), faults set directly by tests."""

    driver_name = "sim"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    uses_export_helpers = False
    OPTIONS = [Opt("sim_capacity_gib", "float", 1000.0, help="Pretend capacity.")]
    worlds = {}

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.w = SimDriver.worlds.setdefault(self.state_dir, World())

    def _act(self, method, work):
        w = self.w
        w.calls.append(method)
        if w.crash == (method, "before"):
            w.crash = None
            raise Crash(method)
        if method in w.fail:
            raise BackendFailure(f"sim driver told to fail {method}")
        result = work()
        if w.crash == (method, "after"):
            w.crash = None
            raise Crash(method)
        return result

    def _rules(self, rules):
        return {r.id: r.access_to for r in rules}

    def create_share(self, share):
        def work():
            self.w.shares[share.id] = {"size": share.size_gib, "rules": {}}
            return ShareUpdate(export_locations=[f"sim:/{share.id}"],
                               provider_location=f"sim/{share.id}")
        return self._act("create_share", work)

    def create_share_from_snapshot(self, share, snapshot, parent):
        def work():
            self.w.shares[share.id] = {"size": share.size_gib, "rules": {}}
            return ShareUpdate(export_locations=[f"sim:/{share.id}"])
        return self._act("create_share_from_snapshot", work)

    def delete_share(self, share):
        return self._act("delete_share",
                         lambda: self.w.shares.pop(self._key(share), None) and None)

    def ensure_share(self, share, rules):
        def work():
            if self._key(share) not in self.w.shares:
                raise BackendFailure(f"share {share.id} is missing")
            self.w.shares[self._key(share)]["rules"] = self._rules(rules)
            self.w.shares[self._key(share)]["levels"] = {r.id: r.access_level for r in rules}
            return ShareUpdate(export_locations=[f"sim:/{share.id}"])
        return self._act("ensure_share", work)

    def update_access(self, share, access_rules, add_rules, delete_rules):
        def work():
            self.w.shares[self._key(share)]["rules"] = self._rules(access_rules)
            self.w.shares[self._key(share)]["levels"] = {r.id: r.access_level
                                                         for r in access_rules}
        return self._act("update_access", work)

    def extend_share(self, share, new_size_gib):
        return self._act("extend_share",
                         lambda: self.w.shares[self._key(share)].update(size=new_size_gib))

    def shrink_share(self, share, new_size_gib):
        return self._act("shrink_share",
                         lambda: self.w.shares[share.id].update(size=new_size_gib))

    def create_snapshot(self, snapshot, share):
        def work():
            self.w.snapshots[snapshot.id] = share.id
            return f"snap/{snapshot.id}"
        return self._act("create_snapshot", work)

    def delete_snapshot(self, snapshot, share):
        return self._act("delete_snapshot", lambda: self.w.snapshots.pop(snapshot.id, None) and None)

    def revert_to_snapshot(self, share, snapshot, rules):
        return self._act("revert_to_snapshot", lambda: ShareUpdate())

    def snapshot_update_access(self, snapshot, share, access_rules, add_rules, delete_rules):
        def work():
            self.w.snapshot_rules[snapshot.id] = self._rules(access_rules)
            return [f"sim:/{snapshot.id}"] if access_rules else []
        return self._act("snapshot_update_access", work)

    def create_share_group(self, group):
        return self._act("create_share_group", lambda: None)

    def delete_share_group(self, group):
        return self._act("delete_share_group", lambda: None)

    def check_manage_snapshot(self, share, provider_location):
        if self.w.loose.get(provider_location) != self._key(share):
            raise InvalidArgument(f"{provider_location} is no snapshot of share {share.id}")
        return provider_location

    def manage_existing_snapshot(self, snapshot, share, provider_location):
        def work():
            self.check_manage_snapshot(share, provider_location)
            self.w.snapshots[snapshot.id] = self.w.loose.pop(provider_location)
            return 1
        return self._act("manage_existing_snapshot", work)

    def unmanage_snapshot(self, snapshot, share):
        def work():
            owner = self.w.snapshots.pop(snapshot.id, None)
            if owner is not None:
                self.w.loose[snapshot.provider_location or f"snap/{snapshot.id}"] = owner
        return self._act("unmanage_snapshot", work)

    def check_manage(self, export_path, options):
        if not export_path.startswith("/sim/"):
            raise InvalidArgument(f"{export_path} is not under /sim/")

    def manage_existing(self, share, export_path, options):
        def work():
            self.check_manage(export_path, options)
            self.w.shares[share.id] = {"size": 2, "rules": {}}
            return ShareUpdate(export_locations=[f"sim:{export_path}"],
                               provider_location=export_path, size_gib=2)
        return self._act("manage_existing", work)

    def unmanage(self, share):
        return self._act("unmanage", lambda: self.w.shares.pop(self._key(share), None) and None)

    # share servers: set up, ensured and torn down in the world
    def setup_server(self, server, network_info):
        def work():
            self.w.servers[server.id] = network_info.address.split("/")[0]
            return {"address": self.w.servers[server.id]}
        return self._act("setup_server", work)

    def ensure_server(self, server, network_info):
        def work():
            self.w.servers[server.id] = network_info.address.split("/")[0]
            return {"address": self.w.servers[server.id]}
        return self._act("ensure_server", work)

    def teardown_server(self, server):
        return self._act("teardown_server", lambda: self.w.servers.pop(server.id, None) and None)

    def get_share_stats(self):
        cap = float(self.config.sim_capacity_gib)
        return {"total_capacity_gb": cap, "free_capacity_gb": cap}

    # migration to another sim backend: the share's entry copied into its world
    # replication to another sim backend: the share's entry (its "data" and
    # snapshots) copied under the replica's id, which its provider location names
    def replica_sync(self, share, replica, dest_driver, state, snapshots, progress, cancel):
        def work():
            if not isinstance(dest_driver, SimDriver):
                raise NotSupported("the sim driver replicates only to sim backends")
            if cancel.is_set():
                raise Cancelled("cancelled")
            if self._key(share) not in self.w.shares:
                raise BackendFailure(f"share {share.id} is missing")
            source = self.w.shares[self._key(share)]
            entry = dest_driver.w.shares.setdefault(dest_driver._key(replica), {"rules": {}})
            entry.update(size=share.size_gib, data=source.get("data"))
            for snap in snapshots:
                dest_driver.w.snapshots[snap.id] = replica.id
            progress(1, 1)
            n = int(state.get("n", 0)) + 1
            return {"base": f"{replica.id}.{n}", "n": n,
                    "provider_location": f"sim/{dest_driver._key(replica)}"}
        return self._act("replica_sync", work)

    def replica_unserve(self, replica):
        def work():
            if self._key(replica) in self.w.shares:
                self.w.shares[self._key(replica)].update(rules={}, levels={})
        return self._act("replica_unserve", work)

    def replica_remove(self, share, replica, state, snapshots, source):
        def work():
            self.w.shares.pop(self._key(replica), None)
            for snap in snapshots:
                self.w.snapshots.pop(snap.id, None)
        return self._act("replica_remove", work)

    @staticmethod
    def _key(share):
        """Where a share's entry is: a replica's (or a promoted one's) under its
        provider location, any other under its id."""
        loc = share.provider_location
        return loc[4:] if loc.startswith("sim/") else share.id

    def migration_check_compatibility(self, share, dest_driver):
        if not isinstance(dest_driver, SimDriver):
            raise NotSupported("the sim driver migrates only to sim backends")
        return {"compatible": True, "driver_assisted": True}

    def _copy_to(self, dest_driver, share, progress, cancel):
        if cancel.is_set():
            raise Cancelled("cancelled")
        dest_driver.w.shares[share.id] = {"size": share.size_gib, "rules": {},
                                          "copy_of": self.backend_name}
        progress(1, 1)

    def migration_start(self, share, dest_share, dest_driver, progress, cancel):
        return self._act("migration_start",
                         lambda: self._copy_to(dest_driver, share, progress, cancel)
                         or {"method": "sim"})

    def migration_complete(self, share, dest_share, dest_driver, state, progress, cancel):
        return self._act("migration_complete",
                         lambda: self._copy_to(dest_driver, share, progress, cancel))

    def migration_cancel(self, share, dest_share, dest_driver, state):
        return self._act("migration_cancel",
                         lambda: dest_driver.w.shares.pop(share.id, None) and None)

    def get_mount_hints(self, share):
        return {"fstype": "nfs4", "export": f"192.0.2.1:/{share.id}", "options": ["vers=4.1"]}
