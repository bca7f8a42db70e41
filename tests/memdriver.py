"""An in-memory share driver for engine and API tests that need no storage.

It keeps its state in a JSON file (so restarts see it), enforces nothing, and
can be told to fail or stall a method through a control file, to test
rollback, recovery and responsiveness. Real-storage tests use the real drivers.
"""

import json
import os
import time

from sharedd.drivers.base import ShareDriver
from sharedd.errors import BackendFailure, InvalidArgument
from sharedd.models import ShareUpdate
from sharedd.options import Opt


class MemoryDriver(ShareDriver):
    driver_name = "memory"
    supported_protocols = ("NFS", "CIFS")
    access_types = {"NFS": ("ip",), "CIFS": ("ip", "user")}
    uses_export_helpers = False
    OPTIONS = [Opt("memory_capacity_gib", "float", 100.0, help="Pretend capacity.")]

    def _path(self):
        return os.path.join(self.state_dir, "memory.json")

    def _load(self):
        try:
            with open(self._path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"shares": {}, "snapshots": {}, "calls": []}

    def _save(self, st):
        with open(self._path(), "w") as f:
            json.dump(st, f)

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
        self._control(method)
        st = self._load()
        st["calls"].append([method, kw])
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

    def get_mount_hints(self, share):
        return {"fstype": "nfs4", "export": f"192.0.2.1:/{share.id}", "options": ["vers=4.1"]}
