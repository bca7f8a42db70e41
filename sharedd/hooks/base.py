"""The hook interface (modelled on Manila's HookBase).

Hooks are synchronous and run in worker threads; records are dicts that
match sharedd.record.SCHEMA, checked once before the first hook gets them
(sharedd.record.Checked): a hook reads its record and never changes it, as
the hooks after it get the same one. A hook never receives secrets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:
    from ..signing import SigningKey


class HookContext:
    """What the daemon gives hooks: identity, paths, and the signal emitter."""

    def __init__(self, host_id: str, spool_dir: str,
                 emit_signal: Optional[Callable[[str, str, str], None]] = None,
                 retention_seconds: int = 0, retention_count: int = 0,
                 signer: Optional["SigningKey"] = None, metrics: Any = None):
        self.host_id = host_id
        # Signs every record before any hook sees it (None: unsigned).
        self.signer = signer
        self.spool_dir = spool_dir
        # The engine observer's hook_fired (thread-safe); None without one.
        self.emit_signal = emit_signal
        self.retention_seconds = retention_seconds
        self.retention_count = retention_count
        # sharedd.metrics.Registry counting records and hook failures (or None)
        self.metrics = metrics


class Hook:
    """Base class: override the entry points you need."""

    #: False for a hook that never blocks (it only hands the record on): it is
    #: called on the event loop instead of in a worker thread, but for the
    #: periodic records (hundreds of shares each), so it must be thread-safe
    blocking = True
    #: True for a hook that has its record on disk when it returns: the
    #: record's seq then survives a power cut without the store's fsync
    #: (see last_seq and HookManager.keeps_seq)
    durable = False
    #: True for a hook that can start on its record while the transaction
    #: that took the record's seq commits (write_staged); only the first
    #: hook of a backend is asked to
    stages = False

    def __init__(self, backend_name: str, backend_config, context: HookContext):
        self.backend_name = backend_name
        self.config = backend_config
        self.context = context

    def execute_pre_hook(self, record: Dict[str, Any]) -> Any:
        """Runs before the driver call. Return value is passed to the post hook.
        Raising stops the operation unless suppress_pre_hooks_errors is set."""
        return None

    def execute_post_hook(self, record: Dict[str, Any], pre_hook_data: Any) -> Optional[Dict[str, Any]]:
        """Runs after the driver call with its results in record. May return a
        dict of result updates (currently: export_locations)."""
        return None

    def write_staged(self, record: Dict[str, Any], committed: Callable[[float], bool]) -> Any:
        """For a hook that stages: what execute_pre_hook or execute_post_hook
        does with record (its value stands for theirs), started in a worker
        thread before the commit. Prepare what no reader sees, then call
        committed(timeout): publish only if it returns True (the transaction
        is done), otherwise (False, or TimeoutError) undo what was prepared;
        return None after False."""
        raise NotImplementedError

    def last_seq(self, epoch: str) -> int:
        """The highest seq of epoch this hook holds on disk (0: none)."""
        return 0

    def execute_periodic_hook(self, record: Dict[str, Any]) -> None:
        """Runs every periodic_hooks_interval with the full state."""
