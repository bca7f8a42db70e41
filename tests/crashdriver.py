"""The real btrfs driver, plus a crash switch for recovery tests.

When <state_dir>/crash.json says {"method": M, "when": "before"|"after"},
the daemon SIGKILLs itself right before or right after the driver runs M
(once: the file is removed first). "before" is after sharedd recorded the
intent; "after" is when the storage changed but sharedd has not recorded it.
"""

import json
import os
import signal

from sharedd.drivers.btrfs import BtrfsDriver

METHODS = ("create_share", "create_share_from_snapshot", "delete_share", "create_snapshot",
           "delete_snapshot", "revert_to_snapshot", "update_access", "extend_share",
           "shrink_share", "manage_existing", "unmanage", "setup_server", "teardown_server",
           "create_share_group_snapshot", "delete_share_group_snapshot",
           "snapshot_update_access")


class CrashingBtrfsDriver(BtrfsDriver):
    def _maybe_crash(self, method: str, when: str) -> None:
        path = os.path.join(self.state_dir, "crash.json")
        try:
            with open(path) as f:
                want = json.load(f)
        except FileNotFoundError:
            return
        if want.get("method") == method and want.get("when") == when:
            os.unlink(path)
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(name):
    real = getattr(BtrfsDriver, name)

    def method(self, *args, **kwargs):
        self._maybe_crash(name, "before")
        result = real(self, *args, **kwargs)
        self._maybe_crash(name, "after")
        return result
    method.__name__ = name
    return method


for _name in METHODS:
    setattr(CrashingBtrfsDriver, _name, _wrap(_name))


def crash_during(h, backend: str, method: str, when: str, call) -> None:
    """Make the daemon of handle h (tests/fixtures/sharedd_daemon.Sharedd)
    SIGKILL itself around backend's driver method during call(), then
    start it again."""
    with open(os.path.join(h.state_path, "backends", backend, "crash.json"), "w") as f:
        json.dump({"method": method, "when": when}, f)
    proc = call()
    assert proc.returncode != 0, "the call should have been cut by the crash"
    h.proc.wait(timeout=30)
    assert h.proc.returncode == -9
    h._close()
    h.start()
