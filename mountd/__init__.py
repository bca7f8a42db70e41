"""sharedd-mountd: the client daemon that mounts sharedd shares from hook records."""
