"""The D-Bus layer of sharedd (the only part of sharedd that imports dbus_next)."""
