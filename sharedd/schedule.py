"""Snapshot schedules and retention: when the next scheduled snapshot is due,
and which scheduled snapshots a retention rule lets go.

A schedule is either an interval in systemd's time-span syntax ("15min",
"4h", "1d 12h": due at every multiple of it since the Unix epoch, so "1h"
is on the hour) or a calendar expression in the syntax of systemd.time(7)
and `systemd-analyze calendar`:

    [WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]] [UTC]

each component `*`, a value, a list `a,b`, a range `a..b` or a repetition
`a/step` (`*/step`), weekdays as Mon..Sun; the shorthands minutely, hourly,
daily, weekly, monthly, quarterly, semiannually, yearly and annually; local
time unless it ends with UTC. Not supported (refused with a message):
fractional seconds, the last-day `~` form, time zones other than UTC.

A retention rule is a comma-separated list of at most one count ("3": the
three newest) and one age ("7d"): a scheduled snapshot is kept while either
says so, and "" keeps everything.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import time
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from .errors import InvalidArgument

#: a schedule's or retention's text is refused beyond this length
MAX_TEXT = 256
#: days searched for the next elapse (a calendar that never matches, as
#: 2030-02-30, is refused when parsed)
SEARCH_DAYS = 366 * 8 + 2
#: the name of a scheduled snapshot: the elapse time, UTC
NAME_PREFIX = "auto-"
NAME_FORMAT = NAME_PREFIX + "%Y%m%dT%H%M%SZ"
NAME_RE = re.compile(r"auto-\d{8}T\d{6}Z")

_SPAN_UNITS: Dict[str, int] = {}
for _names, _secs in ((("s", "sec", "second", "seconds"), 1),
                      (("m", "min", "minute", "minutes"), 60),
                      (("h", "hr", "hour", "hours"), 3600),
                      (("d", "day", "days"), 86400),
                      (("w", "week", "weeks"), 7 * 86400)):
    for _n in _names:
        _SPAN_UNITS[_n] = _secs
_SPAN_RE = re.compile(r"\s*(\d+)\s*([a-z]+)\s*")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SHORTHANDS = {
    "minutely": "*-*-* *:*:00", "hourly": "*-*-* *:00:00", "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00", "monthly": "*-*-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00", "semiannually": "*-01,07-01 00:00:00",
    "yearly": "*-01-01 00:00:00", "annually": "*-01-01 00:00:00",
}
#: (lowest, highest) of each calendar component
_BOUNDS = {"year": (1970, 2199), "month": (1, 12), "day": (1, 31),
           "hour": (0, 23), "minute": (0, 59), "second": (0, 59)}


def parse_span(text: str, what: str = "time span") -> int:
    """Seconds of a systemd time span ("1h 30min", "90s", "2d"); > 0."""
    rest, total = text.strip().lower(), 0
    if not rest or len(rest) > MAX_TEXT:
        raise InvalidArgument(f"{what} {text[:40]!r} is empty or too long")
    pos = 0
    while pos < len(rest):
        m = _SPAN_RE.match(rest, pos)
        if not m or m.group(2) not in _SPAN_UNITS:
            raise InvalidArgument(f"{what} {text[:40]!r}: expected a number and a unit "
                                  "(s, min, h, d, w), as in 15min or 1h 30min")
        total += int(m.group(1)) * _SPAN_UNITS[m.group(2)]
        pos = m.end()
    if total <= 0:
        raise InvalidArgument(f"{what} {text[:40]!r} is zero")
    return total


def _values(spec: str, component: str, names: Sequence[str] = ()) -> FrozenSet[int]:
    """The values a component allows: * / a / a,b / a..b / a/step / *//step."""
    low, high = _BOUNDS.get(component, (0, len(names) - 1))

    def one(token: str) -> int:
        if names:
            low_token = token.lower()
            if low_token[:3] in names and (len(low_token) == 3 or low_token in _FULL_WEEKDAYS):
                return names.index(low_token[:3])
            raise InvalidArgument(f"{token!r} is not a weekday (Mon..Sun)")
        if not token.isdigit():
            raise InvalidArgument(f"{component} {token!r} is not a number")
        value = int(token)
        if not low <= value <= high:
            raise InvalidArgument(f"{component} {value} is outside {low}..{high}")
        return value
    out: "set[int]" = set()
    for part in spec.split(","):
        if not part:
            raise InvalidArgument(f"{component} {spec!r} has an empty list item")
        base, slash, step_text = part.partition("/")
        step = 0
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise InvalidArgument(f"{component} {part!r}: the step must be a positive number")
            step = int(step_text)
        if base == "*":
            first, last = low, high
            if not step:
                return frozenset(range(low, high + 1))
        elif ".." in base:
            a, _, b = base.partition("..")
            first, last = one(a), one(b)
            if first > last:
                raise InvalidArgument(f"{component} {part!r}: the range is backwards")
        else:
            first = one(base)
            last = high if step else first
        out.update(range(first, last + 1, step or 1))
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Schedule:
    text: str                                  # as given, stripped
    interval: int = 0                          # seconds; 0: a calendar
    weekdays: FrozenSet[int] = frozenset(range(7))
    years: FrozenSet[int] = frozenset()
    months: FrozenSet[int] = frozenset()
    days: FrozenSet[int] = frozenset()
    times: Tuple[int, ...] = ()                # seconds of the day, sorted
    utc: bool = False

    @staticmethod
    def parse(text: str) -> "Schedule":
        """A schedule from its text; InvalidArgument says what is wrong."""
        if not isinstance(text, str) or len(text) > MAX_TEXT or "\x00" in text:
            raise InvalidArgument("a snapshot schedule is text of at most "
                                  f"{MAX_TEXT} characters")
        text = text.strip()
        if not text:
            raise InvalidArgument("the snapshot schedule is empty")
        if text[0].isdigit() and ":" not in text and "-" not in text:
            return Schedule(text=text, interval=parse_span(text, "snapshot schedule"))
        try:
            return _calendar(text)
        except InvalidArgument as exc:
            raise InvalidArgument(f"snapshot schedule {text[:60]!r}: {exc}") from None

    # --- when -----------------------------------------------------------------
    def next_after(self, t: float) -> float:
        """The first elapse strictly after t (seconds since the epoch)."""
        if self.interval:
            return (int(t) // self.interval + 1) * float(self.interval)
        found = self._search(t, forward=True)
        assert found is not None    # parse() refused calendars that never elapse
        return found

    def last_at_or_before(self, t: float) -> Optional[float]:
        """The latest elapse at or before t (None: none in the search window)."""
        if self.interval:
            return (int(t) // self.interval) * float(self.interval)
        return self._search(t, forward=False)

    def _search(self, t: float, forward: bool) -> Optional[float]:
        when = datetime.datetime.fromtimestamp(int(t), datetime.timezone.utc) if self.utc \
            else datetime.datetime.fromtimestamp(int(t))
        day = when.date()
        second = when.hour * 3600 + when.minute * 60 + when.second
        step = datetime.timedelta(days=1 if forward else -1)
        first = True
        for _ in range(SEARCH_DAYS):
            if day.year not in self.years:
                # straight to the next (previous) year the calendar allows
                years = [y for y in self.years if (y > day.year if forward else y < day.year)]
                if not years:
                    return None
                day = datetime.date(min(years), 1, 1) if forward \
                    else datetime.date(max(years), 12, 31)
                first = False
            if self._day_matches(day):
                times = self.times if forward else tuple(reversed(self.times))
                for s in times:
                    if first and (s <= second if forward else s > second):
                        continue
                    stamp = self._epoch(day, s)
                    if stamp is not None and ((stamp > t) if forward else (stamp <= t)):
                        return stamp
            first = False
            if not (1970 <= (day + step).year <= 2199):
                return None
            day += step
        return None

    def _day_matches(self, day: datetime.date) -> bool:
        return (day.weekday() in self.weekdays and day.year in self.years
                and day.month in self.months and day.day in self.days)

    def _epoch(self, day: datetime.date, second: int) -> Optional[float]:
        """The moment of that local (or UTC) time; None for a local time the
        clock skips (a daylight-saving change), as systemd skips it."""
        h, rest = divmod(second, 3600)
        m, s = divmod(rest, 60)
        if self.utc:
            return datetime.datetime(day.year, day.month, day.day, h, m, s,
                                     tzinfo=datetime.timezone.utc).timestamp()
        stamp = time.mktime((day.year, day.month, day.day, h, m, s, 0, 0, -1))
        if time.localtime(stamp)[:6] != (day.year, day.month, day.day, h, m, s):
            return None
        return float(stamp)


def _calendar(text: str) -> Schedule:
    words = text.split()
    utc = False
    if words and words[-1].upper() == "UTC":
        utc, words = True, words[:-1]
    if len(words) == 1 and words[0].lower() in _SHORTHANDS:
        words = _SHORTHANDS[words[0].lower()].split()
    weekdays = frozenset(range(7))
    if words and words[0][:1].isalpha():
        weekdays = _values(words[0], "weekday", _WEEKDAYS)
        words = words[1:]
    given: Dict[str, str] = {}
    for word in words:
        kind = "time" if ":" in word else "date" if "-" in word else ""
        if not kind or kind in given:
            raise InvalidArgument(f"{word!r} is neither a date (Y-M-D) nor a time (H:M[:S]), "
                                  "or comes twice")
        given[kind] = word
    date, clock = given.get("date", "*-*-*"), given.get("time", "00:00:00")
    if "~" in date or "." in clock.replace("..", ""):
        raise InvalidArgument("the last-day form (~) and fractions of seconds are not supported")
    parts = date.split("-")
    if len(parts) == 2:
        parts = ["*"] + parts
    if len(parts) != 3:
        raise InvalidArgument(f"date {date!r} is not YEAR-MONTH-DAY or MONTH-DAY")
    years, months, days = (_values(p, c) for p, c in zip(parts, ("year", "month", "day")))
    hms = clock.split(":")
    if len(hms) == 2:
        hms.append("00")
    if len(hms) != 3:
        raise InvalidArgument(f"time {clock!r} is not HOUR:MINUTE[:SECOND]")
    hours, minutes, seconds = (_values(p, c) for p, c in zip(hms, ("hour", "minute", "second")))
    times = tuple(sorted(h * 3600 + m * 60 + s for h in hours for m in minutes for s in seconds))
    sched = Schedule(text=text, weekdays=weekdays, years=years, months=months, days=days,
                     times=times, utc=utc)
    if sched._search(time.time(), forward=True) is None:
        raise InvalidArgument("it never elapses (no such date in the coming years)")
    return sched


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which scheduled snapshots may go: keep the `count` newest and every
    one younger than `max_age` seconds (0: that rule is not set)."""
    text: str = ""
    count: int = 0
    max_age: int = 0

    @staticmethod
    def parse(text: str) -> "Retention":
        if not isinstance(text, str) or len(text) > MAX_TEXT or "\x00" in text:
            raise InvalidArgument(f"a snapshot retention is text of at most {MAX_TEXT} characters")
        count = age = 0
        for item in (i.strip() for i in text.split(",")):
            if not item:
                continue
            if item.isdigit():
                if count:
                    raise InvalidArgument(f"snapshot retention {text!r} names two counts")
                count = int(item)
                if count < 1:
                    raise InvalidArgument("a snapshot retention count is at least 1")
            else:
                if age:
                    raise InvalidArgument(f"snapshot retention {text!r} names two ages")
                age = parse_span(item, "snapshot retention age")
        return Retention(text=text.strip(), count=count, max_age=age)

    def doomed(self, created: Sequence[Tuple[str, float]], now: float) -> List[str]:
        """Of (id, created at) scheduled snapshots, the ids no rule keeps
        (oldest first). Without any rule, none."""
        if not (self.count or self.max_age):
            return []
        newest_first = sorted(created, key=lambda c: c[1], reverse=True)
        out = []
        for i, (sid, at) in enumerate(newest_first):
            kept = (self.count and i < self.count) or (self.max_age and now - at < self.max_age)
            if not kept:
                out.append(sid)
        return list(reversed(out))


def scheduled_name(elapse: float) -> str:
    return time.strftime(NAME_FORMAT, time.gmtime(elapse))


def name_time(name: str) -> Optional[float]:
    """The elapse a scheduled snapshot's name tells (None: not such a name)."""
    if not NAME_RE.fullmatch(name):
        return None
    return float(datetime.datetime.strptime(name, NAME_FORMAT)
                 .replace(tzinfo=datetime.timezone.utc).timestamp())
