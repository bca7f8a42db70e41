"""Command line of the share daemon: `sharedd --config FILE`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from . import __version__
from . import config as config_mod
from .errors import ConfigError


def setup_logging(level: str) -> None:
    if os.environ.get("JOURNAL_STREAM"):
        # journald adds time and unit; the <N> prefix sets the priority.
        fmt = "<%(priority)s>%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    class _Priority(logging.Filter):
        MAP = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

        def filter(self, record):
            record.priority = self.MAP.get(record.levelname, 6)
            return True
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Priority())
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharedd",
        description="Share daemon: serves shares (btrfs, block volumes, GlusterFS) over NFS, "
                    "CIFS and GlusterFS, driven over the system D-Bus as org.sharedd.Sharedd1.",
        epilog="See sharedd(8) and sharedd.conf(5).")
    p.add_argument("--config", default=config_mod.DEFAULT_CONFIG, metavar="FILE",
                   help="configuration file; FILE.d/*.conf drop-ins are read after it "
                        f"(default: {config_mod.DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print a summary and exit")
    p.add_argument("--print-public-key", action="store_true",
                   help="print the public key of the record signing key (made if missing) "
                        "as clients list it in trusted_keys_dir, and exit")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override log_level from the configuration")
    p.add_argument("--version", action="version", version=f"sharedd {__version__}")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"sharedd: configuration error: {exc}", file=sys.stderr)
        return 1
    if args.print_public_key:
        from .signing import open_key
        setup_logging("warning")
        try:
            print(open_key(cfg.record_signing_key, cfg.host_id).public.line())
        except ConfigError as exc:
            print(f"sharedd: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.check_config:
        print(f"configuration OK: {', '.join(cfg.files)}")
        for name, b in cfg.backends.items():
            print(f"  backend {name}: driver {b.share_driver}, protocols "
                  f"{', '.join(b.enabled_share_protocols)}, hooks {', '.join(b.hook_drivers) or 'none'}")
        for name in cfg.unlisted:
            print(f"  section [{name}]: valid, not served (not in enabled_share_backends)")
        for text in config_mod.warnings(cfg):
            print(f"warning: {text}")
        return 0
    setup_logging(args.log_level or cfg.log_level)
    from .daemon import StartupError, run
    try:
        return asyncio.run(run(args.config, cfg))
    except StartupError as exc:
        logging.getLogger("sharedd").error("cannot start: %s", exc)
        return 1
    except ConfigError as exc:
        logging.getLogger("sharedd").error("configuration error: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        logging.getLogger("sharedd").error("fatal: %s", exc, exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
