"""What the scripts run inside the qemu guest share (they import it from the
9p repo share; tests/guest/ would change the image's cache key)."""

from __future__ import annotations

import subprocess
import sys
import traceback
from typing import Callable


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command (never a shell); on failure with check, say which and why."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{argv}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def run_main(main: Callable[[], None]) -> None:
    """A guest script's entry: a failure prints its traceback (the host shows
    the guest's output) and exits non-zero."""
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)
