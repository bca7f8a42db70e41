"""What the scripts run inside the qemu guest share (they import it from the
9p repo share; tests/guest/ would change the image's cache key)."""

from __future__ import annotations

import subprocess


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command (never a shell); on failure with check, say which and why."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{argv}: exit {p.returncode}: {p.stderr.strip()}")
    return p
