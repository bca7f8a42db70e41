"""Engine errors. Each maps 1:1 to a named D-Bus error (see bus/errors.py).

The engine raises these and nothing else towards callers; a driver that fails
in an unexpected way is wrapped as BackendFailure by the engine.
"""


class SharedError(Exception):
    """Base of every error the engine reports to a caller."""

    #: last element of the D-Bus error name org.sharedd.Sharedd1.Error.<name>
    name = "Failed"


class InvalidArgument(SharedError):
    name = "InvalidArgument"


class NotFound(SharedError):
    name = "NotFound"


class AlreadyExists(SharedError):
    name = "AlreadyExists"


class InvalidState(SharedError):
    name = "InvalidState"


class NotSupported(SharedError):
    name = "NotSupported"


class CapacityExceeded(SharedError):
    name = "CapacityExceeded"


class NotAuthorized(SharedError):
    """The caller may not do this (polkit, or the admin group, said no)."""
    name = "NotAuthorized"


class BackendFailure(SharedError):
    name = "BackendFailure"


class StateLost(SharedError):
    """Nothing commits any more: the state database's disk failed a write or
    an fsync (sharedd exits for a restart), or the store is closed. Start-up
    and recovery loops stop at it rather than putting every object in error.
    Reported as Failed."""


class Cancelled(SharedError):
    """A job was cancelled (Job.Cancel) before it finished."""
    name = "Cancelled"


class ConfigError(Exception):
    """Invalid configuration; the message names file, section and option."""


ALL_ERRORS = (InvalidArgument, NotFound, AlreadyExists, InvalidState,
              NotSupported, CapacityExceeded, BackendFailure, Cancelled, NotAuthorized)


class AlreadyRunning(Exception):
    """Another sharedd holds the state directory (message names its pid)."""
