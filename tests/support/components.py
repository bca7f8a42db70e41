"""Registry of the real components a test run exercised (printed at the end).

Fixtures that start a real thing call used("NFS-Ganesha 5.x") etc.
"""

_USED = set()


def used(name: str) -> None:
    _USED.add(name)


def all_used():
    return sorted(_USED)
