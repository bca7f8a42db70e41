"""Bounded work: the real mountd process against a burst of 10,000 signed
records (200 shares, access changing 50 times each) and against one
periodic state of 10,000 shares in parts. mount(8) is tests/support/mount_shim.py on
mountd's PATH (a bind mount, each call logged), so the test sees
every mount command. mountd must end with exactly what the last records
grant, and fold the burst: far fewer mount commands than records. Timings
are for bench/mountd, not asserted here."""

import os
import pathlib
import time
import uuid

from tests.fixtures.mountd_env import (CLIENT4, HOST, make_record, make_share, new_key, rule,
                                       signed, write_record)
from tests.support import mount_shim
from tests.test_mountd_daemon import Mountd, own_state

def _mountd(tmp, key):
    bindir, src = os.path.join(tmp, "bin"), os.path.join(tmp, "src")
    os.makedirs(src)
    calls = os.path.join(tmp, "mount-calls")
    mount_shim.install(bindir, src, calls)
    d = Mountd(tmp, None, args=("--no-bus",), interval=600,
               extra=f"trusted_keys = {key.public.inline()}\nlog_level = warning\n",
               env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    return d, calls


def _publish(staged, host_dir):
    for name in staged:
        os.rename(os.path.join(host_dir, "." + name), os.path.join(host_dir, name))


def _stage(spool, rec):
    """Write rec under a dot name (invisible to mountd) for a burst later."""
    path = write_record(spool, rec)
    name = os.path.basename(path)
    os.rename(path, os.path.join(os.path.dirname(path), "." + name))
    return name


def _wait_mounted(tmp, want, d, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        got = {sid: m["level"] for sid, m in own_state(tmp).items() if m["state"] == "mounted"}
        if got == want:
            return
        assert time.monotonic() < deadline, f"{len(got)} of {len(want)} mounted\n{d.text()[-3000:]}"
        assert d.proc.poll() is None, d.text()[-3000:]
        time.sleep(0.05)


def test_a_burst_of_ten_thousand_records_is_folded_before_mounting(mountd_tmp):
    key = new_key()
    d, calls = _mountd(mountd_tmp, key)
    try:
        d.wait_notify("READY=1")
        ids = [uuid.uuid4().hex for _ in range(200)]
        levels = ["rw", "ro", None, "ro", "rw"]
        staged, final = [], {}
        n = 10000
        for i in range(n):
            k = i % 200
            last = i + 200 >= n
            level = (None if k % 2 else ("rw" if k % 4 == 0 else "ro")) if last \
                else levels[(i // 200) % len(levels)]
            rules = [rule(CLIENT4, level)] if level else [rule("10.74.0.99", "rw")]
            share = make_share(sid=ids[k], name=f"f{k}", rules=rules)
            staged.append(_stage(d.spool, signed(key, make_record(
                i + 1, "post", "allow_access", share=share, second=i))))
            if last and level:
                final[ids[k]] = level
        _publish(staged, os.path.join(d.spool, HOST))
        _wait_mounted(mountd_tmp, final, d)
        share_mounts = [c for c in pathlib.Path(calls).read_text().splitlines()
                        if c.startswith("-t ")]
        assert len(final) <= len(share_mounts) <= 3 * len(final), \
            f"{len(share_mounts)} mount commands for {n} records: not folded"
    finally:
        assert d.stop() == 0


def test_a_periodic_state_of_ten_thousand_shares_in_parts(mountd_tmp):
    key = new_key()
    d, calls = _mountd(mountd_tmp, key)
    try:
        d.wait_notify("READY=1")
        shares, final = [], {}
        for k in range(10000):
            mine = k % 200 == 0
            share = make_share(name=f"p{k}", rules=[rule(CLIENT4 if mine else "10.74.0.99", "rw")])
            shares.append(share)
            if mine:
                final[share["id"]] = "rw"
        chunks = [shares[i:i + 1500] for i in range(0, len(shares), 1500)]
        staged = [_stage(d.spool, signed(key, dict(
            make_record(i, "periodic", shares=c, second=i), part=i, parts=len(chunks))))
            for i, c in enumerate(chunks, 1)]
        sizes = [os.path.getsize(os.path.join(d.spool, HOST, "." + n)) for n in staged]
        assert len(chunks) == 7 and sum(sizes) > 4 * 1024 * 1024 > max(sizes), sizes
        _publish(staged, os.path.join(d.spool, HOST))
        _wait_mounted(mountd_tmp, final, d)
    finally:
        assert d.stop() == 0
