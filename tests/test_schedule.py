"""Snapshot schedules: the calendar parser against systemd's own
(`systemd-analyze calendar --base-time=... --iterations=...`), in UTC and in
zones with daylight saving time; intervals; retention; scheduled names."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from sharedd.errors import InvalidArgument
from sharedd.schedule import Retention, Schedule, name_time, parse_span, scheduled_name
from tests.support import components

EXPRESSIONS = [
    "daily", "hourly", "minutely", "weekly", "monthly", "quarterly", "semiannually", "yearly",
    "annually", "Mon..Fri *-*-* 08:00", "Sat,Sun 10:30", "*:0/15", "*-*-01 03:00",
    "*-02-29 12:00", "Mon *-*-1..7 04:00", "*-*-* 02,14:30:15", "*-1/2-1 00:00",
    "2027-03-27 02:30", "Fri *-*-13 13:13", "*-*-* 00/6:00", "daily UTC", "Tue 9:05",
    "*-*-* 23:59:59", "*-12-31 23:00", "wednesday *-*-* 17:45",
]
#: base times: around the 2026 DST changes in Europe and America, a leap day, a new year
BASES = [1774746000, 1793052000, 1772924400, 1709164800, 1798758000, 1764547200]
ZONES = ["UTC", "Europe/Berlin", "America/New_York"]
_UTC_LINE = re.compile(r"(?:\(in UTC\)|Next elapse|Iter\. #\d+): \w{3} "
                       r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")


def systemd_elapses(expression: str, base: int, zone: str, n: int) -> list:
    proc = subprocess.run(["systemd-analyze", "calendar", f"--base-time=@{base}",
                           f"--iterations={n}", expression], capture_output=True, text=True,
                          env=dict(os.environ, TZ=zone, LC_ALL="C"), timeout=30)
    assert proc.returncode == 0, proc.stderr
    found = _UTC_LINE.findall(proc.stdout)
    return [time.mktime(time.strptime(t + " UTC", "%Y-%m-%d %H:%M:%S %Z")) - time.timezone
            for t in found]


@pytest.fixture
def zone(request, monkeypatch):
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("zone", ZONES, indirect=True)
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_next_elapses_agree_with_systemd(expression, zone):
    components.used("systemd-analyze calendar (reference for the schedule parser)")
    sched = Schedule.parse(expression)
    for base in BASES:
        want = systemd_elapses(expression, base, zone, 4)
        got, t = [], float(base)
        for _ in range(len(want)):
            t = sched.next_after(t)
            got.append(t)
        assert got == want, (expression, zone, base, [time.ctime(x) for x in got],
                             [time.ctime(x) for x in want])
        # the elapse before the first one is the last at or before base
        last = sched.last_at_or_before(base)
        if last is None:            # a calendar of one future date has no elapse before
            assert re.match(r"\d{4}-", expression), expression
        else:
            assert last <= base and sched.next_after(last) == want[0]


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("Foo *-*-*", "not a weekday"), ("*-*-* 25:00", "hour 25 is outside"),
    ("*-13-01", "month 13 is outside"), ("*:*:1.5", "fractions"), ("*-*~1", "last-day"),
    ("2030-02-30", "never elapses"), ("*-*-* 1:2:3:4", "HOUR:MINUTE"), ("1.5h", "a number and a unit"),
    ("0min", "zero"), ("daily daily", "not a weekday"), ("*-*-* 1:00 2:00", "comes twice"), ("*-*-* 12:00 CET", "neither a date"),
    ("x" * 300, "at most 256"), ("Mon..Fri/0", "step must be"), ("*-*-5..1", "backwards"),
])
def test_bad_schedules_are_refused_with_what_is_wrong(text, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Schedule.parse(text)


def test_intervals_fall_on_multiples_since_the_epoch():
    assert parse_span("1h 30min") == 5400 and parse_span("2d") == 172800
    sched = Schedule.parse("15min")
    assert sched.next_after(900.0) == 1800.0 and sched.next_after(901.5) == 1800.0
    assert sched.last_at_or_before(1799.0) == 900.0 and sched.last_at_or_before(1800.0) == 1800.0


def test_retention_keeps_by_count_or_age_and_says_what_goes():
    snaps = [(f"s{i}", 1000.0 + i * 100) for i in range(6)]     # s5 newest
    assert Retention.parse("3").doomed(snaps, 2000) == ["s0", "s1", "s2"]
    assert Retention.parse("250s").doomed(snaps, 1600) == ["s0", "s1", "s2", "s3"]
    # both: either rule keeps a snapshot
    assert Retention.parse("2, 350s").doomed(snaps, 1600) == ["s0", "s1", "s2"]
    assert Retention.parse("").doomed(snaps, 10 ** 9) == []
    for bad in ("0", "3,4", "1d,2d", "x", "1.5"):
        with pytest.raises(InvalidArgument):
            Retention.parse(bad)


def test_scheduled_names_tell_their_elapse():
    assert scheduled_name(1796083200.0) == "auto-20261201T000000Z"
    assert name_time("auto-20261201T000000Z") == 1796083200.0
    for other in ("auto-2026", "nightly", "auto-20261201T000000", "xauto-20261201T000000Z"):
        assert name_time(other) is None
