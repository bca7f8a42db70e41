"""Command line of sharedd-mountd (also `python3 -m mountd`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import List, Optional

from sharedd import __version__
from sharedd.errors import ConfigError

from . import config as configlib
from .trust import describe

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """'<N>' syslog priority prefixes, which journald turns into log levels."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharedd-mountd",
        description="Mount sharedd shares on this client when an access rule matches it, "
                    "and unmount them when access is withdrawn or the share is gone.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"configuration file (default {configlib.DEFAULT_CONFIG}; "
                        "drop-ins are read from FILE.d/*.conf)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration and exit (0: valid)")
    p.add_argument("--no-bus", action="store_true",
                   help="run without D-Bus (no Mountd1 object, no Fired signals)")
    p.add_argument("--version", action="version", version=f"sharedd-mountd {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    path = args.config or configlib.DEFAULT_CONFIG
    optional = args.config is None
    try:
        cfg = configlib.load(path, optional=optional)
    except ConfigError as exc:
        print(f"sharedd-mountd: configuration error: {exc}", file=sys.stderr)
        return 1
    if args.check_config:
        used = ", ".join(f for f in cfg.files if os.path.exists(f)) or "built-in defaults"
        print(f"sharedd-mountd: configuration OK ({used})")
        print(f"  {describe(cfg.trust)}")
        return 0
    setup_logging(cfg.log_level)
    from .daemon import Daemon
    try:
        daemon = Daemon(path, optional_config=optional, use_bus=not args.no_bus)
        return asyncio.run(daemon.run())
    except ConfigError as exc:
        logging.getLogger("mountd").error("configuration error: %s", exc)
        return 1
    except Exception as exc:
        logging.getLogger("mountd").exception("fatal: %s", exc)
        return 1
