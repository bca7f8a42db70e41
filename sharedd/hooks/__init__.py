"""Hook drivers: registry of built-ins and their options.

A hook driver is a subclass of sharedd.hooks.base.Hook; hook_drivers names
built-ins by short name or third-party hooks as module:Class.
"""

from ..options import Opt

HOOK_DRIVERS = {
    "spool": "sharedd.hooks.spool:SpoolHook",
    "dbus": "sharedd.hooks.dbus_signal:DbusSignalHook",
}

#: backend options declared by the built-in hooks
HOOK_OPTIONS = [
    Opt("hook_timeout", "float", 60.0, min=0.1,
        help="Seconds one hook call may take before it counts as failed."),
    Opt("revocation_hook_timeout", "float", 10.0, min=0.1,
        help="Seconds a deny, a share deletion or an unmanage waits for its pre hooks "
             "before it goes on without them (revocation never waits for a hook's consent)."),
]
