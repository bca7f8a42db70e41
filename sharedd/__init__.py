"""sharedd: a shared-file-system service for Linux hosts."""

__version__ = "0.1.0"
