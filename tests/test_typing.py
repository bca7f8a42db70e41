"""The core modules (engine, runner, state table, store, models, access,
recovery, backend, share servers and their runtime, the mount table, the bus object tree, its slices, wire format and reading,
the btrfs kernel calls, the audit records, the migration data movers and the small
utilities, the collector's pauses, the refusal log) type-check with mypy --strict."""

import pathlib
import subprocess

from tests.support import components

REPO = pathlib.Path(__file__).resolve().parent.parent
CORE = ["engine", "operation", "states", "store", "models", "access", "recovery", "backend",
        "mountinfo", "bus/managed", "bus/slices", "bus/wire", "bus/audit", "bus/reading",
        "drivers/btrfs_kernel",
        "util", "share_servers", "netns", "service_instance", "jobs", "migration", "transfer",
        "replication", "snapshots", "snapshot_access", "schedule", "share_groups", "metrics",
        "collector", "refusals"]


def test_core_modules_are_strictly_typed(tmp_path):
    proc = subprocess.run(["mypy", "--strict", "--follow-imports=silent", "--ignore-missing-imports",
                           "--cache-dir", str(tmp_path / "cache"),
                           *[f"sharedd/{m}.py" for m in CORE]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    components.used("mypy --strict (core modules)")
