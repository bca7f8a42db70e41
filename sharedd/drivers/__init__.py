"""Share driver registry: short name -> implementation (module:Class)."""

import importlib

DRIVERS = {
    "btrfs": "sharedd.drivers.btrfs:BtrfsDriver",
    "btrfs_remote": "sharedd.drivers.btrfs_remote:BtrfsRemoteDriver",
    "volume": "sharedd.drivers.volume:VolumeDriver",
    "glusterfs_native": "sharedd.drivers.glusterfs_native:GlusterfsNativeDriver",
}


def load_class(spec: str):
    """Import 'module:Class'."""
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def driver_class(name: str):
    """A built-in driver by short name, or a third-party one as module:Class."""
    return load_class(DRIVERS.get(name, name))
