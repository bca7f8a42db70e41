"""mountd under faults: commands that hang (their whole process group is
killed on timeout) and a state directory that is full or read-only."""

import errno
import logging
import os
import stat
import subprocess
import time

import pytest

import mountd.mounter as mounter_mod
from mountd.mounter import Mounter
from mountd.reconcile import Desired
from mountd.state import OwnMount, StateStore
from sharedd.errors import BackendFailure
from sharedd.util import run
from tests.support import components

HANG = """#!/bin/sh
# A helper that starts a helper of its own and hangs (mount -> mount.nfs).
sleep 300 &
echo $! >> {pidfile}
exec sleep 300
"""


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """pid no longer runs (gone, or a zombie waiting for init to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _pids(pidfile: str):
    with open(pidfile) as f:
        return [int(line) for line in f if line.strip()]


def _kill_leftovers(pidfile: str) -> None:
    if os.path.exists(pidfile):
        for pid in _pids(pidfile):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.fixture
def hang_script(mountd_tmp):
    pidfile = os.path.join(mountd_tmp, "pids")
    script = os.path.join(mountd_tmp, "hang")
    with open(script, "w") as f:
        f.write(HANG.format(pidfile=pidfile))
    os.chmod(script, 0o755)
    try:
        yield script, pidfile
    finally:
        _kill_leftovers(pidfile)


def test_timeout_kills_the_whole_process_group(hang_script):
    script, pidfile = hang_script
    start = time.monotonic()
    with pytest.raises(BackendFailure, match="timed out"):
        run([script], timeout=1, new_session=True)
    assert time.monotonic() - start < 15
    [grandchild] = _pids(pidfile)
    assert _gone(grandchild), f"helper {grandchild} outlived the timeout"


def test_timeout_without_a_session_is_unchanged(hang_script):
    """Existing callers (no new_session) still get BackendFailure on timeout."""
    script, pidfile = hang_script
    with pytest.raises(BackendFailure, match="timed out"):
        run([script], timeout=1)
    assert run(["sh", "-c", "cat; echo err >&2; exit 3"], input=b"in", check=False).stdout == b"in"


def test_run_in_a_session_returns_output_and_fails_like_run():
    proc = run(["sh", "-c", "cat; ps -o sid= -p $$"], input=b"hello\n", new_session=True)
    out = proc.stdout.decode().split()
    assert out[0] == "hello" and int(out[1]) != os.getsid(0)
    with pytest.raises(BackendFailure, match=r"exit 3\): oops"):
        run(["sh", "-c", "echo oops >&2; exit 3"], new_session=True)
    assert run(["sh", "-c", "exit 4"], check=False, new_session=True).returncode == 4


def test_a_command_that_says_too_much_is_stopped(monkeypatch):
    """What a command writes is read into memory (a remote host's, over
    ssh, among them): beyond MAX_OUTPUT on stdout or stderr it is killed
    and the call fails; up to it, input and output go through whole."""
    from sharedd import util
    monkeypatch.setattr(util, "MAX_OUTPUT", 1 << 20)
    for session in (False, True):
        for argv, stream in ((["yes"], "stdout"), (["sh", "-c", "yes >&2"], "stderr")):
            with pytest.raises(BackendFailure, match=f"more than 1048576 bytes to {stream}"):
                run(argv, new_session=session, timeout=30)
        data = os.urandom(900_000)
        assert run(["cat"], input=data, new_session=session).stdout == data
    # (a command that stops reading its input early is not an error by itself)
    assert run(["head", "-c", "10"], input=b"x" * (4 << 20)).stdout == b"x" * 10


def _desired():
    return Desired("a" * 32, "x", "h", "NFS", "nfs4", "10.74.0.1:/x", "rw", ())


@pytest.mark.parametrize("action", ["mount", "unmount"])
def test_mounter_kills_hung_mount_helpers(hang_script, mountd_tmp, monkeypatch, action):
    script, pidfile = hang_script
    mp = os.path.join(mountd_tmp, "mnt", "x-aaaaaaaa")
    os.makedirs(mp)
    monkeypatch.setattr(mounter_mod, "MOUNT", script)
    monkeypatch.setattr(mounter_mod, "UMOUNT", script)
    m = Mounter(timeout=1, mount_dir=os.path.join(mountd_tmp, "mnt"))
    with pytest.raises(BackendFailure, match="timed out"):
        m.mount(_desired(), mp) if action == "mount" else m.unmount(mp)
    pids = _pids(pidfile)
    # unmount tries a plain, then a lazy unmount: two hung helpers.
    assert len(pids) == (1 if action == "mount" else 2)
    assert all(_gone(p) for p in pids), pids


def _own(i: int) -> OwnMount:
    return OwnMount(share_id=f"{i:032x}", share_name=f"s{i}", host="h",
                    mount_point=f"/mnt/shares/s{i}", export="10.74.0.1:/x", fstype="nfs4",
                    level="rw", options=["vers=4.1"], state="mounted", mount_id=100 + i)


def _fill(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_state_dir_full_or_read_only_is_logged_once_per_error(mountd_tmp, caplog):
    state = os.path.join(mountd_tmp, "state")
    os.mkdir(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "tmpfs", state],
                   check=True, capture_output=True, timeout=30)
    components.used("tmpfs (full / read-only state directory)")
    store = StateStore(state)
    mounts = {m.share_id: m for m in (_own(1), _own(2))}
    assert store.save(mounts) is True
    _fill(os.path.join(state, "filler"))
    caplog.set_level(logging.INFO, logger="mountd.state")

    def errors():
        return [r for r in caplog.records if r.name == "mountd.state" and r.levelno >= logging.ERROR]

    mounts[_own(3).share_id] = _own(3)
    for _ in range(4):
        assert store.save(mounts) is False
    assert len(errors()) == 1
    assert "No space left" in errors()[0].getMessage()
    assert errors()[0].exc_info is None          # one line, no traceback
    # The last good record is intact, and no temporary file is left behind.
    assert set(store.load()) == {_own(1).share_id, _own(2).share_id}
    assert sorted(os.listdir(state)) == ["filler", "mounts.json"]
    # Another error is another line (once).
    subprocess.run(["mount", "-o", "remount,ro", state], check=True, capture_output=True,
                   timeout=30)
    for _ in range(3):
        assert store.save(mounts) is False
    assert len(errors()) == 2 and "Read-only" in errors()[1].getMessage()
    # Saving works again: said once, and the record is current.
    subprocess.run(["mount", "-o", "remount,rw", state], check=True, capture_output=True,
                   timeout=30)
    os.unlink(os.path.join(state, "filler"))
    caplog.clear()
    for _ in range(3):
        assert store.save(mounts) is True
    again = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(again) == 1 and not errors()
    assert set(store.load()) == set(mounts)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o644
    # A later failure is reported afresh.
    _fill(os.path.join(state, "filler"))
    assert store.save(mounts) is False and len(errors()) == 1
