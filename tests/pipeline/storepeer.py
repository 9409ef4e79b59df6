"""An in-process pynetdicom Storage SCP standing in for a destination in outbox tests.

It records every SOP Instance UID it receives and each association, and answers with a chosen status.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from tests import peers


class StorePeer:
    def __init__(
        self,
        ae_title: str = "PACS",
        port: int | None = None,
        status: int = 0x0000,
        abort_after: int | None = None,
        comment: str = "",
        delay: float = 0.0,
    ) -> None:
        self.ae_title = ae_title
        self.port = port or peers.free_port()
        self.status = status
        self.comment = comment  # the Error Comment (0000,0902) sent with the status, if any
        self.abort_after = abort_after  # abort the association instead of answering the next object
        self.delay = delay  # seconds taken to store each object (a slow archive)
        self.received: list[str] = []
        self.associations = 0
        self.offered_max_pdus: list[int] = []  # the Maximum Length each requestor offered
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Event) -> int | Dataset:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            if self.abort_after is not None and len(self.received) >= self.abort_after:
                event.assoc.abort()  # a PACS that goes away mid-batch: no response to this object
                return 0x0000
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        if not self.comment:
            return self.status
        response = Dataset()
        response.Status = self.status
        response.ErrorComment = self.comment
        return response

    def _on_accepted(self, event: Event) -> None:
        with self._lock:
            self.associations += 1
            self.offered_max_pdus.append(int(event.assoc.requestor.maximum_length))

    def start(self) -> StorePeer:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
