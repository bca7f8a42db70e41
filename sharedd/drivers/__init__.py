"""Share driver registry: short name -> implementation (module:Class)."""

import importlib

DRIVERS = {
    "btrfs": "sharedd.drivers.btrfs:BtrfsDriver",
}


def load_class(spec: str):
    """Import 'module:Class'."""
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def driver_class(name: str):
    return load_class(DRIVERS[name])
