"""The benchmark scripts under bench/ keep working: each runs in its short
(smoke) form and prints its table. Their figures are recorded in
BENCHMARKS.md; nothing here asserts a timing."""

import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, header", [
    (["bench/api", "--shares", "10"], "daemon RSS"),    # then the collector's figure
    (["bench/api", "--shares", "5", "--hooks"], "RunPeriodicHooks by 20 callers at once"),
    (["bench/api", "--shares", "5", "--loop-steps"], "loop step"),
    (["bench/concurrency", "--smoke"], "calls/s"),
    (["bench/concurrency", "--smoke", "--memory"], "calls/s"),
    (["bench/ops", "--smoke"], "hooks off"),
    (["bench/records", "--smoke"], "record written"),
    (["bench/state", "--smoke"], "WAL pages/commit"),
    (["bench/snapshots", "--smoke"], "operation, share"),
    (["bench/cifs", "--smoke"], "CIFS operation"),
    (["bench/scale", "--smoke"], "sharedd's own +ms"),
    (["bench/mountd", "--smoke"], "mountd p50"),
    (["bench/remote", "--smoke"], "mountd p50"),
    pytest.param(["bench/servers", "--smoke"], "server set-up", id="servers"),
    pytest.param(["bench/migration", "--smoke"], "share migration times", id="migration"),
    pytest.param(["bench/replication", "--smoke"], "share replication times", id="replication"),
])
def test_bench_script_runs(argv, header, request):
    if argv[0] == "bench/remote":
        request.getfixturevalue("qemu_guest_image")   # built (or found) like the tests' own
    proc = subprocess.run(["/usr/bin/python3", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert header in proc.stdout, proc.stdout
    table = proc.stdout.split(header, 1)[1].splitlines()[1:]
    assert any(any(c.isdigit() for c in line) for line in table), proc.stdout
