"""Publishing the spool to client hosts, read-only, over NFS.

With spool_export_clients set, the spool directory is exported like a share
by the NFS export helper of the first backend that serves NFS (NFS-Ganesha
or the kernel server), read-only to those clients, with their root
squashed. It is ensured at start and whenever the export service comes
back, together with the shares. Clients mount it themselves (mountd's
spool_source) and trust what they read in it only through the records'
signatures.

The export is named after a share id derived from the host id, so its
location does not change across restarts (Manager.SpoolExport).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Dict, List, Optional

from . import constants as C
from .backend import Backend
from .models import AccessRule, Share

log = logging.getLogger(__name__)

NAME = "sharedd-spool"


def spool_share_id(host_id: str) -> str:
    return hashlib.sha256(f"{NAME}:{host_id}".encode()).hexdigest()[:32]


class SpoolExport:
    def __init__(self, host_id: str, spool_dir: str, clients: List[str],
                 backends: Dict[str, Backend]):
        self.spool_dir = spool_dir
        self.clients = list(clients)
        self.backends = backends
        # Records are written on the local file system, not through the export:
        # NFS-Ganesha must not serve cached attributes or listings of them
        # (its default, 60 s, would delay every grant by up to a minute).
        self.share = Share(id=spool_share_id(host_id), name=NAME, backend="", protocol="NFS",
                           size_gib=0, status=C.STATUS_AVAILABLE,
                           driver_data={"attr_expiration_time": 0})
        self.location = ""             # host:/path clients mount, once exported
        self.error: Optional[str] = None

    def backend(self) -> Optional[Backend]:
        """The first backend that serves NFS (whether it is up or not)."""
        # A share server's ganesha serves its tenant's network only: the spool
        # goes out through the host's own export service.
        return next((b for b in self.backends.values() if "NFS" in b.driver.helpers
                     and not b.config.driver_handles_share_servers), None)

    def rules(self) -> List[AccessRule]:
        return [AccessRule(id=hashlib.sha256(c.encode()).hexdigest()[:32], share_id=self.share.id,
                           access_type="ip", access_to=c, access_level="ro",
                           state=C.RULE_ACTIVE, squash="root_squash")
                for c in self.clients]

    async def ensure(self) -> None:
        """Export the spool (or withdraw an export left from an earlier
        configuration); failures are logged and tried again next time."""
        b = self.backend()
        if b is None:
            if self.clients:
                self._failed("no backend serves NFS")
            return
        if b.setup_error:
            return                      # ensured again when the backend comes up
        helper = b.driver.helpers["NFS"]
        try:
            if not self.clients:
                if await asyncio.to_thread(helper.has_export, self.share.id):
                    await asyncio.to_thread(helper.unexport, self.share, self.spool_dir)
                    log.info("spool export withdrawn (spool_export_clients is empty)")
                return
            locations = await asyncio.to_thread(helper.export, self.share, self.spool_dir,
                                                self.rules())
        except Exception as exc:          # the helper's own errors, and bugs: logged
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        if locations and locations[0] != self.location:
            log.info("spool %s exported read-only at %s to %s (backend %s)", self.spool_dir,
                     locations[0], ", ".join(self.clients), b.name)
        self.location = locations[0] if locations else ""
        self.error = None

    def _failed(self, why: str) -> None:
        if why != self.error:
            log.error("cannot export the spool to %s: %s", ", ".join(self.clients), why)
        self.error = why
