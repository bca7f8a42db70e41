"""A third-party-style hook (loaded as module:Class) for hook tests.

It appends every call to <workdir>/hooklog.jsonl and obeys
<workdir>/hookctl.json: {"fail_pre": [methods], "fail_post": [methods],
"sleep_pre": seconds}; <workdir> is the parent of spool_dir.
"""

import json
import os
import time

from sharedd.hooks.base import Hook


class ControlledHook(Hook):
    def _dir(self):
        return os.path.dirname(self.context.spool_dir)

    def _ctl(self):
        try:
            with open(os.path.join(self._dir(), "hookctl.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _log(self, phase, record):
        with open(os.path.join(self._dir(), "hooklog.jsonl"), "a") as f:
            f.write(json.dumps({"phase": phase, "method": record["method"],
                                "seq": record["seq"]}) + "\n")

    def execute_pre_hook(self, record):
        ctl = self._ctl()
        time.sleep(ctl.get("sleep_pre", 0))
        self._log("pre", record)
        if record["method"] in ctl.get("fail_pre", []):
            raise RuntimeError("refused by the test hook")
        return {"pre_seq": record["seq"]}

    def execute_post_hook(self, record, pre_hook_data):
        self._log("post", record)
        # None when this hook's pre call failed with errors suppressed.
        if pre_hook_data is not None:
            assert pre_hook_data["pre_seq"] < record["seq"]
        if record["method"] in self._ctl().get("fail_post", []):
            raise RuntimeError("post hook failure from the test hook")

    def execute_periodic_hook(self, record):
        self._log("periodic", record)


class RecordingHook(Hook):
    """In-process tests: keeps every record in RecordingHook.records and
    fails the (phase, method) pairs listed in RecordingHook.fail."""

    records = []
    fail = set()

    def _take(self, phase, record):
        RecordingHook.records.append(record)
        if (phase, record["method"]) in RecordingHook.fail:
            raise RuntimeError(f"{phase} hook told to fail {record['method']}")

    def execute_pre_hook(self, record):
        self._take("pre", record)

    def execute_post_hook(self, record, pre_hook_data):
        self._take("post", record)

    def execute_periodic_hook(self, record):
        self._take("periodic", record)
