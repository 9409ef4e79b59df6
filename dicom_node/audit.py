"""Audit trail: who changed what, when. Details carry row ids and settings, never PHI."""

from __future__ import annotations

import getpass
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.store.models import AuditEvent

LOGGER = logging.getLogger(__name__)

SYSTEM = "system"


def cli_actor() -> str:
    """The actor name for changes made from the command line."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def user_actor(username: str) -> str:
    return f"user:{username}"


def record(
    session: Session, actor: str, action: str, target: str = "", details: dict[str, Any] | None = None
) -> AuditEvent:
    """Add an audit event to ``session`` (committed with the change it describes)."""
    event = AuditEvent(actor=actor, action=action, target=target, details=details or {})
    session.add(event)
    LOGGER.info("audit %s by %s on %s", action, actor, target or "-")
    return event


class RecentReads:
    """Which actor read which target lately, so that reads that come in bursts are recorded once: a study
    page loads each image and heat map of the study as a request of its own, which the page's own
    ``study.view`` covers, while a script that fetches images without opening the study must still be in
    the log. :meth:`first` is True for a (actor, target) not read within ``window`` seconds, and starts its
    window; the memory holds at most ``max_entries`` pairs (the oldest go first)."""

    def __init__(self, window: float = 3600.0, max_entries: int = 10_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._read: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, actor: str, target: str) -> bool:
        now = time.monotonic()
        with self._lock:
            when = self._read.get((actor, target))
            if when is not None and now - when <= self.window:
                return False
            self._read[(actor, target)] = now
            self._read.move_to_end((actor, target))
            while len(self._read) > self.max_entries:
                self._read.popitem(last=False)
            return True
