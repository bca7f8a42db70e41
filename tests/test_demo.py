"""The README's first command, as written: `tools/demo` (as root) runs to the
end, shows what it claims, and leaves nothing behind; Ctrl-C in the middle
cleans up too, without a traceback."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time

from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent


def snapshot_of_the_machine():
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    mounts = pathlib.Path("/proc/self/mountinfo").read_text()
    return (sorted(netns.splitlines()), sorted(loops.splitlines()),
            sorted(line.split(" ", 4)[4] for line in mounts.splitlines()))


def demo_dir(output: str) -> str:
    m = re.search(r"unix:path=(/tmp/sharedd-demo-[^/]+)/system_bus_socket", output)
    assert m, output[:2000]
    return m.group(1)


def nothing_left(before, workdir: str) -> None:
    assert snapshot_of_the_machine() == before
    assert not os.path.exists(workdir)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert workdir.encode() not in cmdline, (pid, cmdline)


def test_tools_demo_runs_as_the_readme_says():
    before = snapshot_of_the_machine()
    proc = subprocess.run([str(REPO / "tools/demo")], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    components.used("tools/demo (the README's first command)")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.startswith("install-deps: ")
    for expected in ("alice: can list; write OK",
                     "bob: can list; write refused: read-only file system",
                     "eve: no access",
                     "alice.txt changed on the server: changed on the server",
                     "alice.txt after revert: written by alice",
                     "t 2",                                     # SizeGiB after Extend
                     '"method": "allow_access"',                # a whole record
                     "-m mountd --config",
                     "done: everything the demo started is stopped and removed"):
        assert expected in out, expected
    assert "Traceback" not in out + proc.stderr
    nothing_left(before, demo_dir(out))


def test_ctrl_c_cleans_up_without_a_traceback():
    before = snapshot_of_the_machine()
    # A terminal's Ctrl-C: SIGINT to the whole foreground process group.
    proc = subprocess.Popen([str(REPO / "tools/demo")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "grant alice rw and bob ro" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "interrupted: everything the demo had started is stopped and removed" in err
    assert "Traceback" not in out + err, err[-3000:]
    nothing_left(before, demo_dir(out))
