"""Metrics in the Prometheus text exposition format, for the node exporter's
textfile collector: written atomically (temporary file, rename) every
metrics_interval seconds to metrics_path when its directory exists.

Both daemons use `Registry` for their counters and histograms and
`exposition` to render gauges read at write time; the engine and mountd say
what they count (no D-Bus here).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .options import Opt
from .util import atomic_write

log = logging.getLogger(__name__)

#: where Debian's prometheus-node-exporter reads textfile metrics
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"


def options(file_name: str) -> List[Opt]:
    """The metrics_path and metrics_interval options of a daemon."""
    return [
        Opt("metrics_path", "path", f"{TEXTFILE_DIR}/{file_name}",
            help="Where the Prometheus metrics are written (text format, replaced atomically) "
                 "for the node exporter's textfile collector; nothing is written while its "
                 "directory does not exist."),
        Opt("metrics_interval", "float", 30.0, min=0,
            help="Seconds between two writes of metrics_path (0: never)."),
    ]


#: seconds: the operation latency histogram's upper bounds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

Labels = Tuple[Tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class Family:
    """One metric: its help, type and samples."""

    def __init__(self, name: str, kind: str, help_text: str):
        assert _NAME_RE.fullmatch(name), name
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: List[Tuple[str, Labels, float]] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> "Family":
        self.samples.append((self.name + suffix, tuple(sorted(labels.items())), value))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help.replace(chr(10), ' ')}",
                 f"# TYPE {self.name} {self.kind}"]
        lines += [f"{name}{_labels(labels)} {_number(value)}"
                  for name, labels, value in self.samples]
        return "\n".join(lines) + "\n"


class Registry:
    """Counters and latency histograms, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Labels], float] = {}
        self._help: Dict[str, str] = {}
        # name -> labels -> (bucket counts, sum, count)
        self._hist: Dict[str, Dict[Labels, Tuple[List[int], float, int]]] = {}

    def inc(self, name: str, help_text: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._help[name] = help_text
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name: str, help_text: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._help[name] = help_text
            series = self._hist.setdefault(name, {})
            buckets, total, count = series.get(key, ([0] * len(BUCKETS), 0.0, 0))
            buckets = [n + (1 if seconds <= bound else 0) for n, bound in zip(buckets, BUCKETS)]
            series[key] = (buckets, total + seconds, count + 1)

    def families(self) -> List[Family]:
        with self._lock:
            out: Dict[str, Family] = {}
            for (name, labels), value in sorted(self._counters.items()):
                fam = out.setdefault(name, Family(name, "counter", self._help[name]))
                fam.add(value, **dict(labels))
            for name, series in sorted(self._hist.items()):
                fam = Family(name, "histogram", self._help[name])
                for labels, (buckets, total, count) in sorted(series.items()):
                    for bound, n in zip(BUCKETS, buckets):
                        fam.add(n, "_bucket", le=_number(bound), **dict(labels))
                    fam.add(count, "_bucket", le="+Inf", **dict(labels))
                    fam.add(total, "_sum", **dict(labels))
                    fam.add(count, "_count", **dict(labels))
                out[name] = fam
            return list(out.values())


def exposition(families: Iterable[Family]) -> str:
    return "".join(f.render() for f in families if f.samples or f.kind != "gauge")


def write(path: str, text: str) -> bool:
    """Replace path with text atomically (0644); False if its directory
    does not exist (no node exporter here: nothing to write for)."""
    if not os.path.isdir(os.path.dirname(path) or "."):
        return False
    atomic_write(path, text.encode("utf-8"), 0o644)
    return True


def gauge(name: str, help_text: str, rows: Iterable[Tuple[Mapping[str, str], float]]) -> Family:
    fam = Family(name, "gauge", help_text)
    for labels, value in rows:
        fam.add(value, **dict(labels))
    return fam


def by_label(rows: Sequence[Tuple[str, str, float]], first: str, second: str
             ) -> List[Tuple[Dict[str, str], float]]:
    return [({first: a, second: b}, v) for a, b, v in rows]


def optional(value: Optional[float]) -> List[Tuple[Dict[str, str], float]]:
    return [] if value is None else [({}, value)]
