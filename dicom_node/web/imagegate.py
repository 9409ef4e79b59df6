"""How many uploaded images the console works on at once.

Reading an upload, drawing its preview or heat map, classifying it and drawing its report each hold the
image's pixels several times over while they run (an 8000² picture: from a hundred MB for its preview to
about a GB for its classification). The console serves requests from a pool of threads, so without a limit
a handful of users uploading such pictures, or large DICOM files, at the same moment took that much
each, all at once, from the process that also runs the DICOM listener (review). A study page's radiographs
and heat-map overlays are decoded from the stored DICOM files just as fully (a study page asks for all of
them at once), and take their turns with the uploads. :class:`ImageGate` lets
``web.image_workers`` of them run at once; the others wait their turn, up to ``web.image_wait_seconds``,
and are then answered 503 with a Retry-After header: the console is busy, try again in a moment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dicom_node.errors import OutOfResourcesError

LOGGER = logging.getLogger(__name__)

#: What a refused request is told to wait before it asks again (the Retry-After header, in seconds).
RETRY_AFTER_SECONDS = 10


class ConsoleBusyError(OutOfResourcesError):
    """The console works on as many uploaded images as it may at once, and none ended in time."""

    retry_after = RETRY_AFTER_SECONDS


def busy_headers(exc: BaseException) -> dict[str, str]:
    """The headers of an answer to ``exc``: Retry-After when the console was busy, else none."""
    return {"Retry-After": str(exc.retry_after)} if isinstance(exc, ConsoleBusyError) else {}


class ImageGate:
    """At most ``workers`` threads inside :meth:`turn` at once; a thread waits ``wait_seconds`` at most."""

    def __init__(self, workers: int, wait_seconds: float) -> None:
        if workers < 1:
            raise ValueError("an image gate needs at least one worker")
        self.workers = workers
        self.wait_seconds = wait_seconds
        self._slots = threading.BoundedSemaphore(workers)
        self._holding = threading.local()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Work on an image once a worker is free; :class:`ConsoleBusyError` when none is within the wait.
        A thread already working on one goes on (a report drawing its preview is one turn, not two)."""
        if getattr(self._holding, "turn", False):
            yield
            return
        if not self._slots.acquire(timeout=self.wait_seconds):
            # for the operator: often, and web.image_workers may be raised where memory allows
            LOGGER.warning("console busy: a request waited %g s for one of %d image workers, refused",
                           self.wait_seconds, self.workers)
            raise ConsoleBusyError(
                f"the console is busy with other images (it works on {self.workers} at a time); "
                "try again in a moment"
            )
        self._holding.turn = True
        try:
            yield
        finally:
            self._holding.turn = False
            self._slots.release()
