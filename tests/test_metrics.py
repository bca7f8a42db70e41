"""Metrics for the node exporter's textfile collector, from both daemons:
the files parse by the Prometheus text-format rules (Debian's
prometheus_client parser, plus the ordering rules it does not check), are
replaced atomically, and count what happened."""

from __future__ import annotations

import os
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.storage_host import destroy_storage_host, make_storage_host
from tests.fixtures.mountd_env import CLIENT4, HOST, make_record, make_share, rule, write_record
from tests.support import components
from tests.test_api_memory import CONFIG
from tests.test_mountd_daemon import Mountd, wait_state

GiB = 1 << 30
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*",?)*\})? '
                     r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def strict(text: str) -> dict:
    """Families by name, after the format's rules: a HELP and a TYPE line
    before a family's samples, every sample line well formed, each family
    in one block; then parsed by prometheus_client."""
    assert text.endswith("\n")
    seen, current, typed = set(), None, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            assert current not in seen, f"{current} appears in two blocks"
            seen.add(current)
        elif line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert name == current and kind in ("counter", "gauge", "histogram")
            typed[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert current in typed and m.group(1).startswith(current), line
    families = {f.name: f for f in text_string_to_metric_families(text)}
    components.used("Prometheus text format parser (python3-prometheus-client)")
    return families


def value(families, metric, **labels):
    """One sample's value (counter families are named without _total)."""
    fam = families.get(metric) or families[re.sub(r"_(total|count|sum|bucket)$", "", metric)]
    found = [s.value for s in fam.samples
             if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric, labels, fam.samples)
    return found[0]


def read_when(path, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if text and predicate(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{path} never matched:\n{text}")


@pytest.fixture
def metrics_dir(tmp_path):
    path = tmp_path / "node-exporter"
    path.mkdir()
    return path


def test_sharedd_metrics(sharedd_factory, metrics_dir):
    prom = metrics_dir / "sharedd.prom"
    d = sharedd_factory(CONFIG.replace("host_id = storage1", "host_id = storage1\n"
                                       f"metrics_path = {prom}\nmetrics_interval = 0.2"))
    p = d.create_share("counted", "NFS", 3)
    d.share(p, "AllowAccess", "sssa{sv}", "ip", "10.0.0.0/24", "rw", 0)
    d.share(p, "CreateSnapshot", "sa{sv}", "s1", 0)
    d.create_share("other", "NFS", 1, backend="mem2")
    d.error(p, "org.sharedd.Sharedd1.Share", "Extend", "ta{sv}", 1, 0)   # refused: no op
    share_id = p.rsplit("/", 1)[1]
    text = read_when(str(prom), lambda t: 'method="create_snapshot"' in t)
    fams = strict(text)
    assert value(fams, "sharedd_shares", backend="mem1", status="available") == 1
    assert value(fams, "sharedd_shares", backend="mem2", status="available") == 1
    assert value(fams, "sharedd_snapshots", backend="mem1", status="available") == 1
    assert value(fams, "sharedd_access_rules", backend="mem1", state="active") == 1
    assert value(fams, "sharedd_share_provisioned_bytes", share=share_id,
                 name="counted", backend="mem1") == 3 * GiB
    assert value(fams, "sharedd_backend_up", backend="mem2") == 1
    assert value(fams, "sharedd_backend_capacity_bytes", backend="mem2", kind="total") == 5 * GiB
    assert value(fams, "sharedd_backend_capacity_bytes", backend="mem1",
                 kind="provisioned") == 3 * GiB
    assert value(fams, "sharedd_operations_total", method="create_share", outcome="ok") == 2
    assert value(fams, "sharedd_operations_total", method="allow_access", outcome="ok") == 1
    assert "extend_share" not in text, "a refused call runs no operation"
    hist = fams["sharedd_operation_duration_seconds"]
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")
               and s.labels["method"] == "create_share"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf" and counts[-1] == 2
    assert value(fams, "sharedd_operation_duration_seconds_count", method="create_share") == 2
    assert value(fams, "sharedd_hook_records_total", backend="mem1", phase="post") >= 3
    assert value(fams, "sharedd_hook_last_seq") >= 6
    assert value(fams, "sharedd_gc_frozen_objects") > 0      # start-up's, frozen
    for generation in "012":
        assert value(fams, "sharedd_gc_collected_objects_total", generation=generation) >= 0
    assert [n for n in os.listdir(metrics_dir) if n.startswith(".")] == [], "written atomically"


def test_hook_failures_are_counted(sharedd_factory, metrics_dir):
    prom = metrics_dir / "sharedd.prom"
    conf = CONFIG.replace("host_id = storage1", f"host_id = storage1\nmetrics_path = {prom}\n"
                          "metrics_interval = 0.2").replace(
        "hook_drivers = spool, dbus", "hook_drivers = spool, dbus, tests.testhooks:ControlledHook")
    d = sharedd_factory(conf)
    with open(os.path.join(d.workdir, "hookctl.json"), "w") as f:
        f.write('{"fail_pre": ["create_share"]}')
    d.error("/org/sharedd/Sharedd1", "org.sharedd.Sharedd1.Manager", "CreateShare",
            "ssta{sv}", "refused", "NFS", 1, 0)
    # (the hook's failure is counted before the operation's outcome: a
    # file written between the two has the one and not yet the other)
    fams = strict(read_when(str(prom), lambda t: "sharedd_hook_failures_total" in t
                            and 'outcome="hook_failed"' in t))
    assert value(fams, "sharedd_hook_failures_total", backend="mem1", phase="pre") == 1
    assert value(fams, "sharedd_operations_total", method="create_share",
                 outcome="hook_failed") == 1


def test_no_metrics_without_the_exporter_directory(sharedd_factory, tmp_path):
    prom = tmp_path / "absent" / "sharedd.prom"
    d = sharedd_factory(CONFIG.replace("host_id = storage1", f"host_id = storage1\n"
                                       f"metrics_path = {prom}\nmetrics_interval = 0.1"))
    d.create_share("x")
    time.sleep(0.5)
    assert not prom.parent.exists()


def test_mountd_metrics(mountd_tmp, metrics_dir):
    prom = metrics_dir / "sharedd-mountd.prom"
    tmp = os.path.join(mountd_tmp, "metrics")
    os.makedirs(tmp)
    d = Mountd(tmp, None, args=("--no-bus",), interval=60,
               extra=f"metrics_path = {prom}\nmetrics_interval = 0.2\n")
    try:
        d.wait_notify("READY=1")
        share = make_share(name="m", rules=[rule(CLIENT4, "ro")], export="127.0.0.1:/m")
        rec = make_record(7, "post", "allow_access", share=share)
        write_record(d.spool, rec)
        wait_state(tmp, lambda st: share["id"] in st, 10)
        # no NFS client here: the mount fails, is counted, and the share is 'failed'
        text = read_when(str(prom), lambda t: 'state="failed"' in t
                         and "sharedd_mountd_mount_failures_total 0" not in t)
        fams = strict(text)
        assert value(fams, "sharedd_mountd_mounts", state="failed") == 1
        assert value(fams, "sharedd_mountd_mount_failures_total") >= 1
        assert value(fams, "sharedd_mountd_record_seq", host=HOST) == 7
        age = value(fams, "sharedd_mountd_record_age_seconds", host=HOST)
        import datetime
        stamp = datetime.datetime.strptime(rec["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        assert abs(age - (time.time() - stamp)) < 30
    finally:
        assert d.stop() == 0


def test_used_bytes_per_share_on_btrfs(system_bus, netlab, ganesha, metrics_dir, tmp_path):
    """The space a share uses, read from its btrfs quota group: what a
    client writes shows up, at most metrics_usage_interval later."""
    prom = metrics_dir / "sharedd.prom"
    root = tmp_path / "host"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(root, 0o755)
    host = make_storage_host(system_bus, netlab, ganesha, str(root), extra=(
        f"metrics_path = {prom}\nmetrics_interval = 0.2\nmetrics_usage_interval = 0.5"))
    try:
        host.start()
        full, empty = host.create_share("full", "NFS", 1), host.create_share("empty", "NFS", 1)
        full_id, empty_id = full.rsplit("/", 1)[1], empty.rsplit("/", 1)[1]
        mount = os.path.join(host.state_path, "backends", "btrfs1", "mounts", full_id)
        with open(os.path.join(mount, "data"), "wb") as f:
            f.write(os.urandom(24 << 20))
            os.fsync(f.fileno())
        line = re.compile(rf'^sharedd_share_used_bytes{{[^}}]*share="{full_id}"[^}}]*}} (\S+)$',
                          re.M)
        fams = strict(read_when(str(prom), lambda t: float(
            (line.search(t) or [0, 0])[1]) >= 24 << 20, timeout=30))
        used = value(fams, "sharedd_share_used_bytes", share=full_id, name="full",
                     backend="btrfs1")
        assert 24 << 20 <= used < 26 << 20
        assert value(fams, "sharedd_share_used_bytes", share=empty_id) < 1 << 20
    finally:
        destroy_storage_host(host)
