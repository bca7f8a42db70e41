"""The `dbus` hook driver: every record goes out as the Hooks.Fired signal.

The engine stays free of D-Bus: its observer's hook_fired (the D-Bus
adapter's, which sends the signal from the event loop) is the plain callable
HookContext.emit_signal(phase, method, record_json); this module only calls
it. The signal carries the same validated record as the spool file, as
compact JSON with sorted keys.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Optional

from .. import record as rec
from ..errors import InvalidArgument
from .base import Hook

log = logging.getLogger(__name__)


def record_json(record: Dict[str, Any]) -> str:
    """The signal's record argument: validated, compact, sorted keys."""
    try:
        record = rec.checked(record)
    except rec.RecordError as exc:
        raise InvalidArgument(f"dbus hook: invalid record: {exc}") from None
    return json.dumps(record, sort_keys=True)


class DbusSignalHook(Hook):
    """Emits org.sharedd.Sharedd1.Hooks.Fired for pre, post and periodic records."""

    _warned_no_bus = False
    blocking = False   # the signal is queued on the bus connection

    def emit(self, record: Dict[str, Any]) -> None:
        text = record_json(record)
        emit = self.context.emit_signal
        if emit is None:
            if not self._warned_no_bus:
                log.debug("dbus hook of backend %s: no bus attached, signals not sent",
                          self.backend_name)
                self._warned_no_bus = True
            return
        emit(record["phase"], record["method"], text)

    def execute_pre_hook(self, record: Dict[str, Any]) -> Any:
        self.emit(record)
        return None

    def execute_post_hook(self, record: Dict[str, Any], pre_hook_data: Any) -> Optional[Dict[str, Any]]:
        self.emit(record)
        return None

    def execute_periodic_hook(self, record: Dict[str, Any]) -> None:
        self.emit(record)
