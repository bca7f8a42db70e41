"""sharedd.conf for tests of the daemon on a private bus with the in-memory
driver (tests/memdriver.py). @WORK@ is the daemon's work directory (the
sharedd_factory fixture fills it in)."""

MEMORY = """
[DEFAULT]
enabled_share_backends = mem
state_path = @WORK@/state
spool_dir = @WORK@/spool
host_id = storage1

[mem]
share_driver = tests.memdriver:MemoryDriver
memory_capacity_gib = 1000000
"""


def memory(**backend_options: str) -> str:
    """MEMORY with more options in the [mem] section."""
    return MEMORY + "".join(f"{k} = {v}\n" for k, v in backend_options.items())
